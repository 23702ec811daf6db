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

/// The monotonic clock at a lower cost per read than `std::time::Instant` (reads the CPU's
/// time-stamp counter where it can, calibrated against the OS clock), with tokio timers for
/// deadlines. It does not follow tokio's paused time: use [`TokioClock`] in tests. The server
/// uses this one; every acquire and release reads the clock once.
#[derive(Debug, Clone)]
pub struct FastClock {
    /// Timestamp zero, as the fast clock's raw counter: each read then costs one counter read
    /// and one scaling of the difference, not a scaled instant and a `Duration`.
    origin: u64,
    /// The fast clock itself (shares its calibration).
    clock: quanta::Clock,
}

impl FastClock {
    /// A clock whose zero is now.
    pub fn new() -> Self {
        let clock = quanta::Clock::new();
        FastClock {
            origin: clock.raw(),
            clock,
        }
    }
}

impl Default for FastClock {
    fn default() -> Self {
        FastClock::new()
    }
}

impl Clock for FastClock {
    fn now(&self) -> Timestamp {
        // Zero if the counter reads below the origin (another core's counter lagging), as
        // `saturating_duration_since` did.
        Timestamp(self.clock.delta_as_nanos(self.origin, self.clock.raw()) / 1000)
    }

    fn instant_at(&self, at: Timestamp) -> tokio::time::Instant {
        // Relative to now on both clocks, so a slow drift between the time-stamp counter and
        // the OS clock never accumulates into a timer that fires before its deadline.
        let max = Duration::from_secs(100 * 365 * 24 * 3600);
        tokio::time::Instant::now() + at.since(self.now()).min(max)
    }
}

/// The fast monotonic clock, with timestamps that mean wall-clock microseconds since the Unix
/// epoch at start and never go below a floor: the durable embedded store's clock.
///
/// Lease deadlines written to disk are on this clock, so after a restart a lease that ended
/// while the server was down is reclaimed at once, and one still running keeps its remaining
/// time. Started [`not_before`](Self::not_before) the last timestamp the store recorded, it
/// never runs backwards across a restart, even when the machine's wall clock was set back: the
/// downtime then counts as zero (leases last longer, never shorter), and no restored deadline
/// or rate debt lies further ahead than it did at the crash.
#[derive(Debug, Clone)]
pub struct WallClock {
    /// Timestamp of `start`: wall-clock micros at creation, or the floor if that was later.
    origin_us: u64,
    /// The fast clock's raw counter at creation.
    start: u64,
    /// The fast clock itself.
    clock: quanta::Clock,
}

impl WallClock {
    /// A clock reading the wall-clock time now.
    pub fn new() -> Self {
        WallClock::not_before(Timestamp(0))
    }

    /// A clock reading the wall-clock time, or `floor` if the wall clock is behind it.
    pub fn not_before(floor: Timestamp) -> Self {
        WallClock::starting_at(Timestamp(token_seed().max(floor.0)))
    }

    /// A clock that reads `at` now and runs on from there.
    pub fn starting_at(at: Timestamp) -> Self {
        let clock = quanta::Clock::new();
        WallClock {
            origin_us: at.0,
            start: clock.raw(),
            clock,
        }
    }
}

impl Default for WallClock {
    fn default() -> Self {
        WallClock::new()
    }
}

impl Clock for WallClock {
    fn now(&self) -> Timestamp {
        let micros = self.clock.delta_as_nanos(self.start, self.clock.raw()) / 1000;
        Timestamp(self.origin_us.saturating_add(micros))
    }

    fn instant_at(&self, at: Timestamp) -> tokio::time::Instant {
        let max = Duration::from_secs(100 * 365 * 24 * 3600);
        tokio::time::Instant::now() + at.since(self.now()).min(max)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AcquireOptions, Floodgate, LimiterSpec, MemoryStore};

    #[test]
    fn the_wall_clock_never_reads_below_its_floor() {
        let wall = WallClock::new().now();
        let ahead = Timestamp(wall.0 + 3_600_000_000);
        let clock = WallClock::not_before(ahead);
        assert!(clock.now() >= ahead);
        assert!(WallClock::not_before(Timestamp(5)).now() >= wall);
    }

    #[test]
    fn the_fast_clock_is_monotonic_and_maps_deadlines_ahead() {
        let clock = FastClock::new();
        let a = clock.now();
        let b = clock.now();
        assert!(b >= a);
        let at = clock.instant_at(a.after(Duration::from_secs(60)));
        assert!(at > tokio::time::Instant::now() + Duration::from_secs(50));
        // A deadline already passed maps to now: the timer fires at once.
        assert!(clock.instant_at(Timestamp(0)) <= tokio::time::Instant::now());
    }

    /// The server's store: an abandoned lease is reclaimed by the timer on the fast clock.
    #[tokio::test]
    async fn a_store_on_the_fast_clock_reclaims_an_expired_lease() {
        let gate = Floodgate::with_store(MemoryStore::with_clock(FastClock::new()));
        let spec = LimiterSpec::concurrency(1).with_max_wait(Duration::from_secs(10));
        gate.define("fast", spec).await.expect("define");
        let lim = gate.limiter("fast").await.expect("limiter");
        let options = AcquireOptions::new().lease(Duration::from_millis(30));
        let abandoned = lim.acquire(options.clone()).await.expect("first").detach();
        let next = lim
            .acquire(options)
            .await
            .expect("granted after the lease ends");
        assert!(next.fencing_token() > abandoned.token);
        assert_eq!(lim.status().await.expect("status").counters.expired, 1);
    }
}
