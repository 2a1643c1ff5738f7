//! Socket.IO: the real `socket.io-client` v4 from npm (in Node) against `/socket.io/`
//! (tests/node/socketio_check.cjs), and the Engine.IO handshake seen over a raw socket.
//! The client library is installed under target/ on first use (`support::node_modules`).

mod support;

use std::process::Command;

use serde_json::json;
use support::*;

fn run_node(script: &str, server: &Server, env: &[(&str, &str)]) {
    let (ok, out) = try_node(script, server, env);
    assert!(
        ok && out.contains("checks passed"),
        "{script} failed\n{out}"
    );
}

/// Runs a script: whether it succeeded, and what it printed.
fn try_node(script: &str, server: &Server, env: &[(&str, &str)]) -> (bool, String) {
    let script = format!("{}/tests/node/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new("node");
    cmd.arg(&script)
        .env("NODE_PATH", node_modules())
        .env("URL", format!("http://{}", server.addr))
        .env("API_KEY", API_KEY);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .expect("node is needed for the Socket.IO tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    (out.status.success(), text)
}

fn tokens() -> Vec<(&'static str, String)> {
    let good = token(json!({"sub": "u1", "projects": ["p1"], "channels": ["task:*", "dashboard"]}));
    let other = token(json!({"sub": "u2", "projects": ["p2"]}));
    let bad = token(json!({"sub": "u1", "exp": now_secs() - 60}));
    vec![("TOKEN", good), ("OTHER_TOKEN", other), ("BAD_TOKEN", bad)]
}

#[test]
fn socket_io_client_over_websocket_joins_rooms_and_gets_events() {
    let server = Server::start();
    client_check(&server, "websocket");
}

/// tests/node/socketio_check.cjs against `server` over `transports`.
fn client_check(server: &Server, transports: &str) {
    let tokens = tokens();
    let mut env: Vec<(&str, &str)> = tokens.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("TRANSPORTS", transports));
    run_node("socketio_check.cjs", server, &env);
}

#[test]
fn socket_io_client_on_a_cluster_node_gets_the_same() {
    let redis = support::redis::Redis::start();
    let server = support::redis::node_at(&redis.url(), &[]);
    client_check(&server, "polling,websocket");
}

#[test]
fn socket_io_client_polling_first_then_upgrading_gets_the_same() {
    let server = Server::start();
    client_check(&server, "polling,websocket");
}

#[test]
fn socket_io_client_over_polling_only_gets_the_same() {
    let server = Server::start();
    client_check(&server, "polling");
}

fn recovery(transports: &str, window: &str) -> (bool, String) {
    let server = Server::start_with(&[
        ("RINGCAST_REPLAY_MAX_MESSAGES", "50"),
        ("RINGCAST_SOCKETIO_RECOVERY_SECS", window),
    ]);
    let t = token(json!({"sub": "u1", "projects": ["p1"], "channels": ["task:*", "dashboard"]}));
    let env = [
        ("TOKEN", t.as_str()),
        ("TRANSPORTS", transports),
        ("REPLAY", "50"),
    ];
    try_node("recovery_check.cjs", &server, &env)
}

#[test]
fn a_cut_socket_io_client_recovers_every_missed_event_once_in_order() {
    let (ok, out) = recovery("websocket", "120");
    assert!(ok && out.contains("checks passed"), "{out}");
}

#[test]
fn a_cut_socket_io_client_that_upgraded_from_polling_recovers_too() {
    let (ok, out) = recovery("polling,websocket", "120");
    assert!(ok && out.contains("checks passed"), "{out}");
}

#[test]
fn with_recovery_off_a_cut_client_is_told_it_did_not_recover() {
    let (ok, out) = recovery("websocket", "0");
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAILED: socket.recovered is true after the cut"),
        "{out}"
    );
}

#[test]
fn a_socket_io_client_recovers_on_another_node_when_its_node_drains() {
    let redis = support::redis::Redis::start();
    let a = support::redis::node_at(&redis.url(), &[("RINGCAST_DRAIN_TIMEOUT_MS", "5000")]);
    let b = support::redis::node_at(&redis.url(), &[]);
    let t = token(json!({"sub": "u1", "projects": ["p1"], "channels": ["task:*", "dashboard"]}));
    let (url_a, url_b) = (format!("http://{}", a.addr), format!("http://{}", b.addr));
    let pid = a.pid().to_string();
    let env = [
        ("TOKEN", t.as_str()),
        ("URL_A", url_a.as_str()),
        ("URL_B", url_b.as_str()),
        ("A_PID", pid.as_str()),
    ];
    run_node("recovery_drain_check.cjs", &b, &env);
}

