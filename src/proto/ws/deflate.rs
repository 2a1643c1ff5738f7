//! permessage-deflate (RFC 7692), server side, without context takeover in either direction.
//!
//! Invariant: every compressed message stands alone (a fresh LZ77 window, no dictionary from
//! earlier messages), so one compressed frame is valid for every subscriber that negotiated
//! the extension and is built once per message, like the plain frame. Client messages are
//! inflated one at a time into at most `max_message_bytes`.
//!
//! Negotiation: the server accepts the first `permessage-deflate` offer it can honour and
//! answers `permessage-deflate; server_no_context_takeover; client_no_context_takeover`. An
//! offer asking for `server_max_window_bits` below 15 is declined (our frames may reach back
//! 32 KiB), as is one with unknown or repeated parameters; the connection then goes on plain.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The `Sec-WebSocket-Extensions` value of an accepted offer.
pub const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The tail a sync flush ends with, removed on the wire (RFC 7692 §7.2.1).
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The `Sec-WebSocket-Extensions` answer to the first of the offers (comma-separated lists,
/// as sent) that is a `permessage-deflate` offer this server accepts; `None`: none is.
pub fn negotiate<'a>(offers: impl IntoIterator<Item = &'a str>) -> Option<String> {
    offers
        .into_iter()
        .flat_map(|header| header.split(','))
        .find_map(answer)
}

/// The answer to one offer: [`RESPONSE`], plus `server_max_window_bits=15` when the offer
/// named it (RFC 7692 §7.1.2.1: an accepted server_max_window_bits is echoed).
fn answer(offer: &str) -> Option<String> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate"))
    {
        return None;
    }
    let mut seen: Vec<String> = Vec::new();
    for param in parts.filter(|p| !p.is_empty()) {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return None;
        }
        let ok = match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => true,
            // We inflate with a 32 KiB window, enough for any the client uses.
            ("client_max_window_bits", None) => true,
            ("client_max_window_bits", Some(v)) => window_bits(v).is_some(),
            ("server_max_window_bits", Some(v)) => window_bits(v) == Some(15),
            _ => false,
        };
        if !ok {
            return None;
        }
        seen.push(name);
    }
    Some(if seen.iter().any(|n| n == "server_max_window_bits") {
        format!("{RESPONSE}; server_max_window_bits=15")
    } else {
        RESPONSE.to_owned()
    })
}

fn window_bits(v: &str) -> Option<u8> {
    v.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

thread_local! {
    static DEFLATE: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
    static INFLATE: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// The payload of a compressed message: raw DEFLATE of `data`, sync-flushed, tail removed.
pub fn compress(data: &[u8]) -> Vec<u8> {
    DEFLATE.with(|cell| {
        let mut z = cell.borrow_mut();
        z.reset();
        let mut out = Vec::with_capacity(data.len() / 2 + 64);
        let start_in = z.total_in();
        loop {
            let used = (z.total_in() - start_in) as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(1024));
            }
            z.compress_vec(&data[used..], &mut out, FlushCompress::Sync)
                .expect("deflate of an in-memory buffer cannot fail");
            let done = (z.total_in() - start_in) as usize == data.len();
            if done && out.ends_with(&SYNC_TAIL) && out.capacity() > out.len() {
                break;
            }
        }
        out.truncate(out.len() - SYNC_TAIL.len());
        out
    })
}

/// The compressed twin of a complete, final, unmasked server frame (same opcode, RSV1 set),
/// or `None` when compressing does not make it smaller.
pub fn compress_frame(frame: &[u8]) -> Option<bytes::Bytes> {
    let opcode = frame.first()? & 0x0f;
    let payload = compress(super::codec::server_frame_payload(frame));
    let mut out = Vec::with_capacity(10 + payload.len());
    super::codec::write_frame_header(&mut out, opcode, payload.len());
    out[0] |= 0x40;
    out.extend_from_slice(&payload);
    (out.len() < frame.len()).then(|| bytes::Bytes::from(out))
}

/// Why a compressed client message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates past the message limit.
    TooBig,
    /// Not valid DEFLATE data.
    Corrupt,
}

