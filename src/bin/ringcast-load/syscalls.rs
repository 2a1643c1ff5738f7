//! Counts the server's system calls over a fixed window of a load run, so a report can say how
//! many syscalls (and which) each delivery cost.
//!
//! With perf (the default): `perf stat -x, -D -1 --control fifo:… -e 'syscalls:sys_enter_*'
//! -e io_uring:io_uring_submit_req … -p PIDS` is started with its events disabled, enabled
//! through the control fifo at the window's start and disabled at its end; the deliveries are
//! read from the generator's counter at the two acknowledgements, so the counts and the
//! deliveries cover the same interval. The io_uring events count the submissions (SQEs) by
//! opcode, since a send through io_uring is not a syscall of its own.
//!
//! perf takes ~13 s to exit afterwards (the kernel releases ~360 tracepoints one by one); that
//! happens while the run drains and is waited for, bounded.
//!
//! The fallback is `strace -c -f -p PIDS`: ptrace stops the server at every syscall and slows
//! it down a lot, so the counts are right but CPU and latency of that run are not.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tool {
    /// perf if it can attach, else strace.
    Auto,
    Perf,
    Strace,
}

/// io_uring opcodes counted one by one (include/uapi/linux/io_uring.h).
const OPCODES: &[(u8, &str)] = &[
    (1, "readv"),
    (2, "writev"),
    (6, "poll_add"),
    (9, "sendmsg"),
    (10, "recvmsg"),
    (11, "timeout"),
    (13, "accept"),
    (14, "async_cancel"),
    (19, "close"),
    (22, "read"),
    (23, "write"),
    (26, "send"),
    (27, "recv"),
    (47, "send_zc"),
];

/// What the window counted.
#[derive(Debug, Default, Serialize)]
pub struct SyscallReport {
    /// "perf" or "strace" (strace slows the server: trust its counts, not that run's timings).
    pub tool: String,
    /// The processes counted (a server and its worker processes).
    pub pids: Vec<u32>,
    /// Seconds after publishing started that the window opened.
    pub window_at_secs: f64,
    pub window_secs: f64,
    /// Deliveries the generator received inside the window.
    pub deliveries: u64,
    pub total: u64,
    pub per_delivery: f64,
    /// Every syscall seen in the window, by name.
    pub by_name: BTreeMap<String, u64>,
    pub per_delivery_by_name: BTreeMap<String, f64>,
    /// io_uring submissions (perf only): all, and the counted opcodes by name.
    pub io_uring_sqes: Option<u64>,
    pub io_uring_sqes_per_delivery: Option<f64>,
    pub io_uring_sqes_by_op: BTreeMap<String, u64>,
    /// Why perf was not used, when it was not.
    pub note: String,
}

/// Opens the window at `at` after `start`, keeps it open for `window`, and returns the counts.
/// Blocks for the window plus the counter's exit (bounded); never leaves a child running.
pub fn count_window(
    tool: Tool,
    pids: Vec<u32>,
    received: &AtomicU64,
    start: Instant,
    at: Duration,
    window: Duration,
) -> Result<SyscallReport, String> {
    let mut note = String::new();
    if tool != Tool::Strace {
        match Perf::spawn(&pids) {
            Ok(perf) => return perf.run(pids, received, start, at, window),
            Err(e) if tool == Tool::Auto => note = format!("perf failed ({e}); strace used"),
            Err(e) => return Err(e),
        }
    }
    let mut r = strace_window(pids, received, start, at, window)?;
    r.note = format!(
        "{note}{}strace stops the server at every syscall: this run's CPU and latency are not \
         comparable, and the window's edges are approximate (attach and detach take a while)",
        if note.is_empty() { "" } else { "; " }
    );
    Ok(r)
}

struct Perf {
    child: Child,
    dir: PathBuf,
    ctl: File,
    ack: File,
}

