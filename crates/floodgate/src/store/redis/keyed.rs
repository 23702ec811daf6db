//! Keyed limiters on Redis: a second script (`lua/keyed/`, joined by `script.rs`) runs every
//! operation of a keyed limiter, with the plain limiter state as its total and the keys' state
//! in nine more keys under the same hash tag (see `lua/keyed/drain.lua`).
//!
//! Which script a limiter's operation goes to: a store remembers the keyed limiters it has
//! seen. The plain script answers `keyed` for a keyed limiter (a store that did not know it,
//! another server created it) and the operation runs again in the keyed script; the keyed
//! script answers `plain` for a plain limiter (deleted and re-created plain meanwhile). So a
//! limiter is never served by the wrong rules, and the common case costs one script call.
//!
//! After Redis lost a keyed limiter's state, a store that knew it re-creates it in a learning
//! window (`keyed_revive.rs`).

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use super::limiter::{field, invalid, RedisLimiter};
use super::{unavailable, Inner, RedisStore};
use crate::core::keyed::{
    check_key, total_spec_for, KeyCounters, KeyInfo, KeyOverride, KeyedSpec, KeysView,
};
use crate::core::{LimiterStatus, Refusal};
use crate::error::StoreError;
use crate::spec::{InvalidField, LimiterSpec, RateSpec, MAX_CONCURRENCY};
use crate::types::{LimiterName, ReservationId, Schedule};

/// The keyed script's own keys, after the plain script's eleven (see `lua/keyed/drain.lua`).
const KEYED_KEYS: [&str; 9] = [
    "kstate",
    "koverrides",
    "kqueue",
    "kring",
    "kholders",
    "kbusy",
    "ksleep",
    "kidle",
    "kheads",
];

impl Inner {
    /// Whether this store has seen the limiter keyed (its operations go to the keyed script).
    pub(super) fn is_keyed(&self, name: &LimiterName) -> bool {
        self.keyed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(name)
    }

    /// Records which script serves the limiter.
    pub(super) fn mark_keyed(&self, name: &LimiterName, keyed: bool) {
        let mut set = self.keyed.lock().unwrap_or_else(PoisonError::into_inner);
        if keyed {
            set.insert(name.clone());
        } else {
            set.remove(name);
        }
    }
}

/// Operations only the keyed script has: keyed acquires (the key after the plain acquire's
/// arguments), keyed puts (the per-key fields after the plain put's), schedules, keys and
/// overrides. Their own names, so a change of the plain operations' arguments cannot be
/// mistaken for them.
fn keyed_only(op: &str) -> bool {
    matches!(
        op,
        "kacquire" | "kput" | "kschedule" | "keys" | "put_key" | "kdef"
    )
}

fn tag(reply: &[String]) -> Option<&str> {
    reply.first().map(String::as_str)
}

fn not_keyed() -> InvalidField {
    InvalidField::new(
        "key",
        "this limiter is not keyed: create it with per_key to use keys",
    )
}

/// A keyed acquire's refusals the plain parser does not know; `None` for the others.
pub(super) fn refusal(reply: &[String]) -> Option<Refusal> {
    Some(match tag(reply)? {
        "too_many_keys" => Refusal::TooManyKeys {
            max_keys: u32::try_from(field(reply, 1).ok()?).unwrap_or(u32::MAX),
            retry_after: Duration::from_micros(field(reply, 2).ok()?),
        },
        "no_key" => Refusal::Invalid(InvalidField::new(
            "key",
            "this limiter is keyed: every acquire names a key",
        )),
        "plain" => Refusal::Invalid(not_keyed()),
        _ => return None,
    })
}

/// A refusal of the keyed script naming a field of its own (`per_key`, `key`), or else one of
/// the spec's.
fn keyed_invalid(reply: &[String]) -> InvalidField {
    let message = reply.get(2).cloned().unwrap_or_default();
    match reply.get(1).map(String::as_str) {
        Some("per_key") => InvalidField::new("per_key", message),
        Some("key") => InvalidField::new("key", message),
        Some("count") => InvalidField::new("count", message),
        _ => invalid(reply),
    }
}

/// A plain put's arguments for the keyed script: the per-key spec kept, the total's
/// concurrency as sent.
fn keep_args(args: &[String]) -> Vec<String> {
    let mut out = args.to_vec();
    let user = out.first().cloned().unwrap_or_default();
    if let Some(conc) = out.first_mut().filter(|c| c.is_empty()) {
        *conc = MAX_CONCURRENCY.to_string();
    }
    out.extend([String::new(), String::new(), user, "keep".to_owned()]);
    out.extend([String::new(), String::new(), String::new()]);
    // No overrides to put back: a keep never re-creates a limiter (`plain` if it is gone).
    out.push("0".to_owned());
    out
}

impl RedisLimiter {
    /// Whether this operation goes to the keyed script first.
    pub(super) fn runs_keyed(&self, op: &str) -> bool {
        keyed_only(op) || self.store.is_keyed(&self.name)
    }

