//! A keyed `schedule`: a producer's fan-out paced by the total's rate and its key's.

use std::sync::Arc;
use std::time::Duration;

use super::sched::{gcra_at, gcra_take};
use super::{check_key, KeyLayer};
use crate::core::{Effects, LimiterCore, Refusal, MAX_SCHEDULE, MAX_SCHEDULE_AHEAD};
use crate::spec::InvalidField;
use crate::types::Timestamp;

impl KeyLayer {
    /// Reserves `count` tokens of the total's rate and `key`'s rate for a fan-out; each start
    /// offset satisfies both. All or nothing, bounded by `max_wait` like the core's.
    /// `reservation` is the id the store drew, with which the producer may give back what it
    /// does not use ([`unschedule`](Self::unschedule)); 0 (logs from before keyed reservations)
    /// remembers none.
    ///
    /// Refused with [`Refusal::Invalid`] (naming the field) or, for a new key beyond
    /// `max_keys`, [`Refusal::TooManyKeys`] with the hint an acquire would get: the cap frees
    /// itself as idle keys drop out.
    pub fn schedule(
        &mut self,
        total: &mut LimiterCore,
        now: Timestamp,
        key: &str,
        count: u32,
        reservation: u64,
        fx: &mut Effects,
    ) -> Result<Vec<Duration>, Refusal> {
        check_key(key).map_err(Refusal::Invalid)?;
        if total.spec.rate.is_none() && self.spec.rate.is_none() {
            return Err(Refusal::Invalid(InvalidField::new(
                "count",
                "this limiter has no rate limit (total or per key) to schedule against",
            )));
        }
        if count == 0 || count > MAX_SCHEDULE {
            return Err(Refusal::Invalid(InvalidField::new(
                "count",
                format!("must be from 1 to {MAX_SCHEDULE}"),
            )));
        }
        self.advance(total, now, fx);
        if !self.keys.contains_key(key) {
            if self.keys.len() >= self.spec.max_keys as usize {
                self.counters.too_many_keys += 1;
                return Err(Refusal::TooManyKeys {
                    max_keys: self.spec.max_keys,
                    retry_after: total.retry_hint(now, 1),
                });
            }
            let k = self.new_key(key);
            self.keys.insert(Arc::from(key), k);
        }
        let Some((name, k)) = self.keys.get_key_value(key) else {
            return Err(Refusal::Invalid(InvalidField::new("key", "vanished")));
        };
        let name = Arc::clone(name);
        let (key_rate, key_before) = (k.rate, k.tat);
        let (mut key_tat, total_before) = (key_before, total.tat);
        let mut offsets = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let at = [total.rate_at(1), gcra_at(key_rate, key_tat, 1), Some(now)]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(now);
            offsets.push(at.since(now));
            total.take_rate(at, 1);
            key_tat = gcra_take(key_rate, key_tat, at, 1);
        }
        let horizon = total.spec.max_wait.min(MAX_SCHEDULE_AHEAD);
        if offsets.last().is_some_and(|d| *d > horizon) {
            total.tat = total_before;
            let fit = offsets.partition_point(|d| *d <= horizon);
            self.maybe_drop(&name, now);
            return Err(Refusal::Invalid(InvalidField::new(
                "count",
                format!(
                    "would reserve tokens further ahead than this limiter's max_wait_ms ({} ms), \
                     which bounds a schedule; {fit} fit now",
                    horizon.as_millis()
                ),
            )));
        }
        if let Some(k) = self.keys.get_mut(&name) {
            k.tat = key_tat;
        }
        total.counters.scheduled += u64::from(count);
        if reservation != 0 {
            let last = now.after(offsets.last().copied().unwrap_or_default());
            let before = (total_before, key_before);
            self.remember_reservation(total, &name, reservation, now, before, count, last);
        }
        self.maybe_drop(&name, now);
        Ok(offsets)
    }
}
