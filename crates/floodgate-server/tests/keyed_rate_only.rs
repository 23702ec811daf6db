//! Rate-only keyed limiters over HTTP (docs/keyed.md): a total rate and a per-key rate, no
//! concurrency limit anywhere. Grants are paced (nothing held, nothing to release), each key
//! keeps its own rate under the total's, and what cannot apply is refused naming the field.
//! The real server on `127.0.0.1:0`, embedded store; no assertion depends on timing (the
//! per-key rate is one token a minute, so nothing refills during the test).

#![allow(clippy::unwrap_used)]

mod common;

use common::Served;
use floodgate::Floodgate;
use floodgate_server::server::ServerOptions;
use serde_json::{json, Value};

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Value,
) -> (u16, Value) {
    let resp = http.request(method, url).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_only_keyed_limiter_paces_each_key_under_the_total() {
    let served = Served::start(Floodgate::in_memory(), ServerOptions::default()).await;
    let base = format!("http://{}/v1/limiters", served.addr);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let put = reqwest::Method::PUT;

    let spec = json!({
        "rate": {"limit": 1000, "period_ms": 60000, "burst": 3},
        "per_key": {"rate": {"limit": 1, "period_ms": 60000, "burst": 2}},
    });
    let (status, body) = call(&http, put.clone(), format!("{base}/pace"), spec).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["concurrency"], Value::Null, "{body}");

    let acquire = |key: &str| {
        let (http, url) = (http.clone(), format!("{base}/pace/acquire"));
        let body = json!({"key": key, "wait_ms": 0});
        async move { call(&http, reqwest::Method::POST, url, body).await }
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
    let (_, status) = call(
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
    let (status, body) = call(
        &http,
        put.clone(),
        format!("{base}/pace/keys/org-a"),
        json!({"weight": 2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
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

    // A per-key rate with no total limit at all is still refused, naming the field.
    let only_keys = json!({"per_key": {"rate": {"limit": 1, "period_ms": 1000}}});
    let (status, body) = call(&http, put, format!("{base}/keys-only"), only_keys).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("per_key"),
        "{body}"
    );
}
