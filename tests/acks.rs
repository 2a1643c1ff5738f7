//! End to end: acknowledged delivery of critical events (`ack=critical`).

mod support;

use serde_json::json;
use support::*;

#[tokio::test]
async fn an_unacked_critical_event_is_resent_with_its_seq_an_acked_one_is_not() {
    let server = Server::start_with(&[
        ("RINGCAST_PING_INTERVAL_MS", "100"), // sweep every 25 ms
        ("RINGCAST_ACK_TIMEOUT_MS", "300"),
        ("RINGCAST_ACK_MAX_SENDS", "3"),
    ]);
    let t = admin_token();
    let (mut ws, _) = connect(&server, &format!("channels=task:a&token={t}&ack=critical")).await;
    recv_json(&mut ws).await;
    let publish = |event: &'static str, priority: &'static str| json!({"channel": "task:a", "event": event, "priority": priority, "data": null});
    assert_eq!(
        server.publish(&publish("agent:failed", "critical")).await.0,
        200
    );
    let first = recv_json(&mut ws).await;
    assert_eq!(
        (first["event"].as_str(), first["seq"].as_u64()),
        (Some("agent:failed"), Some(1))
    );
    // Not acknowledged: it comes again, same seq, until the limit of 3 sends.
    let again = recv_json(&mut ws).await;
    assert_eq!(again, first, "the re-send is the same event, seq included");
    assert_eq!(recv_json(&mut ws).await["seq"], 1);

    // Acknowledged at once: never re-sent. A normal event is never tracked.
    assert_eq!(
        server.publish(&publish("agent:stuck", "critical")).await.0,
        200
    );
    let second = recv_json(&mut ws).await;
    assert_eq!(second["seq"], 2);
    send_json(
        &mut ws,
        &json!({"type": "ack", "channel": "task:a", "seq": 2}),
    )
    .await;
    assert_eq!(server.publish(&publish("log", "normal")).await.0, 200);
    assert_eq!(recv_json(&mut ws).await["seq"], 3);
    // Wait out more than two ack timeouts, then a sentinel: nothing came in between.
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert_eq!(server.publish(&publish("sentinel", "normal")).await.0, 200);
    let next = recv_json(&mut ws).await;
    assert_eq!(
        (next["event"].as_str(), next["seq"].as_u64()),
        (Some("sentinel"), Some(4))
    );
}

#[tokio::test]
async fn without_ack_critical_nothing_is_resent() {
    let server = Server::start_with(&[
        ("RINGCAST_PING_INTERVAL_MS", "100"),
        ("RINGCAST_ACK_TIMEOUT_MS", "200"),
    ]);
    let (mut ws, _) = connect(&server, &format!("channels=task:b&token={}", admin_token())).await;
    recv_json(&mut ws).await;
    let body =
        json!({"channel": "task:b", "event": "agent:failed", "priority": "critical", "data": null});
    assert_eq!(server.publish(&body).await.0, 200);
    assert_eq!(recv_json(&mut ws).await["seq"], 1);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(
        server
            .publish(&json!({"channel": "task:b", "event": "sentinel", "data": null}))
            .await
            .0,
        200
    );
    assert_eq!(recv_json(&mut ws).await["event"], "sentinel");
}
