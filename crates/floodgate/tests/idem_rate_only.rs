//! An idempotent acquire of a rate-only limiter, retried after its grant (a lost answer):
//! README.md promises "a retry after a lost answer gets the same permit, never a second one",
//! but a rate-only grant holds nothing, so nothing remembers its `request_id` once granted and
//! the retry takes new tokens (a second grant, another fencing token; with a burst of 1, a
//! refusal although the first attempt was granted). Both stores do the same
//! (`tests/idem_twin.rs`); docs/api.md now says so.
//!
//! Left failing and ignored: the fix (remembering a paced grant's id for a retention period,
//! in the core, its snapshot and the durable log, and the script) is larger than this review.

#![allow(clippy::unwrap_used)]

#[cfg(feature = "redis")]
mod support;

use std::time::Duration;

use floodgate::{AcquireOptions, Floodgate, LimiterSpec, RateSpec, Store};

async fn a_retry_after_a_paced_grant_gets_it_again<S: Store>(gate: Floodgate<S>) {
    let spec = LimiterSpec::rate(RateSpec::per(1, Duration::from_secs(10)).with_burst(2));
    gate.define("paced", spec).await.unwrap();
    let paced = gate.limiter("paced").await.unwrap();
    let once = || {
        AcquireOptions::new()
            .request_id("job-1")
            .wait(Duration::ZERO)
    };
    let first = paced.acquire(once()).await.unwrap();
    let retry = paced.acquire(once()).await.unwrap();
    assert_eq!(
        retry.fencing_token(),
        first.fencing_token(),
        "a second grant"
    );
    assert_eq!(paced.status().await.unwrap().counters.granted, 1);
}

#[tokio::test]
async fn embedded_retry_after_a_paced_grant() {
    a_retry_after_a_paced_grant_gets_it_again(Floodgate::in_memory()).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_retry_after_a_paced_grant() {
    let server = support::RedisServer::start();
    let store = floodgate::RedisStore::connect(floodgate::RedisConfig::new(server.url()))
        .await
        .unwrap();
    a_retry_after_a_paced_grant_gets_it_again(Floodgate::with_store(store)).await;
}
