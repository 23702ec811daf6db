//! What a limiter is configured to allow.

use std::time::Duration;

/// Largest concurrency a limiter accepts.
pub const MAX_CONCURRENCY: u32 = 1_000_000;
/// Longest lease a permit can be granted or extended for. Longer than any sane unit of work;
/// anything beyond it is a unit mistake (seconds sent as milliseconds, say).
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);
/// Shortest lease a permit can be granted or extended for.
pub const MIN_LEASE: Duration = Duration::from_millis(1);
/// Longest a single acquire may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Largest queue a limiter accepts.
pub const MAX_QUEUE: u32 = 1_000_000;

/// Largest rate limit (tokens per period) accepted.
pub const MAX_RATE: u32 = 1_000_000;
/// Longest rate period accepted.
pub const MAX_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// A rate limit, enforced with GCRA: on average `limit` tokens per `period`, at most `burst`
/// at once. Each acquire takes as many tokens as permits.
///
/// `#[non_exhaustive]`, so a field can be added without breaking callers: build one with
/// [`RateSpec::per`] (and [`with_burst`](RateSpec::with_burst)); its fields are public to read
/// and assign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateSpec {
    /// Tokens per period.
    pub limit: u32,
    /// The period.
    pub period: Duration,
    /// Tokens that may be taken back to back (1 = perfectly paced).
    pub burst: u32,
}

impl RateSpec {
    /// `limit` per `period`, with the default burst (see [`default_burst`](Self::default_burst)).
    pub fn per(limit: u32, period: Duration) -> Self {
        RateSpec {
            limit,
            period,
            burst: Self::default_burst(limit, period),
        }
    }

    /// The tokens of 20 ms at this rate, at least 1: paced to within 20 ms. Waiters are woken
    /// by timers that fire up to about a millisecond late, and a grant can only be charged from
    /// when it happens (never earlier, or the rate could be exceeded); a burst of 1 turns every
    /// late wake-up into capacity lost for good, a small burst absorbs it.
    pub fn default_burst(limit: u32, period: Duration) -> u32 {
        let period_us = u64::try_from(period.as_micros()).unwrap_or(u64::MAX).max(1);
        let tokens = (u64::from(limit) * 20_000).div_ceil(period_us);
        u32::try_from(tokens)
            .unwrap_or(u32::MAX)
            .clamp(1, limit.max(1))
    }

    /// Sets the burst.
    pub fn with_burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// The emission interval: time per token, rounded up to whole microseconds so the rate is
    /// never exceeded (the achieved rate is within 1% of `limit / period` whenever the interval
    /// is at least 100 µs).
    pub fn interval_us(&self) -> u64 {
        let period = u64::try_from(self.period.as_micros()).unwrap_or(u64::MAX);
        period.div_ceil(u64::from(self.limit.max(1))).max(1)
    }
}

/// How an adaptive limit moves (see [`AdaptiveSpec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Additive increase, multiplicative decrease on throttles only; latency is ignored.
    #[default]
    Aimd,
    /// Latency-aware (`crate::core::adaptive`): a latency gradient in the style of Netflix's
    /// Gradient2/Vegas slows growth and backs off when calls queue up, and a growth curve
    /// remembers where throttling began and plateaus there (as TCP CUBIC near its last loss
    /// point) instead of probing past it every round.
    Gradient,
}

impl Algorithm {
    /// The name used in the API and config files.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Aimd => "aimd",
            Algorithm::Gradient => "gradient",
        }
    }
}

