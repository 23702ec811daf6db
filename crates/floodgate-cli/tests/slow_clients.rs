//! Issue 12 "must show" 3 and item 9: the `floodgate serve` binary (a child process, so its own
//! RSS and descriptors can be read from `/proc` and it can be sent SIGTERM) under slow clients
//! and long polls. Figures are printed (run with `--nocapture`; `scripts/test.sh` does).
//!
//! - Thousands of connections hold a half-sent head or a half-sent body while `/healthz` and
//!   acquires on other connections keep answering; RSS and descriptors before, during, after.
//! - SIGTERM with thousands of such connections open: the process exits within its grace
//!   period (bounded wait; the figure is printed).
//! - Three rounds of 5,000 long polls: RSS before, at the peak of each round and after.
//!
//! `#[ignore]`d so that `cargo test --workspace` stays quick; `scripts/test.sh` runs them with
//! `--ignored`. Linux only (`/proc`).

#![allow(clippy::unwrap_used)]

#[path = "../../floodgate-server/tests/common/mod.rs"]
mod common;
#[path = "../../floodgate/tests/support/ports.rs"]
mod ports;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{PATIENCE, POLL};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Half-sent heads held open.
const HEADS: usize = 2_000;
/// Half-sent bodies held open.
const BODIES: usize = 1_000;
/// The grace period the server is started with.
const GRACE: Duration = Duration::from_secs(3);

struct Server {
    child: Child,
    addr: SocketAddr,
    http: reqwest::Client,
}

/// RSS in KiB and open descriptors of `pid`.
fn usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    (rss, fds)
}

fn show(label: &str, (rss, fds): (u64, usize)) -> String {
    format!("{label}: RSS {:.1} MB, {fds} fds", rss as f64 / 1024.0)
}

