//! A counter that many threads add to without sharing a cache line: each thread adds to a
//! shard of its own (128-byte aligned, so no two shards share a line or an adjacent-line
//! prefetch pair) and a reader sums the shards.
//!
//! Invariant: the sum is exact once the writers are quiet; while they write, a reader sees each
//! shard at some recent value (relaxed: for metrics, never for logic).

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

/// Shards per counter: threads past this many share shards (still exact, only slower).
const SHARDS: usize = 16;

#[repr(align(128))]
#[derive(Default)]
struct Shard(AtomicI64);

#[derive(Default)]
pub struct Tally {
    shards: [Shard; SHARDS],
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Tally").field(&self.sum()).finish()
    }
}

impl Tally {
    pub const fn new() -> Tally {
        Tally {
            shards: [const { Shard(AtomicI64::new(0)) }; SHARDS],
        }
    }

    /// Adds `n` (negative for a gauge going down) to this thread's shard.
    pub fn add(&self, n: i64) {
        self.shards[shard_of_this_thread()]
            .0
            .fetch_add(n, Ordering::Relaxed);
    }

    /// The total over every thread, never below zero.
    pub fn sum(&self) -> u64 {
        let total: i64 = self
            .shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum();
        total.max(0) as u64
    }
}

fn shard_of_this_thread() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SHARD.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
        }
        s.get()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_add_to_their_own_shards_and_the_sum_is_exact() {
        static T: Tally = Tally::new();
        assert_eq!(std::mem::align_of::<Shard>(), 128);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        T.add(2);
                    }
                    T.add(-1);
                });
            }
        });
        assert_eq!(T.sum(), 4 * 19_999);
        let gauge = Tally::new();
        gauge.add(-3);
        assert_eq!(
            gauge.sum(),
            0,
            "a gauge read mid-update never shows below zero"
        );
    }
}
