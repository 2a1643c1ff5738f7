//! End to end: the Server-Sent Events fallback (`GET /events`) with a raw HTTP client and with
//! `curl -N`: the same events as WebSocket clients, `id:` positions, `Last-Event-ID` resume,
//! permissions, filters, heartbeat comments, and how a stream ends.

mod support;

use std::process::{Command, Stdio};

use serde_json::{json, Value};
use support::sse::Sse;
use support::*;

#[tokio::test]
async fn events_carry_positions_and_last_event_id_resumes_every_channel() {
    let server = Server::start();
    let t = admin_token();
    let q = format!("/events?channels=task:s1,task:s2&token={t}");
    let mut sse = Sse::connect(&server, &q, "").await;
    let welcome = sse.opened(2).await;
    let epoch = welcome.json()["epoch"].as_str().unwrap().to_owned();
    // `{epoch}:{hash of the channel list}:{seq per channel}`
    let welcome_id = welcome.id.unwrap();
    let (prefix, slots) = welcome_id.rsplit_once(':').unwrap();
    assert!(prefix.starts_with(&format!("{epoch}:")), "{welcome_id}");
    assert_eq!(slots, "0,0");
    let prefix = prefix.to_owned();
    let (mut ws, _) = connect(&server, &format!("channels=task:s1,task:s2&token={t}")).await;
    for _ in 0..2 {
        recv_json(&mut ws).await;
    }

    // Data with a line break in its JSON text still arrives as the same JSON.
    let (status, _) = server
        .publish_raw(
            r#"[{"channel":"task:s1","event":"a","data":{"n":1}},
                {"channel":"task:s2","event":"b","data":{
                  "n":2}},
                {"channel":"task:s1","event":"c","data":"x"}]"#,
        )
        .await;
    assert_eq!(status, 200);
    // Channels are ordered each on its own; the id follows what was written.
    let mut positions = [0u64, 0];
    let (mut from_sse, mut from_ws) = (Vec::new(), Vec::new());
    let mut last_id = String::new();
    for _ in 0..3 {
        let m = sse.data().await;
        let v = m.json();
        let slot = usize::from(v["channel"] == "task:s2");
        positions[slot] = v["seq"].as_u64().unwrap();
        last_id = format!("{prefix}:{},{}", positions[0], positions[1]);
        assert_eq!(m.id.unwrap(), last_id);
        from_sse.push(v.to_string());
        from_ws.push(recv_json(&mut ws).await.to_string());
    }
    assert_eq!(positions, [2, 1]);
    from_sse.sort();
    from_ws.sort();
    assert_eq!(from_sse, from_ws, "the same objects as WebSocket");
    drop(sse);

    // Missed while away: two on s2, one on s1.
    server.publish_one("task:s2", "d", json!(4)).await;
    server.publish_one("task:s1", "e", json!(5)).await;
    server.publish_one("task:s2", "f", json!(6)).await;
    let mut back = Sse::connect(&server, &q, &format!("Last-Event-ID: {last_id}\r\n")).await;
    assert_eq!(back.next().await.unwrap().retry, Some(1000));
    let mut seen = Vec::new();
    let mut replayed = 0;
    while replayed < 2 {
        let v = back.data().await.json();
        match v["type"].as_str() {
            Some("replayed") => {
                assert_eq!(v["recovered"], true, "{v}");
                replayed += 1;
            }
            Some(_) => {}
            None => seen.push((
                v["channel"].as_str().unwrap().to_owned(),
                v["seq"].as_u64().unwrap(),
            )),
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("task:s1".to_owned(), 3),
            ("task:s2".to_owned(), 2),
            ("task:s2".to_owned(), 3)
        ],
        "exactly what was missed, nothing twice"
    );
    // And live again.
    server.publish_one("task:s1", "g", json!(7)).await;
    let m = back.data().await;
    assert_eq!(
        (m.json()["seq"].as_u64(), m.id),
        (Some(4), Some(format!("{prefix}:4,3")))
    );

    // An id from another run (epoch), or made for another channel list, resumes nothing: the
    // client is told to reload. Until that notice is written, the stream's id keeps saying
    // "unknown" (`?`), so a reconnect in between is told again.
    let swapped = format!("/events?channels=task:s2,task:s1&token={t}");
    for (path, id) in [
        (q.as_str(), "0123:abcd:1,1".to_owned()),
        (swapped.as_str(), last_id),
    ] {
        let mut other = Sse::connect(&server, path, &format!("Last-Event-ID: {id}\r\n")).await;
        let first = other.data().await; // welcome
        assert_eq!(first.json()["type"], "welcome");
        assert!(first.id.as_ref().unwrap().ends_with(":?,?"), "{first:?}");
        let mut recovered = Vec::new();
        let mut last = first.id.unwrap();
        while recovered.len() < 2 {
            let m = other.data().await;
            let v = m.json();
            if v["type"] == "replayed" {
                assert!(
                    m.id.as_ref().unwrap().contains('?'),
                    "not settled before it is out"
                );
                recovered.push(v["recovered"].clone());
            }
            last = m.id.unwrap();
        }
        assert_eq!(recovered, vec![json!(false), json!(false)]);
        // Settled after the notices: the next message carries the heads.
        server.publish_one("task:s1", "h", json!(8)).await;
        let m = other.data().await;
        assert!(!m.id.as_ref().unwrap().contains('?'), "{m:?} after {last}");
    }
}

