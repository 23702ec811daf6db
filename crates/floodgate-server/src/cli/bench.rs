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
//! and uses it in every phase. In store mode the clients share one `RedisStore` (one multiplexed
//! connection and one subscription), as the tasks of one process would.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use floodgate::{
    AcquireOptions, Floodgate, Limiter, LimiterSpec, Permit, RedisConfig, RedisLimiter, RedisStore,
};
use redis::aio::MultiplexedConnection;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::duration::parse_duration;
use super::status::print;
use super::Failure;
use crate::client::Client;
use crate::server::{self, ServerOptions};

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
    let result = measure(&args, &target, &names).await;
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
    });
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

/// What the workloads run against.
enum Target {
    /// A server over HTTP.
    Http {
        base: String,
        token: Option<String>,
        control: Client,
        /// The in-process server, when no --url was given.
        local: Option<LocalServer>,
    },
    /// The library's Redis store, in this process.
    Store(StoreTarget),
}

struct StoreTarget {
    url: String,
    /// Two store instances on the same Redis, each with its own connection and wake-up
    /// subscription: the handoff's two sides use one each. Every other client uses the first.
    gates: [Floodgate<RedisStore>; 2],
    /// A plain connection to the same Redis: the baseline PINGs and INFO.
    redis: MultiplexedConnection,
}

impl Target {
    async fn open(args: &BenchArgs) -> Result<Self, Failure> {
        if let Some(url) = &args.store {
            let connect = |what: &str, e: &dyn std::fmt::Display| Failure {
                code: super::EXIT_UNAVAILABLE,
                message: format!("{what} {url}: {e}"),
            };
            let mut gates = Vec::with_capacity(2);
            for _ in 0..2 {
                let store = RedisStore::connect(RedisConfig::new(url.as_str()))
                    .await
                    .map_err(|e| connect("cannot open the Redis store at", &e))?;
                gates.push(Floodgate::with_store(store));
            }
            let client =
                redis::Client::open(url.as_str()).map_err(|e| connect("not a Redis URL:", &e))?;
            let redis = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| connect("cannot connect to", &e))?;
            let [a, b]: [Floodgate<RedisStore>; 2] = gates.try_into().map_err(|_| Failure {
                code: 1,
                message: "two stores expected".into(),
            })?;
            return Ok(Target::Store(StoreTarget {
                url: url.clone(),
                gates: [a, b],
                redis,
            }));
        }
        let mut local = None;
        let base = match &args.url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => {
                let server = LocalServer::start(args.token.clone()).await?;
                let base = server.base.clone();
                local = Some(server);
                base
            }
        };
        let control = Client::new(&base, args.token.clone())?;
        Ok(Target::Http {
            base,
            token: args.token.clone(),
            control,
            local,
        })
    }

    fn address(&self) -> &str {
        match self {
            Target::Http { base, .. } => base,
            Target::Store(store) => &store.url,
        }
    }

    fn in_process(&self) -> bool {
        matches!(self, Target::Http { local: Some(_), .. })
    }

    fn is_store(&self) -> bool {
        matches!(self, Target::Store(_))
    }

    /// The trivial request of the baselines.
    fn trivial_label(&self) -> &'static str {
        match self {
            Target::Http { .. } => "GET /healthz",
            Target::Store(_) => "PING",
        }
    }

    /// Creates the limiter with this limit (or changes it).
    async fn define(&self, name: &str, limit: u32) -> Result<(), Failure> {
        match self {
            Target::Http { control, .. } => {
                control
                    .put_limiter(
                        name,
                        &json!({ "concurrency": limit, "lease_ms": LEASE_MS, "max_wait_ms": WAIT_MS }),
                    )
                    .await?;
            }
            Target::Store(store) => {
                let spec = LimiterSpec::concurrency(limit)
                    .with_default_lease(Duration::from_millis(LEASE_MS))
                    .with_max_wait(Duration::from_millis(WAIT_MS));
                store.gates[0]
                    .define(name, spec)
                    .await
                    .map_err(|e| fail(format!("define {name}: {e}")))?;
            }
        }
        Ok(())
    }

    /// Deletes every limiter of the bench that exists.
    async fn delete_all(&self, names: &Names) -> Result<(), Failure> {
        let mut outcome = Ok(());
        for name in names.all() {
            match self {
                Target::Http { control, .. } => match control.delete_limiter(name).await {
                    Ok(_) => {}
                    Err(e) if e.code() == Some("unknown_limiter") => {}
                    Err(e) => outcome = Err(Failure::from(e)),
                },
                Target::Store(store) => {
                    if let Err(e) = store.gates[0].delete(name).await {
                        outcome = Err(fail(format!("delete {name}: {e}")));
                    }
                }
            }
        }
        outcome
    }

    /// A client of the limiter. `second`: in store mode, on the second store instance.
    async fn side(&self, name: &str, second: bool) -> Result<Side, Failure> {
        match self {
            Target::Http { base, token, .. } => {
                Ok(Side::Http(Worker::new(base, token.as_deref(), name)?))
            }
            Target::Store(store) => {
                let gate = &store.gates[usize::from(second)];
                let limiter = gate
                    .limiter(name)
                    .await
                    .map_err(|e| fail(format!("limiter {name}: {e}")))?;
                Ok(Side::Store {
                    limiter,
                    redis: store.redis.clone(),
                })
            }
        }
    }

    /// Acquires queued on the limiter now.
    async fn waiting(&self, name: &str) -> Result<u64, Failure> {
        match self {
            Target::Http { control, .. } => {
                let status = control.limiter(name).await?;
                Ok(status.get("waiting").and_then(Value::as_u64).unwrap_or(0))
            }
            Target::Store(store) => {
                let status = async { store.gates[0].limiter(name).await?.status().await }
                    .await
                    .map_err(|e| fail(format!("status of {name}: {e}")))?;
                Ok(u64::from(status.waiting))
            }
        }
    }

    /// A connection for reading Redis's counters, in store mode.
    fn redis(&self) -> Option<MultiplexedConnection> {
        match self {
            Target::Http { .. } => None,
            Target::Store(store) => Some(store.redis.clone()),
        }
    }

    async fn close(self) {
        match self {
            Target::Http { control, local, .. } => {
                drop(control);
                if let Some(server) = local {
                    server.stop().await;
                }
            }
            Target::Store(store) => drop(store),
        }
    }
}

