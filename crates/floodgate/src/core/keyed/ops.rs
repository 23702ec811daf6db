//! The keyed limiter's operations. Each first applies the passage of time, like the core's.

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Duration;

use super::sched::{gcra_at, Block};
use super::{check_key, KeyLayer, KeyedSpec};
use crate::core::{
    AcquireRequest, Admission, Effects, Feedback, LimiterCore, Lost, Refusal, Waiter, WaiterId,
};
use crate::spec::{check_lease, InvalidField, LimiterSpec};
use crate::types::{FencingToken, Timestamp};

impl KeyLayer {
    /// Asks for permits for `key`. Granted at once if the key has no waiters, its own limits
    /// and the total allow it, and no other key's waiter is held back by the total; otherwise
    /// queued in the key's FIFO (outcome delivered later as an effect) or refused.
    pub fn acquire(
        &mut self,
        total: &mut LimiterCore,
        now: Timestamp,
        key: &str,
        req: &AcquireRequest,
        fx: &mut Effects,
    ) -> Admission {
        self.advance(total, now, fx);
        if let Some(r) = &req.request_id {
            if let Some(repeat) = self.join(total, now, key, r, req) {
                return repeat;
            }
            if let Some(repeat) = total.repeat_of(now, req) {
                // The grant is the first attempt's key's: a retry naming another key would
                // run against that key on a permit of the first (past its per-key limit).
                if let Admission::Granted(g) = &repeat {
                    if self.holders.get(&g.token.0).is_some_and(|h| *h.key != *key) {
                        return total.key_mismatch();
                    }
                    // A paced (rate-only) grant holds nothing: its key is remembered with it.
                    if total.paced_key(now, r).is_some_and(|k| *k != *key) {
                        return total.key_mismatch();
                    }
                }
                return repeat;
            }
        }
        let refuse = |total: &mut LimiterCore, refusal: Refusal| {
            total.counters.rejected += 1;
            Admission::Refused(refusal)
        };
        if let Err(e) = check_key(key) {
            return refuse(total, Refusal::Invalid(e));
        }
        if req.permits == 0 {
            let e = InvalidField::new("permits", "must be at least 1");
            return refuse(total, Refusal::Invalid(e));
        }
        let (limit, rate, _) = self.limits_for(key);
        let cap = [total.permit_cap(), limit, rate.map(|r| r.burst)]
            .into_iter()
            .flatten()
            .min();
        if let Some(cap) = cap.filter(|cap| req.permits > *cap) {
            let refusal = Refusal::PermitsExceedLimit {
                requested: req.permits,
                limit: cap,
            };
            return refuse(total, refusal);
        }
        let lease = req.lease.unwrap_or(total.spec.default_lease);
        if let Err(e) = check_lease("lease_ms", lease) {
            return refuse(total, Refusal::Invalid(e));
        }
        let wait = req
            .wait
            .unwrap_or(total.spec.max_wait)
            .min(total.spec.max_wait);
        let name: Arc<str> = match self.keys.get_key_value(key) {
            Some((name, _)) => Arc::clone(name),
            None => {
                let max = self.spec.max_keys;
                if self.keys.len() >= max as usize {
                    self.counters.too_many_keys += 1;
                    let retry_after = total.retry_hint(now, 1);
                    return Admission::Refused(Refusal::TooManyKeys {
                        max_keys: max,
                        retry_after,
                    });
                }
                let name: Arc<str> = Arc::from(key);
                let k = self.new_key(key);
                self.keys.insert(Arc::clone(&name), k);
                name
            }
        };
        let w = Waiter::new(
            req.permits,
            lease,
            now,
            now.after(wait),
            req.holder.clone(),
            req.request_id.clone(),
        );
        // The common case, without queueing: nobody else waits on the total, this key has no
        // waiters, and everything fits.
        let idle_key = self.keys.get(&name).is_some_and(|k| {
            k.queue.is_empty() && matches!(k.admits(now, req.permits), Block::Ready(_))
        });
        if self.ring.is_empty()
            && idle_key
            && total.learning_until.is_none()
            && total.fits(req.permits)
            && total.rate_at(req.permits).is_none_or(|at| at <= now)
        {
            return Admission::Granted(self.grant_to(total, now, &name, w));
        }
        if self.waiting >= total.spec.max_queue as usize {
            total.counters.queue_full += 1;
            let retry_after = self.hint(total, now, &name, req.permits);
            self.maybe_drop(&name, now);
            return Admission::Refused(Refusal::QueueFull { retry_after });
        }
        let id = self.next_waiter;
        self.next_waiter += 1;
        let deadline = w.deadline;
        self.enqueue(&name, id, w, now);
        self.grant_waiters(total, now, fx);
        if fx.wakes.last().is_some_and(|(w, o)| w.0 == id && o.is_ok()) {
            if let Some((_, Ok(grant))) = fx.wakes.pop() {
                return Admission::Granted(grant);
            }
        }
        // Below the clock's resolution a wait would end the moment it began: try once.
        if wait < Duration::from_micros(1) {
            self.dequeue(total, now, id, fx);
            total.counters.timed_out += 1;
            let retry_after = self.hint(total, now, &name, req.permits);
            self.maybe_drop(&name, now);
            return Admission::Refused(Refusal::WaitTimeout { retry_after });
        }
        if let Some(r) = &req.request_id {
            self.requests.insert(Arc::clone(r), id);
        }
        self.waits.push(Reverse((deadline, id)));
        self.compact_waits();
        Admission::Queued(WaiterId(id))
    }

