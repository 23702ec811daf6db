//! The limiter's state machine: pure and synchronous.
//!
//! Every operation takes `now` (the store's clock) and returns what happened plus the
//! [`Effects`]: which queued waiters were granted, timed out or refused as a consequence. No
//! clocks, locks, tasks or I/O live here, so the rules are tested exhaustively on plain values
//! and every store (the embedded one, and the Redis store's Lua scripts) implements the same
//! transitions.
//!
//! Rules, in one place:
//! - Strict FIFO: an arrival is granted at once only if nobody is queued and its permits fit.
//!   A head waiter asking for k permits holds back everyone behind it until k are free.
//! - Every operation first applies the passage of time (lease expiries and waiter deadlines, in
//!   deadline order), so an expired permit cannot be released, extended or revived, whether or
//!   not a timer has fired yet.
//! - Fencing tokens strictly increase across all grants.
//! - A lowered limit grants nothing until in-use is below it; a raised one grants at once.

pub mod adaptive;
mod deadlines;
mod holders;
pub mod keyed;
mod learning;
mod queue;
mod reservation;
mod slot_tree;
mod snapshot;

pub use self::snapshot::{CoreState, HolderState, SpecState, WaiterState};

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Duration;

use self::deadlines::DeadlineHeap;
pub use self::holders::{HolderInfo, HoldersView, MAX_HOLDERS_LISTED};
use self::queue::Queue;
use crate::spec::{check_lease, InvalidField, LimiterSpec, MAX_LEASE};
use crate::types::{FencingToken, LimiterName, Timestamp};

/// Identifies a queued acquire within one limiter. Increasing: the queue is ordered by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WaiterId(pub u64);

/// An acquire as the state machine sees it. `None` fields take the spec's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireRequest {
    /// How many permits, at least 1 and at most the limit.
    pub permits: u32,
    /// Lease length; `None` means the spec's default lease.
    pub lease: Option<Duration>,
    /// How long to wait; `None` means the spec's `max_wait`. Zero means "try once". Capped at
    /// `max_wait`, so every wait is bounded.
    pub wait: Option<Duration>,
    /// Free-form label for introspection (a worker or task id).
    pub holder: Option<Arc<str>>,
    /// Makes the acquire idempotent: a repeat with the same id, while the first is still
    /// queued or its grant still held, gets that same grant (or joins that same wait) instead
    /// of a second permit. Clients send one per logical acquire and reuse it on retries.
    pub request_id: Option<Arc<str>>,
}

impl Default for AcquireRequest {
    fn default() -> Self {
        AcquireRequest {
            permits: 1,
            lease: None,
            wait: None,
            holder: None,
            request_id: None,
        }
    }
}

/// A granted permit, as data. The Rust API wraps it in a [`Permit`](crate::Permit) guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Fencing token, also the grant's id within its limiter.
    pub token: FencingToken,
    /// How many permits it holds.
    pub permits: u32,
    /// Lease length granted.
    pub lease: Duration,
    /// When the lease ends, on the store's clock.
    pub lease_deadline: Timestamp,
    /// When it was granted, on the store's clock.
    pub granted_at: Timestamp,
    /// How long the acquire waited in the queue.
    pub waited: Duration,
}

/// Why an acquire got no permit. Each variant is something a caller can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The wait ended without a grant. Re-enqueue the work and try again after `retry_after`.
    #[error("no permit within the wait; retry after {} ms", retry_after.as_millis())]
    WaitTimeout {
        /// An estimate of when a permit is likely to be free.
        retry_after: Duration,
    },
    /// The queue is at its `max_queue` cap; refused without waiting.
    #[error("the wait queue is full; retry after {} ms", retry_after.as_millis())]
    QueueFull {
        /// An estimate of when a permit is likely to be free.
        retry_after: Duration,
    },
    /// More permits than the limit could ever grant at once (also sent to waiters when a
    /// lowered limit makes their request impossible).
    #[error("requested {requested} permits but the limit is {limit}")]
    PermitsExceedLimit {
        /// Permits asked for.
        requested: u32,
        /// The limit.
        limit: u32,
    },
    /// The limiter was deleted while the acquire waited.
    #[error("the limiter was deleted")]
    LimiterDeleted,
    /// A keyed limiter already tracks its `max_keys` keys and this acquire names a new one;
    /// refused without waiting (keys drop out when idle).
    #[error("this limiter already tracks its max_keys ({max_keys}) keys; retry after {} ms", retry_after.as_millis())]
    TooManyKeys {
        /// The limiter's key cap.
        max_keys: u32,
        /// An estimate of when a key is likely to be free.
        retry_after: std::time::Duration,
    },
    /// A request field is out of range.
    #[error("invalid request: {0}")]
    Invalid(InvalidField),
}

/// What an acquire led to at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Granted without waiting.
    Granted(Grant),
    /// Queued; the outcome arrives later as an effect for this id.
    Queued(WaiterId),
    /// Refused without queueing.
    Refused(Refusal),
}

/// The outcome delivered to a queued waiter.
pub type WaitOutcome = Result<Grant, Refusal>;

/// Wake-ups caused by an operation: only the waiters named here need to run.
#[derive(Debug, Default)]
pub struct Effects {
    /// Each woken waiter and its outcome, in the order they were decided.
    pub wakes: Vec<(WaiterId, WaitOutcome)>,
}

