//! `floodgate top` in a real pseudo-terminal (tmux): it draws the limiters, updates as their
//! state changes, and exits cleanly (status 0, terminal restored) on `q` and on SIGINT.
//! Needs tmux (scripts/test.sh installs it). Waits are bounded polling loops.

#![allow(clippy::unwrap_used)]

#[path = "../../floodgate-server/tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Served, PATIENCE};
use floodgate::{AcquireOptions, Floodgate, LimiterSpec};
use floodgate_server::server::ServerOptions;

/// A tmux server of our own (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(tag: &str) -> Tmux {
        Tmux {
            socket: format!("fg-top-{tag}-{}", std::process::id()),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux is needed (scripts/test.sh installs it)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn start(&self, command: &str) {
        self.run(&[
            "new-session",
            "-d",
            "-x",
            "150",
            "-y",
            "30",
            "-s",
            "top",
            command,
        ]);
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    /// Polls the pane until `cond` holds (bounded).
    fn until(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let screen = self.screen();
            if cond(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "never saw {what}; screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

fn command(url: &str) -> String {
    format!(
        "sh -c '{} top --url {url} --interval 200ms; echo TOP_EXIT=$?; sleep 60'",
        env!("CARGO_BIN_EXE_floodgate")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_draws_updates_and_quits_on_q() {
    let gate = Floodgate::in_memory();
    gate.define("top-alpha", LimiterSpec::concurrency(3))
        .await
        .unwrap();
    gate.define("top-beta", LimiterSpec::concurrency(8))
        .await
        .unwrap();
    let served = Served::start(gate.clone(), ServerOptions::default()).await;
    let url = format!("http://{}", served.addr);
    let tmux = Tmux::new("q");
    tmux.start(&command(&url));
    let screen = tmux.until("both limiters", |s| {
        s.contains("floodgate top") && s.contains("top-alpha") && s.contains("top-beta")
    });
    assert!(screen.contains("0/3") && screen.contains("0/8"), "{screen}");

    // It updates: two permits taken show up within a few refreshes.
    let limiter = gate.limiter("top-alpha").await.unwrap();
    let _a = limiter.acquire(AcquireOptions::new()).await.unwrap();
    let _b = limiter.acquire(AcquireOptions::new()).await.unwrap();
    tmux.until("2/3 after two acquires", |s| s.contains("2/3"));

    tmux.run(&["send-keys", "-t", "top", "q"]);
    let screen = tmux.until("the exit status", |s| s.contains("TOP_EXIT="));
    assert!(screen.contains("TOP_EXIT=0"), "{screen}");
    // The alternate screen was left: the table is gone from the terminal.
    assert!(!screen.contains("top-alpha"), "{screen}");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_exits_cleanly_on_sigint() {
    let gate = Floodgate::in_memory();
    gate.define("top-gamma", LimiterSpec::concurrency(2))
        .await
        .unwrap();
    let served = Served::start(gate, ServerOptions::default()).await;
    let url = format!("http://{}", served.addr);
    let tmux = Tmux::new("int");
    tmux.start(&command(&url));
    tmux.until("the limiter", |s| s.contains("top-gamma"));
    // The pane runs sh; its child is floodgate top.
    let shell = tmux.run(&["display-message", "-p", "-t", "top", "#{pane_pid}"]);
    let child = Command::new("pgrep")
        .args(["-P", shell.trim()])
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&child.stdout).trim().to_owned();
    assert!(!pid.is_empty(), "no child of the pane's shell {shell:?}");
    let status = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(status.success());
    let screen = tmux.until("the exit status", |s| s.contains("TOP_EXIT="));
    assert!(screen.contains("TOP_EXIT=0"), "{screen}");
    assert!(!screen.contains("top-gamma"), "{screen}");
    served.stop().await;
}

/// `q` quits while the server has accepted the request and not answered it: the request was
/// awaited in the loop that reads the keys, so `q` (and SIGTERM) waited for the request's 30 s
/// timeout, longer than `PATIENCE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_quits_on_q_while_the_server_does_not_answer() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (arrived, mut requests) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            if matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {
                let _ = arrived.send(()).await;
            }
            held.push(sock);
        }
    });
    let tmux = Tmux::new("silent");
    tmux.start(&command(&url));
    tokio::time::timeout(PATIENCE, requests.recv())
        .await
        .expect("top sent no request");
    tmux.run(&["send-keys", "-t", "top", "q"]);
    let screen = tmux.until("the exit status", |s| s.contains("TOP_EXIT="));
    assert!(screen.contains("TOP_EXIT=0"), "{screen}");
}
