//! Property test of the rate limit's arithmetic (GCRA) in [`LimiterCore`], against a reference
//! model written from the algorithm's textbook definition rather than from the core.
//!
//! The model is the *virtual scheduling* form of GCRA, on unit cells: with emission interval
//! `T` and tolerance `tau`, a cell arriving at `t` conforms iff `t >= TAT - tau`, and a
//! conforming cell moves `TAT` to `max(TAT, t) + T`. A burst of `b` back-to-back cells is
//! allowed when `tau = (b - 1) * T`. An acquire of `k` permits is `k` cells arriving together,
//! granted only if all `k` conform (all or nothing).
//!
//! That matches the core's documented rule. The `k`-th cell is the binding one: cell `j`
//! (1-based) sees `TAT_j = max(TAT, t) + (j - 1) * T`, so all conform iff
//! `t >= max(TAT, t) + (k - 1) * T - (b - 1) * T`. If `TAT >= t` that is
//! `t >= TAT + k * T - b * T`, the core's `rate_at(k)`; if `TAT < t` it holds iff `k <= b`,
//! and then `rate_at(k) < t` too. After the grant, `TAT = max(TAT, t) + k * T`, the core's
//! update. (A request of more than `b` tokens never conforms; the core refuses it up front.)
//! The model never uses that closed form: it plays the cells one by one and finds the earliest
//! conforming time by bisection.
//!
//! Random sequences of acquires (1 to burst + 1 permits, waits of zero, of the default, or of
//! some quarter-intervals, often landing exactly on token times), clock advances, `schedule`
//! calls and cancels (and, with a concurrency limit, releases and lease ends) drive a
//! rate-only core, and a core with both a rate and a concurrency limit. The clock advances as a store's
//! timer moves it: through every deadline the core reports, so a head waiter is granted at its
//! token time exactly, and a missing or late deadline shows up as a late grant.
//!
//! Checked: the core and the model agree on every admission (grant with its time and token,
//! queueing, refusal kind, and the exact retry time of an acquire refused because its token
//! time lies past its wait), every wake-up in order, every `schedule` offset, every release
//! and cancel result, the counters, in-use, the queue length and the next deadline; and, on
//! the core's output alone, the GCRA bound: for every window `[a, b]` between two grant or
//! reservation times, the tokens taken within it are at most `burst + floor((b - a) / T)`.

use std::collections::HashMap;
use std::time::Duration;

use floodgate::core::{AcquireRequest, Admission, Effects, Grant, LimiterCore, Refusal, WaiterId};
use floodgate::{FencingToken, LimiterSpec, RateSpec, Timestamp};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{FileFailurePersistence, TestCaseError, TestRunner};

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).expect("durations in this test fit in u64 microseconds")
}

const MIN_LEASE_US: u64 = 1_000;

// ---------------------------------------------------------------------------------------------
// Generated scenarios
// ---------------------------------------------------------------------------------------------

/// A limiter configuration. Durations are in quarters of the emission interval (resolved once
/// the interval is known) so that waits, leases and clock steps often land on token times.
#[derive(Debug, Clone)]
struct Config {
    limit: u32,
    period_us: u64,
    burst: u32,
    concurrency: Option<u32>,
    max_wait_quarters: u64,
    default_lease_quarters: u64,
    max_queue: u32,
    start_us: u64,
    first_token: u64,
}

impl Config {
    /// The emission interval, computed here from its definition: the period divided by the
    /// limit, rounded up to a whole microsecond (so the rate is never exceeded).
    fn interval(&self) -> u64 {
        let l = u64::from(self.limit);
        (self.period_us.div_ceil(l)).max(1)
    }

    fn quarter(&self) -> u64 {
        (self.interval() / 4).max(1)
    }

    fn lease(&self, quarters: u64) -> Duration {
        Duration::from_micros((quarters * self.quarter()).max(MIN_LEASE_US))
    }

    fn spec(&self) -> LimiterSpec {
        let mut spec = LimiterSpec::rate(
            RateSpec::per(self.limit, Duration::from_micros(self.period_us)).with_burst(self.burst),
        )
        .with_default_lease(self.lease(self.default_lease_quarters))
        .with_max_wait(Duration::from_micros(
            self.max_wait_quarters * self.quarter(),
        ))
        .with_max_queue(self.max_queue);
        spec.concurrency = self.concurrency;
        spec
    }
}

#[derive(Debug, Clone)]
enum PermitChoice {
    One,
    /// Mapped to `1..=min(burst, concurrency)`.
    Within(u32),
    /// `burst + 1`: never possible.
    Over,
}

#[derive(Debug, Clone)]
enum WaitChoice {
    /// Try once.
    Zero,
    /// The limiter's `max_wait`.
    Default,
    /// This many quarter-intervals, plus or minus a microsecond.
    Quarters(u64, i8),
}

