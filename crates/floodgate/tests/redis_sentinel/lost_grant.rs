//! A failover to a replica that missed a grant: learned, not over-admitted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use floodgate::{AcquireOptions, Floodgate, KeyedSpec, LimiterSpec, RedisConfig, RedisStore};

use crate::harness::{cli, scratch_dir, start_sentinels, wait_until};
use crate::support::RedisServer;

/// A TCP relay between the replica and the master that can stop passing the master's stream on:
/// a replica that has not received the master's last writes when the master dies, as happens
/// when replication lags (Redis replication is asynchronous).
struct ReplicationLink {
    port: u16,
    /// While set, what the master sends is dropped instead of passed to the replica.
    cut: Arc<AtomicBool>,
}

impl ReplicationLink {
    async fn start(master_port: u16) -> ReplicationLink {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let cut_relay = Arc::clone(&cut);
        tokio::spawn(async move {
            while let Ok((replica, _)) = listener.accept().await {
                let Ok(master) = tokio::net::TcpStream::connect(("127.0.0.1", master_port)).await
                else {
                    continue;
                };
                let (mut from_replica, mut to_replica) = replica.into_split();
                let (mut from_master, mut to_master) = master.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_replica, &mut to_master).await;
                });
                let cut = Arc::clone(&cut_relay);
                tokio::spawn(async move {
                    let mut buf = vec![0_u8; 16 * 1024];
                    while let Ok(n) = from_master.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if !cut.load(Ordering::SeqCst)
                            && to_replica.write_all(&buf[..n]).await.is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        ReplicationLink { port, cut }
    }
}

/// Issue 10 and 16: a failover to a replica that missed the last writes. A grant made on the
/// master never reaches the replica; the master is SIGKILLed and the sentinels promote the
/// replica, where the limiter exists but without that grant. The store notices the new master
/// before it runs anything on it and puts the limiter in a learning window: nothing is granted
/// over the lost grant (the independent witness: the permits this test holds), whose holder
/// re-adopts it with its heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_that_lost_a_grant_is_learned_not_over_admitted() {
    lost_grant_round(false).await;
}

/// The same on a keyed limiter (the keyed script; 2 per key, so the lost grant's key binds as
/// well as the total): the try-once acquires ask for the lost grant's key and for another, the
/// heartbeats carry their key and re-adopt under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_that_lost_a_keyed_grant_is_learned_not_over_admitted() {
    lost_grant_round(true).await;
}

async fn lost_grant_round(keyed: bool) {
    let on = |key: &str| {
        if keyed {
            AcquireOptions::new().key(key)
        } else {
            AcquireOptions::new()
        }
    };
    let dir = scratch_dir("floodgate-sentinel-lost");
    let mut master = RedisServer::start();
    let link = ReplicationLink::start(master.port).await;
    let replica =
        RedisServer::start_on_a_free_port(&["--replicaof", "127.0.0.1", &link.port.to_string()]);
    wait_until("the replica is in sync", || {
        cli(replica.port, &["info", "replication"]).contains("master_link_status:up")
    });
    let (sentinels, url) = start_sentinels(&dir, master.port);
    let mut config = RedisConfig::new(url);
    config.learning_window = Some(Duration::from_secs(2));
    let gate = Floodgate::with_store(RedisStore::connect(config).await.unwrap());
    let spec = LimiterSpec::concurrency(2).with_default_lease(Duration::from_secs(60));
    if keyed {
        gate.define_keyed("lost", spec, KeyedSpec::per_key(2))
            .await
            .unwrap();
    } else {
        gate.define("lost", spec).await.unwrap();
    }
    let limiter = gate.limiter("lost").await.unwrap();

    let mut first = limiter.acquire(on("org")).await.unwrap();
    // The replica has the limiter and the first grant...
    let acked = cli(master.port, &["wait", "1", "5000"]);
    assert_eq!(
        acked.trim(),
        "1",
        "the replica never acknowledged the first grant"
    );
    // ...but not the second: the link stops passing the master's writes on.
    link.cut.store(true, Ordering::SeqCst);
    let mut second = limiter.acquire(on("org")).await.unwrap();
    let held = 2;
    master.kill();

    // Try-once acquires until the store answers from the new master: the first answer must not
    // be a grant (the replica counts one holder of 2; two are working).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tries = 0_u32;
    let answer = loop {
        // (Keyed: the lost grant's key and a new one, in turn.)
        tries += 1;
        let key = if tries % 2 == 0 { "org" } else { "other" };
        match limiter.acquire(on(key).wait(Duration::ZERO)).await {
            Err(e) if e.to_string().contains("redis") => {
                assert!(Instant::now() < deadline, "the store never answered: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other,
        }
    };
    assert!(
        matches!(&answer, Err(e) if e.is_wait_timeout()),
        "granted over the lost grant ({held} held, limit 2, keyed: {keyed}): {answer:?}"
    );
    let new_master = sentinels[0].master_info();
    assert_eq!(
        new_master.get("port").map(String::as_str),
        Some(replica.port.to_string().as_str()),
        "the sentinels promoted the replica: {new_master:?}"
    );
    assert!(limiter.status().await.unwrap().learning);
    // The heartbeats: the lost grant is re-adopted, the other extended; both count.
    second.extend(Duration::from_secs(60)).await.unwrap();
    first.extend(Duration::from_secs(60)).await.unwrap();
    assert_eq!(limiter.status().await.unwrap().in_use, held);
    // The window ends with the limit in force over both holders.
    let after = limiter
        .acquire(on("other").wait(Duration::from_secs(3)))
        .await;
    assert!(matches!(&after, Err(e) if e.is_wait_timeout()), "{after:?}");
    drop(sentinels);
    let _ = std::fs::remove_dir_all(&dir);
}
