//! The Redis store over TLS with an ACL user, against a real `redis-server` started with
//! `--tls-port` and certificates this test makes with openssl: the whole behavioural suite,
//! then credentials from the URL and from the config, a wrong CA or password failing at once
//! with a clear error, and a 3-master Cluster with `tls-cluster yes` reached over TLS as the
//! ACL user on every node, including by a wake-up subscription that moves to a node it learned
//! from the cluster.
//!
//! The server's `default` user may only PING and list clients (so readiness checks work on the
//! plain port and nothing else does); the store's user `floodgate` may touch only keys and
//! channels under its prefix `fg:`.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use floodgate::{
    AcquireOptions, Floodgate, LimiterSpec, RedisConfig, RedisSecurity, RedisStore, StoreError,
};
use support::certs::{self, Pair};
use support::RedisServer;

const USER: &str = "floodgate";
const PASSWORD: &str = "s3cret-for-tests";

/// A redis-server with TLS on `tls_port` and the ACL users above; dropped with the test.
struct TlsRedis {
    server: RedisServer,
    tls_port: u16,
    ca: Pair,
    dir: PathBuf,
}

impl TlsRedis {
    fn start() -> TlsRedis {
        let dir = std::env::temp_dir().join(format!(
            "floodgate-redis-tls-{}-{}",
            std::process::id(),
            support::free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = certs::ca(&dir, "ca");
        let leaf = certs::leaf(&dir, &ca, "redis");
        let tls_port = support::free_port().to_string();
        let password = format!(">{PASSWORD}");
        let server = RedisServer::start_on_a_free_port(&[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            leaf.cert.to_str().unwrap(),
            "--tls-key-file",
            leaf.key.to_str().unwrap(),
            "--tls-ca-cert-file",
            ca.cert.to_str().unwrap(),
            "--tls-auth-clients",
            "optional",
            "--user",
            "default",
            "on",
            "nopass",
            "resetkeys",
            "resetchannels",
            "-@all",
            "+ping",
            "+client|list",
            "--user",
            USER,
            "on",
            &password,
            "~fg:*",
            "&fg:*",
            "+@all",
        ]);
        TlsRedis {
            server,
            tls_port: tls_port.parse().unwrap(),
            ca,
            dir,
        }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.tls_port)
    }

    /// Credentials and CA given apart from the URL, as `FLOODGATE_REDIS_*` would.
    fn config(&self) -> RedisConfig {
        let mut config = RedisConfig::new(self.url());
        config.security = RedisSecurity {
            ca_file: Some(self.ca.cert.clone()),
            username: Some(USER.into()),
            password: Some(PASSWORD.into()),
            ..RedisSecurity::default()
        };
        config
    }

    /// `CLIENT LIST` on the plain port, as the default user.
    fn client_list(&self) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.server.port.to_string(), "client", "list"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// The whole behavioural suite, over TLS, as the ACL user.
store_suite!(false, async {
    let redis = TlsRedis::start();
    let store = RedisStore::connect(redis.config())
        .await
        .expect("connect over TLS");
    (Floodgate::with_store(store), redis)
});

/// Connects with a bound: a failure must come back, not hang.
async fn connect(config: RedisConfig) -> Result<RedisStore, StoreError> {
    tokio::time::timeout(Duration::from_secs(30), RedisStore::connect(config))
        .await
        .expect("connect answered instead of hanging")
}

#[tokio::test]
async fn the_store_talks_tls_as_its_acl_user_with_credentials_from_the_url_too() {
    let redis = TlsRedis::start();
    let mut config = RedisConfig::new(format!(
        "rediss://{USER}:{PASSWORD}@127.0.0.1:{}/",
        redis.tls_port
    ));
    config.security.ca_file = Some(redis.ca.cert.clone());
    let gate = Floodgate::with_store(connect(config).await.expect("connect"));
    gate.define("tls", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    let permit = gate
        .limiter("tls")
        .await
        .unwrap()
        .acquire(AcquireOptions::new())
        .await
        .unwrap();
    assert!(permit.release().await.unwrap());
    let clients = redis.client_list();
    assert!(
        clients.contains(&format!("user={USER}")),
        "the store's connections are the ACL user's: {clients}"
    );
    assert!(
        clients
            .lines()
            .filter(|l| l.contains(&format!("user={USER}")))
            .all(|l| l.contains(&format!("laddr=127.0.0.1:{}", redis.tls_port))),
        "and all over the TLS port: {clients}"
    );
}

#[tokio::test]
async fn a_wrong_ca_or_password_fails_at_once_with_a_clear_error() {
    let redis = TlsRedis::start();

    let mut wrong_ca = redis.config();
    let other = certs::ca(&redis.dir, "other-ca");
    wrong_ca.security.ca_file = Some(other.cert);
    let err = connect(wrong_ca).await.expect_err("an unknown issuer");
    let text = err.to_string();
    eprintln!("wrong CA: {text}");
    assert!(
        text.contains("certificate") || text.contains("UnknownIssuer"),
        "names the certificate problem: {text}"
    );

    let mut wrong_password = redis.config();
    wrong_password.security.password = Some("not-it".into());
    let text = connect(wrong_password)
        .await
        .expect_err("a wrong password")
        .to_string();
    eprintln!("wrong password: {text}");
    assert!(
        text.to_lowercase().contains("authentication failed") || text.contains("WRONGPASS"),
        "names the authentication problem: {text}"
    );

    // No credentials: the default user may not run the scripts.
    let mut anonymous = redis.config();
    anonymous.security.username = None;
    anonymous.security.password = None;
    match connect(anonymous).await {
        Err(e) => assert!(e.to_string().to_uppercase().contains("NOPERM"), "{e}"),
        Ok(store) => {
            let gate = Floodgate::with_store(store);
            let e = gate
                .define("x", LimiterSpec::concurrency(1))
                .await
                .expect_err("the default user has no rights");
            assert!(e.to_string().to_uppercase().contains("NOPERM"), "{e}");
        }
    }

    // TLS files with a plain URL would be silently unused: refused instead.
    let mut plain = redis.config();
    plain.urls = vec![redis.server.url()];
    let text = connect(plain).await.expect_err("plain URL").to_string();
    assert!(text.contains("rediss://"), "{text}");

    // A missing CA file is named.
    let mut missing = redis.config();
    missing.security.ca_file = Some(redis.dir.join("nope.pem"));
    let text = connect(missing).await.expect_err("missing").to_string();
    assert!(text.contains("nope.pem"), "{text}");
}

/// A 3-master Cluster with `tls-cluster yes` and the ACL user, in a directory of its own (with
/// its CA): the nodes with their TLS ports, and `127.0.0.1:TLS_PORT` of each.
struct TlsCluster {
    nodes: Vec<(RedisServer, u16)>,
    addrs: Vec<String>,
    ca: Pair,
    dir: PathBuf,
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_cluster() -> TlsCluster {
    let dir = std::env::temp_dir().join(format!(
        "floodgate-redis-tls-cluster-{}-{}",
        std::process::id(),
        support::free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = certs::ca(&dir, "ca");
    let leaf = certs::leaf(&dir, &ca, "node");
    let password = format!(">{PASSWORD}");
    let nodes: Vec<(RedisServer, u16)> = (0..3)
        .map(|_| {
            // Its TLS port is drawn again with its port on each try: a port taken meanwhile
            // (the server exits at once) is not tried again.
            let tls_port = std::cell::Cell::new(0);
            let server = RedisServer::start_on_free_ports(|| {
                tls_port.set(support::free_port());
                let tls = tls_port.get().to_string();
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                    "--tls-port",
                    &tls,
                    "--tls-cluster",
                    "yes",
                    "--tls-replication",
                    "yes",
                    "--tls-cert-file",
                    leaf.cert.to_str().unwrap(),
                    "--tls-key-file",
                    leaf.key.to_str().unwrap(),
                    "--tls-ca-cert-file",
                    ca.cert.to_str().unwrap(),
                    "--tls-auth-clients",
                    "optional",
                    "--user",
                    USER,
                    "on",
                    &password,
                    "~*",
                    "&*",
                    "+@all",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            });
            (server, tls_port.get())
        })
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|(_, tls)| format!("127.0.0.1:{tls}"))
        .collect();
    let out = Command::new("redis-cli")
        .args(["--tls", "--cacert", ca.cert.to_str().unwrap()])
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cluster create: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !nodes.iter().all(|(n, _)| {
        let out = Command::new("redis-cli")
            .args(["-p", &n.port.to_string(), "cluster", "info"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok")
    }) {
        assert!(std::time::Instant::now() < deadline, "cluster never ok");
        std::thread::sleep(Duration::from_millis(100));
    }
    TlsCluster {
        nodes,
        addrs,
        ca,
        dir,
    }
}

#[tokio::test]
async fn a_cluster_talks_tls_as_the_acl_user_too() {
    let cluster = tls_cluster();
    let (nodes, addrs, ca) = (&cluster.nodes, &cluster.addrs, &cluster.ca);
    let mut config = RedisConfig::cluster(addrs.iter().map(|a| format!("rediss://{a}/")).collect());
    config.security = RedisSecurity {
        ca_file: Some(ca.cert.clone()),
        username: Some(USER.into()),
        password: Some(PASSWORD.into()),
        ..RedisSecurity::default()
    };
    let gate = Floodgate::with_store(connect(config).await.expect("connect to the TLS cluster"));
    // Names spread over the three masters' slots.
    for name in ["a", "b", "c", "d", "e", "f"] {
        gate.define(name, LimiterSpec::concurrency(1))
            .await
            .unwrap();
        let limiter = gate.limiter(name).await.unwrap();
        let held = limiter.acquire(AcquireOptions::new()).await.unwrap();
        let waiter = {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.acquire(AcquireOptions::new()).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(held.release().await.unwrap());
        let next = waiter.await.unwrap().expect("the waiter is woken over TLS");
        assert!(next.release().await.unwrap());
    }
    for (node, tls) in nodes {
        let out = Command::new("redis-cli")
            .args(["-p", &node.port.to_string(), "client", "list"])
            .output()
            .unwrap();
        let clients = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            clients.lines().any(|l| l.contains(&format!("user={USER}"))
                && l.contains(&format!("laddr=127.0.0.1:{tls}"))),
            "the store reached node {tls} over TLS as {USER}: {clients}"
        );
    }
}

/// A store seeded with one node of a TLS Cluster, with the ACL user in its URL, loses its
/// wake-up subscription there (the user may no longer subscribe on that node: Redis drops the
/// subscription, and every resubscription there is refused): it moves to a node it learned from
/// the cluster, over TLS, as the URL's user, and a queued acquire is woken by another store's
/// release. Liveness bounds only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_subscription_moves_over_tls_to_a_node_learned_from_the_cluster() {
    let cluster = tls_cluster();
    let seed = &cluster.nodes[0];
    let security = RedisSecurity {
        ca_file: Some(cluster.ca.cert.clone()),
        ..RedisSecurity::default()
    };
    let mut config = RedisConfig::cluster(vec![format!(
        "rediss://{USER}:{PASSWORD}@127.0.0.1:{}/",
        seed.1
    )]);
    config.security = security.clone();
    let waiter = Floodgate::with_store(connect(config).await.expect("connect"));
    let mut config = RedisConfig::cluster(
        cluster
            .addrs
            .iter()
            .rev()
            .map(|a| format!("rediss://{USER}:{PASSWORD}@{a}/"))
            .collect(),
    );
    config.security = security;
    let releaser = Floodgate::with_store(connect(config).await.expect("connect"));
    let plain = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-p", &seed.0.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // A limiter on another node's slots (its scripts publish as the user, who may no longer
    // publish on the seed).
    let me = plain(&["cluster", "myid"]);
    let my_ranges: Vec<(u16, u16)> = plain(&["cluster", "nodes"])
        .lines()
        .find(|l| l.starts_with(&me))
        .unwrap()
        .split_whitespace()
        .skip(8)
        .filter_map(|r| {
            let (lo, hi) = r.split_once('-').unwrap_or((r, r));
            Some((lo.parse().ok()?, hi.parse().ok()?))
        })
        .collect();
    let name = (0..1000)
        .map(|i| format!("moved-{i}"))
        .find(|n| {
            let slot: u16 = plain(&["cluster", "keyslot", &format!("{{{n}}}")])
                .parse()
                .unwrap();
            !my_ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&slot))
        })
        .unwrap();
    // The subscription starts on the seed (the only node it was given).
    assert!(
        plain(&["client", "list"])
            .lines()
            .any(|l| l.contains(&format!("user={USER}"))
                && l.contains(&format!("laddr=127.0.0.1:{}", seed.1))
                && l.contains("sub=1")),
        "the store did not subscribe on its seed"
    );
    // The user may no longer subscribe on the seed: Redis drops its subscription there.
    assert_eq!(plain(&["acl", "setuser", USER, "resetchannels"]), "OK");
    releaser
        .define(&name, LimiterSpec::concurrency(1))
        .await
        .unwrap();
    let held = releaser
        .limiter(&name)
        .await
        .unwrap()
        .acquire(AcquireOptions::new().wait(Duration::ZERO))
        .await
        .unwrap();
    let limiter = waiter.limiter(&name).await.unwrap();
    let queued = tokio::spawn(async move {
        limiter
            .acquire(AcquireOptions::new().wait(Duration::from_secs(600)))
            .await
    });
    let status_of = releaser.limiter(&name).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while status_of.status().await.unwrap().waiting != 1 {
        assert!(std::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(held.release().await.unwrap());
    let granted = tokio::time::timeout(Duration::from_secs(30), queued)
        .await
        .expect("no wake-up within 30 s (its own wait is 600 s): the subscription stayed")
        .unwrap()
        .expect("granted");
    assert!(granted.release().await.unwrap());
    // Its subscription now sits on another node, over TLS, as the URL's user.
    let subscribed_elsewhere = cluster.nodes[1..].iter().any(|(node, tls)| {
        let out = Command::new("redis-cli")
            .args(["-p", &node.port.to_string(), "client", "list"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            l.contains(&format!("user={USER}"))
                && l.contains(&format!("laddr=127.0.0.1:{tls}"))
                && l.contains("sub=1")
        })
    });
    assert!(subscribed_elsewhere, "no TLS subscription on another node");
}
