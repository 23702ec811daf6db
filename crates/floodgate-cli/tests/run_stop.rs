//! How `floodgate run` stops its command (issue 12, items 1 and 2) and how it rides out a
//! server restart (issue 10, item 4). The real `floodgate` binary runs as child processes; the
//! server is either in this process on `127.0.0.1:0` or, for the restart tests, a real
//! `floodgate serve` process that is SIGKILLed and started again on the same port.
//!
//! No assertion depends on timing; waits are bounded only so a broken build fails instead of
//! hanging.

#![allow(clippy::unwrap_used)]

#[path = "../../floodgate/tests/support/ports.rs"]
mod ports;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodgate::{Floodgate, LimiterSpec, LimiterStatus};
use floodgate_server::client::Client;
use floodgate_server::server::{self, ServerOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

const LIMITER: &str = "lim";
/// Bound on every wait for something that must happen.
const PATIENCE: Duration = Duration::from_secs(30);

/// `floodgate ARGS...` against `url`, in `dir`, its output captured.
fn floodgate(url: &str, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_floodgate"));
    cmd.args(args)
        .current_dir(dir)
        .env("FLOODGATE_URL", url)
        .env_remove("FLOODGATE_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// The real server in this process, with one concurrency limiter `lim` of limit 1.
async fn in_process_server() -> (String, Floodgate) {
    let gate = Floodgate::in_memory();
    gate.define(LIMITER, LimiterSpec::concurrency(1))
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(server::run(
        listener,
        gate.clone(),
        ServerOptions::default(),
        std::future::pending::<()>(),
    ));
    (url, gate)
}

async fn status(gate: &Floodgate) -> LimiterStatus {
    gate.limiter(LIMITER).await.unwrap().status().await.unwrap()
}

/// A fresh scratch directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("run_stop-{test}-{}", std::process::id()));
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

    fn pid(&self, name: &str) -> i32 {
        self.read(name).trim().parse().unwrap()
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

/// Waits until `done` holds; bounded by [`PATIENCE`].
async fn wait_until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what} never happened");
}

async fn exists(path: PathBuf) -> bool {
    path.exists()
}

/// Whether process `pid` has ended (gone, or a zombie nobody reaped yet).
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

async fn wait_output(child: Child) -> Output {
    tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .expect("floodgate run never exited")
        .unwrap()
}

/// A command that writes its pid, records SIGTERM and then exits. Its own stderr goes to
/// /dev/null: sh reports the `sleep` that SIGTERM killed there, and would die of SIGPIPE on a
/// closed one (the command's own business, not floodgate run's).
const TERM_EXITS: &str = r#"
exec 2>/dev/null
trap 'echo TERM > trapped; exit 0' TERM
echo "$FLOODGATE_PERMIT_ID" > permit
echo $$ > pid.tmp && mv pid.tmp pid
while :; do sleep 0.05; done
"#;

/// A command (and a background child) that ignore SIGTERM: only SIGKILL stops them.
const TERM_IGNORED: &str = r#"
trap '' TERM
sleep 1000 &
echo $! > bg
echo "$FLOODGATE_PERMIT_ID" > permit
echo $$ > pid.tmp && mv pid.tmp pid
while :; do sleep 0.05; done
"#;

// Issue 12 item 1: a warning on a closed stderr used to panic (exit 101) before the command
// was sent SIGTERM, so it ran on without a permit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stderr_does_not_stop_the_lost_permit_path() {
    let (url, gate) = in_process_server().await;
    let scratch = Scratch::new("closed-stderr");
    let mut child = floodgate(
        &url,
        scratch.path(),
        &[
            "run", LIMITER, "--lease", "3s", "--", "sh", "-c", TERM_EXITS,
        ],
    )
    .spawn()
    .unwrap();
    // Close the read end of its stderr: every warning now meets EPIPE.
    drop(child.stderr.take());
    wait_until("the command starting", || exists(scratch.file("pid"))).await;
    let client = Client::new(&url, None).unwrap();
    assert!(client.release(scratch.read("permit").trim()).await.unwrap());

    let output = wait_output(child).await;
    assert_eq!(
        code(&output),
        75,
        "floodgate run did not finish its lost path"
    );
    assert_eq!(
        scratch.read("trapped").trim(),
        "TERM",
        "the command got no SIGTERM"
    );
    assert!(dead(scratch.pid("pid")));
    assert_eq!(status(&gate).await.counters.extend_lost, 1);
}

// Issue 12 item 2: a command that ignores SIGTERM used to run on after its permit was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_ignores_sigterm_is_killed_after_the_grace() {
    let (url, _gate) = in_process_server().await;
    let scratch = Scratch::new("ignores-term");
    let child = floodgate(
        &url,
        scratch.path(),
        &[
            "run",
            LIMITER,
            "--lease",
            "3s",
            "--kill-after",
            "300ms",
            "--",
            "sh",
            "-c",
            TERM_IGNORED,
        ],
    )
    .spawn()
    .unwrap();
    wait_until("the command starting", || exists(scratch.file("pid"))).await;
    let client = Client::new(&url, None).unwrap();
    assert!(client.release(scratch.read("permit").trim()).await.unwrap());

    let output = wait_output(child).await;
    assert_eq!(code(&output), 75, "{}", stderr(&output));
    assert!(stderr(&output).contains("SIGKILL"), "{}", stderr(&output));
    // The whole process group went, the background child that ignored SIGTERM too.
    let (pid, bg) = (scratch.pid("pid"), scratch.pid("bg"));
    wait_until("the command dying", || async move { dead(pid) && dead(bg) }).await;
}

