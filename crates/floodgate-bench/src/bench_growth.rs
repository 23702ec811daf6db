//! `floodgate bench-growth`: how the cost of each operation grows with the work already in a
//! limiter, on the embedded store and on Redis, in one run.
//!
//! Each operation is measured at queue lengths 0, 100, 1k and 10k (one holder on a limit of 1,
//! the rest queued behind it) or at 10, 100, 1k and 10k holders, and reported with the ratio of
//! its cost at 10k to its cost at 100: a ratio near 1 is O(1) or O(log n), a ratio near 100 is
//! a walk of the queue or of the holders. Ratios above 3x are flagged.
//!
//! What a cost is:
//! - embedded: the wall time of the call on this thread (median of `--samples`, then the
//!   median over `--rounds` passes over every size, so the sizes are measured interleaved and
//!   a moment of the machine's other work moves one round, not one size), the limiter on a
//!   clock this bench moves by hand, so a wait ends exactly when the bench says and no timer
//!   fires on its own;
//! - Redis: the time Redis itself spent (the script calls' `usec` in `INFO commandstats`,
//!   median of `--redis-samples`) and the commands it ran, which is what blocks every other
//!   client of that Redis. A `redis-server` is started on a free loopback port unless `--redis`
//!   names one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use floodgate::{
    AcquireOptions, Clock, LimiterName, LimiterSpec, MemoryStore, RedisConfig, RedisStore,
    Timestamp,
};
use serde_json::{json, Value};

mod redis_server;
mod rigs;

use self::rigs::{Cost, EmbeddedRig, RedisRig, Rig};
use floodgate_server::cli::Failure;

/// Flags of `floodgate bench-growth`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchGrowthArgs {
    /// Measure on this Redis (`redis://HOST:PORT`) instead of a `redis-server` started on a
    /// free loopback port for the run. Its limiters are named `growth-*` and deleted after.
    /// A direct `redis://` or `rediss://` connection only (no Sentinel URL).
    #[arg(long, value_name = "REDIS_URL", conflicts_with = "no_redis")]
    redis: Option<String>,
    /// Measure the embedded store only.
    #[arg(long)]
    no_redis: bool,
    /// Tiny sizes (0, 4, 16) and few samples: shows the command works, in seconds.
    #[arg(long)]
    quick: bool,
    /// Samples per cell on the embedded store (the median is reported).
    #[arg(long, default_value_t = 201, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    samples: u32,
    /// Rounds on the embedded store: each a full pass over every operation and size, so a
    /// moment of interference from the machine's other work falls in one round, not in the
    /// cells of one size. A cell is the median of its rounds' medians.
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    rounds: u32,
    /// Samples per cell on Redis (the median is reported).
    #[arg(long, default_value_t = 21, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    redis_samples: u32,
    /// Print the results as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// What an operation's cost grows with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dim {
    /// Waiters queued behind one holder on a limit of 1.
    Queue,
    /// Grants out on a limit above them.
    Holders,
}

/// The operations measured along the queue.
const QUEUE_OPS: [&str; 10] = [
    "acquire (queues)",
    "handoff",
    "cancel head",
    "cancel middle",
    "cancel tail",
    "cancel random order",
    "timeout (tail)",
    "put unchanged",
    "put changed",
    "status",
];
/// The operations measured along the holders.
const HOLDER_OPS: [&str; 3] = ["acquire (granted)", "release", "cancel raced grant"];

/// One operation on one store: its median cost at each size.
struct Row {
    op: &'static str,
    store: &'static str,
    dim: Dim,
    /// (size, median cost), `None` where the operation has no meaning (no waiter to cancel).
    cells: Vec<(usize, Option<Cost>)>,
}

/// The clock of the embedded store under test: moved only by the bench.
#[derive(Debug, Clone, Default)]
pub(crate) struct ManualClock {
    /// Microseconds since the start.
    now: Arc<AtomicU64>,
}

