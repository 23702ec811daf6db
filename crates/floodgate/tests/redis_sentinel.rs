//! Redis Sentinel with real processes: a master, a replica and three sentinels on loopback.
//! Under load with an independent witness (the workers count themselves in and out of their
//! critical section), the master is SIGKILLed: the store follows the sentinels to the new
//! master by itself, every acquire gets an answer (none hangs), the witness never sees more
//! holders than the limit, and grants resume; the time from the kill to the first grant on the
//! new master is measured and printed beside the sentinels' down-after time. A second test cuts
//! the replication link before a grant, so the promoted replica never received it: the store
//! must learn, not grant over it.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use floodgate::{AcquireOptions, Floodgate, LimiterSpec, RedisConfig, RedisStore};
use support::{free_port, RedisServer};

const MASTER: &str = "floodgate-master";
/// The sentinels call the master down after this long without an answer.
const DOWN_AFTER_MS: u64 = 1000;
const LIMIT: u32 = 4;
const WORKERS: usize = 12;

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh directory for the sentinels' files, unique to this process and test.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls (bounded) until `ok`.
fn wait_until(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One `redis-server --sentinel` process watching the master.
struct SentinelProcess {
    port: u16,
    child: Child,
}

impl SentinelProcess {
    fn start(dir: &Path, master_port: u16) -> SentinelProcess {
        let port = free_port();
        let conf = dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n\
                 sentinel failover-timeout {MASTER} 10000\n\
                 sentinel parallel-syncs {MASTER} 1\n",
                dir.display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        wait_until("the sentinel answers", || {
            cli(port, &["ping"]).trim() == "PONG"
        });
        SentinelProcess { port, child }
    }

    /// `SENTINEL MASTER` as a map of its key/value lines.
    fn master_info(&self) -> std::collections::HashMap<String, String> {
        let out = cli(self.port, &["sentinel", "master", MASTER]);
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].to_owned(), c[1].to_owned()))
            .collect()
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three sentinels watching the master (and its one replica), once each knows the others;
/// with the store's URL naming them.
fn start_sentinels(dir: &Path, master_port: u16) -> (Vec<SentinelProcess>, String) {
    let sentinels: Vec<SentinelProcess> = (0..3)
        .map(|_| SentinelProcess::start(dir, master_port))
        .collect();
    for s in &sentinels {
        wait_until(
            "each sentinel knows the replica and the other sentinels",
            || {
                let info = s.master_info();
                info.get("num-slaves").map(String::as_str) == Some("1")
                    && info.get("num-other-sentinels").map(String::as_str) == Some("2")
            },
        );
    }
    let url = format!(
        "redis+sentinel://{}/{MASTER}",
        sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    );
    (sentinels, url)
}

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
                        {
                            let mut samples = witness.samples.lock().unwrap();
                            if samples.len() < 5 {
                                samples.push(e.to_string());
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }

    // Load on the first master, then the crash.
    let deadline = Instant::now() + Duration::from_secs(30);
    while witness.grants.load(Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "no load on the first master");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = witness.grants.load(Ordering::Relaxed);
    let kill = Instant::now();
    *killed_at.lock().unwrap() = Some(kill);
    master.kill();
    // The sentinels' own failover time: until they name another master.
    let sentinel_port = sentinels[0].port;
    let switched = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let addr = cli(
                sentinel_port,
                &["sentinel", "get-master-addr-by-name", MASTER],
            );
            if !addr.contains(&master_port.to_string()) && addr.lines().count() == 2 {
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
            // The first reads may still reach the dead master.
            while limiter.status().await.is_ok() {
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
    gate.define("lost", spec).await.unwrap();
    let limiter = gate.limiter("lost").await.unwrap();

    let mut first = limiter.acquire(AcquireOptions::new()).await.unwrap();
    // The replica has the limiter and the first grant...
    let acked = cli(master.port, &["wait", "1", "5000"]);
    assert_eq!(
        acked.trim(),
        "1",
        "the replica never acknowledged the first grant"
    );
    // ...but not the second: the link stops passing the master's writes on.
    link.cut.store(true, Ordering::SeqCst);
    let mut second = limiter.acquire(AcquireOptions::new()).await.unwrap();
    let held = 2;
    master.kill();

    // Try-once acquires until the store answers from the new master: the first answer must not
    // be a grant (the replica counts one holder of 2; two are working).
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        match limiter
            .acquire(AcquireOptions::new().wait(Duration::ZERO))
            .await
        {
            Err(e) if e.to_string().contains("redis") => {
                assert!(Instant::now() < deadline, "the store never answered: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other,
        }
    };
    assert!(
        matches!(&answer, Err(e) if e.is_wait_timeout()),
        "granted over the lost grant ({held} held, limit 2): {answer:?}"
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
        .acquire(AcquireOptions::new().wait(Duration::from_secs(3)))
        .await;
    assert!(matches!(&after, Err(e) if e.is_wait_timeout()), "{after:?}");
    drop(sentinels);
    let _ = std::fs::remove_dir_all(&dir);
}

const PASSWORD: &str = "s3cret-for-tests";
const SENTINEL_PASSWORD: &str = "sentinels-own-s3cret";

/// TLS and passwords everywhere: the master and the replica take TLS (and replicate over it),
/// the store's user and the sentinels' user need passwords, and the sentinels listen on TLS only
/// and have their own password. The store reaches the sentinels and the master with the CA and
/// both passwords; a wrong sentinel password fails at once with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_with_tls_and_their_own_password() {
    use floodgate::{RedisSecurity, StoreError};
    use support::certs;

    let dir = scratch_dir("floodgate-sentinel-tls");
    let ca = certs::ca(&dir, "ca");
    let leaf = certs::leaf(&dir, &ca, "redis");
    let (cert, key, ca_cert) = (
        leaf.cert.to_str().unwrap().to_owned(),
        leaf.key.to_str().unwrap().to_owned(),
        ca.cert.to_str().unwrap().to_owned(),
    );
    // `default` may only PING on the plain port (readiness); `floodgate` is the store's user,
    // `sentinel` the sentinels' and the replica's.
    let users = |tls_port: &str| -> Vec<String> {
        [
            "--tls-port",
            tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca_cert,
            "--tls-auth-clients",
            "no",
            "--tls-replication",
            "yes",
            "--user",
            "default",
            "on",
            "nopass",
            "resetkeys",
            "resetchannels",
            "-@all",
            "+ping",
            "--user",
            "floodgate",
            "on",
            &format!(">{PASSWORD}"),
            "~fg:*",
            "&fg:*",
            "+@all",
            "--user",
            "sentinel",
            "on",
            &format!(">{PASSWORD}"),
            "~*",
            "&*",
            "+@all",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let master_tls = free_port().to_string();
    let master_args = users(&master_tls);
    let master_refs: Vec<&str> = master_args.iter().map(String::as_str).collect();
    let _master = RedisServer::start_on_a_free_port(&master_refs);
    let replica_tls = free_port().to_string();
    let mut replica_args = users(&replica_tls);
    for a in [
        "--replicaof",
        "127.0.0.1",
        &master_tls,
        "--masteruser",
        "sentinel",
        "--masterauth",
        PASSWORD,
    ] {
        replica_args.push(a.to_owned());
    }
    let replica_refs: Vec<&str> = replica_args.iter().map(String::as_str).collect();
    let _replica = RedisServer::start_on_a_free_port(&replica_refs);

    let tls_cli = |port: u16, password: &str, args: &[&str]| -> String {
        let out = Command::new("redis-cli")
            .args(["--tls", "--cacert", &ca_cert, "-p", &port.to_string()])
            .args([
                "--user",
                "sentinel",
                "--pass",
                password,
                "--no-auth-warning",
            ])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let master_tls: u16 = master_tls.parse().unwrap();
    wait_until("the replica is in sync over TLS", || {
        tls_cli(master_tls, PASSWORD, &["info", "replication"]).contains("connected_slaves:1")
    });
    // Sentinels on TLS only, with their own password.
    let mut sentinels = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        let conf = dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port 0\ntls-port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {ca_cert}\n\
                 tls-auth-clients no\ntls-replication yes\n\
                 requirepass {SENTINEL_PASSWORD}\nsentinel sentinel-pass {SENTINEL_PASSWORD}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {master_tls} 2\n\
                 sentinel auth-user {MASTER} sentinel\nsentinel auth-pass {MASTER} {PASSWORD}\n\
                 sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        sentinels.push(SentinelProcess { port, child });
        ports.push(port);
    }
    let sentinel_cli = |port: u16, args: &[&str]| -> String {
        let out = Command::new("redis-cli")
            .args(["--tls", "--cacert", &ca_cert, "-p", &port.to_string()])
            .args(["-a", SENTINEL_PASSWORD, "--no-auth-warning"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for port in &ports {
        wait_until("each TLS sentinel knows the replica and the others", || {
            let info = sentinel_cli(*port, &["sentinel", "master", MASTER]);
            let lines: Vec<&str> = info.lines().collect();
            let field = |name: &str| {
                lines
                    .iter()
                    .position(|l| *l == name)
                    .and_then(|i| lines.get(i + 1).copied())
            };
            field("num-slaves") == Some("1") && field("num-other-sentinels") == Some("2")
        });
    }
    let url = format!(
        "redis+sentinel://{}/{MASTER}",
        ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let security = |sentinel_password: &str| RedisSecurity {
        ca_file: Some(ca.cert.clone()),
        username: Some("floodgate".into()),
        password: Some(PASSWORD.into()),
        sentinel_password: Some(sentinel_password.into()),
        ..RedisSecurity::default()
    };

    let mut config = RedisConfig::new(url.clone());
    config.security = security(SENTINEL_PASSWORD);
    let gate = Floodgate::with_store(
        RedisStore::connect(config)
            .await
            .expect("connect through TLS sentinels with their password"),
    );
    gate.define("tls-sentinel", LimiterSpec::concurrency(1))
        .await
        .unwrap();
    let limiter = gate.limiter("tls-sentinel").await.unwrap();
    let permit = limiter.acquire(AcquireOptions::new()).await.unwrap();
    assert!(permit.release().await.unwrap());

    // A wrong sentinel password: a clear error, at once (bounded: no hang).
    let mut config = RedisConfig::new(url);
    config.security = security("not-the-password");
    let wrong = tokio::time::timeout(Duration::from_secs(30), RedisStore::connect(config))
        .await
        .expect("a wrong sentinel password hung");
    match wrong {
        Err(StoreError::Unavailable(m)) => {
            let m = m.to_string();
            eprintln!("a wrong sentinel password: {m}");
            assert!(m.contains("no sentinel names a master"), "{m}");
            assert!(
                m.to_lowercase().contains("auth") || m.contains("WRONGPASS"),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
    drop(sentinels);
    let _ = std::fs::remove_dir_all(&dir);
}
