//! Review of today's paced idempotency on the durable embedded store: a remembered request id
//! whose retention (the default lease from the grant) ended while the store was closed. The
//! retention is fixed at the grant (its end is stored, as Redis stores `until`), so a reopen,
//! from the log or from a snapshot, must not remember the id anew from the time it replays:
//! the retry after it is a new acquire (a new fencing token, counted), as on Redis. And the
//! reverse, a retry within the retention after a reopen, gets the grant again
//! (`tests/idem_rate_only.rs`). Waits are sleeps past the retention, not timed assertions: the
//! retention is on the wall clock, so once it has passed it has passed.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use floodgate::{AcquireOptions, Durability, Floodgate, LimiterSpec, MemoryStore, RateSpec};

const RETENTION: Duration = Duration::from_millis(300);

fn once() -> AcquireOptions {
    AcquireOptions::new()
        .request_id("job-1")
        .wait(Duration::ZERO)
}

async fn forgotten_across_a_reopen(snapshot: bool) {
    let dir = tempfile::tempdir().unwrap();
    let open = || MemoryStore::open(Durability::new(dir.path())).unwrap().0;
    let first = {
        let store = open();
        let gate = Floodgate::with_store(store.clone());
        let spec = LimiterSpec::rate(RateSpec::per(100, Duration::from_secs(1)).with_burst(10))
            .with_default_lease(RETENTION);
        gate.define("paced", spec).await.unwrap();
        let paced = gate.limiter("paced").await.unwrap();
        let first = paced.acquire(once()).await.unwrap().fencing_token();
        if snapshot {
            store.snapshot_now().unwrap();
        }
        store.close();
        first
    };
    // Past the retention while closed.
    tokio::time::sleep(RETENTION * 3).await;
    let gate = Floodgate::with_store(open());
    let paced = gate.limiter("paced").await.unwrap();
    let retry = paced.acquire(once()).await.unwrap();
    assert_ne!(
        retry.fencing_token(),
        first,
        "the id was remembered past its retention after a reopen (snapshot: {snapshot})"
    );
    assert_eq!(paced.status().await.unwrap().counters.granted, 2);
}

#[tokio::test]
async fn a_paced_id_past_its_retention_is_forgotten_after_a_reopen_from_the_log() {
    forgotten_across_a_reopen(false).await;
}

#[tokio::test]
async fn a_paced_id_past_its_retention_is_forgotten_after_a_reopen_from_a_snapshot() {
    forgotten_across_a_reopen(true).await;
}
