//! The round robin's skip of idle rounds (`sched.rs`, `skip_idle_rounds`) against turning the
//! ring one key at a time: the same random operations on two layers, one with the skip switched
//! off, must make the same decisions (every admission and every wake-up, whole) and end in the
//! same state. And what the skip is for: a head short of many permits costs one visit of the
//! ring, not one turn per permit.

use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;

use super::super::*;
use crate::core::{AcquireRequest, Admission, Effects, WaiterId};
use crate::types::FencingToken;

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
    Cancel(u64),
    Tick(u64),
    Weight {
        key: usize,
        weight: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..KEYS.len(), 1..=12u32, 0..60u64, 5..80u64).prop_map(|(key, permits, wait_ms, lease_ms)| {
            Op::Acquire { key, permits, wait_ms, lease_ms }
        }),
        3 => (0..64usize).prop_map(Op::Release),
        1 => (0..64u64).prop_map(Op::Cancel),
        2 => (1..30u64).prop_map(Op::Tick),
        1 => (0..KEYS.len(), 1..=5u32).prop_map(|(key, weight)| Op::Weight { key, weight }),
    ]
}

/// Applies `op` to one layer; what it decided, as text (admissions and wake-ups compared whole).
fn apply(
    total: &mut LimiterCore,
    layer: &mut KeyLayer,
    now: &mut Timestamp,
    held: &BTreeSet<u64>,
    op: &Op,
) -> String {
    let mut fx = Effects::default();
    let decided = match op {
        Op::Acquire {
            key,
            permits,
            wait_ms,
            lease_ms,
        } => {
            let req = AcquireRequest {
                permits: *permits,
                wait: Some(Duration::from_millis(*wait_ms)),
                lease: Some(Duration::from_millis(*lease_ms)),
                ..AcquireRequest::default()
            };
            format!(
                "{:?}",
                layer.acquire(total, *now, KEYS[*key], &req, &mut fx)
            )
        }
        Op::Release(i) => match held.iter().nth(i % held.len().max(1)) {
            Some(token) => format!(
                "{}",
                layer.release(total, *now, FencingToken(*token), &mut fx)
            ),
            None => String::new(),
        },
        Op::Cancel(id) => format!("{}", layer.cancel(total, *now, WaiterId(*id), &mut fx)),
        Op::Tick(ms) => {
            *now = now.after(Duration::from_millis(*ms));
            layer.advance(total, *now, &mut fx);
            String::new()
        }
        Op::Weight { key, weight } => {
            let ov = KeyOverride {
                concurrency: None,
                weight: *weight,
            };
            format!(
                "{:?}",
                layer.put_override(total, *now, KEYS[*key], Some(ov), &mut fx)
            )
        }
    };
    format!("{decided} {:?}", fx.wakes)
}

/// Tokens granted by `decided` (an admission or wake-ups printed by `apply`), by their text.
fn tokens_in(decided: &str) -> Vec<u64> {
    decided
        .match_indices("FencingToken(")
        .filter_map(|(i, m)| {
            let rest = &decided[i + m.len()..];
            rest[..rest.find(')')?].parse().ok()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn skipping_idle_rounds_decides_as_turning_the_ring_one_key_at_a_time(
        total_limit in 1..=12u32,
        ops in prop::collection::vec(op(), 1..150),
    ) {
        let spec = LimiterSpec::concurrency(total_limit)
            .with_max_wait(Duration::from_millis(60))
            .with_max_queue(1_000);
        let (mut total_a, mut skipping) = KeyLayer::new(spec.clone(), KeyedSpec::default(), 1).expect("valid");
        let (mut total_b, mut turning) = KeyLayer::new(spec, KeyedSpec::default(), 1).expect("valid");
        turning.drr.turn_by_turn = true;
        let (mut now_a, mut now_b) = (Timestamp(0), Timestamp(0));
        let mut held = BTreeSet::new();
        for op in &ops {
            let a = apply(&mut total_a, &mut skipping, &mut now_a, &held, op);
            let b = apply(&mut total_b, &mut turning, &mut now_b, &held, op);
            prop_assert_eq!(&a, &b, "after {:?}", op);
            if let Op::Release(i) = op {
                if let Some(token) = held.iter().nth(i % held.len().max(1)).copied() {
                    held.remove(&token);
                }
            }
            held.extend(tokens_in(&a));
        }
        prop_assert_eq!(format!("{:?}", skipping.to_state()), format!("{:?}", turning.to_state()));
        prop_assert!(skipping.drr.turns <= turning.drr.turns);
    }
}

#[test]
fn a_head_short_of_many_permits_costs_one_visit_of_the_ring_not_a_turn_per_permit() {
    let run = |turn_by_turn: bool| {
        let spec = LimiterSpec::concurrency(1_000_000).with_max_wait(Duration::from_secs(60));
        let (mut total, mut layer) = KeyLayer::new(spec, KeyedSpec::default(), 1).expect("valid");
        layer.drr.turn_by_turn = turn_by_turn;
        let mut fx = Effects::default();
        let one = AcquireRequest {
            permits: 1,
            ..AcquireRequest::default()
        };
        let held = layer.acquire(&mut total, Timestamp(0), "a", &one, &mut fx);
        assert!(matches!(held, Admission::Granted(_)), "{held:?}");
        // Every permit, at once or not at all: refused (one is held), after the round robin
        // has judged it.
        let all = AcquireRequest {
            permits: 1_000_000,
            wait: Some(Duration::ZERO),
            ..AcquireRequest::default()
        };
        let before = layer.drr.turns;
        let out = layer.acquire(&mut total, Timestamp(0), "c", &all, &mut fx);
        assert!(matches!(out, Admission::Refused(_)), "{out:?}");
        layer.drr.turns - before
    };
    let skipping = run(false);
    assert!(
        skipping <= 4,
        "{skipping} turns of the ring for one acquire"
    );
    // What it was without the skip (this test would pass on the old loop only if this did).
    assert!(run(true) >= 999_999);
}