// Issue 12 item 2: `kill -9` of floodgate run used to leave the command running as an orphan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_floodgate_run_stops_the_command_and_its_group() {
    let (url, _gate) = in_process_server().await;
    let scratch = Scratch::new("kill-9");
    let mut child = floodgate(
        &url,
        scratch.path(),
        &[
            "run",
            LIMITER,
            "--kill-after",
            "300ms",
            "--",
            "sh",
            "-c",
            TERM_IGNORED,
        ],
    )
    .spawn()
    .unwrap();
    wait_until("the command starting", || exists(scratch.file("pid"))).await;
    let (pid, bg) = (scratch.pid("pid"), scratch.pid("bg"));
    assert!(!dead(pid) && !dead(bg));

    child.start_kill().unwrap(); // SIGKILL
    let status = child.wait().await.unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    wait_until("the orphaned command dying", || async move {
        dead(pid) && dead(bg)
    })
    .await;
}

/// `floodgate run` killed (SIGKILL) after its command exited but while what the command left in
/// its process group still ran (the permit kept for it): the watchdog stops those leftovers as
/// it would the command. It used to exit with the command, so nothing stopped them: the lease
/// ended, the slot went to someone else, and the leftover kept working (review of the change
/// that keeps the permit for leftovers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_run_while_it_holds_the_permit_for_leftovers_stops_them() {
    let (url, gate) = in_process_server().await;
    let scratch = Scratch::new("leftover-kill");
    let mut child = floodgate(
        &url,
        scratch.path(),
        &[
            "run",
            LIMITER,
            "--lease",
            "2s",
            "--kill-after",
            "300ms",
            "--",
            "sh",
            "-c",
            "echo $$ > sh.tmp && mv sh.tmp sh; sleep 1000 & echo $! > bg.tmp && mv bg.tmp bg; exit 0",
        ],
    )
    .spawn()
    .unwrap();
    wait_until("the command starting", || exists(scratch.file("bg"))).await;
    let (sh, bg) = (scratch.pid("sh"), scratch.pid("bg"));
    // The command has exited and been reaped; only what it left runs, under the permit.
    wait_until("the command exiting", || async move {
        !std::path::Path::new(&format!("/proc/{sh}")).exists()
    })
    .await;
    assert!(!dead(bg), "the leftover stopped on its own");
    assert_eq!(
        status(&gate).await.in_use,
        1,
        "the permit is kept for the leftover"
    );
    child.start_kill().unwrap(); // SIGKILL: floodgate run can do nothing itself
    let _ = child.wait().await.unwrap();
    wait_until("the leftover stopped by the watchdog", || async move {
        dead(bg)
    })
    .await;
}

/// A real `floodgate serve` process, killed and started again on the same port.
struct ServeProcess {
    port: u16,
    config: PathBuf,
    child: Option<Child>,
}

impl ServeProcess {
    async fn start(scratch: &Scratch) -> Self {
        let config = scratch.file("floodgate.toml");
        std::fs::write(
            &config,
            format!("[limiters.{LIMITER}]\nconcurrency = 1\nlease_ms = 60000\n"),
        )
        .unwrap();
        // Restarted on this port: one the kernel never gives a client (see `ports`).
        let port = ports::free_port();
        let mut server = ServeProcess {
            port,
            config,
            child: None,
        };
        server.restart().await;
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_floodgate"))
            .args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--config")
            .arg(&self.config)
            .env_remove("FLOODGATE_TOKEN")
            .env("FLOODGATE_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let client = Client::new(&self.url(), None).unwrap();
        wait_until("the server answering", || {
            let client = client.clone();
            async move { client.limiter(LIMITER).await.is_ok() }
        })
        .await;
    }

    /// SIGKILL, as a crash or an OOM kill would.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().unwrap();
            child.wait().await.unwrap();
        }
    }
}

