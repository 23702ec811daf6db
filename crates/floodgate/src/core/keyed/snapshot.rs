//! A keyed layer's complete state as plain data, for the durable store's snapshots and log.
//!
//! Everything that decides later outcomes is kept, ring order and deficits included, so a
//! layer rebuilt from it grants the same waiter to the same key as the original would (the
//! log replayed after a snapshot must reproduce which key holds which token). The indexes
//! (waiter to key, busiest keys, counts) are rebuilt.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::reserve::{KeyReservation, Part};
use super::{Key, KeyCounters, KeyLayer, KeyOverride, KeyedHolder, KeyedSpec};
use crate::core::{LimiterCore, U64Map, WaiterState};
use crate::spec::{InvalidField, RateSpec};
use crate::types::Timestamp;

/// A rate as (limit, period µs, burst), as [`crate::core::SpecState`] keeps it.
type RateTuple = (u32, u64, u32);

fn rate_out(r: Option<RateSpec>) -> Option<RateTuple> {
    r.map(|r| {
        let period = u64::try_from(r.period.as_micros()).unwrap_or(u64::MAX);
        (r.limit, period, r.burst)
    })
}

fn rate_in(r: Option<RateTuple>) -> Option<RateSpec> {
    r.map(|(limit, period, burst)| RateSpec {
        limit,
        period: Duration::from_micros(period),
        burst,
    })
}

/// A [`KeyedSpec`] as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedSpecState {
    /// Per-key concurrency.
    pub concurrency: Option<u32>,
    /// Per-key rate.
    pub rate: Option<RateTuple>,
    /// Key cap.
    pub max_keys: u32,
}

impl From<&KeyedSpec> for KeyedSpecState {
    fn from(s: &KeyedSpec) -> Self {
        KeyedSpecState {
            concurrency: s.concurrency,
            rate: rate_out(s.rate),
            max_keys: s.max_keys,
        }
    }
}

impl From<&KeyedSpecState> for KeyedSpec {
    fn from(s: &KeyedSpecState) -> Self {
        KeyedSpec {
            concurrency: s.concurrency,
            rate: rate_in(s.rate),
            max_keys: s.max_keys,
        }
    }
}

/// One key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyState {
    /// The key.
    pub name: String,
    /// Its generation.
    pub gen: u64,
    /// Permits held.
    pub in_use: u32,
    /// Grants out.
    pub holders: u32,
    /// Waiters, FIFO.
    pub queue: Vec<WaiterState>,
    /// Its GCRA time.
    pub tat: u64,
    /// Round-robin credit.
    pub deficit: u64,
    /// Turn begun.
    pub turn: bool,
    /// Entry in the ring.
    pub in_ring: bool,
    /// Rate wake-up armed for.
    pub sleeping: Option<u64>,
    /// Idle drop armed.
    pub idle_armed: bool,
    /// Limit in force.
    pub limit: Option<u32>,
    /// Rate in force.
    pub rate: Option<RateTuple>,
    /// Weight in force.
    pub weight: u32,
    /// Its latest schedule reservation (absent in snapshots from before keyed reservations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<KeyReservationState>,
}

/// A key's latest schedule reservation (see `reserve.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyReservationState {
    /// Its id.
    pub id: u64,
    /// When the schedule ran, µs.
    pub at: u64,
    /// What it took of the total's rate: (rate, `tat` before it, `tat` after it).
    pub total: Option<(RateTuple, u64, u64)>,
    /// What it took of the key's rate: (rate, `tat` before it, `tat` after it).
    pub key: Option<(RateTuple, u64, u64)>,
    /// Tokens still reserved.
    pub count: u32,
    /// When its last token starts, µs.
    pub last_start: u64,
}

fn reservation_out(r: &KeyReservation) -> KeyReservationState {
    let part = |p: Option<Part>| {
        p.and_then(|p| rate_out(Some(p.rate)).map(|rate| (rate, p.before.0, p.end.0)))
    };
    KeyReservationState {
        id: r.id,
        at: r.at.0,
        total: part(r.total),
        key: part(r.key),
        count: r.count,
        last_start: r.last_start.0,
    }
}

