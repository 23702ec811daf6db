//! Two servers on Redis Cluster: limiters in different slots, cross-server wake-ups.

use std::process::Command;

use floodgate::RedisConfig;
use reqwest::Method;
use serde_json::json;

use crate::common::num;
use crate::harness::{answered, blocking, InProcServer, LONG_WAIT_MS};
use crate::support::RedisCluster;

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli");
    assert!(out.status.success(), "redis-cli {args:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_on_redis_cluster_share_limiters_across_slots() {
    let cluster = blocking(RedisCluster::start);
    let a = InProcServer::start(RedisConfig::cluster(cluster.urls()), false).await;
    let b = InProcServer::start(RedisConfig::cluster(cluster.urls()), false).await;
    let servers = [a.http.clone(), b.http.clone()];
    let port = cluster.nodes[0].port;

    let names = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];
    let slots: Vec<u64> = names
        .iter()
        .map(|n| {
            blocking(|| redis_cli(port, &["cluster", "keyslot", &format!("{{{n}}}")]))
                .parse()
                .unwrap()
        })
        .collect();
    let mut distinct = slots.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() >= 2, "all limiters in one slot: {slots:?}");

    for (i, name) in names.iter().enumerate() {
        servers[i % 2]
            .put_limiter(
                name,
                json!({"concurrency": 1, "lease_ms": 30_000, "max_wait_ms": LONG_WAIT_MS}),
            )
            .await;
    }
    // The limiters' keys really are spread over several masters.
    let holding: Vec<u16> = cluster
        .nodes
        .iter()
        .filter(|n| {
            !blocking(|| redis_cli(n.port, &["--scan", "--pattern", "fg:{*}:meta"])).is_empty()
        })
        .map(|n| n.port)
        .collect();
    assert!(
        holding.len() >= 2,
        "the limiters' keys are all on one node ({holding:?}); slots {slots:?}"
    );

    for name in names {
        // Acquire on one server, release on the other, both ways round.
        for (on, off) in [(0, 1), (1, 0)] {
            let reply = servers[on].acquire(name, json!({"wait_ms": 0})).await;
            reply.assert_ok();
            let refused = servers[off].acquire(name, json!({"wait_ms": 0})).await;
            assert_eq!(
                refused.status, 429,
                "{name}: limit 1 not shared: {refused:?}"
            );
            servers[off].release_held(reply.str("/permit_id")).await;
        }

        // A long poll on A woken by a release on B.
        let held = servers[1].acquire(name, json!({"wait_ms": 0})).await;
        held.assert_ok();
        let waiter = {
            let a = servers[0].clone();
            tokio::spawn(async move { a.try_acquire(name, json!({"wait_ms": LONG_WAIT_MS})).await })
        };
        servers[1]
            .wait_until(name, "the waiter on A to queue", |s| {
                num(s, "/waiting") == 1
            })
            .await;
        servers[1].release_held(held.str("/permit_id")).await;
        let granted = answered(waiter, &format!("{name}: the long poll on A")).await;
        granted.assert_ok();
        assert!(
            granted.u64("/fencing_token") > held.u64("/fencing_token"),
            "{name}: {granted:?} after {held:?}"
        );
        servers[1].release_held(granted.str("/permit_id")).await;

        let status = servers[0]
            .wait_until(name, "nothing held", |s| num(s, "/in_use") == 0)
            .await;
        // Two grants in the first loop, the held one and the waiter's; the two try-once
        // acquires refused while it was held count as timed out.
        assert_eq!(num(&status, "/counters/granted"), 4, "{name}: {status}");
        assert_eq!(num(&status, "/counters/released"), 4, "{name}: {status}");
        assert_eq!(num(&status, "/counters/timed_out"), 2, "{name}: {status}");
    }
    let list = servers[1].must(Method::GET, "/v1/limiters", None).await;
    list.assert_ok();
    let listed: Vec<&str> = list.json["limiters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, names, "{list:?}");

    a.stop().await;
    b.stop().await;
}
