//! What `floodgate bench` found, as text or JSON: the results of each workload beside its
//! baseline, with the ratios.

use std::time::Duration;

use serde_json::{json, Value};

use super::TARGET_RATIO;

/// Redis's work during the saturation window.
pub(super) struct RedisCost {
    /// Commands (inside scripts included) per grant.
    pub(super) commands_per_grant: f64,
    /// Script calls (`EVAL`, `EVALSHA`) per grant.
    pub(super) scripts_per_grant: f64,
    /// Redis CPU time over the window: 1.0 is one core busy.
    pub(super) cpu_share: f64,
    /// PING round trips on a connection of their own during the window: the round trip under
    /// the same load, the unit the idle time per grant is stated in.
    pub(super) ping: Latency,
    /// Their mean (the idle per grant is a mean too).
    pub(super) ping_mean: Duration,
}

pub(super) struct SaturationResult {
    pub(super) holders: u32,
    pub(super) limit: u32,
    pub(super) hold: Duration,
    pub(super) warmup: Duration,
    pub(super) window: Duration,
    pub(super) busy: Duration,
    pub(super) grants: u64,
    pub(super) held: Duration,
    pub(super) wait: Latency,
    pub(super) redis: Option<RedisCost>,
}

impl SaturationResult {
    pub(super) fn utilization(&self) -> f64 {
        let capacity = self.window.as_secs_f64() * f64::from(self.limit);
        if capacity > 0.0 {
            self.busy.as_secs_f64() / capacity
        } else {
            0.0
        }
    }

    pub(super) fn pairs_per_sec(&self) -> f64 {
        self.grants as f64 / self.window.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// Mean hold, grant arrived to release sent.
    pub(super) fn mean_hold(&self) -> Duration {
        match u32::try_from(self.grants) {
            Ok(n) if n > 0 => self.held / n,
            _ => Duration::ZERO,
        }
    }

    /// How long a permit sat idle between two holders, on average: the limit's unused time in
    /// the window over the grants. Unlike utilization, it does not depend on the hold time.
    pub(super) fn idle_per_grant(&self) -> Duration {
        let capacity = self.window.saturating_mul(self.limit);
        match u32::try_from(self.grants) {
            Ok(n) if n > 0 => capacity.saturating_sub(self.busy) / n,
            _ => Duration::ZERO,
        }
    }

    /// The throughput at full utilization with the holds measured: limit / mean hold.
    pub(super) fn ideal_pairs_per_sec(&self) -> f64 {
        let hold = self.mean_hold().as_secs_f64();
        if hold > 0.0 {
            f64::from(self.limit) / hold
        } else {
            0.0
        }
    }

    pub(super) fn to_json(&self) -> Value {
        let mut out = json!({
            "holders": self.holders,
            "limit": self.limit,
            "hold_ms": self.hold.as_secs_f64() * 1e3,
            "warmup_s": self.warmup.as_secs_f64(),
            "seconds": round3(self.window.as_secs_f64()),
            "utilization": round3(self.utilization()),
            "idle_per_grant_us": round1(self.idle_per_grant().as_secs_f64() * 1e6),
            "acquire_release_pairs_per_sec": round1(self.pairs_per_sec()),
            "ideal_pairs_per_sec": round1(self.ideal_pairs_per_sec()),
            "mean_hold_us": round1(self.mean_hold().as_secs_f64() * 1e6),
            "grants": self.grants,
            "wait": self.wait.to_json(),
        });
        if let Some(cost) = &self.redis {
            out["redis"] = json!({
                "commands_per_grant": round1(cost.commands_per_grant),
                "scripts_per_grant": round3(cost.scripts_per_grant),
                "cpu_share": round3(cost.cpu_share),
                "ping_during": cost.ping.to_json(),
                "ping_during_mean_us": round1(cost.ping_mean.as_secs_f64() * 1e6),
            });
        }
        out
    }
}

pub(super) struct ThroughputResult {
    pub(super) clients: u32,
    pub(super) seconds: f64,
    pub(super) trivial_pairs: Rates,
    pub(super) floodgate_pairs: Rates,
}

impl ThroughputResult {
    pub(super) fn ratio(&self) -> f64 {
        if self.trivial_pairs.median > 0.0 {
            self.floodgate_pairs.median / self.trivial_pairs.median
        } else {
            0.0
        }
    }
}

pub(super) struct HandoffResult {
    pub(super) handoffs: u32,
    pub(super) handoff: Latency,
    pub(super) trivial_rtt: Latency,
    pub(super) release_rtt: Latency,
}

/// The rates of one kind of phase, one per round.
pub(super) struct Rates {
    pub(super) rounds: Vec<f64>,
    pub(super) median: f64,
}

impl Rates {
    pub(super) fn new(rounds: Vec<f64>) -> Self {
        let mut sorted = rounds.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => 0.0,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Rates { rounds, median }
    }
}

/// p50, p99 and the largest of some latencies, in microseconds.
pub(super) struct Latency {
    pub(super) p50_us: f64,
    pub(super) p99_us: f64,
    pub(super) max_us: f64,
}

impl Latency {
    pub(super) fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        // Nearest rank: the smallest sample with at least p of all samples at or below it.
        let rank = |p: f64| -> f64 {
            if samples.is_empty() {
                return 0.0;
            }
            let index = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[index].as_secs_f64() * 1e6
        };
        Latency {
            p50_us: rank(0.50),
            p99_us: rank(0.99),
            max_us: rank(1.0),
        }
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "p50_us": round1(self.p50_us),
            "p99_us": round1(self.p99_us),
            "max_us": round1(self.max_us),
        })
    }
}

