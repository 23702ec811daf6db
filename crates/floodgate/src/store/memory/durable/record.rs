//! What the write-ahead log holds: one record per state-machine operation, framed and
//! checksummed.
//!
//! The log records *operations* (the inputs of the pure state machine, with the `now` they ran
//! at), not their effects: replaying them in order through [`LimiterCore`] rebuilds the exact
//! state, because the core is deterministic. So anything the core learns (grants, the adaptive
//! limit, rate debt, counters, tokens) is durable without a record type of its own.
//!
//! Frame: `len: u32 LE | crc32(payload): u32 LE | payload` (the payload is one JSON object).

use serde::{Deserialize, Serialize};

use crate::core::keyed::{KeyLayer, KeyOverride, KeyedSpec, KeyedSpecState};
use crate::core::{AcquireRequest, Effects, Feedback, LimiterCore, SpecState, WaiterId};
use crate::spec::LimiterSpec;
use crate::types::{FencingToken, Timestamp};

/// Bytes before a frame's payload.
pub(crate) const FRAME_HEADER: usize = 8;
/// Largest payload accepted when reading: a bigger length can only be corruption.
pub(crate) const MAX_PAYLOAD: u32 = 16 * 1024 * 1024;

/// One logged operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// Position in the log: strictly increasing across segments and restarts.
    pub(crate) seq: u64,
    /// The store-clock time the operation ran at, in µs.
    pub(crate) at: u64,
    /// The limiter's name.
    pub(crate) limiter: String,
    /// Which incarnation of that name (the seq of its `Create`): an operation on a deleted
    /// limiter never applies to a re-created one.
    pub(crate) inc: u64,
    /// The operation.
    pub(crate) op: Op,
}

/// The operations, with exactly the inputs the state machine took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Op {
    /// The limiter was created with this spec and first fencing token, learning until
    /// `learning_until` when restored after a loss of state (one record, so that no crash
    /// leaves it created and not learning; absent in logs written before it was carried).
    Create {
        spec: SpecState,
        first_token: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        learning_until: Option<u64>,
    },
    /// Its spec changed.
    Reconfigure { spec: SpecState },
    /// It was deleted, when its next fencing token was `next_token`: recovery raises the
    /// store's token floor to it even when the snapshot before this record no longer had the
    /// limiter (a delete racing a snapshot), so a re-created limiter starts above every token
    /// handed out. Absent (0) in logs written before the record carried it.
    Delete {
        #[serde(default)]
        next_token: u64,
    },
    /// An acquire.
    Acquire {
        permits: u32,
        lease_us: Option<u64>,
        wait_us: Option<u64>,
        holder: Option<String>,
        request: Option<String>,
    },
    /// A release by token.
    Release { token: u64 },
    /// An extend (with the permit's size: during a learning window it may re-adopt).
    Extend {
        token: u64,
        lease_us: u64,
        #[serde(default)]
        permits: Option<u32>,
        /// A keyed permit's key: during a learning window it re-adopts under it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
    /// A learning window was entered (state may have been lost), ending at `until`. Written
    /// by older releases after their `Create`; a restored limiter's window is now part of its
    /// `Create` record. Still replayed.
    EnterLearning { until: u64 },
    /// A queued acquire gave up.
    Cancel { waiter: u64 },
    /// A queued idempotent acquire's caller went away: kept `grace_us` for a retry.
    Orphan { waiter: u64, grace_us: u64 },
    /// A `schedule` of this many rate tokens, under the reservation id the store drew
    /// (0 in logs written before reservations could be given back).
    Schedule {
        count: u32,
        #[serde(default)]
        reservation: u64,
    },
    /// A producer gave back up to `unused` tokens of a reservation.
    Unschedule { reservation: u64, unused: u32 },
    /// Backend feedback: 0 ok, 1 throttled, 2 error; with the call's latency when reported
    /// (absent in logs from before latencies were used).
    Feedback {
        outcome: u8,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        latency_us: Option<u64>,
    },
    /// Time passed and changed something (a lease expired, a wait ended, a token came due).
    Advance,
    /// The waiters were dropped after a restart.
    Abandon,
    /// A keyed limiter was created (docs/keyed.md).
    CreateKeyed {
        spec: SpecState,
        keyed: KeyedSpecState,
        first_token: u64,
        /// As `Create`'s.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        learning_until: Option<u64>,
    },
    /// A keyed limiter's specs changed.
    ReconfigureKeyed {
        spec: SpecState,
        keyed: KeyedSpecState,
    },
    /// An acquire for a key.
    KeyedAcquire {
        key: String,
        permits: u32,
        lease_us: Option<u64>,
        wait_us: Option<u64>,
        holder: Option<String>,
        request: Option<String>,
    },
    /// A schedule for a key, under the reservation id the store drew (0 in logs written
    /// before keyed reservations could be given back).
    KeyedSchedule {
        key: String,
        count: u32,
        #[serde(default)]
        reservation: u64,
    },
    /// A key's override was set (`weight` given) or removed (`weight` absent).
    PutKey {
        key: String,
        concurrency: Option<u32>,
        weight: Option<u32>,
    },
}

