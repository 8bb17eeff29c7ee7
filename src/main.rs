//! The `vhd-replicator` binary: see `vhd-replicator --help`.

fn main() -> std::process::ExitCode {
    vhd_replicator::cli::main()
}