impl ManualClock {
    pub(crate) fn advance(&self, by: Duration) {
        let us = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.now.fetch_add(us, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.now.load(Ordering::Relaxed))
    }
    fn instant_at(&self, _at: Timestamp) -> tokio::time::Instant {
        // The store's timer never fires by itself: deadlines pass when the bench moves the
        // clock, and the next operation applies them.
        tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
    }
}

pub(crate) async fn bench_growth(args: BenchGrowthArgs) -> Result<u8, Failure> {
    let (queue_sizes, holder_sizes, ratio) = if args.quick {
        (vec![0, 4, 16], vec![2, 4, 16], (16, 4))
    } else {
        (
            vec![0, 100, 1_000, 10_000],
            vec![10, 100, 1_000, 10_000],
            (10_000, 100),
        )
    };
    let (samples, redis_samples) = if args.quick {
        (args.samples.min(5), args.redis_samples.min(3))
    } else {
        (args.samples, args.redis_samples)
    };
    let rounds = if args.quick { 1 } else { args.rounds };

    let clock = ManualClock::default();
    let store = MemoryStore::with_clock(clock.clone());
    let mut rig = EmbeddedRig::new(store, clock);
    let mut passes = Vec::new();
    for _ in 0..rounds {
        let mut pass = Vec::new();
        // Every embedded operation completes in its first poll and the bench never yields, so
        // tokio's cooperative budget would soon answer a poll "not yet" for no reason of the
        // store's: measured outside it.
        tokio::task::unconstrained(measure(
            &mut rig,
            "embedded",
            &queue_sizes,
            &holder_sizes,
            samples,
            &mut pass,
        ))
        .await?;
        passes.push(pass);
    }
    let mut rows = median_of_rounds(passes);

    let _server;
    if !args.no_redis {
        let url = match &args.redis {
            Some(url) => url.clone(),
            None => {
                let server = redis_server::RedisServer::start().await?;
                let url = server.url();
                _server = server;
                url
            }
        };
        // Not a direct Redis URL: bad input (exit 2), said before any connection is tried.
        crate::redis_url::check_direct("--redis", &url)?;
        let store = RedisStore::connect(RedisConfig::new(url.as_str()))
            .await
            .map_err(|e| {
                let shown = floodgate::store::redis::redact_url(&url);
                fail(format!("cannot connect to {shown}: {e}"))
            })?;
        let mut rig = RedisRig::new(store, &url).await?;
        measure(
            &mut rig,
            "redis",
            &queue_sizes,
            &holder_sizes,
            redis_samples,
            &mut rows,
        )
        .await?;
    }

    if args.json {
        print_json(&rows, ratio);
    } else {
        print_tables(&rows, &queue_sizes, &holder_sizes, ratio);
    }
    Ok(0)
}

fn fail(message: impl std::fmt::Display) -> Failure {
    Failure {
        code: 1,
        message: message.to_string(),
    }
}

/// The spec of every limiter of the bench: waits and leases that never end on their own.
fn spec(limit: u32) -> LimiterSpec {
    LimiterSpec::concurrency(limit)
        .with_default_lease(Duration::from_secs(3600))
        .with_max_wait(Duration::from_secs(3600))
        .with_max_queue(1_000_000)
}

/// A waiter's request: one permit, waiting `wait`.
pub(crate) fn request(wait: Duration) -> AcquireOptions {
    AcquireOptions::new()
        .lease(Duration::from_secs(3600))
        .wait(wait)
}

/// A long wait: never ends during the bench.
pub(crate) const LONG: Duration = Duration::from_secs(3000);

/// The median by time (the cost's commands come with it).
fn median(mut costs: Vec<Cost>) -> Option<Cost> {
    if costs.is_empty() {
        return None;
    }
    costs.sort_by(|a, b| a.ns.total_cmp(&b.ns));
    Some(costs[costs.len() / 2])
}

