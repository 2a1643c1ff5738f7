//! End to end in cluster mode: several ringcast nodes on one real `redis-server` (started by
//! each test on a free loopback port, without persistence), real WebSocket clients.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::redis::{node_at, Redis, RedisCluster};
use support::sse::Sse;
use support::*;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

fn node(redis: &Redis) -> Server {
    node_with(redis, &[])
}

fn node_with(redis: &Redis, extra: &[(&str, &str)]) -> Server {
    node_at(&redis.url(), extra)
}

fn reader() -> String {
    token(json!({"sub": "reader", "projects": ["*"]}))
}

/// Connects to `channel` on `server` and waits for its `subscribed`; returns the socket, the
/// welcome and the subscribed seq.
async fn subscribe(server: &Server, channel: &str) -> (Ws, Value, u64) {
    let (mut ws, welcome) =
        connect(server, &format!("channels={channel}&token={}", reader())).await;
    let sub = recv_json(&mut ws).await;
    assert_eq!(sub["type"], "subscribed", "{sub}");
    (ws, welcome, sub["seq"].as_u64().unwrap())
}

async fn publish_data(server: &Server, channel: &str, data: Value) -> u64 {
    server.publish_one(channel, "e", data).await
}

async fn readyz(server: &Server) -> u16 {
    server.http("GET", "/readyz", &[], "").await.0
}

