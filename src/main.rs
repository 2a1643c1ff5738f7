//! The `ringcast` binary: reads settings, starts one worker per core, drains on SIGTERM.

use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};

use ringcast::cluster::control::ControlSettings;
use ringcast::cluster::{ClusterSettings, Redis};
use ringcast::delivery::session::SessionConfig;
use ringcast::edge::config::{Command, Config, Flags, IoDriver, TokenSettings};
use ringcast::edge::http::{self, Edge};
use ringcast::edge::jwt::{self, Key, Rules, Verifier};
use ringcast::edge::token;
use ringcast::runtime::audit::Audit;
use ringcast::runtime::mesh;
use ringcast::runtime::node::Broker;
use ringcast::runtime::shared::{Settings, Shared};
use ringcast::runtime::worker::{self, Driver, Handler};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let level = match log_level(std::env::var("RINGCAST_LOG").ok().as_deref()) {
        Ok(level) => level,
        Err(e) => {
            eprintln!("ringcast: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_max_level(level)
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringcast: {e}");
            ExitCode::from(2)
        }
    }
}

/// `RINGCAST_LOG`: unset or empty means `info`; anything but a level refuses to start.
fn log_level(value: Option<&str>) -> Result<tracing::Level, String> {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None | Some("") | Some("info") => Ok(tracing::Level::INFO),
        Some("error") => Ok(tracing::Level::ERROR),
        Some("warn") => Ok(tracing::Level::WARN),
        Some("debug") => Ok(tracing::Level::DEBUG),
        Some("trace") => Ok(tracing::Level::TRACE),
        Some(_) => Err(format!(
            "invalid value '{}' in RINGCAST_LOG: expected one of error, warn, info, debug, trace",
            value.unwrap_or_default()
        )),
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let flags = Flags::from_args()?;
    if let Some(Command::Token(args)) = &flags.command {
        let settings = TokenSettings::load(&flags)?;
        println!("{}", token::mint(&settings, args, unix_secs())?);
        return Ok(());
    }
    let mut config = Config::load(flags)?;
    let open_files = raise_open_file_limit();
    fit_to_open_files(&mut config, open_files);
    if !config.transparent_huge_pages {
        disable_transparent_huge_pages();
    }
    let dev_mode = config.is_dev_mode();
    // Development mode signs with a random secret; otherwise the configured keys decide.
    let jwt_secret = config.jwt_secret.clone().unwrap_or_else(random_secret);
    let api_key = config.api_key.clone().unwrap_or_else(random_secret);

    let verifier = Arc::new(verifier(&config, dev_mode.then_some(jwt_secret.as_str()))?);
    let (mesh, inboxes) = mesh::mesh(config.workers, config.mesh_queue_bytes);
    let listeners = worker::bind_listeners(config.listen, config.workers)
        .map_err(|e| listen_error(config.listen, &e))?;
    let addr = listeners[0].local_addr()?;
    let broker = match &config.redis {
        None => Broker::Local,
        Some(redis) => Broker::Redis(Redis::start(
            ClusterSettings {
                url: redis.url.clone(),
                prefix: redis.prefix.clone(),
                timeout: redis.timeout,
                ring: config.ring,
                ingest: redis.ingest.clone(),
                control: ControlSettings {
                    instance: redis
                        .instance
                        .clone()
                        .unwrap_or_else(|| default_instance(addr.port())),
                    registry_ttl: redis.registry_ttl,
                    refresh: redis.registry_refresh,
                    max_connections: redis.max_connections,
                    limits: config.limits,
                    rate_limit: redis.rate_limit,
                    node_rate_limit: config.node_rate_limit,
                },
            },
            mesh.clone(),
        )?),
    };
    let shared = Arc::new(Shared::new(
        settings(&config),
        mesh,
        verifier.clone(),
        config.limits,
        Audit::new(config.audit_log.as_deref()).map_err(|e| {
            format!(
                "cannot open the audit log {}: {e}",
                config
                    .audit_log
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""))
                    .display()
            )
        })?,
        broker,
    ));
    let edge = Arc::new(Edge {
        verifier,
        api_key: api_key.clone(),
        allowed_origins: config.allowed_origins.clone(),
    });
    let handler: Handler = Arc::new(move |core: Rc<_>, stream, peer| {
        Box::pin(http::serve(edge.clone(), core, stream, peer))
    });
    let driver = match config.io_driver {
        IoDriver::Auto => Driver::Auto,
        IoDriver::Uring => Driver::Uring,
        IoDriver::Legacy => Driver::Legacy,
    };
    let signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    let (_threads, running) = worker::start(shared.clone(), listeners, inboxes, driver, handler)?;

    if dev_mode {
        announce_dev_mode(addr, &jwt_secret, &api_key, config.api_key.is_some());
    }
    tracing::info!(
        workers = config.workers,
        driver = ?running,
        epoch = %shared.epoch,
        "ringcast listening on {addr}"
    );
    // One line on stdout that scripts and tests wait for.
    println!("listening on {addr}");

    drain_on_signal(signals, &shared, config.drain_timeout);
    Ok(())
}

