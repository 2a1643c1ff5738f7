//! End to end: the typed event conventions of docs/events.md. Every event kind is published
//! through `POST /api/v1/publish` with the envelope the doc recommends and checked on real
//! WebSocket clients: its name, its `data` byte for byte, seq rising per channel, project
//! scoping, agent filters, ephemeral events never replayed while durable ones are, the
//! server-computed ETA only on request, and log filtering by level and search.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// One published message, as every subscriber allowed to see it should receive it.
#[derive(Debug, Clone)]
struct Sent {
    channel: String,
    seq: u64,
    event: String,
    /// `data` exactly as it was in the request body.
    data_text: String,
}

impl Sent {
    fn data(&self) -> Value {
        serde_json::from_str(&self.data_text).unwrap()
    }
}

/// The fields of `envelope` (an object) as a JSON object body's leading members.
fn members(envelope: &Value) -> String {
    let text = envelope.to_string();
    assert!(text.starts_with('{'), "an envelope is an object: {text}");
    let inner = &text[1..text.len() - 1];
    if inner.is_empty() {
        String::new()
    } else {
        format!("{inner},")
    }
}

/// Publishes one message whose `data` is the JSON text `data_text`, sent as is, with the
/// `envelope` fields; returns what subscribers should see.
async fn publish_text(
    server: &Server,
    channel: &str,
    event: &str,
    data_text: &str,
    envelope: Value,
) -> Sent {
    let body = format!(
        r#"{{{}"channel":{},"event":{},"data":{data_text}}}"#,
        members(&envelope),
        json!(channel),
        json!(event)
    );
    let (status, reply) = server.publish_raw(&body).await;
    assert_eq!(status, 200, "{body} -> {reply}");
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["channel"], channel, "{reply}");
    Sent {
        channel: channel.into(),
        seq: reply["seq"].as_u64().expect("a seq in the publish answer"),
        event: event.into(),
        data_text: data_text.into(),
    }
}

async fn publish(
    server: &Server,
    channel: &str,
    event: &str,
    data: Value,
    envelope: Value,
) -> Sent {
    publish_text(server, channel, event, &data.to_string(), envelope).await
}

/// Publishes `(event, data, envelope)` on `channel` as one batch; returns the messages.
async fn publish_batch(server: &Server, channel: &str, msgs: &[(&str, Value, Value)]) -> Vec<Sent> {
    let batch: Vec<Value> = msgs
        .iter()
        .map(|(event, data, envelope)| {
            let mut body = envelope.clone();
            body["channel"] = json!(channel);
            body["event"] = json!(event);
            body["data"] = data.clone();
            body
        })
        .collect();
    let (status, reply) = server.publish(&Value::Array(batch)).await;
    assert_eq!(status, 200, "{reply}");
    let seqs: Vec<u64> = reply
        .as_array()
        .expect("a batch is answered with an array")
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "one channel's messages in a batch get consecutive seqs: {seqs:?}"
    );
    msgs.iter()
        .zip(seqs)
        .map(|((event, data, _), seq)| Sent {
            channel: channel.into(),
            seq,
            event: event.to_string(),
            data_text: data.to_string(),
        })
        .collect()
}

/// The next frame, which must be an event frame (an `event` key and no `type`).
async fn recv_event(ws: &mut Ws) -> (String, Value) {
    let (text, v) = recv_text(ws).await;
    assert!(
        v.get("event").is_some() && v.get("type").is_none(),
        "expected an event frame, got {text}"
    );
    (text, v)
}

/// Asserts `text` is exactly the frame of `sent`: the five keys in their documented order and
/// `data` byte for byte as published.
fn assert_frame(text: &str, sent: &Sent) {
    let v: Value = serde_json::from_str(text).unwrap();
    assert_eq!(
        (
            v["channel"].as_str(),
            v["seq"].as_u64(),
            v["event"].as_str()
        ),
        (Some(&*sent.channel), Some(sent.seq), Some(&*sent.event)),
        "{text}"
    );
    assert_eq!(v["data"], sent.data(), "data changed: {text}");
    let ts = v["ts"].as_u64().expect("ts");
    let expected = format!(
        r#"{{"channel":{},"seq":{},"event":{},"ts":{ts},"data":{}}}"#,
        json!(sent.channel),
        sent.seq,
        json!(sent.event),
        sent.data_text
    );
    assert_eq!(text, expected);
}

