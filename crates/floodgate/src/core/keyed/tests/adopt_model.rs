//! Property test: random acquires, releases, extends, learning windows and re-adoptions of
//! unknown permits (carrying a key) on a keyed limiter, against a witness ledger. Re-adoption
//! may put the total or a key above its limit (those holders really work); what must hold is
//! that no *grant* is ever made over a limit (after every grant, the total's and the key's
//! in-use are within their limits), that nothing is granted during a window, that fencing
//! tokens of later grants are above every re-adopted one, and that the layer agrees with the
//! ledger (total and per key).

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;

use super::super::*;
use crate::core::{AcquireRequest, Admission, Effects, WaiterId};
use crate::types::FencingToken;

const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];
const TOTAL: u32 = 6;
const PER_KEY: u32 = 3;
const MS: u64 = 1_000;

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        key: usize,
        permits: u32,
        wait_ms: u64,
    },
    Release(usize),
    Extend(usize),
    Tick(u64),
    Learn(u64),
    /// An extend of a permit the limiter does not know: its key, its size, whether it carries
    /// its key at all.
    Adopt {
        key: usize,
        permits: u32,
        keyed: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS.len(), 1..=2u32, 0..40u64)
            .prop_map(|(key, permits, wait_ms)| Op::Acquire { key, permits, wait_ms }),
        2 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Extend),
        2 => (1..30u64).prop_map(Op::Tick),
        1 => (5..60u64).prop_map(Op::Learn),
        3 => (0..KEYS.len(), 1..=3u32, prop::bool::weighted(0.8))
            .prop_map(|(key, permits, keyed)| Op::Adopt { key, permits, keyed }),
    ]
}

#[derive(Default)]
struct Witness {
    /// token -> (key, permits, lease deadline)
    held: BTreeMap<u64, (usize, u32, Timestamp)>,
    /// waiter -> key, permits
    queued: BTreeMap<u64, (usize, u32)>,
    /// Every grant's token must be above this (the last grant, every re-adopted token).
    floor: u64,
    adopted: u64,
}

impl Witness {
    fn lapse(&mut self, now: Timestamp) {
        self.held.retain(|_, (_, _, d)| *d > now);
    }

    fn in_use(&self, key: Option<usize>) -> u32 {
        self.held
            .values()
            .filter(|(k, _, _)| key.is_none_or(|x| x == *k))
            .map(|(_, p, _)| p)
            .sum()
    }

    fn granted(&mut self, learning: bool, key: usize, permits: u32, token: u64, d: Timestamp) {
        assert!(!learning, "granted during a learning window");
        assert!(token > self.floor, "token {token} not above {}", self.floor);
        self.floor = token;
        self.held.insert(token, (key, permits, d));
        assert!(self.in_use(None) <= TOTAL, "a grant over the total");
        assert!(
            self.in_use(Some(key)) <= PER_KEY,
            "a grant over {}",
            KEYS[key]
        );
    }

    fn effects(&mut self, learning: bool, fx: &mut Effects) {
        for (id, out) in fx.wakes.drain(..) {
            let WaiterId(id) = id;
            let Some((key, permits)) = self.queued.remove(&id) else {
                continue;
            };
            if let Ok(g) = out {
                self.granted(learning, key, permits, g.token.0, g.lease_deadline);
            }
        }
    }
}

