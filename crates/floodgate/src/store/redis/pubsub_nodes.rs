//! Where a Cluster store's wake-up subscription connects: any live node of the cluster.
//!
//! Classic `PUBLISH` in a Redis Cluster reaches the subscribers of every node (the cluster bus
//! carries it), so the subscription may sit on any node, master or replica. It starts on the
//! first seed that answers; when its node is lost (killed, or its host gone, while its shard
//! fails over to a replica and the cluster stays healthy), it moves to the next node that
//! answers: first the node it was on (a cut connection to a live node comes back there), then
//! the seeds, then the nodes the cluster reported (`CLUSTER SLOTS` through the store's cluster
//! connection: asked once at connect, so a store seeded with one node knows the others before
//! that node dies, and again after a round in which no known node answered). A client for a
//! discovered node is built as a seed's is (the first seed's scheme and credentials, then
//! `RedisSecurity::client`: TLS material, ACL user), so TLS and auth hold for it too.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redis::aio::PubSub;
use redis::{ConnectionAddr, IntoConnectionInfo, RedisError, Value};

use super::conn::{Conn, RedisSecurity};

/// The nodes a Cluster store's subscription may connect to, and how.
pub(super) struct ClusterNodes {
    /// The seed URLs and then the nodes last discovered (deduplicated by address); the
    /// subscription tries them in turn.
    known: Mutex<Known>,
    /// The store's cluster connection, to ask the cluster which nodes it has now.
    conn: Conn,
    /// TLS material and ACL credentials, applied to every node's client as to a seed's.
    security: RedisSecurity,
    /// `scheme://userinfo@` of the first seed (`rediss://` for TLS), for discovered nodes' URLs.
    prefix: String,
    /// Bound on connecting and subscribing to one node, so a node whose host vanished (no
    /// refusal, just silence) does not hold up the others.
    timeout: Duration,
}

/// The candidate nodes.
#[derive(Default)]
struct Known {
    /// Seeds first, then discovered nodes: `(host, port)`, URL.
    nodes: Vec<((String, u16), String)>,
    /// How many of `nodes` are seeds (kept across discoveries).
    seeds: usize,
    /// The node the subscription is (or was last) on: tried first on a reconnect.
    current: usize,
}

impl ClusterNodes {
    /// The seeds of `urls` (a URL that does not parse is left out: connecting the cluster
    /// connection would have failed on it first).
    pub(super) fn new(
        urls: &[String],
        conn: Conn,
        security: RedisSecurity,
        timeout: Duration,
    ) -> Self {
        let mut known = Known::default();
        for url in urls {
            if let Some(addr) = address(url) {
                if !known.nodes.iter().any(|(a, _)| *a == addr) {
                    known.nodes.push((addr, url.clone()));
                }
            }
        }
        known.seeds = known.nodes.len();
        let prefix = urls.first().map_or_else(String::new, |u| url_prefix(u));
        ClusterNodes {
            known: Mutex::new(known),
            conn,
            security,
            prefix,
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribes to `channel` on the first node that answers: the current one, then the
    /// others known; if none does, on the nodes the cluster reports now.
    pub(super) async fn subscribe(&self, channel: &str) -> Result<PubSub, RedisError> {
        let mut tried: Vec<(String, u16)> = Vec::new();
        let mut last = None;
        for round in 0..2 {
            if round == 1 {
                if let Err(e) = self.discover().await {
                    tracing::debug!(error = %e, "wake-up subscription: cluster nodes unknown");
                    last.get_or_insert(e);
                }
            }
            let candidates: Vec<(usize, (String, u16), String)> = {
                let known = self.lock();
                let n = known.nodes.len();
                (0..n)
                    .map(|i| (known.current + i) % n.max(1))
                    .filter_map(|i| known.nodes.get(i).map(|(a, u)| (i, a.clone(), u.clone())))
                    .filter(|(_, a, _)| !tried.contains(a))
                    .collect()
            };
            for (index, addr, url) in candidates {
                tried.push(addr.clone());
                match self.try_node(&url, channel).await {
                    Ok(pubsub) => {
                        let mut known = self.lock();
                        // Discovery may have reordered the list meanwhile: find it again.
                        known.current = known
                            .nodes
                            .iter()
                            .position(|(a, _)| *a == addr)
                            .unwrap_or(index);
                        tracing::info!(node = %format!("{}:{}", addr.0, addr.1), "wake-up subscription on this node");
                        return Ok(pubsub);
                    }
                    Err(e) => {
                        tracing::debug!(node = %format!("{}:{}", addr.0, addr.1), error = %e, "wake-up subscription: node did not answer");
                        last = Some(e);
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            RedisError::from((
                redis::ErrorKind::Io,
                "no node of the cluster is known to subscribe on",
            ))
        }))
    }

    /// Connects to one node and subscribes, within the bound.
    async fn try_node(&self, url: &str, channel: &str) -> Result<PubSub, RedisError> {
        let client = self.security.client(url).map_err(|e| {
            RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "a node's client",
                e.to_string(),
            ))
        })?;
        let attempt = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok(pubsub)
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(RedisError::from((
                    redis::ErrorKind::Io,
                    "timed out connecting to a node",
                )))
            })
    }

    /// Asks the cluster (`CLUSTER SLOTS`, through the store's cluster connection) which nodes
    /// serve it now, and makes them the known nodes after the seeds.
    pub(super) async fn discover(&self) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        let reply: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await?;
        let found = slot_nodes(&reply);
        let mut known = self.lock();
        let seeds = known.seeds;
        let current = known.nodes.get(known.current).map(|(a, _)| a.clone());
        known.nodes.truncate(seeds);
        for addr in found {
            if !known.nodes.iter().any(|(a, _)| *a == addr) {
                let url = format!("{}{}:{}/", self.prefix, host_in_url(&addr.0), addr.1);
                known.nodes.push((addr, url));
            }
        }
        known.current = current
            .and_then(|c| known.nodes.iter().position(|(a, _)| *a == c))
            .unwrap_or(0);
        Ok(())
    }
}

