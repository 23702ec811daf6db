//! Property test of keyed rates (a total rate, or none, and a per-key rate; rate-only, or beside a total
//! and a per-key concurrency limit whose grants hold permits for a short lease): random acquires, cancels, time steps and weight overrides against a
//! witness that checks GCRA's bound on every window of grants, for the total and for each key
//! (`burst + floor(window / interval)` tokens at most), with `schedule` reservations (each
//! token at its promised start) and `unschedule` returns (the returned tokens leave the
//! witness: they must not have started) interleaved, that grants are paced (nothing held),
//! that waiters of a key are served in FIFO order and never time out early, and that a key
//! with no waiters and no rate debt leaves no state.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use proptest::prelude::*;

use super::super::*;
use crate::core::{AcquireRequest, Admission, Effects, WaitOutcome, WaiterId};

const KEYS: [&str; 3] = ["k0", "k1", "k2"];

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        key: usize,
        permits: u32,
        wait_ms: u64,
    },
    Cancel(usize),
    Tick(u64),
    Weight {
        key: usize,
        weight: u32,
    },
    Schedule {
        key: usize,
        count: u32,
    },
    /// Gives back up to `unused` of one reservation made so far (by index), or of an unknown
    /// id when there is none.
    Unschedule {
        pick: usize,
        unused: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..KEYS.len(), 1..=2u32, 0..60u64)
            .prop_map(|(key, permits, wait_ms)| Op::Acquire { key, permits, wait_ms }),
        1 => any::<usize>().prop_map(Op::Cancel),
        3 => (1..25u64).prop_map(Op::Tick),
        1 => (0..KEYS.len(), 1..=3u32).prop_map(|(key, weight)| Op::Weight { key, weight }),
        2 => (0..KEYS.len(), 1..=4u32).prop_map(|(key, count)| Op::Schedule { key, count }),
        2 => (any::<usize>(), 1..=4u32).prop_map(|(pick, unused)| Op::Unschedule { pick, unused }),
    ]
}

/// GCRA's bound: no window `[s, t]` holds more than `burst + (t - s) / interval` tokens
/// (every window of the tokens, whatever order they were recorded in).
fn within_rate(grants: &[(Timestamp, u32)], rate: RateSpec) -> Result<(), String> {
    let interval = rate.interval_us();
    let mut sorted = grants.to_vec();
    sorted.sort();
    for (j, &(t, _)) in sorted.iter().enumerate() {
        let mut tokens = 0u64;
        for &(s, permits) in sorted[..=j].iter().rev() {
            tokens += u64::from(permits);
            let allowed = u64::from(rate.burst) + (t.0 - s.0) / interval;
            if tokens > allowed {
                return Err(format!("{tokens} tokens in [{}, {}] > {allowed}", s.0, t.0));
            }
        }
    }
    Ok(())
}

/// Removes one token at `at` from `list`.
fn take_out(list: &mut Vec<(Timestamp, u32)>, at: Timestamp) {
    let i = list
        .iter()
        .position(|&(t, p)| t == at && p == 1)
        .expect("a reserved token");
    list.swap_remove(i);
}

#[derive(Default)]
struct Witness {
    /// Whether grants are paced (rate-only: they hold nothing).
    paced: bool,
    /// waiter -> (key, permits, deadline)
    queued: BTreeMap<u64, (usize, u32, Timestamp)>,
    last_served: HashMap<usize, u64>,
    all: Vec<(Timestamp, u32)>,
    per_key: [Vec<(Timestamp, u32)>; 3],
    /// Reservations made, in order: (id, key, start times of the tokens not given back).
    reservations: Vec<(u64, usize, Vec<Timestamp>)>,
}

impl Witness {
    fn granted(&mut self, now: Timestamp, key: usize, g: &crate::core::Grant) {
        if self.paced {
            assert_eq!(g.lease, Duration::ZERO, "a paced grant holds nothing");
        }
        assert_eq!(g.granted_at, now);
        self.all.push((now, g.permits));
        self.per_key[key].push((now, g.permits));
    }

