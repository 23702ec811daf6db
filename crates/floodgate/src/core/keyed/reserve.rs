//! Giving back what a keyed `schedule` reserved and its producer did not use.
//!
//! The same rules as a plain limiter's (`core/reservation.rs`): GCRA keeps one number per rate,
//! so only the tail of a schedule can be un-taken, and only tokens whose start has not come.
//! Each token of a keyed schedule starts when both rates allow it, so one rate's `tat` may jump
//! ahead to the other's pace; the reservation keeps where both rates stood before it, and an
//! unschedule recomputes its token times from there (as the schedule made them, O(count)) and
//! puts both `tat`s exactly where keeping only the started tokens would have left them.
//! A keyed schedule takes tokens of two rates (the total's and its key's, either may be
//! absent), so its tail is given back only while it is the tail of *both*: neither the total's
//! `tat` nor the key's has moved since. Each key remembers its latest reservation (one, so
//! the state stays bounded by `max_keys`), indexed by id so an unschedule needs no key; with a
//! total rate an older reservation of another key can only be given back once everything
//! taken after it was given back too (the total's `tat` is back at its end), never someone
//! else's tokens. A key with a reservation whose last token has not started is not dropped
//! (it would forget the reservation); after that the key idles as usual.

use std::sync::Arc;

use super::sched::{gcra_at, gcra_take};
use super::KeyLayer;
use crate::core::{Effects, LimiterCore};
use crate::spec::{InvalidField, RateSpec};
use crate::types::Timestamp;

/// One part of a keyed reservation: what it took of one rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Part {
    /// The rate in force when it was taken: a changed rate rescales or resets the debt, so
    /// after a change nothing is given back.
    pub(crate) rate: RateSpec,
    /// `tat` before the reservation, to recompute its token times from.
    pub(crate) before: Timestamp,
    /// `tat` right after the reservation (and after any return): while it is still here,
    /// nothing has taken a token of this rate since.
    pub(crate) end: Timestamp,
}

/// A key's latest `schedule` reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyReservation {
    /// The id the store drew and the producer was told.
    pub(crate) id: u64,
    /// When the schedule ran: its first token starts no earlier.
    pub(crate) at: Timestamp,
    /// What it took of the total's rate (`None`: the total has no rate).
    pub(crate) total: Option<Part>,
    /// What it took of the key's rate (`None`: the key has no rate).
    pub(crate) key: Option<Part>,
    /// Tokens still reserved: the first `count` the schedule made (returns take the last).
    pub(crate) count: u32,
    /// When its last token starts: after that nothing can be given back, so the key need not
    /// be kept for it.
    pub(crate) last_start: Timestamp,
}

/// Where a reservation's rates stand after some of its tokens.
#[derive(Debug, Clone, Copy)]
struct Walk {
    /// The total's `tat`.
    total: Option<Timestamp>,
    /// The key's `tat`.
    key: Option<Timestamp>,
    /// The last token's start.
    start: Timestamp,
}

impl KeyReservation {
    /// Walks the reservation's tokens again, as `schedule` took them: the start of the next
    /// token and the rates' `tat`s after it.
    fn step(&self, w: Walk) -> Walk {
        let rate = |p: Option<Part>| p.map(|p| p.rate);
        let at = [
            w.total.and_then(|t| gcra_at(rate(self.total), t, 1)),
            w.key.and_then(|t| gcra_at(rate(self.key), t, 1)),
            Some(self.at),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(self.at);
        Walk {
            total: w.total.map(|t| gcra_take(rate(self.total), t, at, 1)),
            key: w.key.map(|t| gcra_take(rate(self.key), t, at, 1)),
            start: at,
        }
    }

    /// The rates before the reservation.
    fn origin(&self) -> Walk {
        Walk {
            total: self.total.map(|p| p.before),
            key: self.key.map(|p| p.before),
            start: self.at,
        }
    }
}

/// Whether a part still is its rate's tail: the same rate, and `tat` where the part left it.
fn still_tail(part: Option<Part>, rate: Option<RateSpec>, tat: Timestamp) -> bool {
    match (part, rate) {
        (None, None) => true,
        (Some(p), Some(r)) => p.rate == r && p.end == tat,
        _ => false,
    }
}

impl KeyLayer {
    /// Records the reservation a keyed schedule just made for key `name` (replacing the key's
    /// previous one): `at` is when it ran, `before` the total's and the key's `tat` before it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn remember_reservation(
        &mut self,
        total: &LimiterCore,
        name: &Arc<str>,
        id: u64,
        at: Timestamp,
        before: (Timestamp, Timestamp),
        count: u32,
        last_start: Timestamp,
    ) {
        let Some(k) = self.keys.get_mut(name) else {
            return;
        };
        let res = KeyReservation {
            id,
            at,
            total: total.spec.rate.map(|rate| Part {
                rate,
                before: before.0,
                end: total.tat,
            }),
            key: k.rate.map(|rate| Part {
                rate,
                before: before.1,
                end: k.tat,
            }),
            count,
            last_start,
        };
        if let Some(old) = k.reservation.replace(res) {
            self.reservations.remove(&old.id);
        }
        self.reservations.insert(id, Arc::clone(name));
    }

