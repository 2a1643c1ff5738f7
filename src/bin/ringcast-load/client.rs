//! Subscribers: connect from a chosen 127.x source address, handshake for the target, then
//! read frames and account for every event (latency, seq gaps, duplicates).
//!
//! Cheap per frame on purpose: no JSON parse (two substring scans), no allocation per frame,
//! one read buffer per subscriber that parses every frame a coalesced write delivered.

use std::cell::RefCell;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use hdrhistogram::Histogram;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use socket2::{Domain, Socket, Type};

use crate::wire::{self, Target};

/// Read buffer per subscriber; grows for larger frames.
const READ_BUF: usize = 16 * 1024;

/// Counters all threads share (relaxed: progress, not logic).
#[derive(Default)]
pub struct Progress {
    pub ready: AtomicUsize,
    pub failed: AtomicUsize,
    pub received: AtomicU64,
    /// Subscribers that finished a resume after the storm (`replayed` seen).
    pub recovered: AtomicUsize,
    pub not_recovered: AtomicUsize,
    pub storm: AtomicBool,
    /// Jitter mode is on: subscribers are cut at random and resume.
    pub jitter: AtomicBool,
    /// Connections cut by jitter.
    pub cuts: AtomicU64,
    /// Subscribers that moved to the failover node (told `shutdown`, or closed, by theirs).
    pub moved: AtomicUsize,
    pub stop: AtomicBool,
}

/// Per-subscriber bookkeeping.
#[derive(Default, Clone)]
pub struct Sub {
    pub channel: usize,
    pub last_seq: u64,
    pub events: u64,
    pub dups: u64,
    pub gaps: u64,
    pub epoch: String,
    pub fd: Option<RawFd>,
}

/// One generator thread's results.
pub struct ThreadStats {
    pub latency_us: Histogram<u64>,
    pub subs: Vec<Sub>,
}

impl ThreadStats {
    pub fn new(subs: usize) -> ThreadStats {
        ThreadStats {
            latency_us: Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds"),
            subs: vec![Sub::default(); subs],
        }
    }
}

pub struct Ctx {
    pub target: Target,
    pub addr: SocketAddr,
    /// Where a subscriber resumes when its node drains (cluster mode).
    pub failover: Option<SocketAddr>,
    pub token: String,
    pub progress: Arc<Progress>,
    pub stats: RefCell<ThreadStats>,
    /// This thread's first connections not yet ready or failed.
    pub connecting: std::cell::Cell<usize>,
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Connects from `src` (a 127.x address) without blocking the thread.
pub async fn connect(src: Ipv4Addr, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    // Let the kernel pick the port at connect time, per destination, not at bind time.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and an int option.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket.bind(&SocketAddr::new(src.into(), 0).into())?;
    match socket.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    stream.writable(false).await?;
    // SAFETY: the fd stays open (owned by `stream`) for this borrow.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    if let Some(e) = socket2::SockRef::from(&fd).take_error()? {
        return Err(e);
    }
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads more bytes into the tail of `buf`; false on EOF or error.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(READ_BUF.max(buf.len()));
    }
    let len = buf.len();
    let owned = std::mem::take(buf);
    let (res, slice) = stream.read(owned.slice_mut(len..)).await;
    *buf = slice.into_inner();
    matches!(res, Ok(n) if n > 0)
}

/// WebSocket upgrade; returns the bytes read past the response head.
pub async fn handshake(
    stream: &mut TcpStream,
    host: &SocketAddr,
    path: &str,
) -> io::Result<Vec<u8>> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let (res, _) = stream.write_all(req.into_bytes()).await;
    res?;
    let mut buf = Vec::with_capacity(READ_BUF);
    loop {
        if let Some(end) = wire::memfind(&buf, b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 101") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                return Err(io::Error::other(format!("upgrade refused: {head}")));
            }
            buf.drain(..end + 4);
            return Ok(buf);
        }
        if !read_more(stream, &mut buf).await {
            return Err(io::Error::other("closed during the handshake"));
        }
    }
}

