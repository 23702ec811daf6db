//! Property test: random operations on a keyed limiter against an independent witness that
//! keeps its own ledger of who holds what and who waits, and checks after every step that the
//! total and every key's limit hold, that the layer agrees with the ledger, that waiters of a
//! key are served in FIFO order, that nobody times out early, and that no capacity is left idle
//! while a waiter could use it (the reference model's work conservation, extended to keys).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use proptest::prelude::*;

use super::super::*;
use crate::core::{AcquireRequest, Admission, Effects, WaitOutcome, WaiterId};
use crate::types::FencingToken;

const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        key: usize,
        permits: u32,
        wait_ms: u64,
        lease_ms: u64,
    },
    Release(usize),
    Extend(usize, u64),
    Cancel(usize),
    Tick(u64),
    Override {
        key: usize,
        limit: Option<u32>,
        weight: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS.len(), 1..=3u32, 0..40u64, 5..60u64).prop_map(|(key, permits, wait_ms, lease_ms)| {
            Op::Acquire { key, permits, wait_ms, lease_ms }
        }),
        2 => any::<usize>().prop_map(Op::Release),
        1 => (any::<usize>(), 1..60u64).prop_map(|(i, ms)| Op::Extend(i, ms)),
        1 => any::<usize>().prop_map(Op::Cancel),
        2 => (1..30u64).prop_map(Op::Tick),
        1 => (0..KEYS.len(), prop::option::of(1..=4u32), 1..=3u32)
            .prop_map(|(key, limit, weight)| Op::Override { key, limit, weight }),
    ]
}

/// The witness: what it saw granted, released, extended and queued.
#[derive(Default)]
struct Witness {
    /// token -> (key, permits, lease deadline)
    held: BTreeMap<u64, (usize, u32, Timestamp)>,
    /// waiter -> (key, permits, deadline)
    queued: BTreeMap<u64, (usize, u32, Timestamp)>,
    /// The last waiter id granted per key (FIFO within a key).
    last_served: HashMap<usize, u64>,
    last_token: u64,
    limits: [Option<u32>; 4],
    per_key: u32,
}

impl Witness {
    fn lapse(&mut self, now: Timestamp) {
        self.held.retain(|_, (_, _, d)| *d > now);
    }

    /// A grant: never above its key's limit in force (a lowered limit lets holders finish,
    /// so the check is at each grant).
    fn granted(&mut self, key: usize, permits: u32, token: FencingToken, deadline: Timestamp) {
        assert!(token.0 > self.last_token, "fencing tokens increase");
        self.last_token = token.0;
        self.held.insert(token.0, (key, permits, deadline));
        let limit = self.limits[key].unwrap_or(self.per_key);
        let used = self.in_use(Some(key));
        assert!(
            used <= limit,
            "{} granted over its limit: {used} > {limit}",
            KEYS[key]
        );
    }

    fn outcome(&mut self, now: Timestamp, id: WaiterId, out: &WaitOutcome) {
        let (key, permits, deadline) = self.queued.remove(&id.0).expect("a queued waiter");
        match out {
            Ok(g) => {
                assert!(
                    self.last_served.get(&key).is_none_or(|l| *l < id.0),
                    "FIFO within a key"
                );
                self.last_served.insert(key, id.0);
                assert_eq!(g.permits, permits);
                self.granted(key, permits, g.token, g.lease_deadline);
            }
            Err(crate::core::Refusal::WaitTimeout { .. }) => {
                assert!(deadline <= now, "timed out before its deadline");
            }
            Err(_) => {}
        }
    }

    fn in_use(&self, key: Option<usize>) -> u32 {
        self.held
            .values()
            .filter(|(k, _, _)| key.is_none_or(|x| x == *k))
            .map(|(_, p, _)| p)
            .sum()
    }
}

