//! A rate-limited acquire on the embedded store against `governor`'s `check`, in one run.
//!
//! - `rate_acquire`: both allow 1,000,000 per second with a burst of 1,000,000, so every call
//!   is granted and the measurement is of the uncontended check, not of refusals. A burst
//!   lasts one second of tokens at most, and either contender takes tokens faster than they
//!   come back, so each runs in chunks of `CHUNK` calls on a fresh limiter (created outside
//!   the timed loop); each chunk asserts that nothing was refused.
//!   - `governor_check`: `RateLimiter::direct(..).check()`.
//!   - `floodgate_acquire`: `limiter.acquire(AcquireOptions::new().wait(Duration::ZERO))`, then
//!     the `Permit` is dropped, as a caller would.
//!   - `floodgate_acquire_detach`: the same acquire, but the permit is `detach`ed, so its
//!     drop does not call the store's release (which, for a rate-only grant, finds nothing
//!     held but still takes the limiter's lock and reads the clock).
//! - `rate_refused`: both exhausted (1 per 24 h, burst 1, the one token taken beforehand):
//!   `governor_check` returns `Err`, `floodgate_acquire` (try once) returns `WaitTimeout`.
//! - `rate_parts`: where floodgate's time goes: the state machine alone (`core_acquire`,
//!   `LimiterCore::acquire` on a synthetic clock), the limiter behind its lock on a counter
//!   clock (everything but a real clock read: `counter_clock_backend`, the store's `acquire`
//!   without the `Permit` guard; `counter_clock_acquire_detach`, with the guard, detached;
//!   `counter_clock_acquire`, with the guard dropped), and the clocks each side reads (`tokio_clock_now` is floodgate's `TokioClock`, `governor_clock_now` is
//!   governor's default quanta clock), plus a bare `std::sync::Mutex` lock.
//!
//! All on a current-thread tokio runtime. Run: `cargo bench -p floodgate --bench rate`. At
//! the end it prints the ratios floodgate/governor from criterion's estimates of this run.

#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    reason = "a benchmark binary: it reports on stdout, and any failure should abort the run"
)]

use std::hint::black_box;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use criterion::Criterion;
use floodgate::core::{AcquireRequest, Admission, Effects, LimiterCore};
use floodgate::{
    AcquireOptions, Clock, Floodgate, Limiter, LimiterBackend, LimiterName, LimiterSpec,
    MemoryLimiter, MemoryStore, RateSpec, Timestamp, TokioClock,
};
use governor::clock::Clock as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::runtime::Runtime;

/// The high quota: tokens per second, and the burst.
const RATE: u32 = 1_000_000;
const BURST: u32 = 1_000_000;
/// Calls per fresh limiter in `rate_acquire`: well under the burst, so none is refused.
const CHUNK: u64 = 200_000;
/// The exhausted quota's period.
const DAY: Duration = Duration::from_secs(24 * 3600);

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

fn governor_high() -> DefaultDirectRateLimiter {
    RateLimiter::direct(Quota::per_second(nz(RATE)).allow_burst(nz(BURST)))
}

fn floodgate_high() -> LimiterSpec {
    LimiterSpec::rate(RateSpec::per(RATE, Duration::from_secs(1)).with_burst(BURST))
}

/// A rate-only limiter in a fresh embedded store (kept alive beside it). Runs on the runtime:
/// the store spawns its timer task there.
async fn floodgate_limiter(
    spec: LimiterSpec,
) -> (Floodgate<MemoryStore>, Limiter<MemoryLimiter<TokioClock>>) {
    let gate = Floodgate::in_memory();
    gate.define("rate", spec).await.unwrap();
    let limiter = gate.limiter("rate").await.unwrap();
    (gate, limiter)
}

fn try_once() -> AcquireOptions {
    AcquireOptions::new().wait(Duration::ZERO)
}

/// Runs `iters` calls of `op` in chunks on fresh limiters made by `make`, timing only the
/// calls; `op` returns whether it was granted. Panics if any call was refused.
fn chunked_sync<L>(iters: u64, make: impl Fn() -> L, op: impl Fn(&L) -> bool) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CHUNK);
        let limiter = make();
        let mut granted = 0u64;
        let start = Instant::now();
        for _ in 0..n {
            granted += u64::from(op(black_box(&limiter)));
        }
        total += start.elapsed();
        assert_eq!(granted, n, "the high quota refused a call");
        left -= n;
    }
    total
}

