//! Fair sharing across keys: deficit round robin over the keys whose head waiter could run.
//!
//! The ring holds the keys that have waiters and whose own limits (per-key concurrency, per-key
//! rate) let their head waiter run now: only the total can hold them back. The key at the front
//! gets a turn: its weight is added to its deficit, and its head waiters are granted while
//! their permits fit the deficit, then it goes to the back. So a key's share of a contended
//! total follows its weight whatever its backlog, waiters of one key stay FIFO, and every
//! decision costs O(1) ring work plus O(log) map work. A head needing more permits than its
//! key's weight waits rounds for its credit: when every key in the ring is short, the rounds
//! that would grant nothing are credited at once (one visit of the ring), not turned one by
//! one. Entries are removed lazily: a key that left the ring (emptied, or blocked by its own
//! limit) is skipped when it reaches the front, and each entry names the key's generation so a
//! key dropped and re-created is not served by its old entry.

use std::cmp::Reverse;
use std::sync::Arc;

use super::{Key, KeyLayer};
use crate::core::{Effects, LimiterCore, Waiter, WaiterId};
use crate::spec::RateSpec;
use crate::types::Timestamp;

/// Why a key's head waiter cannot run now, if it cannot.
pub(super) enum Block {
    /// It can, asking for this many permits; only the total may hold it back.
    Ready(u32),
    /// No waiters.
    Empty,
    /// The key's own concurrency limit is reached: a release of this key will wake it.
    Full,
    /// The key's own rate allows the head at this moment.
    RateUntil(Timestamp),
}

/// When GCRA allows `permits` tokens, given the theoretical arrival time `tat`.
pub(super) fn gcra_at(rate: Option<RateSpec>, tat: Timestamp, permits: u32) -> Option<Timestamp> {
    let rate = rate?;
    let t = rate.interval_us();
    let need = t.saturating_mul(u64::from(permits));
    let allowance = t.saturating_mul(u64::from(rate.burst));
    Some(Timestamp(
        tat.0.saturating_add(need).saturating_sub(allowance),
    ))
}

/// Takes `permits` tokens at `at`: the new theoretical arrival time.
pub(super) fn gcra_take(
    rate: Option<RateSpec>,
    tat: Timestamp,
    at: Timestamp,
    permits: u32,
) -> Timestamp {
    match rate {
        Some(rate) => {
            let t = rate.interval_us().saturating_mul(u64::from(permits));
            Timestamp(tat.0.max(at.0).saturating_add(t))
        }
        None => tat,
    }
}

impl Key {
    pub(super) fn block(&self, now: Timestamp) -> Block {
        let Some((_, head)) = self.queue.first_key_value() else {
            return Block::Empty;
        };
        self.admits(now, head.permits)
    }

    /// Whether `permits` more would fit this key's own limits now.
    pub(super) fn admits(&self, now: Timestamp, permits: u32) -> Block {
        if let Some(limit) = self.limit {
            if u64::from(self.in_use) + u64::from(permits) > u64::from(limit) {
                return Block::Full;
            }
        }
        match gcra_at(self.rate, self.tat, permits) {
            Some(at) if at > now => Block::RateUntil(at),
            _ => Block::Ready(permits),
        }
    }
}

/// Test hooks of the round robin: the turns taken, and the skip of idle rounds switched off,
/// so that the skip is checked against turning the ring one key at a time.
#[cfg(test)]
#[derive(Debug, Clone, Default)]
pub(super) struct DrrProbe {
    /// Turn the ring one key at a time, never skipping rounds.
    pub(super) turn_by_turn: bool,
    /// Visits of the ring's front so far.
    pub(super) turns: u64,
}

impl KeyLayer {
    /// Puts a key that is not in the ring there if its head can run, or arms its rate wake-up.
    pub(super) fn wake_key(&mut self, name: &Arc<str>, now: Timestamp) {
        let Some(k) = self.keys.get_mut(name) else {
            return;
        };
        if k.in_ring {
            return;
        }
        match k.block(now) {
            Block::Ready(_) => {
                k.in_ring = true;
                self.ring.push_back((Arc::clone(name), k.gen));
            }
            Block::RateUntil(at) => {
                if k.sleeping.is_none_or(|s| s > at) {
                    k.sleeping = Some(at);
                    self.sleepers.push(Reverse((at, k.gen, Arc::clone(name))));
                }
            }
            Block::Empty | Block::Full => {}
        }
    }

