//! The replay ring of one channel, kept by the channel's owner core.
//!
//! Invariant: entries are in strictly rising seq order, at most `max_messages` of them and none
//! older than `max_age_ms` once `evict` has run; `evicted_upto` is the highest seq ever dropped,
//! so a resume from seq N is exact iff N >= `evicted_upto` (ephemeral messages never enter the
//! ring, so gaps of theirs are not losses). A ring that continues an earlier one starts with
//! `evicted_upto` at that one's last seq: everything up to there counts as lost.

use std::collections::VecDeque;
use std::sync::Arc;

use super::Delivery;

/// Bounds of a ring; both apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingBounds {
    /// Most messages kept per channel (≥ 1).
    pub max_messages: usize,
    /// Oldest message kept, in milliseconds.
    pub max_age_ms: u64,
}

impl Default for RingBounds {
    fn default() -> Self {
        RingBounds {
            max_messages: 1000,
            max_age_ms: 5 * 60 * 1000,
        }
    }
}

/// What a resume yields: the missed messages in order, and whether they are all of them.
#[derive(Debug, Default)]
pub struct Replay {
    pub deliveries: Vec<Arc<Delivery>>,
    pub recovered: bool,
}

#[derive(Debug)]
struct Entry {
    at_ms: u64,
    delivery: Arc<Delivery>,
}

#[derive(Debug)]
pub struct Ring {
    bounds: RingBounds,
    entries: VecDeque<Entry>,
    evicted_upto: u64,
}

impl Ring {
    pub fn new(bounds: RingBounds) -> Self {
        Ring::continuing(bounds, 0)
    }

    /// A ring for a channel whose earlier messages, up to seq `after`, are all gone.
    pub fn continuing(bounds: RingBounds, after: u64) -> Self {
        Ring {
            bounds,
            entries: VecDeque::new(),
            evicted_upto: after,
        }
    }

    /// Appends a durable message; its seq must be above every seq already in the ring.
    pub fn push(&mut self, delivery: Arc<Delivery>, now_ms: u64) {
        debug_assert!(self
            .entries
            .back()
            .is_none_or(|e| e.delivery.seq < delivery.seq));
        self.entries.push_back(Entry {
            at_ms: now_ms,
            delivery,
        });
        self.evict(now_ms);
    }

    /// Drops what is past the count or age bound.
    pub fn evict(&mut self, now_ms: u64) {
        while let Some(front) = self.entries.front() {
            let too_many = self.entries.len() > self.bounds.max_messages;
            let too_old = now_ms.saturating_sub(front.at_ms) > self.bounds.max_age_ms;
            if !(too_many || too_old) {
                break;
            }
            self.evicted_upto = front.delivery.seq;
            self.entries.pop_front();
        }
        if self.entries.is_empty() && self.entries.capacity() > 0 {
            // A quiet channel that is kept (it has subscribers) holds no space for old entries.
            self.entries = VecDeque::new();
        }
    }

    /// When the oldest kept message passes the age bound (`None`: nothing kept).
    pub fn expires_at_ms(&self) -> Option<u64> {
        let oldest = self.entries.front()?.at_ms;
        Some(
            oldest
                .saturating_add(self.bounds.max_age_ms)
                .saturating_add(1),
        )
    }

    /// Every kept message after `since`, given that the channel's latest seq is `last_seq`.
    /// `recovered` is false when a message after `since` is no longer kept, or when `since` lies
    /// in the future (the client's position came from another history).
    pub fn replay(&mut self, since: u64, last_seq: u64, now_ms: u64) -> Replay {
        self.evict(now_ms);
        if since > last_seq || since < self.evicted_upto {
            return Replay {
                deliveries: Vec::new(),
                recovered: false,
            };
        }
        let start = self.entries.partition_point(|e| e.delivery.seq <= since);
        Replay {
            deliveries: self
                .entries
                .range(start..)
                .map(|e| e.delivery.clone())
                .collect(),
            recovered: true,
        }
    }

