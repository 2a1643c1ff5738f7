//! End to end: terminal streaming. A producer pushes output in a chunked `POST` kept open;
//! readers on `/ws/terminal/{task_id}` reassemble it byte for byte; pause/resume, the
//! throughput cap, the project guard and the end of a stream.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A producer: a chunked POST whose body stays open until `finish`.
struct Producer {
    stream: TcpStream,
}

impl Producer {
    async fn open(server: &Server, path_and_query: &str) -> Producer {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let head = format!(
            "POST {path_and_query} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {API_KEY}\r\n\
             Transfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n",
            server.addr
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        Producer { stream }
    }

    async fn send(&mut self, bytes: &[u8]) {
        let mut chunk = format!("{:x}\r\n", bytes.len()).into_bytes();
        chunk.extend_from_slice(bytes);
        chunk.extend_from_slice(b"\r\n");
        self.stream.write_all(&chunk).await.unwrap();
    }

    /// Ends the body; returns the status and the JSON answer.
    async fn finish(mut self) -> (u16, Value) {
        self.stream.write_all(b"0\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT * 3, self.stream.read_to_end(&mut answer))
            .await
            .expect("the producer is answered")
            .unwrap();
        let text = String::from_utf8(answer).unwrap();
        let status = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1;
        (status, serde_json::from_str(body).unwrap())
    }
}

/// Coloured, multi-byte output of about `len` bytes, the same for every run.
fn terminal_output(len: usize) -> Vec<u8> {
    let pieces: [&[u8]; 12] = [
        b"\x1b[38;5;196m",
        b"\x1b[1;32mPASSED\x1b[0m ",
        "ünïcødé ".as_bytes(),
        "日本語のテキスト ".as_bytes(),
        "🚀✓ ".as_bytes(),
        b"tests/test_api.py::test_login ",
        b"\r\n",
        b"\x1b]0;build 42\x07",
        b"\x1b[2K\x1b[1G",
        b"plain ascii words go here ",
        "€ ".as_bytes(),
        b"\x1b[0m\n",
    ];
    let mut out = Vec::with_capacity(len + 64);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(pieces[(x % pieces.len() as u64) as usize]);
    }
    out
}

async fn reader(server: &Server, path_and_query: &str) -> Ws {
    let (mut ws, _) = ws_connect(server.url(path_and_query)).await.unwrap();
    assert_eq!(recv_json(&mut ws).await["type"], "welcome");
    assert_eq!(recv_json(&mut ws).await["type"], "subscribed");
    ws
}

async fn recv_any(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame within the wait bound")
            .unwrap()
            .unwrap();
        match m {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Binary(b) => return rmp_serde::from_slice(&b).unwrap(),
            _ => continue,
        }
    }
}

/// Reads one stream's output until its `end`: (bytes, chunks, end data).
async fn reassemble(ws: &mut Ws, stream: &str) -> (Vec<u8>, usize, Value) {
    let (bytes, sizes, end) = reassemble_timed(ws, stream).await;
    (bytes, sizes.len(), end)
}

/// `reassemble`, with each chunk's `ts` (ms, stamped when the server published it) and size.
async fn reassemble_timed(ws: &mut Ws, stream: &str) -> (Vec<u8>, Vec<(u64, usize)>, Value) {
    let mut bytes = Vec::new();
    let mut chunks = Vec::new();
    loop {
        let v = recv_any(ws).await;
        match v["event"].as_str() {
            Some("end") if v["data"]["stream"] == stream => {
                return (bytes, chunks, v["data"].clone())
            }
            Some(s) if s == stream => {
                let d = &v["data"];
                let text = d["text"].as_str().unwrap();
                assert_eq!(
                    d["offset"].as_u64(),
                    Some(bytes.len() as u64),
                    "in order, no gap"
                );
                assert_eq!(d["bytes"].as_u64(), Some(text.len() as u64));
                assert!(text.len() <= 4096, "chunk of {} bytes", text.len());
                assert!(
                    !ends_inside_escape(text),
                    "chunk ends inside an escape: {text:?}"
                );
                bytes.extend_from_slice(text.as_bytes());
                chunks.push((v["ts"].as_u64().unwrap(), text.len()));
            }
            _ => panic!("unexpected frame {v}"),
        }
    }
}

/// Whether the last escape sequence of `text` is unfinished (the escapes of `terminal_output`:
/// CSI `ESC [ params final`, OSC `ESC ] … BEL`).
fn ends_inside_escape(text: &str) -> bool {
    let Some(at) = text.rfind('\x1b') else {
        return false;
    };
    let tail = &text.as_bytes()[at + 1..];
    match tail.first() {
        None => true,
        Some(b'[') => !tail[1..].iter().any(|b| (0x40..=0x7e).contains(b)),
        Some(b']') => !tail.contains(&0x07),
        Some(_) => false,
    }
}