/// Waits until `/readyz` answers `status`.
async fn until_ready(server: &Server, status: u16) {
    let deadline = Instant::now() + WAIT;
    while readyz(server).await != status {
        assert!(Instant::now() < deadline, "/readyz never answered {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads `n` events of one channel; returns their (seq, data).
async fn events(ws: &mut Ws, n: usize) -> Vec<(u64, Value)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let v = recv_json(ws).await;
        assert!(v["type"].is_null(), "an event, not {v}");
        out.push((v["seq"].as_u64().unwrap(), v["data"].clone()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_every_message_to_every_subscriber_in_order_exactly_once() {
    let redis = Redis::start();
    let nodes: Vec<Server> = (0..3).map(|_| node(&redis)).collect();
    every_message_in_order_exactly_once(nodes, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_three_master_redis_cluster_with_sharded_pubsub_the_same_holds() {
    let cluster = RedisCluster::start(3);
    let url = cluster.url();
    let nodes: Vec<Server> = (0..3).map(|_| node_at(&url, &[])).collect();
    // The channels' keys are spread over the three masters.
    every_message_in_order_exactly_once(nodes, 300).await;

    // A batch over channels of different slots, then a resume on another node from a
    // position the node never held.
    let a = node_at(&url, &[]);
    let b = node_at(&url, &[]);
    let (mut ws, welcome, _) = subscribe(&a, "project:x1").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let batch: Vec<Value> = (0..6)
        .map(|i| json!({"channel": format!("project:x{}", i % 3), "event": "e", "data": i}))
        .collect();
    let (status, reply) = a.publish(&Value::Array(batch)).await;
    assert_eq!(status, 200, "{reply}");
    let got = events(&mut ws, 2).await;
    assert_eq!((&got[0].1, &got[1].1), (&json!(1), &json!(4)));
    let query = format!(
        "channels=project:x1&token={}&last_sequence_id={}&epoch={epoch}",
        reader(),
        got[0].0
    );
    let (mut ws, _) = connect(&b, &query).await;
    let (done, before) = recv_until_type(&mut ws, "replayed").await;
    assert_eq!(done["recovered"], true, "{done}");
    let data: Vec<Value> = before
        .iter()
        .filter(|v| v["type"].is_null())
        .map(|v| v["data"].clone())
        .collect();
    assert_eq!(data, vec![json!(4)]);

    // A master killed and started again while batches over several slots are in flight:
    // publishing works again on every node once the cluster is whole.
    let a = std::sync::Arc::new(a);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = JoinSet::new();
    for _ in 0..8 {
        let (a, stop) = (a.clone(), stop.clone());
        load.spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<Value> = (0..20)
                    .map(|i| json!({"channel": format!("project:k{i}"), "event": "e", "data": i}))
                    .collect();
                let _ = a.publish(&Value::Array(batch)).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut cluster = cluster;
    cluster.nodes[1].kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.nodes[1].restart();
    cluster.wait_ok();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(r) = load.join_next().await {
        r.unwrap();
    }
    let (mut ws, _, _) = subscribe(&b, "project:k7").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let batch: Vec<Value> = (0..20)
        .map(|i| json!({"channel": format!("project:k{i}"), "event": "e", "data": "after"}))
        .collect();
    loop {
        let (status, reply) = a.publish(&Value::Array(batch.clone())).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "publishing never came back: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = recv_json(&mut ws).await;
    assert_eq!(v["data"], "after", "{v}");
}

/// Subscribers spread over `nodes`, each on one of ten channels, get every message published
/// on any node, in order, exactly once.
async fn every_message_in_order_exactly_once(nodes: Vec<Server>, subscribers: usize) {
    const CHANNELS: usize = 10;
    const ROUNDS: usize = 20;
    let epochs: Vec<String> = {
        let mut e = Vec::new();
        for n in &nodes {
            let (_, welcome) = connect(n, &format!("token={}", reader())).await;
            e.push(welcome["epoch"].as_str().unwrap().to_owned());
        }
        e
    };
    assert!(
        epochs.iter().all(|e| *e == epochs[0]),
        "one epoch per cluster: {epochs:?}"
    );

    let mut subs = JoinSet::new();
    let nodes = std::sync::Arc::new(nodes);
    for i in 0..subscribers {
        let nodes = nodes.clone();
        subs.spawn(async move {
            let channel = format!("project:c{}", i % CHANNELS);
            let (ws, _, seq) = subscribe(&nodes[i % 3], &channel).await;
            (i, ws, seq)
        });
    }
    let mut sockets = Vec::new();
    while let Some(r) = subs.join_next().await {
        sockets.push(r.unwrap());
    }
    // Every message is published on one of the three nodes, in turn.
    for round in 0..ROUNDS {
        for c in 0..CHANNELS {
            let on = &nodes[(round + c) % 3];
            publish_data(on, &format!("project:c{c}"), json!({"round": round})).await;
        }
    }
    let mut checks = JoinSet::new();
    for (i, mut ws, subscribed) in sockets {
        checks.spawn(async move {
            let got = events(&mut ws, ROUNDS).await;
            for (k, (seq, data)) in got.iter().enumerate() {
                assert_eq!(data["round"], k, "subscriber {i}: in publish order");
                assert_eq!(
                    *seq,
                    got[0].0 + k as u64,
                    "subscriber {i}: no gap, no duplicate"
                );
                assert!(*seq > subscribed);
            }
            // Nothing more: exactly once.
            let more = tokio::time::timeout(Duration::from_millis(50), ws.next()).await;
            assert!(
                more.is_err(),
                "subscriber {i}: nothing after the last: {more:?}"
            );
        });
    }
    while let Some(r) = checks.join_next().await {
        r.unwrap();
    }
}

#[tokio::test]
async fn a_client_resumes_on_another_node_with_nothing_missing_and_nothing_twice() {
    let redis = Redis::start();
    let a = node(&redis);
    let b = node(&redis);
    let channel = "project:resume";
    let (mut ws, welcome, _) = subscribe(&a, channel).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    for i in 0..5 {
        publish_data(&a, channel, json!(i)).await;
    }
    let seen = events(&mut ws, 5).await;
    drop(ws);
    // The client kept the second event as its position; three more are published meanwhile.
    let position = seen[1].0;
    for i in 5..8 {
        publish_data(&b, channel, json!(i)).await;
    }
    // On node B (which holds the channel in its ring) and on node C, started after all of it,
    // which must read the channel's stream from Redis.
    let c = node(&redis);
    let mut resumed = Vec::new();
    for (name, server) in [("b", &b), ("c", &c)] {
        let query = format!(
            "channels={channel}&token={}&last_sequence_id={position}&epoch={epoch}",
            reader()
        );
        let (mut ws, welcome) = connect(server, &query).await;
        assert_eq!(welcome["epoch"], epoch.as_str(), "{name}");
        let sub = recv_json(&mut ws).await;
        assert_eq!(sub["type"], "subscribed", "{name}: {sub}");
        // Replayed up to `subscribed.seq`, then `replayed`; a message the node has not
        // received from Redis yet follows live. Either way: each once, in order.
        let (done, before) = recv_until_type(&mut ws, "replayed").await;
        assert_eq!(
            (done["recovered"].as_bool(), done["count"].as_u64()),
            (Some(true), Some(before.len() as u64)),
            "{name}: {done}"
        );
        let mut replayed: Vec<(u64, Value)> = before
            .iter()
            .map(|v| (v["seq"].as_u64().unwrap(), v["data"].clone()))
            .collect();
        assert_eq!(
            replayed.last().map(|r| r.0).unwrap_or(position),
            sub["seq"].as_u64().unwrap()
        );
        let missing = 6 - replayed.len();
        replayed.extend(events(&mut ws, missing).await);
        let data: Vec<Value> = replayed.iter().map(|(_, d)| d.clone()).collect();
        assert_eq!(data, (2..8).map(|i| json!(i)).collect::<Vec<_>>(), "{name}");
        assert_eq!(replayed[0].0, position + 1, "{name}");
        assert!(replayed.windows(2).all(|w| w[1].0 == w[0].0 + 1), "{name}");
        resumed.push((name, ws, replayed[5].0));
    }
    // Live after the replay, published on the other node: no gap at the seam.
    let live = publish_data(&a, channel, json!("live")).await;
    for (name, mut ws, handed_over) in resumed {
        assert_eq!(live, handed_over + 1, "{name}");
        assert_eq!(events(&mut ws, 1).await[0], (live, json!("live")), "{name}");
    }
}

#[tokio::test]
async fn a_redis_that_lost_its_data_gives_recovered_false_and_the_epoch_stays() {
    let mut redis = Redis::start();
    let a = node(&redis);
    let b = node(&redis);
    let channel = "project:lost";
    let (mut ws, welcome, _) = subscribe(&a, channel).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let mut last = 0;
    for i in 0..3 {
        last = publish_data(&a, channel, json!(i)).await;
    }
    events(&mut ws, 3).await;
    redis.restart(); // SIGKILL, then a new empty Redis on the same port
    until_ready(&a, 200).await;
    until_ready(&b, 200).await;
    // The first publish after the loss starts a new life of the channel, far above the old.
    let (mut on_b, _, _) = subscribe(&b, channel).await;
    let fresh = publish_data(&a, channel, json!("after")).await;
    assert!(fresh > last + 1, "{fresh} continues above {last}");
    let next = events(&mut ws, 1).await;
    assert_eq!(
        next[0],
        (fresh, json!("after")),
        "a live subscriber goes on"
    );
    // Node B has seen the new life too (else its memory still answers for the old one).
    assert_eq!(events(&mut on_b, 1).await[0].0, fresh);
    let query = format!(
        "channels={channel}&token={}&last_sequence_id={last}&epoch={epoch}",
        reader()
    );
    let (mut ws, welcome) = connect(&b, &query).await;
    assert_eq!(
        welcome["epoch"],
        epoch.as_str(),
        "the nodes carry the epoch over"
    );
    let sub = recv_json(&mut ws).await;
    assert_eq!(sub["seq"], fresh);
    let done = recv_json(&mut ws).await;
    assert_eq!(
        (done["type"].as_str(), done["recovered"].as_bool()),
        (Some("replayed"), Some(false)),
        "{done}"
    );
}

#[tokio::test]
async fn a_stalled_redis_gets_503_in_bounded_time_and_delivery_goes_on_after() {
    let redis = Redis::start();
    let a = node_with(&redis, &[("RINGCAST_REDIS_TIMEOUT_MS", "300")]);
    let channel = "project:stall";
    let (mut ws, _, _) = subscribe(&a, channel).await;
    let first = publish_data(&a, channel, json!("before")).await;
    assert_eq!(events(&mut ws, 1).await[0].0, first);

    redis.signal(libc::SIGSTOP);
    let started = Instant::now();
    let auth = format!("Bearer {API_KEY}");
    let body = json!({"channel": channel, "event": "e", "data": "during"}).to_string();
    let (status, head, reply) = a
        .http(
            "POST",
            "/api/v1/publish",
            &[("Authorization", &auth)],
            &body,
        )
        .await;
    let took = started.elapsed();
    assert_eq!(status, 503, "{reply}");
    assert!(head.to_ascii_lowercase().contains("retry-after"), "{head}");
    assert!(took < Duration::from_secs(2), "answered in {took:?}");
    until_ready(&a, 503).await;
    // Local clients stay connected and answered.
    ws.send(Message::Ping(b"still-there".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Pong(p) => break p,
                _ => continue,
            }
        }
    })
    .await
    .expect("a pong while Redis is stalled");
    assert_eq!(&pong[..], b"still-there");

    redis.signal(libc::SIGCONT);
    until_ready(&a, 200).await;
    let after = publish_data(&a, channel, json!("after")).await;
    // The stalled publish may have been stored once Redis went on (it was in Redis's input);
    // either way the subscriber sees every seq in order up to the new one.
    let mut seqs = vec![];
    loop {
        let (seq, data) = events(&mut ws, 1).await.remove(0);
        seqs.push(seq);
        if data == json!("after") {
            break;
        }
        assert_eq!(data, json!("during"));
    }
    assert_eq!(*seqs.last().unwrap(), after);
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert_eq!(seqs[0], first + 1);
}

/// One subscriber of the drain test: follows its channel on `first`, moves to `second` when
/// told `shutdown`, resumes there, and returns the `round`s it received, in order.
async fn follow_through_drain(
    first: std::net::SocketAddr,
    second: std::net::SocketAddr,
    channel: String,
    rounds: u64,
    ready: tokio::sync::mpsc::Sender<()>,
) -> (Vec<u64>, bool) {
    let url = |addr, extra: &str| {
        format!(
            "ws://{addr}/ws?channels={channel}&token={}{extra}",
            reader()
        )
    };
    let (mut ws, _) = ws_connect(url(first, "")).await.expect("connect");
    let welcome = recv_json(&mut ws).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let sub = recv_json(&mut ws).await;
    let mut last = sub["seq"].as_u64().unwrap();
    ready.send(()).await.unwrap();
    let mut got = Vec::new();
    let mut moved = false;
    while got.last().is_none_or(|&r| r + 1 < rounds) {
        let v = recv_json(&mut ws).await;
        match v["type"].as_str() {
            None => {
                let seq = v["seq"].as_u64().unwrap();
                assert!(seq > last, "{channel}: {seq} after {last}");
                last = seq;
                got.push(v["data"]["round"].as_u64().unwrap());
            }
            Some("shutdown") if !moved => {
                moved = true;
                let _ = ws.close(None).await;
                let resume = format!("&last_sequence_id={last}&epoch={epoch}");
                let (next, _) = ws_connect(url(second, &resume)).await.expect("reconnect");
                ws = next;
                let welcome = recv_json(&mut ws).await;
                assert_eq!(welcome["epoch"], epoch.as_str());
            }
            Some("subscribed") => {}
            Some("replayed") => assert_eq!(v["recovered"], true, "{channel}: {v}"),
            other => panic!("{channel}: unexpected {other:?}: {v}"),
        }
    }
    (got, moved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_under_live_publishing_loses_nothing() {
    const CLIENTS: usize = 2000;
    const CHANNELS: usize = 20;
    const ROUNDS: u64 = 100;
    let redis = Redis::start();
    // 100 clients per project, on one node at a time.
    let per_project = ("RINGCAST_MAX_CONNECTIONS_PER_PROJECT", "0");
    let mut a = node_with(
        &redis,
        &[("RINGCAST_DRAIN_TIMEOUT_MS", "20000"), per_project],
    );
    let b = node_with(&redis, &[per_project]);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(CLIENTS);
    let mut clients = JoinSet::new();
    for i in 0..CLIENTS {
        let channel = format!("project:d{}", i % CHANNELS);
        clients.spawn(follow_through_drain(
            a.addr,
            b.addr,
            channel,
            ROUNDS,
            ready_tx.clone(),
        ));
    }
    drop(ready_tx);
    for i in 0..CLIENTS {
        let ready = tokio::time::timeout(WAIT, ready_rx.recv()).await;
        assert!(
            matches!(ready, Ok(Some(()))),
            "client {i} of {CLIENTS} did not subscribe"
        );
    }
    // Publishing goes on, on node B, while node A drains.
    let b = std::sync::Arc::new(b);
    let publisher = {
        let b = b.clone();
        tokio::spawn(async move {
            for round in 0..ROUNDS {
                let batch: Vec<Value> = (0..CHANNELS)
                    .map(|c| json!({"channel": format!("project:d{c}"), "event": "e", "data": {"round": round}}))
                    .collect();
                let (status, reply) = b.publish(&Value::Array(batch)).await;
                assert_eq!(status, 200, "{reply}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.terminate();
    publisher.await.unwrap();
    let mut moved = 0;
    while let Some(r) = clients.join_next().await {
        let (got, was_moved) = r.unwrap();
        assert_eq!(
            got,
            (0..ROUNDS).collect::<Vec<_>>(),
            "every round, in order, once"
        );
        moved += usize::from(was_moved);
    }
    assert_eq!(moved, CLIENTS, "every client was moved by the drain");
    assert!(a.wait_exit(WAIT).success());
}

#[tokio::test]
async fn an_event_stream_resumes_on_another_node_with_last_event_id() {
    let redis = Redis::start();
    let a = node(&redis);
    let b = node(&redis);
    let q = format!(
        "/events?channels=project:sse1,project:sse2&token={}",
        reader()
    );
    let mut sse = Sse::connect(&a, &q, "").await;
    sse.opened(2).await;
    let first = publish_data(&a, "project:sse1", json!("one")).await;
    let m = sse.data().await;
    assert_eq!(m.json()["seq"], first);
    let last_id = m.id.unwrap();
    drop(sse);
    // Missed while away, on both channels, published on either node.
    publish_data(&b, "project:sse2", json!("two")).await;
    let three = publish_data(&a, "project:sse1", json!("three")).await;
    let mut sse = Sse::connect(&b, &q, &format!("Last-Event-ID: {last_id}\r\n")).await;
    assert_eq!(sse.data().await.json()["type"], "welcome");
    // Node B may not have received the newest one from Redis yet: then it follows live,
    // right after the replay. Either way: once, in order. The other channel's position is 0
    // (it had no messages): its history since cannot be proven whole (an earlier life may
    // have come and gone), so it is `recovered:false` with nothing re-sent.
    let mut replayed = Vec::new();
    let mut recovered = std::collections::BTreeMap::new();
    while recovered.len() < 2 || replayed.is_empty() {
        let v = sse.data().await.json();
        match v["type"].as_str() {
            Some("subscribed") => {}
            Some("replayed") => {
                let channel = v["channel"].as_str().unwrap().to_owned();
                recovered.insert(channel, v["recovered"].as_bool().unwrap());
            }
            None => replayed.push((v["seq"].as_u64().unwrap(), v["data"].clone())),
            other => panic!("unexpected {other:?}: {v}"),
        }
    }
    assert_eq!(replayed, vec![(three, json!("three"))]);
    let want: std::collections::BTreeMap<String, bool> = [
        ("project:sse1".to_owned(), true),
        ("project:sse2".to_owned(), false),
    ]
    .into();
    assert_eq!(recovered, want);
}

#[tokio::test]
async fn a_history_redis_lost_under_the_channel_is_not_resumed_as_whole() {
    let redis = Redis::start();
    let a = node(&redis);
    let channel = "project:evicted";
    let (_ws, welcome, _) = subscribe(&a, channel).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let first = publish_data(&a, channel, json!(1)).await;
    for i in 2..=4 {
        publish_data(&a, channel, json!(i)).await;
    }
    // What an eviction under `maxmemory` can do: the stream goes, the meta hash stays.
    assert_eq!(
        redis.cli(&["DEL", &format!("ringcast:{{{channel}}}:s")]),
        "1"
    );
    // A node that has not seen the channel must read Redis.
    let b = node(&redis);
    let query = format!(
        "channels={channel}&token={}&last_sequence_id={first}&epoch={epoch}",
        reader()
    );
    let (mut ws, _) = connect(&b, &query).await;
    let (done, before) = recv_until_type(&mut ws, "replayed").await;
    assert_eq!(done["recovered"], false, "{done}");
    assert!(
        before.iter().all(|v| v["type"] == "subscribed"),
        "{before:?}"
    );
}

#[tokio::test]
async fn backends_publishing_to_redis_reach_subscribers_once_and_a_stream_survives_a_restart() {
    let redis = Redis::start();
    let sources = "stream:backend:events,pubsub:events:AGENT_STATUS_CHANGED";
    let ingest = ("RINGCAST_REDIS_INGEST", sources);
    let mut a = node_with(&redis, &[ingest]);
    let b = node_with(&redis, &[ingest]);
    let (mut ws, welcome, _) = subscribe(&b, "project:42").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();

    // A stream entry whose `message` is a publish body.
    let body = json!({"channel": "project:42", "event": "task:created", "data": {"n": 1}});
    redis.cli(&["XADD", "backend:events", "*", "message", &body.to_string()]);
    let v = recv_json(&mut ws).await;
    assert_eq!(
        (v["event"].as_str(), &v["data"]),
        (Some("task:created"), &json!({"n": 1})),
        "{v}"
    );
    let first = v["seq"].as_u64().unwrap();

    // A backend's own event on Pub/Sub, mapped to its project: published once, not per node.
    let status = json!({"agent_id": "a7", "old_status": "idle", "new_status": "working", "project_id": "42"});
    let deadline = Instant::now() + WAIT;
    // The ingest lease is taken within a second of the nodes' start; until then nobody ingests.
    let v = loop {
        redis.cli(&[
            "PUBLISH",
            "events:AGENT_STATUS_CHANGED",
            &status.to_string(),
        ]);
        match tokio::time::timeout(Duration::from_millis(500), recv_json(&mut ws)).await {
            Ok(v) => break v,
            Err(_) => assert!(
                Instant::now() < deadline,
                "the Pub/Sub ingest never published"
            ),
        }
    };
    assert_eq!(v["event"], "agent_status_changed", "{v}");
    assert_eq!(v["data"]["new_status"], "working");
    let twice = tokio::time::timeout(Duration::from_millis(300), recv_json(&mut ws)).await;
    assert!(twice.is_err(), "published once for the cluster: {twice:?}");

    // Entries added while no node reads the stream are published when one is back.
    a.terminate();
    a.wait_exit(WAIT);
    drop(b); // now no node runs
    for n in 2..=3 {
        let body = json!({"channel": "project:42", "event": "task:created", "data": {"n": n}});
        redis.cli(&["XADD", "backend:events", "*", "message", &body.to_string()]);
    }
    let c = node_with(&redis, &[ingest]);
    // Resuming after the first entry: the other two come replayed or live (whichever the
    // node's ingest was quicker than), in order, once; nothing else of the channel is new.
    let query = format!(
        "channels=project:42&token={}&last_sequence_id={first}&epoch={epoch}",
        reader()
    );
    let (mut ws, _) = connect(&c, &query).await;
    let mut got = Vec::new();
    while got.len() < 3 {
        let v = recv_json(&mut ws).await;
        match v["type"].as_str() {
            None => got.push(v["data"].clone()),
            Some("subscribed" | "replayed") => {}
            other => panic!("unexpected {other:?}: {v}"),
        }
    }
    assert_eq!(
        got,
        vec![status, json!({"n": 2}), json!({"n": 3})],
        "the Pub/Sub event, then the stream's"
    );
    let metrics = c.http("GET", "/metrics", &[], "").await.2;
    assert!(metrics.contains("ringcast_ingested_total 2"), "{metrics}");
}
