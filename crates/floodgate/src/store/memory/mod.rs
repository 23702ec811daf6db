//! The embedded store: every limiter in this process's memory.
//!
//! The default, so one command runs Floodgate on a laptop. Each limiter is a
//! state machine (`core::LimiterCore`) behind a mutex, with one timer task that wakes at
//! the nearest lease or wait deadline, so expired leases are reclaimed and timed-out waiters
//! answered even when no other traffic arrives.

pub(crate) mod durable;
mod keyed;
mod limiter;
mod listeners;
mod persist;
mod timer;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

pub use self::durable::{
    Durability, FsyncPolicy, RecoveryError, RecoveryReport, DEFAULT_SNAPSHOT_AFTER_BYTES,
};
pub use self::limiter::MemoryLimiter;
use crate::clock::{Clock, TokioClock};
use crate::core::LimiterStatus;
use crate::error::StoreError;
use crate::spec::LimiterSpec;
use crate::store::{LimiterBackend, Store};
use crate::types::LimiterName;

/// Default cap on the number of limiters one store holds.
pub const DEFAULT_MAX_LIMITERS: usize = 10_000;

/// The embedded, in-memory store. Cheap to clone; clones share the limiters.
///
/// Must be used inside a tokio runtime (each limiter has a timer task).
pub struct MemoryStore<C: Clock = TokioClock> {
    inner: Arc<Inner<C>>,
    /// Shared by the user's handles only (the store's own tasks never hold it): when the last
    /// one is dropped the store is closed and its data directory unlocked at once, whatever
    /// task still holds `inner` for a moment.
    handles: Arc<persist::Handles>,
}

struct Inner<C: Clock> {
    /// Source of `now` for every limiter of this store.
    clock: C,
    /// The limiters, by name. A `BTreeMap` so listings come out ordered by name.
    limiters: RwLock<BTreeMap<LimiterName, MemoryLimiter<C>>>,
    /// Bound against abuse: creating one more is refused.
    max_limiters: AtomicUsize,
    /// The highest next fencing token of any deleted limiter: a re-created one starts above
    /// it even if it granted faster than one token per microsecond of the clock seed.
    token_floor: std::sync::atomic::AtomicU64,
    /// The write-ahead log and snapshots, when the store is durable (`MemoryStore::open`).
    /// Shared with `MemoryStore::handles` (closed by the last user handle) and the clock-mark
    /// task.
    persist: Option<Arc<persist::Persist>>,
}

impl<C: Clock> Inner<C> {
    /// Every limiter now (handles: the map's lock is not held while they are used).
    fn all(&self) -> Vec<MemoryLimiter<C>> {
        let map = self.limiters.read().unwrap_or_else(PoisonError::into_inner);
        map.values().cloned().collect()
    }
}

impl<C: Clock> Clone for MemoryStore<C> {
    fn clone(&self) -> Self {
        MemoryStore {
            inner: Arc::clone(&self.inner),
            handles: Arc::clone(&self.handles),
        }
    }
}

impl<C: Clock> std::fmt::Debug for MemoryStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore<TokioClock> {
    /// A store on tokio's clock. Create it inside the runtime when time is paused.
    pub fn new() -> Self {
        MemoryStore::with_clock(TokioClock::new())
    }
}

impl Default for MemoryStore<TokioClock> {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl<C: Clock> MemoryStore<C> {
    /// A store on the given clock.
    pub fn with_clock(clock: C) -> Self {
        MemoryStore {
            inner: Arc::new(Inner {
                clock,
                limiters: RwLock::new(BTreeMap::new()),
                max_limiters: AtomicUsize::new(DEFAULT_MAX_LIMITERS),
                token_floor: std::sync::atomic::AtomicU64::new(0),
                persist: None,
            }),
            handles: Arc::new(persist::Handles::default()),
        }
    }

    /// Caps the number of limiters (default [`DEFAULT_MAX_LIMITERS`]). Limiters already held
    /// (restored from disk, say) are kept even above the cap; only new ones are refused.
    pub fn with_max_limiters(self, max: usize) -> Self {
        self.inner.max_limiters.store(max, Ordering::Relaxed);
        self
    }

    /// Whether this store keeps its state on disk.
    pub fn is_durable(&self) -> bool {
        self.inner.persist.is_some()
    }

