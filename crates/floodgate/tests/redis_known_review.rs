//! What a Redis store remembers of the limiters it writes (`store/redis/revive.rs`, `Known`),
//! when its own replies are taken in another order than Redis ran the commands: the order is
//! forced by a relay that holds one connection's commands from a named one on until the test
//! lets them go, and by polling a future by hand. No assertion depends on timing: waits are
//! liveness bounds only.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::future::Future;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use floodgate::{Floodgate, LimiterSpec, RedisConfig, RedisStore, Store, StoreError};
use support::relay::HoldingRelay;

/// A put's op name, as RESP sends it.
const PUT: &[u8] = b"$3\r\nput\r\n";
/// A delete's op name, as RESP sends it.
const DELETE: &[u8] = b"$6\r\ndelete\r\n";
/// A status read's op name, as RESP sends it.
const STATUS: &[u8] = b"$6\r\nstatus\r\n";

async fn gate(url: String) -> Floodgate<RedisStore> {
    let mut config = RedisConfig::new(url);
    config.learning_window = Some(Duration::from_secs(60));
    // The relay holds commands for as long as the test needs: no reply timeout meanwhile.
    config.response_timeout = Duration::from_secs(60);
    Floodgate::with_store(RedisStore::connect(config).await.unwrap())
}

/// Waits (a liveness bound only) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A limiter a store creates while it deletes another is known to it: its put, held by the
/// relay, is answered after the delete (sent after the put, queued behind it) is answered and
/// taken. The store used to drop the put's spec whenever it had deleted any limiter meanwhile
/// and did not know this one: the limiter it had just created was then unknown to it, and
/// after a loss it answered `UnknownLimiter` instead of re-creating it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_answered_after_another_limiters_delete_is_known() {
    let server = support::RedisServer::start();
    let relay = HoldingRelay::start(server.port).await;
    let a = gate(relay.url()).await;
    a.define("other", LimiterSpec::concurrency(1))
        .await
        .unwrap();

    relay.arm_on(&[PUT]);
    let mut put = std::pin::pin!(a.define("fresh", LimiterSpec::concurrency(2)));
    let mut cx = Context::from_waker(Waker::noop());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !relay.holds(PUT) {
        assert!(put.as_mut().poll(&mut cx).is_pending(), "the put was held");
        assert!(Instant::now() < deadline, "the put is held");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let delete = {
        let a = a.clone();
        tokio::spawn(async move { a.delete("other").await })
    };
    until("the delete queues behind the put", || relay.holds(DELETE)).await;
    relay.release();
    let deleted = tokio::time::timeout(Duration::from_secs(60), delete)
        .await
        .unwrap()
        .unwrap();
    assert!(deleted.unwrap());
    assert_eq!(put.await.unwrap().spec.concurrency, Some(2));

    assert_eq!(support::cli(server.port, &["FLUSHALL"]), "OK");
    let revived = a.limiter("fresh").await.unwrap().status().await;
    assert!(
        !matches!(revived, Err(StoreError::UnknownLimiter(_))),
        "the limiter this store created was not known to it: {revived:?}"
    );
    let revived = revived.unwrap();
    assert!(revived.learning, "{revived:?}");
    assert_eq!(revived.spec.concurrency, Some(2));
}

