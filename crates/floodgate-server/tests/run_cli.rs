//! End-to-end tests of `floodgate run`: the real server runs in this process on
//! `127.0.0.1:0`, and the real `floodgate` binary runs as child processes against it, each
//! running a small shell script that leaves evidence in a scratch directory.
//!
//! No assertion depends on timing; waits for a child to reach a point are bounded only so a
//! broken build fails instead of hanging.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use floodgate::{AcquireOptions, Floodgate, LimiterSpec, LimiterStatus, RateSpec};
use floodgate_server::client::Client;
use floodgate_server::server::{self, ServerOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const LIMITER: &str = "lim";

/// The real server on a free port, with one concurrency limiter named `lim`.
struct TestServer {
    url: String,
    gate: Floodgate,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    async fn start(limit: u32) -> Self {
        let gate = Floodgate::in_memory();
        gate.define(LIMITER, LimiterSpec::concurrency(limit))
            .await
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(
            listener,
            gate.clone(),
            ServerOptions::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        TestServer {
            url,
            gate,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `floodgate ARGS...` pointed at this server, in `dir`, its output captured.
    fn floodgate(&self, dir: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_floodgate"));
        cmd.args(args)
            .current_dir(dir)
            .env("FLOODGATE_URL", &self.url)
            .env_remove("FLOODGATE_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `floodgate ARGS...` to completion, capturing its output.
    async fn output(&self, dir: &Path, args: &[&str]) -> Output {
        self.floodgate(dir, args).output().await.unwrap()
    }

    async fn status(&self) -> LimiterStatus {
        self.gate
            .limiter(LIMITER)
            .await
            .unwrap()
            .status()
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// A fresh scratch directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("run_cli-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.file(name)).unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Waits until `path` exists. Bounded only so a broken build fails instead of hanging.
async fn wait_for_file(path: &Path) {
    for _ in 0..3000 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never appeared", path.display());
}

/// Waits until `done` holds. Bounded only so a broken build fails instead of hanging.
async fn wait_until<F, Fut>(mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..3000 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the condition never held");
}

fn send(pid: Option<u32>, sig: Signal) {
    let pid = i32::try_from(pid.unwrap()).unwrap();
    kill(Pid::from_raw(pid), sig).unwrap();
}

/// Each run registers itself in `running/` with `mkdir` (atomic), logs how many runs it saw
/// there, holds on for a moment and leaves. If the limiter ever let more than its limit run
/// at once, some run would log a count above the limit.
const WITNESS: &str = r#"
set -e
mkdir "running/$FLOODGATE_FENCING_TOKEN"
n=$(ls running | wc -l)
echo $n >> counts
echo "$FLOODGATE_PERMIT_ID $FLOODGATE_FENCING_TOKEN" >> ran
sleep 0.2
rmdir "running/$FLOODGATE_FENCING_TOKEN"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_never_exceed_the_limit_and_all_run() {
    const LIMIT: u32 = 3;
    const RUNS: usize = 12;
    let server = TestServer::start(LIMIT).await;
    let scratch = Scratch::new("concurrent");
    std::fs::create_dir(scratch.file("running")).unwrap();

    let children: Vec<_> = (0..RUNS)
        .map(|_| {
            server
                .floodgate(
                    scratch.path(),
                    &["run", LIMITER, "--wait", "30s", "--", "sh", "-c", WITNESS],
                )
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().await.unwrap();
        assert_eq!(code(&output), 0, "a run failed: {}", stderr(&output));
    }

    let counts: Vec<u32> = scratch
        .read("counts")
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(counts.len(), RUNS, "every command ran once: {counts:?}");
    let max = counts.iter().copied().max().unwrap();
    assert!(
        (1..=LIMIT).contains(&max),
        "{max} commands ran at once under a limit of {LIMIT}: {counts:?}"
    );

    // Each run saw its own permit: `lim.TOKEN` and TOKEN, distinct across runs.
    let ran = scratch.read("ran");
    let mut tokens: Vec<&str> = ran
        .lines()
        .map(|line| {
            let (id, token) = line.split_once(' ').unwrap();
            assert_eq!(id, format!("{LIMITER}.{token}"));
            token
        })
        .collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), RUNS);
    assert!(std::fs::read_dir(scratch.file("running"))
        .unwrap()
        .next()
        .is_none());

    let status = server.status().await;
    assert_eq!(status.in_use, 0);
    assert_eq!(status.counters.granted, RUNS as u64);
    assert_eq!(status.counters.released, RUNS as u64);
    assert_eq!(status.counters.expired, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exit_status_passes_through() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("status");
    let output = server
        .output(
            scratch.path(),
            &["run", LIMITER, "--", "sh", "-c", "exit 7"],
        )
        .await;
    assert_eq!(code(&output), 7, "{}", stderr(&output));
    let output = server
        .output(scratch.path(), &["run", LIMITER, "--", "true"])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(server.status().await.in_use, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_killed_by_a_signal_exits_128_plus_the_signal() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("killed");
    let output = server
        .output(
            scratch.path(),
            &["run", LIMITER, "--", "sh", "-c", "kill -KILL $$"],
        )
        .await;
    assert_eq!(code(&output), 128 + 9, "{}", stderr(&output));
    assert_eq!(server.status().await.in_use, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_timeout_exits_75_without_running_the_command() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("timeout");
    let limiter = server.gate.limiter(LIMITER).await.unwrap();
    let held = limiter.acquire(AcquireOptions::new()).await.unwrap();

    let output = server
        .output(
            scratch.path(),
            &[
                "run",
                LIMITER,
                "--wait",
                "200ms",
                "--",
                "sh",
                "-c",
                "touch ran",
            ],
        )
        .await;
    assert_eq!(code(&output), 75, "{}", stderr(&output));
    assert!(!scratch.file("ran").exists(), "the command ran anyway");
    let message = stderr(&output);
    assert!(
        message.contains("floodgate: no permit for lim within 200ms; retry after"),
        "{message}"
    );

    let status = server.status().await;
    assert_eq!(status.in_use, 1, "only the permit held here is out");
    assert_eq!(status.counters.timed_out, 1);
    assert!(held.release().await.unwrap());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_exit_2_without_acquiring() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("flags");
    let cases: &[&[&str]] = &[
        &["run", LIMITER],
        &["run", LIMITER, "--"],
        &["run", LIMITER, "true"],
        &["run", LIMITER, "--wait", "nonsense", "--", "true"],
        &["run", LIMITER, "--lease", "5x", "--", "true"],
        &["run", LIMITER, "--permits", "0", "--", "true"],
        &["run", "--", "true"],
    ];
    for args in cases {
        let output = server.output(scratch.path(), args).await;
        assert_eq!(code(&output), 2, "{args:?}: {}", stderr(&output));
        assert!(!stderr(&output).is_empty(), "{args:?}: no message");
    }
    assert_eq!(server.status().await.counters.granted, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_permit_is_released_after_the_command_exits() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("release");
    let output = server
        .output(
            scratch.path(),
            &[
                "run",
                LIMITER,
                "--holder",
                "test-holder",
                "--",
                "sh",
                "-c",
                r#"echo "$FLOODGATE_PERMIT_ID" > permit; exit 3"#,
            ],
        )
        .await;
    assert_eq!(code(&output), 3, "{}", stderr(&output));
    assert!(scratch.read("permit").starts_with("lim."));

    let status = server.status().await;
    assert_eq!(status.in_use, 0);
    assert_eq!(status.counters.granted, 1);
    assert_eq!(status.counters.released, 1);
    assert_eq!(status.counters.expired, 0);
    // Releasing it again finds it gone: floodgate run released it, not the lease.
    let client = Client::new(&server.url, None).unwrap();
    assert!(!client.release(scratch.read("permit").trim()).await.unwrap());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_command_exits_127_and_releases() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("missing");
    let output = server
        .output(
            scratch.path(),
            &["run", LIMITER, "--", "/nonexistent/floodgate-test-command"],
        )
        .await;
    assert_eq!(code(&output), 127, "{}", stderr(&output));
    let status = server.status().await;
    assert_eq!(status.in_use, 0);
    assert_eq!(status.counters.released, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_extended_while_the_command_runs() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("extend");
    // The command outlives its 1.5 s lease; extends every 0.5 s keep the permit.
    let output = server
        .output(
            scratch.path(),
            &["run", LIMITER, "--lease", "1500ms", "--", "sleep", "2.5"],
        )
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let status = server.status().await;
    assert_eq!(status.in_use, 0);
    assert_eq!(status.counters.expired, 0, "the lease ran out");
    assert_eq!(status.counters.released, 1);
    server.stop().await;
}

/// A command that records which signal it got, then exits with `3` (TERM) or `4` (INT).
const TRAPPER: &str = r#"
trap 'echo TERM > trapped; exit 3' TERM
trap 'echo INT > trapped; exit 4' INT
touch started
while :; do sleep 0.05; done
"#;

async fn signal_is_forwarded(sig: Signal, name: &str, exit: i32) {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new(&format!("signal-{name}"));
    let child = server
        .floodgate(scratch.path(), &["run", LIMITER, "--", "sh", "-c", TRAPPER])
        .spawn()
        .unwrap();
    wait_for_file(&scratch.file("started")).await;
    send(child.id(), sig);
    let output = child.wait_with_output().await.unwrap();
    assert_eq!(code(&output), exit, "{}", stderr(&output));
    assert_eq!(scratch.read("trapped").trim(), name);
    let status = server.status().await;
    assert_eq!(status.in_use, 0);
    assert_eq!(status.counters.released, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_forwarded_to_the_command() {
    signal_is_forwarded(Signal::SIGTERM, "TERM", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_is_forwarded_to_the_command() {
    signal_is_forwarded(Signal::SIGINT, "INT", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_while_waiting_ends_the_wait_without_running_the_command() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("signal-waiting");
    let limiter = server.gate.limiter(LIMITER).await.unwrap();
    let held = limiter.acquire(AcquireOptions::new()).await.unwrap();
    let child = server
        .floodgate(
            scratch.path(),
            &[
                "run",
                LIMITER,
                "--wait",
                "60s",
                "--",
                "sh",
                "-c",
                "touch ran",
            ],
        )
        .spawn()
        .unwrap();
    wait_until(|| async { server.status().await.waiting == 1 }).await;
    send(child.id(), Signal::SIGTERM);
    let output = child.wait_with_output().await.unwrap();
    assert_eq!(code(&output), 128 + 15, "{}", stderr(&output));
    assert!(!scratch.file("ran").exists(), "the command ran anyway");
    // The server sees the connection close and takes the acquire out of the queue.
    wait_until(|| async { server.status().await.waiting == 0 }).await;
    assert_eq!(server.status().await.counters.granted, 1);
    assert!(held.release().await.unwrap());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_permit_stops_the_command_and_exits_75() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("lost");
    let script = r#"
echo "$FLOODGATE_PERMIT_ID" > permit.tmp && mv permit.tmp permit
trap 'echo TERM > trapped; exit 0' TERM
while :; do sleep 0.05; done
"#;
    let child = server
        .floodgate(
            scratch.path(),
            &["run", LIMITER, "--lease", "600ms", "--", "sh", "-c", script],
        )
        .spawn()
        .unwrap();
    wait_for_file(&scratch.file("permit")).await;
    // Someone else releases the permit: the next extend finds it lost.
    let client = Client::new(&server.url, None).unwrap();
    assert!(client.release(scratch.read("permit").trim()).await.unwrap());

    let output = child.wait_with_output().await.unwrap();
    assert_eq!(code(&output), 75, "{}", stderr(&output));
    assert_eq!(scratch.read("trapped").trim(), "TERM");
    assert!(stderr(&output).contains("lost"), "{}", stderr(&output));
    let status = server.status().await;
    assert_eq!(status.in_use, 0);
    assert_eq!(status.counters.extend_lost, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_only_grant_runs_without_extending_or_releasing() {
    let server = TestServer::start(1).await;
    let scratch = Scratch::new("rate-only");
    server
        .gate
        .define(
            "paced",
            LimiterSpec::rate(RateSpec::per(1000, Duration::from_secs(1)).with_burst(10)),
        )
        .await
        .unwrap();
    // Such a grant has no lease (`lease_ms` 0): nothing to keep alive, nothing to release, and
    // so nothing to warn about.
    let output = server
        .output(
            scratch.path(),
            &["run", "paced", "--", "sh", "-c", "sleep 0.3; exit 5"],
        )
        .await;
    assert_eq!(code(&output), 5, "{}", stderr(&output));
    assert_eq!(stderr(&output), "");
    let status = server
        .gate
        .limiter("paced")
        .await
        .unwrap()
        .status()
        .await
        .unwrap();
    assert_eq!(status.counters.granted, 1);
    assert_eq!(status.counters.extend_lost, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_exits_69_without_running_the_command() {
    let scratch = Scratch::new("unreachable");
    // A port that was free a moment ago: nothing listens there now.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(["run", LIMITER, "--", "sh", "-c", "touch ran"])
        .current_dir(scratch.path())
        .env("FLOODGATE_URL", format!("http://{addr}"))
        .output()
        .await
        .unwrap();
    assert_eq!(code(&output), 69, "{}", stderr(&output));
    assert!(!scratch.file("ran").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_takes_a_permit_for_its_key_of_a_keyed_limiter() {
    let server = TestServer::start(1).await;
    server
        .gate
        .define_keyed(
            "orgs",
            LimiterSpec::concurrency(4),
            floodgate::KeyedSpec::per_key(1).with_max_keys(1),
        )
        .await
        .unwrap();
    let scratch = Scratch::new("key");
    let output = server
        .output(
            scratch.path(),
            &["run", "orgs", "--key", "org-1", "--", "true"],
        )
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let orgs = server.gate.limiter("orgs").await.unwrap();
    let status = orgs.status().await.unwrap();
    assert_eq!(status.counters.granted, 1, "granted for the key");
    assert_eq!(status.in_use, 0, "released after the command");
    // Bad input: no key for a keyed limiter, a key for a plain one: exit 2 naming the field.
    for args in [
        vec!["run", "orgs", "--", "true"],
        vec!["run", LIMITER, "--key", "org-1", "--", "true"],
    ] {
        let output = server.output(scratch.path(), &args).await;
        assert_eq!(code(&output), 2, "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains("key"), "{}", stderr(&output));
    }
    // A second key beyond max_keys (1) while org-1 holds: EX_TEMPFAIL, not a failure.
    let held = orgs
        .acquire(floodgate::AcquireOptions::new().key("org-1"))
        .await
        .unwrap();
    let output = server
        .output(
            scratch.path(),
            &[
                "run", "orgs", "--key", "org-2", "--wait", "0s", "--", "true",
            ],
        )
        .await;
    assert_eq!(code(&output), 75, "{}", stderr(&output));
    assert!(stderr(&output).contains("keys"), "{}", stderr(&output));
    drop(held);
    server.stop().await;
}
