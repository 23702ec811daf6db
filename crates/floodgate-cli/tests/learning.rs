//! Issue 10, must show 2: re-learning after Redis loses its state, on real processes.
//!
//! Two `floodgate serve` processes share one real `redis-server` (no persistence). Holders are
//! processes (`tests/crash/holder.py`, as in the crash test) sending each request to either
//! server: each acquires, tells an independent witness (a TCP server in this test) that its work
//! starts, works while heartbeating (extend with its `permits`, retrying 503s and connection
//! errors until its lease deadline), tells the witness it stopped and releases. Mid-run Redis is restarted empty (SIGKILL and
//! start again, no persistence) and, later, `FLUSHALL`ed. Each time the servers notice the
//! limiter vanished, re-create it from its config in a learning window, and the heartbeating
//! holders re-adopt their permits. Checked: the witness never exceeds the limit; no holder that
//! heartbeated was told its permit was lost; permits were re-adopted after each loss; and new
//! grants resume after each learning window.
//!
//! No assertion is about elapsed time; waits are bounded polling loops.

#![allow(clippy::unwrap_used)]

#[path = "../../floodgate-server/tests/common/mod.rs"]
mod common;
#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::holders::{spawn_holder, witness, Events};
use common::{SplitMix64, PATIENCE, POLL};
use serde_json::{json, Value};
use support::{free_port, RedisServer};
use tokio::time::Instant;

const LIMIT: i64 = 4;
/// Holder processes (they extend every third of the lease).
const WORKERS: u64 = 8;
const LEASE_MS: u64 = 1_500;
/// The servers' learning window: longer than a heartbeat interval plus Redis's restart.
const WINDOW_MS: u64 = 2_000;
const SEED: u64 = 0x1ea2_4e4d_0f10_0d00;

/// A child process killed when the test ends, passed or failed.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `floodgate serve --redis URL --config FILE --learning-window WINDOW_MS`, once it answers.
async fn serve(redis_url: &str, config: &std::path::Path) -> (ChildGuard, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_floodgate"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FLOODGATE_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(["serve", "--redis", redis_url, "--listen", &addr])
        .arg("--config")
        .arg(config)
        .args(["--learning-window", &WINDOW_MS.to_string()])
        .env("FLOODGATE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut child = ChildGuard(cmd.spawn().unwrap());
    let base = format!("http://{addr}");
    let client = http();
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("floodgate serve exited early: {status}");
        }
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "floodgate serve never became ready"
        );
        tokio::time::sleep(POLL).await;
    }
    (child, base)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// POSTs JSON; `None` on a transport error.
async fn post(client: &reqwest::Client, url: String, body: Value) -> Option<(u16, Value)> {
    let r = client.post(url).json(&body).send().await.ok()?;
    let status = r.status().as_u16();
    let v = r.json::<Value>().await.unwrap_or(Value::Null);
    Some((status, v))
}

