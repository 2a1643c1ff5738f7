//! Socket.IO connection state recovery: what a session that went away leaves behind, so that
//! its client, reconnecting with the private session id (`pid`) and the offset of the last
//! event it processed, gets exactly what it missed on each of its channels.
//!
//! The offset a client sends is the last argument of the last event it got:
//! `"<seq>:<channel>"`, shared by every subscriber of that event. Where each of the session's
//! other channels stood when that event was written comes from the write positions the
//! session kept: for each channel, the last `KEPT_WRITES` events written with the session's
//! write count at the time. Everything written before the offset's event reached the client
//! (one ordered stream); everything after it is sent again. A channel whose position cannot
//! be told that way (more than `KEPT_WRITES` of its events were written after the client's
//! last one) makes the recovery fail: the client hears `recovered: false` and reloads, never
//! a gap it is not told about.
//!
//! Bounds: `KEPT_WRITES` positions per subscription; the store holds at most `MAX_RECORDS`
//! sessions, each for the recovery window; the oldest go first.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::sequencer::Resume;

/// Write positions kept per channel of a Socket.IO session.
pub const KEPT_WRITES: usize = 16;
/// Sessions one node keeps for recovery at once.
pub const MAX_RECORDS: usize = 100_000;

/// Where one channel of a session stands: the seq the client is known to have up to as of
/// write count `base_w`, and the events written since (write count, seq), oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Positions {
    base: u64,
    base_w: u64,
    writes: VecDeque<(u64, u64)>,
}

impl Positions {
    /// A subscription that began at write count `w`, the client having everything of it up
    /// to `seq`.
    pub fn new(seq: u64, w: u64) -> Positions {
        Positions {
            base: seq,
            base_w: w,
            writes: VecDeque::new(),
        }
    }

    /// Event `seq` of this channel was written as the session's `w`-th.
    pub fn written(&mut self, w: u64, seq: u64) {
        if self.writes.len() == KEPT_WRITES {
            if let Some((old_w, old_seq)) = self.writes.pop_front() {
                self.base = old_seq;
                self.base_w = old_w;
            }
        }
        self.writes.push_back((w, seq));
    }

    /// The write count of event `seq`, if it is still known.
    fn write_of(&self, seq: u64) -> Option<u64> {
        if seq == self.base {
            return Some(self.base_w);
        }
        self.writes.iter().find(|(_, s)| *s == seq).map(|(w, _)| *w)
    }

    /// The last seq the client had when it had everything written up to write count `w`;
    /// None if that is no longer known.
    fn at(&self, w: u64) -> Option<u64> {
        match self.writes.iter().rev().find(|(at, _)| *at <= w) {
            Some((_, seq)) => Some(*seq),
            None if self.base_w <= w => Some(self.base),
            None => None,
        }
    }
}

/// What a session that went away leaves for its client's recovery.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub user: String,
    pub epoch: String,
    pub channels: Vec<(Arc<str>, Positions)>,
}

/// The client's offset: `"<seq>:<channel>"`.
pub fn offset(channel: &str, seq: u64) -> String {
    format!("{seq}:{channel}")
}

fn parse_offset(offset: &str) -> Option<(&str, u64)> {
    let (seq, channel) = offset.split_once(':')?;
    Some((channel, seq.parse().ok()?))
}

impl Record {
    /// Where each channel resumes for a client whose last event was `offset` (None: it got
    /// none), and whether that is exact for every channel.
    pub fn resumes(&self, offset: Option<&str>) -> (Vec<(Arc<str>, Resume)>, bool) {
        let last = offset.and_then(parse_offset);
        if offset.is_some() && last.is_none() {
            return (self.live(), false);
        }
        // The write count the client had everything up to.
        let upto = match last {
            None => Some(0),
            Some((channel, seq)) => self
                .channels
                .iter()
                .find(|(c, _)| &**c == channel)
                .and_then(|(_, p)| p.write_of(seq)),
        };
        let mut exact = true;
        let resumes = self
            .channels
            .iter()
            .map(|(channel, positions)| {
                let seq = match last {
                    Some((c, seq)) if c == &**channel => Some(seq),
                    _ => upto.and_then(|w| positions.at(w)),
                };
                match seq {
                    Some(seq) => (channel.clone(), Resume::After(seq)),
                    None => {
                        exact = false;
                        (channel.clone(), Resume::Live)
                    }
                }
            })
            .collect();
        (resumes, exact)
    }

    fn live(&self) -> Vec<(Arc<str>, Resume)> {
        self.channels
            .iter()
            .map(|(c, _)| (c.clone(), Resume::Live))
            .collect()
    }
}

