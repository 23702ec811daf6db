//! A sentinel failover under load, watched by an independent witness.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use floodgate::{AcquireOptions, Floodgate, LimiterSpec, RedisConfig, RedisStore};

use crate::harness::{
    cli, keep_sample, scratch_dir, start_sentinels, wait_for_load, wait_until, DOWN_AFTER_MS,
    LIMIT, MASTER, WORKERS,
};
use crate::support::RedisServer;

#[derive(Default)]
struct Witness {
    /// Workers inside their critical section now.
    inside: AtomicU32,
    /// The most ever inside at once.
    peak: AtomicU32,
    grants: AtomicU64,
    /// Acquires that failed with something other than a wait timeout (the store unavailable
    /// during the failover): a clear answer, counted.
    errors: AtomicU64,
    /// When the first acquire started after the kill completed with a grant.
    first_grant_after_kill: Mutex<Option<Instant>>,
    /// Error texts seen, a few.
    samples: Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_follows_a_sentinel_failover_under_load() {
    let dir = scratch_dir("floodgate-sentinel");
    let mut master = RedisServer::start();
    let master_port = master.port;
    let replica =
        RedisServer::start_on_a_free_port(&["--replicaof", "127.0.0.1", &master_port.to_string()]);
    wait_until("the replica is in sync", || {
        cli(replica.port, &["info", "replication"]).contains("master_link_status:up")
    });
    let (sentinels, url) = start_sentinels(&dir, master_port);
    let store = RedisStore::connect(RedisConfig::new(url))
        .await
        .expect("connect through the sentinels");
    let gate = Floodgate::with_store(store);
    gate.define(
        "failover",
        LimiterSpec::concurrency(LIMIT)
            .with_default_lease(Duration::from_secs(3))
            .with_max_wait(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    let limiter = gate.limiter("failover").await.unwrap();

    let witness = Arc::new(Witness::default());
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (limiter, witness, stop, killed_at) = (
            limiter.clone(),
            Arc::clone(&witness),
            Arc::clone(&stop),
            Arc::clone(&killed_at),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                match limiter
                    .acquire(AcquireOptions::new().wait(Duration::from_secs(2)))
                    .await
                {
                    Ok(permit) => {
                        let n = witness.inside.fetch_add(1, Ordering::SeqCst) + 1;
                        witness.peak.fetch_max(n, Ordering::SeqCst);
                        witness.grants.fetch_add(1, Ordering::Relaxed);
                        let after_kill = killed_at.lock().unwrap().is_some_and(|k| started > k);
                        if after_kill {
                            let mut first = witness.first_grant_after_kill.lock().unwrap();
                            first.get_or_insert_with(Instant::now);
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        witness.inside.fetch_sub(1, Ordering::SeqCst);
                        // Out of the critical section first; a release that fails (the master
                        // gone) leaves the slot to its lease.
                        let _ = permit.release().await;
                    }
                    Err(e) if e.is_wait_timeout() => {}
                    Err(e) => {
                        witness.errors.fetch_add(1, Ordering::Relaxed);
                        keep_sample(&witness.samples, e).await;
                    }
                }
            }
        }));
    }

    // Load on the first master, then the crash.
    wait_for_load(&witness.grants).await;
    let before = witness.grants.load(Ordering::Relaxed);
    let kill = Instant::now();
    *killed_at.lock().unwrap() = Some(kill);
    master.kill();
    // The sentinels' own failover time: until they name another master.
    let sentinel_port = sentinels[0].port;
    let named = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let named_set = Arc::clone(&named);
    let switched = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let addr = cli(
                sentinel_port,
                &["sentinel", "get-master-addr-by-name", MASTER],
            );
            if !addr.contains(&master_port.to_string()) && addr.lines().count() == 2 {
                named_set.store(true, Ordering::SeqCst);
                return Some(Instant::now());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });

    // The store answers again (a status read) once it follows the sentinels.
    let answering = {
        let limiter = limiter.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            // The first reads may still reach the dead master. A read may also never fail: one
            // that finds the store checking the master (after another request failed) waits
            // for that check, which follows the sentinels, and is answered by the new master.
            while limiter.status().await.is_ok() && !named.load(Ordering::SeqCst) {
                assert!(Instant::now() < deadline, "reads never failed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            while limiter.status().await.is_err() {
                assert!(Instant::now() < deadline, "the store never answered again");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Instant::now()
        })
    };

    // Grants resume on the new master, by themselves.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let first = *witness.first_grant_after_kill.lock().unwrap();
        if first.is_some() && witness.grants.load(Ordering::Relaxed) > before + 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no grant on a new master within 60 s; errors {:?}",
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
    let recovered = witness
        .first_grant_after_kill
        .lock()
        .unwrap()
        .unwrap()
        .duration_since(kill);
    let switched = switched
        .await
        .unwrap()
        .expect("the sentinels named a new master")
        .duration_since(kill);
    let answering = answering.await.unwrap().duration_since(kill);
    let new_master = sentinels[0].master_info();
    eprintln!(
        "sentinel failover: master SIGKILLed; the sentinels named the new master after {} ms \
         (down-after {DOWN_AFTER_MS} ms), the store answered again after {} ms, its first grant \
         on it came after {} ms (the store saw a new master and put the limiter in a learning \
         window of its 3 s default lease, so permits held at the kill are not granted over); {} grants before, {} after; {} acquires answered \
         with an error meanwhile ({:?}); peak holders {} of {LIMIT}",
        switched.as_millis(),
        answering.as_millis(),
        recovered.as_millis(),
        before,
        witness.grants.load(Ordering::Relaxed) - before,
        witness.errors.load(Ordering::Relaxed),
        witness.samples.lock().unwrap().first(),
        witness.peak.load(Ordering::SeqCst),
    );
    assert_eq!(
        new_master.get("port").map(String::as_str),
        Some(replica.port.to_string().as_str()),
        "the sentinels promoted the replica: {new_master:?}"
    );
    assert!(
        witness.peak.load(Ordering::SeqCst) <= LIMIT,
        "the witness saw {} holders at once, over the limit of {LIMIT}",
        witness.peak.load(Ordering::SeqCst)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