impl Effects {
    /// True if nobody needs waking.
    pub fn is_empty(&self) -> bool {
        self.wakes.is_empty()
    }
}

/// Monotonic counters of what a limiter has done.
/// `granted = released + expired + held + paced`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Grants made (each may hold several permits).
    pub granted: u64,
    /// Grants returned by their holder.
    pub released: u64,
    /// Grants reclaimed because their lease ended.
    pub expired: u64,
    /// Acquires whose wait ended without a grant (including "try once" refusals).
    pub timed_out: u64,
    /// Queued acquires that gave up (future dropped, client disconnected).
    pub cancelled: u64,
    /// Acquires refused because the queue was full.
    pub queue_full: u64,
    /// Acquires refused as impossible or invalid, or dropped by a resize or delete.
    pub rejected: u64,
    /// Extends of a permit that was no longer held.
    pub extend_lost: u64,
    /// Grants of a rate-only limiter: no lease, nothing to release.
    pub paced: u64,
    /// Rate tokens reserved by `schedule`.
    pub scheduled: u64,
    /// Feedback reports, by outcome.
    pub feedback_ok: u64,
    /// Feedback reports of a throttled backend call (RateLimitExceeded, 429).
    pub feedback_throttled: u64,
    /// Feedback reports of other failures (not used to adapt).
    pub feedback_error: u64,
    /// Times the adaptive limit went down.
    pub limit_decreases: u64,
    /// Times the adaptive limit went up.
    pub limit_increases: u64,
    /// Permits re-adopted by an extend during a learning window (also counted in `granted`).
    pub adopted: u64,
}

/// A point-in-time view of one limiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimiterStatus {
    /// The limiter's name.
    pub name: LimiterName,
    /// Its configuration.
    pub spec: LimiterSpec,
    /// Permits out now.
    pub in_use: u32,
    /// Grants out now.
    pub holders: u32,
    /// Acquires queued now.
    pub waiting: u32,
    /// Permits the queued acquires ask for in total.
    pub waiting_permits: u64,
    /// The concurrency limit in force: the spec's, or the adaptive one. `None`: rate only.
    pub limit: Option<u32>,
    /// Lifetime counters.
    pub counters: Counters,
    /// In a learning window after state loss: nothing is granted until it ends (see
    /// [`LimiterCore::enter_learning`]).
    pub learning: bool,
}

/// What a backend call reported, for adaptive limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feedback {
    /// The call succeeded.
    Ok,
    /// The backend said it is overloaded (RateLimitExceeded, HTTP 429).
    Throttled,
    /// Another failure; counted, not used to adapt.
    Error,
}

/// Largest fan-out one `schedule` call reserves.
pub const MAX_SCHEDULE: u32 = 100_000;

/// Furthest ahead a `schedule` reserves tokens, whatever the limiter's `max_wait` (which
/// bounds it first).
pub const MAX_SCHEDULE_AHEAD: Duration = Duration::from_secs(366 * 24 * 3600);

/// The hold-time average moves by 1/this of each new sample: smooth enough to ignore one odd
/// holder, quick enough to follow a change of workload within a few dozen releases.
pub const HOLD_EWMA_WEIGHT: u64 = 8;

/// How long a queued idempotent acquire whose caller went away stays queued for a retry with
/// the same `request_id` to join (long enough for a client's reconnect and retry, short enough
/// that a caller that gave up does not hold a queue slot for its whole wait).
pub const ORPHANED_WAIT_GRACE: Duration = Duration::from_secs(5);

/// Returned by `extend` when the permit is not held (released, expired or never granted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the permit was lost: it expired or was released")]
pub struct Lost;

#[derive(Debug, Clone)]
pub(crate) struct Holder {
    pub(crate) permits: u32,
    pub(crate) deadline: Timestamp,
    pub(crate) granted_at: Timestamp,
    /// The lease it was granted (or last extended) with, for a repeated idempotent acquire.
    pub(crate) lease: Duration,
    /// Kept for introspection of who holds what.
    pub(crate) label: Option<Arc<str>>,
    /// The idempotency key it was acquired with, to forget it when the grant ends.
    pub(crate) request: Option<Arc<str>>,
}

#[derive(Debug, Clone)]
pub(crate) struct Waiter {
    pub(crate) permits: u32,
    pub(crate) lease: Duration,
    pub(crate) enqueued_at: Timestamp,
    /// When its wait ends. Kept here (not only in the heap) so a retry that joins the wait,
    /// or a caller that goes away, can move it: a heap entry is live only if it matches.
    pub(crate) deadline: Timestamp,
    pub(crate) label: Option<Arc<str>>,
    /// The idempotency key, carried over to the grant.
    pub(crate) request: Option<Arc<str>>,
}

/// What an idempotency key refers to while it is remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestRef {
    /// A queued acquire: a repeat joins its wait.
    Queued(u64),
    /// A held grant: a repeat gets it again.
    Held(u64),
}

/// Whether a wait-heap entry is live: its waiter is queued with that deadline.
fn live_wait(queue: &Queue<Waiter>, id: u64, deadline: Timestamp) -> bool {
    queue.get(&id).is_some_and(|w| w.deadline == deadline)
}

