//! Fair sharing under run-time weight changes, mixed request sizes, random release order and a
//! key held back by its own limit (h-krev16), on the keyed layer with a fake clock. Counts, not
//! times: every key is backlogged far beyond the window, and each window's grants are counted
//! in permits per key against the weights in force (generous ±10 % bounds).
//!
//! The existing `core::keyed::tests` check fixed weights 3:1 and equal weights with grants
//! released oldest first and one permit each; here the releases come in a seeded random order,
//! requests ask for 1 to 3 permits, weights change mid-run (and an override is removed), and
//! a key at its own limit with a backlog of thousands must hold back nobody.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use floodgate::core::keyed::{KeyLayer, KeyOverride, KeyedSpec};
use floodgate::core::{AcquireRequest, Admission, Effects, LimiterCore, WaiterId};
use floodgate::{FencingToken, LimiterSpec, Timestamp};

struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

struct Sim {
    total: LimiterCore,
    layer: KeyLayer,
    limit: u32,
    now: Timestamp,
    /// Held grants: token, key, permits.
    held: Vec<(FencingToken, String, u32)>,
    owner: HashMap<WaiterId, (String, u32)>,
    /// Permits granted per key since the window began.
    window: HashMap<String, u64>,
    rng: XorShift,
}

impl Sim {
    fn new(limit: u32, seed: u64) -> Sim {
        let spec = LimiterSpec::concurrency(limit)
            .with_default_lease(Duration::from_secs(80_000))
            .with_max_wait(Duration::from_secs(3_600))
            .with_max_queue(1_000_000);
        let (total, layer) = KeyLayer::new(spec, KeyedSpec::default(), 1).unwrap();
        Sim {
            total,
            layer,
            limit,
            now: Timestamp(1_000_000),
            held: Vec::new(),
            owner: HashMap::new(),
            window: HashMap::new(),
            rng: XorShift(seed),
        }
    }

    fn take(&mut self, fx: Effects) {
        for (id, out) in fx.wakes {
            let (key, permits) = self.owner.remove(&id).expect("a known waiter");
            let g = out.expect("only grants here");
            assert_eq!(g.permits, permits);
            *self.window.entry(key.clone()).or_default() += u64::from(permits);
            self.held.push((g.token, key, permits));
        }
    }

    fn enqueue(&mut self, key: &str, permits: u32) {
        let req = AcquireRequest {
            permits,
            ..AcquireRequest::default()
        };
        let mut fx = Effects::default();
        match self
            .layer
            .acquire(&mut self.total, self.now, key, &req, &mut fx)
        {
            Admission::Granted(g) => {
                *self.window.entry(key.to_owned()).or_default() += u64::from(permits);
                self.held.push((g.token, key.to_owned(), permits));
            }
            Admission::Queued(id) => {
                self.owner.insert(id, (key.to_owned(), permits));
            }
            Admission::Refused(r) => panic!("refused {r:?}"),
        }
        self.take(fx);
    }

    /// Releases a random holder other than those of `keep` a millisecond later.
    fn step(&mut self, keep: Option<&str>) {
        self.now = self.now.after(Duration::from_millis(1));
        let candidates: Vec<usize> = (0..self.held.len())
            .filter(|i| keep.is_none_or(|k| self.held[*i].1 != k))
            .collect();
        let i = candidates[self.rng.below(candidates.len() as u64) as usize];
        let (token, _, _) = self.held.swap_remove(i);
        let mut fx = Effects::default();
        assert!(self
            .layer
            .release(&mut self.total, self.now, token, &mut fx));
        self.take(fx);
        let in_use: u32 = self.held.iter().map(|h| h.2).sum();
        assert_eq!(in_use, self.total.in_use(), "the witness agrees");
        assert!(in_use <= self.limit, "total over its limit");
    }

    fn set_weight(&mut self, key: &str, weight: Option<u32>, limit: Option<u32>) {
        let mut fx = Effects::default();
        let ov = weight.map(|weight| KeyOverride {
            concurrency: limit,
            weight,
        });
        self.layer
            .put_override(&mut self.total, self.now, key, ov, &mut fx)
            .unwrap();
        self.take(fx);
    }

