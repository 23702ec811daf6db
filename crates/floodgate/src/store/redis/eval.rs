//! Running the limiter scripts: EVALSHA, and on `NOSCRIPT` the master check before the script
//! is loaded again.
//!
//! A Redis that restarted has no scripts (its script cache is not persisted), and neither has
//! a replica promoted by a failover (Redis 7 replicates a script's effects, not the script,
//! and does not replicate `SCRIPT LOAD`: checked on 7.0.15, see `docs/learning.md`). So the
//! first EVALSHA a limiter script gets on a new Redis is answered `NOSCRIPT`, whatever path the
//! connection took there. redis-rs's `Script::invoke_async` would load the script and run the
//! call again at once; the call could then be granted on state the new Redis reloaded from an
//! older snapshot before this store noticed the change: a health probe's `PING`, a listing, or
//! a concurrent request may have reconnected the shared connection without a script call
//! failing. Here a `NOSCRIPT` runs the same gate as a failed request first (`generation.rs`:
//! the master's `run_id` checked; on a change, every limiter this store knows marked to learn,
//! and this one put in its learning window), and only then is the script loaded and the call
//! run again.
//!
//! A call sent before the change was noticed may reach the new Redis only after the gate ran
//! and another call loaded the script again; it would then run on the older state before its
//! limiter's window. So the scripts a store sends name the master it checked last (a comment
//! with its `run_id`, `Scripts::new`: a SHA1 of their own), and only the ones naming the new
//! master are loaded on it: a call still carrying the older SHA1 is answered `NOSCRIPT` and
//! goes through the gate too. A call takes the current scripts before it checks whether it
//! must settle (`settled_scripts`), so one that carries the new SHA1 has settled its limiter
//! first. The same holds across servers sharing a Redis: a server loads the scripts naming a
//! master only once it checked that this is the master it talks to, so another server that has
//! not noticed the change still sends the older SHA1 and is answered `NOSCRIPT`. (The load goes
//! out with the master's `INFO` in one pipeline, so both reach the same Redis; should that not
//! be the master checked, the load is taken back: `Scripts::load_on_master`.) Each Redis
//! holds one copy of each script, as before: the one naming itself.
//!
//! On a Redis Cluster the same holds per hash slot (`shard.rs`): the scripts a call sends name
//! the master recorded for its limiter's slot, and are loaded on the node serving that slot
//! only once it answered with that master's `run_id` (the `INFO` and the load routed there in
//! one pipeline). A shard's failover is so caught on each of its slots, by every server.
//!
//! The normal path costs what it did: one EVALSHA. The gate costs one `INFO` round trip the
//! first time each script is missing on a Redis: at a store's first call, after a restart or a
//! failover, after `SCRIPT FLUSH`; on a Cluster also one the first time a store uses a slot.
//!
//! What this cannot tell: which limiters a server never used (`docs/learning.md`).

use std::sync::{Arc, PoisonError};

use redis::cluster_routing::Slot;
use redis::{Cmd, ErrorKind, RedisError, ServerErrorKind};

use super::conn::Conn;
use super::limiter::RedisLimiter;
use super::unavailable;
use crate::error::StoreError;

/// The EVALSHA of `script` with these keys and arguments (what `ScriptInvocation` sends).
fn evalsha(script: &redis::Script, keys: &[&str], args: &[&str]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash())
        .arg(keys.len())
        .arg(keys)
        .arg(args);
    cmd
}

/// Whether Redis answered that it does not have the script.
fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// The limiter scripts this store sends while the master is the same.
pub(super) struct Scripts {
    /// The master they name (`None`: a Cluster store's own, never sent; each slot's are in
    /// `shard.rs`).
    master: Option<String>,
    /// The plain limiters' script, and its source (loaded with the master's `INFO`).
    plain: (redis::Script, String),
    /// The keyed limiters' script (`keyed.rs`), and its source.
    keyed: (redis::Script, String),
}

impl Scripts {
    /// The scripts for the master whose `run_id` this is: the same code under a comment naming
    /// it, so a SHA1 only that master is sent. `None`: as shipped.
    pub(super) fn new(run_id: Option<&str>) -> Self {
        let mut plain = super::script::script_source();
        let mut keyed = super::script::keyed_script_source();
        if let Some(run_id) = run_id {
            let tag = format!("-- for the Redis master {run_id}\n");
            plain.insert_str(0, &tag);
            keyed.insert_str(0, &tag);
        }
        Scripts {
            master: run_id.map(str::to_owned),
            plain: (redis::Script::new(&plain), plain),
            keyed: (redis::Script::new(&keyed), keyed),
        }
    }

    fn pick(&self, keyed: bool) -> &redis::Script {
        if keyed {
            &self.keyed.0
        } else {
            &self.plain.0
        }
    }

