//! Two servers on one Redis share one limit and wake each other.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use floodgate::RedisConfig;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::common::{num, SplitMix64, PATIENCE};
use crate::harness::{answered, blocking, InProcServer, LONG_WAIT_MS, SEED};
use crate::support::RedisServer;

const CLIENTS: usize = 40;
const LIMIT: i64 = 5;

/// What one client does.
#[derive(Debug, Clone, Copy)]
struct Plan {
    start_ms: u64,
    acquire_on: usize,
    hold_ms: u64,
    release_on: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_on_one_redis_share_one_limit_and_wake_each_other() {
    let redis = blocking(RedisServer::start);
    let a = InProcServer::start(RedisConfig::new(redis.url()), false).await;
    let b = InProcServer::start(RedisConfig::new(redis.url()), false).await;
    let servers = [a.http.clone(), b.http.clone()];

    servers[0]
        .put_limiter(
            "shared",
            json!({"concurrency": LIMIT, "lease_ms": 30_000, "max_wait_ms": LONG_WAIT_MS}),
        )
        .await;
    // B sees the limiter A created: the state is in Redis.
    assert_eq!(num(&servers[1].status("shared").await, "/concurrency"), 5);

    let mut rng = SplitMix64(SEED);
    let plans: Vec<Plan> = (0..CLIENTS)
        .map(|i| Plan {
            start_ms: rng.between(0, 20),
            acquire_on: i % 2,
            hold_ms: rng.between(5, 30),
            release_on: usize::from(rng.between(0, 1) == 1),
        })
        .collect();
    assert!(
        plans.iter().any(|p| p.acquire_on != p.release_on),
        "the seed never releases through the other server"
    );

    let witness = Arc::new(AtomicI64::new(0));
    let max_seen = Arc::new(AtomicI64::new(0));
    let tasks: Vec<JoinHandle<u64>> = plans
        .iter()
        .enumerate()
        .map(|(i, plan)| {
            let plan = *plan;
            let servers = servers.clone();
            let witness = Arc::clone(&witness);
            let max_seen = Arc::clone(&max_seen);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(plan.start_ms)).await;
                let reply = servers[plan.acquire_on]
                    .acquire(
                        "shared",
                        json!({"wait_ms": LONG_WAIT_MS, "holder": format!("client-{i}")}),
                    )
                    .await;
                reply.assert_ok();
                let now = witness.fetch_add(1, Ordering::SeqCst) + 1;
                max_seen.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(plan.hold_ms)).await;
                witness.fetch_sub(1, Ordering::SeqCst);
                servers[plan.release_on]
                    .release_held(reply.str("/permit_id"))
                    .await;
                reply.u64("/fencing_token")
            })
        })
        .collect();
    let mut tokens = Vec::with_capacity(CLIENTS);
    for (i, task) in tasks.into_iter().enumerate() {
        let token = tokio::time::timeout(PATIENCE, task)
            .await
            .unwrap_or_else(|_| panic!("client {i} never finished (seed {SEED:#x})"))
            .unwrap_or_else(|e| panic!("client {i} failed (seed {SEED:#x}): {e}"));
        tokens.push(token);
    }
    let max = max_seen.load(Ordering::SeqCst);
    assert!(
        max <= LIMIT,
        "{max} clients held a permit at once across the two servers; the limit is {LIMIT} \
         (seed {SEED:#x})"
    );
    assert!(max >= 1);
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(
        tokens.len(),
        CLIENTS,
        "a fencing token was handed out twice"
    );

    let status = servers[1]
        .wait_until("shared", "everything released", |s| {
            num(s, "/in_use") == 0 && num(s, "/holders") == 0 && num(s, "/waiting") == 0
        })
        .await;
    assert_eq!(
        num(&status, "/counters/granted"),
        CLIENTS as u64,
        "{status}"
    );
    assert_eq!(
        num(&status, "/counters/released"),
        CLIENTS as u64,
        "{status}"
    );
    assert_eq!(num(&status, "/counters/expired"), 0, "{status}");

    // A release on B wakes a long poll held by A.
    servers[0]
        .put_limiter(
            "handoff",
            json!({"concurrency": 1, "lease_ms": 30_000, "max_wait_ms": LONG_WAIT_MS}),
        )
        .await;
    let held = servers[1].acquire("handoff", json!({"wait_ms": 0})).await;
    held.assert_ok();
    let waiter = {
        let a = servers[0].clone();
        tokio::spawn(async move {
            a.try_acquire("handoff", json!({"wait_ms": LONG_WAIT_MS}))
                .await
        })
    };
    servers[1]
        .wait_until("handoff", "the waiter on A to queue", |s| {
            num(s, "/waiting") == 1
        })
        .await;
    servers[1].release_held(held.str("/permit_id")).await;
    let granted = answered(waiter, "the long poll on A").await;
    granted.assert_ok();
    assert!(
        granted.u64("/fencing_token") > held.u64("/fencing_token"),
        "{granted:?} after {held:?}"
    );
    servers[0].release_held(granted.str("/permit_id")).await;
    let status = servers[0]
        .wait_until("handoff", "nothing held", |s| num(s, "/in_use") == 0)
        .await;
    assert_eq!(num(&status, "/counters/granted"), 2, "{status}");

    a.stop().await;
    b.stop().await;
}
