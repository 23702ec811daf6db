//! Real services for tests: a `redis-server` (standalone or a 3-master cluster) on free
//! loopback ports, killed when the handle drops.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub(crate) mod certs;
mod ports;
pub(crate) mod relay;
pub(crate) mod rng;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) use self::ports::free_port;

fn ping(port: u16) -> bool {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "ping"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
        .unwrap_or(false)
}

/// `redis-cli -p port args...`'s output (empty if it could not run).
pub(crate) fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The commands the server on `port` ran since its start or `CONFIG RESETSTAT`, by name, with
/// their call counts (commands a script runs count too).
pub(crate) fn commandstats(port: u16) -> std::collections::BTreeMap<String, u64> {
    cli(port, &["INFO", "commandstats"])
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// One `redis-server` process.
pub(crate) struct RedisServer {
    pub(crate) port: u16,
    child: Option<Child>,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a standalone server with no persistence.
    pub(crate) fn start() -> Self {
        Self::start_on_a_free_port(&[])
    }

    /// Like `start_with`, on a port found free; if another process took it in between (our
    /// server exits at once), tries another one.
    pub(crate) fn start_on_a_free_port(extra: &[&str]) -> Self {
        Self::start_on_free_ports(|| extra.iter().map(|s| s.to_string()).collect())
    }

    /// Like `start_on_a_free_port`, with arguments made afresh for each try: arguments that
    /// name ports of their own (a TLS port) draw new ones too, so a port taken meanwhile is
    /// not tried again.
    pub(crate) fn start_on_free_ports(extra: impl Fn() -> Vec<String>) -> Self {
        for _ in 0..5 {
            let extra = extra();
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let mut server = Self::prepare(free_port(), &extra);
            if server.try_spawn() {
                return server;
            }
        }
        panic!("could not start redis-server on a free port after 5 tries");
    }

    pub(crate) fn start_with(port: u16, extra: &[&str]) -> Self {
        let mut server = Self::prepare(port, extra);
        server.spawn();
        server
    }

    fn prepare(port: u16, extra: &[&str]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("floodgate-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        RedisServer {
            port,
            child: None,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn spawn(&mut self) {
        assert!(
            self.try_spawn(),
            "redis-server on {} did not start",
            self.port
        );
    }

    /// Starts the process and waits until it answers; false if it exited first (the port was
    /// taken), so a PONG never comes from someone else's server.
    fn try_spawn(&mut self) -> bool {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                self.child = None;
                return false;
            }
            if ping(self.port) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the process (SIGKILL: a crash, not a shutdown).
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process (SIGSTOP) until [`resume`](Self::resume): it keeps its connections
    /// and reads nothing, as a hung node does.
    pub(crate) fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused process run on (SIGCONT).
    pub(crate) fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("a running redis-server").id();
        let sent = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill {signal} {pid}");
    }

    /// Whether some connection to this server has bytes it has not read yet (IPv4 loopback,
    /// from `/proc/net/tcp`): a request waits in its queue, as one sent to a paused server.
    pub(crate) fn has_unread_requests(&self) -> bool {
        let local = format!(":{:04X}", self.port);
        std::fs::read_to_string("/proc/net/tcp")
            .expect("/proc/net/tcp")
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // local address, remote address, state, tx_queue:rx_queue
                (f.len() > 4 && f[1].ends_with(&local)).then(|| f[4].to_owned())
            })
            .any(|queues| {
                queues
                    .split_once(':')
                    .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
                    .is_some_and(|rx| rx > 0)
            })
    }

    /// Starts it again on the same port (empty: no persistence).
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A 3-master Redis Cluster on loopback (with `with_replicas`, a replica per master too).
pub(crate) struct RedisCluster {
    pub(crate) nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Three masters, no replicas.
    pub(crate) fn start() -> Self {
        Self::start_with_replicas(0)
    }

    /// Three masters with `replicas` replicas each (`redis-cli --cluster create
    /// --cluster-replicas`), returned once every node says the cluster is ok and every replica
    /// has synced with its master.
    pub(crate) fn start_with_replicas(replicas: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..3 * (1 + replicas))
            .map(|_| {
                RedisServer::start_on_a_free_port(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Wait until every node agrees the cluster is up (and every replica has synced).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = nodes.iter().all(|n| {
                let info = cli(n.port, &["cluster", "info"]);
                let replication = cli(n.port, &["info", "replication"]);
                info.contains("cluster_state:ok")
                    && (!replication.contains("role:slave")
                        || replication.contains("master_link_status:up"))
            });
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "cluster never became ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        RedisCluster { nodes }
    }

    /// The node on `port`.
    pub(crate) fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .expect("a node of this cluster")
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// Polls the limiter's status until `cond` holds of it (a liveness bound only), and returns it.
pub(crate) async fn until_status<B: floodgate::LimiterBackend>(
    limiter: &floodgate::Limiter<B>,
    what: &str,
    cond: impl Fn(&floodgate::LimiterStatus) -> bool,
) -> floodgate::LimiterStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = limiter.status().await.expect("status");
        if cond(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}: {status:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
