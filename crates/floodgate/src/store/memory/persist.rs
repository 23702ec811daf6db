//! The durable embedded store: opening a data directory, and taking snapshots.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};

use tokio::sync::Notify;

use super::durable::record::{Op, Record};
use super::durable::snapshot::{self, LimiterSnapshot, StoreSnapshot};
use super::durable::wal::{segment_path, Wal};
use super::durable::{clock_mark, recover, Durability, LimiterLog, RecoveryError, RecoveryReport};
use super::limiter::MemoryLimiter;
use super::{timer, Inner, MemoryStore, DEFAULT_MAX_LIMITERS};
use crate::clock::{Clock, WallClock};
use crate::core::SpecState;
use crate::error::StoreError;
use crate::spec::LimiterSpec;
use crate::types::{LimiterName, Timestamp};

/// The store-level part of durability.
pub(super) struct Persist {
    /// The log every limiter appends to.
    wal: Arc<Wal>,
    /// Poked when the log has grown enough for a snapshot.
    due: Arc<Notify>,
    /// The data directory.
    dir: PathBuf,
    /// One snapshot at a time (the threshold's and `snapshot_now`'s).
    snapshotting: std::sync::Mutex<()>,
    /// The data directory's lock file, locked exclusively while the store is open: a second
    /// server on the same directory would interleave two logs.
    lock: std::sync::Mutex<Option<std::fs::File>>,
}

impl Persist {
    /// Logs a limiter's creation (learning until `learning_until`, if given); returns its
    /// handle on the log (its incarnation is the Create record's seq).
    pub(super) fn create(
        &self,
        now: Timestamp,
        name: &LimiterName,
        spec: &LimiterSpec,
        first_token: u64,
        learning_until: Option<Timestamp>,
    ) -> LimiterLog {
        let (seq, due) = self.wal.append(Record {
            seq: 0,
            at: now.0,
            limiter: name.as_str().to_owned(),
            inc: 0,
            op: Op::Create {
                spec: SpecState::from(spec),
                first_token,
                learning_until: learning_until.map(|t| t.0),
            },
        });
        if due {
            self.due.notify_one();
        }
        LimiterLog::new(Arc::clone(&self.wal), name, seq, Arc::clone(&self.due))
    }

    /// Logs a keyed limiter's creation (see [`create`](Self::create)).
    pub(super) fn create_keyed(
        &self,
        now: Timestamp,
        name: &LimiterName,
        spec: &LimiterSpec,
        keyed: &crate::core::keyed::KeyedSpec,
        first_token: u64,
        learning_until: Option<Timestamp>,
    ) -> LimiterLog {
        let (seq, due) = self.wal.append(Record {
            seq: 0,
            at: now.0,
            limiter: name.as_str().to_owned(),
            inc: 0,
            op: Op::CreateKeyed {
                spec: SpecState::from(spec),
                keyed: crate::core::keyed::KeyedSpecState::from(keyed),
                first_token,
                learning_until: learning_until.map(|t| t.0),
            },
        });
        if due {
            self.due.notify_one();
        }
        LimiterLog::new(Arc::clone(&self.wal), name, seq, Arc::clone(&self.due))
    }

    /// Waits until everything logged so far is durable.
    pub(super) async fn commit(&self) -> Result<(), StoreError> {
        self.wal.commit_all().await
    }

    /// Flushes and syncs the log and unlocks the directory; nothing is written after it. The
    /// log is closed first (no operation is logged after that moment); then a snapshot or clock
    /// mark being written is finished (they hold the locks taken here), and later ones find
    /// the log closed or the directory lock gone and write nothing.
    fn close(&self) {
        self.wal.close();
        let _no_snapshot = self
            .snapshotting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let file = self
            .lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(file) = file {
            // Unlocked explicitly, not only by closing: a child process forked by another
            // thread of this process (a `Command`) shares the lock's open file until it execs,
            // and closing our descriptor alone would leave the directory locked by it.
            if let Err(e) = file.unlock() {
                tracing::warn!(error = %e, "cannot unlock the data directory");
            }
        }
    }

