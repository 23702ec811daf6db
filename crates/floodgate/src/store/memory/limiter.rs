//! One embedded limiter: the state machine behind a mutex, plus the waiters' wake-up slots.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;

use super::durable::record::Op;
use super::durable::LimiterLog;
use super::listeners::Listeners;
use crate::clock::Clock;
use crate::core::{
    AcquireRequest, Admission, Effects, Feedback, Grant, HoldersView, LimiterCore, LimiterStatus,
    Refusal, U64Map, WaitOutcome, WaiterId,
};
use crate::error::{AcquireError, ExtendError, StoreError};
use crate::limiter::AcquireOptions;
use crate::spec::{InvalidField, LimiterSpec};
use crate::store::LimiterBackend;
use crate::sync::{Mutex, MutexGuard};
use crate::types::{FencingToken, LimiterName, ReservationId, Schedule, Timestamp};

/// A handle to one limiter of a [`MemoryStore`](super::MemoryStore). Cheap to clone.
pub struct MemoryLimiter<C: Clock> {
    shared: Arc<Shared<C>>,
}

impl<C: Clock> Clone for MemoryLimiter<C> {
    fn clone(&self) -> Self {
        MemoryLimiter {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<C: Clock> std::fmt::Debug for MemoryLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

pub(super) struct Shared<C> {
    /// For errors and status.
    pub(super) name: LimiterName,
    /// The only source of `now` for this limiter.
    pub(super) clock: C,
    pub(super) state: Mutex<State>,
    /// The store's write-ahead log, if durable: reachable without taking `state`'s lock.
    pub(super) wal: Option<Arc<super::durable::wal::Wal>>,
    /// Wakes the timer task when the nearest deadline moved earlier (or the limiter closed).
    /// Behind its own `Arc` so the timer task can wait on it without keeping the limiter alive.
    pub(super) timer: Arc<Notify>,
}

impl<C> Drop for Shared<C> {
    fn drop(&mut self) {
        // Lets the timer task notice the limiter is gone and exit.
        self.timer.notify_one();
    }
}

pub(super) struct State {
    pub(super) core: LimiterCore,
    /// For a keyed limiter, its per-key layer; `core` is then its total (see
    /// `core/keyed`). Every operation goes through the layer when it is present.
    pub(super) keyed: Option<Box<crate::core::keyed::KeyLayer>>,
    /// Who listens for each queued waiter's outcome: the listener's number and the waker of
    /// its future (once polled). An entry exists while its waiter is queued in `core` and
    /// someone listens: a repeated idempotent acquire takes the entry over (a new number), and
    /// an abandoned idempotent wait has none. A slot here, not a channel per waiter, so a wait
    /// owns no allocation of its own and a cancel at 10k touches one cold line less.
    waiters: Listeners<(u64, Option<Waker>)>,
    /// Outcomes decided but not yet taken, by waiter id, with the number of the listener they
    /// went to. Each stays until its future polls (or is dropped): a handful at a time.
    decided: U64Map<(u64, WaitOutcome)>,
    /// The number of the next listener.
    next_listener: u64,
    /// The write-ahead log, when the store is durable: every operation is recorded in it.
    pub(super) log: Option<LimiterLog>,
    /// The wake-up list, kept between operations so a handoff does not allocate one.
    spare: Vec<(WaiterId, WaitOutcome)>,
    /// The deadline the timer task is armed for (`MAX` when idle). The timer is only poked
    /// when the state machine's next deadline is earlier, so steady traffic never wakes it.
    timer_at: Timestamp,
    /// Set by delete: every operation then answers as for an unknown limiter.
    pub(super) closed: bool,
}

impl<C: Clock> MemoryLimiter<C> {
    /// A limiter that is not part of a store and has no timer task: leases and waits expire
    /// only when an operation arrives. For tests of the wake-up path (which run without a
    /// tokio runtime); use [`MemoryStore`](super::MemoryStore) for everything else.
    pub fn standalone(
        name: LimiterName,
        spec: LimiterSpec,
        clock: C,
        first_token: u64,
    ) -> Result<Self, InvalidField> {
        let core = LimiterCore::new(spec, first_token)?;
        Ok(MemoryLimiter::with_core(name, core, clock, None))
    }

    /// A limiter around an existing core (created, or recovered from disk), logging to `log`.
    pub(super) fn with_core(
        name: LimiterName,
        core: LimiterCore,
        clock: C,
        log: Option<LimiterLog>,
    ) -> Self {
        MemoryLimiter {
            shared: Arc::new(Shared {
                name,
                wal: log.as_ref().map(|l| Arc::clone(&l.wal)),
                clock,
                state: Mutex::new(State {
                    core,
                    keyed: None,
                    waiters: Listeners::default(),
                    decided: U64Map::default(),
                    next_listener: 0,
                    log,
                    spare: Vec::new(),
                    timer_at: Timestamp::MAX,
                    closed: false,
                }),
                timer: Arc::new(Notify::new()),
            }),
        }
    }

    /// Waits until every operation recorded so far is durable (a no-op without a log).
    /// Called before answering anything a client relies on: a grant, an extend, a release.
    pub(super) async fn durable(&self) -> Result<(), StoreError> {
        match &self.shared.wal {
            Some(wal) => wal.commit_all().await,
            None => Ok(()),
        }
    }

    pub(super) fn shared(&self) -> &Arc<Shared<C>> {
        &self.shared
    }

    /// Runs one state-machine operation under the lock, then delivers its wake-ups and re-arms
    /// the timer, all before unlocking, so a wake-up is never lost or reordered.
    // Always inlined: generic over the operation, so each caller has its own copy anyway, and
    // inlined the operation's answer (a grant) stays in registers instead of being copied out
    // through memory (a store-forwarding stall per copy on the uncontended pair).
    #[inline(always)]
    pub(super) fn with_state<R>(
        &self,
        op: impl FnOnce(&mut State, Timestamp, &mut Effects) -> R,
    ) -> Result<R, StoreError> {
        let (mut state, now, mut fx) = self.begin()?;
        if state.log.is_some() {
            // Durable: the passage of time is applied and logged before the operation (its
            // own advance to the same `now` then does nothing). Otherwise an operation that is
            // not logged, or not logged when it fails (a holders or keys read, a bad key
            // override, the cancel of a wait already decided), could grant a waiter with no
            // record of it: the waiter is answered, and after a crash recovery drops it as
            // queued and hands its token out again.
            state.advance_logged(now, &mut fx);
        }
        let out = op(&mut state, now, &mut fx);
        self.finish(&mut state, now, fx);
        Ok(out)
    }

    /// The first half of [`with_state`](Self::with_state): the lock, the time, an empty
    /// wake-up list. Every `begin` is followed by a [`finish`](Self::finish) before unlocking.
    #[inline(always)]
    fn begin(&self) -> Result<(MutexGuard<'_, State>, Timestamp, Effects), StoreError> {
        let mut state = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if state.closed {
            return Err(StoreError::UnknownLimiter(self.shared.name.clone()));
        }
        let now = self.shared.clock.now();
        let fx = Effects {
            wakes: std::mem::take(&mut state.spare),
        };
        Ok((state, now, fx))
    }

    /// The second half of [`with_state`](Self::with_state): delivers the wake-ups and re-arms
    /// the timer, still under the lock.
    #[inline(always)]
    fn finish(&self, state: &mut State, now: Timestamp, fx: Effects) {
        state.settle(now, fx);
        if let Some(next) = state.deadline_hint() {
            if next < state.timer_at {
                state.timer_at = next;
                self.shared.timer.notify_one();
            }
        }
    }
}

impl State {
    /// Records an operation in the log, if there is one. Called under the lock, right after
    /// the operation ran, so each limiter's records are in the order its operations ran.
    pub(super) fn record(&mut self, now: Timestamp, op: impl FnOnce() -> Op) {
        if let Some(log) = &self.log {
            log.append(now, op());
        }
    }

    /// Runs `advance` and records it if it changed anything (a lease expired, a wait ended, a
    /// waiter was granted): status reads and timer passes that change nothing are not logged.
    pub(super) fn advance_logged(&mut self, now: Timestamp, fx: &mut Effects) {
        if let Some(keyed) = &mut self.keyed {
            let before = self.core.counters();
            keyed.advance(&mut self.core, now, fx);
            // Logged when it changed what later operations see (a lapse, a time-out, a grant);
            // dropping idle keys is repeated by the next operation's own advance.
            if self.log.is_some() && self.core.counters() != before {
                self.record(now, || Op::Advance);
            }
            return;
        }
        if self.log.is_none() {
            // Not durable: nothing to compare, nothing to record.
            self.core.advance(now, fx);
            return;
        }
        let before = self.core.counters();
        self.core.advance(now, fx);
        if self.core.counters() != before {
            self.record(now, || Op::Advance);
        }
    }

    /// Delivers wake-ups. A grant whose waiter can no longer receive it goes straight back,
    /// which may grant the next waiter, hence the loop.
    #[inline]
    pub(super) fn settle(&mut self, now: Timestamp, mut fx: Effects) {
        while !fx.is_empty() {
            let mut returned = Vec::new();
            for (id, outcome) in fx.wakes.drain(..) {
                match self.waiters.remove(&id.0) {
                    Some((listener, waker)) => {
                        self.decided.insert(id.0, (listener, outcome));
                        if let Some(waker) = waker {
                            waker.wake();
                        }
                    }
                    None => {
                        if let Ok(grant) = outcome {
                            returned.push(grant.token);
                        }
                    }
                }
            }
            for token in returned {
                self.release_any(now, token, &mut fx);
                self.record(now, || Op::Release { token: token.0 });
            }
        }
        // Keep the (empty) list's allocation for the next operation.
        self.spare = fx.wakes;
    }

    /// A repeat of an idempotent acquire was handed grant `token`, decided for an earlier
    /// attempt that has not taken it: the repeat takes it over, as it would the wait. That
    /// attempt, whose caller has presumably gone (a broken connection not noticed yet, or an
    /// abandoned wait kept for a retry), then does not give the grant back, nor gets it too if
    /// polled (it hears `Superseded`). The grant may have been decided earlier (in `decided`)
    /// or by this very call's advance of time (in `fx`, not delivered yet: delivered, a grant
    /// nobody listens for would go straight back while the repeat's caller holds it).
    fn take_over_grant(&mut self, token: FencingToken, fx: &mut Effects) {
        let waiters = &mut self.waiters;
        fx.wakes.retain(|(id, outcome)| {
            let taken_over = matches!(outcome, Ok(g) if g.token == token);
            if taken_over {
                // Its first attempt, if it still listens, is woken to hear it was superseded.
                if let Some((_, Some(waker))) = waiters.remove(&id.0) {
                    waker.wake();
                }
            }
            !taken_over
        });
        if !self.decided.is_empty() {
            self.decided
                .retain(|_, (_, outcome)| !matches!(outcome, Ok(g) if g.token == token));
        }
    }

    /// Marks the timer as idle; the timer task re-arms it after each pass.
    pub(super) fn set_timer(&mut self, at: Option<Timestamp>) {
        self.timer_at = at.unwrap_or(Timestamp::MAX);
    }
}

/// The queued part of an acquire. Dropping it before the outcome arrives cancels the wait.
struct QueuedAcquire<C: Clock> {
    limiter: MemoryLimiter<C>,
    id: WaiterId,
    /// This listener's number: a repeat of an idempotent acquire may take the wait over.
    listener: u64,
    /// Idempotent: if dropped, the wait stays queued for a retry to join (a grant made while
    /// nobody listens goes straight back).
    idempotent: bool,
    /// Set once the outcome has been taken, so `Drop` knows there is nothing to undo.
    done: bool,
}

impl<C: Clock> Future for QueuedAcquire<C> {
    type Output = Result<Grant, AcquireError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (id, listener) = (self.id.0, self.listener);
        let outcome = {
            // Not `with_state`: a deleted limiter's last answers are still to be read here.
            let mut state = self
                .limiter
                .shared
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if state.decided.get(&id).is_some_and(|(l, _)| *l == listener) {
                state.decided.remove(&id).map(|(_, outcome)| outcome)
            } else {
                match state.waiters.get_mut(&id) {
                    Some((l, waker)) if *l == listener => {
                        // Still queued: keep the latest waker (a task may move between polls).
                        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            *waker = Some(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                    // Nobody listens for us any more, and no outcome came to us.
                    _ => None,
                }
            }
        };
        self.done = true;
        Poll::Ready(match outcome {
            Some(Ok(grant)) => Ok(grant),
            Some(Err(refusal)) => Err(AcquireError::Refused(refusal)),
            // No outcome and no listener: a retry of this idempotent acquire took the wait
            // over, or the limiter itself is gone.
            None if self.idempotent => Err(AcquireError::Superseded),
            None => Err(StoreError::UnknownLimiter(self.limiter.shared.name.clone()).into()),
        })
    }
}

impl<C: Clock> Drop for QueuedAcquire<C> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let id = self.id;
        let listener = self.listener;
        let idempotent = self.idempotent;
        // A closed limiter already answered every waiter; nothing to undo then.
        let _ = self.limiter.with_state(|state, now, fx| {
            let mine = state
                .waiters
                .get(&id.0)
                .is_some_and(|(l, _)| *l == listener);
            if idempotent && state.is_queued_any(id) {
                // Leave the wait, for a while, for a retry to join; stop listening if still
                // ours. A retry that already took it over keeps it as it is.
                if mine {
                    state.waiters.remove(&id.0);
                    let grace = crate::core::ORPHANED_WAIT_GRACE;
                    if state.orphan_any(now, id, grace) {
                        state.record(now, || Op::Orphan {
                            waiter: id.0,
                            grace_us: u64::try_from(grace.as_micros()).unwrap_or(u64::MAX),
                        });
                    }
                }
                return;
            }
            if state.cancel_any(now, id, fx) {
                state.record(now, || Op::Cancel { waiter: id.0 });
                state.waiters.remove(&id.0);
                return;
            }
            // Not queued any more: decided already (possibly by this very call's advance of
            // time, whose wake-ups are in `fx`). Deliver those first, then look at our own: a
            // grant nobody will take goes back.
            state.settle(now, std::mem::take(fx));
            if state.decided.get(&id.0).is_none_or(|(l, _)| *l != listener) {
                return;
            }
            if let Some((_, Ok(grant))) = state.decided.remove(&id.0) {
                state.release_any(now, grant.token, fx);
                state.record(now, || Op::Release {
                    token: grant.token.0,
                });
            }
        });
    }
}

/// An embedded acquire. Written out rather than an `async fn`, whose future was 688 bytes with
/// its discriminant at the far end: a dropped wait read three or four cold lines of it at 10k
/// waiters. Here a queued acquire is a tag and its [`QueuedAcquire`], side by side.
pub(super) struct Acquire<'a, 'k, C: Clock> {
    limiter: &'a MemoryLimiter<C>,
    /// Where the acquire stands.
    step: Step<'a, 'k, C>,
}

/// Steps of an [`Acquire`].
enum Step<'a, 'k, C: Clock> {
    /// Not polled yet: the acquire runs at the first poll, as an `async fn` would.
    Start(Option<&'k str>, AcquireRequest),
    /// Queued, listening for its outcome.
    Waiting(QueuedAcquire<C>),
    /// Granted, waiting for the log to have it. Boxed: a durable store waits for its disk
    /// here anyway, and inline the log's future would more than double every acquire.
    /// With the grant's token, unless the acquire is idempotent: dropped here, the grant goes
    /// back (nobody will hold it), as one that raced a dropped wait does. An idempotent grant
    /// stays, for the retry that owns it (it may have been handed the same grant already).
    Logging(
        Pin<Box<dyn Future<Output = Result<Grant, AcquireError>> + Send + 'a>>,
        Option<FencingToken>,
    ),
    /// Answered.
    Done,
}

impl<C: Clock> Future for Acquire<'_, '_, C> {
    type Output = Result<Grant, AcquireError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // Matched in place, not moved out: the uncontended acquire (the common case) is
        // answered in its first poll without copying the request around.
        let idempotent;
        let out = match &mut this.step {
            Step::Start(key, req) => {
                idempotent = req.request_id.is_some();
                let started = this.limiter.start(*key, req);
                this.step = Step::Done;
                match started {
                    Err(e) => Err(e.into()),
                    Ok(Start::Decided(out)) => out,
                    Ok(Start::Queued(mut wait)) => match Pin::new(&mut wait).poll(cx) {
                        Poll::Pending => {
                            this.step = Step::Waiting(wait);
                            return Poll::Pending;
                        }
                        Poll::Ready(out) => out,
                    },
                }
            }
            Step::Waiting(wait) => {
                idempotent = wait.idempotent;
                match Pin::new(wait).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(out) => {
                        this.step = Step::Done;
                        out
                    }
                }
            }
            Step::Logging(logging, _) => {
                let out = std::task::ready!(logging.as_mut().poll(cx));
                this.step = Step::Done;
                return Poll::Ready(out);
            }
            Step::Done => {
                idempotent = false;
                Err(
                    StoreError::Unavailable("this acquire was polled after it completed".into())
                        .into(),
                )
            }
        };
        let grant = out?;
        if this.limiter.shared.wal.is_none() {
            return Poll::Ready(Ok(grant));
        }
        let token = (!idempotent).then_some(grant.token);
        let mut logging: Pin<Box<dyn Future<Output = _> + Send + '_>> =
            Box::pin(this.limiter.logged(grant));
        match logging.as_mut().poll(cx) {
            Poll::Pending => {
                this.step = Step::Logging(logging, token);
                Poll::Pending
            }
            ready => ready,
        }
    }
}

impl<C: Clock> Drop for Acquire<'_, '_, C> {
    fn drop(&mut self) {
        // Dropped while its grant was being made durable: nobody will hold it (the caller
        // went away, e.g. a timeout around the acquire), so it goes back now, not when its
        // lease ends. (Not awaited: a drop cannot wait for the disk; a crash before the
        // release is on disk restores the grant, whose lease then ends.)
        if let Step::Logging(_, Some(token)) = self.step {
            self.limiter.release_now(token);
        }
    }
}

/// How an acquire starts, as the lock left it.
enum Queued {
    Decided(Result<Grant, AcquireError>),
    /// Queued under this id, with this listener.
    Listening(WaiterId, u64),
}

/// How an acquire starts, ready to wait.
enum Start<C: Clock> {
    Decided(Result<Grant, AcquireError>),
    Queued(QueuedAcquire<C>),
}

impl<C: Clock> LimiterBackend for MemoryLimiter<C> {
    const CLOCK_IS_LOCAL: bool = true;

