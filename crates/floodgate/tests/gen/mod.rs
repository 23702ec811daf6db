//! The random operation sequences shared by the model test (`model.rs`) and the differential
//! test of the Redis script against the core (`twin.rs`).

#![allow(dead_code)]

use floodgate::LimiterSpec;
use proptest::prelude::*;
use std::time::Duration;

/// The largest valid lease, in ms (24 h).
pub(crate) const MAX_LEASE_MS: u64 = 24 * 3600 * 1_000;

/// A limiter configuration, in milliseconds.
#[derive(Debug, Clone)]
pub(crate) struct SpecChoice {
    pub(crate) concurrency: u32,
    pub(crate) default_lease_ms: u64,
    pub(crate) max_wait_ms: u64,
    pub(crate) max_queue: u32,
}

impl SpecChoice {
    pub(crate) fn spec(&self) -> LimiterSpec {
        LimiterSpec::concurrency(self.concurrency)
            .with_default_lease(Duration::from_millis(self.default_lease_ms))
            .with_max_wait(Duration::from_millis(self.max_wait_ms))
            .with_max_queue(self.max_queue)
    }
}

/// Which token an operation names, resolved against the state just before the step.
#[derive(Debug, Clone)]
pub(crate) enum TokenPick {
    /// One currently held (falls back to a gone one, then an unknown one).
    Live(usize),
    /// One released or expired (falls back to an unknown one).
    Gone(usize),
    /// One never handed out.
    Unknown(u64),
}

/// Which waiter a cancel names, resolved against the state just before the step.
#[derive(Debug, Clone)]
pub(crate) enum WaiterPick {
    /// The head of the queue (which may be holding back smaller requests behind it).
    Head,
    /// One currently queued (falls back to a departed one, then an unknown one).
    Queued(usize),
    /// One that left the queue: granted, timed out, refused or cancelled.
    Departed(usize),
    /// One never queued.
    Unknown(u64),
}

#[derive(Debug, Clone)]
pub(crate) enum Op {
    /// Mapped by [`permits_for`] to `0..=limit + 1` under the limit at the time.
    Acquire {
        permits: u32,
        lease_ms: Option<u64>,
        wait_ms: Option<u64>,
    },
    Release(TokenPick),
    Extend(TokenPick, u64),
    Cancel(WaiterPick),
    Reconfigure(SpecChoice),
    /// Moves the clock forward this many ms and calls `advance`.
    Advance(u64),
}

/// One operation, run after moving the clock forward `dt_ms`.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub(crate) dt_ms: u64,
    pub(crate) op: Op,
}

/// Durations in ms: often multiples of 250 ms, so lease ends, wait ends and clock steps tie.
pub(crate) fn span_ms(max: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (1..=max / 250).prop_map(|k| k * 250),
        1 => 1..=max,
    ]
}

pub(crate) fn lease_ms() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![
        3 => Just(None),
        6 => span_ms(3_000).prop_map(Some),
        // Invalid (0, over 24 h) and the largest valid lease.
        1 => prop_oneof![Just(0), Just(MAX_LEASE_MS), Just(MAX_LEASE_MS + 1)].prop_map(Some),
    ]
}

pub(crate) fn wait_ms() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![
        2 => Just(None),
        2 => Just(Some(0)),
        5 => span_ms(3_000).prop_map(Some),
        // Beyond any max_wait: capped.
        1 => Just(Some(10_000_000)),
    ]
}

pub(crate) fn spec_choice(
    concurrency: std::ops::RangeInclusive<u32>,
) -> impl Strategy<Value = SpecChoice> {
    (
        concurrency,
        prop_oneof![Just(500_u64), Just(1_000), Just(2_500)],
        prop_oneof![1 => Just(0_u64), 3 => Just(500), 3 => Just(1_500), 3 => Just(3_000)],
        prop_oneof![1 => Just(0_u32), 2 => Just(1), 3 => Just(3), 3 => Just(1_000)],
    )
        .prop_map(
            |(concurrency, default_lease_ms, max_wait_ms, max_queue)| SpecChoice {
                concurrency,
                default_lease_ms,
                max_wait_ms,
                max_queue,
            },
        )
}

pub(crate) fn token_pick() -> impl Strategy<Value = TokenPick> {
    prop_oneof![
        5 => any::<usize>().prop_map(TokenPick::Live),
        3 => any::<usize>().prop_map(TokenPick::Gone),
        1 => (0_u64..4).prop_map(TokenPick::Unknown),
    ]
}

pub(crate) fn waiter_pick() -> impl Strategy<Value = WaiterPick> {
    prop_oneof![
        3 => Just(WaiterPick::Head),
        4 => any::<usize>().prop_map(WaiterPick::Queued),
        2 => any::<usize>().prop_map(WaiterPick::Departed),
        1 => (0_u64..4).prop_map(WaiterPick::Unknown),
    ]
}

pub(crate) fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0_u32..20, lease_ms(), wait_ms()).prop_map(|(permits, lease_ms, wait_ms)| {
            Op::Acquire { permits, lease_ms, wait_ms }
        }),
        4 => token_pick().prop_map(Op::Release),
        2 => (
            token_pick(),
            prop_oneof![8 => span_ms(3_000), 1 => Just(0_u64), 1 => Just(MAX_LEASE_MS + 1)],
        )
            .prop_map(|(t, ms)| Op::Extend(t, ms)),
        2 => waiter_pick().prop_map(Op::Cancel),
        1 => spec_choice(1..=8).prop_map(Op::Reconfigure),
        3 => span_ms(4_000).prop_map(Op::Advance),
    ]
}

/// Maps a generated number to `0..=limit + 1`: mostly `1..=limit`, sometimes 0 (invalid) or
/// one more than the limit (impossible).
pub(crate) fn permits_for(raw: u32, limit: u32) -> u32 {
    match raw {
        0 => 0,
        1 => limit + 1,
        n => 1 + n % limit,
    }
}

pub(crate) fn step() -> impl Strategy<Value = Step> {
    (
        prop_oneof![5 => Just(0_u64), 3 => span_ms(1_000), 1 => 1_u64..=100],
        op(),
    )
        .prop_map(|(dt_ms, op)| Step { dt_ms, op })
}

/// A starting configuration, the first fencing token, and the steps.
pub(crate) fn scenario() -> impl Strategy<Value = (SpecChoice, u64, Vec<Step>)> {
    (
        spec_choice(1..=6),
        prop_oneof![Just(0_u64), Just(1), 2_u64..1_000],
        prop::collection::vec(step(), 1..=200),
    )
}
