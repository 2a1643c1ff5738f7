//! The owner core's side of its channels: seq assignment, replay rings and interest.
//!
//! Invariant: seq rises by one per published message per channel and only the owner core
//! assigns it; `interest[core]` counts that core's subscriptions (pending or active) to the
//! channel, so a delivery goes only to cores that asked for it. Subscribe, unsubscribe and
//! delivery messages between one pair of cores travel in FIFO order, which is what makes the
//! counts and the replay/live hand-over exact.
//!
//! A channel with no history left and no subscribers has no state: it is freed when its last
//! ring entry ages out, its last subscriber leaves or its ephemeral message has been sent. Its
//! seq is not forgotten: `freed_seq` keeps, per hash slot, the highest last seq of the channels
//! freed there, and a channel created again continues above it, with everything up to there
//! counted as lost. So within one epoch a channel's seq never goes back, a position from an
//! earlier life resumes exactly when nothing was missed and gets `recovered:false` otherwise,
//! and two names sharing a slot cost at most a jump in seq (a spurious `recovered:false`),
//! never a wrong replay.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use super::progress::Progress;
use super::ring::{Replay, Ring, RingBounds};
use super::{Delivery, Publication};
use crate::proto::msg;

mod cluster;
pub use cluster::{Answer, Outcome, ReadRequest, Subscribed};

/// Slots of the freed-seq table (a power of two): 256 KiB per core.
const FREED_SLOTS: usize = 1 << 15;

/// Below this many slots the channel map is never shrunk.
const MIN_CAPACITY: usize = 1024;

/// Where a subscriber wants to resume from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Live messages only.
    Live,
    /// Everything after this seq, from the same epoch.
    After(u64),
    /// The client's position is from another epoch: history may have been lost.
    OtherEpoch,
    /// Whatever the channel's history still holds (a channel's state is made of it):
    /// `recovered` is false, and nothing is promised about what is no longer held.
    Held,
}

/// The owner's answer to a subscribe: the channel's seq at that moment and what to replay.
/// Every later delivery to the subscribing core has a higher seq.
#[derive(Debug)]
pub struct SubscribeAck {
    pub last_seq: u64,
    /// `None` when no resume was asked for.
    pub replay: Option<Replay>,
}

#[derive(Debug)]
struct ChannelState {
    last_seq: u64,
    ring: Ring,
    interest: Box<[u32]>,
    /// Has an entry in `expiry`; such a state is freed only when that entry comes due.
    queued: bool,
    /// Cluster mode: the seq the channel's life in Redis started after (0: not known yet).
    life: u64,
    /// Cluster mode: what waits for a read from Redis (a gap being filled, resumes).
    fill: Option<Box<cluster::Fill>>,
    /// Cluster mode: this node receives the channel's messages from Redis (always, unless
    /// each channel is subscribed on its own: then only after a read, which subscribes first).
    listening: bool,
}

impl ChannelState {
    fn idle(&self) -> bool {
        !self.queued
            && self.fill.is_none()
            && self.ring.is_empty()
            && self.interest.iter().all(|&n| n == 0)
    }
}

/// When a queued channel's oldest ring entry ages out (Unix ms).
type Due = super::deadline::Due<u64, Arc<str>>;

/// All channels one core owns.
#[derive(Debug)]
pub struct Sequencer {
    cores: usize,
    bounds: RingBounds,
    channels: HashMap<Arc<str>, ChannelState>,
    /// One entry per queued channel, soonest first, so an eviction pass touches only channels
    /// whose history is due, not every channel.
    expiry: BinaryHeap<Reverse<Due>>,
    /// Per slot of a channel name's hash: the highest last seq of a channel freed there.
    freed_seq: Box<[u64]>,
    slot_hasher: RandomState,
    progress: Progress,
    /// Seqs come from Redis: a channel's state starts unknown, not from `freed_seq`.
    cluster: bool,
    /// Each channel is subscribed in Redis on its own (a Redis Cluster's sharded Pub/Sub):
    /// channels forgotten here are listed in `freed`, for the node to unsubscribe.
    sharded: bool,
    freed: Vec<Arc<str>>,
    /// The id of the last read of a channel's stream asked for.
    next_read: u64,
}

impl Sequencer {
    pub fn new(cores: usize, bounds: RingBounds) -> Self {
        Sequencer {
            cores,
            bounds,
            channels: HashMap::new(),
            expiry: BinaryHeap::new(),
            freed_seq: vec![0; FREED_SLOTS].into_boxed_slice(),
            slot_hasher: RandomState::new(),
            progress: Progress::default(),
            cluster: false,
            sharded: false,
            freed: Vec::new(),
            next_read: 0,
        }
    }

