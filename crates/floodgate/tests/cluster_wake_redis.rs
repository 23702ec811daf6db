//! A Redis Cluster store's wake-up subscription survives the loss of the node it was on.
//!
//! The store subscribes to its wake-up channel on one node (classic `PUBLISH` reaches
//! subscribers on every node of a cluster): its first seed. That node, a master, is killed
//! (SIGKILL), its shard fails over to its replica and the cluster is ok again. Then a queued
//! acquire of that store must be woken when another store (another process, so the wake-up goes
//! over pub/sub, not in a release's reply) releases; and a waiter queued before the loss must
//! still be queued (another node took over at once), and be woken the same way. Once with all
//! nodes as seeds, once with the doomed node as the only seed (the others learned from the
//! cluster). Each acquire's own wait is far longer than the test's liveness bound, so its own
//! timer (which would find the recorded grant too) cannot be what answers it: only a wake-up, or
//! the re-check after the subscription came back, can. No assertion depends on timing; waits are
//! liveness bounds only.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/cluster_shard.rs"]
mod cluster_shard;
mod support;
use cluster_shard::{kill_node, name_of_shard, wait_until};

use std::time::{Duration, Instant};

use floodgate::{AcquireError, AcquireOptions, Floodgate, LimiterSpec, RedisConfig, RedisStore};
use support::cli;

/// The acquire's own wait: longer than the liveness bound below, so that only a wake-up (or a
/// re-check after the subscription came back) can answer it within that bound.
const OWN_WAIT: Duration = Duration::from_secs(600);
/// Liveness bound on the wake-up.
const LIVENESS: Duration = Duration::from_secs(30);

