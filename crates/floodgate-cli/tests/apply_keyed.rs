//! Keyed limiters in the config file (`per_key`, `max_keys`, `keys`): the documented example
//! (`floodgate.example.toml`) applied over the API by the real `floodgate limiter apply`
//! binary (once, then again with nothing to do, then with a changed per-key limit), and
//! created by a real `floodgate serve --config` process. The limits are checked by acquiring,
//! not only by reading the status.
//!
//! No assertion depends on timing; waits are bounded only so a broken build fails.

#![allow(clippy::unwrap_used)]

mod apply_cli;
#[path = "../../floodgate-server/tests/common/mod.rs"]
mod common;
mod proc;

use std::path::{Path, PathBuf};

use apply_cli::{apply, scratch, stdout};
use common::{num, Served};
use floodgate::Floodgate;
use floodgate_server::client::Client;
use floodgate_server::server::ServerOptions;
use proc::ServeProcess;
use reqwest::Method;
use serde_json::{json, Value};

/// The documented example.
fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../floodgate.example.toml")
}

/// Acquires with `wait_ms: 0` for `key` until refused; returns how many were granted (the
/// permits are kept, so the count is the key's limit while the total has room).
async fn grants_for(url: &str, limiter: &str, key: &str) -> u32 {
    let http = common::client();
    let acquire = format!("{url}/v1/limiters/{limiter}/acquire");
    for n in 0..100 {
        let body = json!({"key": key, "wait_ms": 0});
        let (code, answer) = common::send_json(&http, Method::POST, &acquire, body).await;
        if code == 429 {
            return n;
        }
        assert_eq!(code, 200, "{answer}");
    }
    panic!("no limit for {key}");
}

