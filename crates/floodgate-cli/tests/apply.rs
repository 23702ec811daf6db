//! Declarative limits end to end: the real `floodgate limiter apply` binary against the real
//! server on `127.0.0.1:0` (dry run, apply, idempotent second apply, prune, a bad file), and a
//! real `floodgate serve --config` process reloading its file on SIGHUP under load; and
//! `floodgate limiter set` changing an adaptive range.
//!
//! No assertion depends on timing; waits are bounded only so a broken build fails.

#![allow(clippy::unwrap_used)]

mod apply_cli;
#[path = "../../floodgate-server/tests/common/mod.rs"]
mod common;
mod proc;

use apply_cli::{apply, scratch, stdout};
use common::{num, Served, PATIENCE, POLL};
use floodgate::{Floodgate, LimiterSpec};
use floodgate_server::client::{AcquireArgs, Client};
use floodgate_server::server::ServerOptions;
use proc::ServeProcess;
use serde_json::Value;

/// The server's limiters by name, as the API shows them.
async fn limiters(client: &Client) -> std::collections::BTreeMap<String, Value> {
    client
        .limiters()
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v["name"].as_str().unwrap().to_owned(), v))
        .collect()
}

const FILE: &str = r#"
# the limits, under version control
[limiters.keep]
concurrency = 8

[limiters.adapt]
concurrency = 6
adaptive = { min = 1, max = 10 }
max_queue = 77

