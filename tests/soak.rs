//! A bounded soak: mixed publishers, subscriber churn, slow readers and bad clients against one
//! server for `RINGCAST_SOAK_SECS` (default 120). It checks that the server's memory and open
//! file descriptors stay flat — after a warm-up, the last third's peak is within a stated bound
//! of the first third's — and that the well-behaved subscribers lost nothing: every seq of every
//! channel arrives, in order.
//!
//! `RINGCAST_SOAK_SECS=1800 cargo test --release --test soak -- --nocapture` is the long run
//! (docs/benchmarks.md); the default load is modest so it fits a shared 2-core CI box.

mod support;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

/// Small events (two channels, alternating), large events, and bursts.
const CHANNELS: [&str; 4] = ["soak:small:0", "soak:small:1", "soak:big", "soak:burst"];
const SUBSCRIBERS: usize = 6;
const SLOW_READERS: usize = 2;
/// Half-sent heads held open at once (well under any per-IP cap).
const HELD_HEADS: usize = 8;
/// A resource sample every this often.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// RSS may end up to this much above the first third's peak: +15 % or +8 MiB, the larger.
const RSS_GROWTH_PERCENT: u64 = 15;
const RSS_GROWTH_KIB: u64 = 8 * 1024;
/// Open fds may end up to this many above the first third's peak (connections come and go).
const FD_GROWTH: u64 = 32;

#[derive(Default)]
struct Counts {
    published: AtomicU64,
    churned: AtomicU64,
    slow_cut: AtomicU64,
    bad: AtomicU64,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: u64,
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/<pid>/fd")
        .count() as u64
}

fn soak_token() -> String {
    token(json!({"sub": "soak", "channels": ["soak:*"]}))
}

