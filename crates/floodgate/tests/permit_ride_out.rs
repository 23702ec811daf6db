//! A held [`Permit`](floodgate::Permit) rides out a store outage (issue 10, item 4): while
//! Redis is down its `extend` keeps trying until the lease has certainly ended; a restart within
//! the lease is invisible to the holder, and a lease that ends during the outage ends the work.
//! Against a real `redis-server`, SIGKILLed and restarted on the same port with its AOF.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use floodgate::{
    AcquireOptions, ExtendError, Floodgate, LimiterSpec, RedisConfig, RedisStore, StoreError,
};

/// Redis with an fsynced append-only file, so a restart keeps the permit.
fn persistent_redis() -> support::RedisServer {
    support::RedisServer::start_on_a_free_port(&["--appendonly", "yes", "--appendfsync", "always"])
}

async fn gate(server: &support::RedisServer) -> Floodgate<RedisStore> {
    let mut config = RedisConfig::new(server.url());
    config.response_timeout = Duration::from_millis(300);
    let gate = Floodgate::with_store(RedisStore::connect(config).await.unwrap());
    gate.define("ride", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    gate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extend_during_a_restart_within_the_lease_succeeds() {
    let mut server = persistent_redis();
    let gate = gate(&server).await;
    let limiter = gate.limiter("ride").await.unwrap();
    let mut permit = limiter
        .acquire(AcquireOptions::new().lease(Duration::from_secs(20)))
        .await
        .unwrap();

    server.kill();
    let extend = tokio::spawn(async move {
        let result = permit.extend(Duration::from_secs(20)).await;
        (permit, result)
    });
    // Several round trips' worth of refused connections: before the fix the first one ended
    // the extend with `Unavailable`.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !extend.is_finished(),
        "the extend gave up while the lease still ran"
    );

    // Same port, same directory: the append-only file brings the permit back.
    server.restart();
    let (permit, result) = tokio::time::timeout(Duration::from_secs(30), extend)
        .await
        .expect("the extend never came back after the restart")
        .unwrap();
    result.expect("the extend after the restart");
    let status = limiter.status().await.unwrap();
    assert_eq!(status.in_use, 1);
    assert!(permit.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_ends_during_the_outage_ends_the_extend() {
    let mut server = persistent_redis();
    let gate = gate(&server).await;
    let limiter = gate.limiter("ride").await.unwrap();
    let mut permit = limiter
        .acquire(AcquireOptions::new().lease(Duration::from_millis(1500)))
        .await
        .unwrap();
    let deadline = permit.local_deadline();

    server.kill();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        permit.extend(Duration::from_millis(1500)),
    )
    .await
    .expect("the extend never gave up");
    assert!(
        matches!(result, Err(ExtendError::Store(StoreError::Unavailable(_)))),
        "{result:?}"
    );
    // It gave up only once the lease had certainly ended.
    assert!(tokio::time::Instant::now() >= deadline);
    drop(permit);
}