fn run(ops: Vec<Op>) {
    let spec = LimiterSpec::concurrency(TOTAL)
        .with_default_lease(Duration::from_millis(50))
        .with_max_wait(Duration::from_secs(1));
    let mut keyed = KeyedSpec::per_key(PER_KEY);
    keyed.max_keys = 3;
    let (mut total, mut layer) = KeyLayer::new(spec, keyed, 1).expect("valid");
    let mut w = Witness::default();
    let mut now = Timestamp(0);
    let lease = Duration::from_millis(50);
    let mut fresh = 1_000u64;
    for op in ops {
        let mut fx = Effects::default();
        // Every operation first lets leases due by now lapse, before granting anything.
        w.lapse(now);
        match op {
            Op::Acquire {
                key,
                permits,
                wait_ms,
            } => {
                let req = AcquireRequest {
                    permits,
                    wait: Some(Duration::from_millis(wait_ms)),
                    ..AcquireRequest::default()
                };
                let admission = layer.acquire(&mut total, now, KEYS[key], &req, &mut fx);
                let learning = total.learning_until().is_some();
                match admission {
                    Admission::Granted(g) => {
                        w.granted(learning, key, permits, g.token.0, g.lease_deadline)
                    }
                    Admission::Queued(id) => {
                        w.queued.insert(id.0, (key, permits));
                    }
                    Admission::Refused(_) => {}
                }
            }
            Op::Release(i) => {
                if let Some(token) = w.held.keys().nth(i % w.held.len().max(1)).copied() {
                    let ok = layer.release(&mut total, now, FencingToken(token), &mut fx);
                    if ok {
                        w.held.remove(&token);
                    }
                }
            }
            Op::Extend(i) => {
                if let Some((&token, &(key, p, _))) = w.held.iter().nth(i % w.held.len().max(1)) {
                    let out = layer
                        .extend_or_adopt(
                            &mut total,
                            now,
                            FencingToken(token),
                            lease,
                            Some((KEYS[key], p)),
                            &mut fx,
                        )
                        .expect("valid lease");
                    if let Ok(d) = out {
                        w.held.insert(token, (key, p, d));
                    }
                }
            }
            Op::Tick(ms) => {
                now = Timestamp(now.0 + ms * MS);
                w.lapse(now);
            }
            Op::Learn(ms) => total.enter_learning(now, Timestamp(now.0 + ms * MS)),
            Op::Adopt {
                key,
                permits,
                keyed,
            } => {
                // Far above every grant's token: a permit this limiter never granted.
                fresh += 1_000;
                // Time first, so the window and the keys are as the adoption will see them.
                layer.advance(&mut total, now, &mut fx);
                let learning = total.learning_until().is_some();
                let key_ok = layer.key_info(KEYS[key]).is_some() || layer.key_count() < 3;
                let out = layer
                    .extend_or_adopt(
                        &mut total,
                        now,
                        FencingToken(fresh),
                        lease,
                        keyed.then_some((KEYS[key], permits)),
                        &mut fx,
                    )
                    .expect("valid lease");
                match out {
                    Ok(d) => {
                        assert!(learning && keyed && key_ok, "adopted out of rules");
                        w.held.insert(fresh, (key, permits, d));
                        w.floor = w.floor.max(fresh);
                        w.adopted += 1;
                    }
                    Err(_) => assert!(
                        !(learning && keyed && key_ok),
                        "a keyed extend in a window was lost"
                    ),
                }
            }
        }
        let mut adv = Effects::default();
        layer.advance(&mut total, now, &mut adv);
        fx.wakes.append(&mut adv.wakes);
        let learning = total.learning_until().is_some();
        w.effects(learning, &mut fx);
        w.lapse(now);
        assert_eq!(
            total.in_use(),
            w.in_use(None),
            "the total agrees with the ledger"
        );
        for (i, k) in KEYS.iter().enumerate() {
            let mine = layer.key_info(k).map_or(0, |info| info.in_use);
            assert_eq!(mine, w.in_use(Some(i)), "{k} agrees with the ledger");
        }
        assert_eq!(total.counters().adopted, w.adopted, "re-adoptions counted");
        assert!(
            total.next_token() > w.floor,
            "the token floor is above every adoption"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn readoption_never_lets_a_grant_exceed_a_limit(ops in prop::collection::vec(op(), 1..120)) {
        run(ops);
    }
}

#[test]
fn a_keyed_permit_is_readopted_under_its_key_and_blocks_that_key() {
    let spec = LimiterSpec::concurrency(4).with_default_lease(Duration::from_secs(60));
    let (mut total, mut layer) = KeyLayer::new(spec, KeyedSpec::per_key(2), 10).expect("valid");
    let mut fx = Effects::default();
    let s = |x: u64| Timestamp(x * 1_000_000);
    total.enter_learning(s(0), s(10));
    let lease = Duration::from_secs(60);
    // Without a key: lost, as before.
    let out = layer.extend_or_adopt(&mut total, s(1), FencingToken(500), lease, None, &mut fx);
    assert!(out.expect("valid").is_err());
    // With its key: held again, counted under the key and the total, above the key's limit.
    let out = layer.extend_or_adopt(
        &mut total,
        s(1),
        FencingToken(500),
        lease,
        Some(("a", 3)),
        &mut fx,
    );
    assert!(out.expect("valid").is_ok());
    assert_eq!(total.in_use(), 3);
    assert_eq!(
        layer.key_info("a").map(|k| (k.in_use, k.holders)),
        Some((3, 1))
    );
    assert_eq!(total.counters().adopted, 1);
    assert_eq!(total.next_token(), 501);
    // Its next extend is an ordinary one.
    let out = layer.extend_or_adopt(
        &mut total,
        s(2),
        FencingToken(500),
        lease,
        Some(("a", 3)),
        &mut fx,
    );
    assert!(out.expect("valid").is_ok());
    assert_eq!(total.counters().adopted, 1);
    // After the window: key "a" is over its limit, so its waiter waits; key "b" gets the one
    // permit the total has left, with a token above the re-adopted one.
    let wait = AcquireRequest {
        wait: Some(Duration::from_secs(100)),
        ..AcquireRequest::default()
    };
    let Admission::Queued(_) = layer.acquire(&mut total, s(3), "a", &wait, &mut fx) else {
        panic!("granted while learning");
    };
    layer.advance(&mut total, s(10), &mut fx);
    assert!(fx.wakes.is_empty(), "key a is above its limit");
    match layer.acquire(&mut total, s(11), "b", &AcquireRequest::default(), &mut fx) {
        Admission::Granted(g) => assert_eq!(g.token, FencingToken(501)),
        other => panic!("{other:?}"),
    }
    let two = AcquireRequest {
        permits: 1,
        wait: Some(Duration::ZERO),
        ..AcquireRequest::default()
    };
    assert!(matches!(
        layer.acquire(&mut total, s(11), "c", &two, &mut fx),
        Admission::Refused(_)
    ));
    // The re-adopted holder releases: key a's waiter runs.
    assert!(layer.release(&mut total, s(12), FencingToken(500), &mut fx));
    assert_eq!(fx.wakes.len(), 1);
    // Outside a window an unknown keyed permit is lost.
    let out = layer.extend_or_adopt(
        &mut total,
        s(13),
        FencingToken(900),
        lease,
        Some(("a", 1)),
        &mut fx,
    );
    assert!(out.expect("valid").is_err());
}
