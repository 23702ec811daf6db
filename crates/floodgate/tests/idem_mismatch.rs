//! A retried idempotent acquire that asks for other permits than its first attempt, on both
//! stores (the embedded one, and the Redis script on a real `redis-server`, the retry sent
//! from the same process as the first attempt, whose wake-up entry it displaces).
//!
//! Before: the retry got the first attempt's grant (one permit for a caller that asked for
//! three and would run three-wide), or took over its wait (the first attempt was told it was
//! taken over, and the retry waited for two permits while asking for one). Now it is refused,
//! naming `request_id`, and the first attempt's grant or wait goes on as it was: the waiting
//! first attempt is still granted its two permits. Witnesses: the test's own count of permits
//! out (what it was granted, against `in_use`) and the first attempt's own answer.

#![allow(clippy::unwrap_used)]

#[cfg(feature = "redis")]
mod support;

use std::time::Duration;

use floodgate::{AcquireError, AcquireOptions, Floodgate, KeyedSpec, LimiterSpec, Refusal, Store};

fn refused_field<T>(r: &Result<T, AcquireError>) -> Option<&'static str> {
    match r {
        Err(AcquireError::Refused(Refusal::Invalid(f))) => Some(f.field),
        _ => None,
    }
}

async fn a_mismatched_retry_is_refused_and_changes_nothing<S: Store + 'static>(gate: Floodgate<S>) {
    gate.define(
        "two",
        LimiterSpec::concurrency(2)
            .with_default_lease(Duration::from_secs(120))
            .with_max_wait(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let two = gate.limiter("two").await.unwrap();

    // A held grant: its retry with other permits gets nothing.
    let held = two
        .acquire(AcquireOptions::new().request_id("held"))
        .await
        .unwrap();
    let retry = two
        .acquire(AcquireOptions::new().permits(2).request_id("held"))
        .await;
    assert_eq!(refused_field(&retry), Some("request_id"), "{retry:?}");
    assert_eq!(two.status().await.unwrap().in_use, 1);
    let same = two
        .acquire(AcquireOptions::new().request_id("held"))
        .await
        .unwrap();
    assert_eq!(same.fencing_token(), held.fencing_token());
    same.detach();
    held.release().await.unwrap();

    // A queued first attempt for two permits, behind a holder of both.
    let blocker = two.acquire(AcquireOptions::new().permits(2)).await.unwrap();
    let first = tokio::spawn({
        let two = two.clone();
        async move {
            two.acquire(
                AcquireOptions::new()
                    .permits(2)
                    .request_id("queued")
                    .wait(Duration::from_secs(60)),
            )
            .await
        }
    });
    // Until it is queued (bounded: liveness only).
    for _ in 0..600 {
        if two.status().await.unwrap().waiting == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(two.status().await.unwrap().waiting, 1);
    let retry = two
        .acquire(
            AcquireOptions::new()
                .request_id("queued")
                .wait(Duration::from_secs(1)),
        )
        .await;
    assert_eq!(refused_field(&retry), Some("request_id"), "{retry:?}");
    assert_eq!(
        two.status().await.unwrap().waiting,
        1,
        "the first wait goes on"
    );
    blocker.release().await.unwrap();
    let granted = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("the first attempt is answered")
        .unwrap()
        .expect("the first attempt is granted");
    assert_eq!(granted.permits(), 2);
    let st = two.status().await.unwrap();
    assert_eq!((st.in_use, st.waiting), (2, 0));
    granted.release().await.unwrap();
    assert_eq!(two.status().await.unwrap().in_use, 0);
}

/// The same on a keyed limiter (its own join of a key's queue; its grants are the total's).
async fn a_mismatched_keyed_retry_is_refused_and_changes_nothing<S: Store + 'static>(
    gate: Floodgate<S>,
) {
    let total = LimiterSpec::concurrency(4)
        .with_default_lease(Duration::from_secs(120))
        .with_max_wait(Duration::from_secs(60));
    gate.define_keyed("orgs", total, KeyedSpec::per_key(2))
        .await
        .unwrap();
    let orgs = gate.limiter("orgs").await.unwrap();
    let of_a = || AcquireOptions::new().key("a");
    let held = orgs.acquire(of_a().request_id("held")).await.unwrap();
    let retry = orgs.acquire(of_a().permits(2).request_id("held")).await;
    assert_eq!(refused_field(&retry), Some("request_id"), "{retry:?}");
    assert_eq!(orgs.status().await.unwrap().in_use, 1);
    held.release().await.unwrap();
    // Key a full (2 of 2): a first attempt for 2 waits in a's queue.
    let blocker = orgs.acquire(of_a().permits(2)).await.unwrap();
    let first = tokio::spawn({
        let orgs = orgs.clone();
        async move {
            orgs.acquire(
                AcquireOptions::new()
                    .key("a")
                    .permits(2)
                    .request_id("queued")
                    .wait(Duration::from_secs(60)),
            )
            .await
        }
    });
    for _ in 0..600 {
        if orgs.status().await.unwrap().waiting == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(orgs.status().await.unwrap().waiting, 1);
    let retry = orgs
        .acquire(of_a().request_id("queued").wait(Duration::from_secs(1)))
        .await;
    assert_eq!(refused_field(&retry), Some("request_id"), "{retry:?}");
    assert_eq!(
        orgs.status().await.unwrap().waiting,
        1,
        "the first wait goes on"
    );
    blocker.release().await.unwrap();
    let granted = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("the first attempt is answered")
        .unwrap()
        .expect("the first attempt is granted");
    assert_eq!(granted.permits(), 2);
    assert_eq!(orgs.status().await.unwrap().in_use, 2);
    granted.release().await.unwrap();
}

/// A keyed retry naming another key than its first attempt: before, it got the first key's
/// grant (or joined its wait), and its caller then ran against key b's backend on a permit of
/// key a, past b's per-key limit (the test's own count: b held 1 of 1 and the retry's grant
/// made 2 callers on b). Refused now, naming `request_id`.
async fn a_retry_naming_another_key_is_refused<S: Store + 'static>(gate: Floodgate<S>) {
    let total = LimiterSpec::concurrency(4)
        .with_default_lease(Duration::from_secs(120))
        .with_max_wait(Duration::from_secs(60));
    gate.define_keyed("keys", total, KeyedSpec::per_key(1))
        .await
        .unwrap();
    let keys = gate.limiter("keys").await.unwrap();
    let on = |k: &str| AcquireOptions::new().key(k.to_owned());
    let _b = keys.acquire(on("b")).await.unwrap();
    let _a = keys.acquire(on("a").request_id("held")).await.unwrap();
    let retry = keys.acquire(on("b").request_id("held")).await;
    assert_eq!(refused_field(&retry), Some("request_id"), "{retry:?}");
    // A queued first attempt on a (full): a retry naming b does not join it.
    let first = tokio::spawn({
        let keys = keys.clone();
        async move {
            keys.acquire(
                AcquireOptions::new()
                    .key("a")
                    .request_id("queued")
                    .wait(Duration::from_secs(60)),
            )
            .await
        }
    });
    for _ in 0..600 {
        if keys.status().await.unwrap().waiting == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let retry = keys
        .acquire(on("c").request_id("queued").wait(Duration::from_secs(1)))
        .await;
    assert_eq!(refused_field(&retry), Some("request_id"), "{retry:?}");
    assert_eq!(
        keys.status().await.unwrap().waiting,
        1,
        "the first wait goes on"
    );
    first.abort();
}

#[tokio::test]
async fn embedded_refuses_a_mismatched_retry() {
    a_mismatched_retry_is_refused_and_changes_nothing(Floodgate::in_memory()).await;
    a_mismatched_keyed_retry_is_refused_and_changes_nothing(Floodgate::in_memory()).await;
    a_retry_naming_another_key_is_refused(Floodgate::in_memory()).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_refuses_a_mismatched_retry() {
    let server = support::RedisServer::start();
    let store = floodgate::RedisStore::connect(floodgate::RedisConfig::new(server.url()))
        .await
        .unwrap();
    let gate = Floodgate::with_store(store);
    a_mismatched_retry_is_refused_and_changes_nothing(gate.clone()).await;
    a_mismatched_keyed_retry_is_refused_and_changes_nothing(gate.clone()).await;
    a_retry_naming_another_key_is_refused(gate).await;
}
