//! The passage of time: expiries, ended waits, and the next deadline to wake up for.

use super::*;

impl LimiterCore {
    /// Applies the passage of time up to `now`: expires leases and waiter deadlines in deadline
    /// order, granting freed permits to the queue as it goes.
    #[inline]
    pub fn advance(&mut self, now: Timestamp, fx: &mut Effects) {
        // Nothing can be due before `next_due`; a rate's token times are not tracked there.
        // Inlined (the store's hot path then skips a call); the work is out of line.
        if now < self.next_due && self.spec.rate.is_none() {
            return;
        }
        self.advance_due(now, fx);
    }

    /// [`advance`](Self::advance) when something may be due.
    #[inline(never)]
    fn advance_due(&mut self, now: Timestamp, fx: &mut Effects) {
        self.end_learning_if_due(now, fx);
        loop {
            let holders = &self.holders;
            let lease = self
                .leases
                .peek_live(|k, d| holders.get(&k).is_some_and(|h| h.deadline == d));
            let queue = &self.queue;
            let wait = self.waits.peek_live(|k, d| live_wait(queue, k, d));
            // Everything before now is handled below, so the nearest of these is exact.
            self.next_due = match (lease, wait) {
                (Some((l, _)), Some((w, _))) => l.min(w),
                (l, w) => l.or(w).map_or(Timestamp::MAX, |(d, _)| d),
            }
            .min(self.learning_until.unwrap_or(Timestamp::MAX));
            let lease = lease.filter(|(d, _)| *d <= now);
            let wait = wait.filter(|(d, _)| *d <= now);
            // The head's rate token time, when only the rate holds it back.
            let rate = self.head_rate_at().filter(|at| *at <= now);
            let lease_first = match (lease, wait) {
                (None, None) if rate.is_none() => break,
                (None, None) => false,
                // On a tie the lease goes first, so the waiter still gets the freed slot.
                (Some((ld, _)), Some((wd, _))) => ld <= wd,
                (l, _) => l.is_some(),
            };
            let wait_time = wait.map(|(wd, _)| wd);
            let first = if lease_first {
                lease.map(|(ld, _)| ld)
            } else {
                wait_time
            };
            if let Some(at) = rate.filter(|r| first.is_none_or(|f| *r <= f)) {
                // The head's token time came before any other event: grant it (and whoever
                // follows and is also ready).
                let _ = at;
                self.grant_waiters(now, fx);
                continue;
            }
            if lease_first {
                if let Some((_, token)) = lease {
                    self.leases.pop();
                    if let Some(h) = self.holders.remove(&token) {
                        self.forget_request(h.request.as_ref());
                        self.in_use -= h.permits;
                        self.counters.expired += 1;
                    }
                }
            } else if let Some((_, id)) = wait {
                self.waits.pop();
                let ahead = self.queue.permits_through(id).unwrap_or(0);
                if let Some(w) = self.queue.remove(&id) {
                    self.forget_request(w.request());
                    self.queued_permits -= u64::from(w.permits);
                    self.counters.timed_out += 1;
                    let retry_after = self.retry_hint(now, ahead);
                    fx.wakes
                        .push((WaiterId(id), Err(Refusal::WaitTimeout { retry_after })));
                }
            }
            // A freed slot, or a departed head waiter, may let the queue move.
            self.grant_waiters(now, fx);
        }
    }

    /// A moment no later than [`next_deadline`](Self::next_deadline), found without looking
    /// at the deadlines when it can be (no rate limit): what a store compares with its armed
    /// timer after each operation. The timer's own pass then finds the exact deadline.
    pub fn deadline_hint(&mut self) -> Option<Timestamp> {
        if self.spec.rate.is_some() {
            return self.next_deadline();
        }
        (self.next_due != Timestamp::MAX).then_some(self.next_due)
    }

    /// The earliest moment at which [`advance`](Self::advance) would change something: the
    /// nearest lease deadline or waiter deadline. A store arms one timer for it.
    pub fn next_deadline(&mut self) -> Option<Timestamp> {
        let holders = &self.holders;
        let lease = self
            .leases
            .peek_live(|k, d| holders.get(&k).is_some_and(|h| h.deadline == d))
            .map(|(d, _)| d);
        let queue = &self.queue;
        let wait = self
            .waits
            .peek_live(|k, d| live_wait(queue, k, d))
            .map(|(d, _)| d);
        let due = [lease, wait, self.learning_until]
            .into_iter()
            .flatten()
            .min();
        // Exact now: refreshes the bound that `advance` and `deadline_hint` use.
        self.next_due = due.unwrap_or(Timestamp::MAX);
        [due, self.head_rate_at()].into_iter().flatten().min()
    }
}
