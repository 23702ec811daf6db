//! The dashboard on the Redis store: two servers share one real `redis-server`; what clients
//! hold through one server shows on the other's dashboard (overview, history, holders with
//! their labels), because every server samples the fleet-wide state. Waits are bounded.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use common::{get_json, send_json, Served, PATIENCE, POLL};
use floodgate::{Floodgate, RedisConfig, RedisStore};
use floodgate_server::server::ServerOptions;
use reqwest::Method;
use serde_json::json;
use support::RedisServer;

async fn server(redis: &RedisServer) -> Served {
    let store = RedisStore::connect(RedisConfig::new(redis.url()))
        .await
        .unwrap();
    Served::start(Floodgate::with_store(store), ServerOptions::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_shows_the_fleet_wide_state() {
    let redis = RedisServer::start();
    let a = server(&redis).await;
    let b = server(&redis).await;
    let (base_a, base_b) = (format!("http://{}", a.addr), format!("http://{}", b.addr));
    let http = common::client();
    let spec = json!({"concurrency": 4, "max_wait_ms": 60000});
    let url = format!("{base_a}/v1/limiters/shared");
    assert_eq!(send_json(&http, Method::PUT, url, spec).await.0, 200);
    for label in ["from-a-1", "from-a-2"] {
        let url = format!("{base_a}/v1/limiters/shared/acquire");
        let body = json!({"holder": label, "lease_ms": 60000});
        assert_eq!(send_json(&http, Method::POST, url, body).await.0, 200);
    }
    // Server B never saw these acquires; its sampler reads them from Redis.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let overview = get_json(&http, format!("{base_b}/dashboard/api/overview")).await;
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
    let page = get_json(&http, format!("{base_b}/dashboard/api/limiters/shared")).await;
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
    let listed = get_json(
        &http,
        format!("{base_b}/v1/limiters/shared/holders?limit=1"),
    )
    .await;
    assert_eq!(listed["total_holders"], 2);
    assert_eq!(listed["truncated"], true);
    a.stop().await;
    b.stop().await;
}
