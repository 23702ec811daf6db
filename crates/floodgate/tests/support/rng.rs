//! The tests' deterministic generators, so a failing seed can be replayed: one definition
//! shared by the integration tests instead of a copy in each. Two algorithms, the ones the
//! tests were written with, so every test's seeds still give the sequences they gave:
//! [`Rng`] (SplitMix64) and [`XorShift`] (xorshift64, shifts 13, 7, 17). The durable store's
//! unit test keeps its own copy of the latter (a `cfg(test)` item of the library cannot be
//! shared with integration tests, nor these with it).

use std::time::Duration;

/// A random sequence's seed: environment variable `var` when set (to replay a failure), else
/// the clock's nanoseconds. The caller prints it.
pub(crate) fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// SplitMix64: tiny, seedable, good enough to pick plans; any seed works, zero included.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    /// The next draw.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (up to a modulo bias no test cares about).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// Uniform in `lo..=hi` milliseconds.
    pub(crate) fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    /// Uniform in `lo..=hi` microseconds.
    pub(crate) fn micros(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_micros(self.range(lo, hi))
    }
}

/// xorshift64 (Marsaglia's 13, 7, 17). A zero state stays zero: seed it odd.
pub(crate) struct XorShift(pub(crate) u64);

impl XorShift {
    /// The next draw.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `0..n` (up to a modulo bias no test cares about).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