    /// Every message still kept (`recovered` false: older ones may be gone).
    pub fn held(&mut self, now_ms: u64) -> Replay {
        self.evict(now_ms);
        Replay {
            deliveries: self.entries.iter().map(|e| e.delivery.clone()).collect(),
            recovered: false,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn delivery(seq: u64) -> Arc<Delivery> {
        Arc::new(Delivery {
            channel: "c".into(),
            seq,
            frame: Bytes::from(seq.to_string()),
            project_id: None,
            user_id: None,
            agent_id: None,
            event: "e".into(),
            priority: Default::default(),
            coalesce_key: None,
            ttl: None,
            twins: Default::default(),
        })
    }

    fn seqs(r: &Replay) -> Vec<u64> {
        r.deliveries.iter().map(|d| d.seq).collect()
    }

    fn ring(max_messages: usize, max_age_ms: u64) -> Ring {
        Ring::new(RingBounds {
            max_messages,
            max_age_ms,
        })
    }

    #[test]
    fn resumes_exactly_after_since() {
        let mut r = ring(100, 1000);
        for seq in 1..=10 {
            r.push(delivery(seq), 0);
        }
        let out = r.replay(4, 10, 0);
        assert!(out.recovered);
        assert_eq!(seqs(&out), (5..=10).collect::<Vec<_>>());
        let none = r.replay(10, 10, 0);
        assert!(none.recovered && none.deliveries.is_empty());
        assert!(r.replay(0, 10, 0).recovered);
    }

    #[test]
    fn count_bound_loses_the_oldest() {
        let mut r = ring(3, 1000);
        for seq in 1..=5 {
            r.push(delivery(seq), 0);
        }
        assert_eq!(r.len(), 3);
        assert!(r.replay(2, 5, 0).recovered); // has 3, 4, 5
        assert_eq!(seqs(&r.replay(2, 5, 0)), vec![3, 4, 5]);
        let lost = r.replay(1, 5, 0); // 2 is gone
        assert!(!lost.recovered && lost.deliveries.is_empty());
    }

    #[test]
    fn age_bound_loses_the_old() {
        let mut r = ring(100, 1000);
        r.push(delivery(1), 0);
        r.push(delivery(2), 500);
        assert!(r.replay(0, 2, 1000).recovered);
        let out = r.replay(0, 2, 1001);
        assert!(!out.recovered);
        assert_eq!(seqs(&r.replay(1, 2, 1001)), vec![2]);
    }

    #[test]
    fn ephemeral_gaps_are_not_losses() {
        let mut r = ring(100, 1000);
        r.push(delivery(1), 0);
        r.push(delivery(3), 0); // seq 2 was ephemeral
        let out = r.replay(0, 4, 0); // seq 4 ephemeral too
        assert!(out.recovered);
        assert_eq!(seqs(&out), vec![1, 3]);
    }

    #[test]
    fn a_continuing_ring_counts_the_earlier_seqs_as_lost() {
        let mut r = Ring::continuing(RingBounds::default(), 5);
        assert!(
            !r.replay(4, 5, 0).recovered,
            "6.. may follow, but 5 is gone"
        );
        assert!(r.replay(5, 5, 0).recovered);
        r.push(delivery(6), 0);
        assert_eq!(seqs(&r.replay(5, 6, 0)), vec![6]);
        assert!(!r.replay(3, 6, 0).recovered);
    }

    #[test]
    fn expiry_follows_the_oldest_entry_and_frees_the_space() {
        let mut r = ring(100, 1000);
        assert_eq!(r.expires_at_ms(), None);
        r.push(delivery(1), 10);
        r.push(delivery(2), 500);
        assert_eq!(r.expires_at_ms(), Some(1011));
        r.evict(1011);
        assert_eq!(r.expires_at_ms(), Some(1501));
        r.evict(1501);
        assert!(r.is_empty() && r.entries.capacity() == 0);
    }

    #[test]
    fn a_future_position_is_not_recovered() {
        let mut r = ring(100, 1000);
        r.push(delivery(1), 0);
        assert!(!r.replay(7, 1, 0).recovered);
    }
}
