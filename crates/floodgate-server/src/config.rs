//! The server's configuration file (TOML). Flags and `FLOODGATE_*` environment variables
//! override it; see `floodgate serve --help` and `floodgate.example.toml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use floodgate::{KeyOverride, KeyedSpec, LimiterSpec};
use serde::Deserialize;

use crate::wire::{AdaptiveBody, RateBody};

/// The file's contents. Every field is optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address to listen on, `127.0.0.1:8750` by default.
    pub listen: Option<String>,
    /// Bearer token required on `/v1`.
    pub token: Option<String>,
    /// Host names requests may name in `Host` beside IP addresses and localhost
    /// (`--allowed-host`): without a token, a server on loopback serves only those.
    pub allowed_hosts: Option<Vec<String>>,
    /// Whether `/metrics` needs the token too (default false).
    pub metrics_require_token: Option<bool>,
    /// Whether the API may create, change and delete limiters (default true).
    pub api_writes: Option<bool>,
    /// Most limiters the server holds (default 10,000).
    pub max_limiters: Option<usize>,
    /// Largest request body in bytes (default 65,536).
    pub max_body_bytes: Option<usize>,
    /// Redis URL (or comma-separated cluster node URLs); absent: the embedded store.
    pub redis: Option<String>,
    /// Treat `redis` as a Redis Cluster.
    pub redis_cluster: Option<bool>,
    /// `fail_closed` (default) or `fail_open`, when the store cannot be reached.
    pub on_store_failure: Option<String>,
    /// The embedded store's data directory (write-ahead log and snapshots); absent: state is
    /// lost on restart.
    pub data_dir: Option<std::path::PathBuf>,
    /// `always`, `everysec` (default) or `no`: when the log reaches the disk.
    pub fsync: Option<String>,
    /// Log growth in bytes that triggers a snapshot (default 64 MiB).
    pub snapshot_after_bytes: Option<u64>,
    /// Learning window after state loss, in milliseconds (docs/learning.md). With Redis: the
    /// window of a limiter re-created after Redis lost it (default: its default lease), and
    /// config limiters Redis has no state for at start learn too. Embedded: config limiters
    /// learn at start (default 0: they do not).
    pub learning_window_ms: Option<u64>,
    /// Time a client has to send a request head, in milliseconds (default 10,000).
    pub header_timeout_ms: Option<u64>,
    /// Time a client has to send a request body, in milliseconds (default 30,000).
    pub body_timeout_ms: Option<u64>,
    /// Time a kept-alive connection may sit idle, in milliseconds (default 60,000).
    pub idle_timeout_ms: Option<u64>,
    /// Most connections open at once (default 10,000, or the descriptor limit less 64).
    pub max_connections: Option<usize>,
    /// Time in-flight requests get at shutdown, in milliseconds (default 10,000).
    pub shutdown_grace_ms: Option<u64>,
    /// `text` (default) or `json` log lines (`--log-format`).
    pub log_format: Option<String>,
    /// Log one line per HTTP request (`--access-log`, default false).
    pub access_log: Option<bool>,
    /// On SIGHUP, also delete the limiters this file no longer names (default false: a reload
    /// only creates and changes).
    pub reload_prune: Option<bool>,
    /// PEM certificate chain for HTTPS (`--tls-cert`); with `tls_key`, the API is served over
    /// TLS and the pair is reloaded when the files change.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert` (`--tls-key`).
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates for a `rediss://` server (`--redis-ca`).
    pub redis_ca: Option<PathBuf>,
    /// PEM client certificate for Redis (`--redis-cert`).
    pub redis_cert: Option<PathBuf>,
    /// PEM key of `redis_cert` (`--redis-key`).
    pub redis_key: Option<PathBuf>,
    /// Redis ACL user when the URL names none (`FLOODGATE_REDIS_USERNAME`).
    pub redis_username: Option<String>,
    /// Redis password when the URL gives none (`FLOODGATE_REDIS_PASSWORD`).
    pub redis_password: Option<String>,
    /// The sentinels' own ACL user (`FLOODGATE_REDIS_SENTINEL_USERNAME`).
    pub redis_sentinel_username: Option<String>,
    /// The sentinels' own password (`FLOODGATE_REDIS_SENTINEL_PASSWORD`).
    pub redis_sentinel_password: Option<String>,
    /// Limiters created at start, by name.
    #[serde(default)]
    pub limiters: BTreeMap<String, LimiterConfig>,
}

