//! Re-learning after Redis lost a limiter's state (issue 10; the rules are in
//! `core/learning.rs`).
//!
//! Every script answers `unknown` when the limiter's keys are gone. A store that knows the
//! limiter (it created or changed it, or read its spec in a status reply) and is told it is
//! unknown concludes the state was lost (FLUSHALL, a restart without persistence, a failover to
//! a replica that missed the writes that created it), re-creates it from the last spec it saw
//! in a learning window, and runs the operation again. A limiter deleted on purpose leaves a
//! tombstone (the `tokens` key, kept for the idle TTL), so it is not resurrected. A keyed
//! limiter comes back the same way with its per-key spec and overrides (`keyed_revive.rs`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use super::keyed_revive::kput_args;
use super::limiter::{invalid, RedisLimiter};
use super::wake::Delivery;
use super::{unavailable, Inner};
use crate::error::StoreError;
use crate::spec::LimiterSpec;
use crate::store::LimiterBackend;
use crate::types::LimiterName;

/// Operations that re-create a vanished limiter before answering. `put` and `delete` act on the
/// definition themselves; `peek` and `cancel` concern waiters, which a loss took with it.
pub(super) fn revives(op: &str) -> bool {
    matches!(
        op,
        "acquire"
            | "release"
            | "extend"
            | "status"
            | "schedule"
            | "unschedule"
            | "feedback"
            | "advance"
            | "learn"
            // A keyed limiter's own operations (`keyed_revive.rs`).
            | "kacquire"
            | "kschedule"
            | "keys"
            | "put_key"
    )
}

/// What this store knows of limiters, so that a vanished one can be re-created.
#[derive(Debug, Default)]
pub(crate) struct Known {
    /// The last spec seen per limiter: put by this store or read in a status reply.
    pub(super) specs: HashMap<LimiterName, LimiterSpec>,
    /// Limiters whose spec has been asked for in the background, so it is asked once.
    pub(super) asked: HashSet<LimiterName>,
    /// Keyed limiters' definitions (total spec, per-key spec, overrides), to re-create one
    /// that vanished the same way (`keyed_revive.rs`).
    pub(super) keyed: HashMap<LimiterName, super::keyed_revive::KeyedDef>,
    /// When this store last added each limiter it uses to the listing set (`register`).
    pub(super) listed: HashMap<LimiterName, Instant>,
    /// How many specs this store has written or dropped (puts and revivals answered, key
    /// overrides, deletes; any limiter): the clock of `written` and `deletes`. A read
    /// sent before such a write of its limiter may be answered after it with the spec it
    /// replaced, or of the limiter it deleted: such a read records nothing (`read_is_stale`).
    pub(super) spec_writes: u64,
    /// `spec_writes` after this store's last write of each limiter's spec or definition
    /// (removed when it forgets the limiter).
    pub(super) written: HashMap<LimiterName, u64>,
    /// This store's last deletes (`spec_writes` after each, and the limiter), oldest first, at
    /// most [`DELETES_KEPT`]: a reply sent before one of them is of a limiter deleted since
    /// only if it names that limiter (`Known::forgot_maybe`).
    pub(super) deletes: VecDeque<(u64, LimiterName)>,
    /// `spec_writes` after the newest delete no longer in `deletes` (0: none): a reply sent
    /// before it may be of any limiter this store does not know.
    pub(super) deletes_dropped_at: u64,
    /// Limiters two of whose writes by this store crossed (one answered while the other was
    /// in flight): which Redis ran last is not known, so the put reads the limiter again
    /// (`RedisLimiter::take_crossed`).
    pub(super) crossed: HashSet<LimiterName>,
}

impl Known {
    /// Counts a write of `name`'s spec or definition by this store.
    pub(super) fn wrote(&mut self, name: &LimiterName) {
        self.spec_writes += 1;
        self.written.insert(name.clone(), self.spec_writes);
    }

