//! The floor: the least work a WebSocket push server that writes once per delivery can do on
//! this kernel, run next to ringcast and its peers in the same scenarios.
//!
//! It is the floor because every delivery costs exactly one `send(2)` of a frame built once per
//! publish, and nothing else: no JSON (the published body is the payload), no per-connection
//! queue (a write that does not fit the socket buffer is counted as a drop, not retried), no
//! sequence numbers, no replay, no heartbeats, no rooms beyond `channel -> Vec<fd>` per core.
//! Whatever a figure shows for the floor is loopback TCP and the syscall; whatever ringcast
//! spends above it is ours.
//!
//! Shape: one pinned thread per core (`RINGCAST_WORKERS`, default all cores), each with a monoio
//! io_uring runtime and its own `SO_REUSEPORT` listener on `RINGCAST_LISTEN` (default
//! 127.0.0.1:8090). A publish writes the frame to this core's subscribers and hands the same
//! `Bytes` to the other cores over crossbeam (one wake-up per burst through an `AtomicWaker`).
//!
//! Wire: `GET /sub/<channel>` WebSocket upgrade (nothing the client sends afterwards is read
//! except EOF); `POST /pub/<channel>` with a Content-Length body, keep-alive, answered
//! `{"ok":true}` once handed off; `GET /stats` -> `{"drops":N,"connections":M}`.
//! Prints `listening on ADDR` once every worker is accepting.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::poll_fn;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use atomic_waker::AtomicWaker;
use bytes::{BufMut, Bytes, BytesMut};
use crossbeam_channel::{Receiver, Sender};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, Socket, Type};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Deliveries not written in full (socket buffer full, or the peer gone).
static DROPS: AtomicU64 = AtomicU64::new(0);
/// Open WebSocket subscribers, all cores.
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

const BACKLOG: i32 = 4096;
/// Largest HTTP head plus body accepted on a publish connection.
const MAX_REQUEST: usize = 1 << 20;
const OK: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}";
const NOT_FOUND: &[u8] = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
const BAD: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// A publish crossing to another core: the channel and the frame built once.
type Msg = (Arc<str>, Bytes);
/// The way into one core: its queue and the waker of its inbox task.
type Lane = (Sender<Msg>, Arc<AtomicWaker>);

/// One core's state: its rooms (channel -> subscriber fds) and the lanes to every core.
struct Core {
    id: usize,
    rooms: RefCell<HashMap<String, Vec<RawFd>>>,
    lanes: Arc<[Lane]>,
}

impl Core {
    /// Hands `frame` to the other cores, then writes it to this core's subscribers.
    fn publish(&self, channel: &str, frame: Bytes) {
        if self.lanes.len() > 1 {
            let channel: Arc<str> = Arc::from(channel);
            for (_, (tx, waker)) in self.lanes.iter().enumerate().filter(|(i, _)| *i != self.id) {
                let _ = tx.send((channel.clone(), frame.clone()));
                waker.wake();
            }
        }
        self.deliver(channel, &frame);
    }

    /// One nonblocking `send(2)` per subscriber; anything short of the whole frame is a drop.
    fn deliver(&self, channel: &str, frame: &[u8]) {
        let rooms = self.rooms.borrow();
        let Some(fds) = rooms.get(channel) else {
            return;
        };
        for &fd in fds {
            // MSG_DONTWAIT makes this one call nonblocking without touching the fd's mode, which
            // monoio's pending read on the same socket relies on; MSG_NOSIGNAL: no SIGPIPE.
            let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
            let n = unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), flags) };
            if n != frame.len() as isize {
                DROPS.fetch_add(1, Relaxed);
                if n > 0 {
                    // Part of a frame went out: the stream is corrupt, so end it (the reading
                    // task sees EOF and cleans up) rather than send the client garbage.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                }
            }
        }
    }
}

/// An unmasked server text frame around `payload`, in one buffer.
fn text_frame(payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut out = BytesMut::with_capacity(len + 10);
    out.put_u8(0x81);
    if len < 126 {
        out.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        out.put_u8(126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
    out.put_slice(payload);
    out.freeze()
}

/// What the connection loop needs from one parsed HTTP head.
struct Head {
    len: usize,
    post: bool,
    path: String,
    ws_key: Option<String>,
    body_len: usize,
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let path = req.path.unwrap_or("/");
    let mut head = Head {
        len,
        post: req.method == Some("POST"),
        path: path.split('?').next().unwrap_or(path).to_owned(),
        ws_key: None,
        body_len: 0,
    };
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("sec-websocket-key") {
            head.ws_key = std::str::from_utf8(h.value)
                .ok()
                .map(|k| k.trim().to_owned());
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(h.value).map_err(|_| ())?;
            head.body_len = value.trim().parse().map_err(|_| ())?;
        }
    }
    Ok(Some(head))
}

/// Reads more bytes onto the end of `buf`; `None` on EOF or error.
async fn read_more(stream: &mut TcpStream, mut buf: Vec<u8>) -> Option<Vec<u8>> {
    if buf.len() == buf.capacity() {
        buf.reserve(buf.capacity().max(1024));
    }
    let len = buf.len();
    let (res, slice) = stream.read(buf.slice_mut(len..)).await;
    match res {
        Ok(n) if n > 0 => Some(slice.into_inner()),
        _ => None,
    }
}

async fn serve(core: Rc<Core>, mut stream: TcpStream) {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let head = loop {
            match parse_head(&buf) {
                Ok(Some(head)) if head.len + head.body_len <= MAX_REQUEST => break head,
                Ok(None) if buf.len() < MAX_REQUEST => {}
                _ => {
                    let _ = stream.write_all(BAD).await;
                    return;
                }
            }
            buf = match read_more(&mut stream, buf).await {
                Some(buf) => buf,
                None => return,
            };
        };
        if let (Some(channel), Some(key), false) =
            (head.path.strip_prefix("/sub/"), &head.ws_key, head.post)
        {
            drop(buf);
            return subscribe(core, stream, channel, key).await;
        }
        let response: Vec<u8> = if let (Some(channel), true) =
            (head.path.strip_prefix("/pub/"), head.post)
        {
            let end = head.len + head.body_len;
            while buf.len() < end {
                buf = match read_more(&mut stream, buf).await {
                    Some(buf) => buf,
                    None => return,
                };
            }
            core.publish(channel, text_frame(&buf[head.len..end]));
            OK.to_vec()
        } else if head.path == "/stats" && !head.post {
            let body = format!(
                "{{\"drops\":{},\"connections\":{}}}",
                DROPS.load(Relaxed),
                CONNECTIONS.load(Relaxed)
            );
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        } else {
            NOT_FOUND.to_vec()
        };
        buf.drain(..(head.len + head.body_len).min(buf.len()));
        if stream.write_all(response).await.0.is_err() {
            return;
        }
    }
}

