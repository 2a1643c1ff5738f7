//! Server-side WebSocket frame codec (RFC 6455 §5), sans-IO.
//!
//! Owns the wire format in both directions: [`Decoder`] turns masked client bytes into validated
//! [`Event`]s (reassembling fragmented messages), and the `*_frame` functions build unmasked,
//! final server frames as one [`Bytes`] that can be shared across many sockets.
//!
//! Invariant: every `Event` handed out is fully validated (masking, reserved bits, opcodes,
//! control-frame rules, fragmentation order, UTF-8 after inflating, close codes), and the decoder never holds
//! more than `max_message_bytes` of message data: a frame whose header announces a length that
//! would exceed the cap is rejected before its payload is buffered. After the first error the
//! decoder is poisoned and returns that same error forever; the caller must close the
//! connection with [`ProtocolError::close_code`].

use bytes::{Buf, Bytes, BytesMut};
use std::fmt;

use super::deflate;

/// Default cap on one (reassembled) message.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Frame opcodes (RFC 6455 §5.2), for [`write_frame_header`].
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// Largest control-frame payload (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// What the peer sent, fully validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete message (fragments reassembled); always valid UTF-8.
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// The peer's close frame; `code` is `None` for an empty close payload.
    Close {
        code: Option<u16>,
        reason: String,
    },
}

/// One variant per protocol violation by the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    UnmaskedFrame,
    ReservedBits,
    UnknownOpcode(u8),
    FragmentedControl,
    ControlTooLong,
    UnexpectedContinuation,
    ExpectedContinuation,
    InvalidUtf8,
    MessageTooBig,
    /// A compressed message (permessage-deflate) that does not inflate.
    BadCompression,
    InvalidCloseCode(u16),
    BadClosePayload,
    /// 64-bit payload length with the most significant bit set.
    LengthOverflow,
}

impl ProtocolError {
    /// Close code to send back: 1007 for bad UTF-8, 1009 for too big, 1002 otherwise.
    pub fn close_code(&self) -> u16 {
        match self {
            ProtocolError::InvalidUtf8 | ProtocolError::BadCompression => 1007,
            ProtocolError::MessageTooBig => 1009,
            _ => 1002,
        }
    }

