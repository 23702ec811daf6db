//! Deadlines, earliest first, with lazy deletion.
//!
//! Releases and grants remove entries far more often than deadlines pass, so removal only marks
//! nothing: the owner says whether a popped entry is still live. Stale entries are dropped when
//! they reach the front, or all at once when they outnumber live ones, which keeps the
//! structure O(live) in size.
//!
//! Two lanes. Deadlines mostly arrive in order (waits and leases of one length, given out as
//! time passes), so an entry no earlier than the last one in order joins a plain queue: O(1)
//! to add, to look at and to take, touching only its two ends. Only an entry that arrives out
//! of order (a shorter wait than the one before, an extend) goes to a min-heap, which therefore
//! holds only those. A single heap of 10k waits paid a cold walk of 14 levels each time a
//! short wait was added and each time the earliest was taken.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use crate::types::Timestamp;

#[derive(Debug, Default, Clone)]
pub(crate) struct DeadlineHeap {
    /// (deadline, key) entries that arrived in order: sorted, earliest at the front.
    ordered: VecDeque<(Timestamp, u64)>,
    /// (deadline, key) entries that arrived earlier than the back of `ordered`, earliest first.
    heap: BinaryHeap<Reverse<(Timestamp, u64)>>,
}

impl DeadlineHeap {
    #[inline]
    pub(crate) fn push(&mut self, deadline: Timestamp, key: u64) {
        let entry = (deadline, key);
        if self.ordered.back().is_none_or(|last| *last <= entry) {
            self.ordered.push_back(entry);
        } else {
            self.heap.push(Reverse(entry));
        }
    }

    /// Drops the entry now, if it is the latest in order: the grant released before any later
    /// one was given out (the uncontended pair) leaves no stale entry for a compaction to sweep.
    /// Any other entry stays, to be dropped lazily.
    #[inline]
    pub(crate) fn forget_latest(&mut self, deadline: Timestamp, key: u64) {
        if self.ordered.back() == Some(&(deadline, key)) {
            self.ordered.pop_back();
        }
    }

    /// The earliest live entry, dropping stale ones on the way.
    pub(crate) fn peek_live(
        &mut self,
        is_live: impl Fn(u64, Timestamp) -> bool,
    ) -> Option<(Timestamp, u64)> {
        while let Some(&(deadline, key)) = self.ordered.front() {
            if is_live(key, deadline) {
                break;
            }
            self.ordered.pop_front();
        }
        while let Some(&Reverse((deadline, key))) = self.heap.peek() {
            if is_live(key, deadline) {
                break;
            }
            self.heap.pop();
        }
        self.first()
    }

    /// The earliest entry, live or not.
    fn first(&self) -> Option<(Timestamp, u64)> {
        let ordered = self.ordered.front().copied();
        let heaped = self.heap.peek().map(|Reverse(e)| *e);
        match (ordered, heaped) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Drops the earliest entry (the one `peek_live` just returned).
    pub(crate) fn pop(&mut self) {
        let ordered = self.ordered.front().copied();
        let heaped = self.heap.peek().map(|Reverse(e)| *e);
        match (ordered, heaped) {
            (Some(a), Some(b)) if b < a => {
                self.heap.pop();
            }
            (Some(_), _) => {
                self.ordered.pop_front();
            }
            (None, _) => {
                self.heap.pop();
            }
        }
    }

    /// Drops stale entries once they are the majority. `live` is how many entries are live.
    #[inline]
    pub(crate) fn compact(&mut self, live: usize, is_live: impl Fn(u64, Timestamp) -> bool) {
        if self.ordered.len() + self.heap.len() > 2 * live + 64 {
            self.ordered.retain(|(d, k)| is_live(*k, *d));
            self.heap.retain(|Reverse((d, k))| is_live(*k, *d));
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ordered.len() + self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Add (deadline, key): deadlines drawn from a small range, so ties and disorder occur.
        Push(u64, u64),
        /// Mark the live entry at this index (mod the live count) stale.
        Kill(usize),
        /// Take the earliest live entry.
        Pop,
        Compact,
        /// Mark the most recently pushed entry stale and tell the structure (`forget_latest`).
        ForgetLatest,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..40, 0u64..8).prop_map(|(d, k)| Op::Push(d, k)),
            2 => (0usize..100).prop_map(Op::Kill),
            3 => Just(Op::Pop),
            1 => Just(Op::Compact),
            2 => Just(Op::ForgetLatest),
        ]
    }

    proptest! {
        /// Against a sorted list of the live entries: the same earliest entry after any mix
        /// of in-order and out-of-order pushes, stale marks, pops and compactions.
        #[test]
        fn gives_the_earliest_live_entry_like_a_sorted_list(
            ops in proptest::collection::vec(op(), 1..300)
        ) {
            let mut heap = DeadlineHeap::default();
            // Live entries; an entry is live while it is in this list.
            let mut live: Vec<(Timestamp, u64)> = Vec::new();
            let mut next_key = 0u64;
            let mut latest: Option<(Timestamp, u64)> = None;
            for op in ops {
                match op {
                    Op::Push(d, k) => {
                        // Keys unique (as tokens and waiter ids are), order varied by `k`.
                        let key = next_key * 8 + k;
                        next_key += 1;
                        heap.push(Timestamp(d), key);
                        live.push((Timestamp(d), key));
                        latest = Some((Timestamp(d), key));
                    }
                    Op::ForgetLatest => {
                        if let Some((d, k)) = latest {
                            live.retain(|x| *x != (d, k));
                            heap.forget_latest(d, k);
                        }
                    }
                    Op::Kill(i) => {
                        if !live.is_empty() {
                            let i = i % live.len();
                            live.remove(i);
                        }
                    }
                    Op::Pop => {
                        let set = live.clone();
                        let is_live = |k, d| set.contains(&(d, k));
                        let got = heap.peek_live(is_live);
                        let want = live.iter().copied().min();
                        prop_assert_eq!(got, want);
                        if let Some(e) = want {
                            heap.pop();
                            live.retain(|x| *x != e);
                        }
                    }
                    Op::Compact => {
                        let set = live.clone();
                        heap.compact(live.len(), |k, d| set.contains(&(d, k)));
                        prop_assert!(heap.len() <= 2 * live.len() + 64 || heap.len() == live.len());
                    }
                }
                prop_assert!(heap.len() >= live.len());
            }
        }
    }

    #[test]
    fn in_order_deadlines_never_reach_the_heap() {
        let mut heap = DeadlineHeap::default();
        for k in 0..1000u64 {
            heap.push(Timestamp(100 + k / 3), k);
        }
        assert!(heap.heap.is_empty(), "sorted arrivals stay in the queue");
        heap.push(Timestamp(50), 5_000);
        assert_eq!(heap.heap.len(), 1, "an earlier one goes to the heap");
        assert_eq!(heap.peek_live(|_, _| true), Some((Timestamp(50), 5_000)));
        heap.pop();
        assert_eq!(heap.peek_live(|_, _| true), Some((Timestamp(100), 0)));
        // Stale fronts are skipped.
        assert_eq!(heap.peek_live(|k, _| k >= 10), Some((Timestamp(103), 10)));
    }
}
