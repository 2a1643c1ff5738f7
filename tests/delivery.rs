//! End to end: publish → subscribers, in the contract's format, in order, exactly once, across
//! workers; replay on reconnect; message-level visibility.

mod support;

use serde_json::{json, Value};
use support::*;

#[tokio::test]
async fn subscriber_gets_events_in_contract_format_in_order() {
    let server = Server::start();
    let t = token(json!({"sub": "u1", "projects": ["p1"]}));
    let (mut ws, welcome) = connect(&server, &format!("channels=project:p1&token={t}")).await;
    assert_eq!(welcome["channels"], json!(["project:p1"]));
    assert!(welcome["epoch"].as_str().unwrap().len() >= 8);
    assert!(welcome["connection_id"].is_string());
    assert_eq!(welcome["heartbeat_ms"], 30000);
    let sub = recv_json(&mut ws).await;
    assert_eq!(
        sub,
        json!({"type": "subscribed", "channel": "project:p1", "seq": 0})
    );

    let before = now_secs() * 1000;
    for i in 1..=20u64 {
        let seq = server
            .publish_one(
                "project:p1",
                "task:created",
                json!({"id": format!("t{i}"), "n": i}),
            )
            .await;
        assert_eq!(seq, i);
    }
    for i in 1..=20u64 {
        let ev = recv_json(&mut ws).await;
        assert_eq!(ev["channel"], "project:p1");
        assert_eq!(ev["seq"], i);
        assert_eq!(ev["event"], "task:created");
        assert_eq!(ev["data"], json!({"id": format!("t{i}"), "n": i}));
        let ts = ev["ts"].as_u64().unwrap();
        assert!(
            ts >= before && ts < before + 60_000,
            "ts {ts} is ms since the epoch"
        );
        assert_eq!(ev.as_object().unwrap().len(), 5, "{ev}");
    }
}

#[tokio::test]
async fn batch_publish_answers_seq_per_message_in_order() {
    let server = Server::start();
    let batch: Vec<Value> = (0..30)
        .map(|i| json!({"channel": format!("project:b{}", i % 3), "event": "e", "data": i}))
        .collect();
    let (status, reply) = server.publish(&Value::Array(batch)).await;
    assert_eq!(status, 200, "{reply}");
    let seqs: Vec<(String, u64)> = reply
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["channel"].as_str().unwrap().to_string(),
                r["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    for (i, (channel, seq)) in seqs.iter().enumerate() {
        assert_eq!(channel, &format!("project:b{}", i % 3));
        assert_eq!(*seq, (i / 3) as u64 + 1);
    }
}

#[tokio::test]
async fn thousand_connections_on_all_workers_get_every_broadcast_once_in_order() {
    const CLIENTS: usize = 1000;
    const MESSAGES: u64 = 30;
    let server = Server::start();
    let t = admin_token();
    let mut tasks = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<u64>(CLIENTS);
    let (go_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    for _ in 0..CLIENTS {
        let url = server.url(&format!("/ws?channels=dashboard&token={t}"));
        let ready = ready_tx.clone();
        let mut go = go_tx.subscribe();
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = ws_connect(url).await.unwrap();
            let welcome = recv_json(&mut ws).await;
            let id = u64::from_str_radix(welcome["connection_id"].as_str().unwrap(), 16).unwrap();
            assert_eq!(recv_json(&mut ws).await["type"], "subscribed");
            ready.send(id >> 48).await.unwrap();
            go.recv().await.unwrap();
            let mut seqs = Vec::new();
            while seqs.len() < MESSAGES as usize {
                let ev = recv_json(&mut ws).await;
                assert_eq!(ev["channel"], "dashboard");
                seqs.push(ev["seq"].as_u64().unwrap());
            }
            seqs
        }));
    }
    let mut per_core = [0usize; 2];
    for _ in 0..CLIENTS {
        let core = tokio::time::timeout(WAIT, ready_rx.recv())
            .await
            .expect("every client connected within the wait bound")
            .unwrap();
        per_core[core as usize] += 1;
    }
    assert!(
        per_core.iter().all(|&n| n > 0),
        "connections on both workers: {per_core:?}"
    );
    go_tx.send(()).unwrap();
    // Publish from several HTTP connections, which land on either worker.
    for i in 1..=MESSAGES {
        assert_eq!(server.publish_one("dashboard", "tick", json!(i)).await, i);
    }
    for task in tasks {
        let seqs = task.await.unwrap();
        assert_eq!(
            seqs,
            (1..=MESSAGES).collect::<Vec<_>>(),
            "gap, duplicate or reorder"
        );
    }
}