pub(super) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(super) struct Report {
    /// The server's base URL, or the store's Redis URL.
    pub(super) target: String,
    pub(super) in_process: bool,
    pub(super) store: bool,
    /// The trivial request of the baselines.
    pub(super) trivial: &'static str,
    pub(super) throughput: Option<ThroughputResult>,
    pub(super) handoff: Option<HandoffResult>,
    pub(super) saturation: Option<SaturationResult>,
}

impl Report {
    pub(super) fn to_json(&self) -> Value {
        let mut out = json!({
            "mode": if self.store { "store" } else { "http" },
            "server": self.target,
            "in_process": self.in_process,
            "baseline": self.trivial,
        });
        if let Some(t) = &self.throughput {
            let rates = |r: &Rates| {
                json!({
                    "median": round1(r.median),
                    "rounds": r.rounds.iter().copied().map(round1).collect::<Vec<_>>(),
                })
            };
            out["clients"] = json!(t.clients);
            out["seconds_per_phase"] = json!(t.seconds);
            out["throughput"] = json!({
                "trivial_pairs_per_sec": rates(&t.trivial_pairs),
                "acquire_release_pairs_per_sec": rates(&t.floodgate_pairs),
                "ratio": round3(t.ratio()),
            });
            if !self.store {
                out["throughput"]["target_ratio"] = json!(TARGET_RATIO);
            }
        }
        if let Some(h) = &self.handoff {
            out["latency"] = json!({
                "handoffs": h.handoffs,
                "handoff": h.handoff.to_json(),
                "trivial_round_trip": h.trivial_rtt.to_json(),
                "release_round_trip": h.release_rtt.to_json(),
            });
        }
        if let Some(s) = &self.saturation {
            out["saturation"] = s.to_json();
        }
        out
    }

    pub(super) fn to_text(&self) -> String {
        let mut out = String::new();
        if self.store {
            out.push_str(&format!(
                "store {} (the library's RedisStore in this process, no HTTP)\n",
                self.target
            ));
        } else {
            out.push_str(&format!(
                "server {}{}\n",
                self.target,
                if self.in_process { " (in-process)" } else { "" },
            ));
        }
        if let Some(t) = &self.throughput {
            self.throughput_text(t, &mut out);
        }
        if let Some(h) = &self.handoff {
            self.handoff_text(h, &mut out);
        }
        if let Some(s) = &self.saturation {
            saturation_text(s, &mut out);
        }
        out
    }

