//! `floodgate simulate`: the seed's cascade replayed in virtual time.
//!
//! A discrete-event simulation of the incident in `seed/spike-projection-rate-limit.md` and of
//! the fixes proposed for it, side by side with Floodgate's real state machine
//! ([`floodgate::core::LimiterCore`]) driven by a virtual clock. Deterministic: one seed gives
//! one report, byte for byte; hours of simulated time take seconds of wall time.
//!
//! # The model
//!
//! **Workload** (drawn once per seed, identical for every strategy): one batch task
//! (`calculate_spike_projections`) starts one task per organization ([`Config::orgs`], 5,000);
//! each organization task starts one query task (`run_spike_projection`) per chunk of its
//! projects: `1 + G` tasks, where `G` is geometric with mean [`Config::queries_per_org`] − 1
//! (default mean 2 per organization, capped at 100). Each query runs on the backend for a
//! lognormal time (median [`Config::query_median`], 2 s; shape [`Config::query_sigma`], 0.8, so
//! the mean is 2.75 s and p99 13 s), cut at [`Model::query_timeout`] (30 s, Snuba's query
//! timeout; a cut query still succeeds). A fraction [`Config::crash_fraction`] of the queries
//! is marked "crash": the worker dies right after that query, before releasing a permit.
//!
//! **Task system** (Sentry's taskworker, or Celery with `concurrency = W`): one FIFO broker
//! queue served by [`Config::workers`] workers (200). A task occupies its worker from start to
//! end, including while it sleeps, polls or waits. Starting a task costs
//! [`Model::task_overhead`] (5 ms) and each `delay()` [`Model::delay_cost`] (1 ms). Every
//! execution has a processing deadline; at the deadline the worker child is killed (no
//! `finally` runs, so a permit or counter slot it holds leaks) and, since taskworker raises a
//! retryable `TimeoutError`, the task is retried while its `Retry(times=N)` allows. A failed
//! task (RateLimitExceeded, a cache error) is retried the same way: `Retry(times=N)` means at
//! most N executions in all (taskworker's current semantics), re-queued at the back with no
//! delay (its default). Work is **lost** when a query task is skipped, or fails or is killed on
//! its last execution, or is never started because its parent was killed.
//!
//! **Backend** (Snuba's concurrent-query limit, [`Config::backend_limit`], 100): a query is
//! counted on arrival; if the count, itself included, exceeds the limit it is rejected with
//! RateLimitExceeded after [`Model::reject_latency`] (10 ms), still counted until then. So the
//! *backend concurrency* reported and drawn is what Snuba sees (admitted plus being rejected),
//! the quantity that read 159 in the incident; `peak_running` counts admitted queries only.
//! Past [`Model::knee`] (75 %) of its capacity the backend slows every query it admits, up to
//! [`Model::slowdown_at_capacity`] (1.25x) at the capacity, and its capacity may change mid-run
//! ([`Config::capacity_change`]); see `loaded.rs`.
//!
//! # The strategies
//!
//! - [`Strategy::Unbounded`]: today's code. Query tasks have a 90 s deadline and
//!   `Retry(times=3)`; a rejected query raises, and the task is retried.
//! - [`Strategy::SeedCounter`]: the seed's Option 1, step by step against a model of Django's
//!   cache ([`Model::cache_rtt`], 1 ms per call, so concurrent tasks interleave between a `get`
//!   and the `incr` that follows it): `acquire_spike_projection_slot` (`get`; `get`; `incr` or
//!   `add` with a 300 s TTL set only when the key is created; ten tries 100 ms apart; an
//!   overshooting `incr` returns False without undoing it; `incr` of a key that just expired
//!   raises), the 1 s polling loop that skips the work after 60 s, and `release` (`get`, then
//!   `decr` when positive). Limit [`Config::limit`] (50), deadline 90 s, `Retry(times=3)`.
//!   Every flaw in `PRIOR_ART.md` emerges rather than being scripted, plus one more the code
//!   has: when the count falls back to 0 the key still exists, so `get` returns 0 (falsy), the
//!   code calls `add`, which fails on an existing key, and nobody can acquire until the TTL
//!   lapses.
//! - [`Strategy::SeedBatches`]: Option 2. The batch task spawns 25 organizations, sleeps 5 s
//!   (holding its worker), and so on, under its 60 s deadline and `Retry(times=3)`; a retry
//!   starts again from the first batch. Query tasks as in `unbounded`.
//! - [`Strategy::SeedBackoff`]: Option 3. Three tries inside the task, sleeping
//!   `5 s × 2^attempt + U(0, 2 s)` in the worker between them; the third rejection raises;
//!   `Retry(times=5)`; deadline 120 s.
//! - [`Strategy::Floodgate`]: the real [`LimiterCore`](floodgate::core::LimiterCore), limit
//!   [`Config::limit`] (50), lease [`Config::lease`] (300 s), used the way the Python client's
//!   Celery decorator `@limited` (`clients/python/src/floodgate/celery.py`) uses it. A query
//!   task acquires with a wait of [`Config::max_wait`] (45 s; `@limited` defaults to 5 s, and
//!   `--max-wait 5s` gives the same makespan within 1 % on seed 1, with longer waits: p99
//!   8m23s against 6m40s). The acquire is a blocking long poll, so a queued task holds its
//!   worker while it waits; the limiter wakes exactly the waiter it grants. A wait that ends
//!   is re-enqueued with `countdown = retry_after × (1 + U(0, 0.1))` (`self.retry`,
//!   unbounded, not spending `Retry(times)`), never dropped. 45 s + a query cut at 30 s and
//!   slowed at most 1.25x stays inside the 90 s deadline; a longer [`Config::max_wait`] lets
//!   the deadline kill holders mid-query, and a killed holder's query goes on at the backend
//!   after its lease ends. A holder extends its lease every third of it while the query runs
//!   (the heartbeat; with a 300 s lease and queries cut at 30 s none is needed). A crashed or
//!   killed holder's permit comes back when its lease ends. A query rejected by the backend
//!   (only when the limit exceeds the backend's capacity, which `--capacity-change` may
//!   lower, or a killed holder's query still runs) releases the permit and is retried after
//!   `U(0, min(300 s, 1 s × 2^n))`, at most 10 times ([`Model::throttle_max_retries`]).
//! - [`Strategy::FloodgateAdaptive`]: the same, with the library's own AIMD controller
//!   ([`floodgate::AdaptiveSpec`] between 1 and [`Config::adaptive_max`], driven by
//!   [`LimiterCore::feedback`](floodgate::core::LimiterCore::feedback), as `@limited` reports
//!   it): it starts at [`Config::limit`]; each RateLimitExceeded is reported as throttled (×0.7,
//!   at most once per 2 s); every round of successes as large as the limit adds 1.
//! - [`Strategy::FloodgateGradient`]: the same with the latency-aware controller
//!   ([`floodgate::AdaptiveSpec::gradient`]); every report carries the query's latency.
//!
//! - [`Strategy::FloodgateKeyed`]: the same limit as a keyed limiter
//!   ([`floodgate::core::keyed::KeyLayer`] beside its total core), one key per organization, no
//!   per-key limit: waiters queue per organization and freed permits go to the organizations in
//!   deficit round robin. Run by the `orgs` scenario (see [`Scenario`] and `orgs.rs`); the
//!   incident's default run leaves it out, since there every organization is small.
//!
//! # The report
//!
//! Per strategy: peak backend concurrency, rejected queries, work lost (by cause), makespan
//! (until the last task ends) and its ratio to the ideal, total query time / limit, where the
//! limit is [`Config::limit`] for `floodgate` (the limit it was given) and
//! [`Config::backend_limit`] for the others, including `floodgate-adaptive`, whose limit is
//! found from the backend (its ratio to 50 would read as better than ideal); p50 and p99 of the
//! wait from a query task's creation to the start of its successful query (completed queries
//! only); and the worker-seconds spent sleeping, polling or blocked waiting. In the `orgs`
//! scenario, also per-organization figures ([`OrgStats`]).

