//! Idempotent acquires: the Redis script as a checked twin of the core (`tests/twin.rs` runs
//! every other operation, with no `request_id`).
//!
//! Random sequences (a printed seed; `FLOODGATE_IDEM_SEED` replays one) of acquires carrying
//! request ids from a small pool, so that repeats happen: of a held grant, of a queued wait,
//! of something that has ended, and with other permits than the first attempt's (refused,
//! naming `request_id`), mixed with plain acquires, releases, cancels and the passage of time,
//! on concurrency limiters, rate limiters and both at once (a rate-only grant's request id is
//! remembered for the default lease, 2 s here: repeats of paced grants within it, the same
//! grant, and after it, a new one, are both compared and counted). Each step runs on
//! [`LimiterCore`] and on the script (on a real `redis-server`, same clock), and the test compares every
//! answer (grant: token, permits, deadline, grant time and wait; queueing; refusal with its
//! fields and exact hint), the wake-ups, and the status (in use, holders, queue, counters).
//!
//! Two differences are documented and left out of the comparison (docs/api.md): a repeat of a
//! held grant reports the lease it was given on the core and what is left of it on Redis
//! (`lease_ms`), and a repeat that joins a wait keeps the first attempt's deadline on Redis
//! (the test joins with exactly the time left, so both sides keep the same deadline).

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/script.rs"]
mod script;
mod support;
// Not in `support/mod.rs`: the server and CLI crates include that file too, and have no
// `redis` feature to gate this Redis-only helper on.
#[path = "support/outcomes.rs"]
mod outcomes;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use floodgate::core::{AcquireRequest, Admission, Effects, LimiterCore, Refusal};
use floodgate::{FencingToken, LimiterName, LimiterSpec, RateSpec, Timestamp};
use script::script_on_redis;
use support::rng::{seed_from_env, Rng};

const T0: u64 = 1_000_000_000;
const TOKEN_BASE: u64 = 10_000_000_000_000;
const IDS: [&str; 4] = ["a", "b", "c", "d"];

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap()
}

/// The waiter key the Redis store derives from a request id (`r` + hex), and a plain one.
fn waiter_key(request_id: Option<&str>, n: u64) -> String {
    match request_id {
        Some(id) => {
            let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
            format!("r{hex}")
        }
        None => format!("k{n}"),
    }
}

struct Twin {
    conn: redis::Connection,
    hash: String,
    keys: Vec<String>,
    name: String,
    core: LimiterCore,
    now: u64,
    /// Tokens granted (held or not: a release of a gone one answers `false` on both sides).
    tokens: Vec<u64>,
    /// Queued waiters: core id -> (script key, deadline).
    queued: BTreeMap<u64, (String, u64)>,
    /// Grant outcomes already seen (a held grant's `k:` entry stays while it is held).
    seen: HashSet<(String, String)>,
    /// Plain acquires so far (their waiter keys).
    n: u64,
    /// Request ids that got a paced (rate-only) grant, and when it was granted.
    paced_ids: BTreeMap<String, u64>,
    /// Repeats answered with a remembered paced grant (within retention).
    paced_repeats: u64,
    /// Paced grants under an id whose earlier paced grant's retention had ended.
    paced_renewed: u64,
    step: usize,
    seed: u64,
}

