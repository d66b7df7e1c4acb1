//! Node configuration: `<data-dir>/config.toml`, overridden by environment, overridden by flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default HTTP listen address.
pub const HTTP_ADDR_DEFAULT: &str = "127.0.0.1:8080";

/// Everything a node reads at start. Every field has a default; `config.toml` may set any
/// subset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the HTTP gateway listens. Env: `MESHNODE_HTTP_ADDR`.
    pub http_addr: SocketAddr,
    /// Whether reads (GET/HEAD) are public. If false they need the bearer token too.
    /// Env: `MESHNODE_PUBLIC_READS`.
    pub public_reads: bool,
    /// Body and request limits.
    pub limits: Limits,
    /// Server hardening.
    pub server: ServerConfig,
    /// Blob store settings.
    pub store: StoreSettings,
    /// SQL and vector search settings.
    pub query: QuerySettings,
    /// Where the peer-to-peer endpoint (iroh, QUIC over UDP) binds; port 0 picks a free one.
    /// Env: `MESHNODE_P2P_ADDR`; flag `serve --p2p-addr`.
    pub p2p_addr: SocketAddr,
    /// The addresses the ticket gives peers to reach this node, when the bound one is not
    /// reachable as is (a NAT, a 0.0.0.0 bind). Empty: the bound address (0.0.0.0 as
    /// 127.0.0.1) and the interface addresses the endpoint finds.
    /// Env: `MESHNODE_P2P_ADVERTISE` (comma-separated); flag `serve --p2p-advertise`.
    pub p2p_advertise: Vec<SocketAddr>,
    /// Peers and replication.
    pub sync: SyncSettings,
}

/// Default peer-to-peer address: loopback only, any free port (set a reachable address and
/// port to join a mesh beyond this machine).
pub const P2P_ADDR_DEFAULT: &str = "127.0.0.1:0";

/// Peers and replication settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncSettings {
    /// Only these peers (endpoint ids, hex) may be added or served; empty: any.
    pub allow: Vec<String>,
    /// These peers are never added or served.
    pub block: Vec<String>,
    /// Misbehaviour score at which a peer is disconnected and banned. Default 100.
    pub ban_score: u32,
    /// The first ban, in seconds; each next one doubles (at most a day). Default 60.
    pub ban_secs: u64,
    /// Pause between pulls once a peer's log is read to its end, ms. Default 500.
    pub pull_interval_ms: u64,
    /// Authors new to this node that one peer may bring in per hour; past it, replication
    /// from that peer pauses until the hour is over. Default 10 000.
    /// Env: `MESHNODE_SYNC_NEW_AUTHORS_PER_HOUR`.
    pub new_authors_per_hour: u32,
    /// Hosting by policy: the node fetches, pins and announces the weights of skills that
    /// fewer than this many nodes host. 0 (default): off. Env: `MESHNODE_SYNC_REPLICATE`.
    pub replicate: u32,
    /// Bytes of skill weights this node hosts at most when `replicate` is on. Default 10 GiB.
    /// Env: `MESHNODE_SYNC_REPLICATE_BYTES_MAX`.
    pub replicate_bytes_max: u64,
    /// iroh relay servers (URLs) to use, for peers no direct address reaches; the ticket
    /// names the first. Empty (default): relays off. Env: `MESHNODE_SYNC_RELAYS`
    /// (comma-separated).
    pub relays: Vec<String>,
    /// A pkarr relay (HTTP URL) to publish this node's addresses to and look peers up at,
    /// so a ticket of an id alone can be dialled. None (default): address lookup off.
    /// Env: `MESHNODE_SYNC_ADDRESS_LOOKUP`.
    pub address_lookup: Option<String>,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            block: Vec::new(),
            ban_score: 100,
            ban_secs: 60,
            pull_interval_ms: 500,
            new_authors_per_hour: 10_000,
            replicate: 0,
            replicate_bytes_max: 10 << 30,
            relays: Vec::new(),
            address_lookup: None,
        }
    }
}

/// SQL and vector search settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuerySettings {
    /// Longest a SQL query or search may run, in milliseconds. Default 10 000.
    /// Env: `MESHNODE_QUERY_TIMEOUT_MS`.
    pub timeout_ms: u64,
    /// Most rows a query returns. Default 10 000.
    pub rows_max: usize,
    /// Memory one query may use for sorts, joins and aggregations (DataFusion's pool), in
    /// bytes. Default 512 MiB.
    pub memory_bytes_max: usize,
    /// Memory each SQL worker process may allocate for its query, beyond what it holds at
    /// start and the stacks of its threads (enforced with `RLIMIT_DATA`). A query that needs
    /// more ends its worker and answers `query_too_expensive`; the node is not affected.
    /// Default 2 GiB. Env: `MESHNODE_QUERY_WORKER_MEMORY_BYTES`.
    pub worker_memory_bytes: u64,
    /// Rows from which a vector table gets an ANN index. Default 20 000.
    /// Env: `MESHNODE_ANN_ROWS_MIN`.
    pub ann_rows_min: usize,
    /// Metric of the ANN index (`cosine`, `l2`, `dot`). Default `cosine`.
    pub ann_metric: String,
    /// Directory of the embedding model (all-MiniLM-L6-v2). Empty: `$MESHNODE_MODEL_DIR`, else
    /// `~/.cache/meshnode/models/all-MiniLM-L6-v2`. Without a model the node runs and its text
    /// routes answer 503 `no_embed_model`; weights that fail their hash stop the start.
    pub model_dir: String,
}

