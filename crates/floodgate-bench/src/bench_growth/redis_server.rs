//! `bench-growth`'s own `redis-server`, on a free loopback port, stopped when dropped.
//!
//! A port found by binding `127.0.0.1:0` and closing it can be taken before redis-server binds
//! it (and it comes from the ephemeral range, which every outgoing connection draws from).
//! So, as the test support does (`crates/floodgate/tests/support/ports.rs`), the port is drawn
//! below the ephemeral range, a start whose server exits (the port was taken) is retried on
//! another, and the server that answers must be ours: its `process_id` is our child's, never
//! a PONG from whoever else listens there.

use std::hash::{BuildHasher, RandomState};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use floodgate_server::cli::Failure;

/// The lowest port drawn: above the well-known and most registered services' ports.
const FIRST: u16 = 10_000;

/// Starts tried before giving up.
const TRIES: usize = 5;

fn fail(message: impl std::fmt::Display) -> Failure {
    Failure {
        code: 1,
        message: message.to_string(),
    }
}

/// The first port of the kernel's ephemeral range (Linux's default when it cannot be read).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A loopback port that was free just now, below the ephemeral range when it leaves room for
/// one, drawn at random so two benches rarely try the same.
fn free_port() -> Result<u16, Failure> {
    let end = ephemeral_start();
    if end > FIRST + 1_000 {
        let random = RandomState::new();
        for draw in 0..1_000u64 {
            let span = u64::from(end - FIRST);
            let port = FIRST + u16::try_from(random.hash_one(draw) % span).unwrap_or(0);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| fail(format!("no free port: {e}")))
}

/// A `redis-server` of our own; see the module documentation.
pub(crate) struct RedisServer {
    /// The process, killed on drop.
    child: Child,
    /// Where it listens.
    port: u16,
}

impl RedisServer {
    /// Starts one on a free port (retrying on another when the port was taken meanwhile).
    pub(crate) async fn start() -> Result<Self, Failure> {
        let mut ports = Vec::with_capacity(TRIES);
        for _ in 0..TRIES {
            ports.push(free_port()?);
        }
        Self::start_on(&ports).await
    }

    /// Starts one on the first of `ports` where our own server comes up.
    async fn start_on(ports: &[u16]) -> Result<Self, Failure> {
        for &port in ports {
            if let Some(server) = Self::try_start(port).await? {
                return Ok(server);
            }
        }
        Err(fail(format!(
            "redis-server did not start on any of the ports {ports:?} (each taken, or the \
             server failed; try --redis URL or --no-redis)"
        )))
    }

    /// `None` when the server exited (the port was taken) or another answered there.
    async fn try_start(port: u16) -> Result<Option<Self>, Failure> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| {
                fail(format!(
                    "cannot start redis-server ({e}): install it, or pass --redis URL or --no-redis"
                ))
            })?;
        let mut server = RedisServer { child, port };
        let client = redis::Client::open(server.url()).map_err(fail)?;
        let start = Instant::now();
        loop {
            if matches!(server.child.try_wait(), Ok(Some(_))) {
                return Ok(None);
            }
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let info = redis::cmd("INFO")
                    .arg("server")
                    .query_async::<String>(&mut conn)
                    .await;
                if let Ok(info) = info {
                    let pid = info
                        .lines()
                        .find_map(|l| l.strip_prefix("process_id:"))
                        .and_then(|p| p.trim().parse::<u32>().ok());
                    if pid == Some(server.child.id()) {
                        return Ok(Some(server));
                    }
                    // Someone else's server on the port: ours cannot bind it and exits.
                }
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(fail("redis-server did not answer within 10 s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The URL of the server.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port taken between the draw and the start (here by a listener that is not even
    /// Redis) is skipped: the server comes up on the next port, and it is ours.
    #[tokio::test]
    async fn a_port_taken_meanwhile_is_skipped() {
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
        let taken_port = taken.local_addr().expect("addr").port();
        let free = free_port().expect("a free port");
        let server = RedisServer::start_on(&[taken_port, free])
            .await
            .expect("started on the second port");
        assert_eq!(server.port, free);
        drop(taken);
    }

    /// Another Redis already on the port answers PING, but it is not ours: skipped too.
    #[tokio::test]
    async fn someone_elses_redis_is_not_taken_for_ours() {
        let other = RedisServer::start().await.expect("another server");
        let free = free_port().expect("a free port");
        let ours = RedisServer::start_on(&[other.port, free])
            .await
            .expect("started on the second port");
        assert_eq!(ours.port, free);
        assert_ne!(ours.child.id(), other.child.id());
    }
}
