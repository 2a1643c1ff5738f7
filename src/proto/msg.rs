//! Application frames: event frames, control frames and client messages (JSON).
//!
//! Invariant: an event frame is built once per message into one `Bytes` holding the WebSocket
//! header and the JSON payload, `{"channel","seq","event","ts","data"}`, with `data` copied
//! verbatim from the publisher. Control frames carry a `"type"` and never an `"event"`.

use std::collections::HashMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::ws::codec;

const OPCODE_TEXT: u8 = 0x1;
const OPCODE_BINARY: u8 = 0x2;
/// Room left in front of the payload for the largest frame header.
const HEADER_ROOM: usize = 10;

/// Deepest nesting of arrays and objects a message's `data` may have (128 is accepted, 129
/// refused at publish).
pub const MAX_DATA_DEPTH: usize = 128;

/// How deeply `json` nests arrays and objects, brackets inside strings not counted. Counting
/// stops just past `MAX_DATA_DEPTH`: the answer is exact up to it and "too deep" beyond.
pub fn nesting_depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
                if deepest > MAX_DATA_DEPTH {
                    break;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Parses a message's `data` (or a frame holding it) whatever its depth: the publish check
/// (`nesting_depth`) is what bounds it, so one nesting level more for the frame around `data`
/// does not make a message the publish API accepted unreadable here.
pub fn parse_data<'a, T: Deserialize<'a>>(json: &'a [u8]) -> serde_json::Result<T> {
    let mut de = serde_json::Deserializer::from_slice(json);
    de.disable_recursion_limit();
    let value = T::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// Builds the shared text frame of one event. `data` must be valid JSON (it is not re-checked).
pub fn event_frame(channel: &str, seq: u64, event: &str, ts_ms: u64, data: &str) -> Bytes {
    let mut buf = Vec::with_capacity(HEADER_ROOM + 56 + channel.len() + event.len() + data.len());
    buf.resize(HEADER_ROOM, 0);
    buf.extend_from_slice(b"{\"channel\":");
    write_json_str(&mut buf, channel);
    buf.extend_from_slice(b",\"seq\":");
    buf.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    buf.extend_from_slice(b",\"event\":");
    write_json_str(&mut buf, event);
    buf.extend_from_slice(b",\"ts\":");
    buf.extend_from_slice(itoa::Buffer::new().format(ts_ms).as_bytes());
    buf.extend_from_slice(b",\"data\":");
    buf.extend_from_slice(data.as_bytes());
    buf.push(b'}');
    frame_in_place(buf)
}

/// Writes the header into the room reserved in front of the payload; no copy of the payload.
fn frame_in_place(buf: Vec<u8>) -> Bytes {
    frame_in_place_as(buf, OPCODE_TEXT)
}

fn frame_in_place_as(mut buf: Vec<u8>, opcode: u8) -> Bytes {
    let payload_len = buf.len() - HEADER_ROOM;
    let start = HEADER_ROOM - codec::frame_header_len(payload_len);
    let mut header = Vec::with_capacity(HEADER_ROOM);
    codec::write_frame_header(&mut header, opcode, payload_len);
    buf[start..HEADER_ROOM].copy_from_slice(&header);
    Bytes::from(buf).slice(start..)
}

fn write_json_str(buf: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(buf, s).expect("writing a str to a Vec cannot fail");
}

/// Machine-readable `code` of an `error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message was not JSON, or not an object with a string `type`.
    BadJson,
    /// A known `type` with missing or mistyped fields.
    BadMessage,
    UnknownType,
    /// A known `type` this server version does not handle yet.
    Unsupported,
    BadChannel,
    Forbidden,
    AlreadySubscribed,
    /// A `refresh` token that failed its checks or names another user.
    BadToken,
    /// A `filter` list that is malformed or too long.
    BadFilter,
    /// Too many messages of this kind too fast (e.g. `filter` beyond 10 per second).
    RateLimited,
    NotSubscribed,
    TooManyChannels,
    /// Binary frames are not accepted from JSON clients.
    BinaryNotSupported,
    /// What was asked for cannot be answered right now (Redis did not answer): try again.
    Unavailable,
}

/// Server → client control frames.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Control<'a> {
    Welcome {
        connection_id: &'a str,
        epoch: &'a str,
        heartbeat_ms: u64,
        channels: &'a [String],
        /// The encoding in force (`json` or `messagepack`).
        encoding: &'a str,
        /// Why the encoding is not the one asked for, when it is not.
        #[serde(skip_serializing_if = "Option::is_none")]
        note: Option<&'a str>,
    },
    Subscribed {
        channel: &'a str,
        /// The channel's seq when the subscription became active; live events follow it.
        seq: u64,
    },
    Unsubscribed {
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    Replayed {
        channel: &'a str,
        recovered: bool,
        /// How many missed events were re-sent before this frame.
        count: usize,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
    },
    Shutdown {
        reason: &'a str,
    },
    /// The answer to `pause`.
    Paused,
    /// The answer to `resume`: events skipped while paused, and how many bytes of terminal
    /// output they held.
    Resumed {
        skipped: u64,
        skipped_bytes: u64,
    },
    /// Server-Sent Events only (WebSocket has close frames): the server ends the stream.
    Closed {
        code: u16,
        reason: &'a str,
    },
    /// Events of `channel` this connection lost to backpressure since the last notice.
    Dropped {
        channel: &'a str,
        count: u64,
    },
    /// The filters now in force (the answer to a `filter` message).
    Filtered {
        agent_ids: &'a [Box<str>],
        project_ids: &'a [Box<str>],
        event_types: &'a [Box<str>],
        #[serde(skip_serializing_if = "Option::is_none")]
        search: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        regex: Option<&'a str>,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        levels: &'a [Box<str>],
    },
    /// The users on a presence channel (the answer to `presence`).
    Presence {
        channel: &'a str,
        members: &'a [String],
    },
    /// A `refresh` was accepted: the connection now lives until `exp` (Unix seconds).
    Refreshed {
        #[serde(skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
    },
}

impl Control<'_> {
    /// The complete text frame.
    pub fn frame(&self) -> Bytes {
        let mut buf = vec![0; HEADER_ROOM];
        serde_json::to_writer(&mut buf, self).expect("control frames always serialize");
        frame_in_place(buf)
    }

    /// The frame in a connection's encoding: JSON text, or the same map in MessagePack.
    pub fn frame_in(&self, encoding: Encoding) -> Bytes {
        match encoding {
            Encoding::Json => self.frame(),
            Encoding::MessagePack => {
                let mut buf = vec![0; HEADER_ROOM];
                rmp_serde::encode::write_named(&mut buf, self)
                    .expect("control frames always serialize");
                frame_in_place_as(buf, OPCODE_BINARY)
            }
            Encoding::Sse => {
                let json = serde_json::to_vec(self).expect("control frames always serialize");
                sse_message(&json)
            }
            Encoding::SocketIo => {
                let value = serde_json::to_value(self).expect("control frames always serialize");
                let name = value["type"].as_str().unwrap_or("control");
                let mut buf = vec![0; HEADER_ROOM];
                buf.extend_from_slice(b"42[\"ringcast:");
                buf.extend_from_slice(name.as_bytes());
                buf.extend_from_slice(b"\",");
                serde_json::to_writer(&mut buf, &value).expect("a value serializes");
                buf.push(b']');
                frame_in_place(buf)
            }
        }
    }

    /// A Socket.IO acknowledgement (`43<id>[...]`) carrying this control's object, with
    /// `"ok"`: false for an `error`, true for anything else.
    pub fn ack_frame(&self, id: u64) -> Bytes {
        let mut value = serde_json::to_value(self).expect("control frames always serialize");
        let ok = value["type"] != "error";
        if let Some(map) = value.as_object_mut() {
            map.insert("ok".into(), ok.into());
        }
        socketio_ack_frame(id, &value)
    }
}

