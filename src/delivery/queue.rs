//! One connection's send queue: shared frames in order, with priorities and conflation for a
//! client that is behind.
//!
//! Invariant: frames of one channel leave in seq order; control frames are never dropped; a
//! `Critical` event is never dropped while the connection lives. Once `threshold` entries wait
//! (the client is behind), new `Low` events are dropped past half of it and `Normal` ones past
//! it, counted per channel for the `dropped` notice. An event with a `coalesce_key` replaces a
//! queued one with the same channel and key (newest wins), moving to the back so per-channel
//! order holds; and events of one key leave at most once per `key_interval` (progress at a
//! steady pace with the newest value), holding back only their own channel meanwhile.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Delivery, Priority};
use crate::proto::msg::Format;

enum Entry {
    Control(Bytes),
    /// An event and when it was queued (for its TTL).
    Event(Arc<Delivery>, Instant),
    /// A replayed event: goes out like a control frame (never dropped, paced or expired), but
    /// is still an event (its position counts, a revoke purges it).
    Replay(Arc<Delivery>),
    /// No bytes: once the writer reaches it, `channel` is settled up to `seq` (an SSE stream's
    /// position moves there only after what came before is written).
    Mark(Arc<str>, u64),
}

/// What one queued entry costs besides its frame's bytes: the entry and, for a small
/// control frame, its own allocation.
pub const ENTRY_BYTES: usize = 64;

/// First byte of a WebSocket pong frame (FIN + opcode 0xA).
const PONG_HEADER: u8 = 0x8A;

/// The frame of a `Mark`.
static NOTHING: Bytes = Bytes::new();

impl Entry {
    fn frame(&self, format: Format) -> &Bytes {
        match self {
            Entry::Control(b) => b,
            Entry::Mark(..) => &NOTHING,
            Entry::Event(d, _) | Entry::Replay(d) => d.frame_in(format),
        }
    }
}

/// What the writer may send next.
#[derive(Debug)]
pub enum Next {
    /// A control frame.
    Frame(Bytes),
    /// An event (live or replayed); its frame is `frame_in` the queue's format.
    Event(Arc<Delivery>),
    /// A `Mark` reached: `channel` is settled up to `seq`.
    Mark(Arc<str>, u64),
    /// The front event waits for the rate limits; try again after this long.
    Blocked(Duration),
    Empty,
}

/// A token bucket: `rate` per second, bursts up to one second's worth. Rate 0: no limit.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    rate: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    pub fn new(rate: u32) -> Bucket {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: None,
        }
    }

    /// Changes the rate from now on (0: no limit); tokens held stay, up to the new bound.
    pub fn set_rate(&mut self, rate: u32) {
        self.rate = f64::from(rate);
        self.tokens = self.tokens.min(self.rate.max(1.0));
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let add = now.duration_since(last).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + add).min(self.rate.max(1.0));
        }
        self.last = Some(now);
    }

    /// Time until one token is there (zero if it is).
    pub fn wait(&mut self, now: Instant) -> Duration {
        if self.rate == 0.0 {
            return Duration::ZERO;
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }

    pub fn take(&mut self) {
        if self.rate > 0.0 {
            self.tokens -= 1.0;
        }
    }
}

/// What happened to an event offered to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Replaced an older queued event with the same `coalesce_key`.
    Conflated,
    /// Dropped: the client is behind and the event's priority yields.
    Dropped,
}

pub struct SendQueue {
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Entries waiting past which the client counts as behind (≥ 2).
    threshold: usize,
    /// Events dropped per channel since the last notice.
    dropped: Vec<(Arc<str>, u64)>,
    /// Least time between two events of one `coalesce_key` (zero: no pacing); newer ones
    /// replace the one waiting, so the client sees the newest value at that pace.
    key_interval: Duration,
    /// When an event of each (channel, key) last left.
    last_sent: Vec<(Arc<str>, Box<str>, Instant)>,
    format: Format,
}

impl SendQueue {
    pub fn new(threshold: usize, key_interval: Duration) -> SendQueue {
        SendQueue {
            entries: VecDeque::new(),
            bytes: 0,
            threshold: threshold.max(2),
            dropped: Vec::new(),
            key_interval,
            last_sent: Vec::new(),
            format: Format::default(),
        }
    }

