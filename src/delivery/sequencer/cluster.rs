//! The owner core's side of a channel in cluster mode: Redis assigns the seqs, this node
//! receives every batch over Pub/Sub and delivers each channel in seq order, exactly once.
//!
//! Invariant: `last_seq` is the highest seq this node has delivered for the channel, in the
//! life `life`, and lives only rise. A batch continuing it is delivered; an older seq is a
//! duplicate and dropped; a newer one means this node missed messages (its Pub/Sub connection
//! was away): live deliveries wait in `Fill` while the gap is read from the channel's stream by
//! a read issued after the gap began (retried when Redis does not answer), then both go out in
//! order; a held message Redis does not have is dropped. A resume the ring cannot answer
//! exactly waits for its own read; one ahead of this node (the client saw messages this node
//! has not received yet) waits until the node has caught up. Each answer hands over at
//! `last_seq` like any other (replay up to it, live after it): no gap and no duplicate at the
//! seam.

use std::sync::Arc;

use super::{delivery, Resume, Sequencer, SubscribeAck};
use crate::cluster::wire::{Batch, Read};
use crate::delivery::ring::{Replay, Ring};
use crate::delivery::Delivery;

/// The `since` of a live subscription waiting to learn the channel's seq from Redis: a read
/// after it returns the channel's life and last seq and no entries (seqs are far below it).
pub const LIVE: u64 = u64::MAX / 2;

/// Reads of a gap that Redis did not answer before the held messages go with a jump.
const GAP_TRIES: u32 = 5;

/// A read of a channel's stream to make: its id and the position to read after.
pub type ReadRequest = (u64, u64);

/// What waits on a channel for reads from Redis.
#[derive(Debug, Default)]
pub struct Fill {
    /// A gap is being read: (the read filling it, tries so far).
    gap: Option<(u64, u32)>,
    /// Live deliveries held while the gap is read, each with whether it is ephemeral and
    /// its publish time.
    held: Vec<(Arc<Delivery>, bool, u64)>,
    waiters: Vec<Waiter>,
    /// Resumes from a position this node has not reached yet.
    ahead: Vec<Waiter>,
    /// Reads in flight.
    reads: Vec<ReadRequest>,
}

impl Fill {
    fn is_empty(&self) -> bool {
        self.gap.is_none()
            && self.waiters.is_empty()
            && self.ahead.is_empty()
            && self.reads.is_empty()
    }
}

/// A subscription waiting for its answer.
#[derive(Debug, Clone, Copy)]
struct Waiter {
    core: usize,
    conn: u64,
    sub: u64,
    since: u64,
    /// `Resume::Held`: whatever the stream holds, not a resume.
    held: bool,
    /// The read it waits for.
    read: u64,
}

/// The answer to one waiting subscription: send `ack` to `core`.
#[derive(Debug)]
pub struct Answer {
    pub core: usize,
    pub conn: u64,
    pub sub: u64,
    pub ack: SubscribeAck,
}

impl Answer {
    fn to(w: &Waiter, ack: SubscribeAck) -> Answer {
        Answer {
            core: w.core,
            conn: w.conn,
            sub: w.sub,
            ack,
        }
    }
}

/// How a subscription in cluster mode is answered.
#[derive(Debug)]
pub enum Subscribed {
    /// At once, from what this node holds.
    Now(SubscribeAck),
    /// After a read (`Some`: this one, to make; `None`: one already in flight).
    Later(Option<ReadRequest>),
}

/// What a batch or a read led to: reads to make, subscriptions to answer.
#[derive(Debug, Default)]
pub struct Outcome {
    pub reads: Vec<ReadRequest>,
    pub answers: Vec<Answer>,
}

fn lost(last_seq: u64) -> SubscribeAck {
    SubscribeAck {
        last_seq,
        replay: Some(Replay::default()),
    }
}

impl Sequencer {
    fn new_read(&mut self) -> u64 {
        self.next_read += 1;
        self.next_read
    }

