//! The `appliance` binary: everything lives in the library; this only hands over to the CLI.

/// Events are JSON: parsing and normalising them allocates many small objects, which mimalloc
/// serves markedly faster than the system allocator (see the README's performance section).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    appliance::cli::main()
}