#[tokio::test]
async fn the_engine_io_handshake_has_the_fields_and_a_deadline() {
    let server = Server::start_with(&[
        ("RINGCAST_SOCKETIO_PING_INTERVAL_MS", "300"),
        ("RINGCAST_SOCKETIO_PING_TIMEOUT_MS", "200"),
        ("RINGCAST_HEADER_TIMEOUT_MS", "500"),
    ]);
    let mut ws = RawWs::connect(server.addr, "/socket.io/?EIO=4&transport=websocket").await;
    let open = ws.recv().await.expect("the open packet");
    let text = String::from_utf8(open.payload.clone()).unwrap();
    let handshake: serde_json::Value =
        serde_json::from_str(text.strip_prefix('0').unwrap()).unwrap();
    assert_eq!(handshake["upgrades"], json!([]), "{text}");
    assert_eq!(handshake["pingInterval"], 300, "{text}");
    assert_eq!(handshake["pingTimeout"], 200, "{text}");
    assert_eq!(handshake["maxPayload"], 1_000_000, "{text}");
    assert!(
        handshake["sid"].as_str().is_some_and(|s| !s.is_empty()),
        "{text}"
    );
    // No CONNECT: the socket is closed at the head deadline.
    let started = std::time::Instant::now();
    assert_eq!(ws.recv_close_code().await, 1008);
    assert!(started.elapsed() < WAIT);

    // A CONNECT with a good token: `40{"sid"}`, the welcome, then Engine.IO pings that a pong
    // answers; without pongs the session closes.
    let t = token(json!({"sub": "raw", "projects": ["p"]}));
    let mut ws = RawWs::connect(server.addr, "/socket.io/?EIO=4&transport=websocket").await;
    ws.recv().await.expect("the open packet");
    ws.send_frame(true, 0x1, format!("40{{\"token\":\"{t}\"}}").as_bytes())
        .await;
    let connect = String::from_utf8(ws.recv().await.unwrap().payload).unwrap();
    let answer: serde_json::Value = serde_json::from_str(&connect[2..]).unwrap();
    assert!(
        answer["sid"].is_string() && answer["pid"].is_string(),
        "{connect}"
    );
    let welcome = String::from_utf8(ws.recv().await.unwrap().payload).unwrap();
    assert!(welcome.starts_with("42[\"ringcast:welcome\","), "{welcome}");
    let ping = ws.recv().await.unwrap();
    assert_eq!(ping.payload, b"2");
    ws.send_frame(true, 0x1, b"3").await;
    let ping = ws.recv().await.unwrap();
    assert_eq!(ping.payload, b"2", "pinged again after a pong");
    // Now silent: closed after pingTimeout, saying why first.
    let why = String::from_utf8(ws.recv().await.unwrap().payload).unwrap();
    assert!(why.contains("heartbeat timeout"), "{why}");
    assert_eq!(ws.recv_close_code().await, 4002);
}