    /// Grants waiters while capacity lasts, the keys taking turns by weight. Afterwards no
    /// waiter can be granted until something changes (the invariant every operation keeps).
    pub(super) fn grant_waiters(
        &mut self,
        total: &mut LimiterCore,
        now: Timestamp,
        fx: &mut Effects,
    ) {
        self.grant_waiters_as_of(total, now, now, fx);
    }

    /// [`grant_waiters`](Self::grant_waiters) judged as of `at` (an event being applied late,
    /// at `now`): who may run is decided at `at`, grants are made at `now` (their leases start
    /// when the holder hears of them; rates are charged no earlier than `now`, never less).
    pub(super) fn grant_waiters_as_of(
        &mut self,
        total: &mut LimiterCore,
        at: Timestamp,
        now: Timestamp,
        fx: &mut Effects,
    ) {
        self.held_until = None;
        if total.learning_until.is_some() {
            return;
        }
        // Turns that ended without a grant since the last grant: once every key in the ring
        // has had one, the rounds before some head fits its deficit are taken in one step.
        let mut idle_turns = 0usize;
        while let Some((name, gen)) = self.ring.front().cloned() {
            #[cfg(test)]
            {
                self.drr.turns += 1;
            }
            let Some(k) = self.keys.get_mut(&name).filter(|k| k.gen == gen) else {
                self.ring.pop_front();
                continue;
            };
            let permits = match k.block(at) {
                Block::Ready(permits) => permits,
                other => {
                    // Left the ring: emptied, or held back by its own limit.
                    self.ring.pop_front();
                    k.in_ring = false;
                    k.turn = false;
                    k.deficit = 0;
                    if let Block::RateUntil(at) = other {
                        if k.sleeping.is_none_or(|s| s > at) {
                            k.sleeping = Some(at);
                            self.sleepers.push(Reverse((at, gen, Arc::clone(&name))));
                        }
                    }
                    continue;
                }
            };
            if !k.turn {
                k.turn = true;
                k.deficit += u64::from(k.weight);
            }
            if u64::from(permits) > k.deficit {
                // Its turn is over; the deficit carries to the next round.
                k.turn = false;
                self.ring.rotate_left(1);
                idle_turns += 1;
                #[cfg(test)]
                let skip = !self.drr.turn_by_turn;
                #[cfg(not(test))]
                let skip = true;
                if skip && idle_turns >= self.ring.len() {
                    self.skip_idle_rounds(at);
                    idle_turns = 0;
                }
                continue;
            }
            // The total holds back the key whose turn it is (and so everyone): a large head
            // is never starved by smaller requests of other keys.
            if !total.fits(permits) {
                break;
            }
            if let Some(until) = total.rate_at(permits).filter(|t| *t > at) {
                self.held_until = Some(until);
                break;
            }
            let Some((id, w)) = k.queue.pop_first() else {
                continue;
            };
            // Its next waiter, if any, is the key's head now.
            self.heads.remove(&(w.enqueued_at, id));
            if let Some(h) = k.head_entry() {
                self.heads.insert(h);
            }
            k.deficit -= u64::from(permits);
            k.queued_permits -= u64::from(permits);
            self.waiting -= 1;
            self.waiting_permits -= u64::from(permits);
            self.waiter_key.remove(&id);
            if let Some(r) = w.request() {
                self.requests.remove(r);
            }
            let grant = self.grant_to(total, now, &name, w);
            fx.wakes.push((WaiterId(id), Ok(grant)));
            idle_turns = 0;
        }
    }

    /// Called when every key in the ring has just ended a turn with its head short of its
    /// deficit, nothing having changed since: the rounds before the first head fits would
    /// grant nothing, so each key is credited their weight at once. The same decisions as
    /// turning the ring one key at a time, in one visit of the ring instead of one turn per
    /// permit a head lacks (a head of a million permits at weight 1 was a million turns
    /// under the limiter's lock, and on Redis inside one script).
    fn skip_idle_rounds(&mut self, at: Timestamp) {
        let mut rounds = u64::MAX;
        let mut live = Vec::new();
        for (name, gen) in &self.ring {
            if let Some((short, weight)) = self.shortfall(name, *gen, at) {
                rounds = rounds.min(short.div_ceil(weight));
                live.push((Arc::clone(name), weight));
            }
        }
        // The round in which the first head fits is played as usual.
        let Some(skipped) = rounds.checked_sub(1).filter(|r| *r > 0) else {
            return;
        };
        for (name, weight) in live {
            if let Some(k) = self.keys.get_mut(&name) {
                k.deficit = k.deficit.saturating_add(skipped.saturating_mul(weight));
            }
        }
    }

