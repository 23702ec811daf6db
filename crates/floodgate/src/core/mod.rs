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
mod at_once;
mod deadlines;
mod feedback;
mod holder_map;
mod holders;
mod idempotency;
pub mod keyed;
mod learning;
pub use self::learning::MAX_ADOPTED_TOKEN;
mod paced;
mod queue;
mod rate;
mod reconfigure;
mod reservation;
mod slot_tree;
mod snapshot;
mod time;
mod types;

pub use self::paced::PacedState;
pub use self::snapshot::{CoreState, HolderState, SpecState, WaiterState};
pub use self::types::{
    AcquireRequest, Admission, Counters, Effects, Feedback, Grant, LimiterStatus, Lost, Refusal,
    WaitOutcome, WaiterId, HOLD_EWMA_WEIGHT, MAX_SCHEDULE, MAX_SCHEDULE_AHEAD, NO_HISTORY_ROUND,
    ORPHANED_WAIT_GRACE,
};

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Duration;

use self::deadlines::DeadlineHeap;
use self::holder_map::HolderMap;
pub use self::holders::{HolderInfo, HoldersView, MAX_HOLDERS_LISTED};
use self::queue::Queue;
use crate::spec::{check_lease, InvalidField, LimiterSpec, MAX_LEASE};
use crate::types::{FencingToken, LimiterName, Timestamp};

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

/// A queued acquire. Kept to 48 bytes, so that its queue entry (id beside it) fits one
/// aligned cache line: at 10k waiters a cancel from the middle found the 80-byte entry it
/// replaced in two cold lines. The label and the idempotency key, which only a grant, a
/// snapshot or an idempotent caller reads, sit apart in [`WaiterTags`].
#[derive(Debug, Clone)]
pub(crate) struct Waiter {
    /// Permits asked for.
    pub(crate) permits: u32,
    /// The lease it will be granted.
    pub(crate) lease: Duration,
    /// When it was queued (the grant's wait time).
    pub(crate) enqueued_at: Timestamp,
    /// When its wait ends. Kept here (not only in the heap) so a retry that joins the wait,
    /// or a caller that goes away, can move it: a heap entry is live only if it matches.
    pub(crate) deadline: Timestamp,
    /// Label and idempotency key, boxed and only when there is either: most waits carry
    /// neither, and none of the queue's hot paths reads them.
    tags: Option<Box<WaiterTags>>,
}

/// The rarely read part of a [`Waiter`].
#[derive(Debug, Clone)]
struct WaiterTags {
    /// Kept for introspection of who holds what, carried over to the grant.
    label: Option<Arc<str>>,
    /// The idempotency key, carried over to the grant.
    request: Option<Arc<str>>,
}

impl Waiter {
    pub(crate) fn new(
        permits: u32,
        lease: Duration,
        enqueued_at: Timestamp,
        deadline: Timestamp,
        label: Option<Arc<str>>,
        request: Option<Arc<str>>,
    ) -> Self {
        let tags =
            (label.is_some() || request.is_some()).then(|| Box::new(WaiterTags { label, request }));
        Waiter {
            permits,
            lease,
            enqueued_at,
            deadline,
            tags,
        }
    }

    /// Its label, if any.
    pub(crate) fn label(&self) -> Option<&Arc<str>> {
        self.tags.as_ref()?.label.as_ref()
    }

    /// Its idempotency key, if any.
    pub(crate) fn request(&self) -> Option<&Arc<str>> {
        self.tags.as_ref()?.request.as_ref()
    }

    /// Its caller went away: an idempotent wait is kept for `grace` (at most its own
    /// deadline) so that a retry with the same key can join it. `None` if it has no key (cancel
    /// it instead); else `Some(true)` if its deadline moved earlier, which the caller must also
    /// record in its deadline heap (plain and keyed cores keep different ones).
    pub(crate) fn orphan(&mut self, now: Timestamp, grace: Duration) -> Option<bool> {
        self.request()?;
        let deadline = self.deadline.min(now.after(grace));
        let moved = deadline < self.deadline;
        self.deadline = deadline;
        Some(moved)
    }

