//! End to end, the cluster's control plane: several ringcast nodes on one real `redis-server`
//! (started by each test), real WebSocket clients, the registry read with `redis-cli`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::redis::{node_at, Redis, RedisCluster};
use support::*;

fn node(redis: &Redis, extra: &[(&str, &str)]) -> Server {
    node_at(&redis.url(), extra)
}

fn nodes(redis: &Redis, n: usize, extra: &[(&str, &str)]) -> Vec<Server> {
    (0..n).map(|_| node(redis, extra)).collect()
}

/// `redis-cli` against the test's Redis; its output lines.
fn redis_cli(redis: &Redis, args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "--no-raw"])
        .args(args)
        .output()
        .expect("redis-cli (Debian package redis-tools) on the PATH");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            // `--no-raw` prints `1) "value"`: keep the value.
            let l = l.trim();
            let l = l.split_once(") ").map_or(l, |(_, v)| v);
            l.trim_matches('"').to_owned()
        })
        .filter(|l| !l.is_empty() && l != "(empty array)")
        .collect()
}

fn registry_keys(redis: &Redis) -> BTreeSet<String> {
    redis_cli(redis, &["KEYS", "ws:connections:*"])
        .into_iter()
        .collect()
}

fn registry_entry(redis: &Redis, id: &str) -> BTreeMap<String, String> {
    let lines = redis_cli(redis, &["HGETALL", &format!("ws:connections:{id}")]);
    lines
        .chunks(2)
        .map(|kv| (kv[0].clone(), kv.get(1).cloned().unwrap_or_default()))
        .collect()
}

