//! A Sentinel failover under load on a keyed limiter, watched by an independent witness per key
//! and in total (the plain one: `failover.rs`).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use floodgate::{
    AcquireOptions, Floodgate, KeyOverride, KeyedSpec, LimiterBackend, LimiterSpec, RedisConfig,
    RedisStore,
};

use crate::harness::{
    cli, keep_sample, scratch_dir, start_sentinels, wait_for_load, wait_until, LIMIT, WORKERS,
};
use crate::support::RedisServer;

const KEYS: [&str; 3] = ["a", "b", "c"];
/// Each key's limit: 1 per key, "c" overridden to 4. Below a fair share of the total (the
/// round robin alone would give a and b more than 1 each), and the total binds too.
const KEY_LIMITS: [u32; 3] = [1, 1, 4];

/// Who is inside the critical section, counted by the workers themselves: the store cannot see
/// it.
#[derive(Default)]
struct Witness {
    inside: AtomicU32,
    peak: AtomicU32,
    key_inside: [AtomicU32; 3],
    key_peak: [AtomicU32; 3],
    grants: AtomicU64,
    /// Grants to acquires that started after the kill.
    grants_after_kill: AtomicU64,
    samples: Mutex<Vec<String>>,
}

/// The master is SIGKILLed while twelve workers share three keys (1 per key, "c" overridden
/// to 4; 4 in total, so the total binds as well as each key): the store follows the sentinels,
/// every acquire is answered, grants resume, and the witness never sees more holders of a key
/// than its limit nor more than 4 in all (the replica may lack the last grants: the limiter
/// learns, as a plain one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyed_limiter_follows_a_sentinel_failover_under_load_within_its_limits() {
    let dir = scratch_dir("floodgate-sentinel-keyed");
    let mut master = RedisServer::start();
    let replica =
        RedisServer::start_on_a_free_port(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    wait_until("the replica is in sync", || {
        cli(replica.port, &["info", "replication"]).contains("master_link_status:up")
    });
    let (sentinels, url) = start_sentinels(&dir, master.port);
    let store = RedisStore::connect(RedisConfig::new(url))
        .await
        .expect("connect through the sentinels");
    let gate = Floodgate::with_store(store);
    let spec = LimiterSpec::concurrency(LIMIT)
        .with_default_lease(Duration::from_secs(3))
        .with_max_wait(Duration::from_secs(5));
    gate.define_keyed("failover", spec, KeyedSpec::per_key(1))
        .await
        .unwrap();
    let limiter = gate.limiter("failover").await.unwrap();
    let wide = KeyOverride {
        concurrency: Some(KEY_LIMITS[2]),
        weight: 1,
    };
    limiter.backend().put_key("c", Some(wide)).await.unwrap();

    let witness = Arc::new(Witness::default());
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        let (limiter, witness, stop, killed) = (
            limiter.clone(),
            Arc::clone(&witness),
            Arc::clone(&stop),
            Arc::clone(&killed),
        );
        let k = i % KEYS.len();
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let after_kill = killed.load(Ordering::SeqCst);
                let options = AcquireOptions::new()
                    .key(KEYS[k])
                    .wait(Duration::from_secs(2));
                match limiter.acquire(options).await {
                    Ok(permit) => {
                        let n = witness.inside.fetch_add(1, Ordering::SeqCst) + 1;
                        witness.peak.fetch_max(n, Ordering::SeqCst);
                        let n = witness.key_inside[k].fetch_add(1, Ordering::SeqCst) + 1;
                        witness.key_peak[k].fetch_max(n, Ordering::SeqCst);
                        witness.grants.fetch_add(1, Ordering::Relaxed);
                        if after_kill {
                            witness.grants_after_kill.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        witness.key_inside[k].fetch_sub(1, Ordering::SeqCst);
                        witness.inside.fetch_sub(1, Ordering::SeqCst);
                        // Out of the critical section first; a release that fails (the master
                        // gone) leaves the slot to its lease.
                        let _ = permit.release().await;
                    }
                    Err(e) if e.is_wait_timeout() => {}
                    Err(e) => {
                        keep_sample(&witness.samples, e).await;
                    }
                }
            }
        }));
    }

    wait_for_load(&witness.grants).await;
    killed.store(true, Ordering::SeqCst);
    master.kill();

    // Grants resume on the new master, by themselves.
    let deadline = Instant::now() + Duration::from_secs(60);
    while witness.grants_after_kill.load(Ordering::Relaxed) < 200 {
        assert!(
            Instant::now() < deadline,
            "no grants on a new master within 60 s; errors {:?}",
            witness.samples.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        // Every acquire answered: no worker is stuck on the old master.
        tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("a worker hung after the failover")
            .unwrap();
    }
    let new_master = sentinels[0].master_info();
    assert_eq!(
        new_master.get("port").map(String::as_str),
        Some(replica.port.to_string().as_str()),
        "the sentinels promoted the replica: {new_master:?}"
    );
    let peak = witness.peak.load(Ordering::SeqCst);
    assert!(
        peak <= LIMIT,
        "{peak} holders at once, over the total of {LIMIT}"
    );
    for (k, key) in KEYS.iter().enumerate() {
        let (peak, limit) = (witness.key_peak[k].load(Ordering::SeqCst), KEY_LIMITS[k]);
        assert!(
            peak <= limit,
            "{peak} holders of key {key} at once, over its {limit}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
