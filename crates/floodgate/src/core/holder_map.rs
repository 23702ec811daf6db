//! The grants out, by fencing token, found without hashing on the hot path.
//!
//! Tokens are handed out in sequence, so a grant's token modulo a power of two is a slot that
//! a recent grant has to itself: the uncontended acquire + release pair writes and clears one
//! slot, with no hash and no probing. A grant still held when a later token lands on its slot
//! (a long hold among many short ones) moves once to an ordinary map beside the ring; the ring
//! doubles while more than half its slots are taken. Memory stays O(grants held at the peak),
//! every operation O(1), and lookups by token (a release by id over HTTP) work as before.

use std::sync::Arc;

use super::{Holder, U64Map};
use crate::types::Timestamp;

/// Smallest ring allocated (at the first grant): a limiter that never grants allocates nothing.
const MIN_RING: usize = 16;

/// What a release needs of the grant it ends.
#[derive(Debug)]
pub(crate) struct Released {
    /// Permits given back. As wide as the other fields: returned through the stack, a 4-byte
    /// field was written with a 4-byte store and read back with an 8-byte load, which the CPU
    /// cannot forward (a stall on every release).
    pub(crate) permits: u64,
    /// Its lease deadline: the deadline queue's entry to forget.
    pub(crate) deadline: Timestamp,
    /// When it was granted: the hold time the retry hint averages.
    pub(crate) granted_at: Timestamp,
    /// Its idempotency key, to forget.
    pub(crate) request: Option<Arc<str>>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct HolderMap {
    /// Recent grants at `token % ring.len()` (a power of two, or empty before the first grant),
    /// each with its token, since a slot is shared by every `ring.len()`-th token.
    ring: Vec<Option<(u64, Holder)>>,
    /// How many slots of `ring` are taken: drives its growth, and `len`.
    in_ring: usize,
    /// Grants moved out of the ring by a later token taking their slot: the long holds.
    overflow: U64Map<Holder>,
}

impl HolderMap {
    #[inline]
    fn slot(&self, token: u64) -> usize {
        // `ring.len()` is a power of two; the mask keeps the result below it.
        let mask = self.ring.len().saturating_sub(1) as u64;
        usize::try_from(token & mask).unwrap_or(0)
    }

    /// The grant with this token.
    pub(crate) fn get(&self, token: &u64) -> Option<&Holder> {
        match self.ring.get(self.slot(*token)) {
            Some(Some((t, h))) if t == token => Some(h),
            _ if self.overflow.is_empty() => None,
            _ => self.overflow.get(token),
        }
    }

    /// The grant with this token, to change it.
    pub(crate) fn get_mut(&mut self, token: &u64) -> Option<&mut Holder> {
        let slot = self.slot(*token);
        if let Some(Some((t, _))) = self.ring.get(slot) {
            if t == token {
                return self.ring[slot].as_mut().map(|(_, h)| h);
            }
        }
        self.overflow.get_mut(token)
    }

    /// Whether a grant with this token is out.
    pub(crate) fn contains_key(&self, token: &u64) -> bool {
        self.get(token).is_some()
    }

    /// Records a grant; returns the one it replaces, if the token was already out.
    #[inline(always)]
    pub(crate) fn insert(&mut self, token: u64, holder: Holder) -> Option<Holder> {
        // The uncontended grant: nothing moved aside, room in the ring, its slot free. The
        // holder is written straight into the slot (inlined into `grant`, built in place),
        // not passed by pointer and copied: that copy cost a store-forwarding stall per grant.
        if self.overflow.is_empty() && 2 * (self.in_ring + 1) <= self.ring.len() {
            let slot = self.slot(token);
            if let Some(entry @ None) = self.ring.get_mut(slot) {
                *entry = Some((token, holder));
                self.in_ring += 1;
                return None;
            }
        }
        self.insert_slow(token, holder)
    }

