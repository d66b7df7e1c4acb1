//! Test harness: runs real node processes on loopback, each with its own data directory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

/// POSTs a JSON body (with the node's token if `token`); the status and the JSON answer.
pub(crate) async fn post(
    node: &TestNode,
    path: &str,
    body: serde_json::Value,
    token: bool,
) -> (reqwest::StatusCode, serde_json::Value) {
    let mut r = client().post(format!("{}{path}", node.url)).json(&body);
    if token {
        r = r.bearer_auth(&node.token);
    }
    let r = r.send().await.expect("post");
    let status = r.status();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// Runs one SQL statement; the status and the JSON answer.
pub(crate) async fn sql(node: &TestNode, text: &str) -> (reqwest::StatusCode, serde_json::Value) {
    post(node, "/v1/sql", serde_json::json!({"sql": text}), false).await
}

/// Uploads a blob (pinned unless `pin` is false); the status and the JSON answer.
pub(crate) async fn try_upload(
    node: &TestNode,
    bytes: Vec<u8>,
    pin: bool,
) -> (reqwest::StatusCode, serde_json::Value) {
    let query = if pin { "" } else { "?pin=false" };
    let r = client()
        .post(format!("{}/v1/blobs{query}", node.url))
        .bearer_auth(&node.token)
        .body(bytes)
        .send()
        .await
        .expect("upload");
    let status = r.status();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// Uploads a blob, pinned, and expects it stored; the JSON answer.
pub(crate) async fn upload(node: &TestNode, bytes: Vec<u8>) -> serde_json::Value {
    let (status, body) = try_upload(node, bytes, true).await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
    body
}

/// The workspace root.
/// An HTTP client for the test nodes (loopback only, no proxy).
pub(crate) fn client() -> reqwest::Client {
    meshnode_gateway::client::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("invariant: the tests crate is inside the workspace")
        .to_path_buf()
}

/// Path of the node binary (the real CLI, built by the tests crate with the test build's
/// features).
pub(crate) fn meshnode_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshnode-it-node"))
}

/// A real node process on loopback with its own temporary data directory.
#[derive(Debug)]
pub(crate) struct TestNode {
    dir: tempfile::TempDir,
    /// Base URL of its HTTP API, e.g. `http://127.0.0.1:41234`.
    pub(crate) url: String,
    /// The bearer token.
    pub(crate) token: String,
    /// The address it listens on.
    pub(crate) addr: String,
    child: Option<Child>,
    env: Vec<(String, String)>,
    serve_args: Vec<String>,
}

impl TestNode {
    /// Initialises a data directory and starts a node on a free loopback port.
    pub(crate) fn start() -> anyhow::Result<Self> {
        Self::start_with(&[])
    }

    /// Like [`TestNode::start`], with extra environment (e.g. `MESHNODE_CONNECTIONS_MAX`).
    pub(crate) fn start_with(env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_full(env, &[])
    }

    /// A node started with the demo network loaded (`serve --demo`).
    pub(crate) fn start_demo(env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_full(env, &["--demo"])
    }

    /// A node of the network of `genesis` (a genesis document file), started with `init
    /// --genesis`.
    pub(crate) fn start_joining(genesis: &Path) -> anyhow::Result<Self> {
        Self::start_joining_with(genesis, &[])
    }

    /// Like [`TestNode::start_joining`], with extra environment.
    pub(crate) fn start_joining_with(genesis: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_init(env, &[], &["--genesis".as_ref(), genesis.as_os_str()])
    }

    fn start_full(env: &[(&str, &str)], serve_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_init(env, serve_args, &[])
    }

    /// A node whose data dir is a new directory inside `parent` (e.g. a small filesystem).
    pub(crate) fn start_in(parent: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("meshnode-it-")
            .tempdir_in(parent)?;
        Self::start_at(dir, env, &[], &[])
    }

    fn start_init(
        env: &[(&str, &str)],
        serve_args: &[&str],
        init_args: &[&std::ffi::OsStr],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("meshnode-it-").tempdir()?;
        Self::start_at(dir, env, serve_args, init_args)
    }

    fn start_at(
        dir: tempfile::TempDir,
        env: &[(&str, &str)],
        serve_args: &[&str],
        init_args: &[&std::ffi::OsStr],
    ) -> anyhow::Result<Self> {
        let output = Command::new(meshnode_bin())
            .arg("--data-dir")
            .arg(dir.path())
            .arg("init")
            .args(init_args)
            .output()?;
        if !output.status.success() {
            bail!("init failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let token = std::fs::read_to_string(dir.path().join("api-token"))?
            .trim()
            .to_string();
        let mut node = Self {
            dir,
            url: String::new(),
            token,
            addr: "127.0.0.1:0".into(),
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            serve_args: serve_args.iter().map(|s| s.to_string()).collect(),
        };
        node.spawn()?;
        Ok(node)
    }

    /// The data directory.
    pub(crate) fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut child = Command::new(meshnode_bin())
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--json")
            .arg("serve")
            .arg("--http-addr")
            .arg(&self.addr)
            .args(&self.serve_args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "RUST_LOG",
                std::env::var("MESHNODE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning meshnode serve")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the child never blocks on a full pipe.
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| anyhow!("node did not report its address within 60 s"))?;
        let value: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("unexpected serve output {line:?}"))?;
        let url = value["listening"]
            .as_str()
            .ok_or_else(|| anyhow!("no `listening` in {value}"))?
            .to_string();
        self.addr = url.trim_start_matches("http://").to_string();
        self.url = url;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the process with SIGKILL (no chance to flush anything) and waits for it.
    /// The node process's id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub(crate) fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process with SIGTERM and waits for a clean exit.
    pub(crate) fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            Command::new("kill").args(["-TERM", &pid]).status()?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait()? {
                    if !status.success() {
                        bail!("node exited with {status}");
                    }
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    bail!("node did not stop within 30 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Sets (or replaces) an environment variable of the next start.
    pub(crate) fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Starts the process again on the same address and data directory.
    pub(crate) fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    /// Runs the `meshnode` CLI against this node.
    pub(crate) fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, None)
    }

    /// Runs the CLI with bytes on stdin.
    pub(crate) fn cli_with_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut command = Command::new(meshnode_bin());
        command
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--api")
            .arg(&self.url)
            .args(args)
            .env_remove("MESHNODE_DATA_DIR")
            .env_remove("MESHNODE_API")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn meshnode cli");
        if let Some(bytes) = stdin {
            use std::io::Write;
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(bytes).expect("write stdin");
        }
        child.wait_with_output().expect("cli output")
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `python3 script args…` from `tests/python`, returning stdout; fails on a non-zero exit.
pub(crate) fn python(script: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("python3")
        .arg(workspace_root().join("tests/python").join(script))
        .args(args)
        .output()
        .context("running python3 (make test installs it and the pinned packages)")?;
    if !output.status.success() {
        bail!(
            "{script} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// `GET /v1/status` as JSON.
pub(crate) async fn status(node: &TestNode) -> serde_json::Value {
    client()
        .get(format!("{}/v1/status", node.url))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("status json")
}