[limiters.new]
concurrency = 2
rate = { limit = 100, period_ms = 60000, burst = 5 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_shows_the_difference_applies_it_once_and_prunes_on_request() {
    let dir = scratch("apply-apply");
    let gate = Floodgate::in_memory();
    gate.define("keep", LimiterSpec::concurrency(5))
        .await
        .unwrap();
    gate.define("old", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    gate.define(
        "adapt",
        LimiterSpec::concurrency(6).with_adaptive(floodgate::AdaptiveSpec::between(1, 10)),
    )
    .await
    .unwrap();
    let server = Served::start(gate, ServerOptions::default()).await;
    let url = format!("http://{}", server.addr);
    let client = Client::new(&url, None).unwrap();
    // The adaptive limiter learns a lower limit from a throttle before the apply.
    let (_, learned) = common::send_json(
        &common::client(),
        reqwest::Method::POST,
        format!("{url}/v1/limiters/adapt/feedback"),
        serde_json::json!({"outcome": "throttled"}),
    )
    .await;
    let learned = num(&learned, "/limit");
    assert!(learned < 6, "the throttle lowered the limit: {learned}");
    let file = dir.join("limits.toml");
    std::fs::write(&file, FILE).unwrap();

    // Dry run: the difference, and nothing changed.
    let out = apply(&url, &file, &["--dry-run"]).await;
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("~ keep: concurrency 5 -> 8\n"), "{text}");
    assert!(text.contains("~ adapt: max_queue 10000 -> 77\n"), "{text}");
    assert!(
        text.contains(
            "+ new: concurrency=2 rate=100/60000ms,burst:5 adaptive=none lease_ms=300000"
        ),
        "{text}"
    );
    assert!(
        text.contains("(not in the file, left alone; --prune deletes them: old)"),
        "{text}"
    );
    assert!(
        text.contains(
            "dry run, nothing applied: would be 1 created, 2 changed, 0 deleted, 0 unchanged"
        ),
        "{text}"
    );
    let now = limiters(&client).await;
    assert_eq!(num(&now["keep"], "/concurrency"), 5);
    assert!(!now.contains_key("new"));

    // Apply.
    let out = apply(&url, &file, &[]).await;
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.contains("applied: 1 created, 2 changed, 0 deleted, 0 unchanged"),
        "{text}"
    );
    let now = limiters(&client).await;
    assert_eq!(num(&now["keep"], "/concurrency"), 8);
    assert_eq!(num(&now["new"], "/rate/limit"), 100);
    assert_eq!(num(&now["new"], "/rate/burst"), 5);
    assert_eq!(num(&now["adapt"], "/max_queue"), 77);
    assert_eq!(
        num(&now["adapt"], "/limit"),
        learned,
        "a change to other fields keeps the learned adaptive limit"
    );
    assert!(now.contains_key("old"), "no prune, no delete");

    // The same file again: nothing to do.
    let out = apply(&url, &file, &[]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).contains("no changes (3 unchanged)"),
        "{}",
        stdout(&out)
    );

    // Prune: a dry run first, then the delete, then nothing left to do.
    let out = apply(&url, &file, &["--prune", "--dry-run"]).await;
    assert!(stdout(&out).contains("- old\n"), "{}", stdout(&out));
    assert!(limiters(&client).await.contains_key("old"));
    let out = apply(&url, &file, &["--prune"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).contains("applied: 0 created, 0 changed, 1 deleted, 3 unchanged"),
        "{}",
        stdout(&out)
    );
    let now = limiters(&client).await;
    assert_eq!(
        now.keys().cloned().collect::<Vec<_>>(),
        ["adapt", "keep", "new"]
    );
    let out = apply(&url, &file, &["--prune"]).await;
    assert!(
        stdout(&out).contains("no changes (3 unchanged)"),
        "{}",
        stdout(&out)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_names_the_line_and_applies_nothing() {
    let dir = scratch("apply-bad");
    let gate = Floodgate::in_memory();
    gate.define("keep", LimiterSpec::concurrency(5))
        .await
        .unwrap();
    let server = Served::start(gate, ServerOptions::default()).await;
    let url = format!("http://{}", server.addr);
    let client = Client::new(&url, None).unwrap();
    let cases = [
        // A value out of range, found after parsing: the limiter's header line.
        (
            "[limiters.keep]\nconcurrency = 9\n\n[limiters.broken]\nconcurrency = 0\n",
            "line 4: concurrency",
        ),
        // A key the format does not have.
        ("[limiters.keep]\nconcurency = 9\n", "line 2"),
        // Not TOML.
        ("[limiters.keep]\nconcurrency = = 9\n", "line 2"),
    ];
    for (text, expected) in cases {
        let file = dir.join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let out = apply(&url, &file, &["--prune"]).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains(expected), "{text}: {err}");
        assert!(stdout(&out).is_empty(), "{}", stdout(&out));
        let now = limiters(&client).await;
        assert_eq!(now.len(), 1, "nothing applied: {now:?}");
        assert_eq!(num(&now["keep"], "/concurrency"), 5, "nothing applied");
    }
    let out = apply(&url, &dir.join("missing.toml"), &[]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_limits_under_load_without_dropping_a_waiter() {
    let dir = scratch("apply-hup");
    let config = dir.join("floodgate.toml");
    let before = "[limiters.hup]\nconcurrency = 1\n\n[limiters.busy]\nconcurrency = 2\n\n[limiters.gone]\nconcurrency = 1\n";
    std::fs::write(&config, before).unwrap();
    let serve = ServeProcess::start(&["--config", config.to_str().unwrap()]);
    let client = Client::new(&serve.url, None).unwrap();

    // One holder and one waiter queued behind it.
    let held = client
        .acquire("hup", &AcquireArgs::default())
        .await
        .unwrap();
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move {
            let args = AcquireArgs {
                wait_ms: Some(PATIENCE.as_millis() as u64 * 3),
                ..AcquireArgs::default()
            };
            client.acquire("hup", &args).await
        })
    };
    poll(&client, "hup", |v| num(v, "/waiting") == 1).await;

    // Load on another limiter across the reload: every answer is a grant or a wait that ended.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, stop) = (client.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let (mut granted, mut other) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let args = AcquireArgs {
                    wait_ms: Some(200),
                    ..AcquireArgs::default()
                };
                match client.acquire("busy", &args).await {
                    Ok(p) => {
                        granted += 1;
                        client.release(&p.permit_id).await.unwrap();
                    }
                    Err(e) if e.code() == Some("wait_timeout") => {}
                    Err(e) => other.push(e.to_string()),
                }
            }
            (granted, other)
        }));
    }

    // A broken file first: logged, nothing changes, the server keeps serving.
    std::fs::write(&config, "[limiters.hup]\nconcurrency = 0\n").unwrap();
    serve.signal(nix::sys::signal::Signal::SIGHUP);
    serve
        .wait_for_log(|l| l["message"] == "reload: config not applied")
        .await;
    // Then the new limits: hup keeps its limit but changes its lease and queue cap, busy grows,
    // fresh appears, gone stays (no reload_prune).
    let after = "[limiters.hup]\nconcurrency = 1\nlease_ms = 60000\nmax_queue = 50\n\n[limiters.busy]\nconcurrency = 3\n\n[limiters.fresh]\nconcurrency = 4\n";
    std::fs::write(&config, after).unwrap();
    serve.signal(nix::sys::signal::Signal::SIGHUP);
    poll(&client, "hup", |v| num(v, "/lease_ms") == 60_000).await;
    let hup = client.limiter("hup").await.unwrap();
    assert_eq!(num(&hup, "/max_queue"), 50);
    assert_eq!(
        num(&hup, "/waiting"),
        1,
        "the waiter is still queued: {hup}"
    );
    assert_eq!(num(&hup, "/in_use"), 1);
    assert_eq!(
        num(&client.limiter("busy").await.unwrap(), "/concurrency"),
        3
    );
    assert_eq!(
        num(&client.limiter("fresh").await.unwrap(), "/concurrency"),
        4
    );
    assert!(
        client.limiter("gone").await.is_ok(),
        "no prune on reload by default"
    );

    // The holder leaves; the waiter queued before the reload is served.
    assert!(client.release(&held.permit_id).await.unwrap());
    let granted = tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("the waiter was answered")
        .unwrap()
        .expect("the waiter was granted, not dropped");
    assert_eq!(granted.permits, 1);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for task in load {
        let (granted, other) = task.await.unwrap();
        assert!(other.is_empty(), "load saw errors: {other:?}");
        total += granted;
    }
    assert!(total > 0, "the load ran");

    // reload_prune = true deletes what the file no longer names.
    std::fs::write(&config, format!("reload_prune = true\n{after}")).unwrap();
    serve.signal(nix::sys::signal::Signal::SIGHUP);
    poll_gone(&client, "gone").await;
    let logs = serve.stop();
    let changes: Vec<&str> = logs
        .iter()
        .filter(|l| l["message"] == "reload")
        .filter_map(|l| l["change"].as_str())
        .collect();
    assert!(changes.contains(&"+ fresh: concurrency=4 rate=none adaptive=none lease_ms=300000 max_wait_ms=60000 max_queue=10000"), "{changes:?}");
    assert!(
        changes.contains(&"~ busy: concurrency 2 -> 3"),
        "{changes:?}"
    );
    assert!(changes.contains(&"- gone"), "{changes:?}");
}

