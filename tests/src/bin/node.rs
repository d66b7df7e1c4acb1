//! `meshnode-it-node`: the real `meshnode` CLI, built by this crate so that integration tests
//! run node processes compiled with exactly the features of the test build.

fn main() {
    std::process::exit(meshnode_gateway::cli::main());
}