impl Perf {
    fn spawn(pids: &[u32]) -> Result<Perf, String> {
        let dir = std::env::temp_dir().join(format!("ringcast-load-perf.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for name in ["ctl", "ack"] {
            let path =
                std::ffi::CString::new(dir.join(name).to_string_lossy().as_bytes()).expect("path");
            // SAFETY: mkfifo with a valid C string.
            if unsafe { libc::mkfifo(path.as_ptr(), 0o600) } != 0 {
                return Err(format!("mkfifo: {}", std::io::Error::last_os_error()));
            }
        }
        // Our ends open read-write and non-blocking first, so perf's open of either never
        // waits for a peer.
        let open = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(dir.join(name))
                .map_err(|e| format!("open fifo: {e}"))
        };
        let (ctl, ack) = (open("ctl")?, open("ack")?);
        let pid_list = pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new("perf");
        cmd.arg("stat")
            .arg("-x,")
            .arg("-o")
            .arg(dir.join("out.csv"))
            .args(["-D", "-1", "--control"])
            .arg(format!(
                "fifo:{},{}",
                dir.join("ctl").display(),
                dir.join("ack").display()
            ))
            .args(["-e", "syscalls:sys_enter_*"])
            .args(["-e", "io_uring:io_uring_submit_req"]);
        for (op, _) in OPCODES {
            cmd.args(["-e", "io_uring:io_uring_submit_req", "--filter"])
                .arg(format!("opcode == {op}"));
        }
        let child = cmd
            .arg("-p")
            .arg(pid_list)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.join("stderr")).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("perf: {e}"))?;
        let mut perf = Perf {
            child,
            dir,
            ctl,
            ack,
        };
        // perf answers a control command only once its events are open: a first "disable"
        // (they start disabled) tells that it attached.
        if let Err(e) = perf.command("disable", Duration::from_secs(20)) {
            let why = perf.stderr_tail();
            perf.kill();
            return Err(format!("{e}: {why}"));
        }
        Ok(perf)
    }

    fn run(
        mut self,
        pids: Vec<u32>,
        received: &AtomicU64,
        start: Instant,
        at: Duration,
        window: Duration,
    ) -> Result<SyscallReport, String> {
        let result = (|| {
            late(start, at)?;
            sleep_until(start + at);
            self.command("enable", Duration::from_secs(5))?;
            let (t0, d0) = (Instant::now(), received.load(Ordering::Relaxed));
            sleep_until(t0 + window);
            self.command("disable", Duration::from_secs(5))?;
            let (t1, d1) = (Instant::now(), received.load(Ordering::Relaxed));
            Ok((t0, t1, d1 - d0))
        })();
        let (t0, t1, deliveries) = match result {
            Ok(v) => v,
            Err(e) => {
                self.kill();
                return Err(e);
            }
        };
        // SIGINT: perf prints its counts and exits (slowly, see the module comment).
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        if !self.wait(Duration::from_secs(120)) {
            self.kill();
            return Err("perf did not exit within 120 s after the window".into());
        }
        let text = std::fs::read_to_string(self.dir.join("out.csv")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&self.dir);
        let mut by_name = BTreeMap::new();
        let mut uring = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() < 3 {
                continue;
            }
            let count = f[0].trim().parse::<u64>().unwrap_or(0);
            if let Some(name) = f[2].strip_prefix("syscalls:sys_enter_") {
                if count > 0 {
                    by_name.insert(name.to_string(), count);
                }
            } else if f[2].starts_with("io_uring:io_uring_submit_req") {
                uring.push(count);
            }
        }
        if by_name.is_empty() && uring.is_empty() {
            return Err(format!("perf printed no counts: {}", text.trim()));
        }
        let mut r = report("perf", pids, start, t0, t1, deliveries, by_name);
        if let Some(&all) = uring.first() {
            r.io_uring_sqes = Some(all);
            r.io_uring_sqes_per_delivery = Some(per(all, deliveries));
            for ((_, name), &n) in OPCODES.iter().zip(&uring[1..]) {
                if n > 0 {
                    r.io_uring_sqes_by_op.insert(name.to_string(), n);
                }
            }
        }
        Ok(r)
    }

    /// Sends a control command and waits for perf's "ack".
    fn command(&mut self, what: &str, timeout: Duration) -> Result<(), String> {
        self.ctl
            .write_all(format!("{what}\n").as_bytes())
            .map_err(|e| format!("perf control: {e}"))?;
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        // perf writes "ack\n" and its terminating NUL.
        while !got.windows(4).any(|w| w == b"ack\n") {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("perf did not acknowledge {what:?}"));
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return Err("perf exited".into());
            }
            let mut pfd = libc::pollfd {
                fd: self.ack.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; at most 100 ms so a dead perf is noticed.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(100) as i32) };
            let mut buf = [0u8; 64];
            if let Ok(n) = self.ack.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    fn stderr_tail(&self) -> String {
        let s = std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default();
        let s = s.trim();
        s[s.len().saturating_sub(300)..].to_string()
    }
}