/// Reads the next `expected.len()` frames and asserts they are exactly `expected`, in order
/// per channel (frames of different channels may interleave). Returns the frames as received.
async fn assert_next(ws: &mut Ws, expected: &[Sent]) -> Vec<String> {
    let mut received = Vec::new();
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for _ in 0..expected.len() {
        let (text, v) = recv_event(ws).await;
        got.entry(v["channel"].as_str().unwrap().to_string())
            .or_default()
            .push(text.clone());
        received.push(text);
    }
    let mut want: BTreeMap<&str, Vec<&Sent>> = BTreeMap::new();
    for s in expected {
        want.entry(&s.channel).or_default().push(s);
    }
    for (channel, sents) in &want {
        assert!(
            sents.windows(2).all(|w| w[0].seq < w[1].seq),
            "{channel}: seqs rise in publish order"
        );
        let texts = got
            .get(*channel)
            .unwrap_or_else(|| panic!("nothing on {channel}; got {received:#?}"));
        assert_eq!(
            texts.len(),
            sents.len(),
            "{channel}: expected {sents:#?}, got {texts:#?}"
        );
        for (text, sent) in texts.iter().zip(sents) {
            assert_frame(text, sent);
        }
    }
    received
}

/// Connects with `query` and reads the `subscribed` frames of its `n` channels (any order):
/// returns the socket, the server epoch and each channel's hand-over seq.
async fn open(server: &Server, query: &str, n: usize) -> (Ws, String, BTreeMap<String, u64>) {
    let (mut ws, welcome) = connect(server, query).await;
    let mut subscribed = BTreeMap::new();
    for _ in 0..n {
        let f = recv_json(&mut ws).await;
        assert_eq!(f["type"], "subscribed", "{f}");
        subscribed.insert(
            f["channel"].as_str().unwrap().to_string(),
            f["seq"].as_u64().unwrap(),
        );
    }
    let epoch = welcome["epoch"].as_str().unwrap().to_string();
    (ws, epoch, subscribed)
}

/// Reconnects to `channel` after `last` (handshake `last_sequence_id` + `epoch`): returns the
/// `subscribed` seq, the re-sent event frames and the `replayed` frame.
async fn resume(
    server: &Server,
    token: &str,
    channel: &str,
    last: u64,
    epoch: &str,
) -> (u64, Vec<String>, Value) {
    let query = format!("channels={channel}&token={token}&last_sequence_id={last}&epoch={epoch}");
    let (mut ws, _) = connect(server, &query).await;
    let sub = recv_json(&mut ws).await;
    assert_eq!(
        (sub["type"].as_str(), sub["channel"].as_str()),
        (Some("subscribed"), Some(channel)),
        "{sub}"
    );
    let mut events = Vec::new();
    loop {
        let (text, v) = recv_text(&mut ws).await;
        if v["type"] == "replayed" {
            return (sub["seq"].as_u64().unwrap(), events, v);
        }
        assert!(
            v.get("event").is_some(),
            "only events before replayed: {text}"
        );
        events.push(text);
    }
}

fn only<'a>(sent: impl IntoIterator<Item = &'a Sent>, keep: impl Fn(&Sent) -> bool) -> Vec<Sent> {
    sent.into_iter().filter(|s| keep(s)).cloned().collect()
}

