//! A limiter's complete state as plain data, for the durable embedded store's snapshots.
//!
//! [`CoreState`] holds exactly what determines the state machine's future behaviour (holders,
//! queue, counters, tokens, rate and adaptive state), so a core rebuilt from it answers every
//! later operation exactly as the original would. The deadline heaps are not stored: they are
//! rebuilt from the holders and waiters (their stale entries never change an outcome).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::adaptive::Gradient;
use super::deadlines::DeadlineHeap;
use super::holder_map::HolderMap;
use super::queue::Queue;
use super::{Counters, Holder, LimiterCore, RequestRef, Waiter};
use crate::spec::{AdaptiveSpec, Algorithm, InvalidField, LimiterSpec, RateSpec};
use crate::types::Timestamp;

/// A limiter's state, serializable. Times are microseconds on the store's clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoreState {
    /// The configuration.
    pub spec: SpecState,
    /// Grants out.
    pub holders: Vec<HolderState>,
    /// Queued acquires in FIFO order.
    pub queue: Vec<WaiterState>,
    /// Token of the next grant.
    pub next_token: u64,
    /// Id of the next queued waiter.
    pub next_waiter: u64,
    /// Smoothed hold time, for retry hints and the adaptive cooldown.
    pub hold_ewma_us: Option<u64>,
    /// GCRA's theoretical arrival time.
    pub tat: u64,
    /// The concurrency limit in force.
    pub limit: Option<u32>,
    /// Adaptive successes since the limit last moved.
    pub successes: u32,
    /// When the adaptive limit last went down.
    pub last_decrease: Option<u64>,
    /// Lifetime counters, in the order of [`Counters`]' fields.
    pub counters: [u64; 16],
    /// End of the learning window in force, if any.
    #[serde(default)]
    pub learning_until: Option<u64>,
    /// The latest `schedule` reservation, whose unused tokens may still be given back:
    /// (id, `tat` after it, tokens still reserved).
    #[serde(default)]
    pub last_reservation: Option<(u64, u64, u32)>,
    /// The gradient controller's state (absent in snapshots from before it existed).
    #[serde(default)]
    pub gradient: Gradient,
    /// Idempotency keys of rate-only grants still remembered (absent in snapshots from
    /// before they were: none then).
    #[serde(default)]
    pub paced: Vec<super::PacedState>,
}

/// One holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderState {
    /// Fencing token.
    pub token: u64,
    /// Permits held.
    pub permits: u32,
    /// Lease deadline.
    pub deadline: u64,
    /// When it was granted.
    pub granted_at: u64,
    /// The lease it was granted with.
    pub lease_us: u64,
    /// Its label.
    pub label: Option<String>,
    /// Its idempotency key.
    pub request: Option<String>,
}

/// One queued acquire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaiterState {
    /// Waiter id.
    pub id: u64,
    /// Permits asked for.
    pub permits: u32,
    /// Lease it will be granted.
    pub lease_us: u64,
    /// When it was queued.
    pub enqueued_at: u64,
    /// When its wait ends.
    pub deadline: u64,
    /// Its label.
    pub label: Option<String>,
    /// Its idempotency key.
    pub request: Option<String>,
}

impl WaiterState {
    /// A queued waiter as plain data (plain and keyed snapshots alike).
    pub(crate) fn of(id: u64, w: &Waiter) -> Self {
        WaiterState {
            id,
            permits: w.permits,
            lease_us: us(w.lease),
            enqueued_at: w.enqueued_at.0,
            deadline: w.deadline.0,
            label: w.label().map(|l| l.to_string()),
            request: w.request().map(|r| r.to_string()),
        }
    }

    /// The waiter it describes.
    pub(crate) fn to_waiter(&self) -> Waiter {
        Waiter::new(
            self.permits,
            Duration::from_micros(self.lease_us),
            Timestamp(self.enqueued_at),
            Timestamp(self.deadline),
            self.label.as_deref().map(Arc::from),
            self.request.as_deref().map(Arc::from),
        )
    }
}