fn strace_window(
    pids: Vec<u32>,
    received: &AtomicU64,
    start: Instant,
    at: Duration,
    window: Duration,
) -> Result<SyscallReport, String> {
    let out = std::env::temp_dir().join(format!("ringcast-load-strace.{}", std::process::id()));
    late(start, at)?;
    sleep_until(start + at);
    let mut cmd = Command::new("strace");
    cmd.args(["-c", "-f", "-q", "-o"]).arg(&out);
    for p in &pids {
        cmd.arg("-p").arg(p.to_string());
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("strace: {e}"))?;
    // Attaching to every thread takes a moment; count deliveries from after it.
    std::thread::sleep(Duration::from_millis(200));
    let (t0, d0) = (Instant::now(), received.load(Ordering::Relaxed));
    sleep_until(t0 + window);
    let (t1, d1) = (Instant::now(), received.load(Ordering::Relaxed));
    // SAFETY: signalling our own child; strace detaches and writes its summary.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(child.try_wait(), Ok(Some(_))) {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("strace did not exit within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    // "% time  seconds  usecs/call  calls  errors  syscall"; errors may be blank.
    let mut by_name = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || f[0].starts_with('-') || f[0] == "%" || f[f.len() - 1] == "total" {
            continue;
        }
        if let Ok(calls) = f[3].parse::<u64>() {
            by_name.insert(f[f.len() - 1].to_string(), calls);
        }
    }
    if by_name.is_empty() {
        return Err(format!("strace printed no counts: {}", text.trim()));
    }
    Ok(report("strace", pids, start, t0, t1, d1 - d0, by_name))
}

fn report(
    tool: &str,
    pids: Vec<u32>,
    start: Instant,
    t0: Instant,
    t1: Instant,
    deliveries: u64,
    by_name: BTreeMap<String, u64>,
) -> SyscallReport {
    let total = by_name.values().sum();
    SyscallReport {
        tool: tool.into(),
        pids,
        window_at_secs: t0.duration_since(start).as_secs_f64(),
        window_secs: t1.duration_since(t0).as_secs_f64(),
        deliveries,
        total,
        per_delivery: per(total, deliveries),
        per_delivery_by_name: by_name
            .iter()
            .map(|(k, &v)| (k.clone(), per(v, deliveries)))
            .collect(),
        by_name,
        ..SyscallReport::default()
    }
}

fn per(n: u64, d: u64) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}

/// A window that would open well after its time would count the wrong part of the run.
fn late(start: Instant, at: Duration) -> Result<(), String> {
    let behind = start.elapsed().saturating_sub(at);
    if behind > Duration::from_millis(250) {
        return Err(format!(
            "the counter was ready {:.1} s after the window's start",
            behind.as_secs_f64()
        ));
    }
    Ok(())
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}