/// The rows of several rounds (each the same operations and sizes, in the same order) as one:
/// each cell the median of the rounds' cells.
fn median_of_rounds(mut rounds: Vec<Vec<Row>>) -> Vec<Row> {
    let Some(mut rows) = rounds.pop() else {
        return Vec::new();
    };
    for (i, row) in rows.iter_mut().enumerate() {
        for (j, cell) in row.cells.iter_mut().enumerate() {
            let costs = rounds
                .iter()
                .filter_map(|round| round.get(i)?.cells.get(j)?.1)
                .chain(cell.1)
                .collect();
            cell.1 = median(costs);
        }
    }
    rows
}

/// A small deterministic generator for the random departure order (splitmix64).
struct Mix(u64);

impl Mix {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % n.max(1) as u64) as usize
    }
}

fn name(store: &str, what: &str, size: usize) -> Result<LimiterName, Failure> {
    LimiterName::new(&format!(
        "growth-{store}-{what}-{size}-{}",
        std::process::id()
    ))
    .map_err(|e| fail(format!("bad limiter name: {e}")))
}

async fn measure<R: Rig>(
    rig: &mut R,
    store: &'static str,
    queue_sizes: &[usize],
    holder_sizes: &[usize],
    samples: u32,
    rows: &mut Vec<Row>,
) -> Result<(), Failure> {
    let samples = samples as usize;
    let mut by_op: Vec<Vec<(usize, Option<Cost>)>> = vec![Vec::new(); QUEUE_OPS.len()];
    for &q in queue_sizes {
        let lim = name(store, "queue", q)?;
        rig.create(&lim, spec(1)).await?;
        let (_, mut holder) = rig.acquire().await?;
        let mut waiters = VecDeque::with_capacity(q + 1);
        for _ in 0..q {
            waiters.push_back(rig.enqueue(LONG).await?.1);
        }
        let mut costs: Vec<Vec<Cost>> = vec![Vec::new(); QUEUE_OPS.len()];
        for i in 0..samples {
            check(rig, &waiters, "a sample began").await?;
            // acquire (queues): one more at the tail, then it leaves again.
            let (c, w) = rig.enqueue(LONG).await?;
            costs[0].push(c);
            rig.cancel(w).await?;
            // handoff: the holder releases, the head is granted and holds next.
            if waiters.is_empty() {
                waiters.push_back(rig.enqueue(LONG).await?.1);
            }
            if let Some(head) = waiters.pop_front() {
                let (c, next) = rig
                    .handoff(holder, head)
                    .await
                    .map_err(|e| fail(format!("{} (queue length {q}, sample {i})", e.message)))?;
                costs[1].push(c);
                holder = next;
            }
            waiters.push_back(rig.enqueue(LONG).await?.1);
            if q > 0 {
                while waiters.len() > q {
                    if let Some(w) = waiters.pop_back() {
                        rig.cancel(w).await?;
                    }
                }
                // cancel head / middle / tail, each replaced at the tail.
                for (slot, at) in [(2, 0), (3, q / 2), (4, q - 1)] {
                    if let Some(w) = waiters.remove(at) {
                        costs[slot].push(rig.cancel(w).await?);
                    }
                    waiters.push_back(rig.enqueue(LONG).await?.1);
                }
            } else if let Some(w) = waiters.pop_back() {
                rig.cancel(w).await?;
            }
            check(rig, &waiters, "the cancels").await?;
            // timeout: a waiter at the tail whose wait ends.
            let (_, w) = rig.enqueue(Duration::from_millis(20)).await?;
            costs[6].push(rig.timeout(w).await?);
            // put: the same spec again, then a changed one (the default lease moves).
            costs[7].push(rig.put(&lim, spec(1)).await?);
            let changed = spec(1).with_default_lease(Duration::from_secs(3599));
            costs[8].push(rig.put(&lim, changed).await?);
            rig.put(&lim, spec(1)).await?;
            costs[9].push(rig.status().await?);
        }
        // Many waiters leaving in random order: a sample of them, each cost on its own. The
        // last one stands in for the one taken (the order of the rest does not matter here),
        // so the bench does not shift thousands of its own entries between two cancels. Each
        // is replaced at the tail, as in the loop above: the queue stays `q` long (at 100 the
        // sample used to empty it), and the next acquire takes the box the cancel freed, so
        // the allocator never frees into its general bins, whose cold neighbours at 10k were
        // timed as part of the cancel.
        let mut mix = Mix(q as u64 + 1);
        for _ in 0..samples.min(q) {
            let at = mix.below(waiters.len());
            if let Some(w) = waiters.swap_remove_back(at) {
                costs[5].push(rig.cancel(w).await?);
            }
            waiters.push_back(rig.enqueue(LONG).await?.1);
        }
        for (i, c) in costs.into_iter().enumerate() {
            by_op[i].push((q, median(c)));
        }
        rig.delete(&lim, waiters).await?;
    }
    for (i, cells) in by_op.into_iter().enumerate() {
        rows.push(Row {
            op: QUEUE_OPS[i],
            store,
            dim: Dim::Queue,
            cells,
        });
    }

    let mut by_op: Vec<Vec<(usize, Option<Cost>)>> = vec![Vec::new(); HOLDER_OPS.len()];
    for &h in holder_sizes {
        let lim = name(store, "holders", h)?;
        // Room for one more than `h`: an acquire at `h` holders is granted at once.
        let limit = u32::try_from(h + 1).map_err(|_| fail("too many holders"))?;
        rig.create(&lim, spec(limit)).await?;
        let mut held = Vec::with_capacity(h + 1);
        for _ in 0..h {
            held.push(rig.acquire().await?.1);
        }
        let mut costs: Vec<Vec<Cost>> = vec![Vec::new(); HOLDER_OPS.len()];
        let mut mix = Mix(h as u64 + 7);
        for _ in 0..samples {
            let (c, token) = rig.acquire().await?;
            costs[0].push(c);
            // release: any one of the h + 1 (a random one), then the count is restored.
            let at = mix.below(held.len() + 1);
            held.push(token);
            let token = held.swap_remove(at);
            costs[1].push(rig.release(token).await?);
            // cancel raced grant: the limit full, a waiter queued, a holder releases (the
            // waiter is granted) and the waiter goes away before it took the grant.
            let (_, extra) = rig.acquire().await?;
            let (_, w) = rig.enqueue(LONG).await?;
            rig.release(extra).await?;
            if let Some(c) = rig.cancel_raced(w).await? {
                costs[2].push(c);
            }
        }
        for (i, c) in costs.into_iter().enumerate() {
            by_op[i].push((h, median(c)));
        }
        rig.delete(&lim, VecDeque::new()).await?;
    }
    for (i, cells) in by_op.into_iter().enumerate() {
        rows.push(Row {
            op: HOLDER_OPS[i],
            store,
            dim: Dim::Holders,
            cells,
        });
    }
    Ok(())
}

