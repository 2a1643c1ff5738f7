//! End to end: permessage-deflate (RFC 7692) negotiated at the handshake; large event frames
//! compressed once per message and shared, small ones plain; compressed client messages.

mod support;

use ringcast::proto::ws::codec::testing::client_frame;
use ringcast::proto::ws::deflate;
use serde_json::{json, Value};
use support::*;

const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";

async fn compressed_metric(server: &Server) -> u64 {
    let (_, _, metrics) = server.http("GET", "/metrics", &[], "").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("ringcast_compressed_messages_total "))
        .expect("metric present")
        .parse()
        .unwrap()
}

/// The next data frame's JSON, inflated if it came compressed, and whether it did.
async fn recv_event(ws: &mut RawWs) -> (Value, bool) {
    loop {
        let f = ws.recv().await.expect("connection open");
        match f.opcode {
            0x9 | 0xA => continue,
            0x1 => {
                let payload = if f.compressed {
                    deflate::inflate(&f.payload, 1 << 24).expect("valid DEFLATE")
                } else {
                    f.payload
                };
                return (serde_json::from_slice(&payload).unwrap(), f.compressed);
            }
            op => panic!("unexpected opcode {op}"),
        }
    }
}

async fn subscribed(server: &Server, query: &str, headers: &str) -> (RawWs, String) {
    let (mut ws, head) = RawWs::connect_with(server.addr, &format!("/ws?{query}"), headers).await;
    assert_eq!(recv_event(&mut ws).await.0["type"], "welcome");
    assert_eq!(recv_event(&mut ws).await.0["type"], "subscribed");
    (ws, head)
}

#[tokio::test]
async fn large_events_go_compressed_once_small_ones_plain() {
    let server = Server::start();
    let q = format!("channels=logs:z&token={}", admin_token());
    let mut deflating = Vec::new();
    for _ in 0..3 {
        let (ws, head) = subscribed(&server, &q, OFFER).await;
        assert!(
            head.contains(
                "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
                 client_no_context_takeover\r\n"
            ),
            "{head}"
        );
        deflating.push(ws);
    }
    let (mut plain, head) = subscribed(&server, &q, "").await;
    assert!(!head.contains("Sec-WebSocket-Extensions"), "{head}");

    let before = compressed_metric(&server).await;
    let line = "PASSED tests/test_api.py::test_login \u{1b}[32m✓\u{1b}[0m\n".repeat(60);
    let large = json!({"level": "info", "line": line});
    let small = json!({"level": "info", "line": "short"});
    for i in 0..4 {
        let (data, expect_compressed) = if i % 2 == 0 {
            (&large, true)
        } else {
            (&small, false)
        };
        let seq = server.publish_one("logs:z", "log", data.clone()).await;
        let (reference, compressed) = recv_event(&mut plain).await;
        assert!(!compressed, "no extension, no compression");
        assert_eq!(
            (reference["seq"].as_u64(), &reference["data"]),
            (Some(seq), data)
        );
        for ws in &mut deflating {
            let (got, compressed) = recv_event(ws).await;
            assert_eq!(compressed, expect_compressed, "seq {seq}");
            assert_eq!(got, reference);
        }
    }
    // Two large messages, three compressing subscribers: two compressions.
    assert_eq!(compressed_metric(&server).await - before, 2);
}

#[tokio::test]
async fn the_threshold_and_the_switch_are_settings() {
    let server = Server::start_with(&[("RINGCAST_COMPRESSION_THRESHOLD", "64")]);
    let q = format!("channels=logs:t&token={}", admin_token());
    let (mut ws, _) = subscribed(&server, &q, OFFER).await;
    let data = json!({"line": "a line of about a hundred bytes, repeated: abcabcabcabcabcabc"});
    server.publish_one("logs:t", "log", data.clone()).await;
    let (got, compressed) = recv_event(&mut ws).await;
    assert!(compressed);
    assert_eq!(got["data"], data);

    let off = Server::start_with(&[("RINGCAST_COMPRESSION", "false")]);
    let (_, head) = RawWs::connect_with(off.addr, &format!("/ws?{q}"), OFFER).await;
    assert!(!head.contains("Sec-WebSocket-Extensions"), "{head}");
}

#[tokio::test]
async fn offers_the_server_cannot_honour_are_declined_not_refused() {
    let server = Server::start();
    let q = format!("channels=logs:d&token={}", admin_token());
    let small_window = "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=9\r\n";
    let (_, head) = subscribed(&server, &q, small_window).await;
    assert!(!head.contains("Sec-WebSocket-Extensions"), "{head}");
    // An accepted server_max_window_bits is echoed (RFC 7692 §7.1.2.1).
    let full_window = "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=15\r\n";
    let (_, head) = subscribed(&server, &q, full_window).await;
    assert!(
        head.contains("client_no_context_takeover; server_max_window_bits=15\r\n"),
        "{head}"
    );
}

#[tokio::test]
async fn compressed_client_messages_are_inflated_and_bad_ones_close_1007() {
    let server = Server::start();
    let q = format!("channels=logs:c&token={}", admin_token());
    let (mut ws, _) = subscribed(&server, &q, OFFER).await;
    let sub = br#"{"type":"subscribe","channels":["logs:c2"]}"#;
    let packed = deflate::compress(sub);
    // RSV1 on the first frame of a fragmented message, none on the continuation.
    let (a, b) = packed.split_at(packed.len() / 2);
    let mut first = client_frame(false, 0x1, a, [9, 8, 7, 6]);
    first[0] |= 0x40;
    ws.send_raw(&first).await;
    ws.send_frame(true, 0x0, b).await;
    assert_eq!(
        recv_event(&mut ws).await.0,
        json!({"type": "subscribed", "channel": "logs:c2", "seq": 0})
    );
    let mut garbage = client_frame(true, 0x1, &[0xff, 0xfe, 0xfd], [1, 2, 3, 4]);
    garbage[0] |= 0x40;
    ws.send_raw(&garbage).await;
    assert_eq!(ws.recv_close_code().await, 1007);

    // Without the extension, RSV1 is a protocol error.
    let mut raw = RawWs::connect(server.addr, &format!("/ws?{q}")).await;
    let mut frame = client_frame(true, 0x1, &packed, [1, 2, 3, 4]);
    frame[0] |= 0x40;
    raw.send_raw(&frame).await;
    assert_eq!(raw.recv_close_code().await, 1002);
}

#[tokio::test]
async fn a_compression_bomb_is_closed_1009() {
    let server = Server::start_with(&[("RINGCAST_MAX_MESSAGE_BYTES", "65536")]);
    let q = format!("channels=logs:b&token={}", admin_token());
    let (mut ws, _) = subscribed(&server, &q, OFFER).await;
    // Small on the wire, 1 MiB inflated: the frame passes the limit, the message does not.
    let bomb = deflate::compress(&vec![b' '; 1 << 20]);
    assert!(bomb.len() < 65536, "{}", bomb.len());
    let mut frame = client_frame(true, 0x1, &bomb, [1, 2, 3, 4]);
    frame[0] |= 0x40;
    ws.send_raw(&frame).await;
    assert_eq!(ws.recv_close_code().await, 1009);
}
