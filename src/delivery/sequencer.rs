//! The owner core's side of its channels: seq assignment, replay rings and interest.
//!
//! Invariant: seq rises by exactly one per published message per channel and only the owner
//! core assigns it; `interest[core]` counts that core's subscriptions (pending or active) to
//! the channel, so a delivery goes only to cores that asked for it. Subscribe, unsubscribe and
//! delivery messages between one pair of cores travel in FIFO order, which is what makes the
//! counts and the replay/live hand-over exact.

use std::collections::HashMap;
use std::sync::Arc;

use super::progress::Progress;
use super::ring::{Replay, Ring, RingBounds};
use super::{Delivery, Publication};
use crate::proto::msg;

/// Where a subscriber wants to resume from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Live messages only.
    Live,
    /// Everything after this seq, from the same epoch.
    After(u64),
    /// The client's position is from another epoch: history may have been lost.
    OtherEpoch,
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
    interest: Vec<u32>,
}

/// All channels one core owns.
#[derive(Debug)]
pub struct Sequencer {
    cores: usize,
    bounds: RingBounds,
    channels: HashMap<Arc<str>, ChannelState>,
    progress: Progress,
}

impl Sequencer {
    pub fn new(cores: usize, bounds: RingBounds) -> Self {
        Sequencer {
            cores,
            bounds,
            channels: HashMap::new(),
            progress: Progress::default(),
        }
    }

    fn state(&mut self, channel: &Arc<str>) -> &mut ChannelState {
        if !self.channels.contains_key(channel) {
            let state = ChannelState {
                last_seq: 0,
                ring: Ring::new(self.bounds),
                interest: vec![0; self.cores],
            };
            self.channels.insert(channel.clone(), state);
        }
        self.channels.get_mut(channel).expect("inserted above")
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
        let annotated = p
            .compute_eta
            .then(|| {
                let key = p.coalesce_key.as_deref().unwrap_or(&p.channel);
                self.progress.annotate(key, &p.data, now_ms)
            })
            .flatten();
        let data = annotated.as_deref().unwrap_or(&p.data);
        let state = self.state(&p.channel);
        state.last_seq += 1;
        let seq = state.last_seq;
        let frame = msg::event_frame(&p.channel, seq, &p.event, now_ms, data);
        let delivery = Arc::new(Delivery {
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
        });
        for (core, &n) in state.interest.iter().enumerate() {
            if n > 0 {
                to_core(core, &delivery);
            }
        }
        if !p.ephemeral {
            state.ring.push(delivery, now_ms);
        }
        seq
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
        };
        SubscribeAck { last_seq, replay }
    }

    /// Drops one subscription of `core`. A channel nobody subscribes to and nobody ever
    /// published to is forgotten, so subscribe/unsubscribe churn leaves nothing behind. (A
    /// channel with history keeps its seq: restarting it at 1 in the same epoch would make an
    /// old position look recoverable.)
    pub fn unsubscribe(&mut self, channel: &str, core: usize) {
        if let Some(state) = self.channels.get_mut(channel) {
            state.interest[core] = state.interest[core].saturating_sub(1);
            if state.last_seq == 0 && state.interest.iter().all(|&n| n == 0) {
                self.channels.remove(channel);
            }
        }
    }

    /// Channels this core keeps state for.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// The channel's latest seq (0 before the first message).
    pub fn last_seq(&self, channel: &str) -> u64 {
        self.channels.get(channel).map_or(0, |s| s.last_seq)
    }

    /// Ages out old replay entries of every channel (call now and then, not per message).
    pub fn evict(&mut self, now_ms: u64) {
        for state in self.channels.values_mut() {
            state.ring.evict(now_ms);
        }
    }
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
}
