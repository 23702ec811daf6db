//! Who listens for each queued waiter's outcome, by waiter id.
//!
//! Waiter ids are handed out one after another, so the listeners sit in a run indexed by
//! `id - first`: one probe of a 16-byte slot, where a hash map probed its control bytes and
//! then a bucket, two cold lines per cancel or wake-up in a queue of 10k. Holes are left where
//! a listener went and trimmed at both ends; an id that does not fit the run (far past its
//! end, or before its start) goes to a plain map beside it, and so does every listener of a
//! run whose holes come to outnumber them (memory stays O(listeners)).

use std::collections::VecDeque;

use crate::core::U64Map;

/// Holes allowed between the run's end and a new id before it goes to the map instead.
const MAX_GAP: u64 = 64;

/// One place of the run, aligned to its size (32 bytes for the store's listener): with the
/// run's buffer only 16-aligned, every other slot straddled two cache lines, and a cancel at
/// 10k waiters then missed on both.
#[repr(align(32))]
struct Slot<V>(Option<V>);

/// Values by waiter id.
pub(super) struct Listeners<V> {
    /// Values for ids `first .. first + run.len()`; `None` where nobody listens. Neither end
    /// is `None`.
    run: VecDeque<Slot<V>>,
    /// Id of `run[0]`.
    first: u64,
    /// Values in `run`.
    live: usize,
    /// Values whose ids did not fit the run when they came.
    others: U64Map<V>,
}

impl<V> Default for Listeners<V> {
    fn default() -> Self {
        Listeners {
            run: VecDeque::new(),
            first: 0,
            live: 0,
            others: U64Map::default(),
        }
    }
}

impl<V> Listeners<V> {
    /// Index of `id` in the run, if it falls inside it.
    fn index(&self, id: u64) -> Option<usize> {
        let at = usize::try_from(id.checked_sub(self.first)?).ok()?;
        (at < self.run.len()).then_some(at)
    }

    /// Sets the value of `id`, returning the one it replaces.
    pub(super) fn insert(&mut self, id: u64, value: V) -> Option<V> {
        if let Some(slot) = self.others.get_mut(&id) {
            return Some(std::mem::replace(slot, value));
        }
        if self.run.is_empty() {
            self.first = id;
        }
        if let Some(at) = self.index(id) {
            let old = self.run[at].0.replace(value);
            if old.is_none() {
                self.live += 1;
            }
            return old;
        }
        let end = self.first + self.run.len() as u64;
        if id >= end && id - end <= MAX_GAP {
            for _ in end..id {
                self.run.push_back(Slot(None));
            }
            self.run.push_back(Slot(Some(value)));
            self.live += 1;
            // The holes just added count against the run too.
            self.trim();
            return None;
        }
        self.others.insert(id, value)
    }

    pub(super) fn get(&self, id: &u64) -> Option<&V> {
        match self.index(*id).and_then(|at| self.run[at].0.as_ref()) {
            Some(v) => Some(v),
            None => self.others.get(id),
        }
    }

    /// Values held, in the run and beside it.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.live + self.others.len()
    }

    pub(super) fn get_mut(&mut self, id: &u64) -> Option<&mut V> {
        match self.index(*id) {
            Some(at) if self.run[at].0.is_some() => self.run[at].0.as_mut(),
            _ => self.others.get_mut(id),
        }
    }

    pub(super) fn remove(&mut self, id: &u64) -> Option<V> {
        if let Some(v) = self.index(*id).and_then(|at| self.run[at].0.take()) {
            self.live -= 1;
            self.trim();
            return Some(v);
        }
        self.others.remove(id)
    }

    /// Keeps both ends of the run filled, and the holes fewer than the values.
    fn trim(&mut self) {
        while self.run.front().is_some_and(|s| s.0.is_none()) {
            self.run.pop_front();
            self.first += 1;
        }
        while self.run.back().is_some_and(|s| s.0.is_none()) {
            self.run.pop_back();
        }
        if self.run.len() > 2 * self.live + 64 {
            let first = self.first;
            for (at, slot) in self.run.drain(..).enumerate() {
                if let Some(v) = slot.0 {
                    self.others.insert(first + at as u64, v);
                }
            }
            self.live = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Op {
        /// A new id after the last, `skip` ids later.
        Next(u64),
        /// An id already used (taken over, or back after it left).
        Again(usize),
        Remove(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => prop_oneof![8 => Just(0u64), 1 => 1u64..200].prop_map(Op::Next),
            1 => (0usize..500).prop_map(Op::Again),
            5 => (0usize..500).prop_map(Op::Remove),
        ]
    }

    proptest! {
        /// Against a hash map: every insert, get and remove answers the same.
        #[test]
        fn matches_a_hash_map(ops in proptest::collection::vec(op(), 1..600)) {
            let mut l = Listeners::default();
            let mut model: HashMap<u64, u64> = HashMap::new();
            let mut used: Vec<u64> = Vec::new();
            let mut next = 1_000u64;
            for (n, op) in ops.into_iter().enumerate() {
                let value = n as u64;
                match op {
                    Op::Next(skip) => {
                        next += skip;
                        prop_assert_eq!(l.insert(next, value), model.insert(next, value));
                        used.push(next);
                        next += 1;
                    }
                    Op::Again(i) if !used.is_empty() => {
                        let id = used[i % used.len()];
                        prop_assert_eq!(l.insert(id, value), model.insert(id, value));
                    }
                    Op::Remove(i) if !used.is_empty() => {
                        let id = used[i % used.len()];
                        prop_assert_eq!(l.remove(&id), model.remove(&id));
                    }
                    _ => {}
                }
                for id in used.iter().rev().take(20) {
                    prop_assert_eq!(l.get(id), model.get(id));
                    prop_assert_eq!(l.get_mut(id).copied(), model.get_mut(id).copied());
                }
                prop_assert!(l.run.len() <= 2 * l.live + 64 + MAX_GAP as usize + 1);
            }
        }
    }

    #[test]
    fn a_listener_slot_never_straddles_a_cache_line() {
        type Listener = (u64, Option<std::task::Waker>);
        assert_eq!(std::mem::size_of::<Slot<Listener>>(), 32);
        assert_eq!(std::mem::align_of::<Slot<Listener>>(), 32);
    }

    #[test]
    fn consecutive_ids_stay_in_the_run() {
        let mut l = Listeners::default();
        for id in 0..10_000u64 {
            l.insert(id, id);
            if id % 3 == 0 && id >= 50 {
                assert_eq!(l.remove(&(id - 50)), Some(id - 50));
            }
        }
        assert!(l.others.is_empty(), "nothing left the run");
        assert_eq!(l.get(&9_999), Some(&9_999));
        assert_eq!(l.get(&(9_999 - 50)), None);
        assert_eq!(l.get(&101), Some(&101));
        assert_eq!(l.get(&100), None, "left at 150");
    }
}
