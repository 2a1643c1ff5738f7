//! End to end: connection limits and message rates, each hit on purpose, while other clients
//! keep receiving.

mod support;

use std::net::SocketAddr;

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A raw handshake from `src`; returns the status line and headers.
async fn handshake_from(src: &str, server: SocketAddr, query: &str) -> String {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let mut s: TcpStream = socket.connect(server).await.unwrap();
    let req = format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        buf.extend_from_slice(&chunk[..n]);
        if n == 0 || buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    // Keep 101s open for the rest of the test by leaking the socket into a task.
    tokio::spawn(async move {
        let mut sink = [0u8; 1024];
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    String::from_utf8_lossy(&buf).to_string()
}

async fn watcher(server: &Server) -> Ws {
    let t = token(json!({"sub": "watcher", "channels": ["dashboard"]}));
    let (mut ws, _) = connect(server, &format!("channels=dashboard&token={t}")).await;
    recv_json(&mut ws).await;
    ws
}

async fn still_receives(server: &Server, ws: &mut Ws) {
    let seq = server
        .publish_one("dashboard", "still-here", json!(null))
        .await;
    let ev = recv_json(ws).await;
    assert_eq!(
        (ev["event"].as_str(), ev["seq"].as_u64()),
        (Some("still-here"), Some(seq))
    );
}

#[tokio::test]
async fn connection_rate_per_ip_answers_429_with_retry_after() {
    let server = Server::start_with(&[
        ("RINGCAST_LIMIT_LOOPBACK", "true"),
        ("RINGCAST_CONNECTIONS_PER_IP_PER_MINUTE", "3"),
    ]);
    let mut w = watcher(&server).await; // from 127.0.0.1
    let q = format!("token={}", admin_token());
    for _ in 0..3 {
        assert!(handshake_from("127.0.0.7", server.addr, &q)
            .await
            .starts_with("HTTP/1.1 101"));
    }
    let refused = handshake_from("127.0.0.7", server.addr, &q).await;
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    let retry: u64 = refused
        .lines()
        .find_map(|l| l.strip_prefix("Retry-After: "))
        .expect("Retry-After")
        .trim()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    assert!(handshake_from("127.0.0.8", server.addr, &q)
        .await
        .starts_with("HTTP/1.1 101"));
    still_receives(&server, &mut w).await;
}

#[tokio::test]
async fn per_user_limit_rejects_or_closes_the_oldest() {
    let server = Server::start_with(&[("RINGCAST_MAX_CONNECTIONS_PER_USER", "2")]);
    let mut w = watcher(&server).await;
    let u = token(json!({"sub": "u1", "channels": ["dashboard"]}));
    let q = format!("token={u}");
    let _a = connect(&server, &q).await;
    let _b = connect(&server, &q).await;
    let refused = handshake_from("127.0.0.1", server.addr, &q).await;
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains("Retry-After"), "{refused}");
    still_receives(&server, &mut w).await;

    let server = Server::start_with(&[
        ("RINGCAST_MAX_CONNECTIONS_PER_USER", "2"),
        ("RINGCAST_USER_LIMIT_POLICY", "close-oldest"),
    ]);
    let (mut oldest, _) = connect(&server, &q).await;
    let (_second, _) = connect(&server, &q).await;
    let (_third, _) = connect(&server, &q).await;
    assert_eq!(recv_close(&mut oldest).await, 4008);
}

#[tokio::test]
async fn per_project_and_node_limits_answer_503() {
    let server = Server::start_with(&[
        ("RINGCAST_MAX_CONNECTIONS_PER_PROJECT", "2"),
        ("RINGCAST_MAX_CONNECTIONS", "4"),
    ]);
    let mut w = watcher(&server).await;
    let t = token(json!({"sub": "u", "projects": ["p1", "p2"]}));
    let _a = connect(&server, &format!("channels=project:p1&token={t}")).await;
    let _b = connect(&server, &format!("channels=project:p1&token={t}")).await;
    let refused = handshake_from(
        "127.0.0.1",
        server.addr,
        &format!("channels=project:p1&token={t}"),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("project p1"), "{refused}");
    let _c = connect(&server, &format!("channels=project:p2&token={t}")).await; // 4 in all now
    let refused = handshake_from("127.0.0.1", server.addr, &format!("token={t}")).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("maximum of 4"), "{refused}");
    still_receives(&server, &mut w).await;
}

#[tokio::test]
async fn a_client_flooding_messages_is_warned_then_closed_and_others_lose_nothing() {
    let server = Server::start_with(&[
        ("RINGCAST_WORKERS", "1"),
        ("RINGCAST_MAX_CLIENT_MESSAGES_PER_SEC", "20"),
    ]);
    let mut w = watcher(&server).await;
    let mut flood = RawWs::connect(server.addr, &format!("/ws?token={}", admin_token())).await;
    flood.recv_json().await;
    let publisher = async {
        for i in 1..=30u64 {
            server.publish_one("dashboard", "e", json!(i)).await;
        }
    };
    let flooding = async {
        // It keeps sending while the server warns it and closes it: the server reads on until
        // the client's close frame, so the client gets the close frame and then a FIN, never a
        // reset (closing with unread input would reset it, and could eat the close frame).
        let frame = ringcast::proto::ws::codec::testing::client_frame(
            true,
            0x1,
            b"{\"type\":\"nonsense\"}",
            [1, 2, 3, 4],
        );
        let (before, close) = flood.recv_close_while_sending(&frame).await;
        let warned = before.iter().any(|f| {
            let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
            v["code"] == "rate_limited"
        });
        flood.answer_close(1008).await;
        flood.expect_eof().await;
        (warned, close.close_code())
    };
    let ((), (warned, code)) = tokio::join!(publisher, flooding);
    assert!(warned, "a rate_limited error came before the close");
    assert_eq!(code, Some(1008));
    for i in 1..=30u64 {
        assert_eq!(recv_json(&mut w).await["seq"], i);
    }
}
