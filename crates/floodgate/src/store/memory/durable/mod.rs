//! Durability for the embedded store: a write-ahead log of state-machine operations plus
//! periodic snapshots that bound it (the Redis AOF-rewrite / etcd WAL+snapshot pattern).
//!
//! - [`record`]: what is logged (operations with their `now`) and how frames are checksummed.
//! - [`wal`]: the writer: appends under the limiter's lock, group commit, fsync policies.
//! - [`snapshot`]: the snapshot file, written atomically.
//! - [`recover`]: start-up: the latest snapshot, then the log after it, replayed through the
//!   same pure state machine; a torn last record is dropped with a warning, damage anywhere
//!   else refuses to start with the file and offset.
//!
//! `docs/durability.md` is the user's view: policies, guarantees per fault, and costs.

pub(crate) mod clock_mark;
#[cfg(test)]
mod delete_floor_tests;
pub(crate) mod record;
pub(crate) mod recover;
#[cfg(test)]
mod restart_tests;
pub(crate) mod snapshot;
#[cfg(test)]
mod tests;
pub(crate) mod wal;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use tokio::sync::Notify;

use self::record::{Op, Record};
use self::wal::Wal;
use crate::types::{LimiterName, Timestamp};

/// When log writes reach the disk, with Redis's `appendfsync` meanings. In every policy a
/// record is written to the operating system before its answer is sent, so a crash of the
/// process alone loses nothing; the policy decides what a crash of the machine can lose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FsyncPolicy {
    /// Sync before answering (concurrent answers share one sync): a power loss loses nothing
    /// that was answered.
    Always,
    /// Sync once a second: a power loss loses at most about the last second.
    #[default]
    EverySec,
    /// Never sync; the operating system writes when it likes (typically within 30 s).
    No,
}

impl FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "everysec" => Ok(FsyncPolicy::EverySec),
            "no" => Ok(FsyncPolicy::No),
            other => Err(format!(
                "fsync policy {other:?}: use always, everysec or no"
            )),
        }
    }
}

impl std::fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FsyncPolicy::Always => "always",
            FsyncPolicy::EverySec => "everysec",
            FsyncPolicy::No => "no",
        })
    }
}

/// Default log growth after which a snapshot is taken (and the log before it deleted).
pub const DEFAULT_SNAPSHOT_AFTER_BYTES: u64 = 64 * 1024 * 1024;

/// Where and how the embedded store keeps its state on disk.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Durability {
    /// The data directory (created if missing). One server per directory.
    pub dir: PathBuf,
    /// When log writes reach the disk.
    pub fsync: FsyncPolicy,
    /// Log bytes written since the last snapshot that trigger the next one: bounds the log
    /// (and so recovery time) to about this plus one snapshot.
    pub snapshot_after_bytes: u64,
}

impl Durability {
    /// `dir` with the default policy (`everysec`) and snapshot threshold (64 MiB).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Durability {
            dir: dir.into(),
            fsync: FsyncPolicy::default(),
            snapshot_after_bytes: DEFAULT_SNAPSHOT_AFTER_BYTES,
        }
    }

    /// Sets the fsync policy.
    pub fn fsync(mut self, policy: FsyncPolicy) -> Self {
        self.fsync = policy;
        self
    }

    /// Sets the snapshot threshold.
    pub fn snapshot_after_bytes(mut self, bytes: u64) -> Self {
        self.snapshot_after_bytes = bytes.max(1);
        self
    }
}

/// Why a data directory could not be opened. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoveryError {
    /// A file could not be read, written or listed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A log segment is damaged somewhere other than its last record: refusing to start
    /// rather than silently losing what follows.
    #[error("the write-ahead log {path} is corrupted at byte offset {offset}: {reason}; refusing to start (move the file away to start without it, losing its records)")]
    CorruptLog {
        /// The segment.
        path: PathBuf,
        /// Where the damage starts.
        offset: u64,
        /// What was found there.
        reason: String,
    },
    /// A snapshot is damaged.
    #[error("snapshot {0}; refusing to start")]
    CorruptSnapshot(String),
}

/// What recovery found, for the start-up log line and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// The snapshot loaded, if any.
    pub snapshot: Option<PathBuf>,
    /// Log records replayed after it.
    pub records: u64,
    /// Limiters restored.
    pub limiters: usize,
    /// Grants restored (their leases still running, or reclaimed at once if they ended while
    /// the server was down).
    pub holders: usize,
    /// Queued waiters dropped (their connections are gone; clients retry).
    pub waiters_dropped: usize,
    /// A torn last record that was cut off: the segment and offset.
    pub torn_tail: Option<(PathBuf, u64)>,
}

/// A limiter's handle on the log: appends its records, and asks for a snapshot when due.
#[derive(Clone)]
pub(crate) struct LimiterLog {
    /// The store's log.
    pub(crate) wal: Arc<Wal>,
    /// The limiter's name, as records carry it.
    name: Arc<str>,
    /// Its incarnation.
    inc: u64,
    /// Pokes the store's snapshot task.
    snapshot_due: Arc<Notify>,
}

impl LimiterLog {
    pub(crate) fn new(wal: Arc<Wal>, name: &LimiterName, inc: u64, due: Arc<Notify>) -> Self {
        LimiterLog {
            wal,
            name: Arc::from(name.as_str()),
            inc,
            snapshot_due: due,
        }
    }

    /// The incarnation (the seq of the limiter's Create record).
    pub(crate) fn inc(&self) -> u64 {
        self.inc
    }

    /// Appends one record; returns its seq.
    pub(crate) fn append(&self, now: Timestamp, op: Op) -> u64 {
        let (seq, due) = self.wal.append(Record {
            seq: 0,
            at: now.0,
            limiter: self.name.to_string(),
            inc: self.inc,
            op,
        });
        if due {
            self.snapshot_due.notify_one();
        }
        seq
    }
}
