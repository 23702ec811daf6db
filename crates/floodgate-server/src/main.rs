//! The `floodgate` binary: a thin shell over [`floodgate_server::cli`].

fn main() -> std::process::ExitCode {
    floodgate_server::cli::main()
}