fn rate_acquire(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("rate_acquire");
    group.measurement_time(Duration::from_secs(5));
    group.warm_up_time(Duration::from_secs(2));

    group.bench_function("governor_check", |b| {
        b.iter_custom(|iters| chunked_sync(iters, governor_high, |l| l.check().is_ok()));
    });
    for detach in [false, true] {
        let name = if detach {
            "floodgate_acquire_detach"
        } else {
            "floodgate_acquire"
        };
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(CHUNK);
                    let (_gate, limiter) = floodgate_limiter(floodgate_high()).await;
                    let mut granted = 0u64;
                    let start = Instant::now();
                    for _ in 0..n {
                        match black_box(&limiter).acquire(try_once()).await {
                            Ok(permit) if detach => {
                                black_box(permit.detach());
                                granted += 1;
                            }
                            Ok(permit) => {
                                drop(black_box(permit));
                                granted += 1;
                            }
                            Err(e) => {
                                black_box(e);
                            }
                        }
                    }
                    total += start.elapsed();
                    assert_eq!(granted, n, "the high quota refused a call");
                    left -= n;
                }
                total
            });
        });
    }
    group.finish();
}

fn rate_refused(c: &mut Criterion) {
    let rt = runtime();
    let governor = RateLimiter::direct(Quota::with_period(DAY).unwrap());
    assert!(governor.check().is_ok());
    assert!(governor.check().is_err());
    let (_gate, limiter) = rt.block_on(async {
        let (gate, limiter) = floodgate_limiter(LimiterSpec::rate(RateSpec::per(1, DAY))).await;
        drop(limiter.acquire(try_once()).await.unwrap());
        assert!(limiter
            .acquire(try_once())
            .await
            .unwrap_err()
            .is_wait_timeout());
        (gate, limiter)
    });

    let mut group = c.benchmark_group("rate_refused");
    group.measurement_time(Duration::from_secs(5));
    group.warm_up_time(Duration::from_secs(2));

    group.bench_function("governor_check", |b| {
        b.iter_custom(|iters| {
            let mut refused = 0u64;
            let start = Instant::now();
            for _ in 0..iters {
                refused += u64::from(black_box(&governor).check().is_err());
            }
            let elapsed = start.elapsed();
            assert_eq!(refused, iters, "the exhausted quota granted a call");
            elapsed
        });
    });
    group.bench_function("floodgate_acquire", |b| {
        let limiter = &limiter;
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut refused = 0u64;
            let start = Instant::now();
            for _ in 0..iters {
                match black_box(limiter).acquire(try_once()).await {
                    Ok(permit) => drop(black_box(permit)),
                    Err(e) => refused += u64::from(black_box(e).is_wait_timeout()),
                }
            }
            let elapsed = start.elapsed();
            assert_eq!(refused, iters, "the exhausted quota granted a call");
            elapsed
        });
    });
    group.finish();
}

#[derive(Clone, Copy)]
enum Mode {
    Backend,
    Detach,
    Drop,
}

/// A clock that ticks 1 µs per read: no system clock involved.
#[derive(Clone, Default)]
struct CounterClock(Arc<AtomicU64>);

impl Clock for CounterClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.fetch_add(1, Ordering::Relaxed))
    }

    fn instant_at(&self, _at: Timestamp) -> tokio::time::Instant {
        tokio::time::Instant::now()
    }
}