/// Fails unless the store queues exactly the waiters the bench holds.
async fn check<R: Rig>(
    rig: &mut R,
    waiters: &VecDeque<R::Waiter>,
    after: &str,
) -> Result<(), Failure> {
    let waiting = rig.waiting().await?;
    if waiting != waiters.len() {
        return Err(fail(format!(
            "after {after} the store queues {waiting} waiters, the bench holds {}",
            waiters.len()
        )));
    }
    Ok(())
}

/// Cost at the larger size over cost at the smaller one.
fn ratio(row: &Row, (big, small): (usize, usize)) -> Option<f64> {
    let at = |n| {
        row.cells
            .iter()
            .find(|(size, _)| *size == n)
            .and_then(|(_, c)| *c)
    };
    let (b, s) = (at(big)?, at(small)?);
    (s.ns > 0.0).then(|| b.ns / s.ns)
}

fn cell(store: &str, cost: Option<Cost>) -> String {
    match cost {
        None => "-".into(),
        Some(c) if store == "redis" => format!("{:.0}us/{}c", c.ns / 1000.0, c.cmds),
        Some(c) if c.ns >= 10_000.0 => format!("{:.1}us", c.ns / 1000.0),
        Some(c) => format!("{:.0}ns", c.ns),
    }
}

fn size_label(n: usize) -> String {
    if n >= 1000 && n % 1000 == 0 {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

fn print_tables(rows: &[Row], queue: &[usize], holders: &[usize], sizes: (usize, usize)) {
    use std::io::Write;
    let mut out = String::new();
    let ratio_head = format!("{}/{}", size_label(sizes.0), size_label(sizes.1));
    for (dim, title, sizes_of) in [
        (Dim::Queue, "queue length", queue),
        (Dim::Holders, "holders", holders),
    ] {
        out.push_str(&format!(
            "\nCost by {title} (embedded: wall time; redis: Redis time / commands)\n"
        ));
        out.push_str(&format!("{:<22} {:<9}", "operation", "store"));
        for n in sizes_of {
            out.push_str(&format!(" {:>12}", size_label(*n)));
        }
        out.push_str(&format!(" {:>10}\n", ratio_head));
        for row in rows.iter().filter(|r| r.dim == dim) {
            out.push_str(&format!("{:<22} {:<9}", row.op, row.store));
            for (_, c) in &row.cells {
                out.push_str(&format!(" {:>12}", cell(row.store, *c)));
            }
            match ratio(row, sizes) {
                Some(r) if r > 3.0 => out.push_str(&format!(" {:>9.2}x  > 3x\n", r)),
                Some(r) => out.push_str(&format!(" {:>9.2}x\n", r)),
                None => out.push_str(&format!(" {:>10}\n", "-")),
            }
        }
    }
    let flagged = rows
        .iter()
        .filter(|r| ratio(r, sizes).is_some_and(|x| x > 3.0))
        .count();
    out.push_str(&format!(
        "\n{flagged} operation(s) cost more than 3x at {} than at {}.\n",
        size_label(sizes.0),
        size_label(sizes.1)
    ));
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
}

fn print_json(rows: &[Row], sizes: (usize, usize)) {
    use std::io::Write;
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            let cells: Vec<Value> = r
                .cells
                .iter()
                .map(|(n, c)| json!({"size": n, "ns": c.map(|c| c.ns), "commands": c.map(|c| c.cmds)}))
                .collect();
            json!({
                "operation": r.op,
                "store": r.store,
                "by": if r.dim == Dim::Queue { "queue" } else { "holders" },
                "cells": cells,
                "ratio": ratio(r, sizes),
            })
        })
        .collect();
    let report = json!({"ratio_of": [sizes.0, sizes.1], "rows": rows});
    let _ = writeln!(std::io::stdout().lock(), "{report}");
}