fn fail(message: String) -> Failure {
    Failure { code: 1, message }
}

/// The in-process server.
struct LocalServer {
    base: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl LocalServer {
    async fn start(token: Option<String>) -> Result<Self, Failure> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| Failure {
                code: 1,
                message: format!("cannot listen on 127.0.0.1: {e}"),
            })?;
        let addr = listener.local_addr().map_err(|e| Failure {
            code: 1,
            message: e.to_string(),
        })?;
        let options = ServerOptions {
            token,
            ..ServerOptions::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(
            listener,
            Floodgate::in_memory(),
            options,
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(LocalServer {
            base: format!("http://{addr}"),
            stop,
            task,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        // Every client is dropped by now; the wait is only a guard against a stuck connection.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// One HTTP benchmark client: its own connection pool (in practice one keep-alive connection).
struct Worker {
    http: reqwest::Client,
    auth: Option<HeaderValue>,
    healthz: String,
    acquire: String,
    permits: String,
}

#[derive(Deserialize)]
struct Acquired {
    permit_id: String,
}

type Outcome<T> = Result<T, String>;

impl Worker {
    fn new(base: &str, token: Option<&str>, limiter: &str) -> Result<Self, Failure> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Failure {
                code: 1,
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        let auth = match token {
            Some(t) => Some(
                HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| Failure::usage("--token: not a valid header value"))?,
            ),
            None => None,
        };
        Ok(Worker {
            http,
            auth,
            healthz: format!("{base}/healthz"),
            acquire: format!("{base}/v1/limiters/{limiter}/acquire"),
            permits: format!("{base}/v1/permits/"),
        })
    }

    /// Sends the request and reads the whole response; a non-2xx status is an error.
    async fn send(&self, req: reqwest::RequestBuilder) -> Outcome<Bytes> {
        let req = match &self.auth {
            Some(auth) => req.header(AUTHORIZATION, auth.clone()),
            None => req,
        };
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(format!(
                "HTTP {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&body)
            ))
        }
    }

    async fn healthz(&self) -> Outcome<()> {
        self.send(self.http.get(&self.healthz)).await.map(drop)
    }

    /// Acquires; returns the permit id and the moment the response had fully arrived.
    async fn acquire(&self) -> Outcome<(String, Instant)> {
        let body = self
            .send(
                self.http
                    .post(&self.acquire)
                    .header(CONTENT_TYPE, "application/json")
                    .body(ACQUIRE_BODY),
            )
            .await?;
        let arrived = Instant::now();
        let acquired: Acquired =
            serde_json::from_slice(&body).map_err(|e| format!("acquire answer: {e}"))?;
        Ok((acquired.permit_id, arrived))
    }

    async fn release(&self, permit_id: &str) -> Outcome<()> {
        let url = format!("{}{permit_id}/release", self.permits);
        let body = self.send(self.http.post(url)).await?;
        if body.windows(15).any(|w| w == b"\"released\":true") {
            Ok(())
        } else {
            Err(format!(
                "release of {permit_id}: {}",
                String::from_utf8_lossy(&body)
            ))
        }
    }
}

/// One benchmark client of one limiter: over HTTP, or on a store.
enum Side {
    Http(Worker),
    Store {
        limiter: Limiter<RedisLimiter>,
        /// For the baseline PINGs.
        redis: MultiplexedConnection,
    },
}

/// A permit a [`Side`] holds.
enum Held {
    Http(String),
    Store(Permit<RedisLimiter>),
}

impl Side {
    /// Acquires (waiting up to `WAIT_MS`); returns the permit and the moment it arrived.
    async fn acquire(&self) -> Outcome<(Held, Instant)> {
        match self {
            Side::Http(worker) => worker
                .acquire()
                .await
                .map(|(id, arrived)| (Held::Http(id), arrived)),
            Side::Store { limiter, .. } => {
                let options = AcquireOptions::new()
                    .lease(Duration::from_millis(LEASE_MS))
                    .wait(Duration::from_millis(WAIT_MS));
                let permit = limiter
                    .acquire(options)
                    .await
                    .map_err(|e| format!("acquire: {e}"))?;
                Ok((Held::Store(permit), Instant::now()))
            }
        }
    }

    async fn release(&self, held: Held) -> Outcome<()> {
        match (self, held) {
            (Side::Http(worker), Held::Http(id)) => worker.release(&id).await,
            (Side::Store { .. }, Held::Store(permit)) => {
                let id = permit.id();
                match permit.release().await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!("release of {id}: no longer held")),
                    Err(e) => Err(format!("release of {id}: {e}")),
                }
            }
            // Cannot happen: a side only releases what it acquired.
            _ => Err("a permit was released through the wrong kind of client".into()),
        }
    }

    /// One trivial round trip: `GET /healthz`, or a Redis `PING`.
    async fn trivial(&self) -> Outcome<()> {
        match self {
            Side::Http(worker) => worker.healthz().await,
            Side::Store { redis, .. } => {
                let mut conn = redis.clone();
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .map(drop)
                    .map_err(|e| format!("PING: {e}"))
            }
        }
    }

    async fn pair(&self, phase: Phase) -> Outcome<()> {
        match phase {
            Phase::Trivial => {
                self.trivial().await?;
                self.trivial().await
            }
            Phase::Floodgate => {
                let (held, _) = self.acquire().await?;
                self.release(held).await
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Two trivial round trips.
    Trivial,
    /// Acquire then release.
    Floodgate,
}

/// Waits for every task; the first failure wins.
async fn join_all<T>(tasks: Vec<tokio::task::JoinHandle<Outcome<T>>>) -> Outcome<Vec<T>> {
    let mut results = Vec::with_capacity(tasks.len());
    let mut failure = None;
    for task in tasks {
        match task.await {
            Ok(Ok(x)) => results.push(x),
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(e) => failure = failure.or(Some(e.to_string())),
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(results),
    }
}

/// Runs `phase` on every client until `length` has passed; pairs per second.
async fn throughput(sides: &[Arc<Side>], phase: Phase, length: Duration) -> Outcome<f64> {
    let start = Instant::now();
    let deadline = start + length;
    let tasks: Vec<_> = sides
        .iter()
        .map(|side| {
            let side = Arc::clone(side);
            tokio::spawn(async move {
                let mut pairs = 0u64;
                // At least one pair each, so a zero-length run warms every connection up.
                loop {
                    side.pair(phase).await?;
                    pairs += 1;
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                Outcome::Ok(pairs)
            })
        })
        .collect();
    let total: u64 = join_all(tasks).await?.into_iter().sum();
    // Each task finishes the pair it started before the deadline: count that tail in the time.
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Latency samples of the handoff phase.
struct HandoffSamples {
    handoff: Vec<Duration>,
    trivial: Vec<Duration>,
    release: Vec<Duration>,
}

async fn handoffs(
    a: Arc<Side>,
    b: Arc<Side>,
    target: &Target,
    limiter: &str,
    count: u32,
) -> Result<HandoffSamples, Failure> {
    let mut samples = HandoffSamples {
        handoff: Vec::with_capacity(count as usize),
        trivial: Vec::with_capacity(count as usize),
        release: Vec::with_capacity(count as usize),
    };
    let (mut holder, mut waiter) = (a, b);
    let (mut permit, _) = holder.acquire().await.map_err(fail)?;
    for i in 0..WARMUP_HANDOFFS + count {
        let parked = Arc::clone(&waiter);
        let waiting = tokio::spawn(async move { parked.acquire().await });
        // Wait until the limiter has queued the waiter.
        while target.waiting(limiter).await? < 1 {
            if waiting.is_finished() {
                return Err(fail(
                    "the waiter was answered while the permit was held".into(),
                ));
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        // Baseline: one trivial round trip on the connection the release is about to use.
        let t = Instant::now();
        holder.trivial().await.map_err(fail)?;
        let trivial = t.elapsed();
        let sent = Instant::now();
        holder.release(permit).await.map_err(fail)?;
        let released = sent.elapsed();
        let (next, arrived) = waiting
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(fail)?;
        if i >= WARMUP_HANDOFFS {
            samples
                .handoff
                .push(arrived.saturating_duration_since(sent));
            samples.trivial.push(trivial);
            samples.release.push(released);
        }
        permit = next;
        std::mem::swap(&mut holder, &mut waiter);
    }
    holder.release(permit).await.map_err(fail)?;
    Ok(samples)
}

/// What one saturation holder saw inside the window.
#[derive(Default)]
struct HolderTally {
    /// Time it held a permit, clipped to the window.
    busy: Duration,
    /// Grants that arrived in the window.
    grants: u64,
    /// Sum of the whole holds of those grants (grant arrived to release sent).
    held: Duration,
    /// Acquire sent to grant arrived, for those grants.
    waits: Vec<Duration>,
}

/// One holder of the saturation workload: acquire → hold → release until `until`.
async fn saturation_holder(
    side: Arc<Side>,
    hold: Duration,
    from: Instant,
    until: Instant,
) -> Outcome<HolderTally> {
    let mut tally = HolderTally::default();
    loop {
        let asked = Instant::now();
        let (held, granted) = side.acquire().await?;
        tokio::time::sleep(hold).await;
        let sent = Instant::now();
        side.release(held).await?;
        let (a, b) = (granted.max(from), sent.min(until));
        if b > a {
            tally.busy += b - a;
        }
        if granted >= from && granted < until {
            tally.grants += 1;
            tally.held += sent.saturating_duration_since(granted);
            tally.waits.push(granted.saturating_duration_since(asked));
        }
        // Every holder keeps going until the window has closed, so the backlog lasts to its end.
        if Instant::now() >= until {
            return Ok(tally);
        }
    }
}

/// Redis's counters, from `INFO all`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct RedisCounters {
    /// `total_commands_processed`: every command, those run inside scripts included.
    commands: u64,
    /// Calls of `EVAL` and `EVALSHA`.
    scripts: u64,
    /// `used_cpu_user` + `used_cpu_sys`, in seconds.
    cpu: f64,
}

impl RedisCounters {
    fn parse(info: &str) -> Self {
        let mut counters = RedisCounters::default();
        for line in info.lines() {
            let Some((key, value)) = line.trim().split_once(':') else {
                continue;
            };
            match key {
                "total_commands_processed" => counters.commands = value.parse().unwrap_or(0),
                "used_cpu_user" | "used_cpu_sys" => counters.cpu += value.parse().unwrap_or(0.0),
                "cmdstat_eval" | "cmdstat_evalsha" => {
                    let calls: HashMap<&str, &str> = value
                        .split(',')
                        .filter_map(|kv| kv.split_once('='))
                        .collect();
                    counters.scripts += calls
                        .get("calls")
                        .and_then(|c| c.parse::<u64>().ok())
                        .unwrap_or(0);
                }
                _ => {}
            }
        }
        counters
    }

    async fn read(conn: &mut MultiplexedConnection) -> Outcome<Self> {
        let info: String = redis::cmd("INFO")
            .arg("all")
            .query_async(conn)
            .await
            .map_err(|e| format!("INFO: {e}"))?;
        Ok(RedisCounters::parse(&info))
    }
}

/// Redis's work during the saturation window.
struct RedisCost {
    /// Commands (inside scripts included) per grant.
    commands_per_grant: f64,
    /// Script calls (`EVAL`, `EVALSHA`) per grant.
    scripts_per_grant: f64,
    /// Redis CPU time over the window: 1.0 is one core busy.
    cpu_share: f64,
}

struct SaturationResult {
    holders: u32,
    limit: u32,
    hold: Duration,
    warmup: Duration,
    window: Duration,
    busy: Duration,
    grants: u64,
    held: Duration,
    wait: Latency,
    redis: Option<RedisCost>,
}

impl SaturationResult {
    fn utilization(&self) -> f64 {
        let capacity = self.window.as_secs_f64() * f64::from(self.limit);
        if capacity > 0.0 {
            self.busy.as_secs_f64() / capacity
        } else {
            0.0
        }
    }

    fn pairs_per_sec(&self) -> f64 {
        self.grants as f64 / self.window.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// Mean hold, grant arrived to release sent.
    fn mean_hold(&self) -> Duration {
        match u32::try_from(self.grants) {
            Ok(n) if n > 0 => self.held / n,
            _ => Duration::ZERO,
        }
    }

    /// How long a permit sat idle between two holders, on average: the limit's unused time in
    /// the window over the grants. Unlike utilization, it does not depend on the hold time.
    fn idle_per_grant(&self) -> Duration {
        let capacity = self.window.saturating_mul(self.limit);
        match u32::try_from(self.grants) {
            Ok(n) if n > 0 => capacity.saturating_sub(self.busy) / n,
            _ => Duration::ZERO,
        }
    }

    /// The throughput at full utilization with the holds measured: limit / mean hold.
    fn ideal_pairs_per_sec(&self) -> f64 {
        let hold = self.mean_hold().as_secs_f64();
        if hold > 0.0 {
            f64::from(self.limit) / hold
        } else {
            0.0
        }
    }

    fn to_json(&self) -> Value {
        let mut out = json!({
            "holders": self.holders,
            "limit": self.limit,
            "hold_ms": self.hold.as_secs_f64() * 1e3,
            "warmup_s": self.warmup.as_secs_f64(),
            "seconds": round3(self.window.as_secs_f64()),
            "utilization": round3(self.utilization()),
            "idle_per_grant_us": round1(self.idle_per_grant().as_secs_f64() * 1e6),
            "acquire_release_pairs_per_sec": round1(self.pairs_per_sec()),
            "ideal_pairs_per_sec": round1(self.ideal_pairs_per_sec()),
            "mean_hold_us": round1(self.mean_hold().as_secs_f64() * 1e6),
            "grants": self.grants,
            "wait": self.wait.to_json(),
        });
        if let Some(cost) = &self.redis {
            out["redis"] = json!({
                "commands_per_grant": round1(cost.commands_per_grant),
                "scripts_per_grant": round3(cost.scripts_per_grant),
                "cpu_share": round3(cost.cpu_share),
            });
        }
        out
    }
}

async fn saturation(
    target: &Target,
    args: &BenchArgs,
    limiter: &str,
) -> Result<SaturationResult, Failure> {
    let length = Duration::from_secs_f64(args.saturation_seconds);
    let warmup = SATURATION_WARMUP.min(length / 4);
    let mut sides = Vec::with_capacity(args.holders as usize);
    for _ in 0..args.holders {
        sides.push(Arc::new(target.side(limiter, false).await?));
    }
    let start = Instant::now();
    let (from, until) = (start + warmup, start + warmup + length);
    let tasks: Vec<_> = sides
        .into_iter()
        .map(|side| tokio::spawn(saturation_holder(side, args.hold, from, until)))
        .collect();
    // Redis's counters at the window's edges, read on a connection of their own.
    let probe = target.redis().map(|mut conn| {
        tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(from)).await;
            let before = RedisCounters::read(&mut conn).await?;
            tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
            let after = RedisCounters::read(&mut conn).await?;
            Outcome::Ok((before, after))
        })
    });
    let tallies = join_all(tasks).await.map_err(fail)?;
    let counters = match probe {
        Some(task) => Some(task.await.map_err(|e| fail(e.to_string()))?.map_err(fail)?),
        None => None,
    };
    let mut busy = Duration::ZERO;
    let mut grants = 0;
    let mut held = Duration::ZERO;
    let mut waits = Vec::new();
    for tally in tallies {
        busy += tally.busy;
        grants += tally.grants;
        held += tally.held;
        waits.extend(tally.waits);
    }
    let per_grant = |x: u64| x as f64 / (grants.max(1) as f64);
    let redis = counters.map(|(before, after)| RedisCost {
        // The two INFO calls themselves are not the workload's.
        commands_per_grant: per_grant(after.commands.saturating_sub(before.commands + 1)),
        scripts_per_grant: per_grant(after.scripts.saturating_sub(before.scripts)),
        cpu_share: (after.cpu - before.cpu).max(0.0) / length.as_secs_f64(),
    });
    Ok(SaturationResult {
        holders: args.holders,
        limit: args.limit,
        hold: args.hold,
        warmup,
        window: length,
        busy,
        grants,
        held,
        wait: Latency::new(waits),
        redis,
    })
}

struct ThroughputResult {
    clients: u32,
    seconds: f64,
    trivial_pairs: Rates,
    floodgate_pairs: Rates,
}

impl ThroughputResult {
    fn ratio(&self) -> f64 {
        if self.trivial_pairs.median > 0.0 {
            self.floodgate_pairs.median / self.trivial_pairs.median
        } else {
            0.0
        }
    }
}

struct HandoffResult {
    handoffs: u32,
    handoff: Latency,
    trivial_rtt: Latency,
    release_rtt: Latency,
}

async fn measure(args: &BenchArgs, target: &Target, names: &Names) -> Result<Report, Failure> {
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
            sides.push(Arc::new(target.side(&names.pairs, false).await?));
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
        let a = target.side(&names.handoff, false).await?;
        let b = target.side(&names.handoff, true).await?;
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
        report.saturation = Some(saturation(target, args, &names.saturation).await?);
    }
    Ok(report)
}

/// The rates of one kind of phase, one per round.
struct Rates {
    rounds: Vec<f64>,
    median: f64,
}

impl Rates {
    fn new(rounds: Vec<f64>) -> Self {
        let mut sorted = rounds.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => 0.0,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Rates { rounds, median }
    }
}

/// p50, p99 and the largest of some latencies, in microseconds.
struct Latency {
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

impl Latency {
    fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        // Nearest rank: the smallest sample with at least p of all samples at or below it.
        let rank = |p: f64| -> f64 {
            if samples.is_empty() {
                return 0.0;
            }
            let index = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[index].as_secs_f64() * 1e6
        };
        Latency {
            p50_us: rank(0.50),
            p99_us: rank(0.99),
            max_us: rank(1.0),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "p50_us": round1(self.p50_us),
            "p99_us": round1(self.p99_us),
            "max_us": round1(self.max_us),
        })
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

struct Report {
    /// The server's base URL, or the store's Redis URL.
    target: String,
    in_process: bool,
    store: bool,
    /// The trivial request of the baselines.
    trivial: &'static str,
    throughput: Option<ThroughputResult>,
    handoff: Option<HandoffResult>,
    saturation: Option<SaturationResult>,
}

impl Report {
    fn to_json(&self) -> Value {
        let mut out = json!({
            "mode": if self.store { "store" } else { "http" },
            "server": self.target,
            "in_process": self.in_process,
            "baseline": self.trivial,
        });
        if let Some(t) = &self.throughput {
            let rates = |r: &Rates| {
                json!({
                    "median": round1(r.median),
                    "rounds": r.rounds.iter().copied().map(round1).collect::<Vec<_>>(),
                })
            };
            out["clients"] = json!(t.clients);
            out["seconds_per_phase"] = json!(t.seconds);
            out["throughput"] = json!({
                "trivial_pairs_per_sec": rates(&t.trivial_pairs),
                "acquire_release_pairs_per_sec": rates(&t.floodgate_pairs),
                "ratio": round3(t.ratio()),
            });
            if !self.store {
                out["throughput"]["target_ratio"] = json!(TARGET_RATIO);
            }
        }
        if let Some(h) = &self.handoff {
            out["latency"] = json!({
                "handoffs": h.handoffs,
                "handoff": h.handoff.to_json(),
                "trivial_round_trip": h.trivial_rtt.to_json(),
                "release_round_trip": h.release_rtt.to_json(),
            });
        }
        if let Some(s) = &self.saturation {
            out["saturation"] = s.to_json();
        }
        out
    }

    fn to_text(&self) -> String {
        let mut out = String::new();
        if self.store {
            out.push_str(&format!(
                "store {} (the library's RedisStore in this process, no HTTP)\n",
                self.target
            ));
        } else {
            out.push_str(&format!(
                "server {}{}\n",
                self.target,
                if self.in_process { " (in-process)" } else { "" },
            ));
        }
        if let Some(t) = &self.throughput {
            self.throughput_text(t, &mut out);
        }
        if let Some(h) = &self.handoff {
            self.handoff_text(h, &mut out);
        }
        if let Some(s) = &self.saturation {
            saturation_text(s, &mut out);
        }
        out
    }

    fn throughput_text(&self, t: &ThroughputResult, out: &mut String) {
        let rounds = |r: &Rates| {
            r.rounds
                .iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "\nthroughput ({} clients, {} s per phase, {} rounds; pairs/s, median of rounds)\n",
            t.clients,
            t.seconds,
            t.trivial_pairs.rounds.len(),
        ));
        let trivial = format!("trivial pairs ({} x2)", self.trivial);
        out.push_str(&format!(
            "  {trivial:<32} {:>10.0}   [{}]\n",
            t.trivial_pairs.median,
            rounds(&t.trivial_pairs)
        ));
        out.push_str(&format!(
            "  acquire + release pairs          {:>10.0}   [{}]\n",
            t.floodgate_pairs.median,
            rounds(&t.floodgate_pairs)
        ));
        let ratio = t.ratio();
        if self.store {
            out.push_str(&format!(
                "  ratio                            {ratio:>10.3}\n"
            ));
        } else {
            let verdict = if ratio >= TARGET_RATIO {
                "meets"
            } else {
                "below"
            };
            out.push_str(&format!(
                "  ratio                            {ratio:>10.3}   ({verdict} the target {TARGET_RATIO})\n"
            ));
        }
    }

    fn handoff_text(&self, h: &HandoffResult, out: &mut String) {
        out.push_str(&format!(
            "\nlatency ({} handoffs, limit 1)             p50 us     p99 us\n",
            h.handoffs
        ));
        let trivial = format!("trivial round trip ({})", self.trivial);
        for (label, l) in [
            ("handoff (release sent -> waiter answered)", &h.handoff),
            (trivial.as_str(), &h.trivial_rtt),
            ("release round trip", &h.release_rtt),
        ] {
            out.push_str(&format!(
                "  {label:<41} {:>8.1} {:>10.1}\n",
                l.p50_us, l.p99_us
            ));
        }
    }
}

fn saturation_text(s: &SaturationResult, out: &mut String) {
    out.push_str(&format!(
        "\nsaturation ({} holders, limit {}, hold {} ms; {} s measured after {} s of warm-up)\n",
        s.holders,
        s.limit,
        s.hold.as_secs_f64() * 1e3,
        s.window.as_secs_f64(),
        s.warmup.as_secs_f64(),
    ));
    out.push_str(&format!(
        "  utilization (time held / (limit x time))  {:>8.1} %\n",
        s.utilization() * 100.0
    ));
    out.push_str(&format!(
        "  acquire + release pairs/s                 {:>8.0}     (limit / mean hold: {:.0}; mean hold {:.0} us)\n",
        s.pairs_per_sec(),
        s.ideal_pairs_per_sec(),
        s.mean_hold().as_secs_f64() * 1e6,
    ));
    out.push_str(&format!(
        "  idle time per grant (a permit between two holders) {:>8.1} us\n",
        s.idle_per_grant().as_secs_f64() * 1e6
    ));
    out.push_str(&format!(
        "  wait (acquire sent -> granted)    p50 us {:>10.1}   p99 us {:>10.1}   max us {:>10.1}\n",
        s.wait.p50_us, s.wait.p99_us, s.wait.max_us
    ));
    if let Some(cost) = &s.redis {
        out.push_str(&format!(
            "  redis: {:.1} commands and {:.2} script calls per grant; CPU {:.1} % of a core\n",
            cost.commands_per_grant,
            cost.scripts_per_grant,
            cost.cpu_share * 100.0
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let l = Latency::new(samples.into_iter().rev().collect());
        assert!((l.p50_us - 50.0).abs() < 1e-6);
        assert!((l.p99_us - 99.0).abs() < 1e-6);
        let one = Latency::new(vec![Duration::from_micros(7)]);
        assert!((one.p50_us - 7.0).abs() < 1e-6 && (one.p99_us - 7.0).abs() < 1e-6);
        assert!((l.max_us - 100.0).abs() < 1e-6);
        let none = Latency::new(Vec::new());
        assert!(none.p50_us == 0.0 && none.p99_us == 0.0 && none.max_us == 0.0);
    }

    #[test]
    fn median_of_rounds() {
        assert!((Rates::new(vec![3.0, 1.0, 2.0]).median - 2.0).abs() < 1e-9);
        assert!((Rates::new(vec![4.0, 1.0]).median - 2.5).abs() < 1e-9);
    }

    #[test]
    fn redis_counters_from_info() {
        let info = "# Stats\r\ntotal_commands_processed:1234\r\n# CPU\r\nused_cpu_sys:1.5\r\n\
                    used_cpu_user:2.25\r\nused_cpu_sys_children:9.0\r\n# Commandstats\r\n\
                    cmdstat_evalsha:calls=10,usec=50,usec_per_call=5.00\r\n\
                    cmdstat_eval:calls=2,usec=10,usec_per_call=5.00\r\n\
                    cmdstat_zrem:calls=7,usec=7,usec_per_call=1.00\r\n";
        let c = RedisCounters::parse(info);
        assert_eq!(c.commands, 1234);
        assert_eq!(c.scripts, 12);
        assert!((c.cpu - 3.75).abs() < 1e-9, "{c:?}");
    }

    #[test]
    fn utilization_is_time_held_over_limit_times_window() {
        let s = SaturationResult {
            holders: 16,
            limit: 4,
            hold: Duration::from_millis(5),
            warmup: Duration::ZERO,
            window: Duration::from_secs(2),
            busy: Duration::from_secs(6),
            grants: 1000,
            held: Duration::from_secs(5),
            wait: Latency::new(Vec::new()),
            redis: None,
        };
        assert!((s.utilization() - 0.75).abs() < 1e-9);
        assert!((s.pairs_per_sec() - 500.0).abs() < 1e-9);
        assert_eq!(s.mean_hold(), Duration::from_millis(5));
        assert!((s.ideal_pairs_per_sec() - 800.0).abs() < 1e-6);
        // 8 s of capacity, 6 s busy: 2 s idle over 1000 grants.
        assert_eq!(s.idle_per_grant(), Duration::from_millis(2));
    }

    fn args(url: &str) -> BenchArgs {
        BenchArgs {
            url: Some(url.to_owned()),
            store: None,
            token: Some("secret".into()),
            workloads: vec![
                Workload::Throughput,
                Workload::Handoff,
                Workload::Saturation,
            ],
            clients: 3,
            seconds: 0.05,
            handoffs: 5,
            rounds: 2,
            holders: 6,
            limit: 2,
            hold: Duration::from_millis(2),
            saturation_seconds: 0.2,
            json: true,
        }
    }

    #[test]
    fn a_backlog_is_required() {
        let mut a = args("http://127.0.0.1:1");
        a.holders = 2;
        assert!(a.validate().is_err());
        a.workloads = vec![Workload::Throughput];
        assert!(a.validate().is_ok());
    }

    /// A tiny run against the in-process server: every workload completes and the bench's
    /// limiters are gone afterwards. No assertion on any timing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_run_completes_and_cleans_up() -> Result<(), String> {
        let server = LocalServer::start(Some("secret".into()))
            .await
            .map_err(|f| f.message)?;
        let args = args(&server.base);
        let target = Target::open(&args).await.map_err(|f| f.message)?;
        let names = Names::new("bench-test");
        let report = measure(&args, &target, &names)
            .await
            .map_err(|f| f.message)?;
        let throughput = report.throughput.as_ref().ok_or("no throughput")?;
        assert_eq!(throughput.trivial_pairs.rounds.len(), 2);
        assert_eq!(throughput.floodgate_pairs.rounds.len(), 2);
        assert!(throughput.trivial_pairs.median > 0.0 && throughput.floodgate_pairs.median > 0.0);
        let handoff = report.handoff.as_ref().ok_or("no handoff")?;
        assert!(handoff.handoff.p50_us > 0.0 && handoff.trivial_rtt.p50_us > 0.0);
        let saturation = report.saturation.as_ref().ok_or("no saturation")?;
        assert!(saturation.grants > 0);
        assert!(saturation.utilization() > 0.0 && saturation.utilization() <= 1.0);
        let json = report.to_json();
        assert!(json["throughput"]["ratio"].is_number());
        assert!(json["saturation"]["utilization"].is_number());
        let text = report.to_text();
        assert!(text.contains("ratio") && text.contains("utilization"));
        let Target::Http { control, .. } = &target else {
            return Err("not HTTP".into());
        };
        // Every permit was released: the limiters are idle.
        for name in names.all() {
            let status = control.limiter(name).await.map_err(|e| e.to_string())?;
            assert_eq!(status["in_use"], 0, "{status}");
            assert_eq!(status["waiting"], 0, "{status}");
        }
        target.delete_all(&names).await.map_err(|f| f.message)?;
        for name in names.all() {
            assert!(control.limiter(name).await.is_err(), "{name} still exists");
        }
        target.close().await;
        server.stop().await;
        Ok(())
    }
}
