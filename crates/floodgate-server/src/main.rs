//! The `floodgate` binary: a thin shell over [`floodgate_server::cli`].

/// jemalloc rather than the system allocator: it gives memory back after load (see Cargo.toml).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    // Purging freed pages in the background, so memory goes back to the OS after load even
    // when no further allocation comes to trigger it. Best effort: without it, only slower.
    let _ = tikv_jemalloc_ctl::background_thread::write(true);
    floodgate_server::cli::main()
}
