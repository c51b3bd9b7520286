//! The `simfreeze` binary: everything lives in the library; see `cli`.
fn main() {
    std::process::exit(simfreeze::cli::main());
}