/// A Socket.IO acknowledgement (`43<id>[value]`) as a text frame.
pub fn socketio_ack_frame(id: u64, value: &serde_json::Value) -> Bytes {
    let mut buf = vec![0; HEADER_ROOM];
    buf.extend_from_slice(b"43");
    buf.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
    buf.push(b'[');
    serde_json::to_writer(&mut buf, value).expect("a value serializes");
    buf.push(b']');
    frame_in_place(buf)
}

/// A Socket.IO EVENT (`42["name",value]`) of the server's own as a text frame.
pub fn socketio_event_frame(name: &str, value: &serde_json::Value) -> Bytes {
    let mut buf = vec![0; HEADER_ROOM];
    buf.extend_from_slice(b"42[");
    write_json_str(&mut buf, name);
    buf.push(b',');
    serde_json::to_writer(&mut buf, value).expect("a value serializes");
    buf.push(b']');
    frame_in_place(buf)
}

/// An Engine.IO text packet of the server's own (`2` ping, `40{...}` connect answer) as a
/// text frame.
pub fn engineio_frame(packet: &str) -> Bytes {
    let mut buf = vec![0; HEADER_ROOM];
    buf.extend_from_slice(packet.as_bytes());
    frame_in_place(buf)
}

/// How a connection wants its frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Encoding {
    /// Text frames of JSON (the default).
    #[default]
    Json,
    /// Binary frames of MessagePack maps with the same keys.
    MessagePack,
    /// Server-Sent Events: each message the JSON text in `data:` lines (not a WebSocket
    /// encoding; `/events` streams use it).
    Sse,
    /// Socket.IO v5 over Engine.IO v4: text frames of `42[...]` EVENT packets (see
    /// `event_frame_socketio`; `/socket.io/` sessions use it).
    SocketIo,
}