    /// [`insert`](Self::insert) when the token may be out already, the ring must grow or the
    /// slot is taken.
    #[inline(never)]
    fn insert_slow(&mut self, token: u64, holder: Holder) -> Option<Holder> {
        // A token lives in one place: one already moved aside is replaced there.
        if !self.overflow.is_empty() {
            if let Some(old) = self.overflow.get_mut(&token) {
                return Some(std::mem::replace(old, holder));
            }
        }
        if 2 * (self.in_ring + 1) > self.ring.len() {
            self.grow();
        }
        let slot = self.slot(token);
        match self.ring[slot].replace((token, holder)) {
            Some((t, old)) if t == token => Some(old),
            Some((t, other)) => {
                // An earlier grant still held: it moves aside, for good.
                self.overflow.insert(t, other);
                None
            }
            None => {
                self.in_ring += 1;
                None
            }
        }
    }

    /// Removes the grant with this token and returns what a release reads of it: its
    /// permits, lease deadline, grant time and idempotency key. The rest is dropped where it
    /// lies: moving the whole holder out cost the release a store-forwarding stall.
    #[inline]
    pub(crate) fn remove_released(&mut self, token: u64) -> Option<Released> {
        let slot = self.slot(token);
        if let Some(entry) = self.ring.get_mut(slot) {
            if let Some((t, h)) = entry {
                if *t == token {
                    let released = Released {
                        permits: u64::from(h.permits),
                        deadline: h.deadline,
                        granted_at: h.granted_at,
                        request: h.request.take(),
                    };
                    *entry = None;
                    self.in_ring -= 1;
                    return Some(released);
                }
            }
        }
        if self.overflow.is_empty() {
            return None;
        }
        self.overflow.remove(&token).map(|h| Released {
            permits: u64::from(h.permits),
            deadline: h.deadline,
            granted_at: h.granted_at,
            request: h.request,
        })
    }

    /// Removes the grant with this token.
    pub(crate) fn remove(&mut self, token: &u64) -> Option<Holder> {
        let slot = self.slot(*token);
        if let Some(Some((t, _))) = self.ring.get(slot) {
            if t == token {
                self.in_ring -= 1;
                return self.ring[slot].take().map(|(_, h)| h);
            }
        }
        if self.overflow.is_empty() {
            return None;
        }
        self.overflow.remove(token)
    }

    /// Grants out.
    pub(crate) fn len(&self) -> usize {
        self.in_ring + self.overflow.len()
    }

    /// Every grant, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&u64, &Holder)> {
        self.ring
            .iter()
            .flatten()
            .map(|(t, h)| (t, h))
            .chain(self.overflow.iter())
    }