/// Hashes the u64 keys (tokens, waiter ids) with one multiply: they are sequential, so
/// SipHash's protection against chosen keys buys nothing and costs a third of an acquire.
#[derive(Default, Clone, Copy)]
pub(crate) struct U64Hasher(u64);

impl Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub(crate) type U64Map<V> = HashMap<u64, V, BuildHasherDefault<U64Hasher>>;

/// One limiter's complete state.
#[derive(Debug, Clone)]
pub struct LimiterCore {
    spec: LimiterSpec,
    /// Grants out, by token.
    holders: U64Map<Holder>,
    /// Lease deadlines of `holders` (lazily pruned).
    leases: DeadlineHeap,
    /// Sum of the holders' permits; kept rather than summed because every acquire reads it.
    in_use: u32,
    /// Idempotency keys of the queued acquires and held grants that carry one.
    requests: HashMap<Arc<str>, RequestRef>,
    /// The FIFO queue, ordered by waiter id.
    queue: Queue<Waiter>,
    /// Sum of the queued waiters' permits, for the retry hint.
    queued_permits: u64,
    /// Deadlines of `queue` (lazily pruned).
    waits: DeadlineHeap,
    /// Token of the next grant.
    next_token: u64,
    /// Id of the next queued waiter.
    next_waiter: u64,
    /// Smoothed hold time of released grants, in microseconds; feeds the retry hint.
    hold_ewma_us: Option<u64>,
    /// GCRA's theoretical arrival time: when the rate is fully caught up.
    tat: Timestamp,
    /// The concurrency limit in force (moved by adaptive feedback); `None` for rate only.
    limit: Option<u32>,
    /// Successes since the adaptive limit last moved.
    successes: u32,
    /// When the adaptive limit last went down, for the cooldown.
    last_decrease: Option<Timestamp>,
    /// The gradient controller's latency averages, ceiling and growth credit (unused by AIMD,
    /// which counts rounds in `successes`; the gradient controller counts there the successes
    /// of calls begun since the last decrease).
    gradient: adaptive::Gradient,
    /// No lease or wait deadline is earlier than this (a lower bound, exact after each pass
    /// of `advance`): lets `advance` return at once on the hot path, where nothing is due.
    next_due: Timestamp,
    counters: Counters,
    /// End of the learning window after state loss, while one is in force: until then nothing
    /// is granted and unknown permits may be re-adopted by their extend (see `learning.rs`).
    learning_until: Option<Timestamp>,
    /// The latest `schedule` reservation, the one whose unused tokens can still be given back
    /// (see `reservation.rs`).
    last_reservation: Option<reservation::Reservation>,
}

impl std::fmt::Debug for U64Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("U64Hasher")
    }
}

impl LimiterCore {
    /// A limiter with no holders and no waiters. `first_token` is the first fencing token it
    /// hands out: a store seeds it from wall-clock time so that a re-created limiter (or a
    /// restarted embedded store) still hands out larger tokens than before.
    pub fn new(spec: LimiterSpec, first_token: u64) -> Result<Self, InvalidField> {
        spec.validate()?;
        Ok(LimiterCore {
            holders: U64Map::default(),
            leases: DeadlineHeap::default(),
            in_use: 0,
            requests: HashMap::new(),
            queue: Queue::default(),
            queued_permits: 0,
            waits: DeadlineHeap::default(),
            next_token: first_token.max(1),
            next_waiter: 0,
            hold_ewma_us: None,
            tat: Timestamp(0),
            limit: spec.concurrency,
            successes: 0,
            last_decrease: None,
            gradient: adaptive::Gradient::default(),
            next_due: Timestamp::MAX,
            counters: Counters::default(),
            learning_until: None,
            last_reservation: None,
            spec,
        })
    }

    /// The fencing token the next grant gets; a store keeps it when the limiter is deleted,
    /// so a re-created one starts above it.
    pub fn next_token(&self) -> u64 {
        self.next_token
    }

    /// The current configuration.
    pub fn spec(&self) -> &LimiterSpec {
        &self.spec
    }

    /// Permits out now.
    pub fn in_use(&self) -> u32 {
        self.in_use
    }

    /// Acquires queued now.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Lifetime counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Grants out now.
    pub fn status_holders(&self) -> u32 {
        u32::try_from(self.holders.len()).unwrap_or(u32::MAX)
    }

    /// Whether the waiter is still queued.
    pub fn is_queued(&self, waiter: WaiterId) -> bool {
        self.queue.contains_key(&waiter.0)
    }

    /// Whether `token` is held at `now`, without changing anything.
    pub fn is_held(&self, now: Timestamp, token: FencingToken) -> bool {
        self.holders.get(&token.0).is_some_and(|h| h.deadline > now)
    }

    /// A snapshot for introspection.
    pub fn status(&self, name: &LimiterName) -> LimiterStatus {
        LimiterStatus {
            name: name.clone(),
            spec: self.spec.clone(),
            in_use: self.in_use,
            holders: u32::try_from(self.holders.len()).unwrap_or(u32::MAX),
            waiting: u32::try_from(self.queue.len()).unwrap_or(u32::MAX),
            waiting_permits: self.queued_permits,
            limit: self.limit,
            counters: self.counters,
            learning: self.learning_until.is_some(),
        }
    }