    /// Every window of every rate, checked once the case is over (returns only remove tokens,
    /// so a violation at any moment is still there at the end).
    fn check_rates(&self, total: Option<RateSpec>, each: RateSpec) {
        if let Some(Err(e)) = total.map(|total| within_rate(&self.all, total)) {
            panic!("the total's rate: {e}");
        }
        for (key, list) in self.per_key.iter().enumerate() {
            if let Err(e) = within_rate(list, each) {
                panic!("{}'s rate: {e}", KEYS[key]);
            }
        }
    }

    fn scheduled(&mut self, now: Timestamp, id: u64, key: usize, offsets: &[Duration]) {
        let times: Vec<Timestamp> = offsets.iter().map(|d| now.after(*d)).collect();
        for t in &times {
            self.all.push((*t, 1));
            self.per_key[key].push((*t, 1));
        }
        self.reservations.push((id, key, times));
    }

    /// `returned` tokens of reservation `i` went back: its last ones, none started.
    fn returned(&mut self, now: Timestamp, i: usize, returned: u32, unused: u32) {
        assert!(returned <= unused, "no more than asked");
        let (_, key, times) = &mut self.reservations[i];
        let key = *key;
        assert!(returned as usize <= times.len(), "no more than reserved");
        let gone = times.split_off(times.len() - returned as usize);
        for t in gone {
            assert!(t > now, "a started token was given back");
            take_out(&mut self.all, t);
            take_out(&mut self.per_key[key], t);
        }
    }

