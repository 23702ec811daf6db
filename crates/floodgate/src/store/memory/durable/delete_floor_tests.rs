//! A `Delete` that races a snapshot, or a re-create, keeps the deleted limiter's token floor.
//!
//! The race: the delete takes the limiter out of the map, and a snapshot (or a re-create of
//! the name) runs before it raises the store's token floor: the snapshot has neither the
//! limiter nor its floor, the re-created limiter starts where only the token seed (the clock)
//! puts it. The delete now raises the floor before it lets the map go, so both wait for it;
//! the `Delete` record carries the floor as well (a log written before then replays by it).
//!
//! The clock seed is taken out of play by giving the first limiter tokens far above any
//! clock (its `Create` record written by hand, as a limiter that granted faster than one token
//! per microsecond would be): only the floor can keep the new tokens above them. The race is
//! forced, not hoped for: the test holds the limiter's lock while the delete waits for it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::PoisonError;
use std::time::Duration;

use super::record::{encode, Op, Record};
use super::wal::segment_path;
use super::{Durability, FsyncPolicy};
use crate::clock::token_seed;
use crate::core::{AcquireRequest, SpecState};
use crate::spec::LimiterSpec;
use crate::store::memory::MemoryStore;
use crate::store::{LimiterBackend, Store};
use crate::types::{FencingToken, LimiterName};

/// Far above the clock's microseconds since the epoch (about 2^51 today).
const HIGH: u64 = 1 << 62;

/// A data directory whose log holds one limiter `name`, as a limiter that granted faster than
/// one token per microsecond would have left it: tokens from `HIGH` on (its `Create` record
/// written by hand). Returns its durability settings.
fn log_with_high_tokens(
    dir: &std::path::Path,
    name: &LimiterName,
    spec: &LimiterSpec,
) -> Durability {
    let mut frame = Vec::new();
    encode(
        &Record {
            seq: 1,
            at: token_seed(),
            limiter: name.as_str().to_owned(),
            inc: 0,
            op: Op::Create {
                spec: SpecState::from(spec),
                first_token: HIGH,
                learning_until: None,
            },
        },
        &mut frame,
    );
    std::fs::write(segment_path(dir, 1), &frame).expect("write the log");
    Durability::new(dir).fsync(FsyncPolicy::No)
}

/// Grants and releases `n` permits of `name`, returning every token handed out.
async fn grant(
    store: &MemoryStore<crate::clock::WallClock>,
    name: &LimiterName,
    n: usize,
) -> Vec<u64> {
    let limiter = store.limiter(name).await.expect("limiter");
    let mut tokens = Vec::new();
    for _ in 0..n {
        let req = AcquireRequest {
            permits: 1,
            wait: Some(Duration::ZERO),
            ..AcquireRequest::default()
        };
        let grant = limiter.acquire(req.into()).await.expect("granted");
        tokens.push(grant.token.0);
        limiter
            .release(FencingToken(grant.token.0))
            .await
            .expect("release");
    }
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_racing_a_snapshot_keeps_the_token_floor_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (name, spec) = (
        LimiterName::new("a").expect("name"),
        LimiterSpec::concurrency(4),
    );
    let durability = log_with_high_tokens(dir.path(), &name, &spec);

    let (store, _) = MemoryStore::open(durability.clone()).expect("open");
    let witness = grant(&store, &name, 5).await;
    assert!(witness.iter().all(|t| *t >= HIGH), "{witness:?}");

    // The delete takes the limiter out of the map, then waits for its lock, held here.
    let limiter = store.limiter(&name).await.expect("limiter");
    let shared = limiter.shared();
    let held = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
    let deleting = {
        let store = store.clone();
        let name = name.clone();
        tokio::spawn(async move { store.delete_limiter(&name).await })
    };
    wait_for_the_delete(&store);
    // The snapshot, from a thread of its own: it waits for the delete, which now raises the
    // floor before it lets the map go. (Before, it let the map go first, and a snapshot
    // taken here had neither the limiter nor its floor: the `Delete` record's floor was all
    // that kept the re-created limiter's tokens above the old ones.)
    let snapshot = {
        let store = store.clone();
        std::thread::spawn(move || store.snapshot_now())
    };
    drop(held);
    assert!(deleting.await.expect("delete task").expect("delete"));
    snapshot.join().expect("snapshot thread").expect("snapshot");
    store.close();
    drop(limiter);
    drop(store);

    // After the restart, the name is created again: its tokens must be above every earlier
    // one, though the clock seed is far below them.
    let (store, _) = MemoryStore::open(durability).expect("reopen");
    store.put_limiter(&name, spec).await.expect("re-create");
    let fresh = grant(&store, &name, 3).await;
    let highest = witness.iter().copied().max().expect("tokens");
    assert!(
        fresh.iter().all(|t| *t > highest),
        "tokens {fresh:?} after the restart are not above the deleted limiter's {witness:?}"
    );
    store.close();
}

