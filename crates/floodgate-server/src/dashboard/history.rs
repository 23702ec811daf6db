//! The bounded history each limiter keeps for the dashboard: 15 minutes at 1 s, so the charts
//! work with no Prometheus at all.
//!
//! A ring of run-length-encoded samples: a second identical to the one before only bumps a
//! count, so the thousands of idle limiters a fleet has cost a few dozen bytes each, while a
//! busy limiter's worst case is [`WINDOW_SECS`] entries of [`ENTRY_BYTES`] (about 43 KiB).

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// Seconds of history kept per limiter.
pub const WINDOW_SECS: u32 = 900;

/// One second of one limiter, as the charts draw it. `f32`/`u32` keep a sample small; `-1`
/// means "no value" (a rate-only limiter has no limit; a second without waits has no
/// percentile).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// Permits held at the end of the second.
    pub in_use: u32,
    /// The concurrency limit in force (adaptive moves it); -1: rate only.
    pub limit: i32,
    /// Acquires queued.
    pub waiting: u32,
    /// How long the oldest waiter had waited, in ms (0 when none).
    pub oldest_wait_ms: u32,
    /// Grants per second over the second(s) since the last sample.
    pub grants: f32,
    /// Acquires whose wait ended without a grant, per second.
    pub timeouts: f32,
    /// Wait p50 of the acquires this server answered in the second, ms; -1 when none.
    pub wait_p50_ms: f32,
    /// Wait p99 likewise.
    pub wait_p99_ms: f32,
    /// Throttle feedback reports in the second.
    pub throttles: u32,
    /// Moves of an adaptive limit in the second (up).
    pub limit_up: u16,
    /// Moves of an adaptive limit in the second (down).
    pub limit_down: u16,
    /// Rate tokens available now (the burst when caught up); -1 without a rate limit.
    pub rate_tokens: f32,
}

/// Bytes one ring entry takes (a sample and its repeat count), for the memory bound in the docs.
pub const ENTRY_BYTES: usize = std::mem::size_of::<(Sample, u16)>();

/// One limiter's history.
#[derive(Debug, Default)]
pub struct Ring {
    /// (sample, seconds it lasted), oldest first; the seconds add up to at most `WINDOW_SECS`.
    entries: VecDeque<(Sample, u16)>,
    /// Sum of the entries' seconds.
    seconds: u32,
    /// Unix time (s) of the newest second, so the charts put samples on a wall-clock axis.
    newest: u64,
}

impl Ring {
    /// Records `sample` as lasting `secs` seconds, ending at unix second `at`.
    pub fn push(&mut self, sample: Sample, secs: u32, at: u64) {
        let secs = secs.clamp(1, WINDOW_SECS);
        self.newest = at;
        match self.entries.back_mut() {
            Some((last, n)) if *last == sample && u32::from(*n) + secs <= u32::from(u16::MAX) => {
                *n += secs as u16;
            }
            _ => self.entries.push_back((sample, secs as u16)),
        }
        self.seconds += secs;
        while self.seconds > WINDOW_SECS {
            let excess = self.seconds - WINDOW_SECS;
            let Some((_, n)) = self.entries.front_mut() else {
                break;
            };
            if u32::from(*n) <= excess {
                self.seconds -= u32::from(*n);
                self.entries.pop_front();
            } else {
                *n -= excess as u16;
                self.seconds -= excess;
            }
        }
    }

    /// The newest sample.
    pub fn last(&self) -> Option<&Sample> {
        self.entries.back().map(|(s, _)| s)
    }

    /// Every second of the window, oldest first, with the unix second of the first.
    pub fn expand(&self) -> (u64, Vec<Sample>) {
        let mut out = Vec::with_capacity(self.seconds as usize);
        for (s, n) in &self.entries {
            out.extend(std::iter::repeat_n(*s, usize::from(*n)));
        }
        let start = self
            .newest
            .saturating_sub(u64::from(self.seconds.saturating_sub(1)));
        (start, out)
    }

