//! Integration tests of the HTTP server on real Redis: real `redis-server` processes (standalone
//! and a 3-master cluster, from `crates/floodgate/tests/support`), real servers on loopback
//! ports (in-process `floodgate_server::server::run`, and the `floodgate` binary as a child
//! process), driven over real HTTP with `reqwest`.
//!
//! - Two servers sharing one Redis never grant more than the limit between them, and a release
//!   on one wakes a long poll held by the other.
//! - Redis crashing (SIGKILL) under load: every request is answered (503 `store_unavailable`
//!   when fail_closed, 200 with fencing token 0 when fail_open), `/readyz` turns 503, and the
//!   same server serves again once Redis is back (with its AOF, so the limiter survives).
//! - A holder process that crashes has its lease reclaimed and a waiter granted.
//! - On Redis Cluster: limiters in different slots, acquire and release through different
//!   servers, and cross-server wake-ups.
//!
//! No assertion is about elapsed time: waits are bounded polling loops with generous limits,
//! and every client request has a generous timeout so a hang fails instead of blocking. Every
//! spawned process is killed by a guard when the test ends, passed or failed.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{num, Served, SplitMix64, PATIENCE, POLL};
use floodgate::{Floodgate, RedisConfig, RedisStore};
use floodgate_server::server::ServerOptions;
use reqwest::Method;
use serde_json::{json, Value};
use support::{free_port, RedisCluster, RedisServer};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Client-side bound on any one request: a request still unanswered after this has hung.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
/// A wait that never ends during a test (limiters here allow it: `max_wait_ms` is set to it).
const LONG_WAIT_MS: u64 = 600_000;
/// Seed of the random plans; a failure replays by running again.
const SEED: u64 = 0x00f1_00d6_a7e5_2ed1;
/// Redis options that make the data survive a SIGKILL and a restart on the same `--dir`.
const PERSISTENT: [&str; 4] = ["--appendonly", "yes", "--appendfsync", "always"];

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// One answer: the status, the raw text and the JSON body (`Null` when not JSON).
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    text: String,
    json: Value,
}

impl Reply {
    fn u64(&self, pointer: &str) -> u64 {
        self.json
            .pointer(pointer)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("no integer at {pointer} in {} {}", self.status, self.text))
    }

    fn str(&self, pointer: &str) -> &str {
        self.json
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no string at {pointer} in {} {}", self.status, self.text))
    }

    fn error_code(&self) -> Option<&str> {
        self.json.get("error").and_then(Value::as_str)
    }

    #[track_caller]
    fn assert_ok(&self) -> &Self {
        assert_eq!(self.status, 200, "expected 200, got {self:?}");
        self
    }

    /// Whether this is the API's 503 `store_unavailable` answer, with a message.
    fn is_store_unavailable(&self) -> bool {
        self.status == 503
            && self.error_code() == Some("store_unavailable")
            && self
                .json
                .get("message")
                .and_then(Value::as_str)
                .is_some_and(|m| !m.is_empty())
    }
}

/// A client of one server (by base URL). Every request has [`CLIENT_TIMEOUT`].
#[derive(Clone)]
struct Http {
    base: String,
    client: reqwest::Client,
}

impl Http {
    fn new(base: String) -> Http {
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .timeout(CLIENT_TIMEOUT)
            .build()
            .unwrap();
        Http { base, client }
    }