#[tokio::test]
async fn reconnect_with_last_sequence_id_gets_exactly_the_missed_then_recovered() {
    let server = Server::start();
    let t = token(json!({"sub": "u1", "projects": ["p1"]}));
    let (mut ws, welcome) = connect(&server, &format!("channels=project:p1&token={t}")).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_string();
    recv_json(&mut ws).await; // subscribed
    for i in 1..=5 {
        server.publish_one("project:p1", "e", json!(i)).await;
    }
    let mut last = 0;
    for _ in 1..=5 {
        last = recv_json(&mut ws).await["seq"].as_u64().unwrap();
    }
    drop(ws);
    for i in 6..=55 {
        server.publish_one("project:p1", "e", json!(i)).await;
    }
    let (mut ws, _) = connect(
        &server,
        &format!("channels=project:p1&token={t}&last_sequence_id={last}&epoch={epoch}"),
    )
    .await;
    let sub = recv_json(&mut ws).await;
    assert_eq!(sub["type"], "subscribed");
    assert_eq!(sub["seq"], 55);
    let (replayed, events) = recv_until_type(&mut ws, "replayed").await;
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (6..=55).collect::<Vec<_>>());
    assert_eq!(events[0]["data"], 6);
    assert_eq!(
        replayed,
        json!({"type":"replayed","channel":"project:p1","recovered":true,"count":50})
    );
    // Live events continue right after the replay.
    server.publish_one("project:p1", "e", json!(56)).await;
    assert_eq!(recv_json(&mut ws).await["seq"], 56);
}

#[tokio::test]
async fn resume_beyond_the_ring_or_from_another_epoch_is_not_recovered() {
    let server = Server::start_with(&[("RINGCAST_REPLAY_MAX_MESSAGES", "10")]);
    let t = admin_token();
    let (mut ws, welcome) = connect(&server, &format!("token={t}")).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_string();
    for i in 1..=30 {
        server.publish_one("dashboard", "e", json!(i)).await;
    }
    // The ring keeps 21..=30: resuming after 20 works, after 5 does not.
    send_json(&mut ws, &json!({"type":"subscribe","channels":["dashboard"],"since":{"dashboard":20},"epoch":epoch})).await;
    recv_until_type(&mut ws, "subscribed").await;
    let (replayed, events) = recv_until_type(&mut ws, "replayed").await;
    assert_eq!(replayed["recovered"], true);
    assert_eq!(events.len(), 10);
    send_json(
        &mut ws,
        &json!({"type":"unsubscribe","channels":["dashboard"]}),
    )
    .await;
    assert_eq!(recv_json(&mut ws).await["type"], "unsubscribed");

    send_json(
        &mut ws,
        &json!({"type":"subscribe","channels":["dashboard"],"since":{"dashboard":5},"epoch":epoch}),
    )
    .await;
    recv_until_type(&mut ws, "subscribed").await;
    let (replayed, events) = recv_until_type(&mut ws, "replayed").await;
    assert_eq!(replayed["recovered"], false);
    assert!(events.is_empty(), "{events:?}");

    let (mut ws2, _) = connect(
        &server,
        &format!("channels=dashboard&token={t}&last_sequence_id=25&epoch=not-this-one"),
    )
    .await;
    recv_until_type(&mut ws2, "subscribed").await;
    let (replayed, events) = recv_until_type(&mut ws2, "replayed").await;
    assert_eq!(replayed["recovered"], false);
    assert!(events.is_empty());
}

