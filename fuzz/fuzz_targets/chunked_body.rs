//! The `Transfer-Encoding: chunked` request-body decoder.
//!
//! Invariants: no panic; the decoded body, the outcome (end, error, more needed) and the bytes
//! left after the body are the same whether the input arrives at once or split at the points
//! the fuzzer chose; while waiting for more input the decoder never holds more than a bounded
//! line (a chunk-size line or trailers), so a peer cannot make it buffer without limit.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringcast::proto::http::{BodyPart, ChunkedBody};

/// The most the decoder may leave buffered when it asks for more (the trailer bound).
const MAX_WAITING: usize = 8 * 1024;

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    End { rest: Vec<u8> },
    Error,
    More,
}

fuzz_target!(|input: &[u8]| {
    // First byte: piece length for the split run (1..=64); the rest is the wire.
    let Some((&step, wire)) = input.split_first() else {
        return;
    };
    let step = usize::from(step % 64) + 1;
    let whole = decode(std::iter::once(wire));
    let split = decode(wire.chunks(step));
    assert_eq!(whole, split, "split every {step} bytes");
});

fn decode<'a>(pieces: impl Iterator<Item = &'a [u8]>) -> (Vec<u8>, Outcome) {
    let mut body = ChunkedBody::default();
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut pieces = pieces.peekable();
    loop {
        match body.next(&mut buf) {
            Ok(BodyPart::Data(d)) => {
                assert!(!d.is_empty(), "empty data part");
                data.extend_from_slice(&d);
            }
            Ok(BodyPart::End) => {
                let mut rest = buf.to_vec();
                pieces.for_each(|p| rest.extend_from_slice(p));
                return (data, Outcome::End { rest });
            }
            Err(_) => return (data, Outcome::Error),
            Ok(BodyPart::More) => {
                assert!(buf.len() <= MAX_WAITING, "{} bytes waiting", buf.len());
                match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => return (data, Outcome::More),
                }
            }
        }
    }
}
