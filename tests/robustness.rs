//! End to end: bad input gets a clear answer and harms nobody else.

mod support;

use serde_json::json;
use support::*;

async fn raw_subscribed(server: &Server, channels: &str) -> RawWs {
    let mut ws = RawWs::connect(
        server.addr,
        &format!("/ws?channels={channels}&token={}", admin_token()),
    )
    .await;
    assert_eq!(ws.recv_json().await["type"], "welcome");
    for _ in channels.split(',') {
        assert_eq!(ws.recv_json().await["type"], "subscribed");
    }
    ws
}

#[tokio::test]
async fn bad_client_messages_get_error_frames_and_the_connection_lives_on() {
    let server = Server::start();
    let mut ws = raw_subscribed(&server, "dashboard").await;
    for (text, code) in [
        ("{not json", "bad_json"),
        ("[1,2,3]", "bad_json"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (
            r#"{"type":"subscribe","channels":"dashboard"}"#,
            "bad_message",
        ),
        (
            r#"{"type":"subscribe","channels":["bad name"]}"#,
            "bad_channel",
        ),
        (
            r#"{"type":"subscribe","channels":["dashboard"]}"#,
            "already_subscribed",
        ),
        (
            r#"{"type":"unsubscribe","channels":["elsewhere"]}"#,
            "not_subscribed",
        ),
    ] {
        ws.send_frame(true, 0x1, text.as_bytes()).await;
        let err = ws.recv_json().await;
        assert_eq!(err["type"], "error", "{text}");
        assert_eq!(err["code"], code, "{text}: {err}");
        assert!(err["message"].as_str().unwrap().len() > 5);
    }
    ws.send_frame(true, 0x2, b"\x01\x02").await;
    assert_eq!(ws.recv_json().await["code"], "binary_not_supported");
    server
        .publish_one("dashboard", "still-here", json!(1))
        .await;
    assert_eq!(ws.recv_json().await["event"], "still-here");
}

#[tokio::test]
async fn fragmented_message_with_a_ping_between_fragments_is_understood() {
    let server = Server::start();
    let mut ws = raw_subscribed(&server, "dashboard").await;
    let msg = br#"{"type":"subscribe","channels":["task:t1"]}"#;
    ws.send_frame(false, 0x1, &msg[..10]).await;
    ws.send_frame(false, 0x0, &msg[10..20]).await;
    ws.send_frame(true, 0x9, b"hi").await;
    ws.send_frame(true, 0x0, &msg[20..]).await;
    let pong = ws.recv().await.unwrap();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (0xA, &b"hi"[..]));
    let sub = ws.recv_json().await;
    assert_eq!(sub["type"], "subscribed");
    assert_eq!(sub["channel"], "task:t1");
}

#[tokio::test]
async fn protocol_violations_close_with_the_rfc_codes() {
    let server = Server::start();
    // Unmasked client frame → 1002.
    let mut ws = raw_subscribed(&server, "dashboard").await;
    ws.send_raw(&[0x81, 0x02, b'h', b'i']).await;
    assert_eq!(ws.recv_close_code().await, 1002);
    assert!(
        ws.recv().await.is_none(),
        "TCP closed after the close frame"
    );
    // Reserved opcode → 1002.
    let mut ws = raw_subscribed(&server, "dashboard").await;
    ws.send_frame(true, 0x3, b"x").await;
    assert_eq!(ws.recv_close_code().await, 1002);
    // Invalid UTF-8 in a text message → 1007.
    let mut ws = raw_subscribed(&server, "dashboard").await;
    ws.send_frame(true, 0x1, &[b'{', 0xff, 0xfe, b'}']).await;
    assert_eq!(ws.recv_close_code().await, 1007);
    // Continuation without a start → 1002.
    let mut ws = raw_subscribed(&server, "dashboard").await;
    ws.send_frame(true, 0x0, b"x").await;
    assert_eq!(ws.recv_close_code().await, 1002);
}

#[tokio::test]
async fn a_client_still_sending_after_a_protocol_error_gets_the_close_frame_and_a_fin() {
    let server = Server::start();
    // A reserved opcode (1002) and a frame announcing more than 1 MiB (1009), each sent over
    // and over while the server closes: the server drops what follows instead of resetting.
    let reserved = ringcast::proto::ws::codec::testing::client_frame(true, 0x3, b"x", [1, 2, 3, 4]);
    let mut oversize = vec![0x82, 0xff];
    oversize.extend_from_slice(&((1u64 << 20) + 1).to_be_bytes());
    oversize.extend_from_slice(&[1, 2, 3, 4]);
    oversize.extend_from_slice(&[0u8; 4096]);
    for (frame, code) in [(reserved, 1002), (oversize, 1009)] {
        let mut ws = raw_subscribed(&server, "dashboard").await;
        let (_, close) = ws.recv_close_while_sending(&frame).await;
        assert_eq!(close.close_code(), Some(code));
        ws.answer_close(code).await;
        ws.expect_eof().await;
    }
}