    /// Runs `grants` releases and checks each key's share of the permits granted against its
    /// weight, within ±10 %.
    fn window_shares(&mut self, releases: usize, weights: &[(&str, u32)], keep: Option<&str>) {
        self.window.clear();
        for _ in 0..releases {
            self.step(keep);
        }
        let total: u64 = weights
            .iter()
            .map(|(k, _)| self.window.get(*k).copied().unwrap_or(0))
            .sum();
        let weight_sum: u32 = weights.iter().map(|(_, w)| w).sum();
        eprintln!("weights {weights:?}: permits granted {:?}", self.window);
        for (key, w) in weights {
            let got = self.window.get(*key).copied().unwrap_or(0) as f64 / total as f64;
            let want = f64::from(*w) / f64::from(weight_sum);
            assert!(
                (got - want).abs() <= 0.10 * want,
                "{key}: share {got:.3}, want {want:.3} ±10% (window {:?})",
                self.window
            );
        }
    }
}

#[test]
fn weights_changed_at_run_time_take_effect_in_the_next_windows() {
    for seed in [7, 0x9E37_79B9, 12_345] {
        let mut sim = Sim::new(6, seed);
        sim.set_weight("A", Some(1), None);
        sim.set_weight("B", Some(3), None);
        for _ in 0..12_000 {
            sim.enqueue("A", 1);
            sim.enqueue("B", 1);
        }
        sim.window_shares(3_000, &[("A", 1), ("B", 3)], None);
        // Swapped while both are backlogged (and one of them mid-turn).
        sim.set_weight("A", Some(3), None);
        sim.set_weight("B", Some(1), None);
        sim.window_shares(3_000, &[("A", 3), ("B", 1)], None);
        // B's override removed: weight 1 again, A keeps 3; then A's removed too.
        sim.set_weight("B", None, None);
        sim.window_shares(3_000, &[("A", 3), ("B", 1)], None);
        sim.set_weight("A", None, None);
        sim.window_shares(3_000, &[("A", 1), ("B", 1)], None);
    }
}

#[test]
fn permits_not_requests_are_shared_by_weight() {
    for seed in [3, 99, 0xDEAD_BEEF] {
        let mut sim = Sim::new(8, seed);
        let weights = [("s", 1), ("m", 2), ("l", 4), ("x", 1)];
        for (k, w) in weights {
            sim.set_weight(k, Some(w), None);
        }
        // s asks 1 permit at a time, m 2, l 3, x 1 to 3 at random.
        for i in 0..9_000u32 {
            sim.enqueue("s", 1);
            sim.enqueue("m", 2);
            sim.enqueue("l", 3);
            sim.enqueue("x", 1 + i % 3);
        }
        sim.window_shares(4_000, &weights, None);
    }
}

#[test]
fn a_key_at_its_own_limit_with_a_huge_backlog_holds_back_nobody() {
    let mut sim = Sim::new(5, 42);
    // C may hold 1 and weighs the most; its backlog is the largest and came first.
    sim.set_weight("C", Some(10), Some(1));
    for _ in 0..5_000 {
        sim.enqueue("C", 1);
    }
    for _ in 0..5_000 {
        sim.enqueue("A", 1);
        sim.enqueue("B", 1);
    }
    // C's one permit is never released: A and B share the other 4 equally, and every
    // release is handed on at once (the total stays full).
    sim.window.clear();
    for _ in 0..4_000 {
        sim.step(Some("C"));
        assert_eq!(sim.total.in_use(), 5, "idle capacity while A and B wait");
    }
    assert_eq!(sim.window.get("C").copied().unwrap_or(0), 0);
    let (a, b) = (sim.window["A"] as f64, sim.window["B"] as f64);
    assert!((a / b - 1.0).abs() <= 0.10, "A {a} B {b}");
    let c = sim.layer.key_info("C").unwrap();
    assert_eq!((c.in_use, c.holders), (1, 1));
}
