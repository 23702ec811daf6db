//! The work to do, drawn once per seed so every strategy faces the same queries.

use super::rng::Rng;
use super::{orgs, Config, Scenario, MAX_QUERIES};

/// Most query tasks one organization starts.
const MAX_QUERIES_PER_ORG: u32 = 100;

/// Organizations, their query tasks ("units"), each unit's backend time and crash mark.
#[derive(Debug, Clone)]
pub(crate) struct Workload {
    /// `first[o]..first[o + 1]` are organization `o`'s units.
    first: Vec<u32>,
    /// Backend time of each unit's query, in µs.
    pub(crate) duration_us: Vec<u64>,
    /// Whether the worker dies right after this unit's query, holding its permit.
    pub(crate) crash: Vec<bool>,
    /// Each unit's organization, for the per-organization figures and the keyed limiter.
    pub(crate) org: Vec<u32>,
}

impl Workload {
    /// Draws the workload; refuses one of more than [`MAX_QUERIES`] query tasks (the `orgs`
    /// scenario's sizes are known only once drawn) before it takes the memory.
    pub(crate) fn generate(cfg: &Config) -> Result<Self, String> {
        let mut rng = Rng::stream(cfg.seed, 0);
        let extra_mean = cfg.queries_per_org - 1.0;
        // Geometric number of extra chunks: failures before the first success of p.
        let p = 1.0 / (1.0 + extra_mean);
        let median_s = cfg.query_median.as_secs_f64();
        let cut_us = u64::try_from(cfg.model.query_timeout.as_micros()).unwrap_or(u64::MAX);
        let mut first = Vec::with_capacity(cfg.orgs as usize + 1);
        let mut duration_us = Vec::new();
        let mut crash = Vec::new();
        let mut org = Vec::new();
        let mut next = 0u32;
        for o in 0..cfg.orgs {
            first.push(next);
            let n = match cfg.scenario {
                Scenario::Incident => {
                    let mut n = 1;
                    while n < MAX_QUERIES_PER_ORG && rng.f64() >= p {
                        n += 1;
                    }
                    n
                }
                Scenario::Orgs => orgs::org_size(rng.f64()),
            };
            for _ in 0..n {
                let secs = rng.lognormal(median_s, cfg.query_sigma);
                let us = (secs * 1e6).round().clamp(1_000.0, cut_us as f64) as u64;
                duration_us.push(us);
                // Always drawn, so the durations do not depend on the crash fraction.
                crash.push(rng.f64() < cfg.crash_fraction);
                org.push(o);
            }
            next += n;
            if next > MAX_QUERIES {
                return Err(format!(
                    "orgs: {} organizations make more than {MAX_QUERIES} query tasks; \
                     simulate fewer",
                    cfg.orgs
                ));
            }
        }
        first.push(next);
        Ok(Workload {
            first,
            duration_us,
            crash,
            org,
        })
    }

    /// Organization `org`'s units.
    pub(crate) fn units_of(&self, org: u32) -> std::ops::Range<u32> {
        let o = org as usize;
        self.first[o]..self.first[o + 1]
    }

    /// Number of organizations.
    pub(crate) fn orgs(&self) -> u32 {
        u32::try_from(self.first.len().saturating_sub(1)).unwrap_or(u32::MAX)
    }

    /// Number of units in all.
    pub(crate) fn units(&self) -> usize {
        self.duration_us.len()
    }

    /// Sum of every unit's backend time, in µs.
    pub(crate) fn total_query_us(&self) -> u64 {
        self.duration_us.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_queries_per_org_and_crash_fraction_do_not_move_durations() {
        let cfg = Config {
            orgs: 20_000,
            ..Config::default()
        };
        let wl = Workload::generate(&cfg).expect("a small workload");
        let mean = wl.units() as f64 / 20_000.0;
        assert!((mean - 2.0).abs() < 0.05, "mean {mean}");
        let crashy = Workload::generate(&Config {
            crash_fraction: 0.5,
            ..cfg
        })
        .expect("a small workload");
        assert_eq!(wl.duration_us, crashy.duration_us);
        let crashed = crashy.crash.iter().filter(|c| **c).count() as f64 / wl.units() as f64;
        assert!((crashed - 0.5).abs() < 0.02, "crashed {crashed}");
        assert!(wl
            .duration_us
            .iter()
            .all(|d| (1_000..=30_000_000).contains(d)));
    }
}
