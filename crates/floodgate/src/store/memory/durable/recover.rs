//! Start-up: rebuild every limiter from the latest snapshot and the log after it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::record::{decode, Damage, Frame, Op, Record};
use super::snapshot::{self, StoreSnapshot};
use super::{RecoveryError, RecoveryReport};
use crate::core::LimiterCore;
use crate::spec::LimiterSpec;
use crate::types::Timestamp;

/// One recovered limiter.
pub(crate) struct Restored {
    /// Its incarnation.
    pub(crate) inc: u64,
    /// Its records below this seq are already applied.
    pub(crate) applied: u64,
    /// Its state.
    pub(crate) core: LimiterCore,
    /// Its key layer, for a keyed limiter.
    pub(crate) keyed: Option<crate::core::keyed::KeyLayer>,
}

/// Everything recovery rebuilt.
pub(crate) struct Recovered {
    /// The limiters by name.
    pub(crate) limiters: BTreeMap<String, Restored>,
    /// Deleted limiters' highest next token.
    pub(crate) token_floor: u64,
    /// The seq the next record gets.
    pub(crate) next_seq: u64,
    /// The latest store-clock time seen: the new clock starts above it.
    pub(crate) clock_us: u64,
    /// The segment to append to next (a fresh one).
    pub(crate) segment: u64,
    /// Bytes of log replayed (the segments after the snapshot): they count toward the next
    /// snapshot, or a server restarted more often than the log reaches the threshold would
    /// keep every segment (and replay them all) forever.
    pub(crate) log_bytes: u64,
    /// What was found.
    pub(crate) report: RecoveryReport,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecoveryError + '_ {
    move |source| RecoveryError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The numbered files of one kind (`wal-N.log`, `snapshot-N.json`) in `dir`, by number.
fn numbered(dir: &Path, prefix: &str, suffix: &str) -> Result<Vec<(u64, PathBuf)>, RecoveryError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(suffix))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads `dir` (created if missing) and rebuilds the store's state.
pub(crate) fn recover(dir: &Path) -> Result<Recovered, RecoveryError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // A snapshot that was being written when the process died is incomplete: never used.
    for (_, tmp) in numbered(dir, "snapshot-", ".json.tmp")? {
        let _ = std::fs::remove_file(tmp);
    }
    let snapshots = numbered(dir, "snapshot-", ".json")?;
    let mut report = RecoveryReport::default();
    let mut limiters = BTreeMap::new();
    let (mut token_floor, mut next_seq, mut clock_us, first_segment) = (0, 0, 0, 0);
    let mut first_segment = first_segment;
    if let Some((k, path)) = snapshots.last() {
        let snap: StoreSnapshot = snapshot::read(path).map_err(RecoveryError::CorruptSnapshot)?;
        for l in snap.limiters {
            let core = LimiterCore::from_state(&l.state).map_err(|e| {
                RecoveryError::CorruptSnapshot(format!(
                    "{}: limiter {:?}: {e}",
                    path.display(),
                    l.name
                ))
            })?;
            let keyed = match &l.keyed {
                Some(k) => Some(crate::core::keyed::KeyLayer::from_state(k).map_err(|e| {
                    RecoveryError::CorruptSnapshot(format!(
                        "{}: keyed limiter {:?}: {e}",
                        path.display(),
                        l.name
                    ))
                })?),
                None => None,
            };
            limiters.insert(
                l.name,
                Restored {
                    inc: l.inc,
                    applied: l.applied,
                    core,
                    keyed,
                },
            );
        }
        token_floor = snap.token_floor;
        next_seq = snap.next_seq;
        clock_us = snap.clock_us;
        first_segment = *k;
        report.snapshot = Some(path.clone());
    }
    let segments: Vec<(u64, PathBuf)> = numbered(dir, "wal-", ".log")?
        .into_iter()
        .filter(|(n, _)| *n >= first_segment)
        .collect();
    let last_segment = segments.last().map(|(n, _)| *n);
    let mut last_seq: Option<u64> = None;
    let mut log_bytes = 0u64;
    for (n, path) in &segments {
        let data = std::fs::read(path).map_err(io(path))?;
        log_bytes += data.len() as u64;
        let mut offset = 0usize;
        loop {
            match decode(&data, offset) {
                Frame::End => break,
                Frame::Record(record, next) => {
                    if last_seq.is_some_and(|last| record.seq <= last) {
                        return Err(RecoveryError::CorruptLog {
                            path: path.clone(),
                            offset: offset as u64,
                            reason: format!("record seq {} is out of order", record.seq),
                        });
                    }
                    last_seq = Some(record.seq);
                    clock_us = clock_us.max(record.at);
                    apply(&mut limiters, &mut token_floor, *record).map_err(|reason| {
                        RecoveryError::CorruptLog {
                            path: path.clone(),
                            offset: offset as u64,
                            reason,
                        }
                    })?;
                    report.records += 1;
                    offset = next;
                }
                Frame::Bad { reason, kind } => {
                    // A crash mid-write leaves a prefix of the last record (or zeros where
                    // the file system had extended the file); anything else is damage.
                    let tail_like = match kind {
                        Damage::CutShort => true,
                        Damage::ImpossibleLength => data[offset..].iter().all(|b| *b == 0),
                        Damage::Damaged { end } => end == data.len(),
                    };
                    let torn = Some(*n) == last_segment && tail_like;
                    if !torn {
                        return Err(RecoveryError::CorruptLog {
                            path: path.clone(),
                            offset: offset as u64,
                            reason,
                        });
                    }
                    tracing::warn!(
                        file = %path.display(),
                        offset,
                        %reason,
                        "dropping a torn last record of the write-ahead log (the process died mid-write)"
                    );
                    let file = std::fs::OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(io(path))?;
                    file.set_len(offset as u64).map_err(io(path))?;
                    file.sync_all().map_err(io(path))?;
                    report.torn_tail = Some((path.clone(), offset as u64));
                    break;
                }
            }
        }
    }
    if let Some(last) = last_seq {
        next_seq = next_seq.max(last + 1);
    }
    // The last segment may have been read from the page cache only (the process was killed
    // before it was synced). Synced now, before the next segment starts: otherwise a power
    // loss could still cut it short once it is no longer the last, and a segment cut short
    // anywhere but last is refused as damage.
    if let Some((_, path)) = segments.last() {
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(io(path))?;
        super::snapshot::sync_dir(dir).map_err(io(dir))?;
    }
    // Segments wholly covered by the snapshot (left by a crash before they were deleted).
    for (n, path) in numbered(dir, "wal-", ".log")? {
        if n < first_segment {
            let _ = std::fs::remove_file(path);
        }
    }
    report.limiters = limiters.len();
    report.holders = limiters
        .values()
        .map(|r| r.core.status_holders() as usize)
        .sum();
    let segment = last_segment.unwrap_or(first_segment).max(first_segment) + 1;
    Ok(Recovered {
        limiters,
        token_floor,
        next_seq,
        clock_us,
        segment,
        log_bytes,
        report,
    })
}

