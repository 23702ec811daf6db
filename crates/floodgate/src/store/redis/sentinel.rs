//! Redis Sentinel: `redis+sentinel://[USER[:PASSWORD]@]HOST:PORT[,HOST:PORT...]/MASTER`.
//!
//! The URL's credentials (or the configured ones) are the master's; sentinels that require
//! their own password get `RedisSecurity::sentinel_password`. With TLS files configured, the
//! sentinels are reached over TLS as well as the master.
//!
//! The store asks the sentinels, in turn, where the master named MASTER is, checks that the
//! server there says it is a master (`ROLE`), and runs everything on it. When a round trip
//! fails as a failover makes it fail (connection lost or refused, timeout, `READONLY`), the
//! operation fails as any Redis outage does (503 `store_unavailable` from the server), and the
//! store asks the sentinels again (after any failed call, at most every 200 ms); once they
//! name a new master it switches to it, and the
//! wake-up subscription follows on its next reconnect. Waiters whose wake-ups were on the old
//! master are answered by the subscription's loss (see `wake.rs`), not left hanging.
//!
//! Writes the old master acknowledged but never replicated are lost with it (Redis
//! replication is asynchronous); see docs/redis.md on what failover can break.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::RedisError;

use super::conn::{redact_url, RedisSecurity};
use super::unavailable;
use crate::error::StoreError;

/// Least time between two questions to the sentinels, so a burst of failing calls asks once.
const RECHECK: Duration = Duration::from_millis(200);

/// Where the sentinels are and which master they watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    /// `host:port` of each sentinel.
    sentinels: Vec<String>,
    /// The master's name, as in `sentinel monitor NAME ...`.
    master: String,
    /// `user:password@` for the master and replicas, from the URL (may be empty).
    userinfo: String,
}

/// Parses a `redis+sentinel://` URL; `None` for any other scheme.
pub(super) fn parse(url: &str) -> Option<Result<Target, StoreError>> {
    let rest = url.strip_prefix("redis+sentinel://")?;
    let bad = |why: &str| {
        Some(Err(StoreError::Unavailable(format!(
            "redis: {}: {why}; expected redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER",
            redact_url(url)
        ).into())))
    };
    let (hosts, master) = match rest.rsplit_once('/') {
        Some((h, m)) if !m.is_empty() => (h, m),
        _ => return bad("no master name"),
    };
    let (userinfo, hosts) = match hosts.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), hosts),
    };
    let sentinels: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
        .collect();
    if sentinels.is_empty() || sentinels.iter().any(|h| !h.contains(':')) {
        return bad("each sentinel is HOST:PORT");
    }
    // A port that is not one would only fail at connect time, as an unreachable store.
    let port_ok = |h: &str| {
        h.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        })
    };
    if let Some(h) = sentinels.iter().find(|h| !port_ok(h)) {
        return bad(&format!(
            "sentinel {h:?}: each sentinel is HOST:PORT, the port from 1 to 65535"
        ));
    }
    Some(Ok(Target {
        sentinels,
        master: master.to_owned(),
        userinfo,
    }))
}

/// Checks a `redis+sentinel://` URL as [`RedisStore::connect`](super::RedisStore::connect)
/// reads it, without connecting, so a program can refuse a malformed one as bad input rather
/// than report an unreachable store. URLs of other schemes are not checked here (`Ok`).
///
/// # Errors
///
/// Why the URL is not one (no master name, a sentinel without a port, ...), naming the URL
/// with its password hidden and the form expected.
pub fn check_sentinel_url(url: &str) -> Result<(), String> {
    match parse(url) {
        Some(Err(StoreError::Unavailable(why))) => Err(why.message().to_owned()),
        Some(Err(other)) => Err(other.to_string()),
        Some(Ok(_)) | None => Ok(()),
    }
}

/// The master in use.
struct Current {
    /// `host:port`, as the sentinels named it.
    addr: String,
    /// A client for it (the wake-up subscription connects through it).
    client: redis::Client,
    /// The multiplexed connection scripts run on.
    manager: ConnectionManager,
}

/// The connection to whichever server the sentinels say is the master.
pub(crate) struct Sentinel {
    /// What the URL named.
    target: Target,
    /// Credentials and TLS files for the master, and the sentinels' own credentials (they are
    /// asked over TLS when TLS files are named).
    security: RedisSecurity,
    /// How the connection to the master behaves (timeouts, retries).
    manager_config: ConnectionManagerConfig,
    /// Bound on each question to a sentinel.
    timeout: Duration,
    /// The master in use; replaced when the sentinels name another.
    current: std::sync::Mutex<Arc<Current>>,
    /// Serializes re-resolutions and remembers when the last one ran.
    checking: tokio::sync::Mutex<Instant>,
}

impl Sentinel {
    /// Finds the master and connects to it.
    pub(super) async fn connect(
        target: Target,
        security: RedisSecurity,
        manager_config: ConnectionManagerConfig,
        timeout: Duration,
    ) -> Result<Arc<Sentinel>, StoreError> {
        let addr = master_addr(&target, &security, timeout).await?;
        let current = open(&target, &security, &addr, manager_config.clone()).await?;
        tracing::info!(master = %target.master, %addr, "redis sentinel: using master");
        Ok(Arc::new(Sentinel {
            target,
            security,
            manager_config,
            timeout,
            current: std::sync::Mutex::new(Arc::new(current)),
            checking: tokio::sync::Mutex::new(Instant::now()),
        }))
    }

