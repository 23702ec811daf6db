//! Review of today's paced idempotency (`core/paced.rs`, `p:` entries in Redis's `outcomes`):
//! a rate-only limiter is given a concurrency limit (a `PUT`) while request ids of its paced
//! grants are still remembered.
//!
//! A paced grant holds nothing. Before the fix, a retry of such an id after the `PUT` was
//! answered the remembered grant again (lease 0), on both stores: its caller went to work
//! beside the holders of every permit of the new limit (two workers under a limit of one).
//! Now a `PUT` that gives the limiter a concurrency limit makes those ids forgotten: the retry
//! asks for a permit like a new acquire (refused while the limit is out, granted a real
//! permit with a lease once there is room). The same on the embedded store and on Redis.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

#[cfg(feature = "redis")]
mod support;

use std::time::Duration;

use floodgate::{
    AcquireError, AcquireOptions, Floodgate, KeyedSpec, LimiterSpec, RateSpec, Refusal, Store,
};

/// Ten per second, burst 5: the rate never refuses anything here. Retention (the default
/// lease) an hour, so nothing depends on how long a step takes.
fn rate() -> RateSpec {
    RateSpec::per(10, Duration::from_secs(1)).with_burst(5)
}

fn retry() -> AcquireOptions {
    AcquireOptions::new()
        .request_id("job-1")
        .wait(Duration::ZERO)
}