    /// Loads one script on the Redis `conn` talks to, if that is the master the scripts name:
    /// `false` if it is not (it changed since it was checked: nothing loaded). The master's
    /// `INFO` and the load go out as one pipeline on one connection, so both reach the same
    /// Redis: a restart between a check and the load cannot put a script naming the older
    /// master on the new one.
    ///
    /// On a Cluster (`slot`), to the node serving that slot (`shard.rs`).
    async fn load_on_master(
        &self,
        keyed: bool,
        conn: &Conn,
        slot: Option<Slot>,
    ) -> redis::RedisResult<bool> {
        let mut conn = conn.clone();
        let (script, source) = if keyed { &self.keyed } else { &self.plain };
        let Some(master) = &self.master else {
            script.load_async(&mut conn).await?;
            return Ok(true);
        };
        if let Some(slot) = slot {
            return super::shard::load_on_slot(&conn, slot, master, source).await;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("INFO").arg("server");
        pipe.cmd("SCRIPT").arg("LOAD").arg(source.as_str()).ignore();
        let (info,): (String,) = pipe.query_async(&mut conn).await?;
        let run_id = super::generation::run_id_of(&info);
        if run_id == Some(master.as_str()) {
            return Ok(true);
        }
        // Loaded on another Redis than the one checked: taken back, so no call naming the
        // older master runs there.
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async::<()>(&mut conn)
            .await?;
        Ok(false)
    }
}

impl super::Inner {
    /// The scripts to send now.
    fn scripts(&self) -> Arc<Scripts> {
        Arc::clone(&self.scripts.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// After a change of the master was noticed (and its limiters marked to learn): the
    /// scripts naming the new one.
    pub(super) fn renew_scripts(&self, run_id: Option<&str>) {
        let scripts = Arc::new(Scripts::new(run_id));
        *self.scripts.lock().unwrap_or_else(PoisonError::into_inner) = scripts;
    }
}

impl RedisLimiter {
    /// The scripts to send, once nothing is due on this limiter (`generation.rs`) and no master
    /// is found evicting keys (`evict.rs`). Taken
    /// before that is checked: scripts renewed by a change are seen only with the limiters
    /// that change marked, so this one is settled before they are sent.
    ///
    /// On a Cluster, the scripts naming the master of this limiter's slot (`shard.rs`).
    async fn settled_scripts(&self) -> Result<Arc<Scripts>, StoreError> {
        for _ in 0..8 {
            let scripts = if self.store.is_cluster() {
                self.shard_scripts()
            } else {
                Some(self.store.scripts())
            };
            if let Some(scripts) = scripts.filter(|_| !self.needs_settling()) {
                // A Redis found evicting keys, at connect, by a check of its master just now
                // or since, is refused (`evict.rs`): one atomic load when it is not.
                self.store.eviction.check()?;
                return Ok(scripts);
            }
            Box::pin(self.settle_generation()).await?;
        }
        // Only if a failure kept coming back between settling and sending (or, on a Cluster,
        // the slot stayed unchecked: never, as a check records it).
        Err(unavailable(
            "the master kept changing while this call waited to be settled; retry",
        ))
    }

    /// Runs the plain script or (`keyed`) the keyed one with these keys and arguments on
    /// `conn`. A dead connection (Redis restarted, or the connection was cut) runs it once
    /// more once the master is checked; a `NOSCRIPT` (a Redis new to the script) has the
    /// master checked, then loads the script and runs the call once more. Any failure marks
    /// the master to be checked before the next call.
    pub(super) async fn run_evalsha(
        &self,
        keyed: bool,
        keys: &[&str],
        args: &[&str],
        conn: &Conn,
    ) -> Result<Vec<String>, StoreError> {
        let send = |cmd: Cmd| {
            let mut conn = conn.clone();
            async move { cmd.query_async::<Vec<String>>(&mut conn).await }
        };
        let mut scripts = self.settled_scripts().await?;
        let mut result = send(evalsha(scripts.pick(keyed), keys, args)).await;
        if matches!(&result, Err(e) if e.is_connection_dropped()) {
            // Redis may have restarted or failed over (`generation.rs`). The connection was
            // dead, so the request did not run (see `retry_dropped`): run it once more, on
            // whatever Redis is there now, once that is settled.
            self.suspect_change();
            tracing::debug!("redis connection was dead; retrying once");
            scripts = self.settled_scripts().await?;
            result = send(evalsha(scripts.pick(keyed), keys, args)).await;
        }
        if matches!(&result, Err(e) if is_noscript(e)) {
            // A Redis this script is new to: maybe a restarted or promoted one, whose state
            // may be older than the last grants. Checked before anything runs on it.
            self.suspect_change();
            tracing::debug!("redis has no script; checking the master before loading it");
            let mut tries = 0;
            loop {
                scripts = self.settled_scripts().await?;
                let slot = self.store.is_cluster().then(|| self.slot());
                let loaded = scripts
                    .load_on_master(keyed, conn, slot)
                    .await
                    .map_err(|e| {
                        self.suspect_change();
                        unavailable(e)
                    })?;
                if loaded {
                    break;
                }
                // Redis changed again since it was checked: check again.
                self.suspect_change();
                tries += 1;
                if tries == 3 {
                    return Err(unavailable(
                        "the master kept changing while its script loaded",
                    ));
                }
            }
            result = send(evalsha(scripts.pick(keyed), keys, args)).await;
        }
        result.map_err(|e| {
            // Redis may have restarted or failed over (`generation.rs`).
            self.suspect_change();
            unavailable(e)
        })
    }
}