fn reservation_in(r: &KeyReservationState) -> KeyReservation {
    let part = |p: Option<(RateTuple, u64, u64)>| {
        p.and_then(|(rate, before, end)| {
            rate_in(Some(rate)).map(|rate| Part {
                rate,
                before: Timestamp(before),
                end: Timestamp(end),
            })
        })
    };
    KeyReservation {
        id: r.id,
        at: Timestamp(r.at),
        total: part(r.total),
        key: part(r.key),
        count: r.count,
        last_start: Timestamp(r.last_start),
    }
}

/// A keyed layer's state, serializable. Times are µs on the store's clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyLayerState {
    /// Per-key configuration.
    pub spec: KeyedSpecState,
    /// The configured total concurrency.
    pub user_concurrency: Option<u32>,
    /// Keys with state.
    pub keys: Vec<KeyState>,
    /// Overrides: (key, concurrency, weight).
    pub overrides: Vec<(String, Option<u32>, u32)>,
    /// Generation of the next key.
    pub next_gen: u64,
    /// The ring, front first: (key, generation).
    pub ring: Vec<(String, u64)>,
    /// Rate wake-ups: (time, generation, key).
    pub sleepers: Vec<(u64, u64, String)>,
    /// Idle drops: (time, generation, key).
    pub idle: Vec<(u64, u64, String)>,
    /// Grants: (token, key, permits, deadline).
    pub holders: Vec<(u64, String, u32, u64)>,
    /// Id of the next waiter.
    pub next_waiter: u64,
    /// Total's rate hold.
    pub held_until: Option<u64>,
    /// (too_many_keys, keys_created).
    pub counters: (u64, u64),
}

impl KeyLayer {
    /// The complete state as plain data.
    pub fn to_state(&self) -> KeyLayerState {
        let mut keys: Vec<KeyState> = self
            .keys
            .iter()
            .map(|(name, k)| KeyState {
                name: name.to_string(),
                gen: k.gen,
                in_use: k.in_use,
                holders: k.holders,
                queue: k
                    .queue
                    .iter()
                    .map(|(id, w)| WaiterState::of(*id, w))
                    .collect(),
                tat: k.tat.0,
                deficit: k.deficit,
                turn: k.turn,
                in_ring: k.in_ring,
                sleeping: k.sleeping.map(|t| t.0),
                idle_armed: k.idle_armed,
                limit: k.limit,
                rate: rate_out(k.rate),
                weight: k.weight,
                reservation: k.reservation.as_ref().map(reservation_out),
            })
            .collect();
        keys.sort_by_key(|k| k.gen);
        let heap = |h: &BinaryHeap<Reverse<(Timestamp, u64, Arc<str>)>>| {
            let mut v: Vec<(u64, u64, String)> = h
                .iter()
                .map(|Reverse((t, g, n))| (t.0, *g, n.to_string()))
                .collect();
            v.sort();
            v
        };
        let mut holders: Vec<(u64, String, u32, u64)> = self
            .holders
            .iter()
            .map(|(t, h)| (*t, h.key.to_string(), h.permits, h.deadline.0))
            .collect();
        holders.sort();
        let mut overrides: Vec<(String, Option<u32>, u32)> = self
            .overrides
            .iter()
            .map(|(k, o)| (k.to_string(), o.concurrency, o.weight))
            .collect();
        overrides.sort();
        KeyLayerState {
            spec: KeyedSpecState::from(&self.spec),
            user_concurrency: self.user_concurrency,
            keys,
            overrides,
            next_gen: self.next_gen,
            ring: self.ring.iter().map(|(n, g)| (n.to_string(), *g)).collect(),
            sleepers: heap(&self.sleepers),
            idle: heap(&self.idle),
            holders,
            next_waiter: self.next_waiter,
            held_until: self.held_until.map(|t| t.0),
            counters: (self.counters.too_many_keys, self.counters.keys_created),
        }
    }