impl Twin {
    fn call(&mut self, op: &str, args: &[String]) -> Vec<String> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.hash).arg(self.keys.len());
        for k in &self.keys {
            cmd.arg(k);
        }
        cmd.arg(format!("{op}@{}@general", self.now))
            .arg(&self.name)
            .arg(3_600_000_u64);
        for a in args {
            cmd.arg(a);
        }
        cmd.query(&mut self.conn).expect("the script runs")
    }

    fn fail(&self, what: &str) -> ! {
        panic!("seed {} step {}: {what}", self.seed, self.step)
    }

    /// The script's wake-ups since the last step (outcomes recorded, and grants recorded with
    /// their holders), against the core's.
    fn compare_wakes(&mut self, fx: &Effects) {
        let mut core = BTreeMap::new();
        for (id, outcome) in &fx.wakes {
            let Some((key, _)) = self.queued.remove(&id.0) else {
                self.fail(&format!("the core woke {id:?}, which is not queued"));
            };
            if let Ok(g) = outcome {
                self.tokens.push(g.token.0);
            }
            core.insert(key, outcomes::encode(outcome));
        }
        // Read once: outcomes other than grants are recorded afresh each time.
        let outcomes = outcomes::take(&mut self.conn, &self.keys[6], &self.keys[7]);
        let holders: BTreeMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(&self.keys[1])
            .query(&mut self.conn)
            .unwrap();
        let mut script = BTreeMap::new();
        let held = holders.into_iter().filter_map(|(f, v)| {
            let key = f.strip_prefix("k:")?.to_owned();
            v.starts_with(b"G|")
                .then(|| (key, String::from_utf8(v).unwrap()))
        });
        for (key, value) in outcomes.into_iter().chain(held) {
            // A grant is new once; a lapsed grant's outcome moved to `outcomes` is not.
            if value.starts_with("G|") && !self.seen.insert((key.clone(), value.clone())) {
                continue;
            }
            script.insert(key, value);
        }
        if script != core {
            self.fail(&format!("wake-ups: script {script:?}, core {core:?}"));
        }
    }

    fn compare_status(&mut self) {
        let mut fx = Effects::default();
        self.core.advance(Timestamp(self.now), &mut fx);
        let reply = self.call("status", &[]);
        self.compare_wakes(&fx);
        let schema = floodgate::store::redis::status_schema();
        let f: BTreeMap<&str, &str> = schema
            .iter()
            .copied()
            .zip(reply[1..].iter().map(String::as_str))
            .collect();
        let n = |k: &str| f[k].parse::<u64>().unwrap();
        let st = self.core.status(&LimiterName::new("twin").unwrap());
        let c = st.counters;
        let script = [
            "in_use",
            "holders",
            "waiting",
            "waiting_permits",
            "granted",
            "released",
            "expired",
            "timed_out",
            "cancelled",
            "queue_full",
            "rejected",
            "paced",
        ]
        .map(n);
        let core = [
            u64::from(st.in_use),
            u64::from(st.holders),
            u64::from(st.waiting),
            st.waiting_permits,
            c.granted,
            c.released,
            c.expired,
            c.timed_out,
            c.cancelled,
            c.queue_full,
            c.rejected,
            c.paced,
        ];
        if script != core {
            self.fail(&format!("status: script {script:?}, core {core:?}"));
        }
    }

    fn acquire(&mut self, rng: &mut Rng) {
        let request_id = (rng.below(10) < 7).then(|| IDS[rng.below(4) as usize]);
        self.n += 1;
        let key = waiter_key(request_id, self.n);
        let permits = 1 + rng.below(3) as u32;
        // A repeat that joins a wait asks for exactly the time left of it (the script keeps
        // the first attempt's deadline; the core takes the joiner's).
        let joining = self
            .queued
            .values()
            .find(|(k, d)| *k == key && *d > self.now)
            .map(|(_, d)| d - self.now);
        let wait_us = joining.unwrap_or([0, 200_000, 1_500_000][rng.below(3) as usize]);
        let lease_ms = [300, 1_000, 3_000][rng.below(3) as usize];
        let req = AcquireRequest {
            permits,
            lease: Some(Duration::from_millis(lease_ms)),
            wait: Some(Duration::from_micros(wait_us)),
            holder: None,
            request_id: request_id.map(Arc::from),
        };
        let mut fx = Effects::default();
        let got = self.core.acquire(Timestamp(self.now), &req, &mut fx);
        let reply = self.call(
            "acquire",
            &[
                permits.to_string(),
                (lease_ms * 1_000).to_string(),
                wait_us.to_string(),
                key.clone(),
                "chan".into(),
                String::new(),
                format!("t.{}", self.n),
            ],
        );
        let r = &reply[..reply.len() - 1];
        let ok = match &got {
            Admission::Granted(g) => {
                let repeat = r
                    .get(1)
                    .is_some_and(|t| self.tokens.contains(&t.parse().unwrap_or(0)));
                let lease = if repeat {
                    r[3].clone()
                } else {
                    us(g.lease).to_string()
                };
                let want = [
                    "granted".to_owned(),
                    g.token.0.to_string(),
                    g.permits.to_string(),
                    lease,
                    g.lease_deadline.0.to_string(),
                    g.granted_at.0.to_string(),
                    us(g.waited).to_string(),
                ];
                if !repeat {
                    self.tokens.push(g.token.0);
                }
                if self.core.spec().concurrency.is_none() {
                    if let Some(id) = request_id {
                        if repeat {
                            self.paced_repeats += 1;
                        } else if self.paced_ids.insert(id.to_owned(), self.now).is_some() {
                            self.paced_renewed += 1;
                        }
                    }
                }
                r == want
            }
            Admission::Queued(id) => {
                let deadline = self.now + wait_us;
                self.queued
                    .entry(id.0)
                    .or_insert_with(|| (key.clone(), deadline));
                r.first().map(String::as_str) == Some("queued")
            }
            Admission::Refused(refusal) => {
                let want = match refusal {
                    Refusal::WaitTimeout { retry_after } => {
                        vec!["timeout".to_owned(), us(*retry_after).to_string()]
                    }
                    Refusal::QueueFull { retry_after } => {
                        vec!["queue_full".to_owned(), us(*retry_after).to_string()]
                    }
                    Refusal::PermitsExceedLimit { requested, limit } => vec![
                        "exceeds".to_owned(),
                        requested.to_string(),
                        limit.to_string(),
                    ],
                    Refusal::Invalid(f) => {
                        vec!["invalid".to_owned(), f.field.to_owned(), f.message.clone()]
                    }
                    other => vec![format!("{other:?}")],
                };
                r == want
            }
        };
        if !ok {
            self.fail(&format!(
                "acquire {req:?} ({key}): script {reply:?}, core {got:?}"
            ));
        }
        self.compare_wakes(&fx);
    }

    fn step(&mut self, rng: &mut Rng) {
        self.step += 1;
        self.now += rng.below(4) * 100_000;
        match rng.below(10) {
            0..=5 => self.acquire(rng),
            6 | 7 if !self.tokens.is_empty() => {
                let token = self.tokens[rng.below(self.tokens.len() as u64) as usize];
                let mut fx = Effects::default();
                let got = self
                    .core
                    .release(Timestamp(self.now), FencingToken(token), &mut fx);
                let reply = self.call("release", &[token.to_string()]);
                if (reply[1] == "1") != got {
                    self.fail(&format!("release {token}: script {reply:?}, core {got}"));
                }
                self.compare_wakes(&fx);
            }
            8 if !self.queued.is_empty() => {
                let i = rng.below(self.queued.len() as u64) as usize;
                let (&id, (key, _)) = self.queued.iter().nth(i).unwrap();
                let key = key.clone();
                let mut fx = Effects::default();
                let got =
                    self.core
                        .cancel(Timestamp(self.now), floodgate::core::WaiterId(id), &mut fx);
                let reply = self.call("cancel", &[key.clone(), "drop".into()]);
                if (reply[0] == "cancelled") != got {
                    self.fail(&format!("cancel {key}: script {reply:?}, core {got}"));
                }
                if got {
                    self.queued.remove(&id);
                }
                self.compare_wakes(&fx);
            }
            _ => self.now += rng.below(15) * 100_000,
        }
        self.compare_status();
    }
}

