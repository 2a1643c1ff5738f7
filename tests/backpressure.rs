//! End to end: a client that cannot keep up loses low and normal events (and is told), keeps
//! every critical one, sees only the newest of conflated events, and never slows the others.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

async fn raw(server: &Server, channels: &str) -> RawWs {
    let mut ws = RawWs::connect(
        server.addr,
        &format!("/ws?channels={channels}&token={}", admin_token()),
    )
    .await;
    assert_eq!(ws.recv_json().await["type"], "welcome");
    assert_eq!(ws.recv_json().await["type"], "subscribed");
    ws
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[tokio::test]
async fn a_slow_reader_loses_normal_events_keeps_critical_ones_and_slows_nobody() {
    let server = Server::start_with(&[
        ("RINGCAST_WORKERS", "1"),
        ("RINGCAST_SLOW_CLIENT_TIMEOUT_MS", "60000"),
    ]);
    let t = admin_token();
    let mut fast = Vec::new();
    for _ in 0..100 {
        let (mut ws, _) = connect(&server, &format!("channels=task:bp&token={t}")).await;
        recv_json(&mut ws).await;
        fast.push(ws);
    }
    let mut slow = raw(&server, "task:bp").await; // stops reading from here on
    let pad = "x".repeat(4000);
    const N: u64 = 1500;
    let readers: Vec<_> = fast
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut worst_us = 0u64;
                for seq in 1..=N {
                    let ev = recv_json(&mut ws).await;
                    assert_eq!(ev["seq"], seq);
                    let sent = ev["data"]["t"].as_u64().unwrap();
                    worst_us = worst_us.max(now_us().saturating_sub(sent));
                }
                worst_us
            })
        })
        .collect();
    for i in 1..=N {
        let priority = if i % 10 == 0 { "critical" } else { "normal" };
        let body = json!({"channel": "task:bp", "event": "log", "priority": priority,
                          "data": {"t": now_us(), "i": i, "pad": pad}});
        assert_eq!(server.publish(&body).await.0, 200);
    }
    let mut worst = Vec::new();
    for r in readers {
        worst.push(r.await.unwrap());
    }
    worst.sort();
    let median_worst_ms = worst[worst.len() / 2] as f64 / 1000.0;
    eprintln!("fast readers' worst latency, median over readers: {median_worst_ms:.1} ms");
    assert!(
        median_worst_ms < 250.0,
        "fast readers were held up: {median_worst_ms} ms"
    );
    let rss_kib = server.rss_kib();
    assert!(
        rss_kib < 150 * 1024,
        "server RSS {rss_kib} KiB: the slow reader's backlog is bounded"
    );

    // Now the slow reader reads: gaps, a `dropped` notice, and every critical event.
    let (mut seen, mut dropped) = (Vec::new(), 0u64);
    while seen.last() != Some(&N) {
        let v: Value = slow.recv_json().await;
        match v["type"].as_str() {
            Some("dropped") => dropped += v["count"].as_u64().unwrap(),
            Some(other) => panic!("unexpected {other}: {v}"),
            None => seen.push(v["seq"].as_u64().unwrap()),
        }
    }
    // The notice comes once the queue has drained.
    while dropped == 0 {
        let v = slow.recv_json().await;
        assert_eq!(v["type"], "dropped", "{v}");
        dropped += v["count"].as_u64().unwrap();
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order");
    assert!(
        dropped > 0 && (seen.len() as u64) < N,
        "it fell behind and lost some"
    );
    assert_eq!(
        seen.len() as u64 + dropped,
        N,
        "every event is either delivered or counted"
    );
    for critical in (10..=N).step_by(10) {
        assert!(seen.contains(&critical), "critical {critical} was dropped");
    }
}