    /// Forgets key `name`'s reservation (the key is being dropped, or it is used up).
    pub(super) fn forget_reservation(&mut self, name: &Arc<str>) {
        if let Some(res) = self.keys.get_mut(name).and_then(|k| k.reservation.take()) {
            self.reservations.remove(&res.id);
        }
    }

    /// Reservations remembered now (one per key at most), for tests of boundedness.
    pub fn reservation_count(&self) -> usize {
        self.reservations.len()
    }

    /// Gives back up to `unused` tokens of reservation `id` that have not started yet, to the
    /// total's rate and its key's; returns how many went back (0 for an unknown id, one
    /// superseded, one after whose tail tokens were taken, or one whose tokens have started).
    /// Waiters the rates held back may be granted at once.
    ///
    /// # Errors
    /// `unused` of 0, or a limiter with no rate at all (total or per key).
    pub fn unschedule(
        &mut self,
        total: &mut LimiterCore,
        now: Timestamp,
        id: u64,
        unused: u32,
        fx: &mut Effects,
    ) -> Result<u32, InvalidField> {
        if total.spec.rate.is_none() && self.spec.rate.is_none() {
            return Err(InvalidField::new(
                "reservation",
                "this limiter has no rate limit, so it has no reservations",
            ));
        }
        if unused == 0 {
            return Err(InvalidField::new("count", "must be at least 1"));
        }
        self.advance(total, now, fx);
        let Some(name) = self.reservations.get(&id).cloned() else {
            return Ok(0);
        };
        let Some(k) = self.keys.get_mut(&name) else {
            self.reservations.remove(&id);
            return Ok(0);
        };
        let Some(res) = k.reservation.filter(|r| r.id == id) else {
            self.reservations.remove(&id);
            return Ok(0);
        };
        if !still_tail(res.total, total.spec.rate, total.tat) || !still_tail(res.key, k.rate, k.tat)
        {
            return Ok(0);
        }
        // Tokens start in order: count those started by now, then keep those and as many of
        // the rest as are not given back.
        let mut walk = res.origin();
        let mut started = 0u32;
        while started < res.count {
            let next = res.step(walk);
            if next.start > now {
                break;
            }
            walk = next;
            started += 1;
        }
        let returned = (res.count - started).min(unused);
        if returned == 0 {
            return Ok(0);
        }
        let kept = res.count - returned;
        for _ in started..kept {
            walk = res.step(walk);
        }
        let moved =
            |p: Option<Part>, tat: Option<Timestamp>| p.zip(tat).map(|(p, end)| Part { end, ..p });
        let (new_total, new_key) = (moved(res.total, walk.total), moved(res.key, walk.key));
        if let Some(p) = new_total {
            total.tat = p.end;
        }
        if let Some(p) = new_key {
            k.tat = p.end;
        }
        k.reservation = Some(KeyReservation {
            total: new_total,
            key: new_key,
            count: kept,
            last_start: walk.start,
            ..res
        });
        if kept == 0 {
            self.forget_reservation(&name);
        }
        // The key's head (if its own rate held it) and everyone the total's rate held may run.
        self.wake_key(&name, now);
        self.grant_waiters(total, now, fx);
        self.maybe_drop(&name, now);
        Ok(returned)
    }
}