    /// Short human-readable reason that fits in a close frame.
    pub fn reason(&self) -> &'static str {
        match self {
            ProtocolError::UnmaskedFrame => "client frame not masked",
            ProtocolError::ReservedBits => "reserved bits set",
            ProtocolError::UnknownOpcode(_) => "unknown opcode",
            ProtocolError::FragmentedControl => "fragmented control frame",
            ProtocolError::ControlTooLong => "control frame too long",
            ProtocolError::UnexpectedContinuation => "unexpected continuation frame",
            ProtocolError::ExpectedContinuation => "expected continuation frame",
            ProtocolError::InvalidUtf8 => "invalid UTF-8",
            ProtocolError::MessageTooBig => "message too big",
            ProtocolError::BadCompression => "bad compressed data",
            ProtocolError::InvalidCloseCode(_) => "invalid close code",
            ProtocolError::BadClosePayload => "bad close payload",
            ProtocolError::LengthOverflow => "invalid payload length",
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::UnknownOpcode(op) => write!(f, "{} 0x{op:X}", self.reason()),
            ProtocolError::InvalidCloseCode(c) => write!(f, "{} {c}", self.reason()),
            _ => f.write_str(self.reason()),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// Incremental decoder for client → server frames.
#[derive(Debug)]
pub struct Decoder {
    max_message_bytes: usize,
    /// permessage-deflate was negotiated: RSV1 on a message's first frame means compressed.
    deflate: bool,
    message: Option<Partial>,
    failed: Option<ProtocolError>,
    /// Bytes compressed messages inflated to since `take_inflated_bytes` last looked.
    inflated_bytes: std::cell::Cell<usize>,
}

/// A fragmented data message being reassembled.
#[derive(Debug)]
struct Partial {
    opcode: u8,
    data: BytesMut,
    /// For text: `data[..utf8_checked]` is known to be valid, complete UTF-8.
    utf8_checked: usize,
    /// Compressed (RSV1): checked and inflated once complete.
    compressed: bool,
}

/// A parsed frame header, validated against the decoder state.
struct Header {
    fin: bool,
    opcode: u8,
    compressed: bool,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

impl Decoder {
    pub fn new(max_message_bytes: usize) -> Self {
        Decoder {
            max_message_bytes,
            deflate: false,
            message: None,
            failed: None,
            inflated_bytes: std::cell::Cell::new(0),
        }
    }

    /// Accepts compressed messages (permessage-deflate, no context takeover).
    pub fn with_deflate(mut self) -> Self {
        self.deflate = true;
        self
    }

    /// Decodes the next complete event from the front of `buf`, removing the bytes it used.
    ///
    /// `Ok(None)` means more bytes are needed; bytes already consumed (non-final fragments)
    /// live on in the decoder, nothing is lost. Partial input is not an error.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, ProtocolError> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        let result = self.decode_inner(buf);
        if let Err(err) = result {
            self.failed = Some(err);
            self.message = None;
        }
        result
    }

    /// Bytes inflated since the last call (compressed messages only), for an inflate budget.
    pub fn take_inflated_bytes(&mut self) -> usize {
        self.inflated_bytes.replace(0)
    }

    /// Bytes of the message being reassembled so far (for memory accounting); 0 when idle.
    pub fn pending_bytes(&self) -> usize {
        self.message.as_ref().map_or(0, |m| m.data.len())
    }

    fn decode_inner(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, ProtocolError> {
        loop {
            let Some(h) = self.parse_header(buf)? else {
                return Ok(None);
            };
            if buf.len() - h.header_len < h.payload_len {
                return Ok(None);
            }
            buf.advance(h.header_len);
            let mut payload = buf.split_to(h.payload_len);
            unmask(&mut payload, h.mask);
            if let Some(event) = self.on_frame(h.fin, h.opcode, h.compressed, payload)? {
                return Ok(Some(event));
            }
        }
    }

    /// Validates the header at the front of `buf` without consuming anything. Checks are made
    /// as soon as the bytes they need are present, so violations surface early.
    fn parse_header(&self, buf: &[u8]) -> Result<Option<Header>, ProtocolError> {
        let (b0, b1) = match buf {
            [b0, b1, ..] => (*b0, *b1),
            _ => return Ok(None),
        };
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        let compressed = match b0 & 0x70 {
            0 => false,
            // RSV1 marks a compressed message, on its first frame only (RFC 7692 §6).
            0x40 if self.deflate && matches!(opcode, opcode::TEXT | opcode::BINARY) => true,
            _ => return Err(ProtocolError::ReservedBits),
        };
        let is_control = match opcode {
            opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => false,
            opcode::CLOSE | opcode::PING | opcode::PONG => true,
            other => return Err(ProtocolError::UnknownOpcode(other)),
        };
        if b1 & 0x80 == 0 {
            return Err(ProtocolError::UnmaskedFrame);
        }
        let len7 = b1 & 0x7F;
        if is_control {
            if !fin {
                return Err(ProtocolError::FragmentedControl);
            }
            if usize::from(len7) > MAX_CONTROL_PAYLOAD {
                return Err(ProtocolError::ControlTooLong);
            }
        }
        let already = match (opcode, &self.message) {
            (opcode::CONTINUATION, Some(m)) => m.data.len(),
            (opcode::CONTINUATION, None) => return Err(ProtocolError::UnexpectedContinuation),
            (opcode::TEXT | opcode::BINARY, Some(_)) => {
                return Err(ProtocolError::ExpectedContinuation);
            }
            _ => 0,
        };
        let (ext_len, announced) = match len7 {
            126 => match buf.get(2..4) {
                Some(b) => (2, u64::from(u16::from_be_bytes([b[0], b[1]]))),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(b) => {
                    let mut be = [0u8; 8];
                    be.copy_from_slice(b);
                    let len = u64::from_be_bytes(be);
                    if len >> 63 != 0 {
                        return Err(ProtocolError::LengthOverflow);
                    }
                    (8, len)
                }
                None => return Ok(None),
            },
            n => (0, u64::from(n)),
        };
        // `already <= max_message_bytes` always holds, so this cannot underflow.
        let room = self.max_message_bytes - already;
        let payload_len = match usize::try_from(announced) {
            Ok(len) if is_control || len <= room => len,
            _ => return Err(ProtocolError::MessageTooBig),
        };
        let mask_at = 2 + ext_len;
        let Some(m) = buf.get(mask_at..mask_at + 4) else {
            return Ok(None);
        };
        Ok(Some(Header {
            fin,
            opcode,
            compressed,
            mask: [m[0], m[1], m[2], m[3]],
            header_len: mask_at + 4,
            payload_len,
        }))
    }

    /// Handles one complete, unmasked frame; returns an event when a message completes.
    fn on_frame(
        &mut self,
        fin: bool,
        op: u8,
        compressed: bool,
        payload: BytesMut,
    ) -> Result<Option<Event>, ProtocolError> {
        match op {
            opcode::PING => Ok(Some(Event::Ping(payload.freeze()))),
            opcode::PONG => Ok(Some(Event::Pong(payload.freeze()))),
            opcode::CLOSE => parse_close(&payload).map(Some),
            opcode::TEXT | opcode::BINARY if fin && compressed => {
                self.inflated(op, &payload).map(Some)
            }
            opcode::TEXT | opcode::BINARY if fin => {
                if op == opcode::TEXT && std::str::from_utf8(&payload).is_err() {
                    return Err(ProtocolError::InvalidUtf8);
                }
                Ok(Some(data_event(op, payload.freeze())))
            }
            opcode::TEXT | opcode::BINARY => {
                // Copy rather than keep a view into the caller's read buffer: fragmented
                // messages grow, and the read buffer's allocation should be reusable.
                let mut partial = Partial {
                    opcode: op,
                    data: BytesMut::with_capacity(payload.len()),
                    utf8_checked: 0,
                    compressed,
                };
                partial.append(&payload, false)?;
                self.message = Some(partial);
                Ok(None)
            }
            _ => {
                let Some(partial) = self.message.as_mut() else {
                    return Err(ProtocolError::UnexpectedContinuation);
                };
                partial.append(&payload, fin)?;
                if !fin {
                    return Ok(None);
                }
                match self.message.take() {
                    Some(m) if m.compressed => self.inflated(m.opcode, &m.data).map(Some),
                    Some(m) => Ok(Some(data_event(m.opcode, m.data.freeze()))),
                    None => Ok(None),
                }
            }
        }
    }

    /// A complete compressed message, inflated within the message limit and checked.
    fn inflated(&self, op: u8, data: &[u8]) -> Result<Event, ProtocolError> {
        let plain = deflate::inflate(data, self.max_message_bytes).map_err(|e| match e {
            deflate::InflateError::TooBig => ProtocolError::MessageTooBig,
            deflate::InflateError::Corrupt => ProtocolError::BadCompression,
        })?;
        self.inflated_bytes
            .set(self.inflated_bytes.get().saturating_add(plain.len()));
        if op == opcode::TEXT && std::str::from_utf8(&plain).is_err() {
            return Err(ProtocolError::InvalidUtf8);
        }
        Ok(data_event(op, Bytes::from(plain)))
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_MESSAGE_BYTES)
    }
}

impl Partial {
    /// Appends a fragment; for text, validates UTF-8 incrementally so bad input fails fast,
    /// while a character split across fragments is fine until the final one.
    fn append(&mut self, fragment: &[u8], fin: bool) -> Result<(), ProtocolError> {
        self.data.extend_from_slice(fragment);
        if self.opcode != opcode::TEXT || self.compressed {
            return Ok(());
        }
        match std::str::from_utf8(&self.data[self.utf8_checked..]) {
            Ok(_) => self.utf8_checked = self.data.len(),
            Err(e) if e.error_len().is_none() && !fin => self.utf8_checked += e.valid_up_to(),
            Err(_) => return Err(ProtocolError::InvalidUtf8),
        }
        Ok(())
    }
}

fn data_event(op: u8, data: Bytes) -> Event {
    if op == opcode::TEXT {
        Event::Text(data)
    } else {
        Event::Binary(data)
    }
}

/// Validates a close payload (RFC 6455 §5.5.1, §7.4).
fn parse_close(payload: &[u8]) -> Result<Event, ProtocolError> {
    match payload {
        [] => Ok(Event::Close {
            code: None,
            reason: String::new(),
        }),
        [_] => Err(ProtocolError::BadClosePayload),
        [hi, lo, rest @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_receivable(code) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(rest).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Event::Close {
                code: Some(code),
                reason: reason.to_owned(),
            })
        }
    }
}

/// Codes a peer may legitimately send: 1000-1003, 1007-1014 (1012-1014 are IANA-registered and
/// accepted by Autobahn-compliant servers), and 3000-4999. 1004-1006, 1015, <1000 and
/// 1016-2999 are reserved or must never appear on the wire.
fn close_code_receivable(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs `data` with the 4-byte `mask`, 8 bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // Chunks are a multiple of 4 long, so the tail starts at mask index 0.
    for (byte, m) in chunks.into_remainder().iter_mut().zip(mask.iter().cycle()) {
        *byte ^= m;
    }
}

/// The payload of a complete, unmasked server frame (as built by this module): what follows its
/// 2-, 4- or 10-byte header.
pub fn server_frame_payload(frame: &[u8]) -> &[u8] {
    let header = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.get(header..).unwrap_or_default()
}

/// A final, unmasked text frame. `payload` must be valid UTF-8.
pub fn text_frame(payload: &[u8]) -> Bytes {
    frame(opcode::TEXT, payload)
}

pub fn binary_frame(payload: &[u8]) -> Bytes {
    frame(opcode::BINARY, payload)
}

/// A ping frame; payloads over 125 bytes are truncated so the frame stays valid.
pub fn ping_frame(payload: &[u8]) -> Bytes {
    frame(
        opcode::PING,
        &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)],
    )
}

