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
//!   as a caller would. A rate-only permit holds nothing, so its drop sends nothing: one
//!   EVALSHA per operation (the server statistics show it).
//! - `fg-detach`: the same acquire, the permit `detach`ed: the same call, kept beside
//!   `floodgate` to show that dropping and detaching cost the same.
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

mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use floodgate::{
    AcquireOptions, Floodgate, Limiter, LimiterSpec, RateSpec, RedisConfig, RedisLimiter,
    RedisStore,
};
use harness::{
    concurrent, cores, env_usize, finish, load_average, manager, BenchRedis, Operation, Stats,
    Summary, Tally,
};
use redis::aio::ConnectionManager;

type RLimiter = Limiter<RedisLimiter>;

// ---------------------------------------------------------------------------------------------
// Statistics.

/// This bench's format of a summary.
impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mean {:6.1} us  p50 {:6.1} us  p99 {:7.1} us  (n={})",
            self.mean, self.p50, self.p99, self.n
        )
    }
}

/// EVALSHA calls per operation and the server's time per EVALSHA, then the commands each
/// EVALSHA ran.
fn print_stats(label: &str, tally: &Tally) {
    let Some(evalsha) = tally.evalsha() else {
        return;
    };
    if tally.ops == 0 {
        return;
    }
    let (evals, eval_usec) = (evalsha.calls, evalsha.usec);
    let parts: Vec<String> = evalsha
        .inner
        .iter()
        .map(|&(name, calls, _)| format!("{name} x{:.2}", calls as f64 / evals as f64))
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
}

impl Operation for Contender {
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
        tally.whole.push(t.elapsed());
    }
    tally.record_round(n, start.elapsed());
}

/// Lets anything a phase left in flight finish, so it does not spill into the next phase.
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
            t.whole.summary(),
            t.rate(),
            t.rates()
        );
    }
    let s: Vec<Summary> = seq.iter().map(|t| t.whole.summary()).collect();
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
            t.whole.summary(),
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
    let redis = BenchRedis::start();
    println!(
        "floodgate redis rate bench: {} ({}), current-thread runtime, {} cores, load average before: {}",
        redis.url,
        redis.origin(),
        cores(),
        load_average()
    );
    rt.block_on(async { run(&redis.url, &config, redis.stats().await).await });
    finish(rt, redis);
}
