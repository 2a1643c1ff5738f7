//! The owner core's side of a channel in cluster mode: Redis assigns the seqs, this node
//! receives every batch over Pub/Sub and delivers each channel in seq order, exactly once.
//!
//! Invariant: `last_seq` is the highest seq this node has delivered for the channel, in the
//! life `life`. A batch continuing it is delivered; an older seq is a duplicate and dropped; a
//! newer one means this node missed messages (its Pub/Sub connection was away): live entries
//! wait in `Fill` while the gap is read from the channel's stream, then both go out in order.
//! A resume the ring cannot answer exactly waits for its own read, and its answer hands over
//! at `last_seq` like any other (replay up to it, live after it), so the seam has no gap and
//! no duplicate.

use std::sync::Arc;

use super::{delivery, Resume, Sequencer, SubscribeAck};
use crate::cluster::wire::{Batch, Read};
use crate::delivery::ring::{Replay, Ring};
use crate::delivery::Delivery;

/// The `since` of a live subscription waiting to learn the channel's seq from Redis: a read
/// after it returns the channel's life and last seq and no entries (seqs are far below it).
pub const LIVE: u64 = u64::MAX / 2;

/// What waits on a channel for reads from Redis.
#[derive(Debug, Default)]
pub struct Fill {
    /// A gap is being read: live deliveries wait in `held`.
    gap: bool,
    /// Each with whether it is ephemeral and its publish time.
    held: Vec<(Arc<Delivery>, bool, u64)>,
    waiters: Vec<Waiter>,
    /// Positions whose reads are in flight.
    reads: Vec<u64>,
}

/// A subscription waiting for its replay from Redis.
#[derive(Debug, Clone, Copy)]
struct Waiter {
    core: usize,
    conn: u64,
    sub: u64,
    since: u64,
}

/// The answer to one waiting subscription: send `ack` to `core`.
#[derive(Debug)]
pub struct Answer {
    pub core: usize,
    pub conn: u64,
    pub sub: u64,
    pub ack: SubscribeAck,
}

/// How a subscription in cluster mode is answered.
#[derive(Debug)]
pub enum Subscribed {
    /// At once, from what this node holds.
    Now(SubscribeAck),
    /// After a read of the channel's stream after this position (`None`: one already in flight).
    Later(Option<u64>),
}

impl Sequencer {
    /// Delivers one batch from Redis; returns the position to read the channel's stream after
    /// when the batch shows that this node missed messages.
    pub fn apply(
        &mut self,
        batch: Batch,
        mut to_core: impl FnMut(usize, &Arc<Delivery>),
    ) -> Option<u64> {
        let Batch {
            channel,
            life,
            first,
            entries,
        } = batch;
        let bounds = self.bounds;
        let mut read = None;
        for (i, entry) in entries.into_iter().enumerate() {
            let seq = first + i as u64;
            let state = self.state(&channel);
            if state.life != life {
                // The first message this node sees of the channel starts its view (so does
                // one after the state was forgotten); a new life means the history this node
                // holds is gone from Redis.
                let known = state.life != 0;
                state.life = life;
                state.last_seq = if known { life } else { seq - 1 };
                state.ring = Ring::continuing(bounds, state.last_seq);
            }
            let held = state.fill.as_ref().is_some_and(|f| f.gap);
            if !held && seq <= state.last_seq {
                continue; // a duplicate
            }
            let (p, ts) = entry.into_publication(channel.clone());
            let (d, ephemeral) = delivery(p, None, seq, ts);
            if !held && seq == state.last_seq + 1 {
                self.keep_and_send(&channel, (d, ephemeral), ts, &mut to_core);
                continue;
            }
            let after = state.last_seq;
            let fill = state.fill.get_or_insert_with(Default::default);
            if !fill.gap {
                fill.gap = true;
                if !fill.reads.contains(&after) {
                    fill.reads.push(after);
                    read = Some(after);
                }
            }
            fill.held.push((d, ephemeral, ts));
        }
        read
    }

