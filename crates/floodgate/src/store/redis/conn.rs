//! One multiplexed connection to standalone Redis, a Redis Cluster or the master Sentinel names,
//! behind one type; where the wake-up subscription connects in each case (`PubSubSource`: on a
//! Cluster, any live node, see `pubsub_nodes.rs`); and how clients are made (TLS, ACL
//! credentials), the same for a seed and for a node learned from the cluster.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redis::aio::{ConnectionLike, ConnectionManager, PubSub};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    ClientTlsConfig, Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, RedisFuture,
    TlsCertificates, Value,
};

use super::pubsub_nodes::ClusterNodes;
use super::sentinel::Sentinel;
use super::unavailable;
use crate::error::StoreError;

/// The shared connection. Never used for blocking commands: redis-rs multiplexes requests on
/// it with a response timeout, and a blocking read would stall every other request.
#[derive(Clone)]
pub(super) enum Conn {
    /// Standalone Redis; reconnects by itself.
    Single(ConnectionManager),
    /// Redis Cluster; follows MOVED/ASK and reconnects by itself.
    Cluster(ClusterConnection),
    /// Redis Sentinel: the master the sentinels name, followed through failovers.
    Sentinel(Arc<Sentinel>),
}

/// Where the wake-up subscription connects (again, after a loss): a fixed node, whichever
/// master the sentinels name by then, or any live node of a Cluster.
#[derive(Clone)]
pub(super) enum PubSubSource {
    /// Standalone (boxed: a client is large, and made once).
    Fixed(Box<redis::Client>),
    /// The current master.
    Sentinel(Arc<Sentinel>),
    /// The node it was on, else the next that answers (`pubsub_nodes.rs`).
    Cluster(Arc<ClusterNodes>),
}

impl PubSubSource {
    /// A connection subscribed to `channel`, on the node to subscribe on now.
    pub(super) async fn subscribe(&self, channel: &str) -> Result<PubSub, redis::RedisError> {
        let client = match self {
            PubSubSource::Fixed(c) => (**c).clone(),
            PubSubSource::Sentinel(s) => s.client(),
            PubSubSource::Cluster(nodes) => return nodes.subscribe(channel).await,
        };
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok(pubsub)
    }

    /// Whether another node may take over at once when the subscription's node is lost.
    pub(super) fn has_other_nodes(&self) -> bool {
        matches!(self, PubSubSource::Cluster(_))
    }