    /// Asks for permits. Granted at once if nobody is queued and they fit; otherwise queued
    /// (outcome delivered later as an effect) or refused.
    pub fn acquire(&mut self, now: Timestamp, req: &AcquireRequest, fx: &mut Effects) -> Admission {
        self.advance(now, fx);
        if let Some(repeat) = self.repeat_of(now, req) {
            return repeat;
        }
        if req.permits == 0 {
            self.counters.rejected += 1;
            return Admission::Refused(Refusal::Invalid(InvalidField::new(
                "permits",
                "must be at least 1",
            )));
        }
        if let Some(cap) = self.permit_cap().filter(|cap| req.permits > *cap) {
            self.counters.rejected += 1;
            return Admission::Refused(Refusal::PermitsExceedLimit {
                requested: req.permits,
                limit: cap,
            });
        }
        let lease = req.lease.unwrap_or(self.spec.default_lease);
        if let Err(e) = check_lease("lease_ms", lease) {
            self.counters.rejected += 1;
            return Admission::Refused(Refusal::Invalid(e));
        }
        let wait = req
            .wait
            .unwrap_or(self.spec.max_wait)
            .min(self.spec.max_wait);
        if self.queue.is_empty() && self.fits(req.permits) && self.learning_until.is_none() {
            match self.rate_at(req.permits) {
                Some(at) if at > now => {
                    // Only the rate holds it back, and its token time is known: if that is
                    // past the wait, say so now with the exact time rather than queueing.
                    if at.since(now) > wait {
                        self.counters.timed_out += 1;
                        return Admission::Refused(Refusal::WaitTimeout {
                            retry_after: at.since(now).max(Duration::from_millis(1)),
                        });
                    }
                }
                _ => {
                    let grant = self.grant(
                        now,
                        req.permits,
                        lease,
                        now,
                        req.holder.clone(),
                        req.request_id.clone(),
                    );
                    return Admission::Granted(grant);
                }
            }
        }
        let ahead = self.queued_permits + u64::from(req.permits);
        // Below the clock's resolution a wait would end the moment it began: try once.
        if wait < Duration::from_micros(1) {
            self.counters.timed_out += 1;
            let retry_after = self.retry_hint(now, ahead);
            return Admission::Refused(Refusal::WaitTimeout { retry_after });
        }
        if self.queue.len() >= self.spec.max_queue as usize {
            self.counters.queue_full += 1;
            let retry_after = self.retry_hint(now, ahead);
            return Admission::Refused(Refusal::QueueFull { retry_after });
        }
        let id = self.next_waiter;
        self.next_waiter += 1;
        let deadline = now.after(wait);
        self.queue.insert(
            id,
            Waiter {
                permits: req.permits,
                lease,
                enqueued_at: now,
                deadline,
                label: req.holder.clone(),
                request: req.request_id.clone(),
            },
        );
        if let Some(key) = &req.request_id {
            self.requests
                .insert(Arc::clone(key), RequestRef::Queued(id));
        }
        self.queued_permits += u64::from(req.permits);
        self.waits.push(deadline, id);
        self.next_due = self.next_due.min(deadline);
        let queue = &self.queue;
        self.waits
            .compact(queue.len(), |k, d| live_wait(queue, k, d));
        Admission::Queued(WaiterId(id))
    }

    /// Returns a grant. `false` (and no change) if it is not held: unknown, expired or
    /// already released.
    pub fn release(&mut self, now: Timestamp, token: FencingToken, fx: &mut Effects) -> bool {
        self.advance(now, fx);
        let Some(holder) = self.holders.remove(&token.0) else {
            return false;
        };
        self.forget_request(holder.request.as_ref());
        self.in_use -= holder.permits;
        self.counters.released += 1;
        self.observe_hold(now.since(holder.granted_at));
        self.grant_waiters(now, fx);
        true
    }

    /// Moves a held grant's lease deadline to `now + lease`. Never revives: an expired or
    /// released grant is [`Lost`].
    pub fn extend(
        &mut self,
        now: Timestamp,
        token: FencingToken,
        lease: Duration,
        fx: &mut Effects,
    ) -> Result<Result<Timestamp, Lost>, InvalidField> {
        check_lease("lease_ms", lease)?;
        self.advance(now, fx);
        let Some(holder) = self.holders.get_mut(&token.0) else {
            self.counters.extend_lost += 1;
            return Ok(Err(Lost));
        };
        let deadline = now.after(lease);
        holder.deadline = deadline;
        // A repeated idempotent acquire reports the lease in force, not the first one.
        holder.lease = lease;
        self.leases.push(deadline, token.0);
        self.next_due = self.next_due.min(deadline);
        Ok(Ok(deadline))
    }

    /// Takes a queued waiter out of the queue (it gave up). `false` if it was not queued: it
    /// was already granted, timed out or refused, possibly by this very call's time advance,
    /// in which case its outcome is in `fx`.
    pub fn cancel(&mut self, now: Timestamp, waiter: WaiterId, fx: &mut Effects) -> bool {
        self.advance(now, fx);
        let Some(w) = self.queue.remove(&waiter.0) else {
            return false;
        };
        self.forget_request(w.request.as_ref());
        self.queued_permits -= u64::from(w.permits);
        self.counters.cancelled += 1;
        // The head may have been holding back smaller requests behind it.
        self.grant_waiters(now, fx);
        true
    }

