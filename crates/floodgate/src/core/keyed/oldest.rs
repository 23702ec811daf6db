//! The oldest wait of a keyed limiter, across keys, in O(log keys).
//!
//! Waiters queue per key (FIFO by waiter id, so a key's head is its oldest waiter), so the
//! limiter's oldest waiter is the oldest of the keys' heads. [`KeyLayer::heads`] keeps one entry
//! per key with waiters, `(head's arrival, head's waiter id)`, updated only where a key's head
//! changes: a waiter queued into an empty key, and a head taken out (granted, cancelled, timed
//! out). Each costs O(log keys); the holders listing reads the first entry.
//!
//! Not persisted: [`KeyLayer::from_state`] rebuilds it from the restored queues (one entry per
//! key, as the queues are rebuilt anyway).

use std::time::Duration;

use super::{Key, KeyLayer};
use crate::types::Timestamp;

impl Key {
    /// Its head's entry in [`KeyLayer::heads`], when it has waiters.
    pub(super) fn head_entry(&self) -> Option<(Timestamp, u64)> {
        self.queue
            .first_key_value()
            .map(|(id, w)| (w.enqueued_at, *id))
    }
}

impl KeyLayer {
    /// When the oldest waiter of any key arrived; `None` when nobody waits.
    pub fn oldest_arrival(&self) -> Option<Timestamp> {
        self.heads.first().map(|(at, _)| *at)
    }

    /// How long the oldest waiter of any key has waited by `now`; `None` when nobody waits.
    pub fn oldest_wait(&self, now: Timestamp) -> Option<Duration> {
        self.oldest_arrival().map(|at| now.since(at))
    }

    /// Records that a key's head may have changed: drops the old head's entry (`before`) and
    /// enters the key's current head, if any.
    pub(super) fn head_moved(&mut self, before: Option<(Timestamp, u64)>, name: &str) {
        if let Some(b) = before {
            self.heads.remove(&b);
        }
        if let Some(h) = self.keys.get(name).and_then(Key::head_entry) {
            self.heads.insert(h);
        }
    }

    /// The oldest arrival found by visiting every waiter of every key (the tests' reference).
    #[cfg(test)]
    pub(super) fn oldest_arrival_by_scan(&self) -> Option<Timestamp> {
        self.keys
            .values()
            .flat_map(|k| k.queue.values().map(|w| w.enqueued_at))
            .min()
    }

    /// Checks the index against the keys: one entry per key with waiters, its head's.
    #[cfg(test)]
    pub(super) fn check_heads(&self) {
        let mut want: Vec<(Timestamp, u64)> =
            self.keys.values().filter_map(Key::head_entry).collect();
        want.sort_unstable();
        let got: Vec<(Timestamp, u64)> = self.heads.iter().copied().collect();
        assert_eq!(got, want, "the heads index agrees with the keys' queues");
        assert_eq!(self.oldest_arrival(), self.oldest_arrival_by_scan());
    }
}

#[cfg(test)]
mod tests {
    //! Property test: after random acquires, releases, cancels, time passing (timeouts, lease
    //! lapses, per-key rate waits) and restores from a snapshot, the holders listing's oldest
    //! wait equals the brute-force minimum over every waiter of every key.

    use std::time::Duration;

    use proptest::prelude::*;

    use super::super::*;
    use crate::core::{AcquireRequest, Admission, Effects, WaiterId};
    use crate::spec::RateSpec;
    use crate::types::FencingToken;

    #[derive(Debug, Clone)]
    enum Op {
        Acquire { key: usize, wait_ms: u64 },
        Release(usize),
        Cancel(usize),
        Tick(u64),
        Restore,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0..12usize, 0..80u64).prop_map(|(key, wait_ms)| Op::Acquire { key, wait_ms }),
            2 => any::<usize>().prop_map(Op::Release),
            2 => any::<usize>().prop_map(Op::Cancel),
            2 => (1..25u64).prop_map(Op::Tick),
            1 => Just(Op::Restore),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn oldest_wait_is_the_oldest_waiter_of_any_key(
            total_limit in 1..=4u32,
            per_key in 1..=2u32,
            key_rate in any::<bool>(),
            ops in prop::collection::vec(op(), 1..150),
        ) {
            let spec = LimiterSpec::concurrency(total_limit)
                .with_default_lease(Duration::from_millis(30))
                .with_max_wait(Duration::from_millis(60))
                .with_max_queue(1_000);
            let mut keyed = KeyedSpec::per_key(per_key);
            if key_rate {
                keyed = keyed.with_rate(RateSpec::per(1, Duration::from_millis(10)));
            }
            let (mut total, mut layer) = KeyLayer::new(spec, keyed, 1).expect("valid");
            let mut now = Timestamp(0);
            let mut held: Vec<FencingToken> = Vec::new();
            let mut queued: Vec<WaiterId> = Vec::new();
            for op in ops {
                let mut fx = Effects::default();
                match op {
                    Op::Acquire { key, wait_ms } => {
                        let req = AcquireRequest {
                            permits: 1,
                            wait: Some(Duration::from_millis(wait_ms)),
                            ..AcquireRequest::default()
                        };
                        match layer.acquire(&mut total, now, &format!("k{key}"), &req, &mut fx) {
                            Admission::Granted(g) => held.push(g.token),
                            Admission::Queued(id) => queued.push(id),
                            Admission::Refused(_) => {}
                        }
                    }
                    Op::Release(i) if !held.is_empty() => {
                        let token = held.swap_remove(i % held.len());
                        layer.release(&mut total, now, token, &mut fx);
                    }
                    Op::Cancel(i) if !queued.is_empty() => {
                        let id = queued.swap_remove(i % queued.len());
                        layer.cancel(&mut total, now, id, &mut fx);
                    }
                    Op::Tick(ms) => {
                        now = now.after(Duration::from_millis(ms));
                        layer.advance(&mut total, now, &mut fx);
                    }
                    Op::Restore => {
                        layer = KeyLayer::from_state(&layer.to_state()).expect("restores");
                    }
                    _ => {}
                }
                for (id, out) in fx.wakes {
                    queued.retain(|q| *q != id);
                    if let Ok(g) = out {
                        held.push(g.token);
                    }
                }
                layer.check_heads();
                let want = layer.oldest_arrival_by_scan().map(|at| now.since(at));
                prop_assert_eq!(layer.holders_view(&total, now, 10).oldest_wait, want);
                prop_assert_eq!(want.is_some(), layer.waiting() > 0);
            }
        }
    }
}
