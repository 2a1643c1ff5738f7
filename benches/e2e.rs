//! End-to-end latency through a running server over loopback, measured with criterion's
//! `iter_custom` so `cargo bench` reports it with statistics and flags regressions. The server
//! is the release binary of this crate, started for the bench with 2 workers and stopped after
//! it.
//!
//! - `e2e/publish_to_delivery_1_subscriber`: one publish (HTTP keep-alive) until one
//!   subscriber has read the event.
//! - `e2e/publish_answer_1_message`: the publish request path alone: one `POST
//!   /api/v1/publish` of one message (a plain object, API key, keep-alive HTTP/1.1) until the
//!   whole HTTP answer has been read. Its channel has no subscriber, so no fan-out work
//!   competes with the answer.
//! - `e2e/publish_answer_10_messages`: the same with a batch of 10 messages (a JSON array) in
//!   one request; its throughput is reported in messages.
//!
//! The server closes a keep-alive socket after 1000 requests (`Connection: close` on the
//! last answer); the publisher then connects again, outside the timed part.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tungstenite::Message;

const SECRET: &str = "bench-secret-0123456789";
const API_KEY: &str = "bench-key-0123456789";

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .env_clear()
        .env("RINGCAST_LISTEN", "127.0.0.1:0")
        .env("RINGCAST_WORKERS", "2")
        .env("RINGCAST_JWT_SECRET", SECRET)
        .env("RINGCAST_API_KEY", API_KEY)
        .env("RINGCAST_CONNECTION_RATE_LIMIT", "0")
        .env("RINGCAST_NODE_RATE_LIMIT", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ringcast");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("server output").unwrap();
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.to_string();
        }
    };
    Server { child, addr }
}

fn publish_request(addr: &str, i: u64) -> Vec<u8> {
    let body = format!(r#"{{"channel":"bench:e2e","event":"tick","data":{{"i":{i}}}}}"#);
    format!(
        "POST /api/v1/publish HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One message as a plain object, or `n` of them as a batch (a JSON array) when `n > 1`, all
/// on `channel`.
fn publish_batch_request(addr: &str, channel: &str, n: usize, i: u64) -> Vec<u8> {
    let one = |k: usize| {
        format!(r#"{{"channel":"{channel}","event":"tick","data":{{"i":{i},"k":{k}}}}}"#)
    };
    let body = if n == 1 {
        one(0)
    } else {
        format!("[{}]", (0..n).map(one).collect::<Vec<_>>().join(","))
    };
    format!(
        "POST /api/v1/publish HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn connect_publisher(addr: &str) -> TcpStream {
    let publisher = TcpStream::connect(addr).unwrap();
    publisher.set_nodelay(true).unwrap();
    publisher
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    publisher
}

/// Reads one whole answer (head and Content-Length body), which must be a 200; true if the
/// server closes the connection after it.
fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    buf.clear();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).expect("publish answer");
        assert!(n > 0, "publisher connection closed");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                assert!(
                    buf.starts_with(b"HTTP/1.1 200"),
                    "{}",
                    String::from_utf8_lossy(buf)
                );
                return head.lines().any(|l| {
                    l.strip_prefix("connection:")
                        .is_some_and(|v| v.trim() == "close")
                });
            }
        }
    }
}

fn e2e(c: &mut Criterion) {
    let server = start();
    publish_to_delivery(c, &server);
    publish_answer(c, &server);
}

/// One publish request until its answer: one message, then a batch of 10.
fn publish_answer(c: &mut Criterion, server: &Server) {
    let mut publisher = connect_publisher(&server.addr);
    let mut buf = Vec::new();
    let mut i = 0u64;
    let mut group = c.benchmark_group("e2e");
    for (n, name) in [
        (1, "publish_answer_1_message"),
        (10, "publish_answer_10_messages"),
    ] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    i += 1;
                    let req = publish_batch_request(&server.addr, "bench:publish", n, i);
                    let start = Instant::now();
                    publisher.write_all(&req).unwrap();
                    let closing = read_response(&mut publisher, &mut buf);
                    total += start.elapsed();
                    if closing {
                        publisher = connect_publisher(&server.addr);
                    }
                }
                total
            })
        });
    }
    group.finish();
}

fn publish_to_delivery(c: &mut Criterion, server: &Server) {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = ringcast::edge::jwt::sign_hs256(
        SECRET.as_bytes(),
        &serde_json::json!({"sub": "bench", "channels": ["bench:*"], "exp": exp}),
    );
    let url = format!("ws://{}/ws?channels=bench:e2e&token={token}", server.addr);
    let tcp = TcpStream::connect(&server.addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    let (mut ws, _) = tungstenite::client(url.as_str(), tcp).expect("handshake");
    // welcome, subscribed
    for _ in 0..2 {
        ws.read().unwrap();
    }
    let mut publisher = connect_publisher(&server.addr);
    let mut buf = Vec::new();
    let mut i = 0u64;
    c.bench_function("e2e/publish_to_delivery_1_subscriber", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                i += 1;
                let req = publish_request(&server.addr, i);
                let start = Instant::now();
                publisher.write_all(&req).unwrap();
                loop {
                    match ws.read().unwrap() {
                        Message::Text(t) if t.contains("\"event\":\"tick\"") => break,
                        _ => continue,
                    }
                }
                total += start.elapsed();
                // The answer came before (or while) the delivery; read it outside the timing.
                if read_response(&mut publisher, &mut buf) {
                    publisher = connect_publisher(&server.addr);
                }
            }
            total
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = e2e
}
criterion_main!(benches);
