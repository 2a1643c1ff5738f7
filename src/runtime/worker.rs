//! Worker threads: one monoio runtime per core, pinned, each with its own `SO_REUSEPORT`
//! listener on the same address, its mesh inbox and its sweep timer.
//!
//! Invariant: a connection is accepted, served and closed on one core; the kernel spreads new
//! connections over the listeners. io_uring is used when the kernel allows it; otherwise the
//! epoll fallback runs and the log says so and why, once.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use monoio::net::{TcpListener, TcpStream};
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use socket2::{Domain, Protocol, Socket, Type};

use super::core::Core;
use super::mesh::{Inbox, MeshMsg};
use super::shared::{now_ms, Shared};

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
const MESH_BATCH: usize = 64;
/// Listen backlog per worker (somaxconn caps it).
const BACKLOG: i32 = 4096;

/// Binds one `SO_REUSEPORT` listener per worker on `addr` (port 0: one free port for all).
///
/// Fails with `AddrInUse` when anything else listens on `addr`, another ringcast included: the
/// first listener is bound and put to listening *without* `SO_REUSEPORT`, and only then opened
/// to the others. A second ringcast does the same, so its first listener meets ours at `bind`
/// or, if both bound at the same instant, at `listen` (the kernel checks the port again there),
/// and exactly one of them starts. `SO_REUSEADDR` keeps the previous run's `TIME_WAIT` sockets
/// from blocking a restart; it never lets two listeners share a port.
pub fn bind_listeners(addr: SocketAddr, workers: usize) -> io::Result<Vec<StdListener>> {
    let first = listener(addr, false)?;
    // From here on only sockets that set SO_REUSEPORT themselves (our other workers) can join.
    first.set_reuse_port(true)?;
    let first: StdListener = first.into();
    let addr = first.local_addr()?;
    let mut listeners = Vec::with_capacity(workers);
    listeners.push(first);
    for _ in 1..workers {
        listeners.push(listener(addr, true)?.into());
    }
    Ok(listeners)
}

fn listener(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
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
                let core = Rc::new_cyclic(|me| Core::new(id, shared, me.clone()));
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
    monoio::spawn(super::writer::flush_loop(core.clone()));
    monoio::spawn(super::writer::timer_loop(core.clone()));
    // Several accepts in flight: a core busy with many sockets still takes new ones at a
    // useful rate (each accept waits its turn behind every ready task), so a flood of busy
    // sockets cannot keep health checks and clients in the kernel's queue.
    let listener = Rc::new(listener);
    let shared = Rc::new(AcceptState {
        emfile: RefCell::new(RateLimitedLog::new(Duration::from_secs(10))),
        spare: RefCell::new(SpareFile::open()),
    });
    for _ in 1..ACCEPTORS {
        monoio::spawn(accept_loop(
            core.clone(),
            listener.clone(),
            handler.clone(),
            shared.clone(),
        ));
    }
    accept_loop(core, listener, handler, shared).await
}

/// Accepts in flight per worker.
const ACCEPTORS: usize = 8;

/// What a worker's accept loops share.
struct AcceptState {
    emfile: RefCell<RateLimitedLog>,
    spare: RefCell<SpareFile>,
}

