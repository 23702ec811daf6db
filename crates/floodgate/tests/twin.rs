//! The Redis script as a checked twin of the core (issue 11).
//!
//! Random operation sequences (the model test's generators, `tests/gen`) run against
//! [`LimiterCore`] and against the limiter script (`store/redis/lua/`) on a real `redis-server`, side by side, on the same
//! clock: the script takes `now` from its op argument (`acquire@<now>`, a form only tests send;
//! production reads Redis `TIME`). After every step the test compares every reply (grants with
//! their tokens, deadlines and waits; refusals with their exact retry hints; release, extend and
//! cancel results), the wake-ups (who, with which outcome), the timer hint (the delay to the
//! next deadline the script reports, against the core's exact next deadline) and every status
//! field (spec, in-use, holders, queue, limit, all counters, learning). Half the sequences run
//! with the script's fast path allowed, half with only the general path (`acquire@<now>@general`),
//! so both are checked against the core. Half the sequences move the clock a microsecond
//! either side of their whole-millisecond steps (`Twin::run`): mutation-checked, a learning
//! window the script ended up to 999 µs early (`learning_until <= now + 999`) passed the
//! whole-millisecond sequences and fails these.
//!
//! `FLOODGATE_TWIN_CASES` sets the number of sequences (default 2,000).

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod gen;
#[path = "support/outcomes.rs"]
mod outcomes;
#[path = "support/script.rs"]
mod script;
mod support;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use floodgate::core::Feedback;
use floodgate::core::{
    AcquireRequest, Admission, Counters, Effects, LimiterCore, Refusal, WaitOutcome, WaiterId,
};
use floodgate::{AdaptiveSpec, FencingToken, LimiterName, LimiterSpec, RateSpec, Timestamp};
use gen::{permits_for, scenario, span_ms, Op, SpecChoice, Step, TokenPick, WaiterPick};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::rng::XorShift;

/// The clock's start, in microseconds: any value works, both sides get the same.
const T0: u64 = 1_000_000_000;
/// Added to the generated first token: the script never hands out a token below its clock, so
/// tokens start above any `now` a sequence reaches and both sides count from the same place.
const TOKEN_BASE: u64 = 10_000_000_000_000;
/// Steps per sequence at most (the model test's generator makes up to 200).
const STEPS: usize = 30;
/// Unknown tokens and waiters are picked this far beyond anything handed out.
const FAR: u64 = 1_000_000;

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap()
}

/// What the twin adds to the model's specs: a rate (or rate only) and an adaptive range, so
/// `put`'s rescaling of the time owed and its reset of a learned limit are compared too.
#[derive(Debug, Clone)]
struct Variation {
    /// Tokens per period, period in ms, burst.
    rate: Option<(u32, u64, u32)>,
    /// With a rate: no concurrency limit.
    rate_only: bool,
    /// The adaptive range around the concurrency: `(below, above)`.
    adaptive: Option<(u32, u32)>,
    /// The latency-aware controller instead of AIMD: `(tolerance, probe_rounds)`.
    gradient: Option<(f64, u32)>,
}

fn variation() -> impl Strategy<Value = Variation> {
    (
        prop_oneof![
            2 => Just(None),
            1 => (1_u32..=20, prop_oneof![Just(100_u64), Just(1_000), Just(3_000)], 1_u32..=4)
                .prop_map(Some),
        ],
        prop_oneof![3 => Just(false), 1 => Just(true)],
        prop_oneof![2 => Just(None), 1 => (0_u32..=3, 0_u32..=4).prop_map(Some)],
        prop_oneof![
            1 => Just(None),
            2 => (prop_oneof![Just(1.1), Just(1.5), Just(2.0)], 1_u32..=3).prop_map(Some),
        ],
    )
        .prop_map(|(rate, rate_only, adaptive, gradient)| Variation {
            rate,
            rate_only,
            adaptive,
            gradient,
        })
}

fn apply(spec: &SpecChoice, v: &Variation) -> LimiterSpec {
    let mut s = spec.spec();
    if let Some((limit, period_ms, burst)) = v.rate {
        s.rate = Some(RateSpec::per(limit, Duration::from_millis(period_ms)).with_burst(burst));
        if v.rate_only {
            s.concurrency = None;
            return s;
        }
    }
    if let (Some((below, above)), Some(c)) = (v.adaptive, s.concurrency) {
        let (min, max) = (c.saturating_sub(below).max(1), c + above);
        s.adaptive = Some(match v.gradient {
            Some((tolerance, probe_rounds)) => {
                let mut a = AdaptiveSpec::gradient(min, max);
                a.tolerance = tolerance;
                a.probe_rounds = probe_rounds;
                a
            }
            None => AdaptiveSpec::between(min, max),
        });
    }
    s
}