fn all_channels() -> String {
    CHANNELS.join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_stay_flat_and_nothing_is_lost_under_mixed_abuse() {
    let secs: u64 = std::env::var("RINGCAST_SOAK_SECS")
        .ok()
        .map(|s| {
            s.parse()
                .expect("RINGCAST_SOAK_SECS is a number of seconds")
        })
        .unwrap_or(120);
    assert!(secs >= 30, "a soak shorter than 30 s says nothing");
    // Short histories fill during the warm-up, so what is measured afterwards is the steady
    // state. Slow readers: events wait for them up to a minute (not 5 s), so their queues
    // hold more, and one that stays behind 5 s (not 30) is closed and comes back.
    let server = Arc::new(Server::start_with(&[
        ("RINGCAST_REPLAY_MAX_MESSAGES", "100"),
        ("RINGCAST_QUEUE_TTL_MS", "60000"),
        ("RINGCAST_SLOW_CLIENT_TIMEOUT_MS", "5000"),
    ]));
    let pid = server.pid();
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let end = started + Duration::from_secs(secs);

    // Well-behaved subscribers, all subscribed before the first publish, so each must see
    // every channel's seqs 1, 2, 3, … with no gap.
    let (targets_tx, targets_rx) = watch::channel(None::<[u64; 4]>);
    let mut subscribers = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let query = format!("channels={}&token={}", all_channels(), soak_token());
        let (ws, _welcome) = connect(&server, &query).await;
        subscribers.push(tokio::spawn(subscriber(ws, targets_rx.clone())));
    }

    let mut load = Vec::new();
    let sampler = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < end {
                samples.push(Sample {
                    at: started.elapsed(),
                    rss_kib: server.rss_kib(),
                    fds: open_fds(pid),
                });
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
            samples
        })
    };
    let last_seq: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    load.push(tokio::spawn(small_publisher(
        server.clone(),
        end,
        counts.clone(),
        last_seq.clone(),
    )));
    load.push(tokio::spawn(keep_alive_publisher(
        server.addr,
        end,
        counts.clone(),
        last_seq.clone(),
    )));
    load.push(tokio::spawn(churn(server.clone(), end, counts.clone())));
    for _ in 0..SLOW_READERS {
        load.push(tokio::spawn(slow_reader(server.addr, end, counts.clone())));
    }
    load.push(tokio::spawn(bad_clients(server.addr, end, counts.clone())));

    for task in load {
        task.await.expect("a load task failed");
    }
    let samples = sampler.await.unwrap();

    // Nothing lost: every subscriber reaches the last seq of every channel, in order.
    let targets: [u64; 4] = std::array::from_fn(|i| last_seq[i].load(Ordering::SeqCst));
    targets_tx.send(Some(targets)).unwrap();
    let mut delivered = 0;
    for sub in subscribers {
        delivered += sub.await.expect("a subscriber saw a gap or an error");
    }
    let (status, _, _) = server.http("GET", "/healthz", &[], "").await;
    assert_eq!(status, 200, "healthz after the soak");

    let warm = Duration::from_secs((secs / 6).max(10));
    let steady: Vec<Sample> = samples.into_iter().filter(|s| s.at >= warm).collect();
    assert!(steady.len() >= 6, "too few samples: {}", steady.len());
    let third = steady.len() / 3;
    let (first, last) = (&steady[..third], &steady[steady.len() - third..]);
    let peak = |s: &[Sample], f: fn(&Sample) -> u64| s.iter().map(f).max().unwrap();
    let (rss_first, rss_last) = (peak(first, |s| s.rss_kib), peak(last, |s| s.rss_kib));
    let (fds_first, fds_last) = (peak(first, |s| s.fds), peak(last, |s| s.fds));
    let mid = steady[steady.len() / 2];
    eprintln!(
        "soak: {secs} s; published {} ({:?} last seqs), delivered {delivered} to {SUBSCRIBERS} \
         subscribers, {} churned connections, {} slow readers cut, {} bad clients",
        counts.published.load(Ordering::SeqCst),
        targets,
        counts.churned.load(Ordering::SeqCst),
        counts.slow_cut.load(Ordering::SeqCst),
        counts.bad.load(Ordering::SeqCst),
    );
    eprintln!(
        "soak: after {warm:?} warm-up: RSS KiB start {} / middle {} / end {} (first-third peak \
         {rss_first}, last-third peak {rss_last}); fds start {} / middle {} / end {} (peaks \
         {fds_first}, {fds_last})",
        steady[0].rss_kib,
        mid.rss_kib,
        steady[steady.len() - 1].rss_kib,
        steady[0].fds,
        mid.fds,
        steady[steady.len() - 1].fds,
    );
    let rss_bound =
        (rss_first + rss_first * RSS_GROWTH_PERCENT / 100).max(rss_first + RSS_GROWTH_KIB);
    assert!(
        rss_last <= rss_bound,
        "RSS grew: last third peaked at {rss_last} KiB, bound {rss_bound} KiB"
    );
    assert!(
        fds_last <= fds_first + FD_GROWTH,
        "open fds grew: last third peaked at {fds_last}, first third at {fds_first}"
    );
    assert!(counts.churned.load(Ordering::SeqCst) > 0);
    assert!(counts.bad.load(Ordering::SeqCst) > 0);
}

/// Reads events until told the last seq of every channel and has seen it; every channel's seqs
/// must run 1, 2, 3, … Returns the number of events it received.
async fn subscriber(mut ws: Ws, targets: watch::Receiver<Option<[u64; 4]>>) -> u64 {
    let mut last = [0u64; 4];
    let mut received = 0;
    let mut told_at = None;
    loop {
        if let Some(want) = *targets.borrow() {
            if last.iter().zip(&want).all(|(have, want)| have >= want) {
                assert_eq!(last, want, "more events than were published");
                return received;
            }
            let told = *told_at.get_or_insert_with(Instant::now);
            assert!(
                told.elapsed() < WAIT,
                "lost events: have {last:?}, published up to {want:?}"
            );
        }
        let frame = match tokio::time::timeout(Duration::from_secs(1), ws.next()).await {
            Err(_) => continue,
            Ok(frame) => frame.expect("stream open").expect("valid frame"),
        };
        let text = match frame {
            Message::Text(t) => t,
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("subscriber got {other:?}"),
        };
        let v: Value = serde_json::from_str(text.as_str()).unwrap();
        if let Some(kind) = v.get("type") {
            // A reader that keeps up is never told it lost events.
            assert!(kind != "error" && kind != "dropped", "subscriber got {v}");
            continue;
        }
        let i = CHANNELS
            .iter()
            .position(|c| v["channel"] == *c)
            .unwrap_or_else(|| panic!("event on an unknown channel: {v}"));
        let seq = v["seq"].as_u64().unwrap();
        assert_eq!(
            seq,
            last[i] + 1,
            "{}: seq {seq} after {}",
            CHANNELS[i],
            last[i]
        );
        last[i] = seq;
        received += 1;
    }
}

