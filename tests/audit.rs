//! End to end: the audit trail, live on /ws/audit for admins and as JSON lines in a file.

mod support;

use serde_json::{json, Value};
use support::*;

async fn next_audit(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let v = recv_json(ws).await;
        if v["event"] == format!("audit:{kind}") {
            return v["data"].clone();
        }
    }
}

#[tokio::test]
async fn admins_watch_security_events_live_and_the_log_file_has_them_without_tokens() {
    let dir = std::env::temp_dir().join(format!("ringcast-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&log);
    let server = Server::start_with(&[
        ("RINGCAST_AUDIT_LOG", log.to_str().unwrap()),
        ("RINGCAST_MAX_CONNECTIONS_PER_USER", "1"),
    ]);
    let (mut audit, _) = connect_path(&server, &format!("/ws/audit?token={}", admin_token())).await;
    assert_eq!(recv_json(&mut audit).await["type"], "subscribed");

    // A non-admin is refused the stream.
    let user = token(json!({"sub": "u1", "projects": ["p1"]}));
    let (status, body) = refused_handshake(server.url(&format!("/ws/audit?token={user}"))).await;
    assert_eq!(
        (status, body.as_str()),
        (403, r#"{"error":"the audit stream is for admins"}"#)
    );
    let denied = next_audit(&mut audit, "subscribe_denied").await;
    assert_eq!(
        (denied["user_id"].as_str(), denied["channel"].as_str()),
        (Some("u1"), Some("audit"))
    );

    // connect, auth failure, a denied channel, a limit, a permission change, a disconnect.
    let (mut ws, welcome) = connect(&server, &format!("channels=project:p1&token={user}")).await;
    let connected = next_audit(&mut audit, "connect").await;
    assert_eq!(connected["user_id"], "u1");
    assert_eq!(connected["connection_id"], welcome["connection_id"]);
    assert_eq!(connected["ip"], "127.0.0.1");

    let bad = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
    let (status, body) = refused_handshake(server.url(&format!("/ws?token={bad}"))).await;
    assert_eq!(
        (status, body.as_str()),
        (401, r#"{"error":"token signature is invalid"}"#)
    );
    let failure = next_audit(&mut audit, "auth_failure").await;
    assert!(
        failure["reason"].as_str().unwrap().contains("signature"),
        "{failure}"
    );

    recv_json(&mut ws).await; // subscribed
    send_json(
        &mut ws,
        &json!({"type": "subscribe", "channels": ["project:p2"]}),
    )
    .await;
    let denied = next_audit(&mut audit, "subscribe_denied").await;
    assert_eq!(denied["channel"], "project:p2");

    let (status, body) = refused_handshake(server.url(&format!("/ws?token={user}"))).await;
    assert_eq!(
        (status, body.as_str()),
        (429, r#"{"error":"user u1 already has 1 connections"}"#),
        "u1 may hold one connection"
    );
    let limit = next_audit(&mut audit, "limit_hit").await;
    assert!(
        limit["reason"].as_str().unwrap().contains("already has 1"),
        "{limit}"
    );

    let auth = format!("Bearer {API_KEY}");
    let (status, _, _) = server
        .http(
            "POST",
            "/api/v1/admin/disconnect",
            &[("Authorization", &auth)],
            r#"{"user_id":"u1","reason":"audit test"}"#,
        )
        .await;
    assert_eq!(status, 200);
    let change = next_audit(&mut audit, "permission_change").await;
    assert_eq!(
        (change["action"].as_str(), change["affected"].as_u64()),
        (Some("disconnect"), Some(1))
    );
    let gone = next_audit(&mut audit, "disconnect").await;
    assert_eq!(
        (gone["code"].as_u64(), gone["reason"].as_str()),
        (Some(4003), Some("audit test"))
    );

    // The file holds the same events, as JSON lines, and never a token.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let kinds: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        if [
            "connect",
            "auth_failure",
            "subscribe_denied",
            "limit_hit",
            "permission_change",
            "disconnect",
        ]
        .iter()
        .all(|k| kinds.iter().any(|x| x == k))
        {
            assert!(!text.contains(&user) && !text.contains(bad) && !text.contains(API_KEY));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "log holds {kinds:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn connect_path(server: &Server, path_and_query: &str) -> (Ws, Value) {
    let (mut ws, _) = ws_connect(server.url(path_and_query)).await.unwrap();
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome");
    (ws, welcome)
}