    /// Delivers one batch from Redis.
    pub fn apply(
        &mut self,
        batch: Batch,
        mut to_core: impl FnMut(usize, &Arc<Delivery>),
    ) -> Outcome {
        let Batch {
            channel,
            life,
            first,
            entries,
        } = batch;
        let bounds = self.bounds;
        let mut out = Outcome::default();
        for (i, entry) in entries.into_iter().enumerate() {
            let seq = first + i as u64;
            let state = self.state(&channel);
            if life < state.life {
                return out; // from a life Redis has already left
            }
            if life > state.life {
                // The first message this node sees of the channel starts its view (so does
                // one after the state was forgotten); a new life means the history this node
                // holds is gone from Redis, and what it held for the old one with it.
                let known = state.life != 0;
                state.life = life;
                state.last_seq = if known { life } else { seq - 1 };
                state.ring = Ring::continuing(bounds, state.last_seq);
                if let Some(fill) = state.fill.as_mut() {
                    fill.held.clear();
                    fill.gap = None;
                }
            }
            let held = state.fill.as_ref().is_some_and(|f| f.gap.is_some());
            if !held && seq <= state.last_seq {
                continue; // a duplicate
            }
            let (p, ts) = entry.into_publication(channel.clone());
            let (d, ephemeral) = delivery(p, None, seq, ts);
            if !held && seq == state.last_seq + 1 {
                self.keep_and_send(&channel, (d, ephemeral), ts, &mut to_core);
                self.answer_ahead(&channel, ts, &mut out);
                continue;
            }
            let after = state.last_seq;
            if state.fill.as_ref().is_none_or(|f| f.gap.is_none()) {
                let id = self.new_read();
                let fill = self
                    .state(&channel)
                    .fill
                    .get_or_insert_with(Default::default);
                fill.gap = Some((id, 0));
                fill.reads.push((id, after));
                out.reads.push((id, after));
            }
            let fill = self.state(&channel).fill.as_mut().expect("made above");
            fill.held.push((d, ephemeral, ts));
        }
        out
    }

    /// Answers the resumes that were ahead of this node and that it has now reached.
    fn answer_ahead(&mut self, channel: &Arc<str>, now_ms: u64, out: &mut Outcome) {
        let Some(state) = self.channels.get_mut(channel) else {
            return;
        };
        let last_seq = state.last_seq;
        let Some(fill) = state.fill.as_mut() else {
            return;
        };
        if fill.ahead.iter().all(|w| w.since > last_seq) {
            return;
        }
        let (reached, ahead): (Vec<Waiter>, Vec<Waiter>) =
            fill.ahead.iter().partition(|w| w.since <= last_seq);
        fill.ahead = ahead;
        for w in reached {
            let replay = state.ring.replay(w.since, last_seq, now_ms);
            if replay.recovered {
                out.answers.push(Answer::to(
                    &w,
                    SubscribeAck {
                        last_seq,
                        replay: Some(replay),
                    },
                ));
            } else {
                // The ring does not reach back to it: read again, now that it is behind us.
                self.next_read += 1;
                let id = self.next_read;
                let fill = state.fill.as_mut().expect("present above");
                fill.waiters.push(Waiter { read: id, ..w });
                fill.reads.push((id, w.since));
                out.reads.push((id, w.since));
            }
        }
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
        let settled = state.fill.as_ref().is_none_or(|f| f.gap.is_none());
        let held = resume == Resume::Held;
        if held && settled && state.life != 0 && state.listening {
            return Subscribed::Now(SubscribeAck {
                last_seq,
                replay: Some(state.ring.held(now_ms)),
            });
        }
        let since = match resume {
            Resume::Held => 0,
            // A channel this node does not follow yet: its seq comes from Redis, so that
            // `subscribed` names a position the client can resume from.
            Resume::Live if state.life == 0 || !state.listening => LIVE,
            Resume::Live => {
                return Subscribed::Now(SubscribeAck {
                    last_seq,
                    replay: None,
                })
            }
            Resume::OtherEpoch => return Subscribed::Now(lost(last_seq)),
            // No seq is that high (they are Redis's clock in µs): a position from elsewhere.
            Resume::After(since) if since >= LIVE => return Subscribed::Now(lost(last_seq)),
            Resume::After(since) => since,
        };
        if !held && since != LIVE && settled && state.life != 0 && state.listening {
            if since < state.life {
                // From before the channel's current life (position 0 included: an earlier
                // life may have come and gone since): that history is gone.
                return Subscribed::Now(lost(last_seq));
            }
            let replay = state.ring.replay(since, last_seq, now_ms);
            if replay.recovered {
                return Subscribed::Now(SubscribeAck {
                    last_seq,
                    replay: Some(replay),
                });
            }
        }
        let in_flight = state
            .fill
            .as_ref()
            .and_then(|f| f.reads.iter().find(|r| r.1 == since).map(|r| r.0));
        let (read, request) = match in_flight {
            Some(id) => (id, None),
            None => {
                let id = self.new_read();
                (id, Some((id, since)))
            }
        };
        let fill = self
            .state(channel)
            .fill
            .get_or_insert_with(Default::default);
        fill.waiters.push(Waiter {
            core,
            conn,
            sub,
            since,
            held,
            read,
        });
        if let Some(r) = request {
            fill.reads.push(r);
        }
        Subscribed::Later(request)
    }

