//! Acquire, extend and release over HTTP; waits that end; full queues; resizing.

use common::{num, PATIENCE};
use reqwest::Method;
use serde_json::json;

use super::common;
use super::harness::*;

// ---------------------------------------------------------------------------------------------
// Acquire, extend, release
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_extend_release_round_trip() {
    let srv = TestServer::start(options()).await;
    let created = srv
        .put_limiter("jobs", json!({"concurrency": 2, "lease_ms": 60_000}))
        .await;
    assert_eq!(created["name"], "jobs");
    assert_eq!(created["concurrency"], 2);
    assert_eq!(created["lease_ms"], 60_000);
    assert_eq!(created["in_use"], 0);

    let granted = srv
        .acquire("jobs", json!({"holder": "worker-1", "lease_ms": 5_000}))
        .await;
    granted.assert_ok();
    let permit = granted.str("permit_id").to_owned();
    let token = granted.u64("fencing_token");
    assert_eq!(permit, format!("jobs.{token}"));
    assert_eq!(granted.u64("permits"), 1);
    assert_eq!(granted.u64("lease_ms"), 5_000);
    granted.u64("waited_ms");

    let status = srv.status("jobs").await;
    assert_eq!(status["in_use"], 1);
    assert_eq!(status["holders"], 1);
    assert_eq!(status["waiting"], 0);

    let extended = srv.extend(&permit, json!({"lease_ms": 10_000})).await;
    extended.assert_ok();
    assert_eq!(extended.str("permit_id"), permit);
    assert_eq!(extended.u64("fencing_token"), token);
    assert_eq!(extended.u64("lease_ms"), 10_000);
    // No body: the limiter's default lease.
    let extended = srv
        .raw(Method::POST, &format!("/v1/permits/{permit}/extend"), None)
        .await;
    extended.assert_ok();
    assert_eq!(extended.u64("lease_ms"), 60_000);

    srv.release_held(&permit).await;
    // Idempotent: the second release finds nothing held.
    let again = srv.release(&permit).await;
    again.assert_ok();
    assert_eq!(again.json, json!({"released": false}));
    // A released permit is never revived.
    srv.extend(&permit, json!({"lease_ms": 10_000}))
        .await
        .assert_error(410, "permit_lost", None);

    // Several permits in one grant; tokens strictly increase.
    let two = srv.acquire("jobs", json!({"permits": 2})).await;
    two.assert_ok();
    assert_eq!(two.u64("permits"), 2);
    assert!(two.u64("fencing_token") > token);
    let status = srv.status("jobs").await;
    assert_eq!(status["in_use"], 2);
    assert_eq!(status["holders"], 1);
    srv.release_held(two.str("permit_id")).await;

    let status = srv.status("jobs").await;
    assert_eq!(status["in_use"], 0);
    assert_eq!(num(&status, "/counters/granted"), 2);
    assert_eq!(num(&status, "/counters/released"), 2);
    assert_eq!(num(&status, "/counters/extend_lost"), 1);

    let list = srv.get("/v1/limiters").await;
    list.assert_ok();
    let names: Vec<&str> = list.json["limiters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["jobs"]);

    let metrics = srv.metrics().await;
    assert_eq!(acquire_total(&metrics, "jobs", "granted"), Some(2.0));
    assert!(
        metrics.contains("floodgate_permits_limit{limiter=\"jobs\"} 2"),
        "{metrics}"
    );

    let deleted = srv.raw(Method::DELETE, "/v1/limiters/jobs", None).await;
    deleted.assert_ok();
    assert_eq!(deleted.json, json!({"deleted": true}));
    srv.get("/v1/limiters/jobs")
        .await
        .assert_error(404, "unknown_limiter", None);
    srv.raw(Method::DELETE, "/v1/limiters/jobs", None)
        .await
        .assert_error(404, "unknown_limiter", None);

    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_changes_only_the_fields_given() {
    let srv = TestServer::start(options()).await;
    let created = srv.put_limiter("p", json!({"concurrency": 3})).await;
    // Defaults for a new limiter.
    assert_eq!(created["lease_ms"], 300_000);
    assert_eq!(created["max_wait_ms"], 60_000);
    assert_eq!(created["max_queue"], 10_000);
    let changed = srv
        .put_limiter("p", json!({"lease_ms": 1_000, "max_queue": 5}))
        .await;
    assert_eq!(changed["concurrency"], 3);
    assert_eq!(changed["lease_ms"], 1_000);
    assert_eq!(changed["max_wait_ms"], 60_000);
    assert_eq!(changed["max_queue"], 5);
    // An empty body changes nothing on an existing limiter.
    let reply = srv.raw(Method::PUT, "/v1/limiters/p", None).await;
    reply.assert_ok();
    assert_eq!(reply.json["concurrency"], 3);
    assert_eq!(reply.json["lease_ms"], 1_000);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_timeout_is_429_with_retry_after() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter("one", json!({"concurrency": 1, "lease_ms": 60_000}))
        .await;
    let held = srv.acquire("one", json!({})).await;
    held.assert_ok();

    for wait_ms in [0, 200] {
        let refused = srv.acquire("one", json!({"wait_ms": wait_ms})).await;
        refused.assert_error(429, "wait_timeout", None);
        let retry_after = refused
            .headers
            .get(reqwest::header::RETRY_AFTER)
            .unwrap_or_else(|| panic!("no Retry-After header: {refused:?}"))
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("Retry-After is not whole seconds: {refused:?}"));
        assert!(retry_after >= 1, "{refused:?}");
        let retry_after_ms = refused.u64("retry_after_ms");
        assert!(retry_after_ms > 0, "{refused:?}");
        // The header is the body's hint rounded up to whole seconds.
        assert_eq!(retry_after, retry_after_ms.div_ceil(1000).max(1));
    }

    let status = srv.status("one").await;
    assert_eq!(status["waiting"], 0);
    assert_eq!(status["in_use"], 1);
    assert_eq!(num(&status, "/counters/timed_out"), 2);
    let metrics = srv.metrics().await;
    assert_eq!(acquire_total(&metrics, "one", "wait_timeout"), Some(2.0));

    srv.release_held(held.str("permit_id")).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_429_queue_full_with_retry_after() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter(
        "q",
        json!({"concurrency": 1, "lease_ms": 60_000, "max_queue": 1, "max_wait_ms": LONG_WAIT_MS}),
    )
    .await;
    let held = srv.acquire("q", json!({})).await;
    held.assert_ok();

    // One waiter fills the queue.
    let req = srv
        .request(Method::POST, "/v1/limiters/q/acquire")
        .json(&json!({"wait_ms": LONG_WAIT_MS}));
    let waiter = tokio::spawn(async move { Reply::read(req.send().await.unwrap()).await });
    srv.wait_until("q", "one waiter", |s| s["waiting"] == 1)
        .await;

    let refused = srv.acquire("q", json!({"wait_ms": 1_000})).await;
    refused.assert_error(429, "queue_full", None);
    assert!(refused.headers.contains_key(reqwest::header::RETRY_AFTER));
    assert!(refused.u64("retry_after_ms") > 0);
    assert_eq!(num(&srv.status("q").await, "/counters/queue_full"), 1);

    // The release hands the permit to the queued waiter.
    srv.release_held(held.str("permit_id")).await;
    let granted = tokio::time::timeout(PATIENCE, waiter)
        .await
        .unwrap()
        .unwrap();
    granted.assert_ok();
    srv.release_held(granted.str("permit_id")).await;
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Resize
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_limit_wakes_waiters_at_once() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter(
        "grow",
        json!({"concurrency": 1, "lease_ms": 600_000, "max_wait_ms": LONG_WAIT_MS}),
    )
    .await;
    let held = srv.acquire("grow", json!({})).await;
    held.assert_ok();

    let mut waiters = Vec::new();
    for i in 0..3 {
        let req = srv
            .request(Method::POST, "/v1/limiters/grow/acquire")
            .json(&json!({"wait_ms": LONG_WAIT_MS, "holder": format!("w{i}")}));
        waiters.push(tokio::spawn(async move {
            Reply::read(req.send().await.unwrap()).await
        }));
    }
    srv.wait_until("grow", "three waiters", |s| s["waiting"] == 3)
        .await;

    // The PUT's own answer already shows the waiters granted.
    let resized = srv.put_limiter("grow", json!({"concurrency": 4})).await;
    assert_eq!(resized["concurrency"], 4);
    assert_eq!(resized["in_use"], 4, "{resized}");
    assert_eq!(resized["waiting"], 0, "{resized}");
    assert_eq!(resized["lease_ms"], 600_000);

    // Their long polls answer without any wait or lease ending (their waits are 10 minutes).
    for waiter in waiters {
        let granted = tokio::time::timeout(PATIENCE, waiter)
            .await
            .expect("a waiter was not woken by the resize")
            .unwrap();
        granted.assert_ok();
        srv.release_held(granted.str("permit_id")).await;
    }

    // Lowering the limit lets the holder keep its permit and grants nothing above the new limit.
    let lowered = srv.put_limiter("grow", json!({"concurrency": 1})).await;
    assert_eq!(lowered["in_use"], 1);
    srv.acquire("grow", json!({"wait_ms": 0}))
        .await
        .assert_error(429, "wait_timeout", None);
    srv.release_held(held.str("permit_id")).await;
    let status = srv.status("grow").await;
    assert_eq!(status["in_use"], 0);
    assert_eq!(num(&status, "/counters/granted"), 4);
    assert_eq!(num(&status, "/counters/released"), 4);
    srv.stop().await;
}