    /// Rebuilds a layer from [`to_state`](Self::to_state)'s output.
    pub fn from_state(s: &KeyLayerState) -> Result<KeyLayer, InvalidField> {
        let mut keys = HashMap::new();
        let mut names: HashMap<String, Arc<str>> = HashMap::new();
        let mut waiter_key = U64Map::default();
        let mut waits = BinaryHeap::new();
        let mut requests = HashMap::new();
        let (mut waiting, mut waiting_permits) = (0usize, 0u64);
        let mut busy = BTreeSet::new();
        let mut reservations = U64Map::default();
        let mut heads = BTreeSet::new();
        for k in &s.keys {
            let name: Arc<str> = Arc::from(k.name.as_str());
            names.insert(k.name.clone(), Arc::clone(&name));
            let mut queue = BTreeMap::new();
            let mut queued_permits = 0u64;
            for w in &k.queue {
                let waiter = w.to_waiter();
                if let Some(r) = waiter.request() {
                    requests.insert(Arc::clone(r), w.id);
                }
                waits.push(Reverse((waiter.deadline, w.id)));
                waiter_key.insert(w.id, Arc::clone(&name));
                queued_permits += u64::from(w.permits);
                queue.insert(w.id, waiter);
            }
            waiting += queue.len();
            waiting_permits += queued_permits;
            let load = u64::from(k.holders) + queue.len() as u64;
            if load > 0 {
                busy.insert((load, Arc::clone(&name)));
            }
            let key = Key {
                gen: k.gen,
                in_use: k.in_use,
                holders: k.holders,
                queue,
                queued_permits,
                tat: Timestamp(k.tat),
                deficit: k.deficit,
                turn: k.turn,
                in_ring: k.in_ring,
                sleeping: k.sleeping.map(Timestamp),
                idle_armed: k.idle_armed,
                limit: k.limit,
                rate: rate_in(k.rate),
                weight: k.weight,
                load,
                reservation: k.reservation.as_ref().map(reservation_in),
            };
            if let Some(r) = &k.reservation {
                reservations.insert(r.id, Arc::clone(&name));
            }
            heads.extend(key.head_entry());
            keys.insert(name, key);
        }
        let arc = |n: &str| -> Arc<str> { names.get(n).cloned().unwrap_or_else(|| Arc::from(n)) };
        let mut holders = U64Map::default();
        let mut leases = BinaryHeap::new();
        for (token, key, permits, deadline) in &s.holders {
            if !names.contains_key(key) {
                return Err(InvalidField::new("holders", "a grant of an unknown key"));
            }
            holders.insert(
                *token,
                KeyedHolder {
                    key: arc(key),
                    permits: *permits,
                    deadline: Timestamp(*deadline),
                },
            );
            leases.push(Reverse((Timestamp(*deadline), *token)));
        }
        let heap = |v: &[(u64, u64, String)]| {
            v.iter()
                .map(|(t, g, n)| Reverse((Timestamp(*t), *g, arc(n))))
                .collect::<BinaryHeap<_>>()
        };
        Ok(KeyLayer {
            spec: KeyedSpec::from(&s.spec),
            user_concurrency: s.user_concurrency,
            overrides: s
                .overrides
                .iter()
                .map(|(k, c, w)| {
                    let over = KeyOverride {
                        concurrency: *c,
                        weight: *w,
                    };
                    (Arc::from(k.as_str()), over)
                })
                .collect(),
            next_gen: s.next_gen,
            ring: s
                .ring
                .iter()
                .map(|(n, g)| (arc(n), *g))
                .collect::<VecDeque<_>>(),
            sleepers: heap(&s.sleepers),
            idle: heap(&s.idle),
            keys,
            waiter_key,
            waits,
            holders,
            leases,
            requests,
            next_waiter: s.next_waiter,
            waiting,
            waiting_permits,
            held_until: s.held_until.map(Timestamp),
            busy,
            counters: KeyCounters {
                too_many_keys: s.counters.0,
                keys_created: s.counters.1,
            },
            reservations,
            heads,
            #[cfg(test)]
            drr: super::sched::DrrProbe::default(),
        })
    }

    /// Drops every queued waiter without granting anyone (after a restart their connections
    /// are gone); counted as cancelled. Returns how many.
    pub fn abandon_waiters(&mut self, total: &mut LimiterCore, now: Timestamp) -> usize {
        let ids: Vec<u64> = self.waiter_key.keys().copied().collect();
        let mut fx = crate::core::Effects::default();
        // Taken out oldest first, without granting: a grant now would go to nobody.
        let learning = total.learning_until;
        total.learning_until = Some(Timestamp::MAX);
        let mut sorted = ids;
        sorted.sort_unstable();
        for id in &sorted {
            if let Some((name, _)) = self.dequeue(total, now, *id, &mut fx) {
                total.counters.cancelled += 1;
                self.maybe_drop(&name, now);
            }
        }
        total.learning_until = learning;
        sorted.len()
    }
}