    /// A repeat of a queued idempotent acquire joins its wait, which now lasts as long as this
    /// caller asks.
    fn join(
        &mut self,
        total: &mut LimiterCore,
        now: Timestamp,
        key: &str,
        request: &Arc<str>,
        req: &AcquireRequest,
    ) -> Option<Admission> {
        let id = *self.requests.get(request)?;
        let name = self.waiter_key.get(&id)?;
        let w = self.keys.get_mut(name)?.queue.get_mut(&id)?;
        if w.permits != req.permits {
            let first = w.permits;
            return Some(total.mismatch(first));
        }
        if **name != *key {
            return Some(total.key_mismatch());
        }
        let wait = req
            .wait
            .unwrap_or(total.spec.max_wait)
            .min(total.spec.max_wait);
        w.deadline = now.after(wait);
        self.waits.push(Reverse((w.deadline, id)));
        Some(Admission::Queued(WaiterId(id)))
    }

    fn enqueue(&mut self, name: &Arc<str>, id: u64, w: Waiter, now: Timestamp) {
        let Some(k) = self.keys.get_mut(name) else {
            return;
        };
        let first = k.queue.is_empty();
        k.queued_permits += u64::from(w.permits);
        self.waiting += 1;
        self.waiting_permits += u64::from(w.permits);
        k.queue.insert(id, w);
        self.waiter_key.insert(id, Arc::clone(name));
        self.reindex(name);
        if first {
            self.head_moved(None, name);
            // The head is new: the key may join the ring (or wait for its rate).
            if let Some(k) = self.keys.get_mut(name) {
                k.sleeping = None;
            }
            self.wake_key(name, now);
        }
    }

    /// Takes a queued waiter out (it gave up, timed out or was refused). The key's next
    /// waiter may now be the head, and it may run.
    pub(super) fn dequeue(
        &mut self,
        total: &mut LimiterCore,
        now: Timestamp,
        id: u64,
        fx: &mut Effects,
    ) -> Option<(Arc<str>, Waiter)> {
        let (name, w, was_head) = self.dequeue_only(now, id)?;
        if was_head {
            self.grant_waiters(total, now, fx);
        }
        Some((name, w))
    }

    /// [`dequeue`](Self::dequeue) without granting: whether it was its key's head is returned,
    /// for the caller to grant as of the right moment.
    fn dequeue_only(&mut self, now: Timestamp, id: u64) -> Option<(Arc<str>, Waiter, bool)> {
        let name = self.waiter_key.remove(&id)?;
        let k = self.keys.get_mut(&name)?;
        let was_head = k.queue.first_key_value().is_some_and(|(h, _)| *h == id);
        let w = k.queue.remove(&id)?;
        k.queued_permits -= u64::from(w.permits);
        self.waiting -= 1;
        self.waiting_permits -= u64::from(w.permits);
        if let Some(r) = w.request() {
            self.requests.remove(r);
        }
        self.reindex(&name);
        if was_head {
            self.head_moved(Some((w.enqueued_at, id)), &name);
            self.wake_key(&name, now);
        }
        Some((name, w, was_head))
    }

