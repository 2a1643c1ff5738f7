//! `Session` driven by hand: a fake clock, a fake token verifier, hand-built deliveries and
//! owner acks, and a `drain` that writes like the core's flush does. No sockets, no runtime,
//! no sleeping: each test covers, at session level, a behaviour `tests/` checks end to end.

use super::*;

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::delivery::ring::Replay;

const EPOCH: &str = "e1";
/// The fake wall clock at the harness's start (Unix seconds).
const UNIX0: u64 = 1_000_000;
const LEEWAY_SECS: u64 = 5;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn config() -> SessionConfig {
    SessionConfig {
        heartbeat: HeartbeatConfig {
            ping_interval: secs(30),
            pong_timeout: secs(10),
            max_missed: 3,
        },
        socketio_heartbeat: HeartbeatConfig {
            ping_interval: secs(25),
            pong_timeout: secs(20),
            max_missed: 1,
        },
        max_channels_per_connection: 4,
        max_queue_bytes: 64 * 1024,
        max_client_messages_per_sec: 50,
        queue_threshold: 10,
        slow_client_timeout: secs(5),
        connection_rate_limit: 0,
        key_interval: Duration::ZERO,
        queue_ttl: secs(5),
        ack_timeout: secs(1),
        ack_max_sends: 3,
    }
}

fn claims_of(sub: &str, projects: &[&str]) -> Claims {
    Claims {
        sub: sub.into(),
        projects: projects.iter().map(|p| p.to_string()).collect(),
        channels: vec!["task:*".into(), "dashboard".into()],
        ..Claims::default()
    }
}

fn claims() -> Claims {
    claims_of("u1", &["p1"])
}

/// Tokens are looked up by their text.
struct FakeAuth {
    tokens: HashMap<&'static str, Result<Claims, String>>,
}

impl Authenticator for FakeAuth {
    fn authenticate(&self, token: &str) -> Result<Claims, String> {
        self.tokens
            .get(token)
            .cloned()
            .unwrap_or_else(|| Err("token is malformed or lacks the sub claim".into()))
    }

    fn leeway_secs(&self) -> u64 {
        LEEWAY_SECS
    }
}

fn welcome(encoding: Encoding) -> Bytes {
    Control::Welcome {
        connection_id: "c1",
        epoch: EPOCH,
        heartbeat_ms: 30_000,
        channels: &[],
        encoding: encoding.name(),
        note: None,
    }
    .frame_in(encoding)
}

/// An event as the owner core builds it: a real frame, normal priority, no visibility fields.
fn delivery(channel: &str, seq: u64, event: &str, data: &str) -> Delivery {
    Delivery {
        channel: channel.into(),
        seq,
        frame: msg::event_frame(channel, seq, event, 1_000 + seq, data),
        project_id: None,
        user_id: None,
        agent_id: None,
        event: event.into(),
        priority: Priority::Normal,
        coalesce_key: None,
        ttl: None,
        twins: Default::default(),
    }
}

fn ev(channel: &str, seq: u64) -> Arc<Delivery> {
    Arc::new(delivery(channel, seq, "e", &seq.to_string()))
}

fn ev_p(channel: &str, seq: u64, priority: Priority) -> Arc<Delivery> {
    Arc::new(Delivery {
        priority,
        ..delivery(channel, seq, "e", &seq.to_string())
    })
}

/// An event whose frame is about `pad` bytes bigger.
fn big(channel: &str, seq: u64, pad: usize, priority: Priority) -> Arc<Delivery> {
    let data = format!("\"{}\"", "x".repeat(pad));
    Arc::new(Delivery {
        priority,
        ..delivery(channel, seq, "e", &data)
    })
}

/// One written frame, readable: a WebSocket text or MessagePack frame as its JSON, a close
/// frame as `close CODE REASON`, pings and pongs as `ping`/`pong PAYLOAD`; an SSE message as
/// its text, `id:` line included.
fn show(frame: &[u8]) -> String {
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).expect("frames are UTF-8");
    let mut out = String::new();
    if frame.first().is_some_and(|b| b & 0x80 != 0) {
        let payload = codec::server_frame_payload(frame);
        let shown = match frame[0] & 0x0f {
            0x1 => text(payload),
            0x2 => rmp_serde::from_slice::<Value>(payload)
                .expect("MessagePack")
                .to_string(),
            0x8 => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                format!("close {code} {}", text(&payload[2..]))
            }
            0x9 => format!("ping {}", text(payload)),
            0xA => format!("pong {}", text(payload)),
            op => panic!("unexpected opcode {op:#x}"),
        };
        out.push_str(shown.trim_end());
    } else {
        out.push_str(&text(frame));
    }
    out
}

/// The JSON of a frame `show` gave (the `data:` of an SSE message).
fn json_of(frame: &str) -> Value {
    let data: String = match frame.lines().find_map(|l| l.strip_prefix("data: ")) {
        Some(_) => frame
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect(),
        None => frame.to_owned(),
    };
    serde_json::from_str(&data).unwrap_or_else(|e| panic!("not JSON ({e}): {frame}"))
}

/// A frame in brief: an event as `channel#seq`; a control frame as its type, then its `code`
/// and `channel` if it has them; anything else (close, ping, SSE comment) as `show` gave it.
fn brief(frame: &str) -> String {
    let data_line = frame.lines().any(|l| l.starts_with("data: "));
    if !frame.starts_with('{') && !data_line {
        return frame.to_owned();
    }
    let v = json_of(frame);
    if let Some(kind) = v["type"].as_str() {
        let mut out = kind.to_owned();
        for field in ["code", "channel"] {
            if let Some(s) = v[field].as_str() {
                out.push(' ');
                out.push_str(s);
            }
        }
        return out;
    }
    format!("{}#{}", v["channel"].as_str().unwrap(), v["seq"])
}

fn briefs(frames: &[String]) -> Vec<String> {
    frames.iter().map(|f| brief(f)).collect()
}

fn effect_brief(e: &Effect) -> String {
    match e {
        Effect::Subscribe { channel, .. } => format!("subscribe {channel}"),
        Effect::Unsubscribe { channel, joined } => {
            let state = if *joined { "joined" } else { "pending" };
            format!("unsubscribe {channel} {state}")
        }
        Effect::Audit { kind, .. } => format!("audit {kind}"),
        Effect::Cut => "cut".into(),
        Effect::Presence { channel } => format!("presence {channel}"),
    }
}

/// A subscription asked of the owner (an `Effect::Subscribe`).
#[derive(Debug, Clone)]
struct Sub {
    channel: Arc<str>,
    id: u64,
    resume: Resume,
}

struct Harness {
    config: SessionConfig,
    auth: FakeAuth,
    t0: Instant,
    elapsed: Duration,
    /// The core's share of the node-wide rate limit (none unless a test sets one).
    node: Bucket,
    effects: Vec<Effect>,
    s: Session,
    /// What ended the last `drain`.
    last: Option<Transmit>,
}

impl Harness {
    /// A session still in `Greeting` (no `greet_after` yet).
    fn greeting(config: SessionConfig, claims: Claims, format: Format) -> Harness {
        let t0 = Instant::now();
        let peer = IpAddr::from([127, 0, 0, 1]);
        let s = Session::new(0x2a, peer, Rc::new(claims), format, &config, t0);
        let mut tokens = HashMap::new();
        let mut narrow = claims_of("u1", &["p1"]);
        narrow.exp = Some(UNIX0 + 3600);
        tokens.insert("narrow", Ok(narrow));
        tokens.insert("other-user", Ok(claims_of("u2", &["p1", "p2"])));
        Harness {
            auth: FakeAuth { tokens },
            t0,
            elapsed: Duration::ZERO,
            node: Bucket::new(0),
            effects: Vec::new(),
            s,
            last: None,
            config,
        }
    }

    /// An open session (no initial subscriptions) whose welcome is written.
    fn open_with(config: SessionConfig, claims: Claims) -> Harness {
        let mut h = Harness::greeting(config, claims, Format::default());
        h.s.greet_after(welcome(Encoding::Json), 0);
        assert_eq!(briefs(&h.drain()), ["welcome"]);
        h
    }

    fn new() -> Harness {
        Harness::open_with(config(), claims())
    }

    fn now(&self) -> Instant {
        self.t0 + self.elapsed
    }

    fn advance(&mut self, by: Duration) {
        self.elapsed += by;
    }

    /// Runs `f` with a `Ctx` at the fake clock's time.
    fn with<R>(&mut self, f: impl FnOnce(&mut Session, &Ctx, &mut Vec<Effect>) -> R) -> R {
        let ctx = Ctx {
            now: self.t0 + self.elapsed,
            unix_secs: UNIX0 + self.elapsed.as_secs(),
            config: &self.config,
            epoch: EPOCH,
            auth: &self.auth,
        };
        f(&mut self.s, &ctx, &mut self.effects)
    }

    fn event(&mut self, event: Event) -> Flow {
        self.with(|s, ctx, out| s.on_ws_event(event, ctx, out))
    }

    /// A client message as a text frame.
    fn send(&mut self, message: Value) -> Flow {
        self.event(Event::Text(Bytes::from(message.to_string())))
    }

    fn tick(&mut self) {
        self.with(|s, ctx, out| s.tick(ctx, out));
    }

