//! An adaptive total on a keyed limiter (and with a rate), through the stores' public API, on
//! the embedded store and on a real `redis-server`: the same seeded hostile schedules
//! (throttle floods, latencies of 0 to `Duration::MAX`, zero-wait acquires on a few keys,
//! releases, reconfigurations of the adaptive range), against a witness of what each key holds
//! kept by the test. After every step: the total's limit (from status) lies within the range;
//! a grant leaves the witness's total at or under it and the key's share at or under the
//! per-key limit; in-use equals the witness.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use floodgate::{
    AcquireOptions, AdaptiveSpec, Feedback, FencingToken, Floodgate, KeyedSpec, LimiterBackend,
    LimiterSpec, MemoryStore, RateSpec, Store,
};
use support::rng::Rng;

const HOUR: Duration = Duration::from_secs(3600);
const PER_KEY: u32 = 3;

fn spec(rng: &mut Rng) -> LimiterSpec {
    let min = rng.range(1, 4) as u32;
    let max = min + rng.range(0, 10) as u32;
    let start = rng.range(u64::from(min), u64::from(max)) as u32;
    let mut a = if rng.below(2) == 0 {
        AdaptiveSpec::between(min, max)
    } else {
        let mut a = AdaptiveSpec::gradient(min, max);
        a.probe_rounds = 1;
        a
    };
    a.cooldown = Duration::ZERO;
    let mut s = LimiterSpec::concurrency(start)
        .with_adaptive(a)
        .with_default_lease(HOUR)
        .with_max_wait(HOUR);
    if rng.below(3) == 0 {
        s = s.with_rate(RateSpec::per(100_000, Duration::from_secs(1)).with_burst(1_000));
    }
    s
}

async fn run<S: Store>(gate: &Floodgate<S>, name: &str, seed: u64) {
    let mut rng = Rng(seed);
    gate.define_keyed(name, spec(&mut rng), KeyedSpec::per_key(PER_KEY))
        .await
        .expect("define");
    let l = gate.limiter(name).await.expect("limiter");
    let b = l.backend();
    // Token -> key.
    let mut held: BTreeMap<FencingToken, usize> = BTreeMap::new();
    for step in 0..250 {
        let ctx = format!("seed {seed} step {step}");
        let mut granted = None;
        match rng.below(10) {
            0..=3 => {
                let key = rng.below(4) as usize;
                if let Ok(g) = b
                    .acquire_keyed(
                        &format!("k{key}"),
                        AcquireOptions::new().wait(Duration::ZERO),
                    )
                    .await
                {
                    held.insert(g.token, key);
                    granted = Some(key);
                }
            }
            4..=5 if !held.is_empty() => {
                let t = *held
                    .keys()
                    .nth(rng.below(held.len() as u64) as usize)
                    .unwrap();
                held.remove(&t);
                assert!(b.release(t).await.expect("release"), "{ctx}");
            }
            6 => {
                gate.define_keyed(name, spec(&mut rng), KeyedSpec::per_key(PER_KEY))
                    .await
                    .expect("reconfigure");
            }
            _ => {
                let outcome = match rng.below(10) {
                    0..=4 => Feedback::Throttled,
                    5 => Feedback::Error,
                    _ => Feedback::Ok,
                };
                let latency = match rng.below(5) {
                    0 => None,
                    1 => Some(Duration::ZERO),
                    2 => Some(Duration::MAX),
                    _ => Some(rng.micros(100, 20_000)),
                };
                b.feedback_with_latency(outcome, latency)
                    .await
                    .expect("feedback");
            }
        }
        let status = b.status().await.expect("status");
        let limit = status.limit.expect("a total limit");
        let a = status.spec.adaptive.expect("adaptive");
        assert!((a.min..=a.max).contains(&limit), "{ctx}: {limit}");
        assert_eq!(status.in_use as usize, held.len(), "{ctx}: in use");
        if let Some(key) = granted {
            assert!(
                held.len() as u32 <= limit,
                "{ctx}: {} held over {limit}",
                held.len()
            );
            let share = held.values().filter(|&&k| k == key).count() as u32;
            assert!(share <= PER_KEY, "{ctx}: key {key} holds {share}");
        }
    }
    for t in std::mem::take(&mut held).into_keys() {
        b.release(t).await.expect("release");
    }
}

#[tokio::test]
async fn an_adaptive_keyed_total_on_the_embedded_store() {
    let gate = Floodgate::with_store(MemoryStore::new());
    for seed in 0..30 {
        run(&gate, &format!("k{seed}"), seed).await;
    }
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn an_adaptive_keyed_total_on_redis() {
    let server = support::RedisServer::start();
    let store = floodgate::RedisStore::connect(floodgate::RedisConfig::new(server.url()))
        .await
        .expect("connect");
    let gate = Floodgate::with_store(store);
    for seed in 0..30 {
        run(&gate, &format!("k{seed}"), seed).await;
    }
}