/// One limiter in the file; same fields as `PUT /v1/limiters/{name}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimiterConfig {
    /// Permits out at once (leave out for a rate-only limiter).
    pub concurrency: Option<u32>,
    /// A rate limit: `rate = { limit = 100, period_ms = 60000, burst = 10 }`.
    pub rate: Option<RateBody>,
    /// Adaptive concurrency: `adaptive = { min = 5, max = 100 }`.
    pub adaptive: Option<AdaptiveBody>,
    /// Default lease in milliseconds.
    pub lease_ms: Option<u64>,
    /// Cap on a wait in milliseconds.
    pub max_wait_ms: Option<u64>,
    /// Cap on the queue length.
    pub max_queue: Option<u32>,
    /// Makes the limiter keyed (docs/keyed.md): `per_key = { concurrency = 5 }`, and/or a
    /// per-key `rate`. `{}` keys a limiter with no per-key limit (fair sharing only).
    pub per_key: Option<PerKeyConfig>,
    /// Keys a keyed limiter tracks at once (default 100,000).
    pub max_keys: Option<u32>,
    /// Per-key overrides of a keyed limiter, by key: `keys = { "org-7" = { concurrency = 10,
    /// weight = 3 } }`. Applied at start, on SIGHUP and by `limiter apply`; overrides set over
    /// the API for keys the file does not name are left alone.
    #[serde(default)]
    pub keys: BTreeMap<String, KeyOverrideConfig>,
}

/// A keyed limiter's per-key limits in the file; same fields as the API's `per_key`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerKeyConfig {
    /// Permits one key may hold at once.
    pub concurrency: Option<u32>,
    /// One key's rate: `rate = { limit = 10, period_ms = 1000 }`.
    pub rate: Option<RateBody>,
}

/// One key's override in the file; same fields as `PUT /v1/limiters/{name}/keys/{key}`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyOverrideConfig {
    /// This key's concurrency instead of the per-key default.
    pub concurrency: Option<u32>,
    /// Its share of contended capacity (default 1).
    pub weight: Option<u32>,
}

impl LimiterConfig {
    /// The spec, with defaults for what the file leaves out.
    pub fn spec(&self) -> LimiterSpec {
        let d = LimiterSpec::default();
        let mut spec = LimiterSpec::default()
            .with_default_lease(self.lease_ms.map_or(d.default_lease, Duration::from_millis))
            .with_max_wait(self.max_wait_ms.map_or(d.max_wait, Duration::from_millis))
            .with_max_queue(self.max_queue.unwrap_or(d.max_queue));
        spec.concurrency = self.concurrency;
        spec.rate = self.rate.map(Into::into);
        spec.adaptive = self.adaptive.map(Into::into);
        spec
    }

    /// The per-key spec of a keyed limiter (`per_key` given); `None` for a plain one.
    pub fn keyed(&self) -> Option<KeyedSpec> {
        let per_key = self.per_key?;
        Some(KeyedSpec {
            concurrency: per_key.concurrency,
            rate: per_key.rate.map(Into::into),
            max_keys: self
                .max_keys
                .unwrap_or(floodgate::core::keyed::DEFAULT_MAX_KEYS),
        })
    }

    /// The per-key overrides, by key.
    pub fn overrides(&self) -> Vec<(String, KeyOverride)> {
        self.keys
            .iter()
            .map(|(key, o)| {
                let over = KeyOverride {
                    concurrency: o.concurrency,
                    weight: o.weight.unwrap_or(KeyOverride::default().weight),
                };
                (key.clone(), over)
            })
            .collect()
    }

    /// Checks the keyed fields: `max_keys` and `keys` only with `per_key`, each as the API
    /// checks it.
    fn check_keyed(&self, spec: &LimiterSpec) -> Result<(), String> {
        let Some(keyed) = self.keyed() else {
            if self.max_keys.is_some() {
                return Err("max_keys: only a keyed limiter has keys: give per_key too".into());
            }
            if !self.keys.is_empty() {
                return Err("keys: only a keyed limiter has keys: give per_key too".into());
            }
            return Ok(());
        };
        keyed.validate(spec).map_err(|e| e.to_string())?;
        floodgate::core::keyed::total_spec(spec)
            .validate()
            .map_err(|e| e.to_string())?;
        if self.keys.len() > keyed.max_keys as usize {
            return Err(format!(
                "keys: more overrides ({}) than max_keys ({})",
                self.keys.len(),
                keyed.max_keys
            ));
        }
        for (key, over) in self.overrides() {
            floodgate::core::keyed::check_key(&key)
                .and_then(|()| over.validate())
                .map_err(|e| format!("keys.{key:?}: {e}"))?;
        }
        Ok(())
    }
}

/// Why the file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, with the line and field.
        message: String,
    },
    /// A limiter in the file has a bad name or spec.
    #[error("config file {path}: limiter {name:?}: {message}")]
    Limiter {
        /// The file.
        path: String,
        /// The limiter.
        name: String,
        /// What is wrong.
        message: String,
    },
}