    fn deliver(&mut self, d: &Arc<Delivery>) -> bool {
        let now = self.now();
        self.s.deliver(d, now, &self.config)
    }

    fn push(&mut self, frame: Bytes) {
        let now = self.now();
        self.s.push_control(frame, now, &self.config);
    }

    fn close(&mut self, code: u16, reason: &str) {
        let now = self.now();
        self.s.close(code, reason, now);
    }

    /// The owner's answer to `sub`.
    fn ack(&mut self, sub: &Sub, last_seq: u64, replay: Option<Replay>) -> bool {
        let ack = SubscribeAck { last_seq, replay };
        self.with(|s, ctx, _| s.on_subscribed(&sub.channel, sub.id, ack, ctx))
    }

    /// Takes the `Effect::Subscribe`s pushed so far (other effects stay).
    fn subscribes(&mut self) -> Vec<Sub> {
        let mut subs = Vec::new();
        self.effects.retain(|e| match e {
            Effect::Subscribe {
                channel,
                sub,
                resume,
            } => {
                subs.push(Sub {
                    channel: channel.clone(),
                    id: *sub,
                    resume: *resume,
                });
                false
            }
            _ => true,
        });
        subs
    }

    fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    fn effect_briefs(&mut self) -> Vec<String> {
        self.take_effects().iter().map(effect_brief).collect()
    }

    /// Subscribes the client to `channel` (live, at seq 0) and writes the `subscribed`.
    fn join(&mut self, channel: &str) -> Sub {
        self.send(json!({"type": "subscribe", "channels": [channel]}));
        let subs = self.subscribes();
        assert_eq!(subs.len(), 1, "{channel}: {subs:?}");
        assert!(self.ack(&subs[0], 0, None), "{channel} joins its room");
        assert_eq!(briefs(&self.drain()), [format!("subscribed {channel}")]);
        assert!(self.effects.is_empty(), "{:?}", self.effects);
        subs.into_iter().next().unwrap()
    }

    /// One `poll_transmit`.
    fn poll(&mut self) -> Transmit {
        let ctx = Ctx {
            now: self.t0 + self.elapsed,
            unix_secs: UNIX0 + self.elapsed.as_secs(),
            config: &self.config,
            epoch: EPOCH,
            auth: &self.auth,
        };
        self.s.poll_transmit(&ctx, &mut self.node)
    }

    /// Writes like the core's flush: frames until the session has none, `on_written` after
    /// each batch, again until a batch is empty or a rate limit makes it wait. The frames as
    /// bytes (an SSE `id:` prefix joined to its message); `last` keeps what ended it.
    fn drain_raw(&mut self) -> Vec<Bytes> {
        let mut written = Vec::new();
        loop {
            let mut batch = 0;
            let last = loop {
                match self.poll() {
                    Transmit::Frame { prefix, frame } => {
                        let mut bytes = prefix.map(|p| p.to_vec()).unwrap_or_default();
                        bytes.extend_from_slice(&frame);
                        written.push(Bytes::from(bytes));
                        batch += 1;
                    }
                    other => break other,
                }
            };
            let wait = matches!(last, Transmit::Wait(_));
            self.last = Some(last);
            if batch == 0 {
                return written;
            }
            self.s.on_written();
            if wait {
                return written;
            }
        }
    }

    /// `drain_raw`, each frame as `show` gives it.
    fn drain(&mut self) -> Vec<String> {
        self.drain_raw().iter().map(|f| show(f)).collect()
    }

    /// How long the last `drain` was told to wait (panics if it was not).
    fn waited(&self) -> Duration {
        match self.last {
            Some(Transmit::Wait(d)) => d,
            ref other => panic!("expected a wait, the drain ended with {other:?}"),
        }
    }
}

// ---- welcome gating -------------------------------------------------------------------------

#[test]
fn frames_queue_while_greeting_and_the_welcome_goes_first_once_every_initial_ack_came() {
    let mut h = Harness::greeting(config(), claims(), Format::default());
    h.with(|s, ctx, out| {
        s.subscribe("task:a", Resume::Live, true, ctx, out).unwrap();
        s.subscribe("task:b", Resume::Live, true, ctx, out).unwrap();
    });
    let subs = h.subscribes();
    h.s.greet_after(welcome(Encoding::Json), 2);
    h.push(crate::runtime::core::shutdown_frame(Encoding::Json));
    assert!(!h.s.wants_transmit());
    assert!(h.drain().is_empty());
    assert!(matches!(h.last, Some(Transmit::Idle)));

    // task:b is active (and gets live events), but the welcome still waits for task:a.
    assert!(h.ack(&subs[1], 7, None));
    h.advance(secs(60));
    h.tick(); // no heartbeat before the welcome either
    assert!(h.deliver(&ev("task:b", 8)));
    assert!(h.drain().is_empty(), "nothing before every initial ack");

    assert!(h.ack(&subs[0], 0, None));
    assert!(h.s.wants_transmit());
    let frames = h.drain();
    assert_eq!(
        briefs(&frames),
        [
            "welcome",
            "shutdown",
            "subscribed task:b",
            "task:b#8",
            "subscribed task:a"
        ]
    );
    assert_eq!(json_of(&frames[0])["epoch"], EPOCH);
    assert_eq!(json_of(&frames[2])["seq"], 7);
}

#[test]
fn with_no_initial_subscription_the_welcome_goes_at_once() {
    let mut h = Harness::greeting(config(), claims(), Format::default());
    assert!(h.drain().is_empty());
    h.s.greet_after(welcome(Encoding::Json), 0);
    assert!(h.s.wants_transmit());
    let frames = h.drain();
    assert_eq!(briefs(&frames), ["welcome"]);
    assert_eq!(json_of(&frames[0])["connection_id"], "c1");
    // Open now: the heartbeat runs.
    h.advance(secs(30));
    h.tick();
    assert_eq!(h.drain(), ["ping"]);
}

#[test]
fn an_initial_subscription_cancelled_before_its_ack_does_not_hold_the_welcome() {
    let mut h = Harness::greeting(config(), claims(), Format::default());
    h.with(|s, ctx, out| {
        s.subscribe("task:a", Resume::Live, true, ctx, out).unwrap();
        s.subscribe("task:b", Resume::Live, true, ctx, out).unwrap();
    });
    let subs = h.subscribes();
    h.s.greet_after(welcome(Encoding::Json), 2);
    assert!(h.ack(&subs[0], 0, None));
    assert!(h.drain().is_empty());
    h.send(json!({"type": "unsubscribe", "channels": ["task:b"]}));
    assert_eq!(h.effect_briefs(), ["unsubscribe task:b pending"]);
    assert_eq!(
        briefs(&h.drain()),
        ["welcome", "subscribed task:a", "unsubscribed task:b"]
    );
    // Its ack, arriving late, is ignored.
    assert!(!h.ack(&subs[1], 3, None));
    assert!(h.drain().is_empty());
    assert_eq!(h.s.channels().map(|c| &**c).collect::<Vec<_>>(), ["task:a"]);
}

// ---- subscribe / unsubscribe ---------------------------------------------------------------

#[test]
fn subscribe_asks_the_owner_once_per_channel_with_distinct_sub_ids_and_resume_positions() {
    let mut h = Harness::new();
    h.send(
        json!({"type": "subscribe", "channels": ["task:a", "task:b", "dashboard"],
                  "since": {"task:a": 5}, "epoch": EPOCH}),
    );
    let subs = h.subscribes();
    let names: Vec<&str> = subs.iter().map(|s| &*s.channel).collect();
    assert_eq!(names, ["task:a", "task:b", "dashboard"]);
    let mut ids: Vec<u64> = subs.iter().map(|s| s.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3, "sub ids are distinct: {subs:?}");
    assert_eq!(subs[0].resume, Resume::After(5));
    assert_eq!(subs[1].resume, Resume::Live);
    assert!(h.drain().is_empty(), "answers wait for the owner");

    // Positions from another epoch cannot be trusted.
    h.send(
        json!({"type": "subscribe", "channels": ["task:c"], "since": {"task:c": 5},
                  "epoch": "old"}),
    );
    let subs = h.subscribes();
    assert_eq!(subs[0].resume, Resume::OtherEpoch);
    assert!(!ids.contains(&subs[0].id));

    // `since` without `epoch` subscribes nothing.
    h.send(json!({"type": "subscribe", "channels": ["task:d"], "since": {"task:d": 5}}));
    assert!(h.take_effects().is_empty());
    assert_eq!(briefs(&h.drain()), ["error bad_message"]);
}

#[test]
fn subscribe_errors_answer_per_channel_and_a_forbidden_one_is_audited() {
    let mut h = Harness::new();
    h.join("task:a");
    h.send(json!({"type": "subscribe",
                  "channels": ["bad name", "project:p2", "task:a", "task:b"]}));
    let frames = h.drain();
    assert_eq!(
        briefs(&frames),
        [
            "error bad_channel bad name",
            "error forbidden project:p2",
            "error already_subscribed task:a"
        ]
    );
    assert_eq!(
        json_of(&frames[1])["message"],
        "not allowed to subscribe to project:p2"
    );
    let effects = h.take_effects();
    assert_eq!(
        effects.iter().map(effect_brief).collect::<Vec<_>>(),
        ["audit subscribe_denied", "subscribe task:b"],
        "one refused channel does not affect the others"
    );
    let Effect::Audit { fields, .. } = &effects[0] else {
        unreachable!()
    };
    assert_eq!(fields["channel"], "project:p2");
    assert_eq!(fields["user_id"], "u1");
    assert_eq!(fields["connection_id"], "2a");
    h.send(json!({"type": "unsubscribe", "channels": ["elsewhere"]}));
    assert_eq!(briefs(&h.drain()), ["error not_subscribed elsewhere"]);
}