/// Waits (bounded) until the limiter's state satisfies `ok`.
async fn poll(client: &Client, name: &str, ok: impl Fn(&Value) -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let v = client.limiter(name).await.unwrap();
        if ok(&v) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never got there: {v}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits (bounded) until the limiter is gone.
async fn poll_gone(client: &Client, name: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while client.limiter(name).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} was not deleted"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// `floodgate limiter set ARGS...` against `url`, to completion.
async fn limiter_set(url: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_floodgate"));
    cmd.args(["limiter", "set"])
        .args(args)
        .env("FLOODGATE_URL", url)
        .env_remove("FLOODGATE_TOKEN")
        .kill_on_drop(true);
    cmd.output().await.unwrap()
}

/// `limiter set` changes "the given fields of an existing one": `--adaptive MIN:MAX` on a
/// gradient limiter changes its range and keeps its controller and tuning. It used to send
/// only the range, which the API takes as a whole new setting: the limiter silently became AIMD
/// with the default tuning. `--algorithm` naming another controller starts from its defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_set_adaptive_changes_the_range_and_keeps_the_controller() {
    let server = Served::start(Floodgate::in_memory(), ServerOptions::default()).await;
    let url = format!("http://{}", server.addr);
    let client = Client::new(&url, None).unwrap();
    client
        .put_limiter(
            "search",
            &serde_json::json!({"concurrency": 10, "adaptive": {"min": 5, "max": 100,
                "algorithm": "gradient", "tolerance": 2.0, "probe_rounds": 7}}),
        )
        .await
        .unwrap();

    let out = limiter_set(&url, &["search", "--adaptive", "5:200"]).await;
    assert!(out.status.success(), "{out:?}");
    let adaptive = client.limiter("search").await.unwrap()["adaptive"].clone();
    assert_eq!(adaptive["max"], 200, "{adaptive}");
    assert_eq!(adaptive["algorithm"], "gradient", "{adaptive}");
    assert_eq!(adaptive["tolerance"], 2.0, "{adaptive}");
    assert_eq!(adaptive["probe_rounds"], 7, "{adaptive}");

    // Another controller: its own defaults, not the gradient's tuning.
    let out = limiter_set(
        &url,
        &["search", "--adaptive", "5:150", "--algorithm", "aimd"],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let adaptive = client.limiter("search").await.unwrap()["adaptive"].clone();
    assert_eq!(adaptive["algorithm"], "aimd", "{adaptive}");
    assert_eq!(adaptive["max"], 150, "{adaptive}");
    assert_eq!(adaptive["decrease"], 0.7, "{adaptive}");
    assert_eq!(adaptive["probe_rounds"], 30, "{adaptive}");

    // A new limiter: the range as given, with the default controller.
    let out = limiter_set(&url, &["fresh", "--concurrency", "4", "--adaptive", "2:8"]).await;
    assert!(out.status.success(), "{out:?}");
    let adaptive = client.limiter("fresh").await.unwrap()["adaptive"].clone();
    assert_eq!(
        (adaptive["min"].clone(), adaptive["max"].clone()),
        (2.into(), 8.into())
    );
    assert_eq!(adaptive["algorithm"], "aimd", "{adaptive}");
    server.stop().await;
}

/// A dry run against a server that will refuse the apply exits 2 with the refusal the apply
/// meets (the same first line), instead of promising an apply that fails: a read-only server
/// (403 `read_only`) and a create past `max_limiters` (409 `too_many_limiters`), both read
/// from `GET /v1/limiters` without writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_reports_a_read_only_server_and_the_limiter_cap_as_the_apply_meets_them() {
    let dir = scratch("apply-refused");
    let file = dir.join("limits.toml");
    std::fs::write(&file, FILE).unwrap();
    let read_only = ServerOptions {
        api_writes: false,
        ..ServerOptions::default()
    };
    // The file creates `adapt` and `new` (in that order) and changes `keep`.
    let cases = [
        (
            "read-only",
            Floodgate::in_memory(),
            read_only,
            "limiter adapt: read_only: this server does not allow changing limiters over the API",
            "before the failure:\nno changes",
        ),
        (
            "cap",
            Floodgate::with_store(floodgate::MemoryStore::new().with_max_limiters(2)),
            ServerOptions::default(),
            "limiter new: too_many_limiters: the server already holds its maximum of 2 limiters",
            "+ adapt: concurrency=6 ",
        ),
    ];
    for (what, gate, options, refusal, before) in cases {
        gate.define("keep", LimiterSpec::concurrency(5))
            .await
            .unwrap();
        let server = Served::start(gate, options).await;
        let url = format!("http://{}", server.addr);
        let client = Client::new(&url, None).unwrap();

        let dry = apply(&url, &file, &["--dry-run"]).await;
        let dry_err = String::from_utf8_lossy(&dry.stderr).into_owned();
        assert_eq!(dry.status.code(), Some(2), "{what}: {dry:?}");
        assert!(dry_err.contains(refusal), "{what}: {dry_err}");
        assert!(dry_err.contains(before), "{what}: {dry_err}");
        // What the real run would have created first, and that nothing was.
        assert!(
            what != "cap" || dry_err.contains("dry run, nothing applied"),
            "{what}: {dry_err}"
        );
        assert_eq!(
            limiters(&client).await.len(),
            1,
            "{what}: the dry run wrote"
        );

        apply_cli::refused_as_the_dry_run_was(&url, &file, &dry_err, what).await;
        server.stop().await;
    }
}
