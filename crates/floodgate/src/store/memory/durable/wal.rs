//! The write-ahead log writer: appends, group commit, fsync policies, segment rotation.
//!
//! Operations append their record under their limiter's lock (so each limiter's records are in
//! the order its operations ran), into an in-memory buffer. Before an answer is sent, the
//! caller *commits* its record: the buffer is written to the file (one `write` for every record
//! pending, whoever's they are), so a crash of the process loses nothing that was answered.
//! Under `fsync = always` the commit also waits until a sync thread has `fdatasync`ed past the
//! record; concurrent commits share one sync (group commit). Under `everysec` the sync thread
//! syncs once a second; under `no` it never syncs (the OS decides), as with Redis's
//! `appendfsync`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use super::record::{encode, Record};
use super::FsyncPolicy;
use crate::error::StoreError;

/// The error of a snapshot given up because the store was closed (`ErrorKind::Interrupted`:
/// not a failure of the disk, and not logged as one).
pub(crate) fn closed_during_snapshot() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Interrupted,
        "the store was closed: no snapshot is taken after its log stopped",
    )
}

/// The name of log segment `n`.
pub(crate) fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("wal-{n:010}.log"))
}

pub(crate) struct Wal {
    /// Where the segments and snapshots live.
    dir: PathBuf,
    /// When data reaches the disk.
    policy: FsyncPolicy,
    /// Everything that changes with appends, behind one short-held lock.
    state: Mutex<WalState>,
    /// Wakes the sync thread (data to sync under `always`, or shutdown).
    wake_sync: Condvar,
    /// Every record below this seq is on disk; `always` commits wait for it to pass theirs.
    synced: tokio::sync::watch::Sender<u64>,
    /// Log bytes since the last snapshot above which a snapshot is due.
    pub(crate) snapshot_after_bytes: u64,
}

struct WalState {
    /// The segment being appended to. An `Arc` so the sync thread can sync it unlocked.
    file: Arc<File>,
    /// Its number.
    segment: u64,
    /// Encoded records not yet written.
    buf: Vec<u8>,
    /// The seq the next record gets.
    next_seq: u64,
    /// Every record below this seq is written to the file.
    written: u64,
    /// Bytes appended since the last snapshot began, for the snapshot policy.
    bytes_since_snapshot: u64,
    /// Set by the first failed write or sync: nothing is answered as durable after it.
    failed: Option<String>,
    /// A snapshot is being taken (so only one at a time).
    snapshotting: bool,
    /// Tells the sync thread to finish.
    closed: bool,
}

