//! Bugs found in review, each with the test that would have caught it.

mod support;

use std::time::{Duration, Instant};

use ringcast::proto::ws::codec::testing::client_frame;
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn upgrade_request(addr: std::net::SocketAddr, query: &str) -> Vec<u8> {
    format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

fn text(json: serde_json::Value) -> Vec<u8> {
    client_frame(true, 0x1, json.to_string().as_bytes(), [9, 8, 7, 6])
}

/// Reads server frames after a raw handshake until at least `n` text frames arrived; returns
/// every complete text frame read so far.
async fn read_texts(s: &mut TcpStream, n: usize) -> Vec<serde_json::Value> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut head_done = false;
    while out.len() < n {
        let mut chunk = [0u8; 65536];
        let got = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("frames")
            .unwrap();
        assert!(got > 0, "closed after {out:?}");
        buf.extend_from_slice(&chunk[..got]);
        if !head_done {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            assert!(buf.starts_with(b"HTTP/1.1 101"));
            buf.drain(..end + 4);
            head_done = true;
        }
        while buf.len() >= 2 {
            let (len, h) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < h + len {
                break;
            }
            if buf[0] & 0x0f == 0x1 {
                out.push(serde_json::from_slice(&buf[h..h + len]).unwrap());
            }
            buf.drain(..h + len);
        }
    }
    out
}

#[tokio::test]
async fn welcome_arrives_when_a_handshake_channel_is_unsubscribed_before_its_ack() {
    let server = Server::start();
    for _ in 0..20 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        let mut bytes = upgrade_request(
            server.addr,
            &format!("channels=task:a&token={}", admin_token()),
        );
        bytes.extend(text(json!({"type": "unsubscribe", "channels": ["task:a"]})));
        s.write_all(&bytes).await.unwrap();
        // Whether the ack or the unsubscribe wins the race, welcome comes first and the
        // subscription ends with `unsubscribed`.
        let frames = read_texts(&mut s, 2).await;
        assert_eq!(frames[0]["type"], "welcome", "{frames:?}");
        let last = match frames.last() {
            Some(f) if f["type"] == "subscribed" => read_texts_after(&mut s, 1).await.remove(0),
            Some(f) => f.clone(),
            None => unreachable!(),
        };
        assert_eq!(last["type"], "unsubscribed", "{frames:?} then {last}");
    }
}

#[tokio::test]
async fn resubscribing_before_the_first_ack_replays_once() {
    let server = Server::start();
    for i in 1..=3 {
        server.publish_one("task:r", "e", json!(i)).await;
    }
    let (_, welcome) = connect(&server, &format!("token={}", admin_token())).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_string();
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut bytes = upgrade_request(server.addr, &format!("token={}", admin_token()));
    let sub = json!({"type": "subscribe", "channels": ["task:r"], "since": {"task:r": 0}, "epoch": epoch});
    bytes.extend(text(sub.clone()));
    bytes.extend(text(json!({"type": "unsubscribe", "channels": ["task:r"]})));
    bytes.extend(text(sub));
    s.write_all(&bytes).await.unwrap();
    // welcome, unsubscribed, subscribed, 3 events, replayed — and then nothing more for task:r.
    let frames = read_texts(&mut s, 7).await;
    let kinds: Vec<String> = frames
        .iter()
        .map(|f| {
            f["type"]
                .as_str()
                .map_or_else(|| format!("seq{}", f["seq"]), str::to_owned)
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "welcome",
            "unsubscribed",
            "subscribed",
            "seq1",
            "seq2",
            "seq3",
            "replayed"
        ]
    );
    server.publish_one("task:r", "e", json!(4)).await;
    let next = read_texts_after(&mut s, 1).await;
    assert_eq!(
        next[0]["seq"], 4,
        "the next frame is live seq 4, not a second replay"
    );
}

async fn read_texts_after(s: &mut TcpStream, n: usize) -> Vec<serde_json::Value> {
    // Same framing, no HTTP head left to skip.
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        let mut chunk = [0u8; 4096];
        let got = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("frame")
            .unwrap();
        assert!(got > 0);
        buf.extend_from_slice(&chunk[..got]);
        while buf.len() >= 2 && buf.len() >= 2 + (buf[1] & 0x7f) as usize && (buf[1] & 0x7f) < 126 {
            let len = (buf[1] & 0x7f) as usize;
            out.push(serde_json::from_slice(&buf[2..2 + len]).unwrap());
            buf.drain(..2 + len);
        }
    }
    out
}

#[tokio::test]
async fn a_replay_larger_than_the_send_queue_is_not_recovered_instead_of_closing_1008() {
    let server = Server::start_with(&[("RINGCAST_MAX_QUEUE_BYTES", "2097152")]);
    let big = "x".repeat(100_000);
    for _ in 0..30 {
        server.publish_one("task:big", "log", json!(big)).await; // 3 MB in the ring
    }
    let (_, welcome) = connect(&server, &format!("token={}", admin_token())).await;
    let epoch = welcome["epoch"].as_str().unwrap();
    let (mut ws, _) = connect(
        &server,
        &format!(
            "channels=task:big&token={}&last_sequence_id=0&epoch={epoch}",
            admin_token()
        ),
    )
    .await;
    recv_until_type(&mut ws, "subscribed").await;
    let (replayed, events) = recv_until_type(&mut ws, "replayed").await;
    assert_eq!(replayed["recovered"], false);
    assert!(events.is_empty());
    server.publish_one("task:big", "live", json!(1)).await;
    assert_eq!(recv_json(&mut ws).await["event"], "live");
}

