//! Idempotent acquires of keyed rate-only limiters: the keyed script as a checked twin of the
//! keyed layer. A paced grant holds nothing, so its request id is remembered apart for the
//! default lease (docs/api.md), with the key it went to. Random sequences (fixed seeds) of
//! try-once acquires (a wait of 0: granted or refused, never queued) carrying request ids from
//! a small pool, on keys from a small pool, with other permits now and then, and time steps
//! past the retention, on limiters with a total rate, per-key rates, or both; each runs on a
//! `KeyLayer` and on the keyed script (a real `redis-server`, the same clock) and the answers
//! must agree exactly: the grant's fencing token (a second grant would show a new one), a
//! refusal's fields and retry hint. Counts of repeats within and after the retention, and of
//! repeats naming another key (refused), show the sequences reach each case.

#![cfg(all(feature = "redis", not(feature = "shuttle")))]
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use floodgate::core::keyed::{KeyLayer, KeyedSpec};
use floodgate::core::{AcquireRequest, Admission, Effects, LimiterCore, Refusal};
use floodgate::{LimiterSpec, RateSpec, Timestamp};
use support::rng::Rng;

const T0: u64 = 1_000_000_000_000;
/// Above the clock, so the script's tokens (never below the clock) are the core's.
const TOKEN_BASE: u64 = 10_000_000_000_000;
const KEYS: [&str; 3] = ["a", "b", "c"];
const IDS: [&str; 4] = ["j1", "j2", "j3", "j4"];
/// The default lease, so the retention of a paced grant's id.
const RETENTION_US: u64 = 500_000;

fn hex_key(id: &str) -> String {
    let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
    format!("r{hex}")
}

fn core_answer(a: &Admission) -> String {
    match a {
        Admission::Granted(g) => format!("granted {} {}", g.token.0, g.permits),
        Admission::Queued(_) => "queued".into(),
        Admission::Refused(r) => match r {
            Refusal::WaitTimeout { retry_after } => format!("timeout {}", retry_after.as_micros()),
            Refusal::PermitsExceedLimit { requested, limit } => {
                format!("exceeds {requested} {limit}")
            }
            Refusal::Invalid(f) => format!("invalid {} {}", f.field, f.message),
            other => format!("{other:?}"),
        },
    }
}

fn script_answer(r: &[String]) -> String {
    match r[0].as_str() {
        "granted" => format!("granted {} {}", r[1], r[2]),
        _ => r[..r.len() - 1].join(" "),
    }
}

