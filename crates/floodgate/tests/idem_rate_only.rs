//! An idempotent acquire of a rate-only limiter, retried after its grant (a lost answer):
//! README.md promises "a retry after a lost answer gets the same permit, never a second one".
//! A rate-only grant holds nothing, so its `request_id` is remembered apart for the limiter's
//! default lease (docs/api.md): a retry within it gets the same grant (same fencing token, not
//! counted again, no new tokens taken: with a burst of 1 a second grant would be refused).
//! On both stores, keyed rate-only limiters too (a retry naming another key is refused), and
//! on the durable embedded store across a reopen, from its log and from a snapshot.
//! `tests/idem_twin.rs` compares the two stores step by step, past the retention too.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

#[cfg(feature = "redis")]
mod support;

use std::time::Duration;

use floodgate::{
    AcquireError, AcquireOptions, Durability, Floodgate, KeyedSpec, LimiterSpec, MemoryStore,
    RateSpec, Refusal, Store,
};

/// One token per 10 s, burst 2; retention (the default lease) an hour, so that nothing in
/// these tests depends on how long a step takes.
fn paced_spec() -> LimiterSpec {
    LimiterSpec::rate(RateSpec::per(1, Duration::from_secs(10)).with_burst(2))
        .with_default_lease(Duration::from_secs(3_600))
}

fn once() -> AcquireOptions {
    AcquireOptions::new()
        .request_id("job-1")
        .wait(Duration::ZERO)
}

async fn a_retry_after_a_paced_grant_gets_it_again<S: Store>(gate: Floodgate<S>) -> u64 {
    gate.define("paced", paced_spec()).await.unwrap();
    let paced = gate.limiter("paced").await.unwrap();
    let first = paced.acquire(once()).await.unwrap();
    let retry = paced.acquire(once()).await.unwrap();
    assert_eq!(
        retry.fencing_token(),
        first.fencing_token(),
        "a second grant"
    );
    let counters = paced.status().await.unwrap().counters;
    assert_eq!((counters.granted, counters.paced), (1, 1));
    // Other permits under the same id: refused by name.
    let other = paced.acquire(once().permits(2)).await;
    assert!(
        matches!(other, Err(AcquireError::Refused(Refusal::Invalid(ref f))) if f.field == "request_id"),
        "{other:?}"
    );
    first.fencing_token().0
}

async fn a_keyed_retry_gets_it_again_for_its_key_only<S: Store>(gate: Floodgate<S>) {
    let per_key = KeyedSpec::default().with_rate(RateSpec::per(1, Duration::from_secs(10)));
    let total = LimiterSpec::rate(RateSpec::per(100, Duration::from_secs(1)))
        .with_default_lease(Duration::from_secs(3_600));
    gate.define_keyed("orgs", total, per_key).await.unwrap();
    let orgs = gate.limiter("orgs").await.unwrap();
    let first = orgs.acquire(once().key("org-a")).await.unwrap();
    // The key's burst is 1: only the remembered grant can answer this.
    let retry = orgs.acquire(once().key("org-a")).await.unwrap();
    assert_eq!(retry.fencing_token(), first.fencing_token());
    let elsewhere = orgs.acquire(once().key("org-b")).await;
    assert!(
        matches!(elsewhere, Err(AcquireError::Refused(Refusal::Invalid(ref f))) if f.field == "request_id"),
        "{elsewhere:?}"
    );
    assert_eq!(orgs.status().await.unwrap().counters.granted, 1);
}

#[tokio::test]
async fn embedded_retry_after_a_paced_grant() {
    a_retry_after_a_paced_grant_gets_it_again(Floodgate::in_memory()).await;
}

#[tokio::test]
async fn embedded_keyed_retry_after_a_paced_grant() {
    a_keyed_retry_gets_it_again_for_its_key_only(Floodgate::in_memory()).await;
}

/// The remembered id survives a reopen of the durable store: replayed from its log, or loaded
/// from a snapshot (`snapshot` true).
async fn durable_reopen(snapshot: bool) {
    let dir = tempfile::tempdir().unwrap();
    let open = || MemoryStore::open(Durability::new(dir.path())).unwrap().0;
    let token = {
        let store = open();
        let token =
            a_retry_after_a_paced_grant_gets_it_again(Floodgate::with_store(store.clone())).await;
        if snapshot {
            store.snapshot_now().unwrap();
        }
        store.close();
        token
    };
    let gate = Floodgate::with_store(open());
    let paced = gate.limiter("paced").await.unwrap();
    let retry = paced.acquire(once()).await.unwrap();
    assert_eq!(retry.fencing_token().0, token, "snapshot: {snapshot}");
    assert_eq!(paced.status().await.unwrap().counters.granted, 1);
}

#[tokio::test]
async fn durable_retry_after_a_reopen_from_the_log() {
    durable_reopen(false).await;
}

#[tokio::test]
async fn durable_retry_after_a_reopen_from_a_snapshot() {
    durable_reopen(true).await;
}

#[cfg(feature = "redis")]
async fn redis_gate(server: &support::RedisServer) -> Floodgate<floodgate::RedisStore> {
    let store = floodgate::RedisStore::connect(floodgate::RedisConfig::new(server.url()))
        .await
        .unwrap();
    Floodgate::with_store(store)
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_retry_after_a_paced_grant() {
    let server = support::RedisServer::start();
    a_retry_after_a_paced_grant_gets_it_again(redis_gate(&server).await).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_keyed_retry_after_a_paced_grant() {
    let server = support::RedisServer::start();
    a_keyed_retry_gets_it_again_for_its_key_only(redis_gate(&server).await).await;
}