    /// Whether this store deleted `name` (or, for all it can tell, did: `forgot_maybe`) after
    /// the count was `writes_before`. A write of its own sent before that delete and answered
    /// after it cannot tell whether Redis ran it first (the limiter is gone) or after (it
    /// exists again).
    pub(super) fn deleted_since(&self, name: &LimiterName, writes_before: u64) -> bool {
        !self.written.contains_key(name) && self.forgot_maybe(name, writes_before)
    }

    /// Whether this store may have deleted `name`, which it has no write of, since the count
    /// was `writes_before`: it does not know it (a delete forgets it; one it still knows was
    /// not deleted, and what it knows of it is older than the reply in hand), and it deleted
    /// it since, or deleted limiters since that it no longer keeps the names of. (Taken for
    /// deleted whenever any limiter was, a limiter this store created while it deleted another
    /// was unknown to it, and not re-created after a loss.)
    fn forgot_maybe(&self, name: &LimiterName, writes_before: u64) -> bool {
        if self.specs.contains_key(name) || self.keyed.contains_key(name) {
            return false;
        }
        self.deletes_dropped_at > writes_before
            || self
                .deletes
                .iter()
                .rev()
                .take_while(|(at, _)| *at > writes_before)
                .any(|(_, deleted)| deleted == name)
    }

    /// Counts a delete of `name` by this store.
    fn deleted(&mut self, name: &LimiterName) {
        self.spec_writes += 1;
        if self.deletes.len() >= DELETES_KEPT {
            if let Some((at, _)) = self.deletes.pop_front() {
                self.deletes_dropped_at = at;
            }
        }
        self.deletes.push_back((self.spec_writes, name.clone()));
    }

    /// Whether a read of `name` sent when the count was `writes_before` may predate this
    /// store's own write of it since (or, for a limiter it has no write of and does not know,
    /// a delete of it: `forgot_maybe`). Writes of other limiters do not make it
    /// stale: taken for stale, a read that would have taught a spec changed by another server
    /// was dropped, and a revival used the older one.
    pub(super) fn read_is_stale(&self, name: &LimiterName, writes_before: u64) -> bool {
        match self.written.get(name) {
            Some(at) => *at > writes_before,
            None => self.forgot_maybe(name, writes_before),
        }
    }
}

impl Inner {
    pub(super) fn lock_known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The limiters this store knows a spec of.
    pub(super) fn known_names(&self) -> Vec<LimiterName> {
        let known = self.lock_known();
        known
            .specs
            .keys()
            .chain(known.keyed.keys())
            .cloned()
            .collect()
    }
}

impl RedisLimiter {
    /// Records the spec this store has just written (a put's or revival's reply, the write
    /// sent when the count was `writes_before`) as the one to re-create the limiter with;
    /// unless this store deleted the limiter meanwhile (`Known::deleted_since`): Redis may have
    /// run the delete after the write, and the deleted limiter, known again, was re-created
    /// after a loss that took its tombstone too. Then it is read again at its next use
    /// (`after_use`), which finds it if it exists.
    pub(super) fn remember_written(&self, spec: &LimiterSpec, writes_before: u64) {
        let mut known = self.store.lock_known();
        if known.deleted_since(&self.name, writes_before) {
            known.asked.remove(&self.name);
            return;
        }
        if known
            .written
            .get(&self.name)
            .is_some_and(|at| *at > writes_before)
        {
            known.crossed.insert(self.name.clone());
        }
        known.wrote(&self.name);
        self.remember_in(known, spec);
    }

    /// Whether another write of this limiter by this store was answered while this store's
    /// last put of it was in flight (`Known::crossed`); cleared.
    pub(super) fn take_crossed(&self) -> bool {
        self.store.lock_known().crossed.remove(&self.name)
    }

