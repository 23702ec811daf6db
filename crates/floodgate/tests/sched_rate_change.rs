//! Reservations given back, on both stores (the embedded one and the Redis script on a real
//! `redis-server`): after a change of the limiter's rate nothing of a reservation goes back,
//! not even after a change of the burst alone, which leaves the rate's debt (`tat`) where it
//! was; and tokens given back reach a waiter at their new, earlier time.
//!
//! The witness is the test's own: every offset the schedule answered was 0, so every token it
//! reserved was spent the moment it answered, and none may be given back. Before the fix, a
//! burst lowered from 10 to 1 made 9 of them look unstarted: `unschedule` returned 9 and the
//! rate granted again after 1 s instead of 10 s (19 tokens in 10 s at 1/s with a burst of 1).

#![allow(clippy::unwrap_used)]

#[cfg(feature = "redis")]
mod support;

use std::time::Duration;

use floodgate::{
    AcquireError, AcquireOptions, Floodgate, LimiterBackend, LimiterSpec, RateSpec, Refusal, Store,
};

fn bursty(burst: u32) -> LimiterSpec {
    LimiterSpec::rate(RateSpec::per(1, Duration::from_secs(1)).with_burst(burst))
        .with_max_wait(Duration::from_secs(60))
}

async fn nothing_goes_back_after_a_burst_change<S: Store>(gate: &Floodgate<S>) {
    gate.define("paced", bursty(10)).await.unwrap();
    let paced = gate.limiter("paced").await.unwrap();
    let s = paced.backend().schedule(10).await.unwrap();
    assert!(s.offsets.iter().all(|d| d.is_zero()), "{:?}", s.offsets);
    // The same interval, a smaller burst.
    gate.define("paced", bursty(1)).await.unwrap();
    assert_eq!(
        paced.backend().unschedule(s.reservation, 10).await.unwrap(),
        0,
        "ten spent tokens given back"
    );
    // The ten still hold the rate for about 10 s: an acquire that waits 3 s is refused at
    // once with the exact time (a stalled test only shortens it by the stall).
    match paced
        .acquire(AcquireOptions::new().wait(Duration::from_secs(3)))
        .await
    {
        Err(AcquireError::Refused(Refusal::WaitTimeout { retry_after })) => {
            assert!(retry_after > Duration::from_secs(3), "{retry_after:?}")
        }
        Ok(p) => panic!(
            "granted past ten spent tokens (token {})",
            p.fencing_token().0
        ),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn embedded_gives_nothing_back_after_a_burst_change() {
    nothing_goes_back_after_a_burst_change(&Floodgate::in_memory()).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_gives_nothing_back_after_a_burst_change() {
    let server = support::RedisServer::start();
    let store = floodgate::RedisStore::connect(floodgate::RedisConfig::new(server.url()))
        .await
        .unwrap();
    nothing_goes_back_after_a_burst_change(&Floodgate::with_store(store)).await;
}

/// Tokens given back move a waiter's token time earlier: the store's timer, armed for the old
/// time, must be moved too. At 1/s a schedule of 10 puts the next token 10 s away; giving
/// back 9 brings it to about 1 s. The waiter's own wait (as the store measured it) must be
/// well under the 10 s it would have waited for the old time (a stall of the test process
/// cannot bring it past 9 s while the grant is due at 1 s, short of an 8 s stall).
async fn a_waiter_gets_the_tokens_given_back<S: Store>(gate: &Floodgate<S>) {
    gate.define("back", bursty(1)).await.unwrap();
    let back = gate.limiter("back").await.unwrap();
    let s = back.backend().schedule(10).await.unwrap();
    assert_eq!(s.offsets[9], Duration::from_secs(9));
    let waiter = {
        let back = back.clone();
        tokio::spawn(async move {
            back.acquire(AcquireOptions::new().wait(Duration::from_secs(30)))
                .await
        })
    };
    for _ in 0..600 {
        if back.status().await.unwrap().waiting == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let returned = back.backend().unschedule(s.reservation, 9).await.unwrap();
    assert!(returned >= 8, "{returned}");
    let permit = waiter.await.unwrap().unwrap();
    assert!(
        permit.grant().waited < Duration::from_secs(9),
        "waited {:?}: the timer kept the old token time",
        permit.grant().waited
    );
}

#[tokio::test]
async fn embedded_waiter_gets_the_tokens_given_back() {
    a_waiter_gets_the_tokens_given_back(&Floodgate::in_memory()).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_waiter_gets_the_tokens_given_back() {
    let server = support::RedisServer::start();
    let store = floodgate::RedisStore::connect(floodgate::RedisConfig::new(server.url()))
        .await
        .unwrap();
    a_waiter_gets_the_tokens_given_back(&Floodgate::with_store(store)).await;
}
