//! The backend under load: latency that rises with concurrency before it throttles, a
//! capacity that may change mid-run, and the ideal makespan such a backend allows.
//!
//! Up to [`Model::knee`] of its capacity (75 %) a query takes its own time; past the knee every
//! query admitted is slowed by contention, linearly, to [`Model::slowdown_at_capacity`]
//! (1.25x) when the backend runs exactly its capacity: `latency = duration × (1 + (s − 1) ×
//! max(0, n/C − knee) / (1 − knee))`, with `n` the queries it counts (this one included) when
//! it arrives. A query keeps the pace it started with. Throughput `n / latency` still rises up
//! to the capacity (the slowdown stays below `1 / knee`), so the best a client can do is keep
//! the backend at exactly its capacity; past it the backend throttles as before.
//!
//! The ideal makespan of a strategy that may use the backend's capacity is the time to run
//! every query at that best throughput: `C / s` query-seconds per second, following the
//! capacity when it changes; for `floodgate` it is measured at its own limit `L` below the
//! capacity (`L / slowdown(L / C)`).

use super::{Config, Model};

/// The slowdown of a query admitted with `n` counted out of `capacity`.
pub(crate) fn slowdown(m: &Model, n: u32, capacity: u32) -> f64 {
    let u = f64::from(n) / f64::from(capacity.max(1));
    let knee = m.knee.clamp(0.0, 0.999);
    1.0 + (m.slowdown_at_capacity - 1.0) * ((u - knee).max(0.0) / (1.0 - knee)).min(1.0)
}

/// Seconds to run `work_s` query-seconds holding `limit` (or the capacity, if lower) at the
/// backend at every moment, the capacity following `cfg.capacity_change`.
pub(crate) fn ideal_s(cfg: &Config, work_s: f64, limit: Option<u32>) -> f64 {
    let rate = |capacity: u32| {
        let n = limit.map_or(capacity, |l| l.min(capacity));
        f64::from(n) / slowdown(&cfg.model, n, capacity)
    };
    let first = rate(cfg.backend_limit);
    match cfg.capacity_change {
        Some((at, c)) => {
            let at_s = at.as_secs_f64();
            if work_s <= first * at_s {
                work_s / first
            } else {
                at_s + (work_s - first * at_s) / rate(c)
            }
        }
        None => work_s / first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latency_rises_past_the_knee_and_throughput_still_peaks_at_capacity() {
        let m = Model::default();
        assert_eq!(slowdown(&m, 50, 100), 1.0);
        assert_eq!(slowdown(&m, 75, 100), 1.0);
        assert!((slowdown(&m, 100, 100) - m.slowdown_at_capacity).abs() < 1e-12);
        assert!(slowdown(&m, 90, 100) > 1.0);
        let throughput = |n: u32| f64::from(n) / slowdown(&m, n, 100);
        for n in 1..100 {
            assert!(throughput(n + 1) > throughput(n), "at {n}");
        }
    }

    #[test]
    fn the_ideal_follows_a_capacity_change() {
        let cfg = Config {
            capacity_change: Some((Duration::from_secs(100), 50)),
            ..Config::default()
        };
        let s = cfg.model.slowdown_at_capacity;
        // 100 s at 100/s then the rest at 50/s.
        let work = 100.0 * 100.0 / s + 1000.0 / s;
        assert!((ideal_s(&cfg, work, None) - 120.0).abs() < 1e-9);
        assert!((ideal_s(&cfg, 10.0 / s, None) - 0.1).abs() < 1e-9);
    }
}
