//! Integration tests of the HTTP server: each test starts the real server on `127.0.0.1:0`
//! (`floodgate_server::server::run`) on a multi-thread runtime, drives it over HTTP with
//! `reqwest` (or a raw `TcpStream`), and shuts it down at the end. A few socket-less tests drive
//! `floodgate_server::server::router` with `tower::ServiceExt::oneshot`.
//!
//! No assertion is about elapsed time; waits are bounded polling loops with generous limits.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use common::{num, Served, PATIENCE, POLL};
use floodgate::{Floodgate, LimiterSpec};
use floodgate_server::server::{self, ServerOptions};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;

const TOKEN: &str = "s3cret-token";

/// A wait long enough that it never ends during a test.
const LONG_WAIT_MS: u64 = 600_000;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// One answer: status, headers, raw text and the JSON body (`Null` when not JSON).
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
    json: Value,
}

impl Reply {
    async fn read(resp: reqwest::Response) -> Reply {
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            text,
            json,
        }
    }

    fn str(&self, key: &str) -> &str {
        self.json
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no string {key:?} in {} {}", self.status, self.text))
    }

    fn u64(&self, key: &str) -> u64 {
        self.json
            .get(key)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("no integer {key:?} in {} {}", self.status, self.text))
    }

    #[track_caller]
    fn assert_ok(&self) -> &Self {
        assert_eq!(self.status, StatusCode::OK, "expected 200, got {self:?}");
        self
    }

    /// Asserts an error answer of the API's shape: the status, a JSON content type, the `error`
    /// code, a non-empty `message` and, when `field` is given, that the message starts with it.
    #[track_caller]
    fn assert_error(&self, status: u16, code: &str, field: Option<&str>) -> &Self {
        assert_eq!(self.status.as_u16(), status, "wrong status: {self:?}");
        let content_type = self
            .headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            content_type.starts_with("application/json"),
            "error body is not JSON (content-type {content_type:?}): {self:?}"
        );
        assert_eq!(
            self.json.get("error").and_then(Value::as_str),
            Some(code),
            "wrong error code: {self:?}"
        );
        let message = self
            .json
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no message: {self:?}"));
        assert!(!message.trim().is_empty(), "empty message: {self:?}");
        if let Some(field) = field {
            assert!(
                message.starts_with(&format!("{field}:")),
                "message does not name the field {field:?}: {message:?}"
            );
        }
        self
    }
}

/// A server on `127.0.0.1:0`, its shutdown trigger and a client.
struct TestServer {
    addr: SocketAddr,
    base: String,
    http: reqwest::Client,
    /// Sent as the bearer token by `request` (the server's own, by default).
    token: Option<String>,
    server: Served,
}

impl TestServer {
    async fn start(options: ServerOptions) -> TestServer {
        TestServer::start_with(Floodgate::in_memory(), options).await
    }

    async fn start_with(gate: Floodgate, options: ServerOptions) -> TestServer {
        let token = options.token.clone();
        let server = Served::start(gate, options).await;
        let addr = server.addr;
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        TestServer {
            addr,
            base: format!("http://{addr}"),
            http,
            token,
            server,
        }
    }