/// Operations only the twin runs (the model test has no rate, adaptive limit or learning).
#[derive(Debug, Clone)]
enum Extra {
    /// An outcome, with the call's latency in ms if reported.
    Feedback(u8, Option<u64>),
    Schedule(u32),
    /// Gives back unused tokens of the latest reservation (`stale`: of an id that is not it).
    Unschedule {
        unused: u32,
        stale: bool,
    },
    /// Redis changed under the store: a learning window of this many ms (0: none).
    Learn(u64),
    /// An extend of a permit nobody was granted here, carrying its size: re-adopted during a
    /// learning window, lost otherwise. `n` of 3 and 4 name tokens no store hands out (just
    /// above `MAX_ADOPTED_TOKEN`, and `u64::MAX`): never re-adopted.
    Adopt {
        n: u64,
        permits: u32,
        lease_ms: u64,
    },
}

fn extra() -> impl Strategy<Value = Extra> {
    prop_oneof![
        3 => (0_u8..3, prop_oneof![1 => Just(None), 3 => (0_u64..=3_000).prop_map(Some)])
            .prop_map(|(k, l)| Extra::Feedback(k, l)),
        1 => (1_u32..=20).prop_map(Extra::Schedule),
        1 => (1_u32..=25, proptest::bool::weighted(0.2))
            .prop_map(|(unused, stale)| Extra::Unschedule { unused, stale }),
        1 => prop_oneof![Just(0_u64), 1_u64..=3_000].prop_map(Extra::Learn),
        2 => (0_u64..5, 1_u32..=3, 100_u64..=3_000)
            .prop_map(|(n, permits, lease_ms)| Extra::Adopt { n, permits, lease_ms }),
    ]
}

/// One sequence: the core, the script's keys, and what the harness tracks to pick operands.
struct Twin<'a> {
    conn: &'a RefCell<redis::Connection>,
    script: &'a redis::Script,
    keys: Vec<String>,
    name: String,
    core: LimiterCore,
    now: u64,
    general: bool,
    /// Every token granted, in order.
    tokens: Vec<u64>,
    /// The id given to the latest schedule (the step's number), for `Unschedule`.
    reservation: u64,
    /// Waiters queued now (core id, script key), in queue order.
    queued: Vec<(u64, String)>,
    /// Waiters that left the queue.
    departed: Vec<(u64, String)>,
    /// Acquires so far: numbers the script's waiter keys.
    acquires: u64,
    /// Outcome keys already seen in the script's `outcomes` hash.
    seen: HashSet<String>,
    /// Steps run so far, for the failure message.
    step: usize,
    /// What the last call's pipeline also fetched: the status reply and the outcomes hash.
    fetched: Option<(Vec<String>, BTreeMap<String, String>)>,
    /// The core's wake-ups of the current step, compared once the script's are fetched.
    core_wakes: Vec<(WaiterId, WaitOutcome)>,
    /// Spec variations, taken in turn by the creation and each reconfigure.
    variations: Vec<Variation>,
    /// Reconfigures so far: picks the next variation.
    puts: usize,
}

