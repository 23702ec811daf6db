//! `floodgate bench`: what a permit costs, each number beside a baseline measured against the
//! same server or store in the same run.
//!
//! Where it runs: over HTTP against `--url`, or against an in-process server (embedded store)
//! when no URL is given; or, with `--store redis://HOST:PORT`, directly against the library's
//! Redis store in this process, with no HTTP (the baseline is then a Redis `PING` on a plain
//! connection to the same Redis). `bench/peers/run.sh` uses the store mode to compare Floodgate
//! with redis-semaphore on one Redis.
//!
//! The workloads (`--workloads`, all three by default):
//! 1. throughput: C clients loop acquire + release on a limiter with limit C (no contention);
//!    the baseline is the same C clients looping two trivial requests (`GET /healthz`, or
//!    `PING`). The phases alternate (baseline, floodgate, baseline, floodgate, ...) and the
//!    median of each is reported, with the ratio floodgate / baseline.
//! 2. handoff: on a limiter of limit 1, one client holds the permit and another is queued in a
//!    blocking acquire; a handoff is timed from just before the holder's release is sent to the
//!    moment the waiter's acquire returns. The baseline is one trivial round trip, timed on the
//!    holder's connection just before each release. In store mode the holder and the waiter use
//!    two separate `RedisStore` instances (each its own connection and wake-up subscription), as
//!    two processes would.
//! 3. saturation: N holders loop acquire → hold h → release on a limiter of limit L < N, so a
//!    backlog always exists. Over a window that starts after a short warm-up: utilization, the
//!    share of the limit that is busy, is the time permits were held as the holders see it (from
//!    the grant's arrival to the release being sent, clipped to the window) over L × the window;
//!    throughput is the grants received in the window per second; the wait runs from an acquire
//!    being sent to its grant arriving (p50, p99). In store mode also Redis's own work in the
//!    window (commands and scripts per grant, CPU), from `INFO`.
//!
//! Over HTTP each client task has its own `reqwest::Client`, so its own keep-alive connection,
//! and uses it in every phase. In store mode the clients share one `RedisStore` (its multiplexed
//! connection, its release connection and its subscription), as the tasks of one process would.

mod client;
mod report;
mod target;
#[cfg(test)]
mod tests;
mod workloads;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use self::client::{BenchClient, HttpClient, StoreClient};
use self::report::{HandoffResult, Latency, Rates, Report, ThroughputResult};
use self::target::Target;
use self::workloads::{handoffs, saturation, throughput, Phase};
use floodgate_server::cli::duration::parse_duration;
use floodgate_server::cli::print;
use floodgate_server::cli::Failure;

/// The ratio of acquire+release pairs to trivial pairs this server aims for (over HTTP).
const TARGET_RATIO: f64 = 0.45;
/// Lease of the bench's permits: long enough never to expire during a run.
const LEASE_MS: u64 = 60_000;
/// Longest any acquire of the bench waits.
const WAIT_MS: u64 = 30_000;
/// Handoffs run (and not counted) before the timed ones.
const WARMUP_HANDOFFS: u32 = 20;
/// Body of every acquire over HTTP.
const ACQUIRE_BODY: &str = r#"{"lease_ms":60000,"wait_ms":30000}"#;
/// Longest warm-up of the saturation workload before its window opens (at most a quarter of
/// the measured time). `bench/peers/redis-semaphore.js` uses the same rule.
const SATURATION_WARMUP: Duration = Duration::from_millis(500);

/// The workloads `--workloads` selects from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Workload {
    /// Uncontended acquire+release pairs beside trivial pairs.
    Throughput,
    /// Release → queued waiter granted, on a limit of 1.
    Handoff,
    /// N holders on a limit L < N: utilization, throughput and wait under a standing backlog.
    Saturation,
}

/// Flags of `floodgate bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// The server's base URL. Without it (and without --store), the bench starts an in-process
    /// server (embedded store) on 127.0.0.1:0 and stops it at the end.
    #[arg(long)]
    url: Option<String>,
    /// Run the workloads directly against the library's Redis store at this URL
    /// (`redis://HOST:PORT`), in this process and without HTTP, instead of against a server.
    /// A direct `redis://` or `rediss://` connection only (no Sentinel URL).
    #[arg(long, conflicts_with = "url", value_name = "REDIS_URL")]
    store: Option<String>,
    /// Bearer token, if the server requires one (an in-process server then requires it too).
    #[arg(long, env = "FLOODGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Which workloads to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "throughput,handoff,saturation"
    )]
    workloads: Vec<Workload>,
    /// Concurrent clients in the throughput phases.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    clients: u32,
    /// Seconds per throughput phase.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Handoffs to time.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    handoffs: u32,
    /// Rounds of (baseline, floodgate) throughput phases; the median of each is reported.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Saturation: concurrent holders (more than --limit, so a backlog always exists).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(2..=10_000))]
    holders: u32,
    /// Saturation: the limiter's limit.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: u32,
    /// Saturation: how long each holder keeps its permit (`5ms`, `1s`, ...).
    #[arg(long, default_value = "5ms", value_parser = parse_duration, value_name = "DURATION")]
    hold: Duration,
    /// Saturation: hold with a plain tokio sleep, which tokio's 1 ms timer rounds up (the hold
    /// before issue 13), instead of to the clock; to measure what the hold alone changes.
    #[arg(long, hide = true)]
    tokio_hold: bool,
    /// Saturation: seconds measured (after a warm-up of at most 0.5 s).
    #[arg(long, default_value_t = 5.0)]
    saturation_seconds: f64,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

