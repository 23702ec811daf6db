//! Keyed limiters in the embedded store: a limiter's state holds a
//! [`KeyLayer`](crate::core::keyed::KeyLayer) beside its core, and each operation goes through
//! it. With a data directory, keyed operations are logged and keyed state is snapshotted like
//! any other (see `durable/record.rs`).

use std::sync::PoisonError;
use std::time::Duration;

use super::durable::record::Op;
use super::limiter::{MemoryLimiter, State};
use super::{timer, MemoryStore};
use crate::clock::{token_seed, Clock};
use crate::core::keyed::{KeyLayer, KeyOverride, KeyedSpec, KeyedSpecState, KeysView};
use crate::core::SpecState;
use crate::core::{Effects, Feedback, LimiterStatus, Lost, Refusal, WaiterId};
use crate::error::{ExtendError, StoreError};
use crate::spec::{InvalidField, LimiterSpec};
use crate::store::LimiterBackend;
use crate::types::{FencingToken, LimiterName, ReservationId, Schedule, Timestamp};

impl State {
    /// A moment no later than the next deadline, for re-arming the timer after an operation.
    #[inline]
    pub(super) fn deadline_hint(&mut self) -> Option<Timestamp> {
        match &mut self.keyed {
            Some(keyed) => keyed.next_deadline(&mut self.core),
            None => self.core.deadline_hint(),
        }
    }

    /// The exact next deadline, for the timer task.
    pub(super) fn next_deadline_any(&mut self) -> Option<Timestamp> {
        match &mut self.keyed {
            Some(keyed) => keyed.next_deadline(&mut self.core),
            None => self.core.next_deadline(),
        }
    }

    pub(super) fn advance_any(&mut self, now: Timestamp, fx: &mut Effects) {
        match &mut self.keyed {
            Some(keyed) => keyed.advance(&mut self.core, now, fx),
            None => self.core.advance(now, fx),
        }
    }

    #[inline]
    pub(super) fn release_any(
        &mut self,
        now: Timestamp,
        token: FencingToken,
        fx: &mut Effects,
    ) -> bool {
        match &mut self.keyed {
            Some(keyed) => keyed.release(&mut self.core, now, token, fx),
            None => self.core.release(now, token, fx),
        }
    }

    pub(super) fn cancel_any(
        &mut self,
        now: Timestamp,
        waiter: WaiterId,
        fx: &mut Effects,
    ) -> bool {
        match &mut self.keyed {
            Some(keyed) => keyed.cancel(&mut self.core, now, waiter, fx),
            None => self.core.cancel(now, waiter, fx),
        }
    }

    /// Whether the waiter is still queued (in its key's queue, for a keyed limiter).
    pub(super) fn is_queued_any(&self, waiter: WaiterId) -> bool {
        match &self.keyed {
            Some(keyed) => keyed.is_queued(waiter),
            None => self.core.is_queued(waiter),
        }
    }

    /// An idempotent wait whose caller went away is kept for `grace`, for a retry to join.
    pub(super) fn orphan_any(&mut self, now: Timestamp, waiter: WaiterId, grace: Duration) -> bool {
        match &mut self.keyed {
            Some(keyed) => keyed.orphan(now, waiter, grace),
            None => self.core.orphan(now, waiter, grace),
        }
    }

    /// Extend; during a learning window an unknown permit is re-adopted when it carries its
    /// permits (and, for a keyed limiter, its key).
    pub(super) fn extend_any(
        &mut self,
        now: Timestamp,
        token: FencingToken,
        lease: Duration,
        key: Option<&str>,
        permits: Option<u32>,
        fx: &mut Effects,
    ) -> Result<Result<Timestamp, Lost>, InvalidField> {
        match &mut self.keyed {
            Some(keyed) => {
                keyed.extend_or_adopt(&mut self.core, now, token, lease, key.zip(permits), fx)
            }
            None => self.core.extend_or_adopt(now, token, lease, permits, fx),
        }
    }

    pub(super) fn feedback_any(
        &mut self,
        now: Timestamp,
        outcome: Feedback,
        latency: Option<std::time::Duration>,
        fx: &mut Effects,
    ) -> Option<u32> {
        match &mut self.keyed {
            Some(keyed) => keyed.feedback(&mut self.core, now, outcome, latency, fx),
            None => self.core.feedback_with(now, outcome, latency, fx),
        }
    }