async fn a_retry_after_a_put_adding_concurrency_takes_a_permit<S: Store>(gate: Floodgate<S>) {
    let paced = LimiterSpec::rate(rate()).with_default_lease(Duration::from_secs(3_600));
    gate.define("jobs", paced).await.unwrap();
    let jobs = gate.limiter("jobs").await.unwrap();
    let first = jobs.acquire(retry()).await.unwrap();
    // Remembered: the same grant again while the limiter is rate-only.
    let again = jobs.acquire(retry()).await.unwrap();
    assert_eq!(again.fencing_token(), first.fencing_token());

    // The limiter now allows one worker at a time; another caller holds that permit.
    let one = LimiterSpec::concurrency(1)
        .with_rate(rate())
        .with_default_lease(Duration::from_secs(3_600));
    gate.define("jobs", one).await.unwrap();
    let holder = jobs
        .acquire(AcquireOptions::new().wait(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(jobs.status().await.unwrap().in_use, 1);

    // The witness: every answered grant whose caller may be working now, against the limit.
    let repeat = jobs.acquire(retry()).await;
    match repeat {
        Ok(p) => panic!(
            "a retry of a paced grant was answered granted (token {:?}, lease {:?}) while the \
             concurrency limit of 1 is held: two workers",
            p.fencing_token(),
            p.grant().lease
        ),
        Err(AcquireError::Refused(Refusal::WaitTimeout { .. })) => {}
        Err(e) => panic!("unexpected answer {e:?}"),
    }
    // Once there is room, the retry gets a real permit: a new token, with a lease, counted.
    holder.release().await.unwrap();
    let permit = jobs.acquire(retry()).await.unwrap();
    assert_ne!(permit.fencing_token(), first.fencing_token());
    assert!(
        permit.grant().lease > Duration::ZERO,
        "{:?}",
        permit.grant()
    );
    assert_eq!(jobs.status().await.unwrap().in_use, 1);
    // Its own retry is the held permit now (not the paced grant).
    let held_again = jobs.acquire(retry()).await.unwrap();
    assert_eq!(held_again.fencing_token(), permit.fencing_token());
    permit.release().await.unwrap();
    held_again.detach();
}

/// The same on a keyed limiter given a per-key concurrency limit: the retry on its key is
/// refused while that key's permit is held; one naming another key is a new acquire there
/// (not refused as naming another key than the forgotten paced grant's), and its own retry
/// is that held permit on both stores.
async fn a_keyed_retry_after_a_put_adding_concurrency_takes_a_permit<S: Store>(gate: Floodgate<S>) {
    let total = LimiterSpec::rate(rate()).with_default_lease(Duration::from_secs(3_600));
    gate.define_keyed(
        "orgs",
        total.clone(),
        KeyedSpec::default().with_rate(rate()),
    )
    .await
    .unwrap();
    let orgs = gate.limiter("orgs").await.unwrap();
    let first = orgs.acquire(retry().key("org-a")).await.unwrap();
    let again = orgs.acquire(retry().key("org-a")).await.unwrap();
    assert_eq!(again.fencing_token(), first.fencing_token());

    gate.define_keyed("orgs", total, KeyedSpec::per_key(1).with_rate(rate()))
        .await
        .unwrap();
    let holder = orgs
        .acquire(AcquireOptions::new().key("org-a").wait(Duration::ZERO))
        .await
        .unwrap();
    match orgs.acquire(retry().key("org-a")).await {
        Ok(p) => panic!(
            "a retry of a keyed paced grant was answered granted (token {:?}) while its key's \
             concurrency limit of 1 is held",
            p.fencing_token()
        ),
        Err(AcquireError::Refused(Refusal::WaitTimeout { .. })) => {}
        Err(e) => panic!("unexpected answer {e:?}"),
    }
    let elsewhere = orgs.acquire(retry().key("org-b")).await.unwrap();
    assert_ne!(elsewhere.fencing_token(), first.fencing_token());
    let its_retry = orgs.acquire(retry().key("org-b")).await.unwrap();
    assert_eq!(its_retry.fencing_token(), elsewhere.fencing_token());
    assert_eq!(orgs.status().await.unwrap().in_use, 2);
    holder.release().await.unwrap();
    elsewhere.release().await.unwrap();
    its_retry.detach();
}

#[tokio::test]
async fn embedded_a_keyed_retry_after_a_put_adding_concurrency_takes_a_permit() {
    a_keyed_retry_after_a_put_adding_concurrency_takes_a_permit(Floodgate::in_memory()).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_a_keyed_retry_after_a_put_adding_concurrency_takes_a_permit() {
    let server = support::RedisServer::start();
    let store = floodgate::RedisStore::connect(floodgate::RedisConfig::new(server.url()))
        .await
        .unwrap();
    a_keyed_retry_after_a_put_adding_concurrency_takes_a_permit(Floodgate::with_store(store)).await;
}

/// Deleted and created again under the same name: the new limiter remembers none of the old
/// one's ids (a retry is a new acquire there: a new token, counted), on both stores.
async fn a_retry_after_delete_and_recreate_is_new<S: Store>(gate: Floodgate<S>) {
    let paced = LimiterSpec::rate(rate()).with_default_lease(Duration::from_secs(3_600));
    gate.define("again", paced.clone()).await.unwrap();
    let first = gate
        .limiter("again")
        .await
        .unwrap()
        .acquire(retry())
        .await
        .unwrap()
        .fencing_token();
    assert!(gate.delete("again").await.unwrap());
    gate.define("again", paced).await.unwrap();
    let again = gate.limiter("again").await.unwrap();
    let retried = again.acquire(retry()).await.unwrap();
    assert_ne!(
        retried.fencing_token(),
        first,
        "the old incarnation's id answered"
    );
    assert_eq!(again.status().await.unwrap().counters.granted, 1);
}

#[tokio::test]
async fn embedded_a_retry_after_delete_and_recreate_is_new() {
    a_retry_after_delete_and_recreate_is_new(Floodgate::in_memory()).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_a_retry_after_delete_and_recreate_is_new() {
    let server = support::RedisServer::start();
    let store = floodgate::RedisStore::connect(floodgate::RedisConfig::new(server.url()))
        .await
        .unwrap();
    a_retry_after_delete_and_recreate_is_new(Floodgate::with_store(store)).await;
}

#[tokio::test]
async fn embedded_a_retry_after_a_put_adding_concurrency_takes_a_permit() {
    a_retry_after_a_put_adding_concurrency_takes_a_permit(Floodgate::in_memory()).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_a_retry_after_a_put_adding_concurrency_takes_a_permit() {
    let server = support::RedisServer::start();
    let store = floodgate::RedisStore::connect(floodgate::RedisConfig::new(server.url()))
        .await
        .unwrap();
    a_retry_after_a_put_adding_concurrency_takes_a_permit(Floodgate::with_store(store)).await;
}
