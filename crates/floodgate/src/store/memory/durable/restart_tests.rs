//! Restarts in a row, and crashes right after an answer (review h-durable: each test here
//! failed before its fix).
//!
//! A crash is the data directory copied at that instant (what a `kill -9` leaves, page cache
//! included), reopened while the original store is closed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use super::{Durability, FsyncPolicy};
use crate::core::AcquireRequest;
use crate::spec::LimiterSpec;
use crate::store::memory::MemoryStore;
use crate::store::{LimiterBackend, Store};
use crate::types::{FencingToken, LimiterName};

/// The directory as a crash at this instant leaves it (the lock file aside).
fn crash_copy(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        if entry.file_name() != "LOCK" {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
}

/// A server restarted more often than its log reaches the snapshot threshold: the log replayed
/// at start counts toward the next snapshot, so the files stay bounded. (Each start began its
/// count at 0: 20 starts of 60 records each left 20 segments, 167 KB against a 16 KiB
/// threshold, and no snapshot; every start replayed them all.) On one thread the snapshot
/// task never runs before the store is closed, as on a loaded machine where it ran too late
/// (CI saw 101,548 bytes in 13 segments): the snapshot taken at start must bound the log alone.
#[tokio::test(flavor = "current_thread")]
async fn the_log_stays_bounded_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let threshold = 16 * 1024;
    let durability = Durability::new(dir.path())
        .fsync(FsyncPolicy::No)
        .snapshot_after_bytes(threshold);
    let name = LimiterName::new("a").expect("name");
    for _ in 0..20 {
        let (store, _) = MemoryStore::open(durability.clone()).expect("open");
        store
            .put_limiter(&name, LimiterSpec::concurrency(4))
            .await
            .expect("put");
        let limiter = store.limiter(&name).await.expect("limiter");
        for _ in 0..30 {
            let req = AcquireRequest {
                wait: Some(Duration::ZERO),
                ..AcquireRequest::default()
            };
            let grant = limiter.acquire(req.into()).await.expect("granted");
            limiter
                .release(FencingToken(grant.token.0))
                .await
                .expect("released");
        }
        store.close();
    }
    let (mut segments, mut bytes) = (0, 0);
    for entry in std::fs::read_dir(dir.path()).expect("read dir") {
        let entry = entry.expect("entry");
        if entry.file_name().to_string_lossy().starts_with("wal-") {
            segments += 1;
            bytes += entry.metadata().expect("metadata").len();
        }
    }
    assert!(
        bytes < 3 * threshold,
        "{bytes} bytes of log in {segments} segments against a threshold of {threshold}"
    );
}

/// A limiter restored in a learning window (a server started without its data) is learning
/// after a crash right after the answer: the window's record was durable before it. (It was
/// not: the reopened store had the limiter, not learning, and a second restore left it so,
/// granting over the holders the window was there for.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_limiters_learning_window_survives_a_crash_right_after_the_answer() {
    let (dir, crashed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let name = LimiterName::new("a").unwrap();
    let window = Duration::from_secs(3600);
    let (store, _) = MemoryStore::open(Durability::new(dir.path())).unwrap();
    let status = store
        .restore_limiter(&name, LimiterSpec::concurrency(4), window)
        .await
        .unwrap();
    assert!(status.learning);
    crash_copy(dir.path(), crashed.path());
    store.close();
    let (after, _) = MemoryStore::open(Durability::new(crashed.path())).unwrap();
    let status = after
        .restore_limiter(&name, LimiterSpec::concurrency(4), window)
        .await
        .unwrap();
    assert!(status.learning, "the learning window was lost: {status:?}");
    after.close();
}