    /// Changes the configuration. A raised limit grants waiters at once; a lowered one grants
    /// nothing until in-use is below it. Waiters asking for more than the new limit are refused.
    pub fn reconfigure(
        &mut self,
        now: Timestamp,
        spec: LimiterSpec,
        fx: &mut Effects,
    ) -> Result<(), InvalidField> {
        spec.validate()?;
        self.advance(now, fx);
        self.next_due = Timestamp(0);
        // A learned adaptive limit survives a change of other fields (a fleet re-applying
        // its config, a new lease): only a new concurrency or adaptive range resets it.
        if spec.concurrency != self.spec.concurrency || spec.adaptive != self.spec.adaptive {
            self.limit = spec.concurrency;
            self.successes = 0;
            self.gradient = adaptive::Gradient::default();
        }
        // The limit in force always lies within the adaptive range.
        if let (Some(limit), Some(a)) = (self.limit, spec.adaptive) {
            self.limit = Some(limit.clamp(a.min, a.max));
        }
        // Debt under the old rate is rescaled to the new one, so a raised rate applies now.
        if let (Some(old), Some(new)) = (self.spec.rate, spec.rate) {
            if self.tat > now {
                let debt = u128::from(self.tat.0 - now.0) * u128::from(new.interval_us())
                    / u128::from(old.interval_us());
                self.tat = now.after(Duration::from_micros(
                    u64::try_from(debt).unwrap_or(u64::MAX),
                ));
            }
        }
        self.spec = spec;
        self.refuse_impossible(fx);
        self.grant_waiters(now, fx);
        Ok(())
    }

    /// Refuses queued waiters asking for more than any grant can now hold (after the limit
    /// or the burst went down): they would otherwise hold back the queue until their wait ends.
    fn refuse_impossible(&mut self, fx: &mut Effects) {
        let limit = self.permit_cap().unwrap_or(u32::MAX);
        let impossible = self.queue.heavier_than(limit);
        for id in impossible {
            if let Some(w) = self.queue.remove(&id) {
                self.forget_request(w.request.as_ref());
                self.queued_permits -= u64::from(w.permits);
                self.counters.rejected += 1;
                fx.wakes.push((
                    WaiterId(id),
                    Err(Refusal::PermitsExceedLimit {
                        requested: w.permits,
                        limit,
                    }),
                ));
            }
        }
    }

    /// Refuses every waiter: the limiter is going away.
    pub fn close(&mut self, fx: &mut Effects) {
        for (id, w) in self.queue.drain() {
            self.forget_request(w.request.as_ref());
            self.counters.rejected += 1;
            fx.wakes.push((WaiterId(id), Err(Refusal::LimiterDeleted)));
        }
        self.queued_permits = 0;
    }

    /// Applies the passage of time up to `now`: expires leases and waiter deadlines in deadline
    /// order, granting freed permits to the queue as it goes.
    pub fn advance(&mut self, now: Timestamp, fx: &mut Effects) {
        // Nothing can be due before `next_due`; a rate's token times are not tracked there.
        if now < self.next_due && self.spec.rate.is_none() {
            return;
        }
        self.end_learning_if_due(now, fx);
        loop {
            let holders = &self.holders;
            let lease = self
                .leases
                .peek_live(|k, d| holders.get(&k).is_some_and(|h| h.deadline == d));
            let queue = &self.queue;
            let wait = self.waits.peek_live(|k, d| live_wait(queue, k, d));
            // Everything before now is handled below, so the nearest of these is exact.
            self.next_due = match (lease, wait) {
                (Some((l, _)), Some((w, _))) => l.min(w),
                (l, w) => l.or(w).map_or(Timestamp::MAX, |(d, _)| d),
            }
            .min(self.learning_until.unwrap_or(Timestamp::MAX));
            let lease = lease.filter(|(d, _)| *d <= now);
            let wait = wait.filter(|(d, _)| *d <= now);
            // The head's rate token time, when only the rate holds it back.
            let rate = self.head_rate_at().filter(|at| *at <= now);
            let lease_first = match (lease, wait) {
                (None, None) if rate.is_none() => break,
                (None, None) => false,
                // On a tie the lease goes first, so the waiter still gets the freed slot.
                (Some((ld, _)), Some((wd, _))) => ld <= wd,
                (l, _) => l.is_some(),
            };
            let wait_time = wait.map(|(wd, _)| wd);
            let first = if lease_first {
                lease.map(|(ld, _)| ld)
            } else {
                wait_time
            };
            if let Some(at) = rate.filter(|r| first.is_none_or(|f| *r <= f)) {
                // The head's token time came before any other event: grant it (and whoever
                // follows and is also ready).
                let _ = at;
                self.grant_waiters(now, fx);
                continue;
            }
            if lease_first {
                if let Some((_, token)) = lease {
                    self.leases.pop();
                    if let Some(h) = self.holders.remove(&token) {
                        self.forget_request(h.request.as_ref());
                        self.in_use -= h.permits;
                        self.counters.expired += 1;
                    }
                }
            } else if let Some((_, id)) = wait {
                self.waits.pop();
                let ahead = self.queue.permits_through(id).unwrap_or(0);
                if let Some(w) = self.queue.remove(&id) {
                    self.forget_request(w.request.as_ref());
                    self.queued_permits -= u64::from(w.permits);
                    self.counters.timed_out += 1;
                    let retry_after = self.retry_hint(now, ahead);
                    fx.wakes
                        .push((WaiterId(id), Err(Refusal::WaitTimeout { retry_after })));
                }
            }
            // A freed slot, or a departed head waiter, may let the queue move.
            self.grant_waiters(now, fx);
        }
    }

