//! Keyed limiters: a limit per key (a tenant, an organization) under a total, shared fairly.
//!
//! A [`KeyLayer`] sits beside a limiter's [`LimiterCore`], which stays the **total**: it holds
//! every grant (leases, fencing tokens, extend, release, the total's rate, adaptive feedback,
//! learning, retry hints), exactly as for a plain limiter. Its own FIFO queue is never used:
//! waiters queue here, per key, and are handed to the total only when they can be granted at
//! once. Every method takes the total as a parameter, so a store keeps one core per limiter
//! and adds this layer for keyed ones; non-keyed limiters are untouched (strict FIFO).
//!
//! Rules, beyond the core's:
//! - A grant fits the total (concurrency and rate) and its key's own limits (per-key
//!   concurrency, per-key rate, or the key's override) in the same step.
//! - Waiters of one key are FIFO; capacity freed goes to the keys in deficit round robin by
//!   weight (see `sched.rs`), so a key's share of a contended total follows its weight,
//!   whatever its backlog. A key held back only by its own limit does not hold back others.
//! - Key state exists while the key has holders, waiters, per-key rate debt or a `schedule`
//!   reservation whose tokens have not all started, and is dropped when it has none; at most `max_keys` keys exist at once (one more is refused with
//!   [`Refusal::TooManyKeys`](crate::core::Refusal::TooManyKeys)).
//! - Every operation costs O(log keys) (hash maps, heaps and a ring), never O(keys); only a
//!   reconfiguration of the per-key defaults visits every key, and a grant pass in which every
//!   key in the ring is short of credit for its head visits the ring's keys once (`sched.rs`).
//!
//! A rate-only keyed limiter (no concurrency limit in total or per key; a total rate, a per-key
//! rate, or both) paces its grants like a plain rate-only limiter: nothing is held, the key's
//! state lasts only while it has waiters or rate debt, and overrides may set only a weight.
//! With per-key rates alone the total core runs with no limit at all (neither concurrency nor
//! rate: it bounds nothing, and status shows no total limit); it still counts the grants and
//! gives them their fencing tokens.
//!
//! During a learning window an extend of an unknown permit that carries its key and permits
//! re-adopts it under that key and the total (see `adopt.rs`).
//!
//! An idempotent wait whose caller went away is kept for a retry to join, as a plain one is
//! (see `orphan.rs`).
//!
//! Not built yet: per-key adaptive limits.

mod adopt;
mod oldest;
mod ops;
mod orphan;
mod pacing;
mod reserve;
mod sched;
mod snapshot;
mod spec;
#[cfg(test)]
mod tests;
mod view;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

pub use self::snapshot::{KeyLayerState, KeyReservationState, KeyState, KeyedSpecState};
pub use self::spec::{
    check_key, KeyOverride, KeyedSpec, DEFAULT_MAX_KEYS, MAX_KEYS, MAX_KEY_LEN, MAX_WEIGHT,
    PLAIN_STAYS_PLAIN,
};
pub use self::view::{KeyInfo, KeysView, MAX_KEYS_LISTED};
use super::{LimiterCore, U64Map, Waiter};
use crate::spec::{InvalidField, LimiterSpec, RateSpec, MAX_CONCURRENCY};
use crate::types::Timestamp;

/// One key's state, while it has any.
#[derive(Debug, Clone)]
pub(crate) struct Key {
    /// Distinguishes this incarnation of the key from an earlier one that was dropped, so
    /// lazily removed ring and heap entries of the old one are recognised as stale.
    gen: u64,
    /// Permits its holders hold, against its own concurrency limit.
    in_use: u32,
    /// Its grants out; the key is dropped when none remain (and nothing else does).
    holders: u32,
    /// Its waiters, FIFO by waiter id.
    queue: BTreeMap<u64, Waiter>,
    /// Sum of its waiters' permits, for the retry hint.
    queued_permits: u64,
    /// Its own GCRA theoretical arrival time, when it has a rate.
    tat: Timestamp,
    /// Deficit round robin's credit, in permits.
    deficit: u64,
    /// Whether its turn at the front of the ring has begun (the weight was credited).
    turn: bool,
    /// Whether an entry for it is in the ring (possibly stale: removal is lazy).
    in_ring: bool,
    /// The moment its rate lets its head run, while a wake-up for it is armed.
    sleeping: Option<Timestamp>,
    /// Whether a wake-up to drop it when its rate debt ends is armed.
    idle_armed: bool,
    /// Its concurrency limit in force (override, else the per-key default).
    limit: Option<u32>,
    /// Its rate in force.
    rate: Option<RateSpec>,
    /// Its weight in force.
    weight: u32,
    /// Holders plus waiters as last entered in the busiest-keys index.
    load: u64,
    /// Its latest `schedule` reservation, whose unstarted tokens may still be given back
    /// (see `reserve.rs`); it keeps the key from idling until its last token starts.
    reservation: Option<reserve::KeyReservation>,
}

