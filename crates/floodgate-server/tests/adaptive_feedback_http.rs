//! Hostile feedback over real HTTP (a server on 127.0.0.1:0), on the embedded store and on a
//! real `redis-server`:
//!
//! - bad bodies (a latency past a double's range, past a day, negative, a string; an unknown
//!   outcome; a missing outcome; an extra field; not JSON; a key on a plain limiter) are 4xx
//!   with `{error, message}`, and none moves the limit;
//! - feedback for an unknown limiter is a 404; for a limiter re-created without an adaptive
//!   range it moves nothing;
//! - a flood of throttles lowers the limit under the permits held: holders keep them (their
//!   releases answer `true`), nothing is granted until in-use (the test's own count of what it
//!   holds) is below the limit read from status, and then exactly what fits is.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use common::Srv;
use floodgate::{Floodgate, MemoryStore, RedisConfig, RedisStore};
use floodgate_server::server::ServerOptions;
use serde_json::{json, Value};

/// A raw body (not necessarily JSON) posted to `path`: the status and the answer as JSON.
async fn post_raw(srv: &Srv, path: &str, body: &str) -> (u16, Value) {
    let resp = srv
        .http
        .post(format!("{}{path}", srv.base))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn assert_error(status: u16, body: &Value, what: &str) {
    assert!((400..500).contains(&status), "{what}: {status} {body}");
    assert!(body["error"].is_string(), "{what}: {body}");
    assert!(body["message"].is_string(), "{what}: {body}");
}

async fn limit(srv: &Srv, name: &str) -> u64 {
    let (status, body) = srv.get(&format!("/v1/limiters/{name}")).await;
    assert_eq!(status, 200, "{body}");
    body["limit"].as_u64().unwrap()
}

async fn hostile(srv: Srv) {
    for algorithm in ["aimd", "gradient"] {
        let name = format!("fb-{algorithm}");
        let path = format!("/v1/limiters/{name}");
        let (status, body) = srv
            .put(
                &path,
                json!({"concurrency": 8, "lease_ms": 3_600_000,
                       "adaptive": {"min": 2, "max": 16, "algorithm": algorithm,
                                    "cooldown_ms": 0}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let feedback = format!("{path}/feedback");
        for bad in [
            r#"{"outcome": "ok", "latency_ms": 1e309}"#,
            r#"{"outcome": "ok", "latency_ms": 86400000.001}"#,
            r#"{"outcome": "ok", "latency_ms": -0.001}"#,
            r#"{"outcome": "ok", "latency_ms": "5"}"#,
            r#"{"outcome": "ok", "latency_ms": null}"#,
            r#"{"outcome": "OK"}"#,
            r#"{"outcome": "throttled", "extra": 1}"#,
            r#"{"latency_ms": 5}"#,
            r#"{"outcome": 1}"#,
            r#"{"outcome": "throttled", "key": "k"}"#,
            r#"{"outcome": "throttled""#,
            "",
        ] {
            let (status, body) = post_raw(&srv, &feedback, bad).await;
            assert_error(status, &body, bad);
            assert_eq!(limit(&srv, &name).await, 8, "{bad} moved nothing");
        }
        // Edges that are valid: no latency at all, zero, and exactly a day.
        for ok in [
            json!({"outcome": "ok"}),
            json!({"outcome": "ok", "latency_ms": 0}),
            json!({"outcome": "error", "latency_ms": 86_400_000}),
        ] {
            let (status, body) = srv.post(&feedback, ok.clone()).await;
            assert_eq!(status, 200, "{ok}: {body}");
        }

        // Hold all 8, then a flood of throttles (latency 0: every one is news).
        let mut held: Vec<String> = Vec::new();
        for _ in 0..8 {
            let (status, grant) = srv
                .post(&format!("{path}/acquire"), json!({"wait_ms": 0}))
                .await;
            assert_eq!(status, 200, "{grant}");
            held.push(grant["permit_id"].as_str().unwrap().to_owned());
        }
        for _ in 0..200 {
            let (status, body) = srv
                .post(&feedback, json!({"outcome": "throttled", "latency_ms": 0}))
                .await;
            assert_eq!(status, 200, "{body}");
            let l = body["limit"].as_u64().unwrap();
            assert!((2..=16).contains(&l), "{l}");
        }
        let lowered = limit(&srv, &name).await;
        assert_eq!(lowered, 2, "{algorithm}: a flood of throttles ends at min");
        let (_, status) = srv.get(&path).await;
        assert_eq!(
            status["in_use"], 8,
            "holders above the limit keep their permits"
        );
        // Release one at a time: an acquire is granted only once the witness holds fewer than
        // the limit, and never takes in-use past it.
        while let Some(id) = held.pop() {
            let (status, body) = srv
                .post(&format!("/v1/permits/{id}/release"), json!({}))
                .await;
            assert_eq!((status, &body["released"]), (200, &json!(true)), "{body}");
            let l = limit(&srv, &name).await;
            let (status, grant) = srv
                .post(&format!("{path}/acquire"), json!({"wait_ms": 0}))
                .await;
            if (held.len() as u64) < l {
                assert_eq!(status, 200, "{} held under limit {l}: {grant}", held.len());
                held.push(grant["permit_id"].as_str().unwrap().to_owned());
                // Give it straight back so the loop keeps draining.
                let id = held.pop().unwrap();
                srv.post(&format!("/v1/permits/{id}/release"), json!({}))
                    .await;
            } else {
                assert_eq!(
                    status,
                    429,
                    "{} held, limit {l}: over-admitted {grant}",
                    held.len()
                );
            }
        }

        // Re-created without an adaptive range: feedback is counted and moves nothing.
        let (status, _) = srv.send(reqwest::Method::DELETE, &path, None).await;
        assert!(status == 200 || status == 204, "{status}");
        let (status, body) = srv.put(&path, json!({"concurrency": 5})).await;
        assert_eq!(status, 200, "{body}");
        for outcome in ["throttled", "ok", "throttled"] {
            let (status, body) = srv.post(&feedback, json!({"outcome": outcome})).await;
            assert_eq!((status, body["limit"].as_u64()), (200, Some(5)), "{body}");
        }
    }
    let (status, body) = srv
        .post(
            "/v1/limiters/nobody/feedback",
            json!({"outcome": "throttled"}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_error(status, &body, "unknown limiter");
    srv.served.stop().await;
}

#[tokio::test]
async fn hostile_feedback_on_the_embedded_store() {
    let srv = Srv::serve(
        Floodgate::with_store(MemoryStore::new()),
        ServerOptions::default(),
    )
    .await;
    hostile(srv).await;
}

#[tokio::test]
async fn hostile_feedback_on_redis() {
    let redis = support::RedisServer::start();
    let store = RedisStore::connect(RedisConfig::new(redis.url()))
        .await
        .unwrap();
    let srv = Srv::serve(Floodgate::with_store(store), ServerOptions::default()).await;
    hostile(srv).await;
}