fn record(last_seq: &[AtomicU64; 4], channel: usize, seq: u64) {
    last_seq[channel].fetch_max(seq, Ordering::SeqCst);
}

/// Small events on a fresh connection each (HTTP churn), 25 a second, alternating channels.
async fn small_publisher(
    server: Arc<Server>,
    end: Instant,
    counts: Arc<Counts>,
    last_seq: Arc<[AtomicU64; 4]>,
) {
    let mut n = 0u64;
    while Instant::now() < end {
        let channel = (n % 2) as usize;
        let seq = server
            .publish_one(CHANNELS[channel], "tick", json!({"n": n}))
            .await;
        record(&last_seq, channel, seq);
        counts.published.fetch_add(1, Ordering::SeqCst);
        n += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// One keep-alive connection: 8 KiB events ten times a second, and a burst of 20 small ones
/// every two seconds. Reconnects if the server closes it (an idle or keep-alive deadline).
async fn keep_alive_publisher(
    addr: std::net::SocketAddr,
    end: Instant,
    counts: Arc<Counts>,
    last_seq: Arc<[AtomicU64; 4]>,
) {
    let big = "x".repeat(8 * 1024);
    let mut conn: Option<(TcpStream, Vec<u8>)> = None;
    let mut n = 0u64;
    while Instant::now() < end {
        let (channel, data) = if n.is_multiple_of(20) {
            (3, json!({"burst": n}))
        } else {
            (2, json!({"n": n, "pad": big}))
        };
        let burst = if channel == 3 { 20 } else { 1 };
        for _ in 0..burst {
            let body =
                json!({"channel": CHANNELS[channel], "event": "e", "data": data}).to_string();
            let (c, buf) = match conn.take() {
                Some(c) => c,
                None => (TcpStream::connect(addr).await.unwrap(), Vec::new()),
            };
            let (c, buf, reply) = keep_alive_publish(addr, c, buf, &body).await;
            let seq = reply["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("publish: {reply}"));
            record(&last_seq, channel, seq);
            counts.published.fetch_add(1, Ordering::SeqCst);
            conn = Some((c, buf));
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One publish on a kept-alive connection; a connection the server closed before answering is
/// replaced once (nothing was published on it: no answer, no seq, and the request was whole).
async fn keep_alive_publish(
    addr: std::net::SocketAddr,
    mut stream: TcpStream,
    mut buf: Vec<u8>,
    body: &str,
) -> (TcpStream, Vec<u8>, Value) {
    let request = format!(
        "POST /api/v1/publish HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    for attempt in 0..2 {
        let sent = stream.write_all(request.as_bytes()).await.is_ok();
        if sent {
            if let Some(reply) = read_response(&mut stream, &mut buf).await {
                return (stream, buf, reply);
            }
        }
        assert_eq!(attempt, 0, "a fresh keep-alive connection failed");
        stream = TcpStream::connect(addr).await.unwrap();
        buf.clear();
    }
    unreachable!()
}

/// One response (head with Content-Length, then body) as JSON; None if the server closed first.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Value> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("a Content-Length");
            if buf.len() >= end + 4 + len {
                assert!(head.starts_with("http/1.1 200"), "{head}");
                let reply = serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap();
                buf.drain(..end + 4 + len);
                return Some(reply);
            }
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(WAIT, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) if buf.is_empty() => return None,
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            other => panic!("publish answer cut short: {other:?}"),
        }
    }
}

/// Connects, reads a few frames, and leaves — politely or by dropping the socket — five times
/// a second.
async fn churn(server: Arc<Server>, end: Instant, counts: Arc<Counts>) {
    let mut n = 0usize;
    while Instant::now() < end {
        let channels = CHANNELS[n % CHANNELS.len()];
        let (mut ws, _) = connect(
            &server,
            &format!("channels={channels}&token={}", soak_token()),
        )
        .await;
        for _ in 0..2 {
            match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                Ok(Some(Ok(_))) | Err(_) => {}
                Ok(other) => panic!("churn client got {other:?}"),
            }
        }
        if n.is_multiple_of(2) {
            let _ = ws.close(None).await;
        }
        drop(ws);
        counts.churned.fetch_add(1, Ordering::SeqCst);
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Subscribes to the large events with a small receive buffer and reads 512 bytes four times a
/// second (a fortieth of the rate they come at); reconnects when the server gives up on it.
async fn slow_reader(addr: std::net::SocketAddr, end: Instant, counts: Arc<Counts>) {
    let mut stream = slow_connect(addr).await;
    while Instant::now() < end {
        let mut chunk = [0u8; 512];
        match tokio::time::timeout(WAIT, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => {
                counts.slow_cut.fetch_add(1, Ordering::SeqCst);
                stream = slow_connect(addr).await;
            }
            Err(_) => panic!("a slow reader got nothing for {WAIT:?}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A WebSocket subscriber to the large events whose socket buffers little (so its backlog
/// lands in the server's queue, not in the kernel), after the 101.
async fn slow_connect(addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8 * 1024).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let req = format!(
        "GET /ws?channels=soak:big&token={} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        soak_token()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("a 101 within the wait bound")
            .unwrap();
        assert_eq!(n, 1, "closed during the handshake");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// Three bad clients a second, in turn: a bad token, an expired token, an unmasked frame,
/// malformed JSON, a half-sent head (held, up to `HELD_HEADS` at once; the server may close
/// them by its deadline), and bytes that are not HTTP at all.
async fn bad_clients(addr: std::net::SocketAddr, end: Instant, counts: Arc<Counts>) {
    let mut held: VecDeque<TcpStream> = VecDeque::new();
    let mut n = 0usize;
    while Instant::now() < end {
        match n % 6 {
            0 | 1 => {
                let bad = if n.is_multiple_of(6) {
                    "not.a.token".to_string()
                } else {
                    token(json!({"sub": "soak", "channels": ["soak:*"], "exp": now_secs() - 60}))
                };
                let req = format!(
                    "GET /ws?channels=soak:big&token={bad} HTTP/1.1\r\nHost: {addr}\r\n\
                     Upgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                );
                let (_, head, _) = request_head(addr, &req).await;
                assert!(head.starts_with("HTTP/1.1 401"), "{head}");
            }
            2 => {
                let path = format!("/ws?channels=soak:small:0&token={}", soak_token());
                let mut ws = RawWs::connect(addr, &path).await;
                ws.send_raw(&[0x81, 0x02, b'h', b'i']).await; // text, but not masked
                assert_eq!(ws.recv_close_code().await, 1002);
            }
            3 => {
                let path = format!("/ws?channels=soak:small:1&token={}", soak_token());
                let mut ws = RawWs::connect(addr, &path).await;
                ws.send_frame(true, 0x1, b"{\"type\": \"subscribe\", \"chan")
                    .await;
                loop {
                    let v = ws.recv_json().await;
                    if v["type"] == "error" {
                        assert_eq!(v["code"], "bad_json", "{v}");
                        break;
                    }
                }
            }
            4 => {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /ws?channels=soak:big HTTP/1.1\r\nHost: x\r\nUpgr")
                    .await
                    .unwrap();
                held.push_back(s);
                if held.len() > HELD_HEADS {
                    held.pop_front();
                }
            }
            _ => {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")
                    .await
                    .unwrap();
                let mut answer = Vec::new();
                let read = tokio::time::timeout(WAIT, s.read_to_end(&mut answer)).await;
                assert!(read.is_ok(), "garbage got no answer and no close");
                assert!(
                    answer.is_empty() || answer.starts_with(b"HTTP/1.1 400"),
                    "{}",
                    String::from_utf8_lossy(&answer)
                );
            }
        }
        counts.bad.fetch_add(1, Ordering::SeqCst);
        n += 1;
        tokio::time::sleep(Duration::from_millis(330)).await;
    }
}
