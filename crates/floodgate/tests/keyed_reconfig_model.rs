//! Adversarial review of the keyed layer (h-krev16): random schedules that mix run-time
//! changes (the total raised, lowered or removed, the per-key default changed or removed,
//! `max_keys` lowered below the keys in use, overrides set, changed and removed, weights
//! changed) with acquires, releases, extends, cancels, wait time-outs, lease lapses and
//! snapshot round trips (the durable store's `to_state`/`from_state`, through JSON), on a fake
//! clock. An independent witness keeps its own ledger of what is held per key and in total
//! and of who waits, and checks after every step:
//!
//! - no grant ever takes the total or its key above the limit in force at that moment (a
//!   lowered limit lets holders finish, so the check is at each grant);
//! - every waiter is answered at most once, and, after a last long tick, every waiter has been
//!   answered, nothing is held and no key state is left (no lost wake-up, no leaked key);
//! - fencing tokens strictly increase (never reused);
//! - FIFO within a key, no time-out before its deadline, `permits_exceed_limit` only for a
//!   waiter that the limits in force can never grant;
//! - `too_many_keys` only when `max_keys` keys are active, and a new key admitted only below it;
//! - a grant made at once never overtakes another key's head that only the total holds back;
//! - no idle capacity while a head its own limit allows fits the total (work conservation);
//! - the layer's per-key and total counts agree with the ledger, and an idle key is dropped.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use floodgate::core::keyed::{KeyLayer, KeyLayerState, KeyOverride, KeyedSpec};
use floodgate::core::{
    AcquireRequest, Admission, CoreState, Effects, LimiterCore, Refusal, WaitOutcome, WaiterId,
};
use floodgate::{FencingToken, LimiterSpec, Timestamp};
use proptest::prelude::*;

const KEYS: [&str; 5] = ["k0", "k1", "k2", "k3", "k4"];

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
    RemoveOverride(usize),
    Reconfigure {
        total: Option<u32>,
        per_key: Option<u32>,
        max_keys: u32,
    },
    Snapshot,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..KEYS.len(), 1..=3u32, prop_oneof![Just(0u64), 1..60u64], 5..80u64)
            .prop_map(|(key, permits, wait_ms, lease_ms)| Op::Acquire { key, permits, wait_ms, lease_ms }),
        3 => any::<usize>().prop_map(Op::Release),
        1 => (any::<usize>(), 1..60u64).prop_map(|(i, ms)| Op::Extend(i, ms)),
        1 => any::<usize>().prop_map(Op::Cancel),
        2 => (1..30u64).prop_map(Op::Tick),
        1 => (0..KEYS.len(), prop::option::of(1..=4u32), 1..=4u32)
            .prop_map(|(key, limit, weight)| Op::Override { key, limit, weight }),
        1 => (0..KEYS.len()).prop_map(Op::RemoveOverride),
        1 => (prop::option::of(1..=6u32), prop::option::of(1..=4u32), 1..=6u32)
            .prop_map(|(total, per_key, max_keys)| Op::Reconfigure { total, per_key, max_keys }),
        1 => Just(Op::Snapshot),
    ]
}

fn spec(total: Option<u32>) -> LimiterSpec {
    let mut s = LimiterSpec::default();
    s.concurrency = total;
    s.with_max_wait(Duration::from_millis(60))
        .with_max_queue(1_000)
}

/// The witness: its own ledger, and the limits it set.
#[derive(Default)]
struct Witness {
    /// token -> (key, permits, lease deadline)
    held: BTreeMap<u64, (usize, u32, Timestamp)>,
    /// waiter -> (key, permits, wait deadline)
    queued: BTreeMap<u64, (usize, u32, Timestamp)>,
    /// Waiters answered or cancelled: never answered again.
    done: BTreeSet<u64>,
    /// Last waiter granted per key (FIFO within a key).
    last_served: HashMap<usize, u64>,
    last_token: u64,
    total: Option<u32>,
    per_key: Option<u32>,
    max_keys: u32,
    overrides: [Option<(Option<u32>, u32)>; 5],
}

