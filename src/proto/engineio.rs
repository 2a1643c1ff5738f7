//! Engine.IO v4, sans-IO: the packets under Socket.IO, over WebSocket frames and HTTP
//! long-polling payloads (https://socket.io/docs/v4/engine-io-protocol/).
//!
//! A packet is its type digit and its data: `0` open (the handshake JSON), `1` close, `2` ping,
//! `3` pong (each with an optional payload, e.g. `probe`), `4` message, `5` upgrade, `6` noop.
//! Over WebSocket one frame is one packet and a binary frame is a binary message. A polling
//! payload joins packets with the record separator `\x1e`, a binary message written as `b`
//! and its base64.
//!
//! Invariant: decoding never panics and never allocates more than the input's size (base64
//! decodes to less than it reads); anything that is not a packet is an `EngineError`.

use std::borrow::Cow;

use base64::Engine as _;

/// One Engine.IO packet (borrowing from what it was decoded from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// The server's handshake (its JSON, as `Handshake::packet` writes it).
    Open(&'a str),
    Close,
    Ping(&'a str),
    Pong(&'a str),
    Message(Data<'a>),
    Upgrade,
    Noop,
}

/// A message's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data<'a> {
    Text(&'a str),
    Binary(Cow<'a, [u8]>),
}

/// Why bytes were not an Engine.IO packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("an empty packet")]
    Empty,
    #[error("unknown packet type {0:?}")]
    UnknownType(char),
    #[error("a {0} packet carries no data")]
    UnexpectedData(&'static str),
    #[error("bad base64 in a binary message")]
    BadBase64,
    #[error("a polling payload is not UTF-8")]
    NotUtf8,
}

/// A text frame (WebSocket) or one record of a polling payload.
pub fn decode_text(s: &str) -> Result<Packet<'_>, EngineError> {
    let mut chars = s.chars();
    let kind = chars.next().ok_or(EngineError::Empty)?;
    let data = chars.as_str();
    let bare = |name, packet| {
        if data.is_empty() {
            Ok(packet)
        } else {
            Err(EngineError::UnexpectedData(name))
        }
    };
    match kind {
        '0' => Ok(Packet::Open(data)),
        '1' => bare("close", Packet::Close),
        '2' => Ok(Packet::Ping(data)),
        '3' => Ok(Packet::Pong(data)),
        '4' => Ok(Packet::Message(Data::Text(data))),
        '5' => bare("upgrade", Packet::Upgrade),
        '6' => bare("noop", Packet::Noop),
        'b' => base64::engine::general_purpose::STANDARD
            .decode(data)
            .map(|b| Packet::Message(Data::Binary(Cow::Owned(b))))
            .map_err(|_| EngineError::BadBase64),
        other => Err(EngineError::UnknownType(other)),
    }
}

/// A WebSocket binary frame: always a binary message.
pub fn decode_binary(b: &[u8]) -> Packet<'_> {
    Packet::Message(Data::Binary(Cow::Borrowed(b)))
}

/// The packets of a polling POST body, in order.
pub fn decode_payload(body: &[u8]) -> Result<Vec<Packet<'_>>, EngineError> {
    let text = std::str::from_utf8(body).map_err(|_| EngineError::NotUtf8)?;
    text.split('\x1e').map(decode_text).collect()
}

/// One packet as a text frame or payload record.
pub fn encode_text(packet: &Packet<'_>) -> String {
    match packet {
        Packet::Open(json) => format!("0{json}"),
        Packet::Close => "1".into(),
        Packet::Ping(p) => format!("2{p}"),
        Packet::Pong(p) => format!("3{p}"),
        Packet::Message(Data::Text(t)) => format!("4{t}"),
        Packet::Message(Data::Binary(b)) => {
            format!("b{}", base64::engine::general_purpose::STANDARD.encode(b))
        }
        Packet::Upgrade => "5".into(),
        Packet::Noop => "6".into(),
    }
}

/// A polling GET's body: the records joined by the separator, in order.
pub fn encode_payload<'p>(records: impl IntoIterator<Item = &'p str>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, r) in records.into_iter().enumerate() {
        if i > 0 {
            out.push(0x1e);
        }
        out.extend_from_slice(r.as_bytes());
    }
    out
}

/// What the server's open packet tells the client.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Handshake<'a> {
    pub sid: &'a str,
    /// `["websocket"]` on a polling session, `[]` on a WebSocket one.
    pub upgrades: &'a [&'a str],
    pub ping_interval: u64,
    pub ping_timeout: u64,
    pub max_payload: u64,
}

impl Handshake<'_> {
    /// The open packet, as text.
    pub fn packet(&self) -> String {
        format!(
            "0{}",
            serde_json::to_string(self).expect("a handshake serializes")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handshake_has_the_fields_clients_read() {
        let h = Handshake {
            sid: "lv_VI97HAXpY6yYWAAAC",
            upgrades: &["websocket"],
            ping_interval: 25000,
            ping_timeout: 20000,
            max_payload: 1_000_000,
        };
        assert_eq!(
            h.packet(),
            r#"0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#
        );
    }

    #[test]
    fn each_packet_type_decodes_and_encodes_back() {
        let cases = [
            ("1", Packet::Close),
            ("2", Packet::Ping("")),
            ("2probe", Packet::Ping("probe")),
            ("3probe", Packet::Pong("probe")),
            ("4hello", Packet::Message(Data::Text("hello"))),
            ("4", Packet::Message(Data::Text(""))),
            ("5", Packet::Upgrade),
            ("6", Packet::Noop),
        ];
        for (text, packet) in cases {
            assert_eq!(decode_text(text), Ok(packet.clone()), "{text}");
            assert_eq!(encode_text(&packet), text);
        }
    }

    #[test]
    fn a_polling_payload_splits_on_the_record_separator_with_binary_in_base64() {
        let body = "4hello\x1e4€\x1ebAQIDBA==";
        let packets = decode_payload(body.as_bytes()).unwrap();
        assert_eq!(
            packets,
            [
                Packet::Message(Data::Text("hello")),
                Packet::Message(Data::Text("€")),
                Packet::Message(Data::Binary(Cow::Owned(vec![1, 2, 3, 4]))),
            ]
        );
        let records: Vec<String> = packets.iter().map(encode_text).collect();
        assert_eq!(
            encode_payload(records.iter().map(String::as_str)),
            body.as_bytes()
        );
    }

    #[test]
    fn what_is_not_a_packet_is_an_error_not_a_panic() {
        assert_eq!(decode_text(""), Err(EngineError::Empty));
        assert_eq!(decode_text("9"), Err(EngineError::UnknownType('9')));
        assert_eq!(decode_text("€x"), Err(EngineError::UnknownType('€')));
        assert_eq!(decode_text("1x"), Err(EngineError::UnexpectedData("close")));
        assert_eq!(decode_text("b!!"), Err(EngineError::BadBase64));
        assert_eq!(decode_payload(&[0xff, 0xfe]), Err(EngineError::NotUtf8));
        assert_eq!(decode_payload(b"4a\x1e\x1e4b"), Err(EngineError::Empty));
    }

    #[test]
    fn a_binary_frame_is_a_binary_message() {
        assert_eq!(
            decode_binary(&[1, 2]),
            Packet::Message(Data::Binary(Cow::Borrowed(&[1, 2])))
        );
    }
}
