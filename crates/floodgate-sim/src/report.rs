//! What a simulation reports, as data (for `--json`) and as a table.

use std::fmt::Write as _;

use serde::Serialize;

use super::Strategy;

/// The whole run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The workload's shape.
    pub scenario: super::Scenario,
    /// Organizations.
    pub orgs: u32,
    /// Query tasks planned (one query each).
    pub queries: u64,
    /// Backend time of all planned queries, in seconds.
    pub total_query_s: f64,
    /// The longest query, in seconds. No schedule ends sooner than `max(total_query_s /
    /// limit, longest_query_s)`; a scheduler that never idles a slot while work waits ends
    /// before `total_query_s / limit + longest_query_s` (Graham's list-scheduling bound).
    pub longest_query_s: f64,
    /// Worker pool size.
    pub workers: u32,
    /// Concurrent queries the backend admits.
    pub backend_limit: u32,
    /// The limit given to `seed-counter` and `floodgate`.
    pub limit: u32,
    /// Fraction of query tasks that crash holding a permit.
    pub crash_fraction: f64,
    /// One entry per strategy, in the order run.
    pub strategies: Vec<StrategyReport>,
}

/// One strategy's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StrategyReport {
    /// Which strategy.
    pub strategy: Strategy,
    /// Most queries the backend held at once, counting those being rejected (what Snuba
    /// reports: 159 in the incident).
    pub peak_concurrency: u32,
    /// Most queries running (admitted) at once.
    pub peak_running: u32,
    /// Queries sent to the backend, including rejected ones and reruns.
    pub query_attempts: u64,
    /// Queries the backend rejected with RateLimitExceeded.
    pub rejected: u64,
    /// Planned queries that completed at least once.
    pub completed: u64,
    /// Planned queries that never completed: the sum of the five `lost_*` below.
    pub lost: u64,
    /// Lost because the task gave up waiting and skipped the work.
    pub lost_skipped: u64,
    /// Lost because the task failed on its last allowed execution.
    pub lost_failed: u64,
    /// Lost because the task was killed at its deadline on its last allowed execution.
    pub lost_killed: u64,
    /// Lost because the task was never started (its parent was killed first).
    pub lost_never_spawned: u64,
    /// Still queued, waiting or running, with executions left, when the simulated time ran
    /// out ([`Model::horizon`](super::Model::horizon)): not done, not given up either.
    pub lost_unfinished: u64,
    /// When the last task ended, in seconds from the batch task's start.
    pub makespan_s: f64,
    /// The limit the ideal makespan assumes.
    pub ideal_limit: u32,
    /// Total query time / `ideal_limit`, in seconds.
    pub ideal_s: f64,
    /// `makespan_s / ideal_s`.
    pub makespan_ratio: f64,
    /// Median wait from a query task's creation to the start of its successful query, in
    /// seconds (completed queries only; `None` if none completed).
    pub wait_p50_s: Option<f64>,
    /// 99th percentile of that wait.
    pub wait_p99_s: Option<f64>,
    /// Worker-seconds spent sleeping, polling or blocked waiting for a permit.
    pub idle_worker_s: f64,
    /// Task executions re-queued by the task system's `Retry` policy.
    pub task_retries: u64,
    /// Task executions killed at their processing deadline.
    pub deadline_kills: u64,
    /// Workers that died holding a permit (`--crash-fraction`).
    pub crashed: u64,
    /// `seed-counter`'s cache key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counter: Option<CounterStats>,
    /// The Floodgate limiter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limiter: Option<LimiterStats>,
    /// Per-organization figures (the `orgs` scenario).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orgs: Option<super::OrgStats>,
}

/// What happened to `seed-counter`'s key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CounterStats {
    /// Times `add` created the key (the first time and after each expiry).
    pub key_created: u64,
    /// Times the TTL lapsed, resetting the count under running holders.
    pub ttl_expiries: u64,
    /// `incr`s that went past the limit and were not undone.
    pub overshoots: u64,
    /// `incr`/`decr` of a key that had just expired: a `ValueError` that fails the task.
    pub cache_errors: u64,
    /// Lowest value the key held (negative: releases not checked against holders).
    pub min_value: i64,
    /// Highest value the key held.
    pub max_value: i64,
    /// The value left at the end, if the key still exists (slots counted but not held).
    pub final_value: Option<i64>,
}

