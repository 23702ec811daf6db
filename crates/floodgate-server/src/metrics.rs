//! Prometheus metrics, labelled by limiter.
//!
//! Gauges and the lease counters are read from the store at scrape time (so they are right on
//! every server sharing a store); acquire outcomes and wait times are counted by this server as
//! it answers.
//!
//! Series follow the limiters that exist: a limiter's series go when it is deleted through this
//! server, and at every scrape the series of limiters the store no longer lists (deleted
//! elsewhere, expired) are dropped. A name that is not a limiter never gets a series.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use floodgate::LimiterStatus;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Labels of per-limiter metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimiterLabel {
    /// The limiter's name.
    pub limiter: String,
}

/// Labels of `floodgate_acquire_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcquireLabels {
    /// The limiter's name.
    pub limiter: String,
    /// granted, wait_timeout, queue_full, rejected, cancelled, shutting_down, fail_open,
    /// store_unavailable, superseded.
    pub outcome: &'static str,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Every acquire's outcome.
    pub acquire_total: Family<AcquireLabels, Counter>,
    /// How long acquires waited, granted or not.
    pub acquire_wait_seconds: Family<LimiterLabel, Histogram>,
    /// The same waits, by limiter, for the dashboard's per-second wait percentiles.
    pub wait_log: crate::dashboard::history::WaitLog,
    /// Keys each keyed limiter tracks, set at scrape time: per limiter, never per key, so the
    /// cardinality stays bounded whatever keys clients send (docs/keyed.md).
    pub limiter_keys: Family<LimiterLabel, Gauge>,
    /// The statuses the collector encodes, set for each scrape and emptied after it.
    snapshot: Arc<Mutex<Vec<LimiterStatus>>>,
    /// Which limiters have series in the two families above, with the outcomes they have: what
    /// pruning must remove (the families cannot be listed).
    recorded: Mutex<HashMap<String, HashSet<&'static str>>>,
    /// Each limiter's oldest wait in seconds, as the dashboard's sampler last saw it (once a
    /// second; a status does not carry it). Absent: nobody waits.
    oldest_wait: Arc<Mutex<std::collections::HashMap<String, f64>>>,
}

