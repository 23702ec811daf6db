//! The gradient controller's curve, step by step, on plain values.

use std::time::Duration;

use super::*;

fn spec() -> AdaptiveSpec {
    AdaptiveSpec::gradient(1, 1_000)
}

/// A controller and the core's share of its state, driven one report at a time.
struct Drive {
    g: Gradient,
    limit: u32,
    last_decrease: Option<Timestamp>,
    fresh: u32,
    now: u64,
}

impl Drive {
    fn new(limit: u32) -> Self {
        Drive {
            g: Gradient::default(),
            limit,
            last_decrease: None,
            fresh: 0,
            now: 1_000_000_000,
        }
    }

    /// One report `dt_ms` after the last, of a call that took `latency_ms`, with `in_use`
    /// permits out (the limit, under saturation).
    fn report(&mut self, dt_ms: u64, outcome: Feedback, latency_ms: u64) -> u32 {
        self.now += dt_ms * 1_000;
        let inputs = Inputs {
            now: Timestamp(self.now),
            limit: self.limit,
            in_use: self.limit,
            hold_ewma_us: None,
        };
        self.limit = self.g.feedback(
            &spec(),
            inputs,
            outcome,
            Some(Duration::from_millis(latency_ms)),
            &mut self.last_decrease,
            &mut self.fresh,
        );
        self.limit
    }

    /// A full round of successes (as many as the limit), each 100 ms long.
    fn round(&mut self) -> u32 {
        for _ in 0..self.limit {
            self.report(1, Feedback::Ok, 100);
        }
        self.limit
    }
}

#[test]
fn slow_start_adds_a_permit_per_success_until_the_first_throttle() {
    let mut d = Drive::new(10);
    assert_eq!(d.report(1, Feedback::Ok, 100), 11);
    assert_eq!(d.report(1, Feedback::Ok, 100), 12);
    // A throttle: the ceiling is one below the permits out, the limit x0.9.
    assert_eq!(d.report(1, Feedback::Throttled, 10), 10);
    assert_eq!(d.g.ceiling, 11);
}

#[test]
fn a_throttle_of_a_call_begun_before_the_last_decrease_is_not_news() {
    let mut d = Drive::new(50);
    assert_eq!(d.report(1, Feedback::Throttled, 10), 45);
    // Began 100 ms ago, before the decrease 1 ms ago: ignored.
    assert_eq!(d.report(1, Feedback::Throttled, 100), 45);
    // Began after it: news, and no call begun since the decrease has succeeded: a deep cut.
    assert_eq!(d.report(50, Feedback::Throttled, 10), 36);
}

#[test]
fn the_limit_approaches_the_ceiling_without_passing_it_then_probes_after_the_plateau() {
    let mut d = Drive::new(100);
    d.report(1, Feedback::Throttled, 10); // ceiling 99, limit 90
    assert_eq!((d.limit, d.g.ceiling), (90, 99));
    let mut seen = Vec::new();
    while d.limit < 99 && seen.len() < 20 {
        seen.push(d.round());
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(
        seen.iter().all(|l| *l <= 99),
        "never past the ceiling: {seen:?}"
    );
    assert_eq!(d.limit, 99, "{seen:?}");
    // The plateau: probe_rounds rounds at the ceiling (the round that reached it may count
    // for part of one), then one permit past it.
    let rounds_to_probe = |d: &mut Drive| {
        let mut n = 0;
        while d.round() == 99 {
            n += 1;
            assert!(n < 10 * spec().probe_rounds, "no probe");
        }
        assert_eq!(d.limit, 100, "the probe is one past the ceiling");
        n + 1
    };
    let n = rounds_to_probe(&mut d);
    let p = spec().probe_rounds;
    assert!(n == p || n == p - 1, "{n} rounds");
    // The probe refused: straight back to the ceiling, and the next plateau is twice as long.
    assert_eq!(d.report(1, Feedback::Throttled, 10), 99);
    assert_eq!(d.g.backoff, 1);
    let n = rounds_to_probe(&mut d);
    assert!(n == 2 * p || n == 2 * p - 1, "{n} rounds");
    // Not refused this time: growth past the ceiling speeds up (convex).
    let (a, b, c) = (d.round(), d.round(), d.round());
    assert!(a > 100 && b - a >= a - 100 && c - b >= b - a, "{a} {b} {c}");
}

#[test]
fn queueing_latency_lowers_the_limit_once_the_averages_are_warm() {
    let mut d = Drive::new(100);
    d.report(1, Feedback::Throttled, 10); // a ceiling, so growth is slow
    for _ in 0..WARM_UP {
        d.report(1, Feedback::Ok, 100);
    }
    let before = d.limit;
    // Latency doubles (capped at twice the long run): the recent average passes 1.5x.
    let mut after = before;
    for _ in 0..100 {
        after = d.report(1, Feedback::Ok, 400);
        if after < before {
            break;
        }
    }
    assert!(
        after < before && after >= before * 9 / 10,
        "{before} -> {after}"
    );
    assert_eq!(d.g.ceiling, before);
}

#[test]
fn heavy_tailed_latencies_alone_do_not_lower_the_limit() {
    let mut d = Drive::new(100);
    d.report(1, Feedback::Throttled, 10);
    let mut x: u64 = 7;
    for _ in 0..20_000 {
        // One call in 20 takes 30x the others: a heavy tail, no queue.
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let latency = if (x >> 33) % 20 == 0 { 3_000 } else { 100 };
        let before = d.limit;
        let after = d.report(1, Feedback::Ok, latency);
        assert!(after >= before, "lowered from {before} to {after}");
    }
}

#[test]
fn the_ewma_moves_by_its_weight_and_starts_at_the_first_sample() {
    assert_eq!(ewma(0, 500, 16), 500);
    assert_eq!(ewma(0, 0, 16), 1);
    assert_eq!(ewma(160, 320, 16), 170);
    assert_eq!(ewma(320, 160, 16), 310);
}

#[test]
fn a_snapshot_carries_the_controller_state_and_its_spec() {
    use crate::core::{Effects, LimiterCore};
    use crate::spec::{Algorithm, LimiterSpec};
    let adaptive = AdaptiveSpec {
        tolerance: 2.5,
        probe_rounds: 7,
        ..AdaptiveSpec::gradient(1, 100)
    };
    let mut core =
        LimiterCore::new(LimiterSpec::concurrency(20).with_adaptive(adaptive), 1).expect("valid");
    let mut fx = Effects::default();
    let ms = Some(Duration::from_millis(5));
    for i in 0..50 {
        core.feedback_with(Timestamp(1_000 + i * 10_000), Feedback::Ok, ms, &mut fx);
    }
    core.feedback_with(Timestamp(600_000), Feedback::Throttled, ms, &mut fx);
    let state = core.to_state();
    assert_ne!(state.gradient, Gradient::default());
    // Through JSON, as the durable store writes it.
    let json = serde_json::to_string(&state).expect("serialize");
    let back: crate::core::CoreState = serde_json::from_str(&json).expect("deserialize");
    let rebuilt = LimiterCore::from_state(&back).expect("rebuild");
    assert_eq!(rebuilt.to_state(), state);
    assert_eq!(
        rebuilt.spec().adaptive.map(|a| a.algorithm),
        Some(Algorithm::Gradient)
    );
    assert_eq!(rebuilt.spec().adaptive, Some(adaptive));
}