/// A URL's `(host, port)`, for telling nodes apart.
fn address(url: &str) -> Option<(String, u16)> {
    match url.into_connection_info().ok()?.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            Some((host.to_ascii_lowercase(), *port))
        }
        _ => None,
    }
}

/// `scheme://userinfo@` of a URL (`redis://` if it has no scheme).
fn url_prefix(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return "redis://".into();
    };
    let rest = &url[scheme_end + 3..];
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    match authority.rfind('@') {
        Some(at) => format!("{}{}", &url[..scheme_end + 3], &authority[..=at]),
        None => url[..scheme_end + 3].to_owned(),
    }
}

/// A host as it goes in a URL (an IPv6 address in brackets).
fn host_in_url(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// The nodes of a `CLUSTER SLOTS` reply: each range is `[start, end, [host, port, id, ..],
/// ...]` (masters, then their replicas). A node with no known endpoint (`?` or empty) is left
/// out.
fn slot_nodes(reply: &Value) -> Vec<(String, u16)> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let mut nodes = Vec::new();
    let Value::Array(ranges) = reply else {
        return nodes;
    };
    for range in ranges {
        let Value::Array(fields) = range else {
            continue;
        };
        for node in fields.iter().skip(2) {
            let Value::Array(node) = node else { continue };
            let host = node.first().and_then(text);
            let port = match node.get(1) {
                Some(Value::Int(p)) => u16::try_from(*p).ok(),
                Some(v) => text(v).and_then(|p| p.parse().ok()),
                None => None,
            };
            if let (Some(host), Some(port)) = (host, port) {
                let addr = (host.to_ascii_lowercase(), port);
                if !host.is_empty() && host != "?" && !nodes.contains(&addr) {
                    nodes.push(addr);
                }
            }
        }
    }
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovered_nodes_keep_the_seeds_scheme_and_credentials() {
        assert_eq!(url_prefix("rediss://app:pw@h:6380/0"), "rediss://app:pw@");
        assert_eq!(url_prefix("redis://h:6379/"), "redis://");
        assert_eq!(url_prefix("redis://h:6379/#x@y"), "redis://");
        assert_eq!(host_in_url("::1"), "[::1]");
        assert_eq!(host_in_url("10.0.0.1"), "10.0.0.1");
    }

    #[test]
    fn cluster_slots_replies_name_each_node_once() {
        let node = |h: &str, p: i64| {
            Value::Array(vec![
                Value::BulkString(h.as_bytes().to_vec()),
                Value::Int(p),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000),
                node("127.0.0.1", 7003),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("127.0.0.1", 7001),
                node("?", 7004),
                node("127.0.0.1", 7000),
            ]),
        ]);
        assert_eq!(
            slot_nodes(&reply),
            vec![
                ("127.0.0.1".to_owned(), 7000),
                ("127.0.0.1".to_owned(), 7003),
                ("127.0.0.1".to_owned(), 7001),
            ]
        );
    }
}
