//! Rate-only keyed limiters over HTTP (docs/keyed.md): a total rate and a per-key rate, or
//! per-key rates alone with no total limit at all; no concurrency limit anywhere. Grants are paced (nothing held, nothing to release), each key
//! keeps its own rate under the total's, and what cannot apply is refused naming the field.
//! The real server on `127.0.0.1:0`, with the embedded store and with a real `redis-server`;
//! no assertion depends on timing (the per-key rate is one token a minute, so nothing refills
//! during the test).

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use common::{send_json, Served};
use floodgate::{Floodgate, RedisConfig, RedisStore};
use floodgate_server::server::ServerOptions;
use serde_json::{json, Value};
use support::RedisServer;

/// Two tests running the same body: one on the embedded store, one on a real `redis-server`.
macro_rules! on_both_stores {
    ($embedded:ident, $on_redis:ident, |$served:ident| $body:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $embedded() {
            let $served = Served::start(Floodgate::in_memory(), ServerOptions::default()).await;
            $body.await;
            $served.stop().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $on_redis() {
            let redis = RedisServer::start();
            let store = RedisStore::connect(RedisConfig::new(redis.url()))
                .await
                .unwrap();
            let $served =
                Served::start(Floodgate::with_store(store), ServerOptions::default()).await;
            $body.await;
            $served.stop().await;
        }
    };
}

on_both_stores!(
    a_rate_only_keyed_limiter_paces_each_key_under_the_total,
    a_rate_only_keyed_limiter_paces_each_key_under_the_total_on_redis,
    |served| paces_each_key_under_the_total(&served)
);

async fn paces_each_key_under_the_total(served: &Served) {
    let base = format!("http://{}/v1/limiters", served.addr);
    let http = common::client();
    let put = reqwest::Method::PUT;

    let spec = json!({
        "rate": {"limit": 1000, "period_ms": 60000, "burst": 3},
        "per_key": {"rate": {"limit": 1, "period_ms": 60000, "burst": 2}},
    });
    let (status, body) = send_json(&http, put.clone(), format!("{base}/pace"), spec).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["concurrency"], Value::Null, "{body}");

    let acquire = |key: &str| {
        let (http, url) = (http.clone(), format!("{base}/pace/acquire"));
        let body = json!({"key": key, "wait_ms": 0});
        async move { send_json(&http, reqwest::Method::POST, url, body).await }
    };
    // Key a: its burst of 2, then its own rate refuses (the total still has room).
    assert_eq!(acquire("org-a").await.0, 200);
    assert_eq!(acquire("org-a").await.0, 200);
    let (status, body) = acquire("org-a").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "wait_timeout", "{body}");
    // Key b is not held back by a, but the total's burst of 3 is spent after its first.
    assert_eq!(acquire("org-b").await.0, 200);
    assert_eq!(acquire("org-c").await.0, 429);

    // Paced grants hold nothing.
    let (_, status) = send_json(
        &http,
        reqwest::Method::GET,
        format!("{base}/pace"),
        Value::Null,
    )
    .await;
    assert_eq!(status["in_use"], 0, "{status}");
    assert_eq!(status["counters"]["paced"], 3, "{status}");
    assert_eq!(status["keyed"]["per_key"]["rate"]["limit"], 1, "{status}");

    // An override may set a weight; a concurrency would mean nothing without holders.
    let (status, body) = send_json(
        &http,
        put.clone(),
        format!("{base}/pace/keys/org-a"),
        json!({"weight": 2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send_json(
        &http,
        put.clone(),
        format!("{base}/pace/keys/org-a"),
        json!({"concurrency": 2}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("concurrency"),
        "{body}"
    );

    // A keyed limiter with no limit at all (no per-key rate either) is refused, naming a field.
    let nothing = json!({"per_key": {}, "max_keys": 10});
    let (status, body) = send_json(&http, put, format!("{base}/nothing"), nothing).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_request", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("per_key.concurrency"),
        "{body}"
    );
}

on_both_stores!(
    per_key_rates_alone_pace_each_key_with_no_total,
    per_key_rates_alone_pace_each_key_with_no_total_on_redis,
    |served| paces_each_key_with_no_total(&served)
);

/// Per-key rates with no total limit at all: each key is paced by its own rate only (no key
/// holds back another however many are served), nothing is held, status shows no total limit,
/// and a keyed schedule is paced by the key's rate and given back by `unschedule`.
async fn paces_each_key_with_no_total(served: &Served) {
    let base = format!("http://{}/v1/limiters", served.addr);
    let http = common::client();
    let spec = json!({"per_key": {"rate": {"limit": 1, "period_ms": 60000, "burst": 2}}});
    let (status, body) = send_json(&http, reqwest::Method::PUT, format!("{base}/keys"), spec).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["concurrency"], Value::Null, "{body}");
    assert_eq!(body["rate"], Value::Null, "no total rate is shown: {body}");

    let acquire = |key: String| {
        let (http, url) = (http.clone(), format!("{base}/keys/acquire"));
        let body = json!({"key": key, "wait_ms": 0});
        async move { send_json(&http, reqwest::Method::POST, url, body).await }
    };
    // Twenty keys each get their burst of 2 (no total bounds them), then their own rate refuses.
    for i in 0..20 {
        let key = format!("org-{i}");
        for _ in 0..2 {
            let (status, grant) = acquire(key.clone()).await;
            assert_eq!(status, 200, "{grant}");
            assert_eq!(grant["lease_ms"], 0, "a paced grant holds nothing: {grant}");
        }
        let (status, body) = acquire(key).await;
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["error"], "wait_timeout", "{body}");
    }
    let (_, status) = send_json(
        &http,
        reqwest::Method::GET,
        format!("{base}/keys"),
        Value::Null,
    )
    .await;
    assert_eq!(status["in_use"], 0, "{status}");
    assert_eq!(status["limit"], Value::Null, "{status}");
    assert_eq!(status["spec"]["rate"], Value::Null, "{status}");
    assert_eq!(status["spec"]["concurrency"], Value::Null, "{status}");
    assert_eq!(status["counters"]["paced"], 40, "{status}");
    assert_eq!(
        status["keyed"]["key_count"], 20,
        "keys keep their rate debt: {status}"
    );
    // A put without per_key keeps the per-key rates and still no total.
    let again = json!({"max_wait_ms": 60000});
    let (status, body) =
        send_json(&http, reqwest::Method::PUT, format!("{base}/keys"), again).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rate"], Value::Null, "{body}");
    assert_eq!(body["keyed"]["per_key"]["rate"]["limit"], 1, "{body}");
    assert_eq!(body["keyed"]["key_count"], 20, "{body}");

    // A schedule for a fresh key is paced by its rate alone: its burst, then a minute apart,
    // and refused whole beyond max_wait_ms (60 s by default).
    let url = format!("{base}/keys/schedule");
    let body = json!({"key": "fresh", "count": 4});
    let (status, body) = send_json(&http, reqwest::Method::POST, url.clone(), body).await;
    assert_eq!(
        status, 400,
        "4 tokens of one a minute exceed max_wait_ms: {body}"
    );
    let body = json!({"key": "fresh", "count": 3});
    let (status, sched) = send_json(&http, reqwest::Method::POST, url.clone(), body).await;
    assert_eq!(status, 200, "{sched}");
    assert_eq!(sched["offsets_ms"], json!([0, 0, 60000]), "{sched}");
    // Its last token has not started: it goes back (the first two have).
    let undo = json!({"reservation": sched["reservation"].clone(), "count": 3});
    let undo_url = format!("{base}/keys/unschedule");
    let (status, back) = send_json(&http, reqwest::Method::POST, undo_url, undo).await;
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["returned"], 1, "{back}");
    // So the key's next token is a minute from its burst again, not two.
    let body = json!({"key": "fresh", "count": 1});
    let (status, sched) = send_json(&http, reqwest::Method::POST, url, body).await;
    assert_eq!(status, 200, "{sched}");
    let next = sched["offsets_ms"][0].as_u64().unwrap();
    assert!(next > 0 && next <= 60000, "{sched}");
    assert_eq!(acquire("fresh".to_owned()).await.0, 429);
}

