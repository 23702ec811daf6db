//! A failover by hand to a replica that missed the last grant: the store talks to Redis
//! through a relay, which the test points from the master to the replica once the replica is
//! promoted (`REPLICAOF NO ONE`), cutting the relay's connections. A health probe's `PING`
//! then reconnects the store's shared connection silently (no script call fails), so the first
//! script call to reach the promoted replica is what must tell the store: Redis 7 does not
//! replicate scripts, so that call is answered `NOSCRIPT`, and the store checks the master
//! (its `run_id` changed) before loading the script (`store/redis/eval.rs`).
//!
//! The witness: the permits this test holds (answered grants it has not let go), which the
//! store cannot see, against the limit. No assertion depends on timing; waits are liveness
//! bounds only.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use floodgate::{
    AcquireError, AcquireOptions, Floodgate, LimiterSpec, RedisConfig, RedisStore, Refusal, Store,
};

fn cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn info_field(port: u16, section: &str, field: &str) -> Option<String> {
    cli(port, &["INFO", section])
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
}

/// A TCP relay to whichever Redis port it points at; `cut` drops every connection it carries.
struct Relay {
    port: u16,
    target: Arc<AtomicU16>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn start(target: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Arc::new(AtomicU16::new(target));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (to, list) = (Arc::clone(&target), Arc::clone(&conns));
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let port = to.load(Ordering::SeqCst);
                let handle = tokio::spawn(async move {
                    if let Ok(mut redis) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut redis).await;
                    }
                });
                list.lock().unwrap().push(handle);
            }
        });
        Relay {
            port,
            target,
            conns,
        }
    }

    /// Points new connections at `port` and drops the ones open (their clients see them
    /// closed, as after a failover).
    fn point_at(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
        for handle in self.conns.lock().unwrap().drain(..) {
            handle.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_replica_that_missed_a_grant_grants_nothing_over_it() {
    let master = support::RedisServer::start();
    let replica = support::RedisServer::start();
    assert_eq!(
        cli(
            replica.port,
            &["REPLICAOF", "127.0.0.1", &master.port.to_string()]
        ),
        "OK"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while info_field(replica.port, "replication", "master_link_status").as_deref() != Some("up") {
        assert!(Instant::now() < deadline, "the replica never synced");
        std::thread::sleep(Duration::from_millis(20));
    }
    let relay = Relay::start(master.port).await;
    let mut config = RedisConfig::new(format!("redis://127.0.0.1:{}/", relay.port));
    config.learning_window = Some(Duration::from_secs(20));
    let gate = Floodgate::with_store(RedisStore::connect(config).await.expect("connect"));
    let spec = LimiterSpec::concurrency(2).with_default_lease(Duration::from_secs(60));
    gate.define("promoted", spec).await.expect("define");
    let limiter = gate.limiter("promoted").await.expect("limiter");
    let now = || AcquireOptions::new().wait(Duration::ZERO);
    // The witness: every permit answered and not let go.
    let mut held = vec![limiter.acquire(now()).await.expect("kept")];
    // The replica has the limiter and the first grant, then stops following the master.
    assert_eq!(cli(master.port, &["WAIT", "1", "5000"]), "1");
    assert_eq!(cli(replica.port, &["REPLICAOF", "NO", "ONE"]), "OK");
    // Granted on the old master only: the failover loses it, its holder keeps working.
    held.push(limiter.acquire(now()).await.expect("lost"));
    // What the store relies on: the promoted replica has data replicated by the scripts'
    // effects, but none of the scripts.
    let on_master = info_field(master.port, "memory", "number_of_cached_scripts");
    assert!(
        on_master.as_deref().and_then(|n| n.parse::<u32>().ok()) >= Some(1),
        "the store loaded its scripts on the master: {on_master:?}"
    );
    assert_eq!(
        info_field(replica.port, "memory", "number_of_cached_scripts").as_deref(),
        Some("0"),
        "a promoted replica has the store's scripts: NOSCRIPT would not tell"
    );

    relay.point_at(replica.port);
    // A health probe: its PING finds the connection dead, reconnects it (to the promoted
    // replica) and succeeds; no script call failed.
    gate.store().ping().await.expect("ping after the failover");
    match limiter.acquire(now()).await {
        Ok(p) => {
            held.push(p);
            panic!(
                "granted on the promoted replica's older state: {} permits held against a \
                 limit of 2",
                held.len()
            );
        }
        Err(AcquireError::Refused(Refusal::WaitTimeout { .. })) => {}
        Err(e) => panic!("unexpected answer {e:?}"),
    }
    let status = limiter.status().await.expect("status");
    assert!(status.learning, "not in a learning window: {status:?}");
    assert_eq!(status.in_use, 1, "the replica's state: {status:?}");
    // The lost grant's holder re-claims it by its heartbeat; nothing is granted over it.
    for p in &mut held {
        p.extend(Duration::from_secs(60)).await.expect("re-adopted");
    }
    assert_eq!(limiter.status().await.expect("status").in_use, 2);
    assert!(
        matches!(
            limiter.acquire(now()).await,
            Err(AcquireError::Refused(Refusal::WaitTimeout { .. }))
        ),
        "granted over the re-adopted permits"
    );
    for p in held {
        p.detach();
    }
}
