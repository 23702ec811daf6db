//! The keyed layer's rules, in virtual time: fairness, per-key limits, idle keys dropped.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use super::*;
use crate::core::{AcquireRequest, Admission, Effects, Refusal, WaiterId};
use crate::types::FencingToken;

mod adopt_model;
mod drr_skip;
mod model;
mod rate_model;
mod reservations;

const MS: u64 = 1_000;

fn t(ms: u64) -> Timestamp {
    Timestamp(ms * MS)
}

fn spec(total: Option<u32>) -> LimiterSpec {
    LimiterSpec {
        concurrency: total,
        ..LimiterSpec::default()
    }
    .with_default_lease(Duration::from_secs(3600))
    .with_max_wait(Duration::from_secs(3600))
    .with_max_queue(1_000_000)
}

fn req(permits: u32) -> AcquireRequest {
    AcquireRequest {
        permits,
        ..AcquireRequest::default()
    }
}

/// A keyed limiter driven by hand: every grant is held until `step` releases the oldest one,
/// one millisecond later, so capacity frees one permit at a time.
struct Sim {
    total: LimiterCore,
    layer: KeyLayer,
    now: Timestamp,
    /// Grants held, oldest first, with their key.
    held: VecDeque<(FencingToken, String)>,
    /// Whose each queued waiter is.
    owner: HashMap<WaiterId, String>,
    /// Every grant's key, in grant order.
    grants: Vec<String>,
}

impl Sim {
    fn new(total: Option<u32>, keyed: KeyedSpec) -> Sim {
        let (total, layer) = KeyLayer::new(spec(total), keyed, 1).expect("valid");
        Sim {
            total,
            layer,
            now: t(0),
            held: VecDeque::new(),
            owner: HashMap::new(),
            grants: Vec::new(),
        }
    }

    fn take(&mut self, fx: Effects) {
        for (id, outcome) in fx.wakes {
            let key = self.owner.remove(&id).expect("a known waiter");
            let grant = outcome.expect("only grants in these tests");
            self.grants.push(key.clone());
            self.held.push_back((grant.token, key));
        }
    }

    fn acquire(&mut self, key: &str, n: usize) {
        for _ in 0..n {
            let mut fx = Effects::default();
            match self
                .layer
                .acquire(&mut self.total, self.now, key, &req(1), &mut fx)
            {
                Admission::Granted(g) => {
                    self.grants.push(key.to_owned());
                    self.held.push_back((g.token, key.to_owned()));
                }
                Admission::Queued(id) => {
                    self.owner.insert(id, key.to_owned());
                }
                Admission::Refused(r) => panic!("refused: {r:?}"),
            }
            self.take(fx);
        }
    }

    /// Releases the oldest grant a millisecond later.
    fn step(&mut self) {
        self.now = self.now.after(Duration::from_millis(1));
        let (token, _) = self.held.pop_front().expect("something held");
        let mut fx = Effects::default();
        assert!(self
            .layer
            .release(&mut self.total, self.now, token, &mut fx));
        self.take(fx);
    }
}

