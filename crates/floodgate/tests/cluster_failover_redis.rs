//! A Redis Cluster shard fails over to a replica that missed the last grant. The replica is
//! made to miss it with `CLIENT PAUSE WRITE` (a paused replica reads its master's stream but
//! does not apply it), promoted with `CLUSTER FAILOVER TAKEOVER` while paused (a replica that
//! becomes master drops its master link and what it had not applied), then unpaused. The
//! promoted replica serves the shard's slots with the state from before the grant. The same
//! with the master killed instead (the cluster promotes the paused replica after the node
//! timeout; the store's requests to the dead master fail first).
//!
//! What must tell the store: the promoted replica has none of the store's scripts (Redis 7
//! replicates scripts' effects, not the scripts, and not `SCRIPT LOAD`), so the first script
//! call on it is answered `NOSCRIPT`, and the scripts name the master they were loaded on, so a
//! second server that did not notice still sends the older SHA1 (`store/redis/eval.rs`,
//! `store/redis/shard.rs`).
//!
//! The witness: the permits this test holds (answered grants it has not let go), which the
//! store cannot see, against the limit. No assertion depends on timing; waits are liveness
//! bounds only.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use floodgate::{
    AcquireError, Floodgate, KeyedSpec, LimiterSpec, RedisConfig, RedisStore, Refusal, Store,
};
use support::cli;

#[path = "support/cluster_shard.rs"]
mod cluster_shard;
use cluster_shard::*;