impl Encoding {
    /// From `encoding=` at the handshake; None for an unsupported name.
    pub fn parse(name: &str) -> Option<Encoding> {
        match name {
            "json" => Some(Encoding::Json),
            "messagepack" | "msgpack" => Some(Encoding::MessagePack),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::MessagePack => "messagepack",
            Encoding::Sse => "sse",
            Encoding::SocketIo => "socket.io",
        }
    }
}

/// How one connection's event frames are built: the encoding, and past what frame size they
/// are compressed (permessage-deflate negotiated; `None`: never).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Format {
    pub encoding: Encoding,
    pub compress_over: Option<u32>,
}

impl From<Encoding> for Format {
    fn from(encoding: Encoding) -> Format {
        Format {
            encoding,
            compress_over: None,
        }
    }
}

/// One SSE message carrying `json`: a `data:` line per line of it, then a blank line.
/// (Our JSON has no line breaks, but a publisher's `data` may hold them as whitespace; an
/// `EventSource` joins the lines with `\n`, so the JSON means the same.)
pub fn sse_message(json: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 16);
    let mut rest = json;
    loop {
        out.extend_from_slice(b"data: ");
        match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(at) => {
                out.extend_from_slice(&rest[..at]);
                out.push(b'\n');
                let skip = if rest[at] == b'\r' && rest.get(at + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[at + skip..];
            }
            None => {
                out.extend_from_slice(rest);
                out.extend_from_slice(b"\n\n");
                return Bytes::from(out);
            }
        }
    }
}

/// The SSE message of an event: the same JSON object as its WebSocket frame.
pub fn event_sse(json_frame: &[u8]) -> Bytes {
    sse_message(codec::server_frame_payload(json_frame))
}

