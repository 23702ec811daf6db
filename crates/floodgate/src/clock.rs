//! Where time comes from.
//!
//! The state machine never reads a clock; stores pass it `now`. The embedded store reads an
//! injected [`Clock`], so tests run it under tokio's paused time and skip hours in
//! microseconds of wall time.

use std::time::Duration;

use crate::types::Timestamp;

/// A monotonic clock that can also arm tokio timers for its own timestamps.
pub trait Clock: Clone + Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
    /// The tokio instant at which this clock will read `at`, for arming a timer.
    fn instant_at(&self, at: Timestamp) -> tokio::time::Instant;
}

/// Time from `tokio::time::Instant`, so it follows tokio's paused and advanced time in tests
/// and the monotonic clock in production.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    /// Timestamp zero. Timestamps are small numbers relative to it, not wall-clock time.
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose zero is now. Under a paused tokio runtime, create it inside the runtime.
    pub fn new() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        let micros = self.origin.elapsed().as_micros();
        Timestamp(u64::try_from(micros).unwrap_or(u64::MAX))
    }

    fn instant_at(&self, at: Timestamp) -> tokio::time::Instant {
        // Timers further out than a century are as good as never.
        let max = Duration::from_secs(100 * 365 * 24 * 3600);
        self.origin + Duration::from_micros(at.0).min(max)
    }
}

/// Wall-clock microseconds since the Unix epoch, used only to seed fencing tokens so they keep
/// increasing across re-creations of a limiter and restarts of the embedded store.
pub(crate) fn token_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
        .unwrap_or(1)
}
