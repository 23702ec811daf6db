//! The FIFO wait queue: waiters in arrival order, with removal from anywhere.
//!
//! A `VecDeque` of (id, waiter) in increasing id order, with removed entries left as
//! tombstones and skipped. Ids are handed out one after another, so appending keeps the order
//! and a waiter sits `id - first` places in: one probe finds it. Only a compaction (the
//! tombstones outnumbering the live waiters) leaves gaps, and then a binary search of a window
//! as wide as the gaps does; the front is never a tombstone. Unlike a `BTreeMap`, a
//! queue that empties and refills (every handoff) keeps its buffer instead of freeing and
//! allocating a node each time. Tombstones are compacted once they outnumber live waiters.
//!
//! Beside it, a [`SlotTree`] of each entry's permits answers "how many permits are queued up to
//! this waiter" (its retry hint) and "who asks for more than this limit" (after a resize) in
//! O(log n). Entry `i` of the deque sits at slot `base + i`: popping the front moves `base`
//! instead of shifting every slot, and the tree is rebuilt (O(n), amortized O(1)) only when it
//! runs out of slots or the tombstones are compacted.

use std::collections::VecDeque;

use super::slot_tree::SlotTree;

/// What a queued entry weighs in the queue's sums: its permits.
pub(crate) trait Weighted {
    /// Permits asked for.
    fn weight(&self) -> u32;
}

impl Weighted for super::Waiter {
    fn weight(&self) -> u32 {
        self.permits
    }
}

/// One place of the queue: a waiter and its id, on a cache line of its own (a [`Waiter`] is
/// 48 bytes, so an entry is one aligned line): a cancel from the middle of a long queue finds
/// its entry cold, and an unaligned entry cost two misses instead of one.
///
/// [`Waiter`]: super::Waiter
#[derive(Debug, Clone)]
#[repr(align(64))]
struct Entry<W> {
    /// The waiter's id.
    id: u64,
    /// The waiter; `None` marks one that left from the middle (a tombstone).
    waiter: Option<W>,
}

#[derive(Debug, Clone)]
pub(crate) struct Queue<W> {
    /// The waiters in id order, tombstones included.
    entries: VecDeque<Entry<W>>,
    /// Live (non-tombstone) entries.
    live: usize,
    /// Permits of `entries` by slot (0 for tombstones and popped entries).
    weights: SlotTree,
    /// Slot of `entries[0]`.
    base: usize,
}

impl<W> Default for Queue<W> {
    fn default() -> Self {
        Queue {
            entries: VecDeque::new(),
            live: 0,
            weights: SlotTree::default(),
            base: 0,
        }
    }
}

impl<W: Weighted> Queue<W> {
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Appends; `id` must be larger than every id inserted before.
    pub(crate) fn insert(&mut self, id: u64, waiter: W) {
        debug_assert!(self.entries.back().is_none_or(|last| last.id < id));
        if self.base + self.entries.len() >= self.weights.capacity() {
            // Out of slots: laid out again, tombstones kept. Dropping them here would leave
            // gaps in the ids, and every lookup after that a binary search of cold entries
            // instead of one probe (the tombstones are few: `tidy` bounds them).
            self.rebuild(1, false);
        }
        self.weights
            .set(self.base + self.entries.len(), waiter.weight());
        self.entries.push_back(Entry {
            id,
            waiter: Some(waiter),
        });
        self.live += 1;
    }

    fn position(&self, id: u64) -> Option<usize> {
        // Waiter ids are handed out one after another and departures stay as tombstones, so
        // the entry sits `id - first` places in: found in one probe, where a binary search of
        // a 10k queue took 14 cache misses. Only a compaction or a restored snapshot leaves
        // gaps, and then the search finds it.
        let first = self.entries.front()?.id;
        let last = self.entries.back()?.id;
        let guess = usize::try_from(id.checked_sub(first)?).unwrap_or(usize::MAX);
        if self.entries.get(guess).is_some_and(|e| e.id == id) {
            return Some(guess);
        }
        // Ids missing between the front and the back (compacted away): the entry sits at
        // most that many places before its guess, so only that window is searched.
        let span = usize::try_from(last.checked_sub(first)?).unwrap_or(usize::MAX);
        let gaps = span.saturating_add(1).saturating_sub(self.entries.len());
        let (mut lo, mut hi) = (
            guess.saturating_sub(gaps),
            guess.min(self.entries.len() - 1) + 1,
        );
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.entries[mid].id.cmp(&id) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    pub(crate) fn contains_key(&self, id: &u64) -> bool {
        self.position(*id)
            .is_some_and(|i| self.entries[i].waiter.is_some())
    }

    pub(crate) fn get(&self, id: &u64) -> Option<&W> {
        let i = self.position(*id)?;
        self.entries[i].waiter.as_ref()
    }

    pub(crate) fn get_mut(&mut self, id: &u64) -> Option<&mut W> {
        let i = self.position(*id)?;
        self.entries[i].waiter.as_mut()
    }

    pub(crate) fn remove(&mut self, id: &u64) -> Option<W> {
        let i = self.position(*id)?;
        let waiter = self.entries[i].waiter.take()?;
        self.weights.set(self.base + i, 0);
        self.live -= 1;
        self.tidy();
        Some(waiter)
    }

    pub(crate) fn first_key_value(&self) -> Option<(&u64, &W)> {
        let front = self.entries.front()?;
        front.waiter.as_ref().map(|w| (&front.id, w))
    }

    pub(crate) fn pop_first(&mut self) -> Option<(u64, W)> {
        let Entry { id, waiter } = self.entries.pop_front()?;
        self.weights.set(self.base, 0);
        self.base += 1;
        let waiter = waiter?;
        self.live -= 1;
        self.tidy();
        Some((id, waiter))
    }

    /// Live waiters in arrival order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&u64, &W)> {
        self.entries
            .iter()
            .filter_map(|e| e.waiter.as_ref().map(|w| (&e.id, w)))
    }