fn us(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Op {
    pub(crate) fn acquire(req: &AcquireRequest) -> Op {
        Op::Acquire {
            permits: req.permits,
            lease_us: req.lease.map(us),
            wait_us: req.wait.map(us),
            holder: req.holder.as_deref().map(str::to_owned),
            request: req.request_id.as_deref().map(str::to_owned),
        }
    }

    pub(crate) fn feedback(outcome: Feedback, latency: Option<std::time::Duration>) -> Op {
        Op::Feedback {
            outcome: match outcome {
                Feedback::Ok => 0,
                Feedback::Throttled => 1,
                Feedback::Error => 2,
            },
            latency_us: latency.map(us),
        }
    }

    pub(crate) fn reconfigure(spec: &LimiterSpec) -> Op {
        Op::Reconfigure {
            spec: SpecState::from(spec),
        }
    }

    pub(crate) fn keyed_acquire(key: &str, req: &AcquireRequest) -> Op {
        let Op::Acquire {
            permits,
            lease_us,
            wait_us,
            holder,
            request,
        } = Op::acquire(req)
        else {
            return Op::Advance;
        };
        Op::KeyedAcquire {
            key: key.to_owned(),
            permits,
            lease_us,
            wait_us,
            holder,
            request,
        }
    }

    /// Runs the operation on a keyed limiter (its total core and its key layer).
    fn replay_keyed(&self, core: &mut LimiterCore, keyed: &mut KeyLayer, at: Timestamp) {
        let mut fx = Effects::default();
        let micros = std::time::Duration::from_micros;
        match self {
            Op::Reconfigure { spec } => {
                let spec = LimiterSpec::from(spec);
                let per_key = keyed.keyed_spec().clone();
                let _ = keyed.reconfigure(core, at, spec, per_key, &mut fx);
            }
            Op::ReconfigureKeyed { spec, keyed: k } => {
                let _ = keyed.reconfigure(
                    core,
                    at,
                    LimiterSpec::from(spec),
                    KeyedSpec::from(k),
                    &mut fx,
                );
            }
            Op::KeyedAcquire {
                key,
                permits,
                lease_us,
                wait_us,
                holder,
                request,
            } => {
                let req = logged_request(*permits, *lease_us, *wait_us, holder, request);
                let _ = keyed.acquire(core, at, key, &req, &mut fx);
            }
            Op::KeyedSchedule {
                key,
                count,
                reservation,
            } => {
                let _ = keyed.schedule(core, at, key, *count, *reservation, &mut fx);
            }
            Op::Unschedule {
                reservation,
                unused,
            } => {
                let _ = keyed.unschedule(core, at, *reservation, *unused, &mut fx);
            }
            Op::PutKey {
                key,
                concurrency,
                weight,
            } => {
                let over = weight.map(|weight| KeyOverride {
                    concurrency: *concurrency,
                    weight,
                });
                let _ = keyed.put_override(core, at, key, over, &mut fx);
            }
            Op::Release { token } => {
                keyed.release(core, at, FencingToken(*token), &mut fx);
            }
            Op::Extend {
                token,
                lease_us,
                permits,
                key,
            } => {
                let _ = keyed.extend_or_adopt(
                    core,
                    at,
                    FencingToken(*token),
                    micros(*lease_us),
                    key.as_deref().zip(*permits),
                    &mut fx,
                );
            }
            Op::Cancel { waiter } => {
                keyed.cancel(core, at, WaiterId(*waiter), &mut fx);
            }
            Op::Feedback { latency_us, .. } => {
                let outcome = self.outcome();
                keyed.feedback(core, at, outcome, latency_us.map(micros), &mut fx);
            }
            Op::Advance => keyed.advance(core, at, &mut fx),
            Op::Abandon => {
                keyed.abandon_waiters(core, at);
            }
            Op::EnterLearning { until } => core.enter_learning(at, Timestamp(*until)),
            Op::Orphan { waiter, grace_us } => {
                keyed.orphan(at, WaiterId(*waiter), micros(*grace_us));
            }
            // Never logged for a keyed limiter (plain acquires and schedules are refused), or
            // handled by the caller.
            Op::Create { .. }
            | Op::CreateKeyed { .. }
            | Op::Delete { .. }
            | Op::Acquire { .. }
            | Op::Schedule { .. } => {}
        }
    }

    fn outcome(&self) -> Feedback {
        match self {
            Op::Feedback { outcome: 0, .. } => Feedback::Ok,
            Op::Feedback { outcome: 1, .. } => Feedback::Throttled,
            _ => Feedback::Error,
        }
    }

    /// Runs the operation on a core (and its key layer, for a keyed limiter), as it ran the
    /// first time. Outcomes are not needed: the wake-ups went to clients of a process that is
    /// gone. Create and Delete act on the store, not on a core, and are handled by the caller.
    pub(crate) fn replay(
        &self,
        core: &mut LimiterCore,
        keyed: Option<&mut KeyLayer>,
        at: Timestamp,
    ) {
        if let Some(keyed) = keyed {
            self.replay_keyed(core, keyed, at);
            return;
        }
        let mut fx = Effects::default();
        let micros = std::time::Duration::from_micros;
        match self {
            Op::Create { .. } | Op::Delete { .. } => {}
            // Keyed operations on a plain limiter were never logged.
            Op::CreateKeyed { .. }
            | Op::ReconfigureKeyed { .. }
            | Op::KeyedAcquire { .. }
            | Op::KeyedSchedule { .. }
            | Op::PutKey { .. } => {}
            Op::Reconfigure { spec } => {
                let _ = core.reconfigure(at, LimiterSpec::from(spec), &mut fx);
            }
            Op::Acquire {
                permits,
                lease_us,
                wait_us,
                holder,
                request,
            } => {
                let req = logged_request(*permits, *lease_us, *wait_us, holder, request);
                let _ = core.acquire(at, &req, &mut fx);
            }
            Op::Release { token } => {
                core.release(at, FencingToken(*token), &mut fx);
            }
            Op::Extend {
                token,
                lease_us,
                permits,
                ..
            } => {
                let _ = core.extend_or_adopt(
                    at,
                    FencingToken(*token),
                    micros(*lease_us),
                    *permits,
                    &mut fx,
                );
            }
            Op::EnterLearning { until } => core.enter_learning(at, Timestamp(*until)),
            Op::Cancel { waiter } => {
                core.cancel(at, WaiterId(*waiter), &mut fx);
            }
            Op::Orphan { waiter, grace_us } => {
                core.orphan(at, WaiterId(*waiter), micros(*grace_us));
            }
            Op::Schedule { count, reservation } => {
                let _ = core.schedule(at, *count, *reservation, &mut fx);
            }
            Op::Unschedule {
                reservation,
                unused,
            } => {
                let _ = core.unschedule(at, *reservation, *unused, &mut fx);
            }
            Op::Feedback {
                outcome,
                latency_us,
            } => {
                let outcome = match outcome {
                    0 => Feedback::Ok,
                    1 => Feedback::Throttled,
                    _ => Feedback::Error,
                };
                core.feedback_with(at, outcome, latency_us.map(micros), &mut fx);
            }
            Op::Advance => core.advance(at, &mut fx),
            Op::Abandon => {
                core.abandon_waiters();
            }
        }
    }
}

/// The request a logged acquire (plain or keyed) carried.
fn logged_request(
    permits: u32,
    lease_us: Option<u64>,
    wait_us: Option<u64>,
    holder: &Option<String>,
    request: &Option<String>,
) -> AcquireRequest {
    let micros = std::time::Duration::from_micros;
    AcquireRequest {
        permits,
        lease: lease_us.map(micros),
        wait: wait_us.map(micros),
        holder: holder.as_deref().map(Into::into),
        request_id: request.as_deref().map(Into::into),
    }
}

/// Appends `record` as one frame to `buf`.
pub(crate) fn encode(record: &Record, buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.extend_from_slice(&[0; FRAME_HEADER]);
    // Serializing plain data into a Vec cannot fail.
    if serde_json::to_writer(&mut *buf, record).is_err() {
        buf.truncate(start);
        return;
    }
    let payload = &buf[start + FRAME_HEADER..];
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(payload);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// What reading one frame at some offset found.
#[derive(Debug)]
pub(crate) enum Frame {
    /// A good record, and the offset just past it.
    Record(Box<Record>, usize),
    /// Clean end of the data.
    End,
    /// Not a good frame: `reason` says why. Whether it is a torn tail or corruption depends
    /// on where it is; the reader decides.
    Bad { reason: String, kind: Damage },
}

/// How a frame is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Damage {
    /// The data ends inside it: what a crash mid-write leaves.
    CutShort,
    /// Its length is 0 or absurd: zeros a file system left after a crash, or corruption.
    ImpossibleLength,
    /// Complete, but its checksum or contents are wrong.
    Damaged {
        /// The offset just past it.
        end: usize,
    },
}

/// Reads the frame at `offset` of `data`.
pub(crate) fn decode(data: &[u8], offset: usize) -> Frame {
    let rest = &data[offset..];
    if rest.is_empty() {
        return Frame::End;
    }
    if rest.len() < FRAME_HEADER {
        return Frame::Bad {
            reason: format!("a frame header cut short ({} of 8 bytes)", rest.len()),
            kind: Damage::CutShort,
        };
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len == 0 || len > MAX_PAYLOAD {
        return Frame::Bad {
            reason: format!("an impossible record length {len}"),
            kind: Damage::ImpossibleLength,
        };
    }
    let len = len as usize;
    if rest.len() < FRAME_HEADER + len {
        return Frame::Bad {
            reason: format!(
                "a record cut short ({} of {len} bytes)",
                rest.len() - FRAME_HEADER
            ),
            kind: Damage::CutShort,
        };
    }
    let payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
    if crc32fast::hash(payload) != crc {
        return Frame::Bad {
            reason: "a record whose checksum does not match".to_owned(),
            kind: Damage::Damaged {
                end: offset + FRAME_HEADER + len,
            },
        };
    }
    match serde_json::from_slice::<Record>(payload) {
        Ok(record) => Frame::Record(Box::new(record), offset + FRAME_HEADER + len),
        Err(e) => Frame::Bad {
            reason: format!("a record that does not parse: {e}"),
            kind: Damage::Damaged {
                end: offset + FRAME_HEADER + len,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> Record {
        Record {
            seq,
            at: 7,
            limiter: "a".into(),
            inc: 1,
            op: Op::Release { token: 9 },
        }
    }

    #[test]
    fn frames_round_trip_and_detect_damage() {
        let mut buf = Vec::new();
        encode(&record(1), &mut buf);
        encode(&record(2), &mut buf);
        let Frame::Record(first, next) = decode(&buf, 0) else {
            panic!("first frame")
        };
        assert_eq!(*first, record(1));
        let Frame::Record(second, end) = decode(&buf, next) else {
            panic!("second frame")
        };
        assert_eq!(second.seq, 2);
        assert!(matches!(decode(&buf, end), Frame::End));
        // Cut short: incomplete.
        assert!(matches!(
            decode(&buf[..end - 3], next),
            Frame::Bad {
                kind: Damage::CutShort,
                ..
            }
        ));
        // A flipped byte in the payload: checksum.
        let mut bad = buf.clone();
        bad[next + FRAME_HEADER + 2] ^= 0x20;
        assert!(matches!(
            decode(&bad, next),
            Frame::Bad {
                kind: Damage::Damaged { .. },
                ..
            }
        ));
    }
}
