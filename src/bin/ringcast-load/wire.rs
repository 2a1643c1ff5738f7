//! What the load generator speaks to each target: the subscribe handshake, the publish
//! request, and how to find `seq` and the send time `t` in a delivered frame.
//!
//! Every target but one delivers the same JSON object,
//! `{"channel","seq",...,"data":{"t":µs,"p":pad}}`: ringcast builds it itself (the generator
//! publishes `data`); the floor and Nchan send the body the generator built; Socket.IO wraps it
//! as `42["event",{...}]`. ringcast's own Socket.IO endpoint (`ringcast-socketio`) sends
//! `42["bench",{"t":µs,"p":pad},{"channel","seq","ts"},"<seq>:<channel>"]`: `t` comes first,
//! the seq is read back from the offset at the end (see `socketio_offset_seq`).

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Ringcast,
    Floor,
    Nchan,
    Socketio,
    /// ringcast's own Socket.IO endpoint (`/socket.io/`, Engine.IO over WebSocket); publishes
    /// through ringcast's HTTP API like `ringcast`.
    #[value(name = "ringcast-socketio")]
    #[serde(rename = "ringcast-socketio")]
    RingcastSocketio,
}

impl Target {
    /// Path and query of the WebSocket upgrade for one channel.
    pub fn subscribe_path(self, channel: &str, token: &str, resume: Option<(u64, &str)>) -> String {
        match self {
            Target::Ringcast => {
                let mut p = format!("/ws?channels={channel}&token={token}");
                if let Some((seq, epoch)) = resume {
                    p.push_str(&format!("&last_sequence_id={seq}&epoch={epoch}"));
                }
                p
            }
            Target::Floor | Target::Nchan => format!("/sub/{channel}"),
            Target::Socketio => format!("/socket.io/?EIO=4&transport=websocket&channel={channel}"),
            // The token and the channel travel in Socket.IO packets after the upgrade.
            Target::RingcastSocketio => "/socket.io/?EIO=4&transport=websocket".to_string(),
        }
    }

    /// The target's name as given on the command line (and written in the report).
    pub fn name(self) -> &'static str {
        match self {
            Target::Ringcast => "ringcast",
            Target::Floor => "floor",
            Target::Nchan => "nchan",
            Target::Socketio => "socketio",
            Target::RingcastSocketio => "ringcast-socketio",
        }
    }

    /// Whether this is ringcast (its publish API, its JWT, its seqs), whatever the transport.
    pub fn is_ringcast(self) -> bool {
        matches!(self, Target::Ringcast | Target::RingcastSocketio)
    }

    /// Whether the server assigns seqs (else the generator numbers messages per channel).
    pub fn server_assigns_seq(self) -> bool {
        self.is_ringcast()
    }

    /// Whether several messages can travel in one publish request.
    pub fn batches(self) -> bool {
        self.is_ringcast()
    }

    /// The seq of a delivered event (`body` as `classify` found it).
    pub fn event_seq(self, body: &[u8]) -> Option<u64> {
        match self {
            Target::RingcastSocketio => {
                socketio_offset_seq(body).or_else(|| find_u64(body, b"\"seq\":"))
            }
            _ => find_u64(body, b"\"seq\":"),
        }
    }
}

/// The seq of ringcast's Socket.IO event packet from its last item, the offset
/// `"<seq>:<channel>"]`: a scan back over the channel name only, never over the data (which
/// comes before it and may be long). None if the packet does not end that way (a channel name
/// with an escaped quote, say: the caller then scans forward for `"seq":`).
pub fn socketio_offset_seq(packet: &[u8]) -> Option<u64> {
    let body = packet.strip_suffix(b"\"]")?;
    let open = body.iter().rposition(|&b| b == b'"')?;
    let mut n: u64 = 0;
    let mut any = false;
    for &b in &body[open + 1..] {
        match b {
            b'0'..=b'9' => {
                n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
                any = true;
            }
            b':' if any => return Some(n),
            _ => return None,
        }
    }
    None
}

/// One message as the generator publishes it.
pub struct Outgoing<'a> {
    pub channel: &'a str,
    /// Generator-assigned seq (used by targets that do not assign their own).
    pub seq: u64,
    pub sent_us: u64,
    pub pad: &'a str,
}

