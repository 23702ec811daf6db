//! Sentinels with TLS and passwords everywhere.

use std::process::{Command, Stdio};
use std::time::Duration;

use floodgate::{AcquireOptions, Floodgate, LimiterSpec, RedisConfig, RedisStore};

use crate::harness::{scratch_dir, wait_until, SentinelProcess, DOWN_AFTER_MS, MASTER};
use crate::support::{free_port, RedisServer};

const PASSWORD: &str = "s3cret-for-tests";
const SENTINEL_PASSWORD: &str = "sentinels-own-s3cret";

/// TLS and passwords everywhere: the master and the replica take TLS (and replicate over it),
/// the store's user and the sentinels' user need passwords, and the sentinels listen on TLS only
/// and have their own password. The store reaches the sentinels and the master with the CA and
/// both passwords; a wrong sentinel password fails at once with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_with_tls_and_their_own_password() {
    use crate::support::certs;
    use floodgate::{RedisSecurity, StoreError};

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
    // Each TLS port is drawn afresh with its server's plain port on every start attempt: a
    // port taken meanwhile (the server exits at once) is not tried again.
    let master_port = std::cell::Cell::new(0);
    let _master = RedisServer::start_on_free_ports(|| {
        master_port.set(free_port());
        users(&master_port.get().to_string())
    });
    let master_tls = master_port.get().to_string();
    let replica_port = std::cell::Cell::new(0);
    let _replica = RedisServer::start_on_free_ports(|| {
        replica_port.set(free_port());
        let mut replica_args = users(&replica_port.get().to_string());
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
        replica_args
    });

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
