//! The `floodgate` binary: a thin shell over [`floodgate_server::cli`] (serve, run, status, top,
//! limiter, simulate) and [`floodgate_bench`] (bench, bench-growth, bench-durability,
//! dashboard-bench). It lives in its own package because the bench crate needs the server's
//! library: a binary inside `floodgate-server` depending on it would be a cycle.

use clap::{Parser, Subcommand};

/// jemalloc rather than the system allocator: it gives memory back after load (see Cargo.toml).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Global admission control for distributed workers.
#[derive(Debug, Parser)]
#[command(name = "floodgate", version)]
struct Cli {
    /// The subcommand to run.
    #[command(subcommand)]
    command: Command,
}

/// Every subcommand: the server's and the client's, then the measuring ones.
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve, run, status, top, limiter, simulate.
    #[command(flatten)]
    Server(floodgate_server::cli::Command),
    /// Bench, bench-growth, bench-durability, dashboard-bench.
    #[command(flatten)]
    Bench(floodgate_bench::Command),
}

fn main() -> std::process::ExitCode {
    // Purging freed pages in the background, so memory goes back to the OS after load even
    // when no further allocation comes to trigger it. Best effort: without it, only slower.
    let _ = tikv_jemalloc_ctl::background_thread::write(true);
    let cli = Cli::parse();
    floodgate_server::cli::block_on(async move {
        match cli.command {
            Command::Server(command) => floodgate_server::cli::run(command).await,
            Command::Bench(command) => floodgate_bench::run(command).await,
        }
    })
}
