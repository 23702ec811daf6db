//! Floodgate's Redis store against the Redis round-trip floor, in one run on one Redis.
//!
//! Starts its own `redis-server` on a free loopback port (killed at the end) unless `REDIS_URL`
//! is set. Phases alternate (baseline, floodgate, baseline, floodgate, ...) to spread drift.
//!
//! 1. `pair`: one acquire + release (limit 1000, so never queued) against the floor of two
//!    EVALSHA of a one-key script (`INCR`) on a `ConnectionManager` configured like the store's:
//!    mean, p50, p99 and pairs/s, sequentially on one task and with `FG_TASKS` tasks. A third
//!    contender, `raw`, runs the limiter script itself (`lua/`, same keys and arguments)
//!    without floodgate's client code, which splits the gap into script cost and client cost
//!    (it steps aside if the script's protocol has moved on). Target: floodgate within 1.3x of
//!    the baseline.
//! 2. `handoff`: limit 1; A holds the permit, B waits in acquire through a second store (another
//!    connection and subscriber, as on another server). From just before A's release to the
//!    moment B's acquire returns, against the floor of one EVALSHA of a script that PUBLISHes
//!    to a subscriber on another connection (and beside a single EVALSHA round trip).
//!
//! On its own server (or with `FG_STATS=1`), each phase runs between `CONFIG RESETSTAT` and
//! `INFO commandstats`, to show the server's time per EVALSHA and the commands each runs (for
//! the handoff, that includes the setup calls outside the measured window: acquires, status).
//!
//! Run: `cargo bench -p floodgate --bench redis`. Without `--bench` (`cargo test --benches`) it
//! runs a short smoke pass. Knobs (env): `REDIS_URL`; `FG_PAIRS` (sequential pairs per phase,
//! default 20000); `FG_ROUNDS` (baseline/floodgate alternations, 2); `FG_TASKS` (16);
//! `FG_HANDOFFS` (per phase, 1000); `FG_THREADS` (0, the default: a current-thread runtime;
//! n: a multi-thread runtime with n workers); `FG_STATS`; `FG_RAW_SCRIPT` (a variant of
//! a whole script for the `raw` contender, to measure a proposed change to the script).

#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    reason = "a benchmark binary: it reports on stdout, and any failure should abort the run"
)]

mod harness;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use floodgate::RedisStore;
use floodgate::{AcquireOptions, Floodgate, Limiter, LimiterSpec, RedisConfig, RedisLimiter};
use futures_util::StreamExt;
use harness::{
    concurrent, cores, env_usize, finish, load_average, manager, BenchRedis, Operation, Samples,
    Stats, Summary, Tally,
};
use redis::aio::ConnectionManager;
use tokio::sync::oneshot;

type RLimiter = Limiter<RedisLimiter>;

/// The key prefix of the store (`RedisConfig::new`'s default).
const PREFIX: &str = "fg";
/// The idle TTL the store passes to the script: `RedisConfig::new`'s 7 days, in ms.
const TTL_MS: u64 = 7 * 24 * 3600 * 1000;

// ---------------------------------------------------------------------------------------------
// Statistics.

/// This bench's format of a summary.
impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mean {:7.1} us  p50 {:7.1} us  p99 {:7.1} us  max {:7.0} us  (n={})",
            self.mean, self.p50, self.p99, self.max, self.n
        )
    }
}

fn print_stats(label: &str, tally: &Tally) {
    let Some(evalsha) = tally.evalsha() else {
        return;
    };
    let (evals, eval_usec) = (evalsha.calls, evalsha.usec);
    println!(
        "  {label:<10} server: evalsha {:.2} us/call ({} calls); per EVALSHA:",
        eval_usec as f64 / evals as f64,
        evals
    );
    let parts: Vec<String> = evalsha
        .inner
        .iter()
        .map(|&(name, calls, usec)| {
            format!(
                "{name} x{:.2} ({:.2} us)",
                calls as f64 / evals as f64,
                usec as f64 / evals as f64
            )
        })
        .collect();
    for chunk in parts.chunks(5) {
        println!("               {}", chunk.join(", "));
    }
}