    /// Takes the answer of read `id` of `channel`'s stream (`None`: Redis did not answer):
    /// fills the gap it was for, answers the subscriptions waiting for it, and lets held
    /// deliveries go.
    pub fn on_read(
        &mut self,
        channel: &Arc<str>,
        id: u64,
        read: Option<Read>,
        now_ms: u64,
        mut to_core: impl FnMut(usize, &Arc<Delivery>),
    ) -> Outcome {
        let bounds = self.bounds;
        let mut out = Outcome::default();
        let Some(state) = self.channels.get_mut(channel) else {
            return out;
        };
        let Some(fill) = state.fill.as_mut() else {
            return out;
        };
        fill.reads.retain(|r| r.0 != id);
        // Every read subscribes the channel first where channels are subscribed one by one.
        state.listening = true;
        // A read of a life Redis has left since (a newer batch came first) tells nothing.
        let read = read.filter(|r| r.life == 0 || r.life >= state.life);
        let stored: Vec<(Arc<Delivery>, u64)> = read
            .iter()
            .flat_map(|r| &r.entries)
            .map(|s| {
                let (p, ts) = s.entry.clone().into_publication(channel.clone());
                (delivery(p, None, s.seq, ts).0, ts)
            })
            .collect();
        let mut new_life = false;
        if let Some(r) = read.as_ref().filter(|r| r.life > state.life) {
            // Unknown so far: take Redis's view. A new life: what this node holds is gone
            // from Redis, and the new life's messages are delivered from its start.
            new_life = state.life != 0;
            state.life = r.life;
            state.last_seq = if new_life { r.life } else { r.last };
            state.ring = Ring::continuing(bounds, state.last_seq);
            let fill = state.fill.as_mut().expect("present above");
            fill.held.clear();
        }
        let fill = state.fill.as_mut().expect("present above");
        let gap_read = fill.gap.is_some_and(|(g, _)| g == id);
        if gap_read && read.is_none() {
            let tries = fill.gap.map_or(0, |(_, t)| t) + 1;
            if tries < GAP_TRIES {
                let after = state.last_seq;
                let again = self.new_read();
                let fill = self.channels.get_mut(channel).and_then(|s| s.fill.as_mut());
                let fill = fill.expect("present above");
                fill.gap = Some((again, tries));
                fill.reads.push((again, after));
                out.reads.push((again, after));
            } else {
                // Redis keeps not answering: go on without what it holds (a jump in seq).
                fill.gap = None;
                let held = std::mem::take(&mut fill.held);
                for (d, ephemeral, ts) in held {
                    if d.seq > self.channels[channel].last_seq {
                        self.keep_and_send(channel, (d, ephemeral), ts, &mut to_core);
                    }
                }
            }
        } else if gap_read || new_life {
            fill.gap = None;
            let held = std::mem::take(&mut fill.held);
            let redis_last = read.as_ref().map_or(0, |r| r.last);
            for (d, ts) in &stored {
                if d.seq > self.channels[channel].last_seq {
                    self.keep_and_send(channel, (d.clone(), false), *ts, &mut to_core);
                }
            }
            for (d, ephemeral, ts) in held {
                let last = self.channels[channel].last_seq;
                // What Redis has not got is no message of this channel (it was read after
                // the gap began, so it holds every real one before the first held).
                if d.seq > last && (d.seq <= redis_last || d.seq == last + 1) {
                    self.keep_and_send(channel, (d, ephemeral), ts, &mut to_core);
                }
            }
        }
        self.answer_ahead(channel, now_ms, &mut out);
        let state = self.channels.get_mut(channel).expect("present above");
        let last_seq = state.last_seq;
        let fill = state.fill.as_mut().expect("present above");
        let (ready, waiting): (Vec<Waiter>, Vec<Waiter>) =
            fill.waiters.iter().partition(|w| w.read == id);
        fill.waiters = waiting;
        let oldest_ms = now_ms.saturating_sub(bounds.max_age_ms);
        let ring = &mut state.ring;
        let mut ahead = Vec::new();
        for w in ready {
            let ack = match &read {
                _ if w.since == LIVE => SubscribeAck {
                    last_seq,
                    replay: None,
                },
                Some(r) if w.since > last_seq && w.since <= r.last && r.life == state.life => {
                    // The client has seen messages this node has not received yet.
                    ahead.push(w);
                    continue;
                }
                Some(r) if r.life != 0 => {
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
                    let recovered = !w.held
                        && r.life == state.life
                        && r.recovered(w.since, oldest_ms)
                        && (last_seq <= r.last || rest.recovered);
                    if !recovered && !w.held {
                        deliveries.clear(); // as from the ring: nothing re-sent
                    }
                    SubscribeAck {
                        last_seq,
                        replay: Some(Replay {
                            recovered,
                            deliveries,
                        }),
                    }
                }
                _ => lost(last_seq),
            };
            out.answers.push(Answer::to(&w, ack));
        }
        let fill = state.fill.as_mut().expect("present above");
        fill.ahead.extend(ahead);
        if fill.is_empty() {
            state.fill = None;
            self.free_if_idle(channel);
        }
        out
    }

