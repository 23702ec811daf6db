//! The `orgs` scenario's bookkeeping: which organizations wait at the gate (a task on a worker
//! that has not started its query), and which queries each starts.

use super::*;
use crate::orgs::{quantile_s, OrgStats, LARGE_ORG_QUERIES, SMALL_ORG_QUERIES};

impl Sim<'_> {
    /// The organization a query task works for.
    pub(super) fn org_of(&self, t: usize) -> Option<u32> {
        match self.tasks[t].kind {
            Kind::Query(u) => self.wl.org.get(u as usize).copied(),
            _ => None,
        }
    }

    /// A query task starts on a worker: it waits at the gate until its query starts.
    pub(super) fn enter_gate(&mut self, t: usize) {
        let Some(org) = self.org_of(t) else {
            return;
        };
        if let Some(fair) = self.fair.as_mut() {
            if !self.tasks[t].gate_waiting {
                self.tasks[t].gate_waiting = true;
                fair.wait_begins(org, self.now);
            }
        }
    }

    /// It stops waiting at the gate: its query starts, or the execution ends.
    pub(super) fn leave_gate(&mut self, t: usize) {
        if !std::mem::take(&mut self.tasks[t].gate_waiting) {
            return;
        }
        if let (Some(org), Some(fair)) = (self.org_of(t), self.fair.as_mut()) {
            fair.wait_ends(org);
        }
    }

    /// A query of task `t` was admitted by the backend.
    pub(super) fn count_start(&mut self, t: usize) {
        if let (Some(org), Some(fair)) = (self.org_of(t), self.fair.as_mut()) {
            fair.started(org);
        }
    }

    /// The keyed limiter's key of task `t`: its organization.
    pub(super) fn key_of(&self, t: usize) -> String {
        format!("org-{}", self.org_of(t).unwrap_or(0))
    }
}

impl Sim<'_> {
    /// The per-organization figures, in the `orgs` scenario.
    pub(super) fn org_stats(&self) -> Option<OrgStats> {
        let fair = self.fair.as_ref()?;
        let (mut small, mut large) = (Vec::new(), Vec::new());
        let (mut small_orgs, mut large_orgs) = (0, 0);
        let (mut small_incomplete, mut large_incomplete) = (0, 0);
        let mut small_waits = Vec::new();
        for org in 0..self.wl.orgs() {
            let range = self.wl.units_of(org);
            let size = range.end - range.start;
            let units = &self.units[range.start as usize..range.end as usize];
            let done = units
                .iter()
                .try_fold(0, |end: Micros, u| u.ended.map(|e| end.max(e)));
            if size <= SMALL_ORG_QUERIES {
                small_orgs += 1;
                small_waits.extend(units.iter().filter_map(|u| u.wait));
                match done {
                    Some(end) => small.push(end),
                    None => small_incomplete += 1,
                }
            } else if size >= LARGE_ORG_QUERIES {
                large_orgs += 1;
                match done {
                    Some(end) => large.push(end),
                    None => large_incomplete += 1,
                }
            }
        }
        small.sort_unstable();
        large.sort_unstable();
        small_waits.sort_unstable();
        let jain_min = fair.indices.iter().copied().reduce(f64::min);
        Some(OrgStats {
            small_orgs,
            large_orgs,
            small_done_p50_s: quantile_s(&small, 0.5),
            small_done_max_s: quantile_s(&small, 1.0),
            large_done_p50_s: quantile_s(&large, 0.5),
            large_done_max_s: quantile_s(&large, 1.0),
            small_incomplete,
            large_incomplete,
            small_wait_p50_s: quantile_s(&small_waits, 0.5),
            small_wait_p99_s: quantile_s(&small_waits, 0.99),
            jain_mean: (!fair.indices.is_empty())
                .then(|| fair.indices.iter().sum::<f64>() / fair.indices.len() as f64),
            jain_min,
            jain_windows: fair.indices.len() as u64,
        })
    }
}
