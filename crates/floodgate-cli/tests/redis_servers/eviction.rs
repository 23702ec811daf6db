//! A Redis that may evict keys (`maxmemory` set with a policy other than `noeviction`) is
//! refused: `floodgate serve` exits 2 at start naming the policy and the fix, and a policy
//! changed to an evicting one at run time makes operations and `/readyz` answer 503 until it
//! is changed back. A Redis that cannot evict (`noeviction`, or no `maxmemory`) is served.
//! (Evicting one key of a limiter, its `holders` hash, lets it grant its whole limit again
//! beside the holders: `docs/redis.md`, "Failure behaviour".)

use std::io::Read;
use std::process::{Command, Stdio};

use floodgate::RedisConfig;
use reqwest::Method;
use serde_json::json;
use tokio::time::Instant;

use crate::common::{PATIENCE, POLL};
use crate::harness::{blocking, spawn_serve, ChildGuard, Http, InProcServer, Reply};
use crate::support::{cli, free_port, RedisServer};

/// `maxmemory` for these tests: set, and far above what they use.
const MAXMEMORY: &str = "100mb";

/// A Redis on a free port with this `maxmemory` and `maxmemory-policy`.
fn redis_with(maxmemory: &str, policy: &str) -> RedisServer {
    RedisServer::start_on_a_free_port(&["--maxmemory", maxmemory, "--maxmemory-policy", policy])
}

/// A 503 `store_unavailable` whose message names `policy` and the fix.
#[track_caller]
fn assert_refused_for(reply: &Reply, policy: &str, what: &str) {
    assert!(reply.is_store_unavailable(), "{what}: {reply:?}");
    let message = reply.str("/message");
    assert!(
        message.contains(&format!("maxmemory-policy {policy}"))
            && message.contains("`maxmemory-policy noeviction`")
            && message.contains("`maxmemory 0`"),
        "{what}: the message names neither the policy nor the fix: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_exits_2_at_start_on_a_redis_that_evicts_keys() {
    for policy in ["allkeys-lru", "volatile-lru", "volatile-ttl"] {
        let redis = blocking(|| redis_with(MAXMEMORY, policy));
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_floodgate"));
        cmd.args(["serve", "--redis", &redis.url(), "--listen", &addr]);
        let mut serve = ChildGuard::spawn(cmd_with_stderr(cmd), false, "floodgate serve");
        let http = Http::new(format!("http://{addr}"));
        // It must exit; a server that answers `/readyz` instead serves on this Redis.
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = serve.child.try_wait().unwrap() {
                break status;
            }
            if let Ok(reply) = http.send(Method::GET, "/readyz", None).await {
                panic!("{policy}: floodgate serve runs on it and answers /readyz {reply:?}");
            }
            assert!(
                Instant::now() < deadline,
                "{policy}: serve neither exited nor served"
            );
            tokio::time::sleep(POLL).await;
        };
        let mut stderr = String::new();
        serve
            .child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(status.code(), Some(2), "{policy}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("floodgate: ")
                && last.contains(&format!("maxmemory-policy {policy}"))
                && last.contains("`maxmemory-policy noeviction`")
                && last.contains("`maxmemory 0`"),
            "{policy}: the message names neither the policy nor the fix: {stderr}"
        );
    }
}

