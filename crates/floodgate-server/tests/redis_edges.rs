//! Issue 12 items 7, 8 and 11 on the Redis store: the real server (in this process) on a real
//! `redis-server` (a child process on a free loopback port).
//!
//! - After Redis restarts, the first request of each kind is answered (no 503 `broken pipe`),
//!   and `/readyz` does not flap.
//! - `--max-limiters` is enforced on the Redis store.
//! - `/readyz` costs one round trip whatever the number of limiters (one `INFO memory`, which
//!   also reads the memory policy; counted with Redis's own `INFO commandstats`), and a
//!   listing of many limiters is answered.
//! - Acquires on names that are not limiters create no metric series.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use common::Srv;
use floodgate::{Floodgate, RedisConfig, RedisStore};
use floodgate_server::server::ServerOptions;
use serde_json::json;
use support::RedisServer;

impl Srv {
    async fn start(redis: &RedisServer, max_limiters: Option<usize>) -> Srv {
        let mut config = RedisConfig::new(redis.url());
        config.max_limiters = max_limiters;
        let store = RedisStore::connect(config).await.unwrap();
        Srv::serve(Floodgate::with_store(store), ServerOptions::default()).await
    }
}

/// Calls of `cmd` Redis has run so far (`INFO commandstats`).
fn calls(redis: &RedisServer, cmd: &str) -> u64 {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "INFO", "commandstats"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_requests_after_a_redis_restart_are_answered() {
    let mut redis = RedisServer::start();
    let srv = Srv::start(&redis, None).await;
    let put = srv
        .send(
            reqwest::Method::PUT,
            "/v1/limiters/r",
            Some(json!({"concurrency": 2})),
        )
        .await;
    assert_eq!(put.0, 200, "{put:?}");
    assert_eq!(srv.send(reqwest::Method::GET, "/readyz", None).await.0, 200);
    // Redis restarts (empty: no persistence); the server's connection is now dead.
    redis.restart();
    // The first request of each kind after it: answered, not 503.
    let ready = srv.send(reqwest::Method::GET, "/readyz", None).await;
    assert_eq!(ready.0, 200, "{ready:?}");
    let put = srv
        .send(
            reqwest::Method::PUT,
            "/v1/limiters/r",
            Some(json!({"concurrency": 2})),
        )
        .await;
    assert_eq!(put.0, 200, "{put:?}");
    let acquire = srv
        .send(
            reqwest::Method::POST,
            "/v1/limiters/r/acquire",
            Some(json!({"wait_ms": 0})),
        )
        .await;
    // Answered, not 503: Redis lost the limiter, so the store revived it in a learning window
    // (docs/learning.md) and a try-once acquire is told when to come back.
    assert_eq!(acquire.0, 429, "{acquire:?}");
    assert_eq!(acquire.1["error"], "wait_timeout", "{acquire:?}");
    let status = srv.send(reqwest::Method::GET, "/v1/limiters/r", None).await;
    assert_eq!(status.1["learning"], true, "{status:?}");
    // And readiness stays put.
    for _ in 0..20 {
        assert_eq!(srv.send(reqwest::Method::GET, "/readyz", None).await.0, 200);
    }
    srv.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_limiters_is_enforced_on_redis() {
    let redis = RedisServer::start();
    let srv = Srv::start(&redis, Some(3)).await;
    for i in 0..3 {
        let (status, v) = srv
            .send(
                reqwest::Method::PUT,
                &format!("/v1/limiters/m{i}"),
                Some(json!({"concurrency": 1})),
            )
            .await;
        assert_eq!(status, 200, "{v}");
    }
    let (status, v) = srv
        .send(
            reqwest::Method::PUT,
            "/v1/limiters/m3",
            Some(json!({"concurrency": 1})),
        )
        .await;
    assert_eq!(
        (status, &v["error"]),
        (409, &json!("too_many_limiters")),
        "{v}"
    );
    // Changing one that exists is fine at the cap; deleting one makes room.
    let (status, _) = srv
        .send(
            reqwest::Method::PUT,
            "/v1/limiters/m0",
            Some(json!({"concurrency": 5})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = srv
        .send(reqwest::Method::DELETE, "/v1/limiters/m1", None)
        .await;
    assert_eq!(status, 200);
    let (status, v) = srv
        .send(
            reqwest::Method::PUT,
            "/v1/limiters/m3",
            Some(json!({"concurrency": 1})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    srv.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_one_round_trip_and_listing_is_batched() {
    const LIMITERS: usize = 2_000;
    let redis = RedisServer::start();
    let srv = Srv::start(&redis, None).await;
    for i in 0..LIMITERS {
        let (status, v) = srv
            .send(
                reqwest::Method::PUT,
                &format!("/v1/limiters/many-{i:05}"),
                Some(json!({"concurrency": 1})),
            )
            .await;
        assert_eq!(status, 200, "{v}");
    }
    // One `INFO` (it reads the memory policy too), no script (before: one status script per
    // limiter). The dashboard's sampler reads every limiter's status once a second on its own
    // (batched), so a window it falls into holds its scripts too; on a loaded machine its
    // passes can fill every window; the store's own read of the memory policy (one `INFO`
    // every 5 s) may fall into one too. So: each check is one `INFO` (two with that read; the
    // count leaves out the reads of the count itself, which `INFO commandstats` are), and
    // in the quietest window the scripts are far fewer than one per limiter (the old check's
    // count, on top of whatever the sampler ran).
    let mut windows = Vec::new();
    for _ in 0..5 {
        let (evals, infos) = (
            calls(&redis, "evalsha") + calls(&redis, "eval"),
            calls(&redis, "info"),
        );
        assert_eq!(srv.send(reqwest::Method::GET, "/readyz", None).await.0, 200);
        let window = (
            // Less one: the `INFO commandstats` that reads the count is counted in it.
            calls(&redis, "info") - infos - 1,
            calls(&redis, "evalsha") + calls(&redis, "eval") - evals,
        );
        windows.push(window);
        if window == (1, 0) {
            break;
        }
    }
    assert!(
        windows.iter().all(|w| (1..=2).contains(&w.0)),
        "(INFOs, scripts) per readiness check: {windows:?}"
    );
    let quietest = windows.iter().map(|w| w.1).min().unwrap_or(u64::MAX);
    assert!(
        quietest < LIMITERS as u64,
        "scripts in the quietest readiness window: {quietest} (INFOs, scripts): {windows:?}"
    );
    let (status, list) = srv.send(reqwest::Method::GET, "/v1/limiters", None).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list["limiters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), LIMITERS);
    assert!(names.windows(2).all(|w| w[0] < w[1]), "not in name order");
    srv.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_create_no_series_on_redis() {
    let redis = RedisServer::start();
    let srv = Srv::start(&redis, None).await;
    for i in 0..300 {
        let (status, v) = srv
            .send(
                reqwest::Method::POST,
                &format!("/v1/limiters/bogus-{i}/acquire"),
                Some(json!({"wait_ms": 0})),
            )
            .await;
        assert_eq!((status, &v["error"]), (404, &json!("unknown_limiter")));
    }
    let (status, metrics) = srv.send(reqwest::Method::GET, "/metrics", None).await;
    assert_eq!(status, 200);
    let text = metrics.as_str().unwrap_or_default();
    assert!(!text.contains("bogus-"), "{text}");
    srv.served.stop().await;
}