#[tokio::test]
async fn five_megabytes_of_coloured_utf8_reach_two_readers_byte_identical() {
    let server = Server::start_with(&[("RINGCAST_TERMINAL_MAX_BYTES_PER_SEC", "5000000")]);
    let t = token(json!({"sub": "dev", "projects": ["42"]}));
    let mut json_reader =
        reader(&server, &format!("/ws/terminal/t5?token={t}&project_id=42")).await;
    let mut msgpack_reader = reader_msgpack(
        &server,
        &format!("/ws/terminal/t5?token={t}&encoding=messagepack"),
    )
    .await;
    let output = terminal_output(5 << 20);
    let mut producer =
        Producer::open(&server, "/api/v1/terminal/t5?project_id=42&stream=stdout").await;
    let expected = output.clone();
    let reading = tokio::spawn(async move {
        let a = reassemble(&mut json_reader, "stdout").await;
        let b = reassemble(&mut msgpack_reader, "stdout").await;
        (a, b)
    });
    // Write in uneven pieces, so that producer chunks split characters and escapes.
    let mut at = 0;
    let mut size = 1;
    while at < output.len() {
        let to = (at + size).min(output.len());
        producer.send(&output[at..to]).await;
        at = to;
        size = (size * 7 + 13) % 20_011 + 1;
    }
    let (status, answer) = producer.finish().await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["bytes"].as_u64(), Some(output.len() as u64));
    let ((a, a_chunks, a_end), (b, b_chunks, b_end)) = tokio::time::timeout(WAIT * 3, reading)
        .await
        .unwrap()
        .unwrap();
    assert!(
        a == expected,
        "JSON reader: {} of {} bytes, first difference at {:?}",
        a.len(),
        expected.len(),
        a.iter().zip(&expected).position(|(x, y)| x != y)
    );
    assert!(b == expected, "MessagePack reader differs");
    assert_eq!(a_chunks, b_chunks);
    assert!(a_chunks >= expected.len() / 4096);
    for end in [a_end, b_end] {
        assert_eq!(
            end,
            json!({"stream": "stdout", "bytes": expected.len(), "reason": "complete"})
        );
    }
}

async fn reader_msgpack(server: &Server, path_and_query: &str) -> Ws {
    let (mut ws, _) = ws_connect(server.url(path_and_query)).await.unwrap();
    assert_eq!(recv_any(&mut ws).await["type"], "welcome");
    assert_eq!(recv_any(&mut ws).await["type"], "subscribed");
    ws
}

#[tokio::test]
async fn a_paused_reader_gets_nothing_then_is_told_what_it_skipped() {
    let server = Server::start();
    let t = token(json!({"sub": "dev", "projects": ["p"]}));
    let mut paused = reader(&server, &format!("/ws/terminal/tp?token={t}")).await;
    let mut live = reader(&server, &format!("/ws/terminal/tp?token={t}")).await;
    send_json(&mut paused, &json!({"type": "pause"})).await;
    assert_eq!(recv_json(&mut paused).await, json!({"type": "paused"}));

    let mut producer =
        Producer::open(&server, "/api/v1/terminal/tp?project_id=p&stream=stderr").await;
    let first = terminal_output(20_000);
    producer.send(&first).await;
    // The live reader gets all of it.
    let mut got = 0;
    while got < first.len() {
        let v = recv_json(&mut live).await;
        assert_eq!(v["event"], "stderr");
        got += v["data"]["bytes"].as_u64().unwrap() as usize;
    }
    // Make sure the output has reached the paused reader's core too: a subscription to a
    // channel with the same owner core is acknowledged through the same queue, after it.
    let owner = ringcast::delivery::channel::owner_core("terminal:tp", 2);
    let probe = (0..)
        .map(|i| format!("terminal:probe{i}"))
        .find(|c| ringcast::delivery::channel::owner_core(c, 2) == owner)
        .unwrap();
    send_json(
        &mut paused,
        &json!({"type": "subscribe", "channels": [probe]}),
    )
    .await;
    assert_eq!(
        recv_json(&mut paused).await["type"],
        "subscribed",
        "nothing else while paused"
    );
    send_json(&mut paused, &json!({"type": "resume"})).await;
    let resumed = recv_json(&mut paused).await;
    assert_eq!(resumed["type"], "resumed", "{resumed}");
    assert_eq!(
        resumed["skipped_bytes"].as_u64(),
        Some(first.len() as u64),
        "{resumed}"
    );
    assert!(resumed["skipped"].as_u64().unwrap() >= 5, "{resumed}");
    // Live again, from where the output is now.
    producer.send(b"\x1b[33mafter resume\x1b[0m\n").await;
    let v = recv_json(&mut paused).await;
    assert_eq!(v["data"]["offset"].as_u64(), Some(first.len() as u64));
    assert_eq!(v["data"]["text"], "\x1b[33mafter resume\x1b[0m\n");
    let (status, _) = producer.finish().await;
    assert_eq!(status, 200);
    assert_eq!(recv_json(&mut paused).await["event"], "end");
}

