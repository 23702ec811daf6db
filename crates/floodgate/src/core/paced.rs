//! Idempotency keys of rate-only (paced) grants, remembered for a retention period.
//!
//! A paced grant holds nothing, so nothing else would keep its `request_id`: without this a
//! retry after a lost answer took new tokens (a second grant, another fencing token). Each
//! grant's key is kept for the limiter's `default_lease` (the time a permit would have been
//! held) from its grant; a repeat within it gets the same grant and is not counted again.
//!
//! Bounded: every insert is preceded by a sweep of the expired entries, so at most the grants
//! of one retention window are kept, and the rate bounds those (burst + window × rate).
//! O(log n): a map by key plus an expiry index ordered by (deadline, token).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::types::Timestamp;

/// One remembered paced grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PacedGrant {
    /// Its fencing token, given again to a repeat.
    pub(crate) token: u64,
    /// Its permits, which a repeat must ask for again.
    pub(crate) permits: u32,
    /// When it was granted, reported again to a repeat.
    pub(crate) granted_at: Timestamp,
    /// When its key is forgotten (a later acquire with it is a new one).
    pub(crate) until: Timestamp,
    /// A keyed limiter's key it was granted to: a retry naming another key is refused.
    pub(crate) key: Option<Arc<str>>,
}

/// The remembered paced grants.
#[derive(Debug, Clone, Default)]
pub(crate) struct PacedRequests {
    /// By idempotency key, for a repeat.
    by_key: HashMap<Arc<str>, PacedGrant>,
    /// Keys by (end of retention, token), earliest first, for the sweep.
    expiry: BTreeMap<(Timestamp, u64), Arc<str>>,
}

/// One remembered paced grant as plain data, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacedState {
    /// Its idempotency key.
    pub request: String,
    /// Its fencing token.
    pub token: u64,
    /// Its permits.
    pub permits: u32,
    /// When it was granted, µs.
    pub granted_at: u64,
    /// When its key is forgotten, µs.
    pub until: u64,
    /// A keyed limiter's key it was granted to.
    #[serde(default)]
    pub key: Option<String>,
}

impl PacedRequests {
    /// Forgets the keys whose retention ended at or before `now`.
    #[inline]
    pub(crate) fn sweep(&mut self, now: Timestamp) {
        while let Some(entry) = self.expiry.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, token), key) = entry.remove_entry();
            if self.by_key.get(&key).is_some_and(|g| g.token == token) {
                self.by_key.remove(&key);
            }
        }
    }

    /// The grant `key` names, if still remembered at `now`.
    pub(crate) fn get(&self, now: Timestamp, key: &str) -> Option<PacedGrant> {
        self.by_key.get(key).filter(|g| g.until > now).cloned()
    }

    /// Records which key of a keyed limiter the grant remembered under `request` went to.
    pub(crate) fn set_key(&mut self, request: &str, key: &Arc<str>) {
        if let Some(g) = self.by_key.get_mut(request) {
            g.key = Some(Arc::clone(key));
        }
    }

    /// Remembers a paced grant's key for `retention` from `now`.
    pub(crate) fn remember(
        &mut self,
        now: Timestamp,
        key: Arc<str>,
        token: u64,
        permits: u32,
        retention: Duration,
    ) {
        self.sweep(now);
        let until = now.after(retention);
        if until <= now {
            return;
        }
        self.insert(
            key,
            PacedGrant {
                token,
                permits,
                granted_at: now,
                until,
                key: None,
            },
        );
    }

    fn insert(&mut self, key: Arc<str>, grant: PacedGrant) {
        let index = (grant.until, grant.token);
        if let Some(old) = self.by_key.insert(Arc::clone(&key), grant) {
            self.expiry.remove(&(old.until, old.token));
        }
        self.expiry.insert(index, key);
    }

    /// Keys remembered now (some may be past retention until the next sweep).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// As plain data, ordered by token.
    pub(crate) fn to_state(&self) -> Vec<PacedState> {
        let mut out: Vec<PacedState> = self
            .by_key
            .iter()
            .map(|(k, g)| PacedState {
                request: k.to_string(),
                token: g.token,
                permits: g.permits,
                granted_at: g.granted_at.0,
                until: g.until.0,
                key: g.key.as_deref().map(str::to_owned),
            })
            .collect();
        out.sort_by_key(|p| p.token);
        out
    }

    /// Rebuilt from [`to_state`](Self::to_state)'s output.
    pub(crate) fn from_state(state: &[PacedState]) -> Self {
        let mut out = PacedRequests::default();
        for p in state {
            out.insert(
                Arc::from(p.request.as_str()),
                PacedGrant {
                    token: p.token,
                    permits: p.permits,
                    granted_at: Timestamp(p.granted_at),
                    until: Timestamp(p.until),
                    key: p.key.as_deref().map(Arc::from),
                },
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_kept_for_its_retention_then_swept() {
        let mut p = PacedRequests::default();
        let ret = Duration::from_secs(10);
        p.remember(Timestamp(0), Arc::from("a"), 1, 1, ret);
        p.remember(Timestamp(5_000_000), Arc::from("b"), 2, 1, ret);
        assert_eq!(p.get(Timestamp(9_999_999), "a").map(|g| g.token), Some(1));
        assert_eq!(p.get(Timestamp(10_000_000), "a"), None);
        p.sweep(Timestamp(10_000_000));
        assert_eq!(p.len(), 1);
        assert_eq!(p.expiry.len(), 1);
        // A new grant under a forgotten key replaces the stale entry, index included.
        p.remember(Timestamp(11_000_000), Arc::from("b"), 3, 1, ret);
        assert_eq!(p.len(), 1);
        assert_eq!(p.expiry.len(), 1);
        let back = PacedRequests::from_state(&p.to_state());
        assert_eq!(back.to_state(), p.to_state());
    }
}