mod cache;
mod engine;
mod loaded;
mod orgs;
mod report;
mod rng;
mod svg;
mod workload;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use floodgate::spec::MAX_CONCURRENCY;
use floodgate::{AdaptiveSpec, LimiterSpec};
use serde::Serialize;

pub use self::orgs::{
    jain, OrgStats, Scenario, JAIN_WINDOW, LARGE_ORG_QUERIES, MAX_ORG_QUERIES, ORG_SIZE_SHAPE,
    SMALL_ORG_QUERIES,
};
pub use self::report::{CounterStats, LimiterStats, Report, StrategyReport};
pub use self::svg::render_svg;

/// One way of running the cascade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Today's code: no limit, rejected queries retried by `Retry(times=3)`.
    Unbounded,
    /// The seed's Option 1: a non-atomic cache counter as a semaphore, 1 s polling.
    SeedCounter,
    /// The seed's Option 2: 25 organizations per batch, 5 s sleeps in the spawning task.
    SeedBatches,
    /// The seed's Option 3: in-task exponential backoff with jitter.
    SeedBackoff,
    /// Floodgate's limiter, fixed limit, FIFO blocking waits.
    Floodgate,
    /// Floodgate's limiter with the adaptive (AIMD) limit driven by backend feedback.
    FloodgateAdaptive,
    /// Floodgate's limiter with the latency-aware adaptive limit (`gradient`).
    FloodgateGradient,
    /// Floodgate's keyed limiter: the same total, one key per organization, waiters queued per
    /// organization and freed permits shared across them in deficit round robin.
    FloodgateKeyed,
}