/// Applies one record to the recovering state.
fn apply(
    limiters: &mut BTreeMap<String, Restored>,
    token_floor: &mut u64,
    record: Record,
) -> Result<(), String> {
    let at = Timestamp(record.at);
    match &record.op {
        Op::Create {
            spec,
            first_token,
            learning_until,
        } => {
            if limiters
                .get(&record.limiter)
                .is_some_and(|r| r.inc >= record.seq)
            {
                // Already in the snapshot.
                return Ok(());
            }
            let mut core = LimiterCore::new(LimiterSpec::from(spec), *first_token)
                .map_err(|e| format!("limiter {:?} created with {e}", record.limiter))?;
            if let Some(until) = learning_until {
                core.enter_learning(at, Timestamp(*until));
            }
            limiters.insert(
                record.limiter,
                Restored {
                    inc: record.seq,
                    applied: record.seq + 1,
                    core,
                    keyed: None,
                },
            );
        }
        Op::CreateKeyed {
            spec,
            keyed,
            first_token,
            learning_until,
        } => {
            if limiters
                .get(&record.limiter)
                .is_some_and(|r| r.inc >= record.seq)
            {
                return Ok(());
            }
            let (mut core, layer) = crate::core::keyed::KeyLayer::new(
                LimiterSpec::from(spec),
                crate::core::keyed::KeyedSpec::from(keyed),
                *first_token,
            )
            .map_err(|e| format!("keyed limiter {:?} created with {e}", record.limiter))?;
            if let Some(until) = learning_until {
                core.enter_learning(at, Timestamp(*until));
            }
            limiters.insert(
                record.limiter,
                Restored {
                    inc: record.seq,
                    applied: record.seq + 1,
                    core,
                    keyed: Some(layer),
                },
            );
        }
        Op::Delete { next_token } => {
            // Whether or not the limiter is known here: a delete that raced a snapshot left
            // it out of the snapshot, and its floor with it.
            *token_floor = (*token_floor).max(*next_token);
            if limiters
                .get(&record.limiter)
                .is_some_and(|r| r.inc == record.inc && record.seq >= r.applied)
            {
                if let Some(r) = limiters.remove(&record.limiter) {
                    *token_floor = (*token_floor).max(r.core.next_token());
                }
            }
        }
        op => {
            if let Some(r) = limiters.get_mut(&record.limiter) {
                if r.inc == record.inc && record.seq >= r.applied {
                    op.replay(&mut r.core, r.keyed.as_mut(), at);
                    r.applied = record.seq + 1;
                }
            }
        }
    }
    Ok(())
}
