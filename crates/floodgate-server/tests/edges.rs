//! Issue 12's wrong answers at the edges of the API (items 12, 13, 14, 16), each against the real
//! server on `127.0.0.1:0`: extend of a permit nobody granted, the bearer scheme's letter case,
//! the media type of a body (and no CORS), and the exact shapes `docs/openapi.yaml` allows
//! (no arrays, no `null` where a field is not nullable, no `.`/`..` names).

#![allow(clippy::unwrap_used)]

mod common;

use common::Srv;
use floodgate::{Floodgate, LimiterSpec};
use floodgate_server::server::ServerOptions;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request written verbatim on a fresh connection; the answer's status and JSON body.
async fn raw(srv: &Srv, request: &str) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(srv.served.addr)
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Answer {
        status,
        headers: reqwest::header::HeaderMap::new(),
        json: serde_json::from_str(&body).unwrap_or(Value::Null),
        text,
    }
}

/// Status, headers and the JSON body (`Null` when not JSON).
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    json: Value,
    text: String,
}

impl Answer {
    #[track_caller]
    fn error(&self, status: u16, code: &str) -> &Self {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(self.json["error"], code, "{}", self.text);
        assert!(
            self.json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            self.text
        );
        self
    }

    #[track_caller]
    fn message_starts(&self, field: &str) {
        let message = self.json["message"].as_str().unwrap_or("");
        assert!(
            message.starts_with(&format!("{field}:")),
            "expected the message to name {field}: {}",
            self.text
        );
    }
}

impl Srv {
    async fn start(options: ServerOptions) -> Srv {
        let gate = Floodgate::in_memory();
        gate.define("x", LimiterSpec::concurrency(2)).await.unwrap();
        Srv::serve(gate, options).await
    }

    /// `body` sent verbatim with the given content type (none when `None`).
    async fn verbatim(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Option<&str>,
        auth: Option<&str>,
    ) -> Answer {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        if let Some(body) = body {
            req = req.body(body.to_owned());
        }
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            json,
            text,
        }
    }

    async fn json(&self, method: Method, path: &str, body: &str) -> Answer {
        self.verbatim(method, path, Some("application/json"), Some(body), None)
            .await
    }
}

