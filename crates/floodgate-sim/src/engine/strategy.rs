//! The Floodgate strategies' program: acquire, heartbeat, extend, release and feedback against a
//! real `LimiterCore` on the simulated clock.

use super::*;

impl Sim<'_> {
    pub(super) fn acquire(&mut self, t: usize) {
        let req = AcquireRequest {
            permits: 1,
            lease: Some(self.cfg.lease),
            wait: Some(self.cfg.max_wait),
            holder: None,
            request_id: None,
        };
        let mut fx = Effects::default();
        let key = self.keys.is_some().then(|| self.key_of(t));
        let Some(core) = self.limiter.as_mut() else {
            return;
        };
        let now = Timestamp(self.now);
        let admission = match (self.keys.as_mut(), key) {
            (Some(keys), Some(key)) => keys.acquire(core, now, &key, &req, &mut fx),
            _ => core.acquire(now, &req, &mut fx),
        };
        match admission {
            Admission::Granted(grant) => {
                self.tasks[t].token = Some(grant.token);
                self.issue_query(t);
            }
            Admission::Queued(id) => {
                self.waiters.insert(id.0, t);
                self.tasks[t].waiter = Some(id.0);
                self.tasks[t].phase = Phase::Waiting;
                self.start_idle(t, self.now);
            }
            Admission::Refused(refusal) => {
                self.stats.wait_timeouts += 1;
                let countdown = self.wait_countdown(&refusal);
                self.requeue(t, countdown);
            }
        }
        self.apply(fx);
    }

    pub(super) fn heartbeat(&self) -> Micros {
        (us(self.cfg.lease) / u64::from(self.cfg.model.heartbeats.max(1))).max(1)
    }

    /// The countdown of a task whose acquire ended without a permit: the server's hint with
    /// `@limited`'s jitter.
    pub(super) fn wait_countdown(&mut self, refusal: &Refusal) -> Micros {
        let hint = retry_after(refusal) as f64;
        let jitter = self
            .rng
            .uniform(0.0, self.cfg.model.wait_retry_jitter.max(0.0));
        (hint * (1.0 + jitter)).round() as Micros
    }

    pub(super) fn extend(&mut self, t: usize) {
        let Some(token) = self.tasks[t].token else {
            return;
        };
        let mut fx = Effects::default();
        let (now, lease) = (Timestamp(self.now), self.cfg.lease);
        let extended = match (self.limiter.as_mut(), self.keys.as_mut()) {
            (Some(core), Some(keys)) => Some(keys.extend(core, now, token, lease, &mut fx)),
            (Some(core), None) => Some(core.extend(now, token, lease, &mut fx)),
            _ => None,
        };
        match extended {
            Some(Ok(Ok(_))) => {
                self.stats.extends += 1;
                let beat = self.heartbeat();
                let exec = self.tasks[t].exec;
                self.schedule(self.now + beat, Ev::Extend(t, exec));
            }
            // The permit was lost (the lease ended before the heartbeat): the holder learns
            // it; the query already running finishes.
            Some(Ok(Err(_))) => self.stats.extend_lost += 1,
            _ => {}
        }
        self.apply(fx);
    }

    pub(super) fn release(&mut self, t: usize) {
        let Some(token) = self.tasks[t].token.take() else {
            return;
        };
        let mut fx = Effects::default();
        let now = Timestamp(self.now);
        match (self.limiter.as_mut(), self.keys.as_mut()) {
            (Some(core), Some(keys)) => {
                keys.release(core, now, token, &mut fx);
            }
            (Some(core), None) => {
                core.release(now, token, &mut fx);
            }
            _ => {}
        }
        self.apply(fx);
    }

    /// Reports a query's outcome and latency to the limiter, as `@limited` does: adapts the
    /// limit under the adaptive strategies.
    pub(super) fn feedback(&mut self, t: usize, outcome: Feedback) {
        if !self.strategy.adapts() {
            return;
        }
        let latency = Duration::from_micros(self.now.saturating_sub(self.tasks[t].query_started));
        let mut fx = Effects::default();
        let limit = self.limiter.as_mut().and_then(|core| {
            core.feedback_with(Timestamp(self.now), outcome, Some(latency), &mut fx)
        });
        if let Some(limit) = limit {
            if self.limit_series.last().map(|(_, l)| *l) != Some(limit) {
                self.limit_series.push((self.now, limit));
            }
        }
        self.apply(fx);
    }

    /// Delivers the limiter's wake-ups (exactly the waiters granted or timed out), then arms
    /// the timer for its next deadline.
    pub(super) fn apply(&mut self, fx: Effects) {
        for (id, outcome) in fx.wakes {
            let Some(t) = self.waiters.remove(&id.0) else {
                continue;
            };
            if !self.tasks[t].running || self.tasks[t].waiter != Some(id.0) {
                continue;
            }
            self.tasks[t].waiter = None;
            self.end_idle(t);
            match outcome {
                Ok(grant) => {
                    self.tasks[t].token = Some(grant.token);
                    self.issue_query(t);
                }
                Err(refusal) => {
                    self.stats.wait_timeouts += 1;
                    let countdown = self.wait_countdown(&refusal);
                    self.requeue(t, countdown);
                }
            }
        }
        self.arm();
    }

    pub(super) fn arm(&mut self) {
        let Some(core) = self.limiter.as_mut() else {
            return;
        };
        let next = match self.keys.as_mut() {
            Some(keys) => keys.next_deadline(core),
            None => core.next_deadline(),
        };
        if let Some(Timestamp(at)) = next {
            let at = at.max(self.now);
            if self.armed.is_none_or(|armed| at < armed) {
                self.armed = Some(at);
                self.schedule(at, Ev::Timer);
            }
        }
    }
}