    /// After a failed reconnect: under Sentinel, asks where the master is now.
    pub(super) async fn failed(&self, e: &redis::RedisError) {
        if let PubSubSource::Sentinel(s) = self {
            s.after_error(e).await;
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(s) => Box::pin(async move {
                let mut master = s.manager();
                let result = master.req_packed_command(cmd).await;
                if let Err(e) = &result {
                    s.after_error(e).await;
                }
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Sentinel(s) => Box::pin(async move {
                let mut master = s.manager();
                let result = master.req_packed_commands(cmd, offset, count).await;
                if let Err(e) = &result {
                    s.after_error(e).await;
                }
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(_) => 0,
        }
    }
}

/// How to authenticate to Redis: TLS material for `rediss://` URLs and ACL credentials that
/// are not in the URL (so a password can come from the environment, not a process list).
/// Applies to standalone and Cluster alike. `Debug` never shows the password.
#[derive(Clone, Default)]
pub struct RedisSecurity {
    /// PEM CA certificates to verify the server with, instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that require one (`tls-auth-clients yes`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// ACL user, when the URL names none.
    pub username: Option<String>,
    /// ACL password (or `requirepass`), when the URL gives none.
    pub password: Option<String>,
    /// The sentinels' own ACL user (`redis+sentinel://` only), when they require one.
    pub sentinel_username: Option<String>,
    /// The sentinels' own password (their `requirepass`), when they require one. The master's
    /// credentials are the URL's or `username`/`password`; a sentinel usually has its own.
    pub sentinel_password: Option<String>,
}

impl std::fmt::Debug for RedisSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSecurity")
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("sentinel_username", &self.sentinel_username)
            .field(
                "sentinel_password",
                &self.sentinel_password.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| {
        let context = format!("redis: {what} {}", path.display());
        StoreError::Unavailable(crate::error::Unavailable::caused_by(context, e))
    })
}

impl RedisSecurity {
    /// The files' contents, or `None` when no TLS file is named (the system's CAs are used
    /// for `rediss://` then).
    fn certificates(&self) -> Result<Option<TlsCertificates>, StoreError> {
        let client_tls = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some(ClientTlsConfig {
                client_cert: read("client certificate", cert)?,
                client_key: read("client key", key)?,
            }),
            (None, None) => None,
            _ => {
                return Err(StoreError::Unavailable(
                    "redis: a client certificate and its key go together".into(),
                ))
            }
        };
        let root_cert = match &self.ca_file {
            Some(ca) => Some(read("CA file", ca)?),
            None => None,
        };
        Ok(
            (client_tls.is_some() || root_cert.is_some()).then_some(TlsCertificates {
                client_tls,
                root_cert,
            }),
        )
    }

    /// Whether TLS files are named: then sentinels are reached over TLS too (a deployment
    /// that runs Redis with TLS runs its sentinels with `tls-port` and `tls-replication yes`).
    pub(super) fn uses_tls(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some()
    }

    /// The URL scheme for a node found at run time (a sentinel, the master it names).
    pub(super) fn scheme(&self) -> &'static str {
        if self.uses_tls() {
            "rediss"
        } else {
            "redis"
        }
    }

    /// The same TLS material with the sentinels' credentials, for asking a sentinel.
    pub(super) fn for_sentinels(&self) -> RedisSecurity {
        RedisSecurity {
            username: self.sentinel_username.clone(),
            password: self.sentinel_password.clone(),
            sentinel_username: None,
            sentinel_password: None,
            ..self.clone()
        }
    }

    /// A client for one node: the URL's credentials, else these; TLS material applied to a
    /// `rediss://` URL (and refused with a plain one, where it would be silently unused).
    pub(super) fn client(&self, url: &str) -> Result<redis::Client, StoreError> {
        let info = url.into_connection_info().map_err(|e| {
            let context = format!("redis: URL {}", redact_url(url));
            StoreError::Unavailable(crate::error::Unavailable::caused_by(context, e))
        })?;
        let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        let mut settings = info.redis_settings().clone();
        if settings.username().is_none() {
            if let Some(user) = &self.username {
                settings = settings.set_username(user);
            }
        }
        if settings.password().is_none() {
            if let Some(password) = &self.password {
                settings = settings.set_password(password);
            }
        }
        let info = info.set_redis_settings(settings);
        match self.certificates()? {
            Some(certs) if tls => redis::Client::build_with_tls(info, certs).map_err(unavailable),
            Some(_) => Err(StoreError::Unavailable(
                format!(
                    "redis: a CA file or client certificate needs a rediss:// URL, not {}",
                    redact_url(url)
                )
                .into(),
            )),
            None => redis::Client::open(info).map_err(unavailable),
        }
    }

    /// The same for a Cluster's seed nodes.
    pub(super) fn cluster(
        &self,
        mut builder: ClusterClientBuilder,
    ) -> Result<ClusterClientBuilder, StoreError> {
        if let Some(user) = &self.username {
            builder = builder.username(user);
        }
        if let Some(password) = &self.password {
            builder = builder.password(password);
        }
        if let Some(certs) = self.certificates()? {
            builder = builder.certs(certs);
        }
        Ok(builder)
    }
}

/// The URL with its password replaced by `***` (`redis://user:***@host`), for messages and
/// logs: a program reporting a bad `--redis` URL must not print the secret in it. A URL
/// without a password comes back as it is.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact_url("rediss://app:s3cret@redis:6380/0"),
            "rediss://app:***@redis:6380/0"
        );
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        let s = RedisSecurity {
            password: Some("s3cret".into()),
            ..RedisSecurity::default()
        };
        assert!(!format!("{s:?}").contains("s3cret"));
    }
}