    /// A sequencer for cluster mode: Redis assigns the seqs (see `apply`). `sharded`: each
    /// channel is subscribed in Redis on its own.
    pub fn for_cluster(cores: usize, bounds: RingBounds, sharded: bool) -> Self {
        Sequencer {
            cluster: true,
            sharded,
            freed_seq: Box::new([]),
            ..Sequencer::new(cores, bounds)
        }
    }

    /// Channels forgotten since the last call (sharded cluster mode: to unsubscribe).
    pub fn take_freed(&mut self) -> Vec<Arc<str>> {
        std::mem::take(&mut self.freed)
    }

    fn slot(&self, channel: &str) -> usize {
        self.slot_hasher.hash_one(channel) as usize & (FREED_SLOTS - 1)
    }

    fn state(&mut self, channel: &Arc<str>) -> &mut ChannelState {
        if !self.channels.contains_key(channel) {
            let after = if self.cluster {
                0
            } else {
                self.freed_seq[self.slot(channel)]
            };
            let state = ChannelState {
                last_seq: after,
                ring: Ring::continuing(self.bounds, after),
                interest: vec![0; self.cores].into_boxed_slice(),
                queued: false,
                life: 0,
                fill: None,
                listening: !self.sharded,
            };
            self.channels.insert(channel.clone(), state);
        }
        self.channels.get_mut(channel).expect("inserted above")
    }

    /// Forgets the channel's state if it has no history and no subscribers, remembering its
    /// seq in the freed-seq table.
    fn free_if_idle(&mut self, channel: &str) {
        let Some(state) = self.channels.get(channel) else {
            return;
        };
        if state.idle() {
            let last_seq = state.last_seq;
            if let Some((name, _)) = self.channels.remove_entry(channel) {
                if self.sharded {
                    self.freed.push(name);
                }
            }
            if !self.cluster {
                let slot = self.slot(channel);
                self.freed_seq[slot] = self.freed_seq[slot].max(last_seq);
            }
        }
    }

    /// Sequences one message: assigns its seq, builds its frame once and keeps it for replay
    /// unless ephemeral. Calls `to_core` for every core with subscribers of the channel.
    pub fn publish(
        &mut self,
        p: Publication,
        now_ms: u64,
        mut to_core: impl FnMut(usize, &Arc<Delivery>),
    ) -> u64 {
        // Progress events that ask for it gain a server-computed ETA (docs/events.md); all
        // other data passes exactly as sent.
        let annotated = self.annotation(&p, now_ms);
        let channel = p.channel.clone();
        let state = self.state(&channel);
        let seq = state.last_seq + 1;
        let delivery = delivery(p, annotated.as_deref(), seq, now_ms);
        self.keep_and_send(&channel, delivery, now_ms, &mut to_core);
        seq
    }

    /// Makes `delivery` the channel's latest message: sends it to every core with
    /// subscribers and keeps it for replay unless it is ephemeral.
    fn keep_and_send(
        &mut self,
        channel: &Arc<str>,
        delivery: (Arc<Delivery>, bool),
        at_ms: u64,
        to_core: &mut impl FnMut(usize, &Arc<Delivery>),
    ) {
        let (delivery, ephemeral) = delivery;
        let state = self.state(channel);
        state.last_seq = delivery.seq;
        for (core, &n) in state.interest.iter().enumerate() {
            if n > 0 {
                to_core(core, &delivery);
            }
        }
        if ephemeral {
            self.free_if_idle(channel);
        } else {
            state.ring.push(delivery, at_ms);
            if !state.queued {
                state.queued = true;
                let at_ms = state.ring.expires_at_ms().expect("just pushed");
                self.expiry.push(Reverse(Due {
                    at: at_ms,
                    item: channel.clone(),
                }));
            }
        }
    }

    /// The progress event's data with its server-computed ETA, if it asked for one.
    fn annotation(&mut self, p: &Publication, now_ms: u64) -> Option<String> {
        p.compute_eta
            .then(|| {
                let key = p.coalesce_key.as_deref().unwrap_or(&p.channel);
                self.progress.annotate(key, &p.data, now_ms)
            })
            .flatten()
    }

    /// The same, written into the publication (for a message another store sequences).
    pub fn annotate(&mut self, p: &mut Publication, now_ms: u64) {
        if let Some(data) = self.annotation(p, now_ms) {
            p.data = data.into();
        }
        p.compute_eta = false;
    }