    /// [`Store::put_limiter`]; a limiter it creates starts learning for `learning` when given
    /// (`restore_limiter`), in the same step and the same log record.
    async fn put_plain(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
        learning: Option<std::time::Duration>,
    ) -> Result<LimiterStatus, StoreError> {
        spec.validate()?;
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
                    let mut core = crate::core::LimiterCore::new(spec.clone(), first_token)?;
                    let now = self.inner.clock.now();
                    let learning_until = learning.map(|window| now.after(window));
                    if let Some(until) = learning_until {
                        core.enter_learning(now, until);
                    }
                    let log = self
                        .inner
                        .persist
                        .as_ref()
                        .map(|p| p.create(now, name, &spec, first_token, learning_until));
                    let limiter =
                        MemoryLimiter::with_core(name.clone(), core, self.inner.clock.clone(), log);
                    timer::spawn(&limiter);
                    map.insert(name.clone(), limiter.clone());
                    None
                }
            }
        };
        let Some(limiter) = existing else {
            let limiter = self.limiter(name).await?;
            limiter.durable().await?;
            return limiter.status().await;
        };
        limiter.with_state(|state, now, fx| {
            let out = state.reconfigure_any(now, spec.clone(), None, fx);
            if out.is_ok() {
                state.record(now, || durable::record::Op::reconfigure(&spec));
            }
            out
        })??;
        limiter.durable().await?;
        limiter.status().await
    }

    fn get(&self, name: &LimiterName) -> Option<MemoryLimiter<C>> {
        let map = self
            .inner
            .limiters
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(name).cloned()
    }
}

impl<C: Clock> Store for MemoryStore<C> {
    type Limiter = MemoryLimiter<C>;

    fn max_limiters(&self) -> Option<usize> {
        Some(self.inner.max_limiters.load(Ordering::Relaxed))
    }

    async fn put_limiter(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
    ) -> Result<LimiterStatus, StoreError> {
        self.put_plain(name, spec, None).await
    }

    /// A limiter this store has no state for starts in a learning window: the server was
    /// restarted without its data while holders may still work.
    async fn restore_limiter(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
        window: std::time::Duration,
    ) -> Result<LimiterStatus, StoreError> {
        // Created learning, in one log record: no crash can leave it created but not
        // learning (a later restore finds it and leaves it as it is). An existing limiter is
        // only reconfigured.
        self.put_plain(name, spec, (!window.is_zero()).then_some(window))
            .await
    }

    async fn delete_limiter(&self, name: &LimiterName) -> Result<bool, StoreError> {
        {
            // Closed and the token floor raised before the map's lock is released: a
            // re-create of the name takes its first token under that lock
            // (`new_limiter_token`), so it must find the floor above every token this
            // incarnation handed out, including through handles still held (closed, they
            // hand out no more). Lock order as everywhere: the map, then the limiter.
            let mut map = self
                .inner
                .limiters
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let Some(limiter) = map.remove(name) else {
                return Ok(false);
            };
            let shared = limiter.shared();
            let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            let mut fx = crate::core::Effects::default();
            let next_token = state.core.next_token();
            self.inner
                .token_floor
                .fetch_max(next_token, std::sync::atomic::Ordering::Relaxed);
            state.close_any(&mut fx);
            let now = shared.clock.now();
            state.settle(now, fx);
            // The record carries the floor as well: recovery never depends on a snapshot
            // having taken it (nor does a log written before it was raised under the map's
            // lock, when a snapshot could miss both the limiter and its floor).
            state.record(now, || durable::record::Op::Delete { next_token });
            state.closed = true;
            drop(state);
            drop(map);
            shared.timer.notify_one();
        }
        if let Some(p) = &self.inner.persist {
            p.commit().await?;
        }
        Ok(true)
    }

    async fn list_limiters(&self) -> Result<Vec<LimiterStatus>, StoreError> {
        let limiters = self.inner.all();
        let mut out = Vec::with_capacity(limiters.len());
        for limiter in limiters {
            // A limiter deleted since the snapshot is simply left out.
            if let Ok(status) = limiter.status().await {
                out.push(status);
            }
        }
        Ok(out)
    }

    async fn put_keyed_limiter(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
        keyed: crate::core::keyed::KeyedSpec,
    ) -> Result<LimiterStatus, StoreError> {
        self.put_keyed(name, spec, keyed, None).await
    }

    /// A keyed limiter this store has no state for starts in a learning window, as a plain
    /// one (the keyed layer grants nothing while its total learns).
    async fn restore_keyed_limiter(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
        keyed: crate::core::keyed::KeyedSpec,
        window: std::time::Duration,
    ) -> Result<LimiterStatus, StoreError> {
        // Created learning, in one log record, as `restore_limiter`'s.
        self.put_keyed(name, spec, keyed, (!window.is_zero()).then_some(window))
            .await
    }

    async fn limiter(&self, name: &LimiterName) -> Result<MemoryLimiter<C>, StoreError> {
        self.get(name)
            .ok_or_else(|| StoreError::UnknownLimiter(name.clone()))
    }
}