    /// A moment no later than [`next_deadline`](Self::next_deadline), found without looking
    /// at the deadlines when it can be (no rate limit): what a store compares with its armed
    /// timer after each operation. The timer's own pass then finds the exact deadline.
    pub fn deadline_hint(&mut self) -> Option<Timestamp> {
        if self.spec.rate.is_some() {
            return self.next_deadline();
        }
        (self.next_due != Timestamp::MAX).then_some(self.next_due)
    }

    /// The earliest moment at which [`advance`](Self::advance) would change something: the
    /// nearest lease deadline or waiter deadline. A store arms one timer for it.
    pub fn next_deadline(&mut self) -> Option<Timestamp> {
        let holders = &self.holders;
        let lease = self
            .leases
            .peek_live(|k, d| holders.get(&k).is_some_and(|h| h.deadline == d))
            .map(|(d, _)| d);
        let queue = &self.queue;
        let wait = self
            .waits
            .peek_live(|k, d| live_wait(queue, k, d))
            .map(|(d, _)| d);
        let due = [lease, wait, self.learning_until]
            .into_iter()
            .flatten()
            .min();
        // Exact now: refreshes the bound that `advance` and `deadline_hint` use.
        self.next_due = due.unwrap_or(Timestamp::MAX);
        [due, self.head_rate_at()].into_iter().flatten().min()
    }