fn check(w: &Witness, total: &LimiterCore, layer: &KeyLayer, total_limit: u32, per_key: u32) {
    assert!(w.in_use(None) <= total_limit, "total over its limit");
    assert_eq!(
        total.in_use(),
        w.in_use(None),
        "the total agrees with the ledger"
    );
    assert_eq!(layer.waiting(), w.queued.len());
    layer.check_heads();
    let mut heads: Vec<(u32, bool)> = Vec::new();
    for (i, key) in KEYS.iter().enumerate() {
        let limit = w.limits[i].unwrap_or(per_key);
        let used = w.in_use(Some(i));
        let info = layer.key_info(key);
        assert_eq!(
            info.as_ref().map_or(0, |k| k.in_use),
            used,
            "{key} agrees with the ledger"
        );
        let head = w
            .queued
            .iter()
            .find(|(_, (k, _, _))| *k == i)
            .map(|(_, (_, p, _))| *p);
        if head.is_none() && used == 0 {
            assert!(info.is_none(), "{key} idle but kept");
        }
        if let Some(p) = head {
            heads.push((p, used + p <= limit));
        }
    }
    // Work conservation: if every key whose head its own limit allows also fits the total,
    // one of them should have been granted.
    let free = total_limit - w.in_use(None);
    let ready: Vec<u32> = heads
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(p, _)| *p)
        .collect();
    assert!(
        ready.is_empty() || ready.iter().any(|p| *p > free),
        "idle capacity {free} while heads {ready:?} could run"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn keyed_limits_hold_against_the_witness(
        total_limit in 1..=6u32,
        per_key in 1..=4u32,
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let spec = LimiterSpec::concurrency(total_limit)
            .with_max_wait(Duration::from_millis(40))
            .with_max_queue(1_000);
        let (mut total, mut layer) = KeyLayer::new(spec, KeyedSpec::per_key(per_key), 1).expect("valid");
        let mut w = Witness { per_key, ..Witness::default() };
        let mut now = Timestamp(0);
        for op in ops {
            let mut fx = Effects::default();
            w.lapse(now);
            match op {
                Op::Acquire { key, permits, wait_ms, lease_ms } => {
                    let req = AcquireRequest {
                        permits,
                        wait: Some(Duration::from_millis(wait_ms)),
                        lease: Some(Duration::from_millis(lease_ms)),
                        ..AcquireRequest::default()
                    };
                    match layer.acquire(&mut total, now, KEYS[key], &req, &mut fx) {
                        Admission::Granted(g) => w.granted(key, permits, g.token, g.lease_deadline),
                        Admission::Queued(id) => {
                            w.queued.insert(id.0, (key, permits, now.after(Duration::from_millis(wait_ms))));
                        }
                        Admission::Refused(_) => {}
                    }
                }
                Op::Release(i) => {
                    let tokens: Vec<u64> = w.held.keys().copied().collect();
                    if let Some(token) = tokens.get(i % tokens.len().max(1)) {
                        prop_assert!(layer.release(&mut total, now, FencingToken(*token), &mut fx));
                        w.held.remove(token);
                    }
                }
                Op::Extend(i, ms) => {
                    let tokens: Vec<u64> = w.held.keys().copied().collect();
                    if let Some(token) = tokens.get(i % tokens.len().max(1)) {
                        let out = layer.extend(&mut total, now, FencingToken(*token), Duration::from_millis(ms), &mut fx);
                        let deadline = out.expect("valid lease").expect("held");
                        if let Some(h) = w.held.get_mut(token) { h.2 = deadline; }
                    }
                }
                Op::Cancel(i) => {
                    let ids: Vec<u64> = w.queued.keys().copied().collect();
                    if let Some(id) = ids.get(i % ids.len().max(1)) {
                        // A waiter already decided by this call's time advance is not cancelled.
                        if layer.cancel(&mut total, now, WaiterId(*id), &mut fx) {
                            w.queued.remove(id);
                        }
                    }
                }
                Op::Tick(ms) => {
                    now = now.after(Duration::from_millis(ms));
                    w.lapse(now);
                    layer.advance(&mut total, now, &mut fx);
                }
                Op::Override { key, limit, weight } => {
                    let ov = KeyOverride { concurrency: limit, weight };
                    layer.put_override(&mut total, now, KEYS[key], Some(ov), &mut fx).expect("valid");
                    w.limits[key] = limit;
                }
            }
            for (id, out) in &fx.wakes {
                w.outcome(now, *id, out);
            }
            check(&w, &total, &layer, total_limit, per_key);
        }
    }
}
