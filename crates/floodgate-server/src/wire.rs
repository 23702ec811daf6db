//! JSON shapes shared by the HTTP API and the config file.

use std::time::Duration;

use floodgate::{AdaptiveSpec, RateSpec};
use serde::{Deserialize, Deserializer, Serialize};

/// For optional fields that are not nullable (`#[serde(default, deserialize_with =
/// "non_null")]`): left out is `None`, but `null` is refused like any other wrong type, as
/// `docs/openapi.yaml` says (serde's plain `Option` would take `null` as "left out").
pub(crate) fn non_null<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A duration in whole milliseconds, as the API speaks them (saturating).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `"rate": {"limit": 100, "period_ms": 60000, "burst": 10}`; burst defaults to the tokens of
/// 20 ms, at least 1.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateBody {
    /// Tokens per period.
    pub limit: u32,
    /// The period in milliseconds.
    pub period_ms: u64,
    /// Tokens that may be taken back to back (default: the tokens of 20 ms, at least 1).
    #[serde(default, deserialize_with = "non_null")]
    pub burst: Option<u32>,
}

impl From<RateBody> for RateSpec {
    fn from(r: RateBody) -> Self {
        RateSpec {
            limit: r.limit,
            period: Duration::from_millis(r.period_ms),
            burst: r.burst.unwrap_or_else(|| {
                RateSpec::default_burst(r.limit, Duration::from_millis(r.period_ms))
            }),
        }
    }
}

impl From<RateSpec> for RateBody {
    fn from(r: RateSpec) -> Self {
        RateBody {
            limit: r.limit,
            period_ms: millis(r.period),
            burst: Some(r.burst),
        }
    }
}

/// `"adaptive": {"min": 5, "max": 100}` plus optional `increase` (1), `decrease` (0.7) and
/// `cooldown_ms` (50; the typical hold time stretches it).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveBody {
    /// Lowest limit.
    pub min: u32,
    /// Highest limit.
    pub max: u32,
    /// Added per round of successes.
    #[serde(default, deserialize_with = "non_null")]
    pub increase: Option<u32>,
    /// Factor per throttle.
    #[serde(default, deserialize_with = "non_null")]
    pub decrease: Option<f64>,
    /// At most one decrease per this many milliseconds.
    #[serde(default, deserialize_with = "non_null")]
    pub cooldown_ms: Option<u64>,
}

impl From<AdaptiveBody> for AdaptiveSpec {
    fn from(a: AdaptiveBody) -> Self {
        let d = AdaptiveSpec::between(a.min, a.max);
        AdaptiveSpec {
            increase: a.increase.unwrap_or(d.increase),
            decrease: a.decrease.unwrap_or(d.decrease),
            cooldown: a.cooldown_ms.map_or(d.cooldown, Duration::from_millis),
            ..d
        }
    }
}

impl From<AdaptiveSpec> for AdaptiveBody {
    fn from(a: AdaptiveSpec) -> Self {
        AdaptiveBody {
            min: a.min,
            max: a.max,
            increase: Some(a.increase),
            decrease: Some(a.decrease),
            cooldown_ms: Some(millis(a.cooldown)),
        }
    }
}
