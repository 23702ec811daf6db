//! End-to-end tests of `floodgate run`: the real server runs in this process on
//! `127.0.0.1:0`, and the real `floodgate` binary runs as child processes against it, each
//! running a small shell script that leaves evidence in a scratch directory.
//!
//! No assertion depends on timing; waits for a child to reach a point are bounded only so a
//! broken build fails instead of hanging.

#![allow(clippy::unwrap_used)]

mod grants;
mod harness;
mod lifecycle;
mod signals;
