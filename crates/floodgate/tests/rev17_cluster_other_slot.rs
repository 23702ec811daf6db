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
//! Helpers copied from `cluster_failover_redis.rs` (a test binary cannot share another's).

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use floodgate::{
    AcquireError, AcquireOptions, Floodgate, KeyedSpec, LimiterSpec, RedisConfig, RedisStore,
    Refusal, StoreError,
};
use support::cli;

const LIMIT: u32 = 2;

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn info_field(port: u16, section: &str, field: &str) -> Option<String> {
    cli(port, &["INFO", section])
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
}

/// The hash slot of a limiter's keys (all under the hash tag `{name}`).
fn slot_of(port: u16, name: &str) -> u16 {
    cli(port, &["CLUSTER", "KEYSLOT", &format!("{{{name}}}")])
        .parse()
        .expect("a slot")
}

/// The ports of the master serving `slot` and of its replica (0 if none), as `port`'s node
/// sees them.
fn shard_of(port: u16, slot: u16) -> (u16, u16) {
    let nodes = cli(port, &["CLUSTER", "NODES"]);
    let port_of = |addr: &str| -> u16 {
        addr.split('@')
            .next()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .expect("a node address")
    };
    let serves = |f: &[&str]| {
        f[8..].iter().any(|range| {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            matches!(
                (lo.parse::<u16>(), hi.parse::<u16>()),
                (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot)
            )
        })
    };
    let lines: Vec<Vec<&str>> = nodes
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let master = lines
        .iter()
        .find(|f| f[2].contains("master") && serves(f))
        .expect("a master serving the slot");
    let replica = lines
        .iter()
        .find(|f| f[2].contains("slave") && f[3] == master[0])
        .map_or(0, |f| port_of(f[1]));
    (port_of(master[1]), replica)
}

/// A name whose slot the master on `master` serves, other than `besides`.
fn name_on(port: u16, master: u16, besides: &str) -> String {
    (0..1000)
        .map(|i| format!("other-{i}"))
        .find(|n| n != besides && shard_of(port, slot_of(port, n)).0 == master)
        .expect("a name on that shard")
}

fn connect_config(cluster: &support::RedisCluster) -> RedisConfig {
    let mut config = RedisConfig::cluster(cluster.urls());
    // Long enough to cover the test's own heartbeats after the failover on a slow machine.
    config.learning_window = Some(Duration::from_secs(10));
    config
}

/// How the shard's master is replaced.
#[derive(Clone, Copy, Debug)]
#[allow(dead_code)] // `Crash` is not used here.
enum Failover {
    /// `CLUSTER FAILOVER TAKEOVER` on the replica; the old master lives on as its replica.
    Takeover,
    /// The master is killed (SIGKILL); the cluster promotes the replica after the node
    /// timeout. The store's connections to the master fail first.
    Crash,
}

/// With the replica of `master` paused, `grant_lost` runs (its writes reach the master only);
/// then the replica replaces the master (`how`) and is unpaused. Returns once the live nodes
/// see the new master.
async fn fail_over_losing<F: std::future::Future<Output = ()>>(
    cluster: &mut support::RedisCluster,
    how: Failover,
    master: u16,
    replica: u16,
    grant_lost: F,
) {
    let offset = |port: u16, field: &str| -> u64 {
        info_field(port, "replication", field)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // Everything so far (the limiter, the grants kept) applied on the replica. (`WAIT` from
    // another connection would not tell: it waits for that connection's own writes.)
    let written = offset(master, "master_repl_offset");
    tokio::task::block_in_place(|| {
        wait_until("the replica never caught up", || {
            offset(replica, "slave_repl_offset") >= written
        });
    });
    assert_eq!(cli(replica, &["CLIENT", "PAUSE", "60000", "WRITE"]), "OK");
    grant_lost.await;
    // What the store relies on: the replica has the limiter's data but none of the scripts.
    assert!(
        info_field(master, "memory", "number_of_cached_scripts")
            .and_then(|n| n.parse::<u32>().ok())
            >= Some(1),
        "the store loaded its scripts on the master"
    );
    assert_eq!(
        info_field(replica, "memory", "number_of_cached_scripts").as_deref(),
        Some("0"),
        "the replica has the store's scripts: NOSCRIPT would not tell"
    );
    assert!(
        offset(replica, "slave_repl_offset") < offset(master, "master_repl_offset"),
        "the paused replica applied the lost grant"
    );
    tokio::task::block_in_place(|| {
        match how {
            Failover::Takeover => {
                assert_eq!(cli(replica, &["CLUSTER", "FAILOVER", "TAKEOVER"]), "OK");
            }
            Failover::Crash => {
                cluster
                    .nodes
                    .iter_mut()
                    .find(|n| n.port == master)
                    .expect("the master")
                    .kill();
            }
        }
        wait_until("the replica never became master", || {
            cli(replica, &["ROLE"]).lines().next() == Some("master")
        });
        if matches!(how, Failover::Takeover) {
            wait_until("the old master never stepped down", || {
                cli(master, &["ROLE"]).lines().next() == Some("slave")
            });
        }
        assert_eq!(cli(replica, &["CLIENT", "UNPAUSE"]), "OK");
        let live: Vec<u16> = cluster
            .nodes
            .iter()
            .map(|n| n.port)
            .filter(|p| matches!(how, Failover::Takeover) || *p != master)
            .collect();
        wait_until("the cluster never agreed on the new master", || {
            live.iter().all(|p| {
                cli(*p, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
                    && cli(*p, &["CLUSTER", "NODES"])
                        .lines()
                        .any(|l| l.contains(&format!(":{replica}@")) && l.contains("master"))
            })
        });
    });
}

/// An acquire once the store answers: a 503 is allowed while the connection finds the new
/// master (the store fails closed), and retried within a liveness bound.
async fn acquire_answered<B: floodgate::LimiterBackend>(
    limiter: &floodgate::Limiter<B>,
    options: impl Fn() -> AcquireOptions,
) -> Result<floodgate::Permit<B>, AcquireError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match limiter.acquire(options()).await {
            Err(AcquireError::Store(StoreError::Unavailable(e))) if Instant::now() < deadline => {
                eprintln!("503 while the shard fails over: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

fn now() -> AcquireOptions {
    AcquireOptions::new().wait(Duration::ZERO)
}

/// What the lost grant's limiter gets first after the other slot noticed the failover.
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