    /// Records the spec a revival of this store re-created the limiter with (as
    /// [`remember_written`](Self::remember_written)), unless this store put the limiter since
    /// the revival was sent: a revival creates only a limiter that does not exist (and
    /// answers `revived` otherwise), so that put ran after it in Redis and its spec stands.
    /// (Recorded, the revival's older spec replaced the put's, and the next loss re-created
    /// the limiter with it.)
    pub(super) fn remember_revived(&self, spec: &LimiterSpec, writes_before: u64) {
        let mut known = self.store.lock_known();
        let put_since = known
            .written
            .get(&self.name)
            .is_some_and(|at| *at > writes_before);
        if put_since {
            return;
        }
        if known.deleted_since(&self.name, writes_before) {
            known.asked.remove(&self.name);
            return;
        }
        known.wrote(&self.name);
        self.remember_in(known, spec);
    }

    /// This store's count of spec writes, read before a status read is sent (`remember_read`).
    pub(super) fn spec_writes(&self) -> u64 {
        self.store.lock_known().spec_writes
    }

    /// Records the spec a status read found, unless this store wrote this limiter's spec or
    /// deleted it since the read was sent (`writes_before`, from
    /// [`spec_writes`](Self::spec_writes); `Known::read_is_stale`): Redis may have run the
    /// read before that write, so its spec may be the one the write replaced (the write's is
    /// kept), or that of the limiter the delete removed (recorded, the store re-created the
    /// limiter it had deleted after a loss that took the tombstone too). A limiter this store
    /// then does not know is read again at its next use (`after_use`).
    pub(super) fn remember_read(&self, spec: &LimiterSpec, writes_before: u64) {
        let mut known = self.store.lock_known();
        if known.read_is_stale(&self.name, writes_before) {
            if !known.specs.contains_key(&self.name) && !known.keyed.contains_key(&self.name) {
                known.asked.remove(&self.name);
            }
            return;
        }
        self.remember_in(known, spec);
    }

    fn remember_in(&self, mut known: std::sync::MutexGuard<'_, Known>, spec: &LimiterSpec) {
        if self.store.is_keyed(&self.name) {
            // A keyed limiter's total spec, kept with its definition (`keyed_revive.rs`),
            // which is read once in the background if this store does not have it.
            if let Some(def) = known.keyed.get_mut(&self.name) {
                def.spec = spec.clone();
            } else if known.asked.insert(self.name.clone()) {
                drop(known);
                self.learn_keyed_def_in_background();
            }
            return;
        }
        known.asked.insert(self.name.clone());
        known.specs.insert(self.name.clone(), spec.clone());
    }

    /// Forgets the limiter: it was deleted, and is not to be re-created.
    pub(super) fn forget(&self) {
        let mut known = self.store.lock_known();
        // A status read in flight may carry the deleted limiter's spec (`remember_read`).
        known.deleted(&self.name);
        known.written.remove(&self.name);
        known.specs.remove(&self.name);
        known.asked.remove(&self.name);
        known.keyed.remove(&self.name);
        known.listed.remove(&self.name);
        known.crossed.remove(&self.name);
    }

    /// Forgets the plain spec only: the limiter turned out keyed (its keyed definition, if
    /// known, stays; if not, the next operation reads it in the background).
    pub(super) fn forget_plain(&self) {
        let mut known = self.store.lock_known();
        known.specs.remove(&self.name);
        if !known.keyed.contains_key(&self.name) {
            known.asked.remove(&self.name);
        }
    }