    fn current(&self) -> Arc<Current> {
        Arc::clone(
            &self
                .current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The connection to the master in use.
    pub(super) fn manager(&self) -> ConnectionManager {
        self.current().manager.clone()
    }

    /// A client for the master in use.
    pub(crate) fn client(&self) -> redis::Client {
        self.current().client.clone()
    }

    /// After a failed round trip: asks the sentinels (at most once per [`RECHECK`]) and
    /// switches when they name another master. Any error counts, not only those that look like
    /// a lost connection: while the connection manager reconnects to a dead master it answers
    /// with errors of its own kinds, and a question to a sentinel is cheap.
    pub(super) async fn after_error(&self, e: &RedisError) {
        tracing::debug!(error = %e, "redis sentinel: a call failed; checking the master");
        let mut last = self.checking.lock().await;
        if last.elapsed() < RECHECK {
            return;
        }
        *last = Instant::now();
        let Ok(addr) = master_addr(&self.target, &self.security, self.timeout).await else {
            return;
        };
        if addr == self.current().addr {
            return;
        }
        match open(
            &self.target,
            &self.security,
            &addr,
            self.manager_config.clone(),
        )
        .await
        {
            Ok(current) => {
                tracing::warn!(master = %self.target.master, %addr, "redis sentinel: failed over to a new master");
                *self
                    .current
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(current);
            }
            Err(e) => {
                tracing::warn!(%addr, error = %e, "redis sentinel: new master not reachable yet")
            }
        }
    }
}

/// Asks each sentinel in turn for the master's address; the first that knows, and whose
/// answer is confirmed by the server itself (`ROLE` says `master`), wins.
async fn master_addr(
    target: &Target,
    security: &RedisSecurity,
    timeout: Duration,
) -> Result<String, StoreError> {
    let mut errors = Vec::new();
    let sentinel_security = security.for_sentinels();
    for sentinel in &target.sentinels {
        let asked = ask(sentinel, &sentinel_security, &target.master, timeout);
        match tokio::time::timeout(timeout * 2, asked).await {
            Ok(Ok(addr)) => return Ok(addr),
            Ok(Err(e)) => errors.push(format!("{sentinel}: {e}")),
            Err(_) => errors.push(format!("{sentinel}: no answer")),
        }
    }
    Err(StoreError::Unavailable(
        format!(
            "redis sentinel: no sentinel names a master {:?} ({})",
            target.master,
            errors.join("; ")
        )
        .into(),
    ))
}

async fn ask(
    sentinel: &str,
    security: &RedisSecurity,
    master: &str,
    timeout: Duration,
) -> Result<String, String> {
    let client = security
        .client(&format!("{}://{sentinel}/", security.scheme()))
        .map_err(|e| e.to_string())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| e.to_string())?;
    let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(master)
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let (host, port) = addr.ok_or_else(|| format!("does not know {master:?}"))?;
    Ok(format!("{host}:{port}"))
}

/// Connects to `addr` and checks that it is a master (a sentinel's answer can be stale).
async fn open(
    target: &Target,
    security: &RedisSecurity,
    addr: &str,
    config: ConnectionManagerConfig,
) -> Result<Current, StoreError> {
    let client = security.client(&format!(
        "{}://{}{addr}/",
        security.scheme(),
        target.userinfo
    ))?;
    let mut manager = client
        .get_connection_manager_with_config(config)
        .await
        .map_err(unavailable)?;
    let role: Vec<redis::Value> = redis::cmd("ROLE")
        .query_async(&mut manager)
        .await
        .map_err(unavailable)?;
    match role.first() {
        Some(redis::Value::BulkString(b)) if b == b"master" => {}
        Some(redis::Value::SimpleString(s)) if s == "master" => {}
        _ => {
            return Err(StoreError::Unavailable(
                format!("redis sentinel: {addr} is not a master (yet)").into(),
            ))
        }
    }
    Ok(Current {
        addr: addr.to_owned(),
        client,
        manager,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_sentinels_and_the_master() {
        let t = parse("redis+sentinel://app:pw@10.0.0.1:26379,10.0.0.2:26379/mymaster")
            .expect("sentinel scheme")
            .expect("valid");
        assert_eq!(t.sentinels, ["10.0.0.1:26379", "10.0.0.2:26379"]);
        assert_eq!(t.master, "mymaster");
        assert_eq!(t.userinfo, "app:pw@");
        assert!(parse("redis://h:1").is_none());
        let err = parse("redis+sentinel://h:1")
            .expect("scheme")
            .expect_err("no master");
        assert!(err.to_string().contains("master"), "{err}");
        let err = parse("redis+sentinel://h/m")
            .expect("scheme")
            .expect_err("no port");
        assert!(err.to_string().contains("HOST:PORT"), "{err}");
        for bad in [
            "redis+sentinel://h:x/m",
            "redis+sentinel://h:0/m",
            "redis+sentinel://h:65536/m",
            "redis+sentinel://a:1,:2/m",
        ] {
            let err = check_sentinel_url(bad).expect_err(bad);
            assert!(
                err.contains("HOST:PORT") && !err.contains("unavailable"),
                "{err}"
            );
        }
        let err = check_sentinel_url("redis+sentinel://u:secret@h:1").expect_err("no master");
        assert!(err.contains("master") && !err.contains("secret"), "{err}");
        assert_eq!(
            check_sentinel_url("redis+sentinel://[::1]:26379,h:2/m"),
            Ok(())
        );
        assert_eq!(check_sentinel_url("redis://anything"), Ok(()));
    }
}