impl Strategy {
    /// Every strategy, in report order.
    pub const ALL: [Strategy; 8] = [
        Strategy::Unbounded,
        Strategy::SeedCounter,
        Strategy::SeedBatches,
        Strategy::SeedBackoff,
        Strategy::Floodgate,
        Strategy::FloodgateAdaptive,
        Strategy::FloodgateGradient,
        Strategy::FloodgateKeyed,
    ];

    /// The strategies the incident's default run compares (the keyed one is the `orgs`
    /// scenario's: one key per organization changes nothing where every organization is small).
    pub const INCIDENT: [Strategy; 7] = [
        Strategy::Unbounded,
        Strategy::SeedCounter,
        Strategy::SeedBatches,
        Strategy::SeedBackoff,
        Strategy::Floodgate,
        Strategy::FloodgateAdaptive,
        Strategy::FloodgateGradient,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Unbounded => "unbounded",
            Strategy::SeedCounter => "seed-counter",
            Strategy::SeedBatches => "seed-batches",
            Strategy::SeedBackoff => "seed-backoff",
            Strategy::Floodgate => "floodgate",
            Strategy::FloodgateAdaptive => "floodgate-adaptive",
            Strategy::FloodgateGradient => "floodgate-gradient",
            Strategy::FloodgateKeyed => "floodgate-keyed",
        }
    }

    /// Whether it runs queries under Floodgate's limiter.
    pub fn uses_limiter(self) -> bool {
        matches!(
            self,
            Strategy::Floodgate
                | Strategy::FloodgateAdaptive
                | Strategy::FloodgateGradient
                | Strategy::FloodgateKeyed
        )
    }

    /// Whether its limit adapts to backend feedback.
    pub fn adapts(self) -> bool {
        matches!(
            self,
            Strategy::FloodgateAdaptive | Strategy::FloodgateGradient
        )
    }

    fn index(self) -> u64 {
        match self {
            Strategy::Unbounded => 0,
            Strategy::SeedCounter => 1,
            Strategy::SeedBatches => 2,
            Strategy::SeedBackoff => 3,
            Strategy::Floodgate => 4,
            Strategy::FloodgateAdaptive => 5,
            Strategy::FloodgateGradient => 6,
            Strategy::FloodgateKeyed => 7,
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|st| st.name() == s.trim())
            .ok_or_else(|| {
                let names: Vec<&str> = Strategy::ALL.iter().map(|st| st.name()).collect();
                format!("unknown strategy {s:?}; one of {}", names.join(", "))
            })
    }
}

