//! Crash test with real processes (issue 10): holder processes (tests/crash/holder.py) take
//! permits from a `floodgate serve --data-dir` over HTTP and tell an independent witness (a TCP
//! server in this test, which the code under test cannot see) when their work starts and
//! stops. Meanwhile holders are SIGKILLed at random and replaced, and the server is SIGKILLed
//! and restarted at random points, a dozen times: some while a snapshot is being written, some
//! with the server's wall clock set ten minutes back (libfaketime).
//!
//! Must hold: the witness never counts more working holders than the limit; no holder that
//! was alive lost its permit (every extend after a restart succeeds); the limiter created over
//! the API is there after every restart; fencing tokens keep increasing across restarts, also
//! with the clock set back; and no fencing token was handed to two different acquires.

#![allow(clippy::unwrap_used)]

#[path = "../../floodgate-server/tests/common/mod.rs"]
mod common;
#[path = "../../floodgate/tests/support/ports.rs"]
mod ports;

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::holders::{spawn_holder, witness, Events};
use common::SplitMix64;
use ports::free_port;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

const LIMIT: i64 = 8;
const HOLDERS: usize = 20;
/// Long enough that a restart (kill, start, recovery) never outlasts a holder's margin: a
/// holder extends every third of it and gives up at 90 %.
const LEASE_MS: u64 = 4000;
const RESTARTS: usize = 12;
const SEED: u64 = 0xc4a5_4ed0_f100_d6a7;
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Starts `floodgate serve` on `port` with its data in `dir`; under libfaketime ten minutes
/// behind when `clock_back`.
fn spawn_server(port: u16, dir: &Path, clock_back: bool) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_floodgate"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir)
        .args(["--snapshot-after-bytes", "4096"])
        .env("FLOODGATE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if clock_back {
        cmd.env("LD_PRELOAD", FAKETIME_LIB)
            .env("FAKETIME", "-600")
            // Only the wall clock is set back; the boot clock is the machine's.
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    }
    cmd.spawn().expect("start floodgate serve")
}