#[tokio::test]
async fn a_drain_tells_sse_clients_then_ends_their_streams() {
    let mut server = Server::start_with(&[("RINGCAST_DRAIN_TIMEOUT_MS", "300")]);
    let mut sse = Sse::connect(
        &server,
        &format!("/events?channels=task:d&token={}", admin_token()),
        "",
    )
    .await;
    sse.opened(1).await;
    server.terminate();
    assert_eq!(sse.data().await.json()["type"], "shutdown");
    assert_eq!(
        sse.data().await.json(),
        json!({"type": "closed", "code": 1012, "reason": "server restarting"})
    );
    assert!(sse.next().await.is_none());
    assert!(server.wait_exit(WAIT).success());
}

#[tokio::test]
async fn permissions_and_filters_are_those_of_websocket() {
    let server = Server::start();
    let (status, _, _) = Sse::open(&server, "/events?channels=project:p1", "").await;
    assert_eq!(status, 401);
    let member = token(json!({"sub": "m", "projects": ["p1"]}));
    let (status, head, _) = Sse::open(
        &server,
        &format!("/events?channels=project:p2&token={member}"),
        "",
    )
    .await;
    assert_eq!(status, 403, "{head}");
    // Authorization: Bearer works too; filters narrow what arrives.
    let mut sse = Sse::connect(
        &server,
        "/events?channels=project:p1&event_types=keep",
        &format!("Authorization: Bearer {member}\r\n"),
    )
    .await;
    sse.opened(1).await;
    for (event, user) in [
        ("drop", None),
        ("keep", Some("someone-else")),
        ("keep", None),
    ] {
        let mut body = json!({"channel": "project:p1", "event": event, "data": {}});
        if let Some(u) = user {
            body["user_id"] = json!(u);
        }
        assert_eq!(server.publish(&body).await.0, 200);
    }
    let v = sse.data().await.json();
    assert_eq!(
        (v["event"].as_str(), v["seq"].as_u64()),
        (Some("keep"), Some(3))
    );
}

#[tokio::test]
async fn heartbeats_are_comments_and_need_no_answer() {
    let server = Server::start_with(&[
        ("RINGCAST_PING_INTERVAL_MS", "50"),
        ("RINGCAST_PONG_TIMEOUT_MS", "50"),
        ("RINGCAST_MAX_MISSED_PONGS", "1"),
    ]);
    let mut sse = Sse::connect(&server, &format!("/events?token={}", admin_token()), "").await;
    sse.opened(0).await;
    // A WebSocket client that never answered would be closed 4002 after ~100 ms; an SSE
    // client cannot answer and is not.
    for _ in 0..10 {
        let m = sse.next().await.expect("still open");
        assert_eq!((m.comment.as_deref(), m.data), (Some("ping"), None));
    }
}