    fn outcome(&mut self, now: Timestamp, id: WaiterId, out: &WaitOutcome) {
        let (key, permits, deadline) = self.queued.remove(&id.0).expect("a queued waiter");
        match out {
            Ok(g) => {
                assert!(
                    self.last_served.get(&key).is_none_or(|l| *l < id.0),
                    "FIFO within a key"
                );
                self.last_served.insert(key, id.0);
                assert_eq!(g.permits, permits);
                self.granted(now, key, g);
            }
            Err(crate::core::Refusal::WaitTimeout { .. }) => {
                assert!(deadline <= now, "timed out before its deadline");
            }
            Err(_) => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn keyed_rates_hold_against_the_witness(
        total_per_100ms in 2..=8u32,
        total_burst in 1..=3u32,
        key_per_100ms in 1..=4u32,
        key_burst in 2..=3u32,
        held in any::<bool>(),
        no_total in any::<bool>(),
        ops in prop::collection::vec(op(), 1..150),
    ) {
        let ms100 = Duration::from_millis(100);
        let total_rate = RateSpec { burst: total_burst.max(2), ..RateSpec::per(total_per_100ms, ms100) };
        let key_rate = RateSpec { burst: key_burst, ..RateSpec::per(key_per_100ms, ms100) };
        let mut spec = LimiterSpec::rate(total_rate)
            .with_max_wait(Duration::from_millis(300))
            .with_max_queue(1_000);
        let mut keyed = KeyedSpec::default().with_rate(key_rate);
        if held {
            // The rates beside concurrency limits: grants hold permits for a 30 ms lease.
            spec = spec.with_default_lease(Duration::from_millis(30));
            spec.concurrency = Some(3);
            keyed.concurrency = Some(2);
        } else if no_total {
            // Per-key rates alone: the total has no limit at all.
            spec.rate = None;
        }
        let total_rate = spec.rate;
        prop_assert_eq!(rate_only(&spec, &keyed), !held);
        let (mut total, mut layer) = KeyLayer::new(spec, keyed, 1).expect("valid");
        let mut w = Witness { paced: !held, ..Witness::default() };
        let mut now = Timestamp(0);
        let mut next_id = 0u64;
        for op in ops {
            let mut fx = Effects::default();
            match op {
                Op::Acquire { key, permits, wait_ms } => {
                    let req = AcquireRequest {
                        permits,
                        wait: Some(Duration::from_millis(wait_ms)),
                        ..AcquireRequest::default()
                    };
                    match layer.acquire(&mut total, now, KEYS[key], &req, &mut fx) {
                        Admission::Granted(g) => w.granted(now, key, &g),
                        Admission::Queued(id) => {
                            w.queued.insert(id.0, (key, permits, now.after(Duration::from_millis(wait_ms))));
                        }
                        Admission::Refused(_) => {}
                    }
                }
                Op::Cancel(i) => {
                    let ids: Vec<u64> = w.queued.keys().copied().collect();
                    if let Some(id) = ids.get(i % ids.len().max(1)) {
                        if layer.cancel(&mut total, now, WaiterId(*id), &mut fx) {
                            w.queued.remove(id);
                        }
                    }
                }
                Op::Tick(ms) => {
                    now = now.after(Duration::from_millis(ms));
                    layer.advance(&mut total, now, &mut fx);
                }
                Op::Weight { key, weight } => {
                    let ov = KeyOverride { concurrency: None, weight };
                    layer.put_override(&mut total, now, KEYS[key], Some(ov), &mut fx).expect("valid");
                    // A concurrency override means nothing without holders: refused.
                    if !held {
                        let with_limit = KeyOverride { concurrency: Some(1), weight };
                        let mut none = Effects::default();
                        prop_assert!(layer.put_override(&mut total, now, KEYS[key], Some(with_limit), &mut none).is_err());
                    }
                }
                Op::Schedule { key, count } => {
                    next_id += 1;
                    if let Ok(offsets) = layer.schedule(&mut total, now, KEYS[key], count, next_id, &mut fx) {
                        prop_assert_eq!(offsets.len(), count as usize);
                        w.scheduled(now, next_id, key, &offsets);
                    }
                }
                Op::Unschedule { pick, unused } => {
                    if w.reservations.is_empty() {
                        let got = layer.unschedule(&mut total, now, 999_999, unused, &mut fx);
                        prop_assert_eq!(got, Ok(0), "an unknown id returns nothing");
                    } else {
                        let i = pick % w.reservations.len();
                        let id = w.reservations[i].0;
                        let got = layer.unschedule(&mut total, now, id, unused, &mut fx).expect("valid");
                        w.returned(now, i, got, unused);
                    }
                }
            }
            for (id, out) in &fx.wakes {
                w.outcome(now, *id, out);
            }
            prop_assert_eq!(layer.waiting(), w.queued.len());
            if held {
                prop_assert!(total.in_use() <= 3, "the total's concurrency holds");
            } else {
                prop_assert_eq!(total.in_use(), 0, "nothing is held");
            }
        }
        // Once every wait and every rate debt has ended, no key state is left.
        let later = now.after(Duration::from_secs(10));
        let mut fx = Effects::default();
        layer.advance(&mut total, later, &mut fx);
        for (id, out) in &fx.wakes {
            w.outcome(later, *id, out);
        }
        prop_assert_eq!(layer.waiting(), 0);
        // A grant made by that advance charges its rates from then on: its debt ends later.
        layer.advance(&mut total, later.after(Duration::from_secs(10)), &mut fx);
        prop_assert_eq!(layer.key_count(), 0, "idle keys dropped");
        prop_assert_eq!(layer.reservation_count(), 0, "and their reservations");
        w.check_rates(total_rate, key_rate);
        if total_rate.is_none() {
            prop_assert_eq!(total.spec.rate, None, "no total rate, not even a fake one");
            let status = layer.status(&total, &crate::types::LimiterName::new("n").expect("valid"));
            prop_assert_eq!((status.limit, status.spec.rate, status.spec.concurrency), (None, None, None));
        }
    }
}
