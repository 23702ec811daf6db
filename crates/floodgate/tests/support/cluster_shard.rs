//! Helpers of the Redis Cluster failover and wake-up tests (`cluster_failover_redis.rs`,
//! `rev17_cluster_other_slot.rs`, `cluster_wake_redis.rs`, `rev17_cluster_wake.rs`): where a limiter's slot lives, a failover that loses the last
//! grant (the replica paused with `CLIENT PAUSE WRITE`, then promoted), and acquires retried
//! while the shard fails over. Included by `#[path]` by the tests that need a cluster with
//! replicas; they declare `mod support;` beside it.

#![allow(dead_code)] // Each test uses its own part.

use std::time::{Duration, Instant};

use floodgate::{AcquireError, AcquireOptions, RedisConfig, StoreError};

use super::support;
use super::support::cli;

pub(crate) const LIMIT: u32 = 2;

pub(crate) fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn info_field(port: u16, section: &str, field: &str) -> Option<String> {
    cli(port, &["INFO", section])
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
}

/// The hash slot of a limiter's keys (all under the hash tag `{name}`).
pub(crate) fn slot_of(port: u16, name: &str) -> u16 {
    cli(port, &["CLUSTER", "KEYSLOT", &format!("{{{name}}}")])
        .parse()
        .expect("a slot")
}

/// The port of the master serving limiter `name`'s slot, as `port`'s node sees it.
pub(crate) fn master_of(port: u16, name: &str) -> u16 {
    shard_of(port, slot_of(port, name)).0
}

/// The ports of the master serving `slot` and of its replica (0 if none), as `port`'s node
/// sees them.
pub(crate) fn shard_of(port: u16, slot: u16) -> (u16, u16) {
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
pub(crate) fn name_on(port: u16, master: u16, besides: &str) -> String {
    (0..1000)
        .map(|i| format!("other-{i}"))
        .find(|n| n != besides && shard_of(port, slot_of(port, n)).0 == master)
        .expect("a name on that shard")
}

pub(crate) fn connect_config(cluster: &support::RedisCluster) -> RedisConfig {
    let mut config = RedisConfig::cluster(cluster.urls());
    // Long enough to cover the test's own heartbeats after the failover on a slow machine.
    config.learning_window = Some(Duration::from_secs(10));
    config
}

/// How the shard's master is replaced.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Failover {
    /// `CLUSTER FAILOVER TAKEOVER` on the replica; the old master lives on as its replica.
    Takeover,
    /// The master is killed (SIGKILL); the cluster promotes the replica after the node
    /// timeout. The store's connections to the master fail first.
    Crash,
}

/// With the replica of `master` paused, `grant_lost` runs (its writes reach the master only);
/// then the replica replaces the master (`how`) and is unpaused. Returns once the live nodes
/// see the new master.
pub(crate) async fn fail_over_losing<F: std::future::Future<Output = ()>>(
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
pub(crate) async fn acquire_answered<B: floodgate::LimiterBackend>(
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

pub(crate) fn now() -> AcquireOptions {
    AcquireOptions::new().wait(Duration::ZERO)
}

/// Lets the cluster keep serving the slots it still has after a master with no replica dies
/// (`cluster-require-full-coverage no` on every node); returns the nodes' ports.
pub(crate) fn tolerating_lost_shards(cluster: &support::RedisCluster) -> Vec<u16> {
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    for p in &ports {
        assert_eq!(
            cli(
                *p,
                &["CONFIG", "SET", "cluster-require-full-coverage", "no"]
            ),
            "OK"
        );
    }
    ports
}

/// The first name `prefix-N` whose slot the master on `port` serves (`on`) or does not.
pub(crate) fn name_of_shard(port: u16, prefix: &str, on: bool) -> String {
    (0..1000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|n| (master_of(port, n) == port) == on)
        .expect("a name on the asked side of that shard")
}

/// Kills the node listening on `port` (SIGKILL, no shutdown).
pub(crate) fn kill_node(cluster: &mut support::RedisCluster, port: u16) {
    cluster
        .nodes
        .iter_mut()
        .find(|n| n.port == port)
        .expect("a node on that port")
        .kill();
}