/// The records of sessions that went away, by private session id, each for the recovery
/// window.
#[derive(Debug, Default)]
pub struct Store {
    records: HashMap<String, (Instant, Record)>,
    order: VecDeque<(Instant, String)>,
}

impl Store {
    pub fn put(&mut self, pid: String, record: Record, now: Instant, window: Duration) {
        self.expire(now);
        while self.records.len() >= MAX_RECORDS {
            let Some((_, oldest)) = self.order.pop_front() else {
                break;
            };
            self.records.remove(&oldest);
        }
        let until = now + window;
        self.order.push_back((until, pid.clone()));
        self.records.insert(pid, (until, record));
    }

    /// The record of `pid`, once, for its own user only: a session is recovered at most once,
    /// and someone else presenting its id does not use it up.
    pub fn take(&mut self, pid: &str, user: &str, now: Instant) -> Option<Record> {
        self.expire(now);
        if self.records.get(pid)?.1.user != user {
            return None;
        }
        self.records.remove(pid).map(|(_, r)| r)
    }

    fn expire(&mut self, now: Instant) {
        while let Some((until, pid)) = self.order.front() {
            if *until > now {
                break;
            }
            if self.records.get(pid).is_some_and(|(u, _)| u == until) {
                self.records.remove(pid);
            }
            self.order.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(channels: Vec<(&str, Positions)>) -> Record {
        Record {
            user: "u".into(),
            epoch: "e".into(),
            channels: channels.into_iter().map(|(c, p)| (c.into(), p)).collect(),
        }
    }

    #[test]
    fn each_channel_resumes_where_it_stood_when_the_last_received_event_was_written() {
        // Writes: a1 (w1), b7 (w2), a2 (w3), b8 (w4); the client got up to a2.
        let mut a = Positions::new(0, 0);
        let mut b = Positions::new(6, 0);
        a.written(1, 1);
        b.written(2, 7);
        a.written(3, 2);
        b.written(4, 8);
        let r = record(vec![("a", a), ("b", b)]);
        let (resumes, exact) = r.resumes(Some(&offset("a", 2)));
        assert!(exact);
        assert_eq!(
            resumes,
            vec![
                ("a".into(), Resume::After(2)),
                ("b".into(), Resume::After(7))
            ]
        );
        // Got nothing at all: everything again.
        let (resumes, exact) = r.resumes(None);
        assert!(exact);
        assert_eq!(
            resumes,
            vec![
                ("a".into(), Resume::After(0)),
                ("b".into(), Resume::After(6))
            ]
        );
        // Got up to b8: nothing missed.
        let (resumes, _) = r.resumes(Some(&offset("b", 8)));
        assert_eq!(
            resumes,
            vec![
                ("a".into(), Resume::After(2)),
                ("b".into(), Resume::After(8))
            ]
        );
    }

    #[test]
    fn a_position_no_longer_known_fails_the_recovery_instead_of_guessing() {
        let mut a = Positions::new(0, 0);
        let mut b = Positions::new(0, 0);
        a.written(1, 1); // the client got this one...
        for i in 0..KEPT_WRITES as u64 + 1 {
            b.written(2 + i, 1 + i); // ...and then more of b was written than is kept
        }
        let r = record(vec![("a", a.clone()), ("b", b.clone())]);
        let (resumes, exact) = r.resumes(Some(&offset("a", 1)));
        assert!(!exact);
        assert_eq!(resumes[0], ("a".into(), Resume::After(1)));
        assert_eq!(resumes[1], ("b".into(), Resume::Live));
        // With one channel, its own offset is always enough.
        let single = record(vec![("b", b)]);
        let (resumes, exact) = single.resumes(Some(&offset("b", 3)));
        assert!(exact);
        assert_eq!(resumes, vec![("b".into(), Resume::After(3))]);
        // Nonsense offsets recover nothing.
        assert!(!r.resumes(Some("garbage")).1);
        assert!(!r.resumes(Some("5:no-such-channel")).1);
    }

    #[test]
    fn the_store_keeps_a_record_for_the_window_and_gives_it_out_once() {
        let mut store = Store::default();
        let t0 = Instant::now();
        let window = Duration::from_secs(120);
        store.put("p1".into(), record(vec![]), t0, window);
        store.put("p2".into(), record(vec![]), t0, window);
        let later = t0 + Duration::from_secs(1);
        assert!(
            store.take("p1", "mallory", later).is_none(),
            "not someone else's"
        );
        assert!(store.take("p1", "u", later).is_some());
        assert!(store.take("p1", "u", later).is_none(), "once");
        assert!(store.take("p2", "u", t0 + window).is_none(), "expired");
        assert!(store.is_empty());
    }
}
