//! The one task per server that samples every limiter once a second into its history and
//! renders the shared overview.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use floodgate::{Counters, LimiterBackend, LimiterStatus, Store};

use super::history::Sample;
use crate::server::AppState;

/// How often the history is sampled (the charts' resolution).
pub(crate) const PERIOD: Duration = Duration::from_secs(1);

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Starts the sampler on the current runtime (none: no history, e.g. a router built outside
/// one). It ends when the server's state is dropped.
pub(crate) fn spawn_sampler<S: Store>(state: Weak<AppState<S>>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        let mut interval = tokio::time::interval(PERIOD);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut prev: HashMap<String, Counters> = HashMap::new();
        let mut last = tokio::time::Instant::now();
        loop {
            interval.tick().await;
            let Some(state) = state.upgrade() else { return };
            let now = tokio::time::Instant::now();
            // Seconds this sample stands for (more than one if a tick was late).
            let secs = (now.duration_since(last).as_secs_f64().round() as u32).max(1);
            last = now;
            tick(&state, &mut prev, secs).await;
        }
    });
}

/// Extra per-limiter facts only the holders listing has (oldest wait, rate tokens); asked only
/// of limiters that have waiters or a rate, so idle limiters cost one status read.
async fn extras<S: Store>(state: &AppState<S>, s: &LimiterStatus) -> (u32, f32) {
    if s.waiting == 0 && s.spec.rate.is_none() {
        return (0, -1.0);
    }
    let Ok(limiter) = state.gate.store().limiter(&s.name).await else {
        return (0, -1.0);
    };
    match limiter.holders(0).await {
        Ok(v) => (
            v.oldest_wait
                .map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
            v.rate_tokens.map_or(-1.0, |t| t as f32),
        ),
        Err(_) => (0, -1.0),
    }
}

async fn tick<S: Store>(state: &AppState<S>, prev: &mut HashMap<String, Counters>, secs: u32) {
    let at = unix_secs();
    let waits: HashMap<String, (f32, f32)> = state
        .metrics
        .wait_log
        .take()
        .into_iter()
        .map(|(name, p50, p99)| (name, (p50, p99)))
        .collect();
    let statuses = match state.gate.limiters().await {
        Ok(s) => s,
        Err(e) => {
            // Keep the last overview's limiters, say the store is down.
            let old = state.dashboard.overview.borrow().clone();
            let limiters = old
                .find("\"limiters\":")
                .map_or("[]", |i| &old[i + 11..old.len().saturating_sub(1)]);
            let msg = serde_json::to_string(&e.to_string()).unwrap_or_default();
            let json = format!("{{\"t\":{at},\"store\":{msg},\"limiters\":{limiters}}}");
            state.dashboard.overview.send_replace(Arc::from(json));
            return;
        }
    };
    let mut samples = Vec::with_capacity(statuses.len());
    for s in &statuses {
        let name = s.name.as_str();
        let c = s.counters;
        // (A name is copied only for a limiter seen the first time: every tick visits them all.)
        let before = match prev.get_mut(name) {
            Some(seen) => std::mem::replace(seen, c),
            None => {
                prev.insert(name.to_owned(), c);
                c
            }
        };
        let per_s = |now: u64, then: u64| now.saturating_sub(then) as f32 / secs as f32;
        let (oldest_wait_ms, rate_tokens) = extras(state, s).await;
        let (p50, p99) = waits.get(name).copied().unwrap_or((-1.0, -1.0));
        samples.push(Sample {
            in_use: s.in_use,
            limit: s.limit.map_or(-1, |l| i32::try_from(l).unwrap_or(i32::MAX)),
            waiting: s.waiting,
            oldest_wait_ms,
            grants: per_s(c.granted, before.granted),
            timeouts: per_s(c.timed_out, before.timed_out),
            wait_p50_ms: p50,
            wait_p99_ms: p99,
            throttles: u32::try_from(
                c.feedback_throttled
                    .saturating_sub(before.feedback_throttled),
            )
            .unwrap_or(u32::MAX),
            limit_up: u16::try_from(c.limit_increases.saturating_sub(before.limit_increases))
                .unwrap_or(u16::MAX),
            limit_down: u16::try_from(c.limit_decreases.saturating_sub(before.limit_decreases))
                .unwrap_or(u16::MAX),
            rate_tokens,
        });
    }
    // The limiters gone since the last tick leave both maps: looked up in a set, as a scan of
    // `statuses` per entry made each tick quadratic (10,000 idle limiters took a third of a
    // core in a release build).
    let live: HashSet<&str> = statuses.iter().map(|s| s.name.as_str()).collect();
    prev.retain(|name, _| live.contains(name.as_str()));
    state.metrics.set_oldest_waits(
        statuses
            .iter()
            .zip(&samples)
            .filter(|(_, x)| x.waiting > 0)
            .map(|(s, x)| (s.name.to_string(), f64::from(x.oldest_wait_ms) / 1000.0))
            .collect(),
    );
    let json = {
        let mut history = state.dashboard.lock_history();
        history.retain(|name, _| live.contains(name.as_str()));
        for (s, sample) in statuses.iter().zip(&samples) {
            match history.get_mut(s.name.as_str()) {
                Some(ring) => ring.push(*sample, secs, at),
                None => history
                    .entry(s.name.to_string())
                    .or_default()
                    .push(*sample, secs, at),
            }
        }
        render_overview(at, &statuses, &samples)
    };
    state.dashboard.overview.send_replace(Arc::from(json));
}

/// The overview as JSON, written directly (one allocation, no intermediate values): it is
/// re-rendered every second for thousands of limiters.
fn render_overview(at: u64, statuses: &[LimiterStatus], samples: &[Sample]) -> String {
    let mut out = String::with_capacity(64 + statuses.len() * 220);
    let _ = write!(out, "{{\"t\":{at},\"store\":\"ok\",\"limiters\":[");
    for (i, (s, x)) in statuses.iter().zip(samples).enumerate() {
        if i > 0 {
            out.push(',');
        }
        let c = s.counters;
        // Names are [A-Za-z0-9_.:-]: nothing to escape.
        let _ = write!(
            out,
            "{{\"name\":\"{}\",\"in_use\":{},\"limit\":{},\"waiting\":{},\"oldest_wait_ms\":{},\
             \"grants_s\":{},\"timeouts_s\":{},\"wait_p50_ms\":{},\"wait_p99_ms\":{},\
             \"throttles_s\":{},\"throttled\":{},\"expired\":{},\"granted\":{},\
             \"limit_changes\":{},\"rate_tokens\":{}}}",
            s.name.as_str(),
            s.in_use,
            s.limit.map_or("null".to_owned(), |l| l.to_string()),
            s.waiting,
            x.oldest_wait_ms,
            x.grants,
            x.timeouts,
            x.wait_p50_ms,
            x.wait_p99_ms,
            x.throttles,
            c.feedback_throttled,
            c.expired,
            c.granted,
            c.limit_increases + c.limit_decreases,
            x.rate_tokens,
        );
    }
    out.push_str("]}");
    out
}