#[derive(Debug, Clone)]
enum Span {
    Micros(u64),
    Quarters(u64, i8),
    Intervals(u64),
}

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        permits: PermitChoice,
        wait: WaitChoice,
        lease_quarters: Option<u64>,
    },
    /// Moves the clock forward, through every deadline on the way.
    Advance(Span),
    Schedule(u32),
    /// Gives back unused tokens of the latest reservation (`stale`: of an id that is not it).
    Unschedule {
        unused: u32,
        stale: bool,
    },
    /// Releases a held grant (or a gone one, if none is held).
    Release(usize),
    /// Cancels a queued waiter (or a departed one, if none is queued).
    Cancel(usize),
}

fn config(concurrency: Option<std::ops::RangeInclusive<u32>>) -> impl Strategy<Value = Config> {
    let conc = match concurrency {
        None => Just(None).boxed(),
        Some(r) => r.prop_map(Some).boxed(),
    };
    (
        prop_oneof![
            // Limits that divide a round period into intervals divisible by 4, so that
            // quarter-interval waits and steps land exactly on token times.
            3 => prop::sample::select(vec![1_u32, 2, 4, 5, 8, 10, 20, 25]),
            1 => 1_u32..=30,
        ],
        prop_oneof![
            Just(1_000_u64),
            Just(10_000),
            Just(100_000),
            Just(1_000_000),
            1_000_u64..=2_000_000,
        ],
        prop_oneof![2 => 1_u32..=2, 3 => 3_u32..=5],
        conc,
        prop_oneof![1 => Just(0_u64), 4 => 1_u64..=40],
        1_u64..=24,
        prop_oneof![1 => Just(0_u32), 1 => Just(1), 4 => 2_u32..=8],
        prop_oneof![Just(0_u64), Just(1), 0_u64..10_000_000],
        prop_oneof![Just(0_u64), 1_u64..1_000],
    )
        .prop_map(
            |(
                limit,
                period_us,
                burst,
                concurrency,
                max_wait_quarters,
                default_lease_quarters,
                max_queue,
                start_us,
                first_token,
            )| Config {
                limit,
                period_us,
                burst,
                concurrency,
                max_wait_quarters,
                default_lease_quarters,
                max_queue,
                start_us,
                first_token,
            },
        )
}

/// A microsecond either side of a quarter-interval, now and then; mostly none, so times tie.
fn jitter() -> impl Strategy<Value = i8> {
    prop_oneof![6 => Just(0_i8), 1 => Just(-1), 1 => Just(1)]
}

fn wait_choice() -> impl Strategy<Value = WaitChoice> {
    prop_oneof![
        2 => Just(WaitChoice::Zero),
        1 => Just(WaitChoice::Default),
        5 => (1_u64..=24, jitter()).prop_map(|(q, j)| WaitChoice::Quarters(q, j)),
    ]
}

fn span() -> impl Strategy<Value = Span> {
    prop_oneof![
        1 => (0_u64..=3).prop_map(Span::Micros),
        6 => (1_u64..=12, jitter()).prop_map(|(q, j)| Span::Quarters(q, j)),
        1 => (4_u64..=40).prop_map(Span::Intervals),
    ]
}

fn op(with_concurrency: bool) -> impl Strategy<Value = Op> {
    let holders = if with_concurrency { 3 } else { 0 };
    prop_oneof![
        7 => (
            prop_oneof![
                3 => Just(PermitChoice::One),
                3 => any::<u32>().prop_map(PermitChoice::Within),
                1 => Just(PermitChoice::Over),
            ],
            wait_choice(),
            prop_oneof![Just(None), (1_u64..=24).prop_map(Some)],
        )
            .prop_map(|(permits, wait, lease_quarters)| Op::Acquire {
                permits,
                wait,
                lease_quarters,
            }),
        5 => span().prop_map(Op::Advance),
        1 => (1_u32..=6).prop_map(Op::Schedule),
        1 => (1_u32..=8, proptest::bool::weighted(0.2))
            .prop_map(|(unused, stale)| Op::Unschedule { unused, stale }),
        holders => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Cancel),
    ]
}

