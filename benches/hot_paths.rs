//! Micro-benchmarks of ringcast's per-message and per-connection hot paths.
//!
//! Run with `cargo bench --bench hot_paths` (add `-- --warm-up-time 1 --measurement-time 2`
//! for a quick pass). The global allocator is mimalloc, as in the server binary.
//!
//! - `frame/event_json_512B`: `event_frame` with a 512-byte JSON `data`. Runs once per published
//!   message on the channel's owner core; every subscriber then shares this one `Bytes`.
//! - `parse/client_subscribe`: `parse_client_message` on a subscribe with 3 channels and a
//!   `since` map. Runs for every client text message (simd-json parse + serde mapping).
//! - `codec/decode_masked_text`: `Decoder::decode` of one masked 256-byte client text frame
//!   (header, unmasking, UTF-8 check). Runs for every frame a client sends; the input
//!   `BytesMut` is cloned outside the timer.
//! - `fanout/send_queues_10k`: one message (a real `Delivery`: shared frame, project, normal
//!   priority) offered to 10,000 subscribers the way the runtime does per member (the
//!   permission check `Claims::can_see`, then `SendQueue::push_event`), then every queue
//!   drained as the writer does (`SendQueue::next` with the rate-limit buckets off, the
//!   event's frame taken); push + drain timed together. This is the user-space, per-core cost
//!   of one message to a hot channel, without the write syscall. The `_via_rooms` variant
//!   reaches the subscribers through `Rooms::members`, i.e. includes the room index walk.
//! - `ring/append`: `Ring::push` into a full 1000-entry ring (steady state: every push
//!   evicts the oldest). Runs once per durable message on the owner core.
//! - `ring/replay_last_50`: `Ring::replay` of the last 50 of 1000 entries; the cost of a
//!   reconnecting client's resume, paid on the owner core while it also sequences.
//! - `sequencer/publish_2_cores_interested`: `Sequencer::publish` on a channel with interest on
//!   2 cores: seq, frame build, two delivery callbacks (an `Arc` clone each, standing in for
//!   the mesh send) and a ring append with eviction. The owner core's whole per-message path.
//! - `jwt/verify_hs256`: `Verifier::verify` of a realistic HS256 token. Runs once per
//!   WebSocket upgrade, so it bounds the connection-storm rate after a deploy or outage.

use std::cell::RefCell;
use std::hint::black_box;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ringcast::delivery::access::Claims;
use ringcast::delivery::queue::{Bucket, Next, SendQueue};
use ringcast::delivery::ring::{Ring, RingBounds};
use ringcast::delivery::rooms::Rooms;
use ringcast::delivery::sequencer::{Resume, Sequencer};
use ringcast::delivery::{Delivery, Publication};
use ringcast::edge::jwt::{sign_hs256, Verifier};
use ringcast::proto::msg::{event_frame, parse_client_message};
use ringcast::proto::msg::{Encoding, Format};
use ringcast::proto::ws::codec::{self, opcode, testing::client_frame, Decoder};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CHANNEL: &str = "project:42";
const EVENT: &str = "task:updated";
const TS_MS: u64 = 1_732_300_000_123;
const SUBSCRIBERS: usize = 10_000;
const RING_LEN: u64 = 1000;

/// A realistic event `data` object of exactly 512 bytes.
fn data_512() -> String {
    let head = r#"{"id":"t-8f3a2c","project_id":"42","title":"Fix flaky upload retry","status":"in_progress","assignee":{"id":"u-123","name":"Ada Lovelace"},"labels":["backend","p1"],"updated_at":"2024-11-22T18:26:40.123Z","description":""#;
    let tail = r#""}"#;
    let pad = 512 - head.len() - tail.len();
    let data = format!(
        "{head}{}{tail}",
        "lorem ipsum ".repeat(pad / 12 + 1)[..pad].to_owned()
    );
    assert_eq!(data.len(), 512);
    serde_json::from_str::<serde_json::Value>(&data).expect("data_512 is valid JSON");
    data
}

fn shared_frame() -> Bytes {
    event_frame(CHANNEL, 1017, EVENT, TS_MS, &data_512())
}

fn delivery(seq: u64, frame: &Bytes) -> Arc<Delivery> {
    Arc::new(Delivery {
        channel: CHANNEL.into(),
        seq,
        frame: frame.clone(),
        project_id: Some("42".into()),
        user_id: None,
        agent_id: None,
        event: EVENT.into(),
        priority: Default::default(),
        coalesce_key: None,
        ttl: None,
        twins: Default::default(),
    })
}