#[tokio::test]
async fn oversize_messages_close_with_1009_before_being_buffered() {
    let server = Server::start();
    // A header announcing 1 MiB + 1: closed at once, without sending the payload.
    let mut ws = raw_subscribed(&server, "dashboard").await;
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&((1u64 << 20) + 1).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    ws.send_raw(&header).await;
    assert_eq!(ws.recv_close_code().await, 1009);
    // Fragments that add up past the limit.
    let mut ws = raw_subscribed(&server, "dashboard").await;
    let chunk = vec![b'a'; 600 * 1024];
    ws.send_frame(false, 0x1, &chunk).await;
    ws.send_frame(true, 0x0, &chunk).await;
    assert_eq!(ws.recv_close_code().await, 1009);
    // Exactly at the limit is fine (and is just a bad message, not a protocol error).
    let mut ws = raw_subscribed(&server, "dashboard").await;
    ws.send_frame(true, 0x1, &vec![b' '; 1 << 20]).await;
    assert_eq!(ws.recv_json().await["code"], "bad_json");
}

#[tokio::test]
async fn client_close_is_answered_with_the_same_code() {
    let server = Server::start();
    let mut ws = raw_subscribed(&server, "dashboard").await;
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    ws.send_frame(true, 0x8, &payload).await;
    let close = ws.recv().await.unwrap();
    assert_eq!(close.close_code(), Some(1000));
    assert!(ws.recv().await.is_none());
}

#[tokio::test]
async fn misbehaving_and_vanishing_clients_do_not_disturb_others() {
    let server = Server::start();
    let t = admin_token();
    let mut watchers = Vec::new();
    for _ in 0..20 {
        let (mut ws, _) = connect(&server, &format!("channels=dashboard&token={t}")).await;
        recv_json(&mut ws).await;
        watchers.push(ws);
    }
    let mut vandals = Vec::new();
    for i in 0..20 {
        let mut ws = raw_subscribed(&server, "dashboard").await;
        match i % 4 {
            // Drop the TCP connection in the middle of a frame.
            0 => ws.send_raw(&[0x81, 0xfe, 0x10]).await,
            // Junk that is not WebSocket at all.
            1 => ws.send_raw(&[0xde, 0xad, 0xbe, 0xef, 0x00, 0x11]).await,
            // A flood of bad JSON.
            2 => {
                // (past the message-rate limit the server closes it: writes may then fail)
                let frame = ringcast::proto::ws::codec::testing::client_frame(
                    true,
                    0x1,
                    b"{{{{",
                    [1, 2, 3, 4],
                );
                for _ in 0..200 {
                    if tokio::io::AsyncWriteExt::write_all(&mut ws.stream, &frame)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            // Vanish without a word.
            _ => {}
        }
        vandals.push(ws);
    }
    let publisher = async {
        for i in 1..=50u64 {
            server.publish_one("dashboard", "e", json!(i)).await;
        }
    };
    let drop_vandals = async {
        for (i, ws) in vandals.into_iter().enumerate() {
            if i % 2 == 0 {
                drop(ws);
            } else {
                std::mem::forget(ws.stream); // leave it half-dead: never read again
            }
        }
    };
    tokio::join!(publisher, drop_vandals);
    for ws in &mut watchers {
        for i in 1..=50u64 {
            let ev = recv_json(ws).await;
            assert_eq!(ev["seq"], i);
        }
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_the_others_get_everything() {
    let server = Server::start_with(&[("RINGCAST_MAX_QUEUE_BYTES", "2097152")]);
    let t = admin_token();
    let (mut fast, _) = connect(&server, &format!("channels=dashboard&token={t}")).await;
    recv_json(&mut fast).await;
    let mut stuck = raw_subscribed(&server, "dashboard").await;
    let big = "x".repeat(64 * 1024);
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while seqs.len() < 300 {
            seqs.push(recv_json(&mut fast).await["seq"].as_u64().unwrap());
        }
        (seqs, fast)
    });
    for _ in 0..300 {
        server.publish_one("dashboard", "big", json!(big)).await;
    }
    let (seqs, _fast) = reader.await.unwrap();
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
    // Only now does the stuck client read: what the kernel buffered, then the end.
    let mut events = 0;
    let mut close = None;
    while let Some(frame) = stuck.recv().await {
        if frame.opcode == 0x8 {
            close = frame.close_code();
            break;
        }
        events += 1;
    }
    assert_eq!(close, Some(1008));
    assert!(
        events < 300,
        "the stuck client was cut off, not served everything ({events})"
    );
    // It never answers the close: the server cuts the socket after the close grace.
    assert!(stuck.recv().await.is_none());
    // And forgets it, while the fast client stays connected.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, _, metrics) = server.http("GET", "/metrics", &[], "").await;
        if metrics.contains("ringcast_connections 1\n") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
