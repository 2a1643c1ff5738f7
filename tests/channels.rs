//! End to end: channel state is freed once a channel has no history and no subscribers, so
//! names used once (request ids, `terminal:{task}`) cost nothing afterwards; a client resuming
//! across that freed state is never handed a wrong seq.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// The shortest replay age the settings allow, so history ages out within the test.
const SHORT_REPLAY: [(&str, &str); 1] = [("RINGCAST_REPLAY_MAX_AGE_SECS", "1")];

/// The tests here time history ageing out on a small machine: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Channel states the node holds (`ringcast_channels` in /metrics).
async fn channel_states(server: &Server) -> u64 {
    let (status, _, metrics) = server.http("GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("ringcast_channels "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("ringcast_channels in {metrics}"))
}

/// Waits (bounded) until the node has reported holding channel states and then none.
async fn await_all_freed(server: &Server, within: Duration) {
    let deadline = Instant::now() + within;
    let mut seen = false;
    loop {
        let n = channel_states(server).await;
        seen |= n > 0;
        if seen && n == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still {n} channel states after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes one durable message to each of `names` distinct channels `prefix{i}`, in batches
/// of the most one request may carry; returns the highest RSS seen between batches.
async fn publish_distinct(server: &Server, prefix: &str, names: usize) -> u64 {
    const BATCH: usize = 10_000;
    let mut peak = server.rss_kib();
    for start in (0..names).step_by(BATCH) {
        let mut body = String::with_capacity(BATCH * 48);
        body.push('[');
        for i in start..(start + BATCH).min(names) {
            if i > start {
                body.push(',');
            }
            body.push_str(&format!(
                r#"{{"channel":"{prefix}{i:07}","event":"e","data":1}}"#
            ));
        }
        body.push(']');
        let (status, reply) = server.publish_raw(&body).await;
        assert_eq!(status, 200, "{reply}");
        peak = peak.max(server.rss_kib());
    }
    peak
}

#[tokio::test]
async fn a_million_channel_names_leave_rss_where_it_started() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let server = Server::start_with(&SHORT_REPLAY);
    let began = Instant::now();
    // Warm-up: the same path once at a small scale, so buffers and allocator pools that stay
    // for the process's life are already counted in the baseline.
    publish_distinct(&server, "warm:", 20_000).await;
    await_all_freed(&server, WAIT).await;
    let before = server.rss_kib();

    let peak = publish_distinct(&server, "req:", 1_000_000).await;
    let published_in = began.elapsed();
    // "Where it started": within max(10 MiB, 20 %) of the post-warm-up RSS.
    let bound = before + (10 * 1024).max(before / 5);
    assert!(
        peak > bound,
        "publishing 1M channels never moved RSS past the bound ({before} → {peak} KiB): \
         the test would not see a leak"
    );
    await_all_freed(&server, Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    let after = loop {
        let rss = server.rss_kib();
        if rss <= bound || Instant::now() > deadline {
            break rss;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "RSS KiB: before {before}, peak {peak}, after {after} (bound {bound}); \
         published in {published_in:?}"
    );
    assert!(
        after <= bound,
        "RSS did not come back: before {before}, peak {peak}, after {after} KiB"
    );
}

/// Frames until `replayed` for `channel`: (the `replayed` frame, the event seqs before it).
async fn until_replayed(ws: &mut Ws) -> (Value, Vec<u64>) {
    let (replayed, before) = recv_until_type(ws, "replayed").await;
    let seqs = before
        .iter()
        .filter(|f| f["event"].is_string())
        .filter_map(|f| f["seq"].as_u64())
        .collect();
    (replayed, seqs)
}

#[tokio::test]
async fn a_resume_across_freed_state_is_exact_or_not_recovered() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let server = Server::start_with(&SHORT_REPLAY);
    let ch = "req:r1";
    let t = token(json!({"sub": "u1", "channels": ["req:*"]}));
    let (mut ws, welcome) = connect(&server, &format!("channels={ch}&token={t}")).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    assert_eq!(recv_json(&mut ws).await["type"], "subscribed");
    for i in 1..=3u64 {
        assert_eq!(server.publish_one(ch, "e", json!(i)).await, i);
        assert_eq!(recv_json(&mut ws).await["seq"], i);
    }
    drop(ws);
    // History ages out (1 s) and nobody subscribes: the state is freed.
    await_all_freed(&server, WAIT).await;

    // A second life of the channel goes on from the first one's seq, never back to 1.
    let fourth = server.publish_one(ch, "e", json!(4)).await;
    let fifth = server.publish_one(ch, "e", json!(5)).await;
    assert_eq!((fourth, fifth), (4, 5));

    // Seq 3 was lost (aged out) for a client at 2: not recovered, nothing replayed.
    let q = format!("channels={ch}&token={t}&last_sequence_id=2&epoch={epoch}");
    let (mut behind, _) = connect(&server, &q).await;
    let (replayed, seqs) = until_replayed(&mut behind).await;
    assert_eq!(replayed["recovered"], false, "{replayed}");
    assert!(seqs.is_empty(), "{seqs:?}");

    // A client that had everything of the first life gets exactly the second life's events.
    let q = format!("channels={ch}&token={t}&last_sequence_id=3&epoch={epoch}");
    let (mut current, _) = connect(&server, &q).await;
    let (replayed, seqs) = until_replayed(&mut current).await;
    assert_eq!(replayed["recovered"], true, "{replayed}");
    assert_eq!(seqs, vec![4, 5], "{replayed}");
}
