//! Stress test of a keyed limiter, in the embedded store and on a real `redis-server`: 1,500 tasks on a multi-threaded
//! runtime acquire for 40 keys (random permits, waits and leases; hold; release, drop, detach
//! or hold past a short lease; some are cancelled by a timeout or aborted while waiting), while
//! independent witnesses, one per key and one overall, count the permits tasks know they hold
//! and check that neither the total nor any key's limit (with an override) is ever exceeded. At
//! the end nothing is held, nothing waits, no key state is left, and every grant is accounted
//! for as released or expired.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use floodgate::{
    AcquireOptions, Floodgate, KeyOverride, KeyedSpec, LimiterBackend, LimiterSpec, MemoryStore,
    RedisConfig, RedisStore, Store,
};
use support::rng::Rng;

const TOTAL: i64 = 12;
const PER_KEY: i64 = 3;
/// Key 0 is overridden to this limit.
const OVERRIDDEN: i64 = 1;
const KEYS: usize = 40;
const TASKS: u64 = 1_500;
const LONG_LEASE: Duration = Duration::from_secs(60);

/// Counts held permits outside the limiter; records the peak and every violation.
struct Witness {
    limit: i64,
    current: AtomicI64,
    peak: AtomicI64,
    violations: AtomicU64,
}

impl Witness {
    fn new(limit: i64) -> Arc<Witness> {
        Arc::new(Witness {
            limit,
            current: AtomicI64::new(0),
            peak: AtomicI64::new(0),
            violations: AtomicU64::new(0),
        })
    }
}

/// One holder's share of a witness; dropping it un-counts the holder.
struct Counted(Arc<Witness>, i64);

impl Counted {
    fn enter(w: &Arc<Witness>, permits: i64) -> Counted {
        let now = w.current.fetch_add(permits, SeqCst) + permits;
        w.peak.fetch_max(now, SeqCst);
        if now > w.limit {
            w.violations.fetch_add(1, SeqCst);
        }
        Counted(Arc::clone(w), permits)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.current.fetch_sub(self.1, SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyed_limits_hold_under_stress() {
    stress(Floodgate::with_store(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyed_limits_hold_under_stress_on_redis() {
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(server.url()))
        .await
        .unwrap();
    stress(Floodgate::with_store(store)).await;
}

async fn stress<S: Store>(gate: Floodgate<S>) {
    let spec = LimiterSpec::concurrency(TOTAL as u32)
        .with_max_wait(Duration::from_secs(5))
        .with_max_queue(100_000);
    gate.define_keyed("tenants", spec, KeyedSpec::per_key(PER_KEY as u32))
        .await
        .unwrap();
    let limiter = gate.limiter("tenants").await.unwrap();
    let over = KeyOverride {
        concurrency: Some(OVERRIDDEN as u32),
        weight: 2,
    };
    limiter
        .backend()
        .put_key("key-0", Some(over))
        .await
        .unwrap();

    let total = Witness::new(TOTAL);
    let per_key: Vec<Arc<Witness>> = (0..KEYS)
        .map(|k| Witness::new(if k == 0 { OVERRIDDEN } else { PER_KEY }))
        .collect();
    let granted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut rng = Rng(0x5EED_0014_4B45_5945);
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        // Skewed: a few keys get most of the traffic, as large tenants do.
        let key = if rng.range(0, 1) == 0 {
            rng.range(0, 3) as usize
        } else {
            rng.range(0, KEYS as u64 - 1) as usize
        };
        let permits = if key == 0 { 1 } else { rng.range(1, 2) as u32 };
        let wait = Duration::from_millis(match rng.range(0, 9) {
            0 => 0,
            1..=3 => rng.range(1, 20),
            _ => 2_000,
        });
        let ending = rng.range(0, 9);
        let hold = Duration::from_millis(rng.range(0, 4));
        let start = Duration::from_millis(rng.range(0, 200));
        let cancel = match rng.range(0, 9) {
            0 => Some(Duration::from_millis(rng.range(1, 10))),
            _ => None,
        };
        let (limiter, total, witness) = (
            limiter.clone(),
            Arc::clone(&total),
            Arc::clone(&per_key[key]),
        );
        let (granted, refused) = (Arc::clone(&granted), Arc::clone(&refused));
        let task = tokio::spawn(async move {
            tokio::time::sleep(start).await;
            let short = ending >= 8;
            let lease = if short {
                Duration::from_millis(rng_lease(ending))
            } else {
                LONG_LEASE
            };
            let options = AcquireOptions::new()
                .key(format!("key-{key}"))
                .permits(permits)
                .wait(wait)
                .lease(lease);
            let acquired = match cancel {
                Some(after) => match tokio::time::timeout(after, limiter.acquire(options)).await {
                    Ok(r) => r,
                    Err(_) => return,
                },
                None => limiter.acquire(options).await,
            };
            let permit = match acquired {
                Ok(p) => p,
                Err(_) => {
                    refused.fetch_add(1, SeqCst);
                    return;
                }
            };
            granted.fetch_add(1, SeqCst);
            if short {
                // Not counted: its lease may end while it "holds". Detach (the lease must
                // reclaim it) or hold past the lease (it is lost).
                let _ = permit.detach();
                return;
            }
            let counted = (
                Counted::enter(&total, i64::from(permits)),
                Counted::enter(&witness, i64::from(permits)),
            );
            tokio::time::sleep(hold).await;
            drop(counted);
            if ending % 2 == 0 {
                assert!(permit.release().await.unwrap(), "a long lease was lost");
            } else {
                drop(permit);
            }
        });
        tasks.push(task);
    }
    for task in tasks {
        task.await.unwrap();
    }
    // Detached permits' leases (at most 30 ms) end; the timer reclaims them (a liveness bound
    // only: 30 s, as a loaded machine needs; it was 4 s).
    let backend = limiter.backend().clone();
    let mut status = limiter.status().await.unwrap();
    for _ in 0..1_500 {
        if status.in_use == 0 && status.waiting == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = limiter.status().await.unwrap();
    }
    let keys = backend.keys(10).await.unwrap().unwrap();
    let c = status.counters;
    eprintln!(
        "granted {} refused {} total peak {} key peaks {:?}; counters {c:?}",
        granted.load(SeqCst),
        refused.load(SeqCst),
        total.peak.load(SeqCst),
        per_key
            .iter()
            .take(4)
            .map(|w| w.peak.load(SeqCst))
            .collect::<Vec<_>>()
    );
    assert_eq!(total.violations.load(SeqCst), 0, "the total was exceeded");
    for (k, w) in per_key.iter().enumerate() {
        assert_eq!(w.violations.load(SeqCst), 0, "key-{k}'s limit was exceeded");
    }
    // The witnesses saw contention: the limits were reached, so they could have been crossed.
    assert_eq!(
        per_key[1].peak.load(SeqCst),
        PER_KEY,
        "key-1 reached its limit"
    );
    assert_eq!(per_key[0].peak.load(SeqCst), OVERRIDDEN);
    assert!(
        total.peak.load(SeqCst) >= TOTAL - 2,
        "the total was contended"
    );
    assert_eq!((status.in_use, status.holders, status.waiting), (0, 0, 0));
    assert_eq!(keys.count, 0, "idle keys left state: {:?}", keys.busiest);
    assert_eq!(
        c.granted,
        c.released + c.expired,
        "every grant accounted for"
    );
    assert!(
        c.expired > 0 && c.timed_out + c.cancelled > 0,
        "the run exercised lapses and give-ups"
    );
}

fn rng_lease(ending: u64) -> u64 {
    if ending == 8 {
        20
    } else {
        2
    }
}