    /// Doubles the ring, placing its grants again (one whose new slot is taken moves aside).
    fn grow(&mut self) {
        let size = (2 * self.ring.len()).max(MIN_RING);
        let old = std::mem::take(&mut self.ring);
        self.ring.resize_with(size, || None);
        self.in_ring = 0;
        for (token, holder) in old.into_iter().flatten() {
            let slot = self.slot(token);
            match &self.ring[slot] {
                Some(_) => {
                    self.overflow.insert(token, holder);
                }
                None => {
                    self.ring[slot] = Some((token, holder));
                    self.in_ring += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::types::Timestamp;

    fn holder(permits: u32) -> Holder {
        Holder {
            permits,
            deadline: Timestamp(u64::from(permits)),
            granted_at: Timestamp(0),
            lease: Duration::from_millis(1),
            label: None,
            request: None,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Grant the next token (tokens only grow, as a limiter's do), or skip this many first.
        Grant(u64),
        /// Release the held token at this index (mod the count).
        Release(usize),
        /// Release a token that is not held.
        ReleaseUnknown(u64),
        /// Change a held grant's permits (an extend).
        Touch(usize, u32),
        /// Insert again a held token (replaces, as a map does).
        Reinsert(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => prop_oneof![Just(0u64), 1u64..40].prop_map(Op::Grant),
            5 => (0usize..64).prop_map(Op::Release),
            1 => (0u64..10_000).prop_map(Op::ReleaseUnknown),
            1 => (0usize..64, 1u32..9).prop_map(|(i, p)| Op::Touch(i, p)),
            1 => (0usize..64).prop_map(Op::Reinsert),
        ]
    }

    proptest! {
        /// Against a plain map: the same answers to every insert, get, remove, length and
        /// listing, whatever mix of short and long holds moves grants aside or grows the ring.
        #[test]
        fn behaves_like_a_map(
            first in 0u64..1_000,
            ops in proptest::collection::vec(op(), 1..400),
        ) {
            let mut map = HolderMap::default();
            let mut model: std::collections::BTreeMap<u64, u32> = Default::default();
            let mut next = first;
            let mut peak = 0usize;
            for op in ops {
                let held: Vec<u64> = model.keys().copied().collect();
                match op {
                    Op::Grant(skip) => {
                        next += skip;
                        let permits = u32::try_from(next % 7).unwrap_or(0) + 1;
                        prop_assert!(map.insert(next, holder(permits)).is_none());
                        model.insert(next, permits);
                        next += 1;
                    }
                    Op::Release(i) if !held.is_empty() => {
                        let token = held[i % held.len()];
                        // Both ways out: a whole holder (expiry), or its parts (a release).
                        let got = if i % 2 == 0 {
                            map.remove(&token).map(|h| h.permits)
                        } else {
                            map.remove_released(token).and_then(|r| u32::try_from(r.permits).ok())
                        };
                        prop_assert_eq!(got, model.remove(&token));
                        prop_assert!(map.remove(&token).is_none());
                        prop_assert!(map.remove_released(token).is_none());
                    }
                    Op::ReleaseUnknown(t) => {
                        let t = if model.contains_key(&t) { next + 10_000 + t } else { t };
                        prop_assert!(map.remove(&t).is_none());
                        prop_assert!(map.remove_released(t).is_none());
                        prop_assert!(map.get(&t).is_none());
                    }
                    Op::Touch(i, p) if !held.is_empty() => {
                        let token = held[i % held.len()];
                        if let Some(h) = map.get_mut(&token) {
                            h.permits = p;
                        }
                        model.insert(token, p);
                    }
                    Op::Reinsert(i) if !held.is_empty() => {
                        let token = held[i % held.len()];
                        let old = map.insert(token, holder(3)).map(|h| h.permits);
                        prop_assert_eq!(old, model.insert(token, 3));
                    }
                    _ => {}
                }
                prop_assert_eq!(map.len(), model.len());
                let mut listed: Vec<(u64, u32)> = map.iter().map(|(t, h)| (*t, h.permits)).collect();
                listed.sort_unstable();
                let want: Vec<(u64, u32)> = model.iter().map(|(t, p)| (*t, *p)).collect();
                prop_assert_eq!(listed, want);
                for (t, p) in &model {
                    prop_assert_eq!(map.get(t).map(|h| h.permits), Some(*p));
                    prop_assert!(map.contains_key(t));
                }
                // Bounded: at most four slots per grant held at the peak (or the minimum).
                peak = peak.max(model.len());
                prop_assert!(map.ring.len() <= (4 * peak).max(MIN_RING));
            }
        }
    }

    #[test]
    fn the_uncontended_pair_stays_in_one_small_ring_beside_a_long_hold() {
        let mut map = HolderMap::default();
        map.insert(1, holder(1)); // held throughout
        for token in 2..100_000u64 {
            map.insert(token, holder(1));
            assert!(map.remove_released(token).is_some());
        }
        assert_eq!(map.len(), 1);
        assert!(map.get(&1).is_some());
        assert_eq!(map.ring.len(), MIN_RING);
        assert_eq!(map.overflow.len(), 1, "the long hold moved aside once");
    }
}
