//! What the HTTP server's integration tests (`http/`, `redis_servers/`, `witness.rs`) share:
//! an in-process server on `127.0.0.1:0`, the polling bounds, a seeded generator and a JSON
//! lookup.

#![allow(dead_code, reason = "each test file uses its own part of this module")]

pub(crate) mod holders;

use std::net::SocketAddr;
use std::time::Duration;

use floodgate::{Floodgate, Store};
use floodgate_server::server::{self, ServerOptions};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a bounded polling loop waits before failing.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);
/// How often a polling loop looks.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// The real server (`floodgate_server::server::run`) in a task of this runtime, on
/// `127.0.0.1:0`, with its shutdown trigger.
pub(crate) struct Served {
    pub(crate) addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Served {
    pub(crate) async fn start<S: Store>(gate: Floodgate<S>, options: ServerOptions) -> Served {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, gate, options, async move {
            let _ = rx.await;
        }));
        Served {
            addr,
            shutdown: Some(tx),
            task,
        }
    }

    /// Triggers the shutdown future and checks that `run` returns `Ok` (the task did not panic).
    pub(crate) async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        let joined = tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("run did not return after the shutdown future completed");
        joined.expect("the server task panicked").unwrap();
    }
}

/// Steele, Lea and Flood's splitmix64: a tiny, good-enough seeded generator.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `lo..=hi` (the modulo bias is irrelevant here).
    pub(crate) fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// The integer at `pointer` in `v`; panics, showing `v`, when there is none.
pub(crate) fn num(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no integer at {pointer} in {v}"))
}

/// An HTTP client for the test servers (environment proxies ignored: they are on loopback).
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// One request to `url` with `body` as JSON, on `http`: the status and the answer as JSON (its
/// text as a JSON string when it is not JSON).
pub(crate) async fn request(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: impl reqwest::IntoUrl,
    body: Option<Value>,
) -> (u16, Value) {
    try_request(http, method, url, body).await.unwrap()
}

/// [`request`], with a failure to connect or to read the answer returned, not a panic (load
/// generators that run while the server stops, or with connections cut on purpose).
pub(crate) async fn try_request(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: impl reqwest::IntoUrl,
    body: Option<Value>,
) -> Result<(u16, Value), reqwest::Error> {
    let mut req = http.request(method, url);
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// [`request`] with a JSON body.
pub(crate) async fn send_json(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: impl reqwest::IntoUrl,
    body: Value,
) -> (u16, Value) {
    request(http, method, url, Some(body)).await
}

/// A GET's answer as JSON, whatever its status.
pub(crate) async fn get_json(http: &reqwest::Client, url: impl reqwest::IntoUrl) -> Value {
    request(http, reqwest::Method::GET, url, None).await.1
}

/// [`request`] on a client of its own (tests that talk to several servers by full URL).
pub(crate) async fn call(
    method: reqwest::Method,
    url: impl reqwest::IntoUrl,
    body: Option<Value>,
) -> (u16, Value) {
    request(&client(), method, url, body).await
}

/// A served server with a client for it: what the HTTP tests start from (each file builds
/// its own with [`Srv::with`] or [`Srv::serve`], on the store and options it needs).
pub(crate) struct Srv {
    /// The server, to stop it or reach its address.
    pub(crate) served: Served,
    /// `http://ADDR`, which request paths follow.
    pub(crate) base: String,
    /// One client for every request, so connections are reused as a real client's are.
    pub(crate) http: reqwest::Client,
}

impl Srv {
    pub(crate) fn with(served: Served) -> Srv {
        Srv {
            base: format!("http://{}", served.addr),
            served,
            http: client(),
        }
    }

    /// The real server on `gate`.
    pub(crate) async fn serve<S: Store>(gate: Floodgate<S>, options: ServerOptions) -> Srv {
        Srv::with(Served::start(gate, options).await)
    }

    /// `path` (after the base) with `body` as JSON: the status and the JSON answer.
    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        request(&self.http, method, url, body).await
    }

    pub(crate) async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    pub(crate) async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    /// [`post`](Self::post) in a task of its own (a long poll the test does not wait on yet).
    pub(crate) fn spawn_post(
        &self,
        path: &str,
        body: Value,
    ) -> tokio::task::JoinHandle<(u16, Value)> {
        let (http, url) = (self.http.clone(), format!("{}{path}", self.base));
        tokio::spawn(async move { request(&http, reqwest::Method::POST, url, Some(body)).await })
    }

    /// The Prometheus exposition as the server answers `/metrics` now.
    pub(crate) async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}
