//! Floodgate's measuring commands, out of the production server crate: `floodgate bench`,
//! `bench-growth`, `bench-durability` and `dashboard-bench`. Each starts the real server (or
//! store) in this process and measures it beside a trivial baseline in the same run. The
//! `floodgate` binary (`crates/floodgate-cli`) puts these subcommands beside the server's.

#![forbid(unsafe_code)]

mod bench;
mod bench_durability;
mod bench_growth;
mod dashboard_bench;
mod redis_url;

use clap::Subcommand;
use floodgate_server::cli::Failure;

/// The measuring subcommands of `floodgate`.
#[derive(Debug, Subcommand)]
#[allow(
    private_interfaces,
    reason = "built by clap from the command line (flattened into the binary's), never by hand"
)]
pub enum Command {
    /// Measure throughput, handoff latency and utilization under saturation (HTTP or a store),
    /// beside trivial requests in the same run.
    ///
    /// How each operation's cost grows with the queue and the holders (0 to 10k, embedded
    /// store and Redis) is measured by `floodgate bench-growth` instead.
    Bench(bench::BenchArgs),
    /// Measure how each operation's cost grows with the queue and the holders (0 to 10k), on
    /// the embedded store and on Redis, with the ratio of its cost at 10k to its cost at 100.
    BenchGrowth(bench_growth::BenchGrowthArgs),
    /// Measure what a data directory costs: HTTP pairs with and without one (same run), the
    /// disk's fsync latency, recovery time and the log's size under the snapshot policy.
    BenchDurability(bench_durability::BenchDurabilityArgs),
    /// Measure the server's cost of open dashboards beside the same workload with none open.
    DashboardBench(dashboard_bench::DashboardBenchArgs),
}

/// Runs one measuring subcommand; `Ok` is the exit code.
pub async fn run(command: Command) -> Result<u8, Failure> {
    match command {
        Command::Bench(args) => bench::bench(args).await,
        Command::BenchGrowth(args) => bench_growth::bench_growth(args).await,
        Command::BenchDurability(args) => bench_durability::bench_durability(args).await,
        Command::DashboardBench(args) => dashboard_bench::dashboard_bench(args).await,
    }
}
