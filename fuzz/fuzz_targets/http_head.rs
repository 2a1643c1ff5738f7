//! The HTTP request-head parser and the WebSocket upgrade decision.
//!
//! Invariants: no panic; a complete head is never longer than `MAX_HEAD_BYTES` nor than the
//! input; the head alone parses to the same request (what follows it is the body); a head that
//! does not fit in `MAX_HEAD_BYTES` is refused, however the rest of the input goes; an accepted
//! upgrade produces a well-formed 101 with no injected header lines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast::proto::http::{self, HeadError, Parse, MAX_HEAD_BYTES};

fuzz_target!(|data: &[u8]| {
    check(data);
    // The same bytes padded past the limit with one long header line: never accepted beyond
    // MAX_HEAD_BYTES (the parser looks at no more than that).
    if let Some(split) = data.iter().position(|&b| b == b'\n') {
        let mut big = data[..=split].to_vec();
        big.extend_from_slice(b"X-Pad: ");
        big.resize(MAX_HEAD_BYTES + 1, b'a');
        big.extend_from_slice(&data[split + 1..]);
        match http::parse_request(&big) {
            Ok(Parse::Complete { head_len, .. }) => assert!(head_len <= MAX_HEAD_BYTES),
            Ok(Parse::Partial) => panic!("a {}-byte input is partial", big.len()),
            Err(_) => {}
        }
    }
});

fn check(data: &[u8]) {
    match http::parse_request(data) {
        Ok(Parse::Partial) => assert!(data.len() < MAX_HEAD_BYTES),
        Ok(Parse::Complete { request, head_len }) => {
            assert!(head_len <= data.len() && head_len <= MAX_HEAD_BYTES);
            match http::parse_request(&data[..head_len]) {
                Ok(Parse::Complete {
                    request: again,
                    head_len: len,
                }) => assert!(again == request && len == head_len),
                other => panic!("the head alone parses differently: {other:?}"),
            }
            let _ = request.content_length();
            let _ = request.keep_alive();
            let _ = request.query_param("token");
            let _ = request.query_param("channels");
            let _ = http::is_upgrade_request(&request);
            match http::websocket_upgrade(&request) {
                Ok(upgrade) => {
                    let protocol = upgrade.protocols.first().map(String::as_str);
                    let response = http::accept_response(&upgrade.key, protocol, None);
                    well_formed(&response);
                }
                Err(refusal) => well_formed(&refusal.response()),
            }
        }
        Err(e) => {
            assert!(matches!(e.status(), 400 | 431));
            if e == HeadError::TooLarge {
                assert!(data.len() >= MAX_HEAD_BYTES);
            }
        }
    }
}

/// One status line, header lines of `name: value`, a blank line; no bare CR or LF.
fn well_formed(response: &[u8]) {
    let text = std::str::from_utf8(response).expect("responses are UTF-8");
    let (head, _body) = text.split_once("\r\n\r\n").expect("a complete head");
    let mut lines = head.split("\r\n");
    assert!(lines.next().unwrap().starts_with("HTTP/1.1 "));
    for line in lines {
        assert!(!line.contains('\r') && !line.contains('\n'), "{line:?}");
        let (name, _) = line.split_once(": ").expect("name: value");
        assert!(!name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()));
    }
}
