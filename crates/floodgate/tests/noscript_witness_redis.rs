//! Redis restarted on an older snapshot, and the store's shared connection reconnected without
//! any script call failing first: a health probe's `PING` (`GET /v1/health`) found the
//! connection dead, reconnected it and retried, so no failure was recorded and the master was
//! not checked. The next script call reaches the reloaded Redis first; it must not be granted
//! on the older state (which lacks the grants made after the snapshot). What tells the store:
//! the restarted Redis has no scripts, so that call is answered `NOSCRIPT`, and the store
//! checks the master before loading the script again (`store/redis/eval.rs`).
//!
//! The witness: the permits this test holds (answered grants it has not let go), which the
//! store cannot see, against the limit. No assertion depends on timing.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use floodgate::{
    AcquireError, AcquireOptions, Floodgate, KeyedSpec, LimiterSpec, RedisConfig, RedisStore,
    Refusal, Store,
};

fn save(server: &support::RedisServer) {
    let saved = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "SAVE"])
        .output()
        .expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&saved.stdout).trim(), "OK");
}

/// One round: `keyed` runs it on a keyed limiter (the keyed script, a second script cache
/// entry) instead of a plain one.
async fn no_grant_after_a_silent_reconnect(keyed: bool) {
    let mut server = support::RedisServer::start();
    let mut config = RedisConfig::new(server.url());
    config.learning_window = Some(Duration::from_secs(20));
    let gate = Floodgate::with_store(RedisStore::connect(config).await.expect("connect"));
    let spec = LimiterSpec::concurrency(2).with_default_lease(Duration::from_secs(60));
    let options = || {
        let o = AcquireOptions::new().wait(Duration::ZERO);
        if keyed {
            o.key("org")
        } else {
            o
        }
    };
    if keyed {
        gate.define_keyed("stale", spec, KeyedSpec::per_key(2))
            .await
            .expect("define");
    } else {
        gate.define("stale", spec).await.expect("define");
    }
    let limiter = gate.limiter("stale").await.expect("limiter");
    // The witness: every permit answered and not let go.
    let mut held = vec![limiter.acquire(options()).await.expect("kept")];
    save(&server);
    // Granted after the snapshot: the reload loses it, its holder keeps working.
    held.push(limiter.acquire(options()).await.expect("lost"));
    assert_eq!(held.len(), 2, "the limit is out");

    tokio::task::block_in_place(|| server.restart());
    // A health probe: its PING finds the connection dead, reconnects it and succeeds.
    gate.store().ping().await.expect("ping after the restart");

    // The first script call of this store on the reloaded Redis.
    match limiter.acquire(options()).await {
        Ok(p) => {
            held.push(p);
            panic!(
                "granted on the reloaded state: {} permits held against a limit of 2 (keyed: \
                 {keyed})",
                held.len()
            );
        }
        Err(AcquireError::Refused(Refusal::WaitTimeout { .. })) => {}
        Err(e) => panic!("unexpected answer {e:?} (keyed: {keyed})"),
    }
    let status = limiter.status().await.expect("status");
    assert!(status.learning, "not in a learning window: {status:?}");
    // The lost grant's holder re-claims it by its heartbeat; nothing is granted over it.
    for p in &mut held {
        p.extend(Duration::from_secs(60)).await.expect("re-adopted");
    }
    let status = limiter.status().await.expect("status");
    assert_eq!(status.in_use, 2, "{status:?}");
    assert!(
        matches!(
            limiter.acquire(options()).await,
            Err(AcquireError::Refused(Refusal::WaitTimeout { .. }))
        ),
        "granted over the re-adopted permits"
    );
    for p in held {
        p.detach();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_reconnect_to_a_reloaded_redis_grants_nothing_over_the_lost_grant() {
    no_grant_after_a_silent_reconnect(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_reconnect_to_a_reloaded_redis_grants_nothing_over_the_lost_grant_keyed() {
    no_grant_after_a_silent_reconnect(true).await;
}

/// Two servers share the Redis. The first to reach the reloaded Redis notices the change and
/// loads its scripts again, but only uses another limiter; the second then reaches it the same
/// silent way (a health `PING`), on the limiter whose grant the reload lost. The scripts the
/// first loaded name the new master, so the second's call (naming the old one) is still
/// answered `NOSCRIPT` and it checks the master itself, instead of being granted on the
/// older state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_reloaded_the_scripts_first_does_not_hide_the_change_from_another() {
    let mut server = support::RedisServer::start();
    let connect = || {
        let mut config = RedisConfig::new(server.url());
        config.learning_window = Some(Duration::from_secs(20));
        RedisStore::connect(config)
    };
    let first = Floodgate::with_store(connect().await.expect("connect"));
    let second = Floodgate::with_store(connect().await.expect("connect"));
    let spec = LimiterSpec::concurrency(2).with_default_lease(Duration::from_secs(60));
    first.define("other", spec.clone()).await.expect("define");
    second.define("stale", spec).await.expect("define");
    let other = first.limiter("other").await.expect("limiter");
    let stale = second.limiter("stale").await.expect("limiter");
    let now = || AcquireOptions::new().wait(Duration::ZERO);
    // The witness: the permits of `stale` answered and not let go.
    let mut held = vec![stale.acquire(now()).await.expect("kept")];
    save(&server);
    held.push(stale.acquire(now()).await.expect("lost"));

    tokio::task::block_in_place(|| server.restart());
    first.store().ping().await.expect("ping");
    // The first server's first script call on the reloaded Redis: it notices the change and
    // loads its scripts (its limiter learns too, so this is refused).
    let _ = other.acquire(now()).await;
    second.store().ping().await.expect("ping");
    match stale.acquire(now()).await {
        Ok(p) => {
            held.push(p);
            panic!(
                "granted on the reloaded state: {} permits held against a limit of 2",
                held.len()
            );
        }
        Err(AcquireError::Refused(Refusal::WaitTimeout { .. })) => {}
        Err(e) => panic!("unexpected answer {e:?}"),
    }
    let status = stale.status().await.expect("status");
    assert!(status.learning, "not in a learning window: {status:?}");
    for p in held {
        p.detach();
    }
}

/// The check costs nothing once the scripts are loaded: each operation is one EVALSHA, with no
/// `INFO` or `SCRIPT` sent for it. (The store reads the memory policy with one `INFO` every
/// 5 s on its own, `evict.rs`: a slow run may hold one or two of those, never one per call.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_the_scripts_are_loaded_an_operation_is_one_evalsha() {
    let server = support::RedisServer::start();
    let gate = Floodgate::with_store(
        RedisStore::connect(RedisConfig::new(server.url()))
            .await
            .expect("connect"),
    );
    gate.define("steady", LimiterSpec::concurrency(2))
        .await
        .expect("define");
    let limiter = gate.limiter("steady").await.expect("limiter");
    // The first call loads the script (after a check of the master).
    limiter.status().await.expect("status");
    let reset = std::process::Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "CONFIG", "RESETSTAT"])
        .output()
        .expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&reset.stdout).trim(), "OK");
    for _ in 0..50 {
        limiter.status().await.expect("status");
    }
    let stats = support::commandstats(server.port);
    assert_eq!(stats.get("evalsha"), Some(&50), "{stats:?}");
    // (The commands the script runs are counted too; those are not sent by the store.)
    let loads: Vec<_> = stats
        .keys()
        .filter(|name| name.starts_with("script"))
        .collect();
    let infos = stats.get("info").copied().unwrap_or(0);
    assert!(
        loads.is_empty() && infos < 10,
        "a check or a load on the hot path: {stats:?}"
    );
}
