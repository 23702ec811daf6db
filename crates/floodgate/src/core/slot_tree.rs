//! Permits of the queued waiters by arrival slot, in a segment tree: the sum of any prefix
//! (the permits ahead of a waiter, for its retry hint) and every slot above a bound (the
//! waiters a lowered limit makes impossible) in O(log n), where walking the queue was O(n).
//!
//! A plain array-backed tree: leaves at `[cap, 2 cap)`, node `i`'s children at `2i` and
//! `2i + 1`, the root at 1. Each node keeps both the sum and the maximum of its leaves. A
//! departed waiter is a zero leaf, so the queue's tombstones and its popped front cost nothing
//! here; the queue rebuilds the tree only when it runs out of slots or compacts.

/// One node: the sum of the leaves below it (permits may add up past `u32`), and the largest
/// (lets a search skip every subtree with nothing above a bound). Side by side, so an update
/// of a cold slot misses the cache once per level, not twice.
#[derive(Debug, Clone, Copy, Default)]
struct Node {
    sum: u64,
    max: u32,
}

/// Sums and maxima of the permits by slot.
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotTree {
    /// The nodes, root at 1, leaves at `[cap, 2 cap)`.
    nodes: Vec<Node>,
    /// Number of leaves, a power of two (0 before the first use).
    cap: usize,
}

impl Node {
    fn leaf(weight: u32) -> Self {
        Node {
            sum: u64::from(weight),
            max: weight,
        }
    }

    fn join(a: Node, b: Node) -> Self {
        Node {
            sum: a.sum + b.sum,
            max: a.max.max(b.max),
        }
    }
}

impl SlotTree {
    /// Slots available: `0..capacity()`.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Resets to at least `slots` zero leaves, then fills the first ones with `weights`, in
    /// O(capacity). Capacity is a power of two, at least 16, so small queues never reallocate.
    pub(crate) fn rebuild(&mut self, slots: usize, weights: impl Iterator<Item = u32>) {
        let cap = slots.max(16).next_power_of_two();
        self.cap = cap;
        self.nodes.clear();
        self.nodes.resize(2 * cap, Node::default());
        for (slot, w) in weights.take(cap).enumerate() {
            self.nodes[cap + slot] = Node::leaf(w);
        }
        for i in (1..cap).rev() {
            self.nodes[i] = Node::join(self.nodes[2 * i], self.nodes[2 * i + 1]);
        }
    }

    /// Sets one slot (`slot < capacity()`); 0 marks it empty.
    pub(crate) fn set(&mut self, slot: usize, weight: u32) {
        debug_assert!(slot < self.cap);
        let mut i = self.cap + slot;
        if self.nodes[i].max == weight {
            return; // Emptying an empty slot (a tombstone popped off the front).
        }
        self.nodes[i] = Node::leaf(weight);
        while i > 1 {
            i /= 2;
            self.nodes[i] = Node::join(self.nodes[2 * i], self.nodes[2 * i + 1]);
        }
    }

    /// Sum of slots `0..=slot`.
    pub(crate) fn prefix(&self, slot: usize) -> u64 {
        let (mut l, mut r) = (self.cap, self.cap + (slot + 1).min(self.cap));
        let mut total = 0;
        while l < r {
            if l & 1 == 1 {
                total += self.nodes[l].sum;
                l += 1;
            }
            if r & 1 == 1 {
                r -= 1;
                total += self.nodes[r].sum;
            }
            l /= 2;
            r /= 2;
        }
        total
    }

    /// The largest weight in any slot (0 when empty).
    pub(crate) fn max(&self) -> u32 {
        self.nodes.get(1).map_or(0, |n| n.max)
    }

    /// Every slot whose weight is above `bound`, in increasing order: O(k log n) for k found.
    pub(crate) fn above(&self, bound: u32) -> Vec<usize> {
        let mut found = Vec::new();
        if self.max() <= bound {
            return found;
        }
        let mut stack = vec![1usize];
        while let Some(node) = stack.pop() {
            if self.nodes[node].max <= bound {
                continue;
            }
            if node >= self.cap {
                found.push(node - self.cap);
            } else {
                // Right pushed first so the left (earlier slots) comes out first.
                stack.push(2 * node + 1);
                stack.push(2 * node);
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

    #[test]
    fn an_unbuilt_tree_is_empty() {
        let tree = SlotTree::default();
        assert_eq!((tree.capacity(), tree.max(), tree.prefix(5)), (0, 0, 0));
        assert!(tree.above(0).is_empty());
    }
}
