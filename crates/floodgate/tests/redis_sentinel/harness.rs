//! What the tests of this binary share: sentinel processes on loopback, `redis-cli`, scratch
//! directories and a bounded wait.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::free_port;

pub(crate) const MASTER: &str = "floodgate-master";
/// The sentinels call the master down after this long without an answer.
pub(crate) const DOWN_AFTER_MS: u64 = 1000;
pub(crate) const LIMIT: u32 = 4;
pub(crate) const WORKERS: usize = 12;

pub(crate) fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh directory for the sentinels' files, unique to this process and test.
pub(crate) fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls (bounded) until `ok`.
pub(crate) fn wait_until(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One `redis-server --sentinel` process watching the master.
pub(crate) struct SentinelProcess {
    pub(crate) port: u16,
    pub(crate) child: Child,
}

impl SentinelProcess {
    pub(crate) fn start(dir: &Path, master_port: u16) -> SentinelProcess {
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
    pub(crate) fn master_info(&self) -> std::collections::HashMap<String, String> {
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
pub(crate) fn start_sentinels(dir: &Path, master_port: u16) -> (Vec<SentinelProcess>, String) {
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

/// Keeps the first few errors the workers met, for the failure message; pauses the worker
/// before its next try.
pub(crate) async fn keep_sample(
    samples: &std::sync::Mutex<Vec<String>>,
    error: impl std::fmt::Display,
) {
    {
        let mut samples = samples.lock().unwrap();
        if samples.len() < 5 {
            samples.push(error.to_string());
        }
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// Waits (bounded) until the workers have been granted 200 permits: load on the first master.
pub(crate) async fn wait_for_load(grants: &std::sync::atomic::AtomicU64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while grants.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "no load on the first master");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