    /// Label and idempotency key, taken out for the grant.
    pub(crate) fn into_tags(self) -> (Option<Arc<str>>, Option<Arc<str>>) {
        match self.tags {
            Some(tags) => (tags.label, tags.request),
            None => (None, None),
        }
    }
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
    /// Grants out, by token (a ring indexed by token on the hot path: see `holder_map.rs`).
    holders: HolderMap,
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
    /// Idempotency keys of rate-only grants, which hold nothing: kept for a retention period
    /// so that a retry gets the same grant (see `paced.rs`).
    paced: paced::PacedRequests,
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
        Ok(Self::new_total(spec, first_token))
    }

    /// A core whose spec is already validated; a keyed limiter's total may have no limit of
    /// its own (per-key rates only: see `keyed::total_spec_for`).
    pub(crate) fn new_total(spec: LimiterSpec, first_token: u64) -> Self {
        LimiterCore {
            holders: HolderMap::default(),
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
            paced: paced::PacedRequests::default(),
            spec,
        }
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

    /// Whether an idempotent acquire with this `request_id` is queued or its grant held: a
    /// new acquire with it is a repeat.
    pub(crate) fn knows_request(&self, request_id: &str) -> bool {
        self.requests.contains_key(request_id)
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
        self.admit(now, req)
    }

    /// [`acquire`](Self::acquire) once time is applied and it is not a repeat: validates,
    /// then grants, queues or refuses.
    fn admit(&mut self, now: Timestamp, req: &AcquireRequest) -> Admission {
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
            Waiter::new(
                req.permits,
                lease,
                now,
                deadline,
                req.holder.clone(),
                req.request_id.clone(),
            ),
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
    #[inline]
    pub fn release(&mut self, now: Timestamp, token: FencingToken, fx: &mut Effects) -> bool {
        self.advance(now, fx);
        let Some(holder) = self.holders.remove_released(token.0) else {
            return false;
        };
        self.leases.forget_latest(holder.deadline, token.0);
        self.forget_request(holder.request.as_ref());
        // Widened only for the trip out of the map (see `Released`): it was a u32 going in.
        self.in_use -= holder.permits as u32;
        self.counters.released += 1;
        self.observe_hold(now.since(holder.granted_at));
        // Nobody queued (the uncontended pair): nobody to grant.
        if !self.queue.is_empty() {
            self.grant_waiters(now, fx);
        }
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
        self.forget_request(w.request());
        self.queued_permits -= u64::from(w.permits);
        self.counters.cancelled += 1;
        // The head may have been holding back smaller requests behind it.
        self.grant_waiters(now, fx);
        true
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

    // Always inlined (three callers): returned through memory, the grant was copied out in
    // wider moves than it was written with, a store-forwarding stall on every acquire.
    #[inline(always)]
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
            // Rate only: nothing is held, so there is no lease and nothing to release; the
            // key is remembered for the default lease, for a retry after a lost answer.
            self.forget_request(request.as_ref());
            if let Some(key) = request {
                let retention = self.spec.default_lease;
                self.paced.remember(now, key, token, permits, retention);
            }
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
            let (permits, lease, enqueued_at) = (w.permits, w.lease, w.enqueued_at);
            let (label, request) = w.into_tags();
            let grant = self.grant(now, permits, lease, enqueued_at, label, request);
            fx.wakes.push((WaiterId(id), Ok(grant)));
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
    /// including it: rounds of the limit times the typical hold. Before any release there is
    /// no typical hold: [`NO_HISTORY_ROUND`] per round, no later than the nearest lease end
    /// (the lease alone, often minutes, left a backend idle while every refused worker waited
    /// out the first holders' whole lease).
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
                let guess =
                    NO_HISTORY_ROUND.saturating_mul(u32::try_from(rounds).unwrap_or(u32::MAX));
                let holders = &self.holders;
                match self
                    .leases
                    .peek_live(|k, d| holders.get(&k).is_some_and(|h| h.deadline == d))
                {
                    Some((d, _)) => d.since(now).min(guess),
                    None => guess,
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