/// Retries `f` while the store answers `store_unavailable` (it fails closed while its
/// connection finds the cluster's new layout), within a liveness bound.
async fn answered<T, F, Fut>(what: &str, f: F) -> Result<T, AcquireError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, AcquireError>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f().await {
            Err(AcquireError::Store(e)) if Instant::now() < deadline => {
                eprintln!("{what}: {e} (retried)");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Waits for a queued acquire's answer within the liveness bound; it must be a grant.
async fn granted<B: floodgate::LimiterBackend>(
    what: &str,
    queued: tokio::task::JoinHandle<Result<floodgate::Permit<B>, AcquireError>>,
) {
    match tokio::time::timeout(LIVENESS, queued).await {
        Ok(Ok(Ok(permit))) => {
            // Right after a node's death the cluster connection may fail a request while it
            // refreshes its map: the release may then answer unavailable (the permit is held
            // until its lease ends), never that the permit was lost.
            match permit.release().await {
                Ok(released) => assert!(released, "released"),
                Err(e) => eprintln!("{what}: release answered {e:?} while the cluster settles"),
            }
        }
        Ok(Ok(Err(e))) => panic!("{what}: answered {e:?}, not granted"),
        Ok(Err(e)) => panic!("{what}: the acquire's task failed: {e}"),
        Err(_) => panic!(
            "{what}: no wake-up reached it within {LIVENESS:?} of its grant (its own wait is \
             {OWN_WAIT:?}): the subscription did not leave the dead node"
        ),
    }
}

/// `only_the_doomed_seed`: the store under test is given the doomed node alone as its seed,
/// so the node to move to must come from the cluster (`CLUSTER SLOTS`), not from its seeds.
async fn node_loss_round(only_the_doomed_seed: bool) {
    let mut cluster = support::RedisCluster::start_with_replicas(1);
    // The node to die: a master, named first among the seeds of the store under test, which
    // subscribes there.
    let doomed = cluster
        .nodes
        .iter()
        .map(|n| n.port)
        .find(|p| cli(*p, &["ROLE"]).lines().next() == Some("master"))
        .expect("a master");
    let mut urls: Vec<String> = vec![cluster.node(doomed).url()];
    if !only_the_doomed_seed {
        urls.extend(
            cluster
                .nodes
                .iter()
                .filter(|n| n.port != doomed)
                .map(support::RedisServer::url),
        );
    }
    let waiter = Floodgate::with_store(
        RedisStore::connect(RedisConfig::cluster(urls))
            .await
            .expect("connect"),
    );
    // The other process: seeded with the nodes that live, in reverse, so it is not on the
    // doomed node either way.
    let mut other_urls: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|n| n.port != doomed)
        .map(support::RedisServer::url)
        .collect();
    other_urls.reverse();
    let releaser = Floodgate::with_store(
        RedisStore::connect(RedisConfig::cluster(other_urls))
            .await
            .expect("connect"),
    );
    let spec = LimiterSpec::concurrency(1).with_default_lease(Duration::from_secs(120));
    releaser
        .define("woken", spec.clone())
        .await
        .expect("define");

    // Before the loss: a waiter of the store under test queued on a limiter whose shard lives
    // on. When its subscription's node dies, another node takes over at once, so it stays
    // queued (not answered `store_unavailable`) and is granted later.
    let survivor = name_of_shard(doomed, "early", false);
    releaser.define(&survivor, spec).await.expect("define");
    let early_held_on = releaser.limiter(&survivor).await.expect("limiter");
    let early_holder = early_held_on
        .acquire(AcquireOptions::new().wait(Duration::ZERO))
        .await
        .expect("the only permit");
    let early_on = waiter.limiter(&survivor).await.expect("limiter");
    let early =
        tokio::spawn(async move { early_on.acquire(AcquireOptions::new().wait(OWN_WAIT)).await });
    support::until_status(&early_held_on, "the early acquire never queued", |s| {
        s.waiting == 1
    })
    .await;
    // The node dies; its replica takes over its slots.
    tokio::task::block_in_place(|| {
        kill_node(&mut cluster, doomed);
        let live: Vec<u16> = cluster
            .nodes
            .iter()
            .map(|n| n.port)
            .filter(|p| *p != doomed)
            .collect();
        wait_until("the cluster never became ok without the node", || {
            live.iter().all(|p| {
                let info = cli(*p, &["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok")
                    && cli(*p, &["CLUSTER", "NODES"])
                        .lines()
                        .filter(|l| l.contains("master") && !l.contains("fail"))
                        .count()
                        == 3
            })
        });
    });

    // The other process takes the only permit (retried while its connection finds the new
    // layout, if the limiter's shard was the one that failed over).
    let held_on = releaser.limiter("woken").await.expect("limiter");
    let holder = answered("the holder's acquire", || {
        held_on.acquire(AcquireOptions::new().wait(Duration::ZERO))
    })
    .await
    .expect("the only permit");

    // The store under test queues for it. Its own acquire is retried while it answers
    // unavailable (its connection may still be finding the new layout), within a bound.
    let queued_on = waiter.limiter("woken").await.expect("limiter");
    let queued = tokio::spawn(async move {
        answered("the queued acquire", || {
            queued_on.acquire(AcquireOptions::new().wait(OWN_WAIT))
        })
        .await
    });
    support::until_status(&held_on, "the acquire never queued", |s| s.waiting == 1).await;

    // Another process releases: the grant goes to the queued acquire over pub/sub.
    assert!(holder.release().await.expect("release"), "released");
    granted("the acquire queued after the loss", queued).await;
    let status = held_on.status().await.expect("status");
    assert_eq!((status.in_use, status.waiting), (0, 0), "{status:?}");

    // The waiter queued before the loss is still queued, and woken too.
    assert!(early_holder.release().await.expect("release"), "released");
    granted("the acquire queued before the loss", early).await;
    let status = early_held_on.status().await.expect("status");
    assert_eq!((status.in_use, status.waiting), (0, 0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_acquires_are_woken_after_the_subscribed_node_died() {
    node_loss_round(false).await;
}

/// The dead node was the only seed: the subscription finds the others from the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_acquires_are_woken_after_the_only_seed_died() {
    node_loss_round(true).await;
}
