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
    // A liveness bound on each command and connect (the define and the acquire below are not
    // retried): generous for a loaded machine. The outage itself is refused connections,
    // answered at once, so it does not make the extends slower.
    config.response_timeout = Duration::from_secs(5);
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

/// A restart that lost the last writes (Redis reloads a snapshot taken before the last grant,
/// as with `save` intervals or an `everysec` append-only file): the limiter is still there, but
/// older. The store notices the new master (`run_id`) before it runs anything on it and puts the
/// limiter in a learning window, so the holder of the lost grant is re-adopted by its heartbeat
/// and nothing is granted over it. The independent witness: the permits this test holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_that_lost_the_last_grant_is_learned_not_over_admitted() {
    let mut server = support::RedisServer::start();
    let mut config = RedisConfig::new(server.url());
    // The heartbeats below must re-adopt within the window, and the status must see it open:
    // long enough for a stalled test process; the last acquire waits it out.
    config.learning_window = Some(Duration::from_secs(5));
    let gate = Floodgate::with_store(RedisStore::connect(config).await.unwrap());
    let spec = LimiterSpec::concurrency(2).with_default_lease(Duration::from_secs(30));
    gate.define("lost-write", spec).await.unwrap();
    let limiter = gate.limiter("lost-write").await.unwrap();
    let mut first = limiter.acquire(AcquireOptions::new()).await.unwrap();
    // The snapshot has the first grant; the second is written after it, and lost.
    let saved = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "SAVE"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&saved.stdout).trim(), "OK");
    let mut second = limiter.acquire(AcquireOptions::new()).await.unwrap();
    let held = 2; // the witness: both holders are still working

    server.restart();
    // Redis now counts one holder of 2. Without the check a try-once acquire is granted here,
    // a third permit while two are held.
    let third = limiter
        .acquire(AcquireOptions::new().wait(Duration::ZERO))
        .await;
    assert!(
        matches!(&third, Err(e) if e.is_wait_timeout()),
        "granted over the lost grant ({held} held, limit 2): {third:?}"
    );
    let status = limiter.status().await.unwrap();
    assert!(status.learning, "{status:?}");
    // The heartbeats: the lost grant is re-adopted, the kept one extended.
    second.extend(Duration::from_secs(30)).await.unwrap();
    first.extend(Duration::from_secs(30)).await.unwrap();
    let status = limiter.status().await.unwrap();
    assert_eq!(status.in_use, held, "{status:?}");
    // After the window, the limit is in force over both: a wait ends refused...
    let after = limiter
        .acquire(AcquireOptions::new().wait(Duration::from_secs(2)))
        .await;
    assert!(matches!(&after, Err(e) if e.is_wait_timeout()), "{after:?}");
    // ...and a release lets the next one in, with a token above the re-adopted one.
    let adopted = second.fencing_token();
    second.release().await.unwrap();
    let next = limiter
        .acquire(AcquireOptions::new().wait(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(next.fencing_token() > adopted);
}