/// Adaptive concurrency: the effective limit moves between `min` and `max` on feedback.
///
/// With [`Algorithm::Aimd`] (the default): a throttle multiplies it by `decrease`, at most once
/// per cooling interval: `cooldown` or the typical hold time of a permit, whichever is longer
/// (throttles of calls that started before the last decrease say nothing new); every `limit`
/// successes in a row add `increase`.
///
/// With [`Algorithm::Gradient`]: see `crate::core::adaptive` and `docs/api.md`; `decrease`
/// is the factor per throttle (0.9 by default), `tolerance` and `probe_rounds` shape the rest,
/// and `increase` is not used.
///
/// `#[non_exhaustive]`, so a field can be added without breaking callers: build one with
/// [`AdaptiveSpec::between`] or [`AdaptiveSpec::gradient`], then assign the fields to change.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct AdaptiveSpec {
    /// Which controller moves the limit.
    pub algorithm: Algorithm,
    /// Lowest effective limit.
    pub min: u32,
    /// Highest effective limit.
    pub max: u32,
    /// AIMD: added after a full round (as many successes as the current limit) without a
    /// throttle.
    pub increase: u32,
    /// Factor applied on a throttle, in (0, 1).
    pub decrease: f64,
    /// At most one decrease per this interval (or per typical hold time, if longer), so one
    /// burst of throttles counts once. The gradient controller uses it only for feedback that
    /// carries no latency (with a latency it knows whether the call began after the decrease).
    pub cooldown: Duration,
    /// Gradient: the limit comes down when recent latency exceeds the long-run latency by more
    /// than this factor (Gradient2's `rttTolerance`), in [1.1, 10].
    pub tolerance: f64,
    /// Gradient: rounds spent at the learned ceiling (where throttling began) before probing
    /// one permit past it; from 1 to 10,000.
    pub probe_rounds: u32,
}

impl Eq for AdaptiveSpec {}

/// The gradient controller's default `tolerance`.
pub const DEFAULT_TOLERANCE: f64 = 1.5;
/// The gradient controller's default `probe_rounds`.
pub const DEFAULT_PROBE_ROUNDS: u32 = 30;
/// The gradient controller's default `decrease`.
pub const DEFAULT_GRADIENT_DECREASE: f64 = 0.9;

impl AdaptiveSpec {
    /// AIMD between `min` and `max`, with the default steps: +1 per round, x0.7 per throttle,
    /// one decrease per 50 ms or per typical hold time, whichever is longer.
    pub fn between(min: u32, max: u32) -> Self {
        AdaptiveSpec {
            algorithm: Algorithm::Aimd,
            min,
            max,
            increase: 1,
            decrease: 0.7,
            cooldown: Duration::from_millis(50),
            tolerance: DEFAULT_TOLERANCE,
            probe_rounds: DEFAULT_PROBE_ROUNDS,
        }
    }

    /// The latency-aware controller between `min` and `max`, with its defaults: x0.9 per
    /// throttle, tolerance 1.5, 30 rounds at the learned ceiling between probes.
    pub fn gradient(min: u32, max: u32) -> Self {
        AdaptiveSpec {
            algorithm: Algorithm::Gradient,
            decrease: DEFAULT_GRADIENT_DECREASE,
            ..AdaptiveSpec::between(min, max)
        }
    }
}

/// A limiter's configuration: a concurrency limit, a rate limit, or both (one acquire then
/// waits for a slot and a token together).
///
/// `#[non_exhaustive]`, so a field can be added without breaking callers: build one with
/// [`LimiterSpec::concurrency`], [`LimiterSpec::rate`] or [`Default`], then the `with_*`
/// methods (or assign its public fields). Outside this crate a struct literal is refused:
///
/// ```compile_fail,E0639
/// use std::time::Duration;
/// use floodgate::LimiterSpec;
///
/// let spec = LimiterSpec {
///     concurrency: Some(5),
///     rate: None,
///     adaptive: None,
///     default_lease: Duration::from_secs(30),
///     max_wait: Duration::from_secs(10),
///     max_queue: 100,
/// };
/// ```
///
/// ```
/// use std::time::Duration;
/// use floodgate::{AdaptiveSpec, LimiterSpec, RateSpec};
///
/// let spec = LimiterSpec::concurrency(5)
///     .with_rate(RateSpec::per(100, Duration::from_secs(1)).with_burst(10))
///     .with_adaptive(AdaptiveSpec::between(2, 20))
///     .with_default_lease(Duration::from_secs(30))
///     .with_max_wait(Duration::from_secs(10))
///     .with_max_queue(100);
/// assert_eq!(spec.concurrency, Some(5));
/// assert!(spec.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LimiterSpec {
    /// Permits out at once (at least 1), or `None` for a rate-only limiter, whose grants have
    /// no lease and need no release. With `adaptive`, the starting limit.
    pub concurrency: Option<u32>,
    /// The rate limit, if any.
    pub rate: Option<RateSpec>,
    /// Move the effective concurrency limit with backend feedback.
    pub adaptive: Option<AdaptiveSpec>,
    /// Lease given when an acquire names none: how long a holder keeps its permit without
    /// extending it. A holder that dies is reclaimed after at most this long.
    pub default_lease: Duration,
    /// The cap on any one wait: an acquire asking for longer waits this long. Also the default
    /// wait when an acquire names none.
    pub max_wait: Duration,
    /// How many acquires may wait at once; one more is rejected with `QueueFull` immediately.
    pub max_queue: u32,
}

