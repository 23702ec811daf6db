//! Cost of a keyed limiter's operations as the number of active keys grows, beside a plain
//! limiter with as many holders and waiters, in the same run (issue 14, must-show 4).
//!
//! `cargo bench -p floodgate --bench keyed` prints, at 1, 100, 10,000 and 100,000 active keys:
//! - acquire+release: one key takes a permit at once and gives it back, while every other key
//!   holds one (the plain limiter: as many other holders);
//! - handoff: the total is full and every key has a waiter; a release hands the slot to the
//!   next key in the round robin and the releaser queues again (plain: the FIFO head).
//!
//! Pure state machine, one thread, no store: the cost of the keyed rules themselves. Each
//! figure is the median of 5 rounds; ratios are keyed / plain in the same run.

#![allow(clippy::print_stdout)]

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::{Duration, Instant};

use floodgate::core::keyed::{KeyLayer, KeyedSpec};
use floodgate::core::{AcquireRequest, Admission, Effects, LimiterCore};
use floodgate::{FencingToken, LimiterSpec, Timestamp};

const ROUNDS: usize = 5;
const OPS: usize = 200_000;

fn spec(total: u32) -> LimiterSpec {
    LimiterSpec::concurrency(total)
        .with_default_lease(Duration::from_secs(3600))
        .with_max_wait(Duration::from_secs(3600))
        .with_max_queue(1_000_000)
}

fn req() -> AcquireRequest {
    AcquireRequest::default()
}

fn granted(a: Admission) -> FencingToken {
    match a {
        Admission::Granted(g) => g.token,
        other => panic!("expected a grant: {other:?}"),
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// ns per acquire+release with `n` other keys each holding a permit.
fn keyed_pair(n: usize) -> f64 {
    let names: Vec<String> = (0..n).map(|i| format!("tenant-{i}")).collect();
    let (mut total, mut layer) = KeyLayer::new(
        spec(u32::try_from(n).unwrap_or(u32::MAX) + 10),
        KeyedSpec::per_key(2).with_max_keys(1_000_000),
        1,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut fx = Effects::default();
    let now = Timestamp(1);
    for name in &names {
        granted(layer.acquire(&mut total, now, name, &req(), &mut fx));
    }
    let rounds = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for i in 0..OPS {
                let key = &names[i % n];
                let token = granted(layer.acquire(&mut total, now, key, &req(), &mut fx));
                black_box(layer.release(&mut total, now, token, &mut fx));
            }
            start.elapsed().as_nanos() as f64 / OPS as f64
        })
        .collect();
    median(rounds)
}

fn plain_pair(n: usize) -> f64 {
    let mut core = LimiterCore::new(spec(u32::try_from(n).unwrap_or(u32::MAX) + 10), 1)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut fx = Effects::default();
    let now = Timestamp(1);
    for _ in 0..n {
        granted(core.acquire(now, &req(), &mut fx));
    }
    let rounds = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..OPS {
                let token = granted(core.acquire(now, &req(), &mut fx));
                black_box(core.release(now, token, &mut fx));
            }
            start.elapsed().as_nanos() as f64 / OPS as f64
        })
        .collect();
    median(rounds)
}

/// ns per handoff: a full total of `n` keys holding one each, each with a waiter.
fn keyed_handoff(n: usize) -> f64 {
    let names: Vec<String> = (0..n).map(|i| format!("tenant-{i}")).collect();
    let (mut total, mut layer) = KeyLayer::new(
        spec(u32::try_from(n).unwrap_or(u32::MAX)),
        KeyedSpec::per_key(1).with_max_keys(1_000_000),
        1,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut fx = Effects::default();
    let now = Timestamp(1);
    let mut held: VecDeque<(FencingToken, usize)> = VecDeque::new();
    for (i, name) in names.iter().enumerate() {
        held.push_back((
            granted(layer.acquire(&mut total, now, name, &req(), &mut fx)),
            i,
        ));
    }
    let mut owner = std::collections::HashMap::new();
    for (i, name) in names.iter().enumerate() {
        match layer.acquire(&mut total, now, name, &req(), &mut fx) {
            Admission::Queued(id) => owner.insert(id, i),
            other => panic!("expected to queue: {other:?}"),
        };
    }
    let rounds = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..OPS {
                let Some((token, _)) = held.pop_front() else {
                    panic!("nothing held")
                };
                layer.release(&mut total, now, token, &mut fx);
                for (id, outcome) in fx.wakes.drain(..) {
                    let i = owner.remove(&id).unwrap_or(0);
                    let token = outcome.map(|g| g.token).unwrap_or(FencingToken(0));
                    held.push_back((token, i));
                    // The key that was granted queues its next waiter.
                    if let Admission::Queued(id) =
                        layer.acquire(&mut total, now, &names[i], &req(), &mut Effects::default())
                    {
                        owner.insert(id, i);
                    }
                }
            }
            start.elapsed().as_nanos() as f64 / OPS as f64
        })
        .collect();
    median(rounds)
}

fn plain_handoff(n: usize) -> f64 {
    let mut core = LimiterCore::new(spec(u32::try_from(n).unwrap_or(u32::MAX)), 1)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut fx = Effects::default();
    let now = Timestamp(1);
    let mut held: VecDeque<FencingToken> = (0..n)
        .map(|_| granted(core.acquire(now, &req(), &mut fx)))
        .collect();
    for _ in 0..n {
        black_box(core.acquire(now, &req(), &mut fx));
    }
    let rounds = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..OPS {
                let Some(token) = held.pop_front() else {
                    panic!("nothing held")
                };
                core.release(now, token, &mut fx);
                for (_, outcome) in fx.wakes.drain(..) {
                    held.push_back(outcome.map(|g| g.token).unwrap_or(FencingToken(0)));
                    black_box(core.acquire(now, &req(), &mut Effects::default()));
                }
            }
            start.elapsed().as_nanos() as f64 / OPS as f64
        })
        .collect();
    median(rounds)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported (the run is short).
    println!("keyed limiter vs plain limiter, pure state machine, ns per operation (median of {ROUNDS} x {OPS})");
    println!(
        "{:>8} {:>12} {:>12} {:>7} {:>12} {:>12} {:>7}",
        "keys", "keyed pair", "plain pair", "ratio", "keyed hand", "plain hand", "ratio"
    );
    for n in [1usize, 100, 10_000, 100_000] {
        let (kp, pp) = (keyed_pair(n), plain_pair(n));
        let (kh, ph) = (keyed_handoff(n), plain_handoff(n));
        println!(
            "{n:>8} {kp:>12.0} {pp:>12.0} {:>7.2} {kh:>12.0} {ph:>12.0} {:>7.2}",
            kp / pp,
            kh / ph
        );
    }
}
