//! The FIFO wait queue: waiters in arrival order, with removal from anywhere.
//!
//! A `VecDeque` of (id, waiter) in increasing id order, with removed entries left as
//! tombstones and skipped. Ids are handed out in increasing order, so appending keeps the order
//! and a binary search finds any waiter; the front is never a tombstone. Unlike a `BTreeMap`, a
//! queue that empties and refills (every handoff) keeps its buffer instead of freeing and
//! allocating a node each time. Tombstones are compacted once they outnumber live waiters.

use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub(crate) struct Queue<W> {
    entries: VecDeque<(u64, Option<W>)>,
    /// Live (non-tombstone) entries.
    live: usize,
}

impl<W> Default for Queue<W> {
    fn default() -> Self {
        Queue {
            entries: VecDeque::new(),
            live: 0,
        }
    }
}

impl<W> Queue<W> {
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Appends; `id` must be larger than every id inserted before.
    pub(crate) fn insert(&mut self, id: u64, waiter: W) {
        debug_assert!(self.entries.back().is_none_or(|(last, _)| *last < id));
        self.entries.push_back((id, Some(waiter)));
        self.live += 1;
    }

    fn position(&self, id: u64) -> Option<usize> {
        self.entries.binary_search_by_key(&id, |(k, _)| *k).ok()
    }

    pub(crate) fn contains_key(&self, id: &u64) -> bool {
        self.position(*id)
            .is_some_and(|i| self.entries[i].1.is_some())
    }

    pub(crate) fn get(&self, id: &u64) -> Option<&W> {
        let i = self.position(*id)?;
        self.entries[i].1.as_ref()
    }

    pub(crate) fn get_mut(&mut self, id: &u64) -> Option<&mut W> {
        let i = self.position(*id)?;
        self.entries[i].1.as_mut()
    }

    pub(crate) fn remove(&mut self, id: &u64) -> Option<W> {
        let i = self.position(*id)?;
        let waiter = self.entries[i].1.take()?;
        self.live -= 1;
        self.tidy();
        Some(waiter)
    }

    pub(crate) fn first_key_value(&self) -> Option<(&u64, &W)> {
        let (id, waiter) = self.entries.front()?;
        waiter.as_ref().map(|w| (id, w))
    }

    pub(crate) fn pop_first(&mut self) -> Option<(u64, W)> {
        let (id, waiter) = self.entries.pop_front()?;
        let waiter = waiter?;
        self.live -= 1;
        self.tidy();
        Some((id, waiter))
    }

    /// Live waiters in arrival order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&u64, &W)> {
        self.entries
            .iter()
            .filter_map(|(id, w)| w.as_ref().map(|w| (id, w)))
    }

    /// Live waiters up to and including `id`.
    pub(crate) fn up_to(&self, id: u64) -> impl Iterator<Item = &W> {
        self.entries
            .iter()
            .take_while(move |(k, _)| *k <= id)
            .filter_map(|(_, w)| w.as_ref())
    }

    /// Empties the queue, returning the live waiters in order.
    pub(crate) fn drain(&mut self) -> Vec<(u64, W)> {
        self.live = 0;
        self.entries
            .drain(..)
            .filter_map(|(id, w)| w.map(|w| (id, w)))
            .collect()
    }

    /// Keeps the front live and the tombstones fewer than the live waiters.
    fn tidy(&mut self) {
        while self.entries.front().is_some_and(|(_, w)| w.is_none()) {
            self.entries.pop_front();
        }
        if self.entries.len() > 2 * self.live + 64 {
            self.entries.retain(|(_, w)| w.is_some());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(q.up_to(8).copied().collect::<Vec<_>>(), vec![80]);
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
    }
}