// ---------------------------------------------------------------------------------------------
// Pair contenders.

/// The floor: a script that touches one key, as `redis::Script` over a `ConnectionManager`.
const FLOOR_LUA: &str = "return redis.call('INCR', KEYS[1])";

#[derive(Clone)]
enum Contender {
    /// Two EVALSHA of `FLOOR_LUA`.
    Baseline {
        conn: ConnectionManager,
        script: Arc<redis::Script>,
    },
    /// Two EVALSHA of the limiter script itself (acquire, release), called as the store calls it.
    Raw {
        conn: ConnectionManager,
        script: Arc<redis::Script>,
        keys: Arc<[String; 11]>,
        next: Arc<AtomicU64>,
    },
    /// `acquire` + `release` through the API.
    Floodgate(RLimiter),
}

impl Contender {
    fn label(&self) -> &'static str {
        match self {
            Contender::Baseline { .. } => "baseline",
            Contender::Raw { .. } => "raw-script",
            Contender::Floodgate(_) => "floodgate",
        }
    }

    /// One pair: the time of its first and of its second call.
    async fn pair(&self) -> (Duration, Duration) {
        match self {
            Contender::Baseline { conn, script } => {
                let t0 = Instant::now();
                let _: i64 = script
                    .key("bench:floor")
                    .invoke_async(&mut conn.clone())
                    .await
                    .unwrap();
                let t1 = Instant::now();
                let _: i64 = script
                    .key("bench:floor")
                    .invoke_async(&mut conn.clone())
                    .await
                    .unwrap();
                (t1 - t0, t1.elapsed())
            }
            Contender::Raw { .. } => self.raw_pair().await.unwrap(),
            Contender::Floodgate(limiter) => {
                let t0 = Instant::now();
                let permit = limiter.acquire(AcquireOptions::new()).await.unwrap();
                let t1 = Instant::now();
                assert!(permit.release().await.unwrap());
                (t1 - t0, t1.elapsed())
            }
        }
    }
}

impl Contender {
    /// A pair of the `raw` contender: the script called as `RedisLimiter::call` calls it (same
    /// keys and arguments; see `limiter.rs`). An error if the script's protocol has moved on.
    async fn raw_pair(&self) -> Result<(Duration, Duration), String> {
        let Contender::Raw {
            conn,
            script,
            keys,
            next,
        } = self
        else {
            return Err("not the raw contender".into());
        };
        let t0 = Instant::now();
        let n = next.fetch_add(1, Ordering::Relaxed);
        let mut inv = script.prepare_invoke();
        for k in keys.iter() {
            inv.key(k);
        }
        inv.arg("acquire")
            .arg("raw")
            .arg(TTL_MS)
            .arg("1")
            .arg("")
            .arg("")
            .arg(format!("bench-raw.{n}"))
            .arg("fg:wake:bench-raw");
        let reply: Vec<String> = inv
            .invoke_async(&mut conn.clone())
            .await
            .map_err(|e| format!("acquire: {e}"))?;
        if reply.first().map(String::as_str) != Some("granted") || reply.len() < 2 {
            return Err(format!("acquire replied {reply:?}"));
        }
        let t1 = Instant::now();
        let mut inv = script.prepare_invoke();
        for k in keys.iter() {
            inv.key(k);
        }
        inv.arg("release").arg("raw").arg(TTL_MS).arg(&reply[1]);
        let reply: Vec<String> = inv
            .invoke_async(&mut conn.clone())
            .await
            .map_err(|e| format!("release: {e}"))?;
        if reply.get(..2) != Some(&["released".to_owned(), "1".to_owned()][..]) {
            return Err(format!("release replied {reply:?}"));
        }
        Ok((t1 - t0, t1.elapsed()))
    }
}

impl Operation for Contender {
    async fn once(&self) {
        self.pair().await;
    }
}

