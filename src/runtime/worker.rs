//! Worker threads: one monoio runtime per core, pinned, each with its own `SO_REUSEPORT`
//! listener on the same address, its mesh inbox and its sweep timer.
//!
//! Invariant: a connection is accepted, served and closed on one core; the kernel spreads new
//! connections over the listeners. io_uring is used when the kernel allows it; otherwise the
//! epoll fallback runs and the log says so and why, once.

use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use monoio::net::{TcpListener, TcpStream};
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use socket2::{Domain, Protocol, Socket, Type};

use super::core::{now_ms, Core, Shared};
use super::mesh::{Inbox, MeshMsg};

/// Serves one accepted socket on its core (the edge decides HTTP or WebSocket).
pub type Handler =
    Arc<dyn Fn(Rc<Core>, TcpStream, SocketAddr) -> Pin<Box<dyn Future<Output = ()>>> + Send + Sync>;

/// Which driver to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// io_uring, falling back to epoll with a warning.
    Auto,
    Uring,
    Legacy,
}

/// Most mesh messages handled before yielding to connection tasks.
const MESH_BATCH: usize = 256;
/// Listen backlog per worker (somaxconn caps it).
const BACKLOG: i32 = 4096;

/// Binds one `SO_REUSEPORT` listener per worker on `addr` (port 0: one free port for all).
pub fn bind_listeners(addr: SocketAddr, workers: usize) -> io::Result<Vec<StdListener>> {
    let mut listeners = Vec::with_capacity(workers);
    let mut addr = addr;
    for _ in 0..workers {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        let listener: StdListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// The driver a worker ended up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Running {
    IoUring,
    Epoll,
}

/// Starts one pinned worker thread per listener and returns once every worker is accepting
/// (or the first one that could not start has said why).
pub fn start(
    shared: Arc<Shared>,
    listeners: Vec<StdListener>,
    inboxes: Vec<Inbox>,
    driver: Driver,
    handler: Handler,
) -> io::Result<(Vec<JoinHandle<()>>, Running)> {
    let core_ids = core_affinity::get_core_ids().unwrap_or_default();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<io::Result<Running>>();
    let mut threads = Vec::new();
    for (id, (listener, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
        let shared = shared.clone();
        let handler = handler.clone();
        let started = started_tx.clone();
        let pin_to = (!core_ids.is_empty()).then(|| core_ids[id % core_ids.len()]);
        let thread = std::thread::Builder::new()
            .name(format!("ringcast-w{id}"))
            .spawn(move || {
                if let Some(core_id) = pin_to {
                    core_affinity::set_for_current(core_id);
                }
                let core = Rc::new(Core::new(id, shared));
                let work = serve(core, listener, inbox, handler);
                if let Err(e) = run_on(driver, work, &started) {
                    let _ = started.send(Err(e));
                }
            })?;
        threads.push(thread);
    }
    drop(started_tx);
    let mut running = Running::IoUring;
    for _ in 0..threads.len() {
        match started_rx.recv() {
            Ok(Ok(Running::Epoll)) => running = Running::Epoll,
            Ok(Ok(Running::IoUring)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("a worker thread died while starting")),
        }
    }
    Ok((threads, running))
}

static FALLBACK_WARNING: Once = Once::new();

fn run_on(
    driver: Driver,
    work: impl Future<Output = ()>,
    started: &std::sync::mpsc::Sender<io::Result<Running>>,
) -> io::Result<()> {
    if driver != Driver::Legacy {
        match RuntimeBuilder::<IoUringDriver>::new()
            .enable_timer()
            .build()
        {
            Ok(mut rt) => {
                let _ = started.send(Ok(Running::IoUring));
                rt.block_on(work);
                return Ok(());
            }
            Err(e) if driver == Driver::Auto => FALLBACK_WARNING.call_once(|| {
                tracing::warn!(
                    "io_uring is not available ({e}); running on the epoll fallback driver, \
                     which costs more syscalls per delivery. Check the kernel version, \
                     seccomp policy and RLIMIT_MEMLOCK (see tuning/)"
                )
            }),
            Err(e) => return Err(io::Error::new(e.kind(), format!("io_uring: {e}"))),
        }
    }
    let mut rt = RuntimeBuilder::<LegacyDriver>::new()
        .enable_timer()
        .build()?;
    let _ = started.send(Ok(Running::Epoll));
    rt.block_on(work);
    Ok(())
}

async fn serve(core: Rc<Core>, listener: StdListener, inbox: Inbox, handler: Handler) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("worker {}: listener: {e}", core.id);
            std::process::exit(1);
        }
    };
    monoio::spawn(mesh_loop(core.clone(), inbox));
    monoio::spawn(sweep_loop(core.clone()));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                monoio::spawn(handler(core.clone(), stream, peer));
            }
            Err(e) => {
                // EMFILE/ENFILE at the open-file limit: keep serving those we have, retry soon.
                tracing::warn!("worker {}: accept failed: {e}", core.id);
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn mesh_loop(core: Rc<Core>, inbox: Inbox) {
    let mut batch: Vec<MeshMsg> = Vec::with_capacity(MESH_BATCH);
    loop {
        inbox.recv_batch(&mut batch, MESH_BATCH).await;
        for msg in batch.drain(..) {
            core.handle(msg);
        }
        // Let the connection tasks write what was just queued before taking more.
        yield_now().await;
    }
}

async fn sweep_loop(core: Rc<Core>) {
    let ping = core.shared.settings.heartbeat.ping_interval;
    let tick = (ping / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut last_evict = Instant::now();
    let mut channels = ChannelSweep::default();
    loop {
        monoio::time::sleep(tick).await;
        let now = Instant::now();
        let unix_secs = now_ms() / 1000;
        let conns: Vec<_> = core.conns.borrow().values().cloned().collect();
        for conn in conns {
            conn.tick(now, unix_secs, &core);
        }
        if now.duration_since(last_evict) >= Duration::from_secs(1) {
            channels.run(&core).await;
            last_evict = now;
        }
    }
}

/// The once-a-second part of the sweep: ages out replay history (freeing idle channels) and
/// gives freed memory back to the OS.
#[derive(Default)]
struct ChannelSweep {
    /// The node's channel count at this core's previous sweep.
    node_before: usize,
    /// Sweeps left that release memory.
    releases: u8,
}

impl ChannelSweep {
    /// Channels freed per turn of the core: the rest of the core runs in between.
    const BUDGET: usize = 20_000;

    async fn run(&mut self, core: &Core) {
        let now = now_ms();
        while core.sequencer.borrow_mut().evict(now, Self::BUDGET) {
            yield_now().await;
        }
        core.report_channels();
        let gauge = &core.shared.stats.channels;
        // The allocator returns freed pages lazily, when its thread next asks it to, and a
        // core that has gone quiet never does: while channels are freed anywhere on the node
        // (their names and frames may come from any core), and once more after, thoroughly.
        let node = gauge.load(Ordering::Relaxed);
        if node < self.node_before {
            self.releases = 2;
        }
        self.node_before = node;
        if self.releases > 0 {
            self.releases -= 1;
            (core.shared.settings.release_memory)(self.releases == 0);
        }
    }
}

/// Gives the other ready tasks of this core a turn.
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}