impl<'a> Twin<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        conn: &'a RefCell<redis::Connection>,
        script: &'a redis::Script,
        name: String,
        spec: &SpecChoice,
        first_token: u64,
        general: bool,
        variations: Vec<Variation>,
        learn_ms: Option<u64>,
    ) -> Result<Self, TestCaseError> {
        let keys = floodgate::store::redis::limiter_keys("tw", &name).to_vec();
        let full = apply(spec, &variations[0]);
        let mut core = LimiterCore::new(full.clone(), TOKEN_BASE + first_token).unwrap();
        if let Some(ms) = learn_ms {
            core.enter_learning(Timestamp(T0), Timestamp(T0 + ms * 1_000));
        }
        let mut twin = Twin {
            conn,
            script,
            keys,
            name,
            core,
            now: T0,
            general,
            tokens: Vec::new(),
            reservation: 0,
            queued: Vec::new(),
            departed: Vec::new(),
            acquires: 0,
            seen: HashSet::new(),
            step: 0,
            fetched: None,
            core_wakes: Vec::new(),
            variations,
            puts: 0,
        };
        let reply = twin.put(
            &full,
            TOKEN_BASE + first_token,
            learn_ms.unwrap_or(0) * 1_000,
        );
        prop_assert_eq!(
            reply.first().map(String::as_str),
            Some("status"),
            "{:?}",
            reply
        );
        twin.compare_status()?;
        Ok(twin)
    }

    fn evalsha(&self, op: &str, args: &[String]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(self.keys.len());
        for k in &self.keys {
            cmd.arg(k);
        }
        let fast = matches!(op, "acquire" | "release") && !self.general;
        let tag = if fast {
            format!("{op}@{}", self.now)
        } else {
            format!("{op}@{}@general", self.now)
        };
        cmd.arg(tag).arg(&self.name).arg(3_600_000_u64);
        for a in args {
            cmd.arg(a);
        }
        cmd
    }

    /// Runs one script operation at the twin's clock and, in the same round trip, a status
    /// and a read of the recorded outcomes (kept in `fetched` for `finish_step`).
    fn call(&mut self, op: &str, args: &[String]) -> Vec<String> {
        let mut pipe = redis::pipe();
        pipe.add_command(self.evalsha(op, args))
            .add_command(self.evalsha("status", &[]))
            .cmd("HGETALL")
            .arg(&self.keys[6])
            .cmd("HGETALL")
            .arg(&self.keys[1]);
        type Fetched = (
            Vec<String>,
            Vec<String>,
            BTreeMap<String, String>,
            // Bytes: `holders` also holds the packed `hot` value.
            BTreeMap<String, Vec<u8>>,
        );
        let (reply, status, mut outcomes, holders): Fetched = pipe
            .query(&mut *self.conn.borrow_mut())
            .expect("the script runs");
        // A grant's outcome is kept with its holder (`k:KEY` = `G|...`) while it is held.
        for (field, value) in holders {
            if let Some(key) = field.strip_prefix("k:") {
                if value.starts_with(b"G|") {
                    let value = String::from_utf8(value).expect("an outcome is text");
                    outcomes.insert(key.to_owned(), value);
                }
            }
        }
        if std::env::var_os("FLOODGATE_TWIN_DEBUG").is_some() {
            eprintln!(
                "{} {op} {args:?} -> {reply:?}\n  status {status:?}",
                self.now
            );
        }
        self.fetched = Some((status, outcomes));
        reply
    }

    /// `put` with the arguments the store sends (RedisLimiter::put).
    fn put(&mut self, s: &LimiterSpec, first_token: u64, learn_us: u64) -> Vec<String> {
        let o = |v: Option<String>| v.unwrap_or_default();
        let (r, a) = (s.rate, s.adaptive);
        let args = [
            o(s.concurrency.map(|c| c.to_string())),
            us(s.default_lease).to_string(),
            us(s.max_wait).to_string(),
            s.max_queue.to_string(),
            first_token.to_string(),
            o(r.map(|r| r.limit.to_string())),
            o(r.map(|r| us(r.period).to_string())),
            o(r.map(|r| r.burst.to_string())),
            o(a.map(|a| a.min.to_string())),
            o(a.map(|a| a.max.to_string())),
            o(a.map(|a| a.increase.to_string())),
            o(a.map(|a| format!("{}", a.decrease))),
            o(a.map(|a| us(a.cooldown).to_string())),
            learn_us.to_string(),
            String::new(),
            o(a.map(|a| format!("{}|{}|{}", a.algorithm.name(), a.tolerance, a.probe_rounds))),
        ];
        self.call("put", &args)
    }

    /// The gradient controller's state, as the script keeps it (`g_state` in meta), against
    /// the core's.
    fn compare_gradient(&mut self) -> Result<(), TestCaseError> {
        let raw: Option<String> = redis::cmd("HGET")
            .arg(&self.keys[0])
            .arg("g_state")
            .query(&mut *self.conn.borrow_mut())
            .unwrap();
        let g = self.core.to_state().gradient;
        let core = format!(
            "{}|{}|{}|{}|{}|{}",
            g.short_us, g.long_us, g.ceiling, g.credit, g.samples, g.backoff
        );
        let script = raw.unwrap_or_else(|| "0|0|0|0|0|0".to_owned());
        prop_assert_eq!(script, core, "gradient state at step {}", self.step);
        Ok(())
    }

    fn core_limit(&self) -> u32 {
        self.core.spec().concurrency.unwrap_or(1)
    }

    fn pick_token(&self, pick: &TokenPick) -> u64 {
        let held: Vec<u64> = self
            .tokens
            .iter()
            .copied()
            .filter(|t| self.core.is_held(Timestamp(self.now), FencingToken(*t)))
            .collect();
        let gone: Vec<u64> = self
            .tokens
            .iter()
            .copied()
            .filter(|t| !held.contains(t))
            .collect();
        let unknown = |n: u64| self.core.next_token() + FAR + n;
        match *pick {
            TokenPick::Live(i) if !held.is_empty() => held[i % held.len()],
            TokenPick::Live(i) | TokenPick::Gone(i) if !gone.is_empty() => gone[i % gone.len()],
            TokenPick::Live(i) | TokenPick::Gone(i) => unknown(i as u64 % 4),
            TokenPick::Unknown(n) => unknown(n),
        }
    }

    fn pick_waiter(&self, pick: &WaiterPick) -> (u64, String) {
        let unknown = |n: u64| (u64::MAX / 2 + n, format!("unknown{n}"));
        match *pick {
            WaiterPick::Head if !self.queued.is_empty() => self.queued[0].clone(),
            WaiterPick::Queued(i) if !self.queued.is_empty() => {
                self.queued[i % self.queued.len()].clone()
            }
            WaiterPick::Queued(i) | WaiterPick::Departed(i) if !self.departed.is_empty() => {
                self.departed[i % self.departed.len()].clone()
            }
            WaiterPick::Queued(i) | WaiterPick::Departed(i) => unknown(i as u64 % 4),
            WaiterPick::Head => unknown(0),
            WaiterPick::Unknown(n) => unknown(n),
        }
    }

    /// Notes the core's wake-ups; they are compared with the script's at the end of the step.
    fn compare_wakes(&mut self, fx: &Effects) -> Result<(), TestCaseError> {
        self.core_wakes.extend(fx.wakes.iter().cloned());
        Ok(())
    }

    /// Compares the step's wake-ups (the operation's and the status pass's) with the outcomes
    /// the script newly recorded, and moves the woken waiters out of the queue.
    fn compare_step_wakes(
        &mut self,
        outcomes: BTreeMap<String, String>,
    ) -> Result<(), TestCaseError> {
        let mut core = BTreeMap::new();
        for (id, outcome) in std::mem::take(&mut self.core_wakes) {
            let pos = self.queued.iter().position(|(q, _)| *q == id.0);
            prop_assert!(pos.is_some(), "the core woke {:?}, which is not queued", id);
            let (q, key) = self.queued.remove(pos.unwrap());
            if let Ok(g) = &outcome {
                self.tokens.push(g.token.0);
            }
            core.insert(key.clone(), outcomes::encode(&outcome));
            self.departed.push((q, key));
        }
        let script: BTreeMap<String, String> = outcomes
            .into_iter()
            .filter(|(k, _)| self.seen.insert(k.clone()))
            .collect();
        prop_assert_eq!(script, core, "wake-ups at step {}", self.step);
        Ok(())
    }

    /// The reply's last field, the delay to the next deadline, against the core's exact one.
    fn compare_hint(&mut self, reply: &[String], exact: bool) -> Result<(), TestCaseError> {
        let hint: i64 = reply.last().unwrap().parse().unwrap();
        let next = self
            .core
            .next_deadline()
            .map(|d| d.0.saturating_sub(self.now));
        let script = u64::try_from(hint).ok();
        if exact {
            prop_assert_eq!(
                script,
                next,
                "timer hint at step {}: {:?}",
                self.step,
                reply
            );
        } else {
            // The fast paths report `due`, a lower bound of the next deadline (a lease or a
            // wait that has since gone may still hold it down): never later than the exact
            // deadline (an early timer finds nothing due and re-arms at the exact one).
            prop_assert!(
                script.is_some_and(|s| next.is_none_or(|n| s <= n)) || script == next,
                "timer hint at step {}: {:?} vs {:?}",
                self.step,
                reply,
                next
            );
        }
        Ok(())
    }

    /// After each call: the status pass (an `advance` at the same moment on both sides), the
    /// wake-ups of the whole step, and every status field.
    fn compare_status(&mut self) -> Result<(), TestCaseError> {
        let mut fx = Effects::default();
        self.core.advance(Timestamp(self.now), &mut fx);
        self.compare_wakes(&fx)?;
        let (reply, outcomes) = self.fetched.take().expect("a call fetched the status");
        self.compare_step_wakes(outcomes)?;
        prop_assert_eq!(reply.first().map(String::as_str), Some("status"));
        let schema = floodgate::store::redis::status_schema();
        let f: BTreeMap<&str, &str> = schema
            .iter()
            .copied()
            .zip(reply[1..].iter().map(String::as_str))
            .collect();
        prop_assert_eq!(reply.len(), schema.len() + 2, "status fields: {:?}", reply);
        let n = |k: &str| f[k].parse::<u64>().unwrap();
        let st = self.core.status(&LimiterName::new("twin").unwrap());
        let spec = &st.spec;
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        let script = (
            f["concurrency"].to_owned(),
            n("lease_us"),
            n("max_wait_us"),
            n("max_queue"),
            n("in_use"),
            n("holders"),
            n("waiting"),
            n("waiting_permits"),
            f["limit"].to_owned(),
            f["learning"] == "1",
            [f["rate_limit"], f["rate_period_us"], f["rate_burst"]].join("|"),
            [
                f["a_min"],
                f["a_max"],
                f["a_inc"],
                f["a_dec"],
                f["a_cool_us"],
            ]
            .join("|"),
        );
        let core = (
            opt(spec.concurrency.map(u64::from)),
            us(spec.default_lease),
            us(spec.max_wait),
            u64::from(spec.max_queue),
            u64::from(st.in_use),
            u64::from(st.holders),
            u64::from(st.waiting),
            st.waiting_permits,
            opt(st.limit.map(u64::from)),
            st.learning,
            spec.rate.map_or("||".into(), |r| {
                format!("{}|{}|{}", r.limit, us(r.period), r.burst)
            }),
            spec.adaptive.map_or("||||".into(), |a| {
                format!(
                    "{}|{}|{}|{:.17}|{}",
                    a.min,
                    a.max,
                    a.increase,
                    a.decrease,
                    us(a.cooldown)
                )
            }),
        );
        prop_assert_eq!(script, core, "status at step {}: {:?}", self.step, reply);
        let ext = spec.adaptive.map_or(String::new(), |a| {
            format!("{}|{}|{}", a.algorithm.name(), a.tolerance, a.probe_rounds)
        });
        prop_assert_eq!(
            f["a_ext"],
            ext.as_str(),
            "adaptive spec at step {}",
            self.step
        );
        let mut c = Counters::default();
        c.granted = n("granted");
        c.released = n("released");
        c.expired = n("expired");
        c.timed_out = n("timed_out");
        c.cancelled = n("cancelled");
        c.queue_full = n("queue_full");
        c.rejected = n("rejected");
        c.extend_lost = n("extend_lost");
        c.paced = n("paced");
        c.scheduled = n("scheduled");
        c.feedback_ok = n("feedback_ok");
        c.feedback_throttled = n("feedback_throttled");
        c.feedback_error = n("feedback_error");
        c.limit_decreases = n("limit_decreases");
        c.limit_increases = n("limit_increases");
        c.adopted = n("adopted");
        prop_assert_eq!(c, st.counters, "counters at step {}", self.step);
        self.compare_hint(&reply, true)
    }

    /// Runs the steps. The generated steps move the clock in whole milliseconds, so deadlines
    /// (made of whole-millisecond leases, waits and intervals) fall on the clock's ticks exactly;
    /// `nudges` moves each step's `now` a microsecond either side of its tick (never backwards),
    /// so a comparison off by a microsecond (`<` for `<=`, a deadline 1 µs short) meets a
    /// clock that tells.
    fn run(
        &mut self,
        steps: &[Step],
        extras: &[(usize, u64, Extra)],
        nudges: &[i64],
    ) -> Result<(), TestCaseError> {
        let mut tick = self.now;
        let mut nudge = nudges.iter().copied().cycle();
        let mut move_to = |twin: &mut Self, dt_ms: u64| {
            tick += dt_ms * 1_000;
            let nudged = tick.saturating_add_signed(nudge.next().unwrap_or(0));
            twin.now = twin.now.max(nudged);
        };
        for (i, s) in steps.iter().enumerate() {
            self.step += 1;
            move_to(self, s.dt_ms);
            self.one(&s.op)?;
            self.compare_status()?;
            for (_, dt_ms, e) in extras.iter().filter(|(at, _, _)| *at == i) {
                self.step += 1;
                move_to(self, *dt_ms);
                self.extra(e)?;
                self.compare_status()?;
            }
        }
        Ok(())
    }

    fn extra(&mut self, e: &Extra) -> Result<(), TestCaseError> {
        let ts = Timestamp(self.now);
        let mut fx = Effects::default();
        let step = self.step;
        match e {
            Extra::Feedback(k, latency_ms) => {
                let (outcome, word) = match k {
                    0 => (Feedback::Ok, "ok"),
                    1 => (Feedback::Throttled, "throttled"),
                    _ => (Feedback::Error, "error"),
                };
                let latency = latency_ms.map(Duration::from_millis);
                let got = self.core.feedback_with(ts, outcome, latency, &mut fx);
                let reply = self.call(
                    "feedback",
                    &[
                        word.to_owned(),
                        latency.map(|l| us(l).to_string()).unwrap_or_default(),
                    ],
                );
                let want = got.map(|l| l.to_string()).unwrap_or_default();
                prop_assert_eq!(&reply[..2], &["limit".to_owned(), want], "step {}", step);
                self.compare_gradient()?;
                self.compare_wakes(&fx)?;
                self.compare_hint(&reply, true)?;
            }
            Extra::Schedule(count) => {
                let id = step as u64 + 1;
                let got = self.core.schedule(ts, *count, id, &mut fx);
                let reply = self.call("schedule", &[count.to_string(), id.to_string()]);
                if got.is_ok() {
                    self.reservation = id;
                }
                match got {
                    Ok(offsets) => {
                        let mut want = vec!["offsets".to_owned()];
                        want.extend(offsets.iter().map(|d| us(*d).to_string()));
                        prop_assert_eq!(&reply[..reply.len() - 1], &want[..], "step {}", step);
                        self.compare_hint(&reply, true)?;
                    }
                    Err(f) => prop_assert_eq!(
                        &reply[..3],
                        &["invalid".to_owned(), f.field.to_owned(), f.message],
                        "step {}",
                        step
                    ),
                }
                self.compare_wakes(&fx)?;
            }
            Extra::Unschedule { unused, stale } => {
                let id = self.reservation + u64::from(*stale);
                let got = self.core.unschedule(ts, id, *unused, &mut fx);
                let reply = self.call("unschedule", &[id.to_string(), unused.to_string()]);
                match got {
                    Ok(n) => {
                        prop_assert_eq!(
                            &reply[..2],
                            &["returned".to_owned(), n.to_string()],
                            "step {}",
                            step
                        );
                        self.compare_hint(&reply, true)?;
                    }
                    Err(f) => prop_assert_eq!(
                        &reply[..3],
                        &["invalid".to_owned(), f.field.to_owned(), f.message],
                        "step {}",
                        step
                    ),
                }
                self.compare_wakes(&fx)?;
            }
            Extra::Learn(ms) => {
                let window = Duration::from_millis(*ms);
                self.core.advance(ts, &mut fx);
                self.core.enter_learning(ts, ts.after(window));
                let reply = self.call("learn", &[us(window).to_string()]);
                prop_assert_eq!(&reply[..1], &["ok".to_owned()], "step {}", step);
                self.compare_hint(&reply, true)?;
                self.compare_wakes(&fx)?;
            }
            Extra::Adopt {
                n,
                permits,
                lease_ms,
            } => {
                let token = match n {
                    3 => floodgate::core::MAX_ADOPTED_TOKEN + 1,
                    4 => u64::MAX,
                    n => self.core.next_token() + FAR + n,
                };
                let lease = Duration::from_millis(*lease_ms);
                let got = self.core.extend_or_adopt(
                    ts,
                    FencingToken(token),
                    lease,
                    Some(*permits),
                    &mut fx,
                );
                let reply = self.call(
                    "extend",
                    &[
                        token.to_string(),
                        us(lease).to_string(),
                        permits.to_string(),
                    ],
                );
                match got {
                    Ok(Ok(d)) => {
                        prop_assert_eq!(&reply[..2], &["extended".to_owned(), d.0.to_string()]);
                        self.tokens.push(token);
                    }
                    Ok(Err(_)) => prop_assert_eq!(reply[0].as_str(), "lost", "step {}", step),
                    Err(f) => prop_assert!(false, "invalid adopt: {:?}", f),
                }
                self.compare_wakes(&fx)?;
                self.compare_hint(&reply, true)?;
            }
        }
        Ok(())
    }

    fn one(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let ts = Timestamp(self.now);
        let mut fx = Effects::default();
        let step = self.step;
        match op {
            Op::Acquire {
                permits,
                lease_ms,
                wait_ms,
            } => {
                let permits = permits_for(*permits, self.core_limit());
                let req = AcquireRequest {
                    permits,
                    lease: lease_ms.map(Duration::from_millis),
                    wait: wait_ms.map(Duration::from_millis),
                    holder: None,
                    request_id: None,
                };
                self.acquires += 1;
                let key = format!("k{}", self.acquires);
                let got = self.core.acquire(ts, &req, &mut fx);
                let reply = self.call(
                    "acquire",
                    &[
                        permits.to_string(),
                        lease_ms
                            .map(|ms| (ms * 1_000).to_string())
                            .unwrap_or_default(),
                        wait_ms
                            .map(|ms| (ms * 1_000).to_string())
                            .unwrap_or_default(),
                        key.clone(),
                        "twin-channel".into(),
                    ],
                );
                let r: Vec<&str> = reply.iter().map(String::as_str).collect();
                match &got {
                    Admission::Granted(g) => {
                        let want = [
                            "granted".to_owned(),
                            g.token.0.to_string(),
                            g.permits.to_string(),
                            us(g.lease).to_string(),
                            g.lease_deadline.0.to_string(),
                            g.granted_at.0.to_string(),
                            us(g.waited).to_string(),
                        ];
                        prop_assert_eq!(&reply[..reply.len() - 1], &want[..], "step {}", step);
                        self.tokens.push(g.token.0);
                    }
                    Admission::Queued(id) => {
                        prop_assert_eq!(r[0], "queued", "step {}: {:?}", step, reply);
                        self.queued.push((id.0, key));
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
                            Refusal::LimiterDeleted => vec!["deleted".to_owned()],
                            // Plain limiters only: never sent; fails the comparison if it were.
                            Refusal::TooManyKeys { .. } => vec!["too_many_keys".to_owned()],
                            // `Refusal` is non-exhaustive: a reason added later fails here
                            // until the twin learns it.
                            other => vec![format!("{other:?}")],
                        };
                        prop_assert_eq!(&reply[..reply.len() - 1], &want[..], "step {}", step);
                    }
                }
                self.compare_wakes(&fx)?;
                self.compare_hint(&reply, self.general)?;
            }
            Op::Release(pick) => {
                let token = self.pick_token(pick);
                let got = self.core.release(ts, FencingToken(token), &mut fx);
                let reply = self.call("release", &[token.to_string()]);
                let want = if got { "1" } else { "0" };
                prop_assert_eq!(
                    (reply[0].as_str(), reply[1].as_str()),
                    ("released", want),
                    "release of {} at step {}",
                    token,
                    step
                );
                self.compare_wakes(&fx)?;
                self.compare_hint(&reply, self.general)?;
            }
            Op::Extend(pick, lease_ms) => {
                let token = self.pick_token(pick);
                let lease = Duration::from_millis(*lease_ms);
                let got = self.core.extend(ts, FencingToken(token), lease, &mut fx);
                let reply = self.call(
                    "extend",
                    &[token.to_string(), us(lease).to_string(), String::new()],
                );
                match got {
                    Ok(Ok(d)) => {
                        prop_assert_eq!(&reply[..2], &["extended".to_owned(), d.0.to_string()])
                    }
                    Ok(Err(_)) => prop_assert_eq!(reply[0].as_str(), "lost", "step {}", step),
                    Err(f) => {
                        prop_assert_eq!(
                            &reply[..3],
                            &["invalid".to_owned(), f.field.to_owned(), f.message],
                            "step {}",
                            step
                        );
                        prop_assert!(fx.is_empty());
                        return self.compare_wakes(&fx);
                    }
                }
                self.compare_wakes(&fx)?;
                self.compare_hint(&reply, true)?;
            }
            Op::Cancel(pick) => {
                let (id, key) = self.pick_waiter(pick);
                let got = self.core.cancel(ts, WaiterId(id), &mut fx);
                let reply = self.call("cancel", &[key.clone(), "drop".into()]);
                prop_assert_eq!(
                    reply[0] == "cancelled",
                    got,
                    "cancel of {} at step {}: {:?}",
                    key,
                    step,
                    reply
                );
                if got {
                    let pos = self.queued.iter().position(|(q, _)| *q == id).unwrap();
                    let w = self.queued.remove(pos);
                    self.departed.push(w);
                }
                self.compare_wakes(&fx)?;
                self.compare_hint(&reply, true)?;
            }
            Op::Reconfigure(spec) => {
                self.puts += 1;
                let full = apply(spec, &self.variations[self.puts % self.variations.len()]);
                self.core
                    .reconfigure(ts, full.clone(), &mut fx)
                    .expect("generated specs are valid");
                let reply = self.put(&full, 1, 0);
                prop_assert_eq!(reply[0].as_str(), "status", "step {}", step);
                self.compare_wakes(&fx)?;
                self.compare_hint(&reply, true)?;
            }
            Op::Advance(ms) => {
                self.now += ms * 1_000;
                self.core.advance(Timestamp(self.now), &mut fx);
                let reply = self.call("advance", &[]);
                self.compare_wakes(&fx)?;
                self.compare_hint(&reply, true)?;
            }
        }
        Ok(())
    }
}

