//! Permits of the queued waiters by arrival slot: the sum of any prefix (the permits ahead of
//! a waiter, for its retry hint) and every slot above a bound (the waiters a lowered limit
//! makes impossible) in O(log n), where walking the queue was O(n).
//!
//! A tree of fan-out 16: the leaves are the slots' weights (4 bytes each), and each level
//! above keeps, for every group of 16 below, their sum and their maximum (the maximum lets a
//! search skip every group with nothing above a bound). A change walks 4 levels at 32k slots,
//! where a binary tree of 16-byte nodes walked 16 levels of a megabyte: at 10k waiters its
//! cold lower levels made a cancel in the middle of the queue cost 8 times one at 100.
//!
//! What a change touches is laid out to be one cache line per level: a group of 16 leaves is
//! one aligned line (so the sibling scan after its maximum left stays in it), and a node's sum
//! and maximum sit side by side in 16 aligned bytes (kept in two arrays, they were two cold
//! lines per level at 10k waiters).
//!
//! A departed waiter is a zero leaf, so the queue's tombstones and its popped front cost
//! nothing here; the queue rebuilds the tree only when it runs out of slots or compacts.

/// Children per node.
const FAN: usize = 16;

/// Sixteen leaves: one cache line, aligned as one.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Leaves([u32; FAN]);

/// One group of `FAN` entries of the level below: their sum and their maximum, together.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(16))]
struct Node {
    /// Sum of the group (permits may add up past `u32`).
    sum: u64,
    /// Maximum of the group.
    max: u32,
}

/// Sums and maxima of the permits by slot.
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotTree {
    /// Weight of each slot, by groups of `FAN`; `cap` slots in all.
    leaves: Vec<Leaves>,
    /// The levels above the leaves, lowest first; the last has a single node (the root).
    levels: Vec<Vec<Node>>,
    /// Number of leaves, a power of two (0 before the first use).
    cap: usize,
}

impl SlotTree {
    /// Slots available: `0..capacity()`.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Weight of `slot` (0 past the end).
    fn leaf(&self, slot: usize) -> Option<u32> {
        self.leaves.get(slot / FAN).map(|g| g.0[slot % FAN])
    }

    /// Resets to at least `slots` zero leaves, then fills the first ones with `weights`, in
    /// O(capacity). Capacity is a power of two, at least 16, so small queues never reallocate.
    pub(crate) fn rebuild(&mut self, slots: usize, weights: impl Iterator<Item = u32>) {
        let cap = slots.max(FAN).next_power_of_two();
        self.cap = cap;
        self.leaves.clear();
        self.leaves.resize(cap / FAN, Leaves::default());
        for (slot, w) in weights.take(cap).enumerate() {
            self.leaves[slot / FAN].0[slot % FAN] = w;
        }
        let mut depth = 0;
        let mut below = cap;
        while below > 1 {
            let size = below.div_ceil(FAN);
            if self.levels.len() <= depth {
                self.levels.push(Vec::new());
            }
            let (done, rest) = self.levels.split_at_mut(depth);
            let level = &mut rest[0];
            level.clear();
            for group in 0..size {
                let node = match done.last() {
                    None => self.leaves[group]
                        .0
                        .iter()
                        .fold(Node::default(), |n, w| Node {
                            sum: n.sum + u64::from(*w),
                            max: n.max.max(*w),
                        }),
                    Some(prev) => {
                        let span = group * FAN..((group + 1) * FAN).min(below);
                        prev[span].iter().fold(Node::default(), |n, c| Node {
                            sum: n.sum + c.sum,
                            max: n.max.max(c.max),
                        })
                    }
                };
                level.push(node);
            }
            below = size;
            depth += 1;
        }
        self.levels.truncate(depth);
    }

    /// Sets one slot (`slot < capacity()`); 0 marks it empty.
    pub(crate) fn set(&mut self, slot: usize, weight: u32) {
        debug_assert!(slot < self.cap);
        let Some(group) = self.leaves.get_mut(slot / FAN) else {
            return;
        };
        let old = group.0[slot % FAN];
        if old == weight {
            return; // Emptying an empty slot (a tombstone popped off the front).
        }
        group.0[slot % FAN] = weight;
        // The changed child's maximum before and after, while it still moves.
        let mut max_change = Some((old, weight));
        let mut index = slot;
        for depth in 0..self.levels.len() {
            let group = index / FAN;
            let (below, above) = self.levels.split_at_mut(depth);
            let node = &mut above[0][group];
            node.sum = node.sum - u64::from(old) + u64::from(weight);
            if let Some((was, now)) = max_change {
                let max = node.max;
                let new_max = if now >= max {
                    now
                } else if was == max {
                    // The child held the maximum and went down: look at its siblings.
                    match below.last() {
                        None => self.leaves[group].0.iter().copied().max(),
                        Some(prev) => {
                            let span = group * FAN..((group + 1) * FAN).min(prev.len());
                            prev[span].iter().map(|c| c.max).max()
                        }
                    }
                    .unwrap_or(0)
                } else {
                    max
                };
                node.max = new_max;
                max_change = (new_max != max).then_some((max, new_max));
            }
            index = group;
        }
    }