/// events.md "Task lifecycle": every event on `project:42` (and `task:t9`, and the dashboard
/// list update on `dashboard`) reaches a member of project 42 verbatim and in seq order, and
/// none of the project-scoped ones reaches a client whose token lacks the project — live or in
/// a replay.
#[tokio::test]
async fn task_lifecycle_reaches_project_members_verbatim_and_never_outsiders() {
    let server = Server::start();
    let member =
        token(json!({"sub": "u1", "projects": ["42"], "channels": ["task:t9", "dashboard"]}));
    let outsider =
        token(json!({"sub": "u2", "projects": ["43"], "channels": ["task:t9", "dashboard"]}));
    // The project channel itself is closed to the outsider.
    let (status, body) =
        refused_handshake(server.url(&format!("/ws?channels=project:42&token={outsider}"))).await;
    assert_eq!(
        (status, body.as_str()),
        (403, r#"{"error":"not allowed to subscribe to project:42"}"#),
        "outsider on project:42"
    );
    let (mut m, epoch, subs) = open(
        &server,
        &format!("channels=project:42,task:t9,dashboard&token={member}"),
        3,
    )
    .await;
    assert_eq!(subs.values().collect::<Vec<_>>(), [&0, &0, &0], "{subs:?}");
    let (mut o, _, _) = open(
        &server,
        &format!("channels=task:t9,dashboard&token={outsider}"),
        2,
    )
    .await;

    let pr = "https://git.example/acme/app/pull/17";
    let lifecycle = [
        (
            "task:created",
            json!({"task_id": "t9", "title": "Fix login", "created_by": "u1"}),
            json!({"project_id": "42"}),
        ),
        ("task:analyzing", json!({"task_id": "t9"}), json!({})),
        (
            "task:clarification_needed",
            json!({"task_id": "t9", "question": "Which browser?"}),
            json!({"priority": "high"}),
        ),
        (
            "task:dispatched",
            json!({"task_id": "t9", "agent_id": "a3"}),
            json!({"agent_id": "a3"}),
        ),
        (
            "task:pr_opened",
            json!({"task_id": "t9", "pr_url": pr}),
            json!({}),
        ),
        (
            "task:pr_merged",
            json!({"task_id": "t9", "pr_url": pr}),
            json!({}),
        ),
        (
            "task:failed",
            json!({"task_id": "t9", "error": "tests failed"}),
            json!({"priority": "critical"}),
        ),
        (
            "task:event_added",
            json!({"task_id": "t9", "kind": "comment", "text": "Läuft… \"quoted\"\nnext line"}),
            json!({}),
        ),
    ];
    let mut sent = Vec::new();
    for (event, data, envelope) in lifecycle {
        // On the project channel, with the doc's envelope...
        sent.push(publish(&server, "project:42", event, data.clone(), envelope.clone()).await);
        // ...and on the task channel, which anyone holding `task:t9` may subscribe to: there
        // `project_id` keeps it within the project.
        let mut scoped = envelope;
        scoped["project_id"] = json!("42");
        sent.push(publish(&server, "task:t9", event, data, scoped).await);
    }
    let list = json!({"project_id": "42", "count": 17});
    sent.push(
        publish(
            &server,
            "dashboard",
            "dashboard:task_list_updated",
            list,
            json!({"project_id": "42"}),
        )
        .await,
    );
    for channel in ["project:42", "task:t9"] {
        let seqs: Vec<u64> = only(&sent, |s| s.channel == channel)
            .iter()
            .map(|s| s.seq)
            .collect();
        assert_eq!(
            seqs,
            (1..=8).collect::<Vec<_>>(),
            "{channel}: one seq per message from 1"
        );
    }
    assert_next(&mut m, &sent).await;

    // The outsider's next events are its own project's: nothing of project 42 came before.
    let theirs = vec![
        publish(
            &server,
            "task:t9",
            "task:analyzing",
            json!({"task_id": "t9"}),
            json!({"project_id": "43"}),
        )
        .await,
        publish(
            &server,
            "dashboard",
            "dashboard:task_list_updated",
            json!({"project_id": "43", "count": 2}),
            json!({"project_id": "43"}),
        )
        .await,
    ];
    assert_eq!(
        (theirs[0].seq, theirs[1].seq),
        (9, 2),
        "the outsider sees a gap, as §7 says"
    );
    assert_next(&mut o, &theirs).await;
    // And the member's next are project 42's again: project 43's did not reach it.
    let ours = vec![
        publish(
            &server,
            "task:t9",
            "task:pr_merged",
            json!({"task_id": "t9", "pr_url": pr}),
            json!({"project_id": "42"}),
        )
        .await,
        publish(
            &server,
            "dashboard",
            "dashboard:task_list_updated",
            json!({"project_id": "42", "count": 16}),
            json!({"project_id": "42"}),
        )
        .await,
    ];
    assert_next(&mut m, &ours).await;

    // Replays keep the scope: each resumes `task:t9` from the start and gets only its own.
    let (at, replay, replayed) = resume(&server, &outsider, "task:t9", 0, &epoch).await;
    assert_eq!(at, 10);
    assert_eq!(replay.len(), 1, "{replay:#?}");
    assert_frame(&replay[0], &theirs[0]);
    assert_eq!(
        replayed,
        json!({"type": "replayed", "channel": "task:t9", "recovered": true, "count": 1})
    );
    let (at, replay, replayed) = resume(&server, &member, "task:t9", 0, &epoch).await;
    assert_eq!(at, 10);
    let mut expected = only(&sent, |s| s.channel == "task:t9");
    expected.push(ours[0].clone());
    assert_eq!(replay.len(), expected.len(), "{replay:#?}");
    for (text, s) in replay.iter().zip(&expected) {
        assert_frame(text, s);
    }
    assert_eq!(replayed["count"], 9);
    assert_eq!(replayed["recovered"], true);
}

/// events.md "Agent status": `agent:status` through every status, on `agent:{id}` and
/// `project:{id}`; `agent_ids` (handshake or `filter` message) narrows it by the envelope's
/// `agent_id`.
#[tokio::test]
async fn agent_status_reaches_every_subscriber_and_agent_ids_narrow_it() {
    let server = Server::start();
    let viewer = token(json!({"sub": "ops", "projects": ["42"], "channels": ["agent:*"]}));
    let (mut all, _, _) = open(&server, &format!("channels=project:42&token={viewer}"), 1).await;
    let (mut narrow, _, _) = open(
        &server,
        &format!("channels=project:42&agent_ids=a3,a4&token={viewer}"),
        1,
    )
    .await;
    let (mut by_message, _, _) =
        open(&server, &format!("channels=project:42&token={viewer}"), 1).await;
    send_json(
        &mut by_message,
        &json!({"type": "filter", "agent_ids": ["a5"]}),
    )
    .await;
    assert_eq!(
        recv_json(&mut by_message).await,
        json!({"type": "filtered", "agent_ids": ["a5"], "project_ids": [], "event_types": []})
    );
    let (mut a3_channel, _, _) =
        open(&server, &format!("channels=agent:a3&token={viewer}"), 1).await;

    let transitions = [
        ("a3", "idle", "working"),
        ("a3", "working", "stuck"),
        ("a3", "stuck", "failed"),
        ("a3", "failed", "idle"),
        ("a4", "idle", "working"),
        ("a4", "working", "completed"),
        ("a5", "idle", "working"),
        ("a5", "working", "cancelled"),
    ];
    let mut on_project: Vec<(&str, Sent)> = Vec::new();
    let mut on_a3 = Vec::new();
    for (agent, old, new) in transitions {
        let data = json!({"agent_id": agent, "old_status": old, "new_status": new});
        let mut envelope = json!({"agent_id": agent, "project_id": "42"});
        if matches!(new, "stuck" | "failed") {
            envelope["priority"] = json!("critical");
        }
        let s = publish(
            &server,
            &format!("agent:{agent}"),
            "agent:status",
            data.clone(),
            envelope.clone(),
        )
        .await;
        if agent == "a3" {
            on_a3.push(s);
        }
        on_project.push((
            agent,
            publish(&server, "project:42", "agent:status", data, envelope).await,
        ));
    }
    let seqs: Vec<u64> = on_project.iter().map(|(_, s)| s.seq).collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
    // Published as events.md shows it, with the agent only inside `data`: filters read the
    // envelope's `agent_id`, and a message without one is not held back (protocol.md §6).
    let bare = publish(
        &server,
        "project:42",
        "agent:status",
        json!({"agent_id": "a9", "old_status": "idle", "new_status": "working"}),
        json!({"project_id": "42"}),
    )
    .await;
    // Markers: whatever a filter held back would have come before them.
    let marker = publish(&server, "project:42", "marker", json!({"n": 1}), json!({})).await;
    let a3_marker = publish(&server, "agent:a3", "marker", json!({"n": 2}), json!({})).await;

    let expect = |agents: &[&str]| {
        let mut v: Vec<Sent> = on_project
            .iter()
            .filter(|(a, _)| agents.contains(a))
            .map(|(_, s)| s.clone())
            .collect();
        v.push(bare.clone());
        v.push(marker.clone());
        v
    };
    assert_next(&mut all, &expect(&["a3", "a4", "a5"])).await;
    assert_next(&mut narrow, &expect(&["a3", "a4"])).await;
    assert_next(&mut by_message, &expect(&["a5"])).await;
    on_a3.push(a3_marker);
    let seqs: Vec<u64> = on_a3.iter().map(|s| s.seq).collect();
    assert_eq!(
        seqs,
        (1..=5).collect::<Vec<_>>(),
        "agent:a3 has its own seqs"
    );
    assert_next(&mut a3_channel, &on_a3).await;
}

/// events.md "Progress": `task:progress` with `coalesce_key` and `ephemeral` is paced to the
/// newest value, never replayed; `compute_eta: true` adds `eta_seconds` (absent on a key's
/// first step, from the observed rate after, 0 at the end) and nothing else; without it, or
/// when `data` is not a progress object or has its own ETA, `data` is exactly as published.
#[tokio::test]
async fn progress_is_paced_never_replayed_and_gets_an_eta_only_on_request() {
    let server = Server::start(); // key_interval_ms: the default 100
    let t = token(json!({"sub": "u1", "channels": ["task:*"]}));
    let (mut ws, epoch, _) = open(&server, &format!("channels=task:t9&token={t}"), 1).await;
    let progress = |step: u64, total: u64| {
        json!({"task_id": "t9", "current_step": step, "total_steps": total,
               "progress_percent": step * 100 / total, "message": format!("step {step}")})
    };
    let paced = json!({"coalesce_key": "progress:t9", "ephemeral": true});

    // A burst faster than the pace: the client sees rising steps ending with the newest.
    let burst: Vec<(&str, Value, Value)> = (1..=10)
        .map(|i| ("task:progress", progress(i, 10), paced.clone()))
        .collect();
    let burst = publish_batch(&server, "task:t9", &burst).await;
    let mut seen = Vec::new();
    while seen.last() != Some(&burst[9].seq) {
        let (text, v) = recv_event(&mut ws).await;
        let seq = v["seq"].as_u64().unwrap();
        let sent = burst
            .iter()
            .find(|s| s.seq == seq)
            .expect("a published seq");
        assert_frame(&text, sent);
        seen.push(seq);
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "an older value after a newer one: {seen:?}"
    );
    assert!(
        seen.len() < burst.len(),
        "the burst was not paced: {seen:?}"
    );

    // ETA on request. The first step of a key has no rate yet: data stays as published.
    let eta = json!({"coalesce_key": "progress:t9:eta", "ephemeral": true, "compute_eta": true});
    let t1 = Instant::now();
    let first = publish(
        &server,
        "task:t9",
        "task:progress",
        progress(1, 100),
        eta.clone(),
    )
    .await;
    let t1_end = Instant::now();
    let (text, _) = recv_event(&mut ws).await;
    assert_frame(&text, &first);
    // The rate needs time to pass between two steps.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t2 = Instant::now();
    let second = publish(
        &server,
        "task:t9",
        "task:progress",
        progress(2, 100),
        eta.clone(),
    )
    .await;
    let t2_end = Instant::now();
    let (_, v) = recv_event(&mut ws).await;
    assert_eq!(
        (v["seq"].as_u64(), v["event"].as_str()),
        (Some(second.seq), Some("task:progress"))
    );
    let mut data = v["data"].clone();
    let got = data
        .as_object_mut()
        .unwrap()
        .remove("eta_seconds")
        .expect("an ETA on the second step");
    assert_eq!(data, second.data(), "only eta_seconds is added");
    // 1 step in `elapsed`, 98 to go: ceil(98 × elapsed) seconds, elapsed as the server saw it
    // (between our request bounds, ± its millisecond clock).
    let bound = |ms: f64| (98.0 * ms / 1000.0).ceil() as u64;
    let least = bound((t2 - t1_end).as_secs_f64() * 1000.0 - 1.0);
    let most = bound((t2_end - t1).as_secs_f64() * 1000.0 + 1.0);
    let got = got.as_u64().expect("eta_seconds is a whole number");
    assert!(
        (least..=most).contains(&got),
        "eta {got} s, expected {least}..={most}"
    );
    // Done: 0.
    let last = publish(
        &server,
        "task:t9",
        "task:progress",
        progress(100, 100),
        eta.clone(),
    )
    .await;
    let (_, v) = recv_event(&mut ws).await;
    assert_eq!(v["seq"].as_u64(), Some(last.seq));
    let mut data = v["data"].clone();
    assert_eq!(
        data.as_object_mut().unwrap().remove("eta_seconds"),
        Some(json!(0))
    );
    assert_eq!(data, last.data());

    // Untouched, byte for byte: a progress event with its own ETA, one without compute_eta,
    // and data that is not a progress object.
    for (data_text, envelope) in [
        (
            r#"{ "task_id": "t9", "current_step": 3, "total_steps": 10, "eta_seconds": 42 }"#,
            eta.clone(),
        ),
        (
            r#"{ "task_id": "t9", "current_step": 4, "total_steps": 10, "message": "Running tests" }"#,
            paced.clone(),
        ),
        (
            r#"{ "task_id": "t9", "current_step": 5, "message": "no total" }"#,
            eta.clone(),
        ),
    ] {
        let sent = publish_text(&server, "task:t9", "task:progress", data_text, envelope).await;
        let (text, _) = recv_event(&mut ws).await;
        assert_frame(&text, &sent);
    }

    // Progress never fills the replay ring: a resume from the start re-sends nothing.
    let (at, replay, replayed) = resume(&server, &t, "task:t9", 0, &epoch).await;
    assert_eq!(at, burst[9].seq + 6);
    assert!(replay.is_empty(), "{replay:#?}");
    assert_eq!(
        replayed,
        json!({"type": "replayed", "channel": "task:t9", "recovered": true, "count": 0})
    );
}

/// events.md "Validation and LLM token streaming": every event arrives live in order; a resume
/// (`last_sequence_id` + `epoch`) re-sends the durable ones byte for byte (original `ts`
/// included) and never the ephemeral `output` and `token` events.
#[tokio::test]
async fn validation_and_token_streams_arrive_live_and_only_durable_events_replay() {
    let server = Server::start();
    let t = token(json!({"sub": "u1", "channels": ["task:*"]}));
    let (mut ws, epoch, _) = open(&server, &format!("channels=task:t9&token={t}"), 1).await;
    let ephemeral = json!({"ephemeral": true});
    let token_envelope = json!({"ephemeral": true, "priority": "low"});
    let ch = "task:t9";
    let mut sent = Vec::new();
    sent.push(
        publish(
            &server,
            ch,
            "validation_start",
            json!({"task_id": "t9", "validator": "pytest"}),
            json!({}),
        )
        .await,
    );
    sent.push(
        publish(
            &server,
            ch,
            "output",
            json!({"task_id": "t9", "stream": "stdout", "text": "collected 12 items\n"}),
            ephemeral.clone(),
        )
        .await,
    );
    sent.push(publish(&server, ch, "output", json!({"task_id": "t9", "stream": "stderr", "text": "FAILED test_login.py::test_safari\n"}), ephemeral.clone()).await);
    sent.push(
        publish(
            &server,
            ch,
            "validation_error",
            json!({"task_id": "t9", "error": "3 failed"}),
            json!({"priority": "high"}),
        )
        .await,
    );
    sent.push(
        publish(
            &server,
            ch,
            "validation_complete",
            json!({"task_id": "t9", "passed": false, "duration_ms": 5120}),
            json!({}),
        )
        .await,
    );
    let iteration_2 = publish(
        &server,
        ch,
        "iteration_start",
        json!({"task_id": "t9", "iteration": 2}),
        json!({}),
    )
    .await;
    sent.push(iteration_2.clone());
    // Tokens come fast: one batch, consecutive seqs.
    let tokens: Vec<(&str, Value, Value)> =
        ["def ", "login", "(user", "):\n", "    return ", "user.ok"]
            .iter()
            .map(|text| {
                (
                    "token",
                    json!({"task_id": "t9", "iteration": 2, "text": text}),
                    token_envelope.clone(),
                )
            })
            .collect();
    sent.extend(publish_batch(&server, ch, &tokens).await);
    sent.push(
        publish(
            &server,
            ch,
            "iteration_complete",
            json!({"task_id": "t9", "iteration": 2, "tokens": 812}),
            json!({}),
        )
        .await,
    );
    sent.push(
        publish(
            &server,
            ch,
            "iteration_start",
            json!({"task_id": "t9", "iteration": 3}),
            json!({}),
        )
        .await,
    );
    sent.push(
        publish(
            &server,
            ch,
            "token",
            json!({"task_id": "t9", "iteration": 3, "text": "class "}),
            token_envelope.clone(),
        )
        .await,
    );
    sent.push(
        publish(
            &server,
            ch,
            "iteration_cancelled",
            json!({"task_id": "t9", "iteration": 3, "reason": "user"}),
            json!({}),
        )
        .await,
    );
    let seqs: Vec<u64> = sent.iter().map(|s| s.seq).collect();
    assert_eq!(
        seqs,
        (1..=sent.len() as u64).collect::<Vec<_>>(),
        "ephemeral or not, one seq each"
    );

    let live = assert_next(&mut ws, &sent).await;
    let is_durable = |s: &Sent| !matches!(&*s.event, "output" | "token");
    let durable_live: Vec<&String> = sent
        .iter()
        .zip(&live)
        .filter(|(s, _)| is_durable(s))
        .map(|(_, t)| t)
        .collect();
    assert_eq!(durable_live.len(), 7);

    let last = sent.len() as u64;
    let (at, replay, replayed) = resume(&server, &t, ch, 0, &epoch).await;
    assert_eq!(at, last);
    assert_eq!(
        replay.iter().collect::<Vec<_>>(),
        durable_live,
        "the durable events, as first sent"
    );
    assert_eq!(
        replayed,
        json!({"type": "replayed", "channel": ch, "recovered": true, "count": 7})
    );

    // From the middle: after iteration 2 started, its tokens are skipped, the rest re-sent.
    let (at, replay, replayed) = resume(&server, &t, ch, iteration_2.seq, &epoch).await;
    assert_eq!(at, last);
    let after: Vec<String> = sent
        .iter()
        .zip(&live)
        .filter(|(s, _)| s.seq > iteration_2.seq && is_durable(s))
        .map(|(_, t)| t.clone())
        .collect();
    let events: Vec<Value> = replay
        .iter()
        .map(|t| serde_json::from_str::<Value>(t).unwrap()["event"].clone())
        .collect();
    assert_eq!(
        events,
        [
            json!("iteration_complete"),
            json!("iteration_start"),
            json!("iteration_cancelled")
        ]
    );
    assert_eq!(replay, after);
    assert_eq!(
        replayed,
        json!({"type": "replayed", "channel": ch, "recovered": true, "count": 3})
    );
}

/// events.md "Logs": lines `{"level":…,"line":…}` on `logs:{id}` / `task:{id}`, narrowed on
/// the server by `search` and `levels` (handshake), then by a `filter` message (`levels`,
/// `regex`); events without a `level` pass a levels filter.
#[tokio::test]
async fn log_lines_are_narrowed_by_level_and_search() {
    let server = Server::start();
    let t = token(json!({"sub": "u1", "channels": ["logs:*", "task:*"]}));
    let (mut searching, _, _) = open(
        &server,
        &format!("channels=logs:t9&search=refused&levels=error,warn&token={t}"),
        1,
    )
    .await;
    let (mut errors, _, _) = open(
        &server,
        &format!("channels=logs:t9,task:t9&levels=error&token={t}"),
        2,
    )
    .await;
    let line = |level: &str, text: &str| json!({"level": level, "line": text});
    let mut logs = Vec::new();
    for (level, text) in [
        ("info", "connection refused (retrying)"),
        ("error", "disk full"),
        ("error", "connection refused on :5432"),
        ("warn", "retry 2: connection refused"),
        ("debug", "refused: socket detail"),
    ] {
        logs.push(publish(&server, "logs:t9", "log", line(level, text), json!({})).await);
    }
    let start = publish(
        &server,
        "task:t9",
        "validation_start",
        json!({"task_id": "t9", "validator": "pytest"}),
        json!({}),
    )
    .await;
    let info = publish(
        &server,
        "task:t9",
        "log",
        line("info", "collected 12 items"),
        json!({}),
    )
    .await;
    let logs_marker = publish(
        &server,
        "logs:t9",
        "log",
        line("error", "marker: connection refused"),
        json!({}),
    )
    .await;
    let task_marker = publish(
        &server,
        "task:t9",
        "log",
        line("error", "marker"),
        json!({}),
    )
    .await;
    assert_eq!((info.seq, task_marker.seq), (2, 3));

    assert_next(
        &mut searching,
        &[logs[2].clone(), logs[3].clone(), logs_marker.clone()],
    )
    .await;
    assert_next(
        &mut errors,
        &[
            logs[1].clone(),
            logs[2].clone(),
            logs_marker,
            start,
            task_marker,
        ],
    )
    .await;

    // A filter message replaces all filters: levels only (the search is gone)...
    send_json(
        &mut searching,
        &json!({"type": "filter", "levels": ["info"]}),
    )
    .await;
    assert_eq!(
        recv_json(&mut searching).await,
        json!({"type": "filtered", "agent_ids": [], "project_ids": [], "event_types": [], "levels": ["info"]})
    );
    publish(
        &server,
        "logs:t9",
        "log",
        line("warn", "connection refused"),
        json!({}),
    )
    .await;
    let next = publish(
        &server,
        "logs:t9",
        "log",
        line("info", "listening on :80"),
        json!({}),
    )
    .await;
    assert_next(&mut searching, &[next]).await;
    // ...then a regular expression over the data's JSON text.
    send_json(
        &mut searching,
        &json!({"type": "filter", "regex": r":\d{4}\b"}),
    )
    .await;
    let answer = recv_json(&mut searching).await;
    assert_eq!(
        (answer["type"].as_str(), answer["regex"].as_str()),
        (Some("filtered"), Some(r":\d{4}\b"))
    );
    assert!(
        answer.get("levels").is_none() && answer.get("search").is_none(),
        "{answer}"
    );
    publish(
        &server,
        "logs:t9",
        "log",
        line("debug", "bound :80"),
        json!({}),
    )
    .await;
    let next = publish(
        &server,
        "logs:t9",
        "log",
        line("debug", "bound :8080"),
        json!({}),
    )
    .await;
    assert_next(&mut searching, &[next]).await;
}
