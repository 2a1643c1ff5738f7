//! `ringcast-load`: the load generator of docs/benchmarks.md.
//!
//! Opens N WebSocket subscribers over M channels (bound to several 127.0.0.x source addresses
//! to pass the ephemeral-port limit), publishes at a target rate with a send timestamp in every
//! message, and reports connect time, deliveries/s, latency percentiles, loss and duplicates by
//! seq, server RSS per connection and server CPU per delivery (from /proc/<pid>), and its own
//! CPU, so a reader can tell whether the generator was the bottleneck. Modes: `fanout`
//! (S1–S3), `idle` (S4), `storm` (S5: every client drops and resumes at once). With
//! `--syscalls`, the server's system calls are counted over a window of the publishing and
//! reported per delivery (see syscalls.rs).

mod client;
mod procstat;
mod publisher;
mod syscalls;
mod wire;

use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;

use client::{Ctx, Progress, ThreadStats};
use wire::Target;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Fanout,
    Idle,
    Storm,
}

#[derive(Debug, Parser)]
#[command(
    name = "ringcast-load",
    about = "Load generator for ringcast and its peers"
)]
struct Args {
    #[arg(long, value_enum, default_value = "ringcast")]
    target: Target,
    #[arg(long, value_enum, default_value = "fanout")]
    mode: Mode,
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Where publishers send (another node of a cluster); default: --addr.
    #[arg(long)]
    publish_addr: Option<SocketAddr>,
    /// Where subscribers resume when their node drains (another node of a cluster).
    #[arg(long)]
    failover_addr: Option<SocketAddr>,
    /// Drain: send SIGTERM to this process (the subscribers' node) --drain-at seconds into
    /// the publishing.
    #[arg(long)]
    drain_pid: Option<u32>,
    #[arg(long, default_value_t = 5.0)]
    drain_at: f64,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Messages per second, all channels together.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Messages per publish request (ringcast only).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Parallel publisher connections.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Generator threads for the subscribers.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+N).
    #[arg(long, default_value_t = 4)]
    source_ips: u8,
    /// Bytes of padding in each message's data.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Most connection attempts in flight per thread.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// HS256 secret to sign the subscribers' token (ringcast).
    #[arg(long, env = "RINGCAST_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    #[arg(
        long,
        env = "RINGCAST_API_KEY",
        hide_env_values = true,
        default_value = ""
    )]
    api_key: String,
    /// Server process to sample (CPU, RSS) from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Seconds to wait for the last deliveries after publishing stops.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// Storm mode: seconds of publishing before every client drops and resumes at once.
    #[arg(long, default_value_t = 3.0)]
    storm_at: f64,
    /// Fanout mode: cut each subscriber at random every ~this many seconds (0: never); it
    /// resumes with its last seq (ringcast). Loss and order are checked as always.
    #[arg(long, default_value_t = 0.0)]
    jitter_secs: f64,
    /// Idle mode: keep the connections until standard input closes (for multi-process runs).
    #[arg(long)]
    hold: bool,
    /// Write the report as JSON to this file ("-" for stdout).
    #[arg(long)]
    json: Option<String>,
    /// A label for the report (scenario name).
    #[arg(long, default_value = "")]
    label: String,
    /// Count the server's system calls (perf, else strace) over a window of the publishing
    /// and report them per delivery. Needs --server-pid.
    #[arg(long)]
    syscalls: bool,
    /// Seconds after publishing starts that the syscall window opens (default: a quarter of
    /// --duration).
    #[arg(long)]
    syscalls_at: Option<f64>,
    /// Seconds the syscall window stays open (default: half of --duration; it always closes
    /// before publishing ends).
    #[arg(long)]
    syscalls_window: Option<f64>,
    #[arg(long, value_enum, default_value = "auto")]
    syscalls_tool: syscalls::Tool,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    label: String,
    target: String,
    mode: String,
    subscribers: usize,
    connected: usize,
    failed: usize,
    channels: usize,
    connect_secs: f64,
    rate_target: f64,
    /// Messages per publish request as sent (1 for targets without batches).
    batch: usize,
    publishers: usize,
    published: u64,
    publish_secs: f64,
    publish_rate: f64,
    publish_errors: u64,
    /// Publisher connections opened again after the server closed one with its answer.
    publish_reconnects: u64,
    publish_answer_p50_ms: f64,
    publish_answer_p99_ms: f64,
    expected: u64,
    delivered: u64,
    deliveries_per_sec: f64,
    lost: u64,
    duplicates: u64,
    gaps: u64,
    latency_p50_ms: f64,
    latency_p95_ms: f64,
    latency_p99_ms: f64,
    latency_p999_ms: f64,
    latency_max_ms: f64,
    server_cpu_us_per_delivery: f64,
    server_cpu_percent: f64,
    server_rss_kib_before: u64,
    server_rss_kib_after: u64,
    server_rss_bytes_per_connection: f64,
    tcp_mem_bytes_per_socket: f64,
    generator_cpu_percent: f64,
    storm_recovery_secs: Option<f64>,
    jitter_cuts: Option<u64>,
    storm_recovered: Option<usize>,
    /// Subscribers that resumed on the failover node.
    failed_over: Option<usize>,
    storm_not_recovered: Option<usize>,
    syscalls: Option<syscalls::SyscallReport>,
    syscalls_error: Option<String>,
}

