//! Keyed limiters in the durable embedded store: their specs, overrides, per-key holders and
//! tokens survive a reopen, from the log alone and from a snapshot plus the log after it, and
//! waiters queued at the restart are dropped (their connections are gone).

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use floodgate::{
    AcquireError, AcquireOptions, Durability, Floodgate, Grant, KeyOverride, KeyedSpec, Limiter,
    LimiterBackend, LimiterSpec, MemoryStore, WallClock,
};

const HOUR: Duration = Duration::from_secs(3600);

fn open(dir: &Path) -> (Floodgate<MemoryStore<WallClock>>, MemoryStore<WallClock>) {
    let (store, _) = MemoryStore::open(Durability::new(dir)).expect("open");
    (Floodgate::with_store(store.clone()), store)
}

/// A try-once acquire on `key`, its permit detached so that it outlives the store's close.
async fn take_once<B: LimiterBackend>(
    orgs: &Limiter<B>,
    key: &'static str,
) -> Result<Grant, AcquireError> {
    orgs.acquire(AcquireOptions::new().key(key).wait(Duration::ZERO))
        .await
        .map(floodgate::Permit::detach)
}

async fn run(snapshot_midway: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (gate, store) = open(dir.path());
    let spec = LimiterSpec::concurrency(4)
        .with_default_lease(HOUR)
        .with_max_wait(HOUR);
    gate.define_keyed("orgs", spec, KeyedSpec::per_key(2).with_max_keys(50))
        .await
        .unwrap();
    let orgs = gate.limiter("orgs").await.unwrap();
    let big = KeyOverride {
        concurrency: Some(3),
        weight: 2,
    };
    orgs.backend().put_key("big", Some(big)).await.unwrap();
    let take = |key: &'static str| take_once(&orgs, key);
    let b1 = take("big").await.unwrap();
    let _b2 = take("big").await.unwrap();
    if snapshot_midway {
        store.snapshot_now().unwrap();
    }
    let s1 = take("small").await.unwrap();
    orgs.backend().release(b1.token).await.unwrap();
    let _b3 = take("big").await.unwrap();
    let _o1 = take("other").await.unwrap();
    // A waiter queued at the restart: dropped on reopen.
    let waiter = {
        let orgs = orgs.clone();
        tokio::spawn(async move {
            orgs.acquire(AcquireOptions::new().key("small").wait(HOUR))
                .await
        })
    };
    // A liveness bound only (30 s: one second was the bound before, short on a loaded machine).
    for _ in 0..6_000 {
        if orgs.status().await.unwrap().waiting == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(orgs.status().await.unwrap().waiting, 1, "the total is full");
    let before = orgs.status().await.unwrap();
    store.close();
    waiter.abort();
    drop((gate, orgs, store));

    let (gate, _store) = open(dir.path());
    let orgs = gate.limiter("orgs").await.unwrap();
    let status = orgs.status().await.unwrap();
    assert_eq!(status.in_use, 4, "{status:?}");
    assert_eq!(status.waiting, 0, "the queued waiter was dropped");
    assert_eq!(status.counters.granted, before.counters.granted);
    let keys = orgs.backend().keys(10).await.unwrap().expect("still keyed");
    assert_eq!(keys.spec.concurrency, Some(2));
    assert_eq!(keys.overrides, 1);
    let big = keys.busiest.iter().find(|k| &*k.key == "big").unwrap();
    assert_eq!((big.in_use, big.limit, big.weight), (2, Some(3), 2));
    let small = keys.busiest.iter().find(|k| &*k.key == "small").unwrap();
    assert_eq!(small.in_use, 1);
    // The held permits are the same ones: releasing one by token works, and frees its key.
    assert!(orgs.backend().release(s1.token).await.unwrap());
    // big's override (3, above the per-key 2) survived: it gets a third permit.
    let next = orgs
        .acquire(AcquireOptions::new().key("big").wait(Duration::ZERO))
        .await
        .unwrap();
    assert!(next.fencing_token() > s1.token, "tokens keep increasing");
    let status = orgs.status().await.unwrap();
    assert_eq!(status.in_use, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_limiters_survive_a_reopen_from_the_log() {
    run(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_limiters_survive_a_reopen_from_a_snapshot_and_the_log() {
    run(true).await;
}

/// Per-key rates alone (no total limit): the limiter and its keys' rate debt survive a reopen
/// from a snapshot plus the log, and from the log alone; no total limit appears.
async fn per_key_rates_alone(snapshot_midway: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (gate, store) = open(dir.path());
    let each = floodgate::RateSpec::per(1, HOUR).with_burst(2);
    let mut spec = LimiterSpec::default().with_max_wait(HOUR);
    (spec.concurrency, spec.rate) = (None, None);
    gate.define_keyed("orgs", spec, KeyedSpec::default().with_rate(each))
        .await
        .unwrap();
    let orgs = gate.limiter("orgs").await.unwrap();
    let take = |key: &'static str| take_once(&orgs, key);
    take("a").await.unwrap();
    if snapshot_midway {
        store.snapshot_now().unwrap();
    }
    take("a").await.unwrap();
    take("b").await.unwrap();
    assert!(take("a").await.is_err(), "a's burst is spent");
    store.close();
    drop((gate, orgs, store));

    let (gate, _store) = open(dir.path());
    let orgs = gate.limiter("orgs").await.unwrap();
    let status = orgs.status().await.unwrap();
    assert_eq!((status.in_use, status.limit), (0, None), "{status:?}");
    assert_eq!((status.spec.concurrency, status.spec.rate), (None, None));
    assert_eq!(status.counters.paced, 3, "{status:?}");
    let take = |key: &'static str| take_once(&orgs, key);
    assert!(take("a").await.is_err(), "a's rate debt survived");
    take("b").await.unwrap();
    assert!(take("b").await.is_err(), "b's too");
    take("c").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_rates_alone_survive_a_reopen_from_the_log() {
    per_key_rates_alone(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_rates_alone_survive_a_reopen_from_a_snapshot_and_the_log() {
    per_key_rates_alone(true).await;
}
