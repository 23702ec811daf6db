//! Unusual but valid keys over HTTP on both stores (h-krev16): the key an acquire names in its
//! body and the key an override names in its (percent-encoded) path must be the same key, and
//! the Redis script must keep keys holding its own separators, hash-tag braces, slashes,
//! percent signs and 256 multi-byte characters apart and intact. A key of 257 characters (of
//! any width) is refused naming `key`, in the body and in the path.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use common::Srv;
use floodgate::{Floodgate, RedisConfig, RedisStore};
use floodgate_server::server::ServerOptions;
use serde_json::{json, Value};
use support::RedisServer;

/// Every byte but the unreserved ones as `%XX`, as a client building the path would.
fn encode(key: &str) -> String {
    key.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn keys() -> Vec<String> {
    vec![
        "é".repeat(256),
        "🦀".repeat(256),
        "a|b|1|2".into(),
        "{tag}".into(),
        "x/y".into(),
        "50%".into(),
        "%41".into(),
        " spaced key ".into(),
        "k:1".into(),
        "A".into(),
        "a".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_keys_are_one_key_in_body_and_path_in_memory() {
    let srv = Srv::serve(Floodgate::in_memory(), ServerOptions::default()).await;
    unusual_keys(&srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_keys_are_one_key_in_body_and_path_on_redis() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(redis.url()))
        .await
        .unwrap();
    let srv = Srv::serve(Floodgate::with_store(store), ServerOptions::default()).await;
    unusual_keys(&srv).await;
}

fn busiest(status: &Value) -> Vec<(String, u64, Option<u64>)> {
    status["keyed"]["busiest_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key"].as_str().unwrap().to_owned(),
                k["in_use"].as_u64().unwrap(),
                k["limit"].as_u64(),
            )
        })
        .collect()
}

async fn unusual_keys(srv: &Srv) {
    let (s, body) = srv
        .put(
            "/v1/limiters/orgs",
            json!({"concurrency": 100, "per_key": {"concurrency": 2}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let acquire = |key: &str| json!({"key": key, "wait_ms": 0});
    let mut permits = Vec::new();
    for key in keys() {
        // An override through the path: this key may hold 1.
        let path = format!("/v1/limiters/orgs/keys/{}", encode(&key));
        let (s, body) = srv.put(&path, json!({"concurrency": 1})).await;
        assert_eq!(s, 200, "override of {key:?}: {body}");
        let (s, first) = srv.post("/v1/limiters/orgs/acquire", acquire(&key)).await;
        assert_eq!(s, 200, "{key:?}: {first}");
        permits.push(first["permit_id"].as_str().unwrap().to_owned());
        // The override holds: it is the same key.
        let (s, second) = srv.post("/v1/limiters/orgs/acquire", acquire(&key)).await;
        assert_eq!(s, 429, "{key:?} over its override of 1: {second}");
    }
    let (_, status) = srv.get("/v1/limiters/orgs").await;
    assert_eq!(status["in_use"], keys().len(), "{status}");
    assert_eq!(status["keyed"]["key_count"], keys().len(), "{status}");
    assert_eq!(status["keyed"]["overrides"], keys().len(), "{status}");
    let mut seen = busiest(&status);
    seen.sort();
    let mut want: Vec<(String, u64, Option<u64>)> = keys()
        .into_iter()
        .take(10)
        .map(|k| (k, 1, Some(1)))
        .collect();
    // The listing shows 10 of the 11 (ties by key): every one shown is exactly a key sent.
    want.sort();
    for k in &seen {
        assert!(
            keys().contains(&k.0) && k.1 == 1 && k.2 == Some(1),
            "listed {k:?}"
        );
    }
    assert_eq!(seen.len(), 10, "{seen:?} vs {want:?}");
    // Removing the overrides through the path: back to the default of 2 each.
    for key in keys() {
        let path = format!("/v1/limiters/orgs/keys/{}", encode(&key));
        let (s, body) = srv.send(reqwest::Method::DELETE, &path, None).await;
        assert_eq!(s, 200, "delete override of {key:?}: {body}");
        let (s, again) = srv.post("/v1/limiters/orgs/acquire", acquire(&key)).await;
        assert_eq!(s, 200, "{key:?} under the default of 2: {again}");
        permits.push(again["permit_id"].as_str().unwrap().to_owned());
    }
    let (_, status) = srv.get("/v1/limiters/orgs").await;
    assert_eq!(status["keyed"]["overrides"], 0, "{status}");
    assert_eq!(status["in_use"], 2 * keys().len(), "{status}");
    for permit in permits {
        let (s, _) = srv
            .post(&format!("/v1/permits/{permit}/release"), json!({}))
            .await;
        assert_eq!(s, 200);
    }
    let (_, status) = srv.get("/v1/limiters/orgs").await;
    assert_eq!(status["keyed"]["key_count"], 0, "{status}");
    assert_eq!(status["in_use"], 0, "{status}");

    // 257 characters, narrow or wide: refused naming key, in the body and in the path.
    for long in ["k".repeat(257), "é".repeat(257), "🦀".repeat(257)] {
        let (s, body) = srv.post("/v1/limiters/orgs/acquire", acquire(&long)).await;
        assert_eq!((s, body["error"].as_str()), (400, Some("invalid_request")));
        assert!(body["message"].as_str().unwrap().contains("key"), "{body}");
        let path = format!("/v1/limiters/orgs/keys/{}", encode(&long));
        let (s, body) = srv.put(&path, json!({"weight": 2})).await;
        assert_eq!((s, body["error"].as_str()), (400, Some("invalid_request")));
        assert!(body["message"].as_str().unwrap().contains("key"), "{body}");
    }
    // A lone surrogate (not a character) and a control character: 400, never a 500.
    for raw in [
        r#"{"key": "\ud800"}"#,
        r#"{"key": "a\u0000b"}"#,
        r#"{"key": "a\u007fb"}"#,
    ] {
        let reply = srv
            .http
            .post(format!("{}/v1/limiters/orgs/acquire", srv.base))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        let code = reply.status().as_u16();
        let body: Value = reply.json().await.unwrap();
        assert_eq!(code, 400, "{raw}: {body}");
        assert!(
            body["error"].is_string() && body["message"].is_string(),
            "{body}"
        );
    }
    let (_, status) = srv.get("/v1/limiters/orgs").await;
    assert_eq!(status["keyed"]["key_count"], 0, "{status}");
    assert_eq!(status["keyed"]["overrides"], 0, "{status}");
}