impl Wal {
    /// Opens segment `segment` for appending (created if missing), with `next_seq` the seq of
    /// the next record and `logged` the bytes of log since the last snapshot (replayed by
    /// recovery), and starts the sync thread.
    pub(crate) fn open(
        dir: &Path,
        segment: u64,
        next_seq: u64,
        policy: FsyncPolicy,
        snapshot_after_bytes: u64,
        logged: u64,
    ) -> std::io::Result<Arc<Wal>> {
        let file = open_segment(dir, segment)?;
        // The new segment's name, durable before any record in it is answered as durable.
        super::snapshot::sync_dir(dir)?;
        let (synced, _) = tokio::sync::watch::channel(next_seq);
        let wal = Arc::new(Wal {
            dir: dir.to_owned(),
            policy,
            state: Mutex::new(WalState {
                file: Arc::new(file),
                segment,
                buf: Vec::with_capacity(64 * 1024),
                next_seq,
                written: next_seq,
                bytes_since_snapshot: logged,
                failed: None,
                snapshotting: false,
                closed: false,
            }),
            wake_sync: Condvar::new(),
            synced,
            snapshot_after_bytes,
        });
        let weak = Arc::downgrade(&wal);
        std::thread::Builder::new()
            .name("floodgate-wal-sync".into())
            .spawn(move || sync_loop(&weak))?;
        Ok(wal)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WalState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a record (its `seq` is filled in) and returns its seq, and whether a snapshot is
    /// now due.
    pub(crate) fn append(&self, mut record: Record) -> (u64, bool) {
        let mut st = self.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        record.seq = seq;
        let before = st.buf.len();
        encode(&record, &mut st.buf);
        st.bytes_since_snapshot += (st.buf.len() - before) as u64;
        let due = !st.snapshotting && st.bytes_since_snapshot >= self.snapshot_after_bytes;
        if due {
            st.snapshotting = true;
        }
        (seq, due)
    }

    /// The seq the next record will get (every record appended so far is below it) while the
    /// log is open; once it is closed, the error a snapshot gives up with: a limiter's state read after the close may hold changes the log
    /// never got (a timer pass), which no snapshot may keep.
    pub(crate) fn next_seq_while_open(&self) -> std::io::Result<u64> {
        let st = self.lock();
        if st.closed {
            return Err(closed_during_snapshot());
        }
        Ok(st.next_seq)
    }

    /// Writes every pending record to the file. Under `always`, also waits until the disk has
    /// it. Errors once any write or sync has failed.
    pub(crate) async fn commit(&self, seq: u64) -> Result<(), StoreError> {
        self.write_through(seq)?;
        if self.policy != FsyncPolicy::Always {
            return Ok(());
        }
        self.wake_sync.notify_one();
        let mut rx = self.synced.subscribe();
        // A failed sync sets `failed` and then moves `synced` to the end, so this returns.
        let synced = rx.wait_for(|synced| *synced > seq).await.is_ok();
        if !synced || self.lock().failed.is_some() {
            return Err(self.failure());
        }
        Ok(())
    }

    /// Commits everything appended so far (for a waiter whose grant was decided by someone
    /// else's operation: that record is appended before the waiter is woken).
    pub(crate) async fn commit_all(&self) -> Result<(), StoreError> {
        // One lock: write out whatever is pending (ours among it).
        let last = {
            let mut st = self.lock();
            if st.failed.is_none() && !st.buf.is_empty() {
                flush(&mut st);
            }
            if st.failed.is_some() {
                drop(st);
                return Err(self.failure());
            }
            st.next_seq.saturating_sub(1)
        };
        if self.policy != FsyncPolicy::Always {
            return Ok(());
        }
        self.commit(last).await
    }

    fn failure(&self) -> StoreError {
        let st = self.lock();
        StoreError::Unavailable(
            format!(
                "the write-ahead log in {} failed: {}",
                self.dir.display(),
                st.failed.as_deref().unwrap_or("it is closed")
            )
            .into(),
        )
    }

    /// Makes sure records below `seq + 1` are written to the file.
    fn write_through(&self, seq: u64) -> Result<(), StoreError> {
        let mut st = self.lock();
        if st.failed.is_some() {
            drop(st);
            return Err(self.failure());
        }
        if st.written > seq {
            return Ok(());
        }
        flush(&mut st);
        if st.failed.is_some() {
            drop(st);
            return Err(self.failure());
        }
        Ok(())
    }

    /// Starts a new segment for a snapshot: flushes and syncs the current one, then appends
    /// go to segment + 1, whose number is returned.
    pub(crate) fn rotate(&self) -> std::io::Result<u64> {
        let mut st = self.lock();
        if st.closed {
            return Err(closed_during_snapshot());
        }
        flush(&mut st);
        if let Some(e) = &st.failed {
            return Err(std::io::Error::other(e.clone()));
        }
        st.file.sync_data()?;
        let next = st.segment + 1;
        let file = open_segment(&self.dir, next)?;
        super::snapshot::sync_dir(&self.dir)?;
        st.file = Arc::new(file);
        st.segment = next;
        st.bytes_since_snapshot = 0;
        Ok(next)
    }

    /// The snapshot finished (`succeeded`) or failed: another may start when due. Answers
    /// whether one is due already, because the log grew past the threshold while this one was
    /// taken; it then counts as started and the caller must have it taken, since the next
    /// append (which would otherwise notice) may never come. A failed snapshot answers false,
    /// so a failing disk is retried at the next append, not in a loop.
    pub(crate) fn snapshot_done(&self, succeeded: bool) -> bool {
        let mut st = self.lock();
        let again = succeeded
            && !st.closed
            && st.failed.is_none()
            && st.bytes_since_snapshot >= self.snapshot_after_bytes;
        st.snapshotting = again;
        again
    }

    /// Writes and syncs what is pending, and stops the sync thread. Nothing is written after
    /// it: further commits fail.
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        flush(&mut st);
        if st.failed.is_none() {
            if let Err(e) = st.file.sync_data() {
                st.failed = Some(e.to_string());
            }
        }
        st.closed = true;
        if st.failed.is_none() {
            st.failed = Some("the store was closed".to_owned());
        }
        let written = st.written;
        drop(st);
        self.synced.send_replace(written);
        self.wake_sync.notify_all();
    }
}