/// A [`LimiterSpec`] as plain data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpecState {
    /// Concurrency limit.
    pub concurrency: Option<u32>,
    /// Rate: (limit, period µs, burst).
    pub rate: Option<(u32, u64, u32)>,
    /// Adaptive: (min, max, increase, decrease, cooldown µs).
    pub adaptive: Option<(u32, u32, u32, f64, u64)>,
    /// Adaptive, the rest: (algorithm, tolerance, probe rounds); absent before they existed,
    /// which means AIMD with the defaults.
    #[serde(default)]
    pub adaptive_algorithm: Option<(String, f64, u32)>,
    /// Default lease, µs.
    pub default_lease_us: u64,
    /// Wait cap, µs.
    pub max_wait_us: u64,
    /// Queue cap.
    pub max_queue: u32,
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl From<&LimiterSpec> for SpecState {
    fn from(s: &LimiterSpec) -> Self {
        SpecState {
            concurrency: s.concurrency,
            rate: s.rate.map(|r| (r.limit, us(r.period), r.burst)),
            adaptive: s
                .adaptive
                .map(|a| (a.min, a.max, a.increase, a.decrease, us(a.cooldown))),
            adaptive_algorithm: s
                .adaptive
                .map(|a| (a.algorithm.name().to_owned(), a.tolerance, a.probe_rounds)),
            default_lease_us: us(s.default_lease),
            max_wait_us: us(s.max_wait),
            max_queue: s.max_queue,
        }
    }
}

impl From<&SpecState> for LimiterSpec {
    fn from(s: &SpecState) -> Self {
        LimiterSpec {
            concurrency: s.concurrency,
            rate: s.rate.map(|(limit, period, burst)| RateSpec {
                limit,
                period: Duration::from_micros(period),
                burst,
            }),
            adaptive: s.adaptive.map(|(min, max, increase, decrease, cooldown)| {
                let d = AdaptiveSpec::between(min, max);
                let (algorithm, tolerance, probe_rounds) = match &s.adaptive_algorithm {
                    Some((name, t, p)) if name == Algorithm::Gradient.name() => {
                        (Algorithm::Gradient, *t, *p)
                    }
                    Some((_, t, p)) => (Algorithm::Aimd, *t, *p),
                    None => (d.algorithm, d.tolerance, d.probe_rounds),
                };
                AdaptiveSpec {
                    algorithm,
                    min,
                    max,
                    increase,
                    decrease,
                    cooldown: Duration::from_micros(cooldown),
                    tolerance,
                    probe_rounds,
                }
            }),
            default_lease: Duration::from_micros(s.default_lease_us),
            max_wait: Duration::from_micros(s.max_wait_us),
            max_queue: s.max_queue,
        }
    }
}

fn counters_to_array(c: &Counters) -> [u64; 16] {
    [
        c.granted,
        c.released,
        c.expired,
        c.timed_out,
        c.cancelled,
        c.queue_full,
        c.rejected,
        c.extend_lost,
        c.paced,
        c.scheduled,
        c.feedback_ok,
        c.feedback_throttled,
        c.feedback_error,
        c.limit_decreases,
        c.limit_increases,
        c.adopted,
    ]
}

fn counters_from_array(a: &[u64; 16]) -> Counters {
    Counters {
        granted: a[0],
        released: a[1],
        expired: a[2],
        timed_out: a[3],
        cancelled: a[4],
        queue_full: a[5],
        rejected: a[6],
        extend_lost: a[7],
        paced: a[8],
        scheduled: a[9],
        feedback_ok: a[10],
        feedback_throttled: a[11],
        feedback_error: a[12],
        limit_decreases: a[13],
        limit_increases: a[14],
        adopted: a[15],
    }
}

