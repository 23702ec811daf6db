//! What a limiter is configured to allow.

use std::time::Duration;

/// Largest concurrency a limiter accepts.
pub const MAX_CONCURRENCY: u32 = 1_000_000;
/// Longest lease a permit can be granted or extended for. Longer than any sane unit of work;
/// anything beyond it is a unit mistake (seconds sent as milliseconds, say).
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);
/// Longest a single acquire may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Largest queue a limiter accepts.
pub const MAX_QUEUE: u32 = 1_000_000;

/// A limiter's configuration.
///
/// Room is left for rate limits: a later field (`rate`) joins `concurrency` in the same spec, and
/// one acquire waits for both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimiterSpec {
    /// Permits out at once, at least 1.
    pub concurrency: u32,
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
            concurrency: 1,
            default_lease: Duration::from_secs(300),
            max_wait: Duration::from_secs(60),
            max_queue: 10_000,
        }
    }
}

/// A spec or request field that is out of range. `field` names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    /// The field at fault, as named in the HTTP API (`concurrency`, `lease_ms`, ...).
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
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
    if lease < Duration::from_millis(1) {
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
            concurrency,
            ..LimiterSpec::default()
        }
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
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            return Err(InvalidField::new(
                "concurrency",
                format!("must be from 1 to {MAX_CONCURRENCY}"),
            ));
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
    }
}