/// Polls a server's view of the limiter until `cond` holds.
async fn until(base: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let client = http();
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(r) = client.get(format!("{base}/v1/limiters/work")).send().await {
            if let Ok(v) = r.json::<Value>().await {
                if cond(&v) {
                    return v;
                }
            }
        }
        assert!(Instant::now() < deadline, "never reached: {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Grants counted so far (the holders' `granted` events).
fn grants(events: &Mutex<Events>) -> u64 {
    events
        .lock()
        .unwrap()
        .counts
        .get("granted")
        .copied()
        .unwrap_or(0)
}

/// Waits until `n` grants more than `from` were made.
async fn grants_after(events: &Mutex<Events>, from: u64, n: u64, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while grants(events) < from + n {
        assert!(Instant::now() < deadline, "no new grants: {what}");
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_relearn_after_redis_restarts_empty_and_after_flushall() {
    let mut redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("floodgate-learning-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("floodgate.toml");
    std::fs::write(
        &config,
        format!(
            "[limiters.work]\nconcurrency = {LIMIT}\nlease_ms = {LEASE_MS}\nmax_wait_ms = 600000\n"
        ),
    )
    .unwrap();
    let (_a, base_a) = serve(&redis.url(), &config).await;
    let (_b, base_b) = serve(&redis.url(), &config).await;
    // Holders are processes, each request to either server.
    let current = Arc::new(AtomicI64::new(0));
    let peak = Arc::new(AtomicI64::new(0));
    let witness_port = witness(Arc::clone(&current), Arc::clone(&peak)).await;
    let events = Arc::new(Mutex::new(Events::default()));
    let bases = format!("{base_a},{base_b}");
    let mut rng = SplitMix64(SEED);
    let holders: Vec<_> = (0..WORKERS)
        .map(|_| {
            spawn_holder(
                &bases,
                "work",
                LEASE_MS,
                witness_port,
                rng.next_u64(),
                Arc::clone(&events),
            )
        })
        .collect();

    // Phase 0: normal operation, the limit full.
    grants_after(&events, 0, 12, "before the restart").await;
    until(&base_a, "every slot held", |v| v["in_use"] == json!(LIMIT)).await;

    // Redis restarts empty: every key is gone.
    tokio::task::block_in_place(|| redis.restart());
    let from = grants(&events);
    let v = until(&base_a, "re-created, learning", |v| {
        v["learning"] == json!(true)
    })
    .await;
    assert!(v["in_use"].as_u64().unwrap() <= LIMIT as u64, "{v}");
    assert_eq!(
        v["counters"]["granted"], v["counters"]["adopted"],
        "granted while learning: {v}"
    );
    let v = until(&base_b, "the window ended", |v| {
        v["learning"] == json!(false)
    })
    .await;
    assert!(
        v["counters"]["adopted"].as_u64().unwrap() >= 1,
        "no holder re-adopted its permit after the restart: {v}"
    );
    grants_after(&events, from, 12, "after the restart's learning window").await;

    // FLUSHALL: the same, without the connections dropping.
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "flushall"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    let from = grants(&events);
    let v = until(&base_b, "re-created, learning", |v| {
        v["learning"] == json!(true)
    })
    .await;
    assert!(v["in_use"].as_u64().unwrap() <= LIMIT as u64, "{v}");
    assert_eq!(
        v["counters"]["granted"], v["counters"]["adopted"],
        "granted while learning: {v}"
    );
    let v = until(&base_a, "the window ended", |v| {
        v["learning"] == json!(false)
    })
    .await;
    assert!(
        v["counters"]["adopted"].as_u64().unwrap() >= 1,
        "no holder re-adopted its permit after FLUSHALL: {v}"
    );
    grants_after(&events, from, 12, "after FLUSHALL's learning window").await;

    drop(holders); // killed on drop: the witness counts their connections closing
    let peak = peak.load(Ordering::SeqCst);
    let ev = events.lock().unwrap();
    let count = |k: &str| ev.counts.get(k).copied().unwrap_or(0);
    eprintln!("peak {peak}, events {:?}", ev.counts);
    assert!(
        peak <= LIMIT,
        "the witness saw {peak} permits out at once; the limit is {LIMIT}"
    );
    assert_eq!(peak, LIMIT, "the run never filled the limit");
    assert_eq!(
        count("lost_alive"),
        0,
        "heartbeating holders were told their permit was lost"
    );
    assert_eq!(
        count("expired_local"),
        0,
        "holders could not confirm an extend within their lease"
    );
    assert!(
        ev.duplicate_tokens.is_empty(),
        "a fencing token went to two acquires: {:?}",
        ev.duplicate_tokens
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 11: `PUT {"adaptive": ...}` alone moves a kept starting limit outside the new range to
/// its nearest end, so the limit in force lies within the range.
#[tokio::test]
async fn a_put_of_only_the_adaptive_range_keeps_the_limit_within_it() {
    let served = common::Served::start(
        floodgate::Floodgate::in_memory(),
        floodgate_server::server::ServerOptions::default(),
    )
    .await;
    let client = http();
    let url = format!("http://{}/v1/limiters/ad", served.addr);
    let put = |body: Value| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let r = client.put(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, v) = put(json!({"concurrency": 40, "adaptive": {"min": 2, "max": 80}})).await;
    assert_eq!((status, &v["limit"]), (200, &json!(40)), "{v}");
    let (status, v) = put(json!({"adaptive": {"min": 2, "max": 10}})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (&v["limit"], &v["concurrency"]),
        (&json!(10), &json!(10)),
        "{v}"
    );
    let (status, v) = put(json!({"adaptive": {"min": 20, "max": 30}})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (&v["limit"], &v["concurrency"]),
        (&json!(20), &json!(20)),
        "{v}"
    );
    served.stop().await;
}

/// An embedded server started with `--learning-window` and no state learns before granting:
/// an extend carrying its permits re-adopts a permit of the previous process; an acquire is
/// not granted until the window ends, then is, with a token above the re-adopted one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_server_started_with_a_learning_window_readopts_heartbeats() {
    let dir = std::env::temp_dir().join(format!("floodgate-learning-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("floodgate.toml");
    std::fs::write(
        &config,
        "[limiters.work]\nconcurrency = 1\nlease_ms = 60000\nmax_wait_ms = 600000\n",
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_floodgate"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FLOODGATE_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(["serve", "--listen", &addr, "--learning-window", "1500"])
        .arg("--config")
        .arg(&config)
        .env("FLOODGATE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let _child = ChildGuard(cmd.spawn().unwrap());
    let base = format!("http://{addr}");
    let v = until(&base, "serving", |v| v["learning"].is_boolean()).await;
    assert_eq!(v["learning"], json!(true), "{v}");
    let client = http();
    // A holder of the previous process heartbeats: re-adopted.
    let old = (1u64 << 51) + 3;
    let (status, body) = post(
        &client,
        format!("{base}/v1/permits/work.{old}/extend"),
        json!({"lease_ms": 60_000, "permits": 1}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    // Without `permits` an unknown permit is lost, even while learning.
    let (status, body) = post(
        &client,
        format!("{base}/v1/permits/work.{}/extend", old + 1),
        json!({"lease_ms": 60_000}),
    )
    .await
    .unwrap();
    assert_eq!(
        (status, &body["error"]),
        (410, &json!("permit_lost")),
        "{body}"
    );
    let (status, body) = post(
        &client,
        format!("{base}/v1/permits/work.{old}/extend"),
        json!({"permits": 0}),
    )
    .await
    .unwrap();
    assert_eq!(
        (status, &body["error"]),
        (400, &json!("invalid_request")),
        "{body}"
    );
    // A try-once acquire is refused with a hint; it would not fit anyway (in use 1 of 1).
    let (status, body) = post(
        &client,
        format!("{base}/v1/limiters/work/acquire"),
        json!({"wait_ms": 0}),
    )
    .await
    .unwrap();
    assert_eq!(
        (status, &body["error"]),
        (429, &json!("wait_timeout")),
        "{body}"
    );
    // The re-adopted holder finishes; the next acquire is granted once the window ends.
    let (status, body) = post(
        &client,
        format!("{base}/v1/permits/work.{old}/release"),
        json!({}),
    )
    .await
    .unwrap();
    assert_eq!((status, &body["released"]), (200, &json!(true)), "{body}");
    let (status, body) = post(
        &client,
        format!("{base}/v1/limiters/work/acquire"),
        json!({"wait_ms": 20_000}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body["fencing_token"].as_u64().unwrap() > old, "{body}");
    let v = until(&base, "done learning", |v| v["learning"] == json!(false)).await;
    assert_eq!(v["counters"]["adopted"], json!(1), "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}
