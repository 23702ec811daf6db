//! The Grafana dashboard and the alerting rules against a real Prometheus (Debian's
//! `prometheus`, with `promtool`; scripts/test.sh installs it): `promtool check rules` is
//! clean, Prometheus scrapes a real server under load and loads the rules, and every query of
//! `docs/grafana/floodgate.json` returns data and names only metrics the server exports, and
//! `FloodgateOldestWaitNearMaxWait` goes pending for a keyed limiter whose waiters near max_wait.
//! Waits are bounded polling loops.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../floodgate/tests/support/ports.rs"]
mod ports;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{get_json, send_json, try_request, Srv};
use floodgate::{AdaptiveSpec, Floodgate, KeyedSpec, LimiterSpec};
use floodgate_server::server::ServerOptions;
use ports::free_port;
use reqwest::Method;
use serde_json::{json, Value};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

struct Prometheus {
    child: Child,
    url: String,
    _dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory removed when dropped.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every query of the Grafana dashboard's panels.
fn grafana_queries() -> Vec<String> {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{ROOT}/docs/grafana/floodgate.json")).unwrap(),
    )
    .unwrap();
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect()
}

fn start_prometheus(target: &str) -> Prometheus {
    let dir = std::env::temp_dir().join(format!("fg-prom-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = std::fs::canonicalize(format!("{ROOT}/docs/prometheus/alerts.yml")).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: floodgate\n    static_configs:\n      - targets: ['{target}']\n",
        rules.display()
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let check = Command::new("promtool")
        .args(["check", "config"])
        .arg(dir.join("prometheus.yml"))
        .output()
        .expect("promtool (Debian's prometheus package) is needed");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus is needed");
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: TempDir(dir),
    }
}

/// Polls Prometheus's alerts until one (pending or firing) is `wanted`; fails naming `what`
/// and the alerts last seen if none is within 90 s (a liveness bound only, as generous as the
/// queries' own: Prometheus starting, scraping and evaluating on a loaded machine).
async fn until_alert(
    http: &reqwest::Client,
    prom: &str,
    what: &str,
    wanted: impl Fn(&Value) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let alerts = get_json(http, format!("{prom}/api/v1/alerts")).await;
        if alerts["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(&wanted)
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {alerts}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Acquires, holds and releases (with timeouts, expiries and feedback) until stopped.
async fn load(base: String, stop: Arc<AtomicBool>) {
    let http = common::client();
    // Errors are ignored: the load runs on while the test stops the server.
    let post = |path: String, body: Option<Value>| {
        try_request(&http, Method::POST, format!("{base}{path}"), body)
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let acquire = json!({"wait_ms": 300, "holder": format!("w{}", n % 7)});
        if let Ok((200, v)) = post("/v1/limiters/pg/acquire".into(), Some(acquire)).await {
            tokio::time::sleep(Duration::from_millis(20 + n % 80)).await;
            if let Some(id) = v["permit_id"].as_str() {
                let _ = post(format!("/v1/permits/{id}/release"), None).await;
            }
        }
        if n % 5 == 0 {
            // A dead worker: never released, its short lease expires.
            let dead = json!({"wait_ms": 0, "lease_ms": 200});
            let _ = post("/v1/limiters/dead/acquire".into(), Some(dead)).await;
            let outcome = if n % 10 == 0 { "throttled" } else { "ok" };
            let feedback = json!({"outcome": outcome});
            let _ = post("/v1/limiters/adaptive/feedback".into(), Some(feedback)).await;
        }
    }
}

/// Keeps waiters of several keys queued on the keyed limiter `orgs` (its one permit held),
/// each for its whole `max_wait`, a new one every 250 ms: its oldest wait stays near max_wait.
async fn keyed_waiters(base: String, stop: Arc<AtomicBool>) {
    let http = common::client();
    let url = format!("{base}/v1/limiters/orgs/acquire");
    let held = json!({"key": "big", "lease_ms": 600_000});
    let (code, body) = send_json(&http, Method::POST, &url, held).await;
    assert_eq!(code, 200, "{body}");
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let (http, url) = (http.clone(), url.clone());
        let waiter = json!({"key": format!("k{}", n % 4)});
        tokio::spawn(async move {
            let _ = try_request(&http, Method::POST, url, Some(waiter)).await;
        });
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_queries_return_data_from_a_real_prometheus_and_the_rules_load() {
    let check = Command::new("promtool")
        .args(["check", "rules"])
        .arg(format!("{ROOT}/docs/prometheus/alerts.yml"))
        .output()
        .expect("promtool (Debian's prometheus package) is needed");
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success() && out.contains("SUCCESS"), "{out}");

    let gate = Floodgate::in_memory();
    gate.define(
        "pg",
        LimiterSpec::concurrency(3).with_max_wait(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    gate.define("dead", LimiterSpec::concurrency(2))
        .await
        .unwrap();
    let mut adaptive = LimiterSpec::concurrency(6);
    adaptive.adaptive = Some(AdaptiveSpec::between(2, 10));
    gate.define("adaptive", adaptive).await.unwrap();
    gate.define_keyed(
        "orgs",
        LimiterSpec::concurrency(1).with_max_wait(Duration::from_secs(3)),
        KeyedSpec::per_key(1),
    )
    .await
    .unwrap();
    let srv = Srv::serve(gate, ServerOptions::default()).await;
    let base = srv.base.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers: Vec<_> = (0..6)
        .map(|_| tokio::spawn(load(base.clone(), Arc::clone(&stop))))
        .collect();
    workers.push(tokio::spawn(keyed_waiters(base.clone(), Arc::clone(&stop))));
    let http = common::client();

    let prom = start_prometheus(&srv.served.addr.to_string());
    let queries = grafana_queries();
    assert!(queries.len() >= 10, "{queries:?}");

    // Every metric a query names is one the server exports.
    let exposition = srv.metrics().await;
    let exported: std::collections::HashSet<&str> = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let mut named = std::collections::BTreeSet::new();
    for q in &queries {
        let mut rest = q.as_str();
        while let Some(i) = rest.find("floodgate_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            named.insert(name);
        }
    }
    for name in &named {
        assert!(
            exported.contains(name.as_str()),
            "the dashboard names {name}, which the server does not export:\n{exposition}"
        );
    }

    // Every query returns data once Prometheus has scraped the loaded server for a while.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut pending: Vec<String> = queries.clone();
    let mut last = Value::Null;
    while !pending.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "queries without data: {pending:#?}\nlast answer: {last}"
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let mut still = Vec::new();
        for q in pending {
            let expr = q
                .replace("$limiter", ".*")
                .replace("$__rate_interval", "30s");
            let url = format!("{}/api/v1/query?query={}", prom.url, encode(&expr));
            let v = match try_request(&http, Method::GET, url, None).await {
                Ok((_, v)) => v,
                Err(_) => Value::Null, // not up yet
            };
            if v["status"] == "error" {
                panic!("Prometheus refused {expr}: {v}");
            }
            let has_data = v["data"]["result"]
                .as_array()
                .is_some_and(|r| r.iter().any(|s| s["value"][1].as_str() != Some("NaN")));
            if !has_data {
                last = v;
                still.push(q);
            }
        }
        pending = still;
    }

    // The rules are loaded and evaluate without errors.
    let rules = get_json(&http, format!("{}/api/v1/rules", prom.url)).await;
    let rules: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .collect();
    assert_eq!(rules.len(), 6, "{rules:?}");
    for r in &rules {
        assert_eq!(r["health"], "ok", "{r}");
    }
    // Dead workers' leases expired: that alert fires (pending or firing).
    let expiring = rules
        .iter()
        .find(|r| r["name"] == "FloodgateLeasesExpiring")
        .unwrap();
    until_alert(
        &http,
        &prom.url,
        &format!("FloodgateLeasesExpiring never fired: {expiring}"),
        |a| a["labels"]["alertname"] == "FloodgateLeasesExpiring",
    )
    .await;
    // The keyed limiter's waiters near its max_wait: that alert goes pending (its `for` is a
    // minute) for it, as for a plain limiter.
    until_alert(
        &http,
        &prom.url,
        "FloodgateOldestWaitNearMaxWait never went pending for the keyed limiter",
        |a| {
            a["labels"]["alertname"] == "FloodgateOldestWaitNearMaxWait"
                && a["labels"]["limiter"] == "orgs"
        },
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    drop(prom);
    srv.served.stop().await;
}

/// The store's own counts are fleet-wide on Redis and every server sharing it exports the same:
/// a rule or panel that `sum`s them across servers multiplies them by the number of servers
/// (the dashboard review saw `FloodgateLeasesExpiring` report 6 expired leases for 3 with two
/// servers). Every query of the rules and the Grafana dashboard that reads one aggregates it
/// with `max`.
#[test]
fn store_counts_are_aggregated_with_max_across_servers() {
    const STORE_COUNTS: [&str; 4] = [
        "floodgate_feedback_total",
        "floodgate_limit_changes_total",
        "floodgate_permits_expired_total",
        "floodgate_extend_lost_total",
    ];
    let mut queries = grafana_queries();
    // The rules' expressions: each `expr: |` block, up to the next key.
    let rules = std::fs::read_to_string(format!("{ROOT}/docs/prometheus/alerts.yml")).unwrap();
    for block in rules.split("expr: |").skip(1) {
        let expr: Vec<&str> = block
            .lines()
            .skip(1)
            .take_while(|l| !l.trim_start().starts_with("for:"))
            .collect();
        queries.push(expr.join(" "));
    }
    let mut checked = 0;
    for q in &queries {
        for metric in STORE_COUNTS {
            if let Some(at) = q.find(metric) {
                checked += 1;
                let before = &q[..at];
                assert!(
                    before.contains("max by") && !before.contains("sum by"),
                    "{metric} is not aggregated with max across servers in: {q}"
                );
            }
        }
    }
    assert!(
        checked >= 5,
        "only {checked} queries read the store's counts"
    );
}