impl Default for LimiterSpec {
    fn default() -> Self {
        LimiterSpec {
            concurrency: Some(1),
            rate: None,
            adaptive: None,
            default_lease: Duration::from_secs(300),
            max_wait: Duration::from_secs(60),
            max_queue: 10_000,
        }
    }
}

/// A spec or request field that is out of range. `field` names the field at fault.
///
/// `#[non_exhaustive]`: built only by the library (read its fields, do not construct one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
#[non_exhaustive]
pub struct InvalidField {
    /// The field at fault, as named in the HTTP API (`concurrency`, `lease_ms`, ...).
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

/// Every field an [`InvalidField`] may name, as the HTTP API spells it (the Redis store maps
/// the script's field names through this list).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) const FIELDS: &[&str] = &[
    "concurrency",
    "rate",
    "rate.limit",
    "rate.period_ms",
    "rate.burst",
    "adaptive",
    "adaptive.min",
    "adaptive.max",
    "adaptive.increase",
    "adaptive.decrease",
    "adaptive.cooldown_ms",
    "lease_ms",
    "max_wait_ms",
    "max_queue",
    "permits",
    "wait_ms",
    "count",
    "reservation",
    "request_id",
    "holder",
];

/// The longest label (`holder`) an acquire may carry, in characters: it is kept with the grant,
/// in the durable log and on Redis, and shown in logs and on the dashboard.
pub const MAX_HOLDER_CHARS: usize = 256;

/// Checks an acquire's label: at most [`MAX_HOLDER_CHARS`] characters, no control characters
/// (an escape sequence in it could rewrite what a terminal shows of it).
///
/// # Errors
///
/// An [`InvalidField`] naming `holder`.
pub fn check_holder(holder: &str) -> Result<(), InvalidField> {
    // `nth`, not `count`: a label of megabytes is refused after its first 257 characters.
    if holder.chars().nth(MAX_HOLDER_CHARS).is_some() {
        return Err(InvalidField::new(
            "holder",
            format!("at most {MAX_HOLDER_CHARS} characters"),
        ));
    }
    no_control_characters("holder", holder)
}

