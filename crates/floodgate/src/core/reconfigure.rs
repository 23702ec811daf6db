//! Changing a limiter's spec while it runs (resize, new rate, new adaptive range), and closing
//! it.

use super::*;

impl LimiterCore {
    /// Changes the configuration. A raised limit grants waiters at once; a lowered one grants
    /// nothing until in-use is below it. Waiters asking for more than the new limit are refused.
    pub fn reconfigure(
        &mut self,
        now: Timestamp,
        spec: LimiterSpec,
        fx: &mut Effects,
    ) -> Result<(), InvalidField> {
        spec.validate()?;
        self.apply_spec(now, spec, fx);
        Ok(())
    }

    /// As [`reconfigure`](Self::reconfigure) for a keyed limiter's total, which may have no
    /// limit of its own (per-key rates only: see `keyed::total_spec_for`).
    pub(crate) fn reconfigure_total(
        &mut self,
        now: Timestamp,
        spec: LimiterSpec,
        fx: &mut Effects,
    ) -> Result<(), InvalidField> {
        spec.validate_unbounded()?;
        self.apply_spec(now, spec, fx);
        Ok(())
    }

    /// Applies a validated spec.
    fn apply_spec(&mut self, now: Timestamp, spec: LimiterSpec, fx: &mut Effects) {
        self.advance(now, fx);
        self.next_due = Timestamp(0);
        // A learned adaptive limit survives a change of other fields (a fleet re-applying
        // its config, a new lease): only a new concurrency or adaptive range resets it.
        if spec.concurrency != self.spec.concurrency || spec.adaptive != self.spec.adaptive {
            self.limit = spec.concurrency;
            self.successes = 0;
            self.gradient = adaptive::Gradient::default();
        }
        // The limit in force always lies within the adaptive range.
        if let (Some(limit), Some(a)) = (self.limit, spec.adaptive) {
            self.limit = Some(limit.clamp(a.min, a.max));
        }
        // Debt under the old rate is rescaled to the new one, so a raised rate applies now.
        if let (Some(old), Some(new)) = (self.spec.rate, spec.rate) {
            if self.tat > now {
                let debt = u128::from(self.tat.0 - now.0) * u128::from(new.interval_us())
                    / u128::from(old.interval_us());
                self.tat = now.after(Duration::from_micros(
                    u64::try_from(debt).unwrap_or(u64::MAX),
                ));
            }
        }
        // Any change of the rate (its burst too, which leaves `tat` as it was) moves the token
        // times the reservation was made with: giving its "unstarted" tail back by the new
        // times could un-take tokens already spent, so nothing is given back after a change.
        // (Compared in whole microseconds, as the Redis script keeps the period.)
        let as_stored =
            |r: Option<crate::spec::RateSpec>| r.map(|r| (r.limit, r.period.as_micros(), r.burst));
        if as_stored(self.spec.rate) != as_stored(spec.rate) {
            self.last_reservation = None;
        }
        self.spec = spec;
        self.refuse_impossible(fx);
        self.grant_waiters(now, fx);
    }

    /// Refuses queued waiters asking for more than any grant can now hold (after the limit
    /// or the burst went down): they would otherwise hold back the queue until their wait ends.
    pub(super) fn refuse_impossible(&mut self, fx: &mut Effects) {
        let limit = self.permit_cap().unwrap_or(u32::MAX);
        let impossible = self.queue.heavier_than(limit);
        for id in impossible {
            if let Some(w) = self.queue.remove(&id) {
                self.forget_request(w.request());
                self.queued_permits -= u64::from(w.permits);
                self.counters.rejected += 1;
                fx.wakes.push((
                    WaiterId(id),
                    Err(Refusal::PermitsExceedLimit {
                        requested: w.permits,
                        limit,
                    }),
                ));
            }
        }
    }

    /// Refuses every waiter: the limiter is going away.
    pub fn close(&mut self, fx: &mut Effects) {
        for (id, w) in self.queue.drain() {
            self.forget_request(w.request());
            self.counters.rejected += 1;
            fx.wakes.push((WaiterId(id), Err(Refusal::LimiterDeleted)));
        }
        self.queued_permits = 0;
    }
}