/// A grant of a keyed limiter, as this layer tracks it.
#[derive(Debug, Clone)]
pub(crate) struct KeyedHolder {
    /// Whose grant it is.
    key: Arc<str>,
    /// Permits it holds against its key's limit.
    permits: u32,
    /// Its lease deadline, as the total has it (kept in step by extend).
    deadline: Timestamp,
}

/// Counters of what only the keyed layer sees; the total's counters hold the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyCounters {
    /// Acquires refused because `max_keys` keys were already tracked.
    pub too_many_keys: u64,
    /// Keys created (first use after being idle).
    pub keys_created: u64,
}

/// The keyed part of a limiter's state. See the module documentation.
#[derive(Debug, Clone)]
pub struct KeyLayer {
    /// Per-key limits and the key cap.
    spec: KeyedSpec,
    /// The total concurrency as configured: `None` when only keys are limited (the total core
    /// then runs with [`MAX_CONCURRENCY`] so its grants still hold leases).
    user_concurrency: Option<u32>,
    /// Every key with state.
    keys: HashMap<Arc<str>, Key>,
    /// Per-key overrides, kept whether or not the key is active.
    overrides: HashMap<Arc<str>, KeyOverride>,
    /// Generation of the next key created.
    next_gen: u64,
    /// Keys whose head could run but for the total, in round-robin order (lazy removal).
    ring: VecDeque<(Arc<str>, u64)>,
    /// Keys held back by their own rate, by the moment it lets their head run.
    sleepers: BinaryHeap<Reverse<(Timestamp, u64, Arc<str>)>>,
    /// Keys whose only state is rate debt, by when it ends.
    idle: BinaryHeap<Reverse<(Timestamp, u64, Arc<str>)>>,
    /// Which key each queued waiter belongs to.
    waiter_key: U64Map<Arc<str>>,
    /// Waiter deadlines (lazily pruned: live while the waiter has that deadline).
    waits: BinaryHeap<Reverse<(Timestamp, u64)>>,
    /// Grants out, by token: whose they are.
    holders: U64Map<KeyedHolder>,
    /// Lease deadlines of `holders` (lazily pruned), to learn which key a lapse frees.
    leases: BinaryHeap<Reverse<(Timestamp, u64)>>,
    /// Idempotency keys of queued acquires (held ones are the total's).
    requests: HashMap<Arc<str>, u64>,
    /// Id of the next waiter.
    next_waiter: u64,
    /// Waiters queued, all keys together (the spec's `max_queue` bounds it).
    waiting: usize,
    /// Their permits.
    waiting_permits: u64,
    /// When the total's rate lets the key whose turn it is run, while only that holds it.
    held_until: Option<Timestamp>,
    /// Keys by holders plus waiters, for the status's busiest keys.
    busy: BTreeSet<(u64, Arc<str>)>,
    /// What only this layer counts.
    counters: KeyCounters,
    /// Which key holds each remembered reservation, so an unschedule needs only the id (at
    /// most one per key: bounded like the keys).
    reservations: U64Map<Arc<str>>,
    /// Each waiting key's head, `(arrival, waiter id)`, oldest first: the oldest wait of the
    /// whole limiter in O(log keys) (see `oldest.rs`). Rebuilt on restore, not persisted.
    heads: BTreeSet<(Timestamp, u64)>,
    /// The round robin as the tests see it (`sched.rs`).
    #[cfg(test)]
    drr: sched::DrrProbe,
}