    /// Registers one subscription from `core` (as `subscribe` does) and answers it at once
    /// when this node's ring holds everything after the position, else after a read.
    pub fn subscribe_cluster(
        &mut self,
        channel: &Arc<str>,
        waiter: (usize, u64, u64),
        resume: Resume,
        now_ms: u64,
    ) -> Subscribed {
        let (core, conn, sub) = waiter;
        let state = self.state(channel);
        state.interest[core] += 1;
        let last_seq = state.last_seq;
        let since = match resume {
            // A channel this node has not seen yet: its seq comes from Redis, so that
            // `subscribed` names a position the client can resume from.
            Resume::Live if state.life == 0 || !state.listening => LIVE,
            Resume::Live => {
                return Subscribed::Now(SubscribeAck {
                    last_seq,
                    replay: None,
                })
            }
            Resume::OtherEpoch => {
                return Subscribed::Now(SubscribeAck {
                    last_seq,
                    replay: Some(Replay::default()),
                })
            }
            // No seq is that high (they are Redis's clock in µs): a position from elsewhere.
            Resume::After(since) if since >= LIVE => {
                return Subscribed::Now(SubscribeAck {
                    last_seq,
                    replay: Some(Replay::default()),
                })
            }
            // Position 0 (the channel had no messages): from the start of its current life.
            Resume::After(0) if state.life != 0 => state.life,
            Resume::After(since) => since,
        };
        if since != LIVE && state.fill.is_none() && state.life != 0 && state.listening {
            if since < state.life {
                // From an earlier life of the channel: that history is gone.
                return Subscribed::Now(SubscribeAck {
                    last_seq,
                    replay: Some(Replay::default()),
                });
            }
            let replay = state.ring.replay(since, last_seq, now_ms);
            if replay.recovered {
                return Subscribed::Now(SubscribeAck {
                    last_seq,
                    replay: Some(replay),
                });
            }
        }
        let fill = state.fill.get_or_insert_with(Default::default);
        fill.waiters.push(Waiter {
            core,
            conn,
            sub,
            since,
        });
        if fill.reads.contains(&since) {
            return Subscribed::Later(None);
        }
        fill.reads.push(since);
        Subscribed::Later(Some(since))
    }

