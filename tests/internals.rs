//! End to end: bounds inside the process — what a client or publisher gets when it sends more
//! than the server will do for one message, and what the metrics count.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Error as WsError;

async fn metric(server: &Server, name: &str) -> u64 {
    let (status, _, text) = server.http("GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} in {text}"))
        .parse()
        .unwrap()
}

fn user_token() -> String {
    token(json!({"sub": "u1", "channels": ["*"], "projects": ["*"]}))
}

#[tokio::test]
async fn a_token_with_an_empty_sub_is_refused_with_401() {
    let server = Server::start();
    for sub in ["", "   "] {
        let t = token(json!({"sub": sub, "channels": ["*"]}));
        let url = server.url(&format!("/ws?channels=news&token={t}"));
        match tokio_tungstenite::connect_async(url).await {
            Err(WsError::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 401, "{sub:?}");
                let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
                assert!(body.contains("sub claim is empty"), "{body}");
            }
            other => panic!("{sub:?}: expected 401, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_subscribe_naming_100000_channels_gets_one_error_and_the_connection_stays_open() {
    let server = Server::start();
    let (mut ws, _) = connect(&server, &format!("token={}", user_token())).await;
    let many: Vec<String> = (0..100_000).map(|i| format!("c{i}")).collect();
    for kind in ["subscribe", "unsubscribe"] {
        send_json(&mut ws, &json!({"type": kind, "channels": many})).await;
        let err = recv_json(&mut ws).await;
        assert_eq!(err["type"], "error", "{err}");
        assert_eq!(err["code"], "too_many_channels", "{err}");
        assert_eq!(err["message"], "a message may name at most 100 channels");
        assert!(err.get("channel").is_none(), "{err}");
    }
    // Nothing else was queued for those messages: the next frame answers the next message.
    send_json(&mut ws, &json!({"type": "subscribe", "channels": ["news"]})).await;
    let ok = recv_json(&mut ws).await;
    assert_eq!(
        ok,
        json!({"type": "subscribed", "channel": "news", "seq": 0})
    );
    // At the bound, each channel still gets its own answer.
    let hundred: Vec<String> = (0..100).map(|i| format!("bad name {i}")).collect();
    send_json(&mut ws, &json!({"type": "subscribe", "channels": hundred})).await;
    for i in 0..100 {
        let err = recv_json(&mut ws).await;
        assert_eq!(err["code"], "bad_channel", "{err}");
        assert_eq!(err["channel"], format!("bad name {i}"));
    }
}

#[tokio::test]
async fn error_frames_cut_a_100_kib_channel_name() {
    let server = Server::start();
    let (mut ws, _) = connect(&server, &format!("token={}", user_token())).await;
    let huge = "x".repeat(100 * 1024);
    let cut = format!("{}…", "x".repeat(64));
    send_json(&mut ws, &json!({"type": "subscribe", "channels": [huge]})).await;
    let (text, err) = recv_text(&mut ws).await;
    assert_eq!(err["code"], "bad_channel");
    assert_eq!(err["channel"], cut.as_str());
    assert_eq!(
        err["message"],
        format!("bad channel \"{cut}\": channel name is longer than 200 bytes")
    );
    assert!(text.len() < 512, "{} bytes", text.len());
    send_json(&mut ws, &json!({"type": "unsubscribe", "channels": [huge]})).await;
    let (text, err) = recv_text(&mut ws).await;
    assert_eq!(err["code"], "not_subscribed");
    assert_eq!(err["channel"], cut.as_str());
    assert_eq!(err["message"], format!("not subscribed to {cut}"));
    assert!(text.len() < 512, "{} bytes", text.len());
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn data_nested_128_deep_is_delivered_and_129_deep_is_refused() {
    let server = Server::start();
    let (mut ws, _) = connect(&server, &format!("channels=news&token={}", user_token())).await;
    assert_eq!(recv_json(&mut ws).await["type"], "subscribed");
    let (status, body) = server
        .publish_raw(&format!(
            r#"{{"channel":"news","event":"deep","data":{}}}"#,
            nested(128)
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    // Read as text: a JSON parser with the usual limit of 128 levels refuses the frame around it.
    let frame = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("the event within the wait bound")
        .expect("open")
        .expect("a frame");
    let text = frame.into_text().expect("a text frame");
    assert!(text.contains(r#""event":"deep""#), "{text}");
    assert!(
        text.ends_with(&format!(r#""data":{}}}"#, nested(128))),
        "{text}"
    );
    let (status, body) = server
        .publish_raw(&format!(
            r#"{{"channel":"news","event":"deeper","data":{}}}"#,
            nested(129)
        ))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("nested deeper than 128"), "{body}");
}

#[tokio::test]
async fn published_total_counts_api_messages_and_audit_records_have_their_own_counter() {
    let server = Server::start();
    // Each connect and disconnect is an audit record, published on the audit channel.
    for _ in 0..3 {
        let (ws, _) = connect(&server, &format!("token={}", user_token())).await;
        drop(ws);
    }
    // One channel owned by each core: the metric sums what both counted.
    let owned_by = |core| {
        (0..)
            .map(|i| format!("count{i}"))
            .find(|c| ringcast::delivery::channel::owner_core(c, 2) == core)
            .unwrap()
    };
    server.publish_one(&owned_by(0), "e", json!(1)).await;
    server.publish_one(&owned_by(1), "e", json!(2)).await;
    let deadline = Instant::now() + WAIT;
    while metric(&server, "ringcast_audit_events_total").await < 6 {
        assert!(Instant::now() < deadline, "audit records not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&server, "ringcast_published_total").await, 2);
}

/// The writer waits for room when the kernel takes no more, on either I/O driver: a client that
/// stops reading while megabytes are queued for it gets every byte, in order, once it reads.
#[tokio::test]
async fn a_backlog_larger_than_the_socket_buffers_is_written_whole_on_both_drivers() {
    const EVENTS: usize = 1000;
    let pad = "p".repeat(16 * 1024);
    for driver in ["uring", "legacy"] {
        let server = Server::start_with(&[
            ("RINGCAST_IO_DRIVER", driver),
            ("RINGCAST_MAX_QUEUE_BYTES", "67108864"),
            ("RINGCAST_SLOW_CLIENT_TIMEOUT_MS", "60000"),
        ]);
        let path = format!("/ws?channels=bulk&token={}", user_token());
        let mut ws = RawWs::connect(server.addr, &path).await;
        assert_eq!(ws.recv_json().await["type"], "welcome");
        assert_eq!(ws.recv_json().await["type"], "subscribed");
        // 16 MiB while the client reads nothing: more than both ends' socket buffers hold.
        for chunk in 0..EVENTS / 100 {
            let batch: Vec<_> = (0..100)
                .map(|i| {
                    json!({"channel": "bulk", "event": "e", "priority": "critical",
                                "data": {"n": chunk * 100 + i, "pad": pad}})
                })
                .collect();
            let (status, body) = server.publish(&json!(batch)).await;
            assert_eq!(status, 200, "{driver}: {body}");
        }
        for seq in 1..=EVENTS {
            let event = ws.recv_json().await;
            assert_eq!(event["seq"], seq as u64, "{driver}");
            assert_eq!(event["data"]["n"], seq as u64 - 1, "{driver}");
            assert_eq!(event["data"]["pad"].as_str().map(str::len), Some(pad.len()));
        }
    }
}

/// With a tiny `mesh_queue_bytes`, concurrent publishers find a core with work waiting: those
/// publishes get 503 with `Retry-After` and nothing of them is sequenced, while every message
/// answered 200 reaches the subscriber, in order, none missing.
#[tokio::test]
async fn publishes_get_503_while_a_core_is_behind_and_every_accepted_message_is_delivered() {
    let server = Server::start_with(&[
        ("RINGCAST_MESH_QUEUE_BYTES", "1"),
        ("RINGCAST_MAX_QUEUE_BYTES", "268435456"),
    ]);
    let (mut reader, _) = connect(&server, &format!("channels=hot&token={}", user_token())).await;
    assert_eq!(recv_json(&mut reader).await["type"], "subscribed");
    let pad = "q".repeat(1024);
    let batch: Vec<_> = (0..200)
        .map(|_| json!({"channel": "hot", "event": "e", "priority": "critical", "data": {"pad": pad}}))
        .collect();
    let body = json!(batch).to_string();
    let auth = format!("Bearer {API_KEY}");
    let refused = std::sync::atomic::AtomicBool::new(false);
    let deadline = Instant::now() + WAIT;
    let publisher = || async {
        let mut accepted = 0u64;
        while !refused.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            let req = format!(
                "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                 Authorization: {auth}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let (status, head, answer) = raw_exchange(server.addr, req.as_bytes()).await;
            match status {
                200 => accepted += 200,
                503 => {
                    assert!(head.contains("Retry-After: 1\r\n"), "{head}");
                    assert!(answer.contains("node is behind"), "{answer}");
                    refused.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                other => panic!("{other}: {answer}"),
            }
        }
        accepted
    };
    let counts = futures_util::future::join_all((0..8).map(|_| publisher())).await;
    assert!(
        refused.into_inner(),
        "no publish was refused within the wait bound"
    );
    let accepted: u64 = counts.iter().sum();
    assert!(accepted > 0);
    for seq in 1..=accepted {
        let event = recv_json(&mut reader).await;
        assert_eq!(event["seq"], seq, "{event}");
    }
    // Nothing refused was sequenced: the next message gets the next seq.
    let next = loop {
        let (status, answer) = server
            .publish(&json!({"channel": "hot", "event": "last", "data": 0}))
            .await;
        if status == 200 {
            break answer["seq"].as_u64().unwrap();
        }
        assert_eq!(status, 503, "{answer}");
        assert!(Instant::now() < deadline + WAIT, "still behind");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(next, accepted + 1);
    assert_eq!(recv_json(&mut reader).await["event"], "last");
}

/// A compressed client message of a few KiB can inflate to 1 MiB: past
/// `max_inflated_bytes_per_sec` in one second the connection is closed with 1008.
#[tokio::test]
async fn compressed_input_past_the_inflate_budget_is_closed_1008() {
    use ringcast::proto::ws::codec::testing::client_frame;
    use ringcast::proto::ws::deflate;
    let server = Server::start_with(&[("RINGCAST_MAX_INFLATED_BYTES_PER_SEC", "2097152")]);
    let offer = "Sec-WebSocket-Extensions: permessage-deflate\r\n";
    let path = format!("/ws?token={}", user_token());
    // 512 KiB of JSON (whitespace, then a pause) that travels as ~5 KiB.
    let mut text = vec![b' '; 512 * 1024 - 16];
    text.extend_from_slice(br#"{"type":"pause"}"#);
    let packed = deflate::compress(&text);
    assert!(packed.len() < 8192, "{}", packed.len());
    let mut frame = client_frame(true, 0x1, &packed, [1, 2, 3, 4]);
    frame[0] |= 0x40;

    let (mut ws, head) = RawWs::connect_with(server.addr, &path, offer).await;
    assert!(head.contains("permessage-deflate"), "{head}");
    assert_eq!(ws.recv_json().await["type"], "welcome");
    // Five in one write, so all land in the same second: four are the budget, the fifth is
    // one too many.
    ws.send_raw(&frame.repeat(5)).await;
    for _ in 0..4 {
        assert_eq!(ws.recv_json().await["type"], "paused");
    }
    let close = loop {
        let f = ws.recv().await.expect("a close frame before the TCP close");
        match f.opcode {
            0x8 => break f,
            0x1 => {
                let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
                panic!("answered past the budget: {v}");
            }
            _ => continue,
        }
    };
    assert_eq!(close.close_code(), Some(1008));
    assert_eq!(&close.payload[2..], b"too much compressed input");
}
