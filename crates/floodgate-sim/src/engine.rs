//! The discrete-event engine: a virtual clock, an event queue ordered by `(time, sequence)`,
//! the worker pool and broker queue, the backend, and each strategy's task program.
//!
//! Tasks are small state machines. An event names a task and the execution it belongs to;
//! once an execution ends (finished, failed, killed) its pending events are stale and
//! ignored, except the backend's answer, which always updates the backend: a killed task's
//! query keeps running there.

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Duration;

use floodgate::core::keyed::{KeyLayer, KeyedSpec, MAX_KEYS};
use floodgate::core::{AcquireRequest, Admission, Effects, LimiterCore, Refusal, WaiterId};
use floodgate::{Feedback, FencingToken, Timestamp};

use super::cache::DjangoCache;
use super::loaded;
use super::orgs::Fairness;
use super::report::{CounterStats, LimiterStats, StrategyReport};
use super::rng::Rng;
use super::workload::Workload;
use super::{Config, Strategy, Trace};
use events::{Ev, Scheduled};

/// Virtual time, in microseconds.
pub(crate) type Micros = u64;

mod counter;
mod events;
mod gate;
mod queries;
mod strategy;
mod summary;

fn us(d: Duration) -> Micros {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `calculate_spike_projections`: spawns the organization tasks.
    Batch,
    /// `calculate_spike_projection_for_organization`: spawns its query tasks.
    Org(u32),
    /// `run_spike_projection` for one unit of the workload.
    Query(u32),
}

/// `seed-counter`'s steps: each cache call happens at its step, and the next step is one
/// round trip later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cs {
    /// `current = cache.get(key, 0); if current >= MAX: return False`
    Get1,
    /// `if cache.get(key)` (0 and None are falsy)
    Get2,
    /// `cache.incr(key, 1)`
    Incr,
    /// `cache.add(key, 1, timeout=300)`
    Add,
    /// `if new_value and new_value <= MAX: return True` else `sleep(0.1)`
    Decide(bool),
    /// `acquire` returned False: skip after 60 s, else `sleep(1)`
    Returned,
    /// `incr` raised `ValueError`: the task fails.
    Raise,
    /// release: `current = cache.get(key, 0); if current > 0:`
    RelGet,
    /// release: `cache.decr(key, 1)`
    RelDecr,
    /// release returned.
    RelDone,
    /// release's `decr` raised inside `finally`: the task fails.
    RelRaise,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The first step of an execution.
    Start,
    /// Batch or organization task producing children.
    Spawning,
    /// `seed-batches`' sleep between batches.
    BatchSleep,
    /// A query is at the backend.
    Querying,
    /// `seed-backoff`'s sleep between tries.
    Backoff,
    /// `seed-counter`'s cache steps.
    Counter(Cs),
    /// Queued in Floodgate's limiter.
    Waiting,
}

#[derive(Debug, Clone)]
struct Task {
    kind: Kind,
    /// When the task was first created (`delay()`), for the wait statistic.
    created: Micros,
    /// Executions that counted against `Retry(times)`.
    attempts: u32,
    /// Current execution; events carry it.
    exec: u32,
    running: bool,
    /// Start of the current sleep, poll or wait.
    idle_since: Option<Micros>,
    phase: Phase,
    next_child: u32,
    query_started: Micros,
    /// `seed-backoff`: tries made in this execution.
    tries: u32,
    /// `seed-counter`: when the polling loop began, and the try inside one acquire call.
    poll_start: Micros,
    iter: u32,
    /// `seed-counter`: the query raised; fail once the `finally` release is done.
    failing: bool,
    /// Floodgate: RateLimitExceeded retries so far (kept across executions, like
    /// `@limited`'s header).
    throttles: u32,
    /// Floodgate: the permit held and the queued acquire.
    token: Option<FencingToken>,
    waiter: Option<u64>,
    /// A query task on a worker that has not started its query yet (the `orgs` scenario's
    /// "backlogged at the gate").
    gate_waiting: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    Skipped,
    Failed,
    Killed,
}

