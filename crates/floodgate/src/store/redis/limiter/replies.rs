//! Reading the script's replies: a limiter's status and its holders, by the one schema both
//! sides are built from (`script::status_schema`).

use super::*;

impl RedisLimiter {
    /// Parses `status_fields()` of the limiter script (`lua/state.lua`) (after the tag): its fields by name, in the
    /// order of the one schema both sides are built from (`script::status_schema`).
    pub(in crate::store::redis) fn parse_status(
        &self,
        reply: &[String],
    ) -> Result<LimiterStatus, StoreError> {
        let schema = crate::store::redis::script::status_schema();
        if reply.len() < schema.len() + 1 {
            return Err(unavailable(format!("short status reply {reply:?}")));
        }
        let fields: HashMap<&str, &str> = schema
            .iter()
            .copied()
            .zip(reply[1..].iter().map(String::as_str))
            .collect();
        let text = |k: &str| fields.get(k).copied().unwrap_or("");
        let n = |k: &str| -> Result<u64, StoreError> {
            text(k)
                .parse::<u64>()
                .map_err(|_| unavailable(format!("status field {k}: {:?}", text(k))))
        };
        let small = |k: &str| -> Result<u32, StoreError> {
            u32::try_from(n(k)?).map_err(|_| unavailable("status field out of range"))
        };
        let present = |k: &str| !text(k).is_empty();
        let opt_small = |k: &str| -> Result<Option<u32>, StoreError> {
            if present(k) {
                small(k).map(Some)
            } else {
                Ok(None)
            }
        };
        let rate = if present("rate_limit") {
            Some(RateSpec {
                limit: small("rate_limit")?,
                period: Duration::from_micros(n("rate_period_us")?),
                burst: small("rate_burst")?,
            })
        } else {
            None
        };
        let adaptive = if present("a_min") {
            // 'algorithm|tolerance|probe_rounds'; empty for a limiter put before they existed.
            let d = AdaptiveSpec::between(1, 1);
            let ext: Vec<&str> = text("a_ext").split('|').collect();
            let (algorithm, tolerance, probe_rounds) = match ext.as_slice() {
                [name, t, p] => (
                    if *name == Algorithm::Gradient.name() {
                        Algorithm::Gradient
                    } else {
                        Algorithm::Aimd
                    },
                    t.parse::<f64>()
                        .map_err(|_| unavailable("bad adaptive.tolerance"))?,
                    p.parse::<u32>()
                        .map_err(|_| unavailable("bad adaptive.probe_rounds"))?,
                ),
                _ => (d.algorithm, d.tolerance, d.probe_rounds),
            };
            Some(AdaptiveSpec {
                algorithm,
                tolerance,
                probe_rounds,
                min: small("a_min")?,
                max: small("a_max")?,
                increase: small("a_inc")?,
                decrease: text("a_dec")
                    .parse::<f64>()
                    .map_err(|_| unavailable("bad adaptive.decrease"))?,
                cooldown: Duration::from_micros(n("a_cool_us")?),
            })
        } else {
            None
        };
        Ok(LimiterStatus {
            name: self.name.clone(),
            spec: LimiterSpec {
                concurrency: opt_small("concurrency")?,
                rate,
                adaptive,
                default_lease: Duration::from_micros(n("lease_us")?),
                max_wait: Duration::from_micros(n("max_wait_us")?),
                max_queue: small("max_queue")?,
            },
            in_use: small("in_use")?,
            holders: small("holders")?,
            waiting: small("waiting")?,
            waiting_permits: n("waiting_permits")?,
            limit: opt_small("limit")?,
            counters: Counters {
                granted: n("granted")?,
                released: n("released")?,
                expired: n("expired")?,
                timed_out: n("timed_out")?,
                cancelled: n("cancelled")?,
                queue_full: n("queue_full")?,
                rejected: n("rejected")?,
                extend_lost: n("extend_lost")?,
                paced: n("paced")?,
                scheduled: n("scheduled")?,
                feedback_ok: n("feedback_ok")?,
                feedback_throttled: n("feedback_throttled")?,
                feedback_error: n("feedback_error")?,
                limit_decreases: n("limit_decreases")?,
                limit_increases: n("limit_increases")?,
                adopted: n("adopted")?,
            },
            learning: text("learning") == "1",
        })
    }

    /// Parses `holders.lua`'s reply (after the tag).
    pub(super) fn parse_holders(&self, reply: &[String]) -> Result<HoldersView, StoreError> {
        let n = |i: usize| field(reply, i);
        let small = |i: usize| -> Result<u32, StoreError> {
            u32::try_from(n(i)?).map_err(|_| unavailable("holders field out of range"))
        };
        let now = Timestamp(n(1)?);
        let oldest_wait = match reply.get(5).map(String::as_str) {
            None | Some("") => None,
            Some(_) => Some(now.since(Timestamp(n(5)?))),
        };
        let mut holders = Vec::new();
        let rate_tokens = reply
            .get(6)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<f64>())
            .transpose()
            .map_err(|_| unavailable("bad rate tokens"))?;
        let mut i = 7;
        while i + 4 < reply.len() {
            let label = reply.get(i + 4).filter(|l| !l.is_empty());
            holders.push(HolderInfo {
                token: FencingToken(n(i)?),
                permits: small(i + 1)?,
                lease_deadline: Timestamp(n(i + 2)?),
                granted_at: Timestamp(n(i + 3)?),
                label: label.map(|l| Arc::from(l.as_str())),
            });
            i += 5;
        }
        Ok(HoldersView {
            now,
            holders,
            total_holders: small(2)?,
            waiting: small(3)?,
            waiting_permits: n(4)?,
            oldest_wait,
            rate_tokens,
        })
    }
}
