//! One embedded limiter: the state machine behind a mutex, plus the waiters' wake-up slots.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};

use crate::clock::Clock;
use crate::core::U64Map;
use crate::core::{
    AcquireRequest, Admission, Effects, Feedback, Grant, HoldersView, LimiterCore, LimiterStatus,
    WaitOutcome, WaiterId,
};
use crate::error::{AcquireError, ExtendError, StoreError};
use crate::spec::{InvalidField, LimiterSpec};
use crate::store::LimiterBackend;
use crate::sync::Mutex;
use crate::types::{FencingToken, LimiterName, Timestamp};

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
    /// Where each queued waiter's outcome goes. An entry exists exactly while its waiter is
    /// queued in `core` (inserted under the same lock as the enqueue).
    waiters: U64Map<oneshot::Sender<WaitOutcome>>,
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
        Ok(MemoryLimiter {
            shared: Arc::new(Shared {
                name,
                clock,
                state: Mutex::new(State {
                    core,
                    waiters: U64Map::default(),
                    spare: Vec::new(),
                    timer_at: Timestamp::MAX,
                    closed: false,
                }),
                timer: Arc::new(Notify::new()),
            }),
        })
    }

    pub(super) fn shared(&self) -> &Arc<Shared<C>> {
        &self.shared
    }

    /// Runs one state-machine operation under the lock, then delivers its wake-ups and re-arms
    /// the timer, all before unlocking, so a wake-up is never lost or reordered.
    pub(super) fn with_state<R>(
        &self,
        op: impl FnOnce(&mut State, Timestamp, &mut Effects) -> R,
    ) -> Result<R, StoreError> {
        let mut state = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if state.closed {
            return Err(StoreError::UnknownLimiter(self.shared.name.clone()));
        }
        let now = self.shared.clock.now();
        let mut fx = Effects {
            wakes: std::mem::take(&mut state.spare),
        };
        let out = op(&mut state, now, &mut fx);
        state.settle(now, fx);
        if let Some(next) = state.core.deadline_hint() {
            if next < state.timer_at {
                state.timer_at = next;
                self.shared.timer.notify_one();
            }
        }
        Ok(out)
    }
}

impl State {
    /// Delivers wake-ups. A grant whose waiter can no longer receive it goes straight back,
    /// which may grant the next waiter, hence the loop.
    pub(super) fn settle(&mut self, now: Timestamp, mut fx: Effects) {
        while !fx.is_empty() {
            let mut returned = Vec::new();
            for (id, outcome) in fx.wakes.drain(..) {
                let undelivered = match self.waiters.remove(&id.0) {
                    Some(tx) => tx.send(outcome).err(),
                    None => Some(outcome),
                };
                if let Some(Ok(grant)) = undelivered {
                    returned.push(grant.token);
                }
            }
            for token in returned {
                self.core.release(now, token, &mut fx);
            }
        }
        // Keep the (empty) list's allocation for the next operation.
        self.spare = fx.wakes;
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
    rx: oneshot::Receiver<WaitOutcome>,
    /// Set once the outcome has been taken, so `Drop` knows there is nothing to undo.
    done: bool,
}

impl<C: Clock> Future for QueuedAcquire<C> {
    type Output = Result<Grant, AcquireError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let outcome = match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(outcome) => outcome,
        };
        self.done = true;
        Poll::Ready(match outcome {
            Ok(Ok(grant)) => Ok(grant),
            Ok(Err(refusal)) => Err(AcquireError::Refused(refusal)),
            // The sender is only dropped without a send when the limiter itself is gone.
            Err(_) => Err(StoreError::UnknownLimiter(self.limiter.shared.name.clone()).into()),
        })
    }
}

impl<C: Clock> Drop for QueuedAcquire<C> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let id = self.id;
        let rx = &mut self.rx;
        // A closed limiter already answered every waiter; nothing to undo then.
        let _ = self.limiter.with_state(|state, now, fx| {
            if state.core.cancel(now, id, fx) {
                state.waiters.remove(&id.0);
                return;
            }
            // Not queued any more: decided already (possibly by this very call's advance of
            // time, whose wake-ups are in `fx`). Deliver those first, then look at our own.
            state.settle(now, std::mem::take(fx));
            if let Ok(Ok(grant)) = rx.try_recv() {
                state.core.release(now, grant.token, fx);
            }
        });
    }
}

enum Start {
    Decided(Result<Grant, AcquireError>),
    Queued(WaiterId, oneshot::Receiver<WaitOutcome>),
}

impl<C: Clock> LimiterBackend for MemoryLimiter<C> {
    fn name(&self) -> &LimiterName {
        &self.shared.name
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Grant, AcquireError> {
        let start = self.with_state(|state, now, fx| match state.core.acquire(now, &req, fx) {
            Admission::Granted(grant) => Start::Decided(Ok(grant)),
            Admission::Refused(refusal) => Start::Decided(Err(refusal.into())),
            Admission::Queued(id) => {
                let (tx, rx) = oneshot::channel();
                state.waiters.insert(id.0, tx);
                Start::Queued(id, rx)
            }
        })?;
        match start {
            Start::Decided(result) => result,
            Start::Queued(id, rx) => {
                QueuedAcquire {
                    limiter: self.clone(),
                    id,
                    rx,
                    done: false,
                }
                .await
            }
        }
    }

    async fn extend(&self, token: FencingToken, lease: Duration) -> Result<Timestamp, ExtendError> {
        match self.with_state(|state, now, fx| state.core.extend(now, token, lease, fx)) {
            Ok(Ok(Ok(deadline))) => Ok(deadline),
            Ok(Ok(Err(_lost))) => Err(ExtendError::Lost),
            Ok(Err(invalid)) => Err(ExtendError::Invalid(invalid)),
            // A deleted limiter holds nothing: the permit is lost.
            Err(StoreError::UnknownLimiter(_)) => Err(ExtendError::Lost),
            Err(e) => Err(ExtendError::Store(e)),
        }
    }

    async fn release(&self, token: FencingToken) -> Result<bool, StoreError> {
        Ok(self.release_now(token))
    }

    fn release_in_background(&self, token: FencingToken) {
        self.release_now(token);
    }

    async fn schedule(&self, count: u32) -> Result<Vec<Duration>, StoreError> {
        self.with_state(|state, now, fx| state.core.schedule(now, count, fx))?
            .map_err(StoreError::Invalid)
    }

    async fn feedback(&self, outcome: Feedback) -> Result<Option<u32>, StoreError> {
        self.with_state(|state, now, fx| state.core.feedback(now, outcome, fx))
    }

    async fn status(&self) -> Result<LimiterStatus, StoreError> {
        // Apply the passage of time first, so a lease that ended is not reported in use just
        // because the timer task has not run yet.
        self.with_state(|state, now, fx| {
            state.core.advance(now, fx);
            state.core.status(&self.shared.name)
        })
    }

    async fn holders(&self, limit: usize) -> Result<HoldersView, StoreError> {
        // Time applied first, as for status: a reclaimed lease is not listed.
        self.with_state(|state, now, fx| {
            state.core.advance(now, fx);
            state.core.holders_view(now, limit)
        })
    }
}

impl<C: Clock> MemoryLimiter<C> {
    /// Releases synchronously; a deleted limiter holds nothing, so that is "not held".
    fn release_now(&self, token: FencingToken) -> bool {
        self.with_state(|state, now, fx| state.core.release(now, token, fx))
            .unwrap_or(false)
    }
}