/// The Socket.IO twin of an event frame: one text frame of the EVENT packet
/// `42["<event>",<data>,{"channel":…,"seq":…,"ts":…},"<seq>:<channel>"]`, so that
/// `socket.on(event, (data, meta) => …)` gets the publisher's `data` as it is and where it
/// came from beside it; the last argument is the offset socket.io-client keeps for recovery.
/// Built from the JSON frame, once per message, the first time a Socket.IO subscriber needs it.
pub fn event_frame_socketio(json_frame: &[u8], channel: &str, seq: u64, event: &str) -> Bytes {
    let data = event_data(json_frame);
    let ts = event_ts(json_frame);
    let mut buf = Vec::with_capacity(HEADER_ROOM + 48 + channel.len() + event.len() + data.len());
    buf.resize(HEADER_ROOM, 0);
    buf.extend_from_slice(b"42[");
    write_json_str(&mut buf, event);
    buf.push(b',');
    buf.extend_from_slice(if data.is_empty() {
        b"null"
    } else {
        data.as_bytes()
    });
    buf.extend_from_slice(b",{\"channel\":");
    write_json_str(&mut buf, channel);
    buf.extend_from_slice(b",\"seq\":");
    buf.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    buf.extend_from_slice(b",\"ts\":");
    buf.extend_from_slice(itoa::Buffer::new().format(ts).as_bytes());
    // The offset, last: what socket.io-client sends back to recover (`<seq>:<channel>`).
    buf.extend_from_slice(b"},\"");
    buf.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    buf.push(b':');
    let escaped = serde_json::to_string(channel).expect("a str serializes");
    buf.extend_from_slice(&escaped.as_bytes()[1..escaped.len() - 1]);
    buf.extend_from_slice(b"\"]");
    frame_in_place(buf)
}

/// The `ts` of an event frame (0 if it has none).
pub fn event_ts(frame: &[u8]) -> u64 {
    let payload = codec::server_frame_payload(frame);
    // As with `data`: `,"ts":` cannot occur inside the JSON strings before it.
    let Some(at) = payload.windows(6).position(|w| w == b",\"ts\":") else {
        return 0;
    };
    payload[at + 6..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(0u64, |n, b| {
            n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
        })
}

/// The `data` of an event frame, as the JSON text the publisher sent.
pub fn event_data(frame: &[u8]) -> &str {
    let payload = codec::server_frame_payload(frame);
    // Channel and event names are JSON strings, so `,"data":` cannot occur inside them.
    let start = payload
        .windows(8)
        .position(|w| w == b",\"data\":")
        .map_or(payload.len(), |at| at + 8);
    let end = payload.len().saturating_sub(1).max(start);
    std::str::from_utf8(&payload[start..end]).unwrap_or_default()
}

/// The MessagePack binary frame of an event, from its JSON frame (built once per message, the
/// first time a MessagePack subscriber needs it). `data` is converted value by value.
pub fn event_frame_msgpack(json_frame: &[u8]) -> Bytes {
    #[derive(Deserialize, Serialize)]
    struct Event<'a> {
        #[serde(borrow)]
        channel: std::borrow::Cow<'a, str>,
        seq: u64,
        #[serde(borrow)]
        event: std::borrow::Cow<'a, str>,
        ts: u64,
        data: serde_json::Value,
    }
    let payload = codec::server_frame_payload(json_frame);
    let mut buf = vec![0; HEADER_ROOM];
    match parse_data::<Event>(payload) {
        Ok(event) => {
            rmp_serde::encode::write_named(&mut buf, &event).expect("a parsed event serializes")
        }
        // Publish checks `data`; should anything still not parse, send it as its JSON text
        // rather than take the core down.
        Err(_) => {
            let text = String::from_utf8_lossy(payload);
            rmp_serde::encode::write_named(&mut buf, &serde_json::json!({ "raw": text }))
                .expect("a string serializes")
        }
    }
    frame_in_place_as(buf, OPCODE_BINARY)
}