    pub(super) fn throughput_text(&self, t: &ThroughputResult, out: &mut String) {
        let rounds = |r: &Rates| {
            r.rounds
                .iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "\nthroughput ({} clients, {} s per phase, {} rounds; pairs/s, median of rounds)\n",
            t.clients,
            t.seconds,
            t.trivial_pairs.rounds.len(),
        ));
        let trivial = format!("trivial pairs ({} x2)", self.trivial);
        out.push_str(&format!(
            "  {trivial:<32} {:>10.0}   [{}]\n",
            t.trivial_pairs.median,
            rounds(&t.trivial_pairs)
        ));
        out.push_str(&format!(
            "  acquire + release pairs          {:>10.0}   [{}]\n",
            t.floodgate_pairs.median,
            rounds(&t.floodgate_pairs)
        ));
        let ratio = t.ratio();
        if self.store {
            out.push_str(&format!(
                "  ratio                            {ratio:>10.3}\n"
            ));
        } else {
            let verdict = if ratio >= TARGET_RATIO {
                "meets"
            } else {
                "below"
            };
            out.push_str(&format!(
                "  ratio                            {ratio:>10.3}   ({verdict} the target {TARGET_RATIO})\n"
            ));
        }
    }

    pub(super) fn handoff_text(&self, h: &HandoffResult, out: &mut String) {
        out.push_str(&format!(
            "\nlatency ({} handoffs, limit 1)             p50 us     p99 us\n",
            h.handoffs
        ));
        let trivial = format!("trivial round trip ({})", self.trivial);
        for (label, l) in [
            ("handoff (release sent -> waiter answered)", &h.handoff),
            (trivial.as_str(), &h.trivial_rtt),
            ("release round trip", &h.release_rtt),
        ] {
            out.push_str(&format!(
                "  {label:<41} {:>8.1} {:>10.1}\n",
                l.p50_us, l.p99_us
            ));
        }
    }
}

pub(super) fn saturation_text(s: &SaturationResult, out: &mut String) {
    out.push_str(&format!(
        "\nsaturation ({} holders, limit {}, hold {} ms; {} s measured after {} s of warm-up)\n",
        s.holders,
        s.limit,
        s.hold.as_secs_f64() * 1e3,
        s.window.as_secs_f64(),
        s.warmup.as_secs_f64(),
    ));
    out.push_str(&format!(
        "  utilization (time held / (limit x time))  {:>8.1} %\n",
        s.utilization() * 100.0
    ));
    out.push_str(&format!(
        "  acquire + release pairs/s                 {:>8.0}     (limit / mean hold: {:.0}; mean hold {:.0} us)\n",
        s.pairs_per_sec(),
        s.ideal_pairs_per_sec(),
        s.mean_hold().as_secs_f64() * 1e6,
    ));
    out.push_str(&format!(
        "  idle time per grant (a permit between two holders) {:>8.1} us\n",
        s.idle_per_grant().as_secs_f64() * 1e6
    ));
    out.push_str(&format!(
        "  wait (acquire sent -> granted)    p50 us {:>10.1}   p99 us {:>10.1}   max us {:>10.1}\n",
        s.wait.p50_us, s.wait.p99_us, s.wait.max_us
    ));
    if let Some(cost) = &s.redis {
        out.push_str(&format!(
            "  redis: {:.1} commands and {:.2} script calls per grant; CPU {:.1} % of a core\n",
            cost.commands_per_grant,
            cost.scripts_per_grant,
            cost.cpu_share * 100.0
        ));
        out.push_str(&format!(
            "  redis: PING round trip during the window: mean {:.0} us, p50 {:.0} us (idle per grant = {:.2} mean round trips)\n",
            cost.ping_mean.as_secs_f64() * 1e6,
            cost.ping.p50_us,
            s.idle_per_grant().as_secs_f64() / cost.ping_mean.as_secs_f64().max(f64::MIN_POSITIVE)
        ));
    }
}
