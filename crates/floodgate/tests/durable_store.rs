//! The durable embedded store through its public API: what survives a reopen, what a torn or
//! corrupted log does, idempotent acquires, and the log bounded by snapshots.

use std::path::{Path, PathBuf};
use std::time::Duration;

use floodgate::{
    AcquireOptions, Durability, Floodgate, FsyncPolicy, LimiterBackend, LimiterName, LimiterSpec,
    MemoryStore, RecoveryError, Store, WallClock,
};

const HOUR: Duration = Duration::from_secs(3600);

fn open(dir: &Path) -> (Floodgate<MemoryStore<WallClock>>, MemoryStore<WallClock>) {
    let (store, _) = MemoryStore::open(Durability::new(dir)).expect("open");
    (Floodgate::with_store(store.clone()), store)
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    out.sort();
    out
}

fn spec(n: u32) -> LimiterSpec {
    LimiterSpec::concurrency(n)
        .with_default_lease(HOUR)
        .with_max_wait(HOUR)
}

#[tokio::test]
async fn holders_tokens_and_limiters_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (gate, store) = open(dir.path());
    gate.define("jobs", spec(3)).await.expect("define");
    let jobs = gate.limiter("jobs").await.expect("limiter");
    let a = jobs
        .acquire(AcquireOptions::new())
        .await
        .expect("a")
        .detach();
    let b = jobs
        .acquire(AcquireOptions::new())
        .await
        .expect("b")
        .detach();
    jobs.backend().release(a.token).await.expect("release");
    let short = jobs
        .acquire(AcquireOptions::new().lease(Duration::from_millis(100)))
        .await
        .expect("short")
        .detach();
    store.close();
    drop((gate, jobs, store));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (gate, _store) = open(dir.path());
    let jobs = gate
        .limiter("jobs")
        .await
        .expect("created over the API, still there");
    let status = jobs.status().await.expect("status");
    // b is held; a was released; the short lease ended while the store was closed and is
    // reclaimed at once.
    assert_eq!(status.in_use, 1, "{status:?}");
    assert_eq!(status.counters.released, 1);
    assert_eq!(status.counters.expired, 1);
    jobs.backend()
        .extend(b.token, HOUR, None)
        .await
        .expect("a permit held before the restart extends after it");
    assert!(jobs
        .backend()
        .extend(short.token, HOUR, None)
        .await
        .is_err());
    let c = jobs
        .acquire(AcquireOptions::new())
        .await
        .expect("c")
        .detach();
    assert!(
        c.token > short.token && short.token > b.token,
        "tokens keep increasing"
    );
}

#[tokio::test]
async fn a_recreated_limiter_hands_out_larger_tokens_after_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (gate, store) = open(dir.path());
    gate.define("x", spec(1)).await.expect("define");
    let x = gate.limiter("x").await.expect("limiter");
    // Grant faster than one per microsecond of the token seed, so the floor matters.
    let mut last = 0;
    for _ in 0..200 {
        let p = x.try_acquire().await.expect("grant");
        last = p.fencing_token().0;
    }
    assert!(gate.delete("x").await.expect("delete"));
    store.close();
    drop((gate, x, store));
    let (gate, _store) = open(dir.path());
    gate.define("x", spec(1)).await.expect("re-create");
    let x = gate.limiter("x").await.expect("limiter");
    let p = x.try_acquire().await.expect("grant");
    assert!(p.fencing_token().0 > last);
}

/// A crash mid-write leaves a prefix of the last record: dropped with a report, the rest kept.
#[tokio::test]
async fn a_torn_last_record_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (gate, store) = open(dir.path());
    gate.define("t", spec(5)).await.expect("define");
    let t = gate.limiter("t").await.expect("limiter");
    for _ in 0..3 {
        t.acquire(AcquireOptions::new())
            .await
            .expect("grant")
            .detach();
    }
    store.close();
    drop((gate, t, store));
    let last = segments(dir.path())
        .into_iter()
        .rfind(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
        .expect("a segment with records");
    let len = std::fs::metadata(&last).expect("meta").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .expect("open segment");
    file.set_len(len - 5).expect("cut");
    drop(file);

    let (store, report) = MemoryStore::open(Durability::new(dir.path())).expect("reopens");
    let (path, offset) = report.torn_tail.expect("the torn tail is reported");
    assert_eq!(path, last);
    assert!(offset < len - 5);
    let t = store
        .limiter(&LimiterName::new("t").expect("name"))
        .await
        .expect("limiter");
    assert_eq!(
        t.status().await.expect("status").in_use,
        2,
        "the cut acquire is gone"
    );
}