/// `max_limiters` holds when a create marks itself and registers its name after a server
/// dropping gone names found that name unmarked, but before its removal ran: the removal
/// dropped the in-flight create's name, the place went to the dropping server's own create,
/// and the in-flight put then listed its name past the cap. Store L (at the cap: `x` is listed
/// with no limiter) has its removal held by one relay; store C's create of `x` is held by
/// another between its registration and its put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_registered_while_its_name_is_being_dropped_keeps_its_place() {
    const SREM: &[u8] = b"$4\r\nSREM\r\n";
    let server = support::RedisServer::start();
    let (relay_l, relay_c) = (
        HoldingRelay::start(server.port).await,
        HoldingRelay::start(server.port).await,
    );
    let connect = |url: String| async move {
        let mut config = RedisConfig::new(url);
        config.max_limiters = Some(2);
        config.response_timeout = Duration::from_secs(60);
        Floodgate::with_store(RedisStore::connect(config).await.unwrap())
    };
    let l = connect(relay_l.url()).await;
    let c = connect(relay_c.url()).await;
    l.define("live", LimiterSpec::concurrency(1)).await.unwrap();
    // Redis has the script already: C's held put is not answered `NOSCRIPT` and sent again.
    c.define("live", LimiterSpec::concurrency(1)).await.unwrap();
    // A name whose limiter is gone (as one expired for idleness leaves it).
    support::cli(server.port, &["SADD", "fg:limiters", "x"]);

    relay_l.arm_on(&[SREM]);
    let refused = {
        let l = l.clone();
        tokio::spawn(async move { l.define("z", LimiterSpec::concurrency(1)).await })
    };
    until("L's removal of x is held", || relay_l.holds(SREM)).await;
    relay_c.arm_on(&[PUT]);
    let create = {
        let c = c.clone();
        tokio::spawn(async move { c.define("x", LimiterSpec::concurrency(1)).await })
    };
    until("C's put of x is held", || relay_c.holds(PUT)).await;
    relay_l.release();
    let refused = tokio::time::timeout(Duration::from_secs(60), refused)
        .await
        .unwrap()
        .unwrap();
    relay_c.release();
    tokio::time::timeout(Duration::from_secs(60), create)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let mut names: Vec<String> = support::cli(server.port, &["SMEMBERS", "fg:limiters"])
        .lines()
        .map(str::to_owned)
        .collect();
    names.sort();
    assert!(
        matches!(refused, Err(StoreError::TooManyLimiters(2))),
        "a third limiter was created under a cap of 2: {refused:?}, {names:?}"
    );
    assert_eq!(names, ["live", "x"]);
}

/// A create refused at the cap does not unmark another server's create of the same name in
/// flight: store A's create of `x` is refused (the set is full of live limiters) and its
/// removal of the mark held; a place frees (a delete) and store B creates `x`, its put held;
/// A's removal then ran, and B's create was unmarked: store C, at the cap, dropped `x` as gone,
/// took the place, and B's put listed `x` past the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_create_leaves_another_creates_mark() {
    // The command that removes a refused create's mark (`DEL` before the fix), the first of
    // either that A sends (finding no gone names, it removes none).
    const UNMARK: &[&[u8]] = &[b"$3\r\nDEL\r\n", b"$4\r\nSREM\r\n"];
    let server = support::RedisServer::start();
    let (relay_a, relay_b) = (
        HoldingRelay::start(server.port).await,
        HoldingRelay::start(server.port).await,
    );
    let connect = |url: String| async move {
        let mut config = RedisConfig::new(url);
        config.max_limiters = Some(2);
        config.response_timeout = Duration::from_secs(60);
        Floodgate::with_store(RedisStore::connect(config).await.unwrap())
    };
    let a = connect(relay_a.url()).await;
    let b = connect(relay_b.url()).await;
    let c = connect(server.url()).await;
    c.define("live", LimiterSpec::concurrency(1)).await.unwrap();
    // Redis has the script already: B's held put is not answered `NOSCRIPT` and sent again.
    b.define("doomed", LimiterSpec::concurrency(1))
        .await
        .unwrap();

    // Both places taken by live limiters: A's create is refused whatever it drops.
    relay_a.arm_on(UNMARK);
    let refused = {
        let a = a.clone();
        tokio::spawn(async move { a.define("x", LimiterSpec::concurrency(1)).await })
    };
    until("A's removal of its mark is held", || {
        UNMARK.iter().any(|needle| relay_a.holds(needle))
    })
    .await;
    assert!(c.delete("doomed").await.unwrap());
    relay_b.arm_on(&[PUT]);
    let create = {
        let b = b.clone();
        tokio::spawn(async move { b.define("x", LimiterSpec::concurrency(1)).await })
    };
    until("B's put of x is held", || relay_b.holds(PUT)).await;
    relay_a.release();
    let refused = tokio::time::timeout(Duration::from_secs(60), refused)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(refused, Err(StoreError::TooManyLimiters(2))),
        "{refused:?}"
    );
    // C, at the cap, looks for gone names: `x`, B's create, is not one.
    let third = c.define("y", LimiterSpec::concurrency(1)).await;
    relay_b.release();
    tokio::time::timeout(Duration::from_secs(60), create)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let mut names: Vec<String> = support::cli(server.port, &["SMEMBERS", "fg:limiters"])
        .lines()
        .map(str::to_owned)
        .collect();
    names.sort();
    assert!(
        matches!(third, Err(StoreError::TooManyLimiters(2))),
        "a third limiter was created under a cap of 2: {third:?}, {names:?}"
    );
    assert_eq!(names, ["live", "x"]);
}