    pub(super) fn status_any(&self, name: &LimiterName) -> LimiterStatus {
        match &self.keyed {
            Some(keyed) => keyed.status(&self.core, name),
            None => self.core.status(name),
        }
    }

    /// Gives back a reservation's unused tokens (a keyed one: the total's and its key's).
    pub(super) fn unschedule_any(
        &mut self,
        now: Timestamp,
        reservation: u64,
        unused: u32,
        fx: &mut Effects,
    ) -> Result<u32, InvalidField> {
        match &mut self.keyed {
            Some(keyed) => keyed.unschedule(&mut self.core, now, reservation, unused, fx),
            None => self.core.unschedule(now, reservation, unused, fx),
        }
    }

    pub(super) fn close_any(&mut self, fx: &mut Effects) {
        match &mut self.keyed {
            Some(keyed) => keyed.close(&mut self.core, fx),
            None => self.core.close(fx),
        }
    }

    /// Changes the spec; for a keyed limiter `keyed` replaces its per-key spec (`None`: kept).
    /// A plain limiter cannot become keyed in place.
    pub(super) fn reconfigure_any(
        &mut self,
        now: Timestamp,
        spec: LimiterSpec,
        keyed: Option<KeyedSpec>,
        fx: &mut Effects,
    ) -> Result<(), InvalidField> {
        match (&mut self.keyed, keyed) {
            (Some(layer), keyed) => {
                let keyed = keyed.unwrap_or_else(|| layer.keyed_spec().clone());
                layer.reconfigure(&mut self.core, now, spec, keyed, fx)
            }
            (None, None) => self.core.reconfigure(now, spec, fx),
            (None, Some(_)) => Err(InvalidField::new(
                "per_key",
                crate::core::keyed::PLAIN_STAYS_PLAIN,
            )),
        }
    }
}

impl<C: Clock> MemoryLimiter<C> {
    /// An extend, with the key a keyed permit was acquired with (for re-adoption).
    pub(super) async fn extend_in(
        &self,
        key: Option<&str>,
        token: FencingToken,
        lease: Duration,
        permits: Option<u32>,
    ) -> Result<Timestamp, ExtendError> {
        let extended = self.with_state(|state, now, fx| {
            let out = state.extend_any(now, token, lease, key, permits, fx);
            state.record(now, || Op::Extend {
                token: token.0,
                lease_us: u64::try_from(lease.as_micros()).unwrap_or(u64::MAX),
                permits,
                key: key.map(str::to_owned),
            });
            out
        });
        if matches!(extended, Ok(Ok(Ok(_)))) {
            self.durable().await?;
        }
        match extended {
            Ok(Ok(Ok(deadline))) => Ok(deadline),
            Ok(Ok(Err(_lost))) => Err(ExtendError::Lost),
            Ok(Err(invalid)) => Err(ExtendError::Invalid(invalid)),
            // A deleted limiter holds nothing: the permit is lost.
            Err(StoreError::UnknownLimiter(_)) => Err(ExtendError::Lost),
            Err(e) => Err(ExtendError::Store(e)),
        }
    }

    pub(super) async fn schedule_key(&self, key: &str, count: u32) -> Result<Schedule, StoreError> {
        let reservation = ReservationId::random();
        let offsets = self
            .with_state(|state, now, fx| {
                let out = match &mut state.keyed {
                    Some(keyed) => {
                        keyed.schedule(&mut state.core, now, key, count, reservation.0, fx)
                    }
                    None => return Err(Refusal::Invalid(not_keyed())),
                };
                state.record(now, || Op::KeyedSchedule {
                    key: key.to_owned(),
                    count,
                    reservation: reservation.0,
                });
                out
            })?
            .map_err(|refusal| match refusal {
                Refusal::TooManyKeys {
                    max_keys,
                    retry_after,
                } => StoreError::TooManyKeys {
                    max_keys,
                    retry_after,
                },
                Refusal::Invalid(field) => StoreError::Invalid(field),
                // A schedule is refused only for its fields or its key.
                other => StoreError::Invalid(InvalidField::new("count", other.to_string())),
            })?;
        self.durable().await?;
        Ok(Schedule {
            offsets,
            reservation,
        })
    }