/// Damage anywhere but the last record: refuse to start, naming the file and offset.
#[tokio::test]
async fn a_corrupted_record_in_the_middle_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (gate, store) = open(dir.path());
    gate.define("c", spec(5)).await.expect("define");
    let c = gate.limiter("c").await.expect("limiter");
    for _ in 0..3 {
        c.acquire(AcquireOptions::new())
            .await
            .expect("grant")
            .detach();
    }
    store.close();
    drop((gate, c, store));
    let first = segments(dir.path())
        .into_iter()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
        .expect("a segment");
    let mut data = std::fs::read(&first).expect("read");
    data[20] ^= 0x01; // inside the first record's payload
    std::fs::write(&first, data).expect("write");

    let err = MemoryStore::open(Durability::new(dir.path())).expect_err("refuses");
    match &err {
        RecoveryError::CorruptLog { path, offset, .. } => {
            assert_eq!(path, &first);
            assert_eq!(*offset, 0);
        }
        other => panic!("expected CorruptLog, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(&first.display().to_string()), "{message}");
    assert!(message.contains("offset 0"), "{message}");
}

#[tokio::test]
async fn a_corrupted_snapshot_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (gate, store) = open(dir.path());
    gate.define("s", spec(5)).await.expect("define");
    store.snapshot_now().expect("snapshot");
    store.close();
    drop((gate, store));
    let snap = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "json") && !p.ends_with("clock.json"))
        .expect("a snapshot");
    let mut data = std::fs::read(&snap).expect("read");
    let n = data.len();
    data[n - 3] ^= 0x01;
    std::fs::write(&snap, data).expect("write");
    let err = MemoryStore::open(Durability::new(dir.path())).expect_err("refuses");
    assert!(err.to_string().contains("snapshot-"), "{err}");
}

#[tokio::test]
async fn one_process_per_data_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_gate, _store) = open(dir.path());
    let err = MemoryStore::open(Durability::new(dir.path())).expect_err("locked");
    assert!(err.to_string().contains("in use"), "{err}");
}

/// Snapshots bound the log: whatever the number of operations, the directory holds about one
/// threshold of log plus one snapshot, and reopening restores the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_bound_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let threshold = 64 * 1024;
    let durability = Durability::new(dir.path())
        .fsync(FsyncPolicy::No)
        .snapshot_after_bytes(threshold);
    let (store, _) = MemoryStore::open(durability.clone()).expect("open");
    let gate = Floodgate::with_store(store.clone());
    gate.define("b", spec(4)).await.expect("define");
    let b = gate.limiter("b").await.expect("limiter");
    let kept = b
        .acquire(AcquireOptions::new())
        .await
        .expect("kept")
        .detach();
    for _ in 0..20_000 {
        let p = b.acquire(AcquireOptions::new()).await.expect("grant");
        p.release().await.expect("release");
    }
    // Let a snapshot that is due finish (a liveness bound only: up to 30 s on a loaded
    // machine, where 2 s was seen to be too short).
    for _ in 0..1_500 {
        let log: u64 = segments(dir.path())
            .iter()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .sum();
        if log < 3 * threshold {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log: u64 = segments(dir.path())
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    assert!(
        log < 3 * threshold,
        "log is {log} bytes after 40,000 records"
    );
    store.close();
    drop((gate, b, store));
    let (store, report) = MemoryStore::open(durability).expect("reopen");
    assert!(report.snapshot.is_some());
    let b = store
        .limiter(&LimiterName::new("b").expect("name"))
        .await
        .expect("limiter");
    let status = b.status().await.expect("status");
    assert_eq!(status.in_use, 1);
    assert_eq!(status.counters.released, 20_000);
    b.extend(kept.token, HOUR, None).await.expect("still held");
}

/// `fsync = always`: concurrent operations share syncs, and every one is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_answers_every_concurrent_operation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) =
        MemoryStore::open(Durability::new(dir.path()).fsync(FsyncPolicy::Always)).expect("open");
    let gate = Floodgate::with_store(store.clone());
    gate.define("g", spec(8)).await.expect("define");
    let g = gate.limiter("g").await.expect("limiter");
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let g = g.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                let p = g.acquire(AcquireOptions::new()).await.expect("grant");
                p.release().await.expect("release");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let status = g.status().await.expect("status");
    assert_eq!(status.counters.released, 640);
    assert_eq!(status.in_use, 0);
}