impl Default for QuerySettings {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            rows_max: 10_000,
            memory_bytes_max: 512 * 1024 * 1024,
            worker_memory_bytes: 2 << 30,
            ann_rows_min: 20_000,
            ann_metric: "cosine".into(),
            model_dir: String::new(),
        }
    }
}

/// Size limits of request bodies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest blob accepted by `POST /v1/blobs`, in bytes. Default 8 GiB.
    /// Env: `MESHNODE_BLOB_BYTES_MAX`.
    pub blob_bytes_max: u64,
    /// Largest JSON request body, in bytes. Default 1 MiB.
    pub json_bytes_max: u64,
    /// Largest blob cached in memory for fast GETs, in bytes. Default 64 KiB.
    pub cache_blob_bytes_max: u64,
    /// Total size of the in-memory blob cache, in bytes. Default 64 MiB.
    pub cache_bytes_max: u64,
}

/// Connection limits and timeouts of the HTTP server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Most connections open at once; further ones wait in the listen backlog.
    /// Env: `MESHNODE_CONNECTIONS_MAX`.
    pub connections_max: usize,
    /// Most open connections from one client address; more get a 429. Default 256. Env:
    /// `MESHNODE_CONNECTIONS_PER_CLIENT_MAX`.
    pub connections_per_client_max: usize,
    /// Time a client has to send a request's headers, and the longest a kept-alive
    /// connection may sit idle between requests, in milliseconds. Default 10 s.
    /// Env: `MESHNODE_HEADER_TIMEOUT_MS`.
    pub header_timeout_ms: u64,
    /// Longest a write on a connection may stall (a client not reading its response), in
    /// milliseconds. Default 60 s. Env: `MESHNODE_IO_TIMEOUT_MS`. (Reads are bounded by the
    /// header timeout, the body deadline and the upload rate floor instead.)
    pub io_timeout_ms: u64,
    /// Longest a whole request body (JSON, an event) may take to arrive, in milliseconds.
    /// Default 30 s. Env: `MESHNODE_BODY_TIMEOUT_MS`. Uploads instead need a sustained
    /// 16 KiB/s after their first 10 s.
    pub body_timeout_ms: u64,
    /// Slowest average rate of a blob upload or download once its grace period is over, in
    /// bytes per second. Default 16 KiB/s. Env: `MESHNODE_TRANSFER_RATE_MIN`.
    pub transfer_rate_min: u64,
    /// Time before `transfer_rate_min` applies, and the longest pause of an upload, in
    /// milliseconds. Default 10 s. Env: `MESHNODE_TRANSFER_GRACE_MS`.
    pub transfer_grace_ms: u64,
}

/// Blob store settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// Seconds between scheduled garbage collections. Default 600. Env:
    /// `MESHNODE_GC_INTERVAL_SECS`.
    pub gc_interval_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_addr: HTTP_ADDR_DEFAULT
                .parse()
                .expect("invariant: the default address parses"),
            public_reads: true,
            limits: Limits::default(),
            server: ServerConfig::default(),
            store: StoreSettings::default(),
            query: QuerySettings::default(),
            p2p_advertise: Vec::new(),
            p2p_addr: P2P_ADDR_DEFAULT
                .parse()
                .expect("invariant: the default address parses"),
            sync: SyncSettings::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            blob_bytes_max: 8 * 1024 * 1024 * 1024,
            json_bytes_max: 1024 * 1024,
            cache_blob_bytes_max: 64 * 1024,
            cache_bytes_max: 64 * 1024 * 1024,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            connections_max: 1024,
            connections_per_client_max: 256,
            header_timeout_ms: 10_000,
            io_timeout_ms: 60_000,
            body_timeout_ms: 30_000,
            transfer_rate_min: 16 * 1024,
            transfer_grace_ms: 10_000,
        }
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            gc_interval_secs: 600,
        }
    }
}

/// Path of the config file in a data dir.
pub fn config_path(data_dir: &Path) -> PathBuf {
    data_dir.join("config.toml")
}

