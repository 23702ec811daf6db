//! The three workloads of `floodgate bench` (throughput, handoff, saturation), each written once
//! against [`BenchClient`], and Redis's own counters read around the saturation window.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use super::client::BenchClient;
use super::report::{Latency, RedisCost, SaturationResult};
use super::target::Target;
use super::{fail, BenchArgs, SATURATION_WARMUP, WARMUP_HANDOFFS};
use floodgate_server::cli::Failure;

/// What a client operation answers: a value, or what went wrong as text.
pub(super) type Outcome<T> = Result<T, String>;

/// Which pairs a throughput phase runs.
#[derive(Debug, Clone, Copy)]
pub(super) enum Phase {
    /// Two trivial round trips.
    Trivial,
    /// Acquire then release.
    Floodgate,
}

/// Waits for every task; the first failure wins.
pub(super) async fn join_all<T>(
    tasks: Vec<tokio::task::JoinHandle<Outcome<T>>>,
) -> Outcome<Vec<T>> {
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
pub(super) async fn throughput<C: BenchClient>(
    sides: &[Arc<C>],
    phase: Phase,
    length: Duration,
) -> Outcome<f64> {
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
pub(super) struct HandoffSamples {
    pub(super) handoff: Vec<Duration>,
    pub(super) trivial: Vec<Duration>,
    pub(super) release: Vec<Duration>,
}

pub(super) async fn handoffs<C: BenchClient>(
    a: Arc<C>,
    b: Arc<C>,
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
pub(super) struct HolderTally {
    /// Time it held a permit, clipped to the window.
    pub(super) busy: Duration,
    /// Grants that arrived in the window.
    pub(super) grants: u64,
    /// Sum of the whole holds of those grants (grant arrived to release sent).
    pub(super) held: Duration,
    /// Acquire sent to grant arrived, for those grants.
    pub(super) waits: Vec<Duration>,
}

/// One holder of the saturation workload: acquire → hold → release until `until`.
pub(super) async fn saturation_holder<C: BenchClient>(
    side: Arc<C>,
    hold: Duration,
    tokio_hold: bool,
    from: Instant,
    until: Instant,
) -> Outcome<HolderTally> {
    let mut tally = HolderTally::default();
    loop {
        let asked = Instant::now();
        let (held, granted) = side.acquire().await?;
        if tokio_hold {
            tokio::time::sleep(hold).await;
        } else {
            hold_for(hold).await;
        }
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

/// How much earlier than the hold's end tokio's timer is asked to wake: it ticks in whole
/// milliseconds and rounds a sleep up (a 5 ms sleep lasted about 6.1 ms), so it wakes up to
/// about 1 ms late; what is left after it is slept to the deadline on the OS timer.
const COARSE_MARGIN: Duration = Duration::from_millis(2);

/// Waits `hold` to within the OS timer's precision (tens of µs), as Node's timers on the peer's
/// side do: a coarse tokio sleep ending [`COARSE_MARGIN`] early, then the rest as a thread
/// sleep on the blocking pool (no spin: a holder never occupies a core while it holds).
pub(super) async fn hold_for(hold: Duration) {
    let deadline = Instant::now() + hold;
    let coarse = hold.saturating_sub(COARSE_MARGIN);
    if !coarse.is_zero() {
        tokio::time::sleep(coarse).await;
    }
    let left = deadline.saturating_duration_since(Instant::now());
    if !left.is_zero() {
        // The closure cannot panic; a join error would only mean the runtime is shutting down.
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(left)).await;
    }
}

/// Redis's counters, from `INFO all`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct RedisCounters {
    /// `total_commands_processed`: every command, those run inside scripts included.
    pub(super) commands: u64,
    /// Calls of `EVAL` and `EVALSHA`.
    pub(super) scripts: u64,
    /// `used_cpu_user` + `used_cpu_sys`, in seconds.
    pub(super) cpu: f64,
}

impl RedisCounters {
    pub(super) fn parse(info: &str) -> Self {
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

    pub(super) async fn read(conn: &mut MultiplexedConnection) -> Outcome<Self> {
        let info: String = redis::cmd("INFO")
            .arg("all")
            .query_async(conn)
            .await
            .map_err(|e| format!("INFO: {e}"))?;
        Ok(RedisCounters::parse(&info))
    }
}

/// How often the saturation window's round-trip probe sends its PING.
const PING_EVERY: Duration = Duration::from_millis(5);

pub(super) async fn saturation<C: BenchClient>(
    target: &Target,
    args: &BenchArgs,
    limiter: &str,
) -> Result<SaturationResult, Failure> {
    let length = Duration::from_secs_f64(args.saturation_seconds);
    let warmup = SATURATION_WARMUP.min(length / 4);
    let mut sides = Vec::with_capacity(args.holders as usize);
    for _ in 0..args.holders {
        sides.push(Arc::new(C::connect(target, limiter, false).await?));
    }
    let start = Instant::now();
    let (from, until) = (start + warmup, start + warmup + length);
    let tasks: Vec<_> = sides
        .into_iter()
        .map(|side| {
            tokio::spawn(saturation_holder(
                side,
                args.hold,
                args.tokio_hold,
                from,
                until,
            ))
        })
        .collect();
    // Redis's counters at the window's edges, read on a connection of their own.
    let probe = target.redis().map(|mut conn| {
        tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(from)).await;
            let before = RedisCounters::read(&mut conn).await?;
            // The round trip under the same load, to state the idle time in round trips: a
            // PING every few ms on this connection of its own, throughout the window.
            let mut pings = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .map_err(|e| format!("PING: {e}"))?;
                pings.push(t.elapsed());
                tokio::time::sleep(PING_EVERY).await;
            }
            let after = RedisCounters::read(&mut conn).await?;
            Outcome::Ok((before, after, pings))
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
    let redis = counters.map(|(before, after, pings)| RedisCost {
        // The INFO before the window and the PINGs are not the workload's.
        commands_per_grant: per_grant(
            after
                .commands
                .saturating_sub(before.commands + 1 + pings.len() as u64),
        ),
        scripts_per_grant: per_grant(after.scripts.saturating_sub(before.scripts)),
        cpu_share: (after.cpu - before.cpu).max(0.0) / length.as_secs_f64(),
        ping_mean: pings.iter().sum::<Duration>() / u32::try_from(pings.len().max(1)).unwrap_or(1),
        ping: Latency::new(pings),
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
