//! Samples of a process from /proc: CPU time and resident memory; the generator's own CPU
//! from getrusage; the kernel's TCP memory from /proc/net/sockstat.

use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    /// Server user+system CPU, microseconds (0 without a pid).
    pub server_cpu_us: u64,
    pub server_rss_kib: u64,
    /// This process's user+system CPU, microseconds.
    pub own_cpu_us: u64,
    /// Kernel memory of all TCP sockets, KiB (`mem` of /proc/net/sockstat, in pages).
    pub tcp_mem_kib: u64,
    /// TCP sockets in use (both ends of every loopback connection).
    pub tcp_inuse: u64,
}

pub fn sample(pid: Option<u32>) -> Sample {
    // A server may be several processes (nginx: a master and its workers): sum the tree.
    let (server_cpu_us, server_rss_kib) = pid.map_or((0, 0), |pid| {
        with_children(pid)
            .into_iter()
            .map(proc_usage)
            .fold((0, 0), |(c, r), (c2, r2)| (c + c2, r + r2))
    });
    let (tcp_inuse, tcp_mem_kib) = sockstat();
    Sample {
        at: Instant::now(),
        server_cpu_us,
        server_rss_kib,
        own_cpu_us: own_cpu_us(),
        tcp_mem_kib,
        tcp_inuse,
    }
}

/// `pid` and its direct children.
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                pids.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    pids
}

fn proc_usage(pid: u32) -> (u64, u64) {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) * 1_000_000 / ticks)
        })
        .unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    (cpu, rss)
}

fn own_cpu_us() -> u64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

fn sockstat() -> (u64, u64) {
    let page_kib = (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) / 1024) as u64;
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("TCP:")) else {
        return (0, 0);
    };
    let f: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| {
        f.iter()
            .position(|&x| x == name)
            .and_then(|i| f.get(i + 1)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("inuse"), field("mem") * page_kib)
}