/// Wall time of `f`, for the embedded rig.
pub(crate) fn timed<T>(f: impl FnOnce() -> T) -> (Cost, T) {
    let start = Instant::now();
    let out = f();
    let ns = start.elapsed().as_nanos() as f64;
    (Cost { ns, cmds: 0 }, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(costs: &[Option<f64>]) -> Row {
        Row {
            op: "cancel middle",
            store: "embedded",
            dim: Dim::Queue,
            cells: costs
                .iter()
                .enumerate()
                .map(|(i, ns)| (i, ns.map(|ns| Cost { ns, cmds: 0 })))
                .collect(),
        }
    }

    #[test]
    fn rounds_combine_cell_by_cell_into_their_median() {
        // One round slowed at the large size (the machine's other work) moves nothing; a
        // cost that grows in every round still shows.
        let rounds = vec![
            vec![row(&[None, Some(80.0), Some(900.0)]), row(&[Some(1.0)])],
            vec![row(&[None, Some(90.0), Some(120.0)]), row(&[Some(3.0)])],
            vec![row(&[None, Some(70.0), Some(110.0)]), row(&[Some(2.0)])],
        ];
        let rows = median_of_rounds(rounds);
        let ns =
            |r: &Row| -> Vec<Option<f64>> { r.cells.iter().map(|c| c.1.map(|c| c.ns)).collect() };
        assert_eq!(ns(&rows[0]), vec![None, Some(80.0), Some(120.0)]);
        assert_eq!(ns(&rows[1]), vec![Some(2.0)]);
        assert!(median_of_rounds(Vec::new()).is_empty());
    }
}
