//! The `floodgate` command line.
//!
//! Exit codes: 0 success; 2 bad flags or input (including a 4xx from the server about the
//! request, and a redirect: the URL is not the server's); 69 the server could not be reached;
//! 75 (EX_TEMPFAIL) the wait ended without a permit; 1 anything else. `floodgate run` exits with the command's own status. Output into a
//! pipe whose reader has gone (`floodgate status | head -1`) ends a command quietly, exit 0.

mod apply;
pub mod duration;
mod keyed_apply;
mod limiter;
mod logging;
mod run;
mod serve;
mod simulate;
mod status;
mod top;
mod watch;

use std::future::Future;
use std::process::ExitCode;

use clap::Subcommand;

use crate::client::{Client, ClientError};

/// Exit code for bad input.
pub const EXIT_USAGE: u8 = 2;
/// Exit code when the server cannot be reached (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code when the wait ended without a permit (EX_TEMPFAIL): try again later.
pub const EXIT_TEMPFAIL: u8 = 75;

/// The server's and the client's subcommands. The `floodgate` binary (`crates/floodgate-cli`)
/// puts them beside the measuring ones of `floodgate-bench`.
#[derive(Debug, Subcommand)]
#[allow(
    private_interfaces,
    reason = "built by clap from the command line (flattened into the binary's), never by hand"
)]
pub enum Command {
    /// Run the HTTP server (embedded store by default, or Redis with --redis).
    Serve(Box<serve::ServeArgs>),
    /// Run a command while holding a permit, like flock but shared by every machine.
    ///
    /// The permit is extended while the command runs and released once the command has exited
    /// and so has whatever it left running in its process group (`cmd &`), as flock's lock is
    /// held while children that inherited it live. The command finds the permit in
    /// FLOODGATE_PERMIT_ID and its fencing token (for the backend) in FLOODGATE_FENCING_TOKEN.
    /// Exits with the command's status; 75 when no permit came within --wait, or the permit was
    /// lost (the command's group then gets SIGTERM, SIGKILL after --kill-after).
    Run(run::RunArgs),
    /// Show limiters: limit, in use, waiting and counters.
    Status(status::StatusArgs),
    /// The overview of every limiter, refreshed live in the terminal (like htop).
    Top(top::TopArgs),
    /// Create, change or delete a limiter.
    #[command(subcommand)]
    Limiter(limiter::LimiterCommand),
    /// Replay the seed's cascade in virtual time under each strategy and compare them.
    Simulate(simulate::SimulateArgs),
    /// The watchdog between `floodgate run` and its command (internal).
    #[command(name = "__watch", hide = true)]
    Watch(watch::WatchArgs),
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
    /// CA certificates (PEM) to trust for an https:// server, besides the system's.
    #[arg(long, env = "FLOODGATE_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
}

impl ServerArgs {
    pub(crate) fn client(&self) -> Result<Client, Failure> {
        Client::with_ca_file(&self.url, self.token.clone(), self.ca_file.as_deref())
            .map_err(Failure::from)
    }
}

/// A failed command: what to print and which code to exit with.
#[derive(Debug)]
pub struct Failure {
    /// The process's exit code.
    pub code: u8,
    /// Printed on stderr after `floodgate: `.
    pub message: String,
}

impl Failure {
    /// Ends the command with exit code `code` and no message.
    pub fn quiet(code: u8) -> Self {
        Failure {
            code,
            message: String::new(),
        }
    }

    /// Bad flags or input: exit code 2.
    pub fn usage(message: impl Into<String>) -> Self {
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
            // A CA file, URL or token that cannot be used is bad input, not an unreachable
            // server.
            ClientError::Settings { .. } => EXIT_USAGE,
            ClientError::Api { code, .. } if code == "wait_timeout" || code == "queue_full" => {
                EXIT_TEMPFAIL
            }
            // A redirect: the URL names something other than the server.
            ClientError::Api { status, .. } if (300..500).contains(status) => EXIT_USAGE,
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

/// Prints `floodgate: MESSAGE` on stderr. A stderr that cannot be written (a closed pipe) is
/// ignored: it must never change what a command does (`eprintln!` would panic).
pub(crate) fn warn(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "floodgate: {message}");
}

/// Writes a command's output on stdout, as is. A reader that has gone (a closed pipe, as in
/// `floodgate status | head -1`) ends the command quietly with exit code 0, as for a command
/// whose output was read in full (`print!` panicked, exit 101); any other write error fails
/// it (exit 1).
pub fn print(text: &str) -> Result<(), Failure> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match write!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure::quiet(0)),
        Err(e) => Err(Failure {
            code: 1,
            message: format!("cannot write the output: {e}"),
        }),
    }
}

/// Runs one of these subcommands; `Ok` is the exit code.
pub async fn run(command: Command) -> Result<u8, Failure> {
    match command {
        Command::Serve(args) => serve::serve(*args).await,
        Command::Run(args) => run::run(args).await,
        Command::Status(args) => status::status(args).await,
        Command::Top(args) => top::top(args).await,
        Command::Limiter(cmd) => limiter::limiter(cmd).await,
        Command::Simulate(args) => simulate::simulate(args),
        Command::Watch(args) => watch::watch(args).await,
    }
}

/// Runs a command's future on a new multi-thread runtime; prints a failure on stderr and turns
/// the outcome into the process's exit code.
pub fn block_on(command: impl Future<Output = Result<u8, Failure>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn(&format!("cannot start the runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(command) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            if !failure.message.is_empty() {
                warn(&failure.message);
            }
            ExitCode::from(failure.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A redirect means the URL names something else: bad input, like a 4xx (it was exit 1).
    #[test]
    fn a_redirect_exits_2() {
        let redirect = ClientError::Api {
            status: 302,
            code: "redirect".to_owned(),
            message: "the server at http://h redirects to https://h".to_owned(),
            retry_after: None,
        };
        assert_eq!(Failure::from(redirect).code, EXIT_USAGE);
    }
}