/// Polls `fut` once and drops it: what a timeout around an acquire does when it fires while
/// the grant is being written. `Some` if it was answered in that poll.
fn poll_once_then_drop<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// An acquire dropped while its grant waits for the disk gives the permit back at once, as
/// `Limiter::acquire`'s cancel safety says ("a grant that raced the drop is released"): it was
/// held until its lease ended (review h-keyed). An idempotent one keeps it, for its retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_dropped_while_its_grant_is_logged_gives_the_permit_back() {
    use crate::{AcquireOptions, Floodgate};
    let dir = tempfile::tempdir().unwrap();
    let durability = Durability::new(dir.path()).fsync(FsyncPolicy::Always);
    let (store, _) = MemoryStore::open(durability).unwrap();
    let gate = Floodgate::with_store(store.clone());
    let lease = Duration::from_secs(3600);
    gate.define("a", LimiterSpec::concurrency(1)).await.unwrap();
    let lim = gate.limiter("a").await.unwrap();
    // Until the first poll leaves the grant waiting for the log (almost always the first try).
    let mut dropped = false;
    for _ in 0..100 {
        match poll_once_then_drop(lim.acquire(AcquireOptions::new().lease(lease))) {
            None => {
                dropped = true;
                break;
            }
            Some(answered) => drop(answered.unwrap()),
        }
    }
    assert!(dropped, "every acquire was durable at its first poll");
    let status = lim.status().await.unwrap();
    assert_eq!(
        status.in_use, 0,
        "the dropped acquire's grant is still held: {status:?}"
    );
    let next = lim
        .acquire(AcquireOptions::new().wait(Duration::ZERO))
        .await;
    drop(next.expect("the permit is free"));

    // Idempotent: the grant stays for the retry with the same id, which gets it.
    let with_id = |id: &str| AcquireOptions::new().lease(lease).request_id(id);
    let mut kept = None;
    for i in 0..100 {
        let id = format!("job-{i}");
        match poll_once_then_drop(lim.acquire(with_id(&id))) {
            None => {
                kept = Some(id);
                break;
            }
            Some(answered) => drop(answered.unwrap()),
        }
    }
    let id = kept.expect("every idempotent acquire was durable at its first poll");
    assert_eq!(lim.status().await.unwrap().in_use, 1, "kept for the retry");
    let retry = lim.acquire(with_id(&id)).await.unwrap();
    assert_eq!(
        lim.status().await.unwrap().in_use,
        1,
        "the retry got the same grant"
    );
    drop(retry);
    assert_eq!(lim.status().await.unwrap().in_use, 0);
    store.close();
}

/// A crash that leaves only the first record a restore wrote (its limiter's creation: the
/// writes after it cut off) still leaves the limiter learning: the window is part of that
/// record. (It was a second record: a crash between the two left the limiter created and not
/// learning, and the next restore, finding it, left it so, granting over the holders the
/// window was there for.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_right_after_a_restored_limiters_creation_leaves_it_learning() {
    use super::record::{decode, Frame, Op};
    let (dir, crashed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let window = Duration::from_secs(3600);
    let (store, _) = MemoryStore::open(Durability::new(dir.path())).unwrap();
    for (name, keyed) in [("plain", false), ("keyed", true)] {
        let name = LimiterName::new(name).unwrap();
        let spec = LimiterSpec::concurrency(4);
        if keyed {
            let per_key = crate::core::keyed::KeyedSpec::per_key(2);
            store
                .restore_keyed_limiter(&name, spec, per_key, window)
                .await
        } else {
            store.restore_limiter(&name, spec, window).await
        }
        .unwrap();
    }
    crash_copy(dir.path(), crashed.path());
    store.close();
    // Every segment cut just after each limiter's creation record: what a crash before any
    // later write reached the disk leaves.
    for entry in std::fs::read_dir(crashed.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        let (mut at, mut cut) = (0, None);
        while let Frame::Record(record, next) = decode(&data, at) {
            if matches!(record.op, Op::Create { .. } | Op::CreateKeyed { .. }) {
                cut = Some(next);
            }
            at = next;
        }
        if let Some(cut) = cut {
            std::fs::write(&path, &data[..cut]).unwrap();
        }
    }
    let (after, _) = MemoryStore::open(Durability::new(crashed.path())).unwrap();
    for name in ["plain", "keyed"] {
        let limiter = after.limiter(&LimiterName::new(name).unwrap()).await;
        let status = limiter.unwrap().status().await.unwrap();
        assert!(
            status.learning,
            "{name} was created and is not learning: {status:?}"
        );
    }
    after.close();
}
