//! Socket.IO v5, sans-IO: the packets inside Engine.IO messages
//! (https://socket.io/docs/v4/socket-io-protocol/).
//!
//! A packet is `<type>[<attachments>-][<namespace>,][<ack id>][<JSON data>]`: the type digit,
//! for binary packets the count of binary attachments that follow as their own Engine.IO
//! messages, the namespace unless it is `/`, an acknowledgement id, and the data. What each
//! type carries: CONNECT an object (the client's `auth`) or nothing; DISCONNECT nothing; EVENT
//! and BINARY_EVENT an array whose first item is the event's name; ACK and BINARY_ACK an array;
//! CONNECT_ERROR an object with `message` (from the server).
//!
//! Invariant: decoding never panics; the data is checked as JSON of the right shape and
//! handed on as its raw text, so an event's payload is never parsed twice.

use serde_json::value::RawValue;

/// The packet types of Socket.IO v5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Connect,
    Disconnect,
    Event,
    Ack,
    ConnectError,
    BinaryEvent,
    BinaryAck,
}

impl Kind {
    fn of(digit: u8) -> Option<Kind> {
        Some(match digit {
            b'0' => Kind::Connect,
            b'1' => Kind::Disconnect,
            b'2' => Kind::Event,
            b'3' => Kind::Ack,
            b'4' => Kind::ConnectError,
            b'5' => Kind::BinaryEvent,
            b'6' => Kind::BinaryAck,
            _ => return None,
        })
    }

    fn digit(self) -> char {
        match self {
            Kind::Connect => '0',
            Kind::Disconnect => '1',
            Kind::Event => '2',
            Kind::Ack => '3',
            Kind::ConnectError => '4',
            Kind::BinaryEvent => '5',
            Kind::BinaryAck => '6',
        }
    }

    pub fn is_binary(self) -> bool {
        matches!(self, Kind::BinaryEvent | Kind::BinaryAck)
    }
}

/// One packet, borrowing from its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet<'a> {
    pub kind: Kind,
    /// Binary attachments that follow (binary packets only).
    pub attachments: u32,
    /// `/` unless named.
    pub namespace: &'a str,
    pub id: Option<u64>,
    /// The JSON data as sent (checked for its shape), if any.
    pub data: Option<&'a str>,
}

/// Why a text was not a Socket.IO packet (the session that sent it is closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocketError {
    #[error("an empty packet")]
    Empty,
    #[error("unknown packet type")]
    UnknownType,
    #[error("a bad attachment count")]
    BadAttachments,
    #[error("a bad namespace")]
    BadNamespace,
    #[error("a bad acknowledgement id")]
    BadId,
    #[error("the data is not JSON: {0}")]
    BadJson(String),
    #[error("the data does not fit the packet type: {0}")]
    BadShape(&'static str),
}

/// Most binary attachments one packet may announce.
pub const MAX_ATTACHMENTS: u32 = 16;
/// Longest namespace name accepted, in bytes.
pub const MAX_NAMESPACE_BYTES: usize = 200;

/// Decodes one packet from an Engine.IO text message.
pub fn decode(text: &str) -> Result<Packet<'_>, SocketError> {
    let bytes = text.as_bytes();
    let kind =
        Kind::of(*bytes.first().ok_or(SocketError::Empty)?).ok_or(SocketError::UnknownType)?;
    let mut rest = &text[1..];
    let mut attachments = 0;
    if kind.is_binary() {
        let (count, after) = rest.split_once('-').ok_or(SocketError::BadAttachments)?;
        attachments = count
            .parse::<u32>()
            .ok()
            .filter(|n| {
                (1..=MAX_ATTACHMENTS).contains(n) && count.bytes().all(|b| b.is_ascii_digit())
            })
            .ok_or(SocketError::BadAttachments)?;
        rest = after;
    }
    let mut namespace = "/";
    if rest.starts_with('/') {
        let (name, after) = match rest.find(',') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, ""),
        };
        if name.len() > MAX_NAMESPACE_BYTES || name.contains(['[', '{', '"']) {
            return Err(SocketError::BadNamespace);
        }
        namespace = name;
        rest = after;
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let id = if digits > 0 {
        let id = rest[..digits]
            .parse::<u64>()
            .map_err(|_| SocketError::BadId)?;
        rest = &rest[digits..];
        Some(id)
    } else {
        None
    };
    let data = if rest.is_empty() {
        None
    } else {
        let raw: &RawValue =
            serde_json::from_str(rest).map_err(|e| SocketError::BadJson(e.to_string()))?;
        Some(raw.get())
    };
    check_shape(kind, data)?;
    if id.is_some()
        && !matches!(
            kind,
            Kind::Event | Kind::BinaryEvent | Kind::Ack | Kind::BinaryAck
        )
    {
        return Err(SocketError::BadId);
    }
    Ok(Packet {
        kind,
        attachments,
        namespace,
        id,
        data,
    })
}

