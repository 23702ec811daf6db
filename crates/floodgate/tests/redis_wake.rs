//! How a queued acquire of the Redis store learns of its grant: from the release's reply when
//! the release was made by its own store (no `PUBLISH`), over pub/sub when another store (as
//! another process) released. Counted in `INFO commandstats`, not timed.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use floodgate::{AcquireOptions, Floodgate, LimiterSpec, RedisConfig, RedisStore};

async fn connect(server: &support::RedisServer) -> Floodgate<RedisStore> {
    Floodgate::with_store(
        RedisStore::connect(RedisConfig::new(server.url()))
            .await
            .expect("connect to redis"),
    )
}

fn publishes(server: &support::RedisServer) -> u64 {
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut conn)
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_publish:"))
        .and_then(|rest| rest.split(',').find_map(|kv| kv.strip_prefix("calls=")))
        .map_or(0, |n| n.parse().unwrap())
}

/// Waits (bounded, for liveness only) until the limiter reports `n` waiters.
async fn until_waiting(gate: &Floodgate<RedisStore>, name: &str, n: u32) {
    let lim = gate.limiter(name).await.unwrap();
    for _ in 0..2_000 {
        if lim.status().await.unwrap().waiting == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never {n} waiters");
}

#[tokio::test]
async fn a_release_hands_its_own_stores_waiter_the_grant_in_its_reply() {
    let server = support::RedisServer::start();
    let (a, b) = (connect(&server).await, connect(&server).await);
    a.define("w", LimiterSpec::concurrency(1)).await.unwrap();
    let wait = || AcquireOptions::new().wait(Duration::from_secs(30));
    let holder = a.limiter("w").await.unwrap().acquire(wait()).await.unwrap();
    // First in the queue a waiter of store A, then one of store B.
    let la = a.limiter("w").await.unwrap();
    let on_a = tokio::spawn(async move { la.acquire(wait()).await });
    until_waiting(&a, "w", 1).await;
    let lb = b.limiter("w").await.unwrap();
    let on_b = tokio::spawn(async move { lb.acquire(wait()).await });
    until_waiting(&a, "w", 2).await;

    // A's release grants A's waiter: answered in the reply, nothing published.
    let before = publishes(&server);
    let first = holder.fencing_token();
    assert!(holder.release().await.unwrap());
    let granted_a = on_a.await.unwrap().expect("A's waiter granted");
    assert!(granted_a.fencing_token() > first);
    assert_eq!(
        publishes(&server),
        before,
        "A's waiter was woken over pub/sub"
    );

    // That holder's release (on A) grants B's waiter: another store, so published.
    let second = granted_a.fencing_token();
    assert!(granted_a.release().await.unwrap());
    let granted_b = on_b.await.unwrap().expect("B's waiter granted");
    assert!(granted_b.fencing_token() > second);
    assert_eq!(
        publishes(&server),
        before + 1,
        "B's waiter was not published to"
    );

    // A waiter of A granted by a release on B: published as well.
    let la = a.limiter("w").await.unwrap();
    let again = tokio::spawn(async move { la.acquire(wait()).await });
    until_waiting(&a, "w", 1).await;
    assert!(granted_b.release().await.unwrap());
    let last = again.await.unwrap().expect("granted across stores");
    assert_eq!(publishes(&server), before + 2);
    assert!(last.release().await.unwrap());
    let st = a.limiter("w").await.unwrap().status().await.unwrap();
    assert_eq!((st.in_use, st.waiting, st.counters.granted), (0, 0, 4));
}

/// Releases run on a connection of their own and their callers yield after handing over the
/// grant: a chain of same-store handoffs still answers every waiter exactly once, with its own
/// grant, in the order they queued, and publishes nothing. On a runtime with two workers, so
/// the waiter's task and the releasing one can run on either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_in_release_replies_reach_exactly_their_waiters_once_in_order() {
    const WAITERS: usize = 12;
    let server = support::RedisServer::start();
    let gate = connect(&server).await;
    gate.define("chain", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    let wait = || AcquireOptions::new().wait(Duration::from_secs(30));
    let lim = gate.limiter("chain").await.unwrap();
    let mut held = lim.acquire(wait()).await.unwrap();
    let mut waiters = Vec::new();
    for i in 0..WAITERS {
        let l = lim.clone();
        waiters.push(tokio::spawn(async move { l.acquire(wait()).await }));
        until_waiting(&gate, "chain", u32::try_from(i + 1).unwrap()).await;
    }
    let before = publishes(&server);
    let mut tokens = vec![held.fencing_token()];
    for (i, waiter) in waiters.into_iter().enumerate() {
        assert!(held.release().await.unwrap(), "release {i}");
        // The head of the queue, and only it, has its grant: the others still wait.
        held = waiter.await.unwrap().expect("the head waiter granted");
        tokens.push(held.fencing_token());
        let st = lim.status().await.unwrap();
        assert_eq!(
            (st.in_use, st.waiting),
            (1, u32::try_from(WAITERS - i - 1).unwrap())
        );
    }
    assert!(held.release().await.unwrap());
    // Each grant is a new one (no waiter was handed another's, or one twice), in queue order.
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    assert_eq!(
        publishes(&server),
        before,
        "a same-store waiter was published to"
    );
    let st = lim.status().await.unwrap();
    assert_eq!(
        (st.in_use, st.waiting, st.counters.granted),
        (0, 0, u64::try_from(WAITERS + 1).unwrap())
    );
}
