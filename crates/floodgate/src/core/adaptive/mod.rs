//! Adaptive concurrency limits: the controllers that move a limiter's limit on backend
//! feedback. Pure and deterministic: every decision takes `now` and the reported outcome and
//! latency, and the Redis script's `feedback` implements the same arithmetic step for step
//! (integers, plus `floor(limit * decrease)` and two float comparisons, identical in Lua's
//! doubles), so both stores move a fleet's limit alike (`tests/twin.rs` checks it).
//!
//! Two controllers, chosen by [`AdaptiveSpec::algorithm`]:
//!
//! - **AIMD** (the default, and today's behaviour): lives in `core/mod.rs`'s `feedback`.
//! - **Gradient** ([`Gradient`], here): latency-aware, in the style of Netflix's
//!   concurrency-limits (Gradient2 and Vegas), with a growth curve that remembers where
//!   throttling began (as TCP CUBIC remembers its last loss point):
//!   1. *Slow start.* With no ceiling known, every success adds one permit (the limit doubles
//!      per round), halved while recent latency is above the long-run latency (a queue is
//!      forming: Gradient2's gradient below 1). Nothing grows while fewer than half the
//!      permits are in use (Gradient2's guard: the callers, not the backend, limit the calls).
//!   2. *A throttle that is news* (the call began after the last decrease: `now - latency`;
//!      without a latency, the AIMD cooling interval) records a ceiling, one below the permits
//!      in use when the backend refused (it could not take that many), and multiplies the
//!      limit by `decrease`; by `decrease` twice when no call begun since the last decrease
//!      has succeeded yet (the backend lost much more than one step of capacity).
//!   3. *Approach.* Below the ceiling the limit climbs by half the remaining distance per
//!      round (concave, as CUBIC approaching its last loss point), never past it.
//!   4. *Plateau and probe.* At the ceiling it stays `probe_rounds` rounds, then probes one
//!      permit past it. A refused probe puts the limit back on the ceiling (no cut: the
//!      ceiling was right) and doubles the next plateau (up to 16x); each probe that is not
//!      refused grows the next step (convex, as CUBIC past its plateau), and at twice the old
//!      ceiling it is forgotten (slow start).
//!   5. *Latency gradient.* When the recent latency exceeds `tolerance` times the long-run
//!      latency, calls are queueing in the backend without being refused: the limit is scaled
//!      by `0.8 + 0.2 * gradient`, the gradient being `tolerance * long / short` taken no lower
//!      than 1/2 (Gradient2's floor, smoothed by 0.2: at most a tenth off per step), at most
//!      once per recent latency, and the limit before the step becomes the ceiling.
//!
//! Latencies are smoothed as integer EWMAs of microseconds (weights 1/16 and 1/256, the same
//! integer steps as the hold-time average), so the state is exact in any store.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Feedback;
use crate::spec::AdaptiveSpec;
use crate::types::Timestamp;

/// The recent-latency average moves by 1/this of each sample: a few dozen calls.
pub const SHORT_WEIGHT: u64 = 16;
/// The long-run latency average moves by 1/this of each sample: several hundred calls.
pub const LONG_WEIGHT: u64 = 256;
/// Latency samples before the latency gradient may lower the limit: four long-run windows
/// (early on the averages hold mostly the calls that finished first, the fastest).
pub const WARM_UP: u64 = 4 * LONG_WEIGHT;

/// The gradient controller's state, kept with the limiter's (so every server and worker of a
/// fleet shares it) and carried by snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gradient {
    /// Recent latency of successful calls, µs (0: no sample yet).
    pub short_us: u64,
    /// Long-run latency of successful calls, µs (0: no sample yet).
    pub long_us: u64,
    /// One below the permits in use when the backend last refused (0: none known): where the
    /// limit plateaus before probing past it.
    pub ceiling: u32,
    /// Growth owed, in 1/`threshold` of a permit (see `Gradient::feedback`): fractional
    /// steps accumulate across successes.
    pub credit: u64,
    /// Latency samples seen, up to [`WARM_UP`]: the latency gradient acts only after them.
    #[serde(default)]
    pub samples: u64,
    /// Probes refused at this ceiling in a row, up to [`MAX_BACKOFF`]: the plateau before the
    /// next probe lasts `probe_rounds × 2^backoff` rounds.
    #[serde(default)]
    pub backoff: u32,
}

