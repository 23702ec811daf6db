//! The store boundary: where limiter state lives and how operations reach it.
//!
//! A store performs each operation of the state machine (`core`, internal) atomically and delivers
//! its wake-ups. The embedded [`MemoryStore`] runs the state machine behind a mutex with one
//! timer task per limiter; a Redis store runs the same transitions as Lua scripts. Everything
//! above this boundary (the [`Permit`](crate::Permit) guard, the tower layer, the HTTP server)
//! is written once against these two traits, and one behavioural test suite runs against every
//! store.

pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;

use std::future::Future;
use std::time::Duration;

use crate::core::keyed::{KeyOverride, KeyedSpec, KeysView};
use crate::core::{Feedback, Grant, HoldersView, LimiterStatus};
use crate::error::{AcquireError, ExtendError, StoreError};
use crate::limiter::AcquireOptions;
use crate::spec::LimiterSpec;
use crate::types::{FencingToken, LimiterName, ReservationId, Schedule};

#[cfg(feature = "redis")]
pub use self::redis::{RedisConfig, RedisLimiter, RedisSecurity, RedisStore};
pub use memory::{
    Durability, FsyncPolicy, MemoryLimiter, MemoryStore, RecoveryError, RecoveryReport,
};

/// A place limiters live: creates, changes, lists and deletes them, and hands out handles.
pub trait Store: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// Handle to one limiter in this store.
    type Limiter: LimiterBackend;

    /// Creates the limiter, or changes its spec if it exists (waking waiters a raised limit
    /// admits). Returns its status after the change.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] naming the first field out of range,
    /// [`StoreError::TooManyLimiters`], [`StoreError::Unavailable`].
    ///
    /// # Cancel safety
    ///
    /// A dropped call may or may not have made the change; it is idempotent: call again.
    fn put_limiter(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
    ) -> impl Future<Output = Result<LimiterStatus, StoreError>> + Send;

    /// Like [`put_limiter`](Self::put_limiter), for a limiter this process is told about at
    /// start (its config) when its state may have been lost: if this call creates the limiter
    /// (the store has no state for it), it starts in a learning window of `window`, granting
    /// nothing while holders of permits it forgot re-claim them by extending (see
    /// `docs/learning.md`).
    ///
    /// # Errors
    ///
    /// As [`put_limiter`](Self::put_limiter).
    ///
    /// # Cancel safety
    ///
    /// As [`put_limiter`](Self::put_limiter).
    fn restore_limiter(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
        window: Duration,
    ) -> impl Future<Output = Result<LimiterStatus, StoreError>> + Send {
        let _ = window;
        self.put_limiter(name, spec)
    }

    /// The most limiters this store holds (past it, a create is refused with
    /// [`StoreError::TooManyLimiters`]), or `None` when it has no cap.
    fn max_limiters(&self) -> Option<usize> {
        None
    }

    /// Deletes the limiter: its waiters are refused with `LimiterDeleted`, its permits are no
    /// longer held. `false` if it did not exist.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`].
    ///
    /// # Cancel safety
    ///
    /// A dropped call may or may not have deleted it; delete again to be sure.
    fn delete_limiter(
        &self,
        name: &LimiterName,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Every limiter's status, ordered by name.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    fn list_limiters(&self) -> impl Future<Output = Result<Vec<LimiterStatus>, StoreError>> + Send;

    /// A handle to the named limiter.
    ///
    /// # Errors
    ///
    /// [`StoreError::UnknownLimiter`], [`StoreError::Unavailable`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    fn limiter(
        &self,
        name: &LimiterName,
    ) -> impl Future<Output = Result<Self::Limiter, StoreError>> + Send;

    /// Creates a keyed limiter (a limit per key under the total of `spec`, shared fairly
    /// across keys; see [`crate::core::keyed`]), or changes the spec of one that exists. A
    /// store without keyed limiters (the default) refuses with an error naming the `per_key`
    /// field, so a key is never silently ignored; both stores of this crate have them.
    ///
    /// # Errors
    ///
    /// As [`put_limiter`](Self::put_limiter); [`StoreError::Invalid`] naming `per_key` when a
    /// plain limiter of that name exists (delete it first), or `per_key.concurrency` when no
    /// limit is given anywhere.
    ///
    /// # Cancel safety
    ///
    /// As [`put_limiter`](Self::put_limiter).
    fn put_keyed_limiter(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
        keyed: KeyedSpec,
    ) -> impl Future<Output = Result<LimiterStatus, StoreError>> + Send {
        let _ = (name, spec, keyed);
        std::future::ready(Err(keyed_unsupported("per_key")))
    }

    /// Like [`restore_limiter`](Self::restore_limiter), for a keyed limiter: created in a
    /// learning window of `window` if the store has no state for it (nothing granted for any
    /// key until it ends; both stores of this crate). The default creates it as
    /// [`put_keyed_limiter`](Self::put_keyed_limiter) does, with no window.
    ///
    /// # Errors
    ///
    /// As [`put_keyed_limiter`](Self::put_keyed_limiter).
    ///
    /// # Cancel safety
    ///
    /// As [`put_limiter`](Self::put_limiter).
    fn restore_keyed_limiter(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
        keyed: KeyedSpec,
        window: Duration,
    ) -> impl Future<Output = Result<LimiterStatus, StoreError>> + Send {
        let _ = window;
        self.put_keyed_limiter(name, spec, keyed)
    }

    /// Whether the store answers and can serve, at the cost of one round trip whatever the
    /// number of limiters (readiness probes call it). The embedded store is always ready.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when it does not answer, or cannot serve writes (Redis out
    /// of memory, or one that may evict keys).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        std::future::ready(Ok(()))
    }
}

