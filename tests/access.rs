//! End to end: tokens at the handshake, channel rules, forbidden subscriptions, publisher key.

mod support;

use futures_util::StreamExt;
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// The HTTP status of a refused handshake.
async fn refused(server: &Server, query: &str) -> (u16, String) {
    refused_handshake(server.url(&format!("/ws?{query}"))).await
}

#[tokio::test]
async fn bad_tokens_get_401_at_the_handshake() {
    let server = Server::start();
    let (status, body) = refused(&server, "channels=project:p1").await;
    assert_eq!(status, 401);
    assert!(body.contains("missing token"), "{body}");

    let expired = token(json!({"sub": "u1", "projects": ["p1"], "exp": now_secs() - 10}));
    let (status, body) = refused(&server, &format!("token={expired}")).await;
    assert_eq!(status, 401);
    assert!(body.contains("expired"), "{body}");

    let forged = ringcast::edge::jwt::sign_hs256(
        b"some-other-secret-entirely",
        &json!({"sub": "u1", "exp": now_secs() + 60}),
    );
    let (status, body) = refused(&server, &format!("token={forged}")).await;
    assert_eq!(status, 401);
    assert!(body.contains("signature"), "{body}");

    for garbage in ["abc", "a.b.c", "eyJhbGciOiJub25lIn0.e30."] {
        assert_eq!(refused(&server, &format!("token={garbage}")).await.0, 401);
    }
    let no_sub = token(json!({"projects": ["p1"]}));
    assert_eq!(refused(&server, &format!("token={no_sub}")).await.0, 401);
}

#[tokio::test]
async fn token_is_accepted_from_header_and_subprotocol() {
    let server = Server::start();
    let t = token(json!({"sub": "u1", "projects": ["p1"]}));

    let mut req = server
        .url("/ws?channels=project:p1")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
    );
    let (mut ws, _) = ws_connect(req).await.unwrap();
    assert_eq!(recv_json(&mut ws).await["type"], "welcome");

    // Browsers: offer "ringcast" and "bearer.<token>"; the server selects "ringcast".
    let mut req = server.url("/ws/projects/p1").into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("ringcast, bearer.{t}")).unwrap(),
    );
    let (mut ws, resp) = ws_connect(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "ringcast");
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["channels"], json!(["project:p1"]));
}

#[tokio::test]
async fn forbidden_channels_get_403_at_the_handshake() {
    let server = Server::start();
    let u1 = token(json!({"sub": "u1", "projects": ["p1"], "channels": ["task:*"]}));
    for channel in [
        "project:p2",
        "user:u2",
        "system",
        "alerts",
        "audit",
        "dashboard",
        "agent:a1",
    ] {
        let (status, body) = refused(&server, &format!("channels={channel}&token={u1}")).await;
        assert_eq!(status, 403, "{channel}");
        assert!(body.contains(channel), "{body}");
    }
    assert_eq!(
        refused(&server, &format!("channels=bad%20name&token={u1}"))
            .await
            .0,
        400
    );
    // The allowed ones work, including a prefix pattern and the user's own channel.
    let (_ws, welcome) = connect(
        &server,
        &format!("channels=project:p1,user:u1,task:t9&token={u1}"),
    )
    .await;
    assert_eq!(
        welcome["channels"],
        json!(["project:p1", "user:u1", "task:t9"])
    );
    // Admins read admin channels and other users' channels.
    let (_ws, _) = connect(
        &server,
        &format!("channels=system,audit,user:u2&token={}", admin_token()),
    )
    .await;
}

#[tokio::test]
async fn forbidden_subscribe_message_gets_an_error_and_never_a_message() {
    let server = Server::start();
    let u1 = token(json!({"sub": "u1", "projects": ["p1"]}));
    let (mut ws, _) = connect(&server, &format!("channels=project:p1&token={u1}")).await;
    recv_json(&mut ws).await;
    for channel in ["project:p2", "user:u2", "system"] {
        send_json(
            &mut ws,
            &json!({"type": "subscribe", "channels": [channel]}),
        )
        .await;
        let err = recv_json(&mut ws).await;
        assert_eq!(err["type"], "error");
        assert_eq!(err["code"], "forbidden");
        assert_eq!(err["channel"], channel);
    }
    for channel in ["project:p2", "user:u2", "system"] {
        server.publish_one(channel, "secret", json!(null)).await;
    }
    server
        .publish_one("project:p1", "sentinel", json!(null))
        .await;
    assert_eq!(recv_json(&mut ws).await["event"], "sentinel");
}

#[tokio::test]
async fn another_users_channel_never_leaks() {
    let server = Server::start();
    let u1 = token(json!({"sub": "u1"}));
    let u2 = token(json!({"sub": "u2"}));
    let (mut ws1, _) = connect(&server, &format!("channels=user:u1&token={u1}")).await;
    let (mut ws2, _) = connect(&server, &format!("channels=user:u2&token={u2}")).await;
    recv_json(&mut ws1).await;
    recv_json(&mut ws2).await;
    server.publish_one("user:u2", "for-u2", json!(1)).await;
    server.publish_one("user:u1", "for-u1", json!(2)).await;
    assert_eq!(recv_json(&mut ws1).await["event"], "for-u1");
    assert_eq!(recv_json(&mut ws2).await["event"], "for-u2");
}