/// Most doublings of the plateau between probes (16x `probe_rounds`).
pub const MAX_BACKOFF: u32 = 4;

/// What the core needs to know and keeps between calls, besides [`Gradient`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Inputs {
    pub(crate) now: Timestamp,
    /// The limit in force.
    pub(crate) limit: u32,
    /// Permits out now (the throttled call's included if it reports before releasing).
    pub(crate) in_use: u32,
    /// The smoothed hold time, for the cooling interval of feedback without a latency.
    pub(crate) hold_ewma_us: Option<u64>,
}

/// Moves an integer EWMA towards `sample` by 1/`weight` of the gap (the first sample sets it).
pub(crate) fn ewma(avg: u64, sample: u64, weight: u64) -> u64 {
    if avg == 0 {
        sample.max(1)
    } else if sample >= avg {
        avg + (sample - avg) / weight
    } else {
        avg - (avg - sample) / weight
    }
}

/// The longest latency a report counts as, a day (as the HTTP route's cap and the longest
/// lease): the library API takes any `Duration`, and a latency near `u64::MAX` µs overflowed
/// `last_decrease + short_us` (a panic in debug builds, a wrapped comparison in release) and
/// lost its exactness in the Redis script's doubles, so the two stores parted. Clamped here and
/// by the Redis store before the script sees it, both stores see the same number.
pub const MAX_LATENCY: Duration = Duration::from_secs(24 * 3_600);

/// A reported latency in µs, clamped to [`MAX_LATENCY`].
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.min(MAX_LATENCY).as_micros()).unwrap_or(u64::MAX)
}

/// `floor(limit * factor)`, the one float step (the same double arithmetic in Lua).
fn scale(limit: u32, factor: f64) -> u32 {
    (f64::from(limit) * factor).floor() as u32
}