/// A pong frame; payloads over 125 bytes are truncated so the frame stays valid.
pub fn pong_frame(payload: &[u8]) -> Bytes {
    frame(
        opcode::PONG,
        &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)],
    )
}

/// A close frame with `code` and `reason`, the reason truncated on a char boundary to 123 bytes.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    frame(opcode::CLOSE, &payload)
}

/// Length of a server (unmasked) frame header for `payload_len`: 2, 4 or 10.
pub fn frame_header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Writes a final, unmasked server frame header for `payload_len` into `out` (for building a
/// frame in place, e.g. serializing JSON straight after the header); returns bytes written.
pub fn write_frame_header(out: &mut Vec<u8>, opcode: u8, payload_len: usize) -> usize {
    out.push(0x80 | (opcode & 0x0F));
    match frame_header_len(payload_len) {
        2 => out.push(payload_len as u8),
        4 => {
            out.push(126);
            out.extend_from_slice(&(payload_len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(payload_len as u64).to_be_bytes());
        }
    }
    frame_header_len(payload_len)
}

fn frame(op: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(frame_header_len(payload.len()) + payload.len());
    write_frame_header(&mut out, op, payload.len());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// Builders for client (masked) frames, for tests and tools. Not used by the server path.
pub mod testing {
    /// One masked client frame with the given FIN bit, opcode, payload and masking key,
    /// using the minimal length encoding.
    pub fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = Vec::with_capacity(14 + payload.len());
        out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0F));
        let len = payload.len();
        if len <= 125 {
            out.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::client_frame;
    use super::*;
    use proptest::prelude::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn decode_all(dec: &mut Decoder, bytes: &[u8]) -> Result<Vec<Event>, ProtocolError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(ev) = dec.decode(&mut buf)? {
            out.push(ev);
        }
        Ok(out)
    }

    fn one(bytes: &[u8]) -> Result<Vec<Event>, ProtocolError> {
        decode_all(&mut Decoder::default(), bytes)
    }

    fn text(s: &str) -> Event {
        Event::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn masked_text_frame_in_one_buffer() {
        // RFC 6455 §5.7 example: masked "Hello".
        let bytes = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(client_frame(true, opcode::TEXT, b"Hello", MASK), bytes);
        let mut buf = BytesMut::from(&bytes[..]);
        let mut dec = Decoder::default();
        assert_eq!(dec.decode(&mut buf), Ok(Some(text("Hello"))));
        assert!(buf.is_empty());
        assert_eq!(dec.decode(&mut buf), Ok(None));
    }

    #[test]
    fn byte_at_a_time() {
        let bytes = client_frame(
            true,
            opcode::TEXT,
            "héllo wörld, long enough".as_bytes(),
            MASK,
        );
        let mut dec = Decoder::default();
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let got = dec.decode(&mut buf).unwrap();
            if i + 1 < bytes.len() {
                assert_eq!(got, None, "at byte {i}");
            } else {
                assert_eq!(got, Some(text("héllo wörld, long enough")));
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn fragmented_text_with_ping_between() {
        let mut bytes = client_frame(false, opcode::TEXT, b"Hel", MASK);
        bytes.extend(client_frame(
            false,
            opcode::CONTINUATION,
            b"lo, ",
            [1, 2, 3, 4],
        ));
        bytes.extend(client_frame(true, opcode::PING, b"p", [9, 9, 9, 9]));
        bytes.extend(client_frame(
            true,
            opcode::CONTINUATION,
            b"world",
            [0, 0, 0, 0],
        ));
        let mut dec = Decoder::default();
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            dec.decode(&mut buf),
            Ok(Some(Event::Ping(Bytes::from_static(b"p"))))
        );
        assert_eq!(dec.pending_bytes(), 7);
        assert_eq!(dec.decode(&mut buf), Ok(Some(text("Hello, world"))));
        assert_eq!(dec.pending_bytes(), 0);
        assert_eq!(dec.decode(&mut buf), Ok(None));
    }

    #[test]
    fn binary_ping_pong() {
        let mut bytes = client_frame(true, opcode::BINARY, &[0, 255, 7], MASK);
        bytes.extend(client_frame(true, opcode::PONG, b"", MASK));
        assert_eq!(
            one(&bytes),
            Ok(vec![
                Event::Binary(Bytes::from_static(&[0, 255, 7])),
                Event::Pong(Bytes::new())
            ])
        );
    }

    #[test]
    fn unmasked_frame_rejected_and_decoder_poisoned() {
        let mut dec = Decoder::default();
        let mut buf = BytesMut::from(&[0x81u8, 0x02, b'h', b'i'][..]);
        assert_eq!(dec.decode(&mut buf), Err(ProtocolError::UnmaskedFrame));
        let mut fresh = BytesMut::from(&client_frame(true, 1, b"ok", MASK)[..]);
        assert_eq!(dec.decode(&mut fresh), Err(ProtocolError::UnmaskedFrame));
        assert_eq!(ProtocolError::UnmaskedFrame.close_code(), 1002);
    }

    #[test]
    fn bad_opcodes() {
        for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            let bytes = client_frame(true, op, b"x", MASK);
            assert_eq!(one(&bytes), Err(ProtocolError::UnknownOpcode(op)));
        }
    }

    #[test]
    fn reserved_bits() {
        for rsv in [0x40u8, 0x20, 0x10] {
            let mut bytes = client_frame(true, opcode::TEXT, b"x", MASK);
            bytes[0] |= rsv;
            assert_eq!(one(&bytes), Err(ProtocolError::ReservedBits));
        }
    }

    #[test]
    fn control_frame_rules() {
        let long = [b'a'; 126];
        assert_eq!(
            one(&client_frame(true, opcode::PING, &long, MASK)),
            Err(ProtocolError::ControlTooLong)
        );
        // Detected from the first two bytes alone.
        assert_eq!(one(&[0x89, 0xFE]), Err(ProtocolError::ControlTooLong));
        assert!(one(&client_frame(true, opcode::PING, &long[..125], MASK)).is_ok());
        assert_eq!(
            one(&client_frame(false, opcode::PING, b"x", MASK)),
            Err(ProtocolError::FragmentedControl)
        );
        assert_eq!(
            one(&client_frame(false, opcode::CLOSE, b"", MASK)),
            Err(ProtocolError::FragmentedControl)
        );
    }

    #[test]
    fn continuation_without_start() {
        assert_eq!(
            one(&client_frame(true, opcode::CONTINUATION, b"x", MASK)),
            Err(ProtocolError::UnexpectedContinuation)
        );
    }

    #[test]
    fn new_data_frame_mid_fragment() {
        for op in [opcode::TEXT, opcode::BINARY] {
            let mut bytes = client_frame(false, opcode::TEXT, b"a", MASK);
            bytes.extend(client_frame(true, op, b"b", MASK));
            assert_eq!(one(&bytes), Err(ProtocolError::ExpectedContinuation));
        }
    }

    #[test]
    fn invalid_utf8() {
        let err = one(&client_frame(true, opcode::TEXT, &[0xC3, 0x28], MASK));
        assert_eq!(err, Err(ProtocolError::InvalidUtf8));
        assert_eq!(ProtocolError::InvalidUtf8.close_code(), 1007);
        // Binary may hold anything.
        assert!(one(&client_frame(true, opcode::BINARY, &[0xC3, 0x28], MASK)).is_ok());
    }

    #[test]
    fn utf8_split_across_fragments() {
        let euro = "€".as_bytes(); // E2 82 AC
        let mut bytes = client_frame(false, opcode::TEXT, &euro[..1], MASK);
        bytes.extend(client_frame(false, opcode::CONTINUATION, &euro[1..2], MASK));
        bytes.extend(client_frame(true, opcode::CONTINUATION, &euro[2..], MASK));
        assert_eq!(one(&bytes), Ok(vec![text("€")]));

        // Truncated character at the end of the message.
        let mut bytes = client_frame(false, opcode::TEXT, b"a", MASK);
        bytes.extend(client_frame(true, opcode::CONTINUATION, &euro[..2], MASK));
        assert_eq!(one(&bytes), Err(ProtocolError::InvalidUtf8));

        // Invalid bytes in a non-final fragment fail fast, before the message ends.
        let bytes = client_frame(false, opcode::TEXT, &[b'a', 0xFF], MASK);
        assert_eq!(one(&bytes), Err(ProtocolError::InvalidUtf8));
    }

    #[test]
    fn oversize_rejected_from_header_alone() {
        let mut dec = Decoder::new(100);
        // 16-bit length 101, no mask key or payload yet.
        let mut buf = BytesMut::from(&[0x82u8, 0xFE, 0x00, 101][..]);
        assert_eq!(dec.decode(&mut buf), Err(ProtocolError::MessageTooBig));
        assert_eq!(ProtocolError::MessageTooBig.close_code(), 1009);

        let mut dec = Decoder::new(100);
        let mut buf = BytesMut::from(&[0x82u8, 0xFF, 0, 0, 0, 1, 0, 0, 0, 0][..]);
        assert_eq!(dec.decode(&mut buf), Err(ProtocolError::MessageTooBig));

        // Exactly at the cap is fine.
        let mut dec = Decoder::new(100);
        let ok = decode_all(
            &mut dec,
            &client_frame(true, opcode::BINARY, &[1; 100], MASK),
        );
        assert_eq!(ok.unwrap().len(), 1);
    }

    #[test]
    fn oversize_across_fragments() {
        let mut dec = Decoder::new(10);
        let mut buf = BytesMut::from(&client_frame(false, opcode::BINARY, &[1; 6], MASK)[..]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert_eq!(dec.pending_bytes(), 6);
        // Header of the next fragment announces 5 more: rejected before the payload arrives.
        buf.extend_from_slice(&[0x80, 0x85]);
        assert_eq!(dec.decode(&mut buf), Err(ProtocolError::MessageTooBig));
        assert_eq!(dec.pending_bytes(), 0);
    }

    #[test]
    fn close_frames() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice("bye ✓".as_bytes());
        assert_eq!(
            one(&client_frame(true, opcode::CLOSE, &payload, MASK)),
            Ok(vec![Event::Close {
                code: Some(1000),
                reason: "bye ✓".into()
            }])
        );
        assert_eq!(
            one(&client_frame(true, opcode::CLOSE, b"", MASK)),
            Ok(vec![Event::Close {
                code: None,
                reason: String::new()
            }])
        );
        assert_eq!(
            one(&client_frame(true, opcode::CLOSE, &[3], MASK)),
            Err(ProtocolError::BadClosePayload)
        );
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert_eq!(
                one(&client_frame(
                    true,
                    opcode::CLOSE,
                    &code.to_be_bytes(),
                    MASK
                )),
                Err(ProtocolError::InvalidCloseCode(code)),
                "code {code}"
            );
        }
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999,
        ] {
            assert!(one(&client_frame(
                true,
                opcode::CLOSE,
                &code.to_be_bytes(),
                MASK
            ))
            .is_ok());
        }
        let mut bad = 1000u16.to_be_bytes().to_vec();
        bad.extend_from_slice(&[0xFF, 0xFE]);
        let err = one(&client_frame(true, opcode::CLOSE, &bad, MASK));
        assert_eq!(err, Err(ProtocolError::InvalidUtf8));
    }

    #[test]
    fn extended_lengths() {
        for len in [126usize, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let bytes = client_frame(true, opcode::BINARY, &payload, MASK);
            assert_eq!(bytes.len(), len + 4 + frame_header_len(len));
            assert_eq!(one(&bytes), Ok(vec![Event::Binary(payload.into())]));
        }
        // Non-minimal encoding (64-bit length for 5 bytes) is accepted.
        let mut bytes = vec![0x82, 0xFF, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0];
        bytes.extend_from_slice(b"abcde");
        assert_eq!(
            one(&bytes),
            Ok(vec![Event::Binary(Bytes::from_static(b"abcde"))])
        );
        // MSB set in a 64-bit length.
        let bytes = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(one(&bytes), Err(ProtocolError::LengthOverflow));
    }

    #[test]
    fn encoder_headers() {
        for (len, hdr) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            assert_eq!(frame_header_len(len), hdr, "len {len}");
            let mut out = Vec::new();
            assert_eq!(write_frame_header(&mut out, opcode::BINARY, len), hdr);
            assert_eq!(out.len(), hdr);
            assert_eq!(out[0], 0x82);
            let frame = binary_frame(&vec![7u8; len]);
            assert_eq!(frame.len(), hdr + len);
            assert_eq!(&frame[..hdr], &out[..]);
        }
        assert_eq!(&text_frame(b"hi")[..], &[0x81, 2, b'h', b'i']);
        assert_eq!(&ping_frame(b"")[..], &[0x89, 0]);
        assert_eq!(&pong_frame(b"x")[..], &[0x8A, 1, b'x']);
        assert_eq!(&[0x82, 126, 0, 126], &binary_frame(&[0; 126])[..4]);
        assert_eq!(&[0x82, 126, 0xFF, 0xFF], &binary_frame(&[0; 65535])[..4]);
        assert_eq!(
            &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0],
            &binary_frame(&[0; 65536])[..10]
        );
        assert_eq!(ping_frame(&[0; 200]).len(), 127);
    }

    #[test]
    fn close_frame_truncates_on_char_boundary() {
        assert_eq!(
            &close_frame(1000, "ok")[..],
            &[0x88, 4, 0x03, 0xE8, b'o', b'k']
        );
        let reason = "é".repeat(100); // 200 bytes
        let frame = close_frame(1001, &reason);
        assert!(frame.len() - 2 <= 125);
        let text = std::str::from_utf8(&frame[4..]).unwrap();
        assert_eq!(text.len(), 122);
        // And our own decoder accepts the shape once masked.
        let masked = client_frame(true, opcode::CLOSE, &frame[2..], MASK);
        assert!(one(&masked).is_ok());
    }

    #[test]
    fn unmask_matches_bytewise() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
            let mut fast = data.clone();
            unmask(&mut fast, MASK);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ MASK[i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }

    #[derive(Debug, Clone)]
    enum Msg {
        Text(String),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
    }

    fn msg() -> impl Strategy<Value = Msg> {
        prop_oneof![
            ".{0,300}".prop_map(Msg::Text),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Msg::Binary),
            proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Msg::Ping),
            proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Msg::Pong),
        ]
    }

    /// Encodes `m` with fragment cuts taken from `cuts`, optionally with a ping after the first
    /// fragment; returns the wire bytes and expected events.
    fn encode(m: &Msg, cuts: &[usize], ping_inside: bool, mask: [u8; 4]) -> (Vec<u8>, Vec<Event>) {
        let (op, data, expected) = match m {
            Msg::Ping(p) => {
                let ev = Event::Ping(p.clone().into());
                return (client_frame(true, opcode::PING, p, mask), vec![ev]);
            }
            Msg::Pong(p) => {
                let ev = Event::Pong(p.clone().into());
                return (client_frame(true, opcode::PONG, p, mask), vec![ev]);
            }
            Msg::Text(s) => (opcode::TEXT, s.as_bytes(), text(s)),
            Msg::Binary(b) => (opcode::BINARY, &b[..], Event::Binary(b.clone().into())),
        };
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        points.sort_unstable();
        points.push(data.len());
        let mut out = Vec::new();
        let mut events = Vec::new();
        let mut start = 0;
        for (i, end) in points.iter().enumerate() {
            let fin = i + 1 == points.len();
            let frame_op = if i == 0 { op } else { opcode::CONTINUATION };
            out.extend(client_frame(fin, frame_op, &data[start..*end], mask));
            if i == 0 && !fin && ping_inside {
                out.extend(client_frame(true, opcode::PING, b"mid", mask));
                events.push(Event::Ping(Bytes::from_static(b"mid")));
            }
            start = *end;
        }
        events.push(expected);
        (out, events)
    }

    proptest! {
        #[test]
        fn prop_roundtrip_any_split(
            msgs in proptest::collection::vec(
                (msg(), proptest::collection::vec(any::<usize>(), 0..4), any::<bool>(), any::<[u8; 4]>()),
                0..8,
            ),
            chunks in proptest::collection::vec(1usize..64, 1..32),
        ) {
            let mut wire = Vec::new();
            let mut expected = Vec::new();
            for (m, cuts, ping, mask) in &msgs {
                let (bytes, events) = encode(m, cuts, *ping, *mask);
                wire.extend(bytes);
                expected.extend(events);
            }
            let mut dec = Decoder::default();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut rest = &wire[..];
            let mut sizes = chunks.iter().cycle();
            while !rest.is_empty() {
                let n = (*sizes.next().unwrap()).min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                while let Some(ev) = dec.decode(&mut buf).unwrap() {
                    got.push(ev);
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(dec.pending_bytes(), 0);
            prop_assert_eq!(got, expected);
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(
            input in proptest::collection::vec(any::<u8>(), 0..512),
            chunk in 1usize..64,
            max in 0usize..256,
            force_mask in any::<bool>(),
        ) {
            let mut input = input;
            if force_mask && input.len() > 1 {
                input[1] |= 0x80; // get past the mask check more often
            }
            let mut dec = Decoder::new(max);
            let mut buf = BytesMut::new();
            for piece in input.chunks(chunk) {
                buf.extend_from_slice(piece);
                loop {
                    match dec.decode(&mut buf) {
                        Ok(Some(ev)) => {
                            if let Event::Text(t) = &ev {
                                prop_assert!(std::str::from_utf8(t).is_ok());
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            prop_assert!(!e.reason().is_empty());
                            break;
                        }
                    }
                }
                prop_assert!(dec.pending_bytes() <= max);
            }
        }
    }
}