fn spec(rng: &mut Rng) -> LimiterSpec {
    let rate = RateSpec::per(5 + rng.below(16) as u32, Duration::from_secs(1))
        .with_burst(1 + rng.below(3) as u32);
    let base = match rng.below(3) {
        0 => LimiterSpec::concurrency(1 + rng.below(3) as u32),
        1 => LimiterSpec::concurrency(1 + rng.below(3) as u32).with_rate(rate),
        _ => LimiterSpec::rate(rate),
    };
    base.with_default_lease(Duration::from_secs(2))
        .with_max_wait(Duration::from_secs(2))
        .with_max_queue(4)
}

/// `put` with the arguments the store sends (as `tests/twin.rs`).
fn put_args(s: &LimiterSpec) -> Vec<String> {
    let o = |v: Option<String>| v.unwrap_or_default();
    let r = s.rate;
    vec![
        o(s.concurrency.map(|c| c.to_string())),
        us(s.default_lease).to_string(),
        us(s.max_wait).to_string(),
        s.max_queue.to_string(),
        TOKEN_BASE.to_string(),
        o(r.map(|r| r.limit.to_string())),
        o(r.map(|r| us(r.period).to_string())),
        o(r.map(|r| r.burst.to_string())),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        "0".into(),
        String::new(),
        String::new(),
    ]
}

/// One call of the limiter script on limiter `name` (keys under the prefix `it`), as the store
/// sends it.
fn eval(
    conn: &mut redis::Connection,
    script: &redis::Script,
    name: &str,
    op: &str,
    args: &[String],
) -> Vec<String> {
    let keys = floodgate::store::redis::limiter_keys("it", name);
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len());
    for k in &keys {
        cmd.arg(k);
    }
    cmd.arg(op).arg(name).arg(3_600_000_u64);
    for a in args {
        cmd.arg(a);
    }
    cmd.query(conn).expect("the script runs")
}