    /// Sum of slots `0..=slot`.
    pub(crate) fn prefix(&self, slot: usize) -> u64 {
        // The sum of `[0, end)`: at each level, the entries of `end`'s own group before it,
        // then the same one level up for the groups before.
        let mut end = (slot + 1).min(self.cap);
        let mut total: u64 = match self.leaves.get(end / FAN) {
            Some(group) => group.0[..end % FAN].iter().map(|w| u64::from(*w)).sum(),
            None => 0,
        };
        end /= FAN;
        for level in &self.levels {
            let start = end / FAN * FAN;
            total += level[start..end].iter().map(|n| n.sum).sum::<u64>();
            end /= FAN;
        }
        total
    }

    /// The largest weight in any slot (0 when empty).
    pub(crate) fn max(&self) -> u32 {
        self.levels
            .last()
            .and_then(|root| root.first())
            .map_or(0, |n| n.max)
    }

    /// Every slot whose weight is above `bound`, in increasing order: O(k log n) for k found.
    pub(crate) fn above(&self, bound: u32) -> Vec<usize> {
        let mut found = Vec::new();
        if self.max() <= bound {
            return found;
        }
        // (depth above the leaves, index at that depth); the root is the only entry on top.
        let mut stack = vec![(self.levels.len(), 0usize)];
        while let Some((depth, index)) = stack.pop() {
            if depth == 0 {
                found.push(index);
                continue;
            }
            let children = index * FAN..(index + 1) * FAN;
            // Pushed last-first so the earliest slots come out first.
            for child in children.rev() {
                let max = match depth - 1 {
                    0 => self.leaf(child),
                    d => self.levels[d - 1].get(child).map(|n| n.max),
                };
                if max.is_some_and(|m| m > bound) {
                    stack.push((depth - 1, child));
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Set(usize, u32),
        Prefix(usize),
        Above(u32),
        Rebuild(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0usize..70, 0u32..6).prop_map(|(s, w)| Op::Set(s, w)),
            3 => (0usize..70).prop_map(Op::Prefix),
            2 => (0u32..6).prop_map(Op::Above),
            1 => (0usize..70).prop_map(Op::Rebuild),
        ]
    }

    proptest! {
        /// Against a plain vector of weights: every answer equal after any sequence.
        #[test]
        fn matches_a_plain_vector(ops in proptest::collection::vec(op(), 1..200)) {
            let mut tree = SlotTree::default();
            tree.rebuild(0, std::iter::empty());
            let mut model: Vec<u32> = vec![0; tree.capacity()];
            for op in ops {
                match op {
                    Op::Set(slot, w) => {
                        let slot = slot % tree.capacity();
                        tree.set(slot, w);
                        model[slot] = w;
                    }
                    Op::Prefix(slot) => {
                        let want: u64 = model.iter().take(slot + 1).map(|w| u64::from(*w)).sum();
                        prop_assert_eq!(tree.prefix(slot), want);
                    }
                    Op::Above(bound) => {
                        let want: Vec<usize> = (0..model.len()).filter(|s| model[*s] > bound).collect();
                        prop_assert_eq!(tree.above(bound), want);
                    }
                    Op::Rebuild(slots) => {
                        // Keeps the first `slots` weights (as a compaction would after a shift).
                        let kept: Vec<u32> = model.iter().copied().take(slots).collect();
                        tree.rebuild(slots, kept.iter().copied());
                        model = kept;
                        model.resize(tree.capacity(), 0);
                    }
                }
                prop_assert_eq!(tree.max(), model.iter().copied().max().unwrap_or(0));
            }
        }
    }

    proptest! {
        /// Trees of three and four levels (up to 8k slots), against a plain vector: each
        /// change checked by every answer at a few slots spread over the whole range.
        #[test]
        fn deep_trees_match_a_plain_vector(
            slots in 0usize..5_000,
            sets in proptest::collection::vec((0usize..1 << 13, 0u32..4), 1..200),
            bound in 0u32..4,
        ) {
            let mut tree = SlotTree::default();
            tree.rebuild(slots, (0..slots).map(|s| (s % 3) as u32));
            let mut model: Vec<u32> = (0..tree.capacity()).map(|s| if s < slots { (s % 3) as u32 } else { 0 }).collect();
            for (slot, w) in sets {
                let slot = slot % tree.capacity();
                tree.set(slot, w);
                model[slot] = w;
                for probe in [0, slot, slot / 2, model.len() - 1] {
                    let want: u64 = model[..=probe].iter().map(|w| u64::from(*w)).sum();
                    prop_assert_eq!(tree.prefix(probe), want);
                }
                prop_assert_eq!(tree.max(), model.iter().copied().max().unwrap_or(0));
            }
            let want: Vec<usize> = (0..model.len()).filter(|s| model[*s] > bound).collect();
            prop_assert_eq!(tree.above(bound), want);
        }
    }

    #[test]
    fn an_unbuilt_tree_is_empty() {
        let tree = SlotTree::default();
        assert_eq!((tree.capacity(), tree.max(), tree.prefix(5)), (0, 0, 0));
        assert!(tree.above(0).is_empty());
    }
}