#[test]
fn small_keys_are_served_within_their_fair_share_of_a_large_backlog() {
    let mut sim = Sim::new(Some(10), KeyedSpec::default());
    sim.acquire("A", 1_000);
    assert_eq!(sim.grants.len(), 10);
    let small: Vec<String> = (1..=9).map(|i| format!("org-{i}")).collect();
    let mut arrived_at = HashMap::new();
    for key in &small {
        // Each small key arrives after a few of A's grants have gone by.
        for _ in 0..3 {
            sim.step();
        }
        arrived_at.insert(key.clone(), sim.grants.len());
        sim.acquire(key, 10);
    }
    while sim.grants.len() < 1_090 {
        sim.step();
    }
    for key in &small {
        let from = arrived_at[key];
        let last = sim.grants.iter().rposition(|k| k == key).expect("granted");
        let count = sim.grants.iter().filter(|k| *k == key).count();
        assert_eq!(count, 10, "{key}");
        assert!(
            last - from < 200,
            "{key}: its last grant came {} grants after it arrived",
            last - from
        );
    }

    // The same arrivals on a plain FIFO limiter: every small key waits behind A's 1,000.
    let mut fifo = LimiterCore::new(spec(Some(10)), 1).expect("valid");
    let mut owner = HashMap::new();
    let mut held = VecDeque::new();
    let mut grants: Vec<String> = Vec::new();
    let mut now = t(0);
    let mut fx = Effects::default();
    let arrive = |fifo: &mut LimiterCore,
                  key: &str,
                  now,
                  held: &mut VecDeque<_>,
                  grants: &mut Vec<String>,
                  owner: &mut HashMap<_, _>| {
        match fifo.acquire(now, &req(1), &mut Effects::default()) {
            Admission::Granted(g) => {
                grants.push(key.to_owned());
                held.push_back(g.token);
            }
            Admission::Queued(id) => {
                owner.insert(id, key.to_owned());
            }
            Admission::Refused(r) => panic!("refused: {r:?}"),
        }
    };
    for _ in 0..1_000 {
        arrive(&mut fifo, "A", now, &mut held, &mut grants, &mut owner);
    }
    let mut release = |fifo: &mut LimiterCore,
                       now: &mut Timestamp,
                       held: &mut VecDeque<FencingToken>,
                       grants: &mut Vec<String>,
                       owner: &mut HashMap<WaiterId, String>| {
        *now = now.after(Duration::from_millis(1));
        let token = held.pop_front().expect("held");
        assert!(fifo.release(*now, token, &mut fx));
        for (id, outcome) in fx.wakes.drain(..) {
            grants.push(owner.remove(&id).expect("known"));
            held.push_back(outcome.expect("granted").token);
        }
    };
    for key in &small {
        for _ in 0..3 {
            release(&mut fifo, &mut now, &mut held, &mut grants, &mut owner);
        }
        for _ in 0..10 {
            arrive(&mut fifo, key, now, &mut held, &mut grants, &mut owner);
        }
    }
    while grants.len() < 1_090 {
        release(&mut fifo, &mut now, &mut held, &mut grants, &mut owner);
    }
    let first_small = grants.iter().position(|k| k != "A").expect("small granted");
    assert_eq!(first_small, 1_000, "FIFO serves all of A's first");
}

#[test]
fn weights_share_a_contended_total_in_their_ratio() {
    let mut sim = Sim::new(Some(10), KeyedSpec::default());
    let mut fx = Effects::default();
    let heavy = KeyOverride {
        concurrency: None,
        weight: 3,
    };
    sim.layer
        .put_override(&mut sim.total, sim.now, "heavy", Some(heavy), &mut fx)
        .expect("valid override");
    sim.acquire("heavy", 5_000);
    sim.acquire("light", 5_000);
    let start = sim.grants.len();
    for _ in 0..4_000 {
        sim.step();
    }
    let window = &sim.grants[start..];
    let heavy = window.iter().filter(|k| *k == "heavy").count() as f64;
    let light = window.iter().filter(|k| *k == "light").count() as f64;
    let ratio = heavy / light;
    assert!(
        (ratio - 3.0).abs() <= 0.15,
        "shares {heavy}:{light} = {ratio:.3}, want 3 within 5%"
    );
}

/// Jain's fairness index of the shares: 1 when equal, 1/n when one takes everything.
fn jain(shares: &[f64]) -> f64 {
    let sum: f64 = shares.iter().sum();
    let squares: f64 = shares.iter().map(|x| x * x).sum();
    sum * sum / (shares.len() as f64 * squares)
}

