//! The harness the other modules share: replies, a test server, metrics lookups.

use std::net::SocketAddr;
use std::time::Duration;

use common::{Served, PATIENCE, POLL};
use floodgate::Floodgate;
use floodgate_server::server::ServerOptions;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::common;

pub(crate) const TOKEN: &str = "s3cret-token";

/// A wait long enough that it never ends during a test.
pub(crate) const LONG_WAIT_MS: u64 = 600_000;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// One answer: status, headers, raw text and the JSON body (`Null` when not JSON).
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) text: String,
    pub(crate) json: Value,
}

impl Reply {
    pub(crate) async fn read(resp: reqwest::Response) -> Reply {
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            text,
            json,
        }
    }

    pub(crate) fn str(&self, key: &str) -> &str {
        self.json
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no string {key:?} in {} {}", self.status, self.text))
    }

    pub(crate) fn u64(&self, key: &str) -> u64 {
        self.json
            .get(key)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("no integer {key:?} in {} {}", self.status, self.text))
    }

    #[track_caller]
    pub(crate) fn assert_ok(&self) -> &Self {
        assert_eq!(self.status, StatusCode::OK, "expected 200, got {self:?}");
        self
    }

    /// Asserts an error answer of the API's shape: the status, a JSON content type, the `error`
    /// code, a non-empty `message` and, when `field` is given, that the message starts with it.
    #[track_caller]
    pub(crate) fn assert_error(&self, status: u16, code: &str, field: Option<&str>) -> &Self {
        assert_eq!(self.status.as_u16(), status, "wrong status: {self:?}");
        let content_type = self
            .headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            content_type.starts_with("application/json"),
            "error body is not JSON (content-type {content_type:?}): {self:?}"
        );
        assert_eq!(
            self.json.get("error").and_then(Value::as_str),
            Some(code),
            "wrong error code: {self:?}"
        );
        let message = self
            .json
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no message: {self:?}"));
        assert!(!message.trim().is_empty(), "empty message: {self:?}");
        if let Some(field) = field {
            assert!(
                message.starts_with(&format!("{field}:")),
                "message does not name the field {field:?}: {message:?}"
            );
        }
        self
    }
}

/// A server on `127.0.0.1:0`, its shutdown trigger and a client.
pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) base: String,
    pub(crate) http: reqwest::Client,
    /// Sent as the bearer token by `request` (the server's own, by default).
    pub(crate) token: Option<String>,
    pub(crate) server: Served,
}

impl TestServer {
    pub(crate) async fn start(options: ServerOptions) -> TestServer {
        TestServer::start_with(Floodgate::in_memory(), options).await
    }

    pub(crate) async fn start_with(gate: Floodgate, options: ServerOptions) -> TestServer {
        let token = options.token.clone();
        let server = Served::start(gate, options).await;
        let addr = server.addr;
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        TestServer {
            addr,
            base: format!("http://{addr}"),
            http,
            token,
            server,
        }
    }

    /// Triggers the shutdown future and checks that `run` returns `Ok`.
    pub(crate) async fn stop(self) {
        self.server.stop().await;
    }

    pub(crate) fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    /// Sends `body` verbatim as `application/json` (no body when `None`; POST and PUT always
    /// say `application/json`, which the server requires of them).
    pub(crate) async fn raw(&self, method: Method, path: &str, body: Option<&str>) -> Reply {
        let writes = method == Method::POST || method == Method::PUT;
        let mut req = self.request(method, path);
        if writes || body.is_some() {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json");
        }
        if let Some(body) = body {
            req = req.body(body.to_owned());
        }
        Reply::read(req.send().await.unwrap()).await
    }

    pub(crate) async fn call(&self, method: Method, path: &str, body: Value) -> Reply {
        self.raw(method, path, Some(&body.to_string())).await
    }

    pub(crate) async fn get(&self, path: &str) -> Reply {
        self.raw(Method::GET, path, None).await
    }

    /// `PUT /v1/limiters/{name}`, expecting 200.
    pub(crate) async fn put_limiter(&self, name: &str, body: Value) -> Value {
        let reply = self
            .call(Method::PUT, &format!("/v1/limiters/{name}"), body)
            .await;
        reply.assert_ok();
        reply.json
    }

    /// `GET /v1/limiters/{name}`, expecting 200.
    pub(crate) async fn status(&self, name: &str) -> Value {
        let reply = self.get(&format!("/v1/limiters/{name}")).await;
        reply.assert_ok();
        reply.json
    }

    pub(crate) async fn acquire(&self, name: &str, body: Value) -> Reply {
        self.call(Method::POST, &format!("/v1/limiters/{name}/acquire"), body)
            .await
    }

    pub(crate) async fn extend(&self, permit_id: &str, body: Value) -> Reply {
        self.call(
            Method::POST,
            &format!("/v1/permits/{permit_id}/extend"),
            body,
        )
        .await
    }

    pub(crate) async fn release(&self, permit_id: &str) -> Reply {
        self.raw(
            Method::POST,
            &format!("/v1/permits/{permit_id}/release"),
            None,
        )
        .await
    }

    /// Releases, expecting `{"released": true}`.
    pub(crate) async fn release_held(&self, permit_id: &str) {
        let reply = self.release(permit_id).await;
        reply.assert_ok();
        assert_eq!(reply.json, json!({"released": true}), "{reply:?}");
    }

    /// Polls the limiter's status until `pred` holds; fails after [`PATIENCE`].
    pub(crate) async fn wait_until(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let status = self.status(name).await;
            if pred(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gave up waiting for {what}; last status {status}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    pub(crate) async fn metrics(&self) -> String {
        let reply = self.get("/metrics").await;
        reply.assert_ok();
        reply.text
    }
}

/// The value of `floodgate_acquire_total{limiter=name, outcome=outcome}`, if exposed.
pub(crate) fn acquire_total(metrics: &str, limiter: &str, outcome: &str) -> Option<f64> {
    let limiter_label = format!("limiter=\"{limiter}\"");
    let outcome_label = format!("outcome=\"{outcome}\"");
    metrics
        .lines()
        .find(|line| {
            line.starts_with("floodgate_acquire_total{")
                && line.contains(&limiter_label)
                && line.contains(&outcome_label)
        })
        .map(|line| line.split_whitespace().last().unwrap().parse().unwrap())
}

pub(crate) fn options() -> ServerOptions {
    ServerOptions::default()
}

pub(crate) fn options_with_token() -> ServerOptions {
    ServerOptions {
        token: Some(TOKEN.to_owned()),
        ..ServerOptions::default()
    }
}