    /// Closes the log alone (what `close` does first), for a test that reads the state and
    /// stops the log in one step while it holds every limiter's lock (`close` itself would
    /// wait for a snapshot that waits for those locks).
    #[cfg(test)]
    pub(super) fn close_log(&self) {
        self.wal.close();
    }

    /// Whether [`close`](Self::close) ran.
    fn is_closed(&self) -> bool {
        self.lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }

    /// Writes the clock mark while the store is open (`None` once closed), under the
    /// directory lock's mutex: `close` waits for a mark being written and none comes after it
    /// (the directory may belong to another process by then).
    fn write_clock_mark(&self, now_us: u64) -> Option<std::io::Result<()>> {
        let lock = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        lock.as_ref()?;
        Some(clock_mark::write(&self.dir, now_us))
    }
}

/// What the user's handles of a store share (never the store's own tasks): the last one
/// dropped closes a durable store, so its data directory is unlocked as soon as the last
/// handle is gone, not when a background task happens to let go of the store.
#[derive(Default)]
pub(super) struct Handles {
    /// The durable store's log and lock; `None` for a store in memory only.
    persist: Option<Arc<Persist>>,
}

impl Drop for Handles {
    fn drop(&mut self) {
        if let Some(p) = &self.persist {
            p.close();
        }
    }
}

