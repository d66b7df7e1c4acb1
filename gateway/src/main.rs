//! The `meshnode` binary: CLI and daemon.

fn main() {
    std::process::exit(meshnode_gateway::cli::main());
}
