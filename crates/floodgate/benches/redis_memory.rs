//! Redis memory under saturation at the longest wait (issue 13, must-show 5): outcomes are kept
//! only until their waiter has read them, so a saturated limiter's memory stays flat however
//! long its waits may be.
//!
//! Starts its own `redis-server` on a free loopback port (killed at the end) unless `REDIS_URL`
//! is set. One limiter (concurrency 8, lease 60 s, maximum wait 1 h: the longest allowed), N
//! holders (64) on one `RedisStore` looping acquire -> hold 5 ms -> release, for `FG_SECONDS`
//! (180). Every 10 s it prints Redis's `used_memory`, the grants so far and the sizes of the
//! limiter's keys; at the end, `used_memory` at the first minute against the end, and the
//! growth per minute after it.
//!
//! Run: `cargo bench -p floodgate --features redis --bench redis_memory`. Knobs (env):
//! `REDIS_URL`, `FG_SECONDS`, `FG_HOLDERS` (64), `FG_LIMIT` (8), `FG_HOLD_MS` (5).

#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    reason = "a benchmark binary: it reports on stdout, and any failure should abort the run"
)]

mod harness;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use floodgate::{AcquireOptions, Floodgate, LimiterSpec, RedisConfig, RedisStore};
use harness::{env_usize, finish, load_average, BenchRedis};

/// The longest wait a limiter may have (`spec::MAX_WAIT`): what the run is about.
const MAX_WAIT: Duration = Duration::from_secs(3_600);

/// From `INFO memory`, in bytes: `used_memory`, and of it `used_memory_dataset` (the keys'
/// data) and `mem_clients_normal` (the clients' buffers), to tell a growth of the limiter's
/// data from Redis's own.
async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> (u64, u64, u64) {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .unwrap();
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (
        field("used_memory:"),
        field("used_memory_dataset:"),
        field("mem_clients_normal:"),
    )
}

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
        let mut at_minute = None;
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.tick().await;
        while start.elapsed() < Duration::from_secs(seconds as u64) {
            tick.tick().await;
            let t = start.elapsed().as_secs();
            let (used, dataset, clients) = used_memory(&mut conn).await;
            let (h, o, q) = sizes(&mut conn).await;
            let n = grants.load(Ordering::Relaxed);
            println!(
                "t={t:4} s  grants {n:8}  used_memory {used:9} B (dataset {dataset:7} B, client buffers {clients:7} B)  holders-hash fields {h:4}  outcomes {o:3}  queued {q:3}"
            );
            if t >= 60 && at_minute.is_none() {
                at_minute = Some((t, used, n));
            }
            samples.push((t, used, n));
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let (t_end, used_end, n_end) = *samples.last().unwrap();
        match at_minute {
            Some((t1, used1, n1)) if t_end > t1 => {
                let per_min = (used_end as f64 - used1 as f64) / ((t_end - t1) as f64 / 60.0);
                println!(
                    "\nused_memory at {t1} s: {used1} B; at {t_end} s: {used_end} B ({:+} B, {per_min:+.0} B per minute) over {} more grants ({:+.3} B per grant)",
                    used_end as i64 - used1 as i64,
                    n_end - n1,
                    (used_end as f64 - used1 as f64) / (n_end - n1).max(1) as f64
                );
            }
            _ => println!("\n(run longer than a minute to compare used_memory after the first minute)"),
        }
    });
    finish(rt, redis);
}
