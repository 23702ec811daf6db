//! A min-heap of deadlines with lazy deletion.
//!
//! Releases and grants remove entries far more often than deadlines pass, so removal only marks
//! nothing: the owner says whether a popped entry is still live. The heap is rebuilt when stale
//! entries outnumber live ones, which keeps it O(live) in size and every operation amortized
//! O(log n) — cheaper on the hot path than a balanced tree.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::types::Timestamp;

#[derive(Debug, Default, Clone)]
pub(crate) struct DeadlineHeap {
    /// (deadline, key), earliest first.
    heap: BinaryHeap<Reverse<(Timestamp, u64)>>,
}

impl DeadlineHeap {
    pub(crate) fn push(&mut self, deadline: Timestamp, key: u64) {
        self.heap.push(Reverse((deadline, key)));
    }

    /// The earliest live entry, dropping stale ones on the way.
    pub(crate) fn peek_live(
        &mut self,
        is_live: impl Fn(u64, Timestamp) -> bool,
    ) -> Option<(Timestamp, u64)> {
        while let Some(&Reverse((deadline, key))) = self.heap.peek() {
            if is_live(key, deadline) {
                return Some((deadline, key));
            }
            self.heap.pop();
        }
        None
    }

    pub(crate) fn pop(&mut self) {
        self.heap.pop();
    }

    /// Drops stale entries once they are the majority. `live` is how many entries are live.
    pub(crate) fn compact(&mut self, live: usize, is_live: impl Fn(u64, Timestamp) -> bool) {
        if self.heap.len() > 2 * live + 64 {
            self.heap.retain(|Reverse((d, k))| is_live(*k, *d));
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}