    /// What this store does after each operation that found the limiter, under one lock of
    /// `known` (every operation passes here: one uncontended lock, and no allocation once both
    /// are done):
    /// - the first time it uses a limiter it has not defined (another server did), it reads its
    ///   spec in the background, so it can re-create it after a loss too;
    /// - it keeps a limiter it uses in the listing set: added again (`register`) at its first
    ///   use by this store and then at most every [`RELIST_EVERY`]. The set's TTL was renewed
    ///   only by a `put` or a revival, so it expired `idle_ttl` after the last one while the
    ///   limiters were in use (every operation renews theirs), and the listing (the dashboard,
    ///   `GET /limiters`, `limiter apply`) then showed none of them.
    ///
    /// Neither after a delete (or its drain): the limiter is gone, and the delete forgets it
    /// at once. Its spec was read in the background all the same when this store had not
    /// known it: a wasted round trip whose reply could only be `unknown`.
    pub(super) fn after_use(&self, op: &str, reply: &[String]) {
        if matches!(op, "delete" | "drain") {
            return;
        }
        let tag = reply.first().map(String::as_str);
        // A status reply carries the spec already (`status` remembers it).
        let may_learn = !matches!(tag, Some("unknown" | "gone" | "status"));
        // Only a limiter that exists (not one gone or deleted).
        let may_list = !matches!(tag, Some("unknown" | "gone" | "deleted" | "drained"));
        if !may_learn && !may_list {
            return;
        }
        let (learn, relist) = {
            let mut known = self.store.lock_known();
            let learn = may_learn && !known.asked.contains(&self.name);
            if learn {
                known.asked.insert(self.name.clone());
            }
            let relist = may_list && {
                let now = Instant::now();
                let due = known
                    .listed
                    .get(&self.name)
                    .is_none_or(|at| now.duration_since(*at) >= RELIST_EVERY);
                if due {
                    known.listed.insert(self.name.clone(), now);
                }
                due
            };
            (learn, relist)
        };
        if !learn && !relist {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if learn {
            let limiter = self.clone();
            handle.spawn(async move {
                // `status` remembers the spec it reads; a keyed limiter's definition is read
                // too.
                if limiter.status().await.is_err() || limiter.learn_keyed_def(None).await.is_err() {
                    limiter.store.lock_known().asked.remove(&limiter.name);
                }
            });
        }
        if relist {
            let inner = Arc::clone(&self.store);
            let name = self.name.clone();
            handle.spawn(async move {
                if register(&inner, &name).await.is_err() {
                    // Tried again at the next operation.
                    inner.lock_known().listed.remove(&name);
                }
            });
        }
    }

    /// The learning window for this limiter if this store knows it: a `put` that finds it
    /// vanished (and not deleted on purpose) re-creates it learning, like a revival.
    pub(super) fn known_window(&self) -> Option<std::time::Duration> {
        let known = self.store.lock_known();
        let spec = known
            .specs
            .get(&self.name)
            .or_else(|| known.keyed.get(&self.name).map(|def| &def.spec))?;
        Some(
            self.store
                .config
                .learning_window
                .unwrap_or(spec.default_lease),
        )
    }

    /// Enters a learning window on the limiter as Redis has it now (`generation.rs`: Redis
    /// changed under the store and may have lost the last writes); re-creates it learning if it
    /// vanished.
    pub(super) async fn learn(&self) -> Result<(), StoreError> {
        let Some(window) = self.known_window() else {
            return Ok(());
        };
        let us = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
        let sent = self.store.tick();
        let reply = self.call_once("learn", &[us.to_string()]).await?;
        if reply.first().map(String::as_str) == Some("unknown") {
            self.revive(sent).await?;
        }
        Ok(())
    }

    /// Re-creates the vanished limiter from the last spec seen (a keyed one from its
    /// definition, overrides and all, in one call: `keyed_revive.rs`), in a learning window (the configured
    /// one, or the spec's default lease). `sent`: when the call that found it gone was sent
    /// (see [`answer_lost_waiters`](Self::answer_lost_waiters)). `false` if this store does
    /// not know the limiter or it was deleted on purpose.
    ///
    /// Plain and keyed limiters share it: two revivers may race (two servers, or two calls of
    /// one), and the script answers the later one `revived` (`lua/ops/put.lua`,
    /// `lua/keyed/put.lua`), so it does not log a re-creation it did not make. It registers the
    /// limiter in the listing set all the same (idempotent): the winner may have died between
    /// its `put` and its `register`, and nothing else would list the limiter again.
    pub(super) async fn revive(&self, sent: u64) -> Result<bool, StoreError> {
        let keyed = self.store.lock_known().keyed.get(&self.name).cloned();
        let window = |spec: &LimiterSpec| {
            self.store
                .config
                .learning_window
                .unwrap_or(spec.default_lease)
        };
        let (op, args, window) = match &keyed {
            Some(def) => {
                let window = window(&def.spec);
                // The overrides come back in the same call (`lua/keyed/put.lua`).
                let args = kput_args(&def.spec, &def.keyed, Some(window), true, &def.overrides);
                ("kput", args, window)
            }
            None => {
                let Some(spec) = self.store.lock_known().specs.get(&self.name).cloned() else {
                    return Ok(false);
                };
                let window = window(&spec);
                ("put", Self::put_args(&spec, Some(window), true), window)
            }
        };
        let writes = self.spec_writes();
        let reply = self.call_once(op, &args).await?;
        match (reply.first().map(String::as_str), &keyed) {
            (Some("status"), _) => {
                let status = self.parse_status(&reply)?;
                self.remember_revived(&status.spec, writes);
                self.answer_lost_waiters(sent);
                tracing::warn!(
                    limiter = %self.name,
                    keyed = keyed.is_some(),
                    window_ms = window.as_millis(),
                    learning = status.learning,
                    overrides = keyed.as_ref().map_or(0, |def| def.overrides.len()),
                    "the limiter vanished from redis (state lost): re-created from its last definition, learning who still holds permits"
                );
                register(&self.store, &self.name).await?;
                Ok(true)
            }
            // Revived first by another server or another call of this one: the waiters that
            // queued on it since are kept.
            (Some("revived"), _) => {
                self.answer_lost_waiters(sent);
                register(&self.store, &self.name).await?;
                Ok(true)
            }
            (Some("deleted"), _) => {
                self.forget();
                Ok(false)
            }
            // A keyed limiter re-created plain by another server meanwhile: not this store's
            // to revive.
            (Some("invalid"), Some(_)) => {
                self.forget();
                self.store.mark_keyed(&self.name, false);
                Ok(false)
            }
            (Some("invalid"), None) => Err(StoreError::Invalid(invalid(&reply))),
            _ => Err(unavailable(format!("unexpected script reply {reply:?}"))),
        }
    }
}

/// Adds the limiter to the listing set (which the loss took too), and refreshes the set's TTL.
/// Idempotent (SADD), so every reviver and every `put` may call it.
///
/// Not checked against `max_limiters` (the `REGISTER` script in `mod.rs` is): a revived limiter
/// is not a new one. It was counted when it was created, and its `put` has already run, so a
/// refusal here would only leave a limiter that exists unlisted. After a loss the set holds
/// only the names registered since, so the cap could not be judged against it anyway. A `put`
/// calls it after its `put`, the cap having been checked before.
///
/// The set's TTL is never shortened, and is at least the limiter's own (its `meta`'s, read
/// first: a rate's debt keeps a limiter's keys past the idle TTL, 100 days after a burst of 100
/// at one a day) plus twice [`RELIST_EVERY`]: its keys were last renewed at most one
/// `RELIST_EVERY` before this and are renewed again at most one after it, before the next
/// relisting. Kept only the idle TTL plus an hour, the set expired while such a limiter was
/// kept: it still existed, and the listing and `max_limiters` no longer counted it.
///
/// Only a limiter that exists (its `meta` is there) is added, and `meta` is read again after
/// the add: a delete (its script, then its `SREM`) may have run in between, the `SREM` before
/// the add, and the name is then removed again. Without that, a relisting sent before a delete
/// and run after it (this store's background one, or another server's) listed the deleted
/// limiter, counted against `max_limiters` until a listing dropped it. One script cannot do
/// both (`meta` is in the limiter's slot, the set in its own on a Cluster), hence the reads
/// around the write; and the name is added back if `meta` is there again after the removal
/// (re-created meanwhile, its `put`'s own add perhaps before the removal).
pub(super) async fn register(inner: &Arc<Inner>, name: &LimiterName) -> Result<(), StoreError> {
    let key = format!("{}:limiters", inner.config.prefix);
    let meta = super::script::meta_key(&inner.config.prefix, name.as_str());
    let mut conn = inner.conn.clone();
    let every = u64::try_from(RELIST_EVERY.as_millis()).unwrap_or(u64::MAX);
    // Whether this call's last write added the name (rather than removed it, or none yet).
    let mut added = false;
    let mut removals = 0;
    loop {
        // A separate command: `meta` is in the limiter's slot, the set in its own.
        let meta_ms: i64 = redis::cmd("PTTL")
            .arg(&meta)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        // -2: no such key (-1, no TTL, is not expected: counted as 0 left).
        let exists = meta_ms != -2;
        if exists == added {
            break;
        }
        if exists {
            let ttl = u64::try_from(meta_ms)
                .unwrap_or(0)
                .saturating_add(every.saturating_mul(2))
                .max(inner.config.listing_ttl_ms());
            redis::Script::new(super::LIST)
                .key(&key)
                .arg(name.as_str())
                .arg(i64::try_from(ttl).unwrap_or(i64::MAX))
                .invoke_async::<()>(&mut conn)
                .await
                .map_err(unavailable)?;
            added = true;
        } else if removals >= MAX_UNLISTS {
            // Deleted and re-created over and over meanwhile: left listed, which the next
            // listing corrects if it is gone (an unlisted limiter that exists would not be).
            break;
        } else {
            redis::cmd("SREM")
                .arg(&key)
                .arg(name.as_str())
                .query_async::<()>(&mut conn)
                .await
                .map_err(unavailable)?;
            added = false;
            removals += 1;
        }
    }
    if added {
        inner
            .lock_known()
            .listed
            .insert(name.clone(), Instant::now());
    }
    Ok(())
}

/// How many of its last deletes a store keeps the names of (`Known::deletes`): a reply sent
/// before older ones is taken as possibly of any limiter it does not know.
const DELETES_KEPT: usize = 1024;

/// How many times [`register`] removes again a name it added for a limiter deleted meanwhile.
const MAX_UNLISTS: u32 = 3;

/// How often a store adds a limiter it uses to the listing set again
/// (`RedisLimiter::after_use`). The set lives at least this much longer than a limiter's keys
/// (`RedisConfig::listing_ttl_ms`, [`register`]), so it outlives every limiter in use: each was
/// added at most this long before its last use.
pub(super) const RELIST_EVERY: Duration = Duration::from_secs(3600);

impl Inner {
    /// The next mark on [`order`](Inner::order).
    pub(super) fn tick(&self) -> u64 {
        self.order.fetch_add(1, Ordering::SeqCst)
    }
}

impl RedisLimiter {
    /// Marks this call's waiter `key` queued (its `queued` reply has arrived).
    pub(super) fn mark_queued(&self, key: &str, attempt: u64) {
        let at = self.store.tick();
        if let Some(pending) = self
            .store
            .lock_waiters()
            .get_mut(key)
            .filter(|p| p.attempt == attempt)
        {
            pending.queued = Some(at);
        }
    }

    /// Answers this process's waiters of a lost incarnation "store unavailable" (their clients
    /// retry): nothing would ever wake them. Those are the waiters whose `queued` reply came
    /// before the call that found the limiter gone was sent (`sent`): that call ran after them
    /// and found no queue. The others are kept: one whose acquire was still on its way, or
    /// answered later, may be queued on the new incarnation, made by this revival or another
    /// (before, the later of two revivers answered those too, and their clients saw a failure
    /// for a wait that stood). One that was in fact lost ends at its own deadline, whose cancel
    /// finds nothing and answers it the same way.
    pub(super) fn answer_lost_waiters(&self, sent: u64) {
        let lost: Vec<_> = self
            .store
            .lock_waiters()
            .extract_if(|_, pending| {
                pending.limiter == self.name && pending.queued.is_some_and(|at| at <= sent)
            })
            .collect();
        for (_, pending) in lost {
            // Told why, where a dropped sender would read as a lost subscription.
            let _ = pending.tx.send(Delivery::StateLost);
        }
    }
}
