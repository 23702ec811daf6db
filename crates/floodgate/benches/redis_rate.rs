//! A rate-limited acquire on Floodgate's Redis store against a trivial script, in one run on
//! one Redis.
//!
//! Starts its own `redis-server` on a free loopback port (killed at the end) unless `REDIS_URL`
//! is set, as `benches/redis.rs` does. Phases alternate (return1, incr, floodgate, ...) to
//! spread drift. Contenders, each one call per operation:
//!
//! - `return1`: EVALSHA of `return 1` (no key), on a `ConnectionManager` configured like the
//!   store's: the round-trip floor of a script call.
//! - `incr`: EVALSHA of `return redis.call('INCR', KEYS[1])`: a one-key script.
//! - `floodgate`: a rate-only limiter (1,000,000 per second, burst 1,000,000, so every call is
//!   granted), `acquire(AcquireOptions::new().wait(Duration::ZERO))`, the permit then dropped
//!   as a caller would. Note: dropping a rate-only permit still spawns a background release
//!   (a second EVALSHA that finds nothing held); the server statistics show it.
//! - `fg-detach`: the same acquire, the permit `detach`ed (no background release).
//! - `fg-refused`: a rate-only limiter that is exhausted (1 per 24 h, its token taken), so
//!   each try-once acquire returns `WaitTimeout`.
//!
//! Sequentially on one task (latency: mean, p50, p99; ops/s), then with `FG_TASKS` tasks at
//! once (throughput over the multiplexed connection). On its own server (or with
//! `FG_STATS=1`), each sequential phase runs between `CONFIG RESETSTAT` and `INFO
//! commandstats`, to show EVALSHA calls per operation and the server's time per EVALSHA.
//!
//! Run: `cargo bench -p floodgate --bench redis_rate`. Without `--bench` it runs a short smoke
//! pass. Knobs (env): `REDIS_URL`; `FG_OPS` (sequential operations per phase, default 20000);
//! `FG_ROUNDS` (alternations, 3); `FG_TASKS` (16); `FG_STATS`.

#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    reason = "a benchmark binary: it reports on stdout, and any failure should abort the run"
)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use floodgate::{
    AcquireOptions, Floodgate, Limiter, LimiterSpec, RateSpec, RedisConfig, RedisLimiter,
    RedisStore,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};

type RLimiter = Limiter<RedisLimiter>;

// ---------------------------------------------------------------------------------------------
// The server (as in `benches/redis.rs`).