/// Polls `fut` once, with this task's waker: its output if that poll finished it.
async fn poll_once<F: std::future::Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut *fut).poll(cx) {
            std::task::Poll::Ready(out) => Some(out),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

#[tokio::test]
async fn a_repeated_request_id_gets_the_same_grant_or_joins_the_wait() {
    let gate = Floodgate::in_memory();
    gate.define("i", spec(1)).await.expect("define");
    let i = gate.limiter("i").await.expect("limiter");
    let first = i
        .acquire(AcquireOptions::new().request_id("job-1"))
        .await
        .expect("grant")
        .detach();
    let again = i
        .acquire(AcquireOptions::new().request_id("job-1"))
        .await
        .expect("same grant")
        .detach();
    assert_eq!(first.token, again.token);
    assert_eq!(i.status().await.expect("status").in_use, 1);

    // A queued idempotent acquire whose caller went away stays queued; its retry joins it.
    // Each acquire is polled here, once, not spawned: the embedded store queues (or joins) an
    // acquire in its first poll, so each check below reads the store after the acquire it
    // is about. (A spawned retry checked after one `yield_now` was checked whenever the
    // scheduler had run it, or not: a retry not yet in the store also left one waiter.)
    let mut dropped = Box::pin(i.acquire(AcquireOptions::new().request_id("job-2")));
    assert!(poll_once(&mut dropped).await.is_none(), "queued");
    assert_eq!(i.status().await.expect("status").waiting, 1, "queued");
    drop(dropped);
    assert_eq!(i.status().await.expect("status").waiting, 1, "still queued");
    let mut retry = Box::pin(i.acquire(AcquireOptions::new().request_id("job-2")));
    assert!(poll_once(&mut retry).await.is_none(), "waits");
    assert_eq!(
        i.status().await.expect("status").waiting,
        1,
        "joined, not queued twice"
    );
    i.backend().release(first.token).await.expect("release");
    let granted = retry.await.expect("granted to the retry");
    let status = i.status().await.expect("status");
    assert_eq!(status.in_use, 1);
    // Joined: one grant for the wait. A second wait would have granted the abandoned one
    // first (and given it straight back): three grants and two releases.
    assert_eq!(
        (status.counters.granted, status.counters.released),
        (2, 1),
        "{status:?}"
    );
    drop(granted);
}

/// The gradient controller's state (here, the ceiling where throttling began) is rebuilt by
/// replaying the log: after a reopen, successes bring the limit back to the ceiling and no
/// further, where a controller that forgot it would slow-start to the maximum.
#[tokio::test]
async fn the_adaptive_ceiling_survives_a_reopen() {
    use floodgate::{AdaptiveSpec, Feedback};
    let dir = tempfile::tempdir().expect("tempdir");
    let (gate, store) = open(dir.path());
    let mut adaptive = AdaptiveSpec::gradient(1, 100);
    adaptive.probe_rounds = 10_000;
    gate.define("g", spec(20).with_adaptive(adaptive))
        .await
        .expect("define");
    let g = gate.limiter("g").await.expect("limiter");
    for _ in 0..20 {
        g.acquire(AcquireOptions::new())
            .await
            .expect("grant")
            .detach();
    }
    let ms = Some(Duration::from_millis(1));
    let lowered = g
        .backend()
        .feedback_with_latency(Feedback::Throttled, ms)
        .await
        .expect("feedback");
    assert_eq!(lowered, Some(18), "x0.9 on a throttle; the ceiling is 19");
    store.close();
    drop((gate, g, store));
    let (gate, store) = open(dir.path());
    let g = gate.limiter("g").await.expect("limiter");
    let mut limit = None;
    for _ in 0..500 {
        limit = g
            .backend()
            .feedback_with_latency(Feedback::Ok, ms)
            .await
            .expect("feedback");
    }
    assert_eq!(
        limit,
        Some(19),
        "back on the remembered ceiling, not past it"
    );
    store.close();
}
