//! End to end: presence on the channels marked for it, on one node and across nodes on a real
//! `redis-server`: join/leave events, the member list (client message and HTTP), permissions.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use support::redis::{node_at, Redis};
use support::*;

const PRESENCE: (&str, &str) = ("RINGCAST_PRESENCE_CHANNELS", "task:*");

fn single() -> Server {
    Server::start_with(&[PRESENCE])
}

fn clustered(redis: &Redis) -> Server {
    node_at(&redis.url(), &[PRESENCE])
}

fn viewer(user: &str) -> String {
    token(json!({"sub": user, "channels": ["task:*"]}))
}

/// A client of `user` subscribed to `channel`.
async fn join(server: &Server, user: &str, channel: &str) -> Ws {
    let (mut ws, _) = connect(
        server,
        &format!("channels={channel}&token={}", viewer(user)),
    )
    .await;
    assert_eq!(recv_json(&mut ws).await["type"], "subscribed");
    ws
}

/// Who a client believes is on `channel`, from the `presence` events it got so far, kept up to
/// date while `until` reads.
struct Seen {
    users: BTreeSet<String>,
    events: usize,
}

impl Seen {
    fn new() -> Seen {
        Seen {
            users: BTreeSet::new(),
            events: 0,
        }
    }

    /// Reads presence events until the users seen are `want`.
    async fn until(&mut self, ws: &mut Ws, want: &[&str]) {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        while self.users != want {
            let v = recv_json(ws).await;
            assert_eq!(v["event"], "presence", "only presence events here: {v}");
            self.apply(&v);
        }
    }

    fn apply(&mut self, v: &Value) {
        self.events += 1;
        for u in v["data"]["joined"].as_array().unwrap() {
            self.users.insert(u.as_str().unwrap().to_owned());
        }
        for u in v["data"]["left"].as_array().unwrap() {
            self.users.remove(u.as_str().unwrap());
        }
    }
}

