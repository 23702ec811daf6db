//! Durable replay of keyed state under random schedules (h-krev16): acquires (at once and
//! queued), releases, overrides set and removed, reconfigurations (the total lowered below
//! what is held and raised, the per-key default changed or removed, `max_keys` changed) and
//! snapshots at random moments, on the durable embedded store; then a reopen must show exactly
//! what the witness (kept outside the store) says is held: in use in total and per key, the
//! overrides and specs in force, every witnessed token releasable once and freeing its key,
//! and tokens above every one handed out before.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodgate::{
    AcquireOptions, Durability, Floodgate, KeyOverride, KeyedSpec, LimiterBackend, LimiterSpec,
    MemoryStore, WallClock,
};

const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];
const HOUR: Duration = Duration::from_secs(3600);

struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// token -> (key index, permits): what the witness saw granted and not released.
type Held = Arc<Mutex<BTreeMap<u64, (usize, u32)>>>;

fn open(dir: &Path) -> (Floodgate<MemoryStore<WallClock>>, MemoryStore<WallClock>) {
    let (store, _) = MemoryStore::open(Durability::new(dir)).expect("open");
    (Floodgate::with_store(store.clone()), store)
}

fn spec(total: u32) -> LimiterSpec {
    LimiterSpec::concurrency(total)
        .with_default_lease(HOUR)
        .with_max_wait(HOUR)
}

async fn run(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = XorShift(seed);
    let held: Held = Arc::default();
    let mut overrides: [Option<KeyOverride>; 4] = [None; 4];
    let (mut total, mut per_key, mut max_keys) = (6u32, Some(2u32), 4u32);
    let mut max_token = 0u64;
    {
        let (gate, store) = open(dir.path());
        let keyed = |per_key: Option<u32>, max_keys: u32| KeyedSpec {
            concurrency: per_key,
            max_keys,
            ..KeyedSpec::default()
        };
        gate.define_keyed("orgs", spec(total), keyed(per_key, max_keys))
            .await
            .unwrap();
        let orgs = gate.limiter("orgs").await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..200 {
            match rng.below(10) {
                0..=3 => {
                    let key = rng.below(4) as usize;
                    let permits = 1 + rng.below(2) as u32;
                    // Some wait a little (real time): queued, then granted, refused or timed out.
                    let wait = Duration::from_millis([0, 0, 20][rng.below(3) as usize]);
                    let (orgs, held) = (orgs.clone(), Arc::clone(&held));
                    let opts = AcquireOptions::new()
                        .key(KEYS[key])
                        .permits(permits)
                        .wait(wait);
                    waiters.push(tokio::spawn(async move {
                        if let Ok(p) = orgs.acquire(opts).await {
                            let g = p.detach();
                            held.lock().unwrap().insert(g.token.0, (key, permits));
                        }
                    }));
                }
                4..=5 => {
                    let tokens: Vec<u64> = held.lock().unwrap().keys().copied().collect();
                    if !tokens.is_empty() {
                        let t = tokens[rng.below(tokens.len() as u64) as usize];
                        held.lock().unwrap().remove(&t);
                        let out = orgs.backend().release(floodgate::FencingToken(t)).await;
                        assert!(out.unwrap(), "a witnessed token {t} is held");
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
                        // Overrides are bounded by max_keys too.
                        Err(e) => assert!(
                            overrides[key].is_none() && set >= max_keys as usize,
                            "{e:?}"
                        ),
                    }
                }
                7 => {
                    total = 1 + rng.below(8) as u32;
                    per_key = [None, Some(1), Some(2), Some(3)][rng.below(4) as usize];
                    max_keys = 2 + rng.below(4) as u32;
                    gate.define_keyed("orgs", spec(total), keyed(per_key, max_keys))
                        .await
                        .unwrap();
                }
                8 => store.snapshot_now().unwrap(),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        // Every waiter answered (their waits are short) before the witness is read.
        for w in waiters {
            w.await.unwrap();
        }
        let status = orgs.status().await.unwrap();
        let witness = held.lock().unwrap().clone();
        let sum: u32 = witness.values().map(|(_, p)| p).sum();
        assert_eq!(status.in_use, sum, "before the reopen: {status:?}");
        assert_eq!(status.waiting, 0);
        max_token = witness.keys().copied().max().unwrap_or(0).max(max_token);
        store.close();
    }
    let (gate, _store) = open(dir.path());
    let orgs = gate.limiter("orgs").await.unwrap();
    let status = orgs.status().await.unwrap();
    let witness = held.lock().unwrap().clone();
    let sum: u32 = witness.values().map(|(_, p)| p).sum();
    assert_eq!(
        status.in_use, sum,
        "seed {seed}: after the reopen {status:?}"
    );
    assert_eq!(status.spec.concurrency, Some(total));
    let keys = orgs.backend().keys(10).await.unwrap().unwrap();
    assert_eq!(keys.spec.concurrency, per_key, "seed {seed}");
    assert_eq!(keys.spec.max_keys, max_keys, "seed {seed}");
    assert_eq!(
        keys.overrides,
        overrides.iter().filter(|o| o.is_some()).count() as u64
    );
    for (i, key) in KEYS.iter().enumerate() {
        let want: u32 = witness
            .values()
            .filter(|(k, _)| *k == i)
            .map(|(_, p)| p)
            .sum();
        let got = keys.busiest.iter().find(|k| &*k.key == *key);
        assert_eq!(got.map_or(0, |k| k.in_use), want, "seed {seed}: {key}");
        if let Some(k) = got {
            let ov = overrides[i];
            assert_eq!(k.limit, ov.and_then(|o| o.concurrency).or(per_key), "{key}");
            assert_eq!(k.weight, ov.map_or(1, |o| o.weight), "{key}");
        }
    }
    // The same tokens, each releasable once; then no key state is left.
    for t in witness.keys() {
        let b = orgs.backend();
        assert!(b.release(floodgate::FencingToken(*t)).await.unwrap());
        assert!(!b.release(floodgate::FencingToken(*t)).await.unwrap());
    }
    let keys = orgs.backend().keys(10).await.unwrap().unwrap();
    assert_eq!(keys.count, 0, "seed {seed}: {keys:?}");
    gate.define_keyed("orgs", spec(4), KeyedSpec::per_key(2))
        .await
        .unwrap();
    let next = orgs
        .acquire(AcquireOptions::new().key("k0").wait(Duration::ZERO))
        .await
        .unwrap();
    assert!(
        next.fencing_token().0 > max_token,
        "tokens are never reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_state_replays_exactly_under_random_schedules() {
    for seed in (1..=6u64).chain([0x00C0_FFEE, 0x5EED_1234_5678]) {
        run(seed).await;
    }
}