    fn local_instant(&self, at: Timestamp) -> Option<tokio::time::Instant> {
        Some(self.shared.clock.instant_at(at))
    }

    fn name(&self) -> &LimiterName {
        &self.shared.name
    }

    // Always inlined (two callers, `Limiter::acquire` and `try_acquire_now`): the grant is
    // then built once where the permit takes it, not copied out through a returned enum.
    #[inline(always)]
    fn acquire_at_once(&self, options: &AcquireOptions) -> Option<Result<Grant, AcquireError>> {
        // A durable grant is answered only once the log has it (an await), a keyed one goes
        // through its key's layer: both take the general path.
        if self.shared.wal.is_some() || options.key_of().is_some() {
            return None;
        }
        let req = options.request();
        // `with_state` written out: the uncontended grant leaves as a plain `Grant`, never
        // wrapped in an `Admission` and a `Result` that were each copied in wide moves.
        let (mut state, now, mut fx) = match self.begin() {
            Ok(begun) => begun,
            Err(e) => return Some(Err(e.into())),
        };
        if state.keyed.is_some() {
            self.finish(&mut state, now, fx);
            return None;
        }
        state.core.advance(now, &mut fx);
        if let Some(grant) = state.core.plain_grant(now, req) {
            state.record(now, || Op::acquire(req));
            self.finish(&mut state, now, fx);
            return Some(Ok(grant));
        }
        let decided = state.core.decide_at_once(now, req);
        if decided.is_some() {
            state.record(now, || Op::acquire(req));
        }
        self.finish(&mut state, now, fx);
        drop(state);
        match decided {
            None => None,
            Some(Admission::Granted(grant)) => Some(Ok(grant)),
            Some(Admission::Refused(refusal)) => Some(Err(refusal.into())),
            // `decide_at_once` never queues; were it to, the waiter would have no listener,
            // so it is never left to look granted: cancelled at once.
            Some(Admission::Queued(id)) => {
                let _ = self.with_state(|state, now, fx| state.cancel_any(now, id, fx));
                Some(Err(StoreError::Unavailable(
                    "internal: an at-once acquire was queued".into(),
                )
                .into()))
            }
        }
    }

