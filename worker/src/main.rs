//! The `skyward-worker` binary (built static; see docs/architecture.md).

fn main() {
    std::process::exit(skyward_worker::main_with_args(std::env::args().collect()));
}
