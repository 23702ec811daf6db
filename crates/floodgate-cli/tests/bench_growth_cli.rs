//! `floodgate bench-growth --quick`: the real binary against the embedded store and a real
//! `redis-server`, at tiny sizes. It completes, measures every operation at every size on both
//! stores (where the operation has a meaning), and leaves no limiter behind in Redis. No
//! assertion is about a timing beyond "measured something".

#![allow(clippy::unwrap_used)]

#[path = "../../floodgate/tests/support/mod.rs"]
mod support;

use std::process::Command;

use serde_json::Value;
use support::RedisServer;

#[test]
fn quick_run_measures_every_operation_on_both_stores() {
    let redis = RedisServer::start();
    let out = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(["bench-growth", "--quick", "--json", "--redis", &redis.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let ops = |store: &str| -> Vec<String> {
        rows.iter()
            .filter(|r| r["store"] == store)
            .map(|r| r["operation"].as_str().unwrap().to_owned())
            .collect()
    };
    let expected = [
        "acquire (queues)",
        "handoff",
        "cancel head",
        "cancel middle",
        "cancel tail",
        "cancel random order",
        "timeout (tail)",
        "put unchanged",
        "put changed",
        "status",
        "acquire (granted)",
        "release",
        "cancel raced grant",
    ];
    assert_eq!(ops("embedded"), expected);
    assert_eq!(ops("redis"), expected);
    for row in rows {
        let op = row["operation"].as_str().unwrap();
        let raced_on_redis = op == "cancel raced grant" && row["store"] == "redis";
        for cell in row["cells"].as_array().unwrap() {
            let size = cell["size"].as_u64().unwrap();
            // Nothing to cancel in an empty queue; a raced grant cannot be arranged on Redis.
            let meaningless =
                (op.starts_with("cancel ") && size == 0 && row["by"] == "queue") || raced_on_redis;
            if meaningless {
                assert!(cell["ns"].is_null(), "{row}");
            } else {
                assert!(cell["ns"].as_f64() > Some(0.0), "{row}");
            }
            if row["store"] == "redis" && !meaningless {
                assert!(cell["commands"].as_u64() > Some(0), "{row}");
            }
        }
        if !raced_on_redis {
            assert!(row["ratio"].as_f64() > Some(0.0), "{row}");
        }
    }
    let limiters = Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "--scan",
            "--pattern",
            "*growth*",
        ])
        .output()
        .unwrap();
    let left: Vec<String> = String::from_utf8_lossy(&limiters.stdout)
        .lines()
        .filter(|k| !k.ends_with(":tokens"))
        .map(str::to_owned)
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn the_embedded_store_alone_prints_a_table_and_bad_flags_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(["bench-growth", "--quick", "--no-redis"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("Cost by queue length"), "{table}");
    assert!(table.contains("cancel middle"), "{table}");
    assert!(!table.contains("redis "), "{table}");
    let bad = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(["bench-growth", "--samples", "0"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let no_rounds = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(["bench-growth", "--no-redis", "--rounds", "0"])
        .output()
        .unwrap();
    assert_eq!(no_rounds.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&no_rounds.stderr).contains("--rounds"),
        "{}",
        String::from_utf8_lossy(&no_rounds.stderr)
    );
    let both = Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args([
            "bench-growth",
            "--no-redis",
            "--redis",
            "redis://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(both.status.code(), Some(2));
}