impl BenchArgs {
    fn runs(&self, workload: Workload) -> bool {
        self.workloads.contains(&workload)
    }

    fn validate(&self) -> Result<(), Failure> {
        let seconds_ok = |s: f64| s.is_finite() && s > 0.0 && s <= 3600.0;
        if !seconds_ok(self.seconds) {
            return Err(Failure::usage(
                "--seconds: must be more than 0 and at most 3600",
            ));
        }
        if !seconds_ok(self.saturation_seconds) {
            return Err(Failure::usage(
                "--saturation-seconds: must be more than 0 and at most 3600",
            ));
        }
        if self.runs(Workload::Saturation) && self.holders <= self.limit {
            return Err(Failure::usage(
                "--holders: must be more than --limit, so that a backlog always exists",
            ));
        }
        if self.hold > Duration::from_secs(60) {
            return Err(Failure::usage("--hold: at most 60s"));
        }
        Ok(())
    }
}

pub(crate) async fn bench(args: BenchArgs) -> Result<u8, Failure> {
    args.validate()?;
    let target = Target::open(&args).await?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let names = Names::new(&format!("bench-{}-{stamp}", std::process::id()));
    // The workloads are generic over the client; the target decides which one, once.
    let result = if target.is_store() {
        measure::<StoreClient>(&args, &target, &names).await
    } else {
        measure::<HttpClient>(&args, &target, &names).await
    };
    // Clean up whatever happened; a failed delete only matters if the run succeeded.
    let cleanup = target.delete_all(&names).await;
    target.close().await;
    let report = result?;
    cleanup?;
    print(&if args.json {
        let mut text = serde_json::to_string_pretty(&report.to_json()).unwrap_or_default();
        text.push('\n');
        text
    } else {
        report.to_text()
    })?;
    Ok(0)
}

/// The bench's limiters.
struct Names {
    pairs: String,
    handoff: String,
    saturation: String,
}

impl Names {
    fn new(prefix: &str) -> Self {
        Names {
            pairs: format!("{prefix}-pairs"),
            handoff: format!("{prefix}-handoff"),
            saturation: format!("{prefix}-saturation"),
        }
    }

    fn all(&self) -> [&str; 3] {
        [&self.pairs, &self.handoff, &self.saturation]
    }
}

fn fail(message: String) -> Failure {
    Failure { code: 1, message }
}

async fn measure<C: BenchClient>(
    args: &BenchArgs,
    target: &Target,
    names: &Names,
) -> Result<Report, Failure> {
    let mut report = Report {
        target: target.address().to_owned(),
        in_process: target.in_process(),
        store: target.is_store(),
        trivial: target.trivial_label(),
        throughput: None,
        handoff: None,
        saturation: None,
    };
    if args.runs(Workload::Throughput) {
        target.define(&names.pairs, args.clients).await?;
        let mut sides = Vec::with_capacity(args.clients as usize);
        for _ in 0..args.clients {
            sides.push(Arc::new(C::connect(target, &names.pairs, false).await?));
        }
        // Warm up: open every connection and run each kind of pair once on it.
        for phase in [Phase::Trivial, Phase::Floodgate] {
            throughput(&sides, phase, Duration::ZERO)
                .await
                .map_err(fail)?;
        }
        let length = Duration::from_secs_f64(args.seconds);
        let mut trivial = Vec::new();
        let mut floodgate = Vec::new();
        for _ in 0..args.rounds {
            trivial.push(
                throughput(&sides, Phase::Trivial, length)
                    .await
                    .map_err(fail)?,
            );
            floodgate.push(
                throughput(&sides, Phase::Floodgate, length)
                    .await
                    .map_err(fail)?,
            );
        }
        report.throughput = Some(ThroughputResult {
            clients: args.clients,
            seconds: args.seconds,
            trivial_pairs: Rates::new(trivial),
            floodgate_pairs: Rates::new(floodgate),
        });
    }
    if args.runs(Workload::Handoff) {
        target.define(&names.handoff, 1).await?;
        let a = C::connect(target, &names.handoff, false).await?;
        let b = C::connect(target, &names.handoff, true).await?;
        let samples = handoffs(
            Arc::new(a),
            Arc::new(b),
            target,
            &names.handoff,
            args.handoffs,
        )
        .await?;
        report.handoff = Some(HandoffResult {
            handoffs: args.handoffs,
            handoff: Latency::new(samples.handoff),
            trivial_rtt: Latency::new(samples.trivial),
            release_rtt: Latency::new(samples.release),
        });
    }
    if args.runs(Workload::Saturation) {
        target.define(&names.saturation, args.limit).await?;
        report.saturation = Some(saturation::<C>(target, args, &names.saturation).await?);
    }
    Ok(report)
}
