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

/// Clients, channels and bytes of `a_client_that_never_reads_costs_at_most_its_queue_bound`.
const STUCK: usize = 4;
const MAX_QUEUE: usize = 2 << 20; // RINGCAST_MAX_QUEUE_BYTES: the least allowed
const PER_CHANNEL: usize = 16 << 20;
const EVENT_PAD: usize = 48 * 1024;

/// Starts a server, subscribes one client to each of `STUCK` channels, publishes
/// `PER_CHANNEL` bytes of critical events to each, and returns the growth of the server's peak
/// RSS over its RSS before the first publish (KiB), with the server and the clients. Readers
/// (`read`) take each round before the next is published, so their queues stay near empty.
async fn peak_growth_kib(read: bool, max_queue: usize) -> (u64, Server, Vec<RawWs>) {
    let server = Server::start_with(&[
        ("RINGCAST_WORKERS", "1"),
        ("RINGCAST_MAX_QUEUE_BYTES", &max_queue.to_string()),
        ("RINGCAST_SLOW_CLIENT_TIMEOUT_MS", "60000"),
        // The ring keeps almost nothing: only the clients' queues can hold the frames.
        ("RINGCAST_REPLAY_MAX_MESSAGES", "4"),
    ]);
    let mut clients = Vec::new();
    for c in 0..STUCK {
        clients.push(raw(&server, &format!("task:stuck{c}")).await);
    }
    let per_batch = 4;
    let rounds = PER_CHANNEL / (EVENT_PAD * per_batch);
    let pad = "p".repeat(EVENT_PAD);
    let before = server.reset_peak_rss();
    for _ in 0..rounds {
        let batch: Vec<Value> = (0..STUCK)
            .flat_map(|c| {
                let pad = &pad;
                (0..per_batch).map(move |_| {
                    json!({"channel": format!("task:stuck{c}"), "event": "big",
                           "priority": "critical", "data": pad})
                })
            })
            .collect();
        assert_eq!(server.publish(&json!(batch)).await.0, 200);
        if read {
            for ws in &mut clients {
                for _ in 0..per_batch {
                    assert!(ws.recv_json().await["seq"].is_u64());
                }
            }
        }
    }
    let peak = server.peak_rss_kib();
    (peak.saturating_sub(before), server, clients)
}

#[tokio::test]
async fn a_client_that_never_reads_costs_at_most_its_queue_bound() {
    // The same publishes to readers that keep up (the control) and to readers that never
    // read. What the never-reading ones may add is their queues: at most MAX_QUEUE bytes of
    // frames each before they are closed 1008, plus the write batch in flight (≤ 256 KiB and a
    // frame). The heap holds more than the bytes a queue counts (48 KiB frames interleaved with
    // the publish path's short-lived buffers; the peak RSS moved in steps of 2 MiB here):
    // measured on 2 cores, 2026-12-01, the excess over the control was 20.5-22.5 MiB with
    // bounds of 2 MiB, 37-43 MiB with 4 MiB, 80 MiB with 8 MiB, and 113 MiB with 64 MiB (no
    // bound in reach: the queues keep all 16 MiB they are sent but what the kernel took), so
    // ~2.7 x the bound per client. The assertion allows 3 x the bound per client plus 4 MiB:
    // it fails if the bound were not enforced (113 MiB) or twice as loose (43 MiB > 28 MiB).
    let (control_kib, _, _) = peak_growth_kib(true, MAX_QUEUE).await;
    let (stuck_kib, _server, mut stuck) = peak_growth_kib(false, MAX_QUEUE).await;
    eprintln!(
        "peak RSS growth: readers {control_kib} KiB, never-reading {stuck_kib} KiB \
         ({STUCK} clients x {PER_CHANNEL} bytes of critical events, max_queue_bytes {MAX_QUEUE})"
    );
    let slack_kib = 4 * 1024;
    let bound_kib = control_kib + (STUCK * 3 * MAX_QUEUE / 1024) as u64 + slack_kib;
    assert!(
        stuck_kib <= bound_kib,
        "never-reading clients grew the server by {stuck_kib} KiB, more than {bound_kib} KiB \
         (control {control_kib} + {STUCK} x 3 x max_queue_bytes + {slack_kib})"
    );
    // They did reach the bound (so the test measured it): each was closed 1008 at it.
    for ws in &mut stuck {
        let code = loop {
            let f = ws.recv().await.expect("a close frame before the TCP close");
            if f.opcode == 0x8 {
                break f.close_code();
            }
        };
        assert_eq!(code, Some(1008));
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
