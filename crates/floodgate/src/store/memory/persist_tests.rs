//! The data directory's lock follows the user's handles of a durable store, and nothing is
//! written into the directory once the store is closed: a task of the store that still holds
//! it, or wakes after `close`, must not keep the lock or write where another store (or
//! process) now works. Deterministic: the tests hold the store the way its tasks do, or run on
//! tokio's paused clock, instead of hoping to hit a task's moment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::take_snapshot;
use crate::store::memory::{Durability, MemoryStore};

/// The directory's files, sorted, with their contents (so a rewritten file shows).
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            let path = e.expect("entry").path();
            let body = std::fs::read(&path).expect("read file");
            (path, body)
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn the_last_handle_unlocks_the_directory_even_while_a_task_holds_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = MemoryStore::open(Durability::new(dir.path())).expect("open");
    let clone = store.clone();
    // What the snapshot task holds while it takes a snapshot (the clock-mark task held the
    // same for a moment each second: a CI run failed reopening the directory then).
    let held_by_a_task = Arc::clone(&store.inner);
    drop(store);
    assert!(
        MemoryStore::open(Durability::new(dir.path())).is_err(),
        "a clone is still open: the directory stays locked"
    );
    drop(clone);
    let (again, _) = MemoryStore::open(Durability::new(dir.path()))
        .expect("the last handle is gone: the directory is unlocked at once");

    // The old store's task wakes now that another store owns the directory: it writes nothing.
    let before = files(dir.path());
    assert!(
        take_snapshot(&held_by_a_task).is_err(),
        "a closed store takes no snapshot"
    );
    drop(held_by_a_task);
    assert_eq!(files(dir.path()), before);
    again.close();
}

#[tokio::test(start_paused = true)]
async fn no_clock_mark_is_written_after_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = dir.path().join("clock.json");
    let (store, _) = MemoryStore::open(Durability::new(dir.path())).expect("open");
    // The first mark is written at once (a liveness bound only; tokio's clock is paused).
    for _ in 0..3000 {
        if mark.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(mark.exists(), "the store writes its clock mark while open");
    store.close();
    std::fs::remove_file(&mark).expect("remove the mark");
    // Ten of the task's one-second ticks on the paused clock (tokio does not move it past a
    // blocking write in progress), the store still held.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!mark.exists(), "a clock mark was written after close");
    drop(store);
}

#[tokio::test]
async fn close_unlocks_even_while_a_forked_child_shares_the_lock_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = MemoryStore::open(Durability::new(dir.path())).expect("open");
    // What a child process forked by another thread (a `Command` spawning redis-cli, say) holds
    // until it execs: the lock file's open file description, through a copy of the descriptor.
    let child_copy = {
        let persist = store.inner.persist.as_ref().expect("durable");
        let lock = persist.lock.lock().expect("lock");
        lock.as_ref().expect("open").try_clone().expect("dup")
    };
    store.close();
    let (again, _) = MemoryStore::open(Durability::new(dir.path()))
        .expect("closed: the directory is unlocked whoever shares the descriptor");
    drop(child_copy);
    again.close();
}

/// A snapshot taken once the log has stopped keeps nothing the log did not get. Here a release
/// runs after the log stopped: its caller is told the store is unavailable, and the log still
/// has the permit held. A snapshot that read the state then wrote the release down, so the
/// reopened store had freed a permit its holder was told it still held (a timer pass between
/// a close and a snapshot's reads did the same: a CI run reopened a store whose snapshot had
/// granted waiters the log had queued).
#[tokio::test]
async fn no_snapshot_keeps_a_change_made_after_the_log_stopped() {
    use crate::spec::LimiterSpec;
    use crate::store::{LimiterBackend, Store};
    use crate::types::LimiterName;

    let dir = tempfile::tempdir().expect("tempdir");
    let name = LimiterName::new("a").expect("name");
    let (store, _) = MemoryStore::open(Durability::new(dir.path())).expect("open");
    store
        .put_limiter(&name, LimiterSpec::concurrency(1))
        .await
        .expect("put");
    let limiter = store.limiter(&name).await.expect("limiter");
    let grant = limiter
        .acquire(crate::AcquireOptions::new())
        .await
        .expect("granted");
    let persist = store.inner.persist.as_ref().expect("durable");
    persist.close_log();
    assert!(
        limiter.release(grant.token).await.is_err(),
        "a release the log cannot take is not answered as done"
    );
    let err = take_snapshot(&store.inner).expect_err("the log stopped: no snapshot");
    assert_eq!(err.kind(), std::io::ErrorKind::Interrupted, "{err}");
    store.close();
    drop((limiter, store));
    let (again, _) = MemoryStore::open(Durability::new(dir.path())).expect("reopen");
    let status = again
        .limiter(&name)
        .await
        .expect("limiter")
        .status()
        .await
        .expect("status");
    assert_eq!(status.in_use, 1, "the log's holder is held: {status:?}");
    again.close();
}

/// A change made after the log stopped that the snapshot's reads cannot see in a limiter's
/// state: a delete. The snapshot started (its rotation) while the log was open; the log then
/// stopped, and a delete ran, whose caller was told the store is unavailable: the limiter left
/// the map, so the snapshot's reads met no open limiter to find the log closed at, and it was
/// written without the limiter, deleting the log that had it: the reopened store had lost a
/// limiter the log never saw deleted.
#[tokio::test]
async fn no_snapshot_keeps_a_delete_made_after_the_log_stopped() {
    use crate::spec::LimiterSpec;
    use crate::store::Store;
    use crate::types::LimiterName;

    let dir = tempfile::tempdir().expect("tempdir");
    let name = LimiterName::new("a").expect("name");
    let (store, _) = MemoryStore::open(Durability::new(dir.path())).expect("open");
    store
        .put_limiter(&name, LimiterSpec::concurrency(1))
        .await
        .expect("put");
    let persist = store.inner.persist.as_ref().expect("durable");
    // The snapshot's first step, while the log is open.
    let segment = persist.wal.rotate().expect("rotate");
    persist.close_log();
    assert!(
        store.delete_limiter(&name).await.is_err(),
        "a delete the log cannot take is not answered as done"
    );
    let err = super::snapshot_from(&store.inner, persist, segment)
        .expect_err("the log stopped before the reads: no snapshot");
    assert_eq!(err.kind(), std::io::ErrorKind::Interrupted, "{err}");
    store.close();
    drop(store);
    let (again, _) = MemoryStore::open(Durability::new(dir.path())).expect("reopen");
    let names: Vec<String> = again
        .list_limiters()
        .await
        .expect("list")
        .into_iter()
        .map(|s| s.name.as_str().to_owned())
        .collect();
    assert_eq!(names, vec!["a".to_owned()], "the log's limiter is there");
    again.close();
}
