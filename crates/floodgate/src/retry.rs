//! Retrying a throttled backend call: exponential backoff with full jitter, a cap, a maximum
//! number of attempts, and the backend's `Retry-After` honoured.
//!
//! Use it around the protected call itself (the query that answered RateLimitExceeded or 429),
//! after reporting the throttle with [`LimiterBackend::feedback`](crate::LimiterBackend), and
//! without holding a permit while sleeping: release, back off, acquire again. In a task system
//! prefer re-enqueueing the task with a countdown over sleeping in a worker.
//!
//! ```
//! use std::time::Duration;
//! use floodgate::retry::{retry, Backoff, Decision};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut calls = 0;
//! let result: Result<&str, &str> = retry(
//!     &Backoff::default().with_base(Duration::from_millis(1)),
//!     || {
//!         calls += 1;
//!         let n = calls;
//!         async move { if n < 3 { Err("throttled") } else { Ok("rows") } }
//!     },
//!     |e| if *e == "throttled" { Decision::Retry } else { Decision::Stop },
//! )
//! .await;
//! assert_eq!(result, Ok("rows"));
//! # }
//! ```

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Retry after the backoff delay.
    Retry,
    /// Retry no sooner than this (the backend's `Retry-After`), plus a little jitter.
    RetryAfter(Duration),
    /// Give up: the error is not one a retry can fix.
    Stop,
}

/// The retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first backoff ceiling; attempt n waits up to `base * 2^n`.
    pub base: Duration,
    /// Largest backoff ceiling.
    pub cap: Duration,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
}

impl Default for Backoff {
    /// 100 ms, doubling to at most 30 s, 5 attempts.
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(30),
            max_attempts: 5,
        }
    }
}

impl Backoff {
    /// Sets the base.
    pub fn with_base(mut self, base: Duration) -> Self {
        self.base = base;
        self
    }

    /// Sets the cap.
    pub fn with_cap(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }

    /// Sets the number of attempts.
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// The delay after failed attempt `attempt` (0-based), for a uniform `unit` in [0, 1).
    /// Full jitter: uniform in [0, min(cap, base * 2^attempt)). With a `Retry-After`, that
    /// long plus jitter up to `base`, so clients told the same time do not return together.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        match retry_after {
            Some(after) => after + self.base.mul_f64(unit),
            None => {
                let ceiling = self
                    .base
                    .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
                    .unwrap_or(self.cap)
                    .min(self.cap);
                ceiling.mul_f64(unit)
            }
        }
    }
}

/// A uniform number in [0, 1) from a small per-process generator (splitmix64); jitter needs
/// spread, not cryptographic strength.
fn unit() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut seed = STATE.load(Ordering::Relaxed);
    if seed == 0 {
        seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15)
            | 1;
    }
    let next = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    STATE.store(next, Ordering::Relaxed);
    let mut z = next;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Runs `op` until it succeeds, `classify` says stop, or `max_attempts` are used; sleeps
/// between attempts as the policy says. Returns the last error when it gives up.
///
/// # Errors
///
/// The last attempt's error, when `classify` says [`Decision::Stop`] or the attempts are used.
///
/// # Cancel safety
///
/// Dropping the future stops retrying: an attempt in flight is dropped with it (as cancel-safe
/// as `op`'s own future), and no further attempt starts.
///
/// ```
/// use std::time::Duration;
/// use floodgate::retry::{retry, Backoff, Decision};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let policy = Backoff::default().with_base(Duration::from_millis(1));
/// let fails: Result<(), &str> =
///     retry(&policy, || async { Err("bad request") }, |_| Decision::Stop).await;
/// assert_eq!(fails, Err("bad request")); // not retried: classify said stop
/// # }
/// ```
pub async fn retry<T, E, F, Fut>(
    policy: &Backoff,
    mut op: F,
    classify: impl Fn(&E) -> Decision,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        let error = match op().await {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        attempt += 1;
        let after = match classify(&error) {
            Decision::Stop => return Err(error),
            Decision::Retry => None,
            Decision::RetryAfter(d) => Some(d),
        };
        if attempt >= policy.max_attempts {
            return Err(error);
        }
        tokio::time::sleep(policy.delay(attempt - 1, after, unit())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_full_jitter() {
        let p = Backoff::default()
            .with_base(Duration::from_millis(100))
            .with_cap(Duration::from_secs(1));
        assert_eq!(p.delay(0, None, 0.0), Duration::ZERO);
        assert_eq!(p.delay(0, None, 0.5), Duration::from_millis(50));
        assert_eq!(p.delay(3, None, 0.5), Duration::from_millis(400));
        assert_eq!(p.delay(10, None, 0.5), Duration::from_millis(500), "capped");
        assert_eq!(
            p.delay(200, None, 0.999_999),
            Duration::from_secs(1).mul_f64(0.999_999)
        );
        for _ in 0..1000 {
            let u = unit();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn retry_after_is_honoured() {
        let p = Backoff::default();
        let d = p.delay(0, Some(Duration::from_secs(7)), 0.5);
        assert_eq!(d, Duration::from_secs(7) + Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn stops_after_max_attempts_and_on_stop() {
        let mut calls = 0;
        let r: Result<(), &str> = retry(
            &Backoff::default().with_max_attempts(4),
            || {
                calls += 1;
                async { Err("throttled") }
            },
            |_| Decision::Retry,
        )
        .await;
        assert_eq!((r, calls), (Err("throttled"), 4));
        let mut calls = 0;
        let r: Result<(), &str> = retry(
            &Backoff::default(),
            || {
                calls += 1;
                async { Err("bad request") }
            },
            |_| Decision::Stop,
        )
        .await;
        assert_eq!((r, calls), (Err("bad request"), 1));
    }

    #[tokio::test(start_paused = true)]
    async fn waits_at_least_the_retry_after() {
        let start = tokio::time::Instant::now();
        let mut calls = 0;
        let r: Result<u32, &str> = retry(
            &Backoff::default(),
            || {
                calls += 1;
                let n = calls;
                async move {
                    if n == 1 {
                        Err("429")
                    } else {
                        Ok(n)
                    }
                }
            },
            |_| Decision::RetryAfter(Duration::from_secs(3)),
        )
        .await;
        assert_eq!(r, Ok(2));
        assert!(start.elapsed() >= Duration::from_secs(3));
    }
}