fn scenario(
    concurrency: Option<std::ops::RangeInclusive<u32>>,
) -> impl Strategy<Value = (Config, Vec<Op>)> {
    let with = concurrency.is_some();
    (config(concurrency), prop::collection::vec(op(with), 1..=80))
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

/// A refusal, without the retry hint except where the model knows it exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Why {
    /// The token time lies past the wait: refused at once with the exact time until it.
    RateTooLate(Duration),
    WaitTimeout,
    QueueFull,
    PermitsExceedLimit {
        requested: u32,
        limit: u32,
    },
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Admit {
    Granted(Grant),
    /// The model's waiter id.
    Queued(u64),
    Refused(Why),
}

/// A wake-up: the model's waiter id and its outcome (`None`: the wait timed out).
type Wake = (u64, Option<Grant>);

#[derive(Debug, Clone)]
struct MHolder {
    token: u64,
    permits: u32,
    deadline: u64,
}

#[derive(Debug, Clone)]
struct MWaiter {
    id: u64,
    permits: u32,
    lease: Duration,
    enqueued_at: u64,
    deadline: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct MCounters {
    granted: u64,
    paced: u64,
    released: u64,
    expired: u64,
    timed_out: u64,
    cancelled: u64,
    queue_full: u64,
    rejected: u64,
    scheduled: u64,
}

impl MCounters {
    fn of(c: floodgate::Counters) -> MCounters {
        MCounters {
            granted: c.granted,
            paced: c.paced,
            released: c.released,
            expired: c.expired,
            timed_out: c.timed_out,
            cancelled: c.cancelled,
            queue_full: c.queue_full,
            rejected: c.rejected,
            scheduled: c.scheduled,
        }
    }
}

/// What happens at an instant, in the order the rules settle it: a grant the head is due goes
/// first (a waiter whose token time equals its deadline is granted), then a lease end (a lease
/// ending as a wait ends frees its slot for that waiter), then wait ends in queue order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Grant,
    Lease(usize),
    Wait(usize),
}

#[derive(Debug)]
struct Model {
    /// Emission interval `T`.
    t: i128,
    /// Tolerance `tau = (burst - 1) * T`.
    tau: i128,
    burst: u32,
    concurrency: Option<u32>,
    default_lease: Duration,
    max_wait: u64,
    max_queue: usize,
    /// Theoretical arrival time of the next cell.
    tat: i128,
    now: u64,
    holders: Vec<MHolder>,
    queue: Vec<MWaiter>,
    next_token: u64,
    next_waiter: u64,
    departed: Vec<u64>,
    gone_tokens: Vec<u64>,
    counters: MCounters,
    /// When the last lease ended, and grants made at that same instant (for coverage).
    last_lease_end: Option<u64>,
    grants_after_lease_end: u64,
    /// Heads granted exactly at their wait deadline (for coverage).
    grants_at_deadline: u64,
    /// The latest reservation: its id, `tat` right after it, and the start times of the
    /// tokens it still holds, in order.
    reservation: Option<(u64, i128, Vec<u64>)>,
}

impl Model {
    fn new(cfg: &Config) -> Model {
        let t = i128::from(cfg.interval());
        Model {
            t,
            tau: i128::from(cfg.burst - 1) * t,
            burst: cfg.burst,
            concurrency: cfg.concurrency,
            default_lease: cfg.lease(cfg.default_lease_quarters),
            max_wait: cfg.max_wait_quarters * cfg.quarter(),
            max_queue: cfg.max_queue as usize,
            tat: 0,
            now: cfg.start_us,
            holders: Vec::new(),
            queue: Vec::new(),
            next_token: cfg.first_token.max(1),
            next_waiter: 0,
            departed: Vec::new(),
            gone_tokens: Vec::new(),
            counters: MCounters::default(),
            last_lease_end: None,
            grants_after_lease_end: 0,
            grants_at_deadline: 0,
            reservation: None,
        }
    }

    /// Would `k` cells arriving together at `at` all conform?
    fn conforms(&self, k: u32, at: u64) -> bool {
        let at = i128::from(at);
        let mut tat = self.tat;
        for _ in 0..k {
            if at < tat - self.tau {
                return false;
            }
            tat = tat.max(at) + self.t;
        }
        true
    }

    /// The earliest time from `from` on at which `k` cells conform (conformance only gets
    /// easier as time passes, so bisection finds it).
    fn earliest(&self, k: u32, from: u64) -> Option<u64> {
        if k > self.burst {
            return None;
        }
        if self.conforms(k, from) {
            return Some(from);
        }
        let tat = u64::try_from(self.tat).expect("TAT is never negative");
        let mut lo = from;
        let mut hi = from.max(tat) + u64::from(k) * u64::try_from(self.t).expect("T fits");
        assert!(self.conforms(k, hi), "model bug: {k} cells never conform");
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.conforms(k, mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    }

    /// Plays `k` cells at `at`.
    fn take(&mut self, k: u32, at: u64) {
        for _ in 0..k {
            self.tat = self.tat.max(i128::from(at)) + self.t;
        }
    }

    fn in_use(&self) -> u32 {
        self.holders.iter().map(|h| h.permits).sum()
    }

    fn fits(&self, permits: u32) -> bool {
        self.concurrency
            .is_none_or(|c| self.in_use() + permits <= c)
    }

    fn cap(&self) -> u32 {
        self.concurrency.map_or(self.burst, |c| c.min(self.burst))
    }

    fn grant(&mut self, at: u64, permits: u32, lease: Duration, enqueued_at: u64) -> Grant {
        assert!(
            self.fits(permits) && self.conforms(permits, at),
            "model bug"
        );
        let token = self.next_token;
        self.next_token += 1;
        self.take(permits, at);
        self.counters.granted += 1;
        let waited = Duration::from_micros(at - enqueued_at);
        if self.concurrency.is_none() {
            self.counters.paced += 1;
            return Grant {
                token: FencingToken(token),
                permits,
                lease: Duration::ZERO,
                lease_deadline: Timestamp(at),
                granted_at: Timestamp(at),
                waited,
            };
        }
        let deadline = at + micros(lease);
        self.holders.push(MHolder {
            token,
            permits,
            deadline,
        });
        Grant {
            token: FencingToken(token),
            permits,
            lease,
            lease_deadline: Timestamp(deadline),
            granted_at: Timestamp(at),
            waited,
        }
    }

    /// When the head of the queue is next granted, if nothing else happens first.
    fn head_due(&self) -> Option<u64> {
        let head = self.queue.first()?;
        if !self.fits(head.permits) {
            return None;
        }
        self.earliest(head.permits, self.now)
    }

    /// The next event at or before `until`, with its time.
    fn next_event(&self, until: u64) -> Option<(u64, Event)> {
        let grant = self.head_due().map(|t| (t, Event::Grant));
        let lease = self
            .holders
            .iter()
            .enumerate()
            .map(|(i, h)| (h.deadline, Event::Lease(i)))
            .min();
        let wait = self
            .queue
            .iter()
            .enumerate()
            .map(|(i, w)| (w.deadline, Event::Wait(i)))
            .min();
        [grant, lease, wait]
            .into_iter()
            .flatten()
            .filter(|(t, _)| *t <= until)
            .min()
    }

    /// Plays every event up to `until` in time order, then sets the clock to `until`.
    fn advance(&mut self, until: u64, wakes: &mut Vec<Wake>) {
        while let Some((at, event)) = self.next_event(until) {
            self.now = at;
            match event {
                Event::Grant => {
                    let w = self.queue.remove(0);
                    self.departed.push(w.id);
                    if w.deadline == at {
                        self.grants_at_deadline += 1;
                    }
                    if self.last_lease_end == Some(at) {
                        self.grants_after_lease_end += 1;
                    }
                    let g = self.grant(at, w.permits, w.lease, w.enqueued_at);
                    wakes.push((w.id, Some(g)));
                }
                Event::Lease(i) => {
                    let h = self.holders.remove(i);
                    self.gone_tokens.push(h.token);
                    self.counters.expired += 1;
                    self.last_lease_end = Some(at);
                }
                Event::Wait(i) => {
                    let w = self.queue.remove(i);
                    self.departed.push(w.id);
                    self.counters.timed_out += 1;
                    wakes.push((w.id, None));
                }
            }
        }
        self.now = self.now.max(until);
    }

    fn next_deadline(&self) -> Option<u64> {
        self.next_event(u64::MAX).map(|(t, _)| t)
    }

    fn acquire(
        &mut self,
        now: u64,
        permits: u32,
        lease: Option<Duration>,
        wait: Option<u64>,
        wakes: &mut Vec<Wake>,
    ) -> Admit {
        self.advance(now, wakes);
        if permits > self.cap() {
            self.counters.rejected += 1;
            return Admit::Refused(Why::PermitsExceedLimit {
                requested: permits,
                limit: self.cap(),
            });
        }
        let lease = lease.unwrap_or(self.default_lease);
        let wait = wait.unwrap_or(self.max_wait).min(self.max_wait);
        if self.queue.is_empty() && self.fits(permits) {
            let at = self.earliest(permits, now).expect("within the burst");
            if at == now {
                return Admit::Granted(self.grant(now, permits, lease, now));
            }
            if at - now > wait {
                self.counters.timed_out += 1;
                let hint = Duration::from_micros(at - now).max(Duration::from_millis(1));
                return Admit::Refused(Why::RateTooLate(hint));
            }
        } else if wait == 0 {
            self.counters.timed_out += 1;
            return Admit::Refused(Why::WaitTimeout);
        }
        if self.queue.len() >= self.max_queue {
            self.counters.queue_full += 1;
            return Admit::Refused(Why::QueueFull);
        }
        let id = self.next_waiter;
        self.next_waiter += 1;
        self.queue.push(MWaiter {
            id,
            permits,
            lease,
            enqueued_at: now,
            deadline: now + wait,
        });
        Admit::Queued(id)
    }

    /// `None`: refused, nothing reserved (the last token would start after `max_wait`).
    fn schedule(
        &mut self,
        now: u64,
        count: u32,
        id: u64,
        wakes: &mut Vec<Wake>,
    ) -> Option<Vec<Duration>> {
        self.advance(now, wakes);
        let before = self.tat;
        let mut out = Vec::new();
        for _ in 0..count {
            let at = self
                .earliest(1, now)
                .expect("one cell always conforms eventually");
            out.push(Duration::from_micros(at - now));
            self.take(1, at);
        }
        if out
            .last()
            .is_some_and(|d| *d > Duration::from_micros(self.max_wait))
        {
            self.tat = before;
            return None;
        }
        self.counters.scheduled += u64::from(count);
        self.reservation = Some((id, self.tat, out.iter().map(|d| now + micros(*d)).collect()));
        // Reserving tokens never grants anyone.
        Some(out)
    }

    /// Gives back the reservation's tail tokens that have not started (at most `unused`), if it
    /// is the latest and no cell was played after it: un-playing the last n cells is exact.
    fn unschedule(&mut self, now: u64, id: u64, unused: u32, wakes: &mut Vec<Wake>) -> u32 {
        self.advance(now, wakes);
        let tat = self.tat;
        let Some((rid, end, times)) = self.reservation.as_mut() else {
            return 0;
        };
        if *rid != id || *end != tat {
            return 0;
        }
        let future = times.iter().rev().take_while(|at| **at > now).count();
        let n = future.min(unused as usize);
        times.truncate(times.len() - n);
        self.tat -= self.t * n as i128;
        *end = self.tat;
        // Tokens came back: a head the rate held may go now.
        self.advance(now, wakes);
        u32::try_from(n).expect("at most a schedule's count")
    }

    fn release(&mut self, now: u64, token: u64, wakes: &mut Vec<Wake>) -> bool {
        self.advance(now, wakes);
        let Some(i) = self.holders.iter().position(|h| h.token == token) else {
            return false;
        };
        self.holders.remove(i);
        self.gone_tokens.push(token);
        self.counters.released += 1;
        self.advance(now, wakes);
        true
    }

    fn cancel(&mut self, now: u64, id: u64, wakes: &mut Vec<Wake>) -> bool {
        self.advance(now, wakes);
        let Some(i) = self.queue.iter().position(|w| w.id == id) else {
            return false;
        };
        self.queue.remove(i);
        self.departed.push(id);
        self.counters.cancelled += 1;
        self.advance(now, wakes);
        true
    }
}

// ---------------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------------

/// Which paths a scenario reached, so the generator can be held to reaching all of them.
#[derive(Debug, Default, Clone, Copy)]
struct Coverage {
    direct_grants: u64,
    grants_on_advance: u64,
    /// A head granted at exactly its wait deadline (the token time ties with the deadline).
    grants_at_deadline: u64,
    grants_on_release: u64,
    grants_after_lease_end: u64,
    queued: u64,
    wait_timeouts: u64,
    rate_too_late: u64,
    try_once: u64,
    queue_full: u64,
    exceeds: u64,
    schedules_ahead: u64,
    /// Unused reservation tokens given back (at least one).
    unschedules: u64,
    cancels: u64,
    multi_permit_grants: u64,
}

struct Harness {
    cfg: Config,
    core: LimiterCore,
    model: Model,
    now: u64,
    /// Core waiter id -> model waiter id, and back.
    ids: HashMap<u64, u64>,
    core_ids: HashMap<u64, u64>,
    /// Every token taken on the core's output: (time, tokens).
    taken: Vec<(u64, u64)>,
    /// Reservations made so far (each one's id is its number).
    reservations: u64,
    /// Start times of the tokens the latest reservation still holds, as the core answered.
    reserved: Vec<u64>,
    coverage: Coverage,
}

impl Harness {
    fn new(cfg: &Config) -> Harness {
        let core = LimiterCore::new(cfg.spec(), cfg.first_token).expect("a valid spec");
        Harness {
            cfg: cfg.clone(),
            core,
            model: Model::new(cfg),
            now: cfg.start_us,
            ids: HashMap::new(),
            core_ids: HashMap::new(),
            taken: Vec::new(),
            reservations: 0,
            reserved: Vec::new(),
            coverage: Coverage::default(),
        }
    }

    fn quarters(&self, q: u64, jitter: i8) -> u64 {
        (q * self.cfg.quarter()).saturating_add_signed(i64::from(jitter))
    }

    /// The core's wake-ups, in model ids; grants are logged.
    fn wakes(&mut self, fx: &Effects) -> Result<Vec<Wake>, TestCaseError> {
        let mut out = Vec::new();
        for (id, outcome) in &fx.wakes {
            let Some(&mid) = self.ids.get(&id.0) else {
                return Err(TestCaseError::fail(format!(
                    "wake of unknown waiter {id:?}"
                )));
            };
            match outcome {
                Ok(g) => {
                    self.taken.push((g.granted_at.0, u64::from(g.permits)));
                    out.push((mid, Some(g.clone())));
                }
                Err(Refusal::WaitTimeout { .. }) => out.push((mid, None)),
                Err(r) => {
                    return Err(TestCaseError::fail(format!("unexpected wake {r:?}")));
                }
            }
        }
        Ok(out)
    }

    fn admit(&mut self, a: &Admission) -> Admit {
        match a {
            Admission::Granted(g) => {
                self.taken.push((g.granted_at.0, u64::from(g.permits)));
                Admit::Granted(g.clone())
            }
            Admission::Queued(id) => Admit::Queued(id.0),
            Admission::Refused(r) => Admit::Refused(match r {
                Refusal::WaitTimeout { retry_after } => {
                    // Only an acquire held back by the rate alone learns its exact time; the
                    // model knows which those are and compares the hint.
                    Why::RateTooLate(*retry_after)
                }
                Refusal::QueueFull { .. } => Why::QueueFull,
                Refusal::PermitsExceedLimit { requested, limit } => Why::PermitsExceedLimit {
                    requested: *requested,
                    limit: *limit,
                },
                other => Why::Other(format!("{other:?}")),
            }),
        }
    }

    /// Moves both clocks to `target`, stepping the core through every deadline it reports on
    /// the way, as a store's timer does.
    fn advance_to(&mut self, target: u64) -> Result<(), TestCaseError> {
        let mut fx = Effects::default();
        loop {
            match self.core.next_deadline() {
                Some(d) if d.0 <= target => {
                    // Everything due at `now` was settled by the last call; a deadline in the
                    // past would be a head that conforms but was never granted.
                    prop_assert!(
                        d.0 > self.now,
                        "next deadline {} not after now {}",
                        d.0,
                        self.now
                    );
                    self.now = d.0;
                    self.core.advance(d, &mut fx);
                }
                _ => break,
            }
        }
        self.now = target;
        self.core.advance(Timestamp(target), &mut fx);
        let core_wakes = self.wakes(&fx)?;
        let mut model_wakes = Vec::new();
        self.model.advance(target, &mut model_wakes);
        for (_, outcome) in &model_wakes {
            match outcome {
                Some(_) => self.coverage.grants_on_advance += 1,
                None => self.coverage.wait_timeouts += 1,
            }
        }
        prop_assert_eq!(core_wakes, model_wakes, "wake-ups while advancing");
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let now = self.now;
        match op {
            Op::Advance(span) => {
                let dt = match *span {
                    Span::Micros(us) => us,
                    Span::Quarters(q, j) => self.quarters(q, j),
                    Span::Intervals(k) => k * self.cfg.interval(),
                };
                self.advance_to(now + dt)?;
            }
            Op::Acquire {
                permits,
                wait,
                lease_quarters,
            } => {
                let permits = match *permits {
                    PermitChoice::One => 1,
                    PermitChoice::Within(n) => 1 + n % self.model.cap(),
                    PermitChoice::Over => self.cfg.burst + 1,
                };
                let wait_us = match *wait {
                    WaitChoice::Zero => Some(0),
                    WaitChoice::Default => None,
                    WaitChoice::Quarters(q, j) => Some(self.quarters(q, j)),
                };
                let lease = lease_quarters.map(|q| self.cfg.lease(q));
                let req = AcquireRequest {
                    permits,
                    lease,
                    wait: wait_us.map(Duration::from_micros),
                    holder: None,
                    request_id: None,
                };
                let mut fx = Effects::default();
                let admission = self.core.acquire(Timestamp(now), &req, &mut fx);
                let core_wakes = self.wakes(&fx)?;
                let core_admit = self.admit(&admission);
                let mut model_wakes = Vec::new();
                let model_admit =
                    self.model
                        .acquire(now, permits, lease, wait_us, &mut model_wakes);
                prop_assert_eq!(core_wakes, model_wakes, "wake-ups on acquire");
                // The core's retry hint is compared only where the model knows it exactly.
                let core_admit = match (&core_admit, &model_admit) {
                    (Admit::Refused(Why::RateTooLate(_)), Admit::Refused(Why::WaitTimeout)) => {
                        Admit::Refused(Why::WaitTimeout)
                    }
                    _ => core_admit,
                };
                if let (Admit::Queued(cid), Admit::Queued(mid)) = (&core_admit, &model_admit) {
                    self.ids.insert(*cid, *mid);
                    self.core_ids.insert(*mid, *cid);
                }
                let c = &mut self.coverage;
                match &model_admit {
                    Admit::Granted(g) => {
                        c.direct_grants += 1;
                        if g.permits > 1 {
                            c.multi_permit_grants += 1;
                        }
                    }
                    Admit::Queued(_) => c.queued += 1,
                    Admit::Refused(Why::RateTooLate(_)) => c.rate_too_late += 1,
                    Admit::Refused(Why::WaitTimeout) => c.try_once += 1,
                    Admit::Refused(Why::QueueFull) => c.queue_full += 1,
                    Admit::Refused(Why::PermitsExceedLimit { .. }) => c.exceeds += 1,
                    Admit::Refused(Why::Other(_)) => {}
                }
                prop_assert_eq!(core_admit, model_admit, "admission of {:?}", req);
            }
            Op::Schedule(count) => {
                let mut fx = Effects::default();
                self.reservations += 1;
                let id = self.reservations;
                let offsets = self.core.schedule(Timestamp(now), *count, id, &mut fx).ok();
                let core_wakes = self.wakes(&fx)?;
                let mut model_wakes = Vec::new();
                let expected = self.model.schedule(now, *count, id, &mut model_wakes);
                prop_assert_eq!(core_wakes, model_wakes, "wake-ups on schedule");
                // Both refuse the same schedules (past max_wait), reserving nothing.
                match (offsets, expected) {
                    (Some(offsets), Some(expected)) => {
                        prop_assert_eq!(&offsets, &expected, "schedule offsets");
                        prop_assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
                        if offsets.iter().any(|o| !o.is_zero()) {
                            self.coverage.schedules_ahead += 1;
                        }
                        self.reserved.clear();
                        for o in offsets {
                            self.taken.push((now + micros(o), 1));
                            self.reserved.push(now + micros(o));
                        }
                    }
                    (offsets, expected) => {
                        prop_assert_eq!(offsets, expected, "schedule refused by one side only");
                    }
                }
            }
            Op::Unschedule { unused, stale } => {
                let id = self.reservations + u64::from(*stale);
                let mut fx = Effects::default();
                let returned = self
                    .core
                    .unschedule(Timestamp(now), id, *unused, &mut fx)
                    .ok();
                let core_wakes = self.wakes(&fx)?;
                let mut model_wakes = Vec::new();
                let expected = self.model.unschedule(now, id, *unused, &mut model_wakes);
                prop_assert_eq!(core_wakes, model_wakes, "wake-ups on unschedule");
                prop_assert_eq!(returned, Some(expected), "tokens returned");
                if expected > 0 {
                    self.coverage.unschedules += 1;
                }
                // The witness forgets the tokens given back: they were never used.
                for _ in 0..expected {
                    let at = self
                        .reserved
                        .pop()
                        .expect("returned at most what was reserved");
                    let i = self
                        .taken
                        .iter()
                        .rposition(|t| *t == (at, 1))
                        .expect("a reserved token is in the witness");
                    self.taken.remove(i);
                }
            }
            Op::Release(pick) => {
                let token = if self.model.holders.is_empty() {
                    match self.model.gone_tokens.len() {
                        0 => 1_000_000_000,
                        n => self.model.gone_tokens[pick % n],
                    }
                } else {
                    self.model.holders[pick % self.model.holders.len()].token
                };
                let mut fx = Effects::default();
                let released = self
                    .core
                    .release(Timestamp(now), FencingToken(token), &mut fx);
                let core_wakes = self.wakes(&fx)?;
                let mut model_wakes = Vec::new();
                let expected = self.model.release(now, token, &mut model_wakes);
                if !model_wakes.is_empty() {
                    self.coverage.grants_on_release += 1;
                }
                prop_assert_eq!(core_wakes, model_wakes, "wake-ups on release");
                prop_assert_eq!(released, expected, "release of {}", token);
            }
            Op::Cancel(pick) => {
                let mid = if self.model.queue.is_empty() {
                    match self.model.departed.len() {
                        0 => return Ok(()),
                        n => self.model.departed[pick % n],
                    }
                } else {
                    self.model.queue[pick % self.model.queue.len()].id
                };
                let cid = self.core_ids[&mid];
                let mut fx = Effects::default();
                let cancelled = self.core.cancel(Timestamp(now), WaiterId(cid), &mut fx);
                let core_wakes = self.wakes(&fx)?;
                let mut model_wakes = Vec::new();
                let expected = self.model.cancel(now, mid, &mut model_wakes);
                if expected {
                    self.coverage.cancels += 1;
                }
                prop_assert_eq!(core_wakes, model_wakes, "wake-ups on cancel");
                prop_assert_eq!(cancelled, expected, "cancel of waiter {}", mid);
            }
        }
        self.check_state()
    }

    fn check_state(&mut self) -> Result<(), TestCaseError> {
        prop_assert_eq!(
            MCounters::of(self.core.counters()),
            self.model.counters,
            "counters"
        );
        prop_assert_eq!(self.core.in_use(), self.model.in_use(), "in use");
        prop_assert_eq!(self.core.waiting(), self.model.queue.len(), "waiting");
        prop_assert_eq!(
            self.core.next_deadline().map(|t| t.0),
            self.model.next_deadline(),
            "next deadline"
        );
        let c = self.core.counters();
        prop_assert_eq!(
            c.granted,
            c.released + c.expired + c.paced + self.model.holders.len() as u64,
            "granted = released + expired + held + paced"
        );
        Ok(())
    }

    /// For every window `[a, b]` between two times at which tokens were taken (granted or
    /// reserved), at most `burst + floor((b - a) / T)` tokens. Checked naively, pair by pair.
    fn check_windows(&self) -> Result<(), TestCaseError> {
        let mut taken = self.taken.clone();
        taken.sort_unstable();
        let t = self.cfg.interval();
        let burst = u64::from(self.cfg.burst);
        // prefix[i]: tokens taken strictly before taken[i].
        let mut prefix = vec![0_u64];
        for &(_, n) in &taken {
            prefix.push(prefix.last().copied().unwrap_or(0) + n);
        }
        for i in 0..taken.len() {
            for j in i..taken.len() {
                // Whole groups of equal times only: from the first at `a` to the last at `b`.
                if i > 0 && taken[i - 1].0 == taken[i].0 {
                    continue;
                }
                if j + 1 < taken.len() && taken[j + 1].0 == taken[j].0 {
                    continue;
                }
                let (a, b) = (taken[i].0, taken[j].0);
                let tokens = prefix[j + 1] - prefix[i];
                prop_assert!(
                    tokens <= burst + (b - a) / t,
                    "{} tokens in [{}, {}] (T = {} us, burst {})",
                    tokens,
                    a,
                    b,
                    t,
                    burst
                );
            }
        }
        Ok(())
    }

    fn run(&mut self, ops: &[Op]) -> Result<(), TestCaseError> {
        prop_assert_eq!(
            self.cfg.spec().rate.map(|r| r.interval_us()),
            Some(self.cfg.interval()),
            "the emission interval"
        );
        self.check_state()?;
        for op in ops {
            self.step(op)?;
        }
        // Let every waiter finish, so its grant counts in the windows too.
        let end = self.now + self.model.max_wait + 1;
        self.advance_to(end)?;
        self.check_state()?;
        self.coverage.grants_at_deadline = self.model.grants_at_deadline;
        self.coverage.grants_after_lease_end = self.model.grants_after_lease_end;
        self.check_windows()
    }
}

fn proptest_config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn a_rate_only_core_matches_the_gcra_model((cfg, ops) in scenario(None)) {
        Harness::new(&cfg).run(&ops)?;
    }

    #[test]
    fn a_rate_and_concurrency_core_matches_the_gcra_model((cfg, ops) in scenario(Some(1..=4))) {
        Harness::new(&cfg).run(&ops)?;
    }
}

/// Guards the generator: a fixed-seed batch of scenarios must reach every interesting path,
/// or the properties above would pass without testing much.
#[test]
fn the_generator_reaches_every_path() {
    let mut runner = TestRunner::deterministic();
    let mut total = Coverage::default();
    for concurrency in [None, Some(1..=4)] {
        let strategy = scenario(concurrency);
        for _ in 0..64 {
            let (cfg, ops) = strategy
                .new_tree(&mut runner)
                .expect("generate a scenario")
                .current();
            let mut h = Harness::new(&cfg);
            h.run(&ops).expect("the deterministic scenarios pass");
            let c = h.coverage;
            total.direct_grants += c.direct_grants;
            total.grants_on_advance += c.grants_on_advance;
            total.grants_at_deadline += c.grants_at_deadline;
            total.grants_on_release += c.grants_on_release;
            total.grants_after_lease_end += c.grants_after_lease_end;
            total.queued += c.queued;
            total.wait_timeouts += c.wait_timeouts;
            total.rate_too_late += c.rate_too_late;
            total.try_once += c.try_once;
            total.queue_full += c.queue_full;
            total.exceeds += c.exceeds;
            total.schedules_ahead += c.schedules_ahead;
            total.unschedules += c.unschedules;
            total.cancels += c.cancels;
            total.multi_permit_grants += c.multi_permit_grants;
        }
    }
    let c = total;
    eprintln!("coverage over 128 scenarios: {c:#?}");
    let all = [
        ("direct grants", c.direct_grants),
        ("grants at the token time", c.grants_on_advance),
        ("grants at the wait deadline", c.grants_at_deadline),
        ("grants on release", c.grants_on_release),
        ("grants as a lease ends", c.grants_after_lease_end),
        ("queued", c.queued),
        ("wait timeouts", c.wait_timeouts),
        ("refusals with the exact token time", c.rate_too_late),
        ("try-once refusals", c.try_once),
        ("queue full", c.queue_full),
        ("permits exceed the cap", c.exceeds),
        ("schedules reaching ahead", c.schedules_ahead),
        ("reservations given back", c.unschedules),
        ("cancels", c.cancels),
        ("multi-permit grants", c.multi_permit_grants),
    ];
    for (what, n) in all {
        assert!(n > 0, "the generator never reached: {what}");
    }
}