#[derive(Debug, Clone, Default)]
struct Unit {
    spawned: bool,
    done: bool,
    wait: Option<Micros>,
    loss: Option<Loss>,
    /// When its query first completed, for the organization's completion time.
    ended: Option<Micros>,
}

/// Snuba's concurrent-query limit.
#[derive(Debug, Default)]
struct Backend {
    limit: u32,
    /// Queries counted now: running plus being rejected.
    counted: u32,
    running: u32,
    peak_counted: u32,
    peak_running: u32,
    attempts: u64,
    rejected: u64,
    series: Vec<(Micros, u32)>,
}

impl Backend {
    /// A query arrives; true if admitted.
    fn arrive(&mut self, now: Micros) -> bool {
        self.attempts += 1;
        self.counted += 1;
        self.peak_counted = self.peak_counted.max(self.counted);
        self.record(now);
        if self.counted > self.limit {
            self.rejected += 1;
            false
        } else {
            self.running += 1;
            self.peak_running = self.peak_running.max(self.running);
            true
        }
    }

    fn leave(&mut self, now: Micros, admitted: bool) {
        self.counted -= 1;
        if admitted {
            self.running -= 1;
        }
        self.record(now);
    }

    fn record(&mut self, now: Micros) {
        self.series.push((now, self.counted));
    }
}

#[derive(Debug, Default)]
struct Stats {
    idle_us: u64,
    retries: u64,
    deadline_kills: u64,
    crashed: u64,
    overshoots: u64,
    cache_errors: u64,
    wait_timeouts: u64,
    extends: u64,
    extend_lost: u64,
    last_end: Micros,
}

struct Sim<'a> {
    cfg: &'a Config,
    wl: &'a Workload,
    strategy: Strategy,
    now: Micros,
    seq: u64,
    heap: BinaryHeap<Scheduled>,
    rng: Rng,
    tasks: Vec<Task>,
    ready: VecDeque<usize>,
    free_workers: u32,
    backend: Backend,
    units: Vec<Unit>,
    cache: DjangoCache,
    limiter: Option<LimiterCore>,
    /// `floodgate-keyed`: the per-organization layer beside `limiter`, which is its total.
    keys: Option<KeyLayer>,
    /// The `orgs` scenario: who is backlogged at the gate, and their throughput shares.
    fair: Option<Fairness>,
    waiters: HashMap<u64, usize>,
    armed: Option<Micros>,
    limit_series: Vec<(Micros, u32)>,
    stats: Stats,
    /// Events handled before giving up: [`MAX_EVENTS`], lower in tests.
    max_events: u64,
}

/// Runs one strategy on the workload.
pub(crate) fn simulate(
    cfg: &Config,
    wl: &Workload,
    strategy: Strategy,
) -> Result<(StrategyReport, Trace), String> {
    simulate_bounded(cfg, wl, strategy, MAX_EVENTS)
}

/// [`simulate`], giving up with an error after `max_events` events.
fn simulate_bounded(
    cfg: &Config,
    wl: &Workload,
    strategy: Strategy,
    max_events: u64,
) -> Result<(StrategyReport, Trace), String> {
    let (limiter, keys) = if strategy == Strategy::FloodgateKeyed {
        // One key per organization, no per-key limit: the total is shared fairly, and a
        // lone organization may still use all of it (work-conserving).
        let keyed = KeyedSpec::default().with_max_keys(cfg.orgs.clamp(1, MAX_KEYS));
        let (total, keys) =
            KeyLayer::new(cfg.limiter_spec(strategy), keyed, 1).map_err(|e| e.to_string())?;
        (Some(total), Some(keys))
    } else if strategy.uses_limiter() {
        let spec = cfg.limiter_spec(strategy);
        (
            Some(LimiterCore::new(spec, 1).map_err(|e| e.to_string())?),
            None,
        )
    } else {
        (None, None)
    };
    let mut sim = Sim {
        cfg,
        wl,
        strategy,
        now: 0,
        seq: 0,
        heap: BinaryHeap::new(),
        rng: Rng::stream(cfg.seed, 1 + strategy.index()),
        tasks: Vec::new(),
        ready: VecDeque::new(),
        free_workers: cfg.workers,
        backend: Backend {
            limit: cfg.backend_limit,
            series: vec![(0, 0)],
            ..Backend::default()
        },
        units: vec![Unit::default(); wl.units()],
        cache: DjangoCache::new(us(cfg.model.counter_ttl)),
        limiter,
        keys,
        fair: (cfg.scenario == super::Scenario::Orgs).then(Fairness::default),
        waiters: HashMap::new(),
        armed: None,
        limit_series: if strategy.uses_limiter() {
            vec![(0, cfg.limit)]
        } else {
            Vec::new()
        },
        stats: Stats::default(),
        max_events,
    };
    sim.run()?;
    Ok(sim.into_report())
}