/// Client → server messages.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientMessage {
    Subscribe {
        channels: Vec<String>,
        /// Per channel: the last seq the client has seen.
        #[serde(default)]
        since: HashMap<String, u64>,
        #[serde(default)]
        epoch: Option<String>,
    },
    Unsubscribe {
        channels: Vec<String>,
    },
    /// Replaces the connection's filters; a list left out means "no constraint".
    Filter {
        #[serde(default)]
        agent_ids: Vec<String>,
        #[serde(default)]
        project_ids: Vec<String>,
        #[serde(default)]
        event_types: Vec<String>,
        /// Log search: a substring of the event's `data` (as JSON text).
        #[serde(default)]
        search: Option<String>,
        /// Log search: a regular expression over the event's `data` (as JSON text).
        #[serde(default)]
        regex: Option<String>,
        /// Log levels: `data.level` must be one of these.
        #[serde(default)]
        levels: Vec<String>,
    },
    /// The client has this critical event (connections opened with `ack=critical`).
    Ack {
        channel: String,
        seq: u64,
    },
    /// A fresh token for this connection (same `sub`), before the current one expires.
    Refresh {
        token: String,
    },
    /// Stop sending events (terminal output above all) until `resume`; nothing is closed.
    Pause,
    /// Go on with live events; the answer says what was skipped.
    Resume,
    /// Who is on a presence channel.
    Presence {
        channel: String,
    },
}

/// Why a client message was refused: an `error` frame, never a close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub code: ErrorCode,
    pub message: String,
}

/// Types the contract names that this version answers with `unsupported`.
const LATER_TYPES: [&str; 1] = ["ping"];

