//! An entry of a min-heap of deadlines: ordered by its time alone, so what it carries (a
//! channel name, a connection) is never compared.

use std::cmp::Ordering;

/// `item` is due at `at`; in a `BinaryHeap<Reverse<Due<_, _>>>` the earliest comes first.
#[derive(Debug)]
pub struct Due<At, T> {
    pub at: At,
    pub item: T,
}

impl<At: Ord, T> PartialEq for Due<At, T> {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl<At: Ord, T> Eq for Due<At, T> {}

impl<At: Ord, T> PartialOrd for Due<At, T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<At: Ord, T> Ord for Due<At, T> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.at.cmp(&other.at)
    }
}
