//! JSON shapes shared by the HTTP API and the config file.

use std::time::Duration;

use floodgate::{AdaptiveSpec, Algorithm, RateSpec};
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
        let rate = RateSpec::per(r.limit, Duration::from_millis(r.period_ms));
        match r.burst {
            Some(burst) => rate.with_burst(burst),
            None => rate,
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

/// `"adaptive": {"min": 5, "max": 100}` plus optional `algorithm` (`"aimd"`, the default, or
/// `"gradient"`), `increase` (1, AIMD only), `decrease` (0.7 for AIMD, 0.9 for gradient),
/// `cooldown_ms` (50; the typical hold time stretches it), and for gradient `tolerance` (1.5)
/// and `probe_rounds` (30).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveBody {
    /// Which controller moves the limit.
    #[serde(default, deserialize_with = "non_null")]
    pub algorithm: Option<AlgorithmName>,
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
    /// Gradient: recent over long-run latency above which the limit comes down.
    #[serde(default, deserialize_with = "non_null")]
    pub tolerance: Option<f64>,
    /// Gradient: rounds at the learned ceiling before probing past it.
    #[serde(default, deserialize_with = "non_null")]
    pub probe_rounds: Option<u32>,
}

/// The adaptive algorithm's name on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlgorithmName {
    /// Additive increase, multiplicative decrease on throttles.
    Aimd,
    /// Latency-aware, with a learned ceiling.
    Gradient,
}

impl From<AdaptiveBody> for AdaptiveSpec {
    fn from(a: AdaptiveBody) -> Self {
        let mut spec = match a.algorithm {
            Some(AlgorithmName::Gradient) => AdaptiveSpec::gradient(a.min, a.max),
            _ => AdaptiveSpec::between(a.min, a.max),
        };
        spec.increase = a.increase.unwrap_or(spec.increase);
        spec.decrease = a.decrease.unwrap_or(spec.decrease);
        spec.cooldown = a.cooldown_ms.map_or(spec.cooldown, Duration::from_millis);
        spec.tolerance = a.tolerance.unwrap_or(spec.tolerance);
        spec.probe_rounds = a.probe_rounds.unwrap_or(spec.probe_rounds);
        spec
    }
}

impl From<AdaptiveSpec> for AdaptiveBody {
    fn from(a: AdaptiveSpec) -> Self {
        AdaptiveBody {
            algorithm: Some(match a.algorithm {
                Algorithm::Aimd => AlgorithmName::Aimd,
                Algorithm::Gradient => AlgorithmName::Gradient,
            }),
            min: a.min,
            max: a.max,
            increase: Some(a.increase),
            decrease: Some(a.decrease),
            cooldown_ms: Some(millis(a.cooldown)),
            tolerance: Some(a.tolerance),
            probe_rounds: Some(a.probe_rounds),
        }
    }
}
