//! The state machine's public vocabulary: requests, grants, refusals, effects, counters and
//! status, and the constants both stores share.

use std::sync::Arc;
use std::time::Duration;

use crate::spec::{InvalidField, LimiterSpec};
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
///
/// `#[non_exhaustive]`, like the other error enums: a new reason to refuse (as `TooManyKeys`
/// once was) is not a breaking change, so a match outside this crate needs a `_` arm:
///
/// ```compile_fail,E0004
/// use floodgate::Refusal;
///
/// fn act(refusal: Refusal) {
///     match refusal {
///         Refusal::WaitTimeout { .. } | Refusal::QueueFull { .. } => {}
///         Refusal::PermitsExceedLimit { .. } | Refusal::LimiterDeleted => {}
///         Refusal::TooManyKeys { .. } | Refusal::Invalid(_) => {}
///     }
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
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
    #[error("requested {requested} permits but at most {limit} can ever be granted at once")]
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
///
/// `#[non_exhaustive]`, so a counter can be added without breaking callers: read its fields;
/// to build one outside the library, start from [`Default`] and assign them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
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
///
/// `#[non_exhaustive]`: built by the library (read its fields), so one can be added without
/// breaking callers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// [`LimiterCore::enter_learning`](super::LimiterCore::enter_learning)).
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

/// A retry hint's guess of one round of the limit before any permit was released (no hold
/// time known yet): short, so refused work retries soon after the first holders could be done
/// (the hint then follows the measured holds), yet not a busy loop.
pub const NO_HISTORY_ROUND: Duration = Duration::from_secs(1);

/// How long a queued idempotent acquire whose caller went away stays queued for a retry with
/// the same `request_id` to join (long enough for a client's reconnect and retry, short enough
/// that a caller that gave up does not hold a queue slot for its whole wait).
pub const ORPHANED_WAIT_GRACE: Duration = Duration::from_secs(5);

/// Returned by `extend` when the permit is not held (released, expired or never granted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the permit was lost: it expired or was released")]
pub struct Lost;
