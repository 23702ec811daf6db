//! Hostile feedback against the Redis script and the core side by side, on the same fake clock
//! (the script takes `now` from its op argument, as in `tests/twin.rs`), on a real
//! `redis-server`: latencies of 0, 1 µs, a day, just past a day, 2^53 + 1 µs (where doubles stop
//! being exact) and `u64::MAX` µs, given to the script as the raw argument and to the core as
//! the same `Duration`; floods of throttles; reports with nothing held. After every report the
//! limit in force and the gradient controller's whole state must be the core's, and the limit
//! must lie within `[min, max]`. The clock sometimes steps back by up to 5 s, as Redis's wall
//! clock (TIME) may.
//!
//! The twin's random sequences draw latencies up to 3 s only; these are the values where
//! integer and double arithmetic part (the script's `string.format('%d', x)` of a double past
//! 2^63 is not a number the core can hold).

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/script.rs"]
mod script;
mod support;

use std::time::Duration;

use floodgate::core::{AcquireRequest, Admission, Effects, Feedback, LimiterCore};
use floodgate::{AdaptiveSpec, FencingToken, LimiterName, LimiterSpec, Timestamp};
use support::rng::Rng;

const T0: u64 = 1_000_000_000;
const TOKEN_BASE: u64 = 10_000_000_000_000;

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap()
}

/// A hostile latency in µs: none, or one of the edges (see the module comment), or typical.
fn latency_us(rng: &mut Rng) -> Option<u64> {
    match rng.below(12) {
        0 => None,
        1 => Some(0),
        2 => Some(1),
        3 => Some(86_400_000_000),
        4 => Some(86_400_000_001),
        5 => Some((1 << 53) + 1),
        6 => Some(u64::MAX),
        _ => Some(rng.range(1_000, 500_000)),
    }
}

fn run(seed: u64, gradient: bool) {
    let (_server, mut conn, script) = script::script_on_redis();
    let name = "x";
    let keys: Vec<String> = floodgate::store::redis::limiter_keys("ax", name).to_vec();
    let eval = |conn: &mut redis::Connection, op: &str, now: u64, args: &[String]| {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(keys.len());
        for k in &keys {
            cmd.arg(k);
        }
        cmd.arg(format!("{op}@{now}@general"))
            .arg(name)
            .arg(3_600_000_u64);
        for a in args {
            cmd.arg(a);
        }
        cmd.query::<Vec<String>>(conn).unwrap()
    };
    let a = if gradient {
        let mut a = AdaptiveSpec::gradient(2, 60);
        a.probe_rounds = 1;
        a
    } else {
        AdaptiveSpec::between(2, 60)
    };
    let spec = LimiterSpec::concurrency(20)
        .with_adaptive(a)
        .with_default_lease(Duration::from_secs(3_600));
    let mut core = LimiterCore::new(spec.clone(), TOKEN_BASE).unwrap();
    let put = [
        "20".to_owned(),
        us(spec.default_lease).to_string(),
        us(spec.max_wait).to_string(),
        spec.max_queue.to_string(),
        TOKEN_BASE.to_string(),
        String::new(),
        String::new(),
        String::new(),
        a.min.to_string(),
        a.max.to_string(),
        a.increase.to_string(),
        format!("{}", a.decrease),
        us(a.cooldown).to_string(),
        "0".to_owned(),
        String::new(),
        if gradient {
            format!("gradient|{}|{}", a.tolerance, a.probe_rounds)
        } else {
            String::new()
        },
    ];
    let mut now = T0;
    assert_eq!(eval(&mut conn, "put", now, &put)[0], "status");
    let mut rng = Rng(seed);
    let mut fx = Effects::default();
    let mut held: Vec<u64> = Vec::new();
    let lname = LimiterName::new(name).unwrap();
    for i in 0..1_500_u64 {
        // Redis TIME is a wall clock: it may step back (NTP). Both sides get the same steps.
        if rng.below(25) == 0 {
            now -= rng.range(1, 5_000_000);
        } else {
            now += rng.range(0, 30_000);
        }
        match rng.below(10) {
            0..=1 => {
                let granted = match core.acquire(
                    Timestamp(now),
                    &AcquireRequest {
                        wait: Some(Duration::ZERO),
                        ..AcquireRequest::default()
                    },
                    &mut fx,
                ) {
                    Admission::Granted(g) => Some(g.token.0),
                    _ => None,
                };
                let reply = eval(
                    &mut conn,
                    "acquire",
                    now,
                    &[
                        "1".into(),
                        String::new(),
                        "0".into(),
                        format!("w{i}"),
                        "ch".into(),
                    ],
                );
                assert_eq!(granted.is_some(), reply[0] == "granted", "seed {seed} {i}");
                if let Some(t) = granted {
                    assert_eq!(reply[1], t.to_string());
                    held.push(t);
                }
            }
            2 => {
                if !held.is_empty() {
                    let t = held.swap_remove(rng.below(held.len() as u64) as usize);
                    assert!(core.release(Timestamp(now), FencingToken(t), &mut fx));
                    let reply = eval(&mut conn, "release", now, &[t.to_string()]);
                    assert_eq!(reply[1], "1", "seed {seed} {i}");
                }
            }
            _ => {
                let (outcome, word) = match rng.below(10) {
                    0..=2 => (Feedback::Throttled, "throttled"),
                    3 => (Feedback::Error, "error"),
                    _ => (Feedback::Ok, "ok"),
                };
                let l = latency_us(&mut rng);
                let got = core.feedback_with(
                    Timestamp(now),
                    outcome,
                    l.map(Duration::from_micros),
                    &mut fx,
                );
                let reply = eval(
                    &mut conn,
                    "feedback",
                    now,
                    &[word.into(), l.map(|l| l.to_string()).unwrap_or_default()],
                );
                let limit = got.unwrap();
                assert_eq!(
                    reply[1],
                    limit.to_string(),
                    "seed {seed} report {i}: {word} with {l:?} µs"
                );
                assert!((a.min..=a.max).contains(&limit), "seed {seed} {i}: {limit}");
                if gradient {
                    let raw: Option<String> = redis::cmd("HGET")
                        .arg(&keys[0])
                        .arg("g_state")
                        .query(&mut conn)
                        .unwrap();
                    let g = core.to_state().gradient;
                    assert_eq!(
                        // (No state written yet reads as the default state.)
                        raw.unwrap_or_else(|| "0|0|0|0|0|0".into()),
                        format!(
                            "{}|{}|{}|{}|{}|{}",
                            g.short_us, g.long_us, g.ceiling, g.credit, g.samples, g.backoff
                        ),
                        "seed {seed} report {i}: {word} with {l:?} µs"
                    );
                }
            }
        }
        assert_eq!(core.status(&lname).in_use as usize, held.len());
    }
}

#[test]
fn the_script_and_the_core_agree_on_hostile_latencies() {
    for seed in 0..6 {
        run(seed, true);
        run(seed, false);
    }
}