async fn wait_ready(http: &reqwest::Client, base: &str) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await {
            if r.status().is_success() {
                return started.elapsed();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "server never came up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn post(http: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = http.post(url).json(&body).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_and_the_server_crash_and_nothing_is_over_admitted_or_lost() {
    let faketime = Path::new(FAKETIME_LIB).exists();
    if !faketime {
        // scripts/test.sh installs it (Debian's faketime); say so rather than pass silently.
        assert!(
            std::env::var_os("CI").is_none(),
            "libfaketime is missing ({FAKETIME_LIB}): apt-get install faketime"
        );
        eprintln!("libfaketime missing: the clock-set-back rounds are skipped");
    }
    let mut rng = SplitMix64(SEED);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut server = spawn_server(port, dir.path(), false);
    wait_ready(&http, &base).await;

    for (name, body) in [
        (
            "crash-api",
            json!({"concurrency": LIMIT, "lease_ms": LEASE_MS, "max_wait_ms": 30000}),
        ),
        ("probe", json!({"concurrency": 1, "max_wait_ms": 30000})),
        (
            "ballast",
            json!({"concurrency": 100000, "lease_ms": 3_600_000}),
        ),
    ] {
        let r = http
            .put(format!("{base}/v1/limiters/{name}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "create {name}: {}", r.status());
    }
    // Ballast: thousands of long-held permits make every snapshot big enough to be killed in.
    for _ in 0..2000 {
        let (s, _) = post(
            &http,
            format!("{base}/v1/limiters/ballast/acquire"),
            json!({}),
        )
        .await;
        assert_eq!(s, 200);
    }

    let current = Arc::new(AtomicI64::new(0));
    let peak = Arc::new(AtomicI64::new(0));
    let witness_port = witness(current.clone(), peak.clone()).await;
    let events = Arc::new(Mutex::new(Events::default()));
    let next_seed = AtomicU64::new(1);
    let mut holders: Vec<Child> = (0..HOLDERS)
        .map(|_| {
            let seed = next_seed.fetch_add(1, Ordering::Relaxed);
            spawn_holder(
                &base,
                "crash-api",
                LEASE_MS,
                witness_port,
                seed,
                events.clone(),
            )
        })
        .collect();

    let mut last_token = 0u64;
    let probe = |round: usize, http: reqwest::Client, base: String| async move {
        let (s, permit) = post(
            &http,
            format!("{base}/v1/limiters/probe/acquire"),
            json!({"wait_ms": 20000, "lease_ms": 60000}),
        )
        .await;
        assert_eq!(s, 200, "probe acquire in round {round}: {permit}");
        let id = permit["permit_id"].as_str().unwrap().to_owned();
        let (s, _) = post(&http, format!("{base}/v1/permits/{id}/release"), json!({})).await;
        assert_eq!(s, 200);
        permit["fencing_token"].as_u64().unwrap()
    };
    let (mut mid_snapshot, mut clock_back_rounds, mut holder_kills) = (0, 0, 0);
    let mut recoveries = Vec::new();
    for round in 0..RESTARTS {
        let run_for = Duration::from_millis(rng.between(300, 1200));
        let until = Instant::now() + run_for;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(rng.between(50, 300))).await;
            if rng.between(0, 2) == 0 {
                let i = rng.between(0, HOLDERS as u64 - 1) as usize;
                let _ = holders[i].start_kill();
                let _ = holders[i].wait().await;
                holder_kills += 1;
                let seed = next_seed.fetch_add(1, Ordering::Relaxed);
                holders[i] = spawn_holder(
                    &base,
                    "crash-api",
                    LEASE_MS,
                    witness_port,
                    seed,
                    events.clone(),
                );
            }
        }
        let before = probe(round, http.clone(), base.clone()).await;
        assert!(
            before > last_token,
            "round {round}: token {before} after {last_token}"
        );
        last_token = before;
        if round % 3 == 1 {
            // Kill the moment a snapshot is being written (its temporary file exists), from a
            // thread that watches the directory without sleeping.
            let pid = nix::unistd::Pid::from_raw(server.id().unwrap() as i32);
            let watched = dir.path().to_owned();
            let hit = tokio::task::spawn_blocking(move || {
                let give_up = Instant::now() + Duration::from_secs(8);
                while Instant::now() < give_up {
                    // A snapshot's temporary file, not the clock mark's (`clock.json.tmp`,
                    // written every second, which this matched too).
                    let writing = std::fs::read_dir(&watched)
                        .unwrap()
                        .filter_map(Result::ok)
                        .any(|e| {
                            let name = e.file_name();
                            let name = name.to_string_lossy();
                            name.starts_with("snapshot-") && name.ends_with(".json.tmp")
                        });
                    if writing {
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                        return true;
                    }
                    std::thread::yield_now();
                }
                false
            })
            .await
            .unwrap();
            mid_snapshot += usize::from(hit);
        }
        let _ = server.start_kill();
        let _ = server.wait().await;
        tokio::time::sleep(Duration::from_millis(rng.between(0, 200))).await;
        let clock_back = faketime && round % 4 == 2;
        clock_back_rounds += usize::from(clock_back);
        server = spawn_server(port, dir.path(), clock_back);
        recoveries.push(wait_ready(&http, &base).await);
        let r = http
            .get(format!("{base}/v1/limiters/crash-api"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "round {round}: the API-created limiter is gone"
        );
        let after = probe(round, http.clone(), base.clone()).await;
        assert!(
            after > last_token,
            "round {round}: token {after} after a restart, {last_token} before (clock back: {clock_back})"
        );
        last_token = after;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for h in &mut holders {
        let _ = h.start_kill();
        let _ = h.wait().await;
    }
    let _ = server.start_kill();
    let ev = events.lock().unwrap();
    let count = |k: &str| ev.counts.get(k).copied().unwrap_or(0);
    let slowest = recoveries.iter().max().copied().unwrap_or_default();
    eprintln!(
        "crash test: {RESTARTS} server restarts ({mid_snapshot} while a snapshot was written, \
         {clock_back_rounds} with the wall clock 10 min back), {holder_kills} holders killed; \
         {} grants, {} finished, witness peak {} of {LIMIT}; lost while alive {}, \
         given up at the local deadline {}; slowest restart to ready {slowest:?}",
        count("granted"),
        count("done"),
        peak.load(Ordering::SeqCst),
        count("lost_alive"),
        count("expired_local"),
    );
    assert!(peak.load(Ordering::SeqCst) <= LIMIT, "over-admitted");
    assert!(
        count("granted") >= 30,
        "too little progress: {:?}",
        ev.counts
    );
    assert_eq!(count("lost_alive"), 0, "a live holder lost its permit");
    assert_eq!(
        count("expired_local"),
        0,
        "a live holder could not extend in time"
    );
    assert!(
        ev.duplicate_tokens.is_empty(),
        "tokens granted twice: {:?}",
        ev.duplicate_tokens
    );
    assert_eq!(count("acquire_error"), 0, "{:?}", ev.counts);
    assert!(mid_snapshot >= 1, "no kill landed during a snapshot");
}