fn rate_parts(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("rate_parts");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));

    // The state machine alone: a grant per call, time advancing 1 µs per call (the token
    // interval), so the quota never runs out.
    group.bench_function("core_acquire", |b| {
        b.iter_custom(|iters| {
            let mut core = LimiterCore::new(floodgate_high(), 1).unwrap();
            let req = AcquireRequest {
                wait: Some(Duration::ZERO),
                ..AcquireRequest::default()
            };
            let mut fx = Effects::default();
            let mut granted = 0u64;
            let start = Instant::now();
            for i in 0..iters {
                let admission = core.acquire(Timestamp(i), black_box(&req), &mut fx);
                granted += u64::from(matches!(black_box(admission), Admission::Granted(_)));
            }
            let elapsed = start.elapsed();
            assert_eq!(granted, iters);
            elapsed
        });
    });
    // The embedded limiter on a clock that costs one relaxed atomic add (so: less the system
    // clock), in three steps: the store's `acquire` alone (lock, state machine, wake-up and
    // timer bookkeeping, no guard), then through `Limiter::acquire` with the `Permit` guard
    // detached (adds the guard: a clone of the handle's `Arc`, and its drop), then with the
    // guard dropped as a caller would (adds the release: a second lock and state-machine call).
    for (name, mode) in [
        ("counter_clock_backend", Mode::Backend),
        ("counter_clock_acquire_detach", Mode::Detach),
        ("counter_clock_acquire", Mode::Drop),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let backend = MemoryLimiter::standalone(
                    LimiterName::new("parts").unwrap(),
                    floodgate_high(),
                    CounterClock::default(),
                    1,
                )
                .unwrap();
                let limiter = Limiter::from_backend(backend);
                let mut granted = 0u64;
                let start = Instant::now();
                for _ in 0..iters {
                    let limiter = black_box(&limiter);
                    match mode {
                        Mode::Backend => {
                            let req = AcquireRequest {
                                wait: Some(Duration::ZERO),
                                ..AcquireRequest::default()
                            };
                            if let Ok(grant) = limiter.backend().acquire(req.into()).await {
                                black_box(grant);
                                granted += 1;
                            }
                        }
                        Mode::Detach => {
                            if let Ok(permit) = limiter.acquire(try_once()).await {
                                black_box(permit.detach());
                                granted += 1;
                            }
                        }
                        Mode::Drop => {
                            if let Ok(permit) = limiter.acquire(try_once()).await {
                                drop(black_box(permit));
                                granted += 1;
                            }
                        }
                    }
                }
                let elapsed = start.elapsed();
                assert_eq!(granted, iters);
                elapsed
            });
        });
    }
    group.bench_function("tokio_clock_now", |b| {
        let clock = TokioClock::new();
        b.to_async(&rt).iter(|| async { black_box(clock.now()) });
    });
    group.bench_function("std_instant_now", |b| {
        b.iter(|| black_box(Instant::now()));
    });
    group.bench_function("governor_clock_now", |b| {
        let clock = governor::clock::DefaultClock::default();
        b.iter(|| black_box(clock.now()));
    });
    group.bench_function("std_mutex_lock", |b| {
        let m = Mutex::new(0u64);
        b.iter(|| {
            let mut guard = black_box(&m).lock().unwrap();
            *guard += 1;
        });
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// Ratios, from criterion's estimates of this run.

/// Where criterion writes (as criterion decides it, less its `cargo metadata` fallback).
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"),
        PathBuf::from,
    );
    target.join("criterion")
}

/// `"key":{... "point_estimate":X` in criterion's `estimates.json`.
fn point_estimate(json: &str, key: &str) -> Option<f64> {
    let at = json.find(&format!("\"{key}\":{{"))?;
    let rest = &json[at..];
    let value = &rest[rest.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = value.find([',', '}'])?;
    value[..end].trim().parse().ok()
}

/// Criterion's headline time in ns (the slope when it has one, else the mean), if this run
/// wrote it.
fn estimate(group: &str, function: &str, since: SystemTime) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(function)
        .join("new/estimates.json");
    let fresh = std::fs::metadata(&path).ok()?.modified().ok()? >= since;
    if !fresh {
        return None;
    }
    let json = std::fs::read_to_string(&path).ok()?;
    point_estimate(&json, "slope").or_else(|| point_estimate(&json, "mean"))
}

fn print_ratios(since: SystemTime) {
    let rows = [
        ("rate_acquire", "floodgate_acquire", "governor_check"),
        ("rate_acquire", "floodgate_acquire_detach", "governor_check"),
        ("rate_refused", "floodgate_acquire", "governor_check"),
    ];
    let mut printed = false;
    for (group, fg, gov) in rows {
        let (Some(f), Some(g)) = (estimate(group, fg, since), estimate(group, gov, since)) else {
            continue;
        };
        if !printed {
            println!();
            println!("ratios floodgate/governor (criterion estimates of this run):");
            printed = true;
        }
        println!(
            "  {group:<13} {fg:<25} {f:8.1} ns   governor_check {g:6.1} ns   ratio {:.1}x",
            f / g
        );
    }
}

fn main() {
    let since = SystemTime::now();
    let mut c = Criterion::default().configure_from_args();
    rate_acquire(&mut c);
    rate_refused(&mut c);
    rate_parts(&mut c);
    c.final_summary();
    print_ratios(since);
}
