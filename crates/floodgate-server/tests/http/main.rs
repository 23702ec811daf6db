//! Integration tests of the HTTP server: each test starts the real server on `127.0.0.1:0`
//! (`floodgate_server::server::run`) on a multi-thread runtime, drives it over HTTP with
//! `reqwest` (or a raw `TcpStream`), and shuts it down at the end. A few socket-less tests drive
//! `floodgate_server::server::router` with `tower::ServiceExt::oneshot`.
//!
//! No assertion is about elapsed time; waits are bounded polling loops with generous limits.

#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod auth;
mod bad_input;
mod disconnects;
mod harness;
mod permits;
mod shutdown;
