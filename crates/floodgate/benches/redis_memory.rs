//! Redis memory under saturation at the longest wait (issue 13, must-show 5): outcomes are kept
//! only until their waiter has read them, so a saturated limiter's memory stays flat however
//! long its waits may be.
//!
//! Starts its own `redis-server` on a free loopback port (killed at the end) unless `REDIS_URL`
//! is set. One limiter (concurrency 8, lease 60 s, maximum wait 1 h: the longest allowed), N
//! holders (64) on one `RedisStore` looping acquire -> hold 5 ms -> release, for `FG_SECONDS`
//! (180). Every 10 s it reads Redis's `used_memory` split by part (`breakdown`: clients'
//! buffers, script cache, keyspace tables, the keys' `MEMORY USAGE`, slow-log entries, latency
//! histograms, the rest) and the sizes of the limiter's keys; at the end it prints the parts at
//! each minute, `used_memory` at the first minute against the end, the growth per minute after
//! it, and which part each byte of that growth is in. On its own server it also measures what
//! one latency histogram and one slow-log entry cost (`ECHO` before the load; `SLOWLOG RESET`
//! after it), so the split is checkable.
//!
//! Run: `cargo bench -p floodgate --features redis --bench redis_memory`. Knobs (env):
//! `REDIS_URL`, `FG_SECONDS`, `FG_HOLDERS` (64), `FG_LIMIT` (8), `FG_HOLD_MS` (5), and on its
//! own server `FG_SLOWLOG_US` (Redis's `slowlog-log-slower-than`, 10000 µs by default: 0 logs
//! every command, so the slow log reaches its cap at once).

#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    reason = "a benchmark binary: it reports on stdout, and any failure should abort the run"
)]

#[path = "redis_memory/breakdown.rs"]
mod breakdown;
mod harness;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use floodgate::{AcquireOptions, Floodgate, LimiterSpec, RedisConfig, RedisStore};
use harness::{env_usize, finish, load_average, BenchRedis};

/// The longest wait a limiter may have (`spec::MAX_WAIT`): what the run is about.
const MAX_WAIT: Duration = Duration::from_secs(3_600);

/// Sizes of the limiter's outcome-bearing keys: holders hash fields, outcomes hash fields,
/// queue length.
async fn sizes(conn: &mut redis::aio::MultiplexedConnection) -> (u64, u64, u64) {
    let (h, o, q): (u64, u64, u64) = redis::pipe()
        .cmd("HLEN")
        .arg("fg:{mem}:holders")
        .cmd("HLEN")
        .arg("fg:{mem}:outcomes")
        .cmd("ZCARD")
        .arg("fg:{mem}:queue")
        .query_async(conn)
        .await
        .unwrap();
    (h, o, q)
}

fn main() {
    let seconds = env_usize("FG_SECONDS", 180);
    let holders = env_usize("FG_HOLDERS", 64);
    let limit = env_usize("FG_LIMIT", 8);
    let hold = Duration::from_millis(env_usize("FG_HOLD_MS", 5) as u64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let redis = BenchRedis::start();
    // The unit costs are measured on the run's own server only (one reading resets its slow log).
    let own = std::env::var("REDIS_URL").is_err();
    println!(
        "redis_memory: {holders} holders, limit {limit}, hold {hold:?}, max wait {MAX_WAIT:?}, {seconds} s, on {} ({}); load {}",
        redis.url,
        redis.origin(),
        load_average()
    );
    rt.block_on(async {
        let store = RedisStore::connect(RedisConfig::new(&redis.url))
            .await
            .unwrap();
        let gate = Floodgate::with_store(store);
        let spec = LimiterSpec::concurrency(u32::try_from(limit).unwrap())
            .with_default_lease(Duration::from_secs(60))
            .with_max_wait(MAX_WAIT);
        gate.define("mem", spec).await.unwrap();
        let limiter = gate.limiter("mem").await.unwrap();
        let mut conn = redis::Client::open(redis.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        // One reading before the load gives every command the readings use its latency
        // histogram, so later readings add none; then one histogram's bytes, measured.
        let slowlog_cap = breakdown::config_number(&mut conn, "slowlog-max-len").await;
        let _ = breakdown::sample(&mut conn, 0, 0).await;
        let _ = sizes(&mut conn).await;
        let mut units = breakdown::Units {
            histogram: if own { breakdown::histogram_bytes(&mut conn).await } else { 0 },
            slowlog_entry: 0,
            slowlog_cap,
        };
        if own {
            if let Ok(us) = std::env::var("FG_SLOWLOG_US") {
                // A control: log more commands (0: every one), so the slow log fills to its
                // cap early and the run shows it stops there. (After the histogram's
                // measurement, which a slow-log entry of its own would inflate.)
                let () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("slowlog-log-slower-than")
                    .arg(us)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let grants = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..holders {
            let (limiter, stop, grants) = (limiter.clone(), stop.clone(), grants.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    // The limiter's own wait: the maximum.
                    let permit = limiter.acquire(AcquireOptions::new()).await.unwrap();
                    grants.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(hold).await;
                    permit.release().await.unwrap();
                }
            }));
        }
        let start = Instant::now();
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.tick().await;
        while start.elapsed() < Duration::from_secs(seconds as u64) {
            tick.tick().await;
            // Whole seconds rounded, so the readings land on 10, 20, ... despite a late tick.
            let t = (start.elapsed().as_millis() as u64 + 500) / 1000;
            let s = breakdown::sample(&mut conn, t, grants.load(Ordering::Relaxed)).await;
            let (h, o, q) = sizes(&mut conn).await;
            println!(
                "t={t:4} s  grants {:8}  used_memory {:9} B (client buffers {:6} B, keys {:6} B, slow log {:3}, histograms {:3})  holders-hash fields {h:4}  outcomes {o:3}  queued {q:3}",
                s.grants, s.used, s.clients, s.keys, s.slowlog, s.histograms
            );
            samples.push(s);
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        if own {
            units.slowlog_entry = breakdown::slowlog_entry_bytes(&mut conn, units.histogram)
                .await
                .unwrap_or(0);
        }
        breakdown::report(&samples, units);
    });
    finish(rt, redis);
}