/// Inflates one client message (no context takeover) into at most `max` bytes.
pub fn inflate(data: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    INFLATE.with(|cell| {
        let mut z = cell.borrow_mut();
        z.reset(false);
        // Room for one byte past `max`: a message that fills it is too big.
        let limit = max.saturating_add(1);
        let mut out: Vec<u8> = Vec::new();
        for input in [data, &SYNC_TAIL[..]] {
            let start = z.total_in();
            loop {
                if out.len() == out.capacity() {
                    if out.len() >= limit {
                        return Err(InflateError::TooBig);
                    }
                    let grow = out.capacity().max(256).min(limit - out.len());
                    out.reserve_exact(grow);
                }
                let used = (z.total_in() - start) as usize;
                let before = (z.total_in(), z.total_out());
                let status = z
                    .decompress_vec(&input[used..], &mut out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                if out.len() > max {
                    return Err(InflateError::TooBig);
                }
                let consumed = (z.total_in() - start) as usize == input.len();
                let room_left = out.len() < out.capacity();
                let stuck = (z.total_in(), z.total_out()) == before;
                if status == Status::StreamEnd || (room_left && (consumed || stuck)) {
                    break;
                }
            }
        }
        Ok(out)
    })
}

/// How many inflated bytes one connection's compressed messages may cost per second: 1 KiB on
/// the wire can be 1 MiB to parse, so the message rate alone does not bound the work.
///
/// Counted per whole second from the first inflated message (`now` comes from the caller);
/// a message is counted once it is inflated, so one message past the budget is the most that
/// is ever inflated beyond it.
#[derive(Debug, Clone)]
pub struct InflateBudget {
    /// Bytes per second (0: no budget).
    per_sec: u64,
    window: Option<(std::time::Instant, u64)>,
}

impl InflateBudget {
    pub fn new(per_sec: u64) -> InflateBudget {
        InflateBudget {
            per_sec,
            window: None,
        }
    }

    /// Counts a message that inflated to `bytes`; false once this second's budget is spent.
    pub fn spend(&mut self, now: std::time::Instant, bytes: usize) -> bool {
        if self.per_sec == 0 {
            return true;
        }
        let (start, spent) = match self.window {
            Some((start, spent)) if now.duration_since(start).as_secs() < 1 => (start, spent),
            _ => (now, 0),
        };
        let spent = spent.saturating_add(bytes as u64);
        self.window = Some((start, spent));
        spent <= self.per_sec
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_inflate_budget_is_per_second() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let mut b = super::InflateBudget::new(1000);
        assert!(b.spend(t0, 600));
        assert!(
            b.spend(t0 + Duration::from_millis(500), 400),
            "exactly the budget"
        );
        assert!(
            !b.spend(t0 + Duration::from_millis(999), 1),
            "one byte past it"
        );
        assert!(
            b.spend(t0 + Duration::from_millis(1000), 1000),
            "a new second"
        );
        let mut off = super::InflateBudget::new(0);
        assert!(off.spend(t0, usize::MAX));
    }

    use super::*;

    fn accepts<'a>(offers: impl IntoIterator<Item = &'a str>) -> bool {
        negotiate(offers).is_some()
    }

    #[test]
    fn negotiation_accepts_what_it_can_honour() {
        assert!(accepts(["permessage-deflate"]));
        assert!(accepts(["permessage-deflate; client_max_window_bits"]));
        assert!(accepts([
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=10"
        ]));
        assert!(accepts(["x-webkit-deflate-frame, permessage-deflate"]));
        assert!(accepts([
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate"
        ]));
        assert!(accepts(["permessage-deflate; server_max_window_bits=15"]));
        assert!(!accepts(["permessage-deflate; server_max_window_bits=10"]));
        assert!(!accepts(["permessage-deflate; server_max_window_bits"]));
        assert!(!accepts(["permessage-deflate; client_max_window_bits=20"]));
        assert!(!accepts(["permessage-deflate; mystery"]));
        assert!(!accepts([
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover"
        ]));
        assert!(!accepts(["deflate-frame"]));
        assert!(!accepts(Vec::<&str>::new()));
        assert_eq!(negotiate(["permessage-deflate"]).as_deref(), Some(RESPONSE));
        assert_eq!(
            negotiate(["permessage-deflate; server_max_window_bits=15"]).unwrap(),
            format!("{RESPONSE}; server_max_window_bits=15")
        );
    }

    #[test]
    fn compress_then_inflate_round_trips() {
        for data in [
            Vec::new(),
            b"hello".to_vec(),
            br#"{"line":"lorem ipsum dolor sit amet"}"#.repeat(5000),
            (0..200_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ] {
            let packed = compress(&data);
            assert!(!packed.ends_with(&SYNC_TAIL) || data.is_empty());
            assert_eq!(inflate(&packed, 1 << 20).unwrap(), data);
        }
    }

    #[test]
    fn repetitive_data_shrinks_a_lot() {
        let data = br#"{"level":"info","line":"step 1 of 10 ok"}"#.repeat(100);
        assert!(compress(&data).len() * 10 < data.len());
    }

    #[test]
    fn inflate_stops_at_the_limit() {
        let data = vec![b'a'; 100_000];
        let packed = compress(&data);
        assert_eq!(inflate(&packed, 99_999), Err(InflateError::TooBig));
        assert_eq!(inflate(&packed, 100_000).unwrap().len(), 100_000);
        assert_eq!(inflate(&packed, 4096), Err(InflateError::TooBig));
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff, 0xff, 0x00], 1 << 20),
            Err(InflateError::Corrupt)
        );
    }

    #[test]
    fn messages_are_independent() {
        // No context takeover: each message inflates on its own, in any order.
        let a = compress(b"first message first message");
        let b = compress(b"second message first message");
        assert_eq!(inflate(&b, 1024).unwrap(), b"second message first message");
        assert_eq!(inflate(&a, 1024).unwrap(), b"first message first message");
    }
}