    /// Frames of events go out in this format (plain JSON unless set).
    pub fn set_format(&mut self, format: Format) {
        self.format = format;
    }

    pub fn push_control(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.entries.push_back(Entry::Control(frame));
    }

    /// Queues a replayed event: behind what is queued, exempt from drops and limits.
    pub fn push_replay(&mut self, d: Arc<Delivery>) {
        self.bytes += d.frame_in(self.format).len();
        self.entries.push_back(Entry::Replay(d));
    }

    /// Queues a mark (see `Entry::Mark`) behind what is queued.
    pub fn push_mark(&mut self, channel: Arc<str>, seq: u64) {
        self.entries.push_back(Entry::Mark(channel, seq));
    }

    /// Puts a control frame before everything else (the welcome).
    pub fn push_control_front(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.entries.push_front(Entry::Control(frame));
    }

    /// Offers a live event queued now.
    pub fn push_event(&mut self, d: &Arc<Delivery>) -> Pushed {
        self.push_event_at(d, Instant::now())
    }

    /// Offers a live event queued at `now` (its TTL counts from there).
    pub fn push_event_at(&mut self, d: &Arc<Delivery>, now: Instant) -> Pushed {
        let waiting = self.entries.len();
        if let (Some(key), false) = (&d.coalesce_key, d.priority == Priority::Critical) {
            // An older event of the same key still waits: the newer one takes its place (at
            // the back, so the channel's order holds). Critical events are never replaced.
            let same = self.entries.iter().rposition(|e| {
                matches!(e, Entry::Event(q, _) if q.channel == d.channel
                    && q.priority != Priority::Critical
                    && q.coalesce_key.as_deref() == Some(&**key))
            });
            if let Some(i) = same {
                if let Some(old) = self.entries.remove(i) {
                    self.bytes -= old.frame(self.format).len();
                }
                self.bytes += d.frame_in(self.format).len();
                self.entries.push_back(Entry::Event(d.clone(), now));
                return Pushed::Conflated;
            }
        }
        if waiting >= self.threshold / 2 {
            let yields = match d.priority {
                Priority::Low => true,
                Priority::Normal => waiting >= self.threshold,
                Priority::High | Priority::Critical => false,
            };
            if yields {
                self.count_drop(&d.channel);
                return Pushed::Dropped;
            }
        }
        self.bytes += d.frame_in(self.format).len();
        self.entries.push_back(Entry::Event(d.clone(), now));
        Pushed::Queued
    }

    /// The next frame to write at `now`: control frames and critical events at once; other
    /// events only with a token from every bucket, and dropped (counted) once older than their
    /// `ttl` (the message's `ttl_ms`, else `default_ttl`).
    pub fn next(
        &mut self,
        now: Instant,
        default_ttl: Duration,
        buckets: &mut [&mut Bucket],
    ) -> Next {
        // Channels held back behind a keyed event that waits for its interval: nothing of
        // theirs may overtake it; other channels go on.
        let mut held: Vec<Arc<str>> = Vec::new();
        let mut held_for: Option<Duration> = None;
        let mut idx = 0;
        while idx < self.entries.len() {
            let Entry::Event(d, at) = &self.entries[idx] else {
                if idx > 0 {
                    break; // control frames keep their place behind held events
                }
                return self.take(idx, now);
            };
            if held.contains(&d.channel) {
                idx += 1;
                continue;
            }
            if d.priority != Priority::Critical {
                let ttl = d.ttl.unwrap_or(default_ttl);
                let age = now.saturating_duration_since(*at);
                if age > ttl {
                    let d = d.clone();
                    self.entries.remove(idx);
                    self.bytes -= d.frame_in(self.format).len();
                    self.count_drop(&d.channel);
                    continue;
                }
                if let Some(wait) = self.interval_left(d, now) {
                    held.push(d.channel.clone());
                    held_for = Some(held_for.map_or(wait, |w| w.min(wait)));
                    idx += 1;
                    continue;
                }
                let wait = buckets
                    .iter_mut()
                    .map(|b| b.wait(now))
                    .max()
                    .unwrap_or_default();
                if !wait.is_zero() {
                    let wait = wait.min(ttl - age + Duration::from_millis(1));
                    return Next::Blocked(held_for.map_or(wait, |h| h.min(wait)));
                }
                buckets.iter_mut().for_each(|b| b.take());
            }
            return self.take(idx, now);
        }
        match held_for {
            Some(wait) => Next::Blocked(wait),
            None => Next::Empty,
        }
    }