    /// After this node's Pub/Sub connection came back: channels with subscribers here may
    /// have missed messages, so each is read again after its last seq while live deliveries
    /// wait; the others are forgotten (a later resume reads Redis). Returns the reads to make.
    pub fn resync(&mut self) -> Vec<(Arc<str>, ReadRequest)> {
        let mut reads = Vec::new();
        let names: Vec<Arc<str>> = self.channels.keys().cloned().collect();
        for channel in names {
            let state = self.channels.get_mut(&channel).expect("listed");
            if state.life == 0 {
                continue;
            }
            let wanted = state.interest.iter().any(|&n| n > 0) || state.fill.is_some();
            if !wanted {
                state.life = 0;
                state.last_seq = 0;
                state.ring = Ring::continuing(self.bounds, 0);
                self.free_if_idle(&channel);
                continue;
            }
            let after = state.last_seq;
            self.next_read += 1;
            let id = self.next_read;
            let state = self.channels.get_mut(&channel).expect("listed");
            let fill = state.fill.get_or_insert_with(Default::default);
            let tries = fill.gap.map_or(0, |(_, t)| t);
            fill.gap = Some((id, tries));
            fill.reads.push((id, after));
            reads.push((channel, (id, after)));
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

    fn read(last: u64, seqs: &[u64]) -> Read {
        Read {
            life: LIFE,
            last,
            last_durable: seqs.last().copied().unwrap_or(LIFE),
            entries: stored(seqs),
        }
    }

    fn later(s: Subscribed) -> ReadRequest {
        match s {
            Subscribed::Later(Some(r)) => r,
            other => panic!("expected a read, got {other:?}"),
        }
    }

    /// A sequencer with one live subscriber on core 1.
    fn setup() -> (Sequencer, Arc<str>) {
        let mut s = Sequencer::for_cluster(2, RingBounds::default(), false);
        let ch: Arc<str> = "c".into();
        // A channel this node has not seen: its seq is asked of Redis, which has none.
        let (id, after) = later(s.subscribe_cluster(&ch, (1, 7, 1), Resume::Live, 0));
        assert_eq!(after, LIVE);
        let out = s.on_read(&ch, id, Some(Read::default()), 0, |_, _| {});
        assert!(matches!(
            &out.answers[..],
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
        assert!(s
            .apply(batch(1001, 2), |_, d| got.push(d.seq))
            .reads
            .is_empty());
        assert!(s
            .apply(batch(1002, 2), |_, d| got.push(d.seq))
            .reads
            .is_empty());
        assert_eq!(got, vec![1001, 1002, 1003]);
        assert_eq!(s.last_seq("c"), 1003);
    }

    #[test]
    fn a_gap_holds_live_messages_until_the_stream_fills_it() {
        let (mut s, ch) = setup();
        let mut got = vec![];
        s.apply(batch(1001, 1), |_, d| got.push(d.seq));
        let reads = s.apply(batch(1004, 1), |_, d| got.push(d.seq)).reads;
        let [(id, 1001)] = reads[..] else {
            panic!("{reads:?}")
        };
        assert!(
            s.apply(batch(1005, 1), |_, d| got.push(d.seq))
                .reads
                .is_empty(),
            "one read"
        );
        assert_eq!(got, vec![1001], "held while the gap is read");
        s.on_read(&ch, id, Some(read(1004, &[1002, 1004])), 20, |_, d| {
            got.push(d.seq)
        });
        // 1003 was ephemeral: gone, and not a loss.
        assert_eq!(got, vec![1001, 1002, 1004, 1005]);
        s.apply(batch(1006, 1), |_, d| got.push(d.seq));
        assert_eq!(got.last(), Some(&1006), "live again");
    }

    #[test]
    fn a_read_asked_before_the_gap_began_does_not_fill_it() {
        let (mut s, ch) = setup();
        // This node follows the channel from 1005 on; a resume from 1002 must read Redis.
        s.apply(batch(1005, 1), |_, _| {});
        let (resume, _) = later(s.subscribe_cluster(&ch, (0, 8, 1), Resume::After(1002), 20));
        let mut got = vec![];
        let gap = s.apply(batch(1011, 1), |_, d| got.push(d.seq)).reads[0].0;
        // The older read answers as of 1005: it fills nothing, and the held one waits.
        let old = read(1005, &[1003, 1004, 1005]);
        s.on_read(&ch, resume, Some(old), 20, |_, d| got.push(d.seq));
        assert!(got.is_empty(), "{got:?}");
        let seqs: Vec<u64> = (1006..=1011).collect();
        s.on_read(&ch, gap, Some(read(1011, &seqs)), 20, |c, d| {
            if c == 1 {
                got.push(d.seq)
            }
        });
        assert_eq!(got, seqs);
    }

    #[test]
    fn a_gap_read_redis_does_not_answer_is_asked_again_before_messages_jump() {
        let (mut s, ch) = setup();
        let mut got = vec![];
        s.apply(batch(1001, 1), |_, d| got.push(d.seq));
        let mut id = s.apply(batch(1005, 1), |_, d| got.push(d.seq)).reads[0].0;
        for _ in 1..GAP_TRIES {
            let again = s.on_read(&ch, id, None, 20, |_, d| got.push(d.seq)).reads;
            assert_eq!(got, vec![1001], "still held");
            id = again[0].0;
        }
        s.on_read(&ch, id, None, 20, |_, d| got.push(d.seq));
        assert_eq!(got, vec![1001, 1005], "after {GAP_TRIES} tries: a jump");
    }

    #[test]
    fn a_held_message_redis_does_not_have_is_dropped() {
        let (mut s, ch) = setup();
        let mut got = vec![];
        s.apply(batch(1001, 1), |_, d| got.push(d.seq));
        let id = s
            .apply(batch(u64::MAX - 5, 2), |_, d| got.push(d.seq))
            .reads[0]
            .0;
        s.on_read(&ch, id, Some(read(1001, &[1001])), 20, |_, d| {
            got.push(d.seq)
        });
        s.apply(batch(1002, 1), |_, d| got.push(d.seq));
        assert_eq!(got, vec![1001, 1002], "the injected seqs never went out");
    }

    #[test]
    fn a_batch_of_an_older_life_is_ignored() {
        let (mut s, _) = setup();
        let mut got = vec![];
        s.apply(
            Batch {
                life: 5_000,
                first: 5_001,
                ..batch(0, 1)
            },
            |_, d| got.push(d.seq),
        );
        s.apply(batch(1001, 3), |_, d| got.push(d.seq));
        assert_eq!(got, vec![5001]);
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
        let (id, after) = later(s.subscribe_cluster(&ch, (0, 8, 1), Resume::After(1001), 20));
        assert_eq!(after, 1001);
        // While the read is out, 1006 arrives live (core 0 is not in the room yet).
        s.apply(batch(1006, 1), |_, _| {});
        // Redis answered as of 1005.
        let out = s.on_read(
            &ch,
            id,
            Some(read(1005, &[1002, 1003, 1004, 1005])),
            20,
            |_, _| {},
        );
        let [a] = &out.answers[..] else {
            panic!("{out:?}")
        };
        assert_eq!((a.core, a.conn, a.sub), (0, 8, 1));
        let replay = a.ack.replay.as_ref().unwrap();
        let seqs: Vec<u64> = replay.deliveries.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, vec![1002, 1003, 1004, 1005, 1006]);
        assert!(replay.recovered);
        assert_eq!(a.ack.last_seq, 1006, "later ones are live");
    }

    #[test]
    fn a_resume_ahead_of_this_node_waits_until_the_node_has_caught_up() {
        let (mut s, ch) = setup();
        s.apply(batch(1001, 5), |_, _| {});
        // The client saw 1010 on another node; this one is at 1005.
        let (id, _) = later(s.subscribe_cluster(&ch, (0, 8, 1), Resume::After(1010), 20));
        let seqs: Vec<u64> = (1001..=1010).collect();
        let out = s.on_read(&ch, id, Some(read(1010, &seqs)), 20, |_, _| {});
        assert!(out.answers.is_empty(), "not before this node reached 1010");
        let out = s.apply(batch(1006, 6), |_, _| {});
        let [a] = &out.answers[..] else {
            panic!("{out:?}")
        };
        let replay = a.ack.replay.as_ref().unwrap();
        let seqs: Vec<u64> = replay.deliveries.iter().map(|d| d.seq).collect();
        // Handed over as soon as the node reached 1010: 1011 follows live.
        assert_eq!(
            (seqs, a.ack.last_seq, replay.recovered),
            (vec![], 1010, true)
        );
    }

    #[test]
    fn a_live_subscription_to_a_channel_new_to_this_node_learns_its_seq_from_redis() {
        let mut s = Sequencer::for_cluster(2, RingBounds::default(), false);
        let ch: Arc<str> = "c".into();
        let (id, _) = later(s.subscribe_cluster(&ch, (0, 8, 1), Resume::Live, 0));
        // A second one meanwhile shares the read.
        assert!(matches!(
            s.subscribe_cluster(&ch, (1, 9, 1), Resume::Live, 0),
            Subscribed::Later(None)
        ));
        let out = s.on_read(&ch, id, Some(read(1003, &[])), 20, |_, _| {});
        assert_eq!(out.answers.len(), 2);
        assert!(out
            .answers
            .iter()
            .all(|a| a.ack.last_seq == 1003 && a.ack.replay.is_none()));
        let mut got = vec![];
        s.apply(batch(1004, 1), |c, d| got.push((c, d.seq)));
        assert_eq!(
            got,
            vec![(0, 1004), (1, 1004)],
            "continues from Redis's seq"
        );
    }

    #[test]
    fn positions_from_before_the_life_are_not_recovered_position_0_included() {
        let (mut s, ch) = setup();
        s.apply(batch(1001, 3), |_, _| {});
        for since in [0, 999] {
            let Subscribed::Now(ack) =
                s.subscribe_cluster(&ch, (0, 8, 1), Resume::After(since), 20)
            else {
                panic!("known to be before the life")
            };
            assert!(!ack.replay.unwrap().recovered, "{since}");
        }
        // Redis lost the channel; its new life starts far above.
        let mut got = vec![];
        let next = Batch {
            life: 5_000,
            first: 5_001,
            ..batch(0, 1)
        };
        s.apply(next, |c, d| got.push((c, d.seq)));
        assert!(got.contains(&(1, 5001)));
        let Subscribed::Now(ack) = s.subscribe_cluster(&ch, (0, 8, 1), Resume::After(1002), 20)
        else {
            panic!("known to be lost")
        };
        assert!(!ack.replay.unwrap().recovered);
    }

    #[test]
    fn a_channel_whose_waiter_left_is_forgotten() {
        let mut s = Sequencer::for_cluster(2, RingBounds::default(), false);
        let ch: Arc<str> = "gone".into();
        let (id, _) = later(s.subscribe_cluster(&ch, (0, 8, 1), Resume::After(5), 0));
        s.unsubscribe(&ch, 0);
        s.on_read(&ch, id, Some(Read::default()), 0, |_, _| {});
        assert_eq!(s.channel_count(), 0);
    }

    #[test]
    fn after_a_reconnect_channels_with_subscribers_are_read_again_and_others_forgotten() {
        let (mut s, ch) = setup();
        s.apply(batch(1001, 1), |_, _| {});
        s.apply(
            Batch {
                channel: "other".into(),
                ..batch(1001, 1)
            },
            |_, _| {},
        );
        let reads = s.resync();
        let [(c, (id, 1001))] = &reads[..] else {
            panic!("{reads:?}")
        };
        assert_eq!(c, &ch);
        let mut got = vec![];
        s.apply(batch(1003, 1), |_, d| got.push(d.seq));
        assert!(got.is_empty(), "held until the read");
        s.on_read(
            &ch,
            *id,
            Some(read(1003, &[1001, 1002, 1003])),
            20,
            |_, d| got.push(d.seq),
        );
        assert_eq!(got, vec![1002, 1003]);
        assert_eq!(
            s.last_seq("other"),
            0,
            "forgotten: a resume there reads Redis"
        );
    }
}
