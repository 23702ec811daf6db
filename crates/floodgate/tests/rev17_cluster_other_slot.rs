//! Review of today's Redis Cluster failover detection (`store/redis/shard.rs`): limiters of
//! the same master on *other* slots than the one that noticed the change, in the same server.
//!
//! `shard.rs` says they are caught lazily, at their own next call: their slot still names the
//! old master, so their scripts carry the old master's tag and are answered `NOSCRIPT` by the
//! promoted replica, even after this very server loaded the new master's scripts there for
//! the other slot. `cluster_failover_redis.rs` shows it across two servers; here one server
//! notices on one slot first, and the limiter whose grant the failover lost (on another slot of
//! that shard) is used next by an operation that is not an acquire (a status, an extend, or a
//! keyed limiter's status), then asked for a grant: nothing may be granted over the lost one.
//! Mutation-checked: with the scripts of every master alike (`Scripts::new(None)` in
//! `check_shard`), the lost grant's slot is granted over.
//!
//! And a shard that hangs (its only master stopped with SIGSTOP: its connections stay open,
//! nothing is answered): its slot's first check waits out the response timeout, and a limiter
//! on a live shard used by the same server for the first time (its own slot's check first)
//! must answer meanwhile. Mutation-checked: with one gate for the whole store, as before, it
//! waits behind the hung check.
//!
//! Helpers shared with `cluster_failover_redis.rs` (`support/cluster_shard.rs`).

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use floodgate::{
    AcquireError, Floodgate, KeyedSpec, LimiterSpec, RedisConfig, RedisStore, Refusal,
};

#[path = "support/cluster_shard.rs"]
mod cluster_shard;
use cluster_shard::*;

#[derive(Clone, Copy, Debug)]
enum First {
    Acquire,
    Status,
    Extend,
}

