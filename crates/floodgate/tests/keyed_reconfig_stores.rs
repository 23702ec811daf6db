//! Run-time changes of a keyed limiter on both stores (h-krev16), with a witness of what is
//! held outside the store.
//!
//! Found by the reconfiguration steps added to `keyed_twin.rs`: on Redis, a `PUT` that lowers
//! the total **and** changes the per-key default, while waiters of two keys ask for more than
//! the new total, took the second key's waiter out twice (the plain put's refusal of impossible
//! waiters granted after the first one, which applied the per-key change, which refused the
//! second waiter, which the outer refusal then refused again). The key was left with `-1`
//! waiters, so its next waiter was never put in the round robin: a waiter never answered while
//! capacity sat free (it timed out), and `rejected` counted the refusal twice.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use floodgate::{
    AcquireError, AcquireOptions, Floodgate, KeyedSpec, LimiterBackend, LimiterSpec, MemoryStore,
    RedisConfig, RedisStore, Refusal, Store,
};

#[tokio::test]
async fn a_lowered_total_with_new_per_key_limits_refuses_each_waiter_once_in_memory() {
    lowered_total(Floodgate::with_store(MemoryStore::new())).await;
}

#[tokio::test]
async fn a_lowered_total_with_new_per_key_limits_refuses_each_waiter_once_on_redis() {
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(server.url()))
        .await
        .unwrap();
    lowered_total(Floodgate::with_store(store)).await;
}

fn spec(total: u32) -> LimiterSpec {
    LimiterSpec::concurrency(total)
        .with_max_wait(Duration::from_secs(30))
        .with_default_lease(Duration::from_secs(60))
}

/// Waits (bounded, for liveness only) until the limiter has `n` waiters.
async fn until_waiting<B: LimiterBackend>(limiter: &floodgate::Limiter<B>, n: u32) {
    for _ in 0..500 {
        if limiter.status().await.unwrap().waiting == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never {n} waiters");
}

async fn lowered_total<S: Store>(gate: Floodgate<S>) {
    gate.define_keyed("orgs", spec(4), KeyedSpec::per_key(2))
        .await
        .unwrap();
    let orgs = gate.limiter("orgs").await.unwrap();
    let take = |key: &str, permits: u32, wait: Duration| {
        AcquireOptions::new()
            .key(key.to_owned())
            .permits(permits)
            .wait(wait)
    };
    // The witness: a holds 2, b 1, c 1 (the total of 4 is full).
    let a = orgs.acquire(take("a", 2, Duration::ZERO)).await.unwrap();
    let b = orgs.acquire(take("b", 1, Duration::ZERO)).await.unwrap();
    let c = orgs.acquire(take("c", 1, Duration::ZERO)).await.unwrap();
    let before = orgs.status().await.unwrap().counters.rejected;
    // b waits for 2 (its own limit holds it back), then c for 2 (the total does).
    let long = Duration::from_secs(20);
    let wb = tokio::spawn({
        let orgs = orgs.clone();
        let o = take("b", 2, long);
        async move { orgs.acquire(o).await.map(|p| p.detach()) }
    });
    until_waiting(&orgs, 1).await;
    let wc = tokio::spawn({
        let orgs = orgs.clone();
        let o = take("c", 2, long);
        async move { orgs.acquire(o).await.map(|p| p.detach()) }
    });
    until_waiting(&orgs, 2).await;
    // The total goes down to 1 and the per-key default up to 3: neither waiter can ever run.
    gate.define_keyed("orgs", spec(1), KeyedSpec::per_key(3))
        .await
        .unwrap();
    for w in [wb, wc] {
        let out = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("the waiter is answered")
            .unwrap();
        assert!(
            matches!(
                out,
                Err(AcquireError::Refused(Refusal::PermitsExceedLimit {
                    requested: 2,
                    limit: 1
                }))
            ),
            "{out:?}"
        );
    }
    let status = orgs.status().await.unwrap();
    assert_eq!(status.waiting, 0);
    assert_eq!(
        status.counters.rejected - before,
        2,
        "each refused waiter counted once"
    );
    let keys = orgs.backend().keys(10).await.unwrap().unwrap();
    for k in &keys.busiest {
        assert_eq!(k.waiting, 0, "{} has no waiter left: {keys:?}", k.key);
    }
    // The total back to 4, a and b gone: c holds 1 of its 3, and 3 of the total are free. A
    // new waiter of c must be granted (it was queued and never put in the round robin).
    a.release().await.unwrap();
    b.release().await.unwrap();
    gate.define_keyed("orgs", spec(4), KeyedSpec::per_key(3))
        .await
        .unwrap();
    let again = tokio::time::timeout(
        Duration::from_secs(10),
        orgs.acquire(take("c", 2, Duration::from_secs(5))),
    )
    .await
    .expect("answered");
    let again = again.unwrap_or_else(|e| panic!("c's waiter with 3 of 4 free: {e:?}"));
    assert_eq!(orgs.status().await.unwrap().in_use, 3);
    again.release().await.unwrap();
    c.release().await.unwrap();
    let keys = orgs.backend().keys(10).await.unwrap().unwrap();
    assert_eq!(keys.count, 0, "no key state left: {keys:?}");
}

#[tokio::test]
async fn concurrency_to_rate_only_and_back_in_memory() {
    to_rate_only_and_back(Floodgate::with_store(MemoryStore::new())).await;
}

#[tokio::test]
async fn concurrency_to_rate_only_and_back_on_redis() {
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(server.url()))
        .await
        .unwrap();
    to_rate_only_and_back(Floodgate::with_store(store)).await;
}

