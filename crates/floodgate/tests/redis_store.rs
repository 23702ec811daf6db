//! The behavioural suite, unchanged, against the Redis store on a real `redis-server`.

#![cfg(feature = "redis")]

mod suite;
mod support;

use floodgate::{Floodgate, RedisConfig, RedisStore};

// Each test gets its own server, stopped when the test ends.
store_suite!(false, async {
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(server.url()))
        .await
        .expect("connect to redis");
    (Floodgate::with_store(store), server)
});

/// Pitfall 5 (state without a TTL grows forever): after a workload that creates and empties
/// every kind of key (holders, queue, outcomes, a deleted incarnation's tokens), every key in
/// Redis has a TTL. Keys get one when created and all are refreshed at most hourly.
#[tokio::test]
async fn every_key_has_a_ttl() {
    use std::time::Duration;

    use floodgate::{
        AcquireOptions, AdaptiveSpec, Feedback, LimiterBackend, LimiterSpec, RateSpec,
    };

    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(server.url()))
        .await
        .expect("connect");
    let gate = Floodgate::with_store(store);
    // Leases and waits a stalled test process does not outlast between two steps (200 ms and
    // 2 s were: the key scan runs a redis-cli per key); the one lease meant to lapse is 1 s.
    let short = |n| {
        LimiterSpec::concurrency(n)
            .with_default_lease(Duration::from_secs(2))
            .with_max_wait(Duration::from_secs(30))
    };
    gate.define("conc", short(1)).await.expect("define");
    let conc = gate.limiter("conc").await.expect("limiter");
    // Long enough to outlast the key scan (a redis-cli per key) on a loaded machine.
    let long = Duration::from_secs(30);
    for _ in 0..3 {
        let held = conc
            .acquire(AcquireOptions::new().lease(long))
            .await
            .expect("granted");
        let waiter = {
            let conc = conc.clone();
            tokio::spawn(async move { conc.acquire(AcquireOptions::new()).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        // A waiter whose deadline comes before the first's: it is kept in `waits`.
        let early = {
            let conc = conc.clone();
            tokio::spawn(async move {
                conc.acquire(AcquireOptions::new().wait(Duration::from_secs(20)))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        // Queue, waiters and wait deadlines exist now.
        assert_every_key_has_a_ttl(server.port);
        assert!(held.release().await.expect("release"));
        let p = waiter.await.expect("task").expect("granted to the waiter");
        assert!(p.release().await.expect("release"));
        let q = early.await.expect("task").expect("granted to the waiter");
        assert!(q.release().await.expect("release"));
    }
    // A waiter asking for more than one permit (the `heavy` set).
    gate.define("heavy", short(2)).await.expect("define");
    let heavy = gate.limiter("heavy").await.expect("limiter");
    let one = heavy
        .acquire(AcquireOptions::new().lease(long))
        .await
        .expect("granted");
    let two = {
        let heavy = heavy.clone();
        tokio::spawn(async move { heavy.acquire(AcquireOptions::new().permits(2)).await })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_every_key_has_a_ttl(server.port);
    assert!(one.release().await.expect("release"));
    let two = two.await.expect("task").expect("granted to the waiter");
    assert!(two.release().await.expect("release"));
    // A timed-out waiter and an abandoned lease.
    let _abandoned = conc
        .acquire(AcquireOptions::new().lease(Duration::from_secs(1)))
        .await
        .expect("granted")
        .detach();
    let timed_out = conc
        .acquire(AcquireOptions::new().wait(Duration::from_millis(50)))
        .await;
    assert!(timed_out.is_err());
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(conc.status().await.expect("status").in_use, 0);

    let rate = LimiterSpec::rate(RateSpec::per(100, Duration::from_secs(1)));
    gate.define("rate", rate).await.expect("define");
    let rate = gate.limiter("rate").await.expect("limiter");
    rate.backend().schedule(5).await.expect("schedule");
    drop(rate.acquire(AcquireOptions::new()).await.expect("paced"));

    let adaptive = short(4).with_adaptive(AdaptiveSpec::between(1, 4));
    gate.define("adaptive", adaptive).await.expect("define");
    let adaptive = gate.limiter("adaptive").await.expect("limiter");
    adaptive
        .backend()
        .feedback(Feedback::Throttled)
        .await
        .expect("feedback");

    gate.define("gone", short(1)).await.expect("define");
    drop(
        gate.limiter("gone")
            .await
            .expect("limiter")
            .acquire(AcquireOptions::new())
            .await,
    );
    assert!(gate.delete("gone").await.expect("delete"));

    assert_every_key_has_a_ttl(server.port);
}

/// Scans the server and asserts a positive TTL on every key.
fn assert_every_key_has_a_ttl(port: u16) {
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let keys = cli(&["--scan"]);
    assert!(!keys.is_empty());
    for key in keys.lines() {
        let ttl: i64 = cli(&["pttl", key]).parse().expect("a number");
        // -1 is a key without a TTL; -2 one that expired since the scan listed it.
        assert!(ttl > 0 || ttl == -2, "{key} has no TTL ({ttl})");
    }
}

/// Issue 10: a store that knows a limiter (another store created it; this one read its status)
/// re-creates it in a learning window when Redis loses it (FLUSHALL), but not when it was
/// deleted on purpose (the tombstone), even by another store.
#[tokio::test]
async fn a_vanished_limiter_is_revived_learning_but_a_deleted_one_is_not() {
    use std::time::Duration;

    use floodgate::{LimiterSpec, StoreError};

    let server = support::RedisServer::start();
    let connect = || async {
        let mut config = RedisConfig::new(server.url());
        config.learning_window = Some(Duration::from_secs(30));
        Floodgate::with_store(RedisStore::connect(config).await.expect("connect"))
    };
    let (a, b) = (connect().await, connect().await);
    let spec = LimiterSpec::concurrency(3);
    a.define("kept", spec.clone()).await.expect("define");
    a.define("dropped", spec.clone()).await.expect("define");
    a.define("reput", spec.clone()).await.expect("define");
    // B has only read them.
    for name in ["kept", "dropped"] {
        let st = b.limiter(name).await.expect("handle").status().await;
        assert!(!st.expect("status").learning);
    }
    assert!(a.delete("dropped").await.expect("delete"));
    let flush = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "flushall"])
        .output()
        .expect("redis-cli");
    assert!(flush.status.success());
    // A PUT of a limiter its server knew, after it vanished, re-creates it learning.
    let st = a.define("reput", spec).await.expect("define");
    assert!(st.learning, "{st:?}");
    // "kept" vanished: B re-creates it from the spec it read, learning.
    let st = b
        .limiter("kept")
        .await
        .expect("handle")
        .status()
        .await
        .expect("revived");
    assert!(st.learning, "{st:?}");
    assert_eq!((st.spec.concurrency, st.in_use), (Some(3), 0));
    assert!(b
        .limiters()
        .await
        .expect("list")
        .iter()
        .any(|s| s.name.as_str() == "kept"));

    // A deletion leaves a tombstone: B, which knows the spec, does not bring it back.
    a.define("gone", LimiterSpec::concurrency(2))
        .await
        .expect("define");
    b.limiter("gone")
        .await
        .expect("handle")
        .status()
        .await
        .expect("status");
    assert!(a.delete("gone").await.expect("delete"));
    let err = b.limiter("gone").await.expect("handle").status().await;
    assert!(matches!(err, Err(StoreError::UnknownLimiter(_))), "{err:?}");
    // And a re-create after a deletion starts fresh, not learning.
    let st = b
        .define("gone", LimiterSpec::concurrency(2))
        .await
        .expect("define");
    assert!(!st.learning);
}

/// `Floodgate::limiter`'s promise for Redis, whose handle names the limiter (any server may
/// delete and re-create it): after a delete it answers `UnknownLimiter`; once the name is
/// re-created it acts on the new limiter, and its grants count against the new limit.
#[tokio::test]
async fn a_handle_names_its_limiter_so_after_a_re_create_it_acts_on_the_new_one() {
    use floodgate::{AcquireError, AcquireOptions, LimiterSpec, StoreError};

    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(server.url()))
        .await
        .expect("connect");
    let gate = Floodgate::with_store(store);
    gate.define("batch", LimiterSpec::concurrency(1))
        .await
        .expect("define");
    let old = gate.limiter("batch").await.expect("handle");
    assert!(gate.delete("batch").await.expect("delete"));
    let try_once = || AcquireOptions::new().wait(std::time::Duration::ZERO);
    match old.acquire(try_once()).await {
        Err(AcquireError::Store(StoreError::UnknownLimiter(_))) => {}
        other => panic!("the old handle after a delete: {other:?}"),
    }
    gate.define("batch", LimiterSpec::concurrency(1))
        .await
        .expect("re-create");
    let held = old
        .acquire(try_once())
        .await
        .expect("granted by the new limiter");
    let new = gate.limiter("batch").await.expect("new handle");
    match new.acquire(try_once()).await {
        Err(e) if e.is_wait_timeout() => {}
        other => panic!("the old handle's grant counts against the new limit: {other:?}"),
    }
    assert!(held.release().await.expect("release"));
}
