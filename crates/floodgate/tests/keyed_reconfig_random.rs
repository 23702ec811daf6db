//! Random schedules of run-time changes through the stores' own API, on the embedded store and
//! on a real `redis-server` (h-krev16): rounds of acquires (at once, and queued with short
//! waits), releases, cancels (a queued acquire's future dropped), overrides set and removed and
//! `PUT`s of the limiter (total and per-key default raised, lowered below what is held,
//! removed; `max_keys` changed). A witness outside the store keeps what it was granted; after
//! each round (every waiter answered or cancelled) the store must agree with it exactly: in use
//! in total and per key, nobody waiting, and neither the total nor any key above the largest
//! limit it had during the round or what it already held when the round began. At the end everything is released and no key state is left.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodgate::{
    AcquireOptions, FencingToken, Floodgate, KeyOverride, KeyedSpec, LimiterBackend, LimiterSpec,
    MemoryStore, RedisConfig, RedisStore, Store,
};

const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];

struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn spec(total: u32) -> LimiterSpec {
    LimiterSpec::concurrency(total)
        .with_default_lease(Duration::from_secs(600))
        .with_max_wait(Duration::from_secs(60))
}

fn keyed(per_key: Option<u32>, max_keys: u32) -> KeyedSpec {
    KeyedSpec {
        concurrency: per_key,
        max_keys,
        ..KeyedSpec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_reconfiguration_in_memory() {
    for seed in 11..=16 {
        schedule(Floodgate::with_store(MemoryStore::new()), seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_reconfiguration_on_redis() {
    let server = support::RedisServer::start();
    for seed in 11..=16 {
        let store = RedisStore::connect(RedisConfig::new(server.url()))
            .await
            .unwrap();
        schedule(Floodgate::with_store(store), seed).await;
    }
}

async fn schedule<S: Store>(gate: Floodgate<S>, seed: u64) {
    let name = format!("orgs{seed}");
    let mut rng = XorShift(seed);
    let (mut total, mut per_key, mut max_keys) = (5u32, Some(2u32), 3u32);
    let mut overrides: [Option<KeyOverride>; 4] = [None; 4];
    gate.define_keyed(&name, spec(total), keyed(per_key, max_keys))
        .await
        .unwrap();
    let orgs = gate.limiter(&name).await.unwrap();
    // token -> (key, permits)
    let held: Arc<Mutex<BTreeMap<u64, (usize, u32)>>> = Arc::default();
    let limit_of = |ov: &[Option<KeyOverride>; 4], per_key: Option<u32>, k: usize| {
        ov[k].and_then(|o| o.concurrency).or(per_key)
    };
    for round in 0..25 {
        // The largest limits in force during the round, for the bounds checked after it.
        let mut max_total = total;
        let mut max_key: [Option<u32>; 4] =
            std::array::from_fn(|k| limit_of(&overrides, per_key, k));
        let widen = |max_key: &mut [Option<u32>; 4], now: [Option<u32>; 4]| {
            for k in 0..4 {
                max_key[k] = match (max_key[k], now[k]) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
        };
        // What was held when the round began: a lowered limit lets holders finish, so a key
        // (or the total) may end the round above its limits only by what it already held.
        let carried: Vec<(usize, u32)> = held.lock().unwrap().values().copied().collect();
        let carried_of = |k: Option<usize>| -> u32 {
            carried
                .iter()
                .filter(|(x, _)| k.is_none_or(|k| k == *x))
                .map(|(_, p)| p)
                .sum()
        };
        let mut tasks = Vec::new();
        for _ in 0..12 {
            match rng.below(9) {
                0..=3 => {
                    let key = rng.below(4) as usize;
                    let permits = 1 + rng.below(2) as u32;
                    let wait = Duration::from_millis([0, 30, 30][rng.below(3) as usize]);
                    let (orgs, held) = (orgs.clone(), Arc::clone(&held));
                    let opts = AcquireOptions::new()
                        .key(KEYS[key])
                        .permits(permits)
                        .wait(wait);
                    let cancel = rng.below(4) == 0;
                    tasks.push((
                        cancel,
                        tokio::spawn(async move {
                            if let Ok(p) = orgs.acquire(opts).await {
                                let g = p.detach();
                                held.lock().unwrap().insert(g.token.0, (key, permits));
                            }
                        }),
                    ));
                }
                4..=5 => {
                    let tokens: Vec<u64> = held.lock().unwrap().keys().copied().collect();
                    if !tokens.is_empty() {
                        let t = tokens[rng.below(tokens.len() as u64) as usize];
                        held.lock().unwrap().remove(&t);
                        assert!(orgs.backend().release(FencingToken(t)).await.unwrap());
                    }
                }
                6 => {
                    let key = rng.below(4) as usize;
                    let ov = (rng.below(3) > 0).then(|| KeyOverride {
                        concurrency: [None, Some(1), Some(3)][rng.below(3) as usize],
                        weight: 1 + rng.below(3) as u32,
                    });
                    let set = overrides.iter().filter(|o| o.is_some()).count();
                    match orgs.backend().put_key(KEYS[key], ov).await {
                        Ok(_) => overrides[key] = ov,
                        Err(e) => assert!(
                            overrides[key].is_none() && set >= max_keys as usize,
                            "{e:?}"
                        ),
                    }
                }
                7 => {
                    total = 1 + rng.below(6) as u32;
                    per_key = [None, Some(1), Some(2), Some(3)][rng.below(4) as usize];
                    max_keys = 1 + rng.below(4) as u32;
                    let put = gate
                        .define_keyed(&name, spec(total), keyed(per_key, max_keys))
                        .await;
                    put.unwrap_or_else(|e| panic!("seed {seed} round {round}: put {e:?}"));
                }
                _ => tokio::time::sleep(Duration::from_millis(3)).await,
            }
            max_total = max_total.max(total);
            widen(
                &mut max_key,
                std::array::from_fn(|k| limit_of(&overrides, per_key, k)),
            );
        }
        // Some queued acquires give up (their futures dropped: a cancel, or a grant given back),
        // the others are answered within their short waits.
        for (cancel, task) in tasks {
            if cancel {
                task.abort();
            }
            let _ = task.await;
        }
        // Given-back grants are released in the background: a bounded wait for liveness only.
        let witness = held.lock().unwrap().clone();
        let sum: u32 = witness.values().map(|(_, p)| p).sum();
        let mut status = orgs.status().await.unwrap();
        for _ in 0..500 {
            if status.in_use == sum && status.waiting == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            status = orgs.status().await.unwrap();
        }
        assert_eq!(
            (status.in_use, status.waiting),
            (sum, 0),
            "seed {seed} round {round}"
        );
        assert!(
            sum <= max_total.max(carried_of(None)),
            "seed {seed} round {round}: total {sum}"
        );
        let view = orgs.backend().keys(10).await.unwrap().unwrap();
        for (k, key) in KEYS.iter().enumerate() {
            let want: u32 = witness
                .values()
                .filter(|(x, _)| *x == k)
                .map(|(_, p)| p)
                .sum();
            let got = view.busiest.iter().find(|i| &*i.key == *key);
            assert_eq!(
                got.map_or(0, |i| i.in_use),
                want,
                "seed {seed} round {round}: {key} ({view:?})"
            );
            if let Some(limit) = max_key[k] {
                assert!(
                    want <= limit.max(carried_of(Some(k))),
                    "seed {seed} round {round}: {key} {want}"
                );
            }
        }
    }
    let tokens: Vec<u64> = held.lock().unwrap().keys().copied().collect();
    for t in tokens {
        assert!(orgs.backend().release(FencingToken(t)).await.unwrap());
    }
    let view = orgs.backend().keys(10).await.unwrap().unwrap();
    assert_eq!(view.count, 0, "seed {seed}: no key state left: {view:?}");
}