/// A polling session's handshake: its sid.
async fn polling_handshake(server: &Server) -> String {
    let (status, _, body) = server
        .http("GET", "/socket.io/?EIO=4&transport=polling", &[], "")
        .await;
    assert_eq!(status, 200, "{body}");
    let open: serde_json::Value = serde_json::from_str(body.strip_prefix('0').unwrap()).unwrap();
    assert_eq!(open["upgrades"], json!(["websocket"]), "{body}");
    open["sid"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_upgrade_probe_that_comes_before_the_connect_waits_for_it() {
    let server = Server::start();
    let t = token(json!({"sub": "raw", "projects": ["p"]}));
    // The WebSocket probes before the CONNECT is even sent: no answer yet...
    let sid = polling_handshake(&server).await;
    let path = format!("/socket.io/?EIO=4&transport=websocket&sid={sid}");
    let mut ws = RawWs::connect(server.addr, &path).await;
    ws.send_frame(true, 0x1, b"2probe").await;
    // ...then the CONNECT comes by POST, and the probe is answered.
    let post = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    let connect = format!("40{{\"token\":\"{t}\"}}");
    let (status, _, body) = server.http("POST", &post, &[], &connect).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(ws.recv().await.unwrap().payload, b"3probe");
    ws.send_frame(true, 0x1, b"5").await;
    // The session goes on over the WebSocket, its CONNECT answer first.
    let connected = String::from_utf8(ws.recv().await.unwrap().payload).unwrap();
    assert!(connected.starts_with("40{"), "{connected}");
    ws.send_frame(true, 0x1, b"421[\"subscribe\",{\"channel\":\"project:p\"}]")
        .await;
    loop {
        let text = String::from_utf8(ws.recv().await.unwrap().payload).unwrap();
        if text.starts_with("431[") {
            assert!(text.contains("\"ok\":true"), "{text}");
            break;
        }
    }
    let (status, _, _) = server.http("GET", &post, &[], "").await;
    assert_eq!(status, 400, "polling is over for it");

    // A probe waiting for a CONNECT that is refused is closed; the refusal goes by polling.
    let sid = polling_handshake(&server).await;
    let path = format!("/socket.io/?EIO=4&transport=websocket&sid={sid}");
    let mut ws = RawWs::connect(server.addr, &path).await;
    ws.send_frame(true, 0x1, b"2probe").await;
    let post = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    let (status, _, _) = server
        .http("POST", &post, &[], "40{\"token\":\"bad\"}")
        .await;
    assert_eq!(status, 200);
    assert_eq!(ws.recv_close_code().await, 1008);
    let (_, _, body) = server.http("GET", &post, &[], "").await;
    assert!(body.starts_with("44{"), "{body}");
}

#[tokio::test]
async fn a_second_held_get_ends_the_session_and_a_probe_that_fails_lets_polling_go_on() {
    let server = Server::start();
    let t = token(json!({"sub": "raw", "projects": ["p"]}));
    let sid = polling_handshake(&server).await;
    let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    let (status, _, body) = server
        .http("POST", &path, &[], &format!("40{{\"token\":\"{t}\"}}"))
        .await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let (_, _, body) = server.http("GET", &path, &[], "").await;
    assert!(body.starts_with("40{"), "the CONNECT answer first: {body}");
    // A probe that never upgrades: polling goes on once its socket is gone.
    let ws_path = format!("/socket.io/?EIO=4&transport=websocket&sid={sid}");
    let mut ws = RawWs::connect(server.addr, &ws_path).await;
    ws.send_frame(true, 0x1, b"2probe").await;
    assert_eq!(ws.recv().await.unwrap().payload, b"3probe");
    ws.send_frame(true, 0x1, b"2probe").await; // not the upgrade packet
    assert_eq!(ws.recv_close_code().await, 1008);
    let subscribe = "42[\"subscribe\",{\"channel\":\"project:p\"}]";
    let (status, _, _) = server.http("POST", &path, &[], subscribe).await;
    assert_eq!(status, 200);
    let (_, _, body) = server.http("GET", &path, &[], "").await;
    assert!(body.contains("ringcast:subscribed"), "{body}");
    // Two GETs at once: the second is refused and the session ends.
    let first = server.http("GET", &path, &[], "");
    let second = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        server.http("GET", &path, &[], "").await
    };
    let ((_, _, first), (status, _, body)) = tokio::join!(first, second);
    assert_eq!(status, 400, "{body}");
    assert_eq!(first, "1", "the held GET ends with the close packet");
    let (status, _, _) = server.http("GET", &path, &[], "").await;
    assert_eq!(status, 400, "the session is gone");
}

#[tokio::test]
async fn a_polling_session_is_a_connection_counted_listed_and_limited_like_any_other() {
    let server = Server::start_with(&[
        ("RINGCAST_MAX_CONNECTIONS_PER_USER", "1"),
        ("RINGCAST_ALLOWED_ORIGINS", "http://app.example"),
    ]);
    let t = token(json!({"sub": "once", "projects": ["p"]}));
    let origin = [("Origin", "http://app.example")];
    let (status, head, _) = server
        .http("GET", "/socket.io/?EIO=4&transport=polling", &origin, "")
        .await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("access-control-allow-origin: http://app.example"),
        "{head}"
    );
    let (status, _, _) = server
        .http(
            "GET",
            "/socket.io/?EIO=4&transport=polling",
            &[("Origin", "http://evil.example")],
            "",
        )
        .await;
    assert_eq!(status, 403, "an origin off the list is refused");
    let connect = format!("40{{\"token\":\"{t}\"}}");
    let open = |server: &Server| {
        let connect = connect.clone();
        let server_addr = server.addr;
        async move {
            let server = Probe(server_addr);
            let sid = server.handshake().await;
            let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
            server.post(&path, &connect).await;
            server.get(&path).await
        }
    };
    let first = open(&server).await;
    assert!(first.starts_with("40{"), "{first}");
    // Listed by the admin API as a connection of its user...
    let auth = format!("Bearer {API_KEY}");
    let (status, _, body) = server
        .http(
            "GET",
            "/api/v1/admin/connections?user_id=once",
            &[("Authorization", &auth)],
            "",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"transport\":\"socket.io\""), "{body}");
    // ...and counted: the user's second one is refused, with the reason.
    let second = open(&server).await;
    assert!(second.starts_with("44{"), "{second}");
    assert!(second.contains("\"status\":429"), "{second}");
}

