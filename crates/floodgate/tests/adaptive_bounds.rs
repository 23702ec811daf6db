//! Adversarial schedules for adaptive limits (AIMD and gradient) on the pure core, on a fake
//! clock: the promises that a moving limit must keep whatever the feedback says.
//!
//! A witness kept outside the core counts what is held (every grant, from an acquire or from a
//! wake-up, minus what was released). After every step:
//! - the limit in force (read from status) lies within the spec's `[min, max]`;
//! - a step that granted anything left the witness's held permits at or under the limit in
//!   force (a lowered limit revokes nobody, but grants nothing until in-use is below it);
//! - the core's in-use equals the witness's count.
//!
//! The feedback is hostile: latencies of 0, 1 µs, a day and `Duration::MAX`, floods of
//! throttles, reports with nothing held, clock jumps of up to ten minutes (and steps back of up
//! to 5 s, as a wall clock may), and reconfigurations
//! to another range (the learned limit may lie outside it), another algorithm, or no adaptive
//! limit at all. A second test checks liveness: after a flood of throttles pins the limit at
//! `min`, a recovered backend (only successes, with waiters queued) brings it back to `max`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use floodgate::core::{AcquireRequest, Admission, Effects, Feedback, LimiterCore};
use floodgate::{AdaptiveSpec, LimiterName, LimiterSpec, RateSpec, Timestamp};
use support::rng::Rng;

/// Leases longer than any schedule's clock runs (at most about 1.5 h), so nothing expires under
/// the witness.
const LEASE: Duration = Duration::from_secs(24 * 3_600);

/// A random adaptive spec: AIMD or gradient, a range within 1..=40, a starting limit in it,
/// sometimes a rate as well.
fn spec(rng: &mut Rng) -> LimiterSpec {
    let min = rng.range(1, 20) as u32;
    let max = min + rng.range(0, 20) as u32;
    let start = rng.range(u64::from(min), u64::from(max)) as u32;
    let mut a = if rng.below(2) == 0 {
        AdaptiveSpec::between(min, max)
    } else {
        let mut a = AdaptiveSpec::gradient(min, max);
        a.tolerance = [1.1, 1.5, 10.0][rng.below(3) as usize];
        a.probe_rounds = [1, 2, 30][rng.below(3) as usize];
        a
    };
    a.increase = rng.range(1, 5) as u32;
    a.decrease = [0.01, 0.5, 0.7, 0.9, 0.999][rng.below(5) as usize];
    a.cooldown = Duration::from_millis([0, 1, 50, 10_000][rng.below(4) as usize]);
    let mut s = LimiterSpec::concurrency(start)
        .with_adaptive(a)
        .with_default_lease(LEASE);
    s.max_queue = 1_000;
    s.max_wait = Duration::from_secs(3_600);
    if rng.below(4) == 0 {
        s = s.with_rate(RateSpec::per(
            rng.range(50, 1_000) as u32,
            Duration::from_secs(1),
        ));
    }
    s
}

/// A hostile latency: none, zero, tiny, typical, a day, or the largest `Duration`.
fn latency(rng: &mut Rng) -> Option<Duration> {
    match rng.below(10) {
        0 => None,
        1 => Some(Duration::ZERO),
        2 => Some(Duration::from_micros(1)),
        3 => Some(Duration::from_secs(86_400)),
        4 => Some(Duration::MAX),
        5 => Some(Duration::from_secs(u64::MAX / 1_000_000)),
        _ => Some(rng.millis(1, 500)),
    }
}

/// The checks after each step (see the module comment).
fn check(
    core: &LimiterCore,
    held: &BTreeMap<u64, u32>,
    granted: bool,
    seed: u64,
    step: usize,
    what: &str,
) {
    let name = LimiterName::new("a").unwrap();
    let status = core.status(&name);
    let witness: u32 = held.values().sum();
    assert_eq!(
        status.in_use, witness,
        "seed {seed} step {step} ({what}): in-use against the witness"
    );
    let Some(limit) = status.limit else { return };
    if let Some(a) = status.spec.adaptive {
        assert!(
            (a.min..=a.max).contains(&limit),
            "seed {seed} step {step} ({what}): limit {limit} outside [{}, {}]",
            a.min,
            a.max
        );
    }
    if granted {
        assert!(
            witness <= limit,
            "seed {seed} step {step} ({what}): granted up to {witness} held over limit {limit}"
        );
    }
}

/// Applies an effects list to the witness; true if it granted anything.
fn wake(fx: &mut Effects, held: &mut BTreeMap<u64, u32>) -> bool {
    let mut granted = false;
    for (_, outcome) in fx.wakes.drain(..) {
        if let Ok(g) = outcome {
            held.insert(g.token.0, g.permits);
            granted = true;
        }
    }
    granted
}

