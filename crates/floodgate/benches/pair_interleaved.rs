//! The uncontended pair (acquire + release, limit 100) on the embedded store beside
//! `tokio::sync::Semaphore`'s, in short alternating rounds on one current-thread runtime, so
//! both see the same machine load: the ratio holds on a busy machine where two criterion
//! phases seconds apart do not. Rounds are short (1,000 pairs) so that few are cut by the OS
//! scheduler on a loaded machine. Prints each side's per-pair time (the fastest round, and the
//! median round) and their ratios.
//!
//! Run: `cargo bench -p floodgate --bench pair_interleaved` (`-- ROUNDS PAIRS_PER_ROUND`).

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::Instant;

use floodgate::{AcquireOptions, FastClock, Floodgate, LimiterSpec, MemoryStore};
use tokio::sync::Semaphore;

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.parse::<usize>().unwrap());
    let rounds = args.next().unwrap_or(3000);
    let per_round = args.next().unwrap_or(1000);
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
        let (mut fg, mut tk) = (Vec::new(), Vec::new());
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
        if !std_clock.is_empty() {
            let (a, b) = stats(&mut std_clock);
            let (c, d) = stats(&mut fast_clock);
            println!("clock reads: std Instant fastest {a:.1} ns, median {b:.1} ns; FastClock fastest {c:.1} ns, median {d:.1} ns");
        }
    });
}