/// The fixed constants of the model: the seed's numbers and the costs of the plumbing. The
/// defaults are the seed's code; change them to ask "what if".
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// Cost of starting a task on a worker (fetching it from the broker).
    pub task_overhead: Duration,
    /// Cost of one `delay()` call (producing the task message).
    pub delay_cost: Duration,
    /// How long a rejected query takes to come back with RateLimitExceeded.
    pub reject_latency: Duration,
    /// Longest a query runs: sampled durations are cut here.
    pub query_timeout: Duration,
    /// Round trip of one cache call (`get`, `incr`, `add`, `decr`) in `seed-counter`.
    pub cache_rtt: Duration,
    /// Processing deadline of the batch task (`calculate_spike_projections`).
    pub batch_deadline: Duration,
    /// Processing deadline of an organization task.
    pub org_deadline: Duration,
    /// Processing deadline of a query task (`run_spike_projection`), all strategies but
    /// `seed-backoff`.
    pub query_deadline: Duration,
    /// Processing deadline of a query task under `seed-backoff` (Option 3 extends it).
    pub backoff_deadline: Duration,
    /// `Retry(times=N)` of every task but `seed-backoff`'s query task: N executions at most.
    pub retry_times: u32,
    /// `Retry(times=N)` of `seed-backoff`'s query task.
    pub backoff_retry_times: u32,
    /// `seed-counter`: the key's TTL, set only when `add` creates it.
    pub counter_ttl: Duration,
    /// `seed-counter`: the polling loop's `sleep`.
    pub counter_poll: Duration,
    /// `seed-counter`: how long the loop polls before skipping the work.
    pub counter_max_wait: Duration,
    /// `seed-counter`: tries inside one `acquire_spike_projection_slot` call.
    pub counter_tries: u32,
    /// `seed-counter`: the sleep between those tries.
    pub counter_try_sleep: Duration,
    /// `seed-batches`: organizations per batch.
    pub batch_size: u32,
    /// `seed-batches`: the sleep between batches.
    pub batch_sleep: Duration,
    /// `seed-backoff`: tries inside one execution.
    pub backoff_tries: u32,
    /// `seed-backoff`: the base of `base × 2^attempt + U(0, jitter)`.
    pub backoff_base: Duration,
    /// `seed-backoff`: the jitter's upper bound.
    pub backoff_jitter: Duration,
    /// Floodgate strategies (`@limited`'s `backoff`): after its n-th RateLimitExceeded a task
    /// is retried after `U(0, min(throttle_backoff_max, throttle_backoff × 2^n))`.
    pub throttle_backoff: Duration,
    /// `@limited`'s `backoff_max`.
    pub throttle_backoff_max: Duration,
    /// `@limited`'s `throttle_max_retries`: past it the exception is raised (and the task's
    /// own `Retry(times)` applies).
    pub throttle_max_retries: u32,
    /// `@limited`'s `retry_jitter`: a wait that ended re-enqueues after
    /// `retry_after × (1 + U(0, jitter))`.
    pub wait_retry_jitter: f64,
    /// Floodgate holders extend their lease every `lease / heartbeats` (`@limited`: 3).
    pub heartbeats: u32,
    /// Longest simulated time; whatever is unfinished then counts as lost.
    pub horizon: Duration,
    /// Fraction of the backend's capacity up to which a query takes its own time; past it
    /// contention slows every query admitted (see `loaded.rs`).
    pub knee: f64,
    /// How much slower a query admitted at exactly the backend's capacity runs (linear from
    /// 1 at the knee).
    pub slowdown_at_capacity: f64,
}

