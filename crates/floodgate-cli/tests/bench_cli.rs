//! `floodgate bench --store redis://...`: the real binary against a real `redis-server`, every
//! workload tiny. It completes, reports each workload in its JSON, and leaves nothing in Redis.
//! No assertion is about a timing or a rate beyond "measured something".

#![allow(clippy::unwrap_used)]

#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use std::process::Command;

use serde_json::Value;
use support::RedisServer;

/// The keys left in Redis, less each deleted limiter's `tokens` key (kept on purpose, so a
/// re-created limiter's fencing tokens start above the old ones), which must carry a TTL.
fn keys(redis: &RedisServer) -> String {
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let all = cli(&["--scan"]);
    let mut left = Vec::new();
    for key in all.lines() {
        if key.ends_with(":tokens") {
            let ttl: i64 = cli(&["pttl", key]).parse().unwrap();
            assert!(ttl > 0, "{key} has no TTL");
        } else {
            left.push(key);
        }
    }
    left.join("\n")
}

#[test]
fn store_mode_runs_every_workload_and_cleans_up() {
    let redis = RedisServer::start();
    let out = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(["bench", "--store", &redis.url(), "--json"])
        .args(["--clients", "3", "--seconds", "0.05", "--rounds", "1"])
        .args(["--handoffs", "5"])
        .args(["--holders", "6", "--limit", "2", "--hold", "2ms"])
        .args(["--saturation-seconds", "0.3"])
        .env_remove("FLOODGATE_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mode"], "store", "{report}");
    assert_eq!(report["baseline"], "PING");
    assert!(report["throughput"]["acquire_release_pairs_per_sec"]["median"].as_f64() > Some(0.0));
    assert!(report["throughput"]["trivial_pairs_per_sec"]["median"].as_f64() > Some(0.0));
    assert!(report["latency"]["handoff"]["p50_us"].as_f64() > Some(0.0));
    let saturation = &report["saturation"];
    assert!(saturation["grants"].as_u64() > Some(0), "{saturation}");
    let utilization = saturation["utilization"].as_f64().unwrap();
    assert!(utilization > 0.0 && utilization <= 1.0, "{saturation}");
    assert!(saturation["redis"]["scripts_per_grant"].as_f64() > Some(0.0));
    assert_eq!(keys(&redis), "", "the bench left keys behind");
}

#[test]
fn one_workload_and_bad_flags() {
    let redis = RedisServer::start();
    let out = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(["bench", "--store", &redis.url(), "--json"])
        .args(["--workloads", "handoff", "--handoffs", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["latency"].is_object());
    assert!(report.get("throughput").is_none() && report.get("saturation").is_none());
    // A saturation without a backlog is refused before anything runs.
    let out = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(["bench", "--store", &redis.url()])
        .args([
            "--workloads",
            "saturation",
            "--holders",
            "4",
            "--limit",
            "4",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // --url and --store exclude each other.
    let out = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args([
            "bench",
            "--store",
            &redis.url(),
            "--url",
            "http://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(keys(&redis), "");
}

/// `--url` at a server that accepts connections and never answers: the run fails at its
/// start-up probe with a message (it used to wait out every request's timeout); at one that
/// answers an error page, the message shows the page's start, not all of it.
#[test]
fn a_stalled_or_foreign_url_fails_with_a_short_message() {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    // `floodgate bench --url URL` exits 1; its message.
    let bench_fails = |url: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_floodgate"))
            .args(["bench", "--url", url, "--workloads", "handoff"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        stderr
    };

    // Connections queue in the backlog and are never accepted, so never answered.
    let stalled = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", stalled.local_addr().unwrap());
    let stderr = bench_fails(&url);
    assert!(stderr.contains("/healthz: no answer within"), "{stderr}");

    // Something else answers every request with a 503 and a 100 KB page.
    let foreign = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", foreign.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in foreign.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let page = "<html>".repeat(100_000 / 6);
            let _ = write!(
                conn,
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    let stderr = bench_fails(&url);
    assert!(stderr.contains("HTTP 503: <html>"), "{stderr}");
    assert!(stderr.contains("... (99996 bytes)"), "{stderr}");
    assert!(stderr.len() < 1_000, "{} bytes of message", stderr.len());
}

/// `floodgate bench-durability` runs every part on a small scale and measures something.
#[test]
fn bench_durability_runs_and_measures() {
    let scratch = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(["bench-durability", "--seconds", "0.2", "--rounds", "1"])
        // 100 holders over 7 limiters: every one is placed (14 each left 2 out once).
        .args(["--clients", "2", "--limiters", "7", "--holders", "100"])
        .args(["--ops", "2000", "--snapshot-after-bytes", "20000"])
        .arg("--dir")
        .arg(scratch.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "memory_pairs_per_s",
        "everysec_pairs_per_s",
        "always_pairs_per_s",
    ] {
        assert!(report["pairs"][key].as_f64() > Some(0.0), "{report}");
    }
    assert_eq!(report["recovery"]["holders"], 100, "{report}");
    assert_eq!(report["recovery"]["from_snapshot_holders"], 100, "{report}");
    assert!(report["fsync"]["fdatasync_p50_us"].as_f64() > Some(0.0));
    assert!(report["log_size"]["dir_bytes_at_end"].as_u64() > Some(0));
}

/// `floodgate dashboard-bench` completes pairs in both phases.
#[test]
fn dashboard_bench_runs_and_measures() {
    let out = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(["dashboard-bench", "--seconds", "0.3", "--rounds", "1"])
        .args([
            "--clients",
            "2",
            "--limiters",
            "5",
            "--holders-each",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["pairs_per_s_no_dashboard"].as_f64() > Some(0.0),
        "{report}"
    );
    assert!(
        report["ratio_open_vs_closed"].as_f64() > Some(0.0),
        "{report}"
    );
}
