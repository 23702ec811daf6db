//! A keyed permit re-adopted during a learning window in the durable embedded store survives a
//! reopen: the extend is logged with its key and replayed under it (docs/learning.md), so the
//! key's share and the total's are counted again after the restart, from the log alone and
//! from a snapshot plus the log.

#![cfg(not(feature = "shuttle"))]
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use floodgate::{
    Durability, ExtendError, FencingToken, Floodgate, KeyedSpec, LimiterBackend, LimiterName,
    LimiterSpec, MemoryStore, Store, WallClock,
};

const HOUR: Duration = Duration::from_secs(3600);

fn open(dir: &Path) -> (Floodgate<MemoryStore<WallClock>>, MemoryStore<WallClock>) {
    let (store, _) = MemoryStore::open(Durability::new(dir)).expect("open");
    (Floodgate::with_store(store.clone()), store)
}

async fn run(snapshot_midway: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (gate, store) = open(dir.path());
    let name = LimiterName::new("orgs").unwrap();
    let spec = LimiterSpec::concurrency(3).with_max_wait(HOUR);
    let st = store
        .restore_keyed_limiter(&name, spec, KeyedSpec::per_key(1), HOUR)
        .await
        .unwrap();
    assert!(st.learning, "{st:?}");
    let orgs = gate.limiter("orgs").await.unwrap();
    let token = FencingToken(5_000);
    // Without its key: lost. With it: re-adopted under "a", above its limit of 1.
    let bare = orgs.backend().extend(token, HOUR, Some(2)).await;
    assert!(matches!(bare, Err(ExtendError::Lost)), "{bare:?}");
    orgs.backend()
        .extend_keyed("a", token, HOUR, Some(2))
        .await
        .unwrap();
    if snapshot_midway {
        store.snapshot_now().unwrap();
    }
    let st = orgs.status().await.unwrap();
    assert_eq!((st.in_use, st.counters.adopted), (2, 1), "{st:?}");
    store.close();
    drop((gate, orgs, store));

    let (gate, _store) = open(dir.path());
    let orgs = gate.limiter("orgs").await.unwrap();
    let st = orgs.status().await.unwrap();
    assert_eq!((st.in_use, st.counters.adopted), (2, 1), "{st:?}");
    let keys = orgs.backend().keys(10).await.unwrap().expect("still keyed");
    let a = keys.busiest.iter().find(|k| &*k.key == "a");
    assert_eq!(a.map(|k| (k.in_use, k.holders)), Some((2, 1)), "{keys:?}");
    assert!(orgs.backend().release(token).await.unwrap());
    let keys = orgs.backend().keys(10).await.unwrap().expect("still keyed");
    assert_eq!(keys.count, 0, "{keys:?}");
}

#[tokio::test]
async fn a_keyed_readoption_survives_a_reopen_from_the_log() {
    run(false).await;
}

#[tokio::test]
async fn a_keyed_readoption_survives_a_reopen_from_a_snapshot_and_the_log() {
    run(true).await;
}
