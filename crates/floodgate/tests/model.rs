//! Model-based property test of the limiter's state machine, [`LimiterCore`].
//!
//! Random sequences of operations (acquire, release, extend, cancel, reconfigure and the
//! passage of time) run against the real core and, side by side, against a naive reference
//! model written here from the documented rules: holders in a `Vec`, the FIFO queue in a `Vec`,
//! every question answered by a linear scan. The model shares no code with the core; it only
//! builds the core's plain output structs ([`Grant`], [`Counters`]) so results compare directly.
//!
//! After every step the test checks, on the core alone:
//! - in-use never exceeds the limit, except after a lowered limit, when it only decreases (and
//!   nothing is granted) until it is back under the limit;
//! - strict FIFO: a queued waiter is only ever granted while it is the head of the queue;
//! - fencing tokens strictly increase across direct grants and waiter grants;
//! - nothing revives: once a token is not held it is never held again, and extending it is
//!   `Lost`;
//! - conservation: `granted == released + expired + held`, in-use is the sum of held permits;
//!
//! and that the core and the model agree on every outcome: admissions, wake-ups (who, in which
//! order, with which outcome), release / extend / cancel results, counters, queue contents and
//! the next deadline. Retry-after hints are not compared, only refusal kinds.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

mod gen;

use floodgate::core::{
    AcquireRequest, Admission, Counters, Effects, Grant, LimiterCore, Lost, Refusal, WaiterId,
};
use floodgate::{FencingToken, LimiterName, Timestamp};
use gen::{permits_for, scenario, Op, SpecChoice, Step, TokenPick, WaiterPick};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{FileFailurePersistence, TestCaseError, TestRunner};

/// Microseconds (the unit of [`Timestamp`]) per millisecond (the unit of the generated values).
const US_PER_MS: u64 = 1_000;
/// The lease bounds, restated for the model: 1 ms to 24 h.
const MODEL_MIN_LEASE: Duration = Duration::from_millis(1);
const MODEL_MAX_LEASE: Duration = Duration::from_secs(24 * 3600);
/// Unknown tokens and waiter ids are picked this far beyond anything handed out so far.
const FAR: u64 = 1_000_000;

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).expect("durations in this test fit in u64 microseconds")
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

/// Why an acquire got nothing, without the retry hint.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Why {
    WaitTimeout,
    QueueFull,
    PermitsExceedLimit { requested: u32, limit: u32 },
    LimiterDeleted,
    Invalid(&'static str),
}

