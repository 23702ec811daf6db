//! Keyed `schedule` reservations in the durable embedded store: a reservation given back in
//! part before a restart can be given back further after it, from the log alone and from a
//! snapshot plus the log after it, and the key's and the total's rates are freed by it.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use floodgate::{
    Durability, Floodgate, KeyedSpec, LimiterBackend, LimiterSpec, MemoryStore, RateSpec, WallClock,
};

const HOUR: Duration = Duration::from_secs(3600);

fn open(dir: &Path) -> (Floodgate<MemoryStore<WallClock>>, MemoryStore<WallClock>) {
    let (store, _) = MemoryStore::open(Durability::new(dir)).expect("open");
    (Floodgate::with_store(store.clone()), store)
}

async fn run(snapshot_midway: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (gate, store) = open(dir.path());
    // The key's 1/s paces a schedule one token a second; the total's 100/s follows it.
    let spec = LimiterSpec::rate(RateSpec::per(100, Duration::from_secs(1))).with_max_wait(HOUR);
    let each = RateSpec::per(1, Duration::from_secs(1)).with_burst(1);
    gate.define_keyed("orgs", spec, KeyedSpec::default().with_rate(each))
        .await
        .unwrap();
    let orgs = gate.limiter("orgs").await.unwrap();
    // Offsets are counted from the schedule: the checks below allow for the time that has
    // really passed since (a stalled test process), measured, not assumed.
    let scheduled = Instant::now();
    let s = orgs.backend().schedule_keyed("a", 50).await.unwrap();
    assert_eq!(s.offsets.len(), 50);
    assert_eq!(s.offsets[49], Duration::from_secs(49));
    // The last ten have not started: they go back (logged).
    assert_eq!(
        orgs.backend().unschedule(s.reservation, 10).await.unwrap(),
        10
    );
    if snapshot_midway {
        store.snapshot_now().unwrap();
    }
    // Another key's schedule after it: its own reservation, and the total's tail now (the
    // total's next token was pushed to a's last one, docs/keyed.md).
    let other = orgs.backend().schedule_keyed("b", 2).await.unwrap();
    assert_ne!(other.reservation, s.reservation);
    assert!(
        other.offsets[0] + scheduled.elapsed() >= Duration::from_secs(38),
        "{:?}",
        other.offsets
    );
    store.close();
    drop((gate, orgs, store));

    let (gate, _store) = open(dir.path());
    let orgs = gate.limiter("orgs").await.unwrap();
    let keys = orgs.backend().keys(10).await.unwrap().expect("still keyed");
    assert_eq!(keys.count, 2, "both keys kept for their reservations");
    // b's took the total's tokens after a's: a's cannot go back until b's has.
    assert_eq!(
        orgs.backend().unschedule(s.reservation, 100).await.unwrap(),
        0
    );
    assert_eq!(
        orgs.backend()
            .unschedule(other.reservation, 5)
            .await
            .unwrap(),
        2,
        "b's both"
    );
    // Now a's unstarted tokens go back: 40 are left, of which only those started stay (the
    // first at once, then one a second since the schedule; one more for the clocks' rounding).
    let unscheduling = Instant::now();
    let back = orgs.backend().unschedule(s.reservation, 100).await.unwrap();
    let started_at_most = scheduled.elapsed().as_secs() + 2;
    assert!(
        back <= 39 && u64::from(back) + started_at_most >= 40,
        "{back}"
    );
    assert_eq!(
        orgs.backend().unschedule(s.reservation, 100).await.unwrap(),
        0,
        "once"
    );
    // a's next token comes right after its started ones, not 40 s later.
    let next = orgs.backend().schedule_keyed("a", 1).await.unwrap();
    assert!(
        next.offsets[0] <= Duration::from_secs(11) + unscheduling.elapsed(),
        "{:?}",
        next.offsets
    );
    // An id never drawn is answered like a plain limiter's: nothing went back.
    let unknown = floodgate::ReservationId(12_345);
    assert_eq!(orgs.backend().unschedule(unknown, 1).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_reservations_survive_a_reopen_from_the_log() {
    run(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_reservations_survive_a_reopen_from_a_snapshot_and_the_log() {
    run(true).await;
}