#[test]
fn idempotent_acquires_match_the_core() {
    let (_server, mut conn, script) = script_on_redis();
    let seed = seed_from_env("FLOODGATE_IDEM_SEED");
    eprintln!("idem_twin seed {seed} (FLOODGATE_IDEM_SEED replays it)");
    let mut rng = Rng(seed);
    let (mut acquires, mut refused) = (0, 0);
    let (mut paced_repeats, mut paced_renewed) = (0, 0);
    let sequences = 300;
    for s in 0..sequences {
        let spec = spec(&mut rng);
        let name = format!("idem{s}");
        let mut twin = Twin {
            conn,
            hash: script.get_hash().to_owned(),
            keys: floodgate::store::redis::limiter_keys("it", &name).to_vec(),
            name,
            core: LimiterCore::new(spec.clone(), TOKEN_BASE).unwrap(),
            now: T0,
            tokens: Vec::new(),
            queued: BTreeMap::new(),
            seen: HashSet::new(),
            n: 0,
            paced_ids: BTreeMap::new(),
            paced_repeats: 0,
            paced_renewed: 0,
            step: 0,
            seed,
        };
        let reply = twin.call("put", &put_args(&spec));
        assert_eq!(reply[0], "status", "{reply:?}");
        for _ in 0..40 {
            twin.step(&mut rng);
        }
        let c = twin.core.counters();
        refused += c.rejected;
        acquires += twin.n;
        paced_repeats += twin.paced_repeats;
        paced_renewed += twin.paced_renewed;
        conn = twin.conn;
    }
    eprintln!(
        "{sequences} sequences, {acquires} acquires, {refused} refused as invalid or too large"
    );
    eprintln!("{paced_repeats} repeats of paced grants, {paced_renewed} after retention");
    assert!(refused > 0, "no mismatched repeat was generated");
    assert!(
        paced_repeats > 0,
        "no repeat of a paced grant within retention"
    );
    assert!(
        paced_renewed > 0,
        "no paced grant under an id past its retention"
    );
}

/// Memory stays bounded: ids of paced grants are forgotten after the retention on both sides,
/// also when every grant takes the script's fast path (which never runs the outcome prune:
/// each record there drops expired ones first). 2,000 idempotent grants, one per 10 ms, a 2 s
/// retention: about 200 remembered at a time, never the 2,000.
#[test]
fn paced_ids_stay_bounded_by_the_retention_window() {
    let (_server, mut conn, script) = script_on_redis();
    let spec = LimiterSpec::rate(RateSpec::per(1_000, Duration::from_secs(1)).with_burst(10))
        .with_default_lease(Duration::from_secs(2));
    let call = |conn: &mut redis::Connection, op: String, args: &[String]| -> Vec<String> {
        eval(conn, &script, "bounded", &op, args)
    };
    let keys = floodgate::store::redis::limiter_keys("it", "bounded").to_vec();
    let reply = call(&mut conn, format!("put@{T0}"), &put_args(&spec));
    assert_eq!(reply[0], "status", "{reply:?}");
    let mut core = LimiterCore::new(spec, TOKEN_BASE).unwrap();
    let (mut most_script, mut most_core) = (0, 0);
    for i in 0..2_000u64 {
        let now = T0 + i * 10_000;
        let id = format!("job-{i}");
        let req = AcquireRequest {
            permits: 1,
            lease: None,
            wait: Some(Duration::ZERO),
            holder: None,
            request_id: Some(Arc::from(id.as_str())),
        };
        let got = core.acquire(Timestamp(now), &req, &mut Effects::default());
        // The bare `acquire@now`: the fast path may answer.
        let args = ["1", "", "0", &waiter_key(Some(&id), 0), "chan", "", "t"].map(str::to_owned);
        let r = call(&mut conn, format!("acquire@{now}"), &args);
        let Admission::Granted(g) = got else {
            panic!("step {i}: core {got:?}")
        };
        assert_eq!(
            r[..2],
            ["granted".to_owned(), g.token.0.to_string()],
            "step {i}"
        );
        let remembered: usize = redis::cmd("HLEN").arg(&keys[6]).query(&mut conn).unwrap();
        most_script = most_script.max(remembered);
        most_core = most_core.max(core.to_state().paced.len());
    }
    eprintln!("most remembered: script {most_script}, core {most_core}");
    assert!(most_core <= 202, "core kept {most_core}");
    assert!(most_script <= 203, "script kept {most_script}");
    // And a retry within the window still gets its grant on both sides.
    let last = T0 + 1_999 * 10_000;
    let args = [
        "1",
        "",
        "0",
        &waiter_key(Some("job-1990"), 0),
        "chan",
        "",
        "t",
    ]
    .map(str::to_owned);
    let r = call(&mut conn, format!("acquire@{}", last + 1), &args);
    let req = AcquireRequest {
        permits: 1,
        wait: Some(Duration::ZERO),
        request_id: Some(Arc::from("job-1990")),
        ..AcquireRequest::default()
    };
    let Admission::Granted(g) = core.acquire(Timestamp(last + 1), &req, &mut Effects::default())
    else {
        panic!("the retry was not granted on the core")
    };
    assert_eq!(r[..2], ["granted".to_owned(), g.token.0.to_string()]);
    assert_eq!(
        core.counters().granted,
        2_000,
        "the retry was counted again"
    );
}