fn main() {
    let args = Args::parse();
    let token = match (&args.secret, args.target) {
        (Some(secret), t) if t.is_ringcast() => sign(secret),
        _ => String::new(),
    };
    let progress = Arc::new(Progress::default());
    let before_connect = procstat::sample(args.server_pid);
    let started = Instant::now();

    // Subscribers, spread over threads; each thread reports its stats when asked.
    let (stats_tx, stats_rx) = mpsc::channel::<ThreadStats>();
    let per_thread = args.subscribers.div_ceil(args.threads.max(1));
    for t in 0..args.threads.max(1) {
        let first = t * per_thread;
        let count = per_thread.min(args.subscribers.saturating_sub(first));
        let (target, addr, token) = (args.target, args.addr, token.clone());
        let failover = args.failover_addr;
        let (progress, stats_tx) = (progress.clone(), stats_tx.clone());
        let (channels, source_ips, concurrency) = (
            args.channels,
            args.source_ips.max(1),
            args.connect_concurrency,
        );
        let jitter_secs = args.jitter_secs;
        std::thread::spawn(move || {
            let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let ctx = Rc::new(Ctx {
                    target,
                    addr,
                    failover,
                    token,
                    progress: progress.clone(),
                    stats: std::cell::RefCell::new(ThreadStats::new(count)),
                    connecting: std::cell::Cell::new(0),
                });
                for i in 0..count {
                    let global = first + i;
                    let src = Ipv4Addr::new(127, 0, 0, 2 + (global % source_ips as usize) as u8);
                    ctx.connecting.set(ctx.connecting.get() + 1);
                    monoio::spawn(client::subscriber(ctx.clone(), i, global % channels, src));
                    // Bound the connection attempts in flight.
                    while ctx.connecting.get() >= concurrency {
                        monoio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                let mut stormed = false;
                let mut next_cut: Vec<Option<Instant>> = vec![None; count];
                let pick = || Duration::from_secs_f64(jitter_secs * (0.5 + rand::random::<f64>()));
                loop {
                    monoio::time::sleep(Duration::from_millis(5)).await;
                    if jitter_secs > 0.0 && progress.jitter.load(Ordering::Relaxed) {
                        let now = Instant::now();
                        for (i, sub) in ctx.stats.borrow().subs.iter().enumerate() {
                            let due = *next_cut[i].get_or_insert_with(|| now + pick());
                            if let (Some(fd), true) = (sub.fd, now >= due) {
                                // SAFETY: shutting down a socket this thread owns.
                                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                                progress.cuts.fetch_add(1, Ordering::Relaxed);
                                next_cut[i] = Some(now + pick());
                            }
                        }
                    }
                    if progress.storm.load(Ordering::Relaxed) && !stormed {
                        stormed = true;
                        for sub in &ctx.stats.borrow().subs {
                            if let Some(fd) = sub.fd {
                                // SAFETY: shutting down a socket this thread owns.
                                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                            }
                        }
                    }
                    if progress.stop.load(Ordering::Relaxed) {
                        let stats =
                            std::mem::replace(&mut *ctx.stats.borrow_mut(), ThreadStats::new(0));
                        let _ = stats_tx.send(stats);
                        // Keep the sockets open until the process exits (idle --hold measures them).
                        std::future::pending::<()>().await;
                    }
                }
            });
        });
    }
    drop(stats_tx);

    // Wait for every subscriber to be connected (or failed).
    let connect_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = progress.ready.load(Ordering::Relaxed) + progress.failed.load(Ordering::Relaxed);
        if done >= args.subscribers || Instant::now() > connect_deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let connected = progress.ready.load(Ordering::Relaxed);
    eprintln!(
        "{} of {} subscribers connected in {:.2}s ({} failed)",
        connected,
        args.subscribers,
        connect_secs,
        progress.failed.load(Ordering::Relaxed)
    );

    let mut report = Report {
        label: args.label.clone(),
        target: args.target.name().to_string(),
        mode: format!("{:?}", args.mode).to_lowercase(),
        subscribers: args.subscribers,
        connected,
        failed: progress.failed.load(Ordering::Relaxed),
        channels: args.channels,
        connect_secs,
        rate_target: args.rate,
        batch: if args.target.batches() {
            args.batch.max(1)
        } else {
            1
        },
        publishers: args.publishers.max(1),
        server_rss_kib_before: before_connect.server_rss_kib,
        ..Report::default()
    };

    if args.mode == Mode::Idle {
        std::thread::sleep(Duration::from_secs(2)); // let lazily allocated buffers settle
        let after = procstat::sample(args.server_pid);
        report.server_rss_kib_after = after.server_rss_kib;
        report.server_rss_bytes_per_connection = per(
            (after
                .server_rss_kib
                .saturating_sub(before_connect.server_rss_kib)) as f64
                * 1024.0,
            connected as f64,
        );
        report.tcp_mem_bytes_per_socket = per(
            after.tcp_mem_kib.saturating_sub(before_connect.tcp_mem_kib) as f64 * 1024.0,
            (after.tcp_inuse.saturating_sub(before_connect.tcp_inuse)) as f64,
        );
        finish(&args, &report);
        if args.hold {
            println!("holding {connected} connections; close stdin to end");
            let mut sink = String::new();
            while std::io::stdin()
                .read_line(&mut sink)
                .map(|n| n > 0)
                .unwrap_or(false)
            {}
        }
        std::process::exit(0);
    }

    // Publish, sampling server and generator CPU around it.
    let before = procstat::sample(args.server_pid);
    let plan = publisher::Plan {
        target: args.target,
        addr: args.publish_addr.unwrap_or(args.addr),
        api_key: args.api_key.clone(),
        rate: args.rate,
        batch: args.batch,
        connections: args.publishers.max(1),
        channels: args.channels,
        duration: Duration::from_secs_f64(args.duration),
        pad: "x".repeat(args.payload),
    };
    let publish_start = Instant::now();
    let publisher = std::thread::spawn(move || publisher::run(plan));
    let counter = match (args.syscalls, args.server_pid) {
        (true, Some(pid)) => {
            let at = args.syscalls_at.unwrap_or(args.duration / 4.0).max(0.0);
            let window = args
                .syscalls_window
                .unwrap_or(args.duration / 2.0)
                .min(args.duration - at)
                .max(0.1);
            let (tool, progress) = (args.syscalls_tool, progress.clone());
            let pids = procstat::with_children(pid);
            Some(std::thread::spawn(move || {
                syscalls::count_window(
                    tool,
                    pids,
                    &progress.received,
                    publish_start,
                    Duration::from_secs_f64(at),
                    Duration::from_secs_f64(window),
                )
            }))
        }
        (true, None) => {
            report.syscalls_error = Some("--syscalls needs --server-pid".into());
            None
        }
        _ => None,
    };
    if args.jitter_secs > 0.0 {
        progress.jitter.store(true, Ordering::Relaxed);
    }
    if let Some(pid) = args.drain_pid {
        let at = Duration::from_secs_f64(args.drain_at.max(0.0));
        std::thread::spawn(move || {
            std::thread::sleep(at);
            // SAFETY: a signal to the process the caller named.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        });
    }
    let mut storm_recovery = None;
    if args.mode == Mode::Storm {
        std::thread::sleep(Duration::from_secs_f64(args.storm_at));
        let storm_start = Instant::now();
        progress.storm.store(true, Ordering::Relaxed);
        let deadline = storm_start + Duration::from_secs(60);
        while progress.recovered.load(Ordering::Relaxed)
            + progress.not_recovered.load(Ordering::Relaxed)
            + progress.failed.load(Ordering::Relaxed)
            < connected
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        storm_recovery = Some(storm_start.elapsed().as_secs_f64());
    }
    let published = publisher.join().expect("publisher thread");
    // Stop cutting; the last ones cut resume and catch up during the drain wait.
    progress.jitter.store(false, Ordering::Relaxed);

    // Expected deliveries: every subscriber of a channel gets every message of it.
    let mut subs_per_channel = vec![0u64; args.channels];
    for i in 0..args.subscribers {
        subs_per_channel[i % args.channels] += 1;
    }
    let expected: u64 = published
        .per_channel
        .iter()
        .zip(&subs_per_channel)
        .map(|(m, s)| m * s)
        .sum();
    let drain_deadline = Instant::now() + Duration::from_secs_f64(args.drain);
    while progress.received.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let delivered_at = Instant::now();
    let after = procstat::sample(args.server_pid);
    progress.stop.store(true, Ordering::Relaxed);

    let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("bounds");
    let (mut delivered, mut dups, mut gaps, mut lost) = (0u64, 0u64, 0u64, 0u64);
    for stats in stats_rx.iter().take(args.threads.max(1)) {
        let _ = latency.add(&stats.latency_us);
        for sub in &stats.subs {
            delivered += sub.events;
            dups += sub.dups;
            gaps += sub.gaps;
            let published_here = published.per_channel.get(sub.channel).copied().unwrap_or(0);
            lost += published_here.saturating_sub(sub.events - sub.dups);
        }
    }
    let window = delivered_at.duration_since(before.at).as_secs_f64();
    let ms = |us: u64| us as f64 / 1000.0;
    report.published = published.per_channel.iter().sum();
    report.publish_secs = published.elapsed.as_secs_f64();
    report.publish_rate = per(report.published as f64, report.publish_secs);
    report.publish_errors = published.errors;
    report.publish_reconnects = published.reconnects;
    report.publish_answer_p50_ms = ms(published.answer_us.value_at_quantile(0.5));
    report.publish_answer_p99_ms = ms(published.answer_us.value_at_quantile(0.99));
    report.expected = expected;
    report.delivered = delivered;
    report.deliveries_per_sec = per(delivered as f64, window);
    report.lost = lost;
    report.duplicates = dups;
    report.gaps = gaps;
    report.latency_p50_ms = ms(latency.value_at_quantile(0.5));
    report.latency_p95_ms = ms(latency.value_at_quantile(0.95));
    report.latency_p99_ms = ms(latency.value_at_quantile(0.99));
    report.latency_p999_ms = ms(latency.value_at_quantile(0.999));
    report.latency_max_ms = ms(latency.max());
    let server_cpu = after.server_cpu_us.saturating_sub(before.server_cpu_us) as f64;
    report.server_cpu_us_per_delivery = per(server_cpu, delivered as f64);
    report.server_cpu_percent = per(server_cpu, window * 1e6) * 100.0;
    report.server_rss_kib_after = after.server_rss_kib;
    report.server_rss_bytes_per_connection = per(
        after
            .server_rss_kib
            .saturating_sub(before_connect.server_rss_kib) as f64
            * 1024.0,
        connected as f64,
    );
    report.generator_cpu_percent = per(
        after.own_cpu_us.saturating_sub(before.own_cpu_us) as f64,
        window * 1e6,
    ) * 100.0;
    if args.jitter_secs > 0.0 {
        report.jitter_cuts = Some(progress.cuts.load(Ordering::Relaxed));
    }
    if args.failover_addr.is_some() {
        report.failed_over = Some(progress.moved.load(Ordering::Relaxed));
    }
    if args.mode == Mode::Storm {
        report.storm_recovery_secs = storm_recovery;
        report.storm_recovered = Some(progress.recovered.load(Ordering::Relaxed));
        report.storm_not_recovered = Some(progress.not_recovered.load(Ordering::Relaxed));
    }
    if let Some(counter) = counter {
        match counter.join().expect("syscall counter thread") {
            Ok(r) => {
                eprintln!(
                    "syscalls ({}): {} in {:.1} s over {} deliveries, {:.2} per delivery",
                    r.tool, r.total, r.window_secs, r.deliveries, r.per_delivery
                );
                report.syscalls = Some(r);
            }
            Err(e) => {
                eprintln!("syscalls: {e}");
                report.syscalls_error = Some(e);
            }
        }
    }
    finish(&args, &report);
    std::process::exit(0);
}

fn per(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn sign(secret: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 6 * 3600;
    ringcast::edge::jwt::sign_hs256(
        secret.as_bytes(),
        &serde_json::json!({"sub": "bench", "channels": ["bench:*"], "exp": exp}),
    )
}

fn finish(args: &Args, r: &Report) {
    let v = serde_json::to_value(r).expect("report");
    eprintln!("{:<34} value", "metric");
    for (k, val) in v.as_object().expect("object") {
        let shown = match val {
            serde_json::Value::Number(n) if n.is_f64() => {
                format!("{:.3}", n.as_f64().unwrap_or(0.0))
            }
            other => other.to_string(),
        };
        eprintln!("{k:<34} {shown}");
    }
    match args.json.as_deref() {
        Some("-") => println!("{v}"),
        Some(path) => std::fs::write(path, format!("{v}\n")).expect("write JSON report"),
        None => {}
    }
}
