//! End to end: the admin API acts on every core at once.

mod support;

use serde_json::{json, Value};
use support::*;

async fn admin(server: &Server, method: &str, action: &str, body: Value) -> (u16, Value) {
    let auth = format!("Bearer {API_KEY}");
    let (status, _, text) = server
        .http(
            method,
            &format!("/api/v1/admin/{action}"),
            &[("Authorization", &auth)],
            &body.to_string(),
        )
        .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// `n` connections of one user, subscribed to `channels`, on whichever cores the kernel picks.
async fn connections(server: &Server, user: &str, channels: &str, n: usize) -> Vec<Ws> {
    let t = token(json!({"sub": user, "projects": ["p1", "p2"], "channels": ["dashboard"]}));
    let mut all = Vec::new();
    for _ in 0..n {
        let (mut ws, _) = connect(server, &format!("channels={channels}&token={t}")).await;
        for _ in channels.split(',') {
            assert_eq!(recv_json(&mut ws).await["type"], "subscribed");
        }
        all.push(ws);
    }
    all
}

/// Connections of `user` (at least `at_least`), added one by one until the admin list shows
/// them on both cores: the kernel's SO_REUSEPORT hash picks the core, so a fixed count can
/// land on one core by chance (8 do, 1 run in 128).
async fn on_both_cores(server: &Server, user: &str, channels: &str, at_least: usize) -> Vec<Ws> {
    const MOST: usize = 64; // all on one core that often: 1 in 2^63
    let mut all = connections(server, user, channels, at_least - 1).await;
    while all.len() < MOST {
        all.extend(connections(server, user, channels, 1).await);
        let (status, list) = admin(server, "GET", "connections", json!(null)).await;
        assert_eq!(status, 200, "{list}");
        if cores_of(&list, user).len() == 2 {
            return all;
        }
    }
    panic!("{MOST} connections of {user} all landed on one core: is RINGCAST_WORKERS 2?");
}

fn cores_of(list: &Value, user: &str) -> std::collections::BTreeSet<u64> {
    list["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["user_id"] == user)
        .map(|c| c["core"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn disconnect_closes_every_connection_of_the_user_on_every_core() {
    let server = Server::start();
    let mut u1 = on_both_cores(&server, "u1", "project:p1", 2).await;
    let mut u2 = connections(&server, "u2", "project:p1", 1).await;
    let (status, list) = admin(&server, "GET", "connections", json!(null)).await;
    assert_eq!(status, 200);
    assert_eq!(list["count"], u1.len() + 1);

    let (status, answer) = admin(
        &server,
        "POST",
        "disconnect",
        json!({"user_id": "u1", "reason": "account suspended"}),
    )
    .await;
    // (In cluster mode the answer also says what each node did.)
    assert_eq!(
        (status, &answer["user_id"], &answer["disconnected"]),
        (200, &json!("u1"), &json!(u1.len())),
        "{answer}"
    );
    for ws in &mut u1 {
        assert_eq!(recv_close(ws).await, 4003);
    }
    server
        .publish_one("project:p1", "still-here", json!(1))
        .await;
    assert_eq!(recv_json(&mut u2[0]).await["event"], "still-here");
}

#[tokio::test]
async fn revoke_stops_live_and_replayed_delivery_on_every_core_until_a_grant() {
    let server = Server::start();
    let mut u1 = on_both_cores(&server, "u1", "project:p1,dashboard", 2).await;
    let mut witness = connections(&server, "u2", "project:p1", 1).await;
    server.publish_one("project:p1", "before", json!(1)).await;
    for ws in &mut u1 {
        assert_eq!(recv_json(ws).await["event"], "before");
    }
    assert_eq!(recv_json(&mut witness[0]).await["event"], "before");

    let (status, answer) = admin(
        &server,
        "POST",
        "revoke",
        json!({"user_id": "u1", "project_id": "p1"}),
    )
    .await;
    assert_eq!(
        (status, &answer["user_id"], &answer["unsubscribed"]),
        (200, &json!("u1"), &json!(u1.len())),
        "{answer}"
    );
    for ws in &mut u1 {
        let v = recv_json(ws).await;
        assert_eq!(
            v,
            json!({"type": "unsubscribed", "channel": "project:p1", "reason": "revoked"})
        );
    }
    // Nothing of p1 reaches u1 any more, on its channel or carried by another one.
    server.publish_one("project:p1", "after", json!(2)).await;
    let (s, _) = server
        .publish(
            &json!({"channel": "dashboard", "event": "p1-news", "data": 3, "project_id": "p1"}),
        )
        .await;
    assert_eq!(s, 200);
    server.publish_one("dashboard", "sentinel", json!(4)).await;
    for ws in &mut u1 {
        assert_eq!(recv_json(ws).await["event"], "sentinel");
    }
    assert_eq!(recv_json(&mut witness[0]).await["event"], "after");
    // A resume cannot bring it back.
    let (_, welcome) = connect(&server, &format!("token={}", admin_token())).await;
    let epoch = welcome["epoch"].as_str().unwrap();
    let ws = &mut u1[0];
    send_json(ws, &json!({"type":"subscribe","channels":["project:p1"],"since":{"project:p1":0},"epoch":epoch})).await;
    let err = recv_json(ws).await;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    // New connections of u1 are refused it too.
    let t = token(json!({"sub": "u1", "projects": ["p1"]}));
    let (status, body) =
        refused_handshake(server.url(&format!("/ws?channels=project:p1&token={t}"))).await;
    assert_eq!(
        (status, body.as_str()),
        (403, r#"{"error":"not allowed to subscribe to project:p1"}"#),
        "a fresh connection of u1 must not get project:p1"
    );

    // Grant: the next subscribe works without reconnecting.
    let (status, _) = admin(
        &server,
        "POST",
        "grant",
        json!({"user_id": "u1", "project_id": "p1"}),
    )
    .await;
    assert_eq!(status, 200);
    send_json(ws, &json!({"type":"subscribe","channels":["project:p1"]})).await;
    assert_eq!(recv_json(ws).await["type"], "subscribed");
    server.publish_one("project:p1", "back", json!(5)).await;
    assert_eq!(recv_json(ws).await["event"], "back");
}

#[tokio::test]
async fn the_admin_api_needs_the_key_and_a_target() {
    let server = Server::start();
    let (status, _, _) = server
        .http(
            "POST",
            "/api/v1/admin/disconnect",
            &[],
            r#"{"user_id":"u"}"#,
        )
        .await;
    assert_eq!(status, 401);
    let (status, body) = admin(&server, "POST", "revoke", json!({"user_id": "u"})).await;
    assert_eq!(status, 400);
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("channels or project_id"));
    let (status, _) = admin(&server, "POST", "revoke", json!({"user": "u"})).await;
    assert_eq!(status, 400);
    for blank in ["", "  "] {
        let (status, body) = admin(&server, "POST", "disconnect", json!({"user_id": blank})).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "user_id must not be empty or blank");
    }
    let (status, _) = admin(&server, "GET", "revoke", json!(null)).await;
    assert_eq!(status, 405);
}
