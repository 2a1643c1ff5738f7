//! Client messages as JSON text (what a WebSocket client sends).
//!
//! Invariants: no panic; the outcome depends on nothing but the bytes: parsing twice gives the
//! same message, or a refusal with the same code. (Which of several bad fields a refusal's text
//! names may differ: the fields are visited in hash order.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast::proto::msg::parse_client_message;

fuzz_target!(|data: &[u8]| {
    match (parse_client_message(data), parse_client_message(data)) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.code, b.code, "{a:?} / {b:?}"),
        (a, b) => panic!("parsed two ways: {a:?} / {b:?}"),
    }
});