#[tokio::test]
async fn the_throughput_cap_slows_the_producer_and_loses_nothing() {
    let server = Server::start_with(&[("RINGCAST_TERMINAL_MAX_BYTES_PER_SEC", "200000")]);
    let (took, chunks) = produce_paced(&server, "tc", 600_000).await;
    let burst = worst_burst(&chunks, 200_000);
    eprintln!("200 kB/s: producer answered after {took:?}, worst burst {burst} bytes");
    // Below 1 MB/s the 250 kB burst is clamped to one second's worth (200 kB): 600 kB take at
    // least (600 - 200 - one 4 KiB chunk) / 200 s ≈ 1.98 s.
    assert!(took >= Duration::from_millis(1950), "took {took:?}");
    assert!(took < Duration::from_millis(3500), "took {took:?}");
    // 200 kB + one chunk, 1 ms of timestamp granularity at each end, 50 ms of jitter.
    assert!(
        burst <= 200_000 + 4096 + 400 + 10_000,
        "burst of {burst} bytes"
    );
}

/// Streams `len` bytes of output for task `task` to one reader: how long the producer took,
/// and the chunks with their publish times (all bytes arrived, in order).
async fn produce_paced(server: &Server, task: &str, len: usize) -> (Duration, Vec<(u64, usize)>) {
    let t = token(json!({"sub": "dev", "projects": ["p"]}));
    let mut ws = reader(server, &format!("/ws/terminal/{task}?token={t}")).await;
    let output = terminal_output(len);
    let started = Instant::now();
    let path = format!("/api/v1/terminal/{task}?project_id=p");
    let mut producer = Producer::open(server, &path).await;
    producer.send(&output).await;
    let (status, answer) = producer.finish().await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{answer}");
    let (bytes, chunks, _) = reassemble_timed(&mut ws, "stdout").await;
    assert!(bytes == output);
    (took, chunks)
}

/// The most bytes published in any window of chunks beyond what the rate allows for the
/// window's length: `max over i <= j of sum(bytes i..=j) - rate × (ts_j - ts_i)`. A pacer that
/// holds bursts to B keeps this at most B plus one chunk (plus clock granularity and jitter).
fn worst_burst(chunks: &[(u64, usize)], bytes_per_sec: u64) -> u64 {
    let mut worst = 0i64;
    for i in 0..chunks.len() {
        let mut sum = 0i64;
        for &(ts, n) in &chunks[i..] {
            sum += n as i64;
            let allowed = (ts - chunks[i].0) as i64 * bytes_per_sec as i64 / 1000;
            worst = worst.max(sum - allowed);
        }
    }
    worst as u64
}

#[tokio::test]
async fn the_default_cap_allows_a_quarter_second_burst_then_1_mb_per_second() {
    // The default cap: 1,000,000 bytes/s, bursts up to 250 kB (a quarter second's worth).
    let server = Server::start();
    let (took, chunks) = produce_paced(&server, "td", 2_000_000).await;
    let burst = worst_burst(&chunks, 1_000_000);
    let spread_ms = chunks.last().unwrap().0 - chunks[0].0;
    eprintln!(
        "2 MB in {} chunks: producer answered after {took:?}, chunks published over \
         {spread_ms} ms, worst burst {burst} bytes",
        chunks.len()
    );
    // The rate: everything past the burst at 1 MB/s, so at least (2.0 - 0.25 - one chunk) s.
    // A one-second burst would be done in 1 s, no pacing in a few ms.
    assert!(took >= Duration::from_millis(1700), "took {took:?}");
    assert!(spread_ms >= 1700, "published over {spread_ms} ms");
    // Not slower than the cap by more than a loaded machine's scheduling can explain.
    assert!(took < Duration::from_millis(3000), "took {took:?}");
    // The burst, seen in the server's own publish times: 250 kB + one 4 KiB chunk, plus 1 ms
    // of timestamp granularity at each end (2 kB) and 50 ms of scheduling jitter (50 kB). A
    // one-second burst would show about 1 MB here.
    assert!(
        burst <= 250_000 + 4096 + 2_000 + 50_000,
        "burst of {burst} bytes"
    );
}