impl Default for Model {
    fn default() -> Self {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        Model {
            task_overhead: ms(5),
            delay_cost: ms(1),
            reject_latency: ms(10),
            query_timeout: s(30),
            cache_rtt: ms(1),
            batch_deadline: s(60),
            org_deadline: s(60),
            query_deadline: s(90),
            backoff_deadline: s(120),
            retry_times: 3,
            backoff_retry_times: 5,
            counter_ttl: s(300),
            counter_poll: s(1),
            counter_max_wait: s(60),
            counter_tries: 10,
            counter_try_sleep: ms(100),
            batch_size: 25,
            batch_sleep: s(5),
            backoff_tries: 3,
            backoff_base: s(5),
            backoff_jitter: s(2),
            throttle_backoff: s(1),
            throttle_backoff_max: s(300),
            throttle_max_retries: 10,
            wait_retry_jitter: 0.1,
            heartbeats: 3,
            horizon: s(30 * 24 * 3600),
            knee: 0.75,
            slowdown_at_capacity: 1.25,
        }
    }
}

/// Most query tasks one run simulates: 25 times the incident's. Past it a run takes minutes
/// per strategy, then more memory than a small machine has (a billion tasks were accepted).
pub const MAX_QUERIES: u32 = 250_000;

/// Shortest lease the simulation accepts.
pub const MIN_LEASE: Duration = Duration::from_secs(1);

/// What to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Seed of every random draw.
    pub seed: u64,
    /// The workload's shape: the incident's, or organizations of heavy-tailed sizes.
    pub scenario: Scenario,
    /// Organizations, one task each.
    pub orgs: u32,
    /// Mean query tasks per organization (at least 1): `1 + geometric`.
    pub queries_per_org: f64,
    /// Worker pool size (Celery's concurrency).
    pub workers: u32,
    /// Median query time.
    pub query_median: Duration,
    /// Shape of the lognormal query time (standard deviation of its logarithm).
    pub query_sigma: f64,
    /// Concurrent queries the backend admits.
    pub backend_limit: u32,
    /// The backend's capacity changes to this at this time (a replica lost or added).
    pub capacity_change: Option<(Duration, u32)>,
    /// The limit of `seed-counter` and `floodgate`, and the starting limit of
    /// `floodgate-adaptive`.
    pub limit: u32,
    /// Highest limit `floodgate-adaptive` may reach.
    pub adaptive_max: u32,
    /// Fraction of query tasks whose worker dies right after the query, holding its permit.
    pub crash_fraction: f64,
    /// Floodgate's lease: how long a dead holder's permit stays taken.
    pub lease: Duration,
    /// Floodgate's wait cap for one acquire.
    pub max_wait: Duration,
    /// Which strategies to run, in this order.
    pub strategies: Vec<Strategy>,
    /// The fixed constants.
    pub model: Model,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            seed: 1,
            scenario: Scenario::Incident,
            orgs: 5_000,
            queries_per_org: 2.0,
            workers: 200,
            query_median: Duration::from_secs(2),
            query_sigma: 0.8,
            backend_limit: 100,
            capacity_change: None,
            limit: 50,
            adaptive_max: 1_000,
            crash_fraction: 0.0,
            lease: Duration::from_secs(300),
            max_wait: Duration::from_secs(45),
            strategies: Strategy::INCIDENT.to_vec(),
            model: Model::default(),
        }
    }
}

impl Config {
    /// The defaults of `scenario`: its organization count and strategies, the rest as
    /// [`Config::default`].
    pub fn scenario(scenario: Scenario) -> Self {
        Config {
            scenario,
            orgs: scenario.default_orgs(),
            max_wait: scenario.default_max_wait(),
            strategies: scenario.default_strategies(),
            ..Config::default()
        }
    }
}