/// Encodes store-derived metrics from the last snapshot.
#[derive(Debug)]
struct StoreCollector {
    snapshot: Arc<Mutex<Vec<LimiterStatus>>>,
    /// See [`Metrics::oldest_wait`].
    oldest_wait: Arc<Mutex<std::collections::HashMap<String, f64>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let acquire_total = Family::<AcquireLabels, Counter>::default();
        registry.register(
            "floodgate_acquire",
            "Acquires answered, by outcome",
            acquire_total.clone(),
        );
        let acquire_wait_seconds = Family::<LimiterLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ])
        });
        registry.register(
            "floodgate_acquire_wait_seconds",
            "Time acquires spent waiting for a permit",
            acquire_wait_seconds.clone(),
        );
        let limiter_keys = Family::<LimiterLabel, Gauge>::default();
        registry.register(
            "floodgate_limiter_keys",
            "Keys a keyed limiter tracks now (with holders, waiters or rate debt)",
            limiter_keys.clone(),
        );
        let snapshot = Arc::new(Mutex::new(Vec::new()));
        let oldest_wait = Arc::new(Mutex::new(std::collections::HashMap::new()));
        registry.register_collector(Box::new(StoreCollector {
            snapshot: Arc::clone(&snapshot),
            oldest_wait: Arc::clone(&oldest_wait),
        }));
        Metrics {
            registry,
            acquire_total,
            acquire_wait_seconds,
            wait_log: Default::default(),
            limiter_keys,
            snapshot,
            recorded: Mutex::new(HashMap::new()),
            oldest_wait,
        }
    }

    fn note(&self, limiter: &str, outcome: Option<&'static str>) {
        let mut recorded = self.recorded.lock().unwrap_or_else(PoisonError::into_inner);
        let outcomes = match recorded.get_mut(limiter) {
            Some(outcomes) => outcomes,
            None => recorded.entry(limiter.to_owned()).or_default(),
        };
        if let Some(outcome) = outcome {
            outcomes.insert(outcome);
        }
    }

    /// Drops every series of `limiter` (it was deleted).
    pub fn forget(&self, limiter: &str) {
        let mut recorded = self.recorded.lock().unwrap_or_else(PoisonError::into_inner);
        self.forget_locked(&mut recorded, limiter);
    }

    fn forget_locked(&self, recorded: &mut HashMap<String, HashSet<&'static str>>, limiter: &str) {
        let Some(outcomes) = recorded.remove(limiter) else {
            return;
        };
        for outcome in outcomes {
            self.acquire_total.remove(&AcquireLabels {
                limiter: limiter.to_owned(),
                outcome,
            });
        }
        self.acquire_wait_seconds.remove(&LimiterLabel {
            limiter: limiter.to_owned(),
        });
        self.limiter_keys.remove(&LimiterLabel {
            limiter: limiter.to_owned(),
        });
    }

    /// Sets a keyed limiter's key count.
    pub fn set_keys(&self, limiter: &str, count: u64) {
        self.note(limiter, None);
        self.limiter_keys
            .get_or_create(&LimiterLabel {
                limiter: limiter.to_owned(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Drops the series of every limiter not in `existing`.
    fn prune(&self, existing: &[LimiterStatus]) {
        let mut recorded = self.recorded.lock().unwrap_or_else(PoisonError::into_inner);
        let live: HashSet<&str> = existing.iter().map(|s| s.name.as_str()).collect();
        let gone: Vec<String> = recorded
            .keys()
            .filter(|name| !live.contains(name.as_str()))
            .cloned()
            .collect();
        if gone.is_empty() {
            return;
        }
        for name in gone {
            self.forget_locked(&mut recorded, &name);
        }
        recorded.shrink_to_fit();
    }

    /// Sets every limiter's oldest wait (seconds; limiters absent have no waiter).
    pub fn set_oldest_waits(&self, waits: std::collections::HashMap<String, f64>) {
        *self
            .oldest_wait
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = waits;
    }

    /// Whether `limiter` has series here already (an outcome was counted under it since it
    /// was last pruned).
    pub fn knows(&self, limiter: &str) -> bool {
        self.recorded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(limiter)
    }

    /// Counts one acquire outcome.
    pub fn acquire(&self, limiter: &str, outcome: &'static str) {
        self.note(limiter, Some(outcome));
        self.acquire_total
            .get_or_create(&AcquireLabels {
                limiter: limiter.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Records how long an acquire waited.
    pub fn waited(&self, limiter: &str, seconds: f64) {
        self.note(limiter, None);
        self.acquire_wait_seconds
            .get_or_create(&LimiterLabel {
                limiter: limiter.to_owned(),
            })
            .observe(seconds);
        self.wait_log.record(limiter, seconds);
    }

    /// The exposition text for these statuses.
    pub fn encode(&self, statuses: Vec<LimiterStatus>) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        self.prune(&statuses);
        // One scrape at a time: the snapshot and the encode belong together.
        let mut snap = self.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        *snap = statuses;
        drop(snap);
        let encoded = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        // The statuses are not needed until the next scrape, which brings its own.
        std::mem::take(&mut *self.snapshot.lock().unwrap_or_else(PoisonError::into_inner));
        encoded?;
        Ok(out)
    }
}

impl prometheus_client::collector::Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snap = self.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        type Read = fn(&LimiterStatus) -> Option<i64>;
        let gauges: [(&str, &str, Read); 3] = [
            ("floodgate_permits_in_use", "Permits held now", |s| {
                Some(i64::from(s.in_use))
            }),
            (
                "floodgate_permits_limit",
                "The concurrency limit in force (adaptive limits move it)",
                |s| s.limit.map(i64::from),
            ),
            ("floodgate_waiters", "Acquires waiting in the queue", |s| {
                Some(i64::from(s.waiting))
            }),
        ];
        for (name, help, read) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for s in snap.iter() {
                let Some(value) = read(s) else { continue };
                let labels = LimiterLabel {
                    limiter: s.name.to_string(),
                };
                ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        // Seconds-valued gauges for the alerting rules (docs/prometheus/alerts.yml): the oldest
        // wait against the longest wait allowed, and an adaptive limit's floor.
        let oldest = self
            .oldest_wait
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        type Seconds<'a> = Box<dyn Fn(&LimiterStatus) -> Option<f64> + 'a>;
        let seconds: [(&str, &str, Seconds<'_>); 3] = [
            (
                "floodgate_oldest_wait_seconds",
                "How long the oldest queued acquire has waited (sampled each second; 0 when none)",
                Box::new(|s| Some(oldest.get(s.name.as_str()).copied().unwrap_or(0.0))),
            ),
            (
                "floodgate_max_wait_seconds",
                "The longest wait the limiter allows (max_wait)",
                Box::new(|s| Some(s.spec.max_wait.as_secs_f64())),
            ),
            (
                "floodgate_adaptive_limit_min",
                "An adaptive limit's floor (only limiters with an adaptive limit)",
                Box::new(|s| s.spec.adaptive.map(|a| f64::from(a.min))),
            ),
        ];
        for (name, help, read) in &seconds {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for s in snap.iter() {
                let Some(value) = read(s) else { continue };
                let labels = LimiterLabel {
                    limiter: s.name.to_string(),
                };
                ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        drop(seconds);
        drop(oldest);
        type Labelled = fn(&LimiterStatus) -> [(&'static str, u64); 3];
        let labelled: [(&str, &str, &str, Labelled); 2] = [
            (
                "floodgate_feedback",
                "Backend outcomes reported by clients (throttled is the seed's rate_limit_exceeded)",
                "outcome",
                |s| {
                    [
                        ("ok", s.counters.feedback_ok),
                        ("throttled", s.counters.feedback_throttled),
                        ("error", s.counters.feedback_error),
                    ]
                },
            ),
            (
                "floodgate_limit_changes",
                "Moves of an adaptive limit",
                "direction",
                |s| {
                    [
                        ("down", s.counters.limit_decreases),
                        ("up", s.counters.limit_increases),
                        ("", 0),
                    ]
                },
            ),
        ];
        for (name, help, key, read) in labelled {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in snap.iter() {
                for (value, count) in read(s) {
                    if value.is_empty() {
                        continue;
                    }
                    let labels = [("limiter", s.name.as_str()), (key, value)];
                    ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        type Count = fn(&LimiterStatus) -> u64;
        let counters: [(&str, &str, Count); 2] = [
            (
                "floodgate_permits_expired",
                "Leases reclaimed from holders that never released",
                |s| s.counters.expired,
            ),
            (
                "floodgate_extend_lost",
                "Extends of permits that were no longer held",
                |s| s.counters.extend_lost,
            ),
        ];
        for (name, help, read) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in snap.iter() {
                let labels = LimiterLabel {
                    limiter: s.name.to_string(),
                };
                ConstCounter::new(read(s)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
