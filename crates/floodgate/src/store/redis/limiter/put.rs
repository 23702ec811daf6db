//! Creating or changing a limiter: the `put` call and its arguments (the keyed `kput` reuses
//! them for the total's part).

use super::*;

impl RedisLimiter {
    /// Creates or changes the limiter. `learn`: a learning window to enter if this call
    /// creates it (state was lost). Revival sends its own `put` (`revive.rs`), with
    /// `put_args`'s `revive` set.
    pub(in crate::store::redis) async fn put(
        &self,
        spec: &LimiterSpec,
        learn: Option<Duration>,
    ) -> Result<LimiterStatus, StoreError> {
        // Never revives: `put` is what revival runs. Without `revive` the script answers a
        // status or a refusal (`deleted` and `revived` are revival's answers).
        let writes = self.spec_writes();
        let reply = self
            .call_once("put", &Self::put_args(spec, learn, false))
            .await?;
        match reply.first().map(String::as_str) {
            Some("status") => self
                .parse_status(&reply)
                .inspect(|status| self.remember_written(&status.spec, writes)),
            Some("invalid") => Err(StoreError::Invalid(invalid(&reply))),
            _ => Err(unavailable(format!("unexpected script reply {reply:?}"))),
        }
    }

    /// The arguments of `put` (ARGV 4 to 19).
    pub(in crate::store::redis) fn put_args(
        spec: &LimiterSpec,
        learn: Option<Duration>,
        revive: bool,
    ) -> Vec<String> {
        let opt = |v: Option<String>| v.unwrap_or_default();
        let rate = spec.rate;
        let adaptive = spec.adaptive;
        vec![
            opt(spec.concurrency.map(|c| c.to_string())),
            micros(spec.default_lease),
            micros(spec.max_wait),
            spec.max_queue.to_string(),
            crate::clock::token_seed().to_string(),
            opt(rate.map(|r| r.limit.to_string())),
            opt(rate.map(|r| micros(r.period))),
            opt(rate.map(|r| r.burst.to_string())),
            opt(adaptive.map(|a| a.min.to_string())),
            opt(adaptive.map(|a| a.max.to_string())),
            opt(adaptive.map(|a| a.increase.to_string())),
            opt(adaptive.map(|a| format!("{}", a.decrease))),
            opt(adaptive.map(|a| micros(a.cooldown))),
            learn.map(micros).unwrap_or_default(),
            if revive { "revive" } else { "" }.to_owned(),
            opt(adaptive
                .map(|a| format!("{}|{}|{}", a.algorithm.name(), a.tolerance, a.probe_rounds))),
        ]
    }
}
