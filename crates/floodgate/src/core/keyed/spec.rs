//! What a keyed limiter allows per key, and the per-key overrides.

use crate::spec::{InvalidField, LimiterSpec, RateSpec, MAX_CONCURRENCY, MAX_RATE};

/// Default cap on the keys a keyed limiter tracks at once.
pub const DEFAULT_MAX_KEYS: u32 = 100_000;
/// Largest `max_keys` accepted: about a gigabyte of key state at the cap.
pub const MAX_KEYS: u32 = 10_000_000;
/// Longest key accepted, in characters.
pub const MAX_KEY_LEN: usize = 256;
/// Largest weight a key's override may give it.
pub const MAX_WEIGHT: u32 = 1_000;
/// Why a `per_key` put of a plain limiter that exists is refused (field `per_key`), in every
/// store (the Redis script's text is checked to be this): `floodgate limiter apply --dry-run`
/// reports the refusal the real apply meets.
pub const PLAIN_STAYS_PLAIN: &str =
    "this limiter exists and is not keyed; delete it first to re-create it keyed";

/// The per-key part of a keyed limiter. The total (concurrency and/or rate of the whole
/// limiter) stays in its [`LimiterSpec`]; a keyed limiter whose spec has no concurrency has no
/// total concurrency limit, only the per-key one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedSpec {
    /// Permits one key may hold at once (unless overridden); `None`: only the total bounds it.
    pub concurrency: Option<u32>,
    /// Rate of one key (GCRA, like the total's); `None`: only the total's rate applies.
    pub rate: Option<RateSpec>,
    /// Keys tracked at once (with holders, waiters or rate debt): an acquire for one more is
    /// refused with [`Refusal::TooManyKeys`](crate::Refusal::TooManyKeys), so memory stays
    /// bounded whatever keys clients send.
    pub max_keys: u32,
}

impl Default for KeyedSpec {
    fn default() -> Self {
        KeyedSpec {
            concurrency: None,
            rate: None,
            max_keys: DEFAULT_MAX_KEYS,
        }
    }
}

impl KeyedSpec {
    /// At most `concurrency` permits per key, other fields default.
    pub fn per_key(concurrency: u32) -> Self {
        KeyedSpec {
            concurrency: Some(concurrency),
            ..KeyedSpec::default()
        }
    }

    /// Sets the per-key rate.
    pub fn with_rate(mut self, rate: RateSpec) -> Self {
        self.rate = Some(rate);
        self
    }

    /// Sets the key cap.
    pub fn with_max_keys(mut self, max_keys: u32) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// Checks the fields, alone and against the total's spec.
    pub fn validate(&self, total: &LimiterSpec) -> Result<(), InvalidField> {
        if let Some(c) = self.concurrency {
            if c == 0 || c > MAX_CONCURRENCY {
                return Err(InvalidField::new(
                    "per_key.concurrency",
                    format!("must be from 1 to {MAX_CONCURRENCY}"),
                ));
            }
        }
        if let Some(r) = self.rate {
            // The same rules as the total's rate, under the per-key field names.
            LimiterSpec::rate(r).validate().map_err(|e| InvalidField {
                field: match e.field {
                    "rate.limit" => "per_key.rate.limit",
                    "rate.period_ms" => "per_key.rate.period_ms",
                    "rate.burst" => "per_key.rate.burst",
                    _ => "per_key.rate",
                },
                message: e.message,
            })?;
            debug_assert!(r.limit <= MAX_RATE);
        }
        if self.max_keys == 0 || self.max_keys > MAX_KEYS {
            return Err(InvalidField::new(
                "max_keys",
                format!("must be from 1 to {MAX_KEYS}"),
            ));
        }
        if total.concurrency.is_none()
            && self.concurrency.is_none()
            && total.rate.is_none()
            && self.rate.is_none()
        {
            return Err(InvalidField::new(
                "per_key.concurrency",
                "a keyed limiter needs a limit: a concurrency limit or a rate, in total or per \
                 key (per_key.concurrency, per_key.rate, concurrency or rate)",
            ));
        }
        Ok(())
    }
}

/// One key's override (`PUT /v1/limiters/{name}/keys/{key}`): kept while the limiter lives,
/// whether or not the key is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyOverride {
    /// This key's concurrency limit instead of the per-key default; `None`: the default.
    pub concurrency: Option<u32>,
    /// Its share of contended capacity relative to other keys (default keys weigh 1).
    pub weight: u32,
}

impl Default for KeyOverride {
    fn default() -> Self {
        KeyOverride {
            concurrency: None,
            weight: 1,
        }
    }
}

impl KeyOverride {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), InvalidField> {
        if let Some(c) = self.concurrency {
            if c == 0 || c > MAX_CONCURRENCY {
                return Err(InvalidField::new(
                    "concurrency",
                    format!("must be from 1 to {MAX_CONCURRENCY}"),
                ));
            }
        }
        if self.weight == 0 || self.weight > MAX_WEIGHT {
            return Err(InvalidField::new(
                "weight",
                format!("must be from 1 to {MAX_WEIGHT}"),
            ));
        }
        Ok(())
    }
}

/// Checks a key sent by a client: 1 to [`MAX_KEY_LEN`] characters, no control characters.
pub fn check_key(key: &str) -> Result<(), InvalidField> {
    if key.is_empty() || key.chars().nth(MAX_KEY_LEN).is_some() {
        return Err(InvalidField::new(
            "key",
            format!("must be 1 to {MAX_KEY_LEN} characters"),
        ));
    }
    crate::spec::no_control_characters("key", key)
}