/// The rate-only fast path (`lua/paced.lua`, the path a rate-only try-once takes) against the
/// core to the microsecond: random rate specs with intervals from 50 µs to 50 ms, try-once
/// acquires of one permit up to one more than the burst (a count over the burst is refused by
/// the general path), plain and idempotent, at clock steps of a few microseconds up to two
/// intervals, so grants fall just before and just after the rate allows them and refusals carry
/// hints below and above the 1 ms floor. Every reply is compared whole (a grant's token,
/// permits, lease, times and wait; a refusal's hint), and the counters after each sequence.
#[test]
fn the_rate_only_fast_path_matches_the_core_to_the_microsecond() {
    let (_server, mut conn, script) = script_on_redis();
    let seed = seed_from_env("FLOODGATE_IDEM_SEED");
    eprintln!("paced fast path seed {seed} (FLOODGATE_IDEM_SEED replays it)");
    let mut rng = Rng(seed);
    let (mut granted, mut refused, mut under_floor) = (0, 0, 0);
    for s in 0..150 {
        let (limit, period_ms, burst) = (
            rng.range(1, 20) as u32,
            [1, 3, 10, 50][rng.below(4) as usize],
            rng.range(1, 4) as u32,
        );
        let spec = LimiterSpec::rate(
            RateSpec::per(limit, Duration::from_millis(period_ms)).with_burst(burst),
        )
        .with_default_lease(Duration::from_secs(2));
        let interval = period_ms * 1_000 / u64::from(limit);
        let name = format!("paced{s}");
        let mut core = LimiterCore::new(spec.clone(), TOKEN_BASE).unwrap();
        let reply = eval(
            &mut conn,
            &script,
            &name,
            &format!("put@{T0}"),
            &put_args(&spec),
        );
        assert_eq!(reply[0], "status", "{reply:?}");
        let mut now = T0;
        for step in 0..60u64 {
            now += match rng.below(3) {
                0 => rng.below(5),
                _ => rng.below(2 * interval + 1),
            };
            let permits = rng.range(1, u64::from(burst) + 1) as u32;
            let id = (rng.below(4) == 0).then(|| format!("s{s}-{step}"));
            let req = AcquireRequest {
                permits,
                wait: Some(Duration::ZERO),
                request_id: id.as_deref().map(Arc::from),
                ..AcquireRequest::default()
            };
            let got = core.acquire(Timestamp(now), &req, &mut Effects::default());
            let args = [
                permits.to_string(),
                String::new(),
                "0".into(),
                waiter_key(id.as_deref(), step),
                "chan".into(),
                String::new(),
                "t".into(),
            ];
            let r = eval(&mut conn, &script, &name, &format!("acquire@{now}"), &args);
            let want: Vec<String> = match &got {
                Admission::Granted(g) => {
                    granted += 1;
                    [
                        "granted".to_owned(),
                        g.token.0.to_string(),
                        g.permits.to_string(),
                        us(g.lease).to_string(),
                        g.lease_deadline.0.to_string(),
                        g.granted_at.0.to_string(),
                        us(g.waited).to_string(),
                    ]
                    .into()
                }
                Admission::Refused(Refusal::WaitTimeout { retry_after }) => {
                    refused += 1;
                    if us(*retry_after) <= 1_000 {
                        under_floor += 1;
                    }
                    vec!["timeout".to_owned(), us(*retry_after).to_string()]
                }
                Admission::Refused(Refusal::PermitsExceedLimit { requested, limit }) => {
                    vec![
                        "exceeds".to_owned(),
                        requested.to_string(),
                        limit.to_string(),
                    ]
                }
                other => panic!("seed {seed}, {name} step {step}: the core answered {other:?}"),
            };
            assert_eq!(
                r[..want.len()],
                want[..],
                "seed {seed}, {name} step {step} at {now}: script {r:?}"
            );
        }
        let status = eval(&mut conn, &script, &name, &format!("status@{now}"), &[]);
        let schema = floodgate::store::redis::status_schema();
        let c = core.counters();
        for (field, value) in [
            ("granted", c.granted),
            ("paced", c.paced),
            ("timed_out", c.timed_out),
        ] {
            let at = schema.iter().position(|f| *f == field).unwrap();
            assert_eq!(
                status[at + 1],
                value.to_string(),
                "seed {seed}, {name}: {field}"
            );
        }
    }
    eprintln!("{granted} granted, {refused} refused ({under_floor} with the 1 ms floor's hint)");
    assert!(granted > 1_000 && refused > 1_000 && under_floor > 100);
}

