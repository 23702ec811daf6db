//! `floodgate dashboard-bench`: the server's cost of open dashboards, measured beside the same
//! workload with none open, in the same run, as a ratio.
//!
//! Starts an in-process server (embedded store) holding `--limiters` limiters with
//! `--holders-each` holders each (so the overview the dashboard streams is realistic), then
//! alternates phases of the bench's throughput workload (C clients loop acquire + release on an
//! uncontended limiter, each on its own keep-alive connection): without any dashboard, then with
//! `--viewers` dashboards open (each streaming the overview over server-sent events and
//! reading every byte, and one also a limiter page's stream). Medians of each are reported
//! with the ratio open / closed. The history sampler runs in both phases (it is always on).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use floodgate::{AcquireOptions, Floodgate, LimiterSpec};
use serde_json::json;

use floodgate_server::cli::print;
use floodgate_server::cli::Failure;
use floodgate_server::server::{self, ServerOptions};

/// Flags of `floodgate dashboard-bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct DashboardBenchArgs {
    /// Concurrent clients of the workload.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    clients: u32,
    /// Seconds per phase.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds of (closed, open) phases; the median of each is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    rounds: u32,
    /// Limiters on the server besides the workload's.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(0..=9000))]
    limiters: u32,
    /// Holders on each of those limiters.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    holders_each: u32,
    /// Dashboards open during the "open" phases.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    viewers: u32,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

/// Acquire + release pairs per second of `clients` clients for `length`.
async fn pairs_per_second(base: &str, clients: &[reqwest::Client], length: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .map(|http| {
            let (done, stop, base) = (Arc::clone(&done), Arc::clone(&stop), base.to_owned());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(resp) = http
                        .post(format!("{base}/v1/limiters/dash-bench/acquire"))
                        .header("content-type", "application/json")
                        .body(r#"{"lease_ms":60000,"wait_ms":30000}"#)
                        .send()
                        .await
                    else {
                        continue;
                    };
                    let Ok(v) = resp.json::<serde_json::Value>().await else {
                        continue;
                    };
                    let Some(id) = v["permit_id"].as_str() else {
                        continue;
                    };
                    let released = http
                        .post(format!("{base}/v1/permits/{id}/release"))
                        .send()
                        .await;
                    if released.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    tokio::time::sleep(length).await;
    let counted = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    counted as f64 / elapsed
}

/// An open dashboard: reads an event stream to the end (or until aborted), counting bytes.
fn viewer(base: &str, path: &str, bytes: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    let url = format!("{base}{path}");
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let Ok(mut resp) = http.get(url).send().await else {
            return;
        };
        while let Ok(Some(chunk)) = resp.chunk().await {
            bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) async fn dashboard_bench(args: DashboardBenchArgs) -> Result<u8, Failure> {
    if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 600.0) {
        return Err(Failure::usage(
            "--seconds: must be more than 0 and at most 600",
        ));
    }
    let gate = Floodgate::in_memory();
    gate.define("dash-bench", LimiterSpec::concurrency(args.clients))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let mut held = Vec::new();
    for i in 0..args.limiters {
        let name = format!("dash-bench-{i:04}");
        gate.define(
            &name,
            LimiterSpec::concurrency(args.holders_each.max(1) * 2),
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
        let limiter = gate.limiter(&name).await.map_err(|e| fail(e.to_string()))?;
        for _ in 0..args.holders_each {
            held.push(
                limiter
                    .acquire(AcquireOptions::new().lease(Duration::from_secs(3600)))
                    .await
                    .map_err(|e| fail(e.to_string()))?,
            );
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| fail(format!("cannot listen: {e}")))?;
    let base = format!(
        "http://{}",
        listener.local_addr().map_err(|e| fail(e.to_string()))?
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(
        listener,
        gate,
        ServerOptions::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let clients: Vec<reqwest::Client> = (0..args.clients).map(|_| reqwest::Client::new()).collect();
    let length = Duration::from_secs_f64(args.seconds);
    // Warm-up: connections open, the sampler has run.
    pairs_per_second(&base, &clients, Duration::from_millis(1500)).await;
    let (mut closed, mut open) = (Vec::new(), Vec::new());
    let bytes = Arc::new(AtomicU64::new(0));
    let mut open_secs = 0.0;
    for _ in 0..args.rounds {
        closed.push(pairs_per_second(&base, &clients, length).await);
        let mut viewers = Vec::new();
        for v in 0..args.viewers {
            viewers.push(viewer(&base, "/dashboard/events", Arc::clone(&bytes)));
            if v == 0 {
                viewers.push(viewer(
                    &base,
                    "/dashboard/events/dash-bench",
                    Arc::clone(&bytes),
                ));
            }
        }
        let start = Instant::now();
        open.push(pairs_per_second(&base, &clients, length).await);
        open_secs += start.elapsed().as_secs_f64();
        for v in viewers {
            v.abort();
        }
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    drop(held);
    let (closed, open) = (median(closed), median(open));
    // A workload that completed nothing measured nothing: say so instead of printing NaN.
    if closed <= 0.0 || open <= 0.0 {
        return Err(Failure {
            code: 1,
            message: "the workload completed no acquire+release pair; nothing was measured".into(),
        });
    }
    let ratio = open / closed;
    let streamed = bytes.load(Ordering::Relaxed) as f64 / open_secs / 1024.0;
    let result = json!({
        "clients": args.clients,
        "limiters": args.limiters + 1,
        "holders": args.limiters * args.holders_each,
        "viewers": args.viewers,
        "rounds": args.rounds,
        "pairs_per_s_no_dashboard": closed.round(),
        "pairs_per_s_dashboards_open": open.round(),
        "ratio_open_vs_closed": (ratio * 1000.0).round() / 1000.0,
        "streamed_kib_per_s": streamed.round(),
    });
    print(&if args.json {
        format!(
            "{}\n",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        )
    } else {
        format!(
            "dashboard cost: {} limiters, {} holders, {} clients, {} dashboards open, median of {} rounds\n\
             acquire+release pairs/s with no dashboard open: {closed:.0}\n\
             acquire+release pairs/s with dashboards open:   {open:.0}\n\
             ratio open / none: {ratio:.3} (cost {:.1}%), dashboards streamed {streamed:.0} KiB/s\n",
            args.limiters + 1,
            args.limiters * args.holders_each,
            args.clients,
            args.viewers,
            args.rounds,
            (1.0 - ratio) * 100.0,
        )
    })?;
    Ok(0)
}