/// One subscriber: connects, reads until the run stops; after a storm, resumes.
pub async fn subscriber(ctx: Rc<Ctx>, idx: usize, channel: usize, src: Ipv4Addr) {
    ctx.stats.borrow_mut().subs[idx].channel = channel;
    let name = format!("bench:{channel}");
    let mut first = true;
    let mut addr = ctx.addr;
    loop {
        let resume = if first {
            None
        } else {
            let subs = &ctx.stats.borrow().subs;
            Some((subs[idx].last_seq, subs[idx].epoch.clone()))
        };
        let path = ctx.target.subscribe_path(
            &name,
            &ctx.token,
            resume.as_ref().map(|(s, e)| (*s, e.as_str())),
        );
        let stream = match connect(src, addr).await {
            Ok(s) => s,
            Err(e) => return fail(&ctx, first, &format!("connect: {e}")),
        };
        let mut stream = stream;
        let buf = match handshake(&mut stream, &addr, &path).await {
            Ok(b) => b,
            Err(e) => return fail(&ctx, first, &e.to_string()),
        };
        ctx.stats.borrow_mut().subs[idx].fd = Some(stream.as_raw_fd());
        let outcome = read_loop(&ctx, &mut stream, buf, idx, &name, first).await;
        ctx.stats.borrow_mut().subs[idx].fd = None;
        if let Ended::Refused(why) = &outcome {
            return fail(&ctx, first, why);
        }
        first = false;
        let cut_on_purpose = ctx.progress.storm.load(Ordering::Relaxed)
            || ctx.progress.jitter.load(Ordering::Relaxed);
        if outcome == Ended::Closed && cut_on_purpose && ctx.target == Target::Ringcast {
            continue; // the storm or the jitter cut us off: resume
        }
        match ctx.failover {
            Some(other) if addr != other && !ctx.progress.stop.load(Ordering::Relaxed) => {
                // Our node drains: resume on the other one.
                addr = other;
                ctx.progress.moved.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            _ => {}
        }
        return;
    }
}

fn fail(ctx: &Ctx, first: bool, why: &str) {
    if first {
        ctx.connecting.set(ctx.connecting.get() - 1);
    }
    let n = ctx.progress.failed.fetch_add(1, Ordering::Relaxed);
    if n < 3 {
        eprintln!(
            "subscriber failed{}: {why}",
            if first { "" } else { " to resume" }
        );
    }
}

#[derive(PartialEq, Eq)]
enum Ended {
    Closed,
    /// The server said no before the subscriber was ready (ringcast-socketio's CONNECT or
    /// subscribe); counted as a failed connect.
    Refused(String),
}

async fn read_loop(
    ctx: &Ctx,
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    idx: usize,
    channel: &str,
    first: bool,
) -> Ended {
    // Floor and Nchan say nothing after the upgrade: the subscription is live at once.
    let mut ready = first && matches!(ctx.target, Target::Floor | Target::Nchan);
    let mut replaying = !first;
    loop {
        let mut consumed = 0;
        let mut events = 0u64;
        let mut replies: Vec<Vec<u8>> = Vec::new();
        {
            let now = now_us();
            let mut stats = ctx.stats.borrow_mut();
            let ThreadStats { latency_us, subs } = &mut *stats;
            let sub = &mut subs[idx];
            while let Some(frame) = wire::parse_frame(&buf[consumed..]) {
                consumed += frame.len;
                match frame.opcode {
                    0x9 => replies.push(wire::client_frame(0xA, frame.payload)),
                    0x8 => return Ended::Closed,
                    0x1 | 0x2 => {
                        let p = frame.payload;
                        match classify(ctx.target, p) {
                            Kind::Event(body) => {
                                let Some(seq) = ctx.target.event_seq(body) else {
                                    continue;
                                };
                                events += 1;
                                sub.events += 1;
                                if sub.last_seq == 0 {
                                    // The first event: seqs need not start at 1 (a
                                    // cluster's start far above); the count says what is lost.
                                    sub.last_seq = seq;
                                } else if seq <= sub.last_seq {
                                    sub.dups += 1;
                                } else {
                                    sub.gaps += seq - sub.last_seq - 1;
                                    sub.last_seq = seq;
                                }
                                if !replaying {
                                    if let Some(t) = wire::find_u64(body, b"\"t\":") {
                                        let _ = latency_us.record(now.saturating_sub(t).max(1));
                                    }
                                }
                            }
                            Kind::Welcome => {
                                if let Some(at) = wire::memfind(p, b"\"epoch\":\"") {
                                    let rest = &p[at + 9..];
                                    let end = rest.iter().position(|&b| b == b'"').unwrap_or(0);
                                    sub.epoch = String::from_utf8_lossy(&rest[..end]).to_string();
                                }
                                if first {
                                    ready = true;
                                }
                            }
                            Kind::Replayed(recovered) => {
                                replaying = false;
                                let counter = if recovered {
                                    &ctx.progress.recovered
                                } else {
                                    &ctx.progress.not_recovered
                                };
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                            Kind::SocketIoOpen if ctx.target == Target::RingcastSocketio => {
                                let connect = format!(r#"40{{"token":"{}"}}"#, ctx.token);
                                replies.push(wire::client_frame(0x1, connect.as_bytes()));
                            }
                            Kind::SocketIoOpen => replies.push(wire::client_frame(0x1, b"40")),
                            Kind::SocketIoConnected if ctx.target == Target::RingcastSocketio => {
                                // Connected: join the channel (ack id 1); ready at its ack.
                                let subscribe =
                                    format!(r#"421["subscribe",{{"channel":"{channel}"}}]"#);
                                replies.push(wire::client_frame(0x1, subscribe.as_bytes()));
                            }
                            Kind::SocketIoConnected => ready = true,
                            Kind::SocketIoSubscribed => {
                                if first {
                                    ready = true;
                                }
                            }
                            Kind::SocketIoRefused => {
                                let text = String::from_utf8_lossy(&p[..p.len().min(300)]);
                                return Ended::Refused(format!("refused: {text}"));
                            }
                            Kind::SocketIoPing => replies.push(wire::client_frame(0x1, b"3")),
                            Kind::Other => {}
                            Kind::Shutdown if ctx.failover.is_some() => return Ended::Closed,
                            Kind::Shutdown => {}
                        }
                    }
                    _ => {}
                }
            }
        }
        buf.drain(..consumed);
        if events > 0 {
            ctx.progress.received.fetch_add(events, Ordering::Relaxed);
        }
        if ready {
            ready = false;
            ctx.connecting.set(ctx.connecting.get() - 1);
            ctx.progress.ready.fetch_add(1, Ordering::Relaxed);
        }
        for reply in replies {
            let (res, _) = stream.write_all(reply).await;
            if res.is_err() {
                return Ended::Closed;
            }
        }
        if !read_more(stream, &mut buf).await {
            return Ended::Closed;
        }
    }
}

enum Kind<'a> {
    Event(&'a [u8]),
    /// The node drains (ringcast).
    Shutdown,
    Welcome,
    Replayed(bool),
    SocketIoOpen,
    SocketIoConnected,
    SocketIoPing,
    /// ringcast-socketio: the acknowledgement of our subscribe, `431[{"type":"subscribed"…}]`.
    SocketIoSubscribed,
    /// ringcast-socketio: CONNECT_ERROR, or a subscribe acknowledged with something else.
    SocketIoRefused,
    Other,
}

fn classify(target: Target, p: &[u8]) -> Kind<'_> {
    match target {
        Target::Ringcast => {
            if p.starts_with(b"{\"type\":\"welcome\"") {
                Kind::Welcome
            } else if p.starts_with(b"{\"type\":\"shutdown\"") {
                Kind::Shutdown
            } else if p.starts_with(b"{\"type\":\"replayed\"") {
                Kind::Replayed(wire::memfind(p, b"\"recovered\":true").is_some())
            } else if p.starts_with(b"{\"type\"") {
                Kind::Other
            } else {
                Kind::Event(p)
            }
        }
        Target::Floor | Target::Nchan => Kind::Event(p),
        Target::Socketio => {
            if p.starts_with(b"42") {
                Kind::Event(p)
            } else if p.starts_with(b"40") {
                Kind::SocketIoConnected
            } else if p.starts_with(b"0{") {
                Kind::SocketIoOpen
            } else if p == b"2" {
                Kind::SocketIoPing
            } else {
                Kind::Other
            }
        }
        Target::RingcastSocketio => {
            if p.starts_with(b"42[") {
                // Events first: they are nearly every frame. ringcast's own controls come as
                // `ringcast:*` events (welcome, shutdown, errors...).
                if !p[3..].starts_with(b"\"ringcast:") {
                    Kind::Event(p)
                } else if p[3..].starts_with(b"\"ringcast:shutdown\"") {
                    Kind::Shutdown
                } else {
                    Kind::Other
                }
            } else if p == b"2" {
                Kind::SocketIoPing
            } else if p.starts_with(b"431[") {
                if wire::memfind(p, b"\"type\":\"subscribed\"").is_some() {
                    Kind::SocketIoSubscribed
                } else {
                    Kind::SocketIoRefused
                }
            } else if p.starts_with(b"40{") {
                Kind::SocketIoConnected
            } else if p.starts_with(b"44") {
                Kind::SocketIoRefused
            } else if p.starts_with(b"0{") {
                Kind::SocketIoOpen
            } else {
                Kind::Other
            }
        }
    }
}
