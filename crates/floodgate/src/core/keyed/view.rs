//! What a keyed limiter shows: its status as a limiter, and its keys.

use std::sync::Arc;

use super::{KeyCounters, KeyLayer, KeyOverride, KeyedSpec};
use crate::core::{HoldersView, LimiterCore, LimiterStatus};
use crate::types::{LimiterName, Timestamp};

/// Most keys one status lists.
pub const MAX_KEYS_LISTED: usize = 100;

/// One key as a status shows it.
///
/// `#[non_exhaustive]`: built by the library (read its fields), so one can be added without
/// breaking callers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyInfo {
    /// The key.
    pub key: Arc<str>,
    /// Permits its holders hold.
    pub in_use: u32,
    /// Its grants out.
    pub holders: u32,
    /// Its waiters.
    pub waiting: u32,
    /// Its concurrency limit in force; `None`: only the total bounds it.
    pub limit: Option<u32>,
    /// Its weight in force.
    pub weight: u32,
}

/// A keyed limiter's keys: how many, and the busiest.
///
/// `#[non_exhaustive]`: built by the library (read its fields), so one can be added without
/// breaking callers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeysView {
    /// The per-key configuration.
    pub spec: KeyedSpec,
    /// Keys with state now.
    pub count: u64,
    /// Overrides set.
    pub overrides: u64,
    /// The keys with the most holders plus waiters, busiest first (ties by key).
    pub busiest: Vec<KeyInfo>,
    /// What only the keyed layer counts.
    pub counters: KeyCounters,
}

impl KeyLayer {
    /// The limiter's status, as for a plain limiter: the total's holders and counters, the
    /// waiters of every key, the spec as configured.
    pub fn status(&self, total: &LimiterCore, name: &LimiterName) -> LimiterStatus {
        let mut s = total.status(name);
        s.waiting = u32::try_from(self.waiting).unwrap_or(u32::MAX);
        s.waiting_permits = self.waiting_permits;
        if self.user_concurrency.is_none() {
            s.spec.concurrency = None;
            s.limit = None;
        }
        s
    }

    /// Who holds and who waits (the holders listing), as for a plain limiter: the total's
    /// holders, the waiters of every key, and the oldest wait across keys (the oldest of the
    /// keys' heads, kept in O(log keys): see `oldest.rs`).
    pub fn holders_view(&self, total: &LimiterCore, now: Timestamp, limit: usize) -> HoldersView {
        let mut v = total.holders_view(now, limit);
        v.waiting = u32::try_from(self.waiting).unwrap_or(u32::MAX);
        v.waiting_permits = self.waiting_permits;
        v.oldest_wait = self.oldest_wait(now);
        v
    }

    /// The configured spec of the whole limiter (the total core runs a derived one).
    pub fn limiter_spec(&self, total: &LimiterCore) -> crate::spec::LimiterSpec {
        let mut spec = total.spec.clone();
        spec.concurrency = self.user_concurrency;
        spec
    }

    /// The key count and up to `limit` (at most [`MAX_KEYS_LISTED`]) busiest keys: O(limit
    /// log keys), whatever the number of keys.
    pub fn keys_view(&self, limit: usize) -> KeysView {
        let busiest = self
            .busy
            .iter()
            .rev()
            .take(limit.min(MAX_KEYS_LISTED))
            .filter_map(|(_, name)| {
                let k = self.keys.get(name)?;
                Some(KeyInfo {
                    key: Arc::clone(name),
                    in_use: k.in_use,
                    holders: k.holders,
                    waiting: u32::try_from(k.queue.len()).unwrap_or(u32::MAX),
                    limit: k.limit,
                    weight: k.weight,
                })
            })
            .collect();
        KeysView {
            spec: self.spec.clone(),
            count: self.keys.len() as u64,
            overrides: self.overrides.len() as u64,
            busiest,
            counters: self.counters,
        }
    }

    /// One key's override, if set.
    pub fn override_of(&self, key: &str) -> Option<KeyOverride> {
        self.overrides.get(key).copied()
    }

    /// One key's state, if it has any (a test and introspection aid).
    pub fn key_info(&self, key: &str) -> Option<KeyInfo> {
        let (name, k) = self.keys.get_key_value(key)?;
        Some(KeyInfo {
            key: Arc::clone(name),
            in_use: k.in_use,
            holders: k.holders,
            waiting: u32::try_from(k.queue.len()).unwrap_or(u32::MAX),
            limit: k.limit,
            weight: k.weight,
        })
    }

    /// Memory held by the bookkeeping that grows with keys, in entries: keys, ring, heaps,
    /// indexes. Zero when idle once [`next_deadline`](Self::next_deadline) has pruned the heaps
    /// (the bounded-state test checks it).
    pub fn footprint(&self) -> usize {
        self.keys.len()
            + self.leases.len()
            + self.waits.len()
            + self.ring.len()
            + self.sleepers.len()
            + self.idle.len()
            + self.waiter_key.len()
            + self.holders.len()
            + self.busy.len()
            + self.requests.len()
            + self.heads.len()
    }
}
