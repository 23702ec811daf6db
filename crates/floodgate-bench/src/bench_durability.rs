//! `floodgate bench-durability`: what a data directory costs, beside the embedded store without
//! one, in the same run.
//!
//! 1. HTTP acquire+release pairs/s against three in-process servers (no data dir; a data dir
//!    with `fsync = everysec`; one with `always`), in alternating phases, medians and ratios.
//! 2. The machine's fsync latency (4 KiB append + fdatasync), measured in the same run.
//! 3. Recovery time of a state with many holders over many limiters, from the log alone and
//!    from a snapshot.
//! 4. The data directory's size after many operations under the snapshot policy.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use floodgate::{
    AcquireOptions, Durability, Floodgate, FsyncPolicy, LimiterSpec, MemoryStore, WallClock,
};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use floodgate_server::cli::Failure;
use floodgate_server::server::{self, ServerOptions};

/// Flags of `floodgate bench-durability`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchDurabilityArgs {
    /// Concurrent HTTP clients in the pair phases.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1000))]
    clients: u32,
    /// Seconds per pair phase.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Rounds of (memory, everysec, always) phases; medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    rounds: u32,
    /// Recovery: limiters (at least 1; the store's cap is raised to fit).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    limiters: u32,
    /// Recovery: holders in total, spread as evenly as they go over the limiters.
    #[arg(long, default_value_t = 100_000)]
    holders: u32,
    /// Log size: operations to run, acquire and release pairs (an even number, at least 2).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(2..))]
    ops: u64,
    /// Log size: the snapshot threshold in bytes (at least 1).
    #[arg(
        long,
        default_value_t = floodgate::store::memory::DEFAULT_SNAPSHOT_AFTER_BYTES,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    snapshot_after_bytes: u64,
    /// Where the data directories go (a fresh temporary directory below it).
    #[arg(long, default_value = "target/bench-durability")]
    dir: std::path::PathBuf,
}

fn fail(message: impl std::fmt::Display) -> Failure {
    Failure {
        code: 1,
        message: message.to_string(),
    }
}

pub(crate) async fn bench_durability(args: BenchDurabilityArgs) -> Result<u8, Failure> {
    if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 600.0) {
        return Err(Failure::usage("--seconds: more than 0, at most 600"));
    }
    if args.ops % 2 != 0 {
        return Err(Failure::usage(format!(
            "--ops {}: an even number (acquire and release pairs)",
            args.ops
        )));
    }
    std::fs::create_dir_all(&args.dir).map_err(|e| fail(format!("{}: {e}", args.dir.display())))?;
    let scratch = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&args.dir)
        .map_err(|e| fail(format!("{}: {e}", args.dir.display())))?;
    let root = scratch.path();
    let mut out = serde_json::Map::new();
    out.insert("pairs".into(), pairs(&args, root).await?);
    out.insert("fsync".into(), fsync_latency(root)?);
    out.insert("recovery".into(), recovery(&args, root).await?);
    out.insert("log_size".into(), log_size(&args, root).await?);
    let mut text = serde_json::to_string_pretty(&Value::Object(out)).unwrap_or_default();
    text.push('\n');
    floodgate_server::cli::print(&text)?;
    Ok(0)
}

/// An in-process server over a store.
struct Local {
    base: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn serve(store: MemoryStore<WallClock>) -> Result<Local, Failure> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(fail)?;
    let addr = listener.local_addr().map_err(fail)?;
    let gate = Floodgate::with_store(store);
    let spec = LimiterSpec::concurrency(100_000)
        .with_default_lease(Duration::from_secs(60))
        .with_max_wait(Duration::from_secs(10));
    gate.define("pairs", spec).await.map_err(fail)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::run(
        listener,
        gate,
        ServerOptions::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(Local {
        base: format!("http://{addr}"),
        stop,
        task,
    })
}

/// Pairs per second against `base` for `length`, with `clients` keep-alive clients.
async fn phase(base: &str, clients: u32, length: Duration) -> Result<f64, Failure> {
    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .map_err(fail)?;
        let (done, count) = (done.clone(), count.clone());
        let acquire = format!("{base}/v1/limiters/pairs/acquire");
        let base = base.to_owned();
        tasks.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let r = http.post(&acquire).json(&json!({})).send().await?;
                let permit: Value = r.error_for_status()?.json().await?;
                let id = permit["permit_id"].as_str().unwrap_or_default().to_owned();
                http.post(format!("{base}/v1/permits/{id}/release"))
                    .json(&json!({}))
                    .send()
                    .await?
                    .error_for_status()?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), reqwest::Error>(())
        }));
    }
    // Warm-up, then the measured window.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start_count = count.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(length).await;
    let pairs = count.load(Ordering::Relaxed) - start_count;
    let elapsed = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.map_err(fail)?.map_err(fail)?;
    }
    Ok(pairs as f64 / elapsed)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn pairs(args: &BenchDurabilityArgs, root: &Path) -> Result<Value, Failure> {
    let memory = serve(MemoryStore::with_clock(WallClock::new())).await?;
    let open = |name: &str, policy| {
        MemoryStore::open(Durability::new(root.join(name)).fsync(policy))
            .map(|(store, _)| store)
            .map_err(fail)
    };
    let everysec = serve(open("pairs-everysec", FsyncPolicy::EverySec)?).await?;
    let always = serve(open("pairs-always", FsyncPolicy::Always)?).await?;
    let length = Duration::from_secs_f64(args.seconds);
    let (mut m, mut e, mut a) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        m.push(phase(&memory.base, args.clients, length).await?);
        e.push(phase(&everysec.base, args.clients, length).await?);
        a.push(phase(&always.base, args.clients, length).await?);
    }
    for local in [memory, everysec, always] {
        let _ = local.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), local.task).await;
    }
    let (m, e, a) = (median(m), median(e), median(a));
    Ok(json!({
        "clients": args.clients,
        "memory_pairs_per_s": m.round(),
        "everysec_pairs_per_s": e.round(),
        "always_pairs_per_s": a.round(),
        "everysec_vs_memory": (e / m * 1000.0).round() / 1000.0,
        "always_vs_memory": (a / m * 1000.0).round() / 1000.0,
    }))
}

