//! The `meshnode` command line against a real node: outputs, files, exit codes.

use std::process::Output;

use crate::harness::{TestNode, meshnode_bin};
use serde_json::Value;

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

#[track_caller]
fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(&output)
}

#[track_caller]
fn json(output: Output) -> Value {
    serde_json::from_str(ok(output).trim()).expect("json output")
}

#[test]
fn blob_pin_and_status_commands() {
    let node = TestNode::start().expect("node");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("weights.bin");
    let content: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &content).expect("write");
    let hash = blake3::hash(&content).to_hex().to_string();

    let added = json(node.cli(&["--json", "blob", "add", file.to_str().expect("utf8")]));
    assert_eq!(added["hash"], hash);
    assert_eq!(added["size"], content.len() as u64);

    let human = ok(node.cli(&["blob", "add", file.to_str().expect("utf8")]));
    assert!(human.starts_with(&hash), "{human}");

    let from_stdin =
        json(node.cli_with_stdin(&["--json", "blob", "add", "-"], Some(b"from stdin")));
    assert_eq!(
        from_stdin["hash"],
        blake3::hash(b"from stdin").to_hex().as_str()
    );

    let cat = node.cli(&["blob", "cat", &hash]);
    assert!(cat.status.success());
    assert!(cat.stdout == content, "cat returned different bytes");

    let out = dir.path().join("copy.bin");
    ok(node.cli(&["blob", "get", &hash, "-o", out.to_str().expect("utf8")]));
    assert!(std::fs::read(&out).expect("read") == content);

    let cid = added["cid"].as_str().expect("cid");
    let stat = json(node.cli(&["--json", "blob", "stat", cid]));
    assert_eq!(stat["hash"], hash);
    assert_eq!(stat["size"], content.len() as u64);

    let pins = json(node.cli(&["--json", "pin", "ls"]));
    assert!(
        pins["pins"]
            .as_array()
            .expect("pins")
            .iter()
            .any(|p| p["hash"] == hash)
    );
    ok(node.cli(&["pin", "rm", &hash]));
    let pins = json(node.cli(&["--json", "pin", "ls"]));
    assert!(
        !pins["pins"]
            .as_array()
            .expect("pins")
            .iter()
            .any(|p| p["hash"] == hash)
    );
    ok(node.cli(&["pin", "add", &hash]));

    let status = json(node.cli(&["--json", "status"]));
    assert_eq!(status["node"].as_str().map(str::len), Some(64));
}

#[test]
fn exit_codes() {
    let node = TestNode::start().expect("node");
    // Usage errors exit 2.
    assert_eq!(node.cli(&["blob"]).status.code(), Some(2));
    assert_eq!(node.cli(&["no-such-command"]).status.code(), Some(2));
    // Failures exit 1 with a message on stderr and, with --json, an error object on stdout.
    let missing = node.cli(&["--json", "blob", "cat", &"ab".repeat(32)]);
    assert_eq!(missing.status.code(), Some(1));
    let error: Value = serde_json::from_str(stdout(&missing).trim()).expect("json error");
    assert_eq!(error["error"]["code"], "blob_not_found");
    assert_eq!(
        node.cli(&["blob", "cat", "not-a-hash"]).status.code(),
        Some(1)
    );
    assert_eq!(
        node.cli(&["blob", "add", "/no/such/file"]).status.code(),
        Some(1)
    );
    // A node that is not running is a clear failure.
    let down = std::process::Command::new(meshnode_bin())
        .args(["--api", "http://127.0.0.1:9", "status"])
        .output()
        .expect("run");
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("no meshnode is answering"));
}

#[test]
fn key_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.key");
    let generated: Value = serde_json::from_slice(
        &std::process::Command::new(meshnode_bin())
            .args([
                "--json",
                "key",
                "gen",
                "--out",
                path.to_str().expect("utf8"),
            ])
            .output()
            .expect("run")
            .stdout,
    )
    .expect("json");
    let text = std::fs::read_to_string(&path).expect("key file");
    assert_eq!(text.len(), 65);
    assert!(text.ends_with('\n'));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let shown = std::process::Command::new(meshnode_bin())
        .args(["key", "show", path.to_str().expect("utf8")])
        .output()
        .expect("run");
    assert_eq!(
        stdout(&shown).trim(),
        generated["public"].as_str().expect("public")
    );
    // Refuses to overwrite.
    let again = std::process::Command::new(meshnode_bin())
        .args(["key", "gen", "--out", path.to_str().expect("utf8")])
        .output()
        .expect("run");
    assert_eq!(again.status.code(), Some(1));
    // A malformed key file is a clear error.
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "xyz\n").expect("write");
    let shown = std::process::Command::new(meshnode_bin())
        .args(["key", "show", bad.to_str().expect("utf8")])
        .output()
        .expect("run");
    assert_eq!(shown.status.code(), Some(1));
}

#[test]
fn init_files_and_modes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let out = std::process::Command::new(meshnode_bin())
        .args(["--json", "--data-dir", data.to_str().expect("utf8"), "init"])
        .output()
        .expect("run");
    let report: Value = serde_json::from_str(ok(out).trim()).expect("json");
    assert_eq!(report["node"].as_str().map(str::len), Some(64));
    use std::os::unix::fs::PermissionsExt;
    for (file, mode) in [("node.key", 0o600), ("api-token", 0o600)] {
        let m = std::fs::metadata(data.join(file))
            .expect("file")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, mode, "{file}");
    }
    for file in ["genesis.cbor", "config.toml"] {
        assert!(data.join(file).exists(), "{file}");
    }
    let genesis = std::fs::read(data.join("genesis.cbor")).expect("genesis");
    assert_eq!(
        report["net"],
        blake3::hash(&genesis).to_hex().as_str(),
        "net is the genesis hash"
    );
    // A second init refuses instead of overwriting keys.
    let again = std::process::Command::new(meshnode_bin())
        .args(["--data-dir", data.to_str().expect("utf8"), "init"])
        .output()
        .expect("run");
    assert_eq!(again.status.code(), Some(1));
    // Joining an existing network with --genesis keeps its net.
    let joiner = dir.path().join("joiner");
    let out = std::process::Command::new(meshnode_bin())
        .args([
            "--json",
            "--data-dir",
            joiner.to_str().expect("utf8"),
            "init",
            "--genesis",
            data.join("genesis.cbor").to_str().expect("utf8"),
        ])
        .output()
        .expect("run");
    let joined: Value = serde_json::from_str(ok(out).trim()).expect("json");
    assert_eq!(joined["net"], report["net"]);
    assert_ne!(joined["node"], report["node"]);
}