#[test]
fn the_script_matches_the_core() {
    let server = support::RedisServer::start();
    let conn = RefCell::new(
        redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap(),
    );
    let script = redis::Script::new(&floodgate::store::redis::script_source());
    // Pipelines send EVALSHA: the script must be there.
    script.load(&mut *conn.borrow_mut()).unwrap();
    let cases = std::env::var("FLOODGATE_TWIN_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let n = Cell::new(0_u64);
    let result = runner.run(
        &(
            scenario().prop_map(|(spec, first, mut steps)| {
                // Shorter than the model test's sequences: each step is a Redis round trip.
                steps.truncate(STEPS);
                (spec, first, steps)
            }),
            any::<bool>(),
            prop::collection::vec(variation(), 1..=6),
            prop::collection::vec((0..STEPS, span_ms(1_000), extra()), 0..=12),
            prop_oneof![2 => Just(None), 1 => (1_u64..=3_000).prop_map(Some)],
            // Half the sequences on whole milliseconds, half nudged by a microsecond.
            prop_oneof![
                Just(vec![0_i64]),
                prop::collection::vec(
                    prop_oneof![2 => Just(0_i64), 1 => Just(-1), 1 => Just(1)],
                    8..=16
                ),
            ],
        ),
        |((spec, first_token, steps), general, variations, extras, learn_ms, nudges)| {
            n.set(n.get() + 1);
            let name = format!("twin{}", n.get());
            Twin::new(
                &conn,
                &script,
                name,
                &spec,
                first_token,
                general,
                variations,
                learn_ms,
            )?
            .run(&steps, &extras, &nudges)
        },
    );
    if let Err(e) = result {
        panic!("the script and the core differ: {e}");
    }
    eprintln!("{} sequences compared", n.get());
}

/// The gradient controller over a long run (the random sequences above are too short to warm
/// its averages up): thousands of reports with heavy-tailed latencies, a stretch of queueing
/// (latencies four times longer), throttles and errors, on a limiter holding permits. After
/// every report the limit and the controller's whole state must match the core's.
#[test]
fn the_gradient_controller_matches_the_core_over_a_long_run() {
    let (_server, mut conn, script) = script::script_on_redis();
    let name = "long";
    let keys: Vec<String> = floodgate::store::redis::limiter_keys("tw", name).to_vec();
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
    let spec = LimiterSpec::concurrency(40)
        .with_adaptive({
            let mut a = AdaptiveSpec::gradient(1, 200);
            a.probe_rounds = 2;
            a
        })
        .with_default_lease(Duration::from_secs(3_600));
    let a = spec.adaptive.unwrap();
    let mut now = T0;
    let mut core = LimiterCore::new(spec.clone(), TOKEN_BASE).unwrap();
    let put = [
        "40".to_owned(),
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
        format!("gradient|{}|{}", a.tolerance, a.probe_rounds),
    ];
    assert_eq!(eval(&mut conn, "put", now, &put)[0], "status");
    // Permits held: the ceiling a throttle records depends on them.
    let mut fx = Effects::default();
    for n in 0..30 {
        let req = AcquireRequest::default();
        let granted = matches!(
            core.acquire(Timestamp(now), &req, &mut fx),
            Admission::Granted(_)
        );
        let reply = eval(
            &mut conn,
            "acquire",
            now,
            &[
                "1".into(),
                String::new(),
                "0".into(),
                format!("w{n}"),
                "ch".into(),
            ],
        );
        assert_eq!(granted, reply[0] == "granted", "{reply:?}");
    }
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    let mut decreases = 0;
    for i in 0..4_000_u64 {
        let x = rng.next();
        now += 1_000 + x % 20_000;
        let queueing = (2_000..2_400).contains(&i);
        let base = if x % 17 == 0 {
            2_000 + x % 9_000
        } else {
            50 + x % 200
        };
        let latency_ms = if queueing { base * 4 } else { base };
        let (outcome, word) = match x % 101 {
            0..=1 => (Feedback::Throttled, "throttled"),
            2 => (Feedback::Error, "error"),
            _ => (Feedback::Ok, "ok"),
        };
        let latency = (x % 23 != 0).then(|| Duration::from_millis(latency_ms));
        let before = core.status(&LimiterName::new(name).unwrap()).limit;
        let got = core.feedback_with(Timestamp(now), outcome, latency, &mut fx);
        if got < before {
            decreases += 1;
        }
        let reply = eval(
            &mut conn,
            "feedback",
            now,
            &[
                word.into(),
                latency.map(|l| us(l).to_string()).unwrap_or_default(),
            ],
        );
        assert_eq!(reply[1], got.unwrap().to_string(), "limit at report {i}");
        let raw: Option<String> = redis::cmd("HGET")
            .arg(&keys[0])
            .arg("g_state")
            .query(&mut conn)
            .unwrap();
        let g = core.to_state().gradient;
        assert_eq!(
            raw.unwrap_or_default(),
            format!(
                "{}|{}|{}|{}|{}|{}",
                g.short_us, g.long_us, g.ceiling, g.credit, g.samples, g.backoff
            ),
            "state at report {i}"
        );
    }
    let c = core.counters();
    assert!(c.limit_increases > 10 && decreases > 10, "{c:?}");
    eprintln!(
        "{} increases, {} decreases compared",
        c.limit_increases, decreases
    );
}
