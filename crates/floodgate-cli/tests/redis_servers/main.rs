//! Integration tests of the HTTP server on real Redis: real `redis-server` processes (standalone
//! and a 3-master cluster, from `crates/floodgate/tests/support`), real servers on loopback
//! ports (in-process `floodgate_server::server::run`, and the `floodgate` binary as a child
//! process), driven over real HTTP with `reqwest`.
//!
//! - Two servers sharing one Redis never grant more than the limit between them, and a release
//!   on one wakes a long poll held by the other.
//! - Redis crashing (SIGKILL) under load: every request is answered (503 `store_unavailable`
//!   when fail_closed, 200 with fencing token 0 when fail_open), `/readyz` turns 503, and the
//!   same server serves again once Redis is back (with its AOF, so the limiter survives).
//! - A holder process that crashes has its lease reclaimed and a waiter granted.
//! - On Redis Cluster: limiters in different slots, acquire and release through different
//!   servers, and cross-server wake-ups.
//!
//! No assertion is about elapsed time: waits are bounded polling loops with generous limits,
//! and every client request has a generous timeout so a hang fails instead of blocking. Every
//! spawned process is killed by a guard when the test ends, passed or failed.

#![allow(clippy::unwrap_used)]

#[path = "../../../floodgate-server/tests/common/mod.rs"]
mod common;
#[path = "../../../floodgate/tests/support/mod.rs"]
mod support;

mod cluster;
mod eviction;
mod faults;
mod harness;
mod two_servers;
