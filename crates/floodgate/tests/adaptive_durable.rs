//! Durable replay of adaptive limits: the embedded store with a data directory, crashed (its
//! files copied as a SIGKILL would leave them, as `tests/restart_witness.rs` does) at random
//! points of a hostile schedule (throttle floods, latencies of 0 to `Duration::MAX`,
//! reconfigurations to another range or algorithm), then reopened from the copy.
//!
//! The witness is what the test was answered before the copy: the limit in force (status read
//! last) and the permits it holds. After the reopen the limit must be exactly that (a higher one
//! over-admits against a backend that was refusing; a lower one forgot successes), within the
//! spec's `[min, max]`, with the witnessed permits counted; and a zero-wait acquire must be
//! granted exactly when the witness says a permit is free.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use floodgate::{
    AcquireOptions, AdaptiveSpec, Durability, Feedback, FencingToken, Floodgate, LimiterBackend,
    LimiterName, LimiterSpec, MemoryStore, Store,
};
use support::rng::Rng;

const HOUR: Duration = Duration::from_secs(3600);

/// What a SIGKILL now would leave: the data directory's files as they are (LOCK excluded).
fn crash_copy(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if name == "LOCK" || !entry.file_type().expect("type").is_file() {
            continue;
        }
        std::fs::copy(entry.path(), to.join(&name)).expect("copy");
    }
}

fn spec(rng: &mut Rng) -> LimiterSpec {
    let min = rng.range(1, 6) as u32;
    let max = min + rng.range(0, 12) as u32;
    let start = rng.range(u64::from(min), u64::from(max)) as u32;
    let mut a = if rng.below(2) == 0 {
        AdaptiveSpec::between(min, max)
    } else {
        let mut a = AdaptiveSpec::gradient(min, max);
        a.probe_rounds = rng.range(1, 3) as u32;
        a
    };
    a.cooldown = Duration::ZERO;
    LimiterSpec::concurrency(start)
        .with_adaptive(a)
        .with_default_lease(HOUR)
        .with_max_wait(HOUR)
}

fn latency(rng: &mut Rng) -> Option<Duration> {
    match rng.below(8) {
        0 => None,
        1 => Some(Duration::ZERO),
        2 => Some(Duration::MAX),
        3 => Some(Duration::from_secs(86_400)),
        _ => Some(rng.micros(100, 50_000)),
    }
}

async fn run(seed: u64) {
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    // Half the seeds snapshot every few hundred bytes, so a reopen reads a snapshot (which
    // carries the controller's state) and a log tail, not the log alone.
    let mut durability = Durability::new(dir.path());
    if seed % 2 == 1 {
        durability = durability.snapshot_after_bytes(512);
    }
    let (store, _) = MemoryStore::open(durability).expect("open");
    let gate = Floodgate::with_store(store.clone());
    gate.define("a", spec(&mut rng)).await.expect("define");
    let name = LimiterName::new("a").expect("name");
    let a = store.limiter(&name).await.expect("limiter");
    let mut held: Vec<FencingToken> = Vec::new();
    let mut crashes = 0;
    for step in 0..300 {
        match rng.below(20) {
            0..=4 => {
                if let Ok(g) = a.acquire(AcquireOptions::new().wait(Duration::ZERO)).await {
                    held.push(g.token);
                }
            }
            5..=7 if !held.is_empty() => {
                let t = held.swap_remove(rng.below(held.len() as u64) as usize);
                a.release(t).await.expect("release");
            }
            8 => {
                // Another range or algorithm, or the same spec re-applied.
                let s = if rng.below(2) == 0 {
                    spec(&mut rng)
                } else {
                    a.status().await.expect("status").spec
                };
                gate.define("a", s).await.expect("reconfigure");
            }
            _ => {
                let outcome = match rng.below(10) {
                    0..=3 => Feedback::Throttled,
                    4 => Feedback::Error,
                    _ => Feedback::Ok,
                };
                a.feedback_with_latency(outcome, latency(&mut rng))
                    .await
                    .expect("feedback");
            }
        }
        if rng.below(40) != 0 {
            continue;
        }
        crashes += 1;
        // The witness: what was answered last.
        let before = a.status().await.expect("status");
        let copy = tempfile::tempdir().expect("tempdir");
        crash_copy(dir.path(), copy.path());
        let (after, _) = MemoryStore::open(Durability::new(copy.path())).expect("reopen");
        let b = after.limiter(&name).await.expect("limiter");
        let status = b.status().await.expect("status");
        let ctx = format!("seed {seed} step {step}");
        assert_eq!(status.limit, before.limit, "{ctx}: the limit in force");
        let limit = status.limit.expect("a concurrency limit");
        let range = status.spec.adaptive.expect("adaptive");
        assert!((range.min..=range.max).contains(&limit), "{ctx}: {limit}");
        assert_eq!(status.in_use as usize, held.len(), "{ctx}: in use");
        // A zero-wait acquire is granted exactly when the witness has a permit free.
        let free = (held.len() as u32) < limit;
        let got = b.acquire(AcquireOptions::new().wait(Duration::ZERO)).await;
        assert_eq!(
            got.is_ok(),
            free,
            "{ctx}: {} held, limit {limit}",
            held.len()
        );
        after.close();
    }
    assert!(crashes > 0, "seed {seed}: no crash point drawn");
    store.close();
}

#[tokio::test]
async fn after_a_crash_the_adaptive_limit_is_what_was_answered_last() {
    for seed in 0..40 {
        run(seed).await;
    }
}
