//! Snapshot files: every limiter's state at one point of the log, so the log can be cut.
//!
//! `snapshot-K.json` covers every record in segments below K, and, per limiter, the records of
//! later segments below its `applied` seq (a snapshot is taken limiter by limiter while traffic
//! goes on, without stopping the store). Recovery loads it, then replays the segments from K
//! on, skipping a limiter's records below its `applied`.
//!
//! File: one header line `FLOODGATE-SNAPSHOT 1 <crc32 of the body, hex> <body length>`, then
//! the body (JSON). Written to a temporary file, synced, renamed, and the directory synced, so
//! a crash mid-snapshot leaves the previous snapshot and its segments in charge.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::CoreState;

const MAGIC: &str = "FLOODGATE-SNAPSHOT 1";

/// The name of snapshot `k`.
pub(crate) fn snapshot_path(dir: &Path, k: u64) -> PathBuf {
    dir.join(format!("snapshot-{k:010}.json"))
}

/// The whole store at one point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoreSnapshot {
    /// The first segment not wholly covered (the one started for this snapshot).
    pub(crate) segment: u64,
    /// The seq the next record gets, at the end of the snapshot (a floor for seqs after it).
    pub(crate) next_seq: u64,
    /// The latest store-clock time the snapshot saw: the restarted clock starts above it.
    pub(crate) clock_us: u64,
    /// Deleted limiters' highest next token: a re-created one starts above it.
    pub(crate) token_floor: u64,
    /// Every live limiter.
    pub(crate) limiters: Vec<LimiterSnapshot>,
}

/// One limiter in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LimiterSnapshot {
    /// Its name.
    pub(crate) name: String,
    /// Its incarnation (the seq of its Create record).
    pub(crate) inc: u64,
    /// Its records below this seq are in `state`.
    pub(crate) applied: u64,
    /// The state machine's state.
    pub(crate) state: CoreState,
    /// A keyed limiter's key layer (its `state` is the total's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) keyed: Option<crate::core::keyed::KeyLayerState>,
}

/// Writes snapshot `snap.segment` durably.
pub(crate) fn write(dir: &Path, snap: &StoreSnapshot) -> std::io::Result<PathBuf> {
    let body = serde_json::to_vec(snap).map_err(std::io::Error::other)?;
    let crc = crc32fast::hash(&body);
    let path = snapshot_path(dir, snap.segment);
    let tmp = path.with_extension("json.tmp");
    {
        let mut file = File::create(&tmp)?;
        writeln!(file, "{MAGIC} {crc:08x} {}", body.len())?;
        file.write_all(&body)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    sync_dir(dir)?;
    Ok(path)
}

/// Makes a rename or a new file in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads and checks a snapshot file. A bad one is an error naming the file: a snapshot is
/// renamed into place only once complete, so damage is corruption, never a torn write.
pub(crate) fn read(path: &Path) -> Result<StoreSnapshot, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = |what: &str| format!("{}: {what}", path.display());
    let newline = data
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| bad("no header line"))?;
    let header = std::str::from_utf8(&data[..newline]).map_err(|_| bad("header not text"))?;
    let mut parts = header.rsplitn(3, ' ');
    let (Some(len), Some(crc), Some(magic)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("malformed header"));
    };
    if magic != MAGIC {
        return Err(bad(&format!("not a version-1 snapshot ({magic:?})")));
    }
    let len: usize = len.parse().map_err(|_| bad("bad length in header"))?;
    let crc = u32::from_str_radix(crc, 16).map_err(|_| bad("bad checksum in header"))?;
    let body = &data[newline + 1..];
    if body.len() != len {
        return Err(bad(&format!(
            "body is {} bytes, the header says {len}",
            body.len()
        )));
    }
    if crc32fast::hash(body) != crc {
        return Err(bad("checksum mismatch (the file is corrupted)"));
    }
    serde_json::from_slice(body).map_err(|e| bad(&format!("does not parse: {e}")))
}
