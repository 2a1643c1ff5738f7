//! The WebSocket frame decoder (client → server), with and without permessage-deflate.
//!
//! Invariants: no panic; the events and the error (if any) are the same whether the input
//! arrives at once or split at the points the fuzzer chose; a message the client-side encoder
//! made (masked, fragmented or not, compressed or not) decodes to what was encoded; server
//! frames give back their payload, and compressed ones inflate to it.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringcast::proto::ws::codec::{self, opcode, testing::client_frame, Decoder, Event};
use ringcast::proto::ws::deflate;

const LIMITS: [usize; 4] = [125, 1024, 65_536, codec::DEFAULT_MAX_MESSAGE_BYTES];

fuzz_target!(|input: &[u8]| {
    // Byte 0: bit 0 deflate, bits 1-2 the message limit; byte 1: split length; rest: the wire.
    let [flags, at, wire @ ..] = input else {
        return;
    };
    let deflate = flags & 1 != 0;
    let max = LIMITS[usize::from(flags >> 1 & 3)];
    let step = usize::from(*at % 32) + 1;
    let new = || {
        let d = Decoder::new(max);
        if deflate {
            d.with_deflate()
        } else {
            d
        }
    };

    // Split invariance on arbitrary input.
    let whole = run(new(), std::iter::once(wire));
    let split = run(new(), wire.chunks(step));
    assert_eq!(whole, split, "split every {step} bytes");

    // Round trips: the wire bytes as one message's payload.
    let payload = wire;
    let mask = [*flags, *at, 0x5a, 0xa5];
    let fits = payload.len() <= max;
    let binary = Event::Binary(bytes::Bytes::copy_from_slice(payload));
    let mut frames = client_frame(true, opcode::BINARY, payload, mask);
    expect(new(), &frames, fits.then_some(&binary));
    // Fragmented at `step`.
    let cut = step.min(payload.len());
    frames = client_frame(false, opcode::BINARY, &payload[..cut], mask);
    frames.extend(client_frame(
        true,
        opcode::CONTINUATION,
        &payload[cut..],
        mask,
    ));
    expect(new(), &frames, fits.then_some(&binary));
    // Text: valid UTF-8 only.
    let text = client_frame(true, opcode::TEXT, payload, mask);
    let event = Event::Text(bytes::Bytes::copy_from_slice(payload));
    let utf8 = std::str::from_utf8(payload).is_ok();
    expect(new(), &text, (fits && utf8).then_some(&event));
    // Compressed (RSV1 on the first frame), when deflate was negotiated.
    if deflate {
        let compressed = deflate::compress(payload);
        let mut frame = client_frame(true, opcode::BINARY, &compressed, mask);
        frame[0] |= 0x40;
        // The limit holds for the wire bytes too.
        let fits = fits && compressed.len() <= max;
        expect(new(), &frame, fits.then_some(&binary));
    }
    // Server frames: the payload comes back; a compressed twin inflates to it.
    let server = codec::binary_frame(payload);
    assert_eq!(codec::server_frame_payload(&server), payload);
    if let Some(twin) = deflate::compress_frame(&server) {
        assert_eq!(twin[0] & 0x40, 0x40);
        let inflated = deflate::inflate(codec::server_frame_payload(&twin), payload.len());
        assert_eq!(inflated.as_deref(), Ok(payload));
    }
});

/// Every event decoded, then the error or `None` (more needed) that ended decoding.
type Run = (Vec<Event>, Option<codec::ProtocolError>);

fn run<'a>(mut decoder: Decoder, pieces: impl Iterator<Item = &'a [u8]>) -> Run {
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(event)) => events.push(event),
                Ok(None) => break,
                Err(e) => return (events, Some(e)),
            }
        }
    }
    (events, None)
}

/// `frames` decode to `event` and nothing else, or (`None`) to an error.
fn expect(decoder: Decoder, frames: &[u8], event: Option<&Event>) {
    let (events, error) = run(decoder, std::iter::once(frames));
    match event {
        Some(e) => assert!(
            events == [e.clone()] && error.is_none(),
            "{events:?} {error:?}"
        ),
        None => assert!(events.is_empty() && error.is_some(), "{events:?} {error:?}"),
    }
}
