//! Keyed limiters over HTTP (issue 14, docs/keyed.md): the real server on `127.0.0.1:0`, the
//! same tests with the embedded store and with a real `redis-server`.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use common::{Srv, PATIENCE, POLL};
use floodgate::{Floodgate, RedisConfig, RedisStore};
use floodgate_server::server::ServerOptions;
use serde_json::{json, Value};
use support::RedisServer;

impl Srv {
    async fn memory() -> Srv {
        Srv::serve(Floodgate::in_memory(), ServerOptions::default()).await
    }

    /// The server on a fresh `redis-server` (kept alive as long as the server).
    async fn redis() -> (Srv, RedisServer) {
        let redis = RedisServer::start();
        let store = RedisStore::connect(RedisConfig::new(redis.url()))
            .await
            .unwrap();
        (
            Srv::serve(Floodgate::with_store(store), ServerOptions::default()).await,
            redis,
        )
    }
}

fn assert_error(reply: &(u16, Value), status: u16, code: &str, names: &str) {
    assert_eq!(reply.0, status, "{reply:?}");
    assert_eq!(reply.1["error"], code, "{reply:?}");
    let message = reply.1["message"].as_str().unwrap();
    assert!(message.contains(names), "{message:?} should name {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_limiter_over_http() {
    keyed_over_http(Srv::memory().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_limiter_over_http_on_redis() {
    let (srv, _redis) = Srv::redis().await;
    keyed_over_http(srv).await;
}

async fn keyed_over_http(srv: Srv) {
    // Total 4, at most 2 per organization, 3 organizations tracked at once.
    let (status, body) = srv
        .put(
            "/v1/limiters/orgs",
            json!({"concurrency": 4, "per_key": {"concurrency": 2}, "max_keys": 3}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["keyed"]["per_key"]["concurrency"], 2);
    assert_eq!(body["keyed"]["max_keys"], 3);
    assert_eq!(body["keyed"]["key_count"], 0);

    let acquire = |key: &str| json!({"key": key, "wait_ms": 0});
    let a1 = srv
        .post("/v1/limiters/orgs/acquire", acquire("org-a"))
        .await;
    let a2 = srv
        .post("/v1/limiters/orgs/acquire", acquire("org-a"))
        .await;
    assert_eq!((a1.0, a2.0), (200, 200));
    // org-a is at its own limit while the total has room: refused for org-a only.
    let a3 = srv
        .post("/v1/limiters/orgs/acquire", acquire("org-a"))
        .await;
    assert_error(&a3, 429, "wait_timeout", "retry");
    let b1 = srv
        .post("/v1/limiters/orgs/acquire", acquire("org-b"))
        .await;
    assert_eq!(b1.0, 200, "{b1:?}");

    let (_, status) = srv.get("/v1/limiters/orgs").await;
    assert_eq!(status["in_use"], 3);
    assert_eq!(status["keyed"]["key_count"], 2);
    assert_eq!(status["keyed"]["busiest_keys"][0]["key"], "org-a");
    assert_eq!(status["keyed"]["busiest_keys"][0]["in_use"], 2);

    // A third organization fits max_keys; a fourth does not: 429 naming max_keys.
    let c1 = srv
        .post("/v1/limiters/orgs/acquire", acquire("org-c"))
        .await;
    assert_eq!(c1.0, 200, "{c1:?}");
    let d1 = srv
        .post("/v1/limiters/orgs/acquire", acquire("org-d"))
        .await;
    assert_error(&d1, 429, "too_many_keys", "max_keys");
    assert!(d1.1["retry_after_ms"].as_u64().unwrap() >= 1);

    // Metrics: one key-count series per limiter, never one per key.
    let metrics = srv.metrics().await;
    assert!(
        metrics.contains("floodgate_limiter_keys{limiter=\"orgs\"} 3"),
        "{metrics}"
    );
    assert!(!metrics.contains("org-a"), "no per-key series");
    // Releasing org-c's only permit drops its key: org-d fits now.
    let permit = c1.1["permit_id"].as_str().unwrap();
    let (s, _) = srv
        .post(&format!("/v1/permits/{permit}/release"), json!({}))
        .await;
    assert_eq!(s, 200);
    let d2 = srv
        .post("/v1/limiters/orgs/acquire", acquire("org-d"))
        .await;
    assert_eq!(d2.0, 200, "{d2:?}");

    // An override: org-a may hold only 1 from now on, and weighs 3.
    let (s, body) = srv
        .put(
            "/v1/limiters/orgs/keys/org-a",
            json!({"concurrency": 1, "weight": 3}),
        )
        .await;
    assert_eq!((s, body["weight"].as_u64()), (200, Some(3)), "{body}");
    let (_, status) = srv.get("/v1/limiters/orgs").await;
    assert_eq!(status["keyed"]["overrides"], 1);
    let a = status["keyed"]["busiest_keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == "org-a")
        .unwrap()
        .clone();
    assert_eq!(
        (a["limit"].as_u64(), a["weight"].as_u64()),
        (Some(1), Some(3))
    );
    let bad = srv
        .put("/v1/limiters/orgs/keys/org-a", json!({"weight": 0}))
        .await;
    assert_error(&bad, 400, "invalid_request", "weight");
    let (s, _) = srv
        .send(
            reqwest::Method::DELETE,
            "/v1/limiters/orgs/keys/org-a",
            None,
        )
        .await;
    assert_eq!(s, 200);

    // Bad input names the field.
    let no_key = srv
        .post("/v1/limiters/orgs/acquire", json!({"wait_ms": 0}))
        .await;
    assert_error(&no_key, 400, "invalid_request", "key");
    let empty = srv
        .post("/v1/limiters/orgs/acquire", json!({"key": ""}))
        .await;
    assert_error(&empty, 400, "invalid_request", "key");
    let long = "x".repeat(300);
    let too_long = srv
        .post("/v1/limiters/orgs/acquire", json!({"key": long}))
        .await;
    assert_error(&too_long, 400, "invalid_request", "key");
    let bad_spec = srv
        .put("/v1/limiters/bad", json!({"per_key": {"concurrency": 0}}))
        .await;
    assert_error(&bad_spec, 400, "invalid_request", "per_key.concurrency");
    let unkey = srv.put("/v1/limiters/orgs", json!({"per_key": null})).await;
    assert_error(&unkey, 400, "invalid_request", "per_key");

    // A plain limiter refuses keys rather than ignoring them.
    let (s, _) = srv
        .put("/v1/limiters/plain", json!({"concurrency": 1}))
        .await;
    assert_eq!(s, 200);
    let keyed_on_plain = srv
        .post("/v1/limiters/plain/acquire", json!({"key": "org-a"}))
        .await;
    assert_error(&keyed_on_plain, 400, "invalid_request", "key");
    let feedback = srv
        .post(
            "/v1/limiters/plain/feedback",
            json!({"outcome": "ok", "key": "org-a"}),
        )
        .await;
    assert_error(&feedback, 400, "invalid_request", "key");
    let make_keyed = srv
        .put("/v1/limiters/plain", json!({"per_key": {"concurrency": 1}}))
        .await;
    assert_error(&make_keyed, 400, "invalid_request", "per_key");
    // max_keys is never accepted and ignored: out of range, or on a limiter without keys.
    let keys_on_plain = srv.put("/v1/limiters/plain", json!({"max_keys": 5})).await;
    assert_error(&keys_on_plain, 400, "invalid_request", "max_keys");
    let too_many = srv
        .put(
            "/v1/limiters/plain",
            json!({"per_key": null, "max_keys": 99_999_999}),
        )
        .await;
    assert_error(&too_many, 400, "invalid_request", "max_keys");
    // An adaptive limit on a keyed limiter with no total has nothing to adjust: refused, not
    // created without it (it was, answering 200 with `adaptive: null`).
    let adaptive = srv
        .put(
            "/v1/limiters/no-total",
            json!({"per_key": {"concurrency": 2}, "adaptive": {"min": 1, "max": 10}}),
        )
        .await;
    assert_error(&adaptive, 400, "invalid_request", "adaptive");
    let (status, _) = srv.get("/v1/limiters/no-total").await;
    assert_eq!(status, 404, "nothing created");
    srv.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_key_only_limiter_queues_per_key_and_wakes_waiters() {
    per_key_only(Srv::memory().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_key_only_limiter_queues_per_key_and_wakes_waiters_on_redis() {
    let (srv, _redis) = Srv::redis().await;
    per_key_only(srv).await;
}

async fn per_key_only(srv: Srv) {
    // No total: only 1 per key.
    let (s, body) = srv
        .put(
            "/v1/limiters/per-key",
            json!({"per_key": {"concurrency": 1}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["concurrency"], Value::Null);
    let first = srv
        .post("/v1/limiters/per-key/acquire", json!({"key": "t1"}))
        .await;
    assert_eq!(first.0, 200);
    // A second for t1 waits (a long poll); t2 is granted meanwhile.
    let waiter = {
        let http = srv.http.clone();
        let url = format!("{}/v1/limiters/per-key/acquire", srv.base);
        tokio::spawn(async move {
            http.post(url)
                .header("content-type", "application/json")
                .body(json!({"key": "t1", "wait_ms": 30_000}).to_string())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, status) = srv.get("/v1/limiters/per-key").await;
        if status["waiting"] == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(POLL).await;
    }
    let other = srv
        .post(
            "/v1/limiters/per-key/acquire",
            json!({"key": "t2", "wait_ms": 0}),
        )
        .await;
    assert_eq!(other.0, 200, "t2 is not held back by t1's waiter");
    let permit = first.1["permit_id"].as_str().unwrap();
    srv.post(&format!("/v1/permits/{permit}/release"), json!({}))
        .await;
    assert_eq!(
        tokio::time::timeout(PATIENCE, waiter)
            .await
            .unwrap()
            .unwrap(),
        200,
        "the release woke t1's waiter"
    );
    srv.served.stop().await;
}

/// A per-key rate, and a keyed schedule paced by it, on both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_rate_and_schedule_over_http() {
    keyed_rate_and_schedule(Srv::memory().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_rate_and_schedule_over_http_on_redis() {
    let (srv, _redis) = Srv::redis().await;
    keyed_rate_and_schedule(srv).await;
}

async fn keyed_rate_and_schedule(srv: Srv) {
    let (s, body) = srv
        .put(
            "/v1/limiters/orgs",
            json!({"concurrency": 4, "per_key": {"concurrency": 2, "rate": {"limit": 5, "period_ms": 1000, "burst": 1}}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["keyed"]["per_key"]["rate"]["limit"], 5, "{body}");
    // One token per 200 ms per key: org-a's three children start 0, 200 and 400 ms from now;
    // org-b has its own tokens.
    let (s, a) = srv
        .post(
            "/v1/limiters/orgs/schedule",
            json!({"key": "org-a", "count": 3}),
        )
        .await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(a["offsets_ms"], json!([0, 200, 400]), "{a}");
    let (s, b) = srv
        .post(
            "/v1/limiters/orgs/schedule",
            json!({"key": "org-b", "count": 1}),
        )
        .await;
    assert_eq!((s, &b["offsets_ms"]), (200, &json!([0])), "{b}");
    // org-a's tokens are promised: an acquire that cannot wait is refused with a hint.
    let refused = srv
        .post(
            "/v1/limiters/orgs/acquire",
            json!({"key": "org-a", "wait_ms": 0}),
        )
        .await;
    assert_error(&refused, 429, "wait_timeout", "retry");
    let no_key = srv
        .post("/v1/limiters/orgs/schedule", json!({"count": 1}))
        .await;
    assert_error(&no_key, 400, "invalid_request", "key");
    // A new key beyond max_keys: 429 with a hint, as an acquire's (it was a 400, which a
    // producer reads as final although the cap frees itself).
    let (s, body) = srv
        .put(
            "/v1/limiters/one-key",
            json!({"per_key": {"concurrency": 1, "rate": {"limit": 5, "period_ms": 1000}}, "max_keys": 1}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, first) = srv
        .post(
            "/v1/limiters/one-key/schedule",
            json!({"key": "k1", "count": 1}),
        )
        .await;
    assert_eq!(s, 200, "{first}");
    let full = srv
        .post(
            "/v1/limiters/one-key/schedule",
            json!({"key": "k2", "count": 1}),
        )
        .await;
    assert_error(&full, 429, "too_many_keys", "max_keys");
    assert!(full.1["retry_after_ms"].as_u64().is_some(), "{}", full.1);
    let (_, status) = srv.get("/v1/limiters/one-key").await;
    assert_eq!(status["keyed"]["too_many_keys"], 1, "{status}");
    srv.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_only_keyed_limiter_is_kept_rate_only_by_a_plain_put() {
    rate_only_kept_by_a_plain_put(Srv::memory().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_only_keyed_limiter_is_kept_rate_only_by_a_plain_put_on_redis() {
    let (srv, _redis) = Srv::redis().await;
    rate_only_kept_by_a_plain_put(srv).await;
}

/// Rate-only keyed limiters (a total rate, per-key rates, no concurrency anywhere: paced grants,
/// nothing held) work on both stores (`keyed_rate_only.rs` has the pacing); a put without
/// `per_key` keeps the per-key spec and so keeps the limiter rate-only, and a total concurrency
/// added later makes its grants hold leases again.
async fn rate_only_kept_by_a_plain_put(srv: Srv) {
    let body = json!({"rate": {"limit": 100, "period_ms": 1000},
                      "per_key": {"rate": {"limit": 10, "period_ms": 1000}}});
    let (s, created) = srv.put("/v1/limiters/pace", body).await;
    assert_eq!(s, 200, "{created}");
    assert_eq!(created["concurrency"], Value::Null, "{created}");
    let (s, grant) = srv
        .post(
            "/v1/limiters/pace/acquire",
            json!({"key": "org-a", "wait_ms": 0}),
        )
        .await;
    assert_eq!(s, 200, "{grant}");
    assert_eq!(grant["lease_ms"], 0, "paced: {grant}");

    // A plain put (no per_key): the per-key rate is kept, the limiter stays rate-only.
    let (s, kept) = srv
        .put(
            "/v1/limiters/pace",
            json!({"rate": {"limit": 200, "period_ms": 1000}}),
        )
        .await;
    assert_eq!(s, 200, "{kept}");
    assert_eq!(kept["concurrency"], Value::Null, "{kept}");
    assert_eq!(kept["keyed"]["per_key"]["rate"]["limit"], 10, "{kept}");
    let (s, grant) = srv
        .post(
            "/v1/limiters/pace/acquire",
            json!({"key": "org-b", "wait_ms": 0}),
        )
        .await;
    assert_eq!(s, 200, "{grant}");
    assert_eq!(grant["lease_ms"], 0, "still paced: {grant}");

    // With a total concurrency, grants hold leases (and are released).
    let (s, held) = srv
        .put(
            "/v1/limiters/pace",
            json!({"concurrency": 5, "rate": {"limit": 200, "period_ms": 1000}}),
        )
        .await;
    assert_eq!(s, 200, "{held}");
    assert_eq!(held["concurrency"], 5, "{held}");
    let (s, grant) = srv
        .post(
            "/v1/limiters/pace/acquire",
            json!({"key": "org-c", "wait_ms": 0}),
        )
        .await;
    assert_eq!(s, 200, "{grant}");
    assert!(grant["lease_ms"].as_u64().unwrap() > 0, "held: {grant}");
    let (_, status) = srv.get("/v1/limiters/pace").await;
    assert_eq!(status["in_use"], 1, "{status}");
    srv.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holders_listing_counts_a_keyed_limiters_waiters() {
    holders_of_a_keyed_limiter(Srv::memory().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holders_listing_counts_a_keyed_limiters_waiters_on_redis() {
    let (srv, _redis) = Srv::redis().await;
    holders_of_a_keyed_limiter(srv).await;
}

/// `GET .../holders` (what the dashboard shows) counts the waiters of every key, as the status
/// does.
async fn holders_of_a_keyed_limiter(srv: Srv) {
    let (s, body) = srv
        .put(
            "/v1/limiters/orgs",
            json!({"concurrency": 10, "per_key": {"concurrency": 1}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    for key in ["org-a", "org-b"] {
        let (s, held) = srv
            .post("/v1/limiters/orgs/acquire", json!({"key": key}))
            .await;
        assert_eq!(s, 200, "{held}");
    }
    // Three waiters, held back by their keys' own limit (1) while the total has room.
    let mut waits = Vec::new();
    for key in ["org-a", "org-a", "org-b"] {
        let http = srv.http.clone();
        let url = format!("{}/v1/limiters/orgs/acquire", srv.base);
        waits.push(tokio::spawn(async move {
            http.post(url)
                .header("content-type", "application/json")
                .body(json!({"key": key, "wait_ms": 30_000}).to_string())
                .send()
                .await
        }));
    }
    let deadline = std::time::Instant::now() + common::PATIENCE;
    loop {
        let (_, status) = srv.get("/v1/limiters/orgs").await;
        if status["waiting"] == 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (s, listing) = srv.get("/v1/limiters/orgs/holders?limit=10").await;
    assert_eq!(s, 200, "{listing}");
    assert_eq!(listing["total_holders"], 2, "{listing}");
    assert_eq!(listing["waiting"], 3, "{listing}");
    assert_eq!(listing["waiting_permits"], 3, "{listing}");
    // The oldest of the keys' heads (keyed_oldest_http.rs shows it rising).
    assert!(listing["oldest_wait_ms"].is_u64(), "{listing}");
    for w in waits {
        w.abort();
    }
    srv.served.stop().await;
}