impl Config {
    /// Checks the settings; the error says which one is out of range.
    pub fn validate(&self) -> Result<(), String> {
        // Every organization has at least one query task.
        if self.orgs == 0 || self.orgs > MAX_QUERIES {
            return Err(format!("orgs: must be from 1 to {MAX_QUERIES}"));
        }
        if !(self.queries_per_org >= 1.0 && self.queries_per_org <= 100.0) {
            return Err("queries-per-org: must be from 1 to 100".into());
        }
        // The incident's mean is known before drawing (the `orgs` scenario's is checked as it
        // draws): refused here, it costs no memory.
        if self.scenario == Scenario::Incident
            && f64::from(self.orgs) * self.queries_per_org > f64::from(MAX_QUERIES)
        {
            return Err(format!(
                "orgs: {} organizations of {} queries on average make more than {MAX_QUERIES} \
                 query tasks; simulate fewer",
                self.orgs, self.queries_per_org
            ));
        }
        if self.workers == 0 || self.workers > 1_000_000 {
            return Err("workers: must be from 1 to 1000000".into());
        }
        if self.query_median.is_zero() || self.query_median > self.model.query_timeout {
            return Err(format!(
                "query-median: must be above 0 and at most the query timeout ({} s)",
                self.model.query_timeout.as_secs()
            ));
        }
        if !(self.query_sigma >= 0.0 && self.query_sigma <= 5.0) {
            return Err("query-sigma: must be from 0 to 5".into());
        }
        // Each flag checked on its own first, so the error names the one given out of range
        // (`--adaptive-max 0` was reported against `limit`).
        if self.limit == 0 || self.limit > MAX_CONCURRENCY {
            return Err(format!("limit: must be from 1 to {MAX_CONCURRENCY}"));
        }
        if self.adaptive_max == 0 || self.adaptive_max > MAX_CONCURRENCY {
            return Err(format!("adaptive-max: must be from 1 to {MAX_CONCURRENCY}"));
        }
        if self.limit > self.adaptive_max {
            // Either flag may be the one to change: both are named.
            return Err(format!(
                "limit/adaptive-max: the limit ({}) is above the adaptive maximum ({}); the \
                 adaptive strategies start at the limit",
                self.limit, self.adaptive_max
            ));
        }
        if self.backend_limit == 0 {
            return Err("backend-limit: must be at least 1".into());
        }
        if let Some((_, c)) = self.capacity_change {
            if c == 0 {
                return Err("capacity-change: the new capacity must be at least 1".into());
            }
        }
        let m = &self.model;
        if !(m.knee >= 0.0 && m.knee < 1.0) {
            return Err("knee: must be from 0 to below 1".into());
        }
        if !(m.slowdown_at_capacity >= 1.0 && m.slowdown_at_capacity * m.knee < 1.0) {
            return Err(
                "slowdown: must be at least 1 and below 1 / knee (throughput must \
                        still rise up to the capacity)"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&self.crash_fraction) {
            return Err("crash-fraction: must be from 0 to 1".into());
        }
        if self.strategies.is_empty() {
            return Err("strategy: name at least one".into());
        }
        // Holders extend every third of the lease while their query runs: a lease of 1 ms
        // (the limiter's least) would be tens of thousands of extends per query, minutes of
        // wall time for nothing a real client could do.
        if self.lease < MIN_LEASE {
            return Err(format!(
                "lease: must be at least {} s in the simulation",
                MIN_LEASE.as_secs()
            ));
        }
        self.limiter_spec(Strategy::Floodgate)
            .validate()
            .and_then(|()| self.limiter_spec(Strategy::FloodgateAdaptive).validate())
            .and_then(|()| self.limiter_spec(Strategy::FloodgateGradient).validate())
            .map_err(|e| {
                let flag = match e.field {
                    "concurrency" | "adaptive.min" => "limit/adaptive-max",
                    "lease_ms" => "lease",
                    "max_wait_ms" => "max-wait",
                    // The queue holds every worker's waiter (`limiter_spec`).
                    "max_queue" => "workers",
                    other => other,
                };
                format!("{flag}: {}", e.message)
            })
    }

    /// The limiter a Floodgate strategy defines.
    pub fn limiter_spec(&self, strategy: Strategy) -> LimiterSpec {
        let spec = LimiterSpec::concurrency(self.limit)
            .with_default_lease(self.lease)
            .with_max_wait(self.max_wait)
            .with_max_queue(self.workers.max(10_000));
        match strategy {
            Strategy::FloodgateAdaptive => {
                spec.with_adaptive(AdaptiveSpec::between(1, self.adaptive_max))
            }
            Strategy::FloodgateGradient => {
                spec.with_adaptive(AdaptiveSpec::gradient(1, self.adaptive_max))
            }
            _ => spec,
        }
    }

    /// The limit a strategy's ideal makespan is measured against.
    pub fn ideal_limit(&self, strategy: Strategy) -> u32 {
        match strategy {
            Strategy::Floodgate | Strategy::FloodgateKeyed => self.limit,
            _ => self.backend_limit,
        }
    }
}

/// Backend concurrency over time for one strategy, for drawing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Which strategy.
    pub strategy: Strategy,
    /// `(time in µs, backend concurrency)` at every change, in time order.
    pub concurrency: Vec<(u64, u32)>,
    /// `(time in µs, limit in force)` at every change, for the Floodgate strategies.
    pub limit: Vec<(u64, u32)>,
    /// When the last task ended, in µs.
    pub makespan_us: u64,
}