    /// Permits of the live waiters up to and including `id`, in O(log n); `None` if `id` is
    /// not queued.
    pub(crate) fn permits_through(&self, id: u64) -> Option<u64> {
        let i = self.position(id)?;
        self.entries[i].waiter.as_ref()?;
        // Every slot before `base` is empty, so the sum from slot 0 is the sum from the front.
        Some(self.weights.prefix(self.base + i))
    }

    /// Ids of the live waiters asking for more than `bound` permits, in arrival order:
    /// O(log n) when there are none, O(k log n) for k found.
    pub(crate) fn heavier_than(&self, bound: u32) -> Vec<u64> {
        self.weights
            .above(bound)
            .into_iter()
            .filter_map(|slot| self.entries.get(slot.checked_sub(self.base)?))
            .filter(|e| e.waiter.is_some())
            .map(|e| e.id)
            .collect()
    }

    /// Empties the queue, returning the live waiters in order.
    pub(crate) fn drain(&mut self) -> Vec<(u64, W)> {
        self.live = 0;
        let out = self
            .entries
            .drain(..)
            .filter_map(|e| e.waiter.map(|w| (e.id, w)))
            .collect();
        self.rebuild(0, true);
        out
    }

    /// Keeps the front live and the tombstones fewer than the live waiters.
    fn tidy(&mut self) {
        while self.entries.front().is_some_and(|e| e.waiter.is_none()) {
            self.entries.pop_front();
            // A tombstone's slot is already 0.
            self.base += 1;
        }
        if self.entries.is_empty() {
            // Every slot is 0: start again from the first.
            self.base = 0;
        } else if self.entries.len() > 2 * self.live + 64 {
            self.rebuild(0, true);
        }
    }