/// Collects `floodgate run`'s stderr lines as they come.
fn collect_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let seen = Arc::new(Mutex::new(String::new()));
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    seen
}

fn count(seen: &Mutex<String>, needle: &str) -> usize {
    seen.lock().unwrap().matches(needle).count()
}

/// Counts lines a running command appended to `ticks`.
fn ticks(scratch: &Scratch) -> usize {
    scratch.read("ticks").lines().count()
}

const TICKING: &str = r#"
trap 'echo TERM > trapped; exit 0' TERM
touch started
while [ ! -e stop ]; do echo x >> ticks; sleep 0.05; done
"#;

// Issue 10 item 4: a server that cannot be reached never stops the command by itself; the
// restarted server's answer decides. Without a durable store (or re-adoption) it answers 410
// permit_lost and the command is stopped then; with one, the command runs to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_keeps_running_while_the_server_restarts() {
    let scratch = Scratch::new("restart");
    let mut server = ServeProcess::start(&scratch).await;
    let mut child = floodgate(
        &server.url(),
        scratch.path(),
        &["run", LIMITER, "--lease", "10s", "--", "sh", "-c", TICKING],
    )
    .spawn()
    .unwrap();
    let seen = collect_stderr(&mut child);
    wait_until("the command starting", || exists(scratch.file("started"))).await;

    server.kill().await;
    // Several refused extends in a row, and the command ticks on after them.
    wait_until("extends failing", || async {
        count(&seen, "cannot extend") >= 2
    })
    .await;
    let before = ticks(&scratch);
    wait_until("the command ticking on", || async {
        ticks(&scratch) > before + 2
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the outage stopped the command"
    );
    assert!(!scratch.file("trapped").exists());

    server.restart().await;
    let client = Client::new(&server.url(), None).unwrap();
    let mut stopped_it = false;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status; // Told permit_lost, or the command finished.
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "floodgate run never ended"
        );
        let in_use = client.limiter(LIMITER).await.unwrap()["in_use"].as_u64();
        if in_use == Some(1) && !stopped_it {
            // The server re-adopted the permit: let the command finish.
            std::fs::write(scratch.file("stop"), "").unwrap();
            stopped_it = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let log = seen.lock().unwrap().clone();
    if stopped_it {
        assert_eq!(status.code(), Some(0), "{log}");
    } else {
        assert_eq!(status.code(), Some(75), "{log}");
        assert!(log.contains("permit_lost"), "{log}");
        assert!(!log.contains("lease ran out"), "{log}");
        assert_eq!(scratch.read("trapped").trim(), "TERM");
    }
    server.kill().await;
}

// Issue 10 item 4: when the lease passes without a confirmed extend, the command is stopped even
// though the server never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_ends_during_the_outage_stops_the_command() {
    let scratch = Scratch::new("outage");
    let mut server = ServeProcess::start(&scratch).await;
    let mut child = floodgate(
        &server.url(),
        scratch.path(),
        &[
            "run", LIMITER, "--lease", "1500ms", "--", "sh", "-c", TICKING,
        ],
    )
    .spawn()
    .unwrap();
    let seen = collect_stderr(&mut child);
    wait_until("the command starting", || exists(scratch.file("started"))).await;

    server.kill().await;
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("floodgate run never stopped the command")
        .unwrap();
    let log = seen.lock().unwrap().clone();
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(log.contains("lease ran out"), "{log}");
    assert_eq!(scratch.read("trapped").trim(), "TERM");
}

/// A TCP front for the server that records every request body and hangs up, without an
/// answer, on the first acquire (as a connection broken mid-request would). One request per
/// connection: it asks the server to close, so the client opens a new one each time.
async fn dropping_proxy(upstream: String) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    proxy(upstream, FirstAcquire::Drop).await
}

/// What [`proxy`] does to the first acquire.
#[derive(Clone, Copy)]
enum FirstAcquire {
    /// Hangs up without an answer.
    Drop,
    /// Holds the server's answer this long before passing it on (a slow network).
    Delay(Duration),
}

