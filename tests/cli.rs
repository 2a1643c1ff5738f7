//! End to end: the binary as a user meets it — `--help`, settings from flags, variables and
//! the example file, an address already in use, and `ringcast token`. Every process started
//! here is waited for with a deadline and killed by its PID if it outlives it.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/ringcast.example.toml");

struct Exit {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `args` and only the variables in `env` until it exits; panics (after
/// killing it) if it is still running after `within`.
fn run(args: &[&str], env: &[(&str, &str)], within: Duration) -> Exit {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringcast"));
    cmd.env_clear()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ringcast {args:?} with {env:?} still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    Exit {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn quick(args: &[&str], env: &[(&str, &str)]) -> Exit {
    run(args, env, WAIT)
}

/// `--help` as (flag, the text under it) pairs, `--help` and `--version` left out.
fn options(help: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut in_options = false;
    for line in help.lines() {
        if line == "Options:" {
            in_options = true;
            continue;
        }
        if !in_options {
            continue;
        }
        let trimmed = line.trim_start();
        if trimmed.starts_with("--") || trimmed.starts_with("-h, ") || trimmed.starts_with("-V, ") {
            let flag = trimmed
                .split_whitespace()
                .find(|w| w.starts_with("--"))
                .unwrap()
                .to_owned();
            // Short help puts the description on the flag's line after the value name.
            let rest = trimmed
                .split_once('>')
                .map_or("", |(_, r)| r.trim())
                .to_owned();
            out.push((flag, rest));
        } else if let Some((_, text)) = out.last_mut() {
            text.push(' ');
            text.push_str(line.trim());
        }
    }
    out.retain(|(f, _)| f != "--help" && f != "--version");
    out
}

#[test]
fn help_gives_every_flag_a_description_and_its_default() {
    let help = quick(&["--help"], &[]);
    assert_eq!(help.code, Some(0));
    let opts = options(&help.stdout);
    assert!(
        opts.len() >= 40,
        "{} options in {}",
        opts.len(),
        help.stdout
    );
    for (flag, text) in &opts {
        let description = text.split("[default:").next().unwrap().trim();
        assert!(
            description.len() >= 10,
            "{flag} has no description: {text:?}"
        );
        assert!(
            text.contains("[default: "),
            "{flag} shows no default: {text:?}"
        );
    }
    let redis = &opts.iter().find(|(f, _)| f == "--redis-url").unwrap().1;
    assert!(redis.contains("cluster mode"), "{redis}");
    assert!(help.stdout.contains("token"), "the token command is listed");

    let token_help = quick(&["token", "--help"], &[]);
    assert_eq!(token_help.code, Some(0));
    for (flag, text) in options(&token_help.stdout) {
        assert!(text.trim().len() >= 10, "token {flag} has no description");
    }
}

#[test]
fn a_bad_value_names_the_variable_or_the_flag_it_came_from() {
    let env = quick(&[], &[("RINGCAST_WORKERS", "abc")]);
    assert_eq!(env.code, Some(2));
    assert!(
        env.stderr
            .contains("invalid value 'abc' in RINGCAST_WORKERS"),
        "{}",
        env.stderr
    );
    assert!(!env.stderr.contains("--workers"), "{}", env.stderr);
    let flag = quick(&["--workers", "abc"], &[("RINGCAST_WORKERS", "2")]);
    assert_eq!(flag.code, Some(2));
    assert!(
        flag.stderr.contains("'--workers <WORKERS>'"),
        "{}",
        flag.stderr
    );
    let driver = quick(&[], &[("RINGCAST_IO_DRIVER", "fast")]);
    assert_eq!(driver.code, Some(2));
    assert!(
        driver.stderr.contains("RINGCAST_IO_DRIVER") && driver.stderr.contains("uring"),
        "{}",
        driver.stderr
    );
}

#[test]
fn an_unknown_log_level_is_refused_with_the_levels() {
    let out = quick(&[], &[("RINGCAST_LOG", "verbose")]);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr
            .contains("invalid value 'verbose' in RINGCAST_LOG: expected one of error, warn, info, debug, trace"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn a_host_name_listens_on_its_address() {
    let server = Server::start_with(&[("RINGCAST_LISTEN", "localhost:0")]);
    assert_eq!(server.addr.ip().to_string(), "127.0.0.1");
    assert_eq!(server.http("GET", "/healthz", &[], "").await.0, 200);
    // A name without a port says what to write.
    for (args, env) in [
        (vec!["--listen", "localhost"], vec![]),
        (vec![], vec![("RINGCAST_LISTEN", "localhost")]),
    ] {
        let out = quick(&args, &env);
        assert_eq!(out.code, Some(2));
        assert!(
            out.stderr
                .contains("such as 127.0.0.1:8080 or localhost:8080"),
            "{}",
            out.stderr
        );
    }
}

#[tokio::test]
async fn a_second_ringcast_on_a_busy_address_exits_2_and_the_first_keeps_serving() {
    let server = Server::start();
    let addr = server.addr.to_string();
    let started = Instant::now();
    let second = run(
        &[],
        &[
            ("RINGCAST_LISTEN", &addr),
            ("RINGCAST_WORKERS", "2"),
            ("RINGCAST_JWT_SECRET", "another-secret-0123456789"),
            ("RINGCAST_API_KEY", API_KEY),
        ],
        Duration::from_secs(5),
    );
    assert_eq!(second.code, Some(2), "{}", second.stderr);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        second.stderr.contains(&format!(
            "cannot listen on {addr}: the address is already in use"
        )),
        "{}",
        second.stderr
    );
    assert!(!second.stdout.contains("listening on"), "{}", second.stdout);
    // Every new connection still lands on the first node: its secret, its seqs.
    let t = admin_token();
    for seq in 1..=8 {
        let (mut ws, _) = connect(&server, &format!("channels=dashboard&token={t}")).await;
        recv_until_type(&mut ws, "subscribed").await;
        assert_eq!(server.publish_one("dashboard", "e", json!(seq)).await, seq);
        assert_eq!(recv_json(&mut ws).await["seq"], seq);
    }
}

#[test]
fn a_port_held_by_another_program_exits_2_naming_the_address() {
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = other.local_addr().unwrap().to_string();
    let out = run(&[], &[("RINGCAST_LISTEN", &addr)], Duration::from_secs(5));
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "cannot listen on {addr}: the address is already in use"
        )),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn the_example_config_file_starts_a_server() {
    // The example as shipped, with one value changed to show the file is the one in force.
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    assert!(text.contains("\nping_interval_ms = 30000\n"));
    let dir = std::env::temp_dir().join(format!("ringcast-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ringcast.toml");
    std::fs::write(
        &path,
        text.replace(
            "\nping_interval_ms = 30000\n",
            "\nping_interval_ms = 12345\n",
        ),
    )
    .unwrap();
    let server = Server::start_with(&[("RINGCAST_CONFIG", path.to_str().unwrap())]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(server.http("GET", "/healthz", &[], "").await.0, 200);
    let (mut ws, welcome) = connect(
        &server,
        &format!("channels=dashboard&token={}", admin_token()),
    )
    .await;
    assert_eq!(welcome["heartbeat_ms"], 12345, "{welcome}");
    recv_until_type(&mut ws, "subscribed").await;
}

fn mint(args: &[&str], env: &[(&str, &str)]) -> Exit {
    let mut all = vec!["token"];
    all.extend_from_slice(args);
    quick(&all, env)
}

#[tokio::test]
async fn a_minted_token_opens_what_it_names_and_nothing_else() {
    let server = Server::start();
    let out = mint(
        &[
            "--sub",
            "u-cli",
            "--projects",
            "p1,p2",
            "--channels",
            "dashboard,team:*",
            "--ttl",
            "30m",
        ],
        &[("RINGCAST_JWT_SECRET", SECRET)],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let token = out.stdout.trim();
    assert_eq!(
        token.split('.').count(),
        3,
        "one JWT on stdout: {:?}",
        out.stdout
    );
    let claims = ringcast::edge::jwt::Verifier::hs256(SECRET.as_bytes(), 0)
        .verify(token)
        .unwrap();
    let exp = claims.exp.unwrap();
    assert!(exp.abs_diff(now_secs() + 1800) <= 5, "exp {exp}");
    assert!(claims.roles.is_empty());

    let (mut ws, welcome) = connect(
        &server,
        &format!("channels=project:p1,project:p2,dashboard,team:a&token={token}"),
    )
    .await;
    assert_eq!(welcome["type"], "welcome");
    for _ in 0..4 {
        assert_eq!(recv_json(&mut ws).await["type"], "subscribed");
    }
    assert_eq!(server.publish_one("team:a", "e", json!(1)).await, 1);
    assert_eq!(recv_json(&mut ws).await["channel"], "team:a");
    // Not named: another project, another kind, the admin channels.
    for channel in ["project:p3", "other:x", "system"] {
        let request = format!(
            "GET /ws?channels={channel}&token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        let (_, head, _) = request_head(server.addr, &request).await;
        assert!(head.starts_with("HTTP/1.1 403"), "{channel}: {head}");
    }
    let admin = mint(
        &["--sub", "root", "--projects", "*", "--roles", "admin"],
        &[("RINGCAST_JWT_SECRET", SECRET)],
    );
    let (_ws, _) = connect(
        &server,
        &format!("channels=system&token={}", admin.stdout.trim()),
    )
    .await;
}

#[tokio::test]
async fn a_minted_token_expires_after_its_ttl() {
    let server = Server::start();
    let out = mint(
        &["--sub", "u-short", "--projects", "p1", "--ttl", "2s"],
        &[("RINGCAST_JWT_SECRET", SECRET)],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let minted = Instant::now();
    let (mut ws, _) = connect(
        &server,
        &format!("channels=project:p1&token={}", out.stdout.trim()),
    )
    .await;
    assert_eq!(recv_close(&mut ws).await, 4001);
    let lived = minted.elapsed();
    // `exp` is whole seconds: the token lives between one and two seconds (and a sweep tick).
    assert!(
        lived >= Duration::from_millis(900) && lived < Duration::from_secs(4),
        "closed after {lived:?}"
    );
}

#[test]
fn token_refuses_without_a_secret_with_public_keys_only_and_with_an_empty_sub() {
    let out = mint(&["--sub", "u", "--projects", "p"], &[]);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("no token secret is configured"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty());
    let out = mint(
        &["--sub", "u", "--projects", "p"],
        &[("RINGCAST_JWT_PUBLIC_KEYS", "ES256:/nonexistent.pem")],
    );
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("needs the private key"),
        "{}",
        out.stderr
    );
    let out = mint(
        &["--sub", "", "--projects", "p"],
        &[("RINGCAST_JWT_SECRET", SECRET)],
    );
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("--sub must not be empty"),
        "{}",
        out.stderr
    );
    let out = mint(
        &["--sub", "u", "--projects", "p", "--ttl", "1w"],
        &[("RINGCAST_JWT_SECRET", SECRET)],
    );
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("--ttl"), "{}", out.stderr);
}

#[test]
fn token_reads_the_secret_and_audience_from_the_config_file() {
    let dir = std::env::temp_dir().join(format!("ringcast-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ringcast.toml");
    std::fs::write(
        &path,
        format!("jwt_secret = \"{SECRET}\"\njwt_audience = \"dashboards\"\n"),
    )
    .unwrap();
    let out = mint(
        &[
            "--config",
            path.to_str().unwrap(),
            "--sub",
            "u",
            "--projects",
            "p",
        ],
        &[],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let rules = ringcast::edge::jwt::Rules {
        leeway_secs: 0,
        audience: Some("dashboards".into()),
        issuer: None,
    };
    let verifier = ringcast::edge::jwt::Verifier::new(
        vec![ringcast::edge::jwt::Key::hs256(SECRET.as_bytes())],
        rules,
    );
    assert_eq!(verifier.verify(out.stdout.trim()).unwrap().sub, "u");
    std::fs::remove_dir_all(&dir).unwrap();
}
