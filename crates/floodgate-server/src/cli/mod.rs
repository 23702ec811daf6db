//! The `floodgate` command line.
//!
//! Exit codes: 0 success; 2 bad flags or input (including a 4xx from the server about the
//! request); 69 the server could not be reached; 75 (EX_TEMPFAIL) the wait ended without a
//! permit; 1 anything else. `floodgate run` exits with the command's own status.

mod bench;
mod dashboard_bench;
pub mod duration;
mod limiter;
mod run;
mod serve;
mod simulate;
mod status;
mod top;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::{Client, ClientError};

/// Exit code for bad input.
pub const EXIT_USAGE: u8 = 2;
/// Exit code when the server cannot be reached (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code when the wait ended without a permit (EX_TEMPFAIL): try again later.
pub const EXIT_TEMPFAIL: u8 = 75;

/// Global admission control for distributed workers.
#[derive(Debug, Parser)]
#[command(name = "floodgate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP server (embedded store).
    Serve(serve::ServeArgs),
    /// Run a command while holding a permit, like flock but shared by every machine.
    Run(run::RunArgs),
    /// Show limiters: limit, in use, waiting and counters.
    Status(status::StatusArgs),
    /// The overview of every limiter, refreshed live in the terminal (like htop).
    Top(top::TopArgs),
    /// Create, change or delete a limiter.
    #[command(subcommand)]
    Limiter(limiter::LimiterCommand),
    /// Measure throughput, handoff latency and utilization under saturation (HTTP or a store),
    /// beside trivial requests in the same run.
    Bench(bench::BenchArgs),
    /// Measure the server's cost of open dashboards beside the same workload with none open.
    DashboardBench(dashboard_bench::DashboardBenchArgs),
    /// Replay the seed's cascade in virtual time under each strategy and compare them.
    Simulate(simulate::SimulateArgs),
}

/// Where the server is, for the client commands.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServerArgs {
    /// The server's base URL.
    #[arg(long, env = "FLOODGATE_URL", default_value = "http://127.0.0.1:8750")]
    url: String,
    /// Bearer token, if the server requires one.
    #[arg(long, env = "FLOODGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ServerArgs {
    pub(crate) fn client(&self) -> Result<Client, Failure> {
        Client::new(&self.url, self.token.clone()).map_err(Failure::from)
    }
}

/// A failed command: what to print and which code to exit with.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Connection { .. } => EXIT_UNAVAILABLE,
            ClientError::Api { code, .. } if code == "wait_timeout" || code == "queue_full" => {
                EXIT_TEMPFAIL
            }
            ClientError::Api { status, .. } if (400..500).contains(status) => EXIT_USAGE,
            // shutting_down, store_unavailable: try again later or elsewhere.
            ClientError::Api { status: 503, .. } => EXIT_UNAVAILABLE,
            ClientError::Api { .. } => 1,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("floodgate: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::serve(args).await,
            Command::Run(args) => run::run(args).await,
            Command::Status(args) => status::status(args).await,
            Command::Top(args) => top::top(args).await,
            Command::Limiter(cmd) => limiter::limiter(cmd).await,
            Command::Bench(args) => bench::bench(args).await,
            Command::DashboardBench(args) => dashboard_bench::dashboard_bench(args).await,
            Command::Simulate(args) => simulate::simulate(args),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("floodgate: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}