    /// Reserves `count` rate tokens for a producer's fan-out and returns, for each, how long
    /// from `now` until it may start. Reservations take the next token times after those
    /// already promised, exactly as `count` acquires of one permit would; waiters queued at
    /// this moment are served after them for the rate. Refused (nothing reserved) if the last
    /// would start more than the spec's `max_wait` from now. `reservation` is the id the store
    /// drew for it, with which the producer may give back what it does not use
    /// ([`unschedule`](Self::unschedule)).
    pub fn schedule(
        &mut self,
        now: Timestamp,
        count: u32,
        reservation: u64,
        fx: &mut Effects,
    ) -> Result<Vec<Duration>, InvalidField> {
        if self.spec.rate.is_none() {
            return Err(InvalidField::new(
                "count",
                "this limiter has no rate limit to schedule against",
            ));
        }
        if count == 0 || count > MAX_SCHEDULE {
            return Err(InvalidField::new(
                "count",
                format!("must be from 1 to {MAX_SCHEDULE}"),
            ));
        }
        self.advance(now, fx);
        let before = self.tat;
        let mut offsets = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let at = self.rate_at(1).map_or(now, |at| at.max(now));
            offsets.push(at.since(now));
            self.take_rate(at, 1);
        }
        // A reservation is a wait announced in advance, so the limiter's cap on waits bounds
        // it too: one call cannot push the rate's debt hours ahead (which would hold up every
        // acquire, and outlive a producer that crashed). All or nothing, with how many fit.
        let horizon = self.spec.max_wait.min(MAX_SCHEDULE_AHEAD);
        if offsets.last().is_some_and(|d| *d > horizon) {
            self.tat = before;
            let fit = offsets.partition_point(|d| *d <= horizon);
            return Err(InvalidField::new(
                "count",
                format!(
                    "would reserve tokens further ahead than this limiter's max_wait_ms ({} ms), \
                     which bounds a schedule; {fit} fit now",
                    horizon.as_millis()
                ),
            ));
        }
        self.counters.scheduled += u64::from(count);
        self.remember_reservation(reservation, count);
        Ok(offsets)
    }

    /// Records a backend call's outcome. With an adaptive limit: a throttle multiplies the
    /// limit by `decrease` (at most once per cooldown); a full round of successes (as many as
    /// the limit) adds `increase`, granting waiters at once. Returns the limit in force.
    pub fn feedback(&mut self, now: Timestamp, outcome: Feedback, fx: &mut Effects) -> Option<u32> {
        self.feedback_with(now, outcome, None, fx)
    }

    /// [`feedback`](Self::feedback) with the call's latency (from its start to its answer),
    /// which the gradient controller uses (see [`adaptive`]); AIMD ignores it.
    pub fn feedback_with(
        &mut self,
        now: Timestamp,
        outcome: Feedback,
        latency: Option<Duration>,
        fx: &mut Effects,
    ) -> Option<u32> {
        self.advance(now, fx);
        match outcome {
            Feedback::Ok => self.counters.feedback_ok += 1,
            Feedback::Throttled => self.counters.feedback_throttled += 1,
            Feedback::Error => self.counters.feedback_error += 1,
        }
        let (Some(adaptive), Some(limit)) = (self.spec.adaptive, self.limit) else {
            return self.limit;
        };
        if adaptive.algorithm == crate::spec::Algorithm::Gradient {
            let inputs = adaptive::Inputs {
                now,
                limit,
                in_use: self.in_use,
                hold_ewma_us: self.hold_ewma_us,
            };
            let moved = self.gradient.feedback(
                &adaptive,
                inputs,
                outcome,
                latency,
                &mut self.last_decrease,
                &mut self.successes,
            );
            self.set_adaptive_limit(now, limit, moved, fx);
            return self.limit;
        }
        match outcome {
            Feedback::Throttled => {
                self.successes = 0;
                // Calls that began before the last decrease are still finishing for about a
                // hold time; their throttles are not news.
                let hold = Duration::from_micros(self.hold_ewma_us.unwrap_or(0));
                let interval = adaptive.cooldown.max(hold);
                let cooled = self
                    .last_decrease
                    .is_none_or(|at| now >= at.after(interval));
                if cooled {
                    self.last_decrease = Some(now);
                    // At least one step down, never below min.
                    let scaled = (f64::from(limit) * adaptive.decrease).floor() as u32;
                    let lowered = scaled.min(limit.saturating_sub(1)).max(adaptive.min);
                    if lowered < limit {
                        self.limit = Some(lowered);
                        self.counters.limit_decreases += 1;
                        self.refuse_impossible(fx);
                    }
                }
            }
            Feedback::Ok => {
                self.successes += 1;
                if self.successes >= limit {
                    self.successes = 0;
                    let raised = limit.saturating_add(adaptive.increase).min(adaptive.max);
                    if raised > limit {
                        self.limit = Some(raised);
                        self.counters.limit_increases += 1;
                        self.grant_waiters(now, fx);
                    }
                }
            }
            Feedback::Error => {}
        }
        self.limit
    }

    /// Puts a limit moved by the controller in force: counted, and waiters granted (raised) or
    /// refused when now impossible (lowered).
    fn set_adaptive_limit(&mut self, now: Timestamp, old: u32, new: u32, fx: &mut Effects) {
        if new < old {
            self.limit = Some(new);
            self.counters.limit_decreases += 1;
            self.refuse_impossible(fx);
        } else if new > old {
            self.limit = Some(new);
            self.counters.limit_increases += 1;
            self.grant_waiters(now, fx);
        }
    }

    /// The most permits one acquire can ever get: the concurrency (or adaptive maximum), and
    /// the rate's burst. `None`: no cap.
    fn permit_cap(&self) -> Option<u32> {
        // The limit in force: a request above a lowered adaptive limit is refused, not left
        // to block the queue (it may be retried when the limit has grown).
        let conc = self.limit;
        let burst = self.spec.rate.map(|r| r.burst);
        match (conc, burst) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn fits(&self, permits: u32) -> bool {
        match self.limit {
            Some(limit) => u64::from(self.in_use) + u64::from(permits) <= u64::from(limit),
            None => true,
        }
    }

    /// When the rate allows `permits` tokens (GCRA: the theoretical arrival time, plus the
    /// tokens asked, less the burst allowance). `None` without a rate limit.
    fn rate_at(&self, permits: u32) -> Option<Timestamp> {
        let rate = self.spec.rate?;
        let t = rate.interval_us();
        let need = t.saturating_mul(u64::from(permits));
        let allowance = t.saturating_mul(u64::from(rate.burst));
        Some(Timestamp(
            self.tat.0.saturating_add(need).saturating_sub(allowance),
        ))
    }

    /// Takes `permits` tokens at `at`.
    fn take_rate(&mut self, at: Timestamp, permits: u32) {
        if let Some(rate) = self.spec.rate {
            let t = rate.interval_us().saturating_mul(u64::from(permits));
            self.tat = Timestamp(self.tat.0.max(at.0).saturating_add(t));
        }
    }

    /// The head waiter's token time, if it fits the concurrency and only the rate holds it.
    fn head_rate_at(&self) -> Option<Timestamp> {
        if self.learning_until.is_some() {
            return None; // Nothing is granted while learning, so no token time is due.
        }
        let (_, head) = self.queue.first_key_value()?;
        if !self.fits(head.permits) {
            return None;
        }
        self.rate_at(head.permits)
    }

    fn grant(
        &mut self,
        now: Timestamp,
        permits: u32,
        lease: Duration,
        enqueued_at: Timestamp,
        label: Option<Arc<str>>,
        request: Option<Arc<str>>,
    ) -> Grant {
        let token = self.next_token;
        self.next_token += 1;
        self.take_rate(now, permits);
        self.counters.granted += 1;
        if self.spec.concurrency.is_none() {
            // Rate only: nothing is held, so there is no lease and nothing to release.
            self.forget_request(request.as_ref());
            self.counters.paced += 1;
            return Grant {
                token: FencingToken(token),
                permits,
                lease: Duration::ZERO,
                lease_deadline: now,
                granted_at: now,
                waited: now.since(enqueued_at),
            };
        }
        let deadline = now.after(lease);
        self.holders.insert(
            token,
            Holder {
                permits,
                deadline,
                granted_at: now,
                lease,
                label,
                request: request.clone(),
            },
        );
        if let Some(key) = request {
            self.requests.insert(key, RequestRef::Held(token));
        }
        self.leases.push(deadline, token);
        self.next_due = self.next_due.min(deadline);
        let holders = &self.holders;
        self.leases.compact(holders.len(), |k, d| {
            holders.get(&k).is_some_and(|h| h.deadline == d)
        });
        self.in_use += permits;
        Grant {
            token: FencingToken(token),
            permits,
            lease,
            lease_deadline: deadline,
            granted_at: now,
            waited: now.since(enqueued_at),
        }
    }

    /// Grants queued waiters from the head while their permits fit.
    fn grant_waiters(&mut self, now: Timestamp, fx: &mut Effects) {
        if self.learning_until.is_some() {
            return;
        }
        while let Some((_, head)) = self.queue.first_key_value() {
            if !self.fits(head.permits) || self.rate_at(head.permits).is_some_and(|at| at > now) {
                break;
            }
            let Some((id, w)) = self.queue.pop_first() else {
                break;
            };
            self.queued_permits -= u64::from(w.permits);
            let grant = self.grant(now, w.permits, w.lease, w.enqueued_at, w.label, w.request);
            fx.wakes.push((WaiterId(id), Ok(grant)));
        }
    }

    /// The answer to a repeated idempotent acquire: the grant it got, or its wait to join.
    /// `None` for a first acquire, or when what the key referred to has ended.
    fn repeat_of(&mut self, now: Timestamp, req: &AcquireRequest) -> Option<Admission> {
        let key = req.request_id.as_ref()?;
        match *self.requests.get(key)? {
            RequestRef::Held(token) => self.holders.get(&token).map(|h| {
                Admission::Granted(Grant {
                    token: FencingToken(token),
                    permits: h.permits,
                    lease: h.lease,
                    lease_deadline: h.deadline,
                    granted_at: h.granted_at,
                    waited: Duration::ZERO,
                })
            }),
            RequestRef::Queued(id) => {
                // Joined: the wait now lasts as long as this caller asks.
                let wait = req
                    .wait
                    .unwrap_or(self.spec.max_wait)
                    .min(self.spec.max_wait);
                let deadline = now.after(wait);
                let waiter = self.queue.get_mut(&id)?;
                waiter.deadline = deadline;
                self.waits.push(deadline, id);
                self.next_due = self.next_due.min(deadline);
                Some(Admission::Queued(WaiterId(id)))
            }
        }
    }

    /// The caller of a queued idempotent acquire went away: its wait is kept for `grace` (at
    /// most its own deadline) so that a retry with the same key can join it, then ends. A
    /// grant made meanwhile goes to nobody, and the store gives it back. `false` if the waiter
    /// is not queued or has no key (cancel it instead).
    pub fn orphan(&mut self, now: Timestamp, waiter: WaiterId, grace: Duration) -> bool {
        let Some(w) = self.queue.get_mut(&waiter.0) else {
            return false;
        };
        if w.request.is_none() {
            return false;
        }
        let deadline = w.deadline.min(now.after(grace));
        if deadline < w.deadline {
            w.deadline = deadline;
            self.waits.push(deadline, waiter.0);
            self.next_due = self.next_due.min(deadline);
        }
        true
    }

    /// Forgets an idempotency key whose grant or wait has ended.
    fn forget_request(&mut self, key: Option<&Arc<str>>) {
        if let Some(key) = key {
            self.requests.remove(key);
        }
    }

    fn observe_hold(&mut self, held: Duration) {
        let sample = u64::try_from(held.as_micros()).unwrap_or(u64::MAX);
        self.hold_ewma_us = Some(match self.hold_ewma_us {
            None => sample,
            Some(avg) if sample >= avg => avg + (sample - avg) / HOLD_EWMA_WEIGHT,
            Some(avg) => avg - (avg - sample) / HOLD_EWMA_WEIGHT,
        });
    }

    /// When a permit is likely to be free for a request with `ahead` permits queued before and
    /// including it: rounds of the limit times the typical hold, or else the nearest lease end.
    fn retry_hint(&mut self, now: Timestamp, ahead: u64) -> Duration {
        let by_rate = self
            .rate_at(u32::try_from(ahead).unwrap_or(u32::MAX))
            .map(|at| at.since(now));
        let Some(limit) = self.limit else {
            return by_rate
                .unwrap_or(Duration::from_secs(1))
                .max(self.learning_left(now))
                .clamp(Duration::from_millis(1), MAX_LEASE);
        };
        let limit = u64::from(limit);
        let rounds = ahead.div_ceil(limit).max(1);
        let estimate = match self.hold_ewma_us {
            Some(avg) => Duration::from_micros(avg.saturating_mul(rounds)),
            None => {
                let holders = &self.holders;
                match self
                    .leases
                    .peek_live(|k, d| holders.get(&k).is_some_and(|h| h.deadline == d))
                {
                    Some((d, _)) => d.since(now),
                    None => Duration::from_secs(1),
                }
            }
        };
        estimate
            .max(by_rate.unwrap_or(Duration::ZERO))
            .max(self.learning_left(now))
            .clamp(Duration::from_millis(1), MAX_LEASE)
    }
}

#[cfg(test)]
mod tests;
