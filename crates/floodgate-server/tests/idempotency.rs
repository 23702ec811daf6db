//! Idempotent acquire over HTTP (issue 10): a client whose connection drops after it sent an
//! acquire retries with the same `request_id` and ends with exactly one permit, whether the
//! first attempt was granted at once or was waiting in the queue; on the embedded store and on a
//! real `redis-server`.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use std::time::Duration;

use common::{get_json, num, send_json, Served, Srv, PATIENCE, POLL};
use floodgate::{Floodgate, RedisConfig, RedisStore, Store};
use floodgate_server::server::ServerOptions;
use serde_json::{json, Value};
use support::RedisServer;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long a queued idempotent acquire whose caller went away is kept for a retry to join
/// (`floodgate::core::ORPHANED_WAIT_GRACE`, 5 s as docs/durability.md says).
const ORPHANED_WAIT_GRACE: Duration = Duration::from_secs(5);

async fn start() -> (Served, String, reqwest::Client) {
    start_on(Floodgate::in_memory()).await
}

/// The same server on a real `redis-server` (kept alive by the returned guard).
async fn start_on_redis() -> (Served, String, reqwest::Client, RedisServer) {
    let redis = RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(redis.url()))
        .await
        .unwrap();
    let (served, base, http) = start_on(Floodgate::with_store(store)).await;
    (served, base, http, redis)
}