/// Refuses text a person will read (a label, a key) with a control character in it: an
/// escape sequence could rewrite what a terminal or a log viewer shows.
pub(crate) fn no_control_characters(field: &'static str, text: &str) -> Result<(), InvalidField> {
    if text.chars().any(char::is_control) {
        return Err(InvalidField::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

impl InvalidField {
    pub(crate) fn new(field: &'static str, message: impl Into<String>) -> Self {
        InvalidField {
            field,
            message: message.into(),
        }
    }
}

pub(crate) fn check_lease(field: &'static str, lease: Duration) -> Result<(), InvalidField> {
    if lease < MIN_LEASE {
        return Err(InvalidField::new(field, "must be at least 1 ms"));
    }
    if lease > MAX_LEASE {
        return Err(InvalidField::new(
            field,
            format!("must be at most {} ms (24 h)", MAX_LEASE.as_millis()),
        ));
    }
    Ok(())
}

impl LimiterSpec {
    /// A spec with this concurrency and the default lease, wait and queue caps.
    pub fn concurrency(concurrency: u32) -> Self {
        LimiterSpec {
            concurrency: Some(concurrency),
            ..LimiterSpec::default()
        }
    }

    /// A rate-only spec.
    pub fn rate(rate: RateSpec) -> Self {
        LimiterSpec {
            concurrency: None,
            rate: Some(rate),
            ..LimiterSpec::default()
        }
    }

    /// Adds a rate limit.
    pub fn with_rate(mut self, rate: RateSpec) -> Self {
        self.rate = Some(rate);
        self
    }

    /// Makes the concurrency limit adaptive.
    pub fn with_adaptive(mut self, adaptive: AdaptiveSpec) -> Self {
        self.adaptive = Some(adaptive);
        self
    }

    /// Sets the default lease.
    pub fn with_default_lease(mut self, lease: Duration) -> Self {
        self.default_lease = lease;
        self
    }

    /// Sets the cap on a wait.
    pub fn with_max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// Sets the cap on the queue length.
    pub fn with_max_queue(mut self, max_queue: u32) -> Self {
        self.max_queue = max_queue;
        self
    }

    /// Checks every field; the error names the first one out of range.
    pub fn validate(&self) -> Result<(), InvalidField> {
        if self.concurrency.is_none() && self.rate.is_none() {
            return Err(InvalidField::new(
                "concurrency",
                "a limiter needs a concurrency limit, a rate limit, or both",
            ));
        }
        self.validate_unbounded()
    }

    /// As [`validate`](Self::validate), but a spec with neither concurrency nor rate passes:
    /// only the total of a keyed limiter with per-key rates alone has no limit of its own.
    pub(crate) fn validate_unbounded(&self) -> Result<(), InvalidField> {
        if let Some(c) = self.concurrency {
            if c == 0 || c > MAX_CONCURRENCY {
                return Err(InvalidField::new(
                    "concurrency",
                    format!("must be from 1 to {MAX_CONCURRENCY}"),
                ));
            }
        }
        if let Some(rate) = &self.rate {
            if rate.limit == 0 || rate.limit > MAX_RATE {
                return Err(InvalidField::new(
                    "rate.limit",
                    format!("must be from 1 to {MAX_RATE}"),
                ));
            }
            if rate.period < Duration::from_millis(1) || rate.period > MAX_PERIOD {
                return Err(InvalidField::new(
                    "rate.period_ms",
                    "must be from 1 ms to 86400000 ms (24 h)",
                ));
            }
            if rate.burst == 0 || rate.burst > MAX_RATE {
                return Err(InvalidField::new(
                    "rate.burst",
                    format!("must be from 1 to {MAX_RATE}"),
                ));
            }
        }
        if let Some(a) = &self.adaptive {
            let Some(c) = self.concurrency else {
                return Err(InvalidField::new(
                    "adaptive",
                    "needs a concurrency limit to adapt",
                ));
            };
            if a.min == 0 || a.min > a.max || a.max > MAX_CONCURRENCY {
                return Err(InvalidField::new(
                    "adaptive.min",
                    format!("need 1 <= min <= max <= {MAX_CONCURRENCY}"),
                ));
            }
            if c < a.min || c > a.max {
                return Err(InvalidField::new(
                    "concurrency",
                    "the starting limit must lie between adaptive.min and adaptive.max",
                ));
            }
            if a.increase == 0 || a.increase > MAX_CONCURRENCY {
                return Err(InvalidField::new(
                    "adaptive.increase",
                    format!("must be from 1 to {MAX_CONCURRENCY}"),
                ));
            }
            if !(a.decrease > 0.0 && a.decrease < 1.0) {
                return Err(InvalidField::new(
                    "adaptive.decrease",
                    "must be between 0 and 1 (exclusive)",
                ));
            }
            if a.cooldown > MAX_PERIOD {
                return Err(InvalidField::new(
                    "adaptive.cooldown_ms",
                    "must be at most 86400000 ms (24 h)",
                ));
            }
            if !(a.tolerance >= 1.1 && a.tolerance <= 10.0) {
                return Err(InvalidField::new(
                    "adaptive.tolerance",
                    "must be from 1.1 to 10",
                ));
            }
            if a.probe_rounds == 0 || a.probe_rounds > 10_000 {
                return Err(InvalidField::new(
                    "adaptive.probe_rounds",
                    "must be from 1 to 10000",
                ));
            }
        }
        check_lease("lease_ms", self.default_lease)?;
        if self.max_wait > MAX_WAIT {
            return Err(InvalidField::new(
                "max_wait_ms",
                format!("must be at most {} ms (1 h)", MAX_WAIT.as_millis()),
            ));
        }
        if self.max_queue > MAX_QUEUE {
            return Err(InvalidField::new(
                "max_queue",
                format!("must be at most {MAX_QUEUE}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Redis store maps the field a script refusal names through [`FIELDS`]; every name
    /// the script can send must be there, or a refusal would be reported against `store`.
    #[cfg(feature = "redis")]
    #[test]
    fn every_field_the_redis_script_names_is_known() {
        fn quoted_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
            text.match_indices(marker)
                .filter_map(|(i, m)| text[i + m.len()..].split('\'').next())
                .collect()
        }
        let src = crate::store::redis::script_source();
        let src = src.as_str();
        let mut named = quoted_after(src, "{'invalid', '");
        let start = src
            .find("local function check_spec")
            .expect("check_spec in the script");
        let body = &src[start..];
        let body = &body[..body.find("\nend\n").expect("end of check_spec")];
        named.extend(quoted_after(body, "return {'"));
        assert!(named.len() >= 8, "too few refusals found: {named:?}");
        for name in named {
            assert!(
                FIELDS.contains(&name),
                "the script names {name:?}, not in spec::FIELDS"
            );
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert!(LimiterSpec::concurrency(50).validate().is_ok());
        let field = |s: LimiterSpec| s.validate().map_err(|e| e.field);
        assert_eq!(field(LimiterSpec::concurrency(0)), Err("concurrency"));
        assert_eq!(
            field(LimiterSpec::concurrency(MAX_CONCURRENCY + 1)),
            Err("concurrency")
        );
        assert_eq!(
            field(LimiterSpec::concurrency(1).with_default_lease(Duration::ZERO)),
            Err("lease_ms")
        );
        assert_eq!(
            field(LimiterSpec::concurrency(1).with_default_lease(MAX_LEASE * 2)),
            Err("lease_ms")
        );
        assert_eq!(
            field(LimiterSpec::concurrency(1).with_max_wait(MAX_WAIT * 2)),
            Err("max_wait_ms")
        );
        assert_eq!(
            field(LimiterSpec::concurrency(1).with_max_queue(MAX_QUEUE + 1)),
            Err("max_queue")
        );
        let neither = LimiterSpec {
            concurrency: None,
            ..LimiterSpec::default()
        };
        assert_eq!(field(neither), Err("concurrency"));
        let per_sec = |n| RateSpec::per(n, Duration::from_secs(1));
        assert!(LimiterSpec::rate(per_sec(10)).validate().is_ok());
        assert_eq!(field(LimiterSpec::rate(per_sec(0))), Err("rate.limit"));
        assert_eq!(
            field(LimiterSpec::rate(RateSpec::per(1, Duration::ZERO))),
            Err("rate.period_ms")
        );
        assert_eq!(
            field(LimiterSpec::rate(per_sec(5).with_burst(0))),
            Err("rate.burst")
        );
        assert_eq!(
            field(LimiterSpec::rate(per_sec(5)).with_adaptive(AdaptiveSpec::between(1, 5))),
            Err("adaptive")
        );
        assert_eq!(
            field(LimiterSpec::concurrency(9).with_adaptive(AdaptiveSpec::between(1, 5))),
            Err("concurrency")
        );
        assert_eq!(
            field(LimiterSpec::concurrency(3).with_adaptive(AdaptiveSpec::between(5, 1))),
            Err("adaptive.min")
        );
        let gradient = |f: fn(&mut AdaptiveSpec)| {
            let mut a = AdaptiveSpec::gradient(1, 5);
            f(&mut a);
            LimiterSpec::concurrency(3).with_adaptive(a)
        };
        assert!(gradient(|_| {}).validate().is_ok());
        assert_eq!(
            field(gradient(|a| a.tolerance = 1.0)),
            Err("adaptive.tolerance")
        );
        assert_eq!(
            field(gradient(|a| a.tolerance = f64::NAN)),
            Err("adaptive.tolerance")
        );
        assert_eq!(
            field(gradient(|a| a.probe_rounds = 0)),
            Err("adaptive.probe_rounds")
        );
        assert_eq!(
            field(gradient(|a| a.decrease = 1.0)),
            Err("adaptive.decrease")
        );
    }

    #[test]
    fn the_emission_interval_rounds_up() {
        assert_eq!(
            RateSpec::per(100, Duration::from_secs(60)).interval_us(),
            600_000
        );
        assert_eq!(
            RateSpec::per(7, Duration::from_secs(60)).interval_us(),
            8_571_429
        );
        assert_eq!(RateSpec::per(3, Duration::from_micros(1)).interval_us(), 1);
    }
}
