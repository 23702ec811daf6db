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
//! - While Redis is out of memory under `noeviction` (it refuses writes), `/readyz` answers 503
//!   naming it, acquires 503 `store_unavailable` with Redis's `OOM` text (granted without
//!   accounting under `fail_open`), releases still run; once memory is freed both answer 200.

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

/// `INFO memory`'s `used_memory` of the server on `port`.
fn used_memory(port: u16) -> u64 {
    let info = support::cli(port, &["INFO", "memory"]);
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no used_memory in {info}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_503_while_redis_refuses_writes_for_memory() {
    // Filler keys: 2 MB, so that deleting them brings Redis well under the limit set below.
    const FILL: &str =
        "for i = 1, 200 do redis.call('SET', 'fill:' .. i, string.rep('x', 10000)) end";
    const UNFILL: &str = "for i = 1, 200 do redis.call('DEL', 'fill:' .. i) end";
    let redis = RedisServer::start();
    let srv = Srv::start(&redis, None).await;
    let fail_open = {
        let store = RedisStore::connect(RedisConfig::new(redis.url()))
            .await
            .unwrap();
        let options = ServerOptions {
            fail_open: true,
            ..ServerOptions::default()
        };
        Srv::serve(Floodgate::with_store(store), options).await
    };
    let (status, v) = srv
        .put("/v1/limiters/full", json!({"concurrency": 5}))
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, held) = srv
        .post("/v1/limiters/full/acquire", json!({"wait_ms": 0}))
        .await;
    assert_eq!(status, 200, "{held}");
    assert_eq!(srv.get("/readyz").await.0, 200);

    // Full: used memory 1 MB over `maxmemory`, under the default `noeviction`.
    support::cli(redis.port, &["EVAL", FILL, "0"]);
    let limit = used_memory(redis.port) - 1_000_000;
    let set = support::cli(
        redis.port,
        &["CONFIG", "SET", "maxmemory", &limit.to_string()],
    );
    assert_eq!(set, "OK");
    let refused = support::cli(redis.port, &["SET", "other", "client"]);
    assert!(refused.starts_with("OOM"), "Redis takes writes: {refused}");

    let (status, ready) = srv.get("/readyz").await;
    assert_eq!(status, 503, "/readyz while Redis refuses writes: {ready}");
    assert_eq!(ready["error"], "store_unavailable", "{ready}");
    let message = ready["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("out of memory") && message.contains("maxmemory"),
        "{ready}"
    );
    let (status, acquire) = srv
        .post("/v1/limiters/full/acquire", json!({"wait_ms": 0}))
        .await;
    assert_eq!(status, 503, "{acquire}");
    assert_eq!(acquire["error"], "store_unavailable", "{acquire}");
    assert!(
        acquire["message"]
            .as_str()
            .unwrap_or_default()
            .contains("OOM"),
        "{acquire}"
    );
    // `fail_open` grants what Redis cannot record, as when it cannot be reached.
    let (status, open) = fail_open
        .post("/v1/limiters/full/acquire", json!({"wait_ms": 0}))
        .await;
    assert_eq!((status, &open["fencing_token"]), (200, &json!(0)), "{open}");
    assert_eq!(fail_open.get("/readyz").await.0, 503);
    // A release still runs (it frees memory).
    let permit = held["permit_id"].as_str().unwrap();
    let (status, released) = srv
        .post(&format!("/v1/permits/{permit}/release"), json!({}))
        .await;
    assert_eq!(
        (status, &released["released"]),
        (200, &json!(true)),
        "{released}"
    );

    // Memory freed: ready again at the next probe, and acquires are served.
    support::cli(redis.port, &["EVAL", UNFILL, "0"]);
    let (status, ready) = srv.get("/readyz").await;
    assert_eq!(status, 200, "/readyz once memory was freed: {ready}");
    let (status, acquire) = srv
        .post("/v1/limiters/full/acquire", json!({"wait_ms": 0}))
        .await;
    assert_eq!(status, 200, "{acquire}");
    fail_open.served.stop().await;
    srv.served.stop().await;
}
