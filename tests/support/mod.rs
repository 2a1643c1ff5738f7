//! Shared helpers for the end-to-end tests: a real `ringcast` process on 127.0.0.1 with a
//! port of its own, real clients (tokio-tungstenite, raw TCP), and a tiny HTTP client.
#![allow(dead_code)]

pub mod browser;
pub mod redis;
pub mod sse;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::Response as HandshakeResponse;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-0123456789abcdef";
pub const API_KEY: &str = "test-api-key-0123456789";
/// Upper bound for anything the tests wait for; a healthy run needs a small fraction of it.
pub const WAIT: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// The server's latest log lines (stderr), the newest last.
    log: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
}

impl Server {
    /// Two workers, a known secret and API key, fast heartbeats off (30 s default).
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    pub fn start_with(env: &[(&str, &str)]) -> Server {
        Server::start_configured(env, |_| {})
    }

    /// As `start_with`, with the process's open-file limit (soft and hard) set to `limit`.
    pub fn start_with_open_files(env: &[(&str, &str)], limit: u64) -> Server {
        Server::start_configured(env, |cmd| {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        })
    }

    fn start_configured(env: &[(&str, &str)], configure: impl FnOnce(&mut Command)) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringcast"));
        cmd.env_clear()
            .env("RINGCAST_LISTEN", "127.0.0.1:0")
            .env("RINGCAST_WORKERS", "2")
            .env("RINGCAST_JWT_SECRET", SECRET)
            .env("RINGCAST_API_KEY", API_KEY)
            .env("RINGCAST_JWT_LEEWAY_SECS", "0")
            // Tests open many connections per user; the limits have tests of their own.
            .env("RINGCAST_MAX_CONNECTIONS_PER_USER", "0")
            .env("RINGCAST_MAX_CONNECTIONS_PER_PROJECT", "0")
            // Outbound rate limits too (tests/ratelimits.rs turns them on).
            .env("RINGCAST_CONNECTION_RATE_LIMIT", "0")
            .env("RINGCAST_NODE_RATE_LIMIT", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The same tests in cluster mode (tests/run.sh runs a set of them so): each server on
        // the Redis given, under a prefix of its own.
        if let Ok(url) = std::env::var("RINGCAST_TEST_REDIS_URL") {
            static SERVERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = SERVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            cmd.env("RINGCAST_REDIS_URL", url).env(
                "RINGCAST_REDIS_PREFIX",
                format!("t{}-{n}", std::process::id()),
            );
        }
        if let Ok(level) = std::env::var("RINGCAST_LOG") {
            cmd.env("RINGCAST_LOG", level);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        configure(&mut cmd);
        let mut child = cmd.spawn().expect("start ringcast");
        // Read stdout on a thread so that a server that never says where it listens fails the
        // test after WAIT instead of hanging it; the thread keeps draining stdout afterwards so
        // the server never blocks on a full pipe.
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (addr_tx, addr_rx) = std::sync::mpsc::channel::<SocketAddr>();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if let Some(addr) = line.trim().strip_prefix("listening on ") {
                    let _ = addr_tx.send(addr.parse().unwrap());
                }
            }
        });
        let addr = match addr_rx.recv_timeout(WAIT) {
            Ok(addr) => addr,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("ringcast exited before listening: {err}");
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("ringcast did not say where it listens within {WAIT:?}");
            }
        };
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("RINGCAST_TEST_LOG").is_some() {
                    eprintln!("[server] {line}");
                }
                let mut kept = kept.lock().unwrap();
                if kept.len() >= 2000 {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        Server { child, addr, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// The server's peak resident memory (VmHWM), KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }

    /// Resets the peak (VmHWM) to the current RSS; returns that RSS, KiB.
    pub fn reset_peak_rss(&self) -> u64 {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5")
            .expect("write 5 to /proc/<pid>/clear_refs");
        self.rss_kib()
    }

    /// Whether one of the server's latest log lines holds `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "server did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `POST /api/v1/publish` with the API key.
    pub async fn publish(&self, body: &Value) -> (u16, Value) {
        let (status, body) = self.publish_raw(&body.to_string()).await;
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// `POST /api/v1/publish` with the API key and a body sent as is: (status, body).
    pub async fn publish_raw(&self, body: &str) -> (u16, String) {
        let auth = format!("Bearer {API_KEY}");
        let (status, _, body) = self
            .http("POST", "/api/v1/publish", &[("Authorization", &auth)], body)
            .await;
        (status, body)
    }

    /// Publishes one message and returns its seq.
    pub async fn publish_one(&self, channel: &str, event: &str, data: Value) -> u64 {
        let (status, reply) = self
            .publish(&json!({"channel": channel, "event": event, "data": data}))
            .await;
        assert_eq!(status, 200, "{reply}");
        reply["seq"].as_u64().unwrap()
    }

    /// One HTTP/1.1 request on a fresh connection: (status, head, body).
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String, String) {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        raw_exchange(self.addr, req.as_bytes()).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `request` on a new TCP connection and reads the answer until the server closes.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("server answered and closed")
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, head.to_string(), body.to_string())
}

/// The lines of a child's output, read on a thread so that waiting for one is bounded.
pub struct TimedLines(std::sync::mpsc::Receiver<String>);

impl TimedLines {
    pub fn new(out: impl Read + Send + 'static) -> TimedLines {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        TimedLines(rx)
    }

    /// The next line; None at the end of the output; panics after WAIT without one.
    pub fn next_line(&self) -> Option<String> {
        match self.0.recv_timeout(WAIT) {
            Ok(line) => Some(line),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("no output line within {WAIT:?}")
            }
        }
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Signs a token with the test secret; `exp` is added an hour ahead unless given.
pub fn token(mut claims: Value) -> String {
    if claims.get("exp").is_none() {
        claims["exp"] = json!(now_secs() + 3600);
    }
    ringcast::edge::jwt::sign_hs256(SECRET.as_bytes(), &claims)
}

pub fn admin_token() -> String {
    token(json!({"sub": "admin", "roles": ["admin"], "projects": ["*"], "channels": ["*"]}))
}

/// Connects and returns the socket and its `welcome` frame (after which every channel of the
/// query is subscribed).
pub async fn connect(server: &Server, query: &str) -> (Ws, Value) {
    let (mut ws, _) = ws_connect(server.url(&format!("/ws?{query}")))
        .await
        .unwrap_or_else(|e| panic!("connect {query}: {e}"));
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

/// A WebSocket handshake (tokio-tungstenite's `connect_async`) that must be answered within
/// WAIT: a server that accepts and then says nothing fails the test instead of hanging it.
pub async fn ws_connect<R>(request: R) -> Result<(Ws, HandshakeResponse), WsError>
where
    R: tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
{
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("the handshake answered within the wait bound")
}

/// A handshake that must be refused with an HTTP status: (status, body). Panics if it is
/// accepted or fails any other way (a reset, a timeout, a bad answer).
pub async fn refused_handshake<R>(request: R) -> (u16, String)
where
    R: tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
{
    match ws_connect(request).await {
        Ok((_, resp)) => panic!(
            "handshake accepted ({}), a refusal was expected",
            resp.status()
        ),
        Err(WsError::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            (resp.status().as_u16(), body)
        }
        Err(e) => panic!("handshake failed without an HTTP status: {e}"),
    }
}

/// The next text frame as JSON (pings are answered by tungstenite on read).
pub async fn recv_json(ws: &mut Ws) -> Value {
    recv_text(ws).await.1
}

/// The next text frame, as sent and parsed.
pub async fn recv_text(ws: &mut Ws) -> (String, Value) {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame within the wait bound")
            .expect("stream open")
            .expect("valid frame");
        match msg {
            Message::Text(t) => {
                let text = t.as_str().to_owned();
                let v = serde_json::from_str(&text).unwrap();
                return (text, v);
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads frames until one with `"type": kind` arrives; returns it and what came before.
pub async fn recv_until_type(ws: &mut Ws, kind: &str) -> (Value, Vec<Value>) {
    let mut before = Vec::new();
    loop {
        let v = recv_json(ws).await;
        if v["type"] == kind {
            return (v, before);
        }
        before.push(v);
    }
}

pub async fn send_json(ws: &mut Ws, v: &Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// Waits for the server's close frame; returns its code.
pub async fn recv_close(ws: &mut Ws) -> u16 {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("close within the wait bound");
        match msg {
            Some(Ok(Message::Close(Some(frame)))) => return frame.code.into(),
            Some(Ok(Message::Close(None))) => return 1005,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("error before close frame: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    }
}

/// A WebSocket client over raw TCP, for sending what real clients never would.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// One server frame as read by `RawWs`.
#[derive(Debug, PartialEq, Eq)]
pub struct RawFrame {
    pub opcode: u8,
    /// RSV1: a permessage-deflate compressed message.
    pub compressed: bool,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 0x8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl RawWs {
    /// Handshakes on `path_and_query` and returns the client; panics unless 101.
    pub async fn connect(addr: SocketAddr, path_and_query: &str) -> RawWs {
        RawWs::connect_with(addr, path_and_query, "").await.0
    }

    /// The same with `extra_headers` (each line ending in CRLF); also returns the 101's head.
    pub async fn connect_with(
        addr: SocketAddr,
        path_and_query: &str,
        extra_headers: &str,
    ) -> (RawWs, String) {
        let req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
        );
        let (stream, head, buf) = request_head(addr, &req).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{head}"
        );
        (RawWs { stream, buf }, head)
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// A masked client frame.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let frame =
            ringcast::proto::ws::codec::testing::client_frame(fin, opcode, payload, [1, 2, 3, 4]);
        self.send_raw(&frame).await;
    }

    /// The next server frame, or None when the server closed the TCP connection.
    pub async fn recv(&mut self) -> Option<RawFrame> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 65536];
            let n = match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) => n,
                // A reset is not a close: it may have eaten frames the server sent.
                Ok(Err(e)) => panic!("the server reset the connection ({e}) instead of closing it"),
                Err(_) => panic!("no frame within the wait bound"),
            };
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next text frame as JSON, skipping pings.
    pub async fn recv_json(&mut self) -> Value {
        loop {
            let f = self.recv().await.expect("connection open");
            match f.opcode {
                0x1 => return serde_json::from_slice(&f.payload).unwrap(),
                0x9 | 0xA => continue,
                op => panic!("expected text, got opcode {op}: {:?}", f.payload),
            }
        }
    }

    /// Reads until the server's close frame and returns its code, then asserts the server ends
    /// the TCP connection cleanly: EOF (a FIN) within WAIT, nothing after the close frame, and
    /// no reset. It does not answer the close: after a protocol error (what the callers test)
    /// the server fails the connection at once, and an answer racing its close would be
    /// unread input there (a reset that is the test's doing, not the server's). A server that
    /// waits for the answer instead cuts the socket after its 2 s grace, which passes too; to
    /// answer, use `answer_close` and `expect_eof`.
    pub async fn recv_close_code(&mut self) -> u16 {
        loop {
            let f = self
                .recv()
                .await
                .expect("a close frame before the TCP close");
            if f.opcode == 0x8 {
                self.expect_eof().await;
                return f.close_code().unwrap_or(1005);
            }
        }
    }

    /// Sends the client's close frame with `code`, as a client answers the server's.
    pub async fn answer_close(&mut self, code: u16) {
        let echo = ringcast::proto::ws::codec::testing::client_frame(
            true,
            0x8,
            &code.to_be_bytes(),
            [1, 2, 3, 4],
        );
        // If the server has already closed, the write may fail; `expect_eof`'s read then says
        // whether the connection ended with a FIN or a reset.
        let _ = self.stream.write_all(&echo).await;
    }

    /// Asserts the server ends the TCP connection with a FIN within WAIT: reading gives EOF,
    /// not a reset (ECONNRESET) and not more bytes.
    pub async fn expect_eof(&mut self) {
        assert!(
            self.buf.is_empty(),
            "bytes after the close frame: {:?}",
            self.buf
        );
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => panic!("{n} bytes after the close frame: {:?}", &chunk[..n]),
            Ok(Err(e)) => panic!("the TCP connection ended with a reset ({e}), not a FIN"),
            Err(_) => panic!("the server did not close the TCP connection within {WAIT:?}"),
        }
    }

    /// Keeps writing `frame` (whole frames, as fast as the socket takes them) while reading
    /// server frames, until the server's close frame; returns the frames before it and the
    /// close frame. Panics if a write or read fails on the way (the server reset the socket
    /// while the client was still sending).
    pub async fn recv_close_while_sending(&mut self, frame: &[u8]) -> (Vec<RawFrame>, RawFrame) {
        let block: Vec<u8> = frame.repeat((16384 / frame.len()).max(1));
        let mut at = 0;
        let mut before = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            while let Some((f, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                if f.opcode == 0x8 {
                    // Finish the frame being written so the server can parse what follows.
                    self.stream
                        .write_all(&block[at..])
                        .await
                        .unwrap_or_else(|e| {
                            panic!("writing after the close frame failed ({e}): a reset, not a FIN")
                        });
                    return (before, f);
                }
                before.push(f);
            }
            tokio::select! {
                r = self.stream.readable() => {
                    r.unwrap();
                    let mut chunk = [0u8; 65536];
                    match self.stream.try_read(&mut chunk) {
                        Ok(0) => panic!("the server closed the TCP connection before its close frame"),
                        Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => panic!("the server reset the connection ({e}) while the client was sending"),
                    }
                }
                w = self.stream.writable() => {
                    w.unwrap();
                    match self.stream.try_write(&block[at..]) {
                        Ok(n) => at = (at + n) % block.len(),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => panic!("writing failed ({e}): the server reset the connection while the client was sending"),
                    }
                }
                _ = tokio::time::sleep_until(deadline) => panic!("no close frame within {WAIT:?}"),
            }
        }
    }
}

/// Sends `request` on a new connection and reads the answer's head: the socket, the head, and
/// the bytes read after it.
pub async fn request_head(addr: SocketAddr, request: &str) -> (TcpStream, String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the end of the answer's head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    buf.drain(..end);
    (stream, head, buf)
}

fn parse_server_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames are never masked");
    let (len, header) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if buf.len() < header + len {
        return None;
    }
    Some((
        RawFrame {
            opcode: buf[0] & 0x0f,
            compressed: buf[0] & 0x40 != 0,
            payload: buf[header..header + len].to_vec(),
        },
        header + len,
    ))
}

/// `node_modules` holding socket.io-client v4 from npm (tests/socketio.rs runs it in Node,
/// tests/socketio_browser.rs loads its browser bundle), installed under target/ on first use
/// and made once per test binary.
pub fn node_modules() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("node-socketio");
        let modules = dir.join("node_modules");
        if !modules.join("socket.io-client/package.json").exists() {
            std::fs::create_dir_all(&dir).unwrap();
            let ok = std::process::Command::new("npm")
                .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
                .arg(&dir)
                .arg("socket.io-client@4")
                .status()
                .expect("npm is needed for the Socket.IO tests")
                .success();
            assert!(
                ok,
                "npm install socket.io-client failed (the npm registry must be reachable)"
            );
        }
        modules
    })
    .clone()
}