    /// A ring entry's live key, if its head could run: the permits its deficit lacks for the
    /// head (at least one, after a turn that did not grant it), and its weight.
    fn shortfall(&self, name: &Arc<str>, gen: u64, at: Timestamp) -> Option<(u64, u64)> {
        let k = self.keys.get(name).filter(|k| k.gen == gen)?;
        let Block::Ready(permits) = k.block(at) else {
            return None;
        };
        let short = u64::from(permits).saturating_sub(k.deficit).max(1);
        Some((short, u64::from(k.weight).max(1)))
    }

    /// Grants `w` to key `name` (which exists): the total's grant, plus the key's share.
    pub(super) fn grant_to(
        &mut self,
        total: &mut LimiterCore,
        now: Timestamp,
        name: &Arc<str>,
        w: Waiter,
    ) -> crate::core::Grant {
        let permits = w.permits;
        let (lease, enqueued_at) = (w.lease, w.enqueued_at);
        let (label, request) = w.into_tags();
        let paced_request = total.spec.concurrency.is_none().then(|| request.clone());
        let grant = total.grant(now, permits, lease, enqueued_at, label, request);
        if let Some(paced_request) = paced_request {
            // Rate only: a paced grant holds nothing; the key keeps only its rate debt, and
            // the remembered request id its key (a retry naming another key is refused).
            if let Some(r) = paced_request {
                total.set_paced_key(&r, name);
            }
            if let Some(k) = self.keys.get_mut(name) {
                k.tat = gcra_take(k.rate, k.tat, now, permits);
            }
            self.reindex(name);
            self.maybe_drop(name, now);
            return grant;
        }
        if let Some(k) = self.keys.get_mut(name) {
            k.in_use += permits;
            k.holders += 1;
            k.tat = gcra_take(k.rate, k.tat, now, permits);
        }
        self.holders.insert(
            grant.token.0,
            super::KeyedHolder {
                key: Arc::clone(name),
                permits,
                deadline: grant.lease_deadline,
            },
        );
        self.leases
            .push(Reverse((grant.lease_deadline, grant.token.0)));
        self.compact_leases();
        self.reindex(name);
        grant
    }

    /// Keeps the busiest-keys index in step with a key's holders and waiters.
    pub(super) fn reindex(&mut self, name: &Arc<str>) {
        let Some(k) = self.keys.get_mut(name) else {
            return;
        };
        let load = u64::from(k.holders) + k.queue.len() as u64;
        if load == k.load {
            return;
        }
        if k.load > 0 {
            self.busy.remove(&(k.load, Arc::clone(name)));
        }
        if load > 0 {
            self.busy.insert((load, Arc::clone(name)));
        }
        k.load = load;
    }

    /// Drops a key's state once it holds nothing, waits for nothing, owes no rate and has no
    /// reservation left to give back; a key whose only state is rate debt or a reservation is
    /// looked at again when they end.
    pub(super) fn maybe_drop(&mut self, name: &Arc<str>, now: Timestamp) {
        let Some(k) = self.keys.get_mut(name) else {
            return;
        };
        if k.holders > 0 || !k.queue.is_empty() {
            return;
        }
        // A reservation keeps the key (and so the reservation) until its last token starts.
        let until = k.reservation.map_or(k.tat, |r| k.tat.max(r.last_start));
        if until > now {
            if !k.idle_armed {
                k.idle_armed = true;
                self.idle.push(Reverse((until, k.gen, Arc::clone(name))));
            }
            return;
        }
        if k.load > 0 {
            self.busy.remove(&(k.load, Arc::clone(name)));
        }
        self.forget_reservation(name);
        self.keys.remove(name);
    }

    /// Rebuilds the lease heap when stale entries (from extends and releases) outnumber live
    /// ones, so it stays within a constant factor of the holders.
    pub(super) fn compact_leases(&mut self) {
        if self.leases.len() <= 2 * self.holders.len() + 64 {
            return;
        }
        let holders = &self.holders;
        self.leases
            .retain(|Reverse((d, t))| holders.get(t).is_some_and(|h| h.deadline == *d));
    }

    /// Like [`compact_leases`](Self::compact_leases), for the wait deadlines.
    pub(super) fn compact_waits(&mut self) {
        if self.waits.len() <= 2 * self.waiter_key.len() + 64 {
            return;
        }
        let (keys, index) = (&self.keys, &self.waiter_key);
        self.waits.retain(|Reverse((d, id))| {
            index
                .get(id)
                .and_then(|name| keys.get(name))
                .and_then(|k| k.queue.get(id))
                .is_some_and(|w| w.deadline == *d)
        });
    }
}
