//! Client messages as JSON text (what a WebSocket client sends).
//!
//! Invariants: no panic; the answer does not depend on anything but the bytes (parsing twice
//! agrees); a refusal carries a message no longer than a bounded echo of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast::proto::msg::parse_client_message;

fuzz_target!(|data: &[u8]| {
    let first = parse_client_message(data);
    let again = parse_client_message(data);
    assert_eq!(format!("{first:?}"), format!("{again:?}"));
});
