//! Abusive clients beyond what `docs/openapi.yaml` declares (so beyond schemathesis): headers
//! (many, duplicated, non-UTF-8, bad lengths, bodies that never end, `Expect`), paths
//! (percent-encoding, NUL, unicode, 10 KB segments), query strings, methods, numbers at and past
//! every bound, deep JSON and 100 MB bodies, all over raw TCP against the real server on
//! `127.0.0.1:0`.
//!
//! Every answer must be a 4xx with a JSON `{error, message}` body (never a 5xx, never a connection
//! closed without an answer), and afterwards an independent witness must be intact: a permit
//! acquired before the abuse is still held and extendable, its limiter's in use, holders,
//! counters and spec are unchanged, and no limiter appeared or vanished.
//!
//! No assertion is about elapsed time: the body timeout is short so that lying bodies are
//! answered soon, and every read is bounded by `PATIENCE`.

#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod auth;
mod framing;
mod numbers;
mod targets;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Served, PATIENCE};
use floodgate::{Floodgate, LimiterSpec};
use floodgate_server::server::ServerOptions;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One answer read off the socket.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    /// The head, lowercased (header names and values).
    pub(crate) head: String,
    pub(crate) json: Value,
    /// The whole answer as text, for failure messages.
    pub(crate) text: String,
}

impl Answer {
    /// Asserts a 4xx whose body is `{error, message}` JSON; returns the message.
    #[track_caller]
    pub(crate) fn api_error(&self, what: &str) -> String {
        assert!(
            (400..500).contains(&self.status),
            "{what}: expected a 4xx, got {}",
            self.text
        );
        assert!(
            self.head.contains("content-type: application/json"),
            "{what}: not JSON: {}",
            self.text
        );
        assert!(
            self.json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: no error code: {}",
            self.text
        );
        let message = self.json["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{what}: no message: {}", self.text);
        message.to_owned()
    }

    /// Asserts a 4xx JSON error with this status and code whose message names `field`.
    #[track_caller]
    pub(crate) fn refused(&self, status: u16, code: &str, field: Option<&str>, what: &str) {
        let message = self.api_error(what);
        assert_eq!(self.status, status, "{what}: {}", self.text);
        assert_eq!(self.json["error"], code, "{what}: {}", self.text);
        if let Some(field) = field {
            assert!(
                message.contains(field),
                "{what}: the message does not name {field}: {}",
                self.text
            );
        }
    }
}

/// Every answer in `bytes` (interim 1xx answers skipped), bodies cut by `Content-Length`.
pub(crate) fn answers(bytes: &[u8]) -> Vec<Answer> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).to_ascii_lowercase();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {:?}", String::from_utf8_lossy(rest)));
        let after = &rest[end + 4..];
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(if status < 200 { 0 } else { after.len() })
            .min(after.len());
        let body = &after[..length];
        let text = String::from_utf8_lossy(&rest[..end + 4 + length]).into_owned();
        rest = &after[length..];
        if status < 200 {
            continue;
        }
        out.push(Answer {
            status,
            head,
            json: serde_json::from_slice(body).unwrap_or(Value::Null),
            text,
        });
    }
    out
}

/// Writes `request` (a failed write is fine: the server may answer and close first), then
/// reads until the server closes; every answer it sent. Panics when the server keeps the
/// connection open past `PATIENCE`.
pub(crate) async fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<Answer> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    read_all(&mut stream).await
}

pub(crate) async fn read_all(stream: &mut TcpStream) -> Vec<Answer> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Err(_) => panic!(
                "the server neither answered nor closed: {:?}",
                String::from_utf8_lossy(&out)
            ),
            // A reset after the answer (unread request bytes) ends the read like a close.
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    answers(&out)
}

/// The one answer to `request`; panics when the connection closed without one.
pub(crate) async fn one(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut all = exchange(addr, request).await;
    assert!(
        !all.is_empty(),
        "the connection closed without an answer to {:?}",
        String::from_utf8_lossy(&request[..request.len().min(300)])
    );
    all.remove(0)
}

