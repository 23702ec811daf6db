//! Re-learning after state loss (Doorman's learning mode).
//!
//! A store that knows a limiter's state may have been lost (Redis flushed or restarted without
//! persistence, an embedded server restarted without its data) cannot know which permits are
//! still out: their holders are still working. So it re-creates the limiter in a learning
//! window long enough to cover every lease that may still be live:
//! - New acquires queue (FIFO as usual) and are not granted; they are not refused while their
//!   wait lasts. A wait that ends answers `WaitTimeout` with `retry_after` at least the time
//!   left in the window.
//! - An extend of a permit the limiter does not know, carrying its permits, re-adopts it: it is
//!   held again with the new lease and counts in `in_use` (even above the limit: those holders
//!   really are working; nothing is granted until in-use is below the limit again). Fencing
//!   tokens restart above every re-adopted one. A token above [`MAX_ADOPTED_TOKEN`] is not
//!   re-adopted (no store hands those out; adopting one would push every later token past
//!   2^53, where the Redis script's numbers and a browser's lose precision, or past
//!   `u64::MAX`).
//! - A rate limit's burst allowance is spent at the start of the window, since the tokens taken
//!   just before the loss are unknown.
//! - When the window ends, the queue is served normally (the store's timer fires then: the
//!   window's end is one of the deadlines [`LimiterCore::next_deadline`] reports).
//!
//! Outside a window an extend of an unknown permit stays [`Lost`]: nothing is ever revived.

use std::time::Duration;

use super::{Effects, Holder, LimiterCore, Lost};
use crate::spec::{check_lease, InvalidField};
use crate::types::{FencingToken, Timestamp};

/// The largest fencing token an extend may re-adopt: 2^52. Tokens start at the store's clock
/// in microseconds since the Unix epoch (about 1.8 x 10^15 in 2026) and grow by one a grant,
/// so no store hands out one above it before the year 2112; above it, a later grant's token
/// would leave the range every store and client holds exactly (2^53).
pub const MAX_ADOPTED_TOKEN: u64 = 1 << 52;

impl LimiterCore {
    /// Enters (or prolongs) a learning window ending at `until`. Idempotent: a later call with
    /// an earlier end does not shorten a window in force.
    pub fn enter_learning(&mut self, now: Timestamp, until: Timestamp) {
        if until <= now {
            return;
        }
        self.learning_until = Some(self.learning_until.map_or(until, |u| u.max(until)));
        if let Some(rate) = self.spec.rate {
            // Spend the burst allowance: at most one burst can have been taken just before the
            // loss, and it is not taken again.
            let burst = rate.interval_us().saturating_mul(u64::from(rate.burst));
            self.tat = self.tat.max(Timestamp(now.0.saturating_add(burst)));
        }
        // `advance` must not skip the window's end.
        self.next_due = self.next_due.min(until);
    }

    /// When the learning window in force ends, if one is.
    pub fn learning_until(&self) -> Option<Timestamp> {
        self.learning_until
    }

    /// Like [`extend`](Self::extend), and during a learning window an extend of a permit this
    /// limiter does not know re-adopts it when `permits` is given: the grant `token` of
    /// `permits` is held again until `now + lease`. Outside a window, or without `permits`, an
    /// unknown permit is [`Lost`].
    pub fn extend_or_adopt(
        &mut self,
        now: Timestamp,
        token: FencingToken,
        lease: Duration,
        permits: Option<u32>,
        fx: &mut Effects,
    ) -> Result<Result<Timestamp, Lost>, InvalidField> {
        check_lease("lease_ms", lease)?;
        self.advance(now, fx);
        let adopt = match permits {
            Some(permits) => {
                self.learning_until.is_some()
                    && self.spec.concurrency.is_some()
                    && !self.holders.contains_key(&token.0)
                    && token.0 != 0
                    && token.0 <= MAX_ADOPTED_TOKEN
                    && permits >= 1
            }
            None => false,
        };
        if !adopt {
            return self.extend(now, token, lease, fx);
        }
        let permits = permits.unwrap_or(1);
        let deadline = now.after(lease);
        self.holders.insert(
            token.0,
            Holder {
                permits,
                deadline,
                // Unknown; the hold-time average is fed only by grants made here.
                granted_at: now,
                lease,
                label: None,
                request: None,
            },
        );
        self.leases.push(deadline, token.0);
        self.next_due = self.next_due.min(deadline);
        self.in_use = self.in_use.saturating_add(permits);
        // Fencing: every later grant gets a larger token than any re-adopted one.
        self.next_token = self.next_token.max(token.0.saturating_add(1));
        // Counted as a grant, so `granted = released + expired + held + paced` still holds.
        self.counters.granted += 1;
        self.counters.adopted += 1;
        Ok(Ok(deadline))
    }