/// Locks `dir/LOCK` exclusively, or says who has it.
fn lock_dir(dir: &std::path::Path) -> Result<std::fs::File, RecoveryError> {
    std::fs::create_dir_all(dir).map_err(|source| RecoveryError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| RecoveryError::Io {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(RecoveryError::Io {
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "the data directory is in use by another floodgate process",
            ),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(RecoveryError::Io { path, source }),
    }
}

impl Drop for Persist {
    fn drop(&mut self) {
        // Writes and syncs what is pending; lets the snapshot task end.
        self.close();
        self.due.notify_one();
    }
}

impl MemoryStore<WallClock> {
    /// Opens (or creates) a durable embedded store in `durability.dir`: restores every limiter
    /// with its holders, lease deadlines, tokens, rate and adaptive state from the latest
    /// snapshot and the log after it. Leases that ended while the process was down are
    /// reclaimed at once; queued waiters are not restored (their clients retry).
    ///
    /// Call inside a tokio runtime (each limiter has a timer task).
    ///
    /// The directory stays locked (`LOCK`; a second open, here or in another process, fails)
    /// until [`close`](MemoryStore::close) or until the last clone of the returned store is
    /// dropped; either unlocks it before returning, so the directory can be opened again at
    /// once. The store's background tasks (snapshots, clock marks) never keep it locked.
    ///
    /// # Errors
    ///
    /// [`RecoveryError`] naming the file when the directory cannot be read or written, a
    /// snapshot is damaged, or the log is damaged anywhere but its last record (a torn last
    /// record is dropped with a warning and reported in [`RecoveryReport::torn_tail`]).
    pub fn open(durability: Durability) -> Result<(Self, RecoveryReport), RecoveryError> {
        let dir = durability.dir.clone();
        let lock = lock_dir(&dir)?;
        let recovered = recover::recover(&dir)?;
        let replayed = recovered.log_bytes;
        let wal = Wal::open(
            &dir,
            recovered.segment,
            recovered.next_seq,
            durability.fsync,
            durability.snapshot_after_bytes,
            recovered.log_bytes,
        )
        .map_err(|source| RecoveryError::Io {
            path: segment_path(&dir, recovered.segment),
            source,
        })?;
        // Never below a timestamp already recorded, and the downtime counted as what really
        // passed (see `clock_mark`): a wall clock stepped either way across the restart
        // neither ends live leases early nor moves deadlines further away.
        let clock = WallClock::starting_at(Timestamp(clock_mark::resume_at(
            &dir,
            recovered.clock_us,
            WallClock::new().now().0,
        )));
        let due = Arc::new(Notify::new());
        let mut report = recovered.report;
        let mut map = BTreeMap::new();
        for (name, restored) in recovered.limiters {
            let name = LimiterName::new(&name).map_err(|e| {
                RecoveryError::CorruptSnapshot(format!("limiter name {name:?}: {e}"))
            })?;
            let log = LimiterLog::new(Arc::clone(&wal), &name, restored.inc, Arc::clone(&due));
            let mut core = restored.core;
            let mut keyed = restored.keyed;
            let dropped = match &mut keyed {
                Some(layer) => layer.abandon_waiters(&mut core, clock.now()),
                None => core.abandon_waiters(),
            };
            if dropped > 0 {
                log.append(clock.now(), Op::Abandon);
                report.waiters_dropped += dropped;
            }
            let limiter = MemoryLimiter::with_core(name.clone(), core, clock.clone(), Some(log));
            if let Some(layer) = keyed {
                limiter.set_keyed(layer);
            }
            timer::spawn(&limiter);
            map.insert(name, limiter);
        }
        let persist = Arc::new(Persist {
            wal,
            due: Arc::clone(&due),
            dir,
            snapshotting: std::sync::Mutex::new(()),
            lock: std::sync::Mutex::new(Some(lock)),
        });
        let inner = Arc::new(Inner {
            clock: clock.clone(),
            limiters: RwLock::new(map),
            max_limiters: AtomicUsize::new(DEFAULT_MAX_LIMITERS),
            token_floor: AtomicU64::new(recovered.token_floor),
            persist: Some(Arc::clone(&persist)),
        });
        // A log replayed at start that has reached the threshold is snapshotted now, before
        // the first operation: left to the snapshot task, a store closed again before that task
        // ran (a crash loop, a loaded machine) replayed an ever longer log at every start.
        if replayed >= durability.snapshot_after_bytes {
            if let Err(e) = take_snapshot(&inner) {
                tracing::error!(error = %e, "snapshot at start failed; the log keeps growing until one succeeds");
            }
        }
        spawn_snapshots(Arc::downgrade(&inner), due);
        spawn_clock_marks(Arc::downgrade(&persist), clock);
        let handles = Arc::new(Handles {
            persist: Some(persist),
        });
        Ok((MemoryStore { inner, handles }, report))
    }
}

impl<C: Clock> MemoryStore<C> {
    /// Takes a snapshot now and deletes the log it covers (normally taken when the log has
    /// grown by the configured threshold). A no-op for a store that is not durable.
    ///
    /// # Errors
    ///
    /// The I/O error that stopped it; the previous snapshot and log stay in charge.
    pub fn snapshot_now(&self) -> std::io::Result<()> {
        take_snapshot(&self.inner)
    }

    /// Writes and syncs everything logged, and unlocks the data directory: call on shutdown.
    /// Dropping the last clone of the store does the same. A snapshot being taken is finished
    /// first if it was done reading the limiters while the log was open, and given up
    /// otherwise (the last snapshot and the log stay in charge); nothing is written to the directory after it
    /// returns (no snapshot, no clock mark), so another store or process may open it at once.
    /// Every later operation that must be logged fails with `Unavailable`, and
    /// [`snapshot_now`](Self::snapshot_now) with an error of kind `Interrupted`. A no-op for a
    /// store that is not durable.
    pub fn close(&self) {
        if let Some(p) = &self.inner.persist {
            p.close();
        }
    }
}

/// Takes snapshots when the log says one is due, off the async threads.
fn spawn_snapshots<C: Clock>(inner: Weak<Inner<C>>, due: Arc<Notify>) {
    tokio::spawn(async move {
        loop {
            due.notified().await;
            let Some(strong) = inner.upgrade() else {
                return;
            };
            if strong.persist.as_ref().is_none_or(|p| p.is_closed()) {
                return;
            }
            let result = tokio::task::spawn_blocking(move || take_snapshot(&strong)).await;
            match result {
                Ok(Ok(())) => {}
                // Given up because the store was closed meanwhile: nothing failed.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => return,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "snapshot failed; the log keeps growing until one succeeds")
                }
                Err(e) => tracing::error!(error = %e, "snapshot task failed"),
            }
        }
    });
}

/// Writes the clock mark once a second until the store is closed. Holds the store's clock and
/// log, never the store itself, so it cannot keep a dropped store (and its directory lock)
/// alive.
fn spawn_clock_marks<C: Clock>(persist: Weak<Persist>, clock: C) {
    tokio::spawn(async move {
        loop {
            let Some(strong) = persist.upgrade() else {
                return;
            };
            let now = clock.now().0;
            let written = tokio::task::spawn_blocking(move || strong.write_clock_mark(now)).await;
            match written {
                Ok(None) => return,
                Ok(Some(Err(e))) => tracing::warn!(error = %e, "cannot write the clock mark"),
                Ok(Some(Ok(()))) | Err(_) => {}
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
}

/// Rotates the log, writes every limiter's state (limiter by limiter, traffic going on), and
/// deletes the segments and snapshots the new one covers.
fn take_snapshot<C: Clock>(inner: &Inner<C>) -> std::io::Result<()> {
    let Some(persist) = &inner.persist else {
        return Ok(());
    };
    let _one = persist
        .snapshotting
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let result = snapshot_inner(inner, persist);
    if persist.wal.snapshot_done(result.is_ok()) {
        // The log outgrew the threshold while this snapshot was taken (heavy traffic): take
        // the next one now, not at an append that may never come.
        persist.due.notify_one();
    }
    result
}

fn snapshot_inner<C: Clock>(inner: &Inner<C>, persist: &Persist) -> std::io::Result<()> {
    let segment = persist.wal.rotate()?;
    snapshot_from(inner, persist, segment)
}

/// The snapshot's part after the log's rotation to `segment`: reads every limiter, writes the
/// snapshot, deletes what it covers.
fn snapshot_from<C: Clock>(
    inner: &Inner<C>,
    persist: &Persist,
    segment: u64,
) -> std::io::Result<()> {
    let limiters = inner.all();
    let mut out = Vec::with_capacity(limiters.len());
    for limiter in limiters {
        let shared = limiter.shared();
        let state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.closed {
            continue;
        }
        let Some(inc) = state.log.as_ref().map(LimiterLog::inc) else {
            continue;
        };
        // Under the limiter's lock: every record it appended so far is below this seq and
        // reflected in the state taken now. Once the log is closed the state may hold changes
        // it never got (a timer pass after the close): the snapshot is given up, and the last
        // one and the log stay in charge. (Kept, such a change came back after a restart,
        // where the log had none: a snapshot taken across a close granted waiters the log
        // still had queued.)
        let applied = persist.wal.next_seq_while_open()?;
        out.push(LimiterSnapshot {
            name: shared.name.as_str().to_owned(),
            inc,
            applied,
            state: state.core.to_state(),
            keyed: state.keyed.as_ref().map(|k| k.to_state()),
        });
    }
    // Once more after every read: a change after the log stopped that no read above met (a
    // delete, which takes its limiter out of the map: written without it, the snapshot lost a
    // limiter the log never saw deleted) is in no snapshot either.
    let next_seq = persist.wal.next_seq_while_open()?;
    let snap = StoreSnapshot {
        segment,
        next_seq,
        clock_us: inner.clock.now().0,
        token_floor: inner.token_floor.load(Ordering::Relaxed),
        limiters: out,
    };
    let path = snapshot::write(&persist.dir, &snap)?;
    // Only now is the older state redundant.
    for entry in std::fs::read_dir(&persist.dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let number = name
            .strip_prefix("wal-")
            .and_then(|r| r.strip_suffix(".log"))
            .or_else(|| {
                name.strip_prefix("snapshot-")
                    .and_then(|r| r.strip_suffix(".json"))
            })
            .and_then(|n| n.parse::<u64>().ok());
        if number.is_some_and(|n| n < segment) {
            match std::fs::remove_file(entry.path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    tracing::info!(snapshot = %path.display(), limiters = snap.limiters.len(), "snapshot written");
    Ok(())
}

#[cfg(test)]
#[path = "persist_tests.rs"]
mod tests;