    /// Entries held (each at most [`ENTRY_BYTES`]).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True before the first sample.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Wait times of the acquires this server answered, per limiter, since the last sample: a
/// log-scale histogram (4 buckets per doubling of microseconds) cheap enough for every acquire.
#[derive(Debug, Default)]
pub struct WaitLog {
    /// Per limiter, bucket counts; taken (and so reset) by the sampler each second.
    by_limiter: Mutex<std::collections::HashMap<String, Box<[u32; BUCKETS]>>>,
}

/// 4 buckets per doubling over 2^0..2^40 µs (a wait is at most an hour).
const BUCKETS: usize = 160;

fn bucket(micros: u64) -> usize {
    if micros == 0 {
        return 0;
    }
    let log2 = 63 - micros.leading_zeros() as usize;
    // The two bits below the leading one pick the quarter.
    let frac = if log2 >= 2 {
        ((micros >> (log2 - 2)) & 3) as usize
    } else {
        ((micros << (2 - log2)) & 3) as usize
    };
    (log2 * 4 + frac).min(BUCKETS - 1)
}

/// The upper edge of a bucket, in ms.
fn bucket_ms(i: usize) -> f32 {
    let log2 = i / 4;
    let frac = (i % 4) as f64;
    ((1u64 << log2) as f64 * (1.0 + (frac + 1.0) / 4.0) / 1000.0) as f32
}

impl WaitLog {
    /// Counts one acquire's wait.
    pub fn record(&self, limiter: &str, seconds: f64) {
        let micros = (seconds * 1e6).max(0.0) as u64;
        let mut map = self
            .by_limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(b) = map.get_mut(limiter) {
            b[bucket(micros)] += 1;
        } else {
            let mut b = Box::new([0u32; BUCKETS]);
            b[bucket(micros)] = 1;
            map.insert(limiter.to_owned(), b);
        }
    }

    /// Takes the waits recorded since the last call: (limiter, p50 ms, p99 ms).
    pub fn take(&self) -> Vec<(String, f32, f32)> {
        let map = std::mem::take(
            &mut *self
                .by_limiter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        map.into_iter()
            .map(|(name, b)| {
                let total: u64 = b.iter().map(|n| u64::from(*n)).sum();
                let at = |q: f64| {
                    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
                    let mut seen = 0u64;
                    for (i, n) in b.iter().enumerate() {
                        seen += u64::from(*n);
                        if seen >= rank {
                            return bucket_ms(i);
                        }
                    }
                    bucket_ms(BUCKETS - 1)
                };
                (name, at(0.5), at(0.99))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(in_use: u32) -> Sample {
        Sample {
            in_use,
            limit: 10,
            waiting: 0,
            oldest_wait_ms: 0,
            grants: 0.0,
            timeouts: 0.0,
            wait_p50_ms: -1.0,
            wait_p99_ms: -1.0,
            throttles: 0,
            limit_up: 0,
            limit_down: 0,
            rate_tokens: -1.0,
        }
    }

    #[test]
    fn an_entry_is_as_small_as_docs_dashboard_md_says() {
        assert_eq!(ENTRY_BYTES, 48);
    }

    #[test]
    fn idle_seconds_share_an_entry_and_the_window_is_bounded() {
        let mut ring = Ring::default();
        for t in 0..2_000u64 {
            ring.push(sample(1), 1, t);
        }
        assert_eq!(ring.len(), 1);
        let (start, all) = ring.expand();
        assert_eq!(all.len(), WINDOW_SECS as usize);
        assert_eq!(start, 1_999 - 899);
        for t in 2_000..4_000u64 {
            ring.push(sample((t % 7) as u32), 1, t);
        }
        assert_eq!(ring.len(), WINDOW_SECS as usize);
        let (_, all) = ring.expand();
        assert_eq!(all.len(), WINDOW_SECS as usize);
        assert_eq!(all.last().map(|s| s.in_use), Some((3_999 % 7) as u32));
        // A late tick covers the seconds it missed.
        ring.push(sample(9), 5, 4_005);
        let (_, all) = ring.expand();
        assert_eq!(all.len(), WINDOW_SECS as usize);
        assert!(all[all.len() - 5..].iter().all(|s| s.in_use == 9));
    }

    #[test]
    fn wait_percentiles_come_from_the_recorded_waits() {
        let log = WaitLog::default();
        for _ in 0..98 {
            log.record("a", 0.010);
        }
        log.record("a", 2.0);
        log.record("a", 2.0);
        let taken = log.take();
        assert_eq!(taken.len(), 1);
        let (_, p50, p99) = &taken[0];
        assert!((10.0..=12.5).contains(p50), "{p50}");
        assert!((2_000.0..=2_500.0).contains(p99), "{p99}");
        assert!(log.take().is_empty());
    }
}