/// A node's name in the cluster when none is set: the host's name and the port, which stay the
/// same when it restarts (the name is cut to what an instance id may hold).
fn default_instance(port: u16) -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let host = unsafe {
        if libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        } else {
            String::new()
        }
    };
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(48)
        .collect();
    if host.is_empty() {
        format!("node-{port}")
    } else {
        format!("{host}-{port}")
    }
}

/// Descriptors kept back from client sockets: listeners, io_uring and mesh descriptors of every
/// worker, the audit log, and room to accept a socket at the bound in order to answer it.
fn reserved_files(workers: usize) -> usize {
    64 + 8 * workers
}

/// Client sockets stay below the open-file limit, and WebSocket/SSE connections leave room
/// below that for health checks, admin calls and publishers.
fn fit_to_open_files(config: &mut Config, open_files: u64) {
    let sockets = (open_files as usize).saturating_sub(reserved_files(config.workers));
    config.edge.max_sockets = sockets.max(1);
    let headroom = HTTP_HEADROOM.min(sockets / 2);
    let connections = u32::try_from(sockets - headroom).unwrap_or(u32::MAX);
    let limits = &mut config.limits;
    if limits.total == 0 || limits.total > connections {
        limits.total = connections;
    }
    tracing::info!(
        open_files,
        max_sockets = config.edge.max_sockets,
        max_connections = limits.total,
        "client sockets fit below the open-file limit"
    );
}

/// Sockets kept for HTTP when WebSocket/SSE connections are at their bound.
const HTTP_HEADROOM: usize = 64;

fn listen_error(addr: std::net::SocketAddr, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        format!(
            "cannot listen on {addr}: the address is already in use (by another ringcast or \
             another program); stop that one or choose another address with --listen or \
             RINGCAST_LISTEN"
        )
    } else {
        format!("cannot listen on {addr}: {e}")
    }
}

/// Freed memory must leave the process, and a small allocation must not pin a huge page: with
/// transparent huge pages the kernel folds the few pages still in use of each 2 MiB range back
/// into a whole huge page (khugepaged, every 10 s), so RSS grew again after the state of a
/// million channels had been freed, and idle connections cost ~1.8 KiB more each. A failure
/// (old kernel) only costs that.
fn disable_transparent_huge_pages() {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// One socket is one open file: lift the soft limit to the hard one (systemd and shells often
/// start services at 1024 soft). Returns the limit in force.
fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a stack value.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            tracing::info!(
                open_files = lim.rlim_cur,
                "open-file limit (one per connection)"
            );
            return lim.rlim_cur;
        }
    }
    1024
}

/// Every configured token key: the HS256 secret and the RS256/ES256 public keys.
fn verifier(config: &Config, dev_secret: Option<&str>) -> Result<Verifier, String> {
    let mut keys = Vec::new();
    if let Some(secret) = config.jwt_secret.as_deref().or(dev_secret) {
        keys.push(Key::hs256(secret.as_bytes()));
    }
    for (kid, alg, path) in &config.jwt_public_keys {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read public key {}: {e}", path.display()))?;
        keys.push(
            Key::public_pem(kid.clone(), *alg, &pem)
                .map_err(|e| format!("public key {}: {e}", path.display()))?,
        );
    }
    let rules = Rules {
        leeway_secs: config.jwt_leeway_secs,
        audience: config.jwt_audience.clone(),
        issuer: config.jwt_issuer.clone(),
    };
    Ok(Verifier::new(keys, rules))
}

