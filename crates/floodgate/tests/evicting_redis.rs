//! The store refuses a Redis that may evict keys (`maxmemory` set with a `maxmemory-policy`
//! other than `noeviction`, `store/redis/evict.rs`): `connect` fails with an `EvictingRedis`
//! as the error's source, and a policy changed at run time is refused from the next read of it
//! (a readiness `ping`, a check of a master, the store's read every 5 s)
//! until it is changed back. On a Cluster, any master. The HTTP and CLI side: `floodgate-cli/tests/redis_servers/eviction.rs`.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use floodgate::store::redis::EvictingRedis;
use floodgate::{
    AcquireError, AcquireOptions, Floodgate, LimiterSpec, RedisConfig, RedisStore, Store,
    StoreError,
};
use support::cli;

#[path = "support/cluster_shard.rs"]
mod cluster_shard;
use cluster_shard::{master_of, name_on};

/// The `EvictingRedis` an error stands for, if it is one.
fn evicting(e: &StoreError) -> Option<&EvictingRedis> {
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(found) = cause.downcast_ref::<EvictingRedis>() {
            return Some(found);
        }
        source = cause.source();
    }
    None
}

#[track_caller]
fn assert_refused_for(e: &StoreError, policy: &str) {
    let found = evicting(e).unwrap_or_else(|| panic!("not refused for eviction: {e}"));
    assert_eq!(found.policy, policy, "{e}");
    assert!(
        e.to_string().contains("`maxmemory-policy noeviction`"),
        "{e}"
    );
}

fn set(port: u16, what: &str, value: &str) {
    assert_eq!(cli(port, &["CONFIG", "SET", what, value]), "OK");
}

fn now() -> AcquireOptions {
    AcquireOptions::new().wait(Duration::ZERO)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_redis_that_evicts_is_refused_at_connect_and_at_run_time() {
    let server = support::RedisServer::start_on_a_free_port(&[
        "--maxmemory",
        "100mb",
        "--maxmemory-policy",
        "allkeys-lfu",
    ]);
    let e = RedisStore::connect(RedisConfig::new(server.url()))
        .await
        .expect_err("connected to an evicting Redis");
    assert_refused_for(&e, "allkeys-lfu");

    set(server.port, "maxmemory-policy", "noeviction");
    let gate = Floodgate::with_store(
        RedisStore::connect(RedisConfig::new(server.url()))
            .await
            .expect("noeviction with maxmemory is served"),
    );
    gate.define("std", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    let limiter = gate.limiter("std").await.unwrap();
    let held = limiter.acquire(now()).await.expect("granted");

    set(server.port, "maxmemory-policy", "volatile-random");
    let e = gate
        .store()
        .ping()
        .await
        .expect_err("ping on an evicting Redis");
    assert_refused_for(&e, "volatile-random");
    match limiter.acquire(now()).await {
        Err(AcquireError::Store(e)) => assert_refused_for(&e, "volatile-random"),
        other => panic!("an acquire on an evicting Redis: {other:?}"),
    }
    let e = limiter
        .status()
        .await
        .expect_err("status on an evicting Redis");
    assert_refused_for(&e, "volatile-random");

    // No limit, whatever the policy: served again.
    set(server.port, "maxmemory", "0");
    gate.store().ping().await.expect("maxmemory 0 is served");
    assert_eq!(limiter.status().await.unwrap().in_use, 1);
    held.release().await.expect("released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_is_refused_if_any_master_evicts() {
    let cluster = support::RedisCluster::start();
    let seed = cluster.nodes[0].port;
    let name = "spread";
    let master = master_of(seed, name);
    let other_master = cluster
        .nodes
        .iter()
        .map(|n| n.port)
        .find(|&p| p != master && master_of(seed, &name_on(seed, p, name)) == p)
        .expect("another master");

    // One master of three evicting: refused.
    set(other_master, "maxmemory", "100mb");
    set(other_master, "maxmemory-policy", "volatile-lru");
    let e = RedisStore::connect(RedisConfig::cluster(cluster.urls()))
        .await
        .expect_err("connected to a cluster with an evicting master");
    assert_refused_for(&e, "volatile-lru");
    set(other_master, "maxmemory-policy", "noeviction");

    let gate = Floodgate::with_store(
        RedisStore::connect(RedisConfig::cluster(cluster.urls()))
            .await
            .expect("connect"),
    );
    // The first use of a slot checks its master: set before it, caught by that check.
    set(master, "maxmemory", "100mb");
    set(master, "maxmemory-policy", "allkeys-lru");
    match gate.define(name, LimiterSpec::concurrency(1)).await {
        Err(e) => assert_refused_for(&e, "allkeys-lru"),
        Ok(status) => panic!("defined on an evicting master: {status:?}"),
    }
    set(master, "maxmemory-policy", "noeviction");
    gate.store().ping().await.expect("no master evicts");
    gate.define(name, LimiterSpec::concurrency(1))
        .await
        .unwrap();
    let limiter = gate.limiter(name).await.unwrap();
    let held = limiter.acquire(now()).await.expect("granted");

    // Changed at run time on another master: a readiness ping reads every master (a `PING`
    // went to every master too).
    set(other_master, "maxmemory-policy", "allkeys-random");
    let e = gate
        .store()
        .ping()
        .await
        .expect_err("ping with an evicting master");
    assert_refused_for(&e, "allkeys-random");
    match limiter.acquire(now()).await {
        Err(AcquireError::Store(e)) => assert_refused_for(&e, "allkeys-random"),
        other => panic!("an acquire with an evicting master: {other:?}"),
    }
    set(other_master, "maxmemory-policy", "noeviction");
    gate.store().ping().await.expect("no master evicts");

    // With nothing probing readiness, the store's periodic read asks every master: a status
    // on `master` (which checks no master itself) is refused once it has.
    set(other_master, "maxmemory-policy", "volatile-random");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let e = loop {
        match limiter.status().await {
            Err(e) => break e,
            Ok(_) => assert!(
                std::time::Instant::now() < deadline,
                "the periodic read never refused it"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_refused_for(&e, "volatile-random");
    set(other_master, "maxmemory-policy", "noeviction");
    gate.store().ping().await.expect("no master evicts");
    held.release().await.expect("released");
}
