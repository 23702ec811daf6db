//! The holders listing (`LimiterBackend::holders`) on both stores: labels sent with acquires
//! come back, queued-then-granted and extended grants keep theirs, the listing is bounded and
//! ordered by lease end, expired leases are not listed, and the queue summary counts waiters.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use floodgate::{
    AcquireOptions, Floodgate, LimiterBackend, LimiterName, LimiterSpec, MemoryStore, Store,
    StoreError,
};

fn request(label: &str, lease_ms: u64, wait_ms: u64) -> AcquireOptions {
    unlabelled(lease_ms, wait_ms).holder(label)
}

fn unlabelled(lease_ms: u64, wait_ms: u64) -> AcquireOptions {
    AcquireOptions::new()
        .lease(Duration::from_millis(lease_ms))
        .wait(Duration::from_millis(wait_ms))
}

async fn check<S: Store>(gate: Floodgate<S>) {
    let name = LimiterName::new("holders-test").unwrap();
    gate.store()
        .put_limiter(
            &name,
            LimiterSpec::concurrency(3).with_max_wait(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    let lim = gate.store().limiter(&name).await.unwrap();
    let late = lim
        .acquire(request("worker-late", 60_000, 0))
        .await
        .unwrap();
    // A label with the record separator and non-ASCII survives the Redis encoding.
    let soon = lim.acquire(request("a|b|ü", 30_000, 0)).await.unwrap();
    // Its lease ends first; shortened below once the queue is seen (a 300 ms lease from the
    // start lapsed before a stalled test saw the waiter queue behind it).
    let short = lim.acquire(request("short", 20_000, 0)).await.unwrap();
    // Queued behind the full limit: its label rides with the waiter.
    let queued = {
        let lim = lim.clone();
        tokio::spawn(async move { lim.acquire(request("was-queued", 45_000, 20_000)).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let view = loop {
        let view = lim.holders(10).await.unwrap();
        if view.waiting == 1 {
            break view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never queued: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(view.total_holders, 3);
    assert_eq!(view.waiting_permits, 1);
    assert!(view.oldest_wait.is_some());
    let labels: Vec<_> = view.holders.iter().map(|h| h.label.as_deref()).collect();
    assert_eq!(labels, [Some("short"), Some("a|b|ü"), Some("worker-late")]);
    let first = &view.holders[0];
    assert_eq!(first.token, short.token);
    assert_eq!(first.permits, 1);
    assert_eq!(first.granted_at, short.granted_at);
    assert_eq!(first.lease_deadline, short.lease_deadline);

    // The short lease ends: it is no longer listed, and the waiter takes its place.
    lim.extend(short.token, Duration::from_millis(300), None)
        .await
        .unwrap();
    let granted = queued.await.unwrap().unwrap();
    let view = lim.holders(10).await.unwrap();
    let labels: Vec<_> = view.holders.iter().map(|h| h.label.as_deref()).collect();
    assert_eq!(
        labels,
        [Some("a|b|ü"), Some("was-queued"), Some("worker-late")]
    );
    assert_eq!(view.waiting, 0);
    assert_eq!(view.oldest_wait, None);

    // Extending keeps the label; the listing follows the new lease end.
    lim.extend(soon.token, Duration::from_secs(120), None)
        .await
        .unwrap();
    let view = lim.holders(2).await.unwrap();
    assert_eq!(view.total_holders, 3);
    let labels: Vec<_> = view.holders.iter().map(|h| h.label.as_deref()).collect();
    assert_eq!(labels, [Some("was-queued"), Some("worker-late")]);
    let all = lim.holders(10).await.unwrap();
    assert_eq!(all.holders[2].label.as_deref(), Some("a|b|ü"));

    // An unlabelled grant lists no label; releases leave the listing.
    for token in [late.token, soon.token, granted.token] {
        assert!(lim.release(token).await.unwrap());
    }
    let bare = lim.acquire(unlabelled(10_000, 0)).await.unwrap();
    let view = lim.holders(10).await.unwrap();
    assert_eq!(view.holders.len(), 1);
    assert_eq!(view.holders[0].token, bare.token);
    assert_eq!(view.holders[0].label, None);

    gate.store().delete_limiter(&name).await.unwrap();
    assert!(matches!(
        lim.holders(10).await,
        Err(StoreError::UnknownLimiter(_))
    ));
}

#[tokio::test]
async fn memory_store_lists_holders() {
    check(Floodgate::with_store(MemoryStore::new())).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_store_lists_holders() {
    let server = support::RedisServer::start();
    let store = floodgate::RedisStore::connect(floodgate::RedisConfig::new(server.url()))
        .await
        .unwrap();
    check(Floodgate::with_store(store)).await;
}