/// Most events one strategy's run may handle, a minute or so of wall time. Settings that
/// make tasks spin (`--max-wait 0s` with as many workers as tasks: each one re-enqueued every
/// few milliseconds for as long as the work takes) end here with an error instead of running
/// for hours.
const MAX_EVENTS: u64 = 100_000_000;

impl Sim<'_> {
    fn run(&mut self) -> Result<(), String> {
        if let Some((at, c)) = self.cfg.capacity_change {
            self.schedule(us(at), Ev::Capacity(c));
        }
        let batch = self.new_task(Kind::Batch);
        self.ready.push_back(batch);
        self.dispatch();
        let horizon = us(self.cfg.model.horizon);
        let mut events = 0u64;
        while let Some(Scheduled { at, ev, .. }) = self.heap.pop() {
            if at > horizon {
                break;
            }
            events += 1;
            if events > self.max_events {
                return Err(format!(
                    "{}: no end after {} simulated events ({:.0} s of simulated time): \
                     these settings keep tasks retrying without progress; try a longer \
                     --max-wait or --lease, or fewer --orgs",
                    self.strategy,
                    self.max_events,
                    at as f64 / 1e6
                ));
            }
            self.now = at;
            if let Some(fair) = self.fair.as_mut() {
                fair.roll(at);
            }
            match ev {
                Ev::Ready(t) => self.ready.push_back(t),
                Ev::Step(t, exec) => {
                    if self.alive(t, exec) {
                        self.step(t);
                    }
                }
                Ev::Answer {
                    task,
                    exec,
                    admitted,
                } => {
                    self.backend.leave(at, admitted);
                    if self.alive(task, exec) {
                        if admitted {
                            self.query_ok(task);
                        } else {
                            self.query_rejected(task);
                        }
                    }
                }
                Ev::Deadline(t, exec) => {
                    if self.alive(t, exec) {
                        self.kill(t);
                    }
                }
                Ev::Extend(t, exec) => {
                    if self.alive(t, exec) && self.tasks[t].phase == Phase::Querying {
                        self.extend(t);
                    }
                }
                Ev::Capacity(c) => self.backend.limit = c,
                Ev::Timer => {
                    if self.armed == Some(at) {
                        self.armed = None;
                    }
                    let mut fx = Effects::default();
                    match (self.limiter.as_mut(), self.keys.as_mut()) {
                        (Some(core), Some(keys)) => keys.advance(core, Timestamp(at), &mut fx),
                        (Some(core), None) => core.advance(Timestamp(at), &mut fx),
                        _ => {}
                    }
                    self.apply(fx);
                }
            }
            self.dispatch();
        }
        Ok(())
    }

    fn schedule(&mut self, at: Micros, ev: Ev) {
        self.seq += 1;
        self.heap.push(Scheduled {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn alive(&self, t: usize, exec: u32) -> bool {
        let task = &self.tasks[t];
        task.running && task.exec == exec
    }

    fn new_task(&mut self, kind: Kind) -> usize {
        if let Kind::Query(u) = kind {
            self.units[u as usize].spawned = true;
        }
        self.tasks.push(Task {
            kind,
            created: self.now,
            attempts: 1,
            exec: 0,
            running: false,
            idle_since: None,
            phase: Phase::Start,
            next_child: 0,
            query_started: 0,
            tries: 0,
            poll_start: 0,
            iter: 0,
            failing: false,
            throttles: 0,
            token: None,
            waiter: None,
            gate_waiting: false,
        });
        self.tasks.len() - 1
    }

    /// Hands queued tasks to free workers, in FIFO order.
    fn dispatch(&mut self) {
        while self.free_workers > 0 {
            let Some(t) = self.ready.pop_front() else {
                break;
            };
            self.free_workers -= 1;
            self.start(t);
        }
    }

    fn deadline_of(&self, kind: Kind) -> Duration {
        let m = &self.cfg.model;
        match kind {
            Kind::Batch => m.batch_deadline,
            Kind::Org(_) => m.org_deadline,
            Kind::Query(_) if self.strategy == Strategy::SeedBackoff => m.backoff_deadline,
            Kind::Query(_) => m.query_deadline,
        }
    }

    fn retry_times(&self, kind: Kind) -> u32 {
        match kind {
            Kind::Query(_) if self.strategy == Strategy::SeedBackoff => {
                self.cfg.model.backoff_retry_times
            }
            _ => self.cfg.model.retry_times,
        }
    }

    fn start(&mut self, t: usize) {
        let now = self.now;
        let task = &mut self.tasks[t];
        task.exec += 1;
        task.running = true;
        task.phase = Phase::Start;
        task.next_child = 0;
        task.tries = 0;
        task.iter = 0;
        task.failing = false;
        task.token = None;
        task.waiter = None;
        task.idle_since = None;
        let (kind, exec) = (task.kind, task.exec);
        let deadline = us(self.deadline_of(kind));
        self.schedule(now + deadline, Ev::Deadline(t, exec));
        let overhead = us(self.cfg.model.task_overhead);
        self.schedule(now + overhead, Ev::Step(t, exec));
    }

    /// Continues task `t` after `after`, in `phase`.
    fn after(&mut self, t: usize, after: Micros, phase: Phase) {
        self.tasks[t].phase = phase;
        let exec = self.tasks[t].exec;
        self.schedule(self.now + after, Ev::Step(t, exec));
    }

    fn start_idle(&mut self, t: usize, since: Micros) {
        self.tasks[t].idle_since = Some(since);
    }

    fn end_idle(&mut self, t: usize) {
        if let Some(since) = self.tasks[t].idle_since.take() {
            self.stats.idle_us += self.now.saturating_sub(since);
        }
    }

    /// The execution ends and its worker is free.
    fn finish(&mut self, t: usize) {
        self.end_idle(t);
        self.leave_gate(t);
        self.tasks[t].running = false;
        self.free_workers += 1;
        self.stats.last_end = self.stats.last_end.max(self.now);
    }

    /// The execution raised (or was killed): retried at the back of the queue while
    /// `Retry(times)` allows, else its work is lost for `loss`.
    fn fail(&mut self, t: usize, loss: Loss) {
        let kind = self.tasks[t].kind;
        self.finish(t);
        if self.tasks[t].attempts < self.retry_times(kind) {
            self.tasks[t].attempts += 1;
            self.stats.retries += 1;
            self.ready.push_back(t);
        } else if let Kind::Query(u) = kind {
            // Only the last execution's end is a loss: one retried is still pending, and
            // counts as unfinished if simulated time runs out before it ends.
            self.units[u as usize].loss = Some(loss);
        }
    }

    /// The execution ends and the task runs again after `countdown` (a Celery retry with a
    /// countdown that does not spend `Retry(times)`).
    fn requeue(&mut self, t: usize, countdown: Micros) {
        self.finish(t);
        if countdown == 0 {
            self.ready.push_back(t);
        } else {
            self.schedule(self.now + countdown, Ev::Ready(t));
        }
    }

    /// The processing deadline passed: the worker child is killed. Nothing of the task runs
    /// any more, so a permit or counter slot it holds is not given back.
    fn kill(&mut self, t: usize) {
        self.stats.deadline_kills += 1;
        if let Some(w) = self.tasks[t].waiter.take() {
            // The long poll's connection closes; the server cancels the waiter.
            self.waiters.remove(&w);
            let mut fx = Effects::default();
            match (self.limiter.as_mut(), self.keys.as_mut()) {
                (Some(core), Some(keys)) => {
                    keys.cancel(core, Timestamp(self.now), WaiterId(w), &mut fx);
                }
                (Some(core), None) => {
                    core.cancel(Timestamp(self.now), WaiterId(w), &mut fx);
                }
                _ => {}
            }
            self.apply(fx);
        }
        self.fail(t, Loss::Killed);
    }

    fn step(&mut self, t: usize) {
        let task = &self.tasks[t];
        match (task.kind, task.phase) {
            (Kind::Batch | Kind::Org(_), Phase::Start | Phase::Spawning) => self.spawn_next(t),
            (_, Phase::BatchSleep) => {
                self.end_idle(t);
                self.spawn_next(t);
            }
            (Kind::Query(_), Phase::Start) => self.query_task_start(t),
            (Kind::Query(_), Phase::Backoff) => {
                self.end_idle(t);
                self.issue_query(t);
            }
            (Kind::Query(_), Phase::Counter(cs)) => self.counter_step(t, cs),
            // Querying and Waiting move on answers and wake-ups, not steps.
            _ => {}
        }
    }

    /// One `delay()` of a batch or organization task, or its end.
    fn spawn_next(&mut self, t: usize) {
        let task = &self.tasks[t];
        let i = task.next_child;
        let (count, child) = match task.kind {
            Kind::Batch => (self.cfg.orgs, Kind::Org(i)),
            Kind::Org(o) => {
                let r = self.wl.units_of(o);
                (r.end - r.start, Kind::Query(r.start + i))
            }
            Kind::Query(_) => (0, Kind::Batch),
        };
        if i >= count {
            self.finish(t);
            return;
        }
        let c = self.new_task(child);
        self.ready.push_back(c);
        self.tasks[t].next_child = i + 1;
        let cfg = self.cfg;
        let m = &cfg.model;
        let delay = us(m.delay_cost);
        let batch_done = (i + 1) % m.batch_size.max(1) == 0 && i + 1 < count;
        if self.tasks[t].kind == Kind::Batch && self.strategy == Strategy::SeedBatches && batch_done
        {
            let sleep = us(m.batch_sleep);
            self.start_idle(t, self.now + delay);
            self.after(t, delay + sleep, Phase::BatchSleep);
        } else {
            self.after(t, delay, Phase::Spawning);
        }
    }

    // ---- seed-counter -------------------------------------------------------------------

    // ---- floodgate ----------------------------------------------------------------------

    // ---- the report ---------------------------------------------------------------------
}

/// When a refused acquire's task should run again.
fn retry_after(refusal: &Refusal) -> Micros {
    match refusal {
        Refusal::WaitTimeout { retry_after } | Refusal::QueueFull { retry_after } => {
            us(*retry_after).max(1)
        }
        _ => 1_000_000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_past_its_budget_of_events_ends_with_an_error() {
        // Tries once and re-enqueues on every refusal: the most events per query of the
        // Floodgate runs, and a small budget to run out of.
        let cfg = Config {
            orgs: 100,
            max_wait: Duration::ZERO,
            strategies: vec![Strategy::Floodgate],
            ..Config::default()
        };
        let wl = Workload::generate(&cfg).expect("a small workload");
        let err = simulate_bounded(&cfg, &wl, Strategy::Floodgate, 1_000)
            .expect_err("gives up after its budget of events");
        assert!(err.starts_with("floodgate: no end after 1000 "), "{err}");
        // The same run with the events it needs finishes.
        let (r, _) = simulate(&cfg, &wl, Strategy::Floodgate).expect("finishes");
        assert_eq!(r.lost, 0);
    }
}
