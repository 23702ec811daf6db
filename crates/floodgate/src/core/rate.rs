//! GCRA: when the rate allows tokens, and reservations for producers.

use super::*;

impl LimiterCore {
    /// Reserves `count` rate tokens for a producer's fan-out and returns, for each, how long
    /// from `now` until it may start. Reservations take the next token times after those
    /// already promised, exactly as `count` acquires of one permit would; waiters queued at
    /// this moment are served after them for the rate. Refused (nothing reserved) if the last
    /// would start more than the spec's `max_wait` from now. `reservation` is the id the store
    /// drew for it, with which the producer may give back what it does not use
    /// ([`unschedule`](Self::unschedule)).
    pub fn schedule(
        &mut self,
        now: Timestamp,
        count: u32,
        reservation: u64,
        fx: &mut Effects,
    ) -> Result<Vec<Duration>, InvalidField> {
        if self.spec.rate.is_none() {
            return Err(InvalidField::new(
                "count",
                "this limiter has no rate limit to schedule against",
            ));
        }
        if count == 0 || count > MAX_SCHEDULE {
            return Err(InvalidField::new(
                "count",
                format!("must be from 1 to {MAX_SCHEDULE}"),
            ));
        }
        self.advance(now, fx);
        let before = self.tat;
        let mut offsets = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let at = self.rate_at(1).map_or(now, |at| at.max(now));
            offsets.push(at.since(now));
            self.take_rate(at, 1);
        }
        // A reservation is a wait announced in advance, so the limiter's cap on waits bounds
        // it too: one call cannot push the rate's debt hours ahead (which would hold up every
        // acquire, and outlive a producer that crashed). All or nothing, with how many fit.
        let horizon = self.spec.max_wait.min(MAX_SCHEDULE_AHEAD);
        if offsets.last().is_some_and(|d| *d > horizon) {
            self.tat = before;
            let fit = offsets.partition_point(|d| *d <= horizon);
            return Err(InvalidField::new(
                "count",
                format!(
                    "would reserve tokens further ahead than this limiter's max_wait_ms ({} ms), \
                     which bounds a schedule; {fit} fit now",
                    horizon.as_millis()
                ),
            ));
        }
        self.counters.scheduled += u64::from(count);
        self.remember_reservation(reservation, count);
        Ok(offsets)
    }

    /// When the rate allows `permits` tokens (GCRA: the theoretical arrival time, plus the
    /// tokens asked, less the burst allowance). `None` without a rate limit.
    pub(super) fn rate_at(&self, permits: u32) -> Option<Timestamp> {
        let rate = self.spec.rate?;
        let t = rate.interval_us();
        let need = t.saturating_mul(u64::from(permits));
        let allowance = t.saturating_mul(u64::from(rate.burst));
        Some(Timestamp(
            self.tat.0.saturating_add(need).saturating_sub(allowance),
        ))
    }

    /// Takes `permits` tokens at `at`.
    pub(super) fn take_rate(&mut self, at: Timestamp, permits: u32) {
        if let Some(rate) = self.spec.rate {
            let t = rate.interval_us().saturating_mul(u64::from(permits));
            self.tat = Timestamp(self.tat.0.max(at.0).saturating_add(t));
        }
    }

    /// The head waiter's token time, if it fits the concurrency and only the rate holds it.
    pub(super) fn head_rate_at(&self) -> Option<Timestamp> {
        if self.learning_until.is_some() {
            return None; // Nothing is granted while learning, so no token time is due.
        }
        let (_, head) = self.queue.first_key_value()?;
        if !self.fits(head.permits) {
            return None;
        }
        self.rate_at(head.permits)
    }
}