/// Parses one client text message with simd-json.
pub fn parse_client_message(text: &[u8]) -> Result<ClientMessage, ParseError> {
    let fail = |code, message: String| Err(ParseError { code, message });
    let mut scratch = text.to_vec();
    let value: simd_json::OwnedValue = match simd_json::to_owned_value(&mut scratch) {
        Ok(v) => v,
        Err(e) => return fail(ErrorCode::BadJson, format!("malformed JSON: {e}")),
    };
    use simd_json::prelude::*;
    let Some(kind) = value
        .as_object()
        .and_then(|o| o.get("type"))
        .and_then(|t| t.as_str())
        .map(str::to_owned)
    else {
        return fail(
            ErrorCode::BadJson,
            "expected a JSON object with a string \"type\"".into(),
        );
    };
    let kind = kind.as_str();
    if LATER_TYPES.contains(&kind) {
        return fail(
            ErrorCode::Unsupported,
            format!("\"{kind}\" is not supported by this server version"),
        );
    }
    if !matches!(
        kind,
        "subscribe"
            | "unsubscribe"
            | "refresh"
            | "filter"
            | "ack"
            | "pause"
            | "resume"
            | "presence"
    ) {
        let kind: String = kind.chars().take(64).collect();
        return fail(ErrorCode::UnknownType, format!("unknown type \"{kind}\""));
    }
    simd_json::serde::from_owned_value(value)
        .or_else(|e| fail(ErrorCode::BadMessage, format!("bad {kind} message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: &Bytes) -> serde_json::Value {
        assert_eq!(frame[0], 0x81, "FIN + text");
        serde_json::from_slice(codec::server_frame_payload(frame)).unwrap()
    }

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn nesting_depth_counts_brackets_outside_strings() {
        assert_eq!(nesting_depth(b"1"), 0);
        assert_eq!(nesting_depth(br#"{"a":[1,{"b":2}],"c":[]}"#), 3);
        assert_eq!(nesting_depth(br#"["[[[{{", "\"[[", {}]"#), 2);
        assert_eq!(nesting_depth(nested(128).as_bytes()), 128);
        assert!(nesting_depth(nested(100_000).as_bytes()) > MAX_DATA_DEPTH);
    }

    #[test]
    fn data_nested_128_deep_gets_its_messagepack_twin() {
        let data = nested(MAX_DATA_DEPTH);
        let frame = event_frame("c", 1, "e", 1, &data);
        let twin = event_frame_msgpack(&frame);
        let map: serde_json::Value = rmp_serde::from_slice(&twin[4..]).unwrap();
        assert!(map.get("raw").is_none(), "converted, not sent as text");
        let mut v = &map["data"];
        for _ in 0..MAX_DATA_DEPTH - 1 {
            v = &v[0];
        }
        assert_eq!(v, &serde_json::json!([]));
    }

    #[test]
    fn event_frame_has_the_contract_fields() {
        let f = event_frame(
            "project:42",
            17,
            "task:created",
            1732300000123,
            r#"{"id":"t1","n":[1,2]}"#,
        );
        let v = payload(&f);
        assert_eq!(
            v,
            serde_json::json!({"channel":"project:42","seq":17,"event":"task:created",
                "ts":1732300000123u64,"data":{"id":"t1","n":[1,2]}})
        );
    }

    #[test]
    fn event_data_is_verbatim_and_names_escaped() {
        let data = r#"{ "spaced" : 1.50 }"#;
        let f = event_frame("c", 1, "we\"ird", 0, data);
        let text = std::str::from_utf8(&f[2..]).unwrap();
        assert!(text.contains(data), "{text}");
        assert_eq!(payload(&f)["event"], "we\"ird");
    }

    #[test]
    fn large_event_frames_get_long_headers() {
        let data = format!("\"{}\"", "x".repeat(70_000));
        let f = event_frame("c", 1, "e", 0, &data);
        assert_eq!(f[1], 127);
        assert_eq!(payload(&f)["data"].as_str().unwrap().len(), 70_000);
    }

    #[test]
    fn control_frames() {
        let chans = vec!["a".to_string()];
        let v = payload(
            &Control::Welcome {
                connection_id: "c1",
                epoch: "e",
                heartbeat_ms: 30000,
                channels: &chans,
                encoding: "json",
                note: None,
            }
            .frame(),
        );
        assert_eq!(v["type"], "welcome");
        assert_eq!(v["channels"][0], "a");
        assert!(v.get("event").is_none());
        let v = payload(
            &Control::Error {
                code: ErrorCode::Forbidden,
                message: "no",
                channel: Some("x"),
            }
            .frame(),
        );
        assert_eq!(v["code"], "forbidden");
        assert_eq!(v["channel"], "x");
    }

    #[test]
    fn client_messages() {
        let m = parse_client_message(
            br#"{"type":"subscribe","channels":["a","b"],"since":{"a":3},"epoch":"E"}"#,
        )
        .unwrap();
        let ClientMessage::Subscribe {
            channels,
            since,
            epoch,
        } = m
        else {
            panic!()
        };
        assert_eq!(channels, vec!["a", "b"]);
        assert_eq!(since["a"], 3);
        assert_eq!(epoch.as_deref(), Some("E"));
        assert_eq!(
            parse_client_message(br#"{"type":"unsubscribe","channels":["a"]}"#).unwrap(),
            ClientMessage::Unsubscribe {
                channels: vec!["a".into()]
            }
        );
    }

    #[test]
    fn bad_client_messages_say_why() {
        let code = |t: &[u8]| parse_client_message(t).unwrap_err().code;
        assert_eq!(code(b"{not json"), ErrorCode::BadJson);
        assert_eq!(code(b"[1,2]"), ErrorCode::BadJson);
        assert_eq!(code(br#"{"type":7}"#), ErrorCode::BadJson);
        assert_eq!(code(br#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(br#"{"type":"ping"}"#), ErrorCode::Unsupported);
        assert_eq!(
            parse_client_message(br#"{"type":"pause"}"#),
            Ok(ClientMessage::Pause)
        );
        assert_eq!(code(br#"{"type":"refresh"}"#), ErrorCode::BadMessage);
        assert_eq!(code(br#"{"type":"subscribe"}"#), ErrorCode::BadMessage);
        assert_eq!(
            code(br#"{"type":"subscribe","channels":"a"}"#),
            ErrorCode::BadMessage
        );
        assert_eq!(code(b""), ErrorCode::BadJson);
    }
}