/// Builds one publish request (keep-alive) for `msgs` (all one channel unless batching).
pub fn publish_request(
    target: Target,
    host: &str,
    api_key: &str,
    msgs: &[Outgoing<'_>],
) -> Vec<u8> {
    let (path, body) = match target {
        Target::Ringcast | Target::RingcastSocketio => {
            let one = |m: &Outgoing<'_>| {
                format!(
                    r#"{{"channel":"{}","event":"bench","data":{{"t":{},"p":"{}"}}}}"#,
                    m.channel, m.sent_us, m.pad
                )
            };
            // One message travels as a plain object (the single-message API, as the peers
            // get it), several as an array (a batch).
            let body = if let [m] = msgs {
                one(m)
            } else {
                let all: Vec<String> = msgs.iter().map(one).collect();
                format!("[{}]", all.join(","))
            };
            ("/api/v1/publish".to_string(), body)
        }
        Target::Floor | Target::Nchan | Target::Socketio => {
            let m = &msgs[0];
            let body = format!(
                r#"{{"channel":"{}","seq":{},"event":"bench","ts":0,"data":{{"t":{},"p":"{}"}}}}"#,
                m.channel, m.seq, m.sent_us, m.pad
            );
            let path = if target == Target::Socketio {
                format!("/publish/{}", m.channel)
            } else {
                format!("/pub/{}", m.channel)
            };
            (path, body)
        }
    };
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {api_key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The value after `"key":` as an unsigned integer, scanning from the start of `payload`.
pub fn find_u64(payload: &[u8], key: &[u8]) -> Option<u64> {
    let at = memfind(payload, key)? + key.len();
    let mut n: u64 = 0;
    let mut any = false;
    for &b in &payload[at..] {
        if b.is_ascii_digit() {
            n = n * 10 + u64::from(b - b'0');
            any = true;
        } else {
            break;
        }
    }
    any.then_some(n)
}

pub fn memfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        match hay[i..hay.len() - needle.len() + 1]
            .iter()
            .position(|&b| b == first)
        {
            None => return None,
            Some(off) => {
                i += off;
                if &hay[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

/// A server frame found at the front of a buffer.
pub struct Frame<'a> {
    pub opcode: u8,
    pub payload: &'a [u8],
    pub len: usize,
}

/// Parses one unmasked server frame; None if incomplete.
pub fn parse_frame(buf: &[u8]) -> Option<Frame<'_>> {
    if buf.len() < 2 {
        return None;
    }
    let (len, header) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            (u64::from_be_bytes(buf[2..10].try_into().ok()?) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if buf.len() < header + len {
        return None;
    }
    Some(Frame {
        opcode: buf[0] & 0x0f,
        payload: &buf[header..header + len],
        len: header + len,
    })
}

/// A masked client frame (mask fixed: the server unmasks whatever it is).
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_numbers() {
        let p = br#"{"channel":"c","seq":17,"event":"bench","ts":5,"data":{"t":123456,"p":"x"}}"#;
        assert_eq!(find_u64(p, b"\"seq\":"), Some(17));
        assert_eq!(find_u64(p, b"\"t\":"), Some(123456));
        assert_eq!(find_u64(p, b"\"nope\":"), None);
    }

    #[test]
    fn finds_ringcast_socketio_seq_and_t() {
        let p = br#"42["bench",{"t":123456,"p":"xx"},{"channel":"bench:3","seq":17,"ts":9},"17:bench:3"]"#;
        assert_eq!(socketio_offset_seq(p), Some(17));
        assert_eq!(Target::RingcastSocketio.event_seq(p), Some(17));
        assert_eq!(find_u64(p, b"\"t\":"), Some(123456));
        // No offset at the end: the forward scan finds the meta's seq.
        let q = br#"42["bench",{"t":1,"p":"x"},{"channel":"bench:3","seq":18,"ts":9}]"#;
        assert_eq!(socketio_offset_seq(q), None);
        assert_eq!(Target::RingcastSocketio.event_seq(q), Some(18));
        assert_eq!(socketio_offset_seq(br#"42["a","x:y"]"#), None);
        assert_eq!(socketio_offset_seq(br#"42["a",":y"]"#), None);
    }

    #[test]
    fn frames_round_trip_lengths() {
        for n in [0usize, 125, 126, 65535, 65536] {
            let mut f = vec![0x81];
            match n {
                n if n < 126 => f.push(n as u8),
                n if n <= 0xffff => {
                    f.push(126);
                    f.extend_from_slice(&(n as u16).to_be_bytes());
                }
                n => {
                    f.push(127);
                    f.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            f.extend(std::iter::repeat_n(b'a', n));
            let parsed = parse_frame(&f).unwrap();
            assert_eq!(parsed.payload.len(), n);
            assert_eq!(parsed.len, f.len());
            assert!(parse_frame(&f[..f.len() - 1]).is_none() || n == 0);
        }
    }
}