/// Waits until the delete holds the map's lock (it then waits for the limiter's, held by the
/// caller): a liveness bound only. No await while the lock is held: this thread is not one of
/// the runtime's workers, which run the delete.
fn wait_for_the_delete(store: &MemoryStore<crate::clock::WallClock>) {
    for _ in 0..10_000 {
        if store.inner.limiters.try_read().is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("the delete never took the map's lock while it waited for the limiter's");
}

/// A limiter re-created while its delete is under way (no restart): its first token is taken
/// under the map's lock, and must be above every token of the deleted incarnation. The delete
/// used to take the limiter out and let the map go before it raised the floor, so a
/// re-create in between started at the clock (review h-durable, found by a probe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limiter_re_created_during_its_delete_hands_out_higher_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (name, spec) = (
        LimiterName::new("a").expect("name"),
        LimiterSpec::concurrency(4),
    );
    let (store, _) =
        MemoryStore::open(log_with_high_tokens(dir.path(), &name, &spec)).expect("open");
    let witness = grant(&store, &name, 3).await;
    let limiter = store.limiter(&name).await.expect("limiter");
    let shared = limiter.shared();
    let held = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
    let deleting = {
        let (store, name) = (store.clone(), name.clone());
        tokio::spawn(async move { store.delete_limiter(&name).await })
    };
    wait_for_the_delete(&store);
    let recreating = {
        let (store, name, spec) = (store.clone(), name.clone(), spec.clone());
        tokio::spawn(async move { store.put_limiter(&name, spec).await })
    };
    drop(held);
    assert!(deleting.await.expect("delete task").expect("delete"));
    recreating
        .await
        .expect("re-create task")
        .expect("re-create");
    let fresh = grant(&store, &name, 2).await;
    let highest = witness.iter().copied().max().expect("tokens");
    assert!(
        fresh.iter().all(|t| *t > highest),
        "the re-created limiter's tokens {fresh:?} are not above the deleted one's {witness:?}"
    );
    store.close();
}

/// A frame around `payload`, as the log writes one (`len | crc32 | payload`).
fn raw_frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// A log written before `Delete` carried the floor still replays: the old record reads as a
/// floor of 0, and the deleted limiter's own state (known from the `Create` before it) still
/// raises the floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_record_of_the_old_format_still_replays() {
    let old = br#"{"seq":2,"at":7,"limiter":"a","inc":1,"op":{"op":"delete"}}"#;
    let Ok(record) = serde_json::from_slice::<Record>(old) else {
        panic!("the old Delete record does not parse")
    };
    assert_eq!(record.op, Op::Delete { next_token: 0 });

    let dir = tempfile::tempdir().expect("tempdir");
    let name = LimiterName::new("a").expect("name");
    let spec = LimiterSpec::concurrency(4);
    let mut log = Vec::new();
    let at = token_seed();
    encode(
        &Record {
            seq: 1,
            at,
            limiter: name.as_str().to_owned(),
            inc: 0,
            op: Op::Create {
                spec: SpecState::from(&spec),
                first_token: HIGH,
                learning_until: None,
            },
        },
        &mut log,
    );
    let old = format!(r#"{{"seq":2,"at":{at},"limiter":"a","inc":1,"op":{{"op":"delete"}}}}"#);
    raw_frame(old.as_bytes(), &mut log);
    std::fs::write(segment_path(dir.path(), 1), &log).expect("write the log");

    let (store, report) =
        MemoryStore::open(Durability::new(dir.path()).fsync(FsyncPolicy::No)).expect("open");
    assert_eq!((report.records, report.limiters), (2, 0));
    store.put_limiter(&name, spec).await.expect("re-create");
    let fresh = grant(&store, &name, 1).await;
    assert!(fresh[0] >= HIGH, "{fresh:?}");
    store.close();
}