/// The spec the total core runs with: without a configured total concurrency, the largest one,
/// so grants still hold leases (the per-key limits bound them).
pub fn total_spec(spec: &LimiterSpec) -> LimiterSpec {
    let mut total = spec.clone();
    if total.concurrency.is_none() {
        total.concurrency = Some(MAX_CONCURRENCY);
    }
    total
}

/// Whether a keyed limiter is rate-only: no concurrency limit in total or per key, only rates
/// (the total's and/or each key's; [`KeyedSpec::validate`] refuses a limiter with none). Its
/// grants are paced, like a plain rate-only limiter's: nothing is held, so there is no lease
/// and nothing to release.
pub fn rate_only(spec: &LimiterSpec, keyed: &KeyedSpec) -> bool {
    spec.concurrency.is_none() && keyed.concurrency.is_none()
}

/// The total core's spec for a keyed limiter: the spec itself when it is rate-only (paced
/// grants; with per-key rates alone it has neither concurrency nor rate, so the total bounds
/// nothing and only counts), else [`total_spec`].
pub fn total_spec_for(spec: &LimiterSpec, keyed: &KeyedSpec) -> LimiterSpec {
    if rate_only(spec, keyed) {
        spec.clone()
    } else {
        total_spec(spec)
    }
}

impl KeyLayer {
    /// A keyed limiter: the total core to run beside this layer, and the layer. `first_token`
    /// as for [`LimiterCore::new`].
    pub fn new(
        spec: LimiterSpec,
        keyed: KeyedSpec,
        first_token: u64,
    ) -> Result<(LimiterCore, KeyLayer), InvalidField> {
        keyed.validate(&spec)?;
        let derived = total_spec_for(&spec, &keyed);
        derived.validate_unbounded()?;
        let total = LimiterCore::new_total(derived, first_token);
        Ok((
            total,
            KeyLayer {
                user_concurrency: spec.concurrency,
                spec: keyed,
                keys: HashMap::new(),
                overrides: HashMap::new(),
                next_gen: 0,
                ring: VecDeque::new(),
                sleepers: BinaryHeap::new(),
                idle: BinaryHeap::new(),
                waiter_key: U64Map::default(),
                waits: BinaryHeap::new(),
                holders: U64Map::default(),
                leases: BinaryHeap::new(),
                requests: HashMap::new(),
                next_waiter: 0,
                waiting: 0,
                waiting_permits: 0,
                held_until: None,
                busy: BTreeSet::new(),
                counters: KeyCounters::default(),
                reservations: U64Map::default(),
                heads: BTreeSet::new(),
                #[cfg(test)]
                drr: sched::DrrProbe::default(),
            },
        ))
    }

    /// The per-key configuration.
    pub fn keyed_spec(&self) -> &KeyedSpec {
        &self.spec
    }

    /// Keys with state now.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Waiters queued now, all keys together.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Whether the waiter is still queued.
    pub fn is_queued(&self, waiter: super::WaiterId) -> bool {
        self.waiter_key.contains_key(&waiter.0)
    }

    /// The limits in force for `key`: concurrency, rate, weight.
    fn limits_for(&self, key: &str) -> (Option<u32>, Option<RateSpec>, u32) {
        let ov = self.overrides.get(key);
        (
            ov.and_then(|o| o.concurrency).or(self.spec.concurrency),
            self.spec.rate,
            ov.map_or(1, |o| o.weight),
        )
    }

    /// A fresh key's state.
    fn new_key(&mut self, key: &str) -> Key {
        let (limit, rate, weight) = self.limits_for(key);
        let gen = self.next_gen;
        self.next_gen += 1;
        self.counters.keys_created += 1;
        Key {
            gen,
            in_use: 0,
            holders: 0,
            queue: BTreeMap::new(),
            queued_permits: 0,
            tat: Timestamp(0),
            deficit: 0,
            turn: false,
            in_ring: false,
            sleeping: None,
            idle_armed: false,
            limit,
            rate,
            weight,
            load: 0,
            reservation: None,
        }
    }
}
