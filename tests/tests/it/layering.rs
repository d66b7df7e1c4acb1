//! The crate graph must follow DESIGN.md §1: schemas <- store <- ledger <- {query, sync} <- gateway,
//! with `embed` a leaf that only query and gateway may use.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

fn allowed() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
    let edges: [(&str, &[&str]); 7] = [
        ("meshnode-schemas", &[]),
        ("meshnode-embed", &[]),
        ("meshnode-store", &["meshnode-schemas"]),
        ("meshnode-ledger", &["meshnode-schemas", "meshnode-store"]),
        (
            "meshnode-query",
            &[
                "meshnode-schemas",
                "meshnode-store",
                "meshnode-ledger",
                "meshnode-embed",
            ],
        ),
        (
            "meshnode-sync",
            &["meshnode-schemas", "meshnode-store", "meshnode-ledger"],
        ),
        (
            "meshnode-gateway",
            &[
                "meshnode-schemas",
                "meshnode-store",
                "meshnode-ledger",
                "meshnode-query",
                "meshnode-sync",
                "meshnode-embed",
            ],
        ),
    ];
    edges
        .into_iter()
        .map(|(k, v)| (k, v.iter().copied().collect()))
        .collect()
}

#[test]
fn crate_edges_follow_the_layering() {
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(crate::harness::workspace_root())
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .output()
        .expect("cargo metadata");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let allowed = allowed();
    let mut seen = BTreeSet::new();
    for package in metadata["packages"].as_array().expect("packages") {
        let name = package["name"].as_str().expect("name");
        seen.insert(name.to_string());
        if name == "meshnode-tests" {
            continue;
        }
        let permitted = allowed
            .get(name)
            .unwrap_or_else(|| panic!("workspace crate {name} is not in the layering picture"));
        for dep in package["dependencies"].as_array().expect("deps") {
            let dep_name = dep["name"].as_str().expect("dep name");
            if dep_name.starts_with("meshnode-") {
                assert!(
                    permitted.contains(dep_name),
                    "{name} -> {dep_name} is not an allowed edge (DESIGN.md §1)"
                );
            }
        }
    }
    for name in allowed.keys() {
        assert!(
            seen.contains(*name),
            "crate {name} missing from the workspace"
        );
    }
}