/// Waits until `check` holds (it is asked again every 50 ms), failing after `within`.
async fn until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn admin(server: &Server, method: &str, path: &str, body: Value) -> (u16, Value) {
    let auth = format!("Bearer {API_KEY}");
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (status, _, text) = server
        .http(
            method,
            &format!("/api/v1/admin/{path}"),
            &[("Authorization", &auth)],
            &body,
        )
        .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn metric(server: &Server, name: &str) -> Option<u64> {
    let (_, _, text) = server.http("GET", "/metrics", &[], "").await;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
}

fn user_token(user: &str) -> String {
    token(json!({"sub": user, "projects": ["p1"]}))
}

/// A connection of `user` subscribed to `project:p1` on `server`: the socket and its id.
async fn open(server: &Server, user: &str) -> (Ws, String) {
    let (mut ws, welcome) = connect(
        server,
        &format!("channels=project:p1&token={}", user_token(user)),
    )
    .await;
    assert_eq!(recv_json(&mut ws).await["type"], "subscribed");
    let id = welcome["connection_id"].as_str().unwrap().to_owned();
    (ws, id)
}

async fn refused(server: &Server, user: &str) -> (u16, String) {
    let url = server.url(&format!(
        "/ws?channels=project:p1&token={}",
        user_token(user)
    ));
    refused_handshake(url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_sixth_connection_is_refused_on_every_node_of_three() {
    let redis = Redis::start();
    let limit = [("RINGCAST_MAX_CONNECTIONS_PER_USER", "5")];
    let cluster = nodes(&redis, 3, &limit);
    let mut held = Vec::new();
    for i in 0..5 {
        held.push(open(&cluster[i % 3], "alice").await);
    }
    for n in &cluster {
        let (status, body) = refused(n, "alice").await;
        assert_eq!(status, 429, "{body}");
        assert!(
            body.contains("user alice already has 5 connections"),
            "{body}"
        );
    }
    // Another user is not affected; and once alice closes one, she may open one anywhere.
    open(&cluster[2], "bob").await;
    let (mut ws, _) = held.remove(0);
    ws.close(None).await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let url = cluster[1].url(&format!(
            "/ws?channels=project:p1&token={}",
            user_token("alice")
        ));
        match ws_connect(url).await {
            Ok(_) => break,
            Err(_) => assert!(
                Instant::now() < deadline,
                "the released slot never came back"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_oldest_closes_the_users_oldest_connection_on_another_node() {
    let redis = Redis::start();
    let env = [
        ("RINGCAST_MAX_CONNECTIONS_PER_USER", "3"),
        ("RINGCAST_USER_LIMIT_POLICY", "close-oldest"),
    ];
    let (a, b) = (node(&redis, &env), node(&redis, &env));
    let (mut oldest, _) = open(&a, "carol").await;
    let (mut second, _) = open(&b, "carol").await;
    let (mut third, _) = open(&a, "carol").await;
    let (mut newest, _) = open(&b, "carol").await;
    assert_eq!(recv_close(&mut oldest).await, 4008);
    // The others stay: a message still reaches all three.
    b.publish_one("project:p1", "still", json!(1)).await;
    for ws in [&mut second, &mut third, &mut newest] {
        assert_eq!(recv_json(ws).await["event"], "still");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_holds_each_live_connection_refreshes_it_and_a_killed_nodes_entries_expire() {
    let redis = Redis::start();
    let env = [("RINGCAST_REGISTRY_TTL_SECS", "3")];
    let n = node(&redis, &env);
    let (mut a, id_a) = open(&n, "dave").await;
    let (_b, id_b) = open(&n, "erin").await;
    let ids: BTreeSet<String> = [&id_a, &id_b]
        .iter()
        .map(|id| format!("ws:connections:{id}"))
        .collect();
    until("both connections registered", WAIT, || {
        registry_keys(&redis) == ids
    })
    .await;
    let entry = registry_entry(&redis, &id_a);
    assert_eq!(entry["user_id"], "dave", "{entry:?}");
    assert_eq!(entry["ip"], "127.0.0.1");
    assert_eq!(entry["project_ids"], "p1");
    assert_eq!(entry["transport"], "websocket");
    assert!(
        id_a.starts_with(&format!("{}.", entry["instance_id"])),
        "{entry:?}"
    );
    let connected: u64 = entry["connected_at"].parse().unwrap();
    let heartbeat: u64 = entry["last_heartbeat"].parse().unwrap();
    let now_ms = now_secs() * 1000;
    assert!(
        connected <= heartbeat && now_ms.abs_diff(connected) < 60_000,
        "{entry:?}"
    );
    let ttl: i64 = redis_cli(&redis, &["TTL", &format!("ws:connections:{id_a}")])[0]
        .parse()
        .unwrap();
    assert!((1..=3).contains(&ttl), "TTL {ttl}");

    // Longer than the TTL: the node's refreshes keep both.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(registry_keys(&redis), ids);

    // Closing removes the entry at once (not by expiry).
    a.close(None).await.unwrap();
    let only_b: BTreeSet<String> = [format!("ws:connections:{id_b}")].into();
    until(
        "the closed connection's entry removed",
        Duration::from_secs(2),
        || registry_keys(&redis) == only_b,
    )
    .await;

    // A killed node cannot remove its entries: they expire.
    drop(n); // SIGKILL
    assert_eq!(
        registry_keys(&redis),
        only_b,
        "still there right after the kill"
    );
    until(
        "the killed node's entries expired",
        Duration::from_secs(5),
        || registry_keys(&redis).is_empty(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_again_with_its_instance_id_clears_what_its_last_run_left() {
    let redis = Redis::start();
    let env = [
        ("RINGCAST_INSTANCE_ID", "node-a"),
        ("RINGCAST_MAX_CONNECTIONS_PER_USER", "1"),
    ];
    let n = node(&redis, &env);
    let (_ws, id) = open(&n, "frank").await;
    assert!(id.starts_with("node-a."), "{id}");
    until("registered", WAIT, || !registry_keys(&redis).is_empty()).await;
    drop(n); // SIGKILL: nothing removed
    assert_eq!(registry_keys(&redis).len(), 1);
    let other = node(&redis, &[("RINGCAST_MAX_CONNECTIONS_PER_USER", "1")]);
    // While node-a's lease runs, its connection still counts for frank.
    assert_eq!(refused(&other, "frank").await.0, 429);
    let n = node(&redis, &env);
    assert!(
        registry_keys(&redis).is_empty(),
        "cleared when node-a started"
    );
    open(&n, "frank").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_sent_to_one_node_act_on_every_node_and_revocations_survive_restarts() {
    let redis = Redis::start();
    let instance = |i: usize| format!("node-{i}");
    let start = |i: usize| {
        let id = instance(i);
        node(&redis, &[("RINGCAST_INSTANCE_ID", id.as_str())])
    };
    let mut cluster: Vec<Server> = (0..3).map(start).collect();
    // Disconnect: gina on nodes 1 and 2, asked of node 0.
    let (mut g1, _) = open(&cluster[1], "gina").await;
    let (mut g2, _) = open(&cluster[2], "gina").await;
    let (mut witness, _) = open(&cluster[2], "hank").await;
    let (status, answer) = admin(
        &cluster[0],
        "POST",
        "disconnect",
        json!({"user_id": "gina", "reason": "suspended"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["disconnected"], 2, "{answer}");
    let per_node: BTreeMap<String, u64> = answer["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let id = n["instance_id"].as_str().unwrap().to_owned();
            (id, n["disconnected"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        per_node,
        [(instance(0), 0), (instance(1), 1), (instance(2), 1)].into()
    );
    assert_eq!(recv_close(&mut g1).await, 4003);
    assert_eq!(recv_close(&mut g2).await, 4003);

    // The list: every node's connections, paged, filtered.
    let (_i1, _) = open(&cluster[0], "ivy").await;
    let (_i2, _) = open(&cluster[1], "ivy").await;
    let (status, list) = admin(
        &cluster[1],
        "GET",
        "connections?user_id=ivy&limit=1",
        Value::Null,
    )
    .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["count"], 1, "{list}");
    let next = list["next"].as_str().unwrap().to_owned();
    let (_, rest) = admin(
        &cluster[1],
        "GET",
        &format!("connections?user_id=ivy&limit=10&after={next}"),
        Value::Null,
    )
    .await;
    assert_eq!(rest["count"], 1, "{rest}");
    assert!(rest["next"].is_null(), "{rest}");
    let nodes_of_ivy: BTreeSet<&str> = [&list, &rest]
        .iter()
        .map(|l| l["connections"][0]["instance_id"].as_str().unwrap())
        .collect();
    assert_eq!(nodes_of_ivy.len(), 2, "{list} {rest}");

    // Revoke, asked of node 0: jill's subscriptions on nodes 1 and 2 end at once.
    let (mut j1, _) = open(&cluster[1], "jill").await;
    let (mut j2, _) = open(&cluster[2], "jill").await;
    let seq = cluster[0]
        .publish_one("project:p1", "before", json!(1))
        .await;
    for ws in [&mut j1, &mut j2, &mut witness] {
        assert_eq!(recv_json(ws).await["event"], "before");
    }
    let (status, answer) = admin(
        &cluster[0],
        "POST",
        "revoke",
        json!({"user_id": "jill", "project_id": "p1"}),
    )
    .await;
    assert_eq!(
        (status, &answer["unsubscribed"]),
        (200, &json!(2)),
        "{answer}"
    );
    for ws in [&mut j1, &mut j2] {
        let v = recv_json(ws).await;
        assert_eq!(v["type"], "unsubscribed", "{v}");
        assert_eq!(v["reason"], "revoked", "{v}");
    }
    cluster[0]
        .publish_one("project:p1", "after", json!(2))
        .await;
    assert_eq!(recv_json(&mut witness).await["event"], "after");

    // Every node restarts; the revocation holds: no live event, no replay.
    drop((j1, j2, witness));
    let (_, welcome) = connect(&cluster[0], &format!("token={}", admin_token())).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    cluster.clear(); // SIGKILL, all three
    cluster = (0..3).map(start).collect();
    for n in &cluster {
        let (mut ws, _) = connect(n, &format!("token={}", user_token("jill"))).await;
        send_json(
            &mut ws,
            &json!({"type": "subscribe", "channels": ["project:p1"],
                    "since": {"project:p1": seq - 1}, "epoch": epoch}),
        )
        .await;
        let v = recv_json(&mut ws).await;
        assert_eq!(
            (&v["type"], &v["code"]),
            (&json!("error"), &json!("forbidden")),
            "{v}"
        );
        let (status, _) = refused(n, "jill").await;
        assert_eq!(status, 403);
    }
    // A grant on any node lifts it everywhere.
    let (status, answer) = admin(
        &cluster[2],
        "POST",
        "grant",
        json!({"user_id": "jill", "project_id": "p1"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    open(&cluster[0], "jill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_the_limits_fall_back_to_each_node_and_come_back_after() {
    let redis = Redis::start();
    let env = [
        ("RINGCAST_MAX_CONNECTIONS_PER_USER", "2"),
        ("RINGCAST_REGISTRY_REFRESH_MS", "300"),
    ];
    let (a, b) = (node(&redis, &env), node(&redis, &env));
    let _k1 = open(&a, "kim").await;
    let _k2 = open(&a, "kim").await;
    assert_eq!(refused(&b, "kim").await.0, 429, "cluster-wide: kim has 2");
    assert_eq!(metric(&b, "ringcast_limits_node_local").await, Some(0));

    redis.signal(libc::SIGSTOP);
    // The health check (every second, bounded by the timeout) says so.
    let deadline = Instant::now() + WAIT;
    while metric(&b, "ringcast_limits_node_local").await != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the limits never fell back to the node's own"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Node b counts alone now: kim has none there.
    let _k3 = open(&b, "kim").await;
    let _k4 = open(&b, "kim").await;
    assert_eq!(
        refused(&b, "kim").await.0,
        429,
        "node-local: kim has 2 on b"
    );

    redis.signal(libc::SIGCONT);
    let deadline = Instant::now() + WAIT;
    while metric(&b, "ringcast_limits_node_local").await != Some(0) {
        assert!(
            Instant::now() < deadline,
            "the limits never became the cluster's again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The cluster's counts now include what b admitted meanwhile: 4 of kim's.
    let deadline = Instant::now() + WAIT;
    loop {
        let held = redis_cli(&redis, &["ZCARD", "ringcast:{c}:u:kim"]);
        if held.first().map(String::as_str) == Some("4") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b's connections never counted: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(refused(&a, "kim").await.0, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_project_limit_the_per_ip_rate_and_the_cluster_cap_hold_across_nodes() {
    // Per project: 2 in the cluster.
    let redis = Redis::start();
    let env = [("RINGCAST_MAX_CONNECTIONS_PER_PROJECT", "2")];
    let (a, b) = (node(&redis, &env), node(&redis, &env));
    let _p1 = open(&a, "u1").await;
    let _p2 = open(&b, "u2").await;
    let (status, body) = refused(&a, "u3").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("project p1 has its maximum of 2 connections"),
        "{body}"
    );
    drop((a, b));

    // Per IP: 3 attempts a minute from 127.0.0.1 (loopback counted), whichever node.
    let redis = Redis::start();
    let env = [
        ("RINGCAST_CONNECTIONS_PER_IP_PER_MINUTE", "3"),
        ("RINGCAST_LIMIT_LOOPBACK", "true"),
    ];
    let (a, b) = (node(&redis, &env), node(&redis, &env));
    let _i1 = open(&a, "v1").await;
    let _i2 = open(&b, "v2").await;
    let _i3 = open(&a, "v3").await;
    for n in [&a, &b] {
        let url = n.url(&format!("/ws?token={}", user_token("v4")));
        let resp = match ws_connect(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp,
            other => panic!("a fourth attempt within the minute was not refused: {other:?}"),
        };
        assert_eq!(resp.status().as_u16(), 429);
        let retry: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "Retry-After {retry}");
    }
    drop((a, b));

    // The cluster cap: 3 in all.
    let redis = Redis::start();
    let env = [("RINGCAST_CLUSTER_MAX_CONNECTIONS", "3")];
    let (a, b) = (node(&redis, &env), node(&redis, &env));
    let _c1 = open(&a, "w1").await;
    let _c2 = open(&b, "w2").await;
    let (mut c3, _) = open(&b, "w3").await;
    let (status, body) = refused(&a, "w4").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("the cluster holds its maximum of 3 connections"),
        "{body}"
    );
    c3.close(None).await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let url = a.url(&format!("/ws?token={}", user_token("w4")));
        if ws_connect(url).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the cap never made room again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_the_limits_the_admin_api_and_presence_reach_across_nodes() {
    let redis = RedisCluster::start(3);
    let url = redis.url();
    let env = [
        ("RINGCAST_MAX_CONNECTIONS_PER_USER", "2"),
        ("RINGCAST_PRESENCE_CHANNELS", "task:*"),
    ];
    let (a, b) = (node_at(&url, &env), node_at(&url, &env));
    let (mut n1, _) = open(&a, "nina").await;
    let (mut n2, _) = open(&b, "nina").await;
    assert_eq!(refused(&a, "nina").await.0, 429);

    let viewer = |user: &str| token(json!({"sub": user, "channels": ["task:*"]}));
    let (mut on_a, _) = connect(&a, &format!("channels=task:rc&token={}", viewer("olga"))).await;
    assert_eq!(recv_json(&mut on_a).await["type"], "subscribed");
    let (mut on_b, _) = connect(&b, &format!("channels=task:rc&token={}", viewer("otto"))).await;
    assert_eq!(recv_json(&mut on_b).await["type"], "subscribed");
    let mut present = BTreeSet::new();
    while present != BTreeSet::from(["olga".to_owned(), "otto".to_owned()]) {
        let v = recv_json(&mut on_a).await;
        assert_eq!(v["event"], "presence", "{v}");
        for u in v["data"]["joined"].as_array().unwrap() {
            present.insert(u.as_str().unwrap().to_owned());
        }
    }

    let (status, answer) = admin(&b, "POST", "disconnect", json!({"user_id": "nina"})).await;
    assert_eq!(
        (status, &answer["disconnected"]),
        (200, &json!(2)),
        "{answer}"
    );
    assert_eq!(recv_close(&mut n1).await, 4003);
    assert_eq!(recv_close(&mut n2).await, 4003);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_told_to_close_for_a_newer_one_stops_counting_for_its_user_only() {
    let redis = Redis::start();
    let env = [
        ("RINGCAST_MAX_CONNECTIONS_PER_USER", "2"),
        ("RINGCAST_USER_LIMIT_POLICY", "close-oldest"),
    ];
    let (a, b) = (node(&redis, &env), node(&redis, &env));
    let (mut first, _) = open(&a, "pat").await;
    let (_second, _) = open(&b, "pat").await;
    let (_third, _) = open(&b, "pat").await;
    assert_eq!(recv_close(&mut first).await, 4008);
    // Once the first is gone, Redis counts exactly the two left, and a fourth displaces the
    // second (the oldest), not a ghost.
    until("the displaced connection released", WAIT, || {
        redis_cli(&redis, &["ZCARD", "ringcast:{c}:u:pat"]) == ["2"]
    })
    .await;
    let (mut second, _) = (_second, ());
    let (_fourth, _) = open(&a, "pat").await;
    assert_eq!(recv_close(&mut second).await, 4008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_registry_hashes_go_at_the_first_handshake_after_its_lease() {
    let redis = Redis::start();
    let fast = [("RINGCAST_REGISTRY_REFRESH_MS", "300")];
    let dead = node(&redis, &fast);
    let (_ws, id) = open(&dead, "quinn").await;
    until("registered", WAIT, || !registry_keys(&redis).is_empty()).await;
    drop(dead); // SIGKILL
    let other = node(&redis, &fast);
    // Its lease (3 refreshes + the timeout: 1.4 s) runs out; the next handshake anywhere
    // forgets it, and its registry hashes with it (long before their 24 h TTL).
    let deadline = Instant::now() + WAIT;
    loop {
        let (mut ws, own) = open(&other, "rita").await;
        let keys = registry_keys(&redis);
        if !keys.contains(&format!("ws:connections:{id}")) {
            assert_eq!(keys, BTreeSet::from([format!("ws:connections:{own}")]));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead node's entry stayed: {keys:?}"
        );
        ws.close(None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_outlive_a_redis_that_lost_its_data() {
    let mut redis = Redis::start();
    let fast = [("RINGCAST_REGISTRY_REFRESH_MS", "300")];
    let n = node(&redis, &fast);
    let (status, answer) = admin(
        &n,
        "POST",
        "revoke",
        json!({"user_id": "sam", "project_id": "p1"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    redis.restart(); // no persistence: everything is gone
                     // The node notices the changes' version went back and writes its own back.
    until("the revocation written back", WAIT, || {
        redis_cli(&redis, &["HEXISTS", "ringcast:{c}:ov", "sam"]) == ["1"]
    })
    .await;
    let deadline = Instant::now() + WAIT;
    while refused(&n, "sam").await.0 != 403 {
        assert!(Instant::now() < deadline, "sam got project:p1 back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_handshakes_of_one_user_under_close_oldest_leave_exactly_the_limit_open() {
    let redis = Redis::start();
    let env = [
        ("RINGCAST_MAX_CONNECTIONS_PER_USER", "2"),
        ("RINGCAST_USER_LIMIT_POLICY", "close-oldest"),
    ];
    let nodes = std::sync::Arc::new((node(&redis, &env), node(&redis, &env)));
    let mut opening = tokio::task::JoinSet::new();
    for i in 0..12 {
        let nodes = nodes.clone();
        opening.spawn(async move {
            let n = if i % 2 == 0 { &nodes.0 } else { &nodes.1 };
            let url = n.url(&format!(
                "/ws?channels=project:p1&token={}",
                user_token("una")
            ));
            ws_connect(url).await.expect("admitted").0
        });
    }
    let mut sockets = Vec::new();
    while let Some(ws) = opening.join_next().await {
        sockets.push(ws.unwrap());
    }
    // Each socket: its first frame past the welcome and `subscribed` is a close (displaced)
    // or the marker published once ten were closed.
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut readers = tokio::task::JoinSet::new();
    for mut ws in sockets {
        let closed_tx = closed_tx.clone();
        readers.spawn(async move {
            use futures_util::StreamExt;
            loop {
                match tokio::time::timeout(WAIT, ws.next()).await {
                    Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f))))) => {
                        let _ = closed_tx.send(u16::from(f.code));
                        return None;
                    }
                    Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))))
                        if t.contains("\"marker\"") =>
                    {
                        return Some(ws); // still open: kept
                    }
                    Ok(Some(Ok(_))) => continue,
                    other => panic!("neither closed nor reached: {other:?}"),
                }
            }
        });
    }
    for _ in 0..10 {
        let code = tokio::time::timeout(WAIT, closed_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(code, 4008);
    }
    // A survivor's subscription may become active after the tenth close: markers go out
    // until every reader is done.
    let publisher = {
        let nodes = nodes.clone();
        tokio::spawn(async move {
            loop {
                nodes.0.publish_one("project:p1", "marker", json!(1)).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let mut open = Vec::new();
    while let Some(reached) = readers.join_next().await {
        open.extend(reached.unwrap());
    }
    publisher.abort();
    assert_eq!(open.len(), 2, "exactly the limit stays open");
    let deadline = Instant::now() + WAIT;
    while redis_cli(&redis, &["ZCARD", "ringcast:{c}:u:una"]) != ["2"] {
        assert!(
            Instant::now() < deadline,
            "Redis does not count the two: {:?} {:?} {:?}",
            redis_cli(&redis, &["ZRANGE", "ringcast:{c}:u:una", "0", "-1"]),
            redis_cli(&redis, &["SMEMBERS", "ringcast:{c}:ev:una"]),
            redis_cli(&redis, &["KEYS", "ringcast:{c}:n:*"]),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_cannot_open_the_admin_channels_or_another_users_channel() {
    let redis = Redis::start();
    let n = node(&redis, &[]);
    for channel in ["audit", "system", "alerts", "user:bob"] {
        let (status, answer) = admin(
            &n,
            "POST",
            "grant",
            json!({"user_id": "vic", "channels": [channel]}),
        )
        .await;
        assert_eq!(status, 400, "{channel}: {answer}");
    }
    let (status, _) = admin(
        &n,
        "POST",
        "grant",
        json!({"user_id": "vic", "channels": ["user:vic"]}),
    )
    .await;
    assert_eq!(status, 200, "a user's own channel may be granted");
    for bad in ["", "a b", "a,b"] {
        let (status, _) = admin(
            &n,
            "POST",
            "revoke",
            json!({"user_id": "vic", "project_id": bad}),
        )
        .await;
        assert_eq!(status, 400, "project_id {bad:?}");
    }
    let (status, _) = admin(&n, "GET", "connections?channel=bad%20name", Value::Null).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_started_with_one_instance_id_are_told_in_the_log() {
    let redis = Redis::start();
    let env = [
        ("RINGCAST_INSTANCE_ID", "twin"),
        ("RINGCAST_REGISTRY_REFRESH_MS", "300"),
    ];
    let first = node(&redis, &env);
    let _second = node(&redis, &env);
    until("the first node says so", WAIT, || {
        first.logged("another node runs with this node's instance id")
    })
    .await;
}
