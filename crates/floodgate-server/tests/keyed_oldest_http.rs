//! The oldest wait of a keyed limiter (issue 14, docs/keyed.md): the holders listing's
//! `oldest_wait_ms` and the `floodgate_oldest_wait_seconds` gauge (which the
//! `FloodgateOldestWaitNearMaxWait` alert reads) rise while waiters of several keys wait, and
//! fall back to null / 0 once nobody waits. The real server on `127.0.0.1:0`, with the embedded
//! store and with a real `redis-server`.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use common::{Served, Srv, PATIENCE, POLL};
use floodgate::{Floodgate, RedisConfig, RedisStore};
use floodgate_server::server::ServerOptions;
use serde_json::json;
use support::RedisServer;
use tokio::task::JoinHandle;

impl Srv {
    /// A blocking acquire for `key`, in the background; its HTTP status.
    fn wait_for(&self, key: &str) -> JoinHandle<u16> {
        let http = self.http.clone();
        let url = format!("{}/v1/limiters/orgs/acquire", self.base);
        let body = json!({"key": key, "wait_ms": 60_000}).to_string();
        tokio::spawn(async move {
            http.post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    }

    /// The holders listing's `oldest_wait_ms` (null: nobody waits).
    async fn oldest_ms(&self) -> Option<u64> {
        let (s, v) = self
            .send(reqwest::Method::GET, "/v1/limiters/orgs/holders", None)
            .await;
        assert_eq!(s, 200, "{v}");
        v["oldest_wait_ms"].as_u64()
    }

    /// `floodgate_oldest_wait_seconds{limiter="orgs"}` as the server exports it now.
    async fn gauge(&self) -> f64 {
        let text = self.metrics().await;
        let line = text
            .lines()
            .find(|l| l.starts_with("floodgate_oldest_wait_seconds{limiter=\"orgs\"}"))
            .unwrap_or_else(|| panic!("no oldest wait gauge for orgs:\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }
}

/// Polls `read` until `ok` holds of its value (liveness only), and returns that value.
async fn until<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    what: &str,
    mut read: impl FnMut() -> F,
    ok: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let v = read().await;
        if ok(&v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: last {v:?}");
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_limiters_oldest_wait_rises_while_its_waiters_wait() {
    let served = Served::start(Floodgate::in_memory(), ServerOptions::default()).await;
    oldest_wait(Srv::with(served)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_limiters_oldest_wait_rises_while_its_waiters_wait_on_redis() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(redis.url()))
        .await
        .unwrap();
    let served = Served::start(Floodgate::with_store(store), ServerOptions::default()).await;
    oldest_wait(Srv::with(served)).await;
    drop(redis);
}

async fn oldest_wait(srv: Srv) {
    let (s, body) = srv
        .send(
            reqwest::Method::PUT,
            "/v1/limiters/orgs",
            Some(json!({"concurrency": 1, "per_key": {"concurrency": 1}})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(srv.oldest_ms().await, None, "nobody waits yet");
    let (s, held) = srv
        .send(
            reqwest::Method::POST,
            "/v1/limiters/orgs/acquire",
            Some(json!({"key": "a"})),
        )
        .await;
    assert_eq!(s, 200, "{held}");
    // Waiters of two other keys queue behind the total.
    let b = srv.wait_for("b");
    until(
        "b queued",
        || srv.send(reqwest::Method::GET, "/v1/limiters/orgs", None),
        |(_, v)| v["waiting"] == 1,
    )
    .await;
    let c = srv.wait_for("c");
    until(
        "c queued",
        || srv.send(reqwest::Method::GET, "/v1/limiters/orgs", None),
        |(_, v)| v["waiting"] == 2,
    )
    .await;

    // The listing's oldest wait is given and grows.
    let first = until("an oldest wait", || srv.oldest_ms(), Option::is_some)
        .await
        .unwrap();
    until(
        "the oldest wait grows",
        || srv.oldest_ms(),
        |v| v.is_some_and(|ms| ms > first),
    )
    .await;
    // The gauge (sampled each second) follows: above 0, then higher.
    let g1 = until("the gauge above 0", || srv.gauge(), |g| *g > 0.0).await;
    until("the gauge rises", || srv.gauge(), |g| *g > g1).await;

    // The release grants b (the oldest: c's key came later); c still waits, so the oldest
    // wait is still given.
    let permit = held["permit_id"].as_str().unwrap();
    let (s, _) = srv
        .send(
            reqwest::Method::POST,
            &format!("/v1/permits/{permit}/release"),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        tokio::time::timeout(PATIENCE, b).await.unwrap().unwrap(),
        200
    );
    assert!(!c.is_finished(), "FIFO across the total: c is after b");
    assert!(srv.oldest_ms().await.is_some(), "c still waits");

    // Once the last waiter gives up, the listing says null and the gauge goes back to 0.
    c.abort();
    until("nobody waits", || srv.oldest_ms(), Option::is_none).await;
    until("the gauge back to 0", || srv.gauge(), |g| *g == 0.0).await;
    srv.served.stop().await;
}
