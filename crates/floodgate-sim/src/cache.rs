//! Django's cache API, as the seed's Option 1 uses it, for one key.
//!
//! Each call is atomic on the cache server; what is not atomic is a sequence of them, which is
//! the point. Semantics (django-redis and memcached alike): `get` of a missing key is `None`;
//! `add` stores only when the key is missing and sets the TTL then; `incr`/`decr` keep the TTL
//! and fail (Python raises `ValueError`) when the key is missing. An expired key is missing.

use super::engine::Micros;

/// The one key `spike_projection_concurrent_queries`.
#[derive(Debug, Clone)]
pub(crate) struct DjangoCache {
    /// Value and the moment it expires.
    entry: Option<(i64, Micros)>,
    ttl: Micros,
    /// Times `add` created the key.
    pub(crate) created: u64,
    /// Times the key expired (each one resets the count while holders may still run).
    pub(crate) expired: u64,
    /// Lowest and highest value ever stored.
    pub(crate) min: i64,
    pub(crate) max: i64,
}

impl DjangoCache {
    pub(crate) fn new(ttl: Micros) -> Self {
        DjangoCache {
            entry: None,
            ttl,
            created: 0,
            expired: 0,
            min: 0,
            max: 0,
        }
    }

    fn live(&mut self, now: Micros) -> Option<i64> {
        match self.entry {
            Some((_, expires)) if now >= expires => {
                self.entry = None;
                self.expired += 1;
                None
            }
            Some((v, _)) => Some(v),
            None => None,
        }
    }

    fn store(&mut self, value: i64, expires: Micros) {
        self.entry = Some((value, expires));
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// `cache.get(key)`.
    pub(crate) fn get(&mut self, now: Micros) -> Option<i64> {
        self.live(now)
    }

    /// `cache.add(key, value, timeout=ttl)`: true if it stored.
    pub(crate) fn add(&mut self, now: Micros, value: i64) -> bool {
        if self.live(now).is_some() {
            return false;
        }
        self.created += 1;
        self.store(value, now.saturating_add(self.ttl));
        true
    }

    /// `cache.incr(key, delta)`: the new value, or `None` where Python raises.
    pub(crate) fn incr(&mut self, now: Micros, delta: i64) -> Option<i64> {
        let v = self.live(now)? + delta;
        let expires = self.entry.map_or(now, |(_, e)| e);
        self.store(v, expires);
        Some(v)
    }

    /// The value now, if the key exists (for the report).
    pub(crate) fn peek(&self, now: Micros) -> Option<i64> {
        self.entry.filter(|(_, e)| now < *e).map(|(v, _)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_set_on_creation_only_and_incr_of_a_missing_key_fails() {
        let mut c = DjangoCache::new(300);
        assert_eq!(c.get(0), None);
        assert_eq!(c.incr(0, 1), None);
        assert!(c.add(10, 1));
        assert!(!c.add(11, 1));
        assert_eq!(c.incr(200, 1), Some(2));
        assert_eq!(c.incr(250, -3), Some(-1));
        // Expires 300 after creation, however often it was incremented.
        assert_eq!(c.get(309), Some(-1));
        assert_eq!(c.get(310), None);
        assert_eq!(c.expired, 1);
        assert_eq!((c.min, c.max), (-1, 2));
        assert!(c.add(311, 1));
        assert_eq!(c.created, 2);
    }
}