    /// The keyed script's own keys of this limiter, under its hash tag.
    pub(super) fn keyed_keys(&self) -> [String; 9] {
        let p = &self.store.config.prefix;
        let n = self.name.as_str();
        KEYED_KEYS.map(|k| format!("{p}:{{{n}}}:{k}"))
    }

    /// Runs the operation again in the other script when the one it ran in answered that the
    /// limiter is not its kind (see the module documentation).
    pub(super) async fn reroute(
        &self,
        keyed: bool,
        op: &str,
        args: &[String],
        reply: Vec<String>,
    ) -> Result<Vec<String>, StoreError> {
        match (keyed, tag(&reply)) {
            (_, Some("keyed")) if op == "put" => {
                // A plain put of a keyed limiter: its per-key spec is kept.
                self.store.mark_keyed(&self.name, true);
                self.forget_plain();
                let reply = self.run_script(true, "kput", &keep_args(args)).await?;
                if tag(&reply) == Some("plain") {
                    self.store.mark_keyed(&self.name, false);
                    return self.run_script(false, op, args).await;
                }
                Ok(reply)
            }
            (false, Some("keyed")) => {
                self.store.mark_keyed(&self.name, true);
                // Not to be re-created plain after a loss (`keyed_revive.rs` has it keyed).
                self.forget_plain();
                self.run_script(true, op, args).await
            }
            (true, Some("plain")) => {
                self.store.mark_keyed(&self.name, false);
                self.forget_keyed();
                if keyed_only(op) {
                    return Ok(reply);
                }
                self.run_script(false, op, args).await
            }
            _ => Ok(reply),
        }
    }

    /// Creates or changes a keyed limiter (the name registered by the caller).
    async fn put_keyed(
        &self,
        spec: &LimiterSpec,
        keyed: &KeyedSpec,
        learn: Option<Duration>,
    ) -> Result<LimiterStatus, StoreError> {
        // A limiter this store knew that vanished is re-created learning, as a plain one.
        let learn = learn.or_else(|| self.known_window());
        // The overrides this store knows, put back by the script only if this call re-creates
        // a limiter that vanished (it enters a learning window).
        let overrides = self.known_overrides();
        let args = super::keyed_revive::kput_args(spec, keyed, learn, false, &overrides);
        let writes = self.spec_writes();
        let reply = self.call_once("kput", &args).await?;
        match tag(&reply) {
            Some("status") => {
                self.store.mark_keyed(&self.name, true);
                self.forget_plain();
                self.parse_status(&reply)
                    .inspect(|status| self.remember_written(&status.spec, writes))
            }
            Some("invalid") => Err(StoreError::Invalid(keyed_invalid(&reply))),
            Some("deleted") => Err(unavailable("put answered `deleted`")),
            _ => Err(unavailable(format!("unexpected script reply {reply:?}"))),
        }
    }

    /// [`LimiterBackend::put_key`](crate::LimiterBackend::put_key) on Redis.
    pub(super) async fn put_key_override(
        &self,
        key: &str,
        over: Option<KeyOverride>,
    ) -> Result<(), StoreError> {
        check_key(key)?;
        if let Some(over) = &over {
            over.validate()?;
        }
        let args = super::keyed_revive::override_args(key, over.as_ref());
        let reply = self.call("put_key", &args).await?;
        match tag(&reply) {
            Some("ok") => {
                self.remember_override(key, over);
                Ok(())
            }
            Some("plain") => Err(StoreError::Invalid(not_keyed())),
            Some("unknown") => Err(StoreError::UnknownLimiter(self.name.clone())),
            Some("invalid") => Err(StoreError::Invalid(keyed_invalid(&reply))),
            _ => Err(unavailable(format!("unexpected script reply {reply:?}"))),
        }
    }

    /// [`LimiterBackend::schedule_keyed`](crate::LimiterBackend::schedule_keyed) on Redis.
    pub(super) async fn schedule_key(&self, key: &str, count: u32) -> Result<Schedule, StoreError> {
        check_key(key)?;
        if count == 0 || count > crate::core::MAX_SCHEDULE {
            return Err(StoreError::Invalid(InvalidField::new(
                "count",
                format!("must be from 1 to {}", crate::core::MAX_SCHEDULE),
            )));
        }
        let reservation = ReservationId::random();
        let reply = self
            .call(
                "kschedule",
                &[key.to_owned(), count.to_string(), reservation.to_string()],
            )
            .await?;
        match tag(&reply) {
            Some("offsets") => Ok(Schedule {
                offsets: super::limiter::offsets(&reply)?,
                reservation,
            }),
            Some("plain") => Err(StoreError::Invalid(not_keyed())),
            Some("unknown") => Err(StoreError::UnknownLimiter(self.name.clone())),
            Some("invalid") => Err(StoreError::Invalid(keyed_invalid(&reply))),
            Some("too_many_keys") => match refusal(&reply) {
                Some(Refusal::TooManyKeys {
                    max_keys,
                    retry_after,
                }) => Err(StoreError::TooManyKeys {
                    max_keys,
                    retry_after,
                }),
                _ => Err(unavailable(format!("unexpected script reply {reply:?}"))),
            },
            _ => Err(unavailable(format!("unexpected script reply {reply:?}"))),
        }
    }