    /// Sends a request; `Err` describes a transport failure (including the client timeout).
    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Result<Reply, String> {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let resp = req.send().await.map_err(|e| {
            format!(
                "{path}: {e}{}",
                if e.is_timeout() { " (timed out)" } else { "" }
            )
        })?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| format!("{path}: body: {e}"))?;
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Reply { status, text, json })
    }

    async fn must(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        self.send(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("request to {} failed: {e}", self.base))
    }

    async fn put_limiter(&self, name: &str, body: Value) -> Value {
        let reply = self
            .must(Method::PUT, &format!("/v1/limiters/{name}"), Some(body))
            .await;
        reply.assert_ok();
        reply.json
    }

    async fn try_acquire(&self, name: &str, body: Value) -> Result<Reply, String> {
        self.send(
            Method::POST,
            &format!("/v1/limiters/{name}/acquire"),
            Some(body),
        )
        .await
    }

    async fn acquire(&self, name: &str, body: Value) -> Reply {
        self.try_acquire(name, body)
            .await
            .unwrap_or_else(|e| panic!("acquire on {} failed: {e}", self.base))
    }

    async fn try_release(&self, permit_id: &str) -> Result<Reply, String> {
        self.send(
            Method::POST,
            &format!("/v1/permits/{permit_id}/release"),
            None,
        )
        .await
    }

    /// Releases, expecting `{"released": true}`.
    async fn release_held(&self, permit_id: &str) {
        let reply = self
            .try_release(permit_id)
            .await
            .unwrap_or_else(|e| panic!("release on {} failed: {e}", self.base));
        reply.assert_ok();
        assert_eq!(reply.json, json!({"released": true}), "{reply:?}");
    }

    async fn status(&self, name: &str) -> Value {
        let reply = self
            .must(Method::GET, &format!("/v1/limiters/{name}"), None)
            .await;
        reply.assert_ok();
        reply.json
    }

    /// Polls the limiter's status until `pred` holds; fails after [`PATIENCE`].
    async fn wait_until(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let status = self.status(name).await;
            if pred(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gave up waiting for {what} on {}; last status {status}",
                self.base
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

/// A server in this process on `127.0.0.1:0`, with its own `RedisStore` (its own connection and
/// wake-up channel, as a separate server process would have).
struct InProcServer {
    http: Http,
    server: Served,
}

impl InProcServer {
    async fn start(config: RedisConfig, fail_open: bool) -> InProcServer {
        let store = RedisStore::connect(config).await.expect("connect to redis");
        let options = ServerOptions {
            fail_open,
            ..ServerOptions::default()
        };
        let server = Served::start(Floodgate::with_store(store), options).await;
        InProcServer {
            http: Http::new(format!("http://{}", server.addr)),
            server,
        }
    }

    /// Triggers the shutdown and checks that `run` returns `Ok` (the task did not panic).
    async fn stop(self) {
        self.server.stop().await;
    }
}

/// A child process, killed (SIGKILL) and reaped when dropped; with `group`, its whole process
/// group is (it was started as the leader of a new one).
struct ChildGuard {
    child: Child,
    group: bool,
    what: &'static str,
}

impl ChildGuard {
    fn spawn(mut cmd: Command, group: bool, what: &'static str) -> ChildGuard {
        // Nothing from the environment of the test run may change what the binary does.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("FLOODGATE_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("FLOODGATE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        ChildGuard { child, group, what }
    }

    /// SIGKILL: a crash. Kills the whole group when started as one.
    fn kill(&mut self) {
        if self.group {
            let pgid = i32::try_from(self.child.id()).unwrap();
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    #[track_caller]
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early: {status}", self.what);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `floodgate serve --redis URL --listen 127.0.0.1:PORT` as a child process, once it answers.
async fn spawn_serve(redis_url: &str) -> (ChildGuard, Http) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_floodgate"));
    cmd.args(["serve", "--redis", redis_url, "--listen", &addr]);
    let mut guard = ChildGuard::spawn(cmd, false, "floodgate serve");
    let http = Http::new(format!("http://{addr}"));
    let deadline = Instant::now() + PATIENCE;
    loop {
        guard.assert_running();
        if let Ok(reply) = http.send(Method::GET, "/readyz", None).await {
            if reply.status == 200 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "floodgate serve never became ready"
        );
        tokio::time::sleep(POLL).await;
    }
    (guard, http)
}

/// Runs blocking process management (start, kill, restart Redis) without stalling the runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Awaits a spawned request, failing if the task panicked or the request itself failed (a
/// transport error or the client timeout: the server did not answer).
async fn answered(task: JoinHandle<Result<Reply, String>>, what: &str) -> Reply {
    match task.await.expect("request task panicked") {
        Ok(reply) => reply,
        Err(e) => panic!("{what} was not answered: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Two servers on one Redis
// ---------------------------------------------------------------------------------------------

const CLIENTS: usize = 40;
const LIMIT: i64 = 5;

/// What one client does.
#[derive(Debug, Clone, Copy)]
struct Plan {
    start_ms: u64,
    acquire_on: usize,
    hold_ms: u64,
    release_on: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_on_one_redis_share_one_limit_and_wake_each_other() {
    let redis = blocking(RedisServer::start);
    let a = InProcServer::start(RedisConfig::new(redis.url()), false).await;
    let b = InProcServer::start(RedisConfig::new(redis.url()), false).await;
    let servers = [a.http.clone(), b.http.clone()];

    servers[0]
        .put_limiter(
            "shared",
            json!({"concurrency": LIMIT, "lease_ms": 30_000, "max_wait_ms": LONG_WAIT_MS}),
        )
        .await;
    // B sees the limiter A created: the state is in Redis.
    assert_eq!(num(&servers[1].status("shared").await, "/concurrency"), 5);

    let mut rng = SplitMix64(SEED);
    let plans: Vec<Plan> = (0..CLIENTS)
        .map(|i| Plan {
            start_ms: rng.between(0, 20),
            acquire_on: i % 2,
            hold_ms: rng.between(5, 30),
            release_on: usize::from(rng.between(0, 1) == 1),
        })
        .collect();
    assert!(
        plans.iter().any(|p| p.acquire_on != p.release_on),
        "the seed never releases through the other server"
    );

    let witness = Arc::new(AtomicI64::new(0));
    let max_seen = Arc::new(AtomicI64::new(0));
    let tasks: Vec<JoinHandle<u64>> = plans
        .iter()
        .enumerate()
        .map(|(i, plan)| {
            let plan = *plan;
            let servers = servers.clone();
            let witness = Arc::clone(&witness);
            let max_seen = Arc::clone(&max_seen);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(plan.start_ms)).await;
                let reply = servers[plan.acquire_on]
                    .acquire(
                        "shared",
                        json!({"wait_ms": LONG_WAIT_MS, "holder": format!("client-{i}")}),
                    )
                    .await;
                reply.assert_ok();
                let now = witness.fetch_add(1, Ordering::SeqCst) + 1;
                max_seen.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(plan.hold_ms)).await;
                witness.fetch_sub(1, Ordering::SeqCst);
                servers[plan.release_on]
                    .release_held(reply.str("/permit_id"))
                    .await;
                reply.u64("/fencing_token")
            })
        })
        .collect();
    let mut tokens = Vec::with_capacity(CLIENTS);
    for (i, task) in tasks.into_iter().enumerate() {
        let token = tokio::time::timeout(PATIENCE, task)
            .await
            .unwrap_or_else(|_| panic!("client {i} never finished (seed {SEED:#x})"))
            .unwrap_or_else(|e| panic!("client {i} failed (seed {SEED:#x}): {e}"));
        tokens.push(token);
    }
    let max = max_seen.load(Ordering::SeqCst);
    assert!(
        max <= LIMIT,
        "{max} clients held a permit at once across the two servers; the limit is {LIMIT} \
         (seed {SEED:#x})"
    );
    assert!(max >= 1);
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(
        tokens.len(),
        CLIENTS,
        "a fencing token was handed out twice"
    );

    let status = servers[1]
        .wait_until("shared", "everything released", |s| {
            num(s, "/in_use") == 0 && num(s, "/holders") == 0 && num(s, "/waiting") == 0
        })
        .await;
    assert_eq!(
        num(&status, "/counters/granted"),
        CLIENTS as u64,
        "{status}"
    );
    assert_eq!(
        num(&status, "/counters/released"),
        CLIENTS as u64,
        "{status}"
    );
    assert_eq!(num(&status, "/counters/expired"), 0, "{status}");

    // A release on B wakes a long poll held by A.
    servers[0]
        .put_limiter(
            "handoff",
            json!({"concurrency": 1, "lease_ms": 30_000, "max_wait_ms": LONG_WAIT_MS}),
        )
        .await;
    let held = servers[1].acquire("handoff", json!({"wait_ms": 0})).await;
    held.assert_ok();
    let waiter = {
        let a = servers[0].clone();
        tokio::spawn(async move {
            a.try_acquire("handoff", json!({"wait_ms": LONG_WAIT_MS}))
                .await
        })
    };
    servers[1]
        .wait_until("handoff", "the waiter on A to queue", |s| {
            num(s, "/waiting") == 1
        })
        .await;
    servers[1].release_held(held.str("/permit_id")).await;
    let granted = answered(waiter, "the long poll on A").await;
    granted.assert_ok();
    assert!(
        granted.u64("/fencing_token") > held.u64("/fencing_token"),
        "{granted:?} after {held:?}"
    );
    servers[0].release_held(granted.str("/permit_id")).await;
    let status = servers[0]
        .wait_until("handoff", "nothing held", |s| num(s, "/in_use") == 0)
        .await;
    assert_eq!(num(&status, "/counters/granted"), 2, "{status}");

    a.stop().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Faults
// ---------------------------------------------------------------------------------------------

/// Fires acquires (`wait_ms` 50) in a loop, releasing what it gets, until `stop` is set and it
/// has had a 503 (set only while Redis is down, so that comes at once); returns every answer,
/// or the first request that was not answered.
fn stream_of_acquires(
    http: Http,
    name: &'static str,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<Vec<Reply>, String>> {
    tokio::spawn(async move {
        let mut replies: Vec<Reply> = Vec::new();
        loop {
            if stop.load(Ordering::SeqCst) && replies.last().is_some_and(|r| r.status == 503) {
                return Ok(replies);
            }
            let reply = http.try_acquire(name, json!({"wait_ms": 50})).await?;
            if reply.status == 200 {
                // May be refused with 503 if Redis just died: the lease bounds it.
                let _ = http.try_release(reply.str("/permit_id")).await?;
            }
            replies.push(reply);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// An answer of a fail_closed server to an acquire that raced a Redis crash: granted or refused
/// before it, or 503 `store_unavailable` after.
#[track_caller]
fn assert_fail_closed_answer(reply: &Reply, what: &str) {
    let ok = match reply.status {
        200 => reply.json.get("fencing_token").and_then(Value::as_u64) > Some(0),
        429 => reply.error_code() == Some("wait_timeout"),
        503 => reply.is_store_unavailable(),
        _ => false,
    };
    assert!(ok, "{what}: unexpected answer {reply:?}");
}

/// The shared body of the fail_closed crash tests. Holds the limit, queues `long_polls` acquires
/// waiting `long_poll_wait_ms`, streams short acquires across the crash, SIGKILLs Redis, sends
/// new acquires, then checks every request was answered, `/readyz` is 503, and after a restart
/// of Redis (with its AOF) the same server grants again.
async fn fail_closed_crash_and_recovery(long_poll_wait_ms: u64) {
    let port = free_port();
    let mut redis = blocking(|| RedisServer::start_with(port, &PERSISTENT));
    let srv = InProcServer::start(RedisConfig::new(redis.url()), false).await;
    let http = srv.http.clone();
    http.put_limiter(
        "outage",
        json!({"concurrency": 2, "lease_ms": 5_000, "max_wait_ms": 60_000}),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let reply = http.acquire("outage", json!({"wait_ms": 0})).await;
        reply.assert_ok();
        held.push(reply);
    }
    let last_token_before = held.iter().map(|r| r.u64("/fencing_token")).max().unwrap();

    // Long polls, queued behind the two holders.
    let long_polls: Vec<_> = (0..4)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move {
                http.try_acquire("outage", json!({"wait_ms": long_poll_wait_ms}))
                    .await
            })
        })
        .collect();
    http.wait_until("outage", "four queued long polls", |s| {
        num(s, "/waiting") == 4
    })
    .await;

    // A stream of acquires in flight across the crash, on a limiter with room.
    http.put_limiter(
        "stream",
        json!({"concurrency": 3, "lease_ms": 5_000, "max_wait_ms": 60_000}),
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..4)
        .map(|_| stream_of_acquires(http.clone(), "stream", Arc::clone(&stop)))
        .collect();
    // Let the streams get going (not an assertion: any number of rounds is fine).
    tokio::time::sleep(Duration::from_millis(100)).await;

    blocking(|| redis.kill());

    // New acquires arriving while Redis is down.
    let arrivals: Vec<_> = (0..4)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(
                async move { http.try_acquire("outage", json!({"wait_ms": 60_000})).await },
            )
        })
        .collect();
    for (i, task) in arrivals.into_iter().enumerate() {
        let reply = answered(task, &format!("acquire {i} sent after the crash")).await;
        assert!(
            reply.is_store_unavailable(),
            "acquire {i} sent after the crash: expected 503 store_unavailable, got {reply:?}"
        );
    }
    let ready = http.must(Method::GET, "/readyz", None).await;
    assert!(
        ready.is_store_unavailable(),
        "/readyz with Redis down: {ready:?}"
    );
    let status = http.must(Method::GET, "/v1/limiters/outage", None).await;
    assert!(
        status.is_store_unavailable(),
        "status with Redis down: {status:?}"
    );

    stop.store(true, Ordering::SeqCst);
    for (i, task) in streams.into_iter().enumerate() {
        let replies = task
            .await
            .expect("stream task panicked")
            .unwrap_or_else(|e| panic!("stream {i}: a request was not answered: {e}"));
        for reply in &replies {
            assert_fail_closed_answer(reply, &format!("stream {i}"));
        }
    }
    for (i, task) in long_polls.into_iter().enumerate() {
        let reply = answered(task, &format!("long poll {i} held across the crash")).await;
        assert_fail_closed_answer(&reply, &format!("long poll {i}"));
        assert_ne!(
            reply.status, 200,
            "long poll {i} granted with the limit held: {reply:?}"
        );
    }
    // The server itself is still up.
    let healthz = http.must(Method::GET, "/healthz", None).await;
    assert_eq!((healthz.status, healthz.text.as_str()), (200, "ok"));

    // Redis comes back on the same port with its AOF: the same server serves again.
    blocking(|| redis.restart());
    let deadline = Instant::now() + PATIENCE;
    let ready = loop {
        let reply = http.must(Method::GET, "/readyz", None).await;
        if reply.status == 200 || Instant::now() >= deadline {
            break reply;
        }
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(ready.status, 200, "/readyz never recovered: {ready:?}");
    for permit in &held {
        // Still held (persisted), unless its lease ran out meanwhile.
        let reply = http.try_release(permit.str("/permit_id")).await.unwrap();
        reply.assert_ok();
    }
    let deadline = Instant::now() + PATIENCE;
    let granted = loop {
        let reply = http.acquire("outage", json!({"wait_ms": 1_000})).await;
        if reply.status == 200 {
            break reply;
        }
        assert!(
            reply.status == 429 || reply.is_store_unavailable(),
            "acquire after the restart: {reply:?}"
        );
        assert!(
            Instant::now() < deadline,
            "no acquire succeeded after Redis came back; last answer {reply:?}"
        );
        tokio::time::sleep(POLL).await;
    };
    assert!(
        granted.u64("/fencing_token") > last_token_before,
        "fencing tokens went backwards across the restart: {granted:?} after {last_token_before}"
    );
    http.release_held(granted.str("/permit_id")).await;
    let status = http
        .wait_until("outage", "nothing held after recovery", |s| {
            num(s, "/in_use") == 0
        })
        .await;
    assert_eq!(
        num(&status, "/concurrency"),
        2,
        "the limiter did not survive: {status}"
    );

    srv.stop().await;
}

/// Long polls with a wait shorter than the client timeout: the waiter's own timer ends them
/// while Redis is down, and they must be answered (503) rather than hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_crash_fail_closed_answers_every_request_and_the_same_server_recovers() {
    fail_closed_crash_and_recovery(3_000).await;
}

/// The same crash with long polls that wait a minute (the limiter's maximum): they are held in
/// the server while Redis is dead, and should be answered 503 `store_unavailable` (or granted /
/// refused) without hanging past the client's 20 s timeout (`docs/redis.md`: "acquires are
/// answered 503 `store_unavailable` within the response timeout (2 s); nothing hangs").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_crash_answers_long_polls_held_across_it() {
    fail_closed_crash_and_recovery(60_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_crash_fail_open_grants_with_token_zero() {
    let mut redis = blocking(RedisServer::start);
    let srv = InProcServer::start(RedisConfig::new(redis.url()), true).await;
    let http = srv.http.clone();
    http.put_limiter(
        "open",
        json!({"concurrency": 1, "lease_ms": 5_000, "max_wait_ms": 60_000}),
    )
    .await;
    let held = http.acquire("open", json!({"wait_ms": 0})).await;
    held.assert_ok();
    assert!(held.u64("/fencing_token") > 0, "{held:?}");
    // With Redis up the limit holds even when failing open.
    let refused = http.acquire("open", json!({"wait_ms": 0})).await;
    assert_eq!(refused.status, 429, "{refused:?}");

    blocking(|| redis.kill());

    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { http.try_acquire("open", json!({"wait_ms": 1_000})).await })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let reply = answered(task, &format!("fail_open acquire {i}")).await;
        reply.assert_ok();
        assert_eq!(reply.u64("/fencing_token"), 0, "acquire {i}: {reply:?}");
        assert_eq!(reply.str("/permit_id"), "open.0", "acquire {i}: {reply:?}");
    }
    // A fail-open permit has nothing to extend.
    let extended = http
        .must(
            Method::POST,
            "/v1/permits/open.0/extend",
            Some(json!({"lease_ms": 1_000})),
        )
        .await;
    extended.assert_ok();
    assert_eq!(extended.u64("/fencing_token"), 0, "{extended:?}");
    // Readiness still tells the truth.
    let ready = http.must(Method::GET, "/readyz", None).await;
    assert!(
        ready.is_store_unavailable(),
        "/readyz with Redis down: {ready:?}"
    );

    srv.stop().await;
}

/// A permit granted while failing open (token 0) was never accounted, so its release needs no
/// store: like extend (which answers 200 for token 0 without the store), it should answer 200
/// `{"released": false}` ("not held") rather than 503 while Redis is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_open_permits_release_while_redis_is_down() {
    let mut redis = blocking(RedisServer::start);
    let srv = InProcServer::start(RedisConfig::new(redis.url()), true).await;
    let http = srv.http.clone();
    http.put_limiter("open", json!({"concurrency": 1})).await;
    blocking(|| redis.kill());
    let granted = http.acquire("open", json!({"wait_ms": 0})).await;
    granted.assert_ok();
    assert_eq!(granted.u64("/fencing_token"), 0, "{granted:?}");
    let released = http.try_release(granted.str("/permit_id")).await.unwrap();
    released.assert_ok();
    assert_eq!(released.json, json!({"released": false}), "{released:?}");
    srv.stop().await;
}

/// A long poll whose client goes away while Redis is down must still leave the queue: the
/// docs promise "a client that disconnects while waiting leaves the queue; a grant that raced
/// the disconnect goes back". Otherwise, once Redis is back (with its AOF), the next release
/// grants the abandoned waiter, and that permit is held by nobody until its lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_poll_abandoned_during_an_outage_leaves_the_queue() {
    let port = free_port();
    let mut redis = blocking(|| RedisServer::start_with(port, &PERSISTENT));
    let srv = InProcServer::start(RedisConfig::new(redis.url()), false).await;
    let http = srv.http.clone();
    http.put_limiter(
        "ghost",
        json!({"concurrency": 1, "lease_ms": 30_000, "max_wait_ms": 60_000}),
    )
    .await;
    let held = http.acquire("ghost", json!({"wait_ms": 0})).await;
    held.assert_ok();

    // A waiter whose client gives up after 2 s (its wait is a minute).
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let url = format!("{}/v1/limiters/ghost/acquire", http.base);
    let waiter = tokio::spawn(async move {
        impatient
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json!({"wait_ms": 60_000}).to_string())
            .send()
            .await
    });
    http.wait_until("ghost", "the waiter to queue", |s| num(s, "/waiting") == 1)
        .await;

    blocking(|| redis.kill());
    // Either the server answers it 503 at once (the wake-up subscription died with Redis), or
    // the client gives up first; both leave an entry in Redis's queue that must be cancelled.
    let gone = waiter.await.expect("waiter task panicked");
    match &gone {
        Ok(resp) => assert_eq!(resp.status().as_u16(), 503, "{gone:?}"),
        Err(e) => assert!(e.is_timeout(), "{gone:?}"),
    }
    // Give the server a moment to see the disconnect and drop the acquire (not an assertion).
    tokio::time::sleep(Duration::from_millis(200)).await;

    blocking(|| redis.restart());
    let deadline = Instant::now() + PATIENCE;
    let released = loop {
        let reply = http.try_release(held.str("/permit_id")).await.unwrap();
        if reply.status == 200 || Instant::now() >= deadline {
            break reply;
        }
        assert!(reply.is_store_unavailable(), "{reply:?}");
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(released.json, json!({"released": true}), "{released:?}");
    let status = http
        .wait_until("ghost", "nothing held and nobody queued", |s| {
            num(s, "/in_use") == 0 && num(s, "/waiting") == 0
        })
        .await;
    assert_eq!(num(&status, "/holders"), 0, "{status}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_holder_process_has_its_lease_reclaimed() {
    let redis = blocking(RedisServer::start);
    let (mut serve, http) = spawn_serve(&redis.url()).await;
    // A second server on the same Redis, in this process, for the waiter.
    let other = InProcServer::start(RedisConfig::new(redis.url()), false).await;
    http.put_limiter(
        "lim",
        json!({"concurrency": 1, "lease_ms": 60_000, "max_wait_ms": 60_000}),
    )
    .await;

    // The holder: `floodgate run` holding a permit with a 500 ms lease (extended every third of
    // it) around `sleep 30`, in its own process group so the crash takes the command with it.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_floodgate"));
    cmd.args(["run", "lim", "--url", &http.base])
        .args(["--wait", "30s", "--lease", "500ms", "--", "sleep", "30"]);
    let mut holder = ChildGuard::spawn(cmd, true, "floodgate run");
    let deadline = Instant::now() + PATIENCE;
    loop {
        holder.assert_running();
        let status = http.status("lim").await;
        if num(&status, "/holders") == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "floodgate run never took the permit; last status {status}"
        );
        tokio::time::sleep(POLL).await;
    }
    // Its keep-alive is working: a try-once acquire is refused.
    let refused = other.http.acquire("lim", json!({"wait_ms": 0})).await;
    assert_eq!(refused.status, 429, "{refused:?}");

    let waiter = {
        let other = other.http.clone();
        tokio::spawn(async move { other.try_acquire("lim", json!({"wait_ms": 60_000})).await })
    };
    http.wait_until("lim", "the waiter to queue", |s| num(s, "/waiting") == 1)
        .await;

    holder.kill();

    let granted = answered(waiter, "the waiter behind the crashed holder").await;
    granted.assert_ok();
    let status = http.status("lim").await;
    assert!(
        num(&status, "/counters/expired") >= 1,
        "the crashed holder's permit was not counted as expired: {status}"
    );
    assert_eq!(num(&status, "/holders"), 1, "{status}");
    other.http.release_held(granted.str("/permit_id")).await;
    let status = http
        .wait_until("lim", "nothing held", |s| num(s, "/in_use") == 0)
        .await;
    assert_eq!(
        num(&status, "/counters/granted"),
        num(&status, "/counters/released") + num(&status, "/counters/expired"),
        "{status}"
    );
    serve.assert_running();
    other.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Redis Cluster
// ---------------------------------------------------------------------------------------------

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli");
    assert!(out.status.success(), "redis-cli {args:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_on_redis_cluster_share_limiters_across_slots() {
    let cluster = blocking(RedisCluster::start);
    let a = InProcServer::start(RedisConfig::cluster(cluster.urls()), false).await;
    let b = InProcServer::start(RedisConfig::cluster(cluster.urls()), false).await;
    let servers = [a.http.clone(), b.http.clone()];
    let port = cluster.nodes[0].port;

    let names = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];
    let slots: Vec<u64> = names
        .iter()
        .map(|n| {
            blocking(|| redis_cli(port, &["cluster", "keyslot", &format!("{{{n}}}")]))
                .parse()
                .unwrap()
        })
        .collect();
    let mut distinct = slots.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() >= 2, "all limiters in one slot: {slots:?}");

    for (i, name) in names.iter().enumerate() {
        servers[i % 2]
            .put_limiter(
                name,
                json!({"concurrency": 1, "lease_ms": 30_000, "max_wait_ms": LONG_WAIT_MS}),
            )
            .await;
    }
    // The limiters' keys really are spread over several masters.
    let holding: Vec<u16> = cluster
        .nodes
        .iter()
        .filter(|n| {
            !blocking(|| redis_cli(n.port, &["--scan", "--pattern", "fg:{*}:meta"])).is_empty()
        })
        .map(|n| n.port)
        .collect();
    assert!(
        holding.len() >= 2,
        "the limiters' keys are all on one node ({holding:?}); slots {slots:?}"
    );

    for name in names {
        // Acquire on one server, release on the other, both ways round.
        for (on, off) in [(0, 1), (1, 0)] {
            let reply = servers[on].acquire(name, json!({"wait_ms": 0})).await;
            reply.assert_ok();
            let refused = servers[off].acquire(name, json!({"wait_ms": 0})).await;
            assert_eq!(
                refused.status, 429,
                "{name}: limit 1 not shared: {refused:?}"
            );
            servers[off].release_held(reply.str("/permit_id")).await;
        }

        // A long poll on A woken by a release on B.
        let held = servers[1].acquire(name, json!({"wait_ms": 0})).await;
        held.assert_ok();
        let waiter = {
            let a = servers[0].clone();
            tokio::spawn(async move { a.try_acquire(name, json!({"wait_ms": LONG_WAIT_MS})).await })
        };
        servers[1]
            .wait_until(name, "the waiter on A to queue", |s| {
                num(s, "/waiting") == 1
            })
            .await;
        servers[1].release_held(held.str("/permit_id")).await;
        let granted = answered(waiter, &format!("{name}: the long poll on A")).await;
        granted.assert_ok();
        assert!(
            granted.u64("/fencing_token") > held.u64("/fencing_token"),
            "{name}: {granted:?} after {held:?}"
        );
        servers[1].release_held(granted.str("/permit_id")).await;

        let status = servers[0]
            .wait_until(name, "nothing held", |s| num(s, "/in_use") == 0)
            .await;
        // Two grants in the first loop, the held one and the waiter's; the two try-once
        // acquires refused while it was held count as timed out.
        assert_eq!(num(&status, "/counters/granted"), 4, "{name}: {status}");
        assert_eq!(num(&status, "/counters/released"), 4, "{name}: {status}");
        assert_eq!(num(&status, "/counters/timed_out"), 2, "{name}: {status}");
    }
    let list = servers[1].must(Method::GET, "/v1/limiters", None).await;
    list.assert_ok();
    let listed: Vec<&str> = list.json["limiters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, names, "{list:?}");

    a.stop().await;
    b.stop().await;
}