    /// Lays the entries out again from slot 0, with room for at least as many again plus
    /// `extra`, so the next rebuild is as many appends away; drops the tombstones if `compact`.
    fn rebuild(&mut self, extra: usize, compact: bool) {
        if compact && self.entries.len() != self.live {
            self.entries.retain(|e| e.waiter.is_some());
        }
        self.base = 0;
        let weights = self
            .entries
            .iter()
            .map(|e| e.waiter.as_ref().map_or(0, Weighted::weight));
        self.weights
            .rebuild(2 * (self.entries.len() + extra), weights);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// In these tests a waiter is its own weight.
    impl Weighted for u64 {
        fn weight(&self) -> u32 {
            u32::try_from(*self).unwrap_or(u32::MAX)
        }
    }

    #[test]
    fn a_queue_entry_is_one_cache_line() {
        // The id and the waiter (its `Option` in a niche) fill at most the line.
        assert!(std::mem::size_of::<super::super::Waiter>() <= 56);
        assert_eq!(std::mem::size_of::<Entry<super::super::Waiter>>(), 64);
        assert_eq!(std::mem::align_of::<Entry<super::super::Waiter>>(), 64);
    }

    #[test]
    fn keeps_order_and_removes_from_anywhere() {
        let mut q = Queue::default();
        for id in [3u64, 5, 8, 9] {
            q.insert(id, id * 10);
        }
        assert_eq!(q.remove(&5), Some(50));
        assert_eq!(q.remove(&5), None);
        assert!(!q.contains_key(&5) && q.contains_key(&8));
        assert_eq!(q.first_key_value(), Some((&3, &30)));
        assert_eq!(q.remove(&3), Some(30));
        assert_eq!(
            q.first_key_value(),
            Some((&8, &80)),
            "the front skips tombstones"
        );
        assert_eq!(q.permits_through(8), Some(80));
        assert_eq!(q.pop_first(), Some((8, 80)));
        assert_eq!(q.len(), 1);
        assert_eq!(q.drain(), vec![(9, 90)]);
        assert!(q.is_empty());
    }

    #[test]
    fn tombstones_behind_a_waiting_head_are_compacted() {
        let mut q = Queue::default();
        q.insert(0, 0u64);
        for id in 1..10_000u64 {
            q.insert(id, id);
            q.remove(&id);
        }
        assert_eq!(q.len(), 1);
        assert!(q.entries.len() <= 2 * q.live + 65);
        assert!(q.weights.capacity() <= 256, "slots are reused, not grown");
    }

    #[test]
    fn growing_past_the_slots_keeps_the_ids_without_gaps() {
        // A few departures from the middle, then growth past every capacity: the ids stay
        // consecutive (tombstones kept), so each waiter is found at its guessed place.
        let mut q = Queue::default();
        for id in 0..10_000u64 {
            q.insert(id, 1u64);
            if id % 100 == 50 {
                assert_eq!(q.remove(&(id - 25)), Some(1));
            }
        }
        let (first, last) = (q.entries[0].id, q.entries[q.entries.len() - 1].id);
        assert_eq!(
            last - first + 1,
            q.entries.len() as u64,
            "no gaps in the ids"
        );
        for id in [0u64, 5_000, 9_999] {
            let at = q.position(id).expect("queued");
            assert_eq!(at as u64, id - first, "found at its guess");
        }
        assert_eq!(q.get(&25), None);
        assert_eq!(q.permits_through(9_999), Some(10_000 - 100));
    }

    #[test]
    fn finds_waiters_after_a_compaction_left_gaps_in_the_ids() {
        let mut q = Queue::default();
        for id in 0..300u64 {
            q.insert(id, 1);
        }
        // Every odd one leaves, then enough more to compact: ids are no longer consecutive.
        for id in (1..300u64).step_by(2).chain((2..200u64).step_by(2)) {
            assert_eq!(q.remove(&id), Some(1));
        }
        assert!(q.entries.len() < 150, "compacted");
        assert_eq!(q.get(&0), Some(&1));
        assert_eq!(q.get(&250), Some(&1));
        assert_eq!(q.get(&251), None);
        assert_eq!(q.permits_through(250), Some(1 + 26));
        assert_eq!(q.remove(&298), Some(1));
        assert_eq!(q.permits_through(296), Some(1 + 49));
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Append a waiter of this weight.
        Insert(u64),
        /// Remove the live waiter at this index (mod the live count), or an unknown id.
        Remove(usize),
        PopFirst,
        Through(usize),
        Heavier(u32),
        Drain,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (1u64..5).prop_map(Op::Insert),
            4 => (0usize..400).prop_map(Op::Remove),
            2 => Just(Op::PopFirst),
            3 => (0usize..400).prop_map(Op::Through),
            2 => (0u32..5).prop_map(Op::Heavier),
            1 => Just(Op::Drain),
        ]
    }

    proptest! {
        /// Against a plain vector of (id, weight) in order: every answer equal, whatever
        /// mix of appends and departures from the head, the middle and the tail.
        #[test]
        fn matches_a_plain_vector(ops in proptest::collection::vec(op(), 1..600)) {
            let mut q: Queue<u64> = Queue::default();
            let mut model: Vec<(u64, u64)> = Vec::new();
            let mut next_id = 0u64;
            for op in ops {
                match op {
                    Op::Insert(w) => {
                        q.insert(next_id, w);
                        model.push((next_id, w));
                        next_id += 1;
                    }
                    Op::Remove(i) => {
                        if model.is_empty() {
                            prop_assert_eq!(q.remove(&next_id), None);
                        } else {
                            let (id, w) = model.remove(i % model.len());
                            prop_assert_eq!(q.remove(&id), Some(w));
                            prop_assert_eq!(q.remove(&id), None);
                        }
                    }
                    Op::PopFirst => {
                        let want = (!model.is_empty()).then(|| model.remove(0));
                        prop_assert_eq!(q.pop_first(), want);
                    }
                    Op::Through(i) => {
                        if let Some((id, _)) = model.get(i % model.len().max(1)) {
                            let pos = i % model.len();
                            let want: u64 = model[..=pos].iter().map(|(_, w)| *w).sum();
                            prop_assert_eq!(q.permits_through(*id), Some(want));
                        }
                        prop_assert_eq!(q.permits_through(next_id), None);
                    }
                    Op::Heavier(bound) => {
                        let want: Vec<u64> = model
                            .iter()
                            .filter(|(_, w)| *w > u64::from(bound))
                            .map(|(id, _)| *id)
                            .collect();
                        prop_assert_eq!(q.heavier_than(bound), want);
                    }
                    Op::Drain => {
                        prop_assert_eq!(q.drain(), std::mem::take(&mut model));
                    }
                }
                prop_assert_eq!(q.len(), model.len());
                prop_assert_eq!(q.first_key_value().map(|(id, w)| (*id, *w)), model.first().copied());
                let listed: Vec<(u64, u64)> = q.iter().map(|(id, w)| (*id, *w)).collect();
                prop_assert_eq!(&listed, &model);
            }
        }
    }
}