    fn acquire(
        &self,
        options: AcquireOptions,
    ) -> impl Future<Output = Result<Grant, AcquireError>> + Send {
        // Not an `async fn`: its future would carry `options` beside the request made of them,
        // and a dropped wait reads more of its own memory the larger it is.
        self.acquire_in(None, options.into_request())
    }

    fn acquire_keyed<'a, 'k>(
        &'a self,
        key: &'k str,
        options: AcquireOptions,
    ) -> impl Future<Output = Result<Grant, AcquireError>> + Send + use<'a, 'k, C> {
        // Not an `async fn`, as `acquire`: its future would wrap the `Acquire` in a second
        // layout with its own copy of the options.
        self.acquire_in(Some(key), options.into_request())
    }

    async fn schedule_keyed(&self, key: &str, count: u32) -> Result<Schedule, StoreError> {
        self.schedule_key(key, count).await
    }

    async fn put_key(
        &self,
        key: &str,
        over: Option<crate::core::keyed::KeyOverride>,
    ) -> Result<(), StoreError> {
        self.put_key_override(key, over).await
    }

    async fn keys(&self, limit: usize) -> Result<Option<crate::core::keyed::KeysView>, StoreError> {
        self.keys_view(limit)
    }

    async fn extend(
        &self,
        token: FencingToken,
        lease: Duration,
        permits: Option<u32>,
    ) -> Result<Timestamp, ExtendError> {
        self.extend_in(None, token, lease, permits).await
    }

