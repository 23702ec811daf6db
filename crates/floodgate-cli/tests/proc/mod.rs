//! A real `floodgate serve` process for tests that need signals (SIGHUP) or its log output:
//! started on `127.0.0.1:0` with JSON logs, its address read from its own "floodgate
//! listening" line, every stderr line kept for the test to inspect.

#![allow(dead_code, reason = "each test file uses its own part of this module")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// How long to wait for the server to start or a log line to appear.
const PATIENCE: Duration = Duration::from_secs(30);

/// The process, its URL and its stderr lines so far.
pub(crate) struct ServeProcess {
    /// `http://127.0.0.1:PORT` (or https with `--tls-cert`).
    pub(crate) url: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl ServeProcess {
    /// `floodgate serve --listen 127.0.0.1:0 ARGS...` (no `--listen` of its own when ARGS have
    /// one) with JSON logs (`FLOODGATE_LOG_FORMAT=json`); returns once it listens.
    pub(crate) fn start(args: &[&str]) -> ServeProcess {
        Self::start_with_env(args, &[])
    }

    /// Like [`start`](Self::start), with extra environment variables.
    pub(crate) fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> ServeProcess {
        let listen: &[&str] = if args.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_floodgate"))
            .arg("serve")
            .args(listen)
            .args(args)
            .env("FLOODGATE_LOG_FORMAT", "json")
            .env_remove("FLOODGATE_TOKEN")
            .env_remove("FLOODGATE_LOG")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start floodgate serve");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            })
        };
        let scheme = if args.contains(&"--tls-cert") {
            "https"
        } else {
            "http"
        };
        let mut serve = ServeProcess {
            url: String::new(),
            child,
            lines,
            reader: Some(reader),
        };
        let listening = serve.wait_for_line(|l| {
            serde_json::from_str::<Value>(l)
                .map(|v| v["message"] == "floodgate listening")
                .unwrap_or(false)
        });
        let v: Value = serde_json::from_str(&listening).unwrap();
        serve.url = format!("{scheme}://{}", v["local"].as_str().unwrap());
        serve
    }

    /// Blocks (bounded) until a stderr line satisfies `ok`; panics with the log if none does.
    fn wait_for_line(&mut self, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(line) = self.lines.lock().unwrap().iter().find(|l| ok(l)) {
                return line.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("floodgate serve exited ({status}):\n{}", self.text());
            }
            assert!(
                Instant::now() < deadline,
                "no such log line:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for a JSON log line satisfying `ok`.
    pub(crate) async fn wait_for_log(&self, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| ok(v));
            if let Some(v) = found {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no such log line:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a signal to the server.
    pub(crate) fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.child.id()).unwrap();
        kill(Pid::from_raw(pid), signal).unwrap();
    }

    /// The stderr lines so far.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// SIGTERM, waits for the exit, and returns every stderr line parsed as JSON (panicking,
    /// with the line, on any that is not).
    pub(crate) fn stop(mut self) -> Vec<Value> {
        self.signal(Signal::SIGTERM);
        let status = self.child.wait().unwrap();
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        assert!(status.success(), "serve exited {status}:\n{}", self.text());
        self.lines()
            .iter()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))
            })
            .collect()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