/// What happened in the Floodgate limiter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimiterStats {
    /// Permits granted.
    pub granted: u64,
    /// Permits reclaimed at the end of their lease (crashed or killed holders).
    pub lease_expiries: u64,
    /// Acquires that ended without a permit (the wait ran out, or a try-once found none),
    /// each re-enqueued with its `retry_after`.
    pub wait_timeouts: u64,
    /// Lease extensions (heartbeats) by holders whose query outlasted a third of the lease.
    pub extends: u64,
    /// Extensions that found the permit already lost.
    pub extend_lost: u64,
    /// The limit in force at the end.
    pub final_limit: u32,
    /// Lowest limit in force.
    pub min_limit: u32,
    /// Highest limit in force.
    pub max_limit: u32,
    /// Times the adaptive limit went down.
    pub decreases: u64,
    /// Times the adaptive limit went up.
    pub increases: u64,
}

/// `1234.5` s as `20m34s`, `59.0` s as `59.0s`. Rounded to the unit shown before it is split,
/// so 179.6 s reads `3m00s` (not `2m60s`) and 59.97 s `1m00s` (not `60.0s`).
pub(crate) fn fmt_secs(s: f64) -> String {
    let tenths = (s * 10.0).round();
    let secs = s.round();
    if tenths < 600.0 {
        format!("{:.1}s", tenths / 10.0)
    } else if secs < 3600.0 {
        format!(
            "{}m{:02}s",
            (secs / 60.0).floor() as u64,
            (secs % 60.0) as u64
        )
    } else {
        let mins = (s / 60.0).round();
        format!(
            "{}h{:02}m",
            (mins / 60.0).floor() as u64,
            (mins % 60.0) as u64
        )
    }
}

fn opt_secs(s: Option<f64>) -> String {
    s.map_or_else(|| "-".to_string(), fmt_secs)
}