    async fn extend_keyed(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
        permits: Option<u32>,
    ) -> Result<Timestamp, ExtendError> {
        self.extend_in(Some(key), token, lease, permits).await
    }

    async fn release(&self, token: FencingToken) -> Result<bool, StoreError> {
        let released = self.release_now(token);
        if released {
            self.durable().await?;
        }
        Ok(released)
    }

    #[inline]
    fn release_in_background(&self, token: FencingToken) {
        self.release_now(token);
    }

    async fn schedule(&self, count: u32) -> Result<Schedule, StoreError> {
        let reservation = ReservationId::random();
        let offsets = self
            .with_state(|state, now, fx| {
                if state.keyed.is_some() {
                    return Err(InvalidField::new(
                        "key",
                        "this limiter is keyed: a schedule names a key",
                    ));
                }
                let out = state.core.schedule(now, count, reservation.0, fx);
                state.record(now, || Op::Schedule {
                    count,
                    reservation: reservation.0,
                });
                out
            })?
            .map_err(StoreError::Invalid)?;
        self.durable().await?;
        Ok(Schedule {
            offsets,
            reservation,
        })
    }

    async fn unschedule(&self, reservation: ReservationId, unused: u32) -> Result<u32, StoreError> {
        let returned = self
            .with_state(|state, now, fx| {
                let out = state.unschedule_any(now, reservation.0, unused, fx);
                state.record(now, || Op::Unschedule {
                    reservation: reservation.0,
                    unused,
                });
                out
            })?
            .map_err(StoreError::Invalid)?;
        self.durable().await?;
        Ok(returned)
    }

