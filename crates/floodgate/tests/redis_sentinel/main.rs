//! Redis Sentinel with real processes: a master, a replica and three sentinels on loopback.
//! Under load with an independent witness (the workers count themselves in and out of their
//! critical section), the master is SIGKILLed: the store follows the sentinels to the new
//! master by itself, every acquire gets an answer (none hangs), the witness never sees more
//! holders than the limit, and grants resume; the time from the kill to the first grant on the
//! new master is measured and printed beside the sentinels' down-after time. A second test cuts
//! the replication link before a grant, so the promoted replica never received it: the store
//! must learn, not grant over it. Keyed limiters run both too, the witness counting per key.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod failover;
mod harness;
mod keyed_load;
mod lost_grant;
mod tls;