    /// Registers one subscription from `core` and answers with the hand-over point.
    pub fn subscribe(
        &mut self,
        channel: &Arc<str>,
        core: usize,
        resume: Resume,
        now_ms: u64,
    ) -> SubscribeAck {
        let state = self.state(channel);
        state.interest[core] += 1;
        let last_seq = state.last_seq;
        let replay = match resume {
            Resume::Live => None,
            Resume::After(since) => Some(state.ring.replay(since, last_seq, now_ms)),
            Resume::OtherEpoch => Some(Replay::default()),
            Resume::Held => Some(state.ring.held(now_ms)),
        };
        SubscribeAck { last_seq, replay }
    }

    /// Drops one subscription of `core`; a channel left with no history is freed.
    pub fn unsubscribe(&mut self, channel: &str, core: usize) {
        if let Some(state) = self.channels.get_mut(channel) {
            state.interest[core] = state.interest[core].saturating_sub(1);
            self.free_if_idle(channel);
        }
    }

    /// Channels this core keeps state for.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// The channel's latest seq (0 before the first message; for a freed channel, where it
    /// would go on from).
    pub fn last_seq(&self, channel: &str) -> u64 {
        match self.channels.get(channel) {
            Some(s) => s.last_seq,
            None if self.cluster => 0,
            None => self.freed_seq[self.slot(channel)],
        }
    }

    /// Ages out the replay entries that are due and frees the channels left idle (call now and
    /// then, not per message). Touches only channels whose oldest entry is due, at most
    /// `budget` of them (a million names expiring together need not stall the core at once);
    /// returns whether more are due.
    pub fn evict(&mut self, now_ms: u64, budget: usize) -> bool {
        for _ in 0..budget {
            match self.expiry.peek() {
                Some(Reverse(due)) if due.at <= now_ms => {}
                _ => break,
            }
            let Reverse(Due { item: channel, .. }) = self.expiry.pop().expect("peeked");
            let Some(state) = self.channels.get_mut(&channel) else {
                continue;
            };
            state.ring.evict(now_ms);
            match state.ring.expires_at_ms() {
                Some(at_ms) => self.expiry.push(Reverse(Due {
                    at: at_ms,
                    item: channel,
                })),
                None => {
                    state.queued = false;
                    self.free_if_idle(&channel);
                }
            }
        }
        if self
            .expiry
            .peek()
            .is_some_and(|Reverse(due)| due.at <= now_ms)
        {
            return true;
        }
        // Capacity never shrinks by itself: give back the space of a mostly empty map.
        if self.channels.capacity() > MIN_CAPACITY.max(4 * self.channels.len()) {
            self.channels.shrink_to(2 * self.channels.len());
        }
        if self.expiry.capacity() > MIN_CAPACITY.max(4 * self.expiry.len()) {
            self.expiry.shrink_to(2 * self.expiry.len());
        }
        false
    }
}