#[tokio::test]
async fn a_flooding_client_neither_stalls_its_core_nor_grows_memory() {
    let server = Server::start_with(&[("RINGCAST_WORKERS", "1")]);
    let t = admin_token();
    let (mut watcher, _) = connect(&server, &format!("channels=dashboard&token={t}")).await;
    recv_json(&mut watcher).await;
    let mut flood = RawWs::connect(server.addr, &format!("/ws?token={t}")).await;
    flood.recv_json().await;
    let block: Vec<u8> = (0..20_000)
        .flat_map(|_| client_frame(true, 0xA, b"", [1, 2, 3, 4]))
        .collect();
    let flooding = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if flood.stream.write_all(&block).await.is_err() {
                break;
            }
        }
    });
    for i in 1..=20u64 {
        server.publish_one("dashboard", "e", json!(i)).await;
        assert_eq!(recv_json(&mut watcher).await["seq"], i);
    }
    flooding.await.unwrap();
    let rss_kib = server.rss_kib();
    assert!(
        rss_kib < 200 * 1024,
        "server RSS {rss_kib} KiB after the flood"
    );
}

#[tokio::test]
async fn a_client_that_closes_but_never_reads_does_not_keep_its_socket() {
    let server = Server::start();
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    let mut ws = RawWs::connect(
        server.addr,
        &format!("/ws?channels=dashboard&token={}", admin_token()),
    )
    .await;
    let big = "y".repeat(500_000);
    for _ in 0..12 {
        server.publish_one("dashboard", "big", json!(big)).await; // 6 MB it never reads
    }
    ws.send_frame(true, 0x8, &1000u16.to_be_bytes()).await;
    let deadline = Instant::now() + WAIT;
    while fds() > before {
        assert!(
            Instant::now() < deadline,
            "socket still held: {} fds, {before} before",
            fds()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(ws);
}

#[tokio::test]
async fn an_oversize_publish_gets_its_413_and_expect_continue_is_honoured() {
    let server = Server::start();
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {}\r\n\r\n",
        9 << 20
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(&vec![b' '; 1 << 20]).await; // the client keeps sending for a while
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .expect("answer and close");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    let body = json!({"channel": "dashboard", "event": "e", "data": 1}).to_string();
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nExpect: 100-continue\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(WAIT, s.read_exact(&mut interim))
        .await
        .expect("100 Continue")
        .unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(
        rest.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
}

#[tokio::test]
async fn data_that_only_looks_like_json_is_refused_at_publish() {
    let server = Server::start();
    let (mut mp, _) = ws_connect(server.url(&format!(
        "/ws?channels=task:x&token={}&encoding=messagepack",
        admin_token()
    )))
    .await
    .unwrap();
    for data in [
        r#""\ud800""#,
        "1e400",
        &format!("{}1{}", "[".repeat(200), "]".repeat(200)),
    ] {
        let body = format!(r#"{{"channel":"task:x","event":"e","data":{data}}}"#);
        let (status, text) = server.publish_raw(&body).await;
        assert_eq!(status, 400, "{data}: {text}");
        assert!(text.contains("data is not valid JSON"), "{text}");
    }
    // The node (and its MessagePack subscriber) is fine.
    server.publish_one("task:x", "ok", json!(1)).await;
    use futures_util::StreamExt;
    let mut frames = 0;
    while frames < 3 {
        // welcome, subscribed, the event
        let msg = tokio::time::timeout(WAIT, mp.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if msg.is_binary() {
            frames += 1;
        }
    }
}

#[tokio::test]
async fn a_revoked_project_is_not_resent_to_an_ack_critical_client() {
    let server = Server::start_with(&[
        ("RINGCAST_PING_INTERVAL_MS", "100"),
        ("RINGCAST_ACK_TIMEOUT_MS", "200"),
    ]);
    let t = token(json!({"sub": "u1", "projects": ["p1"], "channels": ["dashboard"]}));
    let (mut ws, _) = connect(
        &server,
        &format!("channels=project:p1,dashboard&token={t}&ack=critical"),
    )
    .await;
    recv_json(&mut ws).await;
    recv_json(&mut ws).await;
    let body = json!({"channel": "project:p1", "event": "agent:failed", "priority": "critical", "data": null});
    assert_eq!(server.publish(&body).await.0, 200);
    assert_eq!(recv_json(&mut ws).await["event"], "agent:failed");
    let auth = format!("Bearer {API_KEY}");
    let (status, _, _) = server
        .http(
            "POST",
            "/api/v1/admin/revoke",
            &[("Authorization", &auth)],
            r#"{"user_id":"u1","project_id":"p1"}"#,
        )
        .await;
    assert_eq!(status, 200);
    let mut next = recv_json(&mut ws).await;
    if next["event"] == "agent:failed" {
        next = recv_json(&mut ws).await; // a re-send already on its way before the revoke
    }
    assert_eq!(next["reason"], "revoked", "{next}");
    tokio::time::sleep(std::time::Duration::from_millis(600)).await; // three ack timeouts
    server
        .publish_one("dashboard", "sentinel", json!(null))
        .await;
    assert_eq!(
        recv_json(&mut ws).await["event"],
        "sentinel",
        "no re-send after the revoke"
    );
}
