//! `floodgate simulate`: the seed's cascade in virtual time. The model is in
//! [`crate::simulate`]; this file only reads flags and prints.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::duration::parse_duration;
use super::{print, warn, Failure};
use crate::simulate::{self, Config, Scenario, Strategy};

/// Flags of `floodgate simulate`. Numbers take a minus sign, so `--crash-fraction -0.1` is
/// refused as out of range, not read as a flag `-0`; durations take a leading `-` too, so
/// `--max-wait -1s` is refused naming `--max-wait`, not as an unexpected argument `-1`.
#[derive(Debug, clap::Args)]
pub(crate) struct SimulateArgs {
    /// Seed of every random draw: the same seed gives the same report.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    seed: u64,
    /// The workload: `incident` (the seed's, every organization small) or `orgs`
    /// (organizations of heavy-tailed sizes, with per-organization figures).
    #[arg(long, default_value = "incident", value_parser = parse_scenario)]
    scenario: Scenario,
    /// Organizations (one task each). Default: 5000 (incident), 1000 (orgs). At most 250000
    /// query tasks in all.
    #[arg(long, allow_negative_numbers = true)]
    orgs: Option<u32>,
    /// Mean query tasks per organization: 1 + geometric.
    #[arg(long, default_value_t = 2.0, allow_negative_numbers = true)]
    queries_per_org: f64,
    /// Workers in the pool (Celery's concurrency).
    #[arg(long, default_value_t = 200, allow_negative_numbers = true)]
    workers: u32,
    /// Strategies to run, repeatable or comma-separated: unbounded, seed-counter,
    /// seed-batches, seed-backoff, floodgate, floodgate-adaptive, floodgate-gradient,
    /// floodgate-keyed. Default: all but floodgate-keyed (incident), all (orgs).
    #[arg(long = "strategy", value_delimiter = ',', value_parser = parse_strategy)]
    strategies: Vec<Strategy>,
    /// Fraction of query tasks whose worker dies holding its permit.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    crash_fraction: f64,
    /// Median query time (lognormal).
    #[arg(long, default_value = "2s", value_parser = parse_duration, allow_hyphen_values = true)]
    query_median: Duration,
    /// Shape of the lognormal query time (standard deviation of its logarithm).
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    query_sigma: f64,
    /// Concurrent queries the backend admits; more are rejected (RateLimitExceeded).
    #[arg(long, default_value_t = 100, allow_negative_numbers = true)]
    backend_limit: u32,
    /// The backend's capacity changes mid-run: `AT:CAPACITY`, e.g. `90s:60` (a replica lost).
    #[arg(
        long,
        value_name = "AT:CAPACITY",
        value_parser = parse_capacity_change,
        allow_hyphen_values = true
    )]
    capacity_change: Option<(Duration, u32)>,
    /// Fraction of its capacity up to which the backend runs a query at its own pace; past it
    /// contention slows every query admitted, linearly up to `--slowdown` at capacity.
    #[arg(long, default_value_t = 0.75, allow_negative_numbers = true)]
    knee: f64,
    /// How much slower a query admitted at exactly the backend's capacity runs.
    #[arg(long, default_value_t = 1.25, allow_negative_numbers = true)]
    slowdown: f64,
    /// Limit of seed-counter and floodgate, and the adaptive strategies' starting limit.
    #[arg(long, default_value_t = 50, allow_negative_numbers = true)]
    limit: u32,
    /// Highest limit the adaptive strategies may reach.
    #[arg(long, default_value_t = 1_000, allow_negative_numbers = true)]
    adaptive_max: u32,
    /// Floodgate's lease: how long a crashed holder's permit stays taken (1 s to 24 h).
    #[arg(long, default_value = "300s", value_parser = parse_duration, allow_hyphen_values = true)]
    lease: Duration,
    /// Floodgate's wait cap for one acquire (the task then re-enqueues itself). Default: 45s
    /// (incident), 5s (orgs: `@limited`'s default).
    #[arg(long, value_parser = parse_duration, allow_hyphen_values = true)]
    max_wait: Option<Duration>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also draw backend concurrency over time, one panel per strategy, to this SVG file.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

fn parse_scenario(s: &str) -> Result<Scenario, String> {
    s.parse()
}

fn parse_strategy(s: &str) -> Result<Strategy, String> {
    s.parse()
}

fn parse_capacity_change(s: &str) -> Result<(Duration, u32), String> {
    let (at, capacity) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected AT:CAPACITY, e.g. 90s:60"))?;
    let at = parse_duration(at)?;
    let capacity = capacity
        .trim()
        .parse::<u32>()
        .map_err(|_| format!("{capacity:?}: the capacity must be a whole number"))?;
    Ok((at, capacity))
}

pub(crate) fn simulate(args: SimulateArgs) -> Result<u8, Failure> {
    if let Some(path) = &args.svg {
        // Checked before the simulation (which may run for seconds), not found after it.
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        if !dir.is_dir() {
            return Err(Failure::usage(format!(
                "--svg: {} is not a directory this can write {} into",
                dir.display(),
                path.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            )));
        }
        // A directory itself (`--svg docs/`, `--svg .`) has a parent that exists too.
        if path.is_dir() {
            return Err(Failure::usage(format!(
                "--svg: {} is a directory; name the file to write",
                path.display()
            )));
        }
    }
    let cfg = Config {
        seed: args.seed,
        scenario: args.scenario,
        orgs: args.orgs.unwrap_or(args.scenario.default_orgs()),
        queries_per_org: args.queries_per_org,
        workers: args.workers,
        query_median: args.query_median,
        query_sigma: args.query_sigma,
        backend_limit: args.backend_limit,
        capacity_change: args.capacity_change,
        limit: args.limit,
        adaptive_max: args.adaptive_max,
        crash_fraction: args.crash_fraction,
        lease: args.lease,
        max_wait: args.max_wait.unwrap_or(args.scenario.default_max_wait()),
        strategies: if args.strategies.is_empty() {
            args.scenario.default_strategies()
        } else {
            args.strategies
        },
        model: simulate::Model {
            knee: args.knee,
            slowdown_at_capacity: args.slowdown,
            ..simulate::Model::default()
        },
    };
    let started = Instant::now();
    let sim = simulate::run(&cfg).map_err(Failure::usage)?;
    let elapsed = started.elapsed();
    if let Some(path) = &args.svg {
        std::fs::write(path, simulate::render_svg(&sim)).map_err(|e| Failure {
            code: 1,
            message: format!("cannot write {}: {e}", path.display()),
        })?;
    }
    if args.json {
        let mut text = serde_json::to_string_pretty(&sim.report).map_err(|e| Failure {
            code: 1,
            message: e.to_string(),
        })?;
        text.push('\n');
        print(&text)?;
    } else {
        print(&sim.report.table())?;
        warn(&format!(
            "simulated in {:.2} s of wall time",
            elapsed.as_secs_f64()
        ));
    }
    Ok(0)
}