    /// How long a keyed event must still wait for its key's interval (None: it may go).
    fn interval_left(&self, d: &Delivery, now: Instant) -> Option<Duration> {
        let key = d.coalesce_key.as_deref()?;
        if self.key_interval.is_zero() {
            return None;
        }
        let (_, _, sent) = self
            .last_sent
            .iter()
            .find(|(c, k, _)| *c == d.channel && &**k == key)?;
        let next = *sent + self.key_interval;
        (next > now).then(|| next - now)
    }

    fn take(&mut self, idx: usize, now: Instant) -> Next {
        let Some(entry) = self.entries.remove(idx) else {
            return Next::Empty;
        };
        self.bytes -= entry.frame(self.format).len();
        match entry {
            Entry::Control(b) => Next::Frame(b),
            Entry::Event(d, _) => {
                if let Some(key) = &d.coalesce_key {
                    self.note_sent(&d.channel, key, now);
                }
                Next::Event(d)
            }
            Entry::Replay(d) => Next::Event(d),
            Entry::Mark(channel, seq) => Next::Mark(channel, seq),
        }
    }

    fn note_sent(&mut self, channel: &Arc<str>, key: &str, now: Instant) {
        if let Some(slot) = self
            .last_sent
            .iter_mut()
            .find(|(c, k, _)| c == channel && &**k == key)
        {
            slot.2 = now;
            return;
        }
        if self.last_sent.len() >= 64 {
            let interval = self.key_interval;
            self.last_sent
                .retain(|(_, _, t)| now.saturating_duration_since(*t) < interval);
        }
        self.last_sent.push((channel.clone(), key.into(), now));
    }

    fn count_drop(&mut self, channel: &Arc<str>) {
        match self.dropped.iter_mut().find(|(c, _)| c == channel) {
            Some((_, n)) => *n += 1,
            None => self.dropped.push((channel.clone(), 1)),
        }
    }

    /// Removes every queued event `gone` picks (an ended subscription, a revoked project).
    pub fn purge(&mut self, mut gone: impl FnMut(&Delivery) -> bool) {
        let format = self.format;
        let mut freed = 0;
        self.entries.retain(|e| match e {
            Entry::Event(d, _) | Entry::Replay(d) if gone(d) => {
                freed += d.frame_in(format).len();
                false
            }
            _ => true,
        });
        self.bytes -= freed;
    }

    pub fn pop_front(&mut self) -> Option<Bytes> {
        let e = self.entries.pop_front()?;
        let frame = e.frame(self.format).clone();
        self.bytes -= frame.len();
        Some(frame)
    }