/// A request with a JSON body, `Connection: close`.
pub(crate) fn json_request(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A bodiless request, `Connection: close`.
pub(crate) fn bare(method: &str, path: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").into_bytes()
}

/// The real server with limiters to abuse and a witness: a permit of `w` held through it all.
pub(crate) struct Abused {
    pub(crate) served: Served,
    /// The witness permit's id.
    pub(crate) permit: String,
    /// `w`'s status before the abuse, fields that abuse must not move.
    pub(crate) before: Value,
    /// The bearer token the server requires, if any (the witness's own requests carry it).
    pub(crate) token: Option<String>,
}

/// `request` with `Authorization: Bearer TOKEN` added after its request line.
pub(crate) fn with_token(mut request: Vec<u8>, token: Option<&str>) -> Vec<u8> {
    if let Some(token) = token {
        let at = request
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(request.len(), |i| i + 2);
        let header = format!("authorization: Bearer {token}\r\n");
        request.splice(at..at, header.into_bytes());
    }
    request
}

/// Fields of `w`'s status that no abuse may change.
pub(crate) fn stable(status: &Value) -> Value {
    let c = &status["counters"];
    json!({
        "in_use": status["in_use"], "holders": status["holders"], "waiting": status["waiting"],
        "limit": status["limit"], "concurrency": status["concurrency"],
        "lease_ms": status["lease_ms"], "max_wait_ms": status["max_wait_ms"],
        "max_queue": status["max_queue"], "granted": c["granted"], "released": c["released"],
        "expired": c["expired"], "cancelled": c["cancelled"], "timed_out": c["timed_out"],
    })
}

/// The limiters every test starts with.
pub(crate) const NAMES: [&str; 4] = ["k", "p", "r", "w"];

impl Abused {
    pub(crate) async fn start() -> Abused {
        Abused::start_with_token(None).await
    }

    /// [`start`](Self::start), on a server that requires `token` on `/v1`.
    pub(crate) async fn start_with_token(token: Option<&str>) -> Abused {
        let auth = |request: Vec<u8>| with_token(request, token);
        let gate = Floodgate::in_memory();
        gate.define("w", LimiterSpec::concurrency(2)).await.unwrap();
        gate.define(
            "p",
            LimiterSpec::concurrency(1_000).with_max_wait(Duration::from_millis(50)),
        )
        .await
        .unwrap();
        gate.define(
            "r",
            LimiterSpec::rate(floodgate::RateSpec::per(1_000, Duration::from_secs(1))),
        )
        .await
        .unwrap();
        let served = Served::start(
            gate,
            ServerOptions {
                body_timeout: Duration::from_millis(300),
                token: token.map(str::to_owned),
                ..ServerOptions::default()
            },
        )
        .await;
        let keyed = one(
            served.addr,
            &auth(json_request(
                "PUT",
                "/v1/limiters/k",
                r#"{"per_key": {"concurrency": 2}}"#,
            )),
        )
        .await;
        assert_eq!(keyed.status, 200, "{}", keyed.text);
        let granted = one(
            served.addr,
            &auth(json_request(
                "POST",
                "/v1/limiters/w/acquire",
                r#"{"lease_ms": 3600000, "holder": "witness"}"#,
            )),
        )
        .await;
        assert_eq!(granted.status, 200, "{}", granted.text);
        let permit = granted.json["permit_id"].as_str().unwrap().to_owned();
        let w = one(served.addr, &auth(bare("GET", "/v1/limiters/w"))).await;
        assert_eq!(w.json["in_use"], 1, "{}", w.text);
        Abused {
            served,
            permit,
            before: stable(&w.json),
            token: token.map(str::to_owned),
        }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.served.addr
    }

    /// The witness: the server still serves, the permit is held and extendable, `w` did not
    /// move and the set of limiters is what it was.
    pub(crate) async fn intact(&self, after: &str) {
        let auth = |request: Vec<u8>| with_token(request, self.token.as_deref());
        let health = one(self.addr(), &bare("GET", "/healthz")).await;
        assert_eq!(health.status, 200, "after {after}: {}", health.text);
        let w = one(self.addr(), &auth(bare("GET", "/v1/limiters/w"))).await;
        assert_eq!(w.status, 200, "after {after}: {}", w.text);
        assert_eq!(stable(&w.json), self.before, "after {after}: w moved");
        let path = format!("/v1/permits/{}/extend", self.permit);
        let extended = one(
            self.addr(),
            &auth(json_request("POST", &path, r#"{"lease_ms": 3600000}"#)),
        )
        .await;
        assert_eq!(extended.status, 200, "after {after}: {}", extended.text);
        let list = one(self.addr(), &auth(bare("GET", "/v1/limiters"))).await;
        let mut names: Vec<&str> = list.json["limiters"]
            .as_array()
            .unwrap_or_else(|| panic!("after {after}: {}", list.text))
            .iter()
            .filter_map(|l| l["name"].as_str())
            .collect();
        names.sort_unstable();
        assert_eq!(names, NAMES, "after {after}: the limiters changed");
    }

    pub(crate) async fn stop(self) {
        self.served.stop().await;
    }
}