impl Config {
    /// Reads `<data-dir>/config.toml` (defaults if absent), then applies environment overrides.
    pub fn load(data_dir: &Path) -> anyhow::Result<Self> {
        let path = config_path(data_dir);
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => {
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        Ok(config)
    }

    /// Applies `MESHNODE_*` overrides read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        fn parse<T: std::str::FromStr>(name: &str, value: String) -> anyhow::Result<T>
        where
            T::Err: std::fmt::Display,
        {
            value
                .parse()
                .map_err(|e| anyhow::anyhow!("environment variable {name}={value:?}: {e}"))
        }
        if let Some(v) = get("MESHNODE_HTTP_ADDR") {
            self.http_addr = parse("MESHNODE_HTTP_ADDR", v)?;
        }
        if let Some(v) = get("MESHNODE_SYNC_REPLICATE") {
            self.sync.replicate = parse("MESHNODE_SYNC_REPLICATE", v)?;
        }
        if let Some(v) = get("MESHNODE_SYNC_REPLICATE_BYTES_MAX") {
            self.sync.replicate_bytes_max = parse("MESHNODE_SYNC_REPLICATE_BYTES_MAX", v)?;
        }
        if let Some(v) = get("MESHNODE_SYNC_NEW_AUTHORS_PER_HOUR") {
            self.sync.new_authors_per_hour = parse("MESHNODE_SYNC_NEW_AUTHORS_PER_HOUR", v)?;
        }
        if let Some(v) = get("MESHNODE_SYNC_ADDRESS_LOOKUP") {
            self.sync.address_lookup = Some(v).filter(|v| !v.trim().is_empty());
        }
        if let Some(v) = get("MESHNODE_SYNC_RELAYS") {
            self.sync.relays = v
                .split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(String::from)
                .collect();
        }
        if let Some(v) = get("MESHNODE_P2P_ADDR") {
            self.p2p_addr = parse("MESHNODE_P2P_ADDR", v)?;
        }
        if let Some(v) = get("MESHNODE_P2P_ADVERTISE") {
            self.p2p_advertise = v
                .split(',')
                .filter(|a| !a.trim().is_empty())
                .map(|a| parse("MESHNODE_P2P_ADVERTISE", a.trim().to_string()))
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = get("MESHNODE_PUBLIC_READS") {
            self.public_reads = parse("MESHNODE_PUBLIC_READS", v)?;
        }
        if let Some(v) = get("MESHNODE_BLOB_BYTES_MAX") {
            self.limits.blob_bytes_max = parse("MESHNODE_BLOB_BYTES_MAX", v)?;
        }
        if let Some(v) = get("MESHNODE_CONNECTIONS_MAX") {
            self.server.connections_max = parse("MESHNODE_CONNECTIONS_MAX", v)?;
        }
        if let Some(v) = get("MESHNODE_CONNECTIONS_PER_CLIENT_MAX") {
            self.server.connections_per_client_max =
                parse("MESHNODE_CONNECTIONS_PER_CLIENT_MAX", v)?;
        }
        if let Some(v) = get("MESHNODE_BODY_TIMEOUT_MS") {
            self.server.body_timeout_ms = parse("MESHNODE_BODY_TIMEOUT_MS", v)?;
        }
        if let Some(v) = get("MESHNODE_TRANSFER_RATE_MIN") {
            self.server.transfer_rate_min = parse("MESHNODE_TRANSFER_RATE_MIN", v)?;
        }
        if let Some(v) = get("MESHNODE_TRANSFER_GRACE_MS") {
            self.server.transfer_grace_ms = parse("MESHNODE_TRANSFER_GRACE_MS", v)?;
        }
        if let Some(v) = get("MESHNODE_GC_INTERVAL_SECS") {
            self.store.gc_interval_secs = parse("MESHNODE_GC_INTERVAL_SECS", v)?;
        }
        if let Some(v) = get("MESHNODE_HEADER_TIMEOUT_MS") {
            self.server.header_timeout_ms = parse("MESHNODE_HEADER_TIMEOUT_MS", v)?;
        }
        if let Some(v) = get("MESHNODE_IO_TIMEOUT_MS") {
            self.server.io_timeout_ms = parse("MESHNODE_IO_TIMEOUT_MS", v)?;
        }
        if let Some(v) = get("MESHNODE_QUERY_TIMEOUT_MS") {
            self.query.timeout_ms = parse("MESHNODE_QUERY_TIMEOUT_MS", v)?;
        }
        if let Some(v) = get("MESHNODE_QUERY_WORKER_MEMORY_BYTES") {
            self.query.worker_memory_bytes = parse("MESHNODE_QUERY_WORKER_MEMORY_BYTES", v)?;
        }
        if let Some(v) = get("MESHNODE_ANN_ROWS_MIN") {
            self.query.ann_rows_min = parse("MESHNODE_ANN_ROWS_MIN", v)?;
        }
        Ok(())
    }

    /// The config file text written by `meshnode init`: every setting with its default.
    pub fn default_file_text() -> String {
        let body = toml::to_string_pretty(&Config::default())
            .expect("invariant: the default config serialises");
        format!(
            "# meshnode node configuration. Precedence: this file < MESHNODE_* environment < flags.\n\n{body}"
        )
    }
}