/// A repeat of an idempotent acquire takes over what its first attempt left, on the script's
/// own terms (the random sequences above never send the first attempt's `abandon`): a repeat
/// that joins the queued wait, and one that gets the grant already held, each name themselves
/// its owner, so the first attempt's `abandon` (its caller went away; the store sends it when
/// the grant reaches that attempt's server, or its grace ends) is answered `kept` and neither
/// cancels the wait the repeat joined nor hands back the grant the repeat holds (which would
/// leave its caller working on a permit the limiter counts free). Mutation-checked: without
/// either `HSET a:KEY` (ops/acquire.lua's join, state.lua's `repeat_granted`) the abandon is
/// carried out.
#[test]
fn a_repeat_owns_what_its_first_attempt_left_and_that_attempt_abandons_nothing() {
    let (_server, mut conn, script) = script_on_redis();
    let spec = LimiterSpec::concurrency(1).with_max_wait(Duration::from_secs(60));
    let mut call = |op: &str, args: &[String]| -> Vec<String> {
        eval(&mut conn, &script, "own", &format!("{op}@{T0}"), args)
    };
    assert_eq!(call("put", &put_args(&spec))[0], "status");
    let acquire = |key: &str, attempt: &str| -> Vec<String> {
        [1, 60_000_000, 60_000_000]
            .iter()
            .map(u64::to_string)
            .chain([key, "chan", "", attempt].map(str::to_owned))
            .collect()
    };
    let held = call("acquire", &acquire("kplain", "s.1"));
    assert_eq!(held[0], "granted", "{held:?}");
    let key = waiter_key(Some("job"), 0);
    let cancel = |attempt: &str| vec![key.clone(), "abandon".to_owned(), attempt.to_owned()];
    let status = |call: &mut dyn FnMut(&str, &[String]) -> Vec<String>| {
        let s = call("status", &[]);
        let schema = floodgate::store::redis::status_schema();
        let field = |name: &str| {
            let at = schema.iter().position(|f| *f == name).expect(name);
            s[at + 1].parse::<u64>().unwrap()
        };
        (field("in_use"), field("waiting"))
    };

    // The first attempt queues; the repeat joins; the first attempt's abandon keeps the wait.
    assert_eq!(call("acquire", &acquire(&key, "s.2"))[0], "queued");
    assert_eq!(call("acquire", &acquire(&key, "s.3"))[0], "queued");
    let kept = call("cancel", &cancel("s.2"));
    assert_eq!(
        kept[0], "kept",
        "the first attempt cancelled the joined wait: {kept:?}"
    );
    assert_eq!(status(&mut call), (1, 1));

    // The wait is granted; a later repeat gets that grant; the older attempts' abandons keep it.
    let released = call("release", std::slice::from_ref(&held[1]));
    assert_eq!(released[0], "released", "{released:?}");
    assert_eq!(status(&mut call), (1, 0));
    let again = call("acquire", &acquire(&key, "s.4"));
    assert_eq!(again[0], "granted", "{again:?}");
    for older in ["s.2", "s.3"] {
        let kept = call("cancel", &cancel(older));
        assert_eq!(
            kept[0], "kept",
            "{older} handed the repeat's grant back: {kept:?}"
        );
    }
    assert_eq!(
        status(&mut call),
        (1, 0),
        "the repeat's grant is still held"
    );
}
