//! The `orgs` scenario: organizations that differ in size, as real tenants do, and whether one
//! large organization's work holds back everyone else's.
//!
//! The fan-out is the incident's (one batch task, one task per organization, one query task
//! per chunk of its projects, the same workers and backend), but the number of query tasks of
//! an organization is heavy-tailed: Pareto with shape [`ORG_SIZE_SHAPE`] (the "80/20" shape)
//! and minimum 1, cut at [`MAX_ORG_QUERIES`]. With 1,000 organizations that is about five with
//! 100 queries or more and nine in ten with 10 or fewer, in the random order the batch visits
//! them. Each strategy is then judged per organization:
//!
//! - **completion**: when an organization's last query ended, from the batch task's start,
//!   summarised over small organizations (at most [`SMALL_ORG_QUERIES`] queries) and large ones
//!   (at least [`LARGE_ORG_QUERIES`]), p50 and max;
//! - **small organizations' wait**: p50 and p99 of the wait of their query tasks (creation to
//!   the start of the successful query, as in the main table);
//! - **Jain's fairness index** (`(Σx)² / (n Σx²)`, 1 when equal, 1/n when one takes all) of the
//!   queries started per organization in each [`JAIN_WINDOW`] window, over the organizations
//!   *backlogged at the gate* for the whole window: a task of theirs sat on a worker waiting to
//!   start its query (in the limiter's queue, or polling the seed's counter) all along. Windows
//!   with fewer than two such organizations say nothing about sharing and are skipped; the
//!   report gives the mean and the lowest over the rest.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

/// What the run's workload looks like.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// The seed's incident: every organization small (1 + geometric query tasks).
    #[default]
    Incident,
    /// Organizations of heavy-tailed sizes, with per-organization figures in the report.
    Orgs,
}

impl Scenario {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Incident => "incident",
            Scenario::Orgs => "orgs",
        }
    }

    /// Organizations simulated unless `--orgs` says otherwise.
    pub fn default_orgs(self) -> u32 {
        match self {
            Scenario::Incident => 5_000,
            Scenario::Orgs => 1_000,
        }
    }

    /// Floodgate's wait cap unless `--max-wait` says otherwise: the incident's 45 s, and
    /// `@limited`'s own default of 5 s for `orgs`. Fair sharing acts only among the tasks that
    /// reach the limiter; with a FIFO broker in front and 45 s waits, the workers fill with
    /// the tasks of whichever organization came first, and sharing has little to choose from.
    /// A wait that ends re-enqueues the task, so short waits let the broker move on.
    pub fn default_max_wait(self) -> Duration {
        match self {
            Scenario::Incident => Duration::from_secs(45),
            Scenario::Orgs => Duration::from_secs(5),
        }
    }

    /// Strategies run unless `--strategy` says otherwise.
    pub fn default_strategies(self) -> Vec<super::Strategy> {
        match self {
            Scenario::Incident => super::Strategy::INCIDENT.to_vec(),
            Scenario::Orgs => super::Strategy::ALL.to_vec(),
        }
    }
}

impl std::str::FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "incident" => Ok(Scenario::Incident),
            "orgs" => Ok(Scenario::Orgs),
            other => Err(format!("unknown scenario {other:?}; one of incident, orgs")),
        }
    }
}

/// Pareto shape of the organization sizes: 1.16 puts 80 % of the work in 20 % of them.
pub const ORG_SIZE_SHAPE: f64 = 1.16;
/// Most query tasks one organization starts in the `orgs` scenario.
pub const MAX_ORG_QUERIES: u32 = 5_000;
/// Organizations with at most this many queries count as small.
pub const SMALL_ORG_QUERIES: u32 = 10;
/// Organizations with at least this many queries count as large.
pub const LARGE_ORG_QUERIES: u32 = 100;
/// The window over which throughput shares are compared.
pub const JAIN_WINDOW: Duration = Duration::from_secs(10);

/// One organization's number of query tasks: Pareto(1, [`ORG_SIZE_SHAPE`]) from a uniform
/// draw `u` in [0, 1), cut at [`MAX_ORG_QUERIES`].
pub(crate) fn org_size(u: f64) -> u32 {
    let tail = (1.0 - u).max(f64::MIN_POSITIVE);
    let size = tail.powf(-1.0 / ORG_SIZE_SHAPE).floor();
    if size >= f64::from(MAX_ORG_QUERIES) {
        MAX_ORG_QUERIES
    } else {
        (size as u32).max(1)
    }
}

/// Jain's fairness index of `shares`; `None` when there is nothing to share.
pub fn jain(shares: &[u64]) -> Option<f64> {
    let sum: f64 = shares.iter().map(|&x| x as f64).sum();
    let squares: f64 = shares.iter().map(|&x| (x as f64) * (x as f64)).sum();
    (squares > 0.0).then(|| sum * sum / (shares.len() as f64 * squares))
}