impl Why {
    fn of(r: &Refusal) -> Why {
        match r {
            Refusal::WaitTimeout { .. } => Why::WaitTimeout,
            Refusal::QueueFull { .. } => Why::QueueFull,
            Refusal::PermitsExceedLimit { requested, limit } => Why::PermitsExceedLimit {
                requested: *requested,
                limit: *limit,
            },
            Refusal::LimiterDeleted => Why::LimiterDeleted,
            Refusal::Invalid(f) => Why::Invalid(f.field),
            Refusal::TooManyKeys { .. } => panic!("a plain limiter has no keys: {r:?}"),
            // Non-exhaustive: a reason the model does not know is a failure.
            other => panic!("a refusal the model does not know: {other:?}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Admit {
    Granted(Grant),
    Queued(u64),
    Refused(Why),
}

impl Admit {
    fn of(a: &Admission) -> Admit {
        match a {
            Admission::Granted(g) => Admit::Granted(g.clone()),
            Admission::Queued(id) => Admit::Queued(id.0),
            Admission::Refused(r) => Admit::Refused(Why::of(r)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ExtendOut {
    Extended(u64),
    Lost,
    Invalid(&'static str),
}

/// A wake-up: waiter id and its outcome.
type Wake = (u64, Result<Grant, Why>);

fn wakes_of(fx: &Effects) -> Vec<Wake> {
    fx.wakes
        .iter()
        .map(|(id, o)| (id.0, o.clone().map_err(|r| Why::of(&r))))
        .collect()
}

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

/// The rules, restated naively. Times are microseconds on the same clock as the core's.
#[derive(Debug, Clone)]
struct Model {
    limit: u32,
    default_lease: Duration,
    max_wait: Duration,
    max_queue: u32,
    /// Grants out, in grant order.
    holders: Vec<MHolder>,
    /// The queue; index 0 is the head.
    queue: Vec<MWaiter>,
    next_token: u64,
    next_waiter: u64,
    counters: Counters,
    /// Tokens released or expired.
    gone_tokens: Vec<u64>,
    /// Waiters that left the queue for any reason.
    departed: Vec<u64>,
    /// How often a lease end and a wait end fell on the same instant (for coverage).
    ties: u64,
}

impl Model {
    fn new(spec: &SpecChoice, first_token: u64) -> Model {
        Model {
            limit: spec.concurrency,
            default_lease: Duration::from_millis(spec.default_lease_ms),
            max_wait: Duration::from_millis(spec.max_wait_ms),
            max_queue: spec.max_queue,
            holders: Vec::new(),
            queue: Vec::new(),
            // Token 0 is never handed out.
            next_token: if first_token == 0 { 1 } else { first_token },
            next_waiter: 0,
            counters: Counters::default(),
            gone_tokens: Vec::new(),
            departed: Vec::new(),
            ties: 0,
        }
    }

    fn in_use(&self) -> u32 {
        self.holders.iter().map(|h| h.permits).sum()
    }

    fn holds(&self, token: u64) -> bool {
        self.holders.iter().any(|h| h.token == token)
    }

    fn queued_permits(&self) -> u64 {
        self.queue.iter().map(|w| u64::from(w.permits)).sum()
    }

    fn next_deadline(&self) -> Option<u64> {
        let leases = self.holders.iter().map(|h| h.deadline);
        let waits = self.queue.iter().map(|w| w.deadline);
        leases.chain(waits).min()
    }

    fn lease_is_valid(lease: Duration) -> bool {
        (MODEL_MIN_LEASE..=MODEL_MAX_LEASE).contains(&lease)
    }

    fn grant(&mut self, now: u64, permits: u32, lease: Duration, enqueued_at: u64) -> Grant {
        assert!(
            self.in_use() + permits <= self.limit,
            "model bug: granting {permits} with {} in use and limit {}",
            self.in_use(),
            self.limit
        );
        let token = self.next_token;
        self.next_token += 1;
        let deadline = now + micros(lease);
        self.holders.push(MHolder {
            token,
            permits,
            deadline,
        });
        self.counters.granted += 1;
        Grant {
            token: FencingToken(token),
            permits,
            lease,
            lease_deadline: Timestamp(deadline),
            granted_at: Timestamp(now),
            waited: Duration::from_micros(now - enqueued_at),
        }
    }

    /// Grants from the head of the queue for as long as the head fits.
    fn pump(&mut self, now: u64, wakes: &mut Vec<Wake>) {
        while let Some(head) = self.queue.first() {
            if self.in_use() + head.permits > self.limit {
                break;
            }
            let w = self.queue.remove(0);
            self.departed.push(w.id);
            let g = self.grant(now, w.permits, w.lease, w.enqueued_at);
            wakes.push((w.id, Ok(g)));
        }
    }

    /// Plays every lease end and wait end up to `now`, earliest first; a lease end goes before
    /// a wait end at the same instant, and waits ending together go in queue order. The queue
    /// moves after each event.
    fn advance(&mut self, now: u64, wakes: &mut Vec<Wake>) {
        loop {
            let lease = self
                .holders
                .iter()
                .enumerate()
                .filter(|(_, h)| h.deadline <= now)
                .min_by_key(|(_, h)| h.deadline)
                .map(|(i, h)| (i, h.deadline));
            let wait = self
                .queue
                .iter()
                .enumerate()
                .filter(|(_, w)| w.deadline <= now)
                .min_by_key(|(i, w)| (w.deadline, *i))
                .map(|(i, w)| (i, w.deadline));
            let expire_lease = match (lease, wait) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((_, ld)), Some((_, wd))) => {
                    if ld == wd {
                        self.ties += 1;
                    }
                    ld <= wd
                }
            };
            if expire_lease {
                let (i, _) = lease.expect("a lease is due");
                let h = self.holders.remove(i);
                self.counters.expired += 1;
                self.gone_tokens.push(h.token);
            } else {
                let (i, _) = wait.expect("a wait is due");
                let w = self.queue.remove(i);
                self.counters.timed_out += 1;
                self.departed.push(w.id);
                wakes.push((w.id, Err(Why::WaitTimeout)));
            }
            self.pump(now, wakes);
        }
    }

    fn acquire(
        &mut self,
        now: u64,
        permits: u32,
        lease: Option<Duration>,
        wait: Option<Duration>,
        wakes: &mut Vec<Wake>,
    ) -> Admit {
        self.advance(now, wakes);
        if permits == 0 {
            self.counters.rejected += 1;
            return Admit::Refused(Why::Invalid("permits"));
        }
        if permits > self.limit {
            self.counters.rejected += 1;
            return Admit::Refused(Why::PermitsExceedLimit {
                requested: permits,
                limit: self.limit,
            });
        }
        let lease = lease.unwrap_or(self.default_lease);
        if !Model::lease_is_valid(lease) {
            self.counters.rejected += 1;
            return Admit::Refused(Why::Invalid("lease_ms"));
        }
        // Strict FIFO: only an empty queue lets an arrival through at once.
        if self.queue.is_empty() && self.in_use() + permits <= self.limit {
            return Admit::Granted(self.grant(now, permits, lease, now));
        }
        let wait = match wait {
            Some(w) if w < self.max_wait => w,
            _ => self.max_wait,
        };
        if wait == Duration::ZERO {
            self.counters.timed_out += 1;
            return Admit::Refused(Why::WaitTimeout);
        }
        if self.queue.len() >= self.max_queue as usize {
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
            deadline: now + micros(wait),
        });
        Admit::Queued(id)
    }

    fn release(&mut self, now: u64, token: u64, wakes: &mut Vec<Wake>) -> bool {
        self.advance(now, wakes);
        let Some(i) = self.holders.iter().position(|h| h.token == token) else {
            return false;
        };
        self.holders.remove(i);
        self.counters.released += 1;
        self.gone_tokens.push(token);
        self.pump(now, wakes);
        true
    }

    fn extend(
        &mut self,
        now: u64,
        token: u64,
        lease: Duration,
        wakes: &mut Vec<Wake>,
    ) -> ExtendOut {
        // A bad lease is refused before anything else, time included.
        if !Model::lease_is_valid(lease) {
            return ExtendOut::Invalid("lease_ms");
        }
        self.advance(now, wakes);
        match self.holders.iter_mut().find(|h| h.token == token) {
            Some(h) => {
                h.deadline = now + micros(lease);
                ExtendOut::Extended(h.deadline)
            }
            None => {
                self.counters.extend_lost += 1;
                ExtendOut::Lost
            }
        }
    }

    fn cancel(&mut self, now: u64, id: u64, wakes: &mut Vec<Wake>) -> bool {
        self.advance(now, wakes);
        let Some(i) = self.queue.iter().position(|w| w.id == id) else {
            return false;
        };
        self.queue.remove(i);
        self.counters.cancelled += 1;
        self.departed.push(id);
        // It may have been the head holding back others.
        self.pump(now, wakes);
        true
    }

    fn reconfigure(&mut self, now: u64, spec: &SpecChoice, wakes: &mut Vec<Wake>) {
        self.advance(now, wakes);
        self.limit = spec.concurrency;
        self.default_lease = Duration::from_millis(spec.default_lease_ms);
        self.max_wait = Duration::from_millis(spec.max_wait_ms);
        self.max_queue = spec.max_queue;
        // Waiters that can never be granted under the new limit are refused, in queue order.
        let limit = self.limit;
        let mut kept = Vec::new();
        for w in std::mem::take(&mut self.queue) {
            if w.permits > limit {
                self.counters.rejected += 1;
                self.departed.push(w.id);
                wakes.push((
                    w.id,
                    Err(Why::PermitsExceedLimit {
                        requested: w.permits,
                        limit,
                    }),
                ));
            } else {
                kept.push(w);
            }
        }
        self.queue = kept;
        self.pump(now, wakes);
    }

    fn pick_token(&self, pick: &TokenPick) -> u64 {
        let unknown = |n: u64| {
            if n == 0 {
                0
            } else {
                self.next_token + FAR + n
            }
        };
        match *pick {
            TokenPick::Live(i) if !self.holders.is_empty() => {
                self.holders[i % self.holders.len()].token
            }
            TokenPick::Live(i) | TokenPick::Gone(i) if !self.gone_tokens.is_empty() => {
                self.gone_tokens[i % self.gone_tokens.len()]
            }
            TokenPick::Live(i) | TokenPick::Gone(i) => unknown(i as u64 % 4),
            TokenPick::Unknown(n) => unknown(n),
        }
    }

    fn pick_waiter(&self, pick: &WaiterPick) -> u64 {
        let unknown = |n: u64| self.next_waiter + FAR + n;
        match *pick {
            WaiterPick::Head if !self.queue.is_empty() => self.queue[0].id,
            WaiterPick::Queued(i) if !self.queue.is_empty() => self.queue[i % self.queue.len()].id,
            WaiterPick::Queued(i) | WaiterPick::Departed(i) if !self.departed.is_empty() => {
                self.departed[i % self.departed.len()]
            }
            WaiterPick::Queued(i) | WaiterPick::Departed(i) => unknown(i as u64 % 4),
            WaiterPick::Head => unknown(0),
            WaiterPick::Unknown(n) => unknown(n),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The harness: runs both, checks the core's invariants and compares
// ---------------------------------------------------------------------------------------------

/// What a run exercised, to make sure the generator reaches the interesting paths.
#[derive(Debug, Default, Clone, Copy)]
struct Coverage {
    direct_grants: u64,
    queued: u64,
    waiter_grants_on_release: u64,
    waiter_grants_on_advance: u64,
    waiter_grants_on_cancel: u64,
    waiter_grants_on_reconfigure: u64,
    wait_timeouts: u64,
    try_once_refusals: u64,
    queue_full: u64,
    exceeds_limit: u64,
    reconfigure_refusals: u64,
    invalid: u64,
    release_true: u64,
    release_false: u64,
    extend_ok: u64,
    extend_lost: u64,
    extend_invalid: u64,
    cancel_true: u64,
    cancel_false: u64,
    over_limit_steps: u64,
    ties: u64,
    lowered_limits: u64,
}

struct Harness {
    core: LimiterCore,
    model: Model,
    /// The clock, in microseconds.
    now: u64,
    /// The last time the core was asked to apply (an extend refused for its lease applies
    /// none).
    applied: u64,
    // What the core itself showed, independent of the model:
    /// Every grant seen: token -> permits.
    granted: BTreeMap<u64, u32>,
    /// Tokens seen not held; they must never be held again.
    dead: BTreeSet<u64>,
    last_token: Option<u64>,
    /// The queue as the core's admissions and wake-ups describe it: (id, permits), head first.
    queue: Vec<(u64, u32)>,
    last_waiter: Option<u64>,
    coverage: Coverage,
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

impl Harness {
    fn new(spec: &SpecChoice, first_token: u64) -> Harness {
        Harness {
            core: LimiterCore::new(spec.spec(), first_token).expect("generated specs are valid"),
            model: Model::new(spec, first_token),
            now: 0,
            applied: 0,
            granted: BTreeMap::new(),
            dead: BTreeSet::new(),
            last_token: None,
            queue: Vec::new(),
            last_waiter: None,
            coverage: Coverage::default(),
        }
    }

    fn run(&mut self, steps: &[Step]) -> Result<(), TestCaseError> {
        for (i, s) in steps.iter().enumerate() {
            self.step(s).map_err(|e| {
                fail(format!(
                    "step {i} at t={} us: {s:?}: {e}\nmodel after the step: {:#?}",
                    self.now, self.model
                ))
            })?;
        }
        Ok(())
    }

    /// Records a grant the core made: fencing tokens strictly increase.
    fn saw_grant(&mut self, g: &Grant) -> Result<(), TestCaseError> {
        if let Some(last) = self.last_token {
            prop_assert!(g.token.0 > last, "fencing token {} after {last}", g.token.0);
        }
        self.last_token = Some(g.token.0);
        self.granted.insert(g.token.0, g.permits);
        Ok(())
    }

    /// Applies the core's wake-ups to the observed queue: grants only ever go to the head.
    fn saw_wakes(&mut self, fx: &Effects) -> Result<u64, TestCaseError> {
        let mut grants = 0;
        for (id, outcome) in &fx.wakes {
            let pos = self.queue.iter().position(|(q, _)| *q == id.0);
            let Some(pos) = pos else {
                return Err(fail(format!("woke {id:?}, which is not queued")));
            };
            match outcome {
                Ok(g) => {
                    prop_assert_eq!(
                        pos,
                        0,
                        "FIFO: granted {:?} behind {:?}",
                        id,
                        &self.queue[..pos]
                    );
                    prop_assert_eq!(g.permits, self.queue[0].1, "granted permits");
                    self.saw_grant(g)?;
                    grants += 1;
                }
                Err(Refusal::WaitTimeout { .. }) => self.coverage.wait_timeouts += 1,
                Err(Refusal::PermitsExceedLimit { .. }) => {
                    self.coverage.reconfigure_refusals += 1;
                }
                Err(_) => {}
            }
            self.queue.remove(pos);
        }
        Ok(grants)
    }

    fn step(&mut self, s: &Step) -> Result<(), TestCaseError> {
        self.now += s.dt_ms * US_PER_MS;
        let now = self.now;
        let ts = Timestamp(now);
        let in_use_before = self.core.in_use();
        let mut fx = Effects::default();
        let mut want_wakes = Vec::new();
        let mut applied = true;
        let mut grants = 0_u64;

        match &s.op {
            Op::Acquire {
                permits,
                lease_ms,
                wait_ms,
            } => {
                let permits = permits_for(*permits, self.model.limit);
                let req = AcquireRequest {
                    permits,
                    lease: lease_ms.map(Duration::from_millis),
                    wait: wait_ms.map(Duration::from_millis),
                    holder: None,
                    request_id: None,
                };
                let got = self.core.acquire(ts, &req, &mut fx);
                let want = self
                    .model
                    .acquire(now, permits, req.lease, req.wait, &mut want_wakes);
                prop_assert_eq!(&Admit::of(&got), &want, "acquire of {} permits", permits);
                grants += self.saw_wakes(&fx)?;
                match &got {
                    Admission::Granted(g) => {
                        prop_assert!(self.queue.is_empty(), "granted past a queue");
                        self.saw_grant(g)?;
                        grants += 1;
                        self.coverage.direct_grants += 1;
                    }
                    Admission::Queued(id) => {
                        if let Some(last) = self.last_waiter {
                            prop_assert!(id.0 > last, "waiter id {} after {}", id.0, last);
                        }
                        self.last_waiter = Some(id.0);
                        self.queue.push((id.0, permits));
                        self.coverage.queued += 1;
                    }
                    Admission::Refused(r) => match r {
                        Refusal::WaitTimeout { .. } => self.coverage.try_once_refusals += 1,
                        Refusal::QueueFull { .. } => self.coverage.queue_full += 1,
                        Refusal::PermitsExceedLimit { .. } => self.coverage.exceeds_limit += 1,
                        Refusal::Invalid(_) => self.coverage.invalid += 1,
                        Refusal::LimiterDeleted => {}
                        Refusal::TooManyKeys { .. } => {
                            prop_assert!(false, "a plain limiter has no keys: {:?}", r)
                        }
                        other => prop_assert!(false, "an unknown refusal: {:?}", other),
                    },
                }
            }
            Op::Release(pick) => {
                let token = self.model.pick_token(pick);
                let was_dead = self.dead.contains(&token);
                let got = self.core.release(ts, FencingToken(token), &mut fx);
                let want = self.model.release(now, token, &mut want_wakes);
                prop_assert_eq!(got, want, "release of token {}", token);
                prop_assert!(!(got && was_dead), "released dead token {}", token);
                let woke = self.saw_wakes(&fx)?;
                grants += woke;
                if got {
                    self.coverage.release_true += 1;
                    self.coverage.waiter_grants_on_release += woke;
                } else {
                    self.coverage.release_false += 1;
                }
                prop_assert!(
                    !self.core.is_held(ts, FencingToken(token)),
                    "held after release"
                );
            }
            Op::Extend(pick, lease_ms) => {
                let token = self.model.pick_token(pick);
                let lease = Duration::from_millis(*lease_ms);
                let was_dead = self.dead.contains(&token);
                let got = self.core.extend(ts, FencingToken(token), lease, &mut fx);
                let got = match got {
                    Ok(Ok(d)) => ExtendOut::Extended(d.0),
                    Ok(Err(Lost)) => ExtendOut::Lost,
                    Err(f) => ExtendOut::Invalid(f.field),
                };
                let want = self.model.extend(now, token, lease, &mut want_wakes);
                prop_assert_eq!(&got, &want, "extend of token {} by {:?}", token, lease);
                grants += self.saw_wakes(&fx)?;
                match got {
                    ExtendOut::Extended(d) => {
                        prop_assert!(!was_dead, "extend revived dead token {}", token);
                        prop_assert_eq!(d, now + micros(lease), "extended deadline");
                        prop_assert!(self.core.is_held(ts, FencingToken(token)));
                        self.coverage.extend_ok += 1;
                    }
                    ExtendOut::Lost => {
                        prop_assert!(
                            !self.core.is_held(ts, FencingToken(token)),
                            "token {} lost but held",
                            token
                        );
                        self.coverage.extend_lost += 1;
                    }
                    ExtendOut::Invalid(_) => {
                        prop_assert!(fx.is_empty(), "a refused extend applied time");
                        applied = false;
                        self.coverage.extend_invalid += 1;
                    }
                }
            }
            Op::Cancel(pick) => {
                let id = self.model.pick_waiter(pick);
                let got = self.core.cancel(ts, WaiterId(id), &mut fx);
                let want = self.model.cancel(now, id, &mut want_wakes);
                prop_assert_eq!(got, want, "cancel of waiter {}", id);
                // The core plays the time advance (wake-ups), removes the waiter, then lets the
                // queue behind it move (more wake-ups); `fx` does not show where one ends. A
                // waiter it cancelled was never woken, and while it was queued only waiters
                // ahead of it could be granted, so taking it out first keeps the FIFO check.
                let woke = fx.wakes.iter().filter(|(_, o)| o.is_ok()).count() as u64;
                if got {
                    prop_assert!(
                        !fx.wakes.iter().any(|(w, _)| w.0 == id),
                        "cancelled {} and woke it too",
                        id
                    );
                    prop_assert!(
                        self.queue.iter().any(|(q, _)| *q == id),
                        "cancelled {}, which was not queued",
                        id
                    );
                    self.queue.retain(|(q, _)| *q != id);
                    self.coverage.cancel_true += 1;
                } else {
                    self.coverage.cancel_false += 1;
                }
                grants += self.saw_wakes(&fx)?;
                if got {
                    self.coverage.waiter_grants_on_cancel += woke;
                } else {
                    prop_assert!(
                        !self.queue.iter().any(|(q, _)| *q == id),
                        "cancel of {} refused, yet it is queued",
                        id
                    );
                }
            }
            Op::Reconfigure(spec) => {
                if spec.concurrency < self.model.limit {
                    self.coverage.lowered_limits += 1;
                }
                self.core
                    .reconfigure(ts, spec.spec(), &mut fx)
                    .expect("generated specs are valid");
                self.model.reconfigure(now, spec, &mut want_wakes);
                let woke = self.saw_wakes(&fx)?;
                grants += woke;
                self.coverage.waiter_grants_on_reconfigure += woke;
                prop_assert_eq!(self.core.spec(), &spec.spec());
            }
            Op::Advance(ms) => {
                self.now += ms * US_PER_MS;
                let now = self.now;
                self.core.advance(Timestamp(now), &mut fx);
                self.model.advance(now, &mut want_wakes);
                let woke = self.saw_wakes(&fx)?;
                grants += woke;
                self.coverage.waiter_grants_on_advance += woke;
            }
        }
        if applied {
            self.applied = self.now;
        }

        prop_assert_eq!(wakes_of(&fx), want_wakes, "wake-ups");
        self.check_invariants(&s.op, in_use_before, grants)?;
        self.compare_state()
    }

    /// The rules, checked on the core alone.
    fn check_invariants(
        &mut self,
        op: &Op,
        in_use_before: u32,
        grants: u64,
    ) -> Result<(), TestCaseError> {
        let at = Timestamp(self.applied);
        let limit = self
            .core
            .spec()
            .concurrency
            .expect("the model drives concurrency limiters");
        let in_use = self.core.in_use();
        if in_use > limit {
            self.coverage.over_limit_steps += 1;
        }
        if !matches!(op, Op::Reconfigure(_)) {
            // Over the limit only after a lowered limit, and then nothing is granted and
            // in-use only falls until it is back under.
            if grants > 0 {
                prop_assert!(
                    in_use <= limit,
                    "granted while over the limit: {} in use, limit {}",
                    in_use,
                    limit
                );
            }
            if in_use > limit {
                prop_assert!(
                    in_use <= in_use_before,
                    "in use rose from {} to {} over the limit {}",
                    in_use_before,
                    in_use,
                    limit
                );
            }
        }

        // Nothing revives; conservation.
        let mut held = 0_u64;
        let mut held_permits = 0_u32;
        for (&token, &permits) in &self.granted {
            let is_held = self.core.is_held(at, FencingToken(token));
            if is_held {
                prop_assert!(!self.dead.contains(&token), "token {} revived", token);
                held += 1;
                held_permits += permits;
            } else {
                self.dead.insert(token);
            }
        }
        prop_assert_eq!(in_use, held_permits, "in use vs held permits");
        let k = self.core.counters();
        prop_assert_eq!(
            k.granted,
            k.released + k.expired + held,
            "conservation: {:?} with {} held",
            k,
            held
        );
        let status = self
            .core
            .status(&LimiterName::new("model").expect("valid name"));
        prop_assert_eq!(u64::from(status.holders), held, "holders");
        prop_assert_eq!(status.in_use, in_use);
        prop_assert_eq!(status.waiting as usize, self.queue.len(), "waiting");
        let queued_permits: u64 = self.queue.iter().map(|(_, p)| u64::from(*p)).sum();
        prop_assert_eq!(status.waiting_permits, queued_permits, "waiting permits");
        Ok(())
    }

    /// The core and the model hold the same state.
    fn compare_state(&mut self) -> Result<(), TestCaseError> {
        let at = Timestamp(self.applied);
        prop_assert_eq!(self.core.in_use(), self.model.in_use(), "in use");
        prop_assert_eq!(self.core.counters(), self.model.counters, "counters");
        prop_assert_eq!(self.core.waiting(), self.model.queue.len(), "waiting");
        let model_queue: Vec<(u64, u32)> =
            self.model.queue.iter().map(|w| (w.id, w.permits)).collect();
        prop_assert_eq!(&self.queue, &model_queue, "queue");
        prop_assert_eq!(
            self.core
                .status(&LimiterName::new("model").expect("valid name"))
                .waiting_permits,
            self.model.queued_permits()
        );
        for &token in self.granted.keys() {
            prop_assert_eq!(
                self.core.is_held(at, FencingToken(token)),
                self.model.holds(token),
                "token {} held",
                token
            );
        }
        // The cheap hint a store compares with its timer may be early, never late.
        let hint = self.core.deadline_hint();
        let exact = self.core.next_deadline();
        prop_assert!(
            exact.is_none_or(|e| hint.is_some_and(|h| h <= e)),
            "deadline hint {:?} is later than the next deadline {:?}",
            hint,
            exact
        );
        prop_assert_eq!(
            exact.map(|t| t.0),
            self.model.next_deadline(),
            "next deadline"
        );
        self.coverage.ties = self.model.ties;
        Ok(())
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn core_matches_the_model((spec, first_token, steps) in scenario()) {
        Harness::new(&spec, first_token).run(&steps)?;
    }
}

/// Guards the generator: a fixed-seed batch of scenarios must reach every interesting path,
/// or the property above would pass without testing much.
#[test]
fn the_generator_reaches_every_path() {
    let mut runner = TestRunner::deterministic();
    let strategy = scenario();
    let mut total = Coverage::default();
    for _ in 0..64 {
        let (spec, first_token, steps) = strategy
            .new_tree(&mut runner)
            .expect("generate a scenario")
            .current();
        let mut h = Harness::new(&spec, first_token);
        h.run(&steps).expect("the deterministic scenarios pass");
        let c = h.coverage;
        total.direct_grants += c.direct_grants;
        total.queued += c.queued;
        total.waiter_grants_on_release += c.waiter_grants_on_release;
        total.waiter_grants_on_advance += c.waiter_grants_on_advance;
        total.waiter_grants_on_cancel += c.waiter_grants_on_cancel;
        total.waiter_grants_on_reconfigure += c.waiter_grants_on_reconfigure;
        total.wait_timeouts += c.wait_timeouts;
        total.try_once_refusals += c.try_once_refusals;
        total.queue_full += c.queue_full;
        total.exceeds_limit += c.exceeds_limit;
        total.reconfigure_refusals += c.reconfigure_refusals;
        total.invalid += c.invalid;
        total.release_true += c.release_true;
        total.release_false += c.release_false;
        total.extend_ok += c.extend_ok;
        total.extend_lost += c.extend_lost;
        total.extend_invalid += c.extend_invalid;
        total.cancel_true += c.cancel_true;
        total.cancel_false += c.cancel_false;
        total.over_limit_steps += c.over_limit_steps;
        total.ties += c.ties;
        total.lowered_limits += c.lowered_limits;
    }
    let c = total;
    let all = [
        ("direct grants", c.direct_grants),
        ("queued", c.queued),
        ("waiter grants on release", c.waiter_grants_on_release),
        ("waiter grants on advance", c.waiter_grants_on_advance),
        ("waiter grants on cancel", c.waiter_grants_on_cancel),
        (
            "waiter grants on reconfigure",
            c.waiter_grants_on_reconfigure,
        ),
        ("wait timeouts", c.wait_timeouts),
        ("try-once refusals", c.try_once_refusals),
        ("queue full", c.queue_full),
        ("permits exceed limit", c.exceeds_limit),
        ("reconfigure refusals", c.reconfigure_refusals),
        ("invalid", c.invalid),
        ("release true", c.release_true),
        ("release false", c.release_false),
        ("extend ok", c.extend_ok),
        ("extend lost", c.extend_lost),
        ("extend invalid", c.extend_invalid),
        ("cancel true", c.cancel_true),
        ("cancel false", c.cancel_false),
        ("over-limit steps", c.over_limit_steps),
        ("lease/wait ties", c.ties),
        ("lowered limits", c.lowered_limits),
    ];
    eprintln!("coverage over 64 scenarios: {c:#?}");
    for (what, n) in all {
        assert!(n > 0, "the generator never reached: {what}");
    }
}