/// A finished simulation: the report and the traces behind the drawing.
#[derive(Debug, Clone, PartialEq)]
pub struct Simulation {
    /// The numbers.
    pub report: Report,
    /// One trace per strategy, in report order.
    pub traces: Vec<Trace>,
}

/// Runs every configured strategy on the same seeded workload.
pub fn run(cfg: &Config) -> Result<Simulation, String> {
    cfg.validate()?;
    let wl = workload::Workload::generate(cfg)?;
    let mut strategies = Vec::new();
    let mut traces = Vec::new();
    for &strategy in &cfg.strategies {
        let (report, trace) = engine::simulate(cfg, &wl, strategy)?;
        strategies.push(report);
        traces.push(trace);
    }
    let report = Report {
        seed: cfg.seed,
        scenario: cfg.scenario,
        orgs: cfg.orgs,
        queries: wl.units() as u64,
        total_query_s: wl.total_query_us() as f64 / 1e6,
        longest_query_s: wl.duration_us.iter().max().copied().unwrap_or(0) as f64 / 1e6,
        workers: cfg.workers,
        backend_limit: cfg.backend_limit,
        limit: cfg.limit,
        crash_fraction: cfg.crash_fraction,
        strategies,
    };
    Ok(Simulation { report, traces })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategy_names_round_trip() {
        for s in Strategy::ALL {
            assert_eq!(s.name().parse::<Strategy>(), Ok(s));
        }
        assert!("nope".parse::<Strategy>().is_err());
    }

    #[test]
    fn defaults_are_valid_and_bad_values_name_the_flag() {
        assert_eq!(Config::default().validate(), Ok(()));
        let bad = Config {
            limit: 0,
            ..Config::default()
        };
        assert!(bad.validate().is_err_and(|e| e.starts_with("limit:")));
        for adaptive_max in [0, MAX_CONCURRENCY + 1] {
            let bad = Config {
                adaptive_max,
                ..Config::default()
            };
            assert!(
                bad.validate()
                    .is_err_and(|e| e.starts_with("adaptive-max:")),
                "{adaptive_max}"
            );
        }
        let bad = Config {
            limit: 20,
            adaptive_max: 10,
            ..Config::default()
        };
        assert!(bad
            .validate()
            .is_err_and(|e| e.starts_with("limit/adaptive-max:")));
        let bad = Config {
            crash_fraction: 2.0,
            ..Config::default()
        };
        assert!(bad
            .validate()
            .is_err_and(|e| e.starts_with("crash-fraction")));
    }
}
