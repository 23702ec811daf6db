//! The dashboard on the Redis store: two servers share one real `redis-server`; what clients
//! hold through one server shows on the other's dashboard (overview, history, holders with
//! their labels), because every server samples the fleet-wide state. Waits are bounded.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use common::{Served, PATIENCE, POLL};
use floodgate::{Floodgate, RedisConfig, RedisStore};
use floodgate_server::server::ServerOptions;
use serde_json::{json, Value};
use support::RedisServer;

async fn server(redis: &RedisServer) -> Served {
    let store = RedisStore::connect(RedisConfig::new(redis.url()))
        .await
        .unwrap();
    Served::start(Floodgate::with_store(store), ServerOptions::default()).await
}

async fn get(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_shows_the_fleet_wide_state() {
    let redis = RedisServer::start();
    let a = server(&redis).await;
    let b = server(&redis).await;
    let (base_a, base_b) = (format!("http://{}", a.addr), format!("http://{}", b.addr));
    let http = reqwest::Client::new();
    let put = http
        .put(format!("{base_a}/v1/limiters/shared"))
        .json(&json!({"concurrency": 4, "max_wait_ms": 60000}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    for label in ["from-a-1", "from-a-2"] {
        let resp = http
            .post(format!("{base_a}/v1/limiters/shared/acquire"))
            .json(&json!({"holder": label, "lease_ms": 60000}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // Server B never saw these acquires; its sampler reads them from Redis.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let overview = get(&http, format!("{base_b}/dashboard/api/overview")).await;
        let row = overview["limiters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "shared")
            .cloned();
        if row.as_ref().is_some_and(|r| r["in_use"] == 2) {
            assert_eq!(overview["store"], "ok");
            assert_eq!(row.unwrap()["limit"], 4);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never showed A's holders: {overview}"
        );
        tokio::time::sleep(POLL).await;
    }
    let page = get(&http, format!("{base_b}/dashboard/api/limiters/shared")).await;
    let mut labels: Vec<&str> = page["holders"]["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["label"].as_str().unwrap())
        .collect();
    labels.sort();
    assert_eq!(labels, ["from-a-1", "from-a-2"]);
    let samples = page["history"]["samples"].as_array().unwrap();
    assert_eq!(samples.last().unwrap()["in_use"], 2, "{page}");
    let listed = get(
        &http,
        format!("{base_b}/v1/limiters/shared/holders?limit=1"),
    )
    .await;
    assert_eq!(listed["total_holders"], 2);
    assert_eq!(listed["truncated"], true);
    a.stop().await;
    b.stop().await;
}
