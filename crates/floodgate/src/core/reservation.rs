//! Returning what a `schedule` reserved and a producer did not use.
//!
//! A schedule takes rate tokens in advance (GCRA: it moves the theoretical arrival time `tat`
//! forward, one interval per child). A producer that enqueued fewer children than it reserved
//! (its broker failed half-way, it was cancelled) gives the rest back, so they do not hold up
//! every later acquire until `max_wait` has passed.
//!
//! Only the tail of the rate's schedule can be given back exactly: GCRA keeps one number, not
//! a list of promised token times, so lowering `tat` by n intervals un-takes the n *last*
//! tokens taken. That is the reservation's own tail only while nothing has taken a token after
//! it (`tat` is still where the reservation left it). So the limiter remembers its latest
//! reservation alone; returning an older one, or one that later tokens were taken after,
//! returns nothing (and says so), never another caller's tokens. A change of the rate (its
//! burst alone too) forgets the reservation: its token times were computed under the old rate. Tokens whose start time has
//! already come are spent and are not returned either. The reservation's id is a random number
//! the store draws (the core stays deterministic), so one producer cannot return another's
//! tokens by guessing.

use super::{Effects, LimiterCore};
use crate::spec::InvalidField;
use crate::types::Timestamp;

/// The latest `schedule` reservation, for [`LimiterCore::unschedule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reservation {
    /// The id the store drew and the producer was told.
    pub(crate) id: u64,
    /// `tat` right after the reservation (and after any return from it): while `tat` is still
    /// here, nothing has taken a token since, so the reservation is the schedule's tail.
    pub(crate) end: Timestamp,
    /// Tokens still reserved (returns lower it), so a producer cannot return more than it got.
    pub(crate) count: u32,
}

impl LimiterCore {
    /// Records the reservation `schedule` just made (called by it on success).
    pub(super) fn remember_reservation(&mut self, id: u64, count: u32) {
        self.last_reservation = Some(Reservation {
            id,
            end: self.tat,
            count,
        });
    }

    /// Gives back up to `unused` tokens of reservation `id` that have not started yet; returns
    /// how many were given back (0 if `id` is not the latest reservation, or tokens were taken
    /// after it). Queued acquires the rate was holding back may be granted at once.
    ///
    /// # Errors
    /// `unused` of 0 (nothing to return) or a limiter without a rate.
    pub fn unschedule(
        &mut self,
        now: Timestamp,
        id: u64,
        unused: u32,
        fx: &mut Effects,
    ) -> Result<u32, InvalidField> {
        let Some(rate) = self.spec.rate else {
            return Err(InvalidField::new(
                "reservation",
                "this limiter has no rate limit, so it has no reservations",
            ));
        };
        if unused == 0 {
            return Err(InvalidField::new("count", "must be at least 1"));
        }
        self.advance(now, fx);
        let Some(res) = self
            .last_reservation
            .filter(|r| r.id == id && r.end == self.tat)
        else {
            return Ok(0);
        };
        let t = rate.interval_us();
        // The j-th token from the tail starts at end - (j + burst) * t; those after `now` are
        // still to come.
        let lead = t.saturating_mul(u64::from(rate.burst));
        let ahead = res.end.0.saturating_sub(now.0);
        let future = if ahead <= lead {
            0
        } else {
            (ahead - lead).div_ceil(t)
        };
        let returned = u32::try_from(future)
            .unwrap_or(u32::MAX)
            .min(unused)
            .min(res.count);
        if returned == 0 {
            return Ok(0);
        }
        self.tat = Timestamp(
            self.tat
                .0
                .saturating_sub(t.saturating_mul(u64::from(returned))),
        );
        self.last_reservation = Some(Reservation {
            id,
            end: self.tat,
            count: res.count - returned,
        });
        self.grant_waiters(now, fx);
        Ok(returned)
    }
}
