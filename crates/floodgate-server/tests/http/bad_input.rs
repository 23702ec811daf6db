//! Bad input: each class answers 4xx with the JSON error shape, naming the field.

use std::net::SocketAddr;

use common::PATIENCE;
use floodgate_server::server::ServerOptions;
use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::common;
use super::harness::*;

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
    assert_eq!(list.json["limiters"], json!([]));

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