    /// When to try again: the total's hint for this key's backlog, or the key's rate, if later.
    fn hint(&self, total: &mut LimiterCore, now: Timestamp, name: &str, permits: u32) -> Duration {
        let k = self.keys.get(name);
        let ahead = k.map_or(0, |k| k.queued_permits) + u64::from(permits);
        let by_key = k
            .and_then(|k| gcra_at(k.rate, k.tat, permits))
            .map_or(Duration::ZERO, |at| at.since(now));
        total.retry_hint(now, ahead).max(by_key)
    }

    /// Returns a grant. `false` (and no change) if it is not held.
    pub fn release(
        &mut self,
        total: &mut LimiterCore,
        now: Timestamp,
        token: FencingToken,
        fx: &mut Effects,
    ) -> bool {
        self.advance(total, now, fx);
        if !total.release(now, token, fx) {
            return false;
        }
        self.forget_holder(now, token.0);
        self.grant_waiters(total, now, fx);
        true
    }

    /// A grant ended (released or lapsed): its key's share is freed.
    fn forget_holder(&mut self, now: Timestamp, token: u64) {
        let Some(h) = self.holders.remove(&token) else {
            return;
        };
        if let Some(k) = self.keys.get_mut(&h.key) {
            k.in_use -= h.permits;
            k.holders -= 1;
        }
        self.reindex(&h.key);
        self.wake_key(&h.key, now);
        self.maybe_drop(&h.key, now);
    }

    /// Moves a held grant's lease deadline; never revives (see [`LimiterCore::extend`]).
    pub fn extend(
        &mut self,
        total: &mut LimiterCore,
        now: Timestamp,
        token: FencingToken,
        lease: Duration,
        fx: &mut Effects,
    ) -> Result<Result<Timestamp, Lost>, InvalidField> {
        check_lease("lease_ms", lease)?;
        self.advance(total, now, fx);
        let out = total.extend(now, token, lease, fx)?;
        if let (Ok(deadline), Some(h)) = (out, self.holders.get_mut(&token.0)) {
            h.deadline = deadline;
            self.leases.push(Reverse((deadline, token.0)));
            self.compact_leases();
        }
        Ok(out)
    }

    /// Takes a queued waiter out of its key's queue (it gave up). `false` if it was not queued.
    pub fn cancel(
        &mut self,
        total: &mut LimiterCore,
        now: Timestamp,
        waiter: WaiterId,
        fx: &mut Effects,
    ) -> bool {
        self.advance(total, now, fx);
        let Some((name, _)) = self.dequeue(total, now, waiter.0, fx) else {
            return false;
        };
        total.counters.cancelled += 1;
        self.maybe_drop(&name, now);
        true
    }

    /// Applies the passage of time up to `now`: lease lapses, wait deadlines, per-key rate
    /// token times and the total's, in time order (a lapse before a deadline at the same
    /// moment), granting what each frees.
    pub fn advance(&mut self, total: &mut LimiterCore, now: Timestamp, fx: &mut Effects) {
        loop {
            let lease = self.peek_lease();
            let wait = self.peek_wait();
            let sleep = self.sleepers.peek().map(|Reverse((t, _, _))| *t);
            let idle = self.idle.peek().map(|Reverse((t, _, _))| *t);
            let learning = total.learning_until;
            let next = [learning, lease, sleep, idle, self.held_until, wait]
                .into_iter()
                .flatten()
                .min();
            let Some(at) = next.filter(|at| *at <= now) else {
                break;
            };
            if learning == Some(at) {
                total.advance(at, fx);
            } else if lease == Some(at) {
                // The total lets every lease due by then lapse; this layer frees their keys.
                total.advance(at, fx);
                while let Some(Reverse((d, token))) = self.leases.peek().copied() {
                    if d > at {
                        break;
                    }
                    self.leases.pop();
                    if self.holders.get(&token).is_some_and(|h| h.deadline == d) {
                        self.forget_holder(now, token);
                    }
                }
            } else if sleep == Some(at) {
                while let Some(Reverse((t, gen, name))) = self.sleepers.peek().cloned() {
                    if t > at {
                        break;
                    }
                    self.sleepers.pop();
                    if let Some(k) = self.keys.get_mut(&name).filter(|k| k.gen == gen) {
                        if k.sleeping == Some(t) {
                            k.sleeping = None;
                            self.wake_key(&name, now);
                        }
                    }
                }
            } else if idle == Some(at) {
                if let Some(Reverse((_, gen, name))) = self.idle.pop() {
                    if let Some(k) = self.keys.get_mut(&name).filter(|k| k.gen == gen) {
                        k.idle_armed = false;
                        self.maybe_drop(&name, now);
                    }
                }
            } else if wait == Some(at) {
                if let Some(Reverse((_, id))) = self.waits.pop() {
                    // Its key's next waiter is granted below, as of this deadline.
                    if let Some((name, w, _)) = self.dequeue_only(now, id) {
                        total.counters.timed_out += 1;
                        let retry_after = self.hint(total, now, &name, w.permits);
                        fx.wakes
                            .push((WaiterId(id), Err(Refusal::WaitTimeout { retry_after })));
                        self.maybe_drop(&name, now);
                    }
                }
            }
            // A lapse, a departed head or a token time may let someone run: judged as of that
            // moment, so a waiter whose own deadline came first is not granted late.
            self.grant_waiters_as_of(total, at, now, fx);
        }
        total.advance(now, fx);
    }