impl Gradient {
    /// One feedback report. `last_decrease` and `fresh` (successes of calls begun since the
    /// last decrease) are the core's, shared with AIMD. Returns the new limit.
    pub(crate) fn feedback(
        &mut self,
        spec: &AdaptiveSpec,
        at: Inputs,
        outcome: Feedback,
        latency: Option<Duration>,
        last_decrease: &mut Option<Timestamp>,
        fresh: &mut u32,
    ) -> u32 {
        let limit = at.limit;
        let latency_us = latency.map(micros);
        // When the reported call began, if we know: only calls begun after the last decrease
        // tell something about the limit in force now.
        let began = latency_us.map(|l| Timestamp(at.now.0.saturating_sub(l)));
        let news = match (began, *last_decrease) {
            (_, None) => true,
            (Some(began), Some(d)) => began >= d,
            (None, Some(d)) => {
                let hold = Duration::from_micros(at.hold_ewma_us.unwrap_or(0));
                at.now >= d.after(spec.cooldown.max(hold))
            }
        };
        match outcome {
            Feedback::Error => limit,
            Feedback::Throttled => {
                if !news {
                    return limit;
                }
                let deep = *fresh == 0 && last_decrease.is_some();
                *last_decrease = Some(at.now);
                *fresh = 0;
                self.credit = 0;
                // A probe one past the ceiling, refused: the ceiling was right. Back to it
                // (no cut), and wait twice as long before the next probe (up to 16x).
                let probe = self.ceiling > 0 && limit == self.ceiling.saturating_add(1);
                if probe && !deep {
                    self.backoff = (self.backoff + 1).min(MAX_BACKOFF);
                    return self.ceiling.max(spec.min);
                }
                self.backoff = 0;
                self.ceiling = at.in_use.min(limit).saturating_sub(1).max(spec.min);
                let mut lowered = scale(limit, spec.decrease);
                if deep {
                    lowered = scale(lowered, spec.decrease);
                }
                lowered.min(limit.saturating_sub(1)).max(spec.min)
            }
            Feedback::Ok => {
                if news && last_decrease.is_some() {
                    *fresh = fresh.saturating_add(1);
                }
                if let Some(l) = latency_us {
                    // One very slow call (a heavy tail) is not a queue: samples count up to
                    // twice the long-run latency.
                    let l = if self.long_us > 0 {
                        l.min(self.long_us.saturating_mul(2))
                    } else {
                        l
                    };
                    self.short_us = ewma(self.short_us, l, SHORT_WEIGHT);
                    self.long_us = ewma(self.long_us, l, LONG_WEIGHT);
                    self.samples = self.samples.saturating_add(1).min(WARM_UP);
                    // Queueing without refusals: scale down, at most once per recent latency.
                    let cooled = last_decrease.is_none_or(|d| at.now.0 >= d.0 + self.short_us);
                    // The long run means something once it has seen its window of calls.
                    let queueing = self.samples >= WARM_UP
                        && self.short_us as f64 > spec.tolerance * self.long_us as f64;
                    if queueing && cooled {
                        // Gradient2's step: the gradient (at least 1/2), smoothed by 0.2, so
                        // one step takes at most a tenth off.
                        let gradient =
                            (spec.tolerance * self.long_us as f64 / self.short_us as f64).max(0.5);
                        let lowered = scale(limit, 0.8 + 0.2 * gradient).min(limit).max(spec.min);
                        *last_decrease = Some(at.now);
                        *fresh = 0;
                        self.credit = 0;
                        self.ceiling = limit;
                        return lowered;
                    }
                }
                // Gradient2's guard: with fewer than half the permits in use the backend is not
                // what limits the calls, so success says nothing about a higher limit.
                if u64::from(at.in_use) * 2 < u64::from(limit) {
                    return limit;
                }
                self.grow(spec, limit)
            }
        }
    }

    /// One success's worth of growth along the curve (slow start, approach, plateau, probe).
    fn grow(&mut self, spec: &AdaptiveSpec, limit: u32) -> u32 {
        let limit64 = u64::from(limit);
        // Per success, `step` of a permit out of `threshold`: `step / limit` is a round's
        // worth of `step` permits spread over the round's `limit` successes.
        let (step, threshold) = if self.ceiling == 0 {
            (limit64, limit64) // slow start: one permit per success
        } else if limit < self.ceiling {
            (u64::from((self.ceiling - limit) / 2).max(1), limit64)
        } else if limit == self.ceiling {
            let rounds = u64::from(spec.probe_rounds) << self.backoff;
            (1, limit64.saturating_mul(rounds))
        } else {
            (u64::from(limit - self.ceiling), limit64)
        };
        // A queue forming (recent latency above the long run): grow at half speed.
        let step = if self.short_us > self.long_us {
            (step / 2).max(1)
        } else {
            step
        };
        self.credit = self.credit.saturating_add(step);
        if self.credit < threshold {
            return limit;
        }
        let permits = self.credit / threshold;
        self.credit %= threshold;
        let mut raised = limit64.saturating_add(permits);
        if limit < self.ceiling {
            raised = raised.min(u64::from(self.ceiling));
        }
        let raised = u32::try_from(raised).unwrap_or(u32::MAX).min(spec.max);
        if self.ceiling > 0 && raised >= self.ceiling.saturating_mul(2) {
            // Far past where throttling began: the backend grew; find it afresh.
            self.ceiling = 0;
        }
        raised
    }
}

#[cfg(test)]
mod tests;