/// The operations on one limiter.
pub trait LimiterBackend: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// Whether the store reads its time in this process (the embedded store), so that
    /// [`local_instant`](Self::local_instant) maps its timestamps to this process's clock.
    /// A permit then takes its local deadline from the grant instead of reading the clock
    /// around each acquire: the uncontended acquire reads one clock, not two.
    const CLOCK_IS_LOCAL: bool = false;

    /// This process's clock at the store's timestamp `at`, where
    /// [`CLOCK_IS_LOCAL`](Self::CLOCK_IS_LOCAL); `None` (the default) where the store's clock
    /// is elsewhere.
    fn local_instant(&self, at: crate::types::Timestamp) -> Option<tokio::time::Instant> {
        let _ = at;
        None
    }

    /// The limiter's name.
    fn name(&self) -> &LimiterName;

    /// Decides the acquire synchronously when the store can without waiting for anything (an
    /// embedded, non-durable limiter with nobody queued and the permits free): `Some` is its
    /// answer, exactly as [`acquire`](Self::acquire) would give it. `None` (the default), with
    /// nothing changed: call [`acquire`](Self::acquire).
    fn acquire_at_once(&self, options: &AcquireOptions) -> Option<Result<Grant, AcquireError>> {
        let _ = options;
        None
    }

    /// Waits in the limiter's FIFO queue until granted, refused or the wait ends.
    ///
    /// # Errors
    ///
    /// As [`Limiter::acquire`](crate::Limiter::acquire).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future leaves the queue, and a grant that raced the drop is
    /// released, so nothing leaks.
    fn acquire(
        &self,
        options: AcquireOptions,
    ) -> impl Future<Output = Result<Grant, AcquireError>> + Send;

    /// Moves the lease deadline to now + `lease`; returns the new deadline as a [`Grant`]
    /// update. [`ExtendError::Lost`] if the permit is no longer held; never revives.
    ///
    /// `permits`, the permit's size: during a learning window after state loss, an extend of a
    /// permit the store does not know re-adopts it (see `docs/learning.md`). `None`: no
    /// re-adoption.
    ///
    /// # Errors
    ///
    /// [`ExtendError::Lost`], [`ExtendError::Invalid`] for a lease out of range,
    /// [`ExtendError::Store`]. Unlike [`Permit::extend`](crate::Permit::extend), one attempt:
    /// no retry while the store is unreachable.
    ///
    /// # Cancel safety
    ///
    /// A dropped call may or may not have moved the lease; extend again.
    fn extend(
        &self,
        token: FencingToken,
        lease: Duration,
        permits: Option<u32>,
    ) -> impl Future<Output = Result<crate::types::Timestamp, ExtendError>> + Send;

    /// [`extend`](Self::extend) of a keyed limiter's permit, carrying the `key` it was
    /// acquired with: during a learning window an unknown permit is re-adopted under that key
    /// and the total (docs/learning.md). A store without keyed re-adoption ignores the key.
    ///
    /// # Errors
    ///
    /// As [`extend`](Self::extend).
    ///
    /// # Cancel safety
    ///
    /// As [`extend`](Self::extend).
    fn extend_keyed(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
        permits: Option<u32>,
    ) -> impl Future<Output = Result<crate::types::Timestamp, ExtendError>> + Send {
        let _ = key;
        self.extend(token, lease, permits)
    }

    /// Returns a grant. `Ok(false)` if it was not held (unknown, expired, already released).
    ///
    /// # Errors
    ///
    /// [`StoreError::UnknownLimiter`], [`StoreError::Unavailable`] (the lease then frees
    /// the permits when it ends).
    ///
    /// # Cancel safety
    ///
    /// A dropped call may or may not have released; release is idempotent, call again.
    fn release(&self, token: FencingToken)
        -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Returns a grant from a context that cannot wait (a `Drop`): done at once where the
    /// store allows, otherwise on a spawned task. The lease bounds the damage if it fails.
    fn release_in_background(&self, token: FencingToken);

    /// The limiter's status.
    ///
    /// # Errors
    ///
    /// [`StoreError::UnknownLimiter`], [`StoreError::Unavailable`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    fn status(&self) -> impl Future<Output = Result<LimiterStatus, StoreError>> + Send;

    /// Reserves `count` rate tokens for a fan-out; returns each one's start offset from now,
    /// and the reservation's id for [`unschedule`](Self::unschedule).
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] naming `count` (out of range, no rate limit, or reaching
    /// further ahead than `max_wait`), [`StoreError::UnknownLimiter`],
    /// [`StoreError::Unavailable`].
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call may have reserved the tokens, whose offsets are then
    /// lost (they count against the rate for at most `max_wait`).
    fn schedule(&self, count: u32) -> impl Future<Output = Result<Schedule, StoreError>> + Send;

    /// Gives back up to `unused` tokens of a reservation that a producer did not use; returns
    /// how many went back. Only the limiter's latest reservation, while no token has been taken
    /// after it and its rate is unchanged (the burst too), and only tokens whose start has not
    /// come, can be given back (otherwise `Ok(0)`):
    /// GCRA keeps no list of promised times, so anything else would hand out a token twice. A
    /// keyed limiter's reservation ([`schedule_keyed`](Self::schedule_keyed)) goes back to the
    /// total's rate and its key's together: each key's latest, while neither rate's tokens were
    /// taken after it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] naming `count` (0) or `reservation` (no rate limit),
    /// [`StoreError::UnknownLimiter`], [`StoreError::Unavailable`].
    ///
    /// # Cancel safety
    ///
    /// A dropped call may or may not have given the tokens back; calling again is safe (what
    /// went back cannot go back twice).
    fn unschedule(
        &self,
        reservation: ReservationId,
        unused: u32,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;

    /// Reports a backend call's outcome (moves an adaptive limit); returns the limit in force.
    ///
    /// # Errors
    ///
    /// [`StoreError::UnknownLimiter`], [`StoreError::Unavailable`].
    ///
    /// # Cancel safety
    ///
    /// A dropped call may or may not have been counted (one report more or less).
    fn feedback(
        &self,
        outcome: Feedback,
    ) -> impl Future<Output = Result<Option<u32>, StoreError>> + Send;

    /// Like [`acquire`](Self::acquire), for `key` of a keyed limiter: waits in that key's FIFO
    /// queue, served fairly across keys. A store without keyed limiters refuses.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire); a store without keyed limiters refuses with
    /// [`AcquireError::Store`] naming `key`.
    ///
    /// # Cancel safety
    ///
    /// As [`acquire`](Self::acquire).
    fn acquire_keyed(
        &self,
        key: &str,
        options: AcquireOptions,
    ) -> impl Future<Output = Result<Grant, AcquireError>> + Send {
        let _ = (key, options);
        std::future::ready(Err(keyed_unsupported("key").into()))
    }

    /// Like [`schedule`](Self::schedule), against the total's and `key`'s rates; its
    /// reservation is given back with [`unschedule`](Self::unschedule) like a plain one's
    /// (the total's and the key's tokens together).
    ///
    /// # Errors
    ///
    /// As [`schedule`](Self::schedule), and [`StoreError::Invalid`] naming `key` on a limiter
    /// that is not keyed (or a store without keyed limiters).
    ///
    /// # Cancel safety
    ///
    /// As [`schedule`](Self::schedule): not cancel-safe.
    fn schedule_keyed(
        &self,
        key: &str,
        count: u32,
    ) -> impl Future<Output = Result<Schedule, StoreError>> + Send {
        let _ = (key, count);
        std::future::ready(Err(keyed_unsupported("key")))
    }

    /// Sets (or with `None` removes) one key's override of a keyed limiter.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] naming `key` on a limiter that is not keyed (or a store without
    /// keyed limiters), or the override's field out of range; [`StoreError::UnknownLimiter`],
    /// [`StoreError::Unavailable`].
    ///
    /// # Cancel safety
    ///
    /// A dropped call may or may not have set it; it is idempotent: call again.
    fn put_key(
        &self,
        key: &str,
        over: Option<KeyOverride>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (key, over);
        std::future::ready(Err(keyed_unsupported("key")))
    }

    /// A keyed limiter's keys (count and up to `limit` busiest); `None` for a plain limiter.
    ///
    /// # Errors
    ///
    /// [`StoreError::UnknownLimiter`], [`StoreError::Unavailable`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    fn keys(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Option<KeysView>, StoreError>> + Send {
        let _ = limit;
        std::future::ready(Ok(None))
    }

    /// [`feedback`](Self::feedback) with the call's latency (its start to its answer), which a
    /// latency-aware (`gradient`) adaptive limit uses. A store that does not override it drops
    /// the latency (the default), so adding this method breaks no store. A latency above a day
    /// counts as a day (`core::adaptive::MAX_LATENCY`, the HTTP route's bound too).
    ///
    /// # Errors
    ///
    /// As [`feedback`](Self::feedback).
    ///
    /// # Cancel safety
    ///
    /// As [`feedback`](Self::feedback).
    fn feedback_with_latency(
        &self,
        outcome: Feedback,
        latency: Option<Duration>,
    ) -> impl Future<Output = Result<Option<u32>, StoreError>> + Send {
        let _ = latency;
        self.feedback(outcome)
    }

    /// Who holds (up to `limit` grants, lease ending soonest first, with their labels) and a
    /// summary of who waits, read-only. For people (the dashboard, `GET .../holders`), not for
    /// the hot path. A store that cannot list holders answers `Unavailable` (the default), so
    /// adding this method breaks no store.
    ///
    /// # Errors
    ///
    /// [`StoreError::UnknownLimiter`], [`StoreError::Unavailable`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    fn holders(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<HoldersView, StoreError>> + Send {
        let _ = limit;
        async {
            Err(StoreError::Unavailable(
                "this store cannot list holders".into(),
            ))
        }
    }
}

/// The answer of a store that has no keyed limiters (a store outside this crate).
fn keyed_unsupported(field: &'static str) -> StoreError {
    StoreError::Invalid(crate::spec::InvalidField::new(
        field,
        "keyed limiters are not supported by this store (see docs/keyed.md)",
    ))
}