#[test]
fn equal_weight_backlogged_keys_share_equally() {
    let mut sim = Sim::new(Some(10), KeyedSpec::default());
    // Backlogs of very different sizes, all larger than the window.
    for (i, backlog) in [3_000, 1_500, 800, 700, 650].into_iter().enumerate() {
        sim.acquire(&format!("k{i}"), backlog);
    }
    let start = sim.grants.len();
    for _ in 0..3_000 {
        sim.step();
    }
    let window = &sim.grants[start..];
    let shares: Vec<f64> = (0..5)
        .map(|i| window.iter().filter(|k| **k == format!("k{i}")).count() as f64)
        .collect();
    let index = jain(&shares);
    assert!(index >= 0.99, "Jain's index {index:.4} of {shares:?}");
    assert!(jain(&[1.0, 0.0]) < 0.6, "the index can fail");
}

#[test]
fn per_key_limit_holds_and_does_not_block_other_keys() {
    let mut sim = Sim::new(Some(10), KeyedSpec::per_key(3));
    sim.acquire("A", 20);
    assert_eq!(sim.grants.len(), 3, "A stops at its own limit");
    sim.acquire("B", 20);
    assert_eq!(sim.grants.len(), 6, "B is not held back by A's waiters");
    let info = sim.layer.key_info("A").expect("A active");
    assert_eq!((info.in_use, info.waiting), (3, 17));
    for _ in 0..30 {
        sim.step();
        for key in ["A", "B"] {
            assert!(sim.layer.key_info(key).is_none_or(|k| k.in_use <= 3));
        }
    }
}

#[test]
fn a_new_key_beyond_max_keys_is_refused_and_idle_keys_are_dropped() {
    let mut sim = Sim::new(Some(10), KeyedSpec::per_key(1).with_max_keys(2));
    sim.acquire("a", 1);
    sim.acquire("b", 1);
    let mut fx = Effects::default();
    let third = sim
        .layer
        .acquire(&mut sim.total, sim.now, "c", &req(1), &mut fx);
    assert!(
        matches!(
            third,
            Admission::Refused(Refusal::TooManyKeys { max_keys: 2, .. })
        ),
        "{third:?}"
    );
    sim.step();
    assert_eq!(sim.layer.key_count(), 1, "a released and idle: dropped");
    sim.acquire("c", 1);
    assert_eq!(sim.layer.key_count(), 2);
}

#[test]
fn a_hundred_thousand_keys_used_once_leave_no_state() {
    let mut sim = Sim::new(
        Some(50),
        KeyedSpec::per_key(2).with_rate(RateSpec::per(1_000, Duration::from_secs(1))),
    );
    for i in 0..100_000u32 {
        sim.acquire(&format!("tenant-{i}"), 1);
        if sim.held.len() >= 50 {
            sim.step();
        }
        if i % 10_000 == 0 {
            assert!(sim.layer.key_count() <= 100, "bounded while running");
        }
    }
    while !sim.held.is_empty() {
        sim.step();
    }
    // Once the per-key rate debt has passed (a millisecond here), nothing is left.
    let mut fx = Effects::default();
    let later = sim.now.after(Duration::from_secs(1));
    sim.layer.advance(&mut sim.total, later, &mut fx);
    assert_eq!(sim.layer.key_count(), 0);
    assert_eq!(
        sim.layer.next_deadline(&mut sim.total),
        None,
        "nothing armed"
    );
    assert_eq!(sim.layer.footprint(), 0);
    assert_eq!(sim.total.in_use(), 0);
}

#[test]
fn waiters_time_out_leases_lapse_and_keys_follow() {
    let mut total_spec = spec(Some(1));
    total_spec.max_wait = Duration::from_secs(5);
    total_spec.default_lease = Duration::from_secs(10);
    let (mut total, mut layer) = KeyLayer::new(total_spec, KeyedSpec::per_key(1), 1).expect("ok");
    let mut fx = Effects::default();
    let a = layer.acquire(&mut total, t(0), "a", &req(1), &mut fx);
    assert!(matches!(a, Admission::Granted(_)));
    let b = layer.acquire(&mut total, t(0), "b", &req(1), &mut fx);
    let Admission::Queued(b) = b else {
        panic!("queued: {b:?}")
    };
    // b's wait ends at 5 s, before a's lease (10 s): b times out with a hint.
    layer.advance(&mut total, t(6_000), &mut fx);
    assert!(matches!(
        fx.wakes.as_slice(),
        [(id, Err(Refusal::WaitTimeout { .. }))] if *id == b
    ));
    assert_eq!(layer.key_count(), 1, "b dropped, a still holds");
    fx.wakes.clear();
    let c = layer.acquire(&mut total, t(9_000), "c", &req(1), &mut fx);
    assert!(matches!(c, Admission::Queued(_)));
    // a's lease lapses at 10 s: c is granted then, its key dropped with a's.
    layer.advance(&mut total, t(10_000), &mut fx);
    assert!(matches!(fx.wakes.as_slice(), [(_, Ok(_))]));
    assert!(layer.key_info("a").is_none());
    assert_eq!(total.counters().expired, 1);
}

