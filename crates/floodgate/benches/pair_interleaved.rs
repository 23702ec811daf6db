//! The uncontended pair (acquire + release, limit 100) on the embedded store beside
//! `tokio::sync::Semaphore`'s, in short alternating rounds on one current-thread runtime, so
//! both see the same machine load: the ratio holds on a busy machine where two criterion
//! phases seconds apart do not. Rounds are short (1,000 pairs) so that few are cut by the OS
//! scheduler on a loaded machine. Prints each side's per-pair time (the fastest round, and the
//! median round) and their ratios, also against tokio's owned permit (`acquire_owned`, which
//! keeps its semaphore alive as Floodgate's `Permit` does); then the same for the try pair
//! (`try_acquire_now` beside tokio's `try_acquire`, neither awaiting), timed in the same rounds.
//!
//! Run: `cargo bench -p floodgate --bench pair_interleaved` (`-- ROUNDS PAIRS_PER_ROUND`).
//! With `STEPS=1`, also the pair's parts, each timed alone in the same rounds: two lock/unlock
//! pairs, two clock reads, an `Arc` clone and drop, the state machine's acquire + release, and
//! the store's synchronous acquire + release (the state machine plus lock, clock and wake-up
//! bookkeeping): what the full pair adds on top is the `Permit` guard and the async call.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::Instant;

use std::sync::{Arc, Mutex};

use floodgate::core::{AcquireRequest, Admission, Effects, LimiterCore};
use floodgate::{
    AcquireOptions, Clock, FastClock, Floodgate, LimiterBackend, LimiterSpec, MemoryLimiter,
    MemoryStore, Timestamp,
};
use tokio::sync::Semaphore;

/// Per-pair nanoseconds of `per_round` runs of `f`.
fn timed(per_round: usize, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..per_round {
        f();
    }
    start.elapsed().as_nanos() as f64 / per_round as f64
}