/// `cmd` with its stderr piped (`ChildGuard::spawn` leaves it inherited).
fn cmd_with_stderr(mut cmd: Command) -> Command {
    cmd.stderr(Stdio::piped());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_evicting_policy_set_at_run_time_is_refused_until_it_is_undone() {
    let redis = blocking(|| redis_with(MAXMEMORY, "noeviction"));
    let srv = InProcServer::start(RedisConfig::new(redis.url()), false).await;
    let http = srv.http.clone();
    http.put_limiter("evict", json!({"concurrency": 2, "max_wait_ms": 1_000}))
        .await;
    let held = http.acquire("evict", json!({"wait_ms": 0})).await;
    held.assert_ok();
    let permit = held.str("/permit_id").to_owned();

    // Noticed by the readiness probe, which reads the policy.
    let config_set = |policy: &str| cli(redis.port, &["CONFIG", "SET", "maxmemory-policy", policy]);
    assert_eq!(blocking(|| config_set("allkeys-lru")), "OK");
    let ready = http.must(Method::GET, "/readyz", None).await;
    assert_refused_for(&ready, "allkeys-lru", "/readyz");
    let acquire = http.acquire("evict", json!({"wait_ms": 0})).await;
    assert_refused_for(&acquire, "allkeys-lru", "an acquire");
    let extend = http
        .must(
            Method::POST,
            &format!("/v1/permits/{permit}/extend"),
            Some(json!({"permits": 1})),
        )
        .await;
    assert_refused_for(&extend, "allkeys-lru", "an extend");
    let status = http.must(Method::GET, "/v1/limiters/evict", None).await;
    assert_refused_for(&status, "allkeys-lru", "a status");
    let holders = http
        .must(Method::GET, "/v1/limiters/evict/holders", None)
        .await;
    assert_refused_for(&holders, "allkeys-lru", "the holders");
    let put = http
        .must(
            Method::PUT,
            "/v1/limiters/other",
            Some(json!({"concurrency": 1})),
        )
        .await;
    assert_refused_for(&put, "allkeys-lru", "a new limiter");

    // Undone: served again, the permit still held.
    assert_eq!(blocking(|| config_set("noeviction")), "OK");
    http.must(Method::GET, "/readyz", None).await.assert_ok();
    let status = http.status("evict").await;
    assert_eq!(status["in_use"], 1, "{status}");
    let second = http.acquire("evict", json!({"wait_ms": 0})).await;
    second.assert_ok();
    http.release_held(second.str("/permit_id")).await;

    // Noticed by the store's own periodic read, with nothing probing readiness.
    assert_eq!(blocking(|| config_set("volatile-ttl")), "OK");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let reply = http.must(Method::GET, "/v1/limiters/evict", None).await;
        if reply.status == 503 {
            assert_refused_for(&reply, "volatile-ttl", "a status once read");
            break;
        }
        reply.assert_ok();
        assert!(Instant::now() < deadline, "volatile-ttl never noticed");
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(blocking(|| config_set("noeviction")), "OK");
    http.must(Method::GET, "/readyz", None).await.assert_ok();

    // Noticed by the master check a script missing on Redis starts (`SCRIPT FLUSH` here; a
    // restart or a failover in production), before the call runs.
    assert_eq!(blocking(|| config_set("volatile-lru")), "OK");
    assert_eq!(blocking(|| cli(redis.port, &["SCRIPT", "FLUSH"])), "OK");
    let acquire = http.acquire("evict", json!({"wait_ms": 0})).await;
    assert_refused_for(&acquire, "volatile-lru", "an acquire after SCRIPT FLUSH");
    assert_eq!(blocking(|| config_set("noeviction")), "OK");
    http.must(Method::GET, "/readyz", None).await.assert_ok();
    http.release_held(&permit).await;
    let status = http.status("evict").await;
    assert_eq!(status["in_use"], 0, "{status}");
    srv.stop().await;
}

/// `noeviction` with `maxmemory` set, and no `maxmemory` whatever the policy, cannot evict:
/// served. (Guards against a guard that refuses too much.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_that_cannot_evict_is_served() {
    for (maxmemory, policy) in [
        (MAXMEMORY, "noeviction"),
        ("0", "allkeys-lru"),
        ("0", "volatile-lru"),
        ("0", "volatile-ttl"),
    ] {
        let redis = blocking(|| redis_with(maxmemory, policy));
        let (_serve, http) = spawn_serve(&redis.url()).await;
        http.put_limiter("served", json!({"concurrency": 1})).await;
        let reply = http.acquire("served", json!({"wait_ms": 0})).await;
        assert_eq!(
            reply.status, 200,
            "maxmemory {maxmemory}, {policy}: {reply:?}"
        );
        http.release_held(reply.str("/permit_id")).await;
        http.must(Method::GET, "/readyz", None).await.assert_ok();
    }
}

/// Under `fail_open` an evicting Redis is still refused (503), not granted without accounting
/// as an outage is: Redis answers and keeps the limit, so fail-open grants there would only
/// drop it (here 3 permits out at a limit of 1, where the evicting Redis held 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_open_does_not_grant_past_an_evicting_redis() {
    let redis = blocking(|| redis_with(MAXMEMORY, "noeviction"));
    let srv = InProcServer::start(RedisConfig::new(redis.url()), true).await;
    let http = srv.http.clone();
    http.put_limiter("open", json!({"concurrency": 1})).await;
    let held = http.acquire("open", json!({"wait_ms": 0})).await;
    held.assert_ok();

    let config_set = |policy: &str| cli(redis.port, &["CONFIG", "SET", "maxmemory-policy", policy]);
    assert_eq!(blocking(|| config_set("allkeys-lru")), "OK");
    // `/readyz` reads the policy (the refusal is then in force for every operation).
    let ready = http.must(Method::GET, "/readyz", None).await;
    assert_refused_for(&ready, "allkeys-lru", "/readyz");
    for _ in 0..2 {
        let acquire = http.acquire("open", json!({"wait_ms": 0})).await;
        assert_refused_for(&acquire, "allkeys-lru", "a fail-open acquire");
    }

    assert_eq!(blocking(|| config_set("noeviction")), "OK");
    http.must(Method::GET, "/readyz", None).await.assert_ok();
    http.release_held(held.str("/permit_id")).await;
    srv.stop().await;
}