impl LimiterCore {
    /// The complete state as plain data.
    pub fn to_state(&self) -> CoreState {
        let mut holders: Vec<HolderState> = self
            .holders
            .iter()
            .map(|(token, h)| HolderState {
                token: *token,
                permits: h.permits,
                deadline: h.deadline.0,
                granted_at: h.granted_at.0,
                lease_us: us(h.lease),
                label: h.label.as_deref().map(str::to_owned),
                request: h.request.as_deref().map(str::to_owned),
            })
            .collect();
        holders.sort_by_key(|h| h.token);
        let queue = self
            .queue
            .iter()
            .map(|(id, w)| WaiterState::of(*id, w))
            .collect();
        CoreState {
            spec: SpecState::from(&self.spec),
            holders,
            queue,
            next_token: self.next_token,
            next_waiter: self.next_waiter,
            hold_ewma_us: self.hold_ewma_us,
            tat: self.tat.0,
            limit: self.limit,
            successes: self.successes,
            last_decrease: self.last_decrease.map(|t| t.0),
            counters: counters_to_array(&self.counters),
            learning_until: self.learning_until.map(|t| t.0),
            last_reservation: self.last_reservation.map(|r| (r.id, r.end.0, r.count)),
            gradient: self.gradient,
            paced: self.paced.to_state(),
        }
    }

    /// Rebuilds a core from [`to_state`](Self::to_state)'s output.
    pub fn from_state(state: &CoreState) -> Result<Self, InvalidField> {
        let spec = LimiterSpec::from(&state.spec);
        // Unbounded passes: a keyed limiter's total may have no limit of its own.
        spec.validate_unbounded()?;
        let mut core = LimiterCore::new_total(spec, state.next_token);
        let mut holders = HolderMap::default();
        let mut leases = DeadlineHeap::default();
        let mut requests = HashMap::new();
        let mut in_use: u32 = 0;
        for h in &state.holders {
            let request: Option<Arc<str>> = h.request.as_deref().map(Arc::from);
            if let Some(key) = &request {
                requests.insert(Arc::clone(key), RequestRef::Held(h.token));
            }
            holders.insert(
                h.token,
                Holder {
                    permits: h.permits,
                    deadline: Timestamp(h.deadline),
                    granted_at: Timestamp(h.granted_at),
                    lease: Duration::from_micros(h.lease_us),
                    label: h.label.as_deref().map(Arc::from),
                    request,
                },
            );
            leases.push(Timestamp(h.deadline), h.token);
            in_use = in_use.saturating_add(h.permits);
        }
        let mut queue = Queue::default();
        let mut waits = DeadlineHeap::default();
        let mut queued_permits = 0u64;
        let mut last_id = None;
        for w in &state.queue {
            if last_id.is_some_and(|last| w.id <= last) {
                return Err(InvalidField::new("queue", "waiters out of order"));
            }
            last_id = Some(w.id);
            let waiter = w.to_waiter();
            if let Some(key) = waiter.request() {
                requests.insert(Arc::clone(key), RequestRef::Queued(w.id));
            }
            queue.insert(w.id, waiter);
            waits.push(Timestamp(w.deadline), w.id);
            queued_permits += u64::from(w.permits);
        }
        core.holders = holders;
        core.leases = leases;
        core.in_use = in_use;
        core.requests = requests;
        core.queue = queue;
        core.waits = waits;
        core.queued_permits = queued_permits;
        core.next_token = state.next_token;
        core.next_waiter = state.next_waiter;
        core.hold_ewma_us = state.hold_ewma_us;
        core.tat = Timestamp(state.tat);
        core.limit = state.limit;
        core.successes = state.successes;
        core.last_decrease = state.last_decrease.map(Timestamp);
        // Exact again at the next pass of `advance`.
        core.next_due = Timestamp(0);
        core.counters = counters_from_array(&state.counters);
        core.learning_until = state.learning_until.map(Timestamp);
        core.last_reservation =
            state
                .last_reservation
                .map(|(id, end, count)| super::reservation::Reservation {
                    id,
                    end: Timestamp(end),
                    count,
                });
        core.gradient = state.gradient;
        core.paced = super::paced::PacedRequests::from_state(&state.paced);
        Ok(core)
    }

    /// Drops every queued waiter without granting anyone: after a restart their connections
    /// are gone and their clients retry. Counted as cancelled.
    pub fn abandon_waiters(&mut self) -> usize {
        let drained = self.queue.drain();
        for (_, w) in &drained {
            self.forget_request(w.request());
            self.counters.cancelled += 1;
        }
        self.queued_permits = 0;
        drained.len()
    }
}
