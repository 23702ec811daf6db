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

mod deadlines;

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Duration;

use self::deadlines::DeadlineHeap;
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
}

impl Default for AcquireRequest {
    fn default() -> Self {
        AcquireRequest {
            permits: 1,
            lease: None,
            wait: None,
            holder: None,
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

/// Monotonic counters of what a limiter has done. `granted = released + expired + held`.
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
    /// Lifetime counters.
    pub counters: Counters,
}

/// Returned by `extend` when the permit is not held (released, expired or never granted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the permit was lost: it expired or was released")]
pub struct Lost;

#[derive(Debug, Clone)]
struct Holder {
    permits: u32,
    deadline: Timestamp,
    granted_at: Timestamp,
    /// Kept for introspection of who holds what.
    #[allow(dead_code)]
    label: Option<Arc<str>>,
}

#[derive(Debug, Clone)]
struct Waiter {
    permits: u32,
    lease: Duration,
    enqueued_at: Timestamp,
    label: Option<Arc<str>>,
}

/// Hashes the u64 keys (tokens, waiter ids) with one multiply: they are sequential, so
/// SipHash's protection against chosen keys buys nothing and costs a third of an acquire.
#[derive(Default, Clone, Copy)]
struct U64Hasher(u64);

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

type U64Map<V> = HashMap<u64, V, BuildHasherDefault<U64Hasher>>;

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
    /// The FIFO queue, ordered by waiter id.
    queue: BTreeMap<u64, Waiter>,
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
    counters: Counters,
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
            spec,
            holders: U64Map::default(),
            leases: DeadlineHeap::default(),
            in_use: 0,
            queue: BTreeMap::new(),
            queued_permits: 0,
            waits: DeadlineHeap::default(),
            next_token: first_token.max(1),
            next_waiter: 0,
            hold_ewma_us: None,
            counters: Counters::default(),
        })
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
            counters: self.counters,
        }
    }

    /// Asks for permits. Granted at once if nobody is queued and they fit; otherwise queued
    /// (outcome delivered later as an effect) or refused.
    pub fn acquire(&mut self, now: Timestamp, req: &AcquireRequest, fx: &mut Effects) -> Admission {
        self.advance(now, fx);
        if req.permits == 0 {
            self.counters.rejected += 1;
            return Admission::Refused(Refusal::Invalid(InvalidField::new(
                "permits",
                "must be at least 1",
            )));
        }
        if req.permits > self.spec.concurrency {
            self.counters.rejected += 1;
            return Admission::Refused(Refusal::PermitsExceedLimit {
                requested: req.permits,
                limit: self.spec.concurrency,
            });
        }
        let lease = req.lease.unwrap_or(self.spec.default_lease);
        if let Err(e) = check_lease("lease_ms", lease) {
            self.counters.rejected += 1;
            return Admission::Refused(Refusal::Invalid(e));
        }
        if self.queue.is_empty() && self.fits(req.permits) {
            let grant = self.grant(now, req.permits, lease, now, req.holder.clone());
            return Admission::Granted(grant);
        }
        let wait = req
            .wait
            .unwrap_or(self.spec.max_wait)
            .min(self.spec.max_wait);
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
                label: req.holder.clone(),
            },
        );
        self.queued_permits += u64::from(req.permits);
        self.waits.push(deadline, id);
        let queue = &self.queue;
        self.waits
            .compact(queue.len(), |k, _| queue.contains_key(&k));
        Admission::Queued(WaiterId(id))
    }

    /// Returns a grant. `false` (and no change) if it is not held: unknown, expired or
    /// already released.
    pub fn release(&mut self, now: Timestamp, token: FencingToken, fx: &mut Effects) -> bool {
        self.advance(now, fx);
        let Some(holder) = self.holders.remove(&token.0) else {
            return false;
        };
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
        self.leases.push(deadline, token.0);
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
        self.spec = spec;
        let limit = self.spec.concurrency;
        let impossible: Vec<u64> = self
            .queue
            .iter()
            .filter(|(_, w)| w.permits > limit)
            .map(|(id, _)| *id)
            .collect();
        for id in impossible {
            if let Some(w) = self.queue.remove(&id) {
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
        self.grant_waiters(now, fx);
        Ok(())
    }

    /// Refuses every waiter: the limiter is going away.
    pub fn close(&mut self, fx: &mut Effects) {
        for (id, _) in std::mem::take(&mut self.queue) {
            self.counters.rejected += 1;
            fx.wakes.push((WaiterId(id), Err(Refusal::LimiterDeleted)));
        }
        self.queued_permits = 0;
    }

    /// Applies the passage of time up to `now`: expires leases and waiter deadlines in deadline
    /// order, granting freed permits to the queue as it goes.
    pub fn advance(&mut self, now: Timestamp, fx: &mut Effects) {
        loop {
            let holders = &self.holders;
            let lease = self
                .leases
                .peek_live(|k, d| holders.get(&k).is_some_and(|h| h.deadline == d))
                .filter(|(d, _)| *d <= now);
            let queue = &self.queue;
            let wait = self
                .waits
                .peek_live(|k, _| queue.contains_key(&k))
                .filter(|(d, _)| *d <= now);
            let lease_first = match (lease, wait) {
                (None, None) => break,
                // On a tie the lease goes first, so the waiter still gets the freed slot.
                (Some((ld, _)), Some((wd, _))) => ld <= wd,
                (l, _) => l.is_some(),
            };
            if lease_first {
                if let Some((_, token)) = lease {
                    self.leases.pop();
                    if let Some(h) = self.holders.remove(&token) {
                        self.in_use -= h.permits;
                        self.counters.expired += 1;
                    }
                }
            } else if let Some((_, id)) = wait {
                self.waits.pop();
                let ahead: u64 = self
                    .queue
                    .range(..=id)
                    .map(|(_, w)| u64::from(w.permits))
                    .sum();
                if let Some(w) = self.queue.remove(&id) {
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
            .peek_live(|k, _| queue.contains_key(&k))
            .map(|(d, _)| d);
        match (lease, wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn fits(&self, permits: u32) -> bool {
        u64::from(self.in_use) + u64::from(permits) <= u64::from(self.spec.concurrency)
    }

    fn grant(
        &mut self,
        now: Timestamp,
        permits: u32,
        lease: Duration,
        enqueued_at: Timestamp,
        label: Option<Arc<str>>,
    ) -> Grant {
        let token = self.next_token;
        self.next_token += 1;
        let deadline = now.after(lease);
        self.holders.insert(
            token,
            Holder {
                permits,
                deadline,
                granted_at: now,
                label,
            },
        );
        self.leases.push(deadline, token);
        let holders = &self.holders;
        self.leases.compact(holders.len(), |k, d| {
            holders.get(&k).is_some_and(|h| h.deadline == d)
        });
        self.in_use += permits;
        self.counters.granted += 1;
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
        while let Some((_, head)) = self.queue.first_key_value() {
            if !self.fits(head.permits) {
                break;
            }
            let Some((id, w)) = self.queue.pop_first() else {
                break;
            };
            self.queued_permits -= u64::from(w.permits);
            let grant = self.grant(now, w.permits, w.lease, w.enqueued_at, w.label);
            fx.wakes.push((WaiterId(id), Ok(grant)));
        }
    }

    fn observe_hold(&mut self, held: Duration) {
        let sample = u64::try_from(held.as_micros()).unwrap_or(u64::MAX);
        self.hold_ewma_us = Some(match self.hold_ewma_us {
            None => sample,
            // Weight 1/8: smooth enough to ignore one odd holder, quick enough to follow a
            // change of workload within a few dozen releases.
            Some(avg) if sample >= avg => avg + (sample - avg) / 8,
            Some(avg) => avg - (avg - sample) / 8,
        });
    }

    /// When a permit is likely to be free for a request with `ahead` permits queued before and
    /// including it: rounds of the limit times the typical hold, or else the nearest lease end.
    fn retry_hint(&mut self, now: Timestamp, ahead: u64) -> Duration {
        let limit = u64::from(self.spec.concurrency);
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
        estimate.clamp(Duration::from_millis(1), MAX_LEASE)
    }
}

#[cfg(test)]
mod tests;