    /// Takes the answer of a read of `channel`'s stream after `after` (`None`: Redis did not
    /// answer): fills the gap it covers, answers the subscriptions waiting for it, and lets
    /// held deliveries go. Messages Redis no longer has are skipped (a jump in seq); waiting
    /// resumes then get `recovered:false`.
    pub fn on_read(
        &mut self,
        channel: &Arc<str>,
        after: u64,
        read: Option<Read>,
        now_ms: u64,
        mut to_core: impl FnMut(usize, &Arc<Delivery>),
    ) -> Vec<Answer> {
        let bounds = self.bounds;
        let Some(state) = self.channels.get_mut(channel) else {
            return Vec::new();
        };
        let Some(fill) = state.fill.as_mut() else {
            return Vec::new();
        };
        fill.reads.retain(|&a| a != after);
        // Every read subscribes the channel first where channels are subscribed one by one.
        state.listening = true;
        let read = read.filter(|r| r.life != 0);
        // The stored entries, each made a delivery once (for the gap and for replays).
        let stored: Vec<(Arc<Delivery>, u64)> = read
            .iter()
            .flat_map(|r| &r.entries)
            .map(|s| {
                let (p, ts) = s.entry.clone().into_publication(channel.clone());
                (delivery(p, None, s.seq, ts).0, ts)
            })
            .collect();
        let mut fills_gap = fill.gap && after <= state.last_seq;
        if let Some(r) = &read {
            if state.life != r.life {
                // Unknown so far: take Redis's view. A new life: what this node holds is gone
                // from Redis, and the new life's messages are delivered from its start.
                let known = state.life != 0;
                state.life = r.life;
                state.last_seq = if known { r.life } else { r.last };
                state.ring = Ring::continuing(bounds, state.last_seq);
                fills_gap |= known;
            }
        }
        if fills_gap {
            let fill = state.fill.as_mut().expect("present above");
            fill.gap = false;
            let held = std::mem::take(&mut fill.held);
            for (d, ts) in &stored {
                if d.seq > self.channels[channel].last_seq {
                    self.keep_and_send(channel, (d.clone(), false), *ts, &mut to_core);
                }
            }
            for (d, ephemeral, ts) in held {
                if d.seq > self.channels[channel].last_seq {
                    self.keep_and_send(channel, (d, ephemeral), ts, &mut to_core);
                }
            }
        }
        let state = self.channels.get_mut(channel).expect("present above");
        let last_seq = state.last_seq;
        let fill = state.fill.as_mut().expect("present above");
        let (ready, waiting): (Vec<Waiter>, Vec<Waiter>) =
            fill.waiters.iter().partition(|w| w.since == after);
        fill.waiters = waiting;
        if !fill.gap && fill.waiters.is_empty() && fill.reads.is_empty() {
            state.fill = None;
        }
        let oldest_ms = now_ms.saturating_sub(bounds.max_age_ms);
        let ring = &mut state.ring;
        ready
            .into_iter()
            .map(|w| {
                let replay = match &read {
                    _ if w.since == LIVE => None,
                    Some(r) => {
                        // Redis's entries up to what this node has delivered, then the ring's
                        // after them; later ones reach the subscriber live.
                        let mut deliveries: Vec<Arc<Delivery>> = stored
                            .iter()
                            .filter(|(d, _)| d.seq > w.since && d.seq <= last_seq)
                            .map(|(d, _)| d.clone())
                            .collect();
                        let from = r.last.max(w.since).min(last_seq);
                        let rest = ring.replay(from, last_seq, now_ms);
                        let newest = deliveries.last().map_or(w.since, |d| d.seq);
                        deliveries.extend(rest.deliveries.into_iter().filter(|d| d.seq > newest));
                        let recovered = r.recovered(w.since, oldest_ms)
                            && (last_seq <= r.last || rest.recovered);
                        if !recovered {
                            deliveries.clear(); // as from the ring: nothing re-sent
                        }
                        Some(Replay {
                            recovered,
                            deliveries,
                        })
                    }
                    None => Some(Replay::default()),
                };
                Answer {
                    core: w.core,
                    conn: w.conn,
                    sub: w.sub,
                    ack: SubscribeAck { last_seq, replay },
                }
            })
            .collect()
    }