#[tokio::test]
async fn a_client_that_stays_behind_is_closed_too_slow() {
    let server = Server::start_with(&[
        ("RINGCAST_SLOW_CLIENT_TIMEOUT_MS", "500"),
        ("RINGCAST_QUEUE_THRESHOLD", "10"),
    ]);
    let mut stuck = raw(&server, "task:stuck").await;
    let pad = "y".repeat(50_000);
    for i in 0..300 {
        let body = json!({"channel": "task:stuck", "event": "big", "priority": "high", "data": {"i": i, "pad": pad}});
        server.publish(&body).await;
    }
    let started = Instant::now();
    // Reading now drains what the kernel holds, then the close.
    let code = loop {
        match stuck.recv().await {
            Some(f) if f.opcode == 0x8 => break f.close_code(),
            Some(_) => continue,
            None => panic!("closed without a close frame"),
        }
    };
    assert_eq!(code, Some(1008));
    // Answered, the connection ends with a FIN.
    stuck.answer_close(1008).await;
    stuck.expect_eof().await;
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_client_that_is_behind_sees_only_the_newest_progress_never_an_older_one() {
    let server = Server::start_with(&[("RINGCAST_SLOW_CLIENT_TIMEOUT_MS", "60000")]);
    let mut slow = raw(&server, "task:p").await;
    let pad = "z".repeat(20_000);
    const N: u64 = 600;
    for v in 1..=N {
        let body = json!({"channel": "task:p", "event": "task:progress", "coalesce_key": "progress:t1",
                          "data": {"current_step": v, "total_steps": N, "pad": pad}});
        assert_eq!(server.publish(&body).await.0, 200);
    }
    let mut steps = Vec::new();
    while steps.last() != Some(&N) {
        let v = slow.recv_json().await;
        if v["type"].is_null() {
            steps.push(v["data"]["current_step"].as_u64().unwrap());
        }
    }
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "an older value after a newer one"
    );
    assert!(
        (steps.len() as u64) < N,
        "nothing was conflated ({} of {N})",
        steps.len()
    );
}

#[tokio::test]
async fn progress_faster_than_every_100_ms_reaches_a_keeping_up_client_at_that_pace_newest_first() {
    // A 1 s interval (default 100 ms) keeps the pace visible even on a loaded machine.
    let server = Server::start_with(&[("RINGCAST_KEY_INTERVAL_MS", "1000")]);
    let t = admin_token();
    let (mut ws, _) = connect(&server, &format!("channels=task:q,dashboard&token={t}")).await;
    recv_json(&mut ws).await;
    recv_json(&mut ws).await;
    let reader = tokio::spawn(async move {
        let (mut steps, mut other_latency_ms) = (Vec::new(), None);
        while steps.last() != Some(&100u64) {
            let v = recv_json(&mut ws).await;
            if v["channel"] == "dashboard" {
                other_latency_ms =
                    Some((now_us() - v["data"]["t"].as_u64().unwrap()) as f64 / 1000.0);
            } else {
                steps.push(v["data"]["current_step"].as_u64().unwrap());
            }
        }
        (steps, other_latency_ms)
    });
    let started = Instant::now();
    for step in 1..=100u64 {
        let body = json!({"channel": "task:q", "event": "task:progress", "coalesce_key": "progress:q",
                          "data": {"current_step": step, "total_steps": 100}});
        server.publish(&body).await;
        if step == 50 {
            let other = json!({"channel": "dashboard", "event": "other", "data": {"t": now_us()}});
            server.publish(&other).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await; // a producer ticking every 10 ms
    }
    let (steps, other) = reader.await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    let most = secs.ceil() as usize + 2;
    assert!(
        steps.len() <= most,
        "{} values in {secs:.2} s: not paced ({steps:?})",
        steps.len()
    );
    assert!(steps.len() >= 2, "{steps:?}");
    // Held behind the paced progress it would wait up to a second.
    let other = other.expect("the other channel's event arrived");
    assert!(other < 500.0, "another channel was held back {other:.1} ms");
}