#[tokio::test]
async fn output_reaches_only_readers_of_its_project() {
    let server = Server::start();
    let outsider = token(json!({"sub": "o", "projects": ["other"]}));
    // Naming the project up front: refused at once.
    let (status, body) = refused_handshake(server.url(&format!(
        "/ws/terminal/tg?token={outsider}&project_id=secret"
    )))
    .await;
    assert_eq!(
        (status, body.as_str()),
        (403, r#"{"error":"not allowed to see project secret"}"#)
    );
    // Without naming it: subscribed, but the output never arrives.
    let mut ws = reader(&server, &format!("/ws/terminal/tg?token={outsider}")).await;
    let mut producer = Producer::open(&server, "/api/v1/terminal/tg?project_id=secret").await;
    producer.send(b"password=hunter2\n").await;
    assert_eq!(producer.finish().await.0, 200);
    // A later message on the same channel for a project it may see comes first.
    let (status, _) = server
        .publish(
            &json!({"channel": "terminal:tg", "event": "stdout", "project_id": "other",
                         "data": {"offset": 0, "bytes": 6, "text": "marker"}}),
        )
        .await;
    assert_eq!(status, 200);
    let v = recv_json(&mut ws).await;
    assert_eq!(v["data"]["text"], "marker", "{v}");
    // Publishing on a terminal channel without a project is refused.
    let (status, reply) = server
        .publish(&json!({"channel": "terminal:tg", "event": "stdout", "data": {}}))
        .await;
    assert_eq!(status, 400, "{reply}");
}

#[tokio::test]
async fn producers_are_checked_and_a_dropped_producer_ends_the_stream() {
    let server = Server::start();
    for (path, auth, status) in [
        ("/api/v1/terminal/tx?project_id=p", false, 401),
        ("/api/v1/terminal/tx", true, 400),
        ("/api/v1/terminal/tx?project_id=p&stream=stdin", true, 400),
    ] {
        let headers: Vec<(&str, &str)> = if auth {
            vec![("Authorization", "Bearer test-api-key-0123456789")]
        } else {
            vec![]
        };
        let (got, _, body) = server.http("POST", path, &headers, "").await;
        assert_eq!(got, status, "{path}: {body}");
    }
    let (got, head, _) = server.http("GET", "/api/v1/terminal/tx", &[], "").await;
    assert_eq!(got, 405, "{head}");
    let (got, _, body) = server
        .http(
            "POST",
            "/api/v1/terminal/tx?project_id=p",
            &[
                ("Authorization", "Bearer test-api-key-0123456789"),
                ("Transfer-Encoding", "gzip, chunked"),
            ],
            "",
        )
        .await;
    assert_eq!(got, 501, "{body}");

    let t = token(json!({"sub": "dev", "projects": ["p"]}));
    let mut ws = reader(&server, &format!("/ws/terminal/tx?token={t}")).await;
    let mut producer = Producer::open(&server, "/api/v1/terminal/tx?project_id=p").await;
    producer.send(b"half a line").await;
    drop(producer);
    let v = recv_json(&mut ws).await;
    assert_eq!(v["data"]["text"], "half a line");
    let end = recv_json(&mut ws).await;
    assert_eq!(
        (end["event"].as_str(), &end["data"]),
        (
            Some("end"),
            &json!({"stream": "stdout", "bytes": 11, "reason": "producer disconnected"})
        )
    );
    // A malformed chunked body: what came before it is published, then the end says why.
    let mut producer = Producer::open(&server, "/api/v1/terminal/tx?project_id=p").await;
    producer.send(b"hello").await;
    producer.stream.write_all(b"zz\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, producer.stream.read_to_string(&mut answer))
        .await
        .expect("the producer is answered and closed")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(recv_json(&mut ws).await["data"]["text"], "hello");
    let end = recv_json(&mut ws).await;
    assert_eq!(end["data"]["reason"], "bad chunk size", "{end}");
}

#[tokio::test]
async fn a_pause_holds_back_replays_too() {
    let server = Server::start();
    let t = admin_token();
    for i in 0..3 {
        server.publish_one("task:pr", "log", json!(i)).await;
    }
    let (mut ws, welcome) = connect(&server, &format!("token={t}")).await;
    send_json(&mut ws, &json!({"type": "pause"})).await;
    assert_eq!(recv_json(&mut ws).await["type"], "paused");
    let epoch = welcome["epoch"].clone();
    send_json(
        &mut ws,
        &json!({"type": "subscribe", "channels": ["task:pr"], "since": {"task:pr": 0}, "epoch": epoch}),
    )
    .await;
    assert_eq!(recv_json(&mut ws).await["type"], "subscribed");
    assert_eq!(
        recv_json(&mut ws).await["type"],
        "replayed",
        "no event while paused"
    );
    send_json(&mut ws, &json!({"type": "resume"})).await;
    let resumed = recv_json(&mut ws).await;
    assert_eq!(
        (resumed["type"].as_str(), resumed["skipped"].as_u64()),
        (Some("resumed"), Some(3))
    );
}
