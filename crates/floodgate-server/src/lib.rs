//! Floodgate's HTTP server, its client and the `floodgate` command line.
//!
//! The server is a thin layer over the [`floodgate`] library: [`server::run`] takes a listener,
//! a [`floodgate::Floodgate`] and a shutdown signal, so tests start the real server on
//! `127.0.0.1:0`.

#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod config;
pub mod dashboard;
pub mod metrics;
pub mod server;
pub mod shown;
/// `floodgate simulate`'s engine, from its own crate (`floodgate-sim`), under its old path.
pub use floodgate_sim as simulate;
pub mod wire;
