//! Backend feedback: the adaptive limit (AIMD here; the gradient controller in `adaptive/`).

use super::*;

impl LimiterCore {
    /// Records a backend call's outcome. With an adaptive limit: a throttle multiplies the
    /// limit by `decrease` (at most once per cooldown); a full round of successes (as many as
    /// the limit) adds `increase`, granting waiters at once. Returns the limit in force.
    pub fn feedback(&mut self, now: Timestamp, outcome: Feedback, fx: &mut Effects) -> Option<u32> {
        self.feedback_with(now, outcome, None, fx)
    }

    /// [`feedback`](Self::feedback) with the call's latency (from its start to its answer),
    /// which the gradient controller uses (see [`adaptive`]); AIMD ignores it. A latency above
    /// [`adaptive::MAX_LATENCY`] (a day) counts as that.
    pub fn feedback_with(
        &mut self,
        now: Timestamp,
        outcome: Feedback,
        latency: Option<Duration>,
        fx: &mut Effects,
    ) -> Option<u32> {
        self.advance(now, fx);
        match outcome {
            Feedback::Ok => self.counters.feedback_ok += 1,
            Feedback::Throttled => self.counters.feedback_throttled += 1,
            Feedback::Error => self.counters.feedback_error += 1,
        }
        let (Some(adaptive), Some(limit)) = (self.spec.adaptive, self.limit) else {
            return self.limit;
        };
        if adaptive.algorithm == crate::spec::Algorithm::Gradient {
            let inputs = adaptive::Inputs {
                now,
                limit,
                in_use: self.in_use,
                hold_ewma_us: self.hold_ewma_us,
            };
            let moved = self.gradient.feedback(
                &adaptive,
                inputs,
                outcome,
                latency,
                &mut self.last_decrease,
                &mut self.successes,
            );
            self.set_adaptive_limit(now, limit, moved, fx);
            return self.limit;
        }
        match outcome {
            Feedback::Throttled => {
                self.successes = 0;
                // Calls that began before the last decrease are still finishing for about a
                // hold time; their throttles are not news.
                let hold = Duration::from_micros(self.hold_ewma_us.unwrap_or(0));
                let interval = adaptive.cooldown.max(hold);
                let cooled = self
                    .last_decrease
                    .is_none_or(|at| now >= at.after(interval));
                if cooled {
                    self.last_decrease = Some(now);
                    // At least one step down, never below min.
                    let scaled = (f64::from(limit) * adaptive.decrease).floor() as u32;
                    let lowered = scaled.min(limit.saturating_sub(1)).max(adaptive.min);
                    if lowered < limit {
                        self.limit = Some(lowered);
                        self.counters.limit_decreases += 1;
                        self.refuse_impossible(fx);
                    }
                }
            }
            Feedback::Ok => {
                self.successes += 1;
                if self.successes >= limit {
                    self.successes = 0;
                    let raised = limit.saturating_add(adaptive.increase).min(adaptive.max);
                    if raised > limit {
                        self.limit = Some(raised);
                        self.counters.limit_increases += 1;
                        self.grant_waiters(now, fx);
                    }
                }
            }
            Feedback::Error => {}
        }
        self.limit
    }

    /// Puts a limit moved by the controller in force: counted, and waiters granted (raised) or
    /// refused when now impossible (lowered).
    pub(super) fn set_adaptive_limit(
        &mut self,
        now: Timestamp,
        old: u32,
        new: u32,
        fx: &mut Effects,
    ) {
        if new < old {
            self.limit = Some(new);
            self.counters.limit_decreases += 1;
            self.refuse_impossible(fx);
        } else if new > old {
            self.limit = Some(new);
            self.counters.limit_increases += 1;
            self.grant_waiters(now, fx);
        }
    }
}