    /// After this node's Pub/Sub connection came back: every channel it holds may have missed
    /// messages, so each is read again after its last seq; live deliveries wait meanwhile.
    /// Returns the reads to make.
    pub fn resync(&mut self) -> Vec<(Arc<str>, u64)> {
        let mut reads = Vec::new();
        for (channel, state) in self.channels.iter_mut() {
            if state.life == 0 {
                continue;
            }
            let fill = state.fill.get_or_insert_with(Default::default);
            fill.gap = true;
            if !fill.reads.contains(&state.last_seq) {
                fill.reads.push(state.last_seq);
                reads.push((channel.clone(), state.last_seq));
            }
        }
        reads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::wire::{Entry, Stored};
    use crate::delivery::ring::RingBounds;
    use crate::delivery::Publication;

    const LIFE: u64 = 1_000;

    fn entry(ephemeral: bool) -> Entry {
        let mut p = Publication::new("c".into(), "e", "{}");
        p.ephemeral = ephemeral;
        Entry::new(p, 10)
    }

    fn batch(first: u64, n: usize) -> Batch {
        Batch {
            channel: "c".into(),
            life: LIFE,
            first,
            entries: (0..n).map(|_| entry(false)).collect(),
        }
    }

    fn stored(seqs: &[u64]) -> Vec<Stored> {
        let mut prev = LIFE;
        seqs.iter()
            .map(|&seq| {
                let s = Stored {
                    seq,
                    prev,
                    entry: entry(false),
                };
                prev = seq;
                s
            })
            .collect()
    }

    /// A sequencer with one live subscriber on core 1, and what core 1 receives.
    fn setup() -> (Sequencer, Arc<str>) {
        let mut s = Sequencer::for_cluster(2, RingBounds::default(), false);
        let ch: Arc<str> = "c".into();
        // A channel this node has not seen: its seq is asked of Redis, which has none.
        assert!(matches!(
            s.subscribe_cluster(&ch, (1, 7, 1), Resume::Live, 0),
            Subscribed::Later(Some(LIVE))
        ));
        let answers = s.on_read(&ch, LIVE, Some(Read::default()), 0, |_, _| {});
        assert!(matches!(
            &answers[..],
            [Answer {
                core: 1,
                conn: 7,
                ack: SubscribeAck {
                    last_seq: 0,
                    replay: None
                },
                ..
            }]
        ));
        (s, ch)
    }

    #[test]
    fn batches_are_delivered_in_order_and_duplicates_dropped() {
        let (mut s, _) = setup();
        let mut got = vec![];
        assert_eq!(s.apply(batch(1001, 2), |_, d| got.push(d.seq)), None);
        assert_eq!(s.apply(batch(1002, 2), |_, d| got.push(d.seq)), None);
        assert_eq!(got, vec![1001, 1002, 1003]);
        assert_eq!(s.last_seq("c"), 1003);
    }

    #[test]
    fn a_gap_holds_live_messages_until_the_stream_fills_it() {
        let (mut s, ch) = setup();
        let mut got = vec![];
        s.apply(batch(1001, 1), |_, d| got.push(d.seq));
        assert_eq!(s.apply(batch(1004, 1), |_, d| got.push(d.seq)), Some(1001));
        assert_eq!(
            s.apply(batch(1005, 1), |_, d| got.push(d.seq)),
            None,
            "one read"
        );
        assert_eq!(got, vec![1001], "held while the gap is read");
        let read = Read {
            life: LIFE,
            last: 1004,
            entries: stored(&[1001, 1002, 1004]),
        };
        let answers = s.on_read(&ch, 1001, Some(read), 20, |_, d| got.push(d.seq));
        assert!(answers.is_empty());
        // 1003 was ephemeral: gone, and not a loss.
        assert_eq!(got, vec![1001, 1002, 1004, 1005]);
        s.apply(batch(1006, 1), |_, d| got.push(d.seq));
        assert_eq!(got.last(), Some(&1006), "live again");
    }

    #[test]
    fn a_failed_read_lets_held_messages_go_with_a_jump() {
        let (mut s, ch) = setup();
        let mut got = vec![];
        s.apply(batch(1001, 1), |_, d| got.push(d.seq));
        s.apply(batch(1005, 1), |_, d| got.push(d.seq));
        s.on_read(&ch, 1001, None, 20, |_, d| got.push(d.seq));
        assert_eq!(got, vec![1001, 1005]);
    }

    #[test]
    fn a_resume_the_ring_holds_is_answered_at_once() {
        let (mut s, ch) = setup();
        s.apply(batch(1001, 3), |_, _| {});
        let Subscribed::Now(ack) = s.subscribe_cluster(&ch, (0, 8, 1), Resume::After(1001), 20)
        else {
            panic!("from the ring")
        };
        let replay = ack.replay.unwrap();
        assert!(replay.recovered);
        let seqs: Vec<u64> = replay.deliveries.iter().map(|d| d.seq).collect();
        assert_eq!((seqs, ack.last_seq), (vec![1002, 1003], 1003));
    }

    #[test]
    fn an_older_resume_reads_the_stream_and_hands_over_without_gap_or_duplicate() {
        let (mut s, ch) = setup();
        // This node saw the channel from 1004 on: 1001..1003 only Redis has.
        s.apply(batch(1004, 2), |_, _| {});
        let Subscribed::Later(Some(after)) =
            s.subscribe_cluster(&ch, (0, 8, 1), Resume::After(1001), 20)
        else {
            panic!("needs Redis")
        };
        assert_eq!(after, 1001);
        // While the read is out, 1006 arrives live (core 0 is not in the room yet).
        s.apply(batch(1006, 1), |_, _| {});
        // Redis answered as of 1005.
        let read = Read {
            life: LIFE,
            last: 1005,
            entries: stored(&[1001, 1002, 1003, 1004, 1005])[1..].to_vec(),
        };
        let answers = s.on_read(&ch, 1001, Some(read), 20, |_, _| {});
        let [a] = &answers[..] else {
            panic!("{answers:?}")
        };
        assert_eq!((a.core, a.conn, a.sub), (0, 8, 1));
        let replay = a.ack.replay.as_ref().unwrap();
        let seqs: Vec<u64> = replay.deliveries.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, vec![1002, 1003, 1004, 1005, 1006]);
        assert!(replay.recovered);
        assert_eq!(a.ack.last_seq, 1006, "later ones are live");
    }