impl FileConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        FileConfig::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: shown.clone(),
                message,
            },
            ConfigError::Limiter { name, message, .. } => ConfigError::Limiter {
                path: shown.clone(),
                name,
                message,
            },
            other => other,
        })
    }

    /// Parses and checks config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: String::new(),
            message: e.to_string(),
        })?;
        for (name, limiter) in &config.limiters {
            // toml's own errors carry a line; checks made after parsing find theirs here.
            let line = limiter_line(text, name);
            let invalid = |message: String| ConfigError::Limiter {
                path: String::new(),
                name: name.clone(),
                message: match line {
                    Some(n) => format!("line {n}: {message}"),
                    None => message,
                },
            };
            floodgate::LimiterName::new(name).map_err(|e| invalid(e.to_string()))?;
            let spec = limiter.spec();
            if limiter.per_key.is_none() {
                // A keyed limiter may have no total: `check_keyed` checks it as the store will.
                spec.validate().map_err(|e| invalid(e.to_string()))?;
            }
            limiter.check_keyed(&spec).map_err(invalid)?;
        }
        Ok(config)
    }
}

/// The 1-based line of the `[limiters.NAME]` header in `text`, if written as a table.
fn limiter_line(text: &str, name: &str) -> Option<usize> {
    let unquote = |s: &str| s.trim().trim_matches(|c| c == '"' || c == '\'').to_owned();
    text.lines()
        .position(|line| {
            let line = line.split('#').next().unwrap_or("").trim();
            line.strip_prefix('[')
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|l| l.trim().strip_prefix("limiters"))
                .and_then(|l| l.trim_start().strip_prefix('.'))
                .is_some_and(|l| unquote(l) == name)
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../../floodgate.example.toml");
        let config = FileConfig::parse(text).expect("example parses");
        assert!(config.limiters.contains_key("snuba-spike-projections"));
    }

    #[test]
    fn bad_files_name_the_problem() {
        let err = FileConfig::parse("listen = 5").expect_err("wrong type");
        assert!(err.to_string().contains("listen"), "{err}");
        let err = FileConfig::parse("lisen = \"x\"").expect_err("unknown key");
        assert!(err.to_string().contains("lisen"), "{err}");
        let err = FileConfig::parse("[limiters.a]\nconcurrency = 0").expect_err("zero");
        assert!(err.to_string().contains("concurrency"), "{err}");
        let err = FileConfig::parse("x = 1").expect_err("unknown key");
        assert!(err.to_string().contains("line 1"), "{err}");
        let err =
            FileConfig::parse("\n[limiters.b]\nconcurrency = 1\n[limiters.a]\nconcurrency = 0")
                .expect_err("zero");
        assert!(err.to_string().contains("line 4: concurrency"), "{err}");
        let err = FileConfig::parse("[limiters.\"a b\"]\nconcurrency = 1").expect_err("name");
        assert!(err.to_string().contains("a b"), "{err}");
    }

    #[test]
    fn keyed_tables_parse_and_bad_ones_name_the_field() {
        let text = include_str!("../../../floodgate.example.toml");
        let config = FileConfig::parse(text).expect("example parses");
        let orgs = &config.limiters["org-queries"];
        let keyed = orgs.keyed().expect("keyed");
        assert_eq!((keyed.concurrency, keyed.max_keys), (Some(5), 100_000));
        assert_eq!(orgs.overrides()[0].0, "org-7");
        assert_eq!(orgs.overrides()[0].1.weight, 3);
        assert!(config.limiters["billing-api"].keyed().is_none());
        for (bad, field) in [
            ("[limiters.a]\nconcurrency = 1\nmax_keys = 5", "max_keys"),
            (
                "[limiters.a]\nconcurrency = 1\nkeys = { x = { weight = 2 } }",
                "keys",
            ),
            (
                "[limiters.a]\nper_key = { concurrency = 0 }",
                "per_key.concurrency",
            ),
            ("[limiters.a]\nper_key = {}", "per_key.concurrency"),
            (
                "[limiters.a]\nconcurrency = 1\nper_key = {}\nmax_keys = 0",
                "max_keys",
            ),
            (
                "[limiters.a]\nconcurrency = 1\nper_key = {}\nkeys = { x = { weight = 0 } }",
                "weight",
            ),
            (
                "[limiters.a]\nconcurrency = 1\nper_key = { concurency = 2 }",
                "concurency",
            ),
        ] {
            let err = FileConfig::parse(bad).expect_err(bad);
            assert!(err.to_string().contains(field), "{bad}: {err}");
        }
        // Fair sharing only: keyed with no per-key limit, under a total.
        let fair = FileConfig::parse("[limiters.a]\nconcurrency = 4\nper_key = {}").expect("ok");
        assert_eq!(fair.limiters["a"].keyed().expect("keyed").concurrency, None);
    }
}