/// The example's keyed limiter as the server shows it: per-key concurrency, max_keys and
/// override count.
async fn keyed(client: &Client, name: &str) -> (u64, u64, u64) {
    let v: Value = client.limiter(name).await.unwrap();
    (
        num(&v, "/keyed/per_key/concurrency"),
        num(&v, "/keyed/max_keys"),
        num(&v, "/keyed/overrides"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_apply_creates_the_example_keyed_limiter_once_and_changes_its_per_key_limit() {
    let dir = scratch("apply-keyed-apply");
    let server = Served::start(Floodgate::in_memory(), ServerOptions::default()).await;
    let url = format!("http://{}", server.addr);
    let client = Client::new(&url, None).unwrap();

    let out = apply(&url, &example(), &["--dry-run"]).await;
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.contains("+ org-queries: concurrency=50 rate=none adaptive=none lease_ms=300000 max_wait_ms=60000 max_queue=10000 per_key=concurrency:5,rate:none,max_keys:100000\n"),
        "{text}"
    );
    assert!(
        text.contains("would set 1 key overrides of the file"),
        "{text}"
    );
    assert!(client.limiter("org-queries").await.is_err(), "dry run");

    let out = apply(&url, &example(), &[]).await;
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("set 1 key overrides of the file"), "{text}");
    assert!(text.contains("applied: 4 created, 0 changed"), "{text}");
    assert_eq!(keyed(&client, "org-queries").await, (5, 100_000, 1));
    // The limits hold as written: 5 for an organization, 10 for org-7's override.
    assert_eq!(grants_for(&url, "org-queries", "org-1").await, 5);
    assert_eq!(grants_for(&url, "org-queries", "org-7").await, 10);
    // A plain limiter of the file stays plain.
    let plain: Value = client.limiter("snuba-spike-projections").await.unwrap();
    assert!(plain.get("keyed").is_none_or(Value::is_null), "{plain}");

    // Applied again: nothing to change (the overrides are set again, idempotently).
    let out = apply(&url, &example(), &[]).await;
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("no changes (4 unchanged)"), "{text}");
    assert_eq!(keyed(&client, "org-queries").await, (5, 100_000, 1));

    // Only the per-key limit changes: the plan says so, and holders are kept.
    let changed = std::fs::read_to_string(example()).unwrap().replace(
        "per_key = { concurrency = 5 }",
        "per_key = { concurrency = 6 }",
    );
    let file = dir.join("limits.toml");
    std::fs::write(&file, changed).unwrap();
    let out = apply(&url, &file, &[]).await;
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.contains("~ org-queries: per_key concurrency:5,rate:none,max_keys:100000 -> concurrency:6,rate:none,max_keys:100000\n"),
        "{text}"
    );
    assert!(text.contains("1 changed"), "{text}");
    assert_eq!(keyed(&client, "org-queries").await, (6, 100_000, 1));
    let status: Value = client.limiter("org-queries").await.unwrap();
    assert_eq!(num(&status, "/in_use"), 15, "holders kept: {status}");
    assert_eq!(
        grants_for(&url, "org-queries", "org-1").await,
        1,
        "5 held, 6 allowed"
    );

    // Dropping the keys from the table is refused by the server, naming the field, never
    // silently kept keyed.
    let plain = std::fs::read_to_string(&file)
        .unwrap()
        .replace("per_key = { concurrency = 6 }\n", "")
        .replace("max_keys = 100000\n", "")
        .replace(
            "keys = { \"org-7\" = { concurrency = 10, weight = 3 } }\n",
            "",
        );
    assert!(!plain.contains("per_key ="), "{plain}");
    std::fs::write(&file, plain).unwrap();
    let out = apply(&url, &file, &[]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("per_key"), "{err}");
    assert_eq!(keyed(&client, "org-queries").await, (6, 100_000, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_config_creates_the_example_keyed_limiter_and_refuses_a_bad_one() {
    let dir = scratch("apply-keyed-serve");
    let data = dir.join("data");
    let serve = ServeProcess::start(&[
        "--config",
        example().to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let client = Client::new(&serve.url, None).unwrap();
    assert_eq!(keyed(&client, "org-queries").await, (5, 100_000, 1));
    assert_eq!(grants_for(&serve.url, "org-queries", "org-7").await, 10);
    drop(serve);

    // A bad keyed table is refused at start, naming the limiter, the line and the field.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[limiters.a]\nconcurrency = 2\nmax_keys = 10\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_floodgate"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limiter \"a\": line 1: max_keys"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_changed_keyed_table_and_its_overrides() {
    let dir = scratch("apply-keyed-hup");
    let config = dir.join("floodgate.toml");
    std::fs::write(
        &config,
        "[limiters.orgs]\nconcurrency = 20\nper_key = { concurrency = 2 }\n",
    )
    .unwrap();
    let serve = ServeProcess::start(&["--config", config.to_str().unwrap()]);
    let client = Client::new(&serve.url, None).unwrap();
    assert_eq!(grants_for(&serve.url, "orgs", "org-1").await, 2);

    std::fs::write(
        &config,
        "[limiters.orgs]\nconcurrency = 20\nper_key = { concurrency = 3 }\nmax_keys = 50\n\
         keys = { big = { concurrency = 6 } }\n",
    )
    .unwrap();
    serve.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while keyed(&client, "orgs").await != (3, 50, 1) {
        assert!(tokio::time::Instant::now() < deadline, "never reloaded");
        tokio::time::sleep(common::POLL).await;
    }
    // The holders of org-1 are kept; its new limit lets one more in; the override holds.
    assert_eq!(grants_for(&serve.url, "orgs", "org-1").await, 1);
    assert_eq!(grants_for(&serve.url, "orgs", "big").await, 6);
}

/// A file that turns a plain limiter keyed, or a keyed one plain: the server refuses the put
/// (a limiter keeps its kind), so the real apply exits 2 with its message. The dry run reports
/// that refusal the same way, instead of showing the change and exiting 0, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_reports_the_refusal_of_a_change_of_kind_as_the_apply_does() {
    let dir = scratch("apply-keyed-kind");
    let gate = Floodgate::in_memory();
    gate.define("plain", floodgate::LimiterSpec::concurrency(4))
        .await
        .unwrap();
    gate.define_keyed(
        "keyed",
        floodgate::LimiterSpec::concurrency(4),
        floodgate::KeyedSpec::per_key(2),
    )
    .await
    .unwrap();
    let server = Served::start(gate, ServerOptions::default()).await;
    let url = format!("http://{}", server.addr);
    let client = Client::new(&url, None).unwrap();
    let cases = [
        (
            "plain made keyed",
            "[limiters.new]\nconcurrency = 1\n\
             [limiters.plain]\nconcurrency = 4\nper_key = { concurrency = 1 }\n\
             [limiters.keyed]\nconcurrency = 4\nper_key = { concurrency = 2 }\n",
            "limiter plain: invalid_request: per_key: this limiter exists and is not keyed",
        ),
        (
            "keyed made plain",
            "[limiters.new]\nconcurrency = 1\n\
             [limiters.plain]\nconcurrency = 4\n\
             [limiters.keyed]\nconcurrency = 4\n",
            "limiter keyed: invalid_request: per_key: a keyed limiter stays keyed",
        ),
    ];
    for (i, (what, text, refusal)) in cases.into_iter().enumerate() {
        let file = dir.join(format!("kind{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let dry = apply(&url, &file, &["--dry-run"]).await;
        let dry_err = String::from_utf8_lossy(&dry.stderr).into_owned();
        assert_eq!(dry.status.code(), Some(2), "{what}: {dry:?}");
        assert!(dry_err.contains(refusal), "{what}: {dry_err}");
        // What the real run would have done before it, and that nothing was.
        assert!(
            dry_err.contains("+ new: concurrency=1 "),
            "{what}: {dry_err}"
        );
        assert!(
            dry_err.contains("dry run, nothing applied"),
            "{what}: {dry_err}"
        );
        assert!(
            client.limiter("new").await.is_err(),
            "{what}: the dry run created"
        );

        apply_cli::refused_as_the_dry_run_was(&url, &file, &dry_err, what).await;
        // The real run created `new` before the refusal; the next case starts without it.
        client.delete_limiter("new").await.unwrap();
    }
    let plain: Value = client.limiter("plain").await.unwrap();
    assert!(plain.get("keyed").is_none_or(Value::is_null), "{plain}");
    assert_eq!(keyed(&client, "keyed").await.0, 2);
}