    #[test]
    fn a_live_subscription_to_a_channel_new_to_this_node_learns_its_seq_from_redis() {
        let mut s = Sequencer::for_cluster(2, RingBounds::default(), false);
        let ch: Arc<str> = "c".into();
        let Subscribed::Later(Some(LIVE)) = s.subscribe_cluster(&ch, (0, 8, 1), Resume::Live, 0)
        else {
            panic!("asks Redis")
        };
        let read = Read {
            life: LIFE,
            last: 1003,
            entries: vec![],
        };
        let answers = s.on_read(&ch, LIVE, Some(read), 20, |_, _| {});
        assert_eq!(answers[0].ack.last_seq, 1003);
        assert!(answers[0].ack.replay.is_none());
        let mut got = vec![];
        s.apply(batch(1004, 1), |_, d| got.push(d.seq));
        assert_eq!(got, vec![1004], "continues from Redis's seq");
        // Position 0 resumes from the start of the life.
        let Subscribed::Later(Some(after)) =
            s.subscribe_cluster(&ch, (0, 9, 1), Resume::After(0), 20)
        else {
            panic!("the ring does not go back to the life's start")
        };
        assert_eq!(after, LIFE);
    }

    #[test]
    fn positions_from_a_lost_life_are_not_recovered() {
        let (mut s, ch) = setup();
        s.apply(batch(1001, 3), |_, _| {});
        // Redis lost the channel; its new life starts far above.
        let mut got = vec![];
        let next = Batch {
            life: 5_000,
            first: 5_001,
            ..batch(0, 1)
        };
        assert_eq!(s.apply(next, |_, d| got.push(d.seq)), None);
        assert_eq!(got, vec![5001]);
        let Subscribed::Now(ack) = s.subscribe_cluster(&ch, (0, 8, 1), Resume::After(1002), 20)
        else {
            panic!("known to be lost")
        };
        assert!(!ack.replay.unwrap().recovered);
    }

    #[test]
    fn after_a_reconnect_every_channel_is_read_again() {
        let (mut s, ch) = setup();
        s.apply(batch(1001, 1), |_, _| {});
        assert_eq!(s.resync(), vec![(ch.clone(), 1001)]);
        let mut got = vec![];
        s.apply(batch(1003, 1), |_, d| got.push(d.seq));
        assert!(got.is_empty(), "held until the read");
        let read = Read {
            life: LIFE,
            last: 1003,
            entries: stored(&[1001, 1002, 1003])[1..].to_vec(),
        };
        s.on_read(&ch, 1001, Some(read), 20, |_, d| got.push(d.seq));
        assert_eq!(got, vec![1002, 1003]);
    }
}