/// The pair's parts, each timed alone (see the module's doc), interleaved round by round.
fn steps(rounds: usize, per_round: usize) {
    let fast = FastClock::new();
    let lock = Mutex::new(0u64);
    let arc = Arc::new(0u64);
    let mut core = LimiterCore::new(LimiterSpec::concurrency(100), 1).unwrap();
    let req = AcquireRequest::default();
    let mut fx = Effects::default();
    let backend = MemoryLimiter::standalone(
        "steps".parse().unwrap(),
        LimiterSpec::concurrency(100),
        FastClock::new(),
        1,
    )
    .unwrap();
    let options = AcquireOptions::new();
    let names = [
        "2 lock/unlock",
        "2 clock reads",
        "Arc clone+drop",
        "core acquire+release",
        "store sync acquire+release",
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut now = 0u64;
    for _ in 0..rounds {
        times[0].push(timed(per_round, || {
            *lock.lock().unwrap() += 1;
            *lock.lock().unwrap() += 1;
        }));
        times[1].push(timed(per_round, || {
            std::hint::black_box(fast.now());
            std::hint::black_box(fast.now());
        }));
        times[2].push(timed(per_round, || {
            drop(std::hint::black_box(Arc::clone(&arc)));
        }));
        times[3].push(timed(per_round, || {
            now += 1;
            let Admission::Granted(grant) = core.acquire(Timestamp(now), &req, &mut fx) else {
                panic!("uncontended");
            };
            assert!(core.release(Timestamp(now), grant.token, &mut fx));
        }));
        times[4].push(timed(per_round, || {
            let grant = backend.acquire_at_once(&options).unwrap().unwrap();
            backend.release_in_background(grant.token);
        }));
    }
    for (name, v) in names.iter().zip(&mut times) {
        v.sort_by(f64::total_cmp);
        println!(
            "  {name}: fastest {:.1} ns, median {:.1} ns",
            v[0],
            v[v.len() / 2]
        );
    }
}

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.parse::<usize>().unwrap());
    let rounds = args.next().unwrap_or(3000);
    let per_round = args.next().unwrap_or(1000);
    if std::env::var_os("STEPS").is_some() {
        steps(rounds.min(1000), per_round);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let gate = Floodgate::with_store(MemoryStore::with_clock(FastClock::new()));
        gate.define("pair", LimiterSpec::concurrency(100))
            .await
            .unwrap();
        let limiter = gate.limiter("pair").await.unwrap();
        let semaphore = Semaphore::new(100);
        let owned = Arc::new(Semaphore::new(100));
        let (mut fg, mut tk) = (Vec::new(), Vec::new());
        let mut tk_owned = Vec::new();
        let (mut fg_try, mut tk_try) = (Vec::new(), Vec::new());
        let (mut std_clock, mut fast_clock) = (Vec::new(), Vec::new());
        let fast = FastClock::new();
        for _ in 0..rounds {
            let start = Instant::now();
            for _ in 0..per_round {
                let permit = limiter.acquire(AcquireOptions::new()).await.unwrap();
                drop(permit);
            }
            fg.push(start.elapsed().as_nanos() as f64 / per_round as f64);
            let start = Instant::now();
            for _ in 0..per_round {
                let permit = semaphore.acquire().await.unwrap();
                drop(permit);
            }
            tk.push(start.elapsed().as_nanos() as f64 / per_round as f64);
            // Tokio's owned permit: like Floodgate's `Permit`, it keeps its semaphore alive
            // (an `Arc` clone and drop per pair) and can move into a spawned task.
            let start = Instant::now();
            for _ in 0..per_round {
                let permit = Arc::clone(&owned).acquire_owned().await.unwrap();
                drop(permit);
            }
            tk_owned.push(start.elapsed().as_nanos() as f64 / per_round as f64);
            // The try pair: a try-acquire without awaiting, then the release, on both sides.
            let start = Instant::now();
            for _ in 0..per_round {
                let permit = limiter.try_acquire_now().unwrap().unwrap();
                drop(permit);
            }
            fg_try.push(start.elapsed().as_nanos() as f64 / per_round as f64);
            let start = Instant::now();
            for _ in 0..per_round {
                let permit = semaphore.try_acquire().unwrap();
                drop(permit);
            }
            tk_try.push(start.elapsed().as_nanos() as f64 / per_round as f64);
            if std::env::var_os("CLOCKS").is_some() {
                let start = Instant::now();
                for _ in 0..per_round {
                    std::hint::black_box(Instant::now());
                }
                std_clock.push(start.elapsed().as_nanos() as f64 / per_round as f64);
                let start = Instant::now();
                for _ in 0..per_round {
                    std::hint::black_box(floodgate::Clock::now(&fast));
                }
                fast_clock.push(start.elapsed().as_nanos() as f64 / per_round as f64);
            }
            // Lets the store's timer task run between rounds, as it would between requests.
            tokio::task::yield_now().await;
        }
        let stats = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[0], v[v.len() / 2])
        };
        let (fg_min, fg_med) = stats(&mut fg);
        let (tk_min, tk_med) = stats(&mut tk);
        println!(
            "pair (interleaved, {rounds} rounds of {per_round}): floodgate fastest {fg_min:.1} ns, \
             median {fg_med:.1} ns; tokio fastest {tk_min:.1} ns, median {tk_med:.1} ns; \
             ratio fastest {:.2}x, median {:.2}x",
            fg_min / tk_min,
            fg_med / tk_med
        );
        let (to_min, to_med) = stats(&mut tk_owned);
        println!(
            "owned pair (tokio's acquire_owned, an owned permit as Floodgate's, same rounds): \
             tokio fastest {to_min:.1} ns, median {to_med:.1} ns; floodgate's ratio fastest \
             {:.2}x, median {:.2}x",
            fg_min / to_min,
            fg_med / to_med
        );
        let (fg_min, fg_med) = stats(&mut fg_try);
        let (tk_min, tk_med) = stats(&mut tk_try);
        println!(
            "try pair (try_acquire_now / try_acquire, same rounds): floodgate fastest {fg_min:.1} ns, \
             median {fg_med:.1} ns; tokio fastest {tk_min:.1} ns, median {tk_med:.1} ns; \
             ratio fastest {:.2}x, median {:.2}x",
            fg_min / tk_min,
            fg_med / tk_med
        );
        if !std_clock.is_empty() {
            let (a, b) = stats(&mut std_clock);
            let (c, d) = stats(&mut fast_clock);
            println!("clock reads: std Instant fastest {a:.1} ns, median {b:.1} ns; FastClock fastest {c:.1} ns, median {d:.1} ns");
        }
    });
}