impl Server {
    async fn start(extra: &[&str]) -> Server {
        // Bound by the child later: a port no connection is given meanwhile (see `ports`).
        let port = ports::free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new(env!("CARGO_BIN_EXE_floodgate"))
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .args(extra)
            .env("FLOODGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(PATIENCE)
            .build()
            .unwrap();
        let server = Server { child, addr, http };
        let deadline = Instant::now() + PATIENCE;
        while !server.healthy().await {
            assert!(Instant::now() < deadline, "the server did not come up");
            tokio::time::sleep(POLL).await;
        }
        server
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    async fn healthy(&self) -> bool {
        let url = format!("http://{}/healthz", self.addr);
        let answer = common::try_request(&self.http, Method::GET, url, None).await;
        matches!(answer, Ok((200, _)))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let url = format!("http://{}{path}", self.addr);
        common::send_json(&self.http, Method::POST, url, body).await
    }

    async fn put_limiter(&self, name: &str, body: Value) {
        let url = format!("http://{}/v1/limiters/{name}", self.addr);
        let (code, answer) = common::send_json(&self.http, Method::PUT, url, body).await;
        assert_eq!(code, 200, "{answer}");
    }

    /// One acquire and its release, both answered.
    async fn acquire_release(&self) {
        let (status, v) = self
            .post("/v1/limiters/slow/acquire", json!({"wait_ms": 10_000}))
            .await;
        assert_eq!(status, 200, "{v}");
        let id = v["permit_id"].as_str().unwrap().to_owned();
        let (status, v) = self
            .post(&format!("/v1/permits/{id}/release"), json!({}))
            .await;
        assert_eq!((status, &v["released"]), (200, &json!(true)));
    }

    /// Waits (bounded) until the server holds at least `at_least` descriptors, or at most
    /// `at_most`.
    async fn wait_fds(&self, what: &str, ok: impl Fn(usize) -> bool) {
        let deadline = Instant::now() + PATIENCE * 3;
        loop {
            let (_, fds) = usage(self.pid());
            if ok(fds) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {fds} fds");
            tokio::time::sleep(POLL * 5).await;
        }
    }
}

/// Opens `heads` connections that send part of a head and `bodies` that send a whole head and
/// part of the body; returns them (held open until dropped).
async fn open_slow(addr: SocketAddr, heads: usize, bodies: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(heads + bodies);
    for i in 0..heads + bodies {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let part: &[u8] = if i < heads {
            b"POST /v1/limiters/slow/acquire HTTP/1.1\r\nhost: localhost\r\ncontent-ty"
        } else {
            b"POST /v1/limiters/slow/acquire HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
              content-length: 64\r\n\r\n{\"wait_ms\":"
        };
        s.write_all(part).await.unwrap();
        held.push(s);
    }
    held
}

/// How many connections this process may open (its own descriptors bound the test).
fn budget(wanted: usize) -> usize {
    let soft = floodgate_server::server::raise_fd_limit().map_or(1024, |(_, soft)| soft);
    let room = usize::try_from(soft)
        .unwrap_or(usize::MAX)
        .saturating_sub(256);
    if room < wanted {
        eprintln!("slow clients: descriptor limit {soft}: {room} connections instead of {wanted}");
    }
    wanted.min(room)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "heavy: run by scripts/test.sh with --ignored --nocapture"]
async fn slow_clients_do_not_stop_the_server() {
    let total = budget(HEADS + BODIES);
    let (heads, bodies) = (total * 2 / 3, total - total * 2 / 3);
    let grace = format!("{}ms", GRACE.as_millis());
    let args = [
        "--header-timeout",
        "120s",
        "--body-timeout",
        "120s",
        "--shutdown-grace",
        &grace,
    ];
    let mut srv = Server::start(&args).await;
    srv.put_limiter("slow", json!({"concurrency": 10})).await;
    srv.acquire_release().await;
    let before = usage(srv.pid());

    let held = open_slow(srv.addr, heads, bodies).await;
    srv.wait_fds("slow connections accepted", |fds| {
        fds >= before.1 + heads + bodies
    })
    .await;
    // Other clients are still served, again and again.
    for _ in 0..20 {
        assert!(
            srv.healthy().await,
            "/healthz failed with slow clients open"
        );
        srv.acquire_release().await;
    }
    let during = usage(srv.pid());
    drop(held);
    srv.wait_fds("slow connections closed", |fds| fds <= before.1 + 8)
        .await;
    srv.acquire_release().await;
    let after = settle(srv.pid(), before.0 + (during.0 - before.0) / 3).await;
    eprintln!(
        "slow clients ({heads} half-sent heads + {bodies} half-sent bodies): {}; {}; {}",
        show("before", before),
        show("during", during),
        show("after (settled)", after)
    );

    // SIGTERM while thousands of half-sent requests are open.
    let held = open_slow(srv.addr, heads, bodies).await;
    srv.wait_fds("slow connections accepted again", |fds| {
        fds >= before.1 + heads + bodies
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(srv.pid()).unwrap());
    let sent = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(PATIENCE, srv.child.wait())
        .await
        .expect("the server did not exit after SIGTERM")
        .unwrap();
    let took = sent.elapsed();
    eprintln!(
        "SIGTERM with {} half-sent requests open: exited ({status}) after {} ms (grace {} ms)",
        heads + bodies,
        took.as_millis(),
        GRACE.as_millis()
    );
    assert!(status.success(), "{status}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "heavy: run by scripts/test.sh with --ignored --nocapture"]
async fn memory_after_rounds_of_long_polls() {
    const ROUNDS: usize = 3;
    let polls = budget(5_000);
    let srv = Server::start(&[]).await;
    srv.put_limiter(
        "slow",
        json!({"concurrency": 1, "max_wait_ms": 600_000, "max_queue": 100_000}),
    )
    .await;
    let base = format!("http://{}", srv.addr);
    let before = usage(srv.pid());
    let mut figures = vec![show("before", before)];
    let mut peak_of_first = before.0;
    for round in 1..=ROUNDS {
        // Hold the only permit, so every poll waits.
        let (status, holder) = srv
            .post("/v1/limiters/slow/acquire", json!({"wait_ms": 0}))
            .await;
        assert_eq!(status, 200, "{holder}");
        let mut waiters = Vec::with_capacity(polls);
        for _ in 0..polls {
            let mut s = TcpStream::connect(srv.addr).await.unwrap();
            let body = json!({"wait_ms": 600_000}).to_string();
            let head = format!(
                "POST /v1/limiters/slow/acquire HTTP/1.1\r\nhost: localhost\r\n\
                 content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(head.as_bytes()).await.unwrap();
            waiters.push(s);
        }
        let deadline = Instant::now() + PATIENCE * 3;
        loop {
            let status: Value = srv
                .http
                .get(format!("{base}/v1/limiters/slow"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if status["waiting"].as_u64() == Some(polls as u64) {
                break;
            }
            assert!(Instant::now() < deadline, "waiters did not queue: {status}");
            tokio::time::sleep(POLL * 5).await;
        }
        let peak = usage(srv.pid());
        if round == 1 {
            peak_of_first = peak.0;
        }
        figures.push(show(&format!("round {round} peak"), peak));
        // The clients go away; the server notices and drops their waits.
        drop(waiters);
        let id = holder["permit_id"].as_str().unwrap().to_owned();
        srv.post(&format!("/v1/permits/{id}/release"), json!({}))
            .await;
        srv.wait_fds("waiters gone", |fds| fds <= before.1 + 8)
            .await;
    }
    let right_after = usage(srv.pid());
    figures.push(show("right after", right_after));
    // The allocator gives memory back over a few seconds (bounded wait): RSS must come down to
    // within a third of the way from the start to the first peak.
    let settled = settle(srv.pid(), before.0 + (peak_of_first - before.0) / 3).await;
    figures.push(show("settled", settled));
    eprintln!(
        "{ROUNDS} rounds of {polls} long polls: {}",
        figures.join("; ")
    );
    assert!(
        settled.0 <= before.0 + (peak_of_first - before.0) / 3,
        "memory was not returned: {}",
        figures.join("; ")
    );
}

/// Polls the RSS of `pid` for up to a minute until it is at most `target` KiB; the last reading.
async fn settle(pid: u32, target: u64) -> (u64, usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = usage(pid);
        if now.0 <= target || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
