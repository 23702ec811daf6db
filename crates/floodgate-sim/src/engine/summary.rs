//! The run's figures, once every task has ended.

use super::*;

impl Sim<'_> {
    pub(super) fn into_report(self) -> (StrategyReport, Trace) {
        let (mut skipped, mut failed, mut killed, mut never, mut unfinished) = (0, 0, 0, 0, 0);
        let mut waits = Vec::new();
        for unit in &self.units {
            if unit.done {
                waits.extend(unit.wait);
                continue;
            }
            match (unit.spawned, unit.loss) {
                (false, _) => never += 1,
                (true, Some(Loss::Skipped)) => skipped += 1,
                (true, Some(Loss::Killed)) => killed += 1,
                (true, Some(Loss::Failed)) => failed += 1,
                // Its task had executions left (a loss is recorded only on the last).
                (true, None) => unfinished += 1,
            }
        }
        waits.sort_unstable();
        let pct = |q: f64| -> Option<f64> {
            if waits.is_empty() {
                return None;
            }
            let rank = ((q * waits.len() as f64).ceil() as usize).clamp(1, waits.len());
            Some(waits[rank - 1] as f64 / 1e6)
        };
        let ideal_limit = self.cfg.ideal_limit(self.strategy);
        let own_limit = matches!(
            self.strategy,
            Strategy::Floodgate | Strategy::FloodgateKeyed
        )
        .then_some(self.cfg.limit);
        let ideal_s = loaded::ideal_s(self.cfg, self.wl.total_query_us() as f64 / 1e6, own_limit);
        let makespan_s = self.stats.last_end as f64 / 1e6;
        let counter = (self.strategy == Strategy::SeedCounter).then(|| CounterStats {
            key_created: self.cache.created,
            ttl_expiries: self.cache.expired,
            overshoots: self.stats.overshoots,
            cache_errors: self.stats.cache_errors,
            min_value: self.cache.min,
            max_value: self.cache.max,
            final_value: self.cache.peek(self.stats.last_end),
        });
        let limiter = self.limiter.as_ref().map(|core| {
            let c = core.counters();
            let limits = self.limit_series.iter().map(|(_, l)| *l);
            LimiterStats {
                granted: c.granted,
                lease_expiries: c.expired,
                wait_timeouts: self.stats.wait_timeouts,
                extends: self.stats.extends,
                extend_lost: self.stats.extend_lost,
                final_limit: self.limit_series.last().map_or(self.cfg.limit, |(_, l)| *l),
                min_limit: limits.clone().min().unwrap_or(self.cfg.limit),
                max_limit: limits.max().unwrap_or(self.cfg.limit),
                decreases: c.limit_decreases,
                increases: c.limit_increases,
            }
        });
        let lost = skipped + failed + killed + never + unfinished;
        let report = StrategyReport {
            strategy: self.strategy,
            peak_concurrency: self.backend.peak_counted,
            peak_running: self.backend.peak_running,
            query_attempts: self.backend.attempts,
            rejected: self.backend.rejected,
            completed: self.units.len() as u64 - lost,
            lost,
            lost_skipped: skipped,
            lost_failed: failed,
            lost_killed: killed,
            lost_never_spawned: never,
            lost_unfinished: unfinished,
            makespan_s,
            ideal_limit,
            ideal_s,
            makespan_ratio: if ideal_s > 0.0 {
                makespan_s / ideal_s
            } else {
                0.0
            },
            wait_p50_s: pct(0.50),
            wait_p99_s: pct(0.99),
            idle_worker_s: self.stats.idle_us as f64 / 1e6,
            task_retries: self.stats.retries,
            deadline_kills: self.stats.deadline_kills,
            crashed: self.stats.crashed,
            counter,
            limiter,
            orgs: self.org_stats(),
        };
        let trace = Trace {
            strategy: self.strategy,
            concurrency: self.backend.series,
            limit: self.limit_series,
            makespan_us: self.stats.last_end,
        };
        (report, trace)
    }
}
