//! `floodgate run NAME -- COMMAND...` (being written).

use super::Failure;

/// Flags of `floodgate run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// The limiter.
    name: String,
}

pub(crate) async fn run(_args: RunArgs) -> Result<u8, Failure> {
    Err(Failure::usage("floodgate run is not implemented yet"))
}