fn frame(c: &mut Criterion) {
    let data = data_512();
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("event_json_512B", |b| {
        b.iter(|| {
            event_frame(
                black_box(CHANNEL),
                black_box(1017),
                black_box(EVENT),
                black_box(TS_MS),
                black_box(&data),
            )
        })
    });
    // One MessagePack encode per message, whatever the number of MessagePack subscribers: the
    // first `frame_for` builds it, the other 9,999 clone the same Bytes.
    let json = shared_frame();
    g.bench_function("event_msgpack_512B_encode", |b| {
        b.iter_batched(
            || delivery(1017, &json),
            |d| d.frame_for(Encoding::MessagePack),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("event_msgpack_512B_for_10k_subscribers", |b| {
        b.iter_batched(
            || delivery(1017, &json),
            |d| {
                for _ in 0..10_000 {
                    black_box(d.frame_for(Encoding::MessagePack));
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// A 4 KiB log batch as dashboards send it: coloured test output, some UTF-8.
fn log_frame_4k() -> Bytes {
    let mut lines = String::new();
    let mut i = 0;
    while lines.len() < 4000 {
        lines.push_str(&format!(
            "\u{1b}[32mPASSED\u{1b}[0m tests/test_api.py::test_case_{i} ✓ ({} ms)\\n",
            i * 7 % 113
        ));
        i += 1;
    }
    let data = serde_json::json!({"level": "info", "line": lines}).to_string();
    event_frame("logs:t9", 1017, "log", TS_MS, &data)
}

/// permessage-deflate: one compression per message, shared by every subscriber that
/// negotiated it (server_no_context_takeover); what it costs and what it saves.
fn deflate(c: &mut Criterion) {
    let compressed = Format {
        encoding: Encoding::Json,
        compress_over: Some(1024),
    };
    let mut g = c.benchmark_group("deflate");
    for (name, frame) in [("log_4KiB", log_frame_4k()), ("event_512B", shared_frame())] {
        let size = delivery(1, &frame).frame_for(compressed).len();
        println!(
            "deflate {name}: {} -> {size} bytes on the wire ({:.1} % of plain)",
            frame.len(),
            100.0 * size as f64 / frame.len() as f64
        );
        g.throughput(Throughput::Bytes(frame.len() as u64));
        g.bench_function(format!("{name}_compress_once"), |b| {
            let min = Format {
                compress_over: Some(0),
                ..compressed
            };
            b.iter_batched(
                || delivery(1017, &frame),
                |d| d.frame_for(min),
                BatchSize::SmallInput,
            )
        });
    }
    let frame = log_frame_4k();
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("log_4KiB_for_10k_subscribers", |b| {
        b.iter_batched(
            || delivery(1017, &frame),
            |d| {
                for _ in 0..10_000 {
                    black_box(d.frame_for(compressed));
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn parse(c: &mut Criterion) {
    let msg = br#"{"type":"subscribe","channels":["project:42","user:u-123","tasks:board-7"],"since":{"project:42":1017,"user:u-123":88,"tasks:board-7":5120},"epoch":"01JDCW6Q3X9E5V7R2K8M4N1P0T"}"#;
    assert!(parse_client_message(msg).is_ok());
    c.benchmark_group("parse")
        .bench_function("client_subscribe", |b| {
            b.iter(|| parse_client_message(black_box(msg)))
        });
}

fn decode(c: &mut Criterion) {
    let payload: Vec<u8> = br#"{"type":"subscribe","channels":["project:42"]}"#
        .iter()
        .copied()
        .cycle()
        .take(256)
        .collect();
    let wire =
        BytesMut::from(&client_frame(true, opcode::TEXT, &payload, [0x37, 0xfa, 0x21, 0x3d])[..]);
    let mut decoder = Decoder::new(codec::DEFAULT_MAX_MESSAGE_BYTES);
    let mut check = wire.clone();
    assert!(matches!(
        decoder.decode(&mut check),
        Ok(Some(codec::Event::Text(t))) if t[..] == payload[..]
    ));
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("decode_masked_text", |b| {
        b.iter_batched(
            || wire.clone(),
            |mut buf| decoder.decode(&mut buf),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// One subscriber as the publish path sees it: its permissions and its send queue (the
/// runtime's `Conn` holds exactly these, next to socket state a bench has no use for).
struct Subscriber {
    claims: Claims,
    queue: RefCell<SendQueue>,
}

impl Subscriber {
    fn new() -> Rc<Subscriber> {
        let claims = Claims {
            sub: "u".into(),
            projects: vec!["42".into()],
            ..Claims::default()
        };
        // The server's defaults: threshold 100 events, key interval 100 ms.
        let queue = SendQueue::new(100, Duration::from_millis(100));
        Rc::new(Subscriber {
            claims,
            queue: RefCell::new(queue),
        })
    }

    /// What `Core::deliver` and `Conn::push_event` do per member: the permission check, then
    /// `SendQueue::push_event` (priority, conflation and drop rules, the byte count).
    fn offer(&self, d: &Arc<Delivery>) {
        if self
            .claims
            .can_see(d.project_id.as_deref(), d.user_id.as_deref())
        {
            let mut q = self.queue.borrow_mut();
            black_box(q.push_event(d));
            black_box(q.is_behind());
        }
    }

    /// What the connection's writer does: `SendQueue::next` (TTL, key pacing and the token
    /// buckets, here unlimited: the rate limits off) until empty, taking each event's frame.
    fn drain(&self, buckets: &mut [Bucket; 2]) {
        let mut q = self.queue.borrow_mut();
        let now = Instant::now();
        let [mine, core] = buckets;
        loop {
            match q.next(now, Duration::from_secs(5), &mut [mine, core]) {
                Next::Event(d) => {
                    black_box(d.frame_in(Format::default()).clone());
                }
                Next::Empty => break,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

fn fanout(c: &mut Criterion) {
    let frame = shared_frame();
    // A real delivery of the sequencer: the shared frame, project 42, normal priority.
    let d = delivery(1017, &frame);
    let mut buckets = [Bucket::new(0), Bucket::new(0)];
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(SUBSCRIBERS as u64));

    let subscribers: Vec<Rc<Subscriber>> = (0..SUBSCRIBERS).map(|_| Subscriber::new()).collect();
    g.bench_function("send_queues_10k", |b| {
        b.iter(|| {
            let d = black_box(&d);
            for s in &subscribers {
                s.offer(d);
            }
            for s in &subscribers {
                s.drain(&mut buckets);
            }
        })
    });

    // The same, reaching the subscribers through the room index as the publish path does.
    let channel: Arc<str> = CHANNEL.into();
    let mut rooms: Rooms<Rc<Subscriber>> = Rooms::default();
    for (id, s) in subscribers.iter().enumerate() {
        rooms.join(&channel, id as u64, s.clone());
    }
    assert_eq!(rooms.len(CHANNEL), SUBSCRIBERS);
    g.bench_function("send_queues_10k_via_rooms", |b| {
        b.iter(|| {
            let d = black_box(&d);
            for s in rooms.members(black_box(CHANNEL)) {
                s.offer(d);
            }
            for s in &subscribers {
                s.drain(&mut buckets);
            }
        })
    });
    g.finish();
}

fn ring(c: &mut Criterion) {
    let frame = shared_frame();
    let full = || {
        let mut r = Ring::new(RingBounds::default());
        for seq in 1..=RING_LEN {
            r.push(delivery(seq, &frame), 0);
        }
        assert_eq!(r.len(), RING_LEN as usize);
        r
    };
    let mut g = c.benchmark_group("ring");

    let mut r = full();
    let mut next_seq = RING_LEN;
    g.bench_function("append", |b| {
        b.iter_batched(
            || {
                next_seq += 1;
                delivery(next_seq, &frame)
            },
            |d| r.push(d, 0),
            BatchSize::SmallInput,
        )
    });
    assert_eq!(r.len(), RING_LEN as usize);

    let mut r = full();
    assert_eq!(r.replay(RING_LEN - 50, RING_LEN, 0).deliveries.len(), 50);
    g.bench_function("replay_last_50", |b| {
        b.iter(|| r.replay(black_box(RING_LEN - 50), RING_LEN, 0))
    });
    g.finish();
}

fn sequencer(c: &mut Criterion) {
    let publication = Publication {
        project_id: Some("42".into()),
        ..Publication::new(CHANNEL.into(), EVENT, &data_512())
    };
    let mut s = Sequencer::new(2, RingBounds::default());
    let channel: Arc<str> = CHANNEL.into();
    s.subscribe(&channel, 0, Resume::Live, 0);
    s.subscribe(&channel, 1, Resume::Live, 0);
    // Fill the ring so every measured publish also evicts (steady state).
    for _ in 0..RING_LEN {
        s.publish(publication.clone(), TS_MS, |_, _| {});
    }
    c.benchmark_group("sequencer")
        .bench_function("publish_2_cores_interested", |b| {
            b.iter_batched(
                || publication.clone(),
                |p| {
                    s.publish(p, TS_MS, |core, d| {
                        black_box((core, Arc::clone(d)));
                    })
                },
                BatchSize::SmallInput,
            )
        });
}

fn jwt(c: &mut Criterion) {
    let secret = b"k3x9-very-secret-hs256-key-for-benchmarks!";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let token = sign_hs256(
        secret,
        &serde_json::json!({
            "sub": "u-123",
            "roles": ["member", "editor"],
            "projects": ["42", "97", "1204"],
            "channels": ["tasks:*", "board:7", "presence:42"],
            "iat": now,
            "exp": now + 3600,
        }),
    );
    let verifier = Verifier::hs256(secret, 0);
    assert_eq!(
        verifier.verify(&token).expect("token verifies").sub,
        "u-123"
    );
    c.benchmark_group("jwt")
        .bench_function("verify_hs256", |b| {
            b.iter(|| verifier.verify(black_box(&token)))
        });
}

criterion_group!(benches, frame, deflate, parse, decode, fanout, ring, sequencer, jwt);
criterion_main!(benches);