impl Witness {
    fn key_limit(&self, key: usize) -> Option<u32> {
        self.overrides[key].and_then(|(c, _)| c).or(self.per_key)
    }

    fn in_use(&self, key: Option<usize>) -> u32 {
        self.held
            .values()
            .filter(|(k, _, _)| key.is_none_or(|x| x == *k))
            .map(|(_, p, _)| p)
            .sum()
    }

    fn lapse(&mut self, now: Timestamp) {
        self.held.retain(|_, (_, _, d)| *d > now);
    }

    /// Keys with holders or waiters (no rates here, so exactly the keys with state).
    fn active(&self) -> BTreeSet<usize> {
        let mut a: BTreeSet<usize> = self.held.values().map(|(k, _, _)| *k).collect();
        a.extend(self.queued.values().map(|(k, _, _)| *k));
        a
    }

    /// The largest request the limits in force could ever grant to `key`.
    fn cap(&self, key: usize) -> Option<u32> {
        [self.total, self.key_limit(key)]
            .into_iter()
            .flatten()
            .min()
    }

    /// Heads of every key's queue: (key, permits), oldest waiter first.
    fn heads(&self) -> Vec<(usize, u32)> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (k, p, _) in self.queued.values() {
            if seen.insert(*k) {
                out.push((*k, *p));
            }
        }
        out
    }

    /// Heads that only the total can hold back.
    fn own_ready(&self) -> Vec<(usize, u32)> {
        self.heads()
            .into_iter()
            .filter(|(k, p)| {
                self.key_limit(*k)
                    .is_none_or(|l| self.in_use(Some(*k)) + p <= l)
            })
            .collect()
    }

    fn granted(&mut self, key: usize, permits: u32, token: FencingToken, deadline: Timestamp) {
        assert!(
            token.0 > self.last_token,
            "fencing token {} reused or out of order (last {})",
            token.0,
            self.last_token
        );
        self.last_token = token.0;
        self.held.insert(token.0, (key, permits, deadline));
        if let Some(l) = self.key_limit(key) {
            let used = self.in_use(Some(key));
            assert!(used <= l, "{} over its limit: {used} > {l}", KEYS[key]);
        }
        if let Some(l) = self.total {
            let used = self.in_use(None);
            assert!(used <= l, "total over its limit: {used} > {l}");
        }
    }

    fn outcome(&mut self, now: Timestamp, id: WaiterId, out: &WaitOutcome) {
        assert!(self.done.insert(id.0), "waiter {} answered twice", id.0);
        let (key, permits, deadline) = self
            .queued
            .remove(&id.0)
            .unwrap_or_else(|| panic!("waiter {} answered but not queued", id.0));
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
            Err(Refusal::WaitTimeout { .. }) => {
                assert!(deadline <= now, "timed out before its deadline");
            }
            Err(Refusal::PermitsExceedLimit { requested, .. }) => {
                let cap = self.cap(key);
                assert!(
                    cap.is_some_and(|c| *requested > c),
                    "waiter of {} refused permits_exceed_limit for {requested} under cap {cap:?}",
                    KEYS[key]
                );
            }
            Err(other) => panic!("unexpected refusal of a waiter: {other:?}"),
        }
    }
}

fn check(w: &Witness, total: &LimiterCore, layer: &KeyLayer) {
    assert_eq!(total.in_use(), w.in_use(None), "total agrees with ledger");
    assert_eq!(
        layer.waiting(),
        w.queued.len(),
        "waiting agrees with ledger"
    );
    let active = w.active();
    for (i, key) in KEYS.iter().enumerate() {
        let info = layer.key_info(key);
        assert_eq!(
            info.as_ref().map_or(0, |k| k.in_use),
            w.in_use(Some(i)),
            "{key} in use agrees with the ledger"
        );
        if !active.contains(&i) {
            assert!(info.is_none(), "{key} idle but kept");
        }
        if let Some(info) = info {
            assert_eq!(info.limit, w.key_limit(i), "{key} limit in force");
            assert_eq!(
                info.weight,
                w.overrides[i].map_or(1, |(_, wt)| wt),
                "{key} weight in force"
            );
        }
    }
    assert_eq!(layer.key_count(), active.len(), "key count");
    // Work conservation: some own-ready head must be too big for what the total has free.
    let free = w.total.map(|l| l.saturating_sub(w.in_use(None)));
    let ready = w.own_ready();
    assert!(
        ready.is_empty() || free.is_some_and(|f| ready.iter().any(|(_, p)| *p > f)),
        "idle capacity {free:?} while heads {ready:?} could run"
    );
}