#[tokio::test]
async fn publishing_needs_the_api_key_and_a_valid_body() {
    let server = Server::start();
    let body = json!({"channel": "project:p1", "event": "e", "data": {}}).to_string();
    let (status, head, _) = server.http("POST", "/api/v1/publish", &[], &body).await;
    assert_eq!(status, 401);
    assert!(head
        .to_ascii_lowercase()
        .contains("www-authenticate: bearer"));
    let (status, _, _) = server
        .http(
            "POST",
            "/api/v1/publish",
            &[("Authorization", "Bearer wrong-key-wrong-key")],
            &body,
        )
        .await;
    assert_eq!(status, 401);

    for (bad, why) in [
        (json!({"event": "e"}), "channel"),
        (json!({"channel": "project:p1"}), "event"),
        (
            json!({"channel": "no spaces", "event": "e"}),
            "channel name",
        ),
        (
            json!({"channel": "c", "event": "e", "priority": "urgent"}),
            "priority",
        ),
        (json!([]), "empty"),
        (json!(42), "JSON object"),
    ] {
        let (status, reply) = server.publish(&bad).await;
        assert_eq!(status, 400, "{bad}");
        let message = reply["error"].as_str().unwrap();
        assert!(message.contains(why), "{bad}: {message}");
    }
    let (status, body) = server.publish_raw("{not json").await;
    assert_eq!(status, 400);
    assert!(body.contains("bad JSON body"), "{body}");
}

#[tokio::test]
async fn handshake_refusals_are_clean_http() {
    let server = Server::start();
    let t = admin_token();
    let base = |extra: &str| {
        format!(
            "GET /ws?token={t} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
        )
    };
    let (status, head, _) = raw_exchange(
        server.addr,
        base("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(status, 426);
    assert!(head.contains("Sec-WebSocket-Version: 13"), "{head}");
    let (status, _, body) = raw_exchange(
        server.addr,
        base("Sec-WebSocket-Version: 13\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("Sec-WebSocket-Key"), "{body}");
    let (status, _, _) = raw_exchange(
        server.addr,
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 404);
    let (status, _, _) = raw_exchange(server.addr, b"GARBAGE\r\n\r\n").await;
    assert_eq!(status, 400);
    // A plain GET on /ws (no upgrade) is refused, not hung.
    let (status, _, _) = raw_exchange(
        server.addr,
        format!("GET /ws?token={t} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status, 400);
    // HEAD answers headers only, so a keep-alive connection stays in step.
    let (status, head, body) = raw_exchange(
        server.addr,
        b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert!(head.contains("Content-Length: 3"), "{head}");
    assert_eq!(body, "");
    // The server is still fine.
    let (mut ws, _) = connect(&server, &format!("token={t}")).await;
    drop(ws.next());
}

#[tokio::test]
async fn origins_outside_the_allowlist_get_403_and_allowed_ones_get_cors() {
    let server = Server::start_with(&[(
        "RINGCAST_ALLOWED_ORIGINS",
        "https://app.example, https://ops.example/",
    )]);
    let t = admin_token();
    let upgrade = |origin: &str| {
        let origin_line = if origin.is_empty() {
            String::new()
        } else {
            format!("Origin: {origin}\r\n")
        };
        format!(
            "GET /ws?token={t} HTTP/1.1\r\nHost: x\r\n{origin_line}Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    let (status, _, body) =
        raw_exchange(server.addr, upgrade("https://evil.example").as_bytes()).await;
    assert_eq!(status, 403);
    assert!(body.contains("origin not allowed"));
    for ok in ["https://app.example", "https://ops.example", ""] {
        let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(upgrade(ok).as_bytes()).await.unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(WAIT, s.read_exact(&mut head))
            .await
            .expect("an answer within the wait bound")
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 101", "{ok}");
    }
    let (status, head, _) = raw_exchange(
        server.addr,
        b"OPTIONS /api/v1/publish HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 204);
    assert!(
        head.contains("Access-Control-Allow-Origin: https://app.example"),
        "{head}"
    );
    assert!(
        head.contains("Access-Control-Allow-Headers: Authorization, Content-Type"),
        "{head}"
    );
    let (status, head, _) = server
        .http("GET", "/healthz", &[("Origin", "https://ops.example")], "")
        .await;
    assert_eq!(status, 200);
    assert!(
        head.contains("Access-Control-Allow-Origin: https://ops.example"),
        "{head}"
    );
    let (status, _, _) = server
        .http("GET", "/healthz", &[("Origin", "https://evil.example")], "")
        .await;
    assert_eq!(status, 403);
}