/// The per-organization figures of one strategy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OrgStats {
    /// Organizations with at most [`SMALL_ORG_QUERIES`] queries.
    pub small_orgs: u32,
    /// Organizations with at least [`LARGE_ORG_QUERIES`] queries.
    pub large_orgs: u32,
    /// Median completion time of the small organizations that completed, in seconds.
    pub small_done_p50_s: Option<f64>,
    /// Latest completion of a small organization, in seconds (`None` if none completed).
    pub small_done_max_s: Option<f64>,
    /// Median completion time of the large organizations that completed.
    pub large_done_p50_s: Option<f64>,
    /// Latest completion of a large organization.
    pub large_done_max_s: Option<f64>,
    /// Small organizations with work lost (not counted in the completion times).
    pub small_incomplete: u32,
    /// Large organizations with work lost.
    pub large_incomplete: u32,
    /// Median wait of the small organizations' completed query tasks, in seconds.
    pub small_wait_p50_s: Option<f64>,
    /// 99th percentile of that wait.
    pub small_wait_p99_s: Option<f64>,
    /// Mean of Jain's index over the windows with two or more organizations backlogged.
    pub jain_mean: Option<f64>,
    /// The lowest of those.
    pub jain_min: Option<f64>,
    /// How many windows that is.
    pub jain_windows: u64,
}

/// `q`-quantile (nearest rank) of sorted microsecond values, in seconds.
pub(crate) fn quantile_s(sorted: &[u64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1] as f64 / 1e6)
}

/// Tracks which organizations are backlogged at the gate and how many queries each starts,
/// window by window, for Jain's index.
#[derive(Debug, Default)]
pub(crate) struct Fairness {
    /// Per backlogged organization: its tasks waiting at the gate, and since when it has had
    /// any (continuously).
    backlogged: HashMap<u32, (u32, u64)>,
    /// Queries started in the current window, per organization.
    started: HashMap<u32, u64>,
    /// End of the current window, in µs.
    window_end: u64,
    /// Jain's index of each window that had two or more organizations backlogged.
    pub(crate) indices: Vec<f64>,
}

impl Fairness {
    fn window_us() -> u64 {
        u64::try_from(JAIN_WINDOW.as_micros()).unwrap_or(u64::MAX)
    }

    /// A task of `org` begins waiting at the gate.
    pub(crate) fn wait_begins(&mut self, org: u32, now: u64) {
        self.backlogged.entry(org).or_insert((0, now)).0 += 1;
    }

    /// A task of `org` stops waiting at the gate (its query starts, or it gave up).
    pub(crate) fn wait_ends(&mut self, org: u32) {
        if let Some((n, _)) = self.backlogged.get_mut(&org) {
            *n -= 1;
            if *n == 0 {
                self.backlogged.remove(&org);
            }
        }
    }

    /// A query of `org` was admitted by the backend.
    pub(crate) fn started(&mut self, org: u32) {
        *self.started.entry(org).or_default() += 1;
    }

    /// Closes every window that ended by `now`; call before handling an event at `now`.
    pub(crate) fn roll(&mut self, now: u64) {
        let w = Self::window_us();
        if self.window_end == 0 {
            self.window_end = w;
        }
        while now >= self.window_end {
            let start = self.window_end - w;
            let shares: Vec<u64> = self
                .backlogged
                .iter()
                .filter(|(_, (_, since))| *since <= start)
                .map(|(org, _)| self.started.get(org).copied().unwrap_or(0))
                .collect();
            if shares.len() >= 2 {
                if let Some(j) = jain(&shares) {
                    self.indices.push(j);
                }
            }
            self.started.clear();
            self.window_end += w;
            if self.backlogged.is_empty() && now >= self.window_end {
                // Nothing backlogged: the windows until `now` would all be skipped.
                self.window_end += (now - self.window_end) / w * w;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_is_one_when_equal_and_one_over_n_when_one_takes_all() {
        assert_eq!(jain(&[5, 5, 5, 5]), Some(1.0));
        assert_eq!(jain(&[8, 0, 0, 0]), Some(0.25));
        assert_eq!(jain(&[0, 0]), None);
    }

    #[test]
    fn org_sizes_are_heavy_tailed_and_bounded() {
        assert_eq!(org_size(0.0), 1);
        assert_eq!(org_size(0.999_999_999_9), MAX_ORG_QUERIES);
        // P(size >= 100) = 100^-1.16, about 0.5 %.
        let big = (0..100_000)
            .filter(|i| org_size(f64::from(*i) / 100_000.0) >= 100)
            .count();
        assert!((400..=600).contains(&big), "{big}");
    }

    #[test]
    fn only_organizations_backlogged_all_window_count() {
        let w = Fairness::window_us();
        let mut f = Fairness::default();
        f.wait_begins(1, 0);
        f.wait_begins(2, 0);
        f.wait_begins(3, w / 2); // joins mid-window: not counted in the first
        for _ in 0..4 {
            f.started(1);
            f.started(2);
        }
        f.started(3);
        f.roll(w);
        assert_eq!(f.indices, vec![1.0]);
        f.started(1);
        f.roll(2 * w);
        // Second window: 1 started once, 2 and 3 none.
        assert_eq!(f.indices.len(), 2);
        assert!((f.indices[1] - 1.0 / 3.0).abs() < 1e-9);
    }
}