/// `n` pairs one after another on this task.
async fn sequential(c: &Contender, n: usize, tally: &mut Tally) {
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let (a, b) = c.pair().await;
        tally.whole.push(t.elapsed());
        tally.first.push(a);
        tally.second.push(b);
    }
    tally.record_round(n, start.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Handoff.

/// One floodgate handoff: A (store 1) holds the only permit, B (store 2) is queued behind it.
async fn floodgate_handoff(a: &RLimiter, b: &RLimiter) -> Duration {
    let held = a.acquire(AcquireOptions::new()).await.unwrap();
    let b = b.clone();
    let waiter = tokio::spawn(async move {
        let permit = b.acquire(AcquireOptions::new()).await.unwrap();
        (Instant::now(), permit)
    });
    // Outside the measured window: wait until B is in the queue.
    while a.status().await.unwrap().waiting == 0 {
        tokio::task::yield_now().await;
    }
    let released_at = Instant::now();
    let (released, waited) = tokio::join!(held.release(), waiter);
    let (acquired_at, permit) = waited.unwrap();
    assert!(released.unwrap());
    assert!(permit.release().await.unwrap());
    acquired_at - released_at
}

/// The floor of a handoff: one EVALSHA of a script that PUBLISHes, received by a subscriber on
/// another connection and handed to a waiting task through a oneshot, as the store does.
struct PublishFloor {
    conn: ConnectionManager,
    script: redis::Script,
    slot: Arc<Mutex<Option<oneshot::Sender<()>>>>,
}

impl PublishFloor {
    async fn new(url: &str) -> Self {
        let slot: Arc<Mutex<Option<oneshot::Sender<()>>>> = Arc::default();
        let mut pubsub = redis::Client::open(url)
            .unwrap()
            .get_async_pubsub()
            .await
            .unwrap();
        pubsub.subscribe("bench:wake").await.unwrap();
        let deliver = Arc::clone(&slot);
        tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                let _payload: String = msg.get_payload().unwrap();
                if let Some(tx) = deliver.lock().unwrap().take() {
                    let _ = tx.send(());
                }
            }
        });
        PublishFloor {
            conn: manager(url).await,
            script: redis::Script::new("return redis.call('PUBLISH', KEYS[1], ARGV[1])"),
            slot,
        }
    }

    async fn once(&self) -> Duration {
        let (tx, rx) = oneshot::channel();
        *self.slot.lock().unwrap() = Some(tx);
        let waiter = tokio::spawn(async move {
            rx.await.unwrap();
            Instant::now()
        });
        let published_at = Instant::now();
        let mut conn = self.conn.clone();
        let mut invocation = self.script.key("bench:wake");
        invocation.arg("limiter\nwaiter.1\nG|1|1|300000000|0|0|0");
        let script = invocation.invoke_async::<i64>(&mut conn);
        let (receivers, woken) = tokio::join!(script, waiter);
        assert_eq!(receivers.unwrap(), 1);
        woken.unwrap() - published_at
    }
}

// ---------------------------------------------------------------------------------------------
// The run.

struct Config {
    pairs: usize,
    rounds: usize,
    tasks: usize,
    per_task: usize,
    handoffs: usize,
}