async fn members_over_http(server: &Server, channel: &str, bearer: &str) -> (u16, Value) {
    let auth = format!("Bearer {bearer}");
    let (status, _, body) = server
        .http(
            "GET",
            &format!("/api/v1/presence?channel={channel}"),
            &[("Authorization", &auth)],
            "",
        )
        .await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn members_asked(ws: &mut Ws, channel: &str) -> Value {
    send_json(ws, &json!({"type": "presence", "channel": channel})).await;
    let (answer, _) = recv_until_type(ws, "presence").await;
    answer
}

/// Two viewers on `a` and `b` (the same node or two) see each other come and go; the list
/// matches; a client that may not read the channel learns nothing.
async fn two_viewers_see_each_other(a: &Server, b: &Server) {
    let mut alice = join(a, "alice", "task:t1").await;
    let mut seen_by_alice = Seen::new();
    seen_by_alice.until(&mut alice, &["alice"]).await;
    let mut bob = join(b, "bob", "task:t1").await;
    seen_by_alice.until(&mut alice, &["alice", "bob"]).await;
    // A newcomer gets the events from its own join on; who was there before, it asks.
    Seen::new().until(&mut bob, &["bob"]).await;

    for server in [a, b] {
        let (status, list) = members_over_http(server, "task:t1", API_KEY).await;
        assert_eq!(status, 200, "{list}");
        assert_eq!(list["members"], json!(["alice", "bob"]));
    }
    let answer = members_asked(&mut bob, "task:t1").await;
    assert_eq!(
        answer,
        json!({"type": "presence", "channel": "task:t1", "members": ["alice", "bob"]})
    );

    // Without access: no subscription, no list, no events.
    let outsider = token(json!({"sub": "mallory", "projects": ["p1"]}));
    let (mut m, _) = connect(b, &format!("token={outsider}")).await;
    let v = members_asked_raw(&mut m, "task:t1").await;
    assert_eq!(
        (&v["type"], &v["code"]),
        (&json!("error"), &json!("forbidden")),
        "{v}"
    );
    let (status, _) = members_over_http(b, "task:t1", &outsider).await;
    assert_eq!(status, 403);
    let (status, _) = members_over_http(b, "task:t1", "not-a-token").await;
    assert_eq!(status, 401);

    // Bob leaves: alice sees it, the list follows.
    bob.close(None).await.unwrap();
    seen_by_alice.until(&mut alice, &["alice"]).await;
    let (_, list) = members_over_http(a, "task:t1", API_KEY).await;
    assert_eq!(list["members"], json!(["alice"]));
}

async fn members_asked_raw(ws: &mut Ws, channel: &str) -> Value {
    send_json(ws, &json!({"type": "presence", "channel": channel})).await;
    recv_json(ws).await
}

#[tokio::test]
async fn on_one_node_viewers_see_each_other_join_and_leave() {
    let server = single();
    two_viewers_see_each_other(&server, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_two_nodes_viewers_see_each_other_join_and_leave() {
    let redis = Redis::start();
    let (a, b) = (clustered(&redis), clustered(&redis));
    two_viewers_see_each_other(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_on_two_nodes_leaves_only_when_the_last_connection_goes() {
    let redis = Redis::start();
    let (a, b) = (clustered(&redis), clustered(&redis));
    let mut watcher = join(&a, "wendy", "task:t2").await;
    let mut seen = Seen::new();
    seen.until(&mut watcher, &["wendy"]).await;
    let mut on_a = join(&a, "zoe", "task:t2").await;
    seen.until(&mut watcher, &["wendy", "zoe"]).await;
    let mut on_b = join(&b, "zoe", "task:t2").await;
    on_a.close(None).await.unwrap();
    // Zoe is still on b. Nothing can be awaited for an event that must not come: two flushes
    // (a second each) pass, then a marker, and no event naming zoe may come before it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    a.publish_one("task:t2", "marker", json!(1)).await;
    loop {
        let v = recv_json(&mut watcher).await;
        if v["event"] == "marker" {
            break;
        }
        assert!(!v.to_string().contains("zoe"), "zoe is still on b: {v}");
        seen.apply(&v);
    }
    on_b.close(None).await.unwrap();
    seen.until(&mut watcher, &["wendy"]).await;
}

#[tokio::test]
async fn a_reconnect_storm_is_not_a_join_leave_storm() {
    let server = single();
    let mut watcher = join(&server, "wendy", "task:t3").await;
    let mut seen = Seen::new();
    let mut viewer = join(&server, "victor", "task:t3").await;
    seen.until(&mut watcher, &["victor", "wendy"]).await;
    let before = seen.events;
    for _ in 0..20 {
        viewer.close(None).await.unwrap();
        viewer = join(&server, "victor", "task:t3").await;
    }
    // Two flushes later a marker: nothing came before it (an event that must not come
    // cannot be awaited).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    server.publish_one("task:t3", "marker", json!(1)).await;
    let v = recv_json(&mut watcher).await;
    assert_eq!(
        v["event"], "marker",
        "20 reconnects made presence events: {v}"
    );
    assert_eq!(seen.events, before);
}

#[tokio::test]
async fn a_channel_without_presence_says_so() {
    let server = single();
    let t = token(json!({"sub": "u", "channels": ["dashboard"]}));
    let (mut ws, _) = connect(&server, &format!("channels=dashboard&token={t}")).await;
    assert_eq!(recv_json(&mut ws).await["type"], "subscribed");
    let v = members_asked_raw(&mut ws, "dashboard").await;
    assert_eq!(
        (&v["type"], &v["code"]),
        (&json!("error"), &json!("bad_channel")),
        "{v}"
    );
    let (status, _) = members_over_http(&server, "dashboard", API_KEY).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_of_a_killed_node_leave_once_its_entries_run_out() {
    let redis = Redis::start();
    let fast = [PRESENCE, ("RINGCAST_REGISTRY_REFRESH_MS", "300")];
    let a = node_at(&redis.url(), &fast);
    let b = node_at(&redis.url(), &fast);
    let mut watcher = join(&a, "wendy", "task:t4").await;
    let mut seen = Seen::new();
    let _bob = join(&b, "bob", "task:t4").await;
    seen.until(&mut watcher, &["bob", "wendy"]).await;
    drop(b); // SIGKILL: b says nothing
             // Its entry lives 3 refreshes + the timeout (1.4 s); a's next refresh after that tells it.
    seen.until(&mut watcher, &["wendy"]).await;
    let (_, list) = members_over_http(&a, "task:t4", API_KEY).await;
    assert_eq!(list["members"], json!(["wendy"]));
}