/// A keyed limiter with holders and a waiter turned rate-only (no concurrency anywhere, a total
/// rate) and back: the holders stay releasable exactly once, the waiter gets a paced grant (as
/// the stores agree), and no key state is left once idle.
async fn to_rate_only_and_back<S: Store>(gate: Floodgate<S>) {
    gate.define_keyed("orgs", spec(2), KeyedSpec::per_key(1))
        .await
        .unwrap();
    let orgs = gate.limiter("orgs").await.unwrap();
    let take = |key: &str, wait: Duration| AcquireOptions::new().key(key.to_owned()).wait(wait);
    let a = orgs.acquire(take("a", Duration::ZERO)).await.unwrap();
    let b = orgs.acquire(take("b", Duration::ZERO)).await.unwrap();
    let w = tokio::spawn({
        let orgs = orgs.clone();
        let o = take("c", Duration::from_secs(20));
        async move { orgs.acquire(o).await.map(|p| p.detach()) }
    });
    until_waiting(&orgs, 1).await;
    let mut rate_only = LimiterSpec::default()
        .with_max_wait(Duration::from_secs(30))
        .with_default_lease(Duration::from_secs(60));
    rate_only.concurrency = None;
    rate_only.rate = Some(floodgate::RateSpec::per(1_000, Duration::from_secs(1)));
    let turned = gate
        .define_keyed("orgs", rate_only, KeyedSpec::default())
        .await;
    let answered = tokio::time::timeout(Duration::from_secs(10), w)
        .await
        .expect("the waiter is answered")
        .unwrap();
    // Both stores: the change is made (holders kept), and the waiter gets a paced grant.
    assert_eq!(turned.unwrap().in_use, 2);
    let paced = answered.unwrap();
    assert_eq!(paced.lease, Duration::ZERO, "{paced:?}");
    // Back to concurrency.
    gate.define_keyed("orgs", spec(2), KeyedSpec::per_key(1))
        .await
        .unwrap();
    let b_token = b.fencing_token();
    assert!(a.release().await.unwrap(), "a still held");
    assert!(b.release().await.unwrap(), "b still held");
    assert!(
        !orgs.backend().release(b_token).await.unwrap(),
        "released once"
    );
    assert!(
        !orgs.backend().release(paced.token).await.unwrap(),
        "a paced grant holds nothing"
    );
    let status = orgs.status().await.unwrap();
    assert_eq!((status.in_use, status.waiting), (0, 0), "{status:?}");
    let keys = orgs.backend().keys(10).await.unwrap().unwrap();
    assert_eq!(keys.count, 0, "no key state left: {keys:?}");
    let again = orgs.acquire(take("a", Duration::ZERO)).await.unwrap();
    assert_eq!(orgs.status().await.unwrap().in_use, 1);
    again.release().await.unwrap();
}