// ---------------------------------------------------------------------------------------------
// Item 12: extend of a permit nobody granted
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_of_token_zero_is_lost_without_fail_open() {
    let srv = Srv::start(ServerOptions::default()).await;
    // Unknown limiter, known limiter: neither granted token 0 (only fail_open does).
    for id in ["ANY.0", "x.0"] {
        srv.json(
            Method::POST,
            &format!("/v1/permits/{id}/extend"),
            r#"{"lease_ms": 1000}"#,
        )
        .await
        .error(410, "permit_lost");
    }
    // The lease is checked before anything else, as for any other permit.
    srv.json(
        Method::POST,
        "/v1/permits/x.0/extend",
        r#"{"lease_ms": 999999999999}"#,
    )
    .await
    .error(400, "invalid_request")
    .message_starts("lease_ms");
    srv.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_of_token_zero_checks_the_limiter_when_failing_open() {
    let srv = Srv::start(ServerOptions {
        fail_open: true,
        ..ServerOptions::default()
    })
    .await;
    srv.json(Method::POST, "/v1/permits/ANY.0/extend", "{}")
        .await
        .error(410, "permit_lost");
    let ok = srv
        .json(
            Method::POST,
            "/v1/permits/x.0/extend",
            r#"{"lease_ms": 5000}"#,
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.json["lease_ms"], 5000);
    srv.json(Method::POST, "/v1/permits/x.0/extend", r#"{"lease_ms": 0}"#)
        .await
        .error(400, "invalid_request")
        .message_starts("lease_ms");
    srv.served.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Item 13: the bearer scheme is case-insensitive
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_scheme_in_any_letter_case() {
    let srv = Srv::start(ServerOptions {
        token: Some("t0k3n".into()),
        ..ServerOptions::default()
    })
    .await;
    for auth in ["Bearer t0k3n", "bearer t0k3n", "BEARER t0k3n"] {
        let a = srv
            .verbatim(Method::GET, "/v1/limiters", None, None, Some(auth))
            .await;
        assert_eq!(a.status, 200, "{auth}: {}", a.text);
    }
    for auth in ["bearer wrong", "Basic t0k3n", "t0k3n"] {
        srv.verbatim(Method::GET, "/v1/limiters", None, None, Some(auth))
            .await
            .error(401, "unauthorized");
    }
    srv.served.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Item 14: bodies must be application/json; no CORS
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_without_json_content_type_are_415() {
    let srv = Srv::start(ServerOptions::default()).await;
    // What a web page can send cross-origin without a preflight.
    let simple = [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ];
    let routes = [
        (Method::POST, "/v1/limiters/x/acquire", r#"{"wait_ms": 0}"#),
        (Method::POST, "/v1/limiters/x/schedule", r#"{"count": 1}"#),
        (
            Method::POST,
            "/v1/limiters/x/feedback",
            r#"{"outcome": "ok"}"#,
        ),
        (Method::POST, "/v1/permits/x.1/extend", r#"{}"#),
        (Method::POST, "/v1/permits/x.1/release", r#"{}"#),
        (Method::PUT, "/v1/limiters/y", r#"{"concurrency": 1}"#),
    ];
    for (method, path, body) in &routes {
        for ct in simple {
            srv.verbatim(method.clone(), path, ct, Some(body), None)
                .await
                .error(415, "unsupported_media_type")
                .message_starts("content-type");
            // Without a body too (an acquire with no body would still take a permit).
            if !path.ends_with("/release") {
                srv.verbatim(method.clone(), path, ct, None, None)
                    .await
                    .error(415, "unsupported_media_type");
            }
        }
    }
    // Nothing was taken or created by all that.
    let x = srv
        .verbatim(Method::GET, "/v1/limiters/x", None, None, None)
        .await;
    assert_eq!(x.json["in_use"], 0, "{}", x.text);
    assert_eq!(x.json["counters"]["granted"], 0, "{}", x.text);
    srv.verbatim(Method::GET, "/v1/limiters/y", None, None, None)
        .await
        .error(404, "unknown_limiter");
    // application/json with a charset parameter, in any case, works; so does a bare release.
    let granted = srv
        .verbatim(
            Method::POST,
            "/v1/limiters/x/acquire",
            Some("Application/JSON; charset=utf-8"),
            Some("{}"),
            None,
        )
        .await;
    assert_eq!(granted.status, 200, "{}", granted.text);
    let id = granted.json["permit_id"].as_str().unwrap().to_owned();
    let released = srv
        .verbatim(
            Method::POST,
            &format!("/v1/permits/{id}/release"),
            None,
            None,
            None,
        )
        .await;
    assert_eq!(released.status, 200, "{}", released.text);
    assert_eq!(released.json["released"], true);
    srv.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cors_headers_are_sent() {
    let srv = Srv::start(ServerOptions::default()).await;
    let preflight = srv
        .http
        .request(
            Method::OPTIONS,
            format!("{}/v1/limiters/x/acquire", srv.base),
        )
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert_ne!(preflight.status().as_u16(), 200);
    for (name, _) in preflight.headers() {
        assert!(!name.as_str().starts_with("access-control-"), "{name}");
    }
    let a = srv
        .json(Method::POST, "/v1/limiters/x/acquire", r#"{"wait_ms": 0}"#)
        .await;
    assert_eq!(a.status, 200);
    for (name, _) in &a.headers {
        assert!(!name.as_str().starts_with("access-control-"), "{name}");
    }
    srv.served.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Item 16: the server and docs/openapi.yaml agree on shapes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrays_are_not_bodies() {
    let srv = Srv::start(ServerOptions::default()).await;
    srv.json(Method::PUT, "/v1/limiters/arr", "[5, 1000, 1000, 10]")
        .await
        .error(400, "invalid_request")
        .message_starts("body");
    srv.json(
        Method::PUT,
        "/v1/limiters/arr",
        r#"{"rate": [100, 1000, 5]}"#,
    )
    .await
    .error(400, "invalid_request")
    .message_starts("rate");
    srv.json(Method::POST, "/v1/limiters/x/acquire", "[1]")
        .await
        .error(400, "invalid_request");
    for body in ["5", "\"x\"", "[]", "[1]", "true", "null"] {
        let answer = srv.json(Method::POST, "/v1/limiters/x/acquire", body).await;
        answer.error(400, "invalid_request");
        assert_eq!(
            answer.json["message"], "body: must be a JSON object",
            "{body}"
        );
    }
    // A field that takes an object, given another type: no Rust type's name in the message.
    let answer = srv
        .json(Method::PUT, "/v1/limiters/arr", r#"{"rate": 5}"#)
        .await;
    answer.error(400, "invalid_request").message_starts("rate");
    assert!(
        answer.text.contains("expected a JSON object") && !answer.text.contains("struct"),
        "{}",
        answer.text
    );
    srv.verbatim(Method::GET, "/v1/limiters/arr", None, None, None)
        .await
        .error(404, "unknown_limiter");
    srv.served.stop().await;
}

/// A required field left out is named first in the message, as every field at fault is
/// (api.md: "the message starts with the field"); it was reported as `body` (or `rate`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_required_field_is_named_first() {
    let srv = Srv::start(ServerOptions::default()).await;
    srv.json(
        Method::PUT,
        "/v1/limiters/paced",
        r#"{"rate": {"limit": 10, "period_ms": 1000}}"#,
    )
    .await;
    let cases = [
        (Method::POST, "/v1/limiters/paced/schedule", "{}", "count"),
        (Method::POST, "/v1/limiters/paced/feedback", "{}", "outcome"),
        (
            Method::POST,
            "/v1/limiters/paced/unschedule",
            r#"{"count": 1}"#,
            "reservation",
        ),
        (
            Method::PUT,
            "/v1/limiters/other",
            r#"{"rate": {"limit": 5}}"#,
            "rate.period_ms",
        ),
        (
            Method::PUT,
            "/v1/limiters/other",
            r#"{"concurrency": 2, "adaptive": {"min": 1}}"#,
            "adaptive.max",
        ),
    ];
    for (method, path, body, field) in cases {
        srv.json(method, path, body)
            .await
            .error(400, "invalid_request")
            .message_starts(field);
    }
    srv.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_is_refused_where_the_spec_is_not_nullable() {
    let srv = Srv::start(ServerOptions::default()).await;
    let cases = [
        (Method::POST, "/v1/limiters/x/acquire", "permits"),
        (Method::POST, "/v1/limiters/x/acquire", "lease_ms"),
        (Method::POST, "/v1/limiters/x/acquire", "wait_ms"),
        (Method::POST, "/v1/limiters/x/acquire", "holder"),
        (Method::PUT, "/v1/limiters/x", "lease_ms"),
        (Method::PUT, "/v1/limiters/x", "max_wait_ms"),
        (Method::PUT, "/v1/limiters/x", "max_queue"),
        (Method::POST, "/v1/permits/x.1/extend", "lease_ms"),
    ];
    for (method, path, field) in cases {
        srv.json(method, path, &json!({ field: null }).to_string())
            .await
            .error(400, "invalid_request")
            .message_starts(field);
    }
    srv.json(
        Method::POST,
        "/v1/limiters/x/feedback",
        r#"{"outcome": "ok", "latency_ms": null}"#,
    )
    .await
    .error(400, "invalid_request")
    .message_starts("latency_ms");
    srv.json(
        Method::PUT,
        "/v1/limiters/x",
        r#"{"rate": {"limit": 1, "period_ms": 1000, "burst": null}}"#,
    )
    .await
    .error(400, "invalid_request")
    .message_starts("rate.burst");
    srv.json(
        Method::PUT,
        "/v1/limiters/x",
        r#"{"adaptive": {"min": 1, "max": 2, "increase": null}}"#,
    )
    .await
    .error(400, "invalid_request")
    .message_starts("adaptive.increase");
    // The nullable ones still take null: rate-only after removing concurrency.
    let put = srv
        .json(
            Method::PUT,
            "/v1/limiters/x",
            r#"{"concurrency": null, "rate": {"limit": 5, "period_ms": 1000}, "adaptive": null}"#,
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.text);
    assert_eq!(put.json["concurrency"], Value::Null);
    srv.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_names_are_refused() {
    let srv = Srv::start(ServerOptions::default()).await;
    // Sent raw: URL libraries (reqwest's included) remove `.`/`..` path steps, even
    // percent-encoded ones, before a request leaves; a hand-written client need not.
    for name in [".", "..", "%2E", "%2e%2E"] {
        let body = r#"{"concurrency": 1}"#;
        let put = raw(
            &srv,
            &format!(
                "PUT /v1/limiters/{name} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
        .await;
        put.error(400, "invalid_request").message_starts("name");
        let acquire = raw(
            &srv,
            &format!(
                "POST /v1/limiters/{name}/acquire HTTP/1.1\r\nhost: x\r\n\
                 content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
            ),
        )
        .await;
        acquire.error(400, "invalid_request").message_starts("name");
    }
    // A permit id whose limiter part is `..` is not a permit id.
    srv.json(Method::POST, "/v1/permits/..%2E5/extend", "{}")
        .await
        .error(400, "invalid_request")
        .message_starts("permit_id");
    // Names with dots in them are still fine.
    let ok = srv
        .json(Method::PUT, "/v1/limiters/...", r#"{"concurrency": 1}"#)
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    srv.served.stop().await;
}

/// The `requestBody.required` docs/openapi.yaml gives the POST of `path`.
fn spec_body_required(path: &str) -> bool {
    let spec = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.yaml"),
    )
    .unwrap();
    let start = spec
        .find(&format!("\n  {path}:\n"))
        .expect("the path is in the spec");
    let block = &spec[start + 1..];
    let end = block[1..].find("\n  /").map_or(block.len(), |i| i + 1);
    let body = &block[..end][block.find("requestBody:").expect("a requestBody")..];
    let line = body
        .lines()
        .find(|l| l.trim_start().starts_with("required:"))
        .expect("requestBody.required");
    line.trim_start() == "required: true"
}

/// Acquire and extend take no body (every field is optional; an empty one is `{}`), and the
/// spec says so (`required: false`); the media type is still required (415 without it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_and_extend_take_no_body_as_the_spec_says() {
    let srv = Srv::start(ServerOptions::default()).await;
    let put = srv
        .json(Method::PUT, "/v1/limiters/nobody", r#"{"concurrency": 1}"#)
        .await;
    assert_eq!(put.status, 200, "{}", put.text);
    let json = Some("application/json");
    let acquired = srv
        .verbatim(
            Method::POST,
            "/v1/limiters/nobody/acquire",
            json,
            None,
            None,
        )
        .await;
    assert_eq!(acquired.status, 200, "{}", acquired.text);
    let id = acquired.json["permit_id"].as_str().unwrap().to_owned();
    let extended = srv
        .verbatim(
            Method::POST,
            &format!("/v1/permits/{id}/extend"),
            json,
            None,
            None,
        )
        .await;
    assert_eq!(extended.status, 200, "{}", extended.text);
    srv.verbatim(
        Method::POST,
        "/v1/limiters/nobody/acquire",
        None,
        None,
        None,
    )
    .await
    .error(415, "unsupported_media_type");
    assert!(!spec_body_required("/v1/limiters/{name}/acquire"));
    assert!(!spec_body_required("/v1/permits/{permit_id}/extend"));
    // The ones that need a field still say so.
    assert!(spec_body_required("/v1/limiters/{name}/schedule"));
    srv.served.stop().await;
}