    /// [`LimiterBackend::keys`](crate::LimiterBackend::keys) on Redis: `None`, without a round
    /// trip, for a limiter this store has not seen keyed (any operation on a keyed one, the
    /// status first of all, teaches it).
    pub(super) async fn keys_view(&self, limit: usize) -> Result<Option<KeysView>, StoreError> {
        if !self.store.is_keyed(&self.name) {
            return Ok(None);
        }
        let limit = limit.min(crate::core::keyed::MAX_KEYS_LISTED);
        let writes = self.spec_writes();
        let reply = self.call("keys", &[limit.to_string()]).await?;
        match tag(&reply) {
            Some("keys") => {
                let view = parse_keys(&reply)?;
                self.remember_keyed_spec(&view.spec, writes);
                // A store that lists a keyed limiter's keys knows its definition from then on
                // (read once, if the background read has not yet, and again when its overrides
                // changed), to revive it after a loss.
                let overrides_at = reply.len().checked_sub(2).map(|i| reply[i].as_str());
                if let Err(e) = self.learn_keyed_def(overrides_at).await {
                    // The view stands; the definition is read again next time.
                    tracing::debug!(limiter = %self.name, error = %e, "keyed definition not read");
                }
                Ok(Some(view))
            }
            Some("plain") => Ok(None),
            Some("unknown") => Err(StoreError::UnknownLimiter(self.name.clone())),
            _ => Err(unavailable(format!("unexpected script reply {reply:?}"))),
        }
    }
}

/// Parses the `keys` reply (see `lua/keyed/acquire.lua`).
fn parse_keys(reply: &[String]) -> Result<KeysView, StoreError> {
    let n = |i: usize| field(reply, i);
    let small = |i: usize| -> Result<u32, StoreError> {
        u32::try_from(n(i)?).map_err(|_| unavailable("keys field out of range"))
    };
    let opt_small = |i: usize| -> Result<Option<u32>, StoreError> {
        match reply.get(i).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(_) => small(i).map(Some),
        }
    };
    let rate = match opt_small(7)? {
        Some(limit) => Some(RateSpec {
            limit,
            period: Duration::from_micros(n(8)?),
            burst: small(9)?,
        }),
        None => None,
    };
    let spec = KeyedSpec {
        concurrency: opt_small(5)?,
        rate,
        max_keys: small(6)?,
    };
    let mut busiest = Vec::new();
    // Fields 10.. are keys of six fields each; the reply ends with when the overrides last
    // changed and the next-deadline delay.
    let mut i = 10;
    while i + 6 < reply.len() {
        busiest.push(KeyInfo {
            key: Arc::from(reply[i].as_str()),
            in_use: small(i + 1)?,
            holders: small(i + 2)?,
            waiting: small(i + 3)?,
            limit: opt_small(i + 4)?,
            weight: small(i + 5)?,
        });
        i += 6;
    }
    Ok(KeysView {
        spec,
        count: n(1)?,
        overrides: n(2)?,
        busiest,
        counters: KeyCounters {
            too_many_keys: n(3)?,
            keys_created: n(4)?,
        },
    })
}

impl RedisStore {
    /// [`Store::put_keyed_limiter`](crate::Store::put_keyed_limiter) on Redis; `learn`: a
    /// learning window to enter if this call creates it (`restore_keyed_limiter`).
    pub(super) async fn put_keyed(
        &self,
        name: &LimiterName,
        spec: LimiterSpec,
        keyed: KeyedSpec,
        learn: Option<Duration>,
    ) -> Result<LimiterStatus, StoreError> {
        keyed.validate(&spec)?;
        // A rate-only keyed limiter's total runs without a concurrency limit (paced grants), and
        // with per-key rates alone without a rate either (unbounded).
        total_spec_for(&spec, &keyed).validate_unbounded()?;
        let mark = self.register(name).await?;
        let handle = self.handle(name);
        let writes = handle.spec_writes();
        let status = handle.put_keyed(&spec, &keyed, learn).await?;
        handle.remember_keyed(&spec, &keyed, writes);
        if handle.take_crossed() {
            // As a plain put's (`put_learning`): the definition Redis has is read.
            if let Err(e) = handle.reread_keyed_def().await {
                tracing::debug!(limiter = %name, error = %e, "definition not read again");
            }
        }
        super::revive::register(&self.inner, name).await?;
        self.unmark_creating(name, mark.as_deref()).await;
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    /// The script refuses a `per_key` put of a plain limiter in the words every store uses,
    /// which `floodgate limiter apply --dry-run` reports without asking the server.
    #[test]
    fn the_script_refuses_keying_a_plain_limiter_in_the_shared_words() {
        let script = include_str!("lua/keyed/put.lua");
        let quoted = format!("'{}'", crate::core::keyed::PLAIN_STAYS_PLAIN);
        assert!(script.contains(&quoted), "{quoted} is not in keyed/put.lua");
    }
}