fn settings(config: &Config) -> Settings {
    Settings {
        ring: config.ring,
        session: SessionConfig {
            heartbeat: config.heartbeat,
            socketio_heartbeat: config.socketio_heartbeat,
            max_channels_per_connection: config.max_channels_per_connection,
            max_queue_bytes: config.max_queue_bytes,
            max_client_messages_per_sec: config.max_client_messages_per_sec,
            queue_threshold: config.queue_threshold,
            slow_client_timeout: config.slow_client_timeout,
            connection_rate_limit: config.connection_rate_limit,
            key_interval: config.key_interval,
            queue_ttl: config.queue_ttl,
            ack_timeout: config.ack_timeout,
            ack_max_sends: config.ack_max_sends,
        },
        drain_timeout: config.drain_timeout,
        max_message_bytes: config.max_message_bytes,
        socketio_max_payload: config.socketio_max_payload,
        socketio_recovery: config.socketio_recovery,
        node_rate_limit: config.node_rate_limit,
        compress_over: config.compress_over,
        terminal_max_bytes_per_sec: config.terminal_max_bytes_per_sec,
        max_inflated_bytes_per_sec: config.max_inflated_bytes_per_sec,
        edge: config.edge,
        presence: config.presence.clone(),
        release_memory,
    }
}

/// `Settings::release_memory` for mimalloc, the global allocator above.
fn release_memory(all: bool) {
    extern "C" {
        /// mimalloc's `void mi_collect(bool force)`, in the library `mimalloc` links.
        fn mi_collect(force: bool);
    }
    // SAFETY: mi_collect takes a plain bool and acts on the calling thread's heap.
    unsafe { mi_collect(all) }
}

fn random_secret() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn announce_dev_mode(addr: std::net::SocketAddr, secret: &str, api_key: &str, key_given: bool) {
    let exp = unix_secs() + 24 * 3600;
    let token = jwt::sign_hs256(
        secret.as_bytes(),
        &serde_json::json!({
            "sub": "dev-admin", "roles": ["admin"], "projects": ["*"], "channels": ["*"], "exp": exp
        }),
    );
    tracing::warn!(
        "DEVELOPMENT MODE: no RINGCAST_JWT_SECRET set; using a random secret for this run"
    );
    println!(
        "development mode (loopback only, random secret; set RINGCAST_JWT_SECRET for real use)"
    );
    println!("admin token (24 h): {token}");
    if !key_given {
        println!("api key: {api_key}");
    }
    println!("try: websocat 'ws://{addr}/ws?channels=dashboard&token={token}'");
    println!(
        "     curl -H 'Authorization: Bearer <api key>' -d '{{\"channel\":\"dashboard\",\"event\":\"hello\",\"data\":{{}}}}' http://{addr}/api/v1/publish"
    );
}

/// Waits for SIGTERM/SIGINT, then drains: readiness off, upgrades refused, every client told
/// `shutdown` and closed with 1012; exits once all are gone or the drain timeout passes. A
/// second signal exits at once.
fn drain_on_signal(
    mut signals: signal_hook::iterator::Signals,
    shared: &Shared,
    timeout: Duration,
) {
    let first = signals.forever().next();
    tracing::info!(signal = ?first, "draining");
    shared.drain();
    // Clients were told `shutdown`; give them the drain timeout to leave, then close the rest
    // with 1012 and give those close handshakes a moment.
    let open = || shared.stats.connections.sum();
    let mut second_signal = false;
    let mut wait = |until: Instant| {
        while open() > 0 && Instant::now() < until && !second_signal {
            if signals.pending().next().is_some() {
                tracing::warn!("second signal: exiting without waiting");
                second_signal = true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait(Instant::now() + timeout);
    if open() > 0 {
        tracing::info!(
            connections = open(),
            "drain timeout: closing the rest with 1012"
        );
        shared.force_close();
        wait(Instant::now() + Duration::from_secs(3));
    }
    let left = open();
    tracing::info!(connections_left = left, "drained; exiting");
    std::process::exit(0);
}