fn open_segment(dir: &Path, n: u64) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(segment_path(dir, n))
}

/// Writes the buffer to the file; a failure poisons the log.
fn flush(st: &mut WalState) {
    if st.buf.is_empty() || st.failed.is_some() {
        st.written = st.next_seq;
        return;
    }
    let file = Arc::clone(&st.file);
    match (&*file).write_all(&st.buf) {
        Ok(()) => {
            st.buf.clear();
            st.written = st.next_seq;
        }
        Err(e) => {
            tracing::error!(error = %e, "write-ahead log write failed; answering 503 from now on");
            st.failed = Some(e.to_string());
        }
    }
}

/// The sync thread: under `always`, syncs whenever written data is not yet synced (one sync
/// for every commit waiting); under `everysec`, once a second; under `no`, only writes out
/// records nobody committed (background releases) once a second.
fn sync_loop(wal: &std::sync::Weak<Wal>) {
    loop {
        let Some(wal) = wal.upgrade() else { return };
        let (file, target) = {
            let mut st = wal.lock();
            if st.closed {
                return;
            }
            let synced = *wal.synced.borrow();
            let idle = st.written <= synced && st.buf.is_empty();
            if wal.policy == FsyncPolicy::Always && idle {
                let (guard, _) = wal
                    .wake_sync
                    .wait_timeout(st, Duration::from_millis(200))
                    .unwrap_or_else(PoisonError::into_inner);
                st = guard;
            } else if wal.policy != FsyncPolicy::Always {
                let (guard, _) = wal
                    .wake_sync
                    .wait_timeout(st, Duration::from_secs(1))
                    .unwrap_or_else(PoisonError::into_inner);
                st = guard;
            }
            if st.closed {
                return;
            }
            flush(&mut st);
            if st.failed.is_some() {
                drop(st);
                wal.synced.send_replace(u64::MAX);
                return;
            }
            (Arc::clone(&st.file), st.written)
        };
        if target <= *wal.synced.borrow() || wal.policy == FsyncPolicy::No {
            if wal.policy == FsyncPolicy::No {
                wal.synced.send_replace(target);
            }
            continue;
        }
        match file.sync_data() {
            Ok(()) => {
                wal.synced.send_if_modified(|s| {
                    let moved = target > *s;
                    *s = (*s).max(target);
                    moved
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "write-ahead log fsync failed; answering 503 from now on");
                wal.lock().failed = Some(e.to_string());
                wal.synced.send_replace(u64::MAX);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::record::{Op, Record};
    use super::super::FsyncPolicy;
    use super::Wal;

    fn release(wal: &Wal) -> bool {
        let record = Record {
            seq: 0,
            at: 1,
            limiter: "l".to_owned(),
            inc: 1,
            op: Op::Release { token: 7 },
        };
        wal.append(record).1
    }

    /// The log outgrows the threshold while a snapshot is being taken (appends then never ask
    /// for one): the snapshot's end asks for the next, as nothing else would if traffic stops.
    /// A failed snapshot does not (the next append retries; no loop on a failing disk).
    #[test]
    fn a_snapshot_outgrown_while_taken_asks_for_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = Wal::open(dir.path(), 1, 1, FsyncPolicy::No, 64, 0).expect("open");
        while !release(&wal) {}
        wal.rotate().expect("rotate");
        for _ in 0..100 {
            assert!(!release(&wal), "one snapshot at a time");
        }
        assert!(
            !wal.snapshot_done(false),
            "a failed snapshot is not retried at once"
        );
        assert!(release(&wal), "the next append asks again");
        wal.rotate().expect("rotate");
        for _ in 0..100 {
            assert!(!release(&wal));
        }
        assert!(
            wal.snapshot_done(true),
            "outgrown while taken: the next one is due now"
        );
        assert!(!release(&wal), "and counts as started");
        wal.rotate().expect("rotate");
        assert!(!wal.snapshot_done(true), "not outgrown: none due");
        wal.close();
    }
}