    async fn feedback(&self, outcome: Feedback) -> Result<Option<u32>, StoreError> {
        self.feedback_with_latency(outcome, None).await
    }

    async fn feedback_with_latency(
        &self,
        outcome: Feedback,
        latency: Option<Duration>,
    ) -> Result<Option<u32>, StoreError> {
        let limit = self.with_state(|state, now, fx| {
            let out = state.feedback_any(now, outcome, latency, fx);
            state.record(now, || Op::feedback(outcome, latency));
            out
        })?;
        self.durable().await?;
        Ok(limit)
    }

    async fn status(&self) -> Result<LimiterStatus, StoreError> {
        // Apply the passage of time first, so a lease that ended is not reported in use just
        // because the timer task has not run yet.
        self.with_state(|state, now, fx| {
            state.advance_logged(now, fx);
            state.status_any(&self.shared.name)
        })
    }

    async fn holders(&self, limit: usize) -> Result<HoldersView, StoreError> {
        // Time applied first, as for status: a reclaimed lease is not listed.
        self.with_state(|state, now, fx| {
            state.advance_any(now, fx);
            match &state.keyed {
                Some(keyed) => keyed.holders_view(&state.core, now, limit),
                None => state.core.holders_view(now, limit),
            }
        })
    }
}

impl<C: Clock> MemoryLimiter<C> {
    /// An acquire, for `key` of a keyed limiter or (`None`) of a plain one.
    fn acquire_in<'a, 'k>(
        &'a self,
        key: Option<&'k str>,
        req: AcquireRequest,
    ) -> Acquire<'a, 'k, C> {
        Acquire {
            limiter: self,
            step: Step::Start(key, req),
        }
    }