fn round_trip(total: &mut LimiterCore, layer: &KeyLayer) -> (LimiterCore, KeyLayer) {
    let t: CoreState = serde_json::from_str(&serde_json::to_string(&total.to_state()).unwrap())
        .expect("core state reads back");
    let l: KeyLayerState = serde_json::from_str(&serde_json::to_string(&layer.to_state()).unwrap())
        .expect("layer state reads back");
    (
        LimiterCore::from_state(&t).expect("core restores"),
        KeyLayer::from_state(&l).expect("layer restores"),
    )
}

fn run(total0: Option<u32>, per_key0: Option<u32>, ops: Vec<Op>) {
    let (total0, per_key0) = match (total0, per_key0) {
        (None, None) => (Some(3), None),
        other => other,
    };
    let keyed = KeyedSpec {
        concurrency: per_key0,
        max_keys: 4,
        ..KeyedSpec::default()
    };
    let (mut total, mut layer) = KeyLayer::new(spec(total0), keyed, 1).expect("valid");
    let mut w = Witness {
        total: total0,
        per_key: per_key0,
        max_keys: 4,
        ..Witness::default()
    };
    let mut now = Timestamp(1_000_000);
    for op in ops {
        let mut fx = Effects::default();
        match op {
            Op::Acquire {
                key,
                permits,
                wait_ms,
                lease_ms,
            } => {
                // The call applies time first: lapses before judging.
                let req = AcquireRequest {
                    permits,
                    wait: Some(Duration::from_millis(wait_ms)),
                    lease: Some(Duration::from_millis(lease_ms)),
                    ..AcquireRequest::default()
                };
                let ready_before = w.own_ready();
                let new_key = !w.active().contains(&key);
                let active_before = w.active().len();
                let a = layer.acquire(&mut total, now, KEYS[key], &req, &mut fx);
                match a {
                    Admission::Granted(g) => {
                        assert!(
                            ready_before.is_empty(),
                            "{} granted at once over heads {ready_before:?} held back by the total",
                            KEYS[key]
                        );
                        assert!(!new_key || active_before < w.max_keys as usize);
                        w.granted(key, permits, g.token, g.lease_deadline);
                    }
                    Admission::Queued(id) => {
                        assert!(!new_key || active_before < w.max_keys as usize);
                        let d = now.after(Duration::from_millis(wait_ms));
                        w.queued.insert(id.0, (key, permits, d));
                    }
                    Admission::Refused(Refusal::TooManyKeys { .. }) => {
                        assert!(new_key, "too_many_keys for an active key");
                        assert!(
                            active_before >= w.max_keys as usize,
                            "too_many_keys with {active_before} of {} keys",
                            w.max_keys
                        );
                    }
                    Admission::Refused(Refusal::PermitsExceedLimit { .. }) => {
                        assert!(w.cap(key).is_some_and(|c| permits > c));
                    }
                    Admission::Refused(Refusal::WaitTimeout { .. }) => {
                        assert_eq!(wait_ms, 0, "refused at once with a wait");
                    }
                    Admission::Refused(other) => panic!("unexpected refusal {other:?}"),
                }
            }
            Op::Release(i) => {
                let tokens: Vec<u64> = w.held.keys().copied().collect();
                if let Some(token) = tokens.get(i % tokens.len().max(1)) {
                    assert!(layer.release(&mut total, now, FencingToken(*token), &mut fx));
                    w.held.remove(token);
                    // A second release of the same token is refused.
                    assert!(!layer.release(&mut total, now, FencingToken(*token), &mut fx));
                }
            }
            Op::Extend(i, ms) => {
                let tokens: Vec<u64> = w.held.keys().copied().collect();
                if let Some(token) = tokens.get(i % tokens.len().max(1)) {
                    let out = layer.extend(
                        &mut total,
                        now,
                        FencingToken(*token),
                        Duration::from_millis(ms),
                        &mut fx,
                    );
                    let d = out.expect("valid lease").expect("held");
                    if let Some(h) = w.held.get_mut(token) {
                        h.2 = d;
                    }
                }
            }
            Op::Cancel(i) => {
                let ids: Vec<u64> = w.queued.keys().copied().collect();
                if let Some(id) = ids.get(i % ids.len().max(1)) {
                    if layer.cancel(&mut total, now, WaiterId(*id), &mut fx) {
                        w.queued.remove(id);
                        w.done.insert(*id);
                    }
                }
            }
            Op::Tick(ms) => {
                now = now.after(Duration::from_millis(ms));
                layer.advance(&mut total, now, &mut fx);
            }
            Op::Override { key, limit, weight } => {
                let ov = KeyOverride {
                    concurrency: limit,
                    weight,
                };
                let r = layer.put_override(&mut total, now, KEYS[key], Some(ov), &mut fx);
                let set = w.overrides.iter().filter(|o| o.is_some()).count();
                match r {
                    Ok(()) => w.overrides[key] = Some((limit, weight)),
                    // Overrides are bounded by `max_keys` too (a new one beyond it refused).
                    Err(e) => assert!(
                        e.field == "key"
                            && w.overrides[key].is_none()
                            && set >= w.max_keys as usize,
                        "override refused: {e:?}"
                    ),
                }
            }
            Op::RemoveOverride(key) => {
                let r = layer.put_override(&mut total, now, KEYS[key], None, &mut fx);
                r.expect("removing an override");
                w.overrides[key] = None;
            }
            Op::Reconfigure {
                total: t,
                per_key,
                max_keys,
            } => {
                let (t, per_key) = match (t, per_key) {
                    (None, None) => (None, Some(2)),
                    other => other,
                };
                let keyed = KeyedSpec {
                    concurrency: per_key,
                    max_keys,
                    ..KeyedSpec::default()
                };
                layer
                    .reconfigure(&mut total, now, spec(t), keyed, &mut fx)
                    .expect("a valid reconfiguration");
                (w.total, w.per_key, w.max_keys) = (t, per_key, max_keys);
            }
            Op::Snapshot => {
                (total, layer) = round_trip(&mut total, &layer);
            }
        }
        // Lapses happen as time is applied, before any grant this step made (grants are made
        // at `now` with leases of at least 5 ms).
        w.lapse(now);
        for (id, out) in &fx.wakes {
            w.outcome(now, *id, out);
        }
        check(&w, &total, &layer);
    }
    // Liveness: past every deadline, every waiter was answered and no state is left.
    // Two steps: a waiter granted (late, as of its deadline) by the first gets a lease that
    // starts then, and lapses by the second.
    for _ in 0..2 {
        let mut fx = Effects::default();
        now = now.after(Duration::from_secs(10));
        layer.advance(&mut total, now, &mut fx);
        w.lapse(now);
        for (id, out) in &fx.wakes {
            w.outcome(now, *id, out);
        }
    }
    assert!(
        w.queued.is_empty(),
        "waiters never answered: {:?}",
        w.queued
    );
    assert!(
        w.held.is_empty(),
        "held {:?} total in use {} now {now:?}",
        w.held,
        total.in_use()
    );
    check(&w, &total, &layer);
    assert_eq!(layer.key_count(), 0, "key state left behind");
    assert_eq!(total.in_use(), 0);
    let _ = layer.next_deadline(&mut total);
    assert_eq!(layer.footprint(), 0, "bookkeeping left behind");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("FLOODGATE_KEYED_RECONFIG_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400)
    ))]
    #[test]
    fn keyed_limits_hold_through_reconfiguration(
        total in prop::option::of(1..=6u32),
        per_key in prop::option::of(1..=4u32),
        ops in prop::collection::vec(op(), 1..160),
    ) {
        run(total, per_key, ops);
    }
}