#[tokio::test]
async fn polling_sessions_time_out_before_and_after_their_connect() {
    let server = Server::start_with(&[
        ("RINGCAST_HEADER_TIMEOUT_MS", "300"),
        ("RINGCAST_SOCKETIO_PING_INTERVAL_MS", "200"),
        ("RINGCAST_SOCKETIO_PING_TIMEOUT_MS", "200"),
    ]);
    let probe = Probe(server.addr);
    // No CONNECT within the head deadline: the session is gone.
    let idle = probe.handshake().await;
    let path = |sid: &str| format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    // A client that stops polling after its CONNECT misses the pings: closed, then gone.
    let quiet = probe.handshake().await;
    let t = token(json!({"sub": "q", "projects": ["p"]}));
    probe
        .post(&path(&quiet), &format!("40{{\"token\":\"{t}\"}}"))
        .await;
    let auth = format!("Bearer {API_KEY}");
    let listed = || async {
        let (_, _, body) = server
            .http(
                "GET",
                "/api/v1/admin/connections?user_id=q",
                &[("Authorization", &auth)],
                "",
            )
            .await;
        body.contains("socket.io")
    };
    assert!(listed().await, "connected");
    let started = std::time::Instant::now();
    loop {
        // Held until the deadline (answered with a close packet, or closed unanswered), then
        // no such session.
        if probe.status("GET", &path(&idle)).await == Some(400) {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "an unconnected session outlived its deadline"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    while listed().await {
        assert!(
            started.elapsed() < WAIT,
            "a silent polling session was never closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn refused_connects_are_bounded_on_both_transports_and_per_address() {
    let server = Server::start_with(&[
        ("RINGCAST_LIMIT_LOOPBACK", "true"),
        ("RINGCAST_MAX_PENDING_PER_IP", "4"),
        ("RINGCAST_CONNECTIONS_PER_IP_PER_MINUTE", "0"),
    ]);
    // WebSocket: refusals of any kind count; the third closes the socket.
    let mut ws = RawWs::connect(server.addr, "/socket.io/?EIO=4&transport=websocket").await;
    ws.recv().await.expect("the open packet");
    for packet in ["40/a,", "40{\"token\":\"bad\"}", "40/b,"] {
        ws.send_frame(true, 0x1, packet.as_bytes()).await;
        let answer = String::from_utf8(ws.recv().await.unwrap().payload).unwrap();
        assert!(answer.starts_with("44"), "{packet}: {answer}");
    }
    assert_eq!(ws.recv_close_code().await, 1008);
    // Polling: the same bound; the session ends past it, and one GET never carries more.
    let probe = Probe(server.addr);
    let sid = probe.handshake().await;
    let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    let bad = vec!["40{\"token\":\"bad\"}"; 50].join("\x1e");
    probe.post(&path, &bad).await;
    assert_eq!(
        probe.status("GET", &path).await,
        Some(400),
        "the session ended"
    );
    // A body is read only for a session that exists, and before its CONNECT only a small one.
    let unknown = "POST /socket.io/?EIO=4&transport=polling&sid=1-nope HTTP/1.1\r\n\
                   Host: x\r\nContent-Length: 100000\r\n\r\nx";
    let (status, _, body) = raw_exchange(server.addr, unknown.as_bytes()).await;
    assert_eq!(status, 400, "answered on its head: {body}");
    let sid = probe.handshake().await;
    let big = format!("40{{\"token\":\"{}\"}}", "x".repeat(20_000));
    let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    let (status, _) = probe.request("POST", &path, &big).await;
    assert_eq!(status, 413);
    // Sessions waiting for their CONNECT, from one address: at most its share (4 on the
    // node, 2 per worker here), then 429.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            probe
                .status("GET", "/socket.io/?EIO=4&transport=polling")
                .await,
        );
    }
    assert!(statuses.contains(&Some(429)), "{statuses:?}");
}

/// Raw polling requests to one server.
struct Probe(std::net::SocketAddr);

impl Probe {
    async fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (status, _, body) = raw_exchange(self.0, req.as_bytes()).await;
        (status, body)
    }

    /// The status of a request, None if the socket closed without an answer.
    async fn status(&self, method: &str, path: &str) -> Option<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut s = tokio::net::TcpStream::connect(self.0).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut out))
            .await
            .expect("answered or closed")
            .ok()?;
        String::from_utf8_lossy(&out)
            .split(' ')
            .nth(1)?
            .parse()
            .ok()
    }

    async fn handshake(&self) -> String {
        let (status, body) = self
            .request("GET", "/socket.io/?EIO=4&transport=polling", "")
            .await;
        assert_eq!(status, 200, "{body}");
        let open: serde_json::Value = serde_json::from_str(&body[1..]).unwrap();
        open["sid"].as_str().unwrap().to_owned()
    }

    async fn post(&self, path: &str, body: &str) {
        let (status, answer) = self.request("POST", path, body).await;
        assert_eq!((status, answer.as_str()), (200, "ok"));
    }

    async fn get(&self, path: &str) -> String {
        let (status, body) = self.request("GET", path, "").await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

#[tokio::test]
async fn malformed_packets_close_that_session_only() {
    let server = Server::start();
    let t = token(json!({"sub": "raw", "projects": ["p"]}));
    let open = |t: String| async move {
        let mut ws = RawWs::connect(server.addr, "/socket.io/?EIO=4&transport=websocket").await;
        ws.recv().await.expect("the open packet");
        ws.send_frame(true, 0x1, format!("40{{\"token\":\"{t}\"}}").as_bytes())
            .await;
        let connect = String::from_utf8(ws.recv().await.unwrap().payload).unwrap();
        assert!(connect.starts_with("40{"), "{connect}");
        ws.recv().await.unwrap(); // welcome
        ws
    };
    let mut bystander = open(t.clone()).await;
    for bad in [
        "42[\"x\"",
        "4x",
        "9",
        "42{\"not\":\"an array\"}",
        "452-[\"x\"]",
    ] {
        let mut ws = open(t.clone()).await;
        ws.send_frame(true, 0x1, bad.as_bytes()).await;
        let why = String::from_utf8(ws.recv().await.unwrap().payload).unwrap();
        assert!(
            why.contains("malformed") || why.contains("binary"),
            "{bad}: {why}"
        );
        if bad.starts_with("45") {
            continue; // a binary packet is refused with an error, then its frame would follow
        }
        assert_eq!(ws.recv_close_code().await, 1008, "{bad}");
    }
    // The bystander is untouched: it still answers.
    bystander
        .send_frame(true, 0x1, b"421[\"subscribe\",{\"channel\":\"project:p\"}]")
        .await;
    let ack = String::from_utf8(bystander.recv().await.unwrap().payload).unwrap();
    assert!(
        ack.starts_with("431[{") && ack.contains("\"ok\":true"),
        "{ack}"
    );
}

#[tokio::test]
async fn old_protocols_unknown_transports_and_sessions_get_engine_io_errors() {
    let server = Server::start();
    for sid in ["1-nope", "zz", "ffffffffffffffff-x", "-"] {
        let (status, _, body) = server
            .http(
                "GET",
                &format!("/socket.io/?EIO=4&transport=polling&sid={sid}"),
                &[],
                "",
            )
            .await;
        assert_eq!(status, 400, "{sid}: {body}");
        let code = &serde_json::from_str::<serde_json::Value>(&body).unwrap()["code"];
        assert_eq!(code, 1, "{sid}: {body}");
    }
    let (status, _, body) = server
        .http("GET", "/socket.io/?EIO=3&transport=polling", &[], "")
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["code"],
        5
    );
    let (status, _, body) = server
        .http("GET", "/socket.io/?EIO=4&transport=carrier-pigeon", &[], "")
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["code"],
        0
    );
}