fn check_shape(kind: Kind, data: Option<&str>) -> Result<(), SocketError> {
    let first = data.map(|d| d.as_bytes()[0]);
    match (kind, first) {
        (Kind::Connect, None | Some(b'{')) => Ok(()),
        (Kind::Connect, _) => Err(SocketError::BadShape("CONNECT carries an object")),
        (Kind::Disconnect, None) => Ok(()),
        (Kind::Disconnect, _) => Err(SocketError::BadShape("DISCONNECT carries nothing")),
        (Kind::ConnectError, Some(b'{')) => Ok(()),
        (Kind::ConnectError, _) => Err(SocketError::BadShape("CONNECT_ERROR carries an object")),
        (Kind::Ack | Kind::BinaryAck, Some(b'[')) => Ok(()),
        (Kind::Ack | Kind::BinaryAck, _) => Err(SocketError::BadShape("ACK carries an array")),
        (Kind::Event | Kind::BinaryEvent, Some(b'[')) => {
            let items: Vec<&RawValue> = serde_json::from_str(data.expect("checked"))
                .map_err(|e| SocketError::BadJson(e.to_string()))?;
            match items.first() {
                Some(name) if name.get().starts_with('"') => Ok(()),
                _ => Err(SocketError::BadShape("an EVENT's first item is its name")),
            }
        }
        (Kind::Event | Kind::BinaryEvent, _) => {
            Err(SocketError::BadShape("EVENT carries an array"))
        }
    }
}

/// Encodes a packet (its data already JSON text of the right shape).
pub fn encode(p: &Packet<'_>) -> String {
    let mut out = String::with_capacity(8 + p.namespace.len() + p.data.map_or(0, str::len));
    out.push(p.kind.digit());
    if p.kind.is_binary() {
        out.push_str(&p.attachments.to_string());
        out.push('-');
    }
    if p.namespace != "/" {
        out.push_str(p.namespace);
        out.push(',');
    }
    if let Some(id) = p.id {
        out.push_str(&id.to_string());
    }
    if let Some(data) = p.data {
        out.push_str(data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(
        kind: Kind,
        namespace: &'static str,
        id: Option<u64>,
        data: Option<&'static str>,
    ) -> Packet<'static> {
        Packet {
            kind,
            attachments: 0,
            namespace,
            id,
            data,
        }
    }

    #[test]
    fn the_protocols_examples_decode_and_encode_back() {
        let cases = [
            ("0", packet(Kind::Connect, "/", None, None)),
            ("0/admin,", packet(Kind::Connect, "/admin", None, None)),
            (
                r#"0{"token":"123"}"#,
                packet(Kind::Connect, "/", None, Some(r#"{"token":"123"}"#)),
            ),
            (
                r#"0/admin,{"token":"123"}"#,
                packet(Kind::Connect, "/admin", None, Some(r#"{"token":"123"}"#)),
            ),
            ("1", packet(Kind::Disconnect, "/", None, None)),
            ("1/admin,", packet(Kind::Disconnect, "/admin", None, None)),
            (
                r#"2["foo"]"#,
                packet(Kind::Event, "/", None, Some(r#"["foo"]"#)),
            ),
            (
                r#"2/admin,["bar"]"#,
                packet(Kind::Event, "/admin", None, Some(r#"["bar"]"#)),
            ),
            (
                r#"212["foo"]"#,
                packet(Kind::Event, "/", Some(12), Some(r#"["foo"]"#)),
            ),
            (
                r#"3/admin,13["bar"]"#,
                packet(Kind::Ack, "/admin", Some(13), Some(r#"["bar"]"#)),
            ),
            (
                r#"4{"message":"Not authorized"}"#,
                packet(
                    Kind::ConnectError,
                    "/",
                    None,
                    Some(r#"{"message":"Not authorized"}"#),
                ),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(decode(text), Ok(expected.clone()), "{text}");
            assert_eq!(encode(&expected), text);
        }
    }

    #[test]
    fn binary_packets_count_their_attachments() {
        let text = r#"51-["baz",{"_placeholder":true,"num":0}]"#;
        let p = decode(text).unwrap();
        assert_eq!(
            (p.kind, p.attachments, p.namespace),
            (Kind::BinaryEvent, 1, "/")
        );
        assert_eq!(encode(&p), text);
        let ack = decode(r#"61-/admin,15[{"_placeholder":true,"num":0}]"#).unwrap();
        assert_eq!(
            (ack.kind, ack.attachments, ack.namespace, ack.id),
            (Kind::BinaryAck, 1, "/admin", Some(15))
        );
    }

    #[test]
    fn malformed_packets_are_errors_not_panics() {
        for bad in [
            "",
            "9",
            "x",
            "2",
            "2{}",
            "2[]",
            "2[1]",
            "2[\"a\"",
            "0[1]",
            "1{}",
            "3{}",
            "4[]",
            "5[\"a\"]",
            "5-[\"a\"]",
            "599-[\"a\"]",
            "5x-[\"a\"]",
            "099",
            "299999999999999999999999[\"a\"]",
            "2/a\",[\"x\"]",
        ] {
            assert!(decode(bad).is_err(), "{bad:?} decoded");
        }
        let long = format!("0/{},", "n".repeat(MAX_NAMESPACE_BYTES + 1));
        assert_eq!(decode(&long), Err(SocketError::BadNamespace));
    }

    #[test]
    fn a_namespace_without_a_comma_ends_the_packet() {
        assert_eq!(
            decode("0/admin"),
            Ok(packet(Kind::Connect, "/admin", None, None))
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        #[test]
        fn prop_any_text_is_a_packet_or_an_error(text in "[0-6b/,\\[\\]{}\"a-z0-9:-]{0,40}") {
            if let Ok(p) = decode(&text) {
                // What decodes encodes to text that decodes the same.
                let again = encode(&p);
                proptest::prop_assert_eq!(decode(&again), Ok(p));
            }
            let _ = super::super::engineio::decode_text(&text);
        }
    }
}