/// A TCP front for the server that records every request body and does `first` to the first
/// acquire. One request per connection: it asks the server to close, so the client opens a
/// new one each time.
async fn proxy(
    upstream: String,
    first: FirstAcquire,
) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let upstream = upstream.trim_start_matches("http://").to_owned();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    tokio::spawn(async move {
        let mut dropped = false;
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut data = Vec::new();
            let mut buf = [0u8; 65536];
            let (head, mut body) = loop {
                let n = conn.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break (String::new(), Vec::new());
                }
                data.extend_from_slice(&buf[..n]);
                if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&data[..i]).into_owned();
                    break (head, data[i + 4..].to_vec());
                }
            };
            if head.is_empty() {
                continue;
            }
            let length: usize = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.trim().parse().unwrap());
            while body.len() < length {
                let n = conn.read(&mut buf).await.unwrap();
                body.extend_from_slice(&buf[..n]);
            }
            if !body.is_empty() {
                seen.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
            }
            let mut delay = Duration::ZERO;
            if head.contains("/acquire") && !dropped {
                dropped = true;
                match first {
                    FirstAcquire::Drop => continue, // `conn` dropped: hung up without an answer
                    FirstAcquire::Delay(d) => delay = d,
                }
            }
            let head: Vec<&str> = head
                .lines()
                .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                .collect();
            let mut up = tokio::net::TcpStream::connect(&upstream).await.unwrap();
            let request = format!("{}\r\nconnection: close\r\n\r\n", head.join("\r\n"));
            up.write_all(request.as_bytes()).await.unwrap();
            up.write_all(&body).await.unwrap();
            let mut answer = Vec::new();
            up.read_to_end(&mut answer).await.unwrap();
            tokio::time::sleep(delay).await;
            let _ = conn.write_all(&answer).await;
        }
    });
    (url, bodies)
}

// Issue 10 item 3: an acquire that meets a connection error is sent again with the same
// `request_id` (the server answers a repeat with the same grant); extends carry `permits`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_acquire_keeps_its_request_id_and_extends_carry_permits() {
    let gate = Floodgate::in_memory();
    gate.define(LIMITER, LimiterSpec::concurrency(3))
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(server::run(
        listener,
        gate.clone(),
        ServerOptions::default(),
        std::future::pending::<()>(),
    ));
    let (url, bodies) = dropping_proxy(upstream).await;
    let scratch = Scratch::new("request-id");
    let output = floodgate(
        &url,
        scratch.path(),
        &[
            "run",
            LIMITER,
            "--permits",
            "2",
            "--lease",
            "1500ms",
            "--",
            "sleep",
            "1.2",
        ],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(code(&output), 0, "{}", stderr(&output));

    let bodies = bodies.lock().unwrap().clone();
    let acquires: Vec<_> = bodies
        .iter()
        .filter(|b| b.get("wait_ms").is_some() || b.get("holder").is_some())
        .collect();
    assert_eq!(acquires.len(), 2, "{bodies:?}");
    let id = acquires[0]["request_id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    assert_eq!(acquires[1]["request_id"].as_str(), Some(id));
    let extends: Vec<_> = bodies
        .iter()
        .filter(|b| b.get("lease_ms").is_some() && b.get("holder").is_none())
        .collect();
    assert!(!extends.is_empty(), "{bodies:?}");
    assert!(extends.iter().all(|b| b["permits"] == 2), "{extends:?}");
    let status = status(&gate).await;
    assert_eq!(status.counters.granted, 1, "one logical acquire, one grant");
    assert_eq!(status.in_use, 0);
}

/// A grant whose lease has already ended when its answer arrives (a 1 ms lease, its answer
/// held 200 ms on the way) covers nothing: the command does not run, the permit is released,
/// and `floodgate run` exits 75 saying the lease ended. It once ran the command without a
/// permit, and then blamed the connection for the failed extend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_ended_before_the_start_does_not_run_the_command() {
    let (upstream, gate) = in_process_server().await;
    let (url, _) = proxy(upstream, FirstAcquire::Delay(Duration::from_millis(200))).await;
    let scratch = Scratch::new("ended-lease");
    let output = floodgate(
        &url,
        scratch.path(),
        &[
            "run",
            LIMITER,
            "--lease",
            "1ms",
            "--",
            "sh",
            "-c",
            "touch ran",
        ],
    )
    .output()
    .await
    .unwrap();
    let err = stderr(&output);
    assert_eq!(code(&output), 75, "{err}");
    assert!(!scratch.file("ran").exists(), "the command ran: {err}");
    assert!(
        err.contains("lease ended before the command could start"),
        "{err}"
    );
    assert!(!err.contains("cannot reach"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let status = status(&gate).await;
    assert_eq!(status.counters.granted, 1);
    assert_eq!(status.in_use, 0);
}