    /// The nearest live lease deadline, pruning stale heap entries.
    fn peek_lease(&mut self) -> Option<Timestamp> {
        while let Some(Reverse((d, token))) = self.leases.peek().copied() {
            if self.holders.get(&token).is_some_and(|h| h.deadline == d) {
                return Some(d);
            }
            self.leases.pop();
        }
        None
    }

    /// The nearest live wait deadline, pruning stale heap entries.
    fn peek_wait(&mut self) -> Option<Timestamp> {
        while let Some(Reverse((d, id))) = self.waits.peek().copied() {
            let live = self
                .waiter_key
                .get(&id)
                .and_then(|name| self.keys.get(name))
                .and_then(|k| k.queue.get(&id))
                .is_some_and(|w| w.deadline == d);
            if live {
                return Some(d);
            }
            self.waits.pop();
        }
        None
    }

    /// The earliest moment at which [`advance`](Self::advance) would change something; a store
    /// arms one timer for it.
    pub fn next_deadline(&mut self, total: &mut LimiterCore) -> Option<Timestamp> {
        let mine = [
            self.peek_lease(),
            self.peek_wait(),
            self.sleepers.peek().map(|Reverse((t, _, _))| *t),
            self.idle.peek().map(|Reverse((t, _, _))| *t),
            self.held_until,
        ];
        mine.into_iter()
            .flatten()
            .chain(total.next_deadline())
            .min()
    }

    /// Records a backend call's outcome: the total's adaptive limit moves as for a plain
    /// limiter (per-key adaptive limits are not built); a raised limit grants at once.
    pub fn feedback(
        &mut self,
        total: &mut LimiterCore,
        now: Timestamp,
        outcome: Feedback,
        latency: Option<std::time::Duration>,
        fx: &mut Effects,
    ) -> Option<u32> {
        self.advance(total, now, fx);
        let before = total.limit;
        let limit = total.feedback_with(now, outcome, latency, fx);
        if limit < before {
            self.refuse_impossible(total, now, fx);
        }
        self.grant_waiters(total, now, fx);
        limit
    }

    /// Changes the total and per-key configuration. Visits every key (to apply new per-key
    /// defaults): an administrative operation, not a hot one.
    pub fn reconfigure(
        &mut self,
        total: &mut LimiterCore,
        now: Timestamp,
        spec: LimiterSpec,
        keyed: KeyedSpec,
        fx: &mut Effects,
    ) -> Result<(), InvalidField> {
        keyed.validate(&spec)?;
        let derived = super::total_spec_for(&spec, &keyed);
        derived.validate_unbounded()?;
        self.advance(total, now, fx);
        total.reconfigure_total(now, derived, fx)?;
        self.user_concurrency = spec.concurrency;
        // Only new per-key defaults visit every key, as the keyed script's put does (it checks
        // the same two fields): visiting them anyway also dropped keys whose idle wake-up was
        // still ahead (after an unschedule shortened their debt), which the script kept until
        // then, so the two stores disagreed on the key count (h-krev16, keyed_twin).
        let changed = (keyed.concurrency, keyed.rate) != (self.spec.concurrency, self.spec.rate);
        self.spec = keyed;
        if !changed {
            // A lowered total may still leave waiters that can never run.
            self.refuse_impossible(total, now, fx);
            self.grant_waiters(total, now, fx);
            return Ok(());
        }
        // In a fixed order, not the map's (its hash seed differs per process): the keys this
        // change readies join the ring, and so are granted, in this order, and the durable
        // store's replay must hand the same tokens to the same keys as the original run did.
        // Oldest head waiter first (keys without waiters, which nothing readies, by name).
        let mut names: Vec<Arc<str>> = self.keys.keys().cloned().collect();
        names.sort_by_cached_key(|name| {
            (
                self.keys.get(name).and_then(|k| k.head_entry()),
                Arc::clone(name),
            )
        });
        for name in &names {
            let (limit, rate, weight) = self.limits_for(name);
            if let Some(k) = self.keys.get_mut(name) {
                (k.limit, k.rate, k.weight) = (limit, rate, weight);
            }
        }
        self.refuse_impossible(total, now, fx);
        for name in &names {
            self.wake_key(name, now);
            self.maybe_drop(name, now);
        }
        self.grant_waiters(total, now, fx);
        Ok(())
    }

