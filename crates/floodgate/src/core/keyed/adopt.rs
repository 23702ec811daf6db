//! Re-adoption of a keyed limiter's permits during a learning window (see `core/learning.rs`).
//!
//! A plain limiter re-adopts an extend of a permit it does not know, carrying its permits,
//! while it learns. A keyed limiter needs one more thing: whose permit it is, so its key's
//! share is counted too. An extend that carries its key (the Rust `Permit`, the HTTP body's
//! `key`, the Python client) re-adopts the permit under the total *and* that key, with the
//! plain rule: it is held again even if that puts the total's or the key's in-use above its
//! limit (those holders really are working; nothing is granted, to any key, while the window
//! lasts, and afterwards only what fits both limits), and fencing tokens restart above it.
//! Without a key, outside a window, for a rate-only keyed limiter (nothing is held), or when
//! a new key would exceed `max_keys` (key state stays bounded), the permit is [`Lost`].

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Duration;

use super::{check_key, KeyLayer, KeyedHolder};
use crate::core::{Effects, LimiterCore, Lost};
use crate::spec::{check_lease, InvalidField};
use crate::types::{FencingToken, Timestamp};

impl KeyLayer {
    /// Like [`extend`](Self::extend), and during the total's learning window an extend of a
    /// permit this limiter does not know re-adopts it when `carried` gives its key and size
    /// (see the module documentation); `None`, an ordinary extend.
    pub fn extend_or_adopt(
        &mut self,
        total: &mut LimiterCore,
        now: Timestamp,
        token: FencingToken,
        lease: Duration,
        carried: Option<(&str, u32)>,
        fx: &mut Effects,
    ) -> Result<Result<Timestamp, Lost>, InvalidField> {
        check_lease("lease_ms", lease)?;
        self.advance(total, now, fx);
        let Some((key, permits)) = carried else {
            return self.extend(total, now, token, lease, fx);
        };
        let adopt = total.learning_until.is_some()
            && total.spec.concurrency.is_some()
            && !total.holders.contains_key(&token.0)
            && !self.holders.contains_key(&token.0)
            && token.0 != 0
            && token.0 <= crate::core::MAX_ADOPTED_TOKEN
            && permits >= 1
            && check_key(key).is_ok();
        if !adopt {
            return self.extend(total, now, token, lease, fx);
        }
        let name: Arc<str> = match self.keys.get_key_value(key) {
            Some((name, _)) => Arc::clone(name),
            None => {
                if self.keys.len() >= self.spec.max_keys as usize {
                    // Key state stays bounded: this holder is not counted, so it is told so.
                    return Ok(Err(Lost));
                }
                let name: Arc<str> = Arc::from(key);
                let k = self.new_key(key);
                self.keys.insert(Arc::clone(&name), k);
                name
            }
        };
        // The total's own re-adoption: held, counted, the token floor moved above it.
        let deadline = match total.extend_or_adopt(now, token, lease, Some(permits), fx)? {
            Ok(deadline) => deadline,
            Err(lost) => {
                self.maybe_drop(&name, now);
                return Ok(Err(lost));
            }
        };
        if let Some(k) = self.keys.get_mut(&name) {
            // Above the key's limit if need be, like the total: it blocks the key's waiters
            // until enough of its holders are gone.
            k.in_use = k.in_use.saturating_add(permits);
            k.holders += 1;
        }
        self.holders.insert(
            token.0,
            KeyedHolder {
                key: Arc::clone(&name),
                permits,
                deadline,
            },
        );
        self.leases.push(Reverse((deadline, token.0)));
        self.compact_leases();
        self.reindex(&name);
        Ok(Ok(deadline))
    }
}
