//! A TCP relay to Redis that holds one connection's commands, from the first chunk that
//! carries a named command on, until the test lets them go: it forces the order in which
//! Redis runs two commands and in which their replies are taken, with no timing.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the relay holds back.
#[derive(Default)]
struct Held {
    /// The next chunk a client sends that carries any of these is held.
    armed: Vec<&'static [u8]>,
    /// The connection being held, if one is.
    conn: Option<usize>,
    /// The bytes held: the armed command and whatever that connection sent after it.
    bytes: Vec<u8>,
}

/// A TCP relay to Redis that can hold one connection's commands from a named one on.
pub(crate) struct HoldingRelay {
    /// Where clients connect (`url`).
    pub(crate) port: u16,
    /// What is held, shared with each connection's pump.
    held: Arc<Mutex<Held>>,
    /// Wakes the pump of the held connection (`release`).
    release: Arc<tokio::sync::Notify>,
}

impl HoldingRelay {
    pub(crate) async fn start(redis_port: u16) -> HoldingRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(Mutex::new(Held::default()));
        let release = Arc::new(tokio::sync::Notify::new());
        let (held_relay, release_relay) = (Arc::clone(&held), Arc::clone(&release));
        tokio::spawn(async move {
            let mut id = 0;
            while let Ok((client, _)) = listener.accept().await {
                id += 1;
                let Ok(redis) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                else {
                    continue;
                };
                let (from_client, mut to_client) = client.into_split();
                let (mut from_redis, to_redis) = redis.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_redis, &mut to_client).await;
                });
                let (held, release) = (Arc::clone(&held_relay), Arc::clone(&release_relay));
                tokio::spawn(pump(id, from_client, to_redis, held, release));
            }
        });
        HoldingRelay {
            port,
            held,
            release,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Holds the next chunk that carries any of `needles`, and what its connection sends
    /// after it.
    pub(crate) fn arm_on(&self, needles: &[&'static [u8]]) {
        self.held.lock().unwrap().armed = needles.to_vec();
    }

    /// Whether a connection is held and what was held contains `needle`.
    pub(crate) fn holds(&self, needle: &[u8]) -> bool {
        let held = self.held.lock().unwrap();
        held.conn.is_some() && contains(&held.bytes, needle)
    }

    /// Lets the held connection's commands go on, in the order they were sent.
    pub(crate) fn release(&self) {
        self.release.notify_one();
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Client to Redis, holding from an armed chunk until released.
async fn pump(
    id: usize,
    mut from_client: tokio::net::tcp::OwnedReadHalf,
    mut to_redis: tokio::net::tcp::OwnedWriteHalf,
    held: Arc<Mutex<Held>>,
    release: Arc<tokio::sync::Notify>,
) {
    let mut buf = vec![0_u8; 64 * 1024];
    loop {
        let holding = held.lock().unwrap().conn == Some(id);
        if holding {
            tokio::select! {
                n = from_client.read(&mut buf) => {
                    let Ok(n @ 1..) = n else { return };
                    held.lock().unwrap().bytes.extend_from_slice(&buf[..n]);
                }
                () = release.notified() => {
                    let bytes = {
                        let mut held = held.lock().unwrap();
                        held.conn = None;
                        std::mem::take(&mut held.bytes)
                    };
                    if to_redis.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            }
            continue;
        }
        let Ok(n @ 1..) = from_client.read(&mut buf).await else {
            return;
        };
        let hold = {
            let mut held = held.lock().unwrap();
            if held.armed.iter().any(|needle| contains(&buf[..n], needle)) {
                held.armed.clear();
                held.conn = Some(id);
                held.bytes = buf[..n].to_vec();
                true
            } else {
                false
            }
        };
        if !hold && to_redis.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