fn run(seed: u64, steps: usize) {
    let mut rng = Rng(seed);
    let mut now = 1_000_000_000_u64;
    let mut core = LimiterCore::new(spec(&mut rng), 1).unwrap();
    let mut held: BTreeMap<u64, u32> = BTreeMap::new();
    let mut fx = Effects::default();
    for step in 0..steps {
        // The fake clock: mostly small steps, sometimes a jump of up to ten minutes.
        match rng.below(100) {
            0 | 1 => now += rng.range(1_000_000, 600_000_000),
            2 => now -= rng.range(1, 5_000_000),
            _ => now += rng.range(0, 20_000),
        }
        let ts = Timestamp(now);
        // Time settled first (timeouts may grant a waiter under the limit in force before the
        // step), so every grant the step itself makes is judged against the limit after it.
        core.advance(ts, &mut fx);
        let woke = wake(&mut fx, &mut held);
        check(&core, &held, woke, seed, step, "advance");
        let (granted, what) = match rng.below(20) {
            0..=5 => {
                let limit = core.status(&LimiterName::new("a").unwrap()).limit;
                let req = AcquireRequest {
                    permits: rng.range(1, u64::from(limit.unwrap_or(4)).clamp(1, 4)) as u32,
                    wait: Some(Duration::from_millis(rng.range(0, 2) * 60_000)),
                    ..AcquireRequest::default()
                };
                let mut granted = false;
                if let Admission::Granted(g) = core.acquire(ts, &req, &mut fx) {
                    held.insert(g.token.0, g.permits);
                    granted = true;
                }
                (granted, "acquire")
            }
            6..=8 => {
                if let Some((&t, _)) = held
                    .iter()
                    .nth(rng.below(held.len().max(1) as u64) as usize)
                {
                    held.remove(&t);
                    assert!(core.release(ts, floodgate::FencingToken(t), &mut fx));
                }
                (false, "release")
            }
            9..=17 => {
                let outcome = match rng.below(10) {
                    0..=3 => Feedback::Throttled,
                    4 => Feedback::Error,
                    _ => Feedback::Ok,
                };
                core.feedback_with(ts, outcome, latency(&mut rng), &mut fx);
                (false, "feedback")
            }
            _ => {
                // Reconfigure: a new range (the learned limit may lie outside it), another
                // algorithm, no adaptive limit, or the same spec re-applied.
                let mut s = match rng.below(4) {
                    0 => {
                        let mut s = core.spec().clone();
                        s.adaptive = None;
                        s
                    }
                    1 => core.spec().clone(),
                    _ => spec(&mut rng),
                };
                s.default_lease = LEASE;
                core.reconfigure(ts, s, &mut fx).unwrap();
                (false, "reconfigure")
            }
        };
        let woke = wake(&mut fx, &mut held);
        check(&core, &held, granted || woke, seed, step, what);
    }
}

/// Many seeded hostile schedules; a failure names its seed and step.
#[test]
fn a_moving_limit_stays_in_range_and_never_over_admits() {
    let cases: u64 = std::env::var("FLOODGATE_ADAPTIVE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    for seed in 0..cases {
        run(seed, 400);
    }
}

/// Liveness: a flood of throttles pins the limit at `min`; then the backend recovers and
/// every report is a success, with more demand than the limit (waiters queued, each holder
/// reporting before it releases). The limit must climb back to `max` within a bounded number
/// of reports, for both algorithms, whatever latency the successes carry.
#[test]
fn after_a_throttle_flood_a_recovered_backend_brings_the_limit_back_to_max() {
    for gradient in [false, true] {
        for fixed_latency in [None, Some(Duration::ZERO), Some(Duration::from_millis(20))] {
            let (min, max) = (1, 32);
            let a = if gradient {
                AdaptiveSpec::gradient(min, max)
            } else {
                AdaptiveSpec::between(min, max)
            };
            let spec = LimiterSpec::concurrency(16)
                .with_adaptive(a)
                .with_default_lease(LEASE);
            let mut core = LimiterCore::new(spec, 1).unwrap();
            let mut fx = Effects::default();
            let mut now = 1_000_000_000_u64;
            let name = LimiterName::new("a").unwrap();
            for _ in 0..200 {
                now += 100_000;
                core.feedback_with(Timestamp(now), Feedback::Throttled, fixed_latency, &mut fx);
            }
            assert_eq!(core.status(&name).limit, Some(min), "gradient {gradient}");
            // Demand: 64 workers, each holding one permit or waiting for one.
            let mut held: BTreeMap<u64, u32> = BTreeMap::new();
            let req = AcquireRequest {
                wait: Some(Duration::from_secs(3_600)),
                ..AcquireRequest::default()
            };
            for _ in 0..64 {
                if let Admission::Granted(g) = core.acquire(Timestamp(now), &req, &mut fx) {
                    held.insert(g.token.0, g.permits);
                }
            }
            let mut reports = 0_u32;
            while core.status(&name).limit != Some(max) {
                reports += 1;
                assert!(
                    reports < 20_000,
                    "gradient {gradient} latency {fixed_latency:?}: stuck at {:?}",
                    core.status(&name).limit
                );
                now += 1_000;
                // The oldest holder reports success and releases; a waiter takes its place
                // (and a new waiter joins, so demand stays above the limit).
                let (&t, _) = held.iter().next().expect("someone holds");
                core.feedback_with(Timestamp(now), Feedback::Ok, fixed_latency, &mut fx);
                held.remove(&t);
                core.release(Timestamp(now), floodgate::FencingToken(t), &mut fx);
                if let Admission::Granted(g) = core.acquire(Timestamp(now), &req, &mut fx) {
                    held.insert(g.token.0, g.permits);
                }
                wake(&mut fx, &mut held);
                let limit = core.status(&name).limit.unwrap();
                assert!(held.values().sum::<u32>() <= limit);
            }
            eprintln!("gradient {gradient} latency {fixed_latency:?}: max after {reports} reports");
        }
    }
}