#[test]
fn per_key_rate_paces_its_key_only() {
    let per_sec = RateSpec::per(10, Duration::from_secs(1)).with_burst(1);
    let mut sim = Sim::new(Some(100), KeyedSpec::per_key(100).with_rate(per_sec));
    sim.acquire("a", 3);
    sim.acquire("b", 1);
    assert_eq!(
        sim.grants,
        ["a", "b"],
        "a's second waits for its token, b does not"
    );
    let mut fx = Effects::default();
    let next = sim.layer.next_deadline(&mut sim.total);
    assert_eq!(next, Some(t(100)), "the timer is armed for a's token time");
    sim.layer.advance(&mut sim.total, t(100), &mut fx);
    sim.take(fx);
    assert_eq!(sim.grants, ["a", "b", "a"]);
}

/// Per-key rates alone, with no total limit, are accepted (the total runs with no limit: no
/// fake rate anywhere) and reconfigured both ways; a keyed limiter with no limit at all is
/// refused naming a field.
#[test]
fn per_key_rates_alone_need_no_total_but_some_limit_is_needed() {
    let each = RateSpec::per(1, Duration::from_secs(60)).with_burst(2);
    let keyed = KeyedSpec::default().with_rate(each);
    let (mut total, mut layer) = KeyLayer::new(spec(None), keyed.clone(), 1).expect("accepted");
    assert_eq!((total.spec.concurrency, total.spec.rate), (None, None));
    let mut fx = Effects::default();
    // Many keys, no total: each gets its own burst of 2, then its own rate refuses.
    for i in 0..50 {
        let key = format!("k{i}");
        for _ in 0..2 {
            let got = layer.acquire(&mut total, t(0), &key, &req(1), &mut fx);
            assert!(matches!(got, Admission::Granted(_)), "{got:?}");
        }
        let at_once = AcquireRequest {
            wait: Some(Duration::ZERO),
            ..req(1)
        };
        let got = layer.acquire(&mut total, t(0), &key, &at_once, &mut fx);
        assert!(matches!(got, Admission::Refused(_)), "{got:?}");
    }
    assert_eq!((total.in_use(), layer.key_count()), (0, 50));
    // Its debt ends two minutes on: every key goes.
    layer.advance(&mut total, t(120_001), &mut fx);
    assert_eq!(layer.key_count(), 0);
    // A total rate added, then removed again.
    let with_total = LimiterSpec::rate(RateSpec::per(10, Duration::from_secs(1)));
    layer
        .reconfigure(&mut total, t(120_001), with_total, keyed.clone(), &mut fx)
        .expect("a total rate");
    assert!(total.spec.rate.is_some());
    layer
        .reconfigure(&mut total, t(120_001), spec(None), keyed, &mut fx)
        .expect("no total again");
    assert_eq!(total.spec.rate, None);

    let nothing = KeyedSpec::default();
    let err = KeyLayer::new(spec(None), nothing.clone(), 1).expect_err("no limit at all");
    assert_eq!(err.field, "per_key.concurrency");
    assert!(err.message.contains("per_key.rate"), "{}", err.message);
    let err = layer
        .reconfigure(&mut total, t(120_001), spec(None), nothing, &mut fx)
        .expect_err("no limit at all");
    assert_eq!(err.field, "per_key.concurrency");
}