    pub fn front_len(&self) -> Option<usize> {
        self.entries.front().map(|e| e.frame(self.format).len())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What the queue holds against a connection's bound: its frames' bytes plus
    /// `ENTRY_BYTES` for each entry (so a flood of tiny frames is bounded by what it costs,
    /// not by its few wire bytes).
    pub fn bytes(&self) -> usize {
        self.bytes + self.entries.len() * ENTRY_BYTES
    }

    /// Queues a pong, or puts it in place of one still waiting at the back: a client that
    /// pings faster than it reads gets an answer to its latest ping only (RFC 6455, 5.5.3).
    pub fn push_pong(&mut self, frame: Bytes) {
        if let Some(Entry::Control(last)) = self.entries.back_mut() {
            if last.first() == Some(&PONG_HEADER) {
                self.bytes = self.bytes - last.len() + frame.len();
                *last = frame;
                return;
            }
        }
        self.push_control(frame);
    }

    /// Frees the queue's buffers if nothing waits in them.
    pub fn release_if_empty(&mut self) {
        if self.entries.is_empty() && self.entries.capacity() > 0 {
            self.entries = VecDeque::new();
        }
        if self.dropped.is_empty() && self.dropped.capacity() > 0 {
            self.dropped = Vec::new();
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Whether the client is behind (as many entries wait as the threshold).
    pub fn is_behind(&self) -> bool {
        self.entries.len() >= self.threshold
    }

    /// Once the queue has drained below half the threshold: the per-channel drop counts to
    /// tell the client about (and forget).
    pub fn take_dropped_if_drained(&mut self) -> Vec<(Arc<str>, u64)> {
        if self.dropped.is_empty() || self.entries.len() >= self.threshold / 2 {
            return Vec::new();
        }
        std::mem::take(&mut self.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(channel: &str, seq: u64, priority: Priority, key: Option<&str>) -> Arc<Delivery> {
        Arc::new(Delivery {
            channel: channel.into(),
            seq,
            frame: Bytes::from(format!("{channel}#{seq}")),
            project_id: None,
            user_id: None,
            agent_id: None,
            event: "e".into(),
            priority,
            coalesce_key: key.map(Into::into),
            ttl: None,
            twins: Default::default(),
        })
    }

    /// What `next` gave, with frames (control or event) as their text.
    #[derive(Debug, PartialEq, Eq)]
    enum Out {
        Frame(String),
        Blocked(Duration),
        Empty,
    }

    fn out(next: Next) -> Out {
        match next {
            Next::Frame(b) => Out::Frame(String::from_utf8(b.to_vec()).unwrap()),
            Next::Event(d) => Out::Frame(String::from_utf8(d.frame.to_vec()).unwrap()),
            Next::Mark(c, seq) => Out::Frame(format!("mark {c}#{seq}")),
            Next::Blocked(w) => Out::Blocked(w),
            Next::Empty => Out::Empty,
        }
    }

    fn drain(q: &mut SendQueue) -> Vec<String> {
        std::iter::from_fn(|| q.pop_front())
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn a_client_that_keeps_up_gets_everything_in_order() {
        let mut q = SendQueue::new(10, Duration::ZERO);
        for seq in 1..=4 {
            assert_eq!(
                q.push_event(&event("c", seq, Priority::Low, None)),
                Pushed::Queued
            );
            assert_eq!(q.pop_front().unwrap(), Bytes::from(format!("c#{seq}")));
        }
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn behind_low_then_normal_yield_high_and_critical_stay() {
        let mut q = SendQueue::new(10, Duration::ZERO);
        for seq in 1..=10 {
            q.push_event(&event("c", seq, Priority::High, None));
        }
        assert!(q.is_behind());
        assert_eq!(
            q.push_event(&event("c", 11, Priority::Low, None)),
            Pushed::Dropped
        );
        assert_eq!(
            q.push_event(&event("c", 12, Priority::Normal, None)),
            Pushed::Dropped
        );
        assert_eq!(
            q.push_event(&event("d", 1, Priority::Normal, None)),
            Pushed::Dropped
        );
        assert_eq!(
            q.push_event(&event("c", 13, Priority::Critical, None)),
            Pushed::Queued
        );
        assert_eq!(
            q.push_event(&event("c", 14, Priority::High, None)),
            Pushed::Queued
        );
        // no notice while still behind
        assert!(q.take_dropped_if_drained().is_empty());
        let out = drain(&mut q);
        assert_eq!(out.len(), 12);
        assert_eq!(out.last().unwrap(), "c#14");
        let mut notice = q.take_dropped_if_drained();
        notice.sort();
        assert_eq!(notice, vec![("c".into(), 2), ("d".into(), 1)]);
        assert!(q.take_dropped_if_drained().is_empty());
    }

    #[test]
    fn low_yields_from_half_the_threshold() {
        let mut q = SendQueue::new(10, Duration::ZERO);
        for seq in 1..=5 {
            q.push_event(&event("c", seq, Priority::Normal, None));
        }
        assert_eq!(
            q.push_event(&event("c", 6, Priority::Low, None)),
            Pushed::Dropped
        );
        assert_eq!(
            q.push_event(&event("c", 7, Priority::Normal, None)),
            Pushed::Queued
        );
    }

    #[test]
    fn conflation_keeps_the_newest_per_key_in_channel_order() {
        let mut q = SendQueue::new(4, Duration::ZERO);
        q.push_event(&event("c", 1, Priority::Normal, Some("p")));
        q.push_event(&event("c", 2, Priority::Normal, None));
        assert_eq!(
            q.push_event(&event("c", 3, Priority::Normal, Some("p"))),
            Pushed::Conflated
        );
        assert_eq!(
            q.push_event(&event("c", 4, Priority::Normal, Some("q"))),
            Pushed::Queued
        );
        assert_eq!(
            q.push_event(&event("c", 5, Priority::Normal, Some("p"))),
            Pushed::Conflated
        );
        assert_eq!(
            q.push_event(&event("d", 1, Priority::Normal, Some("p"))),
            Pushed::Queued
        );
        assert_eq!(drain(&mut q), vec!["c#2", "c#4", "c#5", "d#1"]);
    }

    #[test]
    fn rate_limits_hold_back_expire_and_let_critical_through() {
        let mut q = SendQueue::new(100, Duration::ZERO);
        let t0 = Instant::now();
        let mut conn = Bucket::new(2); // 2 per second, burst 2
        let ttl = Duration::from_secs(5);
        for seq in 1..=4 {
            q.push_event(&event("c", seq, Priority::Normal, None));
        }
        let mut next = |q: &mut SendQueue, now| out(q.next(now, ttl, &mut [&mut conn]));
        assert_eq!(next(&mut q, t0), Out::Frame("c#1".into()));
        assert_eq!(next(&mut q, t0), Out::Frame("c#2".into()));
        let Out::Blocked(wait) = next(&mut q, t0) else {
            panic!("rate limit")
        };
        assert!(wait <= Duration::from_millis(501), "{wait:?}");
        assert_eq!(next(&mut q, t0 + wait), Out::Frame("c#3".into()));
        // seq 4 outlives its TTL while it waits: dropped and counted.
        assert_eq!(next(&mut q, t0 + Duration::from_secs(6)), Out::Empty);
        assert_eq!(q.take_dropped_if_drained(), vec![("c".into(), 1)]);
        // Critical events need no token: three at once from a bucket allowing one per second.
        let mut q = SendQueue::new(100, Duration::ZERO);
        let mut one = Bucket::new(1);
        for seq in 1..=3 {
            q.push_event(&event("k", seq, Priority::Critical, None));
        }
        q.push_event(&event("k", 4, Priority::Normal, None));
        q.push_event(&event("k", 5, Priority::Normal, None));
        let now = Instant::now();
        for seq in 1..=4 {
            let got = out(q.next(now, ttl, &mut [&mut one]));
            assert_eq!(got, Out::Frame(format!("k#{seq}")));
        }
        assert!(matches!(
            out(q.next(now, ttl, &mut [&mut one])),
            Out::Blocked(_)
        ));
    }

    #[test]
    fn keyed_events_leave_at_most_once_per_interval_with_the_newest_value() {
        let mut q = SendQueue::new(100, Duration::from_millis(100));
        let t0 = Instant::now();
        let ttl = Duration::from_secs(5);
        let next = |q: &mut SendQueue, now| out(q.next(now, ttl, &mut []));
        q.push_event(&event("p", 1, Priority::Normal, Some("k")));
        assert_eq!(next(&mut q, t0), Out::Frame("p#1".into()));
        // Within the interval: 2 waits, 3 replaces it; another channel is not held back.
        q.push_event(&event("p", 2, Priority::Normal, Some("k")));
        q.push_event(&event("o", 1, Priority::Normal, None));
        assert_eq!(next(&mut q, t0), Out::Frame("o#1".into()));
        assert!(matches!(next(&mut q, t0), Out::Blocked(w) if w <= Duration::from_millis(100)));
        assert_eq!(
            q.push_event(&event("p", 3, Priority::Normal, Some("k"))),
            Pushed::Conflated
        );
        // A plain event of the held channel waits behind it (order holds).
        q.push_event(&event("p", 4, Priority::Normal, None));
        assert!(matches!(
            next(&mut q, t0 + Duration::from_millis(50)),
            Out::Blocked(_)
        ));
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(next(&mut q, t1), Out::Frame("p#3".into()));
        assert_eq!(next(&mut q, t1), Out::Frame("p#4".into()));
        assert_eq!(next(&mut q, t1), Out::Empty);
    }

    #[test]
    fn controls_are_never_dropped() {
        let mut q = SendQueue::new(2, Duration::ZERO);
        for i in 0..10 {
            q.push_control(Bytes::from(format!("ctl{i}")));
        }
        q.push_control_front(Bytes::from_static(b"welcome"));
        assert_eq!(q.len(), 11);
        assert_eq!(q.pop_front().unwrap(), Bytes::from_static(b"welcome"));
    }
}