#[test]
fn keyed_paced_repeats_match_the_core() {
    let server = support::RedisServer::start();
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let script = redis::Script::new(&floodgate::store::redis::keyed_script_source());
    script.load(&mut conn).unwrap();
    let (mut within, mut after, mut other_key) = (0u64, 0u64, 0u64);
    for case in 0..60u64 {
        let mut rng = Rng(0x5eed_0000 + case);
        let rate = |rng: &mut Rng| {
            RateSpec::per(2 + rng.below(8) as u32, Duration::from_millis(100))
                .with_burst(1 + rng.below(2) as u32)
        };
        let (total_rate, key_rate) = match case % 3 {
            0 => (Some(rate(&mut rng)), None),
            1 => (None, Some(rate(&mut rng))),
            _ => (Some(rate(&mut rng)), Some(rate(&mut rng))),
        };
        let mut spec = LimiterSpec::concurrency(1)
            .with_default_lease(Duration::from_micros(RETENTION_US))
            .with_max_wait(Duration::from_millis(100))
            .with_max_queue(8);
        spec.concurrency = None;
        spec.rate = total_rate;
        let mut keyed = KeyedSpec::default().with_max_keys(8);
        keyed.rate = key_rate;
        let (mut total, mut layer) = KeyLayer::new(spec, keyed, TOKEN_BASE).unwrap();
        let name = format!("kp{case}");
        let keys: Vec<String> = [
            "meta",
            "holders",
            "leases",
            "queue",
            "heavy",
            "waits",
            "outcomes",
            "otimes",
            "hot",
            "tokens",
            "dead",
            "kstate",
            "koverrides",
            "kqueue",
            "kring",
            "kholders",
            "kbusy",
            "ksleep",
            "kidle",
            "kheads",
        ]
        .iter()
        .map(|k| format!("kp:{{{name}}}:{k}"))
        .collect();
        let mut now = T0;
        let mut call = |now: u64, op: &str, args: &[String]| -> Vec<String> {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(script.get_hash()).arg(keys.len());
            for k in &keys {
                cmd.arg(k);
            }
            cmd.arg(format!("{op}@{now}")).arg(&name).arg(3_600_000_u64);
            for a in args {
                cmd.arg(a);
            }
            cmd.query(&mut conn).unwrap()
        };
        let opt = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_default();
        let limit = |r: Option<RateSpec>| opt(r.map(|r| r.limit));
        let period = |r: Option<RateSpec>| {
            r.map(|r| r.period.as_micros().to_string())
                .unwrap_or_default()
        };
        let burst = |r: Option<RateSpec>| opt(r.map(|r| r.burst));
        let mut put: Vec<String> = vec![
            String::new(),
            RETENTION_US.to_string(),
            "100000".into(),
            "8".into(),
            TOKEN_BASE.to_string(),
            limit(total_rate),
            period(total_rate),
            burst(total_rate),
        ];
        put.extend(std::iter::repeat_n(String::new(), 8));
        put.extend([
            String::new(),
            "8".into(),
            String::new(),
            String::new(),
            limit(key_rate),
            period(key_rate),
            burst(key_rate),
            "0".into(),
        ]);
        let reply = call(now, "kput", &put);
        assert_eq!(reply[0], "status", "{reply:?}");
        // Request id -> (key, granted at) of its latest paced grant.
        let mut granted: BTreeMap<&str, (&str, u64)> = BTreeMap::new();
        let mut log = Vec::new();
        for step in 0..120 {
            now += rng.below(4) * 50_000;
            if rng.below(8) == 0 {
                now += RETENTION_US;
            }
            let id = IDS[rng.below(IDS.len() as u64) as usize];
            let key = KEYS[rng.below(KEYS.len() as u64) as usize];
            let permits = if rng.below(6) == 0 { 2 } else { 1 };
            log.push(format!("{now} {id} {key} x{permits}"));
            let req = AcquireRequest {
                permits,
                wait: Some(Duration::ZERO),
                request_id: Some(Arc::from(id)),
                ..AcquireRequest::default()
            };
            let mut fx = Effects::default();
            let got = layer.acquire(&mut total, Timestamp(now), key, &req, &mut fx);
            let args: Vec<String> = vec![
                permits.to_string(),
                String::new(),
                "0".into(),
                hex_key(id),
                "ch".into(),
                String::new(),
                format!("t{step}"),
                key.into(),
            ];
            let reply = call(now, "kacquire", &args);
            let (c, s) = (core_answer(&got), script_answer(&reply));
            assert_eq!(c, s, "case {case} step {step}\n{}", log.join("\n"));
            if let Some(&(first_key, at)) = granted.get(id) {
                let live = now < at + RETENTION_US;
                match &got {
                    Admission::Granted(_) if live => within += 1,
                    Admission::Refused(Refusal::Invalid(_)) if live && first_key != key => {
                        other_key += 1
                    }
                    Admission::Granted(_) => after += 1,
                    _ => {}
                }
            }
            if let Admission::Granted(g) = &got {
                if g.granted_at.0 == now {
                    granted.insert(id, (key, now));
                }
            }
        }
        let _: &LimiterCore = &total;
    }
    eprintln!("{within} repeats within retention, {after} after, {other_key} naming another key");
    assert!(within > 0 && after > 0 && other_key > 0);
}