#[tokio::test]
async fn a_stream_ends_with_a_closed_message() {
    let server = Server::start();
    let user = token(json!({"sub": "u7", "channels": ["task:*"]}));
    let mut sse = Sse::connect(
        &server,
        &format!("/events?channels=task:x&token={user}"),
        "",
    )
    .await;
    sse.opened(1).await;
    let (status, _, reply) = server
        .http(
            "POST",
            "/api/v1/admin/disconnect",
            &[("Authorization", &format!("Bearer {API_KEY}"))],
            r#"{"user_id":"u7","reason":"bye"}"#,
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let m = sse.data().await;
    assert_eq!(
        m.json(),
        json!({"type": "closed", "code": 4003, "reason": "bye"})
    );
    assert!(sse.next().await.is_none(), "then the TCP stream ends");
}

#[tokio::test]
async fn the_proposal_alias_and_other_methods() {
    let server = Server::start();
    let user = token(json!({"sub": "u", "channels": ["proposal:*"]}));
    let mut sse = Sse::connect(
        &server,
        &format!("/api/v1/proposals/p9/events?token={user}"),
        "",
    )
    .await;
    let welcome = sse.opened(1).await;
    assert_eq!(welcome.json()["channels"], json!(["proposal:p9"]));
    server
        .publish_one(
            "proposal:p9",
            "validation_start",
            json!({"proposal_id": "p9"}),
        )
        .await;
    assert_eq!(sse.data().await.json()["event"], "validation_start");
    let (status, head, _) = server.http("POST", "/events", &[], "").await;
    assert_eq!(status, 405, "{head}");
    assert!(head.contains("Allow: GET"), "{head}");
}

#[test]
fn curl_follows_a_stream() {
    let server = Server::start();
    let url = server.url(&format!("/events?channels=task:c&token={}", admin_token()));
    let url = url.replacen("ws://", "http://", 1);
    let mut curl = Command::new("curl")
        .args(["-sN", &url])
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl is needed for this test");
    let lines = TimedLines::new(curl.stdout.take().unwrap());
    let next_data = || loop {
        let line = lines.next_line().expect("curl output");
        if let Some(d) = line.strip_prefix("data: ") {
            return serde_json::from_str::<Value>(d).unwrap();
        }
    };
    assert_eq!(next_data()["type"], "welcome");
    assert_eq!(next_data()["type"], "subscribed");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seq = rt.block_on(server.publish_one("task:c", "output", json!({"text": "hi"})));
    let v = next_data();
    assert_eq!(
        (v["seq"].as_u64(), v["data"]["text"].as_str()),
        (Some(seq), Some("hi"))
    );
    let _ = curl.kill();
    let _ = curl.wait();
}

/// A channel the server forgot while the stream was away (history aged out, nobody
/// subscribed) and that was published to again: `Last-Event-ID` still resumes it exactly.
#[tokio::test]
async fn last_event_id_resumes_exactly_across_a_forgotten_channel() {
    let server = Server::start_with(&[("RINGCAST_REPLAY_MAX_AGE_SECS", "1")]);
    let t = token(json!({"sub": "u1", "channels": ["req:*"]}));
    let q = format!("/events?channels=req:s1&token={t}");
    let mut sse = Sse::connect(&server, &q, "").await;
    sse.opened(1).await;
    server.publish_one("req:s1", "e", json!(1)).await;
    server.publish_one("req:s1", "e", json!(2)).await;
    sse.data().await;
    let last_id = sse.data().await.id.expect("an id");
    assert!(last_id.ends_with(":2"), "{last_id}");
    drop(sse);

    // History ages out (1 s) and nobody subscribes: the state is freed.
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = false;
    loop {
        let (_, _, metrics) = server.http("GET", "/metrics", &[], "").await;
        let held = !metrics.contains("ringcast_channels 0\n");
        seen |= held;
        if seen && !held {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    assert_eq!(server.publish_one("req:s1", "e", json!(3)).await, 3);
    let mut back = Sse::connect(&server, &q, &format!("Last-Event-ID: {last_id}\r\n")).await;
    back.opened(1).await;
    let third = back.data().await;
    assert_eq!(third.json()["seq"], 3, "{:?}", third.data);
    assert!(third.id.unwrap().ends_with(":3"));
    let replayed = back.data().await.json();
    assert_eq!(replayed["type"], "replayed");
    assert_eq!(replayed["recovered"], true, "{replayed}");
}