    /// The acquire itself, under the lock: decided at once, or queued with a listener.
    #[inline]
    fn start(&self, key: Option<&str>, req: &AcquireRequest) -> Result<Start<C>, StoreError> {
        let start = self.with_state(|state, now, fx| {
            // A repeat of an idempotent acquire: its id was known before this call.
            let repeat = req
                .request_id
                .as_deref()
                .is_some_and(|id| state.core.knows_request(id));
            let admission = match (&mut state.keyed, key) {
                (None, None) => {
                    let admission = state.core.acquire(now, req, fx);
                    state.record(now, || Op::acquire(req));
                    admission
                }
                (Some(keyed), Some(key)) => {
                    let admission = keyed.acquire(&mut state.core, now, key, req, fx);
                    state.record(now, || Op::keyed_acquire(key, req));
                    admission
                }
                (Some(_), None) => Admission::Refused(Refusal::Invalid(InvalidField::new(
                    "key",
                    "this limiter is keyed: every acquire names a key",
                ))),
                (None, Some(_)) => Admission::Refused(Refusal::Invalid(InvalidField::new(
                    "key",
                    "this limiter is not keyed: create it with per_key to use keys",
                ))),
            };
            match admission {
                Admission::Granted(grant) => {
                    if repeat {
                        state.take_over_grant(grant.token, fx);
                    }
                    Queued::Decided(Ok(grant))
                }
                Admission::Refused(refusal) => Queued::Decided(Err(refusal.into())),
                Admission::Queued(id) => {
                    let listener = state.next_listener;
                    state.next_listener += 1;
                    // A repeat of an idempotent acquire takes the wait over from its first
                    // (presumably disconnected) caller, who is woken to hear so.
                    if let Some((_, Some(waker))) = state.waiters.insert(id.0, (listener, None)) {
                        waker.wake();
                    }
                    Queued::Listening(id, listener)
                }
            }
        })?;
        Ok(match start {
            Queued::Decided(result) => Start::Decided(result),
            Queued::Listening(id, listener) => Start::Queued(QueuedAcquire {
                limiter: self.clone(),
                id,
                listener,
                idempotent: req.request_id.is_some(),
                done: false,
            }),
        })
    }