impl Report {
    /// The report as a text table, with a line of details per strategy below it.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "seed {}: {} organizations, {} queries ({:.0} query-seconds), {} workers, \
             backend limit {}, limit {}{}",
            self.seed,
            self.orgs,
            self.queries,
            self.total_query_s,
            self.workers,
            self.backend_limit,
            self.limit,
            if self.crash_fraction > 0.0 {
                format!(", crash fraction {}", self.crash_fraction)
            } else {
                String::new()
            }
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<19} {:>5} {:>8} {:>7} {:>6} {:>9} {:>13} {:>9} {:>9} {:>10}",
            "STRATEGY",
            "PEAK",
            "REJECTED",
            "LOST",
            "LOST%",
            "MAKESPAN",
            "VS IDEAL",
            "WAIT P50",
            "WAIT P99",
            "IDLE W·S"
        );
        for s in &self.strategies {
            let lost_pct = if self.queries == 0 {
                0.0
            } else {
                100.0 * s.lost as f64 / self.queries as f64
            };
            let _ = writeln!(
                out,
                "{:<19} {:>5} {:>8} {:>7} {:>5.1}% {:>9} {:>13} {:>9} {:>9} {:>10.0}",
                s.strategy.name(),
                s.peak_concurrency,
                s.rejected,
                s.lost,
                lost_pct,
                fmt_secs(s.makespan_s),
                format!("{:.2}x (/{})", s.makespan_ratio, s.ideal_limit),
                opt_secs(s.wait_p50_s),
                opt_secs(s.wait_p99_s),
                s.idle_worker_s,
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "PEAK: most queries the backend held at once (admitted or being rejected); \
             VS IDEAL: makespan / (query time x slowdown at the limit / limit)."
        );
        let _ = writeln!(
            out,
            "LOST = skipped + failed after retries + killed at deadline + never started. \
             WAIT: task creation to query start."
        );
        for s in &self.strategies {
            let _ = write!(
                out,
                "  {:<19} lost {}/{}/{}/{}; {} attempts, peak running {}, {} retries, {} kills",
                s.strategy.name(),
                s.lost_skipped,
                s.lost_failed,
                s.lost_killed,
                s.lost_never_spawned,
                s.query_attempts,
                s.peak_running,
                s.task_retries,
                s.deadline_kills,
            );
            if s.lost_unfinished > 0 {
                let _ = write!(
                    out,
                    ", {} more lost unfinished when simulated time ran out",
                    s.lost_unfinished
                );
            }
            if s.crashed > 0 {
                let _ = write!(out, ", {} crashed holding a permit", s.crashed);
            }
            if let Some(c) = &s.counter {
                let _ = write!(
                    out,
                    "; counter: {} TTL resets, {} overshoots, {} cache errors, range {}..{}, \
                     left at {}",
                    c.ttl_expiries,
                    c.overshoots,
                    c.cache_errors,
                    c.min_value,
                    c.max_value,
                    c.final_value
                        .map_or_else(|| "(expired)".to_string(), |v| v.to_string())
                );
            }
            if let Some(l) = &s.limiter {
                let _ = write!(
                    out,
                    "; limiter: {} granted, {} lease expiries, {} wait timeouts re-enqueued",
                    l.granted, l.lease_expiries, l.wait_timeouts
                );
                if l.extends + l.extend_lost > 0 {
                    let _ = write!(
                        out,
                        ", {} extends ({} found the permit lost)",
                        l.extends, l.extend_lost
                    );
                }
                if l.decreases + l.increases > 0 {
                    let _ = write!(
                        out,
                        ", limit {}..{} (final {}, {} down, {} up)",
                        l.min_limit, l.max_limit, l.final_limit, l.decreases, l.increases
                    );
                }
            }
            let _ = writeln!(out);
        }
        self.org_table(&mut out);
        out
    }

    /// The `orgs` scenario's per-organization table, below the main one.
    fn org_table(&self, out: &mut String) {
        let Some(first) = self.strategies.iter().find_map(|s| s.orgs.as_ref()) else {
            return;
        };
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{} small organizations (<= {} queries), {} large (>= {}):",
            first.small_orgs,
            super::SMALL_ORG_QUERIES,
            first.large_orgs,
            super::LARGE_ORG_QUERIES
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<19} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11}",
            "STRATEGY",
            "SMALL P50",
            "SMALL MAX",
            "LARGE P50",
            "LARGE MAX",
            "S.WAIT 50",
            "S.WAIT 99",
            "JAIN"
        );
        for s in &self.strategies {
            let Some(o) = &s.orgs else {
                continue;
            };
            let done = |v: Option<f64>, incomplete: u32| {
                if incomplete > 0 {
                    format!("{incomplete} lost")
                } else {
                    opt_secs(v)
                }
            };
            let jain = match (o.jain_mean, o.jain_min) {
                (Some(mean), Some(min)) => format!("{mean:.3} {min:.2}"),
                _ => "-".to_string(),
            };
            let _ = writeln!(
                out,
                "{:<19} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11}",
                s.strategy.name(),
                opt_secs(o.small_done_p50_s),
                done(o.small_done_max_s, o.small_incomplete),
                opt_secs(o.large_done_p50_s),
                done(o.large_done_max_s, o.large_incomplete),
                opt_secs(o.small_wait_p50_s),
                opt_secs(o.small_wait_p99_s),
                jain,
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "SMALL/LARGE: when an organization's last query ended (P50, MAX; \"N lost\": N \
             organizations lost work). S.WAIT: small organizations' query waits."
        );
        let _ = writeln!(
            out,
            "JAIN: Jain's index of queries started per organization in {} s windows, over the \
             organizations backlogged at the gate all window (mean, lowest).",
            super::JAIN_WINDOW.as_secs()
        );
        let _ = writeln!(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_read_naturally() {
        assert_eq!(fmt_secs(5.04), "5.0s");
        assert_eq!(fmt_secs(754.0), "12m34s");
        assert_eq!(fmt_secs(7260.0), "2h01m");
        assert_eq!(fmt_secs(179.6), "3m00s");
        assert_eq!(fmt_secs(59.97), "1m00s");
        assert_eq!(fmt_secs(3599.7), "1h00m");
        assert_eq!(fmt_secs(7199.0), "2h00m");
    }
}