/// The message as subscribers get it (its frame built here, once), and whether it is
/// ephemeral. `data` replaces the publisher's data when given (an annotated progress event).
fn delivery(p: Publication, data: Option<&str>, seq: u64, ts: u64) -> (Arc<Delivery>, bool) {
    let frame = msg::event_frame(&p.channel, seq, &p.event, ts, data.unwrap_or(&p.data));
    let delivery = Delivery {
        channel: p.channel,
        seq,
        frame,
        project_id: p.project_id,
        user_id: p.user_id,
        agent_id: p.agent_id,
        event: p.event,
        priority: p.priority,
        coalesce_key: p.coalesce_key,
        ttl: p.ttl,
        twins: Default::default(),
    };
    (Arc::new(delivery), p.ephemeral)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publication(channel: &str, ephemeral: bool) -> Publication {
        Publication {
            ephemeral,
            ..Publication::new(channel.into(), "e", "{}")
        }
    }

    #[test]
    fn seq_rises_by_one_per_channel() {
        let mut s = Sequencer::new(2, RingBounds::default());
        assert_eq!(s.publish(publication("a", false), 0, |_, _| {}), 1);
        assert_eq!(s.publish(publication("a", false), 0, |_, _| {}), 2);
        assert_eq!(s.publish(publication("b", false), 0, |_, _| {}), 1);
        assert_eq!(s.publish(publication("a", true), 0, |_, _| {}), 3);
        assert_eq!(s.last_seq("a"), 3);
    }

    #[test]
    fn deliveries_go_only_to_interested_cores() {
        let mut s = Sequencer::new(3, RingBounds::default());
        let ch: Arc<str> = "a".into();
        let mut hit = vec![];
        s.publish(publication("a", false), 0, |c, _| hit.push(c));
        assert!(hit.is_empty());
        s.subscribe(&ch, 2, Resume::Live, 0);
        s.subscribe(&ch, 2, Resume::Live, 0);
        s.subscribe(&ch, 0, Resume::Live, 0);
        s.publish(publication("a", false), 0, |c, _| hit.push(c));
        assert_eq!(hit, vec![0, 2]);
        s.unsubscribe("a", 2);
        s.unsubscribe("a", 0);
        hit.clear();
        assert_eq!(s.channel_count(), 1, "a has history: kept");
        s.publish(publication("a", false), 0, |c, _| hit.push(c));
        assert_eq!(hit, vec![2]);
    }

    #[test]
    fn channels_without_history_or_subscribers_are_forgotten() {
        let mut s = Sequencer::new(2, RingBounds::default());
        for i in 0..100 {
            let ch: Arc<str> = format!("c{i}").into();
            s.subscribe(&ch, 1, Resume::Live, 0);
            s.subscribe(&ch, 0, Resume::Live, 0);
            s.unsubscribe(&ch, 1);
            s.unsubscribe(&ch, 0);
        }
        assert_eq!(s.channel_count(), 0);
    }

    #[test]
    fn frame_is_built_once_and_shared() {
        let mut s = Sequencer::new(2, RingBounds::default());
        let ch: Arc<str> = "a".into();
        s.subscribe(&ch, 0, Resume::Live, 0);
        s.subscribe(&ch, 1, Resume::Live, 0);
        let mut frames = vec![];
        s.publish(publication("a", false), 0, |_, d| {
            frames.push(d.frame.clone())
        });
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].as_ptr(), frames[1].as_ptr());
        let ack = s.subscribe(&ch, 0, Resume::After(0), 0);
        assert_eq!(
            ack.replay.unwrap().deliveries[0].frame.as_ptr(),
            frames[0].as_ptr()
        );
    }

    #[test]
    fn resume_hands_over_at_last_seq() {
        let mut s = Sequencer::new(1, RingBounds::default());
        let ch: Arc<str> = "a".into();
        for _ in 0..5 {
            s.publish(publication("a", false), 0, |_, _| {});
        }
        s.publish(publication("a", true), 0, |_, _| {});
        let ack = s.subscribe(&ch, 0, Resume::After(2), 0);
        assert_eq!(ack.last_seq, 6);
        let replay = ack.replay.unwrap();
        assert!(replay.recovered);
        let seqs: Vec<u64> = replay.deliveries.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        let other = s.subscribe(&ch, 0, Resume::OtherEpoch, 0).replay.unwrap();
        assert!(!other.recovered && other.deliveries.is_empty());
        assert!(s.subscribe(&ch, 0, Resume::Live, 0).replay.is_none());
    }

    fn bounds(max_age_ms: u64) -> RingBounds {
        RingBounds {
            max_messages: 100,
            max_age_ms,
        }
    }

    #[test]
    fn a_channel_is_freed_once_its_history_ages_out_and_goes_on_from_its_seq() {
        let mut s = Sequencer::new(2, bounds(1000));
        s.publish(publication("a", false), 0, |_, _| {});
        s.publish(publication("a", false), 400, |_, _| {});
        s.evict(1000, usize::MAX);
        assert_eq!(s.channel_count(), 1, "history left");
        s.evict(1001, usize::MAX);
        assert_eq!(s.channel_count(), 1, "seq 2 is still young");
        s.evict(1401, usize::MAX);
        assert_eq!(s.channel_count(), 0);
        assert_eq!(s.publish(publication("a", false), 2000, |_, _| {}), 3);
    }

    #[test]
    fn an_ephemeral_only_channel_is_freed_at_once() {
        let mut s = Sequencer::new(2, bounds(1000));
        for seq in 1..=3 {
            assert_eq!(
                s.publish(publication("terminal:t", true), 0, |_, _| {}),
                seq
            );
            assert_eq!(s.channel_count(), 0);
        }
        assert!(s.expiry.is_empty());
    }

    #[test]
    fn a_channel_with_a_subscriber_is_never_freed() {
        let mut s = Sequencer::new(2, bounds(1000));
        let ch: Arc<str> = "terminal:t".into();
        s.subscribe(&ch, 1, Resume::Live, 0);
        let mut hit = 0;
        s.publish(publication("terminal:t", true), 0, |_, _| hit += 1);
        s.publish(publication("terminal:t", false), 0, |_, _| hit += 1);
        s.evict(10_000, usize::MAX);
        assert_eq!((s.channel_count(), hit), (1, 2));
        s.unsubscribe("terminal:t", 1);
        assert_eq!(s.channel_count(), 0);
        assert_eq!(s.last_seq("terminal:t"), 2);
    }

    #[test]
    fn a_resume_across_freed_state_is_exact_or_not_recovered() {
        let mut s = Sequencer::new(1, bounds(1000));
        let ch: Arc<str> = "req:1".into();
        for _ in 0..3 {
            s.publish(publication("req:1", false), 0, |_, _| {});
        }
        s.evict(5000, usize::MAX);
        assert_eq!(s.channel_count(), 0);
        assert_eq!(s.publish(publication("req:1", false), 6000, |_, _| {}), 4);
        s.publish(publication("req:1", false), 6000, |_, _| {});
        // Seq 3 is gone for a client at 2: it reloads rather than miss it.
        let behind = s.subscribe(&ch, 0, Resume::After(2), 6000);
        let replay = behind.replay.unwrap();
        assert!(!replay.recovered && replay.deliveries.is_empty());
        // A client that had all of the first life gets exactly the second.
        let current = s.subscribe(&ch, 0, Resume::After(3), 6000);
        assert_eq!(current.last_seq, 5);
        let replay = current.replay.unwrap();
        assert!(replay.recovered);
        let seqs: Vec<u64> = replay.deliveries.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, vec![4, 5]);
    }

    #[test]
    fn names_sharing_a_slot_never_resume_wrongly() {
        // Four names per slot on average: the table may remember too much, never too little.
        let mut s = Sequencer::new(1, bounds(1000));
        let names: Vec<Arc<str>> = (0..4 * FREED_SLOTS)
            .map(|i| format!("req:{i}").into())
            .collect();
        for (i, name) in names.iter().enumerate() {
            for _ in 0..1 + i % 5 {
                s.publish(Publication::new(name.clone(), "e", "1"), 0, |_, _| {});
            }
        }
        s.evict(5000, usize::MAX);
        assert_eq!(s.channel_count(), 0);
        let mut jumped = 0;
        for (i, name) in names.iter().enumerate() {
            let first_life = 1 + (i % 5) as u64;
            let seq = s.publish(Publication::new(name.clone(), "e", "1"), 6000, |_, _| {});
            assert!(seq > first_life, "{name}: {seq} after {first_life}");
            jumped += usize::from(seq > first_life + 1);
            let before_end = s.subscribe(name, 0, Resume::After(first_life - 1), 6000);
            assert!(!before_end.replay.unwrap().recovered, "{name}");
            let at_end = s.subscribe(name, 0, Resume::After(first_life), 6000);
            let replay = at_end.replay.unwrap();
            if replay.recovered {
                assert_eq!(
                    seq,
                    first_life + 1,
                    "{name}: recovered only when contiguous"
                );
                assert_eq!(replay.deliveries.len(), 1);
            }
        }
        assert!(jumped > 0, "the test saw no shared slot");
        assert!(
            jumped < names.len() * 9 / 10,
            "{jumped} of {} jumped",
            names.len()
        );
    }

    #[test]
    fn eviction_visits_only_channels_with_history_and_the_map_shrinks() {
        let mut s = Sequencer::new(2, bounds(1000));
        let quiet: Vec<Arc<str>> = (0..5000).map(|i| format!("q:{i}").into()).collect();
        for ch in &quiet {
            s.subscribe(ch, 0, Resume::Live, 0);
        }
        for _ in 0..10 {
            s.publish(publication("busy", false), 0, |_, _| {});
        }
        assert_eq!(s.expiry.len(), 1, "one entry per channel with history");
        for ch in &quiet {
            s.unsubscribe(ch, 0);
        }
        let grown = s.channels.capacity();
        assert!(!s.evict(5000, usize::MAX));
        assert_eq!((s.channel_count(), s.expiry.len()), (0, 0));
        assert!(
            s.channels.capacity() < grown / 4,
            "{grown} → {}",
            s.channels.capacity()
        );
    }

    #[test]
    fn an_eviction_pass_stops_at_its_budget() {
        let mut s = Sequencer::new(1, bounds(1000));
        for i in 0..5 {
            s.publish(publication(&format!("c{i}"), false), 0, |_, _| {});
        }
        assert!(s.evict(5000, 3), "more are due");
        assert_eq!(s.channel_count(), 2);
        assert!(!s.evict(5000, 3));
        assert_eq!(s.channel_count(), 0);
        assert!(!s.evict(5000, 3), "nothing due");
    }
}