#[tokio::test]
async fn ephemeral_messages_are_delivered_live_but_never_replayed() {
    let server = Server::start();
    let t = admin_token();
    let (mut ws, welcome) = connect(&server, &format!("channels=task:t1&token={t}")).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_string();
    recv_json(&mut ws).await;
    server.publish_one("task:t1", "durable", json!(1)).await;
    let (status, _) = server
        .publish(&json!({"channel":"task:t1","event":"progress","data":50,"ephemeral":true}))
        .await;
    assert_eq!(status, 200);
    server.publish_one("task:t1", "durable", json!(3)).await;
    for expect in ["durable", "progress", "durable"] {
        assert_eq!(recv_json(&mut ws).await["event"], expect);
    }
    let (mut ws2, _) = connect(
        &server,
        &format!("channels=task:t1&token={t}&last_sequence_id=0&epoch={epoch}"),
    )
    .await;
    recv_json(&mut ws2).await;
    let (replayed, events) = recv_until_type(&mut ws2, "replayed").await;
    assert_eq!(replayed["recovered"], true);
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 3]);
}

#[tokio::test]
async fn project_and_user_fields_limit_who_sees_a_message() {
    let server = Server::start();
    let alice = token(json!({"sub": "alice", "projects": ["p1"], "channels": ["dashboard"]}));
    let (mut ws, _) = connect(&server, &format!("channels=dashboard&token={alice}")).await;
    recv_json(&mut ws).await;
    let (mut admin, _) = connect(
        &server,
        &format!("channels=dashboard&token={}", admin_token()),
    )
    .await;
    recv_json(&mut admin).await;
    for body in [
        json!({"channel":"dashboard","event":"secret","data":1,"project_id":"p2"}),
        json!({"channel":"dashboard","event":"secret","data":2,"user_id":"bob"}),
        json!({"channel":"dashboard","event":"secret","data":3,"project_id":"p1","user_id":"bob"}),
        json!({"channel":"dashboard","event":"visible","data":4,"project_id":"p1","user_id":"alice"}),
    ] {
        assert_eq!(server.publish(&body).await.0, 200);
    }
    // Alice's next frame is the visible one: nothing of the others reached her.
    let ev = recv_json(&mut ws).await;
    assert_eq!(
        (ev["event"].as_str(), ev["data"].as_u64()),
        (Some("visible"), Some(4))
    );
    // The admin sees all four, including on replay.
    for i in 1..=4 {
        assert_eq!(recv_json(&mut admin).await["data"], i);
    }
}

#[tokio::test]
async fn progress_events_get_an_eta_from_the_observed_rate() {
    let server = Server::start_with(&[("RINGCAST_KEY_INTERVAL_MS", "0")]);
    let t = admin_token();
    let (mut ws, _) = connect(&server, &format!("channels=task:eta&token={t}")).await;
    recv_json(&mut ws).await;
    let step = |n: u64| {
        json!({"channel": "task:eta", "event": "task:progress", "coalesce_key": "progress:eta",
               "compute_eta": true,
               "data": {"current_step": n, "total_steps": 20, "message": "working"}})
    };
    server.publish(&step(1)).await;
    let first = recv_json(&mut ws).await;
    assert!(
        first["data"].get("eta_seconds").is_none(),
        "no rate after one step: {first}"
    );
    // Two steps 200 ms apart: 5 steps/s, so 17 steps left take about 4 s.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    server.publish(&step(2)).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    server.publish(&step(3)).await;
    recv_json(&mut ws).await;
    let third = recv_json(&mut ws).await;
    let eta = third["data"]["eta_seconds"].as_u64().expect("an ETA");
    assert!(
        (2..=8).contains(&eta),
        "eta {eta} s for 17 steps at ~5 steps/s"
    );
    assert_eq!(
        third["data"]["message"], "working",
        "the publisher's fields stay"
    );
    // Without compute_eta, data stays exactly as sent, even for a progress event.
    let raw = r#"{"current_step": 1, "total_steps": 2}"#;
    let body = format!(r#"{{"channel":"task:eta","event":"task:progress","data":{raw}}}"#);
    assert_eq!(server.publish_raw(&body).await.0, 200);
    let other = recv_json(&mut ws).await;
    assert!(other["data"].get("eta_seconds").is_none());
}