async fn start_on<S: Store>(gate: Floodgate<S>) -> (Served, String, reqwest::Client) {
    let srv = Srv::serve(gate, ServerOptions::default()).await;
    let (code, body) = srv
        .put(
            "/v1/limiters/one",
            json!({"concurrency": 1, "max_wait_ms": 60000}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    (srv.served, srv.base, srv.http)
}

/// Where the acquire `send_and_vanish` sends has got to when the connection is dropped.
#[derive(Clone, Copy)]
enum Vanish {
    /// Granted (the answer is lost).
    Granted,
    /// Queued (the caller goes away while waiting).
    Queued,
}

/// Sends an acquire on a raw connection and drops the connection without reading the answer,
/// once the server has granted or queued it (`after`), so the test never races the server.
async fn send_and_vanish(addr: std::net::SocketAddr, body: &Value, base: &str, after: Vanish) {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    let body = body.to_string();
    let request = format!(
        "POST /v1/limiters/one/acquire HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(request.as_bytes()).await.unwrap();
    sock.flush().await.unwrap();
    // Hold the connection until the server has the acquire (granted or queued), then vanish.
    let http = common::client();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let s = status(&http, base).await;
        let there = match after {
            Vanish::Granted => num(&s, "/counters/granted") >= 1,
            Vanish::Queued => num(&s, "/waiting") == 1,
        };
        if there {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never got there: {s}"
        );
        tokio::time::sleep(POLL).await;
    }
    drop(sock);
}

async fn status(http: &reqwest::Client, base: &str) -> Value {
    get_json(http, format!("{base}/v1/limiters/one")).await
}

async fn acquire(http: &reqwest::Client, base: &str, body: Value) -> (u16, Value) {
    let url = format!("{base}/v1/limiters/one/acquire");
    send_json(http, reqwest::Method::POST, url, body).await
}

/// Releases the permit `grant` (an acquire's answer) names.
async fn release(http: &reqwest::Client, base: &str, grant: &Value) {
    let id = grant["permit_id"].as_str().unwrap();
    let url = format!("{base}/v1/permits/{id}/release");
    let (code, body) = send_json(http, reqwest::Method::POST, url, json!({})).await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn a_granted_acquire_whose_answer_was_lost_is_returned_again() {
    let (served, base, http) = start().await;
    granted_answer_lost(served, base, http).await;
}

#[tokio::test]
async fn on_redis_a_granted_acquire_whose_answer_was_lost_is_returned_again() {
    let (served, base, http, _redis) = start_on_redis().await;
    granted_answer_lost(served, base, http).await;
}

#[tokio::test]
async fn a_retry_joins_the_wait_its_dropped_first_attempt_left() {
    let (served, base, http) = start().await;
    retry_joins(served, base, http).await;
}

#[tokio::test]
async fn on_redis_a_retry_joins_the_wait_its_dropped_first_attempt_left() {
    let (served, base, http, _redis) = start_on_redis().await;
    retry_joins(served, base, http).await;
}

async fn granted_answer_lost(served: Served, base: String, http: reqwest::Client) {
    send_and_vanish(
        served.addr,
        &json!({"request_id": "job-7", "wait_ms": 0}),
        &base,
        Vanish::Granted,
    )
    .await;
    let (code, permit) = acquire(&http, &base, json!({"request_id": "job-7", "wait_ms": 0})).await;
    assert_eq!(code, 200, "{permit}");
    let s = status(&http, &base).await;
    assert_eq!(num(&s, "/in_use"), 1, "exactly one permit held: {s}");
    assert_eq!(num(&s, "/counters/granted"), 1, "{s}");
    // Without the id, the same retry would have been refused (the limit is 1).
    let (code, _) = acquire(&http, &base, json!({"wait_ms": 0})).await;
    assert_eq!(code, 429);
    served.stop().await;
}

async fn retry_joins(served: Served, base: String, http: reqwest::Client) {
    let (code, holder) = acquire(&http, &base, json!({})).await;
    assert_eq!(code, 200);
    send_and_vanish(
        served.addr,
        &json!({"request_id": "job-8", "wait_ms": 60000}),
        &base,
        Vanish::Queued,
    )
    .await;
    // The retry, by header this time, joins the same wait (still one waiter).
    let retry = {
        let (http, base) = (http.clone(), base.clone());
        tokio::spawn(async move {
            let r = http
                .post(format!("{base}/v1/limiters/one/acquire"))
                .header("Idempotency-Key", "job-8")
                .json(&json!({"wait_ms": 60000}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    // The retry joined: still one waiter after the abandoned wait's grace has ended, and no
    // wait ended. (Nothing shows a join sooner; 200 ms, which this waited before, is not
    // always enough on a loaded machine for the retry to arrive, and a retry arriving after
    // the release below was granted a second permit.)
    tokio::time::sleep(ORPHANED_WAIT_GRACE + Duration::from_secs(1)).await;
    let s = status(&http, &base).await;
    assert_eq!(num(&s, "/waiting"), 1, "{s}");
    assert_eq!(
        num(&s, "/counters/timed_out") + num(&s, "/counters/cancelled"),
        0,
        "{s}"
    );
    release(&http, &base, &holder).await;
    let (code, permit) = retry.await.unwrap();
    assert_eq!(code, 200, "{permit}");
    let s = status(&http, &base).await;
    assert_eq!(num(&s, "/in_use"), 1, "{s}");
    // One grant for the joined wait: a second wait would have granted the abandoned one too.
    assert_eq!(num(&s, "/counters/granted"), 2, "{s}");
    served.stop().await;
}

#[tokio::test]
async fn a_grant_nobody_waits_for_any_more_is_released_at_once() {
    let (served, base, http) = start().await;
    grant_nobody_waits_for(served, base, http).await;
}

#[tokio::test]
async fn on_redis_a_grant_nobody_waits_for_any_more_is_released() {
    let (served, base, http, _redis) = start_on_redis().await;
    grant_nobody_waits_for(served, base, http).await;
}

async fn grant_nobody_waits_for(served: Served, base: String, http: reqwest::Client) {
    let (_, holder) = acquire(&http, &base, json!({})).await;
    send_and_vanish(
        served.addr,
        &json!({"request_id": "gone", "wait_ms": 60000}),
        &base,
        Vanish::Queued,
    )
    .await;
    release(&http, &base, &holder).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let s = status(&http, &base).await;
        // Granted to the vanished waiter, then given back (on Redis by a second script call,
        // so it may be seen held for a moment).
        if num(&s, "/counters/granted") == 2 && num(&s, "/in_use") == 0 {
            assert_eq!(num(&s, "/counters/released"), 2, "{s}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{s}");
        tokio::time::sleep(POLL).await;
    }
    served.stop().await;
}

#[tokio::test]
async fn bad_request_ids_are_refused_by_name() {
    let (served, base, http) = start().await;
    for (body, header, field) in [
        (json!({"request_id": ""}), None, "request_id"),
        (json!({"request_id": "a b"}), None, "request_id"),
        (json!({"request_id": "x".repeat(129)}), None, "request_id"),
        (json!({"request_id": "a"}), Some("b"), "request_id"),
        (json!({}), Some("é"), "Idempotency-Key"),
    ] {
        let mut req = http
            .post(format!("{base}/v1/limiters/one/acquire"))
            .json(&body);
        if let Some(h) = header {
            req = req.header("Idempotency-Key", h);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 400, "{body} {header:?}");
        let e: Value = r.json().await.unwrap();
        assert!(e["message"].as_str().unwrap().contains(field), "{e}");
    }
    served.stop().await;
}

/// No body means every field left out; whitespace alone is not a JSON body (schemathesis).
#[tokio::test]
async fn a_whitespace_body_is_refused_and_no_body_is_not() {
    let (served, base, http) = start().await;
    let (code, permit) = acquire(&http, &base, json!({})).await;
    assert_eq!(code, 200);
    let id = permit["permit_id"].as_str().unwrap();
    let send = |body: &'static str| {
        http.post(format!("{base}/v1/permits/{id}/extend"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(send("\n").await.unwrap().status(), 400);
    assert_eq!(send("").await.unwrap().status(), 200);
    served.stop().await;
}

/// A rate-only limiter's grant holds nothing: its id is remembered for the limiter's default
/// lease (`lease_ms`, an hour here, so nothing depends on timing), and a retry gets the same
/// grant instead of new tokens (with a burst of 1, a second grant would be refused).
async fn paced_retry_gets_the_same_grant(served: Served, base: String, http: reqwest::Client) {
    let url = format!("{base}/v1/limiters/paced");
    let spec = json!({"rate": {"limit": 1, "period_ms": 60000, "burst": 1}, "lease_ms": 3600000});
    let (code, body) = send_json(&http, reqwest::Method::PUT, url, spec).await;
    assert_eq!(code, 200, "{body}");
    let post = || {
        http.post(format!("{base}/v1/limiters/paced/acquire"))
            .header("Idempotency-Key", "job-9")
            .json(&json!({"wait_ms": 0}))
            .send()
    };
    let first: Value = post().await.unwrap().json().await.unwrap();
    let retry = post().await.unwrap();
    assert_eq!(retry.status().as_u16(), 200);
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(
        retry["fencing_token"], first["fencing_token"],
        "{first} {retry}"
    );
    let s = get_json(&http, format!("{base}/v1/limiters/paced")).await;
    assert_eq!(num(&s, "/counters/granted"), 1, "{s}");
    let url = format!("{base}/v1/limiters/paced/acquire");
    let (code, _) = send_json(&http, reqwest::Method::POST, url, json!({"wait_ms": 0})).await;
    assert_eq!(code, 429, "without the id, a new acquire");
    served.stop().await;
}

#[tokio::test]
async fn a_paced_grant_is_returned_again_to_its_retry() {
    let (served, base, http) = start().await;
    paced_retry_gets_the_same_grant(served, base, http).await;
}

#[tokio::test]
async fn on_redis_a_paced_grant_is_returned_again_to_its_retry() {
    let (served, base, http, _redis) = start_on_redis().await;
    paced_retry_gets_the_same_grant(served, base, http).await;
}

#[tokio::test]
async fn a_repeat_sent_while_the_first_attempt_waits_answers_that_attempt_superseded() {
    let (served, base, http) = start().await;
    overlapping_repeat(served, base, http).await;
}

#[tokio::test]
async fn on_redis_a_repeat_sent_while_the_first_attempt_waits_answers_that_attempt_superseded() {
    let (served, base, http, _redis) = start_on_redis().await;
    overlapping_repeat(served, base, http).await;
}

/// A client overlaps its own attempts: the first is still connected and waiting when the
/// repeat with the same `request_id` arrives. The repeat takes the wait over; the first is
/// answered 409 `superseded` (before: 503 `store_unavailable`, counted as the store failing),
/// and the wait goes on for the repeat: one waiter, one grant.
async fn overlapping_repeat(served: Served, base: String, http: reqwest::Client) {
    let (code, holder) = acquire(&http, &base, json!({})).await;
    assert_eq!(code, 200);
    let attempt = || {
        let (http, base) = (http.clone(), base.clone());
        tokio::spawn(async move {
            acquire(
                &http,
                &base,
                json!({"request_id": "job-s", "wait_ms": 60000}),
            )
            .await
        })
    };
    let first = attempt();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while num(&status(&http, &base).await, "/waiting") != 1 {
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(POLL).await;
    }
    let repeat = attempt();
    let (code, body) = tokio::time::timeout(PATIENCE, first)
        .await
        .expect("the first attempt was not answered")
        .unwrap();
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"], "superseded", "{body}");
    assert!(
        body["message"].as_str().unwrap().starts_with("request_id"),
        "{body}"
    );
    let s = status(&http, &base).await;
    assert_eq!(num(&s, "/waiting"), 1, "the repeat waits on: {s}");
    release(&http, &base, &holder).await;
    let (code, permit) = tokio::time::timeout(PATIENCE, repeat)
        .await
        .expect("the repeat was not answered")
        .unwrap();
    assert_eq!(code, 200, "{permit}");
    let s = status(&http, &base).await;
    assert_eq!(num(&s, "/in_use"), 1, "{s}");
    assert_eq!(num(&s, "/counters/granted"), 2, "{s}");
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |outcome: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("floodgate_acquire_total{")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    assert_eq!(count("superseded"), 1.0, "{metrics}");
    assert_eq!(count("store_unavailable"), 0.0, "{metrics}");
    served.stop().await;
}