async fn other_slot_round(keyed: bool, first: First) {
    let mut cluster = support::RedisCluster::start_with_replicas(1);
    let seed = cluster.nodes[0].port;
    let gate = Floodgate::with_store(
        RedisStore::connect(connect_config(&cluster))
            .await
            .expect("connect"),
    );
    let spec = LimiterSpec::concurrency(LIMIT).with_default_lease(Duration::from_secs(60));
    if keyed {
        gate.define_keyed("lost", spec.clone(), KeyedSpec::per_key(LIMIT))
            .await
            .expect("define");
    } else {
        gate.define("lost", spec.clone()).await.expect("define");
    }
    let lost = gate.limiter("lost").await.expect("limiter");
    let (master, replica) = shard_of(seed, slot_of(seed, "lost"));
    let other_name = name_on(seed, master, "lost");
    assert_ne!(slot_of(seed, &other_name), slot_of(seed, "lost"));
    // The same script as the lost grant's limiter runs (a keyed one's for a keyed one).
    if keyed {
        gate.define_keyed(&other_name, spec, KeyedSpec::per_key(LIMIT))
            .await
            .expect("define");
    } else {
        gate.define(&other_name, spec).await.expect("define");
    }
    let other = gate.limiter(&other_name).await.expect("limiter");
    let opts = || {
        let o = now();
        if keyed {
            o.key("org")
        } else {
            o
        }
    };
    other.status().await.expect("status");
    let mut held = vec![lost.acquire(opts()).await.expect("kept")];
    let mut lost_grant = None;
    fail_over_losing(&mut cluster, Failover::Takeover, master, replica, async {
        lost_grant = Some(lost.acquire(opts()).await.expect("lost"));
    })
    .await;
    held.extend(lost_grant);
    assert_eq!(held.len(), LIMIT as usize, "the limit is out");

    // This server notices on the other slot first, and loads its scripts on the new master.
    let _ = acquire_answered(&other, opts).await;
    assert!(
        info_field(replica, "memory", "number_of_cached_scripts")
            .and_then(|n| n.parse::<u32>().ok())
            >= Some(1),
        "the scripts were loaded on the new master"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    match first {
        First::Acquire => {}
        First::Status => loop {
            match lost.status().await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("while failing over: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{e}"),
            }
        },
        First::Extend => {
            held[0]
                .extend(Duration::from_secs(60))
                .await
                .expect("the kept permit extended");
        }
    }
    match acquire_answered(&lost, opts).await {
        Ok(p) => {
            held.push(p);
            panic!(
                "granted on the promoted replica's older state: {} permits held against a \
                 limit of {LIMIT} (keyed: {keyed}, first: {first:?})",
                held.len()
            );
        }
        Err(AcquireError::Refused(Refusal::WaitTimeout { .. })) => {}
        Err(e) => panic!("unexpected answer {e:?}"),
    }
    let status = lost.status().await.expect("status");
    assert!(status.learning, "not in a learning window: {status:?}");
    for p in held {
        p.detach();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_slot_of_the_failed_over_master_is_not_granted_over_its_lost_grant() {
    other_slot_round(false, First::Acquire).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_slot_first_read_by_a_status_is_not_granted_over_its_lost_grant() {
    other_slot_round(false, First::Status).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_slot_first_extended_is_not_granted_over_its_lost_grant() {
    other_slot_round(false, First::Extend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_slot_of_a_keyed_limiter_is_not_granted_over_its_lost_grant() {
    other_slot_round(true, First::Status).await;
}

/// The hung node's response timeout in the store under test: far beyond the liveness bound.
const HUNG_FOR: Duration = Duration::from_secs(300);
/// Liveness bound.
const LIVENESS: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_shards_check_does_not_hold_up_a_live_shards_first_call() {
    let cluster = support::RedisCluster::start();
    let ports = tolerating_lost_shards(&cluster);
    let hung = ports[0];
    let hung_name = name_of_shard(hung, "hung", true);
    let live_name = name_of_shard(hung, "live", false);
    // Another server defines both: the one under test has checked neither slot.
    let definer = Floodgate::with_store(
        RedisStore::connect(RedisConfig::cluster(cluster.urls()))
            .await
            .expect("connect"),
    );
    for name in [&hung_name, &live_name] {
        definer
            .define(name, LimiterSpec::concurrency(1))
            .await
            .expect("define");
    }
    let mut config = RedisConfig::cluster(cluster.urls());
    config.response_timeout = HUNG_FOR;
    let server = Floodgate::with_store(RedisStore::connect(config).await.expect("connect"));

    cluster.node(hung).pause();
    let on_hung = {
        let server = server.clone();
        tokio::spawn(async move { server.limiter(&hung_name).await?.status().await })
    };
    // Its slot's check is sent, and waits in the hung node's queue.
    tokio::task::block_in_place(|| {
        wait_until("nothing was sent to the hung node", || {
            cluster.node(hung).has_unread_requests()
        });
    });
    let live = tokio::time::timeout(LIVENESS, async {
        server.limiter(&live_name).await?.status().await
    })
    .await;
    let hung_answered = on_hung.is_finished();
    cluster.node(hung).resume();
    let live = live.unwrap_or_else(|_| {
        panic!(
            "a live shard's first call waited {LIVENESS:?} behind the hung shard's check \
             (response timeout {HUNG_FOR:?})"
        )
    });
    assert_eq!(live.expect("the live shard's status").in_use, 0);
    assert!(
        !hung_answered,
        "the hung shard's call was answered while its node was stopped"
    );
    // Answered once the node runs again (or unavailable while the cluster settles).
    match tokio::time::timeout(LIVENESS * 2, on_hung).await {
        Ok(Ok(Ok(status))) => assert_eq!(status.in_use, 0),
        Ok(Ok(Err(e))) => eprintln!("the hung shard's call was answered {e}"),
        other => panic!("the hung shard's call after the node resumed: {other:?}"),
    }
}