    /// Answers a grant only once the log has it: a crash must not forget a permit that a
    /// worker holds. If the log failed, gives the permit back (its record cannot be kept).
    async fn logged(&self, grant: Grant) -> Result<Grant, AcquireError> {
        if let Err(e) = self.durable().await {
            self.release_now(grant.token);
            return Err(e.into());
        }
        Ok(grant)
    }
}

impl<C: Clock> MemoryLimiter<C> {
    /// Enters a learning window of `window` from now, in an `EnterLearning` record of its own
    /// (what older releases wrote after a restored limiter's `Create`): the tests still write
    /// it, to check its replay.
    #[cfg(test)]
    pub(super) fn enter_learning(&self, window: Duration) -> Result<(), StoreError> {
        self.with_state(|state, now, _| {
            let until = now.after(window);
            state.core.enter_learning(now, until);
            state.record(now, || Op::EnterLearning { until: until.0 });
        })
    }

    /// Releases synchronously; a deleted limiter holds nothing, so that is "not held".
    #[inline]
    fn release_now(&self, token: FencingToken) -> bool {
        self.with_state(|state, now, fx| {
            // Counters compared only when there is a log to write (not on the hot path).
            let before = state.log.is_some().then(|| state.core.counters());
            let released = state.release_any(now, token, fx);
            // A release of a token not held changes nothing, unless time did: not logged.
            if released || before.is_some_and(|b| state.core.counters() != b) {
                state.record(now, || Op::Release { token: token.0 });
            }
            released
        })
        .unwrap_or(false)
    }
}

#[cfg(test)]
#[path = "wait_tests.rs"]
mod wait_tests;
