//! The SSE `Last-Event-ID` parser.
//!
//! Invariants: no panic; one resume position per channel, whatever the id; an id the stream
//! wrote resumes exactly where it said.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast::delivery::sequencer::Resume;
use ringcast::delivery::sse::SseStream;

const EPOCH: &str = "7927bf06b962a6a8";

fuzz_target!(|data: &[u8]| {
    // Byte 0: how many channels (0..=7); the rest: the id as sent.
    let Some((&n, id)) = data.split_first() else {
        return;
    };
    let channels: Vec<String> = (0..n % 8).map(|i| format!("room:{i}")).collect();
    let id = String::from_utf8_lossy(id);
    let resumes = SseStream::parse_id(&id, EPOCH, &channels);
    assert_eq!(resumes.len(), channels.len());

    // Round trip: what the stream writes after these positions reads back as them.
    let stream = SseStream::new(EPOCH, &channels, &resumes);
    let line = stream.id_line();
    let written = std::str::from_utf8(&line).unwrap();
    let written = written.strip_prefix("id: ").unwrap().trim_end_matches('\n');
    assert_eq!(SseStream::parse_id(written, EPOCH, &channels), resumes);
    // Advancing moves a position forward, never back.
    if let Some(first) = channels.first() {
        stream.advance(first, 5);
        let line = stream.id_line();
        let written = std::str::from_utf8(&line).unwrap();
        let written = written.strip_prefix("id: ").unwrap().trim_end_matches('\n');
        let after = SseStream::parse_id(written, EPOCH, &channels);
        let expected = match resumes[0] {
            Resume::After(seq) => Resume::After(seq.max(5)),
            Resume::Live | Resume::OtherEpoch | Resume::Held => Resume::After(5),
        };
        assert_eq!(after[0], expected);
    }
});