#[test]
fn too_many_channels_are_refused_and_a_message_naming_too_many_gets_one_error() {
    let mut h = Harness::new(); // at most 4 channels
    h.join("task:a");
    h.send(json!({"type": "subscribe", "channels": ["task:b", "task:c", "task:d", "task:e"]}));
    // Pending subscriptions count too.
    assert_eq!(h.subscribes().len(), 3);
    assert_eq!(briefs(&h.drain()), ["error too_many_channels task:e"]);

    let five = ["task:1", "task:2", "task:3", "task:4", "task:5"];
    h.send(json!({"type": "unsubscribe", "channels": five}));
    h.send(json!({"type": "subscribe", "channels": five}));
    let frames = h.drain();
    assert_eq!(
        briefs(&frames),
        ["error too_many_channels", "error too_many_channels"]
    );
    assert_eq!(
        json_of(&frames[1])["message"],
        "a message may name at most 4 channels"
    );
    assert!(h.take_effects().is_empty());
}

#[test]
fn an_ack_for_a_cancelled_or_stale_sub_is_ignored() {
    let mut h = Harness::new();
    h.send(json!({"type": "subscribe", "channels": ["task:a"]}));
    let first = h.subscribes().remove(0);
    h.send(json!({"type": "unsubscribe", "channels": ["task:a"]}));
    assert_eq!(h.effect_briefs(), ["unsubscribe task:a pending"]);
    h.send(json!({"type": "subscribe", "channels": ["task:a"]}));
    let second = h.subscribes().remove(0);
    assert_ne!(first.id, second.id);
    assert_eq!(briefs(&h.drain()), ["unsubscribed task:a"]);

    assert!(!h.ack(&first, 3, None), "the cancelled one's ack");
    assert!(h.drain().is_empty());
    assert!(h.ack(&second, 4, None));
    let frames = h.drain();
    assert_eq!(briefs(&frames), ["subscribed task:a"]);
    assert_eq!(json_of(&frames[0])["seq"], 4);
    assert!(!h.ack(&second, 4, None), "a second ack of an active one");
    let never = Sub {
        channel: "task:zz".into(),
        id: 99,
        resume: Resume::Live,
    };
    assert!(!h.ack(&never, 1, None));
    assert!(h.drain().is_empty());
}

#[test]
fn unsubscribe_purges_queued_events_of_the_channel_and_ends_it_once() {
    let mut h = Harness::new();
    h.join("task:a");
    h.join("task:b");
    for d in [ev("task:a", 1), ev("task:b", 1), ev("task:a", 2)] {
        assert!(h.deliver(&d));
    }
    h.send(json!({"type": "unsubscribe", "channels": ["task:a"]}));
    let frames = h.drain();
    assert_eq!(briefs(&frames), ["task:b#1", "unsubscribed task:a"]);
    assert!(json_of(&frames[1]).get("reason").is_none());
    assert_eq!(h.effect_briefs(), ["unsubscribe task:a joined"]);
    assert_eq!(h.s.channels().map(|c| &**c).collect::<Vec<_>>(), ["task:b"]);
    assert_eq!(h.s.queued_bytes(), 0);
    h.send(json!({"type": "unsubscribe", "channels": ["task:a"]}));
    assert_eq!(briefs(&h.drain()), ["error not_subscribed task:a"]);
    assert!(h.take_effects().is_empty(), "ended once");
}

#[test]
fn end_subscriptions_ends_each_subscription_once() {
    let mut h = Harness::new();
    h.join("task:a");
    h.send(json!({"type": "subscribe", "channels": ["task:b"]}));
    h.take_effects();
    h.s.end_subscriptions(&mut h.effects);
    assert_eq!(
        h.effect_briefs(),
        ["unsubscribe task:a joined", "unsubscribe task:b pending"]
    );
    assert_eq!(h.s.channels().count(), 0);
    h.s.end_subscriptions(&mut h.effects);
    assert!(h.take_effects().is_empty());
}

#[test]
fn an_admin_revoke_purges_and_ends_what_the_claims_no_longer_allow() {
    let mut h = Harness::open_with(config(), claims_of("u1", &["p1", "p2"]));
    h.join("project:p1");
    h.join("task:a");
    let secret = Arc::new(Delivery {
        project_id: Some("p1".into()),
        ..delivery("task:a", 1, "e", "1")
    });
    assert!(h.deliver(&secret));
    let mut overrides = Overrides::default();
    overrides.revoke(&[], &["p1".into()]);
    h.s.set_overrides(overrides);
    h.s.purge(|d| d.project_id.as_deref() == Some("p1"));
    let ended = h.with(|s, ctx, out| s.end_forbidden_subscriptions("revoked", ctx, out));
    assert_eq!(ended, 1);
    let frames = h.drain();
    assert_eq!(briefs(&frames), ["unsubscribed project:p1"]);
    assert_eq!(json_of(&frames[0])["reason"], "revoked");
    assert_eq!(h.effect_briefs(), ["unsubscribe project:p1 joined"]);
    assert!(!h.deliver(&secret), "p1's messages are no longer visible");
}

// ---- replay ---------------------------------------------------------------------------------

#[test]
fn a_replay_follows_subscribed_and_ends_with_replayed() {
    let mut h = Harness::new();
    h.send(
        json!({"type": "subscribe", "channels": ["task:a"], "since": {"task:a": 2},
                  "epoch": EPOCH}),
    );
    let sub = h.subscribes().remove(0);
    let replay = Replay {
        deliveries: vec![ev("task:a", 3), ev("task:a", 4), ev("task:a", 5)],
        recovered: true,
    };
    assert!(h.ack(&sub, 5, Some(replay)));
    assert!(h.deliver(&ev("task:a", 6)));
    let frames = h.drain();
    assert_eq!(
        briefs(&frames),
        [
            "subscribed task:a",
            "task:a#3",
            "task:a#4",
            "task:a#5",
            "replayed task:a",
            "task:a#6"
        ]
    );
    assert_eq!(json_of(&frames[0])["seq"], 5);
    assert_eq!(
        json_of(&frames[4]),
        json!({"type": "replayed", "channel": "task:a", "recovered": true, "count": 3})
    );
}

#[test]
fn a_replay_over_half_the_queue_bound_is_not_sent_and_says_recovered_false() {
    // 64 KiB bound: seven 4 KiB events fit in half of it, nine do not.
    let replay = |n: u64| Replay {
        deliveries: (1..=n)
            .map(|seq| big("task:a", seq, 4000, Priority::Normal))
            .collect(),
        recovered: true,
    };
    for (n, sent) in [(7, true), (9, false)] {
        let mut h = Harness::new();
        h.send(
            json!({"type": "subscribe", "channels": ["task:a"], "since": {"task:a": 0},
                      "epoch": EPOCH}),
        );
        let sub = h.subscribes().remove(0);
        assert!(h.ack(&sub, n, Some(replay(n))));
        let frames = h.drain();
        let replayed = json_of(frames.last().unwrap());
        assert_eq!(replayed["type"], "replayed");
        if sent {
            assert_eq!(frames.len(), 2 + n as usize);
            assert_eq!(
                (replayed["count"].as_u64(), replayed["recovered"].as_bool()),
                (Some(n), Some(true))
            );
        } else {
            assert_eq!(briefs(&frames), ["subscribed task:a", "replayed task:a"]);
            assert_eq!(
                replayed,
                json!({"type": "replayed", "channel": "task:a", "recovered": false, "count": 0})
            );
        }
        // Not closed either way: live events follow.
        assert_eq!(h.s.closed_with().0, 1006);
        assert!(h.deliver(&ev("task:a", n + 1)));
        assert_eq!(briefs(&h.drain()), [format!("task:a#{}", n + 1)]);
    }
}

#[test]
fn permissions_and_filters_apply_to_replays() {
    let mut h = Harness::new();
    h.send(json!({"type": "filter", "agent_ids": ["a1"]}));
    assert_eq!(briefs(&h.drain()), ["filtered"]);
    h.send(
        json!({"type": "subscribe", "channels": ["task:a"], "since": {"task:a": 2},
                  "epoch": EPOCH}),
    );
    let sub = h.subscribes().remove(0);
    let with = |seq, project: Option<&str>, user: Option<&str>, agent: Option<&str>| {
        Arc::new(Delivery {
            project_id: project.map(Into::into),
            user_id: user.map(Into::into),
            agent_id: agent.map(Into::into),
            ..delivery("task:a", seq, "e", "null")
        })
    };
    let replay = Replay {
        deliveries: vec![
            with(3, Some("p2"), None, None),             // another project
            with(4, None, Some("u2"), None),             // another user
            with(5, None, None, Some("a2")),             // filtered out
            with(6, Some("p1"), Some("u1"), Some("a1")), // all fine
            with(7, None, None, None),                   // nothing to hold it back
        ],
        recovered: true,
    };
    assert!(h.ack(&sub, 7, Some(replay)));
    let frames = h.drain();
    assert_eq!(
        briefs(&frames),
        [
            "subscribed task:a",
            "task:a#6",
            "task:a#7",
            "replayed task:a"
        ]
    );
    assert_eq!(json_of(&frames[3])["count"], 2);
}

