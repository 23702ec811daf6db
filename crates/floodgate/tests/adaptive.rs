//! Adaptive concurrency (AIMD, and the latency-aware `gradient` controller in the last test)
//! against a simulated backend whose capacity Floodgate is not told.
//!
//! The backend accepts at most `C` calls at once and answers "throttled" (a 429) to any call
//! that arrives while `C` are in progress. Workers acquire a permit, call the backend, report
//! the outcome with `feedback`, and release. The limit starts at 10 and must find `C` on its
//! own, then follow it when `C` is raised.
//!
//! What AIMD with a decrease of 0.7 should give: the limit climbs by one per round (as many
//! successes as the limit, about one service time) until it passes `C`; the first call over
//! `C` is throttled and the limit drops to `floor(0.7 * limit)`, then climbs again. So it
//! traces a sawtooth between about `0.7 * (C + 1)` and `C + 1`, a little higher when throttles
//! land inside the cooldown and are not acted on (the limit then sits at `C + 1` or `C + 2`
//! for a while). Its median over a long run therefore lies between about `0.7 C` and `C + 2`;
//! the assertions allow `[0.6 C, 1.1 C]`, a margin either side for the shape of the sawtooth
//! (it spends longer near the bottom when rounds are slow) and for an overshoot of a few.
//! Rejections happen only at the tip of each tooth, so they are a small fraction of calls.
//!
//! Everything runs on one thread under tokio's paused time with seeded randomness, so a run is
//! deterministic and minutes of traffic take a few seconds. Run with `--nocapture` to see the
//! band and the rejection fraction.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use floodgate::{
    AcquireOptions, AdaptiveSpec, Feedback, Floodgate, LimiterBackend, LimiterSpec, MemoryStore,
};
use support::rng::Rng;
use tokio::time::{sleep, Instant};

/// The backend: a hidden capacity, and counts of what it answered.
#[derive(Default)]
struct Backend {
    capacity: AtomicU32,
    in_flight: AtomicU32,
    /// The most calls it ever had in progress.
    most: AtomicU32,
    ok: AtomicU64,
    throttled: AtomicU64,
}

impl Backend {
    /// One call. Accepted calls take 5 to 15 ms (the service time, during which the worker
    /// holds its permit). A call arriving while `capacity` are in progress is turned away at
    /// the door: it does not count as in progress, and the 429 comes back after 1 ms.
    async fn call(&self, rng: &mut Rng) -> Feedback {
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        if n > self.capacity.load(Ordering::SeqCst) {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.throttled.fetch_add(1, Ordering::Relaxed);
            sleep(Duration::from_millis(1)).await;
            return Feedback::Throttled;
        }
        self.most.fetch_max(n, Ordering::SeqCst);
        sleep(rng.micros(5_000, 15_000)).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.ok.fetch_add(1, Ordering::Relaxed);
        Feedback::Ok
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::SeqCst),
            self.throttled.load(Ordering::SeqCst),
        )
    }
}

/// The effective limit over a stretch of time, sampled every 10 ms.
#[derive(Debug, Clone, Copy)]
struct Band {
    min: u32,
    p10: u32,
    median: u32,
    p90: u32,
    max: u32,
}

impl Band {
    fn of(samples: &[u32]) -> Band {
        let mut s = samples.to_vec();
        s.sort_unstable();
        let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
        Band {
            min: s[0],
            p10: at(0.1),
            median: at(0.5),
            p90: at(0.9),
            max: s[s.len() - 1],
        }
    }
}

/// What one phase of the run measured over its second half.
#[derive(Debug)]
struct Phase {
    band: Band,
    calls: u64,
    rejected: u64,
    limit_at_end: u32,
}

impl Phase {
    fn rejected_fraction(&self) -> f64 {
        self.rejected as f64 / self.calls as f64
    }
}

const WORKERS: u64 = 120;
const PHASE: Duration = Duration::from_secs(30);

/// Runs with the backend at `capacity` for `PHASE`, sampling the limit; reports the second
/// half.
async fn phase<B: LimiterBackend>(
    lim: &floodgate::Limiter<B>,
    backend: &Backend,
    capacity: u32,
) -> Phase {
    backend.capacity.store(capacity, Ordering::SeqCst);
    let start = Instant::now();
    let half = start + PHASE / 2;
    let mut samples = Vec::new();
    let mut before = None;
    while Instant::now() < start + PHASE {
        sleep(Duration::from_millis(10)).await;
        if before.is_none() && Instant::now() >= half {
            before = Some(backend.counts());
        }
        if Instant::now() >= half {
            samples.push(lim.status().await.unwrap().limit.unwrap());
        }
    }
    let (ok0, th0) = before.unwrap();
    let (ok1, th1) = backend.counts();
    Phase {
        band: Band::of(&samples),
        calls: (ok1 - ok0) + (th1 - th0),
        rejected: th1 - th0,
        limit_at_end: lim.status().await.unwrap().limit.unwrap(),
    }
}

/// Both phases of one run, and the limiter's final status.
struct Run {
    first: Phase,
    second: Phase,
    decreases: u64,
    increases: u64,
    most_in_flight: u32,
}

const C1: u32 = 37;
const C2: u32 = 80;

/// The simulation: `WORKERS` workers against the backend at capacity `C1`, then `C2`, with the
/// limit starting at 10 between 1 and 200 and the given cooldown (AIMD).
async fn simulate(label: &str, cooldown: Duration) -> Run {
    let mut adaptive = AdaptiveSpec::between(1, 200);
    adaptive.cooldown = cooldown;
    run_with(label, adaptive).await
}