async fn accept_loop(
    core: Rc<Core>,
    listener: Rc<TcpListener>,
    handler: Handler,
    state: Rc<AcceptState>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                monoio::spawn(handler(core.clone(), stream, peer));
            }
            Err(e) if is_out_of_files(&e) => {
                if let Some(suppressed) = state.emfile.borrow_mut().ready(Instant::now()) {
                    tracing::warn!(
                        worker = core.id,
                        suppressed,
                        "accept failed: {e}: the open-file limit is reached; closing idle \
                         sockets and refusing new ones with 503 (raise LimitNOFILE, see tuning/)"
                    );
                }
                // Room first from a socket that has sent nothing useful; failing that, the
                // spare descriptor lets one waiting client be accepted and told 503.
                if core.pending.evict_oldest_idle() {
                    yield_now().await;
                } else if state.spare.borrow_mut().release() {
                    if let Ok((stream, _)) = listener.accept().await {
                        refuse_at_file_limit(stream).await;
                    }
                    *state.spare.borrow_mut() = SpareFile::open();
                } else {
                    monoio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Err(e) => {
                tracing::warn!("worker {}: accept failed: {e}", core.id);
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn is_out_of_files(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// A descriptor held back so that, at the open-file limit, one socket can still be accepted
/// and answered instead of waiting in the backlog.
struct SpareFile(Option<std::fs::File>);

impl SpareFile {
    fn open() -> SpareFile {
        SpareFile(std::fs::File::open("/dev/null").ok())
    }

    /// Closes the spare; false if there was none.
    fn release(&mut self) -> bool {
        self.0.take().is_some()
    }
}

async fn refuse_at_file_limit(mut stream: TcpStream) {
    use monoio::io::AsyncWriteRentExt;
    let body = "{\"error\":\"the node is at its open-file limit\"}";
    let reply = crate::proto::http::response(
        503,
        "application/json",
        &[("Retry-After", "1")],
        body.as_bytes(),
        false,
    );
    let _ = stream.write_all(reply).await;
}

/// Lets a line through at most once per `every`, counting the ones held back.
pub struct RateLimitedLog {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(every: Duration) -> RateLimitedLog {
        RateLimitedLog {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(lines held back since the last one)` when a line may go out now.
    pub fn ready(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(at) if now.duration_since(at) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// A `RateLimitedLog` for a `static`, shared by threads: a line at most every 10 s.
#[derive(Default)]
pub struct SharedRateLimitedLog(std::sync::Mutex<Option<RateLimitedLog>>);

impl SharedRateLimitedLog {
    pub const fn new() -> SharedRateLimitedLog {
        SharedRateLimitedLog(std::sync::Mutex::new(None))
    }

    /// `Some(lines held back since the last one)` when a line may go out now.
    pub fn ready(&self) -> Option<u64> {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        log.get_or_insert_with(|| RateLimitedLog::new(Duration::from_secs(10)))
            .ready(Instant::now())
    }
}

async fn mesh_loop(core: Rc<Core>, inbox: Inbox) {
    let mut batch: Vec<MeshMsg> = Vec::with_capacity(MESH_BATCH);
    loop {
        inbox.recv_batch(&mut batch, MESH_BATCH).await;
        core.handle_batch(&mut batch);
        // Let the connection tasks write what was just queued before taking more.
        yield_now().await;
    }
}

async fn sweep_loop(core: Rc<Core>) {
    let session = &core.shared.settings.session;
    // Often enough for the shorter of the two heartbeats (and its pong deadline).
    let ping = [
        session.heartbeat.ping_interval,
        session.heartbeat.pong_timeout,
        session.socketio_heartbeat.ping_interval,
        session.socketio_heartbeat.pong_timeout,
    ]
    .into_iter()
    .min()
    .unwrap_or(Duration::from_secs(1));
    let tick = (ping / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut last_evict = Instant::now();
    let mut channels = ChannelSweep::default();
    loop {
        monoio::time::sleep(tick).await;
        let now = Instant::now();
        core.tick();
        core.pending.sweep(now);
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
        let node = gauge.sum() as usize;
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
pub(super) async fn yield_now() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limited_line_goes_out_once_per_period_and_counts_the_rest() {
        let mut log = RateLimitedLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.ready(t0), Some(0));
        for ms in [50, 100, 9_999] {
            assert_eq!(log.ready(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(log.ready(t0 + Duration::from_secs(10)), Some(3));
        assert_eq!(log.ready(t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn one_ringcast_per_address() {
        let ours = bind_listeners("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let addr = ours[0].local_addr().unwrap();
        assert!(ours.iter().all(|l| l.local_addr().unwrap() == addr));
        let second = bind_listeners(addr, 2).unwrap_err();
        assert_eq!(second.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn a_port_held_by_another_program_is_refused() {
        let other = StdListener::bind("127.0.0.1:0").unwrap();
        let err = bind_listeners(other.local_addr().unwrap(), 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn two_bound_at_once_only_one_listens() {
        // Both first sockets got past bind before either listened: the kernel's check at
        // listen lets exactly one through.
        let a = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        a.set_reuse_address(true).unwrap();
        a.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let addr = a.local_addr().unwrap();
        let b = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        b.set_reuse_address(true).unwrap();
        b.bind(&addr).unwrap();
        a.listen(8).unwrap();
        a.set_reuse_port(true).unwrap();
        let err = b.listen(8).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
