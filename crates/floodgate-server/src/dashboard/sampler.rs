//! The one task per server that samples every limiter once a second into its history and
//! renders the shared overview.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use floodgate::{Counters, LimiterBackend, LimiterStatus, Store};

use super::history::Sample;
use super::Overview;
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
        // The last overview's rows by name, to send only the rows that changed.
        let mut rows: HashMap<String, String> = HashMap::new();
        let mut last = tokio::time::Instant::now();
        loop {
            interval.tick().await;
            let Some(state) = state.upgrade() else { return };
            let now = tokio::time::Instant::now();
            // Seconds this sample stands for (more than one if a tick was late).
            let secs = (now.duration_since(last).as_secs_f64().round() as u32).max(1);
            last = now;
            tick(&state, &mut prev, &mut rows, secs).await;
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

async fn tick<S: Store>(
    state: &AppState<S>,
    prev: &mut HashMap<String, Counters>,
    rows: &mut HashMap<String, String>,
    secs: u32,
) {
    let at = unix_secs();
    // The sampler is the overview's one writer.
    let seq = state.dashboard.overview.borrow().seq + 1;
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
            let old = state.dashboard.overview.borrow().full.clone();
            let limiters = old
                .find("\"limiters\":")
                .map_or("[]", |i| &old[i + 11..old.len().saturating_sub(1)]);
            let msg = serde_json::to_string(&e.to_string()).unwrap_or_default();
            let head = format!("{{\"t\":{at},\"store\":{msg},\"seq\":{seq},");
            state.dashboard.overview.send_replace(Overview {
                seq,
                full: Arc::from(format!("{head}\"limiters\":{limiters}}}")),
                delta: Arc::from(format!("{head}\"changed\":[],\"removed\":[]}}")),
            });
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
        render_overview(at, seq, &statuses, &samples, rows, &live)
    };
    state.dashboard.overview.send_replace(json);
}

/// The overview as JSON, written directly (no intermediate values): it is re-rendered every
/// second for thousands of limiters. Its change is found against `rows`, the last render's
/// rows by name, which it then holds this render's (a name is copied only for a new limiter).
fn render_overview(
    at: u64,
    seq: u64,
    statuses: &[LimiterStatus],
    samples: &[Sample],
    rows: &mut HashMap<String, String>,
    live: &HashSet<&str>,
) -> Overview {
    let head = format!("{{\"t\":{at},\"store\":\"ok\",\"seq\":{seq},");
    let mut full = String::with_capacity(64 + statuses.len() * 220);
    full.push_str(&head);
    full.push_str("\"limiters\":[");
    let mut delta = head;
    delta.push_str("\"changed\":[");
    let mut changed = 0;
    let mut row = String::with_capacity(256);
    for (i, (s, x)) in statuses.iter().zip(samples).enumerate() {
        row.clear();
        write_row(&mut row, s, x);
        if i > 0 {
            full.push(',');
        }
        full.push_str(&row);
        let same = match rows.get_mut(s.name.as_str()) {
            Some(old) if *old == row => true,
            Some(old) => {
                old.clone_from(&row);
                false
            }
            None => {
                rows.insert(s.name.to_string(), row.clone());
                false
            }
        };
        if !same {
            if changed > 0 {
                delta.push(',');
            }
            delta.push_str(&row);
            changed += 1;
        }
    }
    full.push_str("]}");
    delta.push_str("],\"removed\":[");
    let mut removed = 0;
    rows.retain(|name, _| {
        let keep = live.contains(name.as_str());
        if !keep {
            if removed > 0 {
                delta.push(',');
            }
            // Names are [A-Za-z0-9_.:-]: nothing to escape.
            let _ = write!(delta, "\"{name}\"");
            removed += 1;
        }
        keep
    });
    delta.push_str("]}");
    Overview {
        seq,
        full: Arc::from(full),
        delta: Arc::from(delta),
    }
}

/// One limiter's row of the overview.
fn write_row(out: &mut String, s: &LimiterStatus, x: &Sample) {
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
