//! Read-only introspection of who holds and who waits: what the dashboard and
//! `GET /v1/limiters/{name}/holders` show during an incident ("who holds the 50 permits, how
//! long has the oldest waiter waited?"). Nothing here changes the state.

use std::sync::Arc;
use std::time::Duration;

use super::LimiterCore;
use crate::types::{FencingToken, Timestamp};

/// Largest number of holders one listing returns: a limiter may hold a million grants, and a
/// listing is for people, so it is bounded.
pub const MAX_HOLDERS_LISTED: usize = 10_000;

/// One grant out now, as a person looking at the limiter sees it.
///
/// `#[non_exhaustive]`: built by the library (read its fields), so one can be added without
/// breaking callers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HolderInfo {
    /// The grant's fencing token (also its id within the limiter).
    pub token: FencingToken,
    /// Permits it holds.
    pub permits: u32,
    /// When it was granted, on the store's clock (age = `now - granted_at`).
    pub granted_at: Timestamp,
    /// When its lease ends unless extended, on the store's clock.
    pub lease_deadline: Timestamp,
    /// The label the client sent with its acquire (a worker or task id), if any.
    pub label: Option<Arc<str>>,
}

/// Holders (bounded) and a summary of the queue, taken at one moment.
///
/// `#[non_exhaustive]`: built by the library (read its fields), so one can be added without
/// breaking callers.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HoldersView {
    /// The store's clock when the listing was taken, so ages and lease ends are relative to it.
    pub now: Timestamp,
    /// Grants out now, lease ending soonest first (the likeliest stuck or dead holders lead),
    /// at most the requested number.
    pub holders: Vec<HolderInfo>,
    /// Grants out now in total (may exceed `holders.len()`).
    pub total_holders: u32,
    /// Acquires queued now.
    pub waiting: u32,
    /// Permits the queued acquires ask for in total.
    pub waiting_permits: u64,
    /// How long the head of the queue (the oldest waiter) has waited; `None` when nobody waits.
    pub oldest_wait: Option<Duration>,
    /// Rate tokens that could be taken now (the burst when the rate is caught up, fractions
    /// while it refills); `None` without a rate limit.
    pub rate_tokens: Option<f64>,
}

impl LimiterCore {
    /// Up to `limit` (capped at [`MAX_HOLDERS_LISTED`]) of the grants live at `now`, lease
    /// ending soonest first (ties by token), and the queue's summary. Leases past their deadline
    /// that no operation has reclaimed yet are left out: they are not held.
    pub fn holders_view(&self, now: Timestamp, limit: usize) -> HoldersView {
        let limit = limit.min(MAX_HOLDERS_LISTED);
        // Nothing is due before `next_due` (a lower bound), so then every holder is live and a
        // summary alone (the dashboard's sampler, each second) costs O(1), not O(holders).
        let all_live = now < self.next_due;
        let mut live: Vec<HolderInfo> = if limit == 0 && all_live {
            Vec::new()
        } else {
            self.holders
                .iter()
                .filter(|(_, h)| h.deadline > now)
                .map(|(token, h)| HolderInfo {
                    token: FencingToken(*token),
                    permits: h.permits,
                    granted_at: h.granted_at,
                    lease_deadline: h.deadline,
                    label: h.label.clone(),
                })
                .collect()
        };
        let total = if limit == 0 && all_live {
            self.holders.len()
        } else {
            live.len()
        };
        let total = u32::try_from(total).unwrap_or(u32::MAX);
        let key = |h: &HolderInfo| (h.lease_deadline, h.token);
        if live.len() > limit {
            // Only the first `limit` need ordering.
            if limit > 0 {
                live.select_nth_unstable_by_key(limit - 1, key);
            }
            live.truncate(limit);
        }
        live.sort_unstable_by_key(key);
        let oldest_wait = self
            .queue
            .first_key_value()
            .map(|(_, w)| now.since(w.enqueued_at));
        let rate_tokens = self.spec.rate.map(|rate| {
            let t = rate.interval_us() as f64;
            let debt = self.tat.0.saturating_sub(now.0) as f64;
            ((t * f64::from(rate.burst) - debt) / t).max(0.0)
        });
        HoldersView {
            rate_tokens,
            now,
            holders: live,
            total_holders: total,
            waiting: u32::try_from(self.queue.len()).unwrap_or(u32::MAX),
            waiting_permits: self.queued_permits,
            oldest_wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{AcquireRequest, Admission, Effects};
    use crate::spec::LimiterSpec;

    fn acquire(core: &mut LimiterCore, now: u64, lease_ms: u64, label: &str) -> Admission {
        let mut fx = Effects::default();
        core.acquire(
            Timestamp(now),
            &AcquireRequest {
                permits: 1,
                lease: Some(Duration::from_millis(lease_ms)),
                wait: Some(Duration::from_secs(10)),
                holder: Some(label.into()),
                request_id: None,
            },
            &mut fx,
        )
    }

    #[test]
    fn lists_labels_in_lease_order_bounded_and_summarises_the_queue() {
        let mut core = LimiterCore::new(LimiterSpec::concurrency(3), 1).expect("valid spec");
        assert!(matches!(
            acquire(&mut core, 1_000, 5_000, "late"),
            Admission::Granted(_)
        ));
        assert!(matches!(
            acquire(&mut core, 2_000, 1_000, "soon"),
            Admission::Granted(_)
        ));
        assert!(matches!(
            acquire(&mut core, 3_000, 3_000, "mid"),
            Admission::Granted(_)
        ));
        assert!(matches!(
            acquire(&mut core, 4_000, 1_000, "w1"),
            Admission::Queued(_)
        ));
        assert!(matches!(
            acquire(&mut core, 9_000, 1_000, "w2"),
            Admission::Queued(_)
        ));

        let view = core.holders_view(Timestamp(10_000), 10);
        let labels: Vec<_> = view.holders.iter().map(|h| h.label.as_deref()).collect();
        assert_eq!(labels, [Some("soon"), Some("mid"), Some("late")]);
        assert_eq!(view.total_holders, 3);
        assert_eq!(view.waiting, 2);
        assert_eq!(view.waiting_permits, 2);
        assert_eq!(view.oldest_wait, Some(Duration::from_micros(6_000)));
        assert_eq!(view.holders[0].granted_at, Timestamp(2_000));
        assert_eq!(view.holders[0].lease_deadline, Timestamp(1_002_000));
        assert_eq!(view.rate_tokens, None);

        // Bounded: only the soonest lease ends, but the total still counts them all.
        let two = core.holders_view(Timestamp(10_000), 2);
        assert_eq!(two.holders.len(), 2);
        assert_eq!(two.holders[1].label.as_deref(), Some("mid"));
        assert_eq!(two.total_holders, 3);
        let summary = core.holders_view(Timestamp(10_000), 0);
        assert!(summary.holders.is_empty());
        assert_eq!((summary.total_holders, summary.waiting), (3, 2));

        // A lease past its end is not shown as held, even before a timer reclaims it.
        let later = core.holders_view(Timestamp(1_500_000), 10);
        assert_eq!(later.total_holders, 2);
        assert_eq!(core.holders_view(Timestamp(1_500_000), 0).total_holders, 2);
        assert!(later
            .holders
            .iter()
            .all(|h| h.label.as_deref() != Some("soon")));
    }
}