    /// Sets (or with `None` removes) one key's override; applies at once to an active key.
    pub fn put_override(
        &mut self,
        total: &mut LimiterCore,
        now: Timestamp,
        key: &str,
        ov: Option<super::KeyOverride>,
        fx: &mut Effects,
    ) -> Result<(), InvalidField> {
        check_key(key)?;
        self.advance(total, now, fx);
        match ov {
            Some(ov) => {
                ov.validate()?;
                if ov.concurrency.is_some() && total.spec.concurrency.is_none() {
                    return Err(InvalidField::new(
                        "concurrency",
                        "a rate-only keyed limiter holds no permits: an override may set only \
                         its weight",
                    ));
                }
                if !self.overrides.contains_key(key)
                    && self.overrides.len() >= self.spec.max_keys as usize
                {
                    return Err(InvalidField::new(
                        "key",
                        format!(
                            "this limiter already has max_keys ({}) overrides",
                            self.spec.max_keys
                        ),
                    ));
                }
                self.overrides.insert(Arc::from(key), ov);
            }
            None => {
                self.overrides.remove(key);
            }
        }
        let (limit, rate, weight) = self.limits_for(key);
        let Some(name) = self.keys.get_key_value(key).map(|(n, _)| Arc::clone(n)) else {
            return Ok(());
        };
        if let Some(k) = self.keys.get_mut(&name) {
            (k.limit, k.rate, k.weight) = (limit, rate, weight);
        }
        self.refuse_impossible(total, now, fx);
        self.wake_key(&name, now);
        self.grant_waiters(total, now, fx);
        Ok(())
    }

    /// Refuses waiters asking for more than their key or the total can ever grant now (after
    /// a limit went down). Visits every waiter, as the core's does; only limit changes run it.
    fn refuse_impossible(&mut self, total: &mut LimiterCore, now: Timestamp, fx: &mut Effects) {
        let total_cap = total.permit_cap();
        let mut doomed = Vec::new();
        for k in self.keys.values() {
            let cap = [total_cap, k.limit, k.rate.map(|r| r.burst)]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(u32::MAX);
            for (id, w) in &k.queue {
                if w.permits > cap {
                    doomed.push((*id, w.permits, cap));
                }
            }
        }
        // By waiter id, not the map's order: a refusal may ready its key (joining the ring),
        // and replay must do that in the same order as the original run.
        doomed.sort_unstable();
        for (id, requested, limit) in doomed {
            if let Some((name, _)) = self.dequeue(total, now, id, fx) {
                total.counters.rejected += 1;
                fx.wakes.push((
                    WaiterId(id),
                    Err(Refusal::PermitsExceedLimit { requested, limit }),
                ));
                self.maybe_drop(&name, now);
            }
        }
    }

    /// Refuses every waiter: the limiter is going away.
    pub fn close(&mut self, total: &mut LimiterCore, fx: &mut Effects) {
        for k in self.keys.values_mut() {
            for (id, _) in std::mem::take(&mut k.queue) {
                total.counters.rejected += 1;
                fx.wakes.push((WaiterId(id), Err(Refusal::LimiterDeleted)));
            }
        }
        self.waiter_key.clear();
        self.requests.clear();
        self.waiting = 0;
        self.waiting_permits = 0;
    }
}