    /// Triggers the shutdown future and checks that `run` returns `Ok`.
    async fn stop(self) {
        self.server.stop().await;
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    /// Sends `body` verbatim as `application/json` (no body when `None`; POST and PUT always
    /// say `application/json`, which the server requires of them).
    async fn raw(&self, method: Method, path: &str, body: Option<&str>) -> Reply {
        let writes = method == Method::POST || method == Method::PUT;
        let mut req = self.request(method, path);
        if writes || body.is_some() {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json");
        }
        if let Some(body) = body {
            req = req.body(body.to_owned());
        }
        Reply::read(req.send().await.unwrap()).await
    }

    async fn call(&self, method: Method, path: &str, body: Value) -> Reply {
        self.raw(method, path, Some(&body.to_string())).await
    }

    async fn get(&self, path: &str) -> Reply {
        self.raw(Method::GET, path, None).await
    }

    /// `PUT /v1/limiters/{name}`, expecting 200.
    async fn put_limiter(&self, name: &str, body: Value) -> Value {
        let reply = self
            .call(Method::PUT, &format!("/v1/limiters/{name}"), body)
            .await;
        reply.assert_ok();
        reply.json
    }

    /// `GET /v1/limiters/{name}`, expecting 200.
    async fn status(&self, name: &str) -> Value {
        let reply = self.get(&format!("/v1/limiters/{name}")).await;
        reply.assert_ok();
        reply.json
    }

    async fn acquire(&self, name: &str, body: Value) -> Reply {
        self.call(Method::POST, &format!("/v1/limiters/{name}/acquire"), body)
            .await
    }

    async fn extend(&self, permit_id: &str, body: Value) -> Reply {
        self.call(
            Method::POST,
            &format!("/v1/permits/{permit_id}/extend"),
            body,
        )
        .await
    }

    async fn release(&self, permit_id: &str) -> Reply {
        self.raw(
            Method::POST,
            &format!("/v1/permits/{permit_id}/release"),
            None,
        )
        .await
    }

    /// Releases, expecting `{"released": true}`.
    async fn release_held(&self, permit_id: &str) {
        let reply = self.release(permit_id).await;
        reply.assert_ok();
        assert_eq!(reply.json, json!({"released": true}), "{reply:?}");
    }

    /// Polls the limiter's status until `pred` holds; fails after [`PATIENCE`].
    async fn wait_until(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let status = self.status(name).await;
            if pred(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gave up waiting for {what}; last status {status}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn metrics(&self) -> String {
        let reply = self.get("/metrics").await;
        reply.assert_ok();
        reply.text
    }
}

/// The value of `floodgate_acquire_total{limiter=name, outcome=outcome}`, if exposed.
fn acquire_total(metrics: &str, limiter: &str, outcome: &str) -> Option<f64> {
    let limiter_label = format!("limiter=\"{limiter}\"");
    let outcome_label = format!("outcome=\"{outcome}\"");
    metrics
        .lines()
        .find(|line| {
            line.starts_with("floodgate_acquire_total{")
                && line.contains(&limiter_label)
                && line.contains(&outcome_label)
        })
        .map(|line| line.split_whitespace().last().unwrap().parse().unwrap())
}

fn options() -> ServerOptions {
    ServerOptions::default()
}

fn options_with_token() -> ServerOptions {
    ServerOptions {
        token: Some(TOKEN.to_owned()),
        ..ServerOptions::default()
    }
}

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
// Disconnects while waiting
// ---------------------------------------------------------------------------------------------

/// After a waiter's connection went away: the queue is empty again, the cancel was counted and
/// exposed as a metric, and once the holder releases nothing is held (the permit did not go to
/// the departed client).
async fn assert_departed_waiter_left_no_trace(srv: &TestServer, name: &str, holder_permit: &str) {
    let status = srv
        .wait_until(name, "the departed waiter to leave the queue", |s| {
            s["waiting"] == 0
        })
        .await;
    assert_eq!(status["waiting_permits"], 0);
    assert_eq!(num(&status, "/counters/cancelled"), 1);
    assert_eq!(status["in_use"], 1);

    srv.release_held(holder_permit).await;
    let status = srv
        .wait_until(name, "in_use back to 0", |s| s["in_use"] == 0)
        .await;
    assert_eq!(status["holders"], 0);
    assert_eq!(num(&status, "/counters/granted"), 1);
    assert_eq!(num(&status, "/counters/released"), 1);

    // The permit is free: a try-once acquire gets it.
    let again = srv.acquire(name, json!({"wait_ms": 0})).await;
    again.assert_ok();
    srv.release_held(again.str("permit_id")).await;

    let metrics = srv.metrics().await;
    let cancelled = acquire_total(&metrics, name, "cancelled");
    assert_eq!(
        cancelled,
        Some(1.0),
        "no floodgate_acquire_total{{outcome=\"cancelled\"}} for {name}:\n{metrics}"
    );
    assert!(
        metrics.contains(&format!("floodgate_waiters{{limiter=\"{name}\"}} 0")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("floodgate_permits_in_use{{limiter=\"{name}\"}} 0")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_reqwest_waiter_leaves_the_queue() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter(
        "busy",
        json!({"concurrency": 1, "lease_ms": 600_000, "max_wait_ms": LONG_WAIT_MS}),
    )
    .await;
    let held = srv.acquire("busy", json!({})).await;
    held.assert_ok();

    let req = srv
        .request(Method::POST, "/v1/limiters/busy/acquire")
        .json(&json!({"wait_ms": LONG_WAIT_MS, "holder": "impatient"}));
    let waiter = tokio::spawn(async move { req.send().await });
    srv.wait_until("busy", "the long poll to queue", |s| s["waiting"] == 1)
        .await;
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());

    assert_departed_waiter_left_no_trace(&srv, "busy", held.str("permit_id")).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_tcp_waiter_leaves_the_queue() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter(
        "busy",
        json!({"concurrency": 1, "lease_ms": 600_000, "max_wait_ms": LONG_WAIT_MS}),
    )
    .await;
    let held = srv.acquire("busy", json!({})).await;
    held.assert_ok();

    let mut stream = TcpStream::connect(srv.addr).await.unwrap();
    let body = json!({"wait_ms": LONG_WAIT_MS}).to_string();
    let request = format!(
        "POST /v1/limiters/busy/acquire HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        srv.addr,
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    srv.wait_until("busy", "the long poll to queue", |s| s["waiting"] == 1)
        .await;
    drop(stream);

    assert_departed_waiter_left_no_trace(&srv, "busy", held.str("permit_id")).await;
    srv.stop().await;
}

/// Waiters disconnect at the moment permits are released, so some grants race the disconnects.
/// A grant the server made just before it noticed the disconnect has no client to release it;
/// the lease bounds it. Nothing may be held once the (short) leases have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnects_racing_grants_leak_nothing_beyond_the_lease() {
    const ROUNDS: usize = 10;
    const WAITERS: usize = 4;
    let srv = TestServer::start(options()).await;
    srv.put_limiter(
        "race",
        json!({"concurrency": 2, "lease_ms": 500, "max_wait_ms": LONG_WAIT_MS}),
    )
    .await;
    for _ in 0..ROUNDS {
        let a = srv.acquire("race", json!({"lease_ms": 60_000})).await;
        a.assert_ok();
        let b = srv.acquire("race", json!({"lease_ms": 60_000})).await;
        b.assert_ok();
        let mut streams = Vec::new();
        for _ in 0..WAITERS {
            let mut stream = TcpStream::connect(srv.addr).await.unwrap();
            let body = json!({"wait_ms": LONG_WAIT_MS}).to_string();
            let request = format!(
                "POST /v1/limiters/race/acquire HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            streams.push(stream);
        }
        srv.wait_until("race", "the waiters to queue", |s| {
            s["waiting"] == WAITERS as u64
        })
        .await;
        // Release and disconnect at the same time.
        let (ra, rb) = (a.str("permit_id").to_owned(), b.str("permit_id").to_owned());
        let release = async {
            srv.release_held(&ra).await;
            srv.release_held(&rb).await;
        };
        let disconnect = async move {
            tokio::task::yield_now().await;
            drop(streams);
        };
        tokio::join!(release, disconnect);
        srv.wait_until("race", "the queue to empty", |s| s["waiting"] == 0)
            .await;
    }
    let status = srv
        .wait_until("race", "every lease to end", |s| {
            s["in_use"] == 0 && s["holders"] == 0
        })
        .await;
    let granted = num(&status, "/counters/granted");
    let released = num(&status, "/counters/released");
    let expired = num(&status, "/counters/expired");
    let cancelled = num(&status, "/counters/cancelled");
    assert_eq!(granted, released + expired, "{status}");
    // Every acquire was either granted or cancelled.
    assert_eq!(
        granted + cancelled,
        (ROUNDS * (2 + WAITERS)) as u64,
        "{status}"
    );
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

// ---------------------------------------------------------------------------------------------
// Authentication and read-only servers
// ---------------------------------------------------------------------------------------------

/// Every `/v1` route, with a body where it takes one.
fn v1_routes() -> Vec<(Method, &'static str, Option<&'static str>)> {
    vec![
        (Method::GET, "/v1/limiters", None),
        (Method::GET, "/v1/limiters/authed", None),
        (
            Method::PUT,
            "/v1/limiters/authed",
            Some(r#"{"concurrency": 5}"#),
        ),
        (Method::DELETE, "/v1/limiters/other", None),
        (
            Method::POST,
            "/v1/limiters/authed/acquire",
            Some(r#"{"wait_ms": 0}"#),
        ),
        (
            Method::POST,
            "/v1/permits/authed.1/extend",
            Some(r#"{"lease_ms": 1000}"#),
        ),
        (Method::POST, "/v1/permits/authed.1/release", None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_on_every_v1_route() {
    let mut srv = TestServer::start(options_with_token()).await;
    srv.put_limiter("authed", json!({"concurrency": 5})).await;
    srv.put_limiter("other", json!({"concurrency": 5})).await;

    let wrong_headers = [
        None,
        Some("Bearer wrong-token".to_owned()),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Basic {TOKEN}")),
        Some(format!("bearer{TOKEN}")),
        Some(TOKEN.to_owned()),
    ];
    srv.token = None;
    for (method, path, body) in v1_routes() {
        for header in &wrong_headers {
            let mut req = srv.request(method.clone(), path);
            if let Some(header) = header {
                req = req.header(reqwest::header::AUTHORIZATION, header);
            }
            if let Some(body) = body {
                req = req.body(body);
            }
            let reply = Reply::read(req.send().await.unwrap()).await;
            reply.assert_error(401, "unauthorized", None);
            assert_eq!(
                reply
                    .headers
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .map(|v| v.to_str().unwrap()),
                Some("Bearer"),
                "{method} {path} with {header:?}: {reply:?}"
            );
        }
    }
    // Nothing was changed by the refused requests.
    srv.token = Some(TOKEN.to_owned());
    let status = srv.status("authed").await;
    assert_eq!(num(&status, "/counters/granted"), 0);
    srv.status("other").await;

    // With the token every route answers (and none with 401).
    for (method, path, body) in v1_routes() {
        let reply = srv.raw(method.clone(), path, body).await;
        assert!(
            reply.status.is_success() || reply.status == StatusCode::GONE,
            "{method} {path} with the token: {reply:?}"
        );
    }

    // /metrics, /healthz and /readyz are open without the token.
    srv.token = None;
    let metrics = srv.get("/metrics").await;
    metrics.assert_ok();
    assert!(metrics.text.contains("floodgate_permits_in_use"));
    let health = srv.get("/healthz").await;
    health.assert_ok();
    assert_eq!(health.text, "ok");
    let ready = srv.get("/readyz").await;
    ready.assert_ok();
    assert_eq!(ready.text, "ready");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_the_token_when_configured() {
    let mut srv = TestServer::start(ServerOptions {
        metrics_require_token: true,
        ..options_with_token()
    })
    .await;
    srv.token = None;
    srv.get("/metrics")
        .await
        .assert_error(401, "unauthorized", None);
    srv.token = Some("nope".to_owned());
    srv.get("/metrics")
        .await
        .assert_error(401, "unauthorized", None);
    srv.get("/healthz").await.assert_ok();
    srv.get("/readyz").await.assert_ok();
    srv.token = Some(TOKEN.to_owned());
    srv.get("/metrics").await.assert_ok();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_server_refuses_writes_with_403() {
    let gate = Floodgate::in_memory();
    gate.define("fixed", LimiterSpec::concurrency(2))
        .await
        .unwrap();
    let srv = TestServer::start_with(
        gate,
        ServerOptions {
            api_writes: false,
            ..options()
        },
    )
    .await;

    srv.call(Method::PUT, "/v1/limiters/fixed", json!({"concurrency": 9}))
        .await
        .assert_error(403, "read_only", None);
    srv.call(Method::PUT, "/v1/limiters/fresh", json!({"concurrency": 9}))
        .await
        .assert_error(403, "read_only", None);
    srv.raw(Method::DELETE, "/v1/limiters/fixed", None)
        .await
        .assert_error(403, "read_only", None);
    srv.raw(Method::DELETE, "/v1/limiters/fresh", None)
        .await
        .assert_error(403, "read_only", None);

    // Nothing changed; reads and permits still work.
    let status = srv.status("fixed").await;
    assert_eq!(status["concurrency"], 2);
    srv.get("/v1/limiters/fresh")
        .await
        .assert_error(404, "unknown_limiter", None);
    let granted = srv.acquire("fixed", json!({})).await;
    granted.assert_ok();
    srv.extend(granted.str("permit_id"), json!({"lease_ms": 1_000}))
        .await
        .assert_ok();
    srv.release_held(granted.str("permit_id")).await;
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Bad input: each class answers 4xx with the JSON error shape and a message naming the field
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter("m", json!({"concurrency": 1})).await;
    for body in [
        "{",
        "not json",
        r#"{"permits": }"#,
        r#"{"permits": 1,}"#,
        "{'permits': 1}",
        "\u{0}",
    ] {
        srv.raw(Method::POST, "/v1/limiters/m/acquire", Some(body))
            .await
            .assert_error(400, "invalid_request", None);
        srv.raw(Method::PUT, "/v1/limiters/m", Some(body))
            .await
            .assert_error(400, "invalid_request", None);
        srv.raw(Method::POST, "/v1/permits/m.1/extend", Some(body))
            .await
            .assert_error(400, "invalid_request", None);
    }
    // A body that is JSON but not an object is a type error of the body itself.
    for body in ["[1, 2]", "42", "\"text\"", "null"] {
        srv.raw(Method::POST, "/v1/limiters/m/acquire", Some(body))
            .await
            .assert_error(400, "invalid_request", Some("body"));
    }
    // Nothing was granted by any of them.
    assert_eq!(srv.status("m").await["in_use"], 0);
    srv.stop().await;
}

/// Syntax errors inside an object leave no field to name (`serde_path_to_error` reports `?`):
/// the message names the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_message_names_the_body() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter("m", json!({"concurrency": 1})).await;
    for body in [
        "{",
        r#"{"permits": 1"#,
        r#"{"permits": 1,}"#,
        "{'permits': 1}",
    ] {
        srv.raw(Method::POST, "/v1/limiters/m/acquire", Some(body))
            .await
            .assert_error(400, "invalid_request", Some("body"));
        // The same syntax errors, with a field PUT knows (else it names the unknown field).
        let put_body = body.replace("permits", "concurrency");
        srv.raw(Method::PUT, "/v1/limiters/m", Some(&put_body))
            .await
            .assert_error(400, "invalid_request", Some("body"));
    }
    // Where the parser knows the field, the message names it.
    srv.raw(
        Method::POST,
        "/v1/limiters/m/acquire",
        Some(r#"{"permits": }"#),
    )
    .await
    .assert_error(400, "invalid_request", Some("permits"));
    srv.stop().await;
}

/// A valid object followed by anything (`{"permits": 1} trailing`, two objects) is refused,
/// not acted on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_with_trailing_garbage_is_400() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter("m", json!({"concurrency": 1})).await;
    for body in [
        r#"{"permits": 1} trailing"#,
        r#"{"wait_ms": 0}{"wait_ms": 0}"#,
    ] {
        srv.raw(Method::POST, "/v1/limiters/m/acquire", Some(body))
            .await
            .assert_error(400, "invalid_request", None);
    }
    srv.raw(
        Method::PUT,
        "/v1/limiters/m",
        Some(r#"{"concurrency": 7} }"#),
    )
    .await
    .assert_error(400, "invalid_request", None);
    let status = srv.status("m").await;
    assert_eq!(status["in_use"], 0, "{status}");
    assert_eq!(status["concurrency"], 1, "{status}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_types_are_400_naming_the_field() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter("t", json!({"concurrency": 2})).await;
    let put_cases = [
        (json!({"concurrency": "ten"}), "concurrency"),
        (json!({"concurrency": 1.5}), "concurrency"),
        (json!({"concurrency": true}), "concurrency"),
        (json!({"concurrency": [1]}), "concurrency"),
        (json!({"concurrency": 5_000_000_000_u64}), "concurrency"),
        (json!({"lease_ms": "1s"}), "lease_ms"),
        (json!({"max_wait_ms": {}}), "max_wait_ms"),
        (json!({"max_queue": -5}), "max_queue"),
    ];
    for (body, field) in put_cases {
        srv.call(Method::PUT, "/v1/limiters/t", body)
            .await
            .assert_error(400, "invalid_request", Some(field));
    }
    let acquire_cases = [
        (json!({"permits": "1"}), "permits"),
        (json!({"permits": -1}), "permits"),
        (json!({"lease_ms": 1.5}), "lease_ms"),
        (json!({"lease_ms": -1}), "lease_ms"),
        (json!({"wait_ms": "soon"}), "wait_ms"),
        (json!({"wait_ms": -1}), "wait_ms"),
        (json!({"holder": 5}), "holder"),
        (json!({"holder": {"name": "x"}}), "holder"),
    ];
    for (body, field) in acquire_cases {
        srv.acquire("t", body)
            .await
            .assert_error(400, "invalid_request", Some(field));
    }
    srv.extend("t.1", json!({"lease_ms": "long"}))
        .await
        .assert_error(400, "invalid_request", Some("lease_ms"));
    let status = srv.status("t").await;
    assert_eq!(status["concurrency"], 2);
    assert_eq!(status["in_use"], 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_limiter_fields_are_400_naming_the_field() {
    let srv = TestServer::start(options()).await;
    let day_ms: u64 = 24 * 3600 * 1000;
    let cases = [
        (json!({"concurrency": -1}), "concurrency"),
        (json!({"concurrency": 0}), "concurrency"),
        (json!({"concurrency": 1_000_001}), "concurrency"),
        (json!({"concurrency": 1, "lease_ms": 0}), "lease_ms"),
        (
            json!({"concurrency": 1, "lease_ms": day_ms + 1}),
            "lease_ms",
        ),
        (json!({"concurrency": 1, "lease_ms": u64::MAX}), "lease_ms"),
        (
            json!({"concurrency": 1, "max_wait_ms": 3_600_001}),
            "max_wait_ms",
        ),
        (
            json!({"concurrency": 1, "max_queue": 1_000_001}),
            "max_queue",
        ),
        // Creating needs a concurrency.
        (json!({}), "concurrency"),
        (json!({"lease_ms": 1_000}), "concurrency"),
        (json!({"concurrency": null}), "concurrency"),
    ];
    for (body, field) in &cases {
        srv.call(Method::PUT, "/v1/limiters/r", body.clone())
            .await
            .assert_error(400, "invalid_request", Some(field));
    }
    srv.raw(Method::PUT, "/v1/limiters/r", None)
        .await
        .assert_error(400, "invalid_request", Some("concurrency"));
    // None of them created it.
    srv.get("/v1/limiters/r")
        .await
        .assert_error(404, "unknown_limiter", None);

    // Nor do they change an existing limiter.
    srv.put_limiter("r", json!({"concurrency": 3, "lease_ms": 1_000}))
        .await;
    for (body, field) in cases.iter().take(8) {
        srv.call(Method::PUT, "/v1/limiters/r", body.clone())
            .await
            .assert_error(400, "invalid_request", Some(field));
    }
    // The edges of the ranges are accepted.
    let edge = srv
        .put_limiter(
            "r",
            json!({"concurrency": 1_000_000, "lease_ms": day_ms, "max_wait_ms": 3_600_000, "max_queue": 0}),
        )
        .await;
    assert_eq!(edge["lease_ms"], day_ms);
    srv.put_limiter("r", json!({"lease_ms": 1})).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_permit_fields_are_400_naming_the_field() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter("lim", json!({"concurrency": 10, "lease_ms": 60_000}))
        .await;
    let day_ms: u64 = 24 * 3600 * 1000;

    srv.acquire("lim", json!({"lease_ms": 0}))
        .await
        .assert_error(400, "invalid_request", Some("lease_ms"));
    srv.acquire("lim", json!({"lease_ms": day_ms + 1}))
        .await
        .assert_error(400, "invalid_request", Some("lease_ms"));
    srv.acquire("lim", json!({"lease_ms": u64::MAX}))
        .await
        .assert_error(400, "invalid_request", Some("lease_ms"));
    srv.acquire("lim", json!({"permits": 0}))
        .await
        .assert_error(400, "invalid_request", Some("permits"));
    srv.acquire("lim", json!({"permits": 11}))
        .await
        .assert_error(400, "permits_exceed_limit", Some("permits"));
    srv.acquire("lim", json!({"permits": u32::MAX}))
        .await
        .assert_error(400, "permits_exceed_limit", Some("permits"));
    srv.acquire("lim", json!({"holder": "h".repeat(257)}))
        .await
        .assert_error(400, "invalid_request", Some("holder"));
    srv.acquire("lim", json!({"holder": "é".repeat(257)}))
        .await
        .assert_error(400, "invalid_request", Some("holder"));
    srv.acquire("lim", json!({"holder": "x".repeat(10_000)}))
        .await
        .assert_error(400, "invalid_request", Some("holder"));

    // None of them took anything; the edges are accepted.
    assert_eq!(srv.status("lim").await["in_use"], 0);
    let edge = srv
        .acquire(
            "lim",
            json!({"permits": 10, "lease_ms": day_ms, "holder": "é".repeat(256), "wait_ms": u64::MAX}),
        )
        .await;
    edge.assert_ok();
    let permit = edge.str("permit_id").to_owned();

    srv.extend(&permit, json!({"lease_ms": 0}))
        .await
        .assert_error(400, "invalid_request", Some("lease_ms"));
    srv.extend(&permit, json!({"lease_ms": day_ms + 1}))
        .await
        .assert_error(400, "invalid_request", Some("lease_ms"));
    srv.extend(&permit, json!({"lease_ms": 1_000}))
        .await
        .assert_ok();
    srv.release_held(&permit).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_400_naming_the_field() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter("u", json!({"concurrency": 1})).await;
    srv.call(
        Method::PUT,
        "/v1/limiters/u",
        json!({"concurrency": 2, "lease": 5}),
    )
    .await
    .assert_error(400, "invalid_request", Some("lease"));
    srv.call(Method::PUT, "/v1/limiters/new", json!({"concurency": 2}))
        .await
        .assert_error(400, "invalid_request", Some("concurency"));
    srv.acquire("u", json!({"wait": 5}))
        .await
        .assert_error(400, "invalid_request", Some("wait"));
    srv.acquire("u", json!({"permits": 1, "priority": "high"}))
        .await
        .assert_error(400, "invalid_request", Some("priority"));
    srv.extend("u.1", json!({"lease_ms": 5, "extra": true}))
        .await
        .assert_error(400, "invalid_request", Some("extra"));
    let status = srv.status("u").await;
    assert_eq!(status["concurrency"], 1);
    assert_eq!(status["in_use"], 0);
    srv.get("/v1/limiters/new")
        .await
        .assert_error(404, "unknown_limiter", None);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_limiter_names_are_400_naming_the_field() {
    let srv = TestServer::start(options()).await;
    let too_long = "n".repeat(129);
    let bad_names = [
        too_long.as_str(),
        "a%20b",     // a space
        "%20",       // only a space
        "caf%C3%A9", // unicode
        "%E2%9C%93", // unicode
        "a%2Fb",     // an encoded slash
        "a*b",
        "a%00b",        // NUL
        "with%22quote", // a quote
    ];
    for name in bad_names {
        let put = srv
            .call(
                Method::PUT,
                &format!("/v1/limiters/{name}"),
                json!({"concurrency": 1}),
            )
            .await;
        put.assert_error(400, "invalid_request", Some("name"));
        srv.get(&format!("/v1/limiters/{name}")).await.assert_error(
            400,
            "invalid_request",
            Some("name"),
        );
        srv.raw(Method::DELETE, &format!("/v1/limiters/{name}"), None)
            .await
            .assert_error(400, "invalid_request", Some("name"));
        srv.acquire(name, json!({}))
            .await
            .assert_error(400, "invalid_request", Some("name"));
    }
    // Nothing was created.
    let list = srv.get("/v1/limiters").await;
    list.assert_ok();
    assert_eq!(list.json, json!({"limiters": []}));

    // The longest name and every allowed character are fine.
    let longest = "n".repeat(128);
    srv.put_limiter(&longest, json!({"concurrency": 1})).await;
    srv.put_limiter("Az09_-.:", json!({"concurrency": 1})).await;
    let granted = srv.acquire("Az09_-.:", json!({})).await;
    granted.assert_ok();
    assert_eq!(
        granted.str("permit_id"),
        format!("Az09_-.:.{}", granted.u64("fencing_token"))
    );
    srv.release_held(granted.str("permit_id")).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_permit_ids_are_400_naming_the_field() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter("pid", json!({"concurrency": 1})).await;
    let long = format!("{}.1", "n".repeat(129));
    for id in [
        "nodot",
        "pid.",
        ".5",
        "pid.abc",
        "pid.-5",
        "pid.+5",
        "pid.1.5e3",
        "pid.99999999999999999999",
        "p%20d.1",
        "caf%C3%A9.1",
        long.as_str(),
    ] {
        srv.extend(id, json!({"lease_ms": 1_000}))
            .await
            .assert_error(400, "invalid_request", Some("permit_id"));
        srv.release(id)
            .await
            .assert_error(400, "invalid_request", Some("permit_id"));
    }
    // Well-formed ids that are not held: extend is 410, release answers false.
    for id in ["pid.12345", "nolimiter.1"] {
        srv.extend(id, json!({}))
            .await
            .assert_error(410, "permit_lost", None);
        let released = srv.release(id).await;
        released.assert_ok();
        assert_eq!(released.json, json!({"released": false}));
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413() {
    let srv = TestServer::start(ServerOptions {
        max_body_bytes: 1024,
        ..options()
    })
    .await;
    srv.put_limiter("big", json!({"concurrency": 1})).await;
    let padding = " ".repeat(4096);
    let body = format!(r#"{{"concurrency": 2}}{padding}"#);
    srv.raw(Method::PUT, "/v1/limiters/big", Some(&body))
        .await
        .assert_error(413, "payload_too_large", None);
    let body = json!({"holder": "h".repeat(4096)}).to_string();
    srv.raw(Method::POST, "/v1/limiters/big/acquire", Some(&body))
        .await
        .assert_error(413, "payload_too_large", None);
    srv.raw(Method::POST, "/v1/permits/big.1/extend", Some(&body))
        .await
        .assert_error(413, "payload_too_large", None);
    let status = srv.status("big").await;
    assert_eq!(status["concurrency"], 1);
    assert_eq!(status["in_use"], 0);
    // Just under the limit is fine.
    let body = format!(r#"{{"concurrency": 2}}{}"#, " ".repeat(900));
    srv.raw(Method::PUT, "/v1/limiters/big", Some(&body))
        .await
        .assert_ok();
    srv.stop().await;
}

/// Sends one raw HTTP/1.1 request (which should say `Connection: close`) and returns the status
/// code and the body of the answer.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("no answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_chunked_body_is_413() {
    let srv = TestServer::start(ServerOptions {
        max_body_bytes: 1024,
        ..options()
    })
    .await;
    srv.put_limiter("big", json!({"concurrency": 1})).await;
    // No Content-Length: the limit must hold while the body streams in.
    let chunk = format!("{{\"holder\": \"{}\"}}", "h".repeat(3000));
    let request = format!(
        "POST /v1/limiters/big/acquire HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let (status, body) = raw_exchange(srv.addr, request.as_bytes()).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("\"payload_too_large\""), "{body}");
    assert_eq!(srv.status("big").await["in_use"], 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_limiter_is_404() {
    let srv = TestServer::start(options()).await;
    srv.get("/v1/limiters/ghost")
        .await
        .assert_error(404, "unknown_limiter", None);
    srv.acquire("ghost", json!({}))
        .await
        .assert_error(404, "unknown_limiter", None);
    srv.raw(Method::DELETE, "/v1/limiters/ghost", None)
        .await
        .assert_error(404, "unknown_limiter", None);
    let reply = srv.get("/v1/limiters/ghost").await;
    assert!(reply.str("message").contains("ghost"), "{reply:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_limiter_answers_its_waiters_404() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter(
        "doomed",
        json!({"concurrency": 1, "lease_ms": 600_000, "max_wait_ms": LONG_WAIT_MS}),
    )
    .await;
    let held = srv.acquire("doomed", json!({})).await;
    held.assert_ok();
    let req = srv
        .request(Method::POST, "/v1/limiters/doomed/acquire")
        .json(&json!({"wait_ms": LONG_WAIT_MS}));
    let waiter = tokio::spawn(async move { Reply::read(req.send().await.unwrap()).await });
    srv.wait_until("doomed", "the waiter to queue", |s| s["waiting"] == 1)
        .await;
    srv.raw(Method::DELETE, "/v1/limiters/doomed", None)
        .await
        .assert_ok();
    tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("the waiter was not answered when its limiter was deleted")
        .unwrap()
        .assert_error(404, "unknown_limiter", None);
    // Its permits are no longer held.
    srv.extend(held.str("permit_id"), json!({}))
        .await
        .assert_error(410, "permit_lost", None);
    let released = srv.release(held.str("permit_id")).await;
    released.assert_ok();
    assert_eq!(released.json, json!({"released": false}));
    // Series follow the limiters that exist: a deleted limiter has none left.
    let metrics = srv.metrics().await;
    assert_eq!(
        acquire_total(&metrics, "doomed", "granted"),
        None,
        "{metrics}"
    );
    assert!(!metrics.contains(r#"limiter="doomed""#), "{metrics}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_route_is_404_json() {
    let srv = TestServer::start(options()).await;
    // `/` is the dashboard (tests/dashboard.rs).
    for (method, path) in [
        (Method::GET, "/dashboard/nope"),
        (Method::GET, "/nope"),
        (Method::GET, "/v1"),
        (Method::GET, "/v1/nope"),
        (Method::GET, "/v2/limiters"),
        (Method::POST, "/v1/limiters/x/nope"),
        (Method::GET, "/v1/permits/x.1"),
        (Method::POST, "/v1/limiters/x/acquire/more"),
    ] {
        srv.raw(method, path, None)
            .await
            .assert_error(404, "not_found", None);
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_is_405_json() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter("x", json!({"concurrency": 1})).await;
    for (method, path) in [
        (Method::POST, "/healthz"),
        (Method::DELETE, "/readyz"),
        (Method::POST, "/metrics"),
        (Method::DELETE, "/v1/limiters"),
        (Method::POST, "/v1/limiters"),
        (Method::PATCH, "/v1/limiters/x"),
        (Method::POST, "/v1/limiters/x"),
        (Method::GET, "/v1/limiters/x/acquire"),
        (Method::PUT, "/v1/limiters/x/acquire"),
        (Method::GET, "/v1/permits/x.1/extend"),
        (Method::GET, "/v1/permits/x.1/release"),
        (Method::DELETE, "/v1/permits/x.1/release"),
    ] {
        let reply = srv.raw(method.clone(), path, None).await;
        assert_eq!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {reply:?}"
        );
        reply.assert_error(405, "method_not_allowed", None);
    }
    assert_eq!(srv.status("x").await["concurrency"], 1);
    srv.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_held_acquires_503_and_run_returns() {
    let srv = TestServer::start(options()).await;
    srv.put_limiter(
        "s",
        json!({"concurrency": 1, "lease_ms": 600_000, "max_wait_ms": LONG_WAIT_MS}),
    )
    .await;
    let held = srv.acquire("s", json!({})).await;
    held.assert_ok();

    let mut waiters = Vec::new();
    for _ in 0..2 {
        let req = srv
            .request(Method::POST, "/v1/limiters/s/acquire")
            .json(&json!({"wait_ms": LONG_WAIT_MS}));
        waiters.push(tokio::spawn(async move {
            Reply::read(req.send().await.unwrap()).await
        }));
    }
    srv.wait_until("s", "the long polls to queue", |s| s["waiting"] == 2)
        .await;

    // Triggers the shutdown future; `stop` also checks that `run` returns Ok.
    let addr = srv.addr;
    srv.stop().await;
    for waiter in waiters {
        let reply = tokio::time::timeout(PATIENCE, waiter)
            .await
            .expect("a held acquire was not answered at shutdown")
            .unwrap();
        reply.assert_error(503, "shutting_down", None);
    }
    // The listener is closed.
    assert!(TcpStream::connect(addr).await.is_err());
}

// ---------------------------------------------------------------------------------------------
// Socket-less handler tests: `router` + `oneshot`
// ---------------------------------------------------------------------------------------------

async fn oneshot(app: &axum::Router, method: &str, path: &str, body: Option<Value>) -> Reply2 {
    let mut req = axum::http::Request::builder().method(method).uri(path);
    if method == "POST" || method == "PUT" {
        req = req.header("content-type", "application/json");
    }
    let body = match body {
        Some(v) => Body::from(v.to_string()),
        None => Body::empty(),
    };
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply2 {
        status,
        content_type,
        text,
        json,
    }
}

/// An answer from the router, without a socket.
#[derive(Debug)]
struct Reply2 {
    status: u16,
    content_type: Option<String>,
    text: String,
    json: Value,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_health_checks() {
    let (app, shutting_down) = server::router(Floodgate::in_memory(), options());
    let health = oneshot(&app, "GET", "/healthz", None).await;
    assert_eq!((health.status, health.text.as_str()), (200, "ok"));
    let ready = oneshot(&app, "GET", "/readyz", None).await;
    assert_eq!((ready.status, ready.text.as_str()), (200, "ready"));
    shutting_down.send(true).unwrap();
    let ready = oneshot(&app, "GET", "/readyz", None).await;
    assert_eq!(ready.status, 503, "{ready:?}");
    assert_eq!(ready.json["error"], "shutting_down");
    // Health stays green while draining.
    assert_eq!(oneshot(&app, "GET", "/healthz", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_unknown_route_is_404_json() {
    let (app, _tx) = server::router(Floodgate::in_memory(), options());
    let reply = oneshot(&app, "GET", "/no/such/route", None).await;
    assert_eq!(reply.status, 404, "{reply:?}");
    assert!(reply
        .content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("application/json")));
    assert_eq!(reply.json["error"], "not_found");
    assert!(reply.json["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_put_then_get() {
    let (app, _tx) = server::router(Floodgate::in_memory(), options());
    let put = oneshot(
        &app,
        "PUT",
        "/v1/limiters/db",
        Some(json!({"concurrency": 7, "max_queue": 3})),
    )
    .await;
    assert_eq!(put.status, 200, "{put:?}");
    let got = oneshot(&app, "GET", "/v1/limiters/db", None).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.json["name"], "db");
    assert_eq!(got.json["concurrency"], 7);
    assert_eq!(got.json["max_queue"], 3);
    assert_eq!(got.json["in_use"], 0);
    assert_eq!(got.json, put.json);
    let list = oneshot(&app, "GET", "/v1/limiters", None).await;
    assert_eq!(list.json["limiters"][0], got.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_token_and_bad_input() {
    let (app, _tx) = server::router(Floodgate::in_memory(), options_with_token());
    let denied = oneshot(&app, "GET", "/v1/limiters", None).await;
    assert_eq!(denied.status, 401);
    assert_eq!(denied.json["error"], "unauthorized");
    let req = axum::http::Request::builder()
        .method("PUT")
        .uri("/v1/limiters/x")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Body::from(r#"{"concurrency": 0}"#))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["error"], "invalid_request");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .starts_with("concurrency:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_held_acquire_answers_503_when_shutdown_starts() {
    let gate = Floodgate::in_memory();
    gate.define("h", LimiterSpec::concurrency(1)).await.unwrap();
    let (app, shutting_down) = server::router(gate.clone(), options());
    let first = oneshot(&app, "POST", "/v1/limiters/h/acquire", None).await;
    assert_eq!(first.status, 200, "{first:?}");

    let app2 = app.clone();
    let held = tokio::spawn(async move {
        oneshot(
            &app2,
            "POST",
            "/v1/limiters/h/acquire",
            Some(json!({"wait_ms": 60_000})),
        )
        .await
    });
    let limiter = gate.limiter("h").await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while limiter.status().await.unwrap().waiting != 1 {
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(POLL).await;
    }
    shutting_down.send(true).unwrap();
    let reply = tokio::time::timeout(PATIENCE, held).await.unwrap().unwrap();
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(reply.json["error"], "shutting_down");
    // The waiter left the queue; new acquires are refused at once.
    assert_eq!(limiter.status().await.unwrap().waiting, 0);
    let late = oneshot(&app, "POST", "/v1/limiters/h/acquire", None).await;
    assert_eq!(late.status, 503, "{late:?}");
    let metrics = oneshot(&app, "GET", "/metrics", None).await;
    assert_eq!(
        acquire_total(&metrics.text, "h", "shutting_down"),
        Some(2.0),
        "{}",
        metrics.text
    );
}
