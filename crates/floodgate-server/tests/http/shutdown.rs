//! Graceful shutdown, and socket-less handler tests (`router` + `oneshot`).

use axum::body::Body;
use common::{PATIENCE, POLL};
use floodgate::{Floodgate, LimiterSpec};
use floodgate_server::server::{self};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tower::ServiceExt;

use super::common;
use super::harness::*;

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