on_both_stores!(
    queued_waiters_of_a_rate_only_keyed_limiter_are_paced_and_keys_go_idle,
    queued_waiters_of_a_rate_only_keyed_limiter_are_paced_and_keys_go_idle_on_redis,
    |served| waiters_are_paced_and_keys_go_idle(&served, true)
);

on_both_stores!(
    queued_waiters_of_per_key_rates_alone_are_paced_and_keys_go_idle,
    queued_waiters_of_per_key_rates_alone_are_paced_and_keys_go_idle_on_redis,
    |served| waiters_are_paced_and_keys_go_idle(&served, false)
);

/// Waiters held back by the total's rate (`with_total`; else by no total at all) and by their key's own rate are granted in turn
/// (woken, paced, nothing held), and once their rate debt ends the keys leave no state. Only
/// liveness is bounded in time (a wait of 20 s for grants due within a second).
async fn waiters_are_paced_and_keys_go_idle(served: &Served, with_total: bool) {
    let base = format!("http://{}/v1/limiters", served.addr);
    let http = common::client();
    let total = with_total.then(|| json!({"limit": 20, "period_ms": 1000, "burst": 1}));
    let spec = json!({
        "rate": total,
        "per_key": {"rate": {"limit": 10, "period_ms": 1000, "burst": 1}},
        "max_wait_ms": 20000,
    });
    let (status, body) =
        send_json(&http, reqwest::Method::PUT, format!("{base}/paced"), spec).await;
    assert_eq!(status, 200, "{body}");

    let mut tasks = Vec::new();
    for i in 0..6 {
        let key = ["org-a", "org-b"][i % 2];
        let (http, url) = (http.clone(), format!("{base}/paced/acquire"));
        let body = json!({"key": key, "wait_ms": 20000, "request_id": format!("req-{i}")});
        tasks.push(tokio::spawn(async move {
            send_json(&http, reqwest::Method::POST, url, body).await
        }));
    }
    for task in tasks {
        let (status, grant) = task.await.unwrap();
        assert_eq!(status, 200, "every waiter is granted in time: {grant}");
        assert_eq!(grant["lease_ms"], 0, "a paced grant holds nothing: {grant}");
    }
    let (_, status) = send_json(
        &http,
        reqwest::Method::GET,
        format!("{base}/paced"),
        Value::Null,
    )
    .await;
    assert_eq!(status["in_use"], 0, "{status}");
    assert_eq!(status["waiting"], 0, "{status}");
    assert_eq!(status["counters"]["paced"], 6, "{status}");
    assert_eq!(status["counters"]["timed_out"], 0, "{status}");

    // Their rate debt ends within 100 ms of the last grant; then no key is left.
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    loop {
        let (_, status) = send_json(
            &http,
            reqwest::Method::GET,
            format!("{base}/paced"),
            Value::Null,
        )
        .await;
        if status["keyed"]["key_count"] == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "keys left behind: {status}"
        );
        tokio::time::sleep(common::POLL).await;
    }
}
