//! End to end: connection filters (`agent_ids`, `project_ids`, `event_types`).

mod support;

use serde_json::{json, Value};
use support::*;

async fn publish(server: &Server, event: &str, extra: Value) {
    let mut body = json!({"channel": "dashboard", "event": event, "data": event});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    assert_eq!(server.publish(&body).await.0, 200);
}

#[tokio::test]
async fn filters_at_connect_let_only_matching_messages_through() {
    let server = Server::start();
    let t = admin_token();
    let (mut ws, _) = connect(
        &server,
        &format!("channels=dashboard&token={t}&agent_ids=a1,a2&event_types=agent:status,sentinel"),
    )
    .await;
    recv_json(&mut ws).await;
    publish(&server, "agent:status", json!({"agent_id": "a9"})).await; // other agent
    publish(&server, "task:created", json!({"agent_id": "a1"})).await; // other event type
    publish(&server, "agent:status", json!({"agent_id": "a2"})).await; // passes
    publish(&server, "sentinel", json!({})).await; // no agent_id: not held back by agent_ids
    let got: Vec<(Value, Value)> = vec![recv_json(&mut ws).await, recv_json(&mut ws).await]
        .into_iter()
        .map(|v| (v["event"].clone(), v["seq"].clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (json!("agent:status"), json!(3)),
            (json!("sentinel"), json!(4))
        ]
    );
}

#[tokio::test]
async fn bad_filter_parameters_get_400_naming_the_parameter() {
    let server = Server::start();
    let t = admin_token();
    let many: Vec<String> = (0..51).map(|i| format!("a{i}")).collect();
    for (query, field) in [
        (format!("agent_ids={}", many.join(",")), "agent_ids"),
        ("project_ids=p1,,p2".to_string(), "project_ids"),
        ("event_types=bad%20type".to_string(), "event_types"),
    ] {
        let (status, body) = refused_handshake(server.url(&format!("/ws?token={t}&{query}"))).await;
        assert_eq!(status, 400, "{query}");
        assert!(body.contains(field), "{body}");
    }
}

#[tokio::test]
async fn the_filter_message_replaces_the_filters_and_is_rate_limited() {
    let server = Server::start();
    let t = admin_token();
    let (mut ws, _) = connect(&server, &format!("channels=dashboard&token={t}")).await;
    recv_json(&mut ws).await;
    send_json(&mut ws, &json!({"type": "filter", "project_ids": ["p1"]})).await;
    let answer = recv_json(&mut ws).await;
    assert_eq!(
        answer,
        json!({"type": "filtered", "agent_ids": [], "project_ids": ["p1"], "event_types": []})
    );
    publish(&server, "x", json!({"project_id": "p2"})).await;
    publish(&server, "y", json!({"project_id": "p1"})).await;
    assert_eq!(recv_json(&mut ws).await["event"], "y");

    send_json(&mut ws, &json!({"type": "filter", "agent_ids": ["bad id"]})).await;
    assert_eq!(recv_json(&mut ws).await["code"], "bad_filter");

    // The limit is 10 per second: a burst of 12 has at least one refused.
    for _ in 0..12 {
        send_json(&mut ws, &json!({"type": "filter"})).await;
    }
    let mut limited = 0;
    for _ in 0..12 {
        let v = recv_json(&mut ws).await;
        if v["code"] == "rate_limited" {
            limited += 1;
        } else {
            assert_eq!(v["type"], "filtered");
        }
    }
    assert!(limited >= 1, "no filter update was rate-limited");
    // An empty filter lets everything through again.
    publish(&server, "z", json!({"project_id": "p2"})).await;
    assert_eq!(recv_json(&mut ws).await["event"], "z");
}

#[tokio::test]
async fn log_lines_are_searched_and_level_filtered_on_the_server() {
    let server = Server::start();
    let t = admin_token();
    let (mut ws, _) = connect(
        &server,
        &format!("channels=task:log&token={t}&search=refused&levels=error,warn"),
    )
    .await;
    recv_json(&mut ws).await;
    let line = |level: &str, text: &str| json!({"channel": "task:log", "event": "log", "data": {"level": level, "line": text}});
    for body in [
        line("info", "connection refused (info, wrong level)"),
        line("error", "disk full (no match)"),
        line("error", "connection refused on :5432"),
        line("warn", "retry: connection refused"),
    ] {
        assert_eq!(server.publish(&body).await.0, 200);
    }
    assert_eq!(
        recv_json(&mut ws).await["data"]["line"],
        "connection refused on :5432"
    );
    assert_eq!(
        recv_json(&mut ws).await["data"]["line"],
        "retry: connection refused"
    );

    send_json(&mut ws, &json!({"type": "filter", "regex": r":\d{4}"})).await;
    let answer = recv_json(&mut ws).await;
    assert_eq!(
        (answer["type"].as_str(), answer["regex"].as_str()),
        (Some("filtered"), Some(r":\d{4}"))
    );
    for body in [
        line("info", "listening on :80"),
        line("debug", "bound :8080"),
    ] {
        assert_eq!(server.publish(&body).await.0, 200);
    }
    assert_eq!(recv_json(&mut ws).await["data"]["line"], "bound :8080");
    send_json(&mut ws, &json!({"type": "filter", "regex": "("})).await;
    let err = recv_json(&mut ws).await;
    assert_eq!(err["code"], "bad_filter");
    assert!(
        err["message"].as_str().unwrap().starts_with("regex"),
        "{err}"
    );
}