    pub(super) async fn put_key_override(
        &self,
        key: &str,
        over: Option<KeyOverride>,
    ) -> Result<(), StoreError> {
        self.with_state(|state, now, fx| {
            let out = match &mut state.keyed {
                Some(keyed) => keyed.put_override(&mut state.core, now, key, over, fx),
                None => return Err(not_keyed()),
            };
            if out.is_ok() {
                state.record(now, || Op::PutKey {
                    key: key.to_owned(),
                    concurrency: over.and_then(|o| o.concurrency),
                    weight: over.map(|o| o.weight),
                });
            }
            out
        })?
        .map_err(StoreError::Invalid)?;
        self.durable().await
    }

    /// Makes this (new or recovered) limiter keyed.
    pub(super) fn set_keyed(&self, layer: KeyLayer) {
        self.shared()
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keyed = Some(Box::new(layer));
    }

    pub(super) fn keys_view(&self, limit: usize) -> Result<Option<KeysView>, StoreError> {
        self.with_state(|state, now, fx| {
            let State { core, keyed, .. } = state;
            keyed.as_mut().map(|keyed| {
                // Time applied first, as for status.
                keyed.advance(core, now, fx);
                keyed.keys_view(limit)
            })
        })
    }
}

fn not_keyed() -> InvalidField {
    InvalidField::new(
        "key",
        "this limiter is not keyed: create it with per_key to use keys",
    )
}

impl<C: Clock> MemoryStore<C> {
    /// [`Store::put_keyed_limiter`](crate::Store::put_keyed_limiter) for the embedded store; a
    /// limiter it creates starts learning for `learning` when given (as `put_plain`).
    pub(super) async fn put_keyed(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
        keyed: KeyedSpec,
        learning: Option<Duration>,
    ) -> Result<LimiterStatus, StoreError> {
        keyed.validate(&spec)?;
        crate::core::keyed::total_spec(&spec).validate()?;
        let existing = {
            let mut map = self
                .inner
                .limiters
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            match map.get(name) {
                Some(limiter) => Some(limiter.clone()),
                None => {
                    let first_token = self.new_limiter_token(map.len())?;
                    let (mut core, layer) =
                        KeyLayer::new(spec.clone(), keyed.clone(), first_token)?;
                    let now = self.inner.clock.now();
                    let learning_until = learning.map(|window| now.after(window));
                    if let Some(until) = learning_until {
                        core.enter_learning(now, until);
                    }
                    let log = self.inner.persist.as_ref().map(|p| {
                        p.create_keyed(now, name, &spec, &keyed, first_token, learning_until)
                    });
                    let limiter =
                        MemoryLimiter::with_core(name.clone(), core, self.inner.clock.clone(), log);
                    limiter.set_keyed(layer);
                    timer::spawn(&limiter);
                    map.insert(name.clone(), limiter.clone());
                    None
                }
            }
        };
        if let Some(limiter) = &existing {
            limiter.with_state(|state, now, fx| {
                let out = state.reconfigure_any(now, spec.clone(), Some(keyed.clone()), fx);
                if out.is_ok() {
                    state.record(now, || Op::ReconfigureKeyed {
                        spec: SpecState::from(&spec),
                        keyed: KeyedSpecState::from(&keyed),
                    });
                }
                out
            })??;
        }
        let limiter = self.limiter_handle(name)?;
        limiter.durable().await?;
        limiter.status().await
    }

    /// The first fencing token of a limiter about to be created beside `existing` others
    /// (plain or keyed): above the store's token floor and its clock. Refused past the cap.
    pub(super) fn new_limiter_token(&self, existing: usize) -> Result<u64, StoreError> {
        use std::sync::atomic::Ordering;
        let max = self.inner.max_limiters.load(Ordering::Relaxed);
        if existing >= max {
            return Err(StoreError::TooManyLimiters(max));
        }
        Ok(token_seed()
            .max(self.inner.token_floor.load(Ordering::Relaxed))
            .max(self.inner.clock.now().0))
    }

    fn limiter_handle(&self, name: &LimiterName) -> Result<MemoryLimiter<C>, StoreError> {
        let map = self
            .inner
            .limiters
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(name)
            .cloned()
            .ok_or_else(|| StoreError::UnknownLimiter(name.clone()))
    }
}
