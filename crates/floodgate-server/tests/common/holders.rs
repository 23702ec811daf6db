//! Holder processes and their independent witness, shared by the tests that crash things
//! (`crash.rs`: the embedded server; `learning.rs`: Redis under two servers).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

/// The independent witness: counts holders between their "enter" and their "exit" (or their
/// connection closing, which is how a SIGKILLed holder's work ends). Answers each exit only
/// once counted, so a holder releases its permit only after the witness saw it stop.
pub(crate) async fn witness(current: Arc<AtomicI64>, peak: Arc<AtomicI64>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let (current, peak) = (current.clone(), peak.clone());
            tokio::spawn(async move {
                let (read, mut write) = sock.into_split();
                let mut lines = BufReader::new(read).lines();
                let mut inside = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.starts_with("enter") && !inside {
                        inside = true;
                        let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                    } else if line == "exit" && inside {
                        inside = false;
                        current.fetch_sub(1, Ordering::SeqCst);
                        let _ = write.write_all(b"ok\n").await;
                    }
                }
                if inside {
                    current.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
    });
    port
}

#[derive(Default)]
pub(crate) struct Events {
    pub(crate) counts: HashMap<String, u64>,
    /// Fencing token -> the request_id it was granted to.
    pub(crate) tokens: HashMap<u64, String>,
    pub(crate) duplicate_tokens: Vec<u64>,
}

/// Starts a holder process (`crates/floodgate-cli/tests/crash/holder.py`) on `limiter`; `bases`
/// is one server's URL, or several separated by commas (the holder picks one per request, as a
/// client behind a load balancer would). Its events are counted in `events`.
pub(crate) fn spawn_holder(
    bases: &str,
    limiter: &str,
    lease_ms: u64,
    witness_port: u16,
    seed: u64,
    events: Arc<Mutex<Events>>,
) -> Child {
    // Beside the tests that use it (in `floodgate-cli`), found from any package of this module.
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../floodgate-cli/tests/crash/holder.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args([
            bases,
            limiter,
            &witness_port.to_string(),
            &lease_ms.to_string(),
            &seed.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 holder");
    let stdout = child.stdout.take().unwrap();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let mut ev = events.lock().unwrap();
            let kind = event["ev"].as_str().unwrap_or("?").to_owned();
            if kind == "granted" {
                let token = event["token"].as_u64().unwrap();
                let request = event["request_id"].as_str().unwrap_or("").to_owned();
                if let Some(prev) = ev.tokens.insert(token, request.clone()) {
                    if prev != request {
                        ev.duplicate_tokens.push(token);
                    }
                }
            }
            *ev.counts.entry(kind).or_default() += 1;
        }
    });
    child
}