/// A put through a store with no `max_limiters` sends no create mark and no unmark (two round
/// trips each put, and nothing to protect: with no cap, a name dropped while its create is in
/// flight is listed again by its put). The mark is a script's `SADD`, the unmark an `SREM`;
/// before marks were skipped here, every put ran one `SREM`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_without_a_cap_sends_no_create_mark() {
    let server = support::RedisServer::start();
    let store = gate(server.url()).await;
    // Scripts loaded, the listing set there.
    store
        .define("first", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    assert_eq!(support::cli(server.port, &["CONFIG", "RESETSTAT"]), "OK");
    store
        .define("second", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    store
        .define("first", LimiterSpec::concurrency(2))
        .await
        .unwrap();
    let stats = support::commandstats(server.port);
    assert_eq!(stats.get("srem"), None, "{stats:?}");
    assert_eq!(
        support::cli(server.port, &["KEYS", "fg:*:creating"]),
        "",
        "create marks left"
    );
}

/// A delete through a store that did not know the limiter (another store created it) reads
/// nothing after it: its reply used to start a background status read of the limiter it had
/// just deleted, as the first use of an unknown limiter does (a wasted round trip, answered
/// `unknown`). The relay holds B's connection from a status read on, so the delete's own last
/// command (the registry's `SREM`) and a readiness check (an `INFO`) sent after it on the same
/// connection are answered only if no status read went before them. On a current-thread
/// runtime a task the delete's reply spawned runs before the delete's task resumes, so such a
/// read is on the connection before those. Otherwise unchanged: the limiter is gone for its
/// creator too (not revived), and B's first acquire on a limiter it did not know still reads
/// its spec (which also shows the relay catches that read).
#[tokio::test]
async fn a_delete_of_a_limiter_the_store_did_not_know_reads_nothing_after() {
    let server = support::RedisServer::start();
    let relay = HoldingRelay::start(server.port).await;
    let a = gate(server.url()).await;
    let b = gate(relay.url()).await;
    a.define("doomed", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    a.define("kept", LimiterSpec::concurrency(1)).await.unwrap();

    relay.arm_on(&[STATUS]);
    let no_status_read = || async {
        until(
            "the delete or the check answered, or a status read held",
            || relay.holds(STATUS),
        )
        .await;
        panic!("the delete of a limiter B did not know was followed by a status read");
    };
    tokio::select! {
        deleted = b.delete("doomed") => assert!(deleted.unwrap()),
        () = no_status_read() => {}
    }
    tokio::select! {
        ready = b.store().ping() => ready.unwrap(),
        () = no_status_read() => {}
    }
    let gone = a.limiter("doomed").await.unwrap().status().await;
    assert!(
        matches!(gone, Err(StoreError::UnknownLimiter(_))),
        "{gone:?}"
    );

    relay.arm_on(&[STATUS]);
    let kept = b.limiter("kept").await.unwrap();
    let _permit = kept.try_acquire().await.unwrap();
    until(
        "B reads the spec of a limiter it uses and did not know",
        || relay.holds(STATUS),
    )
    .await;
    relay.release();
}