/// One round: `keyed` runs it on a keyed limiter (the keyed script, a second script cache
/// entry) instead of a plain one; `how` replaces the shard's master.
async fn shard_failover_round(keyed: bool, how: Failover) {
    let mut cluster = support::RedisCluster::start_with_replicas(1);
    let seed = cluster.nodes[0].port;
    let gate = Floodgate::with_store(
        RedisStore::connect(connect_config(&cluster))
            .await
            .expect("connect"),
    );
    let spec = LimiterSpec::concurrency(LIMIT).with_default_lease(Duration::from_secs(60));
    if keyed {
        gate.define_keyed("shard", spec, KeyedSpec::per_key(LIMIT))
            .await
            .expect("define");
    } else {
        gate.define("shard", spec).await.expect("define");
    }
    let limiter = gate.limiter("shard").await.expect("limiter");
    let now = || {
        let o = now();
        if keyed {
            o.key("org")
        } else {
            o
        }
    };
    let (master, replica) = shard_of(seed, slot_of(seed, "shard"));
    // The witness: every permit answered and not let go.
    let mut held = vec![limiter.acquire(now()).await.expect("kept")];
    let mut lost = None;
    fail_over_losing(&mut cluster, how, master, replica, async {
        lost = Some(limiter.acquire(now()).await.expect("lost"));
    })
    .await;
    held.extend(lost);
    assert_eq!(held.len(), 2, "the limit is out");

    // A health probe first (it tells the store nothing; after a crash it may fail, if sent to
    // the dead node), then the first acquires on the new master. A 503 is allowed (the store
    // fails closed while the connection finds the new master), never a grant.
    let _ = gate.store().ping().await;
    match acquire_answered(&limiter, now).await {
        Ok(p) => {
            held.push(p);
            panic!(
                "granted on the promoted replica's older state: {} permits held against a \
                 limit of {LIMIT} (keyed: {keyed}, {how:?})",
                held.len()
            );
        }
        Err(AcquireError::Refused(Refusal::WaitTimeout { .. })) => {}
        Err(e) => panic!("unexpected answer {e:?} (keyed: {keyed}, {how:?})"),
    }
    let status = limiter.status().await.expect("status");
    assert!(status.learning, "not in a learning window: {status:?}");
    assert_eq!(status.in_use, 1, "the promoted replica's state: {status:?}");
    // The lost grant's holder re-claims it by its heartbeat; nothing is granted over it.
    for p in &mut held {
        p.extend(Duration::from_secs(60)).await.expect("re-adopted");
    }
    assert_eq!(limiter.status().await.expect("status").in_use, LIMIT);
    assert!(
        matches!(
            limiter.acquire(now()).await,
            Err(AcquireError::Refused(Refusal::WaitTimeout { .. }))
        ),
        "granted over the re-adopted permits"
    );
    // After the window: still nothing over them; a release makes room for one.
    support::until_status(&limiter, "the window never ended", |s| !s.learning).await;
    assert!(
        matches!(
            limiter.acquire(now()).await,
            Err(AcquireError::Refused(Refusal::WaitTimeout { .. }))
        ),
        "granted over the re-adopted permits after the window"
    );
    held.pop().expect("held").release().await.expect("release");
    held.push(limiter.acquire(now()).await.expect("room for one"));
    assert_eq!(limiter.status().await.expect("status").in_use, LIMIT);
    for p in held {
        p.detach();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_failover_to_a_replica_that_missed_a_grant_grants_nothing_over_it() {
    shard_failover_round(false, Failover::Takeover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_failover_to_a_replica_that_missed_a_grant_grants_nothing_over_it_keyed() {
    shard_failover_round(true, Failover::Takeover).await;
}

/// The realistic failover: the master dies, the cluster promotes its replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_shard_master_replaced_by_a_replica_that_missed_a_grant_grants_nothing_over_it() {
    shard_failover_round(false, Failover::Crash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_shard_master_replaced_by_a_replica_that_missed_a_keyed_grant_grants_nothing() {
    shard_failover_round(true, Failover::Crash).await;
}

/// Two servers share the cluster. The first reaches the new master first, on another limiter
/// of the same shard: it notices the change and loads its scripts there. The second's call on
/// the limiter whose grant the failover lost still names the old master, is answered
/// `NOSCRIPT`, and it checks the shard's master itself instead of being granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_loaded_the_scripts_first_does_not_hide_the_failover_from_another() {
    let mut cluster = support::RedisCluster::start_with_replicas(1);
    let seed = cluster.nodes[0].port;
    let first = Floodgate::with_store(
        RedisStore::connect(connect_config(&cluster))
            .await
            .expect("connect"),
    );
    let second = Floodgate::with_store(
        RedisStore::connect(connect_config(&cluster))
            .await
            .expect("connect"),
    );
    let spec = LimiterSpec::concurrency(LIMIT).with_default_lease(Duration::from_secs(60));
    second.define("stale", spec.clone()).await.expect("define");
    let (master, replica) = shard_of(seed, slot_of(seed, "stale"));
    let other_name = name_on(seed, master, "stale");
    first.define(&other_name, spec).await.expect("define");
    let other = first.limiter(&other_name).await.expect("limiter");
    let stale = second.limiter("stale").await.expect("limiter");
    let mut held = vec![stale.acquire(now()).await.expect("kept")];
    let mut lost = None;
    fail_over_losing(&mut cluster, Failover::Takeover, master, replica, async {
        lost = Some(stale.acquire(now()).await.expect("lost"));
    })
    .await;
    held.extend(lost);
    // The first server's first call on the new master: it notices and loads its scripts.
    let _ = acquire_answered(&other, now).await;
    assert!(
        info_field(replica, "memory", "number_of_cached_scripts")
            .and_then(|n| n.parse::<u32>().ok())
            >= Some(1),
        "the first server loaded its scripts on the new master"
    );
    match acquire_answered(&stale, now).await {
        Ok(p) => {
            held.push(p);
            panic!(
                "granted on the promoted replica's older state: {} permits held against a \
                 limit of {LIMIT}",
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

/// The check costs nothing once the scripts are loaded: each operation is one EVALSHA on the
/// shard's master, with no `INFO` or `SCRIPT` sent for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_the_scripts_are_loaded_an_operation_is_one_evalsha_on_a_cluster() {
    let cluster = support::RedisCluster::start();
    let seed = cluster.nodes[0].port;
    let gate = Floodgate::with_store(
        RedisStore::connect(RedisConfig::cluster(cluster.urls()))
            .await
            .expect("connect"),
    );
    gate.define("steady", LimiterSpec::concurrency(LIMIT))
        .await
        .expect("define");
    let limiter = gate.limiter("steady").await.expect("limiter");
    limiter.status().await.expect("status");
    let (master, _) = shard_of(seed, slot_of(seed, "steady"));
    for node in &cluster.nodes {
        assert_eq!(cli(node.port, &["CONFIG", "RESETSTAT"]), "OK");
    }
    for _ in 0..50 {
        limiter.status().await.expect("status");
    }
    let calls = |stats: &str, cmd: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    for node in &cluster.nodes {
        let stats = cli(node.port, &["INFO", "commandstats"]);
        let evalsha = if node.port == master { 50 } else { 0 };
        assert_eq!(calls(&stats, "evalsha"), evalsha, "{}: {stats}", node.port);
        // The store reads every master's memory policy with one `INFO` every 5 s on its own
        // (`evict.rs`): a slow run may hold one or two of those, never one per call.
        assert!(
            calls(&stats, "info") < 10 && !stats.contains("cmdstat_script"),
            "a check or a load on the hot path: {stats}"
        );
    }
}