// ---- delivery -------------------------------------------------------------------------------

#[test]
fn deliveries_respect_permissions_and_filters() {
    let mut h = Harness::new(); // u1, project p1
    h.join("task:a");
    let with = |seq, f: &dyn Fn(&mut Delivery)| {
        let mut d = delivery("task:a", seq, "log", r#"{"msg":"boom"}"#);
        f(&mut d);
        Arc::new(d)
    };
    let p1 = with(1, &|d| d.project_id = Some("p1".into()));
    let p2 = with(2, &|d| d.project_id = Some("p2".into()));
    let u1 = with(3, &|d| d.user_id = Some("u1".into()));
    let u2 = with(4, &|d| d.user_id = Some("u2".into()));
    assert_eq!(
        [&p1, &p2, &u1, &u2].map(|d| h.deliver(d)),
        [true, false, true, false]
    );
    assert_eq!(briefs(&h.drain()), ["task:a#1", "task:a#3"]);

    h.send(json!({"type": "filter", "agent_ids": ["a1"], "search": "boom"}));
    let answer = json_of(&h.drain()[0]);
    assert_eq!(
        answer,
        json!({"type": "filtered", "agent_ids": ["a1"], "project_ids": [], "event_types": [],
               "search": "boom"})
    );
    let a1 = with(5, &|d| d.agent_id = Some("a1".into()));
    let a2 = with(6, &|d| d.agent_id = Some("a2".into()));
    let quiet = Arc::new(Delivery {
        agent_id: Some("a1".into()),
        ..delivery("task:a", 7, "log", r#"{"msg":"fine"}"#)
    });
    let no_agent = with(8, &|_| {});
    assert_eq!(
        [&a1, &a2, &quiet, &no_agent].map(|d| h.deliver(d)),
        [true, false, false, true]
    );
    // A bad filter changes nothing.
    h.send(json!({"type": "filter", "agent_ids": ["bad id"]}));
    assert!(!h.deliver(&with(9, &|d| d.agent_id = Some("a2".into()))));
    assert_eq!(
        briefs(&h.drain()),
        ["task:a#5", "task:a#8", "error bad_filter"]
    );
    // An empty filter lets everything through again (the claims still apply).
    h.send(json!({"type": "filter"}));
    assert!(h.deliver(&with(10, &|d| d.agent_id = Some("a2".into()))));
    assert!(!h.deliver(&with(11, &|d| d.project_id = Some("p2".into()))));
    assert_eq!(briefs(&h.drain()), ["filtered", "task:a#10"]);
}

#[test]
fn a_filter_set_at_the_handshake_narrows_deliveries() {
    let mut h = Harness::greeting(config(), claims(), Format::default());
    h.s.set_filter(Filter {
        event_types: vec!["log".into()],
        ..Filter::default()
    });
    h.s.greet_after(welcome(Encoding::Json), 0);
    h.drain();
    h.join("task:a");
    assert!(h.deliver(&Arc::new(delivery("task:a", 1, "log", "1"))));
    assert!(!h.deliver(&Arc::new(delivery("task:a", 2, "other", "1"))));
    assert_eq!(briefs(&h.drain()), ["task:a#1"]);
}

#[test]
fn pause_skips_and_counts_events_and_terminal_bytes_but_never_a_terminal_end() {
    let mut h = Harness::new();
    h.join("task:a");
    h.join("terminal:t1");
    assert!(h.deliver(&ev("task:a", 1))); // queued when the pause comes: skipped too
    h.send(json!({"type": "pause"}));
    assert_eq!(h.drain(), [r#"{"type":"paused"}"#]);
    let out = |seq, stream, offset, chunk: &[u8]| {
        Arc::new(delivery(
            "terminal:t1",
            seq,
            stream,
            &terminal::chunk_data(offset, chunk),
        ))
    };
    assert!(!h.deliver(&ev("task:a", 2)));
    assert!(!h.deliver(&out(1, "stdout", 0, b"hello")));
    assert!(!h.deliver(&out(2, "stderr", 5, b"abc")));
    assert!(h.deliver(&Arc::new(delivery("terminal:t1", 3, "end", "{}"))));
    // Control frames are never paused.
    h.send(json!({"type": "dance"}));
    assert_eq!(briefs(&h.drain()), ["terminal:t1#3", "error unknown_type"]);
    h.send(json!({"type": "pause"})); // pausing twice keeps counting
    assert!(!h.deliver(&ev("task:a", 3)));
    assert_eq!(briefs(&h.drain()), ["paused"]);
    h.send(json!({"type": "resume"}));
    assert!(h.deliver(&ev("task:a", 4)));
    let frames = h.drain();
    assert_eq!(
        json_of(&frames[0]),
        json!({"type": "resumed", "skipped": 5, "skipped_bytes": 8})
    );
    assert_eq!(brief(&frames[1]), "task:a#4");
    h.send(json!({"type": "resume"}));
    assert_eq!(
        json_of(&h.drain()[0]),
        json!({"type": "resumed", "skipped": 0, "skipped_bytes": 0})
    );
}

#[test]
fn a_client_that_is_behind_gets_only_the_newest_event_of_a_coalesce_key() {
    let mut h = Harness::new(); // behind at 10 queued
    h.join("task:a");
    let keyed = |seq| {
        Arc::new(Delivery {
            coalesce_key: Some("progress:t1".into()),
            ..delivery("task:a", seq, "task:progress", &seq.to_string())
        })
    };
    assert!(h.deliver(&keyed(1)));
    for seq in 2..=10 {
        assert!(h.deliver(&ev_p("task:a", seq, Priority::High)));
    }
    assert!(h.s.queue.is_behind());
    assert!(h.deliver(&keyed(11)), "conflated, not dropped");
    assert!(h.deliver(&keyed(12)));
    assert!(!h.deliver(&ev("task:a", 13)), "a plain normal event yields");
    let expected: Vec<String> = (2..=10)
        .chain([12])
        .map(|seq| format!("task:a#{seq}"))
        .chain(["dropped task:a".to_owned()])
        .collect();
    assert_eq!(briefs(&h.drain()), expected);
}

#[test]
fn behind_low_and_normal_events_are_dropped_and_one_dropped_notice_follows_once_drained() {
    let mut h = Harness::new(); // threshold 10
    h.join("task:a");
    h.join("task:b");
    for seq in 1..=10 {
        assert!(h.deliver(&ev_p("task:a", seq, Priority::High)));
    }
    assert!(!h.deliver(&ev_p("task:a", 11, Priority::Low)));
    assert!(!h.deliver(&ev_p("task:a", 12, Priority::Normal)));
    assert!(!h.deliver(&ev_p("task:b", 1, Priority::Normal)));
    assert!(h.deliver(&ev_p("task:a", 13, Priority::Critical)));
    assert!(h.deliver(&ev_p("task:a", 14, Priority::High)));
    // While still behind, no notice: write eight, one at a time.
    for seq in 1..=8 {
        let Transmit::Frame { frame, .. } = h.poll() else {
            panic!("a frame")
        };
        assert_eq!(brief(&show(&frame)), format!("task:a#{seq}"));
        h.s.on_written();
    }
    let frames = h.drain();
    assert_eq!(
        briefs(&frames),
        [
            "task:a#9",
            "task:a#10",
            "task:a#13",
            "task:a#14",
            "dropped task:a",
            "dropped task:b"
        ]
    );
    assert_eq!(json_of(&frames[4])["count"], 2);
    assert_eq!(json_of(&frames[5])["count"], 1);
    assert!(h.drain().is_empty(), "told once");

    // Low events yield from half the threshold on, normal ones only from the threshold on.
    for seq in 15..=19 {
        assert!(h.deliver(&ev("task:a", seq)));
    }
    assert!(!h.deliver(&ev_p("task:a", 20, Priority::Low)));
    assert!(h.deliver(&ev("task:a", 21)));
}

#[test]
fn critical_events_are_never_dropped() {
    let mut h = Harness::new(); // threshold 10
    h.join("task:a");
    for seq in 1..=40 {
        assert!(h.deliver(&ev_p("task:a", seq, Priority::Critical)));
    }
    let expected: Vec<String> = (1..=40).map(|seq| format!("task:a#{seq}")).collect();
    assert_eq!(briefs(&h.drain()), expected, "all of them, no notice");
}

// ---- acknowledged delivery ------------------------------------------------------------------

#[test]
fn an_unacked_critical_event_is_resent_with_the_same_bytes_up_to_ack_max_sends() {
    let mut h = Harness::new(); // ack timeout 1 s, 3 sends
    h.s.set_acks(true);
    h.join("task:a");
    let d = ev_p("task:a", 1, Priority::Critical);
    assert!(h.deliver(&d));
    assert!(h.deliver(&ev("task:a", 2)), "a normal event is not tracked");
    assert_eq!(
        h.drain_raw(),
        [d.frame.clone(), ev("task:a", 2).frame.clone()]
    );
    h.advance(ms(999));
    h.tick();
    assert!(h.drain_raw().is_empty(), "not before the timeout");
    h.advance(ms(1));
    h.tick();
    assert_eq!(h.drain_raw(), vec![d.frame.clone()], "second send");
    h.advance(secs(1));
    h.tick();
    assert_eq!(h.drain_raw(), vec![d.frame.clone()], "third send");
    for _ in 0..5 {
        h.advance(secs(1));
        h.tick();
        assert!(h.drain_raw().is_empty(), "sent ack_max_sends times");
    }
}

#[test]
fn an_acked_critical_event_is_not_resent() {
    let mut h = Harness::new();
    h.s.set_acks(true);
    h.join("task:a");
    assert!(h.deliver(&ev_p("task:a", 1, Priority::Critical)));
    assert!(h.deliver(&ev_p("task:a", 2, Priority::Critical)));
    h.drain();
    h.send(json!({"type": "ack", "channel": "task:a", "seq": 1}));
    h.send(json!({"type": "ack", "channel": "task:b", "seq": 2})); // not that one
    h.advance(secs(1));
    h.tick();
    assert_eq!(briefs(&h.drain()), ["task:a#2"]);
    h.send(json!({"type": "ack", "channel": "task:a", "seq": 2}));
    h.advance(secs(5));
    h.tick();
    assert!(h.drain().is_empty());

    // Without ack=critical nothing is tracked.
    let mut h = Harness::new();
    h.join("task:a");
    assert!(h.deliver(&ev_p("task:a", 1, Priority::Critical)));
    h.drain();
    h.advance(secs(2));
    h.tick();
    assert!(h.drain().is_empty());
}

#[test]
fn a_critical_event_skipped_by_a_pause_is_not_resent_after_resume() {
    let mut h = Harness::new();
    h.s.set_acks(true);
    h.join("task:a");
    assert!(h.deliver(&ev_p("task:a", 1, Priority::Critical))); // still queued...
    h.send(json!({"type": "pause"})); // ...so skipped
    h.send(json!({"type": "resume"}));
    let frames = h.drain();
    assert_eq!(briefs(&frames), ["paused", "resumed"]);
    assert_eq!(json_of(&frames[1])["skipped"], 1);
    h.advance(secs(2));
    h.tick();
    assert!(h.drain().is_empty(), "skipped events are not re-sent");
}

#[test]
fn a_replay_while_paused_counts_only_what_was_sent() {
    let mut h = Harness::new();
    h.send(json!({"type": "pause"}));
    h.send(
        json!({"type": "subscribe", "channels": ["task:a"], "since": {"task:a": 0},
                  "epoch": EPOCH}),
    );
    let sub = h.subscribes().remove(0);
    let replay = Replay {
        deliveries: vec![ev("task:a", 1), ev("task:a", 2), ev("task:a", 3)],
        recovered: true,
    };
    assert!(h.ack(&sub, 3, Some(replay)));
    h.send(json!({"type": "resume"}));
    let frames = h.drain();
    assert_eq!(
        briefs(&frames),
        ["paused", "subscribed task:a", "replayed task:a", "resumed"]
    );
    assert_eq!(json_of(&frames[2])["count"], 0, "none was re-sent");
    assert_eq!(json_of(&frames[3])["skipped"], 3);
}

#[test]
fn a_paused_client_gets_no_resends() {
    let mut h = Harness::new();
    h.s.set_acks(true);
    h.join("task:a");
    assert!(h.deliver(&ev_p("task:a", 1, Priority::Critical)));
    h.drain();
    h.send(json!({"type": "pause"}));
    assert_eq!(briefs(&h.drain()), ["paused"]);
    for _ in 0..5 {
        h.advance(secs(1));
        h.tick();
        assert!(h.drain().is_empty());
    }
    // At resume the event gets a full timeout again: no resend until it has passed.
    h.send(json!({"type": "resume"}));
    assert_eq!(briefs(&h.drain()), ["resumed"]);
    let timeout = h.config.ack_timeout;
    h.advance(timeout - ms(1));
    h.tick();
    assert!(
        h.drain().is_empty(),
        "resent before its timeout after resume"
    );
    h.advance(ms(1));
    h.tick();
    assert_eq!(briefs(&h.drain()), ["task:a#1"]);
}

// ---- rate limits ----------------------------------------------------------------------------

#[test]
fn the_connection_rate_limit_makes_events_wait_and_control_frames_pass() {
    let mut cfg = config();
    cfg.connection_rate_limit = 2; // a burst of 2, then one per 500 ms
    let mut h = Harness::open_with(cfg, claims());
    h.join("task:a");
    for seq in 1..=3 {
        assert!(h.deliver(&ev("task:a", seq)));
    }
    assert_eq!(briefs(&h.drain()), ["task:a#1", "task:a#2"]);
    let wait = h.waited();
    assert!(
        wait > Duration::ZERO && wait <= ms(500),
        "waits for the next token: {wait:?}"
    );
    // Nothing moves before the time is up...
    h.advance(wait / 2);
    assert!(h.drain().is_empty());
    assert!(h.waited() <= wait / 2 + ms(1));
    // ...and the event goes once it is.
    h.advance(wait - wait / 2);
    assert_eq!(briefs(&h.drain()), ["task:a#3"]);

    // No token left, yet control frames and critical events go at once.
    h.event(Event::Ping(Bytes::from_static(b"hi")));
    h.send(json!({"type": "resume"}));
    assert!(h.deliver(&ev_p("task:a", 4, Priority::Critical)));
    assert_eq!(briefs(&h.drain()), ["pong hi", "resumed", "task:a#4"]);
    assert!(matches!(h.last, Some(Transmit::Idle)));

    // An event that waits longer than its TTL (5 s) is dropped and counted.
    for seq in 5..=9 {
        assert!(h.deliver(&ev("task:a", seq)));
    }
    h.drain();
    h.advance(secs(6));
    let frames = h.drain();
    assert_eq!(briefs(&frames), ["dropped task:a"]);
    assert_eq!(json_of(&frames[0])["count"], 5);
}

#[test]
fn the_node_share_of_the_rate_limit_holds_the_connection_back_too() {
    let mut h = Harness::new();
    h.node = Bucket::new(1);
    h.join("task:a");
    assert!(h.deliver(&ev("task:a", 1)));
    assert!(h.deliver(&ev("task:a", 2)));
    assert_eq!(briefs(&h.drain()), ["task:a#1"]);
    let wait = h.waited();
    assert!(wait > ms(900) && wait <= secs(1), "{wait:?}");
    h.advance(wait);
    assert_eq!(briefs(&h.drain()), ["task:a#2"]);
}

#[test]
fn too_many_client_messages_warn_once_then_are_ignored_then_close_1008() {
    let mut cfg = config();
    cfg.max_client_messages_per_sec = 5;
    let mut h = Harness::open_with(cfg, claims());
    let resume = json!({"type": "resume"});
    for _ in 0..5 {
        h.send(resume.clone());
    }
    // Pings and pongs do not count.
    for _ in 0..20 {
        h.event(Event::Ping(Bytes::new()));
        h.event(Event::Pong(Bytes::new()));
    }
    assert_eq!(
        briefs(&h.drain())
            .iter()
            .filter(|f| *f == "resumed")
            .count(),
        5
    );
    assert_eq!(h.send(resume.clone()), Flow::Continue);
    assert_eq!(briefs(&h.drain()), ["error rate_limited"]);
    for _ in 7..=10 {
        h.send(resume.clone());
    }
    assert!(h.drain().is_empty(), "ignored after the warning");
    assert!(h.take_effects().is_empty());
    assert_eq!(h.send(resume.clone()), Flow::Continue);
    assert_eq!(h.drain(), ["close 1008 flooding"]);
    let effects = h.take_effects();
    assert_eq!(
        effects.iter().map(effect_brief).collect::<Vec<_>>(),
        ["audit limit_hit"]
    );
    let Effect::Audit { fields, .. } = &effects[0] else {
        unreachable!()
    };
    assert_eq!(fields["reason"], "message flood");
    assert_eq!(h.s.closed_with(), (1008, "flooding".to_owned()));
}

#[test]
fn the_client_message_count_starts_again_every_second() {
    let mut cfg = config();
    cfg.max_client_messages_per_sec = 5;
    let mut h = Harness::open_with(cfg, claims());
    for _ in 0..4 {
        for _ in 0..5 {
            h.send(json!({"type": "resume"}));
        }
        assert_eq!(briefs(&h.drain()), ["resumed"; 5]);
        h.advance(secs(1));
    }
}

#[test]
fn at_most_ten_filter_updates_per_second() {
    let mut h = Harness::new();
    for _ in 0..12 {
        h.send(json!({"type": "filter"}));
    }
    let frames = briefs(&h.drain());
    assert_eq!(frames[..10], ["filtered"; 10]);
    assert_eq!(frames[10..], ["error rate_limited"; 2]);
    h.advance(secs(1));
    h.send(json!({"type": "filter"}));
    assert_eq!(briefs(&h.drain()), ["filtered"]);
}

// ---- slow clients ---------------------------------------------------------------------------

#[test]
fn a_client_behind_for_longer_than_slow_client_timeout_is_closed_1008_at_a_tick() {
    let mut h = Harness::new(); // threshold 10, slow after 5 s
    h.join("task:a");
    for seq in 1..=10 {
        assert!(h.deliver(&ev_p("task:a", seq, Priority::High)));
    }
    h.advance(ms(4999));
    h.tick();
    assert_eq!(h.s.closed_with().0, 1006, "not yet");
    h.advance(ms(1));
    h.tick();
    assert_eq!(h.drain(), ["close 1008 too slow"], "its backlog is dropped");
    assert_eq!(h.s.closed_with(), (1008, "too slow".to_owned()));

    // One that catches up in between starts over.
    let mut h = Harness::new();
    h.join("task:a");
    for round in 0..2u64 {
        for seq in 1..=10 {
            assert!(h.deliver(&ev_p("task:a", round * 10 + seq, Priority::High)));
        }
        h.advance(secs(3));
        h.tick();
        if round == 0 {
            assert_eq!(h.drain().len(), 10, "caught up");
        }
    }
    h.advance(secs(1)); // behind for 4 s only
    h.tick();
    assert_eq!(h.s.closed_with().0, 1006);
    h.advance(secs(1));
    h.tick();
    assert_eq!(h.drain(), ["close 1008 too slow"]);
}

#[test]
fn a_queue_over_max_queue_bytes_closes_at_once_and_drops_the_backlog() {
    let mut h = Harness::new(); // 64 KiB
    h.join("task:a");
    let mut seq = 0;
    let refused = loop {
        seq += 1;
        assert!(seq < 100, "never closed");
        if !h.deliver(&big("task:a", seq, 4000, Priority::Critical)) {
            break seq;
        }
        assert!(h.s.queued_bytes() <= 64 * 1024);
    };
    assert!(refused > 10, "{refused}");
    assert_eq!(h.s.closed_with(), (1008, "too slow".to_owned()));
    assert!(!h.deliver(&ev("task:a", refused + 1)));
    assert_eq!(h.drain(), ["close 1008 too slow"]);
}

#[test]
fn a_close_frame_queued_behind_a_backlog_outlives_the_slow_client_timeout() {
    // The drain's 1012 reaches a client that is behind: the slow-client check, coming due
    // while the close handshake runs, must not throw the close frame away with the backlog.
    let mut h = Harness::new(); // threshold 10, slow after 5 s
    h.join("task:a");
    for seq in 1..=10 {
        assert!(h.deliver(&ev_p("task:a", seq, Priority::High)));
    }
    h.advance(secs(4));
    h.close(1012, "server restarting");
    h.advance(secs(1));
    h.tick();
    assert!(h.take_effects().is_empty(), "within the close grace");
    let frames = h.drain();
    assert_eq!(
        frames.last().map(String::as_str),
        Some("close 1012 server restarting"),
        "{frames:?}"
    );
    assert_eq!(h.s.closed_with(), (1012, "server restarting".to_owned()));
}

// ---- closing --------------------------------------------------------------------------------

#[test]
fn no_dropped_notice_follows_the_close_frame() {
    let mut h = Harness::new(); // threshold 10
    h.join("task:a");
    for seq in 1..=10 {
        assert!(h.deliver(&ev_p("task:a", seq, Priority::High)));
    }
    assert!(!h.deliver(&ev_p("task:a", 11, Priority::Low)));
    h.close(1000, "bye");
    let frames = h.drain();
    assert_eq!(frames.last().map(String::as_str), Some("close 1000 bye"));
    assert_eq!(frames.len(), 11, "{frames:?}");
    h.s.on_read_closed();
    assert!(h.drain().is_empty());
    assert!(matches!(h.last, Some(Transmit::Done)));
}

#[test]
fn close_queues_the_close_frame_and_nothing_after_it() {
    let mut h = Harness::new();
    h.join("task:a");
    assert!(h.deliver(&ev("task:a", 1)));
    h.close(4003, "kicked");
    assert!(!h.deliver(&ev("task:a", 2)));
    h.push(crate::runtime::core::shutdown_frame(Encoding::Json));
    h.close(1000, "again");
    h.send(json!({"type": "resume"}));
    assert_eq!(briefs(&h.drain()), ["task:a#1", "close 4003 kicked"]);
    assert_eq!(h.s.closed_with(), (4003, "kicked".to_owned()));
}

#[test]
fn the_peers_close_is_answered_with_its_code_and_reading_stops() {
    let mut h = Harness::new();
    let close = Event::Close {
        code: Some(1001),
        reason: "bye".into(),
    };
    assert_eq!(h.event(close), Flow::Stop);
    assert_eq!(h.drain(), ["close 1001"]);
    assert_eq!(h.s.closed_with(), (1001, "closed by the client".to_owned()));

    let mut h = Harness::new();
    let empty = Event::Close {
        code: None,
        reason: String::new(),
    };
    assert_eq!(h.event(empty), Flow::Stop);
    assert_eq!(h.drain(), ["close 1000"]);
}

#[test]
fn while_closing_only_the_peers_close_matters() {
    let mut h = Harness::new();
    h.join("task:a");
    h.close(4003, "kicked");
    assert_eq!(
        h.send(json!({"type": "subscribe", "channels": ["task:b"]})),
        Flow::Continue
    );
    h.event(Event::Ping(Bytes::from_static(b"p")));
    h.send(json!({"type": "dance"}));
    assert!(h.take_effects().is_empty());
    assert_eq!(h.drain(), ["close 4003 kicked"]);
    let close = Event::Close {
        code: Some(4003),
        reason: String::new(),
    };
    assert_eq!(h.event(close), Flow::Stop);
    assert!(h.drain().is_empty(), "no second close frame");
    assert_eq!(h.s.closed_with(), (4003, "kicked".to_owned()));
}

#[test]
fn after_the_close_grace_a_tick_cuts_the_socket() {
    let mut h = Harness::new();
    h.close(1000, "");
    h.drain();
    h.advance(CLOSE_GRACE - ms(1));
    h.tick();
    assert!(h.take_effects().is_empty());
    h.advance(ms(1));
    h.tick();
    assert_eq!(h.effect_briefs(), ["cut"]);
}

#[test]
fn once_reading_is_over_what_is_queued_is_written_then_done() {
    let mut h = Harness::new();
    h.close(1000, "bye");
    assert_eq!(h.drain(), ["close 1000 bye"]);
    assert!(matches!(h.last, Some(Transmit::Idle)), "waits for the peer");
    h.s.on_read_closed();
    assert!(h.s.wants_transmit());
    assert!(h.drain().is_empty());
    assert!(matches!(h.last, Some(Transmit::Done)));

    // The socket failed with events queued: they are flushed first.
    let mut h = Harness::new();
    h.join("task:a");
    assert!(h.deliver(&ev("task:a", 1)));
    h.s.on_read_closed();
    assert!(!h.deliver(&ev("task:a", 2)));
    assert_eq!(briefs(&h.drain()), ["task:a#1"]);
    assert!(matches!(h.last, Some(Transmit::Done)));
}

#[test]
fn an_sse_stream_carries_its_position_and_is_done_once_closing_and_drained() {
    let channels = vec!["task:a".to_owned()];
    let mut h = Harness::greeting(config(), claims(), Format::from(Encoding::Sse));
    h.s.set_sse(Box::new(SseStream::new(EPOCH, &channels, &[Resume::Live])));
    assert!(h.s.is_sse());
    h.with(|s, ctx, out| s.subscribe("task:a", Resume::Live, true, ctx, out))
        .unwrap();
    let sub = h.subscribes().remove(0);
    h.s.greet_after(welcome(Encoding::Sse), 1);
    assert!(h.ack(&sub, 3, None));
    assert!(h.deliver(&ev("task:a", 4)));
    let frames = h.drain();
    assert_eq!(
        briefs(&frames),
        ["welcome", "subscribed task:a", "task:a#4"]
    );
    let id = |frame: &str| frame.lines().next().unwrap().to_owned();
    assert!(id(&frames[0]).starts_with("id: e1:"), "{}", frames[0]);
    assert!(id(&frames[1]).ends_with(":3"), "live: the head");
    assert!(id(&frames[2]).ends_with(":4"), "{}", frames[2]);
    assert!(frames[2].ends_with("\n\n"));

    // A ping is a comment, without an id.
    h.advance(secs(30));
    h.tick();
    assert_eq!(h.drain(), [": ping\n\n"]);

    h.close(1000, "bye");
    let frames = h.drain();
    assert_eq!(
        json_of(&frames[0]),
        json!({"type": "closed", "code": 1000, "reason": "bye"})
    );
    assert!(id(&frames[0]).ends_with(":4"));
    assert!(
        matches!(h.last, Some(Transmit::Done)),
        "done without the reader"
    );
}

#[test]
fn an_sse_position_told_to_reload_moves_to_the_head_only_once_replayed_is_written() {
    let channels = vec!["task:a".to_owned()];
    let mut h = Harness::greeting(config(), claims(), Format::from(Encoding::Sse));
    h.s.set_sse(Box::new(SseStream::new(
        EPOCH,
        &channels,
        &[Resume::OtherEpoch],
    )));
    h.with(|s, ctx, out| s.subscribe("task:a", Resume::OtherEpoch, true, ctx, out))
        .unwrap();
    let sub = h.subscribes().remove(0);
    h.s.greet_after(welcome(Encoding::Sse), 1);
    let lost = Replay {
        deliveries: Vec::new(),
        recovered: false,
    };
    assert!(h.ack(&sub, 9, Some(lost)));
    let position = |h: &Harness| {
        let line = h.s.sse.as_deref().unwrap().id_line();
        String::from_utf8(line.to_vec()).unwrap()
    };
    assert!(position(&h).ends_with(":?\n"), "not written yet");
    let frames = h.drain();
    assert_eq!(
        briefs(&frames),
        ["welcome", "subscribed task:a", "replayed task:a"]
    );
    assert!(frames[2].starts_with("id: ") && frames[2].lines().next().unwrap().ends_with(":?"));
    assert!(position(&h).ends_with(":9\n"), "{}", position(&h));
}

// ---- heartbeat and tokens -------------------------------------------------------------------

#[test]
fn a_ping_goes_after_the_ping_interval_and_pongs_keep_the_connection() {
    let mut h = Harness::new(); // every 30 s, 10 s for the pong, 3 misses
    h.advance(ms(29_999));
    h.tick();
    assert!(h.drain().is_empty());
    for _ in 0..10 {
        h.advance(secs(30));
        h.tick();
        assert_eq!(h.drain(), ["ping"]);
        h.event(Event::Pong(Bytes::new()));
        h.advance(secs(10));
        h.tick();
        assert!(h.drain().is_empty());
    }
    assert_eq!(h.s.closed_with().0, 1006);
    // The client's own pings are answered with their payload.
    h.event(Event::Ping(Bytes::from_static(b"abc")));
    assert_eq!(h.drain(), ["pong abc"]);
}

#[test]
fn missed_pongs_close_4002() {
    let mut h = Harness::new();
    let mut frames = Vec::new();
    for at in [30, 40, 60, 70, 90, 100] {
        h.advance(secs(at) - h.elapsed);
        h.tick();
        frames.extend(h.drain());
    }
    assert_eq!(
        frames,
        ["ping", "ping", "ping", "close 4002 heartbeat timeout"]
    );
}

#[test]
fn a_token_past_exp_and_the_leeway_closes_4001() {
    let mut c = claims();
    c.exp = Some(UNIX0 + 10);
    let mut h = Harness::open_with(config(), c);
    h.advance(secs(10 + LEEWAY_SECS));
    h.tick();
    assert!(h.drain().is_empty(), "within the leeway");
    h.advance(secs(1));
    h.tick();
    assert_eq!(h.drain(), ["close 4001 token expired"]);
}

#[test]
fn a_refresh_replaces_the_claims_and_ends_the_subscriptions_they_no_longer_allow() {
    let mut c = claims_of("u1", &["p1", "p2"]);
    c.exp = Some(UNIX0 + 10);
    let mut h = Harness::open_with(config(), c);
    h.join("project:p1");
    h.join("project:p2");
    let overrides = Overrides {
        granted_channels: vec!["audit".into()],
        ..Overrides::default()
    };
    h.s.set_overrides(overrides.clone());
    h.send(json!({"type": "refresh", "token": "narrow"}));
    let frames = h.drain();
    assert_eq!(
        json_of(&frames[0]),
        json!({"type": "unsubscribed", "channel": "project:p2", "reason": "forbidden"})
    );
    assert_eq!(
        json_of(&frames[1]),
        json!({"type": "refreshed", "exp": UNIX0 + 3600})
    );
    assert_eq!(frames.len(), 2);
    assert_eq!(h.effect_briefs(), ["unsubscribe project:p2 joined"]);
    assert_eq!(h.s.claims().projects, ["p1"]);
    assert_eq!(
        h.s.claims().overrides,
        overrides,
        "the admin's changes stay"
    );
    assert_eq!(
        h.s.channels().map(|c| &**c).collect::<Vec<_>>(),
        ["project:p1"]
    );
    // The old expiry no longer applies.
    h.advance(secs(20));
    h.tick();
    assert!(h.drain().is_empty());
    assert_eq!(h.s.closed_with().0, 1006);
}

#[test]
fn a_refresh_for_another_user_or_with_a_bad_token_changes_nothing() {
    let mut c = claims();
    c.exp = Some(UNIX0 + 10);
    let mut h = Harness::open_with(config(), c.clone());
    h.join("task:a");
    h.send(json!({"type": "refresh", "token": "other-user"}));
    h.send(json!({"type": "refresh", "token": "garbage"}));
    let frames = h.drain();
    assert_eq!(briefs(&frames), ["error bad_token", "error bad_token"]);
    assert_eq!(
        json_of(&frames[0])["message"],
        "the refresh token is for another user"
    );
    assert_eq!(
        json_of(&frames[1])["message"],
        "token is malformed or lacks the sub claim"
    );
    assert_eq!(h.s.claims(), &c);
    assert!(h.take_effects().is_empty());
    assert_eq!(h.s.channels().count(), 1);
    // The old expiry still holds.
    h.advance(secs(10 + LEEWAY_SECS + 1));
    h.tick();
    assert_eq!(h.drain(), ["close 4001 token expired"]);
}

// ---- drain ----------------------------------------------------------------------------------

#[test]
fn a_draining_node_pushes_the_shutdown_notice_then_closes_1012() {
    let mut h = Harness::new();
    h.join("task:a");
    h.push(crate::runtime::core::shutdown_frame(Encoding::Json));
    let frames = h.drain();
    assert_eq!(
        json_of(&frames[0]),
        json!({"type": "shutdown", "reason": "server is shutting down; reconnect and resume"})
    );
    assert!(h.deliver(&ev("task:a", 1)), "still served meanwhile");
    h.close(1012, "server restarting");
    assert_eq!(
        briefs(&h.drain()),
        ["task:a#1", "close 1012 server restarting"]
    );
    assert_eq!(h.s.closed_with(), (1012, "server restarting".to_owned()));
}

// ---- client messages ------------------------------------------------------------------------

#[test]
fn bad_client_messages_get_error_frames_and_messagepack_clients_may_send_maps() {
    let mut h = Harness::new();
    h.event(Event::Text(Bytes::from_static(b"{not json")));
    h.event(Event::Binary(Bytes::from_static(b"\x01\x02")));
    h.send(json!({"type": "ping"}));
    assert_eq!(
        briefs(&h.drain()),
        [
            "error bad_json",
            "error binary_not_supported",
            "error unsupported"
        ]
    );

    let mut h = Harness::greeting(config(), claims(), Format::from(Encoding::MessagePack));
    h.s.greet_after(welcome(Encoding::MessagePack), 0);
    let map = rmp_serde::to_vec_named(&json!({"type": "pause"})).unwrap();
    h.event(Event::Binary(Bytes::from(map)));
    h.event(Event::Binary(Bytes::from_static(b"\xc1")));
    let raw = h.drain_raw();
    assert!(raw.iter().all(|f| f[0] == 0x82), "binary frames");
    let frames: Vec<String> = raw.iter().map(|f| show(f)).collect();
    assert_eq!(briefs(&frames), ["welcome", "paused", "error bad_json"]);
}

// ---- size -----------------------------------------------------------------------------------

/// What one connection's `Session` may take inline (without the `Cold` box, the queue's
/// entries and the other heap parts): today's size rounded up to a multiple of 64. Every
/// connection pays it, so a new field should earn its place; state most connections never use
/// belongs in `Cold`.
const SESSION_BUDGET_BYTES: usize = 384;

#[test]
fn a_presence_question_goes_to_the_node_only_for_a_channel_the_client_may_read() {
    let mut h = Harness::new();
    h.send(json!({"type": "presence", "channel": "task:t1"}));
    assert_eq!(h.effect_briefs(), ["presence task:t1"]);
    h.send(json!({"type": "presence", "channel": "project:p2"}));
    h.send(json!({"type": "presence", "channel": "bad channel"}));
    h.send(json!({"type": "presence"}));
    assert!(h.effect_briefs().is_empty());
    assert_eq!(
        briefs(&h.drain()),
        [
            "error forbidden project:p2",
            "error bad_channel bad channel",
            "error bad_message"
        ]
    );
}

#[test]
fn a_session_stays_within_its_size_budget() {
    let size = std::mem::size_of::<Session>();
    assert!(
        size <= SESSION_BUDGET_BYTES,
        "Session is {size} bytes, over its budget of {SESSION_BUDGET_BYTES}: look at the \
         fields of Session (and of SendQueue, Heartbeat, Bucket inside it); state most \
         connections never use belongs in Cold"
    );
}

#[test]
fn a_client_that_pings_faster_than_it_reads_gets_one_pong_for_its_latest_ping() {
    let mut h = Harness::new();
    for i in 0..100_000u32 {
        h.event(Event::Ping(Bytes::from(i.to_string())));
    }
    // One entry waits, however many pings came: the flood costs nothing that grows.
    assert!(h.s.queued_bytes() < 256, "{}", h.s.queued_bytes());
    assert_eq!(h.drain(), ["pong 99999"]);
    // Once answered, the next ping gets its own pong.
    h.event(Event::Ping(Bytes::from_static(b"again")));
    assert_eq!(h.drain(), ["pong again"]);
}

#[test]
fn every_queued_entry_counts_against_the_bound_with_what_it_costs() {
    let mut h = Harness::new(); // 64 KiB
    let frame = codec::close_frame(1000, ""); // 4 wire bytes
    let mut pushed = 0;
    while h.s.closed_with().0 != 1008 {
        h.s.push_control(frame.clone(), h.now(), &h.config);
        pushed += 1;
        assert!(pushed < 64 * 1024, "tiny frames were never bounded");
    }
    // Bounded by their cost (64 bytes and more each), not by their 4 wire bytes.
    assert!(
        pushed <= 64 * 1024 / super::super::queue::ENTRY_BYTES,
        "{pushed}"
    );
}

// ---- Socket.IO ---------------------------------------------------------------------------

mod socketio {
    use super::*;
    use crate::delivery::recovery::offset;
    use crate::delivery::session::socketio::connect_frame;

    /// An open Socket.IO session whose CONNECT answer is written.
    fn open() -> Harness {
        let format = Format::from(Encoding::SocketIo);
        let mut h = Harness::greeting(config(), claims(), format);
        h.s.set_recovery("pid-1".into(), None);
        h.s.greet_after(connect_frame("c1", Some("pid-1")), 0);
        assert_eq!(h.drain(), [r#"40{"pid":"pid-1","sid":"c1"}"#]);
        h
    }

    fn text(h: &mut Harness, packet: &str) -> Flow {
        h.event(Event::Text(Bytes::from(packet.to_owned())))
    }

    fn keyed(channel: &str, seq: u64, event: &str, key: Option<&str>) -> Arc<Delivery> {
        Arc::new(Delivery {
            coalesce_key: key.map(Into::into),
            ..delivery(channel, seq, event, &format!("{{\"n\":{seq}}}"))
        })
    }

    #[test]
    fn an_event_with_an_ack_id_is_answered_through_its_acknowledgement() {
        let mut h = open();
        text(&mut h, r#"421["subscribe",{"channel":"task:a"}]"#);
        let subs = h.subscribes();
        assert_eq!(subs.len(), 1);
        assert!(h.drain().is_empty(), "the ack waits for the owner");
        assert!(h.ack(&subs[0], 7, None));
        let out = h.drain();
        assert_eq!(out.len(), 1, "{out:?}");
        let ack: Value = serde_json::from_str(out[0].strip_prefix("431").unwrap()).unwrap();
        assert_eq!(
            ack,
            json!([{"ok": true, "type": "subscribed", "channel": "task:a", "seq": 7}])
        );
        // Refused at once: the error is the acknowledgement.
        text(&mut h, r#"422["subscribe",{"channel":"project:zz"}]"#);
        let out = h.drain();
        let ack: Value = serde_json::from_str(out[0].strip_prefix("432").unwrap()).unwrap();
        assert_eq!(ack[0]["ok"], false, "{out:?}");
        assert_eq!(ack[0]["code"], "forbidden");
        assert_eq!(ack[0]["channel"], "project:zz");
        // Without an id the same answers are events; unknown events are errors.
        text(&mut h, r#"42["nope",{}]"#);
        let out = h.drain();
        assert!(
            out[0].starts_with(r#"42["ringcast:error",{"#) && out[0].contains("unknown_type"),
            "{out:?}"
        );
        // Something that asked for an ack and has no answer of its own gets {ok:true}.
        text(&mut h, r#"423["ack",{"channel":"task:a","seq":1}]"#);
        assert_eq!(h.drain(), [r#"433[{"ok":true}]"#]);
    }

    #[test]
    fn task_join_answers_the_newest_event_per_key_then_live_events_with_no_seam() {
        let mut h = open();
        text(&mut h, r#"425["task:join",{"taskId":"t1"}]"#);
        let subs = h.subscribes();
        assert_eq!(subs[0].channel.as_ref(), "task:t1");
        assert_eq!(
            subs[0].resume,
            Resume::Held,
            "the state is made of the history"
        );
        let held = Replay {
            deliveries: vec![
                keyed("task:t1", 1, "task:created", None),
                keyed("task:t1", 2, "task:analyzing", Some("status")),
                keyed("task:t1", 3, "task:dispatched", Some("status")),
            ],
            recovered: false,
        };
        assert!(h.ack(&subs[0], 3, Some(held)));
        let out = h.drain();
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            out[0].starts_with("435[") && out[0].contains(r#""seq":3"#),
            "{out:?}"
        );
        let state: Value = serde_json::from_str(out[1].strip_prefix("42").unwrap()).unwrap();
        assert_eq!(state[0], "task:state");
        assert_eq!(state[1]["taskId"], "t1");
        assert_eq!(state[1]["seq"], 3);
        let seqs: Vec<u64> = state[1]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, [1, 3], "the newest per key, in seq order");
        // Live: the shared packet, with meta and offset.
        assert!(h.deliver(&keyed("task:t1", 4, "task:pr_opened", None)));
        let out = h.drain();
        assert_eq!(
            out,
            [r#"42["task:pr_opened",{"n":4},{"channel":"task:t1","seq":4,"ts":1004},"4:task:t1"]"#]
        );
        // A task id that is not one: an error, through the ack.
        text(&mut h, r#"426["task:join",{"taskId":""}]"#);
        let out = h.drain();
        assert!(
            out[0].starts_with("436[") && out[0].contains("bad_message"),
            "{out:?}"
        );
    }

    #[test]
    fn engine_io_pings_need_pongs_and_a_missed_one_closes() {
        let mut h = open();
        h.advance(secs(25));
        h.tick();
        assert_eq!(h.drain(), ["2"]);
        text(&mut h, "3");
        h.advance(secs(25));
        h.tick();
        assert_eq!(h.drain(), ["2"], "pinged again after the pong");
        h.advance(secs(20));
        h.tick();
        let out = h.drain();
        assert!(out[0].contains("ringcast:closed") && out[0].contains("heartbeat timeout"));
        assert_eq!(out[1], "close 4002 heartbeat timeout");
    }

    #[test]
    fn a_malformed_packet_or_an_unannounced_attachment_closes_the_session() {
        for bad in ["4x", "9", "42[\"x\"", "42{}"] {
            let mut h = open();
            text(&mut h, bad);
            let out = h.drain();
            assert!(
                out.last().is_some_and(|c| c.starts_with("close 1008")),
                "{bad}: {out:?}"
            );
        }
        let mut h = open();
        h.event(Event::Binary(Bytes::from_static(b"\x01")));
        assert!(h.drain().last().unwrap().starts_with("close 1008"));
        // An announced attachment is taken (and dropped) without harm.
        let mut h = open();
        text(&mut h, r#"451-["x",{"_placeholder":true,"num":0}]"#);
        assert!(h.drain()[0].contains("binary_not_supported"));
        h.event(Event::Binary(Bytes::from_static(b"\x01")));
        assert!(h.drain().is_empty(), "still open");
    }

    #[test]
    fn the_record_a_session_leaves_resumes_each_channel_where_the_client_left_it() {
        let mut h = open();
        let a = h.join_socketio("task:a", 10);
        let b = h.join_socketio("dashboard", 20);
        let _ = (a, b);
        for (channel, seq) in [("task:a", 11), ("dashboard", 21), ("task:a", 12)] {
            assert!(h.deliver(&keyed(channel, seq, "e", None)));
            h.drain();
        }
        let (pid, record) = h.s.recovery(EPOCH).expect("a record");
        assert_eq!(pid, "pid-1");
        let (resumes, exact) = record.resumes(Some(&offset("dashboard", 21)));
        assert!(exact);
        let resumes: HashMap<String, Resume> = resumes
            .into_iter()
            .map(|(c, r)| (c.to_string(), r))
            .collect();
        assert_eq!(resumes["task:a"], Resume::After(11));
        assert_eq!(resumes["dashboard"], Resume::After(21));
        // A client that disconnected on purpose leaves nothing.
        text(&mut h, "41");
        assert!(h.s.recovery(EPOCH).is_none());
    }

    #[test]
    fn a_recovery_whose_replay_is_incomplete_is_answered_with_a_new_private_id() {
        let format = Format::from(Encoding::SocketIo);
        let mut h = Harness::greeting(config(), claims(), format);
        let lost = connect_frame("c2", Some("fresh"));
        h.s.set_recovery("old".into(), Some(("fresh".into(), lost)));
        h.with(|s, ctx, out| s.subscribe("task:a", Resume::After(5), true, ctx, out))
            .unwrap();
        h.s.greet_after(connect_frame("c2", Some("old")), 1);
        let subs = h.subscribes();
        let replay = Replay {
            deliveries: Vec::new(),
            recovered: false,
        };
        assert!(h.ack(&subs[0], 9, Some(replay)));
        let out = h.drain();
        assert_eq!(out[0], r#"40{"pid":"fresh","sid":"c2"}"#, "{out:?}");
        assert_eq!(h.s.recovery(EPOCH).unwrap().0, "fresh");
    }

    impl Harness {
        /// Subscribes a Socket.IO session to `channel` (live, at `seq`).
        fn join_socketio(&mut self, channel: &str, seq: u64) -> Sub {
            let packet = format!(r#"42["subscribe",{{"channel":"{channel}"}}]"#);
            self.event(Event::Text(Bytes::from(packet)));
            let sub = self.subscribes().remove(0);
            assert!(self.ack(&sub, seq, None));
            self.drain();
            sub
        }
    }
}
