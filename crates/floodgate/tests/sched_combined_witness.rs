//! A limiter with both a concurrency and a rate limit, driven by concurrent workers whose
//! acquires wait, give up part-way (the future dropped: a cancel, also of a head waiter the
//! rate holds back) or are granted, on both stores (the embedded one and a real
//! `redis-server`). Random plans with a printed seed (`FLOODGATE_COMBINED_SEED` replays one).
//!
//! The witnesses are the test's own: a count of permits held, raised after each grant and
//! lowered before each release, never above the concurrency limit; and, over the grants' own
//! times (the store's clock), the rate's bound: for every window `[a, b]` between two grants,
//! the permits granted within it are at most `burst + (b - a) / interval`. A waiter that gave
//! up must not have taken tokens (it would only make the limiter stricter, which the counts
//! of grants show), and none is granted past the rate or the limit.

#![allow(clippy::unwrap_used)]

#[cfg(feature = "redis")]
mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodgate::{AcquireOptions, Floodgate, LimiterSpec, RateSpec, Store};

const LIMIT: u32 = 3;
/// 50 per second: one token every 20 ms.
const INTERVAL_US: u64 = 20_000;
const BURST: u32 = 2;
const WORKERS: u64 = 6;
const ROUNDS: u64 = 30;

/// SplitMix64, seeded per worker from the run's seed.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

async fn run<S: Store + 'static>(gate: Floodgate<S>, seed: u64) {
    let spec = LimiterSpec::concurrency(LIMIT)
        .with_rate(RateSpec::per(50, Duration::from_secs(1)).with_burst(BURST))
        .with_default_lease(Duration::from_secs(60))
        .with_max_wait(Duration::from_secs(10));
    gate.define("both", spec).await.unwrap();
    let both = gate.limiter("both").await.unwrap();
    let held = Arc::new(AtomicU32::new(0));
    let grants: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let (gave_up, timed_out) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (both, held, grants) = (both.clone(), held.clone(), grants.clone());
        let (gave_up, timed_out) = (gave_up.clone(), timed_out.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ (w + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
            for _ in 0..ROUNDS {
                let permits = 1 + rng.below(2) as u32;
                let wait = Duration::from_millis([0, 50, 300, 1_000][rng.below(4) as usize]);
                let acquire = both.acquire(AcquireOptions::new().permits(permits).wait(wait));
                // Sometimes the caller gives up before its wait ends (the future is dropped).
                let patience = Duration::from_millis([5, 40, 2_000, 2_000][rng.below(4) as usize]);
                let permit = match tokio::time::timeout(patience, acquire).await {
                    Err(_) => {
                        gave_up.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(Err(_)) => {
                        timed_out.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(Ok(p)) => p,
                };
                let now_held = held.fetch_add(permits, Ordering::SeqCst) + permits;
                assert!(now_held <= LIMIT, "seed {seed}: {now_held} permits held");
                grants
                    .lock()
                    .unwrap()
                    .push((permit.grant().granted_at.0, permits));
                tokio::time::sleep(Duration::from_millis(rng.below(150))).await;
                held.fetch_sub(permits, Ordering::SeqCst);
                permit.release().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut g = grants.lock().unwrap().clone();
    g.sort_unstable();
    for i in 0..g.len() {
        let mut tokens = 0;
        for j in i..g.len() {
            tokens += u64::from(g[j].1);
            let allowed = u64::from(BURST) + (g[j].0 - g[i].0) / INTERVAL_US;
            assert!(
                tokens <= allowed,
                "seed {seed}: {tokens} tokens in {} us (allowed {allowed})",
                g[j].0 - g[i].0
            );
        }
    }
    let st = both.status().await.unwrap();
    assert_eq!(st.in_use, 0, "seed {seed}: {st:?}");
    // A grant can race a give-up: the dropped future's store gives it back, unseen here.
    assert!(st.counters.granted >= g.len() as u64, "seed {seed}: {st:?}");
    eprintln!(
        "seed {seed}: {} grants, {} gave up, {} refused",
        g.len(),
        gave_up.load(Ordering::Relaxed),
        timed_out.load(Ordering::Relaxed)
    );
    // The plans made every kind happen.
    assert!(g.len() > 20 && gave_up.load(Ordering::Relaxed) > 0);
}

fn seed() -> u64 {
    let seed = support::rng::seed_from_env("FLOODGATE_COMBINED_SEED");
    eprintln!("sched_combined_witness seed {seed} (FLOODGATE_COMBINED_SEED replays it)");
    seed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_holds_both_limits() {
    run(Floodgate::in_memory(), seed()).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_both_limits() {
    let server = support::RedisServer::start();
    let store = floodgate::RedisStore::connect(floodgate::RedisConfig::new(server.url()))
        .await
        .unwrap();
    run(Floodgate::with_store(store), seed()).await;
}
