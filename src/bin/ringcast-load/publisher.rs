//! The paced publisher: K keep-alive HTTP connections, each publishing its share of the
//! messages on an absolute schedule, one request in flight per connection (an in-order
//! publisher, as an application backend would be). A connection the server closes after an
//! answer (`Connection: close`, e.g. ringcast's limit of requests per keep-alive socket) is
//! opened again before the next request, as an HTTP client library would; the reconnects are
//! counted.

use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};

use crate::client::{connect, now_us};
use crate::wire::{self, Outgoing, Target};

pub struct Plan {
    pub target: Target,
    pub addr: SocketAddr,
    pub api_key: String,
    pub rate: f64,
    pub batch: usize,
    pub connections: usize,
    pub channels: usize,
    pub duration: Duration,
    pub pad: String,
}

/// What the publisher did.
pub struct Published {
    /// Messages accepted per channel.
    pub per_channel: Vec<u64>,
    pub requests: u64,
    pub errors: u64,
    /// Connections opened again after the server closed one with its answer.
    pub reconnects: u64,
    pub elapsed: Duration,
    /// Time from sending a publish request to its answer.
    pub answer_us: Histogram<u64>,
}

/// Runs the plan on the current thread (its own monoio runtime).
pub fn run(plan: Plan) -> Published {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("publisher runtime");
    rt.block_on(async move {
        let plan = Rc::new(plan);
        let counts: Arc<Vec<AtomicU64>> =
            Arc::new((0..plan.channels).map(|_| AtomicU64::new(0)).collect());
        let start = Instant::now();
        let mut tasks = Vec::new();
        for j in 0..plan.connections {
            tasks.push(monoio::spawn(connection(
                plan.clone(),
                j,
                counts.clone(),
                start,
            )));
        }
        let mut published = Published {
            per_channel: Vec::new(),
            requests: 0,
            errors: 0,
            reconnects: 0,
            elapsed: Duration::ZERO,
            answer_us: Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds"),
        };
        for t in tasks {
            let (requests, errors, reconnects, hist) = t.await;
            published.requests += requests;
            published.errors += errors;
            published.reconnects += reconnects;
            let _ = published.answer_us.add(&hist);
        }
        published.elapsed = start.elapsed();
        published.per_channel = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        published
    })
}

/// Channels this connection publishes to: with generator-numbered seqs a channel must have a
/// single publisher, or its seqs could arrive out of order.
fn my_channels(plan: &Plan, j: usize) -> Vec<usize> {
    if plan.target.server_assigns_seq() {
        (0..plan.channels).collect()
    } else {
        (0..plan.channels)
            .filter(|c| c % plan.connections == j)
            .collect()
    }
}

async fn connection(
    plan: Rc<Plan>,
    j: usize,
    counts: Arc<Vec<AtomicU64>>,
    start: Instant,
) -> (u64, u64, u64, Histogram<u64>) {
    let mut hist = Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds");
    let channels = my_channels(&plan, j);
    if channels.is_empty() {
        return (0, 0, 0, hist);
    }
    let mut stream = match connect(Ipv4Addr::new(127, 0, 0, 1), plan.addr).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("publisher {j}: connect: {e}");
            return (0, 1, 0, hist);
        }
    };
    let mut reconnects = 0u64;
    let share = if plan.target.server_assigns_seq() {
        plan.connections
    } else {
        plan.connections.min(plan.channels)
    };
    let batch = if plan.target.batches() {
        plan.batch.max(1)
    } else {
        1
    };
    let requests_per_sec = plan.rate / share as f64 / batch as f64;
    let interval = Duration::from_secs_f64(1.0 / requests_per_sec);
    let total = (plan.duration.as_secs_f64() * requests_per_sec).round() as u64;
    let host = plan.addr.to_string();
    let mut seqs = vec![0u64; plan.channels];
    // Connections sharing channels start spread over them, so one moment's messages do not all
    // land on the same few channels (which would let a server coalesce them unfairly).
    let mut next_channel = j * channels.len() / plan.connections.max(1);
    let (mut requests, mut errors) = (0u64, 0u64);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        if due > now {
            monoio::time::sleep(due - now).await;
        }
        let sent_us = now_us();
        let mut msgs = Vec::with_capacity(batch);
        let mut names = Vec::with_capacity(batch);
        for _ in 0..batch {
            let c = channels[next_channel % channels.len()];
            next_channel += 1;
            seqs[c] += 1;
            names.push((c, format!("bench:{c}"), seqs[c]));
        }
        for (_, name, seq) in &names {
            msgs.push(Outgoing {
                channel: name,
                seq: *seq,
                sent_us,
                pad: &plan.pad,
            });
        }
        let req = wire::publish_request(plan.target, &host, &plan.api_key, &msgs);
        let (res, _) = stream.write_all(req).await;
        let answer = match res {
            Ok(_) => read_response(&mut stream, &mut buf).await,
            Err(_) => None,
        };
        let Some(closing) = answer else {
            errors += 1;
            eprintln!("publisher {j}: connection lost after {requests} requests");
            break;
        };
        let _ = hist.record((now_us() - sent_us).max(1));
        requests += 1;
        let mut lost = false;
        if closing {
            match connect(Ipv4Addr::new(127, 0, 0, 1), plan.addr).await {
                Ok(s) => {
                    stream = s;
                    reconnects += 1;
                }
                Err(e) => {
                    errors += 1;
                    eprintln!("publisher {j}: reconnect after {requests} requests: {e}");
                    lost = true; // the answer just read still counts below
                }
            }
        }
        // 200 from most; Nchan answers 201 (delivered) or 202 (queued, no subscriber).
        if buf.starts_with(b"HTTP/1.1 20") {
            for (c, _, _) in &names {
                counts[*c].fetch_add(1, Ordering::Relaxed);
            }
        } else {
            errors += 1;
            if errors <= 3 {
                let head = String::from_utf8_lossy(&buf[..buf.len().min(200)]).to_string();
                eprintln!("publisher {j}: {head}");
            }
        }
        if lost {
            break;
        }
    }
    (requests, errors, reconnects, hist)
}

/// Reads one HTTP response (head + Content-Length body) into `buf`: `None` if the connection
/// failed first, else whether the server closes the connection after it.
async fn read_response(stream: &mut monoio::net::TcpStream, buf: &mut Vec<u8>) -> Option<bool> {
    buf.clear();
    loop {
        if let Some(end) = wire::memfind(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let closing = head.lines().any(|l| {
                    l.strip_prefix("connection:")
                        .is_some_and(|v| v.trim() == "close")
                });
                return Some(closing);
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let len = buf.len();
        let owned = std::mem::take(buf);
        let (res, slice) = stream.read(owned.slice_mut(len..)).await;
        *buf = slice.into_inner();
        if !matches!(res, Ok(n) if n > 0) {
            return None;
        }
    }
}