/// The same workers and backend with any adaptive spec; feedback carries each call's latency
/// (which AIMD ignores and the gradient controller uses).
async fn run_with(label: &str, adaptive: AdaptiveSpec) -> Run {
    let gate = Floodgate::with_store(MemoryStore::new());
    let spec = LimiterSpec::concurrency(10)
        .with_adaptive(adaptive)
        .with_max_wait(Duration::from_secs(60));
    gate.define("backend", spec).await.unwrap();
    let lim = gate.limiter("backend").await.unwrap();
    let backend = Arc::new(Backend::default());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            let lim = lim.clone();
            let backend = Arc::clone(&backend);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut rng = Rng(i);
                // Spread the first arrivals over a millisecond.
                sleep(rng.micros(0, 1_000)).await;
                while !stop.load(Ordering::SeqCst) {
                    let permit = lim
                        .acquire(AcquireOptions::new().wait(Duration::from_secs(60)))
                        .await
                        .unwrap();
                    let started = Instant::now();
                    let outcome = backend.call(&mut rng).await;
                    lim.backend()
                        .feedback_with_latency(outcome, Some(started.elapsed()))
                        .await
                        .unwrap();
                    assert!(permit.release().await.unwrap());
                    if outcome == Feedback::Throttled {
                        // A client backs off after a 429 before trying again.
                        sleep(rng.micros(5_000, 15_000)).await;
                    }
                }
            })
        })
        .collect();
    let first = phase(&lim, &backend, C1).await;
    let second = phase(&lim, &backend, C2).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let st = lim.status().await.unwrap();
    let run = Run {
        first,
        second,
        decreases: st.counters.limit_decreases,
        increases: st.counters.limit_increases,
        most_in_flight: backend.most.load(Ordering::SeqCst),
    };
    for (c, p) in [(C1, &run.first), (C2, &run.second)] {
        println!(
            "{label}, capacity {c}: limit over the second half of {PHASE:?}: min {} p10 {} \
             median {} p90 {} max {} (at the end {}); {} of {} calls rejected ({:.2}%)",
            p.band.min,
            p.band.p10,
            p.band.median,
            p.band.p90,
            p.band.max,
            p.limit_at_end,
            p.rejected,
            p.calls,
            100.0 * p.rejected_fraction(),
        );
    }
    println!(
        "{label}: {} decreases, {} increases; most calls in progress at once: {}",
        run.decreases, run.increases, run.most_in_flight
    );
    run
}

/// The band's median within `[0.6 C, 1.1 C]` (see the module comment for why).
fn assert_near(p: &Phase, c: u32) {
    let m = f64::from(p.band.median);
    assert!(
        m >= 0.6 * f64::from(c) && m <= 1.1 * f64::from(c),
        "{p:?} is not near {c}"
    );
}

/// Raised capacity: the limit climbs out of the old band (all of the new band lies above all
/// of the old) and settles near the new capacity.
fn assert_recovers(run: &Run) {
    assert!(
        run.second.band.min > run.first.band.max,
        "the limit did not recover upward: {:?} vs {:?}",
        run.second,
        run.first
    );
    assert_near(&run.second, C2);
}

/// A cooldown of 100 ms, ten mean service times: one overload episode (the calls in flight
/// when the limit was passed) counts once, and the next episode is acted on. The limit traces
/// the sawtooth between `0.7 (C + 1)` and `C + 1`, and only the tip of each tooth is rejected.
#[tokio::test(start_paused = true)]
async fn the_limit_finds_an_unknown_capacity_and_follows_it_up() {
    let run = simulate("cooldown 100 ms", Duration::from_millis(100)).await;
    assert_near(&run.first, C1);
    assert!(
        run.first.rejected_fraction() < 0.02,
        "too many rejections: {:?}",
        run.first
    );
    assert_recovers(&run);
    assert!(
        run.second.rejected_fraction() < 0.02,
        "too many rejections: {:?}",
        run.second
    );
}

/// The default cooling interval (50 ms, stretched to the typical hold time when that is
/// longer) finds the capacity, follows it up, and keeps refusals rare: once a decrease has
/// taken effect the next throttle may lower the limit again, so it does not sit above `C`.
#[tokio::test(start_paused = true)]
async fn with_the_default_cooldown_throttles_stay_rare() {
    let run = simulate(
        "default cooldown (50 ms or the hold time)",
        AdaptiveSpec::between(1, 200).cooldown,
    )
    .await;
    assert_near(&run.first, C1);
    assert!(
        run.first.rejected_fraction() < 0.02,
        "too many rejections: {:?}",
        run.first
    );
    assert_recovers(&run);
    assert!(
        run.second.rejected_fraction() < 0.02,
        "too many rejections: {:?}",
        run.second
    );
}

/// The latency-aware controller on the same backend: it slow-starts to the capacity, plateaus
/// one below where throttling began instead of sawing below it, probes rarely (so rejections
/// are rarer than AIMD's), and finds the raised capacity by probing past its old ceiling.
#[tokio::test(start_paused = true)]
async fn the_gradient_limit_plateaus_at_the_capacity_and_follows_it_up() {
    let run = run_with("gradient", AdaptiveSpec::gradient(1, 200)).await;
    for (c, p) in [(C1, &run.first), (C2, &run.second)] {
        assert!(
            p.band.median + 2 >= c && p.band.median <= c + 2,
            "the median limit sits at the capacity {c}: {p:?}"
        );
        assert!(
            p.rejected_fraction() < 0.01,
            "too many rejections at {c}: {p:?}"
        );
    }
    assert!(
        run.second.band.min > run.first.band.max,
        "the limit did not recover upward: {:?} vs {:?}",
        run.second,
        run.first
    );
}