    /// Ends the learning window if it is over at `now`, and serves the queue.
    pub(super) fn end_learning_if_due(&mut self, now: Timestamp, fx: &mut Effects) {
        if self.learning_until.is_some_and(|until| until <= now) {
            self.learning_until = None;
            self.grant_waiters(now, fx);
        }
    }

    /// Time left in the learning window (zero outside one): a floor for retry hints.
    pub(super) fn learning_left(&self, now: Timestamp) -> Duration {
        self.learning_until.map_or(Duration::ZERO, |u| u.since(now))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::core::{AcquireRequest, Admission, Refusal};
    use crate::spec::LimiterSpec;

    const S: u64 = 1_000_000;

    #[test]
    fn a_learning_limiter_queues_readopts_and_grants_at_the_window_end() {
        let mut core = LimiterCore::new(LimiterSpec::concurrency(2), 100).unwrap();
        let mut fx = Effects::default();
        core.enter_learning(Timestamp(0), Timestamp(10 * S));
        // A shorter window later does not shorten it.
        core.enter_learning(Timestamp(S), Timestamp(2 * S));
        assert_eq!(core.next_deadline(), Some(Timestamp(10 * S)));
        let once = AcquireRequest {
            wait: Some(Duration::ZERO),
            ..AcquireRequest::default()
        };
        match core.acquire(Timestamp(S), &once, &mut fx) {
            Admission::Refused(Refusal::WaitTimeout { retry_after }) => {
                assert!(retry_after >= Duration::from_secs(9), "{retry_after:?}")
            }
            other => panic!("{other:?}"),
        }
        let Admission::Queued(w) = core.acquire(Timestamp(S), &AcquireRequest::default(), &mut fx)
        else {
            panic!("not queued while learning");
        };
        // Re-adopted above the limit; the token floor moves above it.
        let lease = Duration::from_secs(60);
        let t = FencingToken(5_000);
        assert!(core
            .extend_or_adopt(Timestamp(2 * S), t, lease, Some(3), &mut fx)
            .unwrap()
            .is_ok());
        assert_eq!(core.in_use(), 3);
        assert_eq!(core.next_token(), 5_001);
        assert!(core
            .extend_or_adopt(Timestamp(2 * S), FencingToken(9), lease, None, &mut fx)
            .unwrap()
            .is_err());
        // Released back under the limit, still nothing before the window ends.
        assert!(core.release(Timestamp(3 * S), t, &mut fx));
        assert!(fx.is_empty());
        core.advance(Timestamp(10 * S - 1), &mut fx);
        assert!(fx.is_empty());
        core.advance(Timestamp(10 * S), &mut fx);
        assert_eq!(fx.wakes.len(), 1);
        let (id, outcome) = &fx.wakes[0];
        assert_eq!(*id, w);
        assert_eq!(outcome.as_ref().unwrap().token, FencingToken(5_001));
        assert_eq!(core.learning_until(), None);
        // After the window an unknown permit is lost, size or not.
        let mut fx = Effects::default();
        assert!(core
            .extend_or_adopt(
                Timestamp(11 * S),
                FencingToken(7_000),
                lease,
                Some(1),
                &mut fx
            )
            .unwrap()
            .is_err());
        let c = core.counters();
        assert_eq!((c.adopted, c.granted, c.released), (1, 2, 1));
    }

    /// A token no store hands out is not re-adopted: `u64::MAX` made the next grant overflow
    /// the token counter (a panic in debug builds, a wrap to 0 in release ones), and any token
    /// above 2^53 made later ones inexact in the Redis script and in a browser (the dashboard
    /// released the wrong holder). The largest allowed one is adopted, and grants go on.
    #[test]
    fn a_token_above_the_adoptable_range_is_lost_not_adopted() {
        let mut core = LimiterCore::new(LimiterSpec::concurrency(4), 100).unwrap();
        let mut fx = Effects::default();
        core.enter_learning(Timestamp(0), Timestamp(S));
        let lease = Duration::from_secs(60);
        for token in [u64::MAX, MAX_ADOPTED_TOKEN + 1] {
            let out =
                core.extend_or_adopt(Timestamp(1), FencingToken(token), lease, Some(1), &mut fx);
            assert!(out.unwrap().is_err(), "{token} was adopted");
        }
        assert_eq!((core.in_use(), core.next_token()), (0, 100));
        let top = FencingToken(MAX_ADOPTED_TOKEN);
        let out = core.extend_or_adopt(Timestamp(1), top, lease, Some(1), &mut fx);
        assert!(out.unwrap().is_ok());
        core.advance(Timestamp(S), &mut fx);
        let Admission::Granted(g) = core.acquire(Timestamp(S), &AcquireRequest::default(), &mut fx)
        else {
            panic!("not granted after the window");
        };
        assert_eq!(g.token, FencingToken(MAX_ADOPTED_TOKEN + 1));
    }
}
