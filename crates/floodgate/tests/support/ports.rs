//! Free loopback ports for servers a test starts (and restarts) itself.
//!
//! A port found free by binding `127.0.0.1:0` comes from the kernel's ephemeral range, the
//! range every outgoing connection takes its local port from too. While a server on such a
//! port is down (a Redis or `floodgate serve` restarted on the same port, a crash test), a
//! client reconnecting to it can be given that very port as its own and connect to itself
//! (TCP simultaneous open), and the restarted server then cannot bind it; a port picked and
//! released before a child binds it can likewise be taken meanwhile. Rare (Linux hands
//! connections even ports and `bind(0)` odd ones while both halves have room: 0 self-connects
//! in 30,000 tries here), but loopback tests leave thousands of ports in TIME_WAIT. So these
//! ports are drawn below the ephemeral range, where the kernel never allocates one.

#![allow(dead_code)]

use std::hash::{BuildHasher, RandomState};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};

/// The lowest port tried: above the well-known and most registered services' ports.
const FIRST: u16 = 10_000;

/// The first port of the kernel's ephemeral range (Linux's default when it cannot be read).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A loopback port that was free just now (bound and released), below the ephemeral range
/// when that range leaves room for one; random, so parallel tests rarely try the same one.
pub(crate) fn free_port() -> u16 {
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    let end = ephemeral_start();
    if end > FIRST + 1_000 {
        let random = RandomState::new();
        for _ in 0..1_000 {
            let draw = random.hash_one(DRAWS.fetch_add(1, Ordering::Relaxed));
            let port = FIRST + (draw % u64::from(end - FIRST)) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    // No room below the ephemeral range (an unusual kernel setting): any free port.
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}
