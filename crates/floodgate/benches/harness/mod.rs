//! What `benches/redis.rs` and `benches/redis_rate.rs` share: the Redis they run on, connections
//! configured like the store's, latency samples, per-contender tallies, the server's
//! `INFO commandstats`, and the concurrent phase.

#![allow(dead_code, reason = "each bench uses its own part of the harness")]

#[path = "../../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};

pub(crate) use support::RedisServer;

// ---------------------------------------------------------------------------------------------
// The server.

/// The Redis a bench runs on: `REDIS_URL`, or a fresh `redis-server` on a free loopback port (no
/// persistence), killed when this drops.
pub(crate) struct BenchRedis {
    pub(crate) url: String,
    server: Option<RedisServer>,
}

impl BenchRedis {
    pub(crate) fn start() -> BenchRedis {
        if let Ok(url) = std::env::var("REDIS_URL") {
            return BenchRedis { url, server: None };
        }
        let server = RedisServer::start();
        BenchRedis {
            url: server.url(),
            server: Some(server),
        }
    }

    /// Where it came from, for the bench's first line.
    pub(crate) fn origin(&self) -> &'static str {
        if self.server.is_some() {
            "own redis-server"
        } else {
            "REDIS_URL"
        }
    }

    /// Server-side statistics: on its own server, or with `FG_STATS=1`.
    pub(crate) async fn stats(&self) -> Stats {
        let on = self.server.is_some() || std::env::var("FG_STATS").is_ok_and(|v| v == "1");
        Stats::connect(&self.url, on).await
    }
}

/// Ends a run: prints the load average after it, then stops the runtime (and its connections)
/// before the server.
pub(crate) fn finish(rt: tokio::runtime::Runtime, redis: BenchRedis) {
    println!();
    println!("load average after: {}", load_average());
    drop(rt);
    drop(redis);
}

pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// A connection configured like the store's own (see `RedisStore::connect`).
pub(crate) async fn manager(url: &str) -> ConnectionManager {
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

pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub(crate) fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// Statistics.

/// Latencies in nanoseconds.
#[derive(Default, Clone)]
pub(crate) struct Samples(Vec<u64>);

impl Samples {
    pub(crate) fn push(&mut self, d: Duration) {
        self.0.push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub(crate) fn extend(&mut self, other: &Samples) {
        self.0.extend_from_slice(&other.0);
    }

    pub(crate) fn summary(&self) -> Summary {
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
            max: v.last().map_or(0.0, |&ns| ns as f64 / 1000.0),
            n: v.len(),
        }
    }
}

/// Microseconds. Each bench prints it its own way (its own `Display`).
#[derive(Clone, Copy)]
pub(crate) struct Summary {
    pub(crate) mean: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) n: usize,
}

/// Per contender: what one kind of phase measured, summed over its rounds.
#[derive(Default, Clone)]
pub(crate) struct Tally {
    /// Each operation (a call, a pair, a handoff), whole.
    pub(crate) whole: Samples,
    /// The first and second call of each pair (the sequential pairs of `benches/redis.rs`).
    pub(crate) first: Samples,
    pub(crate) second: Samples,
    pub(crate) ops: u64,
    pub(crate) wall: Duration,
    /// Rates of each round, ops/s.
    pub(crate) rates: Vec<f64>,
    /// `INFO commandstats`: command -> (calls, usec).
    pub(crate) stats: BTreeMap<String, (u64, u64)>,
}

impl Tally {
    pub(crate) fn rate(&self) -> f64 {
        self.ops as f64 / self.wall.as_secs_f64()
    }

    pub(crate) fn rates(&self) -> String {
        let r: Vec<String> = self.rates.iter().map(|r| format!("{r:.0}")).collect();
        r.join(", ")
    }

    /// Adds a round of `n` operations that took `wall`.
    pub(crate) fn record_round(&mut self, n: usize, wall: Duration) {
        self.ops += n as u64;
        self.wall += wall;
        self.rates.push(n as f64 / wall.as_secs_f64());
    }

    /// EVALSHA in `stats`; `None` without EVALSHA calls.
    pub(crate) fn evalsha(&self) -> Option<Evalsha<'_>> {
        let &(calls, usec) = self.stats.get("evalsha")?;
        if calls == 0 {
            return None;
        }
        let mut inner: Vec<(&str, u64, u64)> = self
            .stats
            .iter()
            .filter(|(name, _)| name.as_str() != "evalsha")
            .map(|(name, &(calls, usec))| (name.as_str(), calls, usec))
            .collect();
        inner.sort_by_key(|e| std::cmp::Reverse(e.2));
        Some(Evalsha { calls, usec, inner })
    }
}

/// EVALSHA in a tally's `stats`: its calls and server time, and the commands the scripts ran.
pub(crate) struct Evalsha<'a> {
    pub(crate) calls: u64,
    pub(crate) usec: u64,
    /// The other commands as (name, calls, usec), most time first.
    pub(crate) inner: Vec<(&'a str, u64, u64)>,
}

// ---------------------------------------------------------------------------------------------
// Server-side statistics.

/// `CONFIG RESETSTAT` and `INFO commandstats` on their own connection; off, they do nothing.
pub(crate) struct Stats {
    conn: Option<MultiplexedConnection>,
}

impl Stats {
    pub(crate) async fn connect(url: &str, on: bool) -> Stats {
        let conn = if on {
            Some(
                redis::Client::open(url)
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap(),
            )
        } else {
            None
        };
        Stats { conn }
    }

    pub(crate) async fn reset(&mut self) {
        if let Some(conn) = &mut self.conn {
            redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async::<()>(conn)
                .await
                .unwrap();
        }
    }

    pub(crate) async fn collect(&mut self, into: &mut BTreeMap<String, (u64, u64)>) {
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

// ---------------------------------------------------------------------------------------------
// The concurrent phase.

/// A contender: one operation (a call, a pair) at a time, cloned into each task of
/// [`concurrent`].
pub(crate) trait Operation: Clone + Send + Sync + 'static {
    fn once(&self) -> impl Future<Output = ()> + Send;
}

/// `tasks` tasks doing `per_task` operations each, all at once.
pub(crate) async fn concurrent<C: Operation>(
    c: &C,
    tasks: usize,
    per_task: usize,
    tally: &mut Tally,
) {
    let gate = Arc::new(tokio::sync::Barrier::new(tasks + 1));
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let c = c.clone();
            let gate = Arc::clone(&gate);
            tokio::spawn(async move {
                let mut s = Samples::default();
                gate.wait().await;
                for _ in 0..per_task {
                    let t = Instant::now();
                    c.once().await;
                    s.push(t.elapsed());
                }
                s
            })
        })
        .collect();
    gate.wait().await;
    let start = Instant::now();
    for h in handles {
        tally.whole.extend(&h.await.unwrap());
    }
    tally.record_round(tasks * per_task, start.elapsed());
}
