//! End to end: outbound rate limits per connection and per node, the TTL of waiting events,
//! and critical events going through whatever the limits say.

mod support;

use std::time::Instant;

use serde_json::{json, Value};
use support::*;

/// Reads events and `dropped` notices until `total` events are accounted for.
async fn account(ws: &mut Ws, total: u64) -> (Vec<Value>, u64, f64) {
    let (mut events, mut dropped) = (Vec::new(), 0u64);
    let start = Instant::now();
    let mut last_event_at = 0.0;
    while events.len() as u64 + dropped < total {
        let v = recv_json(ws).await;
        if v["type"] == "dropped" {
            dropped += v["count"].as_u64().unwrap();
        } else {
            assert!(v["type"].is_null(), "{v}");
            last_event_at = start.elapsed().as_secs_f64();
            events.push(v);
        }
    }
    (events, dropped, last_event_at)
}

#[tokio::test]
async fn a_connection_gets_at_most_its_rate_waiting_events_expire_critical_ones_pass() {
    let server = Server::start_with(&[
        ("RINGCAST_CONNECTION_RATE_LIMIT", "20"),
        ("RINGCAST_QUEUE_TTL_MS", "1000"),
    ]);
    let (mut ws, _) = connect(&server, &format!("channels=task:r&token={}", admin_token())).await;
    recv_json(&mut ws).await;
    let batch: Vec<Value> = (1..=100)
        .map(|i| {
            let priority = if i % 25 == 0 { "critical" } else { "normal" };
            json!({"channel": "task:r", "event": "e", "priority": priority, "data": i})
        })
        .collect();
    assert_eq!(server.publish(&Value::Array(batch)).await.0, 200);
    let (events, dropped, spread) = account(&mut ws, 100).await;
    let got: Vec<u64> = events.iter().map(|e| e["data"].as_u64().unwrap()).collect();
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
    // A burst of 20, then 20 per second for about the 1 s TTL: some 40 of the 96 normal ones.
    assert!((30..=60).contains(&got.len()), "{} delivered", got.len());
    assert_eq!(got.len() as u64 + dropped, 100);
    for critical in [25, 50, 75, 100] {
        assert!(
            got.contains(&critical),
            "critical {critical} missing: {got:?}"
        );
    }
    assert!(
        spread > 0.5,
        "the rate spread them over time ({spread:.2} s)"
    );
}

#[tokio::test]
async fn the_node_wide_limit_holds_across_connections() {
    let server = Server::start_with(&[
        ("RINGCAST_WORKERS", "1"),
        ("RINGCAST_NODE_RATE_LIMIT", "40"),
        ("RINGCAST_QUEUE_TTL_MS", "1000"),
    ]);
    let t = admin_token();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (mut ws, _) = connect(&server, &format!("channels=task:n&token={t}")).await;
        recv_json(&mut ws).await;
        clients.push(ws);
    }
    let batch: Vec<Value> = (1..=30)
        .map(|i| json!({"channel": "task:n", "event": "e", "data": i}))
        .collect();
    assert_eq!(server.publish(&Value::Array(batch)).await.0, 200);
    let mut delivered = 0;
    for ws in &mut clients {
        let (events, dropped, _) = account(ws, 30).await;
        assert_eq!(events.len() as u64 + dropped, 30);
        delivered += events.len();
    }
    // 120 deliveries asked; about 40 burst + 40 in the 1 s TTL went out.
    assert!(
        (60..=100).contains(&delivered),
        "{delivered} of 120 delivered node-wide"
    );
}

#[tokio::test]
async fn a_message_ttl_drops_it_if_it_waited_too_long() {
    let server = Server::start_with(&[("RINGCAST_CONNECTION_RATE_LIMIT", "5")]);
    let (mut ws, _) = connect(&server, &format!("channels=task:t&token={}", admin_token())).await;
    recv_json(&mut ws).await;
    let batch: Vec<Value> = (1..=20)
        .map(|i| json!({"channel": "task:t", "event": "e", "data": i, "ttl_ms": 300}))
        .collect();
    assert_eq!(server.publish(&Value::Array(batch)).await.0, 200);
    let (events, dropped, _) = account(&mut ws, 20).await;
    // 5 at once, maybe one or two more within 300 ms; the rest expired.
    assert!(
        events.len() <= 8 && dropped >= 12,
        "{} delivered, {dropped} dropped",
        events.len()
    );
}