async fn run(url: &str, config: &Config, mut stats: Stats) {
    let store = RedisStore::connect(RedisConfig::new(url)).await.unwrap();
    let gate = Floodgate::with_store(store);
    gate.define("pair", LimiterSpec::concurrency(1000))
        .await
        .unwrap();
    gate.define("raw", LimiterSpec::concurrency(1000))
        .await
        .unwrap();
    gate.define("handoff", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    let other = Floodgate::with_store(RedisStore::connect(RedisConfig::new(url)).await.unwrap());

    // The limiter script as shipped, or a variant to try (`FG_RAW_SCRIPT=path`).
    let (raw_script, raw_source) = match std::env::var("FG_RAW_SCRIPT") {
        // A variant is the whole script (the parts of `lua/` joined): it gets the same
        // generated prelude of constants.
        Ok(path) => {
            let shipped = floodgate::store::redis::script_source();
            let prelude_end = shipped
                .find("-- Floodgate's limiter state machine")
                .unwrap_or(0);
            let variant = std::fs::read_to_string(&path).unwrap();
            (format!("{}{variant}", &shipped[..prelude_end]), path)
        }
        Err(_) => (
            floodgate::store::redis::script_source(),
            "src/store/redis/lua/ (with its generated prelude)".to_owned(),
        ),
    };
    let mut contenders = vec![
        Contender::Baseline {
            conn: manager(url).await,
            script: Arc::new(redis::Script::new(FLOOR_LUA)),
        },
        Contender::Raw {
            conn: manager(url).await,
            script: Arc::new(redis::Script::new(&raw_script)),
            keys: Arc::new(
                [
                    "meta", "holders", "leases", "queue", "heavy", "waits", "outcomes", "otimes",
                    "hot", "tokens", "dead",
                ]
                .map(|k| format!("{PREFIX}:{{raw}}:{k}")),
            ),
            next: Arc::default(),
        },
        Contender::Floodgate(gate.limiter("pair").await.unwrap()),
    ];
    match contenders[1].raw_pair().await {
        Ok(_) => println!("raw-script contender runs {raw_source}"),
        Err(e) => {
            println!(
                "raw-script contender skipped ({raw_source} no longer speaks this protocol: {e})"
            );
            contenders.remove(1);
        }
    }
    let (base_i, fg_i) = (0, contenders.len() - 1);
    let raw_i = (contenders.len() == 3).then_some(1);

    // Warm up: scripts loaded, connections and allocator warm.
    for c in &contenders {
        let mut scratch = Tally::default();
        sequential(c, config.pairs / 10 + 10, &mut scratch).await;
    }

    // 1a. Sequential pairs.
    let mut seq: Vec<Tally> = vec![Tally::default(); contenders.len()];
    for _ in 0..config.rounds {
        for (c, tally) in contenders.iter().zip(seq.iter_mut()) {
            stats.reset().await;
            sequential(c, config.pairs, tally).await;
            stats.collect(&mut tally.stats).await;
        }
    }
    // 1b. Concurrent pairs.
    let mut conc: Vec<Tally> = vec![Tally::default(); contenders.len()];
    for _ in 0..config.rounds {
        for (c, tally) in contenders.iter().zip(conc.iter_mut()) {
            concurrent(c, config.tasks, config.per_task, tally).await;
        }
    }

    // 2. Handoffs.
    let a = gate.limiter("handoff").await.unwrap();
    let b = other.limiter("handoff").await.unwrap();
    let floor = PublishFloor::new(url).await;
    for _ in 0..(config.handoffs / 10 + 5) {
        floor.once().await;
        floodgate_handoff(&a, &b).await;
    }
    let mut rtt = Samples::default();
    let mut pub_floor = Tally::default();
    let mut handoff = Tally::default();
    for _ in 0..config.rounds {
        let Contender::Baseline { conn, script } = &contenders[base_i] else {
            unreachable!()
        };
        for _ in 0..config.handoffs {
            let t = Instant::now();
            let _: i64 = script
                .key("bench:floor")
                .invoke_async(&mut conn.clone())
                .await
                .unwrap();
            rtt.push(t.elapsed());
        }
        stats.reset().await;
        for _ in 0..config.handoffs {
            pub_floor.whole.push(floor.once().await);
        }
        stats.collect(&mut pub_floor.stats).await;
        stats.reset().await;
        for _ in 0..config.handoffs {
            handoff.whole.push(floodgate_handoff(&a, &b).await);
        }
        stats.collect(&mut handoff.stats).await;
    }

    // Report.
    println!();
    println!(
        "== pair: acquire + release vs two EVALSHA of `{FLOOR_LUA}` ({} rounds x {} pairs, alternating)",
        config.rounds, config.pairs
    );
    for (c, t) in contenders.iter().zip(&seq) {
        println!(
            "  {:<10} pair {}  {:8.0} pairs/s  (rounds: {})",
            c.label(),
            t.whole.summary(),
            t.rate(),
            t.rates()
        );
        println!(
            "  {:<10}   1st call p50 {:6.1} us, 2nd call p50 {:6.1} us",
            "",
            t.first.summary().p50,
            t.second.summary().p50
        );
    }
    let (base, fg) = (seq[base_i].whole.summary(), seq[fg_i].whole.summary());
    println!(
        "  ratio floodgate/baseline: mean {:.2}x  p50 {:.2}x  p99 {:.2}x  throughput {:.2}x slower  (target <= 1.30x: {})",
        fg.mean / base.mean,
        fg.p50 / base.p50,
        fg.p99 / base.p99,
        seq[base_i].rate() / seq[fg_i].rate(),
        if fg.mean / base.mean <= 1.3 { "met" } else { "MISSED" }
    );
    if let Some(raw_i) = raw_i {
        let raw = seq[raw_i].whole.summary();
        println!(
            "  ratio raw-script/baseline: mean {:.2}x  p50 {:.2}x;  floodgate/raw-script: mean {:.2}x  p50 {:.2}x",
            raw.mean / base.mean,
            raw.p50 / base.p50,
            fg.mean / raw.mean,
            fg.p50 / raw.p50
        );
    }
    for (c, t) in contenders.iter().zip(&seq) {
        print_stats(c.label(), t);
    }

    println!();
    println!(
        "== pair with {} concurrent tasks ({} rounds x {} pairs each)",
        config.tasks, config.rounds, config.per_task
    );
    for (c, t) in contenders.iter().zip(&conc) {
        println!(
            "  {:<10} {:8.0} pairs/s  pair {}  (rounds: {})",
            c.label(),
            t.rate(),
            t.whole.summary(),
            t.rates()
        );
    }
    println!(
        "  ratio floodgate/baseline: throughput {:.2}x slower  mean latency {:.2}x",
        conc[base_i].rate() / conc[fg_i].rate(),
        conc[fg_i].whole.summary().mean / conc[base_i].whole.summary().mean
    );

    println!();
    println!(
        "== handoff: limit 1, release on store 1 -> queued acquire returns on store 2 ({} rounds x {})",
        config.rounds, config.handoffs
    );
    let (h, p, r) = (
        handoff.whole.summary(),
        pub_floor.whole.summary(),
        rtt.summary(),
    );
    println!("  floodgate  {h}");
    println!("  floor      {p}   (EVALSHA that PUBLISHes -> subscriber -> waiting task)");
    println!("  1 EVALSHA  {r}");
    println!(
        "  ratio floodgate/floor: p50 {:.2}x  p99 {:.2}x;  floodgate/1 EVALSHA: p50 {:.2}x  p99 {:.2}x",
        h.p50 / p.p50,
        h.p99 / p.p99,
        h.p50 / r.p50,
        h.p99 / r.p99
    );
    print_stats("floor", &pub_floor);
    print_stats("floodgate", &handoff);
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let smoke = !bench;
    let config = Config {
        pairs: env_usize("FG_PAIRS", if smoke { 200 } else { 20_000 }),
        rounds: env_usize("FG_ROUNDS", 2).max(1),
        tasks: env_usize("FG_TASKS", 16).max(1),
        per_task: 0,
        handoffs: env_usize("FG_HANDOFFS", if smoke { 20 } else { 1000 }).max(1),
    };
    let config = Config {
        per_task: (config.pairs * 2 / config.tasks).max(1),
        ..config
    };
    let threads = env_usize("FG_THREADS", 0);
    let rt = if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .unwrap()
    };

    let redis = BenchRedis::start();
    println!(
        "floodgate redis bench: {} ({}), runtime {}, {} cores, load average before: {}",
        redis.url,
        redis.origin(),
        if threads == 0 {
            "current-thread".to_owned()
        } else {
            format!("multi-thread x{threads}")
        },
        cores(),
        load_average()
    );
    rt.block_on(async { run(&redis.url, &config, redis.stats().await).await });
    finish(rt, redis);
}