/// A `redis-server` this run started; killed on drop.
struct OwnServer {
    child: Child,
    dir: PathBuf,
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ping(port: u16) -> bool {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "ping"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
        .unwrap_or(false)
}

/// `REDIS_URL`, or a fresh `redis-server` on a free loopback port (no persistence).
fn redis_url() -> (String, Option<OwnServer>) {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return (url, None);
    }
    let port = free_port();
    let dir = std::env::temp_dir().join(format!(
        "floodgate-rate-bench-{}-{port}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed, or REDIS_URL set");
    let server = OwnServer { child, dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ping(port) {
        assert!(
            Instant::now() < deadline,
            "redis-server on {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (format!("redis://127.0.0.1:{port}/"), Some(server))
}

/// A connection configured like the store's own (see `RedisStore::connect`).
async fn manager(url: &str) -> ConnectionManager {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    redis::Client::open(url)
        .unwrap()
        .get_connection_manager_with_config(config)
        .await
        .unwrap()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// Statistics.

/// Latencies in nanoseconds.
#[derive(Default, Clone)]
struct Samples(Vec<u64>);

impl Samples {
    fn push(&mut self, d: Duration) {
        self.0.push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    fn extend(&mut self, other: &Samples) {
        self.0.extend_from_slice(&other.0);
    }

    fn summary(&self) -> Summary {
        let mut v = self.0.clone();
        v.sort_unstable();
        let at = |q: usize| {
            v.get((v.len() * q / 100).min(v.len().saturating_sub(1)))
                .map_or(0.0, |&ns| ns as f64 / 1000.0)
        };
        let mean = if v.is_empty() {
            0.0
        } else {
            v.iter().map(|&ns| ns as f64).sum::<f64>() / v.len() as f64 / 1000.0
        };
        Summary {
            mean,
            p50: at(50),
            p99: at(99),
            n: v.len(),
        }
    }
}

/// Microseconds.
#[derive(Clone, Copy)]
struct Summary {
    mean: f64,
    p50: f64,
    p99: f64,
    n: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mean {:6.1} us  p50 {:6.1} us  p99 {:7.1} us  (n={})",
            self.mean, self.p50, self.p99, self.n
        )
    }
}

/// What one contender's phases measured, summed over its rounds.
#[derive(Default, Clone)]
struct Tally {
    lat: Samples,
    ops: u64,
    wall: Duration,
    /// Rates of each round, ops/s.
    rates: Vec<f64>,
    /// `INFO commandstats`: command -> (calls, usec).
    stats: BTreeMap<String, (u64, u64)>,
}

impl Tally {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.wall.as_secs_f64()
    }

    fn rates(&self) -> String {
        let r: Vec<String> = self.rates.iter().map(|r| format!("{r:.0}")).collect();
        r.join(", ")
    }

    fn record_round(&mut self, n: usize, wall: Duration) {
        self.ops += n as u64;
        self.wall += wall;
        self.rates.push(n as f64 / wall.as_secs_f64());
    }
}

struct Stats {
    conn: Option<MultiplexedConnection>,
}

impl Stats {
    async fn reset(&mut self) {
        if let Some(conn) = &mut self.conn {
            redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async::<()>(conn)
                .await
                .unwrap();
        }
    }

    async fn collect(&mut self, into: &mut BTreeMap<String, (u64, u64)>) {
        let Some(conn) = &mut self.conn else { return };
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(conn)
            .await
            .unwrap();
        for line in info.lines() {
            let Some((name, rest)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            if name.starts_with("config") || name == "info" {
                continue;
            }
            let mut calls = 0;
            let mut usec = 0;
            for kv in rest.split(',') {
                match kv.split_once('=') {
                    Some(("calls", v)) => calls = v.parse().unwrap_or(0),
                    Some(("usec", v)) => usec = v.parse().unwrap_or(0),
                    _ => {}
                }
            }
            let e = into.entry(name.to_owned()).or_default();
            e.0 += calls;
            e.1 += usec;
        }
    }
}

/// EVALSHA calls per operation and the server's time per EVALSHA, then the commands each
/// EVALSHA ran.
fn print_stats(label: &str, tally: &Tally) {
    let Some(&(evals, eval_usec)) = tally.stats.get("evalsha") else {
        return;
    };
    if evals == 0 || tally.ops == 0 {
        return;
    }
    let mut inner: Vec<(&String, &(u64, u64))> = tally
        .stats
        .iter()
        .filter(|(name, _)| name.as_str() != "evalsha")
        .collect();
    inner.sort_by_key(|e| std::cmp::Reverse(e.1 .1));
    let parts: Vec<String> = inner
        .iter()
        .map(|(name, &(calls, _))| format!("{name} x{:.2}", calls as f64 / evals as f64))
        .collect();
    println!(
        "  {label:<10} server: {:.2} EVALSHA/op, {:5.2} us/EVALSHA; per EVALSHA: {}",
        evals as f64 / tally.ops as f64,
        eval_usec as f64 / evals as f64,
        if parts.is_empty() {
            "-".to_owned()
        } else {
            parts.join(", ")
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Contenders.

#[derive(Clone)]
enum Contender {
    /// EVALSHA of `return 1`.
    Return1 {
        conn: ConnectionManager,
        script: Arc<redis::Script>,
    },
    /// EVALSHA of a one-key INCR.
    Incr {
        conn: ConnectionManager,
        script: Arc<redis::Script>,
    },
    /// Try-once acquire on a rate-only limiter; the permit dropped (or detached).
    Floodgate { limiter: RLimiter, detach: bool },
    /// Try-once acquire on an exhausted rate-only limiter: always `WaitTimeout`.
    Refused(RLimiter),
}

impl Contender {
    fn label(&self) -> &'static str {
        match self {
            Contender::Return1 { .. } => "return1",
            Contender::Incr { .. } => "incr",
            Contender::Floodgate { detach: false, .. } => "floodgate",
            Contender::Floodgate { detach: true, .. } => "fg-detach",
            Contender::Refused(_) => "fg-refused",
        }
    }

    /// One operation. Panics on an unexpected outcome (a refusal from the high quota, a grant
    /// from the exhausted one, a store error).
    async fn once(&self) {
        match self {
            Contender::Return1 { conn, script } => {
                let one: i64 = script.invoke_async(&mut conn.clone()).await.unwrap();
                assert_eq!(one, 1);
            }
            Contender::Incr { conn, script } => {
                let _: i64 = script
                    .key("bench:rate:incr")
                    .invoke_async(&mut conn.clone())
                    .await
                    .unwrap();
            }
            Contender::Floodgate { limiter, detach } => {
                let permit = limiter
                    .acquire(AcquireOptions::new().wait(Duration::ZERO))
                    .await
                    .unwrap();
                if *detach {
                    let _ = permit.detach();
                } else {
                    drop(permit);
                }
            }
            Contender::Refused(limiter) => {
                let err = limiter
                    .acquire(AcquireOptions::new().wait(Duration::ZERO))
                    .await
                    .err()
                    .unwrap();
                assert!(err.is_wait_timeout(), "{err}");
            }
        }
    }
}

/// `n` operations one after another on this task.
async fn sequential(c: &Contender, n: usize, tally: &mut Tally) {
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        c.once().await;
        tally.lat.push(t.elapsed());
    }
    tally.record_round(n, start.elapsed());
}

/// `tasks` tasks doing `per_task` operations each, all at once.
async fn concurrent(c: &Contender, tasks: usize, per_task: usize, tally: &mut Tally) {
    let gate = Arc::new(tokio::sync::Barrier::new(tasks + 1));
    let mut handles = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let c = c.clone();
        let gate = Arc::clone(&gate);
        handles.push(tokio::spawn(async move {
            let mut lat = Samples::default();
            gate.wait().await;
            for _ in 0..per_task {
                let t = Instant::now();
                c.once().await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    gate.wait().await;
    let start = Instant::now();
    for h in handles {
        tally.lat.extend(&h.await.unwrap());
    }
    tally.record_round(tasks * per_task, start.elapsed());
}

/// Lets the background releases of dropped permits finish, so they do not spill into the
/// next phase.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

// ---------------------------------------------------------------------------------------------
// The run.

struct Config {
    ops: usize,
    rounds: usize,
    tasks: usize,
}

async fn run(url: &str, config: &Config, mut stats: Stats) {
    let gate = Floodgate::with_store(RedisStore::connect(RedisConfig::new(url)).await.unwrap());
    let high =
        LimiterSpec::rate(RateSpec::per(1_000_000, Duration::from_secs(1)).with_burst(1_000_000));
    gate.define("rate", high).await.unwrap();
    let day = Duration::from_secs(24 * 3600);
    gate.define("rate-refused", LimiterSpec::rate(RateSpec::per(1, day)))
        .await
        .unwrap();
    let refused = gate.limiter("rate-refused").await.unwrap();
    // Take the day's one token.
    let _ = refused
        .acquire(AcquireOptions::new().wait(Duration::ZERO))
        .await
        .map(|p| p.detach());

    let limiter = gate.limiter("rate").await.unwrap();
    let contenders = vec![
        Contender::Return1 {
            conn: manager(url).await,
            script: Arc::new(redis::Script::new("return 1")),
        },
        Contender::Incr {
            conn: manager(url).await,
            script: Arc::new(redis::Script::new("return redis.call('INCR', KEYS[1])")),
        },
        Contender::Floodgate {
            limiter: limiter.clone(),
            detach: false,
        },
        Contender::Floodgate {
            limiter,
            detach: true,
        },
        Contender::Refused(refused),
    ];

    // Warm up: scripts loaded, connections and allocator warm.
    for c in &contenders {
        sequential(c, config.ops / 10 + 10, &mut Tally::default()).await;
        settle().await;
    }

    let mut seq: Vec<Tally> = vec![Tally::default(); contenders.len()];
    for _ in 0..config.rounds {
        for (c, tally) in contenders.iter().zip(seq.iter_mut()) {
            stats.reset().await;
            sequential(c, config.ops, tally).await;
            settle().await;
            stats.collect(&mut tally.stats).await;
        }
    }
    let per_task = (config.ops / config.tasks).max(1);
    let mut conc: Vec<Tally> = vec![Tally::default(); contenders.len()];
    for _ in 0..config.rounds {
        for (c, tally) in contenders.iter().zip(conc.iter_mut()) {
            concurrent(c, config.tasks, per_task, tally).await;
            settle().await;
        }
    }

    println!();
    println!(
        "== sequential: one operation at a time on one task ({} rounds x {} ops, alternating)",
        config.rounds, config.ops
    );
    for (c, t) in contenders.iter().zip(&seq) {
        println!(
            "  {:<10} {}  {:7.0} ops/s  (rounds: {})",
            c.label(),
            t.lat.summary(),
            t.rate(),
            t.rates()
        );
    }
    let s: Vec<Summary> = seq.iter().map(|t| t.lat.summary()).collect();
    let (ret1, incr) = (s[0], s[1]);
    for (i, label) in [(2, "floodgate"), (3, "fg-detach"), (4, "fg-refused")] {
        println!(
            "  ratio {label:<10}/return1: mean {:.2}x  p50 {:.2}x  p99 {:.2}x;  /incr: mean {:.2}x  p50 {:.2}x  p99 {:.2}x",
            s[i].mean / ret1.mean,
            s[i].p50 / ret1.p50,
            s[i].p99 / ret1.p99,
            s[i].mean / incr.mean,
            s[i].p50 / incr.p50,
            s[i].p99 / incr.p99
        );
    }
    for (c, t) in contenders.iter().zip(&seq) {
        print_stats(c.label(), t);
    }

    println!();
    println!(
        "== concurrent: {} tasks at once ({} rounds x {} ops per task)",
        config.tasks, config.rounds, per_task
    );
    for (c, t) in contenders.iter().zip(&conc) {
        println!(
            "  {:<10} {:7.0} ops/s  {}  (rounds: {})",
            c.label(),
            t.rate(),
            t.lat.summary(),
            t.rates()
        );
    }
    for (i, label) in [(2, "floodgate"), (3, "fg-detach"), (4, "fg-refused")] {
        println!(
            "  ratio {label:<10}/return1: throughput {:.2}x slower;  /incr: {:.2}x slower",
            conc[0].rate() / conc[i].rate(),
            conc[1].rate() / conc[i].rate()
        );
    }
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let config = Config {
        ops: env_usize("FG_OPS", if bench { 20_000 } else { 200 }).max(1),
        rounds: env_usize("FG_ROUNDS", 3).max(1),
        tasks: env_usize("FG_TASKS", 16).max(1),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (url, server) = redis_url();
    let want_stats = server.is_some() || std::env::var("FG_STATS").is_ok_and(|v| v == "1");
    println!(
        "floodgate redis rate bench: {url} ({}), current-thread runtime, {} cores, load average before: {}",
        if server.is_some() {
            "own redis-server"
        } else {
            "REDIS_URL"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    rt.block_on(async {
        let conn = if want_stats {
            Some(
                redis::Client::open(url.as_str())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap(),
            )
        } else {
            None
        };
        run(&url, &config, Stats { conn }).await;
    });
    println!();
    println!("load average after: {}", load_average());
    drop(rt);
    drop(server);
}