/// 4 KiB appends each followed by fdatasync: what one `always` group commit waits for.
fn fsync_latency(root: &Path) -> Result<Value, Failure> {
    use std::io::Write;
    let path = root.join("fsync-probe");
    let mut file = std::fs::File::create(&path).map_err(fail)?;
    let block = vec![0u8; 4096];
    let mut times = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        file.write_all(&block).map_err(fail)?;
        file.sync_data().map_err(fail)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    Ok(json!({
        "fdatasync_p50_us": times[times.len() / 2].round(),
        "fdatasync_p99_us": times[times.len() * 99 / 100].round(),
    }))
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

async fn recovery(args: &BenchDurabilityArgs, root: &Path) -> Result<Value, Failure> {
    let dir = root.join("recovery");
    let durability = Durability::new(&dir).fsync(FsyncPolicy::No);
    let (store, _) = MemoryStore::open(durability.clone()).map_err(fail)?;
    let limiters = args.limiters;
    let store = store.with_max_limiters(usize::try_from(limiters).unwrap_or(usize::MAX));
    let gate = Floodgate::with_store(store.clone());
    // Every holder asked for: the first `holders % limiters` limiters take one more.
    let (per, extra) = (args.holders / limiters, args.holders % limiters);
    for i in 0..limiters {
        let here = per + u32::from(i < extra);
        let spec = LimiterSpec::concurrency(here.max(1))
            .with_default_lease(Duration::from_secs(3600))
            .with_max_wait(Duration::ZERO);
        let name = format!("r{i}");
        gate.define(&name, spec).await.map_err(fail)?;
        let limiter = gate.limiter(&name).await.map_err(fail)?;
        for _ in 0..here {
            limiter
                .acquire(AcquireOptions::new().holder("worker-1"))
                .await
                .map_err(fail)?
                .detach();
        }
    }
    store.close();
    drop((gate, store));
    let log_bytes = dir_bytes(&dir);
    let started = Instant::now();
    let (store, report) = MemoryStore::open(durability.clone()).map_err(fail)?;
    let from_log = started.elapsed();
    store.snapshot_now().map_err(fail)?;
    store.close();
    drop(store);
    let snapshot_bytes = dir_bytes(&dir);
    let started = Instant::now();
    let (store, report2) = MemoryStore::open(durability).map_err(fail)?;
    let from_snapshot = started.elapsed();
    store.close();
    Ok(json!({
        "limiters": report.limiters,
        "holders": report.holders,
        "from_log_records": report.records,
        "from_log_bytes": log_bytes,
        "from_log_s": (from_log.as_secs_f64() * 1000.0).round() / 1000.0,
        "from_snapshot_bytes": snapshot_bytes,
        "from_snapshot_s": (from_snapshot.as_secs_f64() * 1000.0).round() / 1000.0,
        "from_snapshot_holders": report2.holders,
    }))
}

async fn log_size(args: &BenchDurabilityArgs, root: &Path) -> Result<Value, Failure> {
    let dir = root.join("log-size");
    let durability = Durability::new(&dir)
        .fsync(FsyncPolicy::No)
        .snapshot_after_bytes(args.snapshot_after_bytes);
    let (store, _) = MemoryStore::open(durability).map_err(fail)?;
    let gate = Floodgate::with_store(store.clone());
    gate.define("ops", LimiterSpec::concurrency(8))
        .await
        .map_err(fail)?;
    let limiter = gate.limiter("ops").await.map_err(fail)?;
    let mut peak = 0;
    let started = Instant::now();
    for i in 0..args.ops / 2 {
        let permit = limiter.acquire(AcquireOptions::new()).await.map_err(fail)?;
        permit.release().await.map_err(fail)?;
        if i % 10_000 == 0 {
            peak = peak.max(dir_bytes(&dir));
        }
    }
    let elapsed = started.elapsed();
    // A snapshot that is due finishes on its own task.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = dir_bytes(&dir);
    store.close();
    Ok(json!({
        "ops": args.ops,
        "snapshot_after_bytes": args.snapshot_after_bytes,
        "dir_bytes_at_end": end,
        "dir_bytes_peak": peak.max(end),
        "ops_per_s": (args.ops as f64 / elapsed.as_secs_f64()).round(),
    }))
}
