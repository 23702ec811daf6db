//! The bearer token on every `/v1` route and on `/metrics`; read-only servers.

use common::num;
use floodgate::{Floodgate, LimiterSpec};
use floodgate_server::server::ServerOptions;
use reqwest::{Method, StatusCode};
use serde_json::json;

use super::common;
use super::harness::*;

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
