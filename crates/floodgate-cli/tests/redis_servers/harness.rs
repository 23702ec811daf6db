//! What the tests of this binary share: a client with request helpers, in-process servers each
//! with their own `RedisStore`, child-process guards and the `floodgate serve` child.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use floodgate::{Floodgate, RedisConfig, RedisStore};
use floodgate_server::server::ServerOptions;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::common::{Served, PATIENCE, POLL};
use crate::support::free_port;

/// Client-side bound on any one request: a request still unanswered after this has hung.
pub(crate) const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
/// A wait that never ends during a test (limiters here allow it: `max_wait_ms` is set to it).
pub(crate) const LONG_WAIT_MS: u64 = 600_000;
/// Seed of the random plans; a failure replays by running again.
pub(crate) const SEED: u64 = 0x00f1_00d6_a7e5_2ed1;
/// Redis options that make the data survive a SIGKILL and a restart on the same `--dir`.
pub(crate) const PERSISTENT: [&str; 4] = ["--appendonly", "yes", "--appendfsync", "always"];

/// One answer: the status, the raw text and the JSON body (`Null` when not JSON).
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) text: String,
    pub(crate) json: Value,
}

impl Reply {
    pub(crate) fn u64(&self, pointer: &str) -> u64 {
        self.json
            .pointer(pointer)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("no integer at {pointer} in {} {}", self.status, self.text))
    }

    pub(crate) fn str(&self, pointer: &str) -> &str {
        self.json
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no string at {pointer} in {} {}", self.status, self.text))
    }

    pub(crate) fn error_code(&self) -> Option<&str> {
        self.json.get("error").and_then(Value::as_str)
    }

    #[track_caller]
    pub(crate) fn assert_ok(&self) -> &Self {
        assert_eq!(self.status, 200, "expected 200, got {self:?}");
        self
    }

    /// Whether this is the API's 503 `store_unavailable` answer, with a message.
    pub(crate) fn is_store_unavailable(&self) -> bool {
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
pub(crate) struct Http {
    pub(crate) base: String,
    pub(crate) client: reqwest::Client,
}

impl Http {
    pub(crate) fn new(base: String) -> Http {
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .timeout(CLIENT_TIMEOUT)
            .build()
            .unwrap();
        Http { base, client }
    }

    /// Sends a request; `Err` describes a transport failure (including the client timeout).
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Reply, String> {
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

    pub(crate) async fn must(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        self.send(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("request to {} failed: {e}", self.base))
    }

    pub(crate) async fn put_limiter(&self, name: &str, body: Value) -> Value {
        let reply = self
            .must(Method::PUT, &format!("/v1/limiters/{name}"), Some(body))
            .await;
        reply.assert_ok();
        reply.json
    }

    pub(crate) async fn try_acquire(&self, name: &str, body: Value) -> Result<Reply, String> {
        self.send(
            Method::POST,
            &format!("/v1/limiters/{name}/acquire"),
            Some(body),
        )
        .await
    }

    pub(crate) async fn acquire(&self, name: &str, body: Value) -> Reply {
        self.try_acquire(name, body)
            .await
            .unwrap_or_else(|e| panic!("acquire on {} failed: {e}", self.base))
    }

    pub(crate) async fn try_release(&self, permit_id: &str) -> Result<Reply, String> {
        self.send(
            Method::POST,
            &format!("/v1/permits/{permit_id}/release"),
            None,
        )
        .await
    }

    /// Releases, expecting `{"released": true}`.
    pub(crate) async fn release_held(&self, permit_id: &str) {
        let reply = self
            .try_release(permit_id)
            .await
            .unwrap_or_else(|e| panic!("release on {} failed: {e}", self.base));
        reply.assert_ok();
        assert_eq!(reply.json, json!({"released": true}), "{reply:?}");
    }

    pub(crate) async fn status(&self, name: &str) -> Value {
        let reply = self
            .must(Method::GET, &format!("/v1/limiters/{name}"), None)
            .await;
        reply.assert_ok();
        reply.json
    }

    /// Polls the limiter's status until `pred` holds; fails after [`PATIENCE`].
    pub(crate) async fn wait_until(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
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
pub(crate) struct InProcServer {
    pub(crate) http: Http,
    pub(crate) server: Served,
}

impl InProcServer {
    pub(crate) async fn start(config: RedisConfig, fail_open: bool) -> InProcServer {
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
    pub(crate) async fn stop(self) {
        self.server.stop().await;
    }
}

/// A child process, killed (SIGKILL) and reaped when dropped; with `group`, its whole process
/// group is (it was started as the leader of a new one).
pub(crate) struct ChildGuard {
    pub(crate) child: Child,
    pub(crate) group: bool,
    pub(crate) what: &'static str,
}

impl ChildGuard {
    pub(crate) fn spawn(mut cmd: Command, group: bool, what: &'static str) -> ChildGuard {
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
    pub(crate) fn kill(&mut self) {
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
    pub(crate) fn assert_running(&mut self) {
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
pub(crate) async fn spawn_serve(redis_url: &str) -> (ChildGuard, Http) {
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
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Awaits a spawned request, failing if the task panicked or the request itself failed (a
/// transport error or the client timeout: the server did not answer).
pub(crate) async fn answered(task: JoinHandle<Result<Reply, String>>, what: &str) -> Reply {
    match task.await.expect("request task panicked") {
        Ok(reply) => reply,
        Err(e) => panic!("{what} was not answered: {e}"),
    }
}
