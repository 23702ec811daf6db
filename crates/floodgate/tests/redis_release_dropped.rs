//! A release whose caller goes away before its reply is read (an HTTP client that resets its
//! connection right after sending the release) still wakes the waiters of this process that
//! it granted. Their outcomes travel in the release's reply, not over pub/sub; that reply
//! used to be dropped with the caller, so the waiter heard of its grant only at its own wait
//! deadline, by then often after its lease had ended (its client then worked on a permit
//! already given to another). The order is forced by a relay that holds the release until
//! the test lets it go; waits are liveness bounds only.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use floodgate::{
    AcquireOptions, Floodgate, LimiterBackend, LimiterName, LimiterSpec, RedisConfig, RedisStore,
    Store,
};
use support::relay::HoldingRelay;

/// A release's op name, as RESP sends it.
const RELEASE: &[u8] = b"$7\r\nrelease\r\n";

/// Longer than the test could ever run: the waiter must hear of its grant long before.
const LONG_WAIT: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_dropped_before_its_reply_still_wakes_the_waiter_it_granted() {
    let server = support::RedisServer::start();
    let relay = HoldingRelay::start(server.port).await;
    let mut config = RedisConfig::new(relay.url());
    // The relay holds the release for as long as the test needs: no reply timeout meanwhile.
    config.response_timeout = Duration::from_secs(60);
    let gate = Floodgate::with_store(RedisStore::connect(config).await.unwrap());
    gate.define("one", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    let name = LimiterName::new("one").unwrap();
    let limiter = gate.store().limiter(&name).await.unwrap();

    let held = limiter
        .acquire(AcquireOptions::new().wait(Duration::ZERO))
        .await
        .unwrap();
    let waiter = {
        let limiter = limiter.clone();
        tokio::spawn(async move { limiter.acquire(AcquireOptions::new().wait(LONG_WAIT)).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while limiter.status().await.unwrap().waiting == 0 {
        assert!(Instant::now() < deadline, "the waiter never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The release is sent, then its caller goes away before the reply.
    relay.arm_on(&[RELEASE]);
    let release = {
        let limiter = limiter.clone();
        tokio::spawn(async move { limiter.release(held.token).await })
    };
    while !relay.holds(RELEASE) {
        assert!(
            Instant::now() < deadline,
            "the release never reached the relay"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    release.abort();
    assert!(release.await.unwrap_err().is_cancelled());
    // Redis runs it now: the waiter is granted there.
    relay.release();

    let granted = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the waiter was not told of its grant (it would be, at its wait deadline)")
        .unwrap()
        .unwrap();
    let status = limiter.status().await.unwrap();
    assert_eq!((status.in_use, status.holders), (1, 1), "{status:?}");
    assert!(limiter.release(granted.token).await.unwrap());
}
