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
/// threshold, and no snapshot; every start replayed them all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
        // Snapshots are taken off the async threads: let one that is due finish first.
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