/// Answers the upgrade, joins the room, then only waits for EOF.
async fn subscribe(core: Rc<Core>, mut stream: TcpStream, channel: &str, key: &str) {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if stream.write_all(response.into_bytes()).await.0.is_err() {
        return;
    }
    let fd = stream.as_raw_fd();
    core.rooms
        .borrow_mut()
        .entry(channel.to_owned())
        .or_default()
        .push(fd);
    CONNECTIONS.fetch_add(1, Relaxed);

    // Client frames are read (into the start of the same 512 bytes) and ignored, until EOF.
    let mut sink = Vec::with_capacity(512);
    loop {
        let (res, buf) = stream.read(sink).await;
        if !matches!(res, Ok(n) if n > 0) {
            break;
        }
        sink = buf;
    }
    // Out of the room before the fd is closed (same thread as every write to it).
    let mut rooms = core.rooms.borrow_mut();
    if let Some(fds) = rooms.get_mut(channel) {
        if let Some(i) = fds.iter().position(|&f| f == fd) {
            fds.swap_remove(i);
        }
        if fds.is_empty() {
            rooms.remove(channel);
        }
    }
    CONNECTIONS.fetch_sub(1, Relaxed);
}

/// Writes what other cores published to this core's subscribers; idle costs nothing.
async fn inbox(core: Rc<Core>, rx: Receiver<Msg>, waker: Arc<AtomicWaker>) {
    loop {
        poll_fn(|cx| {
            if rx.is_empty() {
                waker.register(cx.waker());
            }
            // Checked again after registering: a send in between would otherwise be missed.
            if rx.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        while let Ok((channel, frame)) = rx.try_recv() {
            core.deliver(&channel, &frame);
        }
    }
}

async fn accept_loop(core: Rc<Core>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                monoio::spawn(serve(core.clone(), stream));
            }
            // EMFILE/ENFILE at the open-file limit: keep serving the open ones, retry soon.
            Err(_) => monoio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn bind(addr: SocketAddr, workers: usize) -> std::io::Result<Vec<StdListener>> {
    let mut addr = addr;
    (0..workers)
        .map(|_| {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(BACKLOG)?;
            let listener: StdListener = socket.into();
            addr = listener.local_addr()?;
            Ok(listener)
        })
        .collect()
}

fn main() {
    let addr: SocketAddr = std::env::var("RINGCAST_LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:8090".into())
        .parse()
        .expect("RINGCAST_LISTEN must be an address like 127.0.0.1:8090");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = std::env::var("RINGCAST_WORKERS")
        .ok()
        .map(|w| w.parse().expect("RINGCAST_WORKERS must be a number"))
        .unwrap_or(cores)
        .max(1);
    let listeners = bind(addr, workers).unwrap_or_else(|e| fail(format!("bind {addr}: {e}")));
    let addr = listeners[0].local_addr().expect("local_addr");

    let (lanes, inboxes): (Vec<Lane>, Vec<_>) = (0..workers)
        .map(|_| {
            let (tx, rx) = crossbeam_channel::unbounded();
            let waker = Arc::new(AtomicWaker::new());
            ((tx, waker.clone()), (rx, waker))
        })
        .unzip();
    let lanes: Arc<[Lane]> = lanes.into();
    let core_ids = core_affinity::get_core_ids().unwrap_or_default();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let mut threads = Vec::new();
    for (id, (listener, (rx, waker))) in listeners.into_iter().zip(inboxes).enumerate() {
        let (lanes, started) = (lanes.clone(), started_tx.clone());
        let pin = (!core_ids.is_empty()).then(|| core_ids[id % core_ids.len()]);
        threads.push(std::thread::spawn(move || {
            if let Some(core_id) = pin {
                core_affinity::set_for_current(core_id);
            }
            let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .enable_timer()
                .build()
                .unwrap_or_else(|e| fail(format!("io_uring: {e}")));
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener)
                    .unwrap_or_else(|e| fail(format!("listener: {e}")));
                let core = Rc::new(Core {
                    id,
                    rooms: Default::default(),
                    lanes,
                });
                monoio::spawn(inbox(core.clone(), rx, waker));
                let _ = started.send(());
                accept_loop(core, listener).await;
            });
        }));
    }
    drop(started_tx);
    for _ in 0..workers {
        started_rx
            .recv()
            .unwrap_or_else(|_| fail("a worker died".into()));
    }
    println!("listening on {addr}");
    for thread in threads {
        let _ = thread.join();
    }
}

fn fail(msg: String) -> ! {
    eprintln!("ringcast-floor: {msg}");
    std::process::exit(1)
}
