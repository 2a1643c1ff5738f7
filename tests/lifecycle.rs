//! End to end: the process itself — io_uring per worker, heartbeats, drain on SIGTERM, start-up
//! checks and development mode.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

#[test]
fn every_worker_runs_its_own_io_uring_instance() {
    let server = Server::start_with(&[("RINGCAST_WORKERS", "2"), ("RINGCAST_IO_DRIVER", "uring")]);
    let rings = std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|target| target.to_string_lossy().contains("io_uring"))
        .count();
    assert!(
        rings >= 2,
        "expected an io_uring instance per worker, found {rings}"
    );
}

#[test]
fn the_legacy_driver_serves_too() {
    let server = Server::start_with(&[("RINGCAST_IO_DRIVER", "legacy")]);
    let rings = std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|target| target.to_string_lossy().contains("io_uring"))
        .count();
    assert_eq!(rings, 0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut ws, _) = connect(
            &server,
            &format!("channels=dashboard&token={}", admin_token()),
        )
        .await;
        recv_json(&mut ws).await;
        server.publish_one("dashboard", "e", json!(1)).await;
        assert_eq!(recv_json(&mut ws).await["seq"], 1);
    });
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed_one_that_does_stays() {
    let server = Server::start_with(&[
        ("RINGCAST_PING_INTERVAL_MS", "100"),
        ("RINGCAST_PONG_TIMEOUT_MS", "50"),
        ("RINGCAST_MAX_MISSED_PONGS", "3"),
    ]);
    let t = admin_token();
    // Raw client: reads pings but never answers them.
    let mut mute = RawWs::connect(server.addr, &format!("/ws?token={t}")).await;
    assert_eq!(mute.recv_json().await["heartbeat_ms"], 100);
    // tungstenite answers pings while it reads, so this one keeps reading all along.
    let (mut polite, _) = connect(&server, &format!("channels=dashboard&token={t}")).await;
    recv_json(&mut polite).await;
    let polite = tokio::spawn(async move {
        let ev = recv_json(&mut polite).await;
        (ev["event"].clone(), polite)
    });

    let started = Instant::now();
    let mut pings = 0;
    let close_code = loop {
        let frame = mute.recv().await.expect("close frame before TCP close");
        match frame.opcode {
            0x9 => pings += 1,
            0x8 => break frame.close_code(),
            op => panic!("unexpected opcode {op}"),
        }
    };
    assert_eq!(close_code, Some(4002));
    assert!(pings >= 3, "closed after {pings} pings");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The polite client went through the same rounds (and more) and is still served.
    tokio::time::sleep(Duration::from_millis(500)).await; // five more ping rounds
    server.publish_one("dashboard", "alive", json!(1)).await;
    let (event, _polite) = polite.await.unwrap();
    assert_eq!(event, "alive");
}

#[tokio::test]
async fn sigterm_drains_clients_with_shutdown_and_1012_then_exits_zero() {
    let mut server = Server::start_with(&[("RINGCAST_DRAIN_TIMEOUT_MS", "1500")]);
    let t = admin_token();
    let (mut polite, _) = connect(&server, &format!("channels=dashboard&token={t}")).await;
    recv_json(&mut polite).await;
    // A raw client that stays after the notice: it is closed with 1012 at the drain timeout.
    let mut stubborn = RawWs::connect(server.addr, &format!("/ws?token={t}")).await;
    stubborn.recv_json().await;
    assert_eq!(server.http("GET", "/readyz", &[], "").await.0, 200);

    server.terminate();
    let started = std::time::Instant::now();
    assert_eq!(recv_json(&mut polite).await["type"], "shutdown");
    assert_eq!(stubborn.recv_json().await["type"], "shutdown");
    // The polite client leaves as told (it would reconnect elsewhere).
    polite.close(None).await.unwrap();

    // While the stubborn client holds on, the node is draining.
    let (status, _, body) = server.http("GET", "/readyz", &[], "").await;
    assert_eq!((status, body.trim()), (503, "draining"));
    let (status, _, _) = raw_exchange(
        server.addr,
        format!(
            "GET /ws?token={t} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status, 503);

    let close = stubborn.recv().await.unwrap();
    assert_eq!(close.close_code(), Some(1012));
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "1012 only at the drain timeout"
    );
    let status = server.wait_exit(Duration::from_secs(8));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn bad_settings_refuse_to_start_with_a_readable_reason() {
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringcast"));
        cmd.env_clear()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        // A server that starts instead of refusing must not hang the test.
        let deadline = Instant::now() + WAIT;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ringcast started with {env:?} instead of refusing");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run(&[("RINGCAST_LISTEN", "0.0.0.0:0")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("refusing to listen on 0.0.0.0:0"), "{err}");
    let (code, err) = run(&[
        ("RINGCAST_LISTEN", "127.0.0.1:0"),
        ("RINGCAST_WORKERS", "0"),
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("workers"), "{err}");
    let (code, err) = run(&[
        ("RINGCAST_LISTEN", "127.0.0.1:0"),
        ("RINGCAST_JWT_SECRET", "a-long-enough-secret-value"),
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("RINGCAST_API_KEY"), "{err}");
    let (code, err) = run(&[("RINGCAST_LISTEN", "not-an-address")]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("RINGCAST_LISTEN") || err.contains("invalid"),
        "{err}"
    );
}

#[test]
fn development_mode_prints_a_working_admin_token_and_api_key() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .env_clear()
        .env("RINGCAST_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = TimedLines::new(child.stdout.take().unwrap());
    let (mut token, mut key, mut addr) = (None, None, None);
    while addr.is_none() {
        let line = lines.next_line().expect("output before exit");
        if let Some(t) = line.strip_prefix("admin token (24 h): ") {
            token = Some(t.to_string());
        } else if let Some(k) = line.strip_prefix("api key: ") {
            key = Some(k.to_string());
        } else if let Some(a) = line.strip_prefix("listening on ") {
            addr = Some(a.parse::<std::net::SocketAddr>().unwrap());
        }
    }
    let (token, key, addr) = (token.unwrap(), key.unwrap(), addr.unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = format!("ws://{addr}/ws?channels=system,project:any&token={token}");
        let (mut ws, _) = ws_connect(url).await.unwrap();
        assert_eq!(recv_json(&mut ws).await["type"], "welcome");
        let body = r#"{"channel":"system","event":"hello","data":{}}"#;
        let req = format!(
            "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(raw_exchange(addr, req.as_bytes()).await.0, 200);
        recv_until_type(&mut ws, "subscribed").await;
        recv_json(&mut ws).await; // second subscribed
        assert_eq!(recv_json(&mut ws).await["event"], "hello");
    });
    let _ = child.kill();
    let _ = child.wait();
}
