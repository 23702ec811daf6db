//! Running the limiter scripts: EVALSHA, and on `NOSCRIPT` the master check before the script
//! is loaded again.
//!
//! A Redis that restarted has no scripts (its script cache is not persisted), and neither has
//! a replica promoted by a failover (Redis 7 does not replicate `SCRIPT LOAD`, and replicates a
//! script's effects, not the script: see `docs/learning.md`). So the first EVALSHA a limiter
//! script gets on a new Redis is answered `NOSCRIPT`, whatever path the connection took there.
//! redis-rs's `Script::invoke_async` would load the script and run the call again at once; the
//! call could then be granted on state the new Redis reloaded from an older snapshot before
//! this store noticed the change: a health probe's `PING`, a listing, or a concurrent request
//! may have reconnected the shared connection without a script call failing (issue 16). Here a
//! `NOSCRIPT` runs the same gate as a failed request first (`generation.rs`: the master's
//! `run_id` checked; on a change, every limiter this store knows marked to learn, and this one
//! put in its learning window), and only then is the script loaded and the call run again.
//!
//! The normal path costs what it did: one EVALSHA. The gate costs one `INFO` round trip the
//! first time each script is missing on a Redis: at a store's first call, after a restart or a
//! failover, after `SCRIPT FLUSH`. On a Cluster the master is not checked (`generation.rs`):
//! a node answering `NOSCRIPT` the first time it is used costs only the gate's lock, and never
//! puts limiters in a window.
//!
//! What `NOSCRIPT` cannot tell: another server sharing the Redis that reloaded the scripts
//! first hides it from this one (see `docs/learning.md`).

use redis::{Cmd, ErrorKind, RedisError, ServerErrorKind};

use super::conn::Conn;
use super::limiter::RedisLimiter;
use super::unavailable;
use crate::error::StoreError;

/// The EVALSHA of `script` with these keys and arguments (what `ScriptInvocation` would send,
/// built once so a retry sends the same bytes).
pub(super) fn evalsha<'a>(
    script: &redis::Script,
    keys: &[&'a str],
    args: impl IntoIterator<Item = &'a str>,
) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
    for arg in args {
        cmd.arg(arg);
    }
    cmd
}

/// Whether Redis answered that it does not have the script.
pub(super) fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

impl RedisLimiter {
    /// Runs `cmd` (an [`evalsha`] of `script`) on `conn`. A dead connection (Redis restarted
    /// or the connection was cut) runs it once more once the master is checked; a `NOSCRIPT`
    /// (a Redis new to this script) has the master checked, then loads the script and runs it
    /// once more. Any failure marks the master to be checked before the next call.
    pub(super) async fn run_evalsha(
        &self,
        script: &redis::Script,
        cmd: &Cmd,
        conn: &Conn,
    ) -> Result<Vec<String>, StoreError> {
        let send = || {
            let mut conn = conn.clone();
            async move { cmd.query_async::<Vec<String>>(&mut conn).await }
        };
        let mut result = send().await;
        if matches!(&result, Err(e) if e.is_connection_dropped()) {
            // Redis may have restarted or failed over (`generation.rs`). The connection was
            // dead, so the request did not run (see `retry_dropped`): run it once more, on
            // whatever Redis is there now, once that is settled.
            self.store.suspect_change();
            tracing::debug!("redis connection was dead; retrying once");
            Box::pin(self.settle_generation()).await?;
            result = send().await;
        }
        if matches!(&result, Err(e) if is_noscript(e)) {
            // A Redis this store's script is new to: maybe a restarted or promoted one, whose
            // state may be older than the last grants. Checked before anything runs on it.
            self.store.suspect_change();
            tracing::debug!("redis has no script; checking the master before loading it");
            Box::pin(self.settle_generation()).await?;
            let mut c = conn.clone();
            script.load_async(&mut c).await.map_err(|e| {
                self.store.suspect_change();
                unavailable(e)
            })?;
            result = send().await;
        }
        result.map_err(|e| {
            // Redis may have restarted or failed over (`generation.rs`).
            self.store.suspect_change();
            unavailable(e)
        })
    }
}
