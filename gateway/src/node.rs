//! A node's data directory (init) and its running components (open, shutdown).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use meshnode_ledger::{Ledger, LedgerConfig};
use meshnode_query::{Query, QueryConfig, SqlLimits, WorkerProgram};
use meshnode_schemas::{
    AuthorKey, BlobHash, EventBody, EventId, Genesis, NodeAnnounce, Payload, SignedEvent,
    SigningKey, Vector, author_of, key_file_text,
};
use meshnode_store::{PinMode, Store, StoreConfig};

use crate::config::{Config, config_path};

/// File names inside a data directory.
pub mod files {
    /// The node's Ed25519 secret seed (hex), mode 0600.
    pub const NODE_KEY: &str = "node.key";
    /// The genesis document (DAG-CBOR).
    pub const GENESIS: &str = "genesis.cbor";
    /// The bearer token for writes, mode 0600.
    pub const API_TOKEN: &str = "api-token";
    /// The blob store directory.
    pub const BLOBS: &str = "blobs";
    /// The ledger index directory.
    pub const LEDGER: &str = "ledger";
    /// The query tables directory.
    pub const QUERY: &str = "query";
    /// The API URL of the running node (written by `serve`, removed when it stops).
    pub const API: &str = "api";
}

/// What `meshnode init` created.
#[derive(Clone, Debug)]
pub struct InitReport {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The node's public key.
    pub node: AuthorKey,
    /// The network id (genesis hash).
    pub net: BlobHash,
}

/// Writes `contents` to a new file with mode `mode`, fsynced. Fails if the file exists.
pub fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    Ok(())
}

/// Generates a new random Ed25519 signing key from the OS random source.
pub fn generate_key() -> SigningKey {
    let seed: [u8; 32] = rand::random();
    SigningKey::from_bytes(&seed)
}

/// Reads a key file (64 lowercase hex characters and a newline).
pub fn read_key_file(path: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading key file {}", path.display()))?;
    meshnode_schemas::parse_key_file(&text).with_context(|| format!("key file {}", path.display()))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Creates a data directory: node key, genesis (new, with the node as only issuer, unless
/// `genesis_file` names an existing one), API token and a config file with every default.
pub fn init(
    data_dir: &Path,
    genesis_file: Option<&Path>,
    network_name: &str,
) -> anyhow::Result<InitReport> {
    if data_dir.join(files::NODE_KEY).exists() {
        bail!(
            "{} is already initialised (it has a {}); use another --data-dir or remove it",
            data_dir.display(),
            files::NODE_KEY
        );
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let key = generate_key();
    let node = author_of(&key);
    let genesis_bytes = match genesis_file {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("reading genesis {}", path.display()))?;
            Genesis::decode(&bytes).with_context(|| format!("genesis {}", path.display()))?;
            bytes
        }
        None => Genesis::new(network_name, node, now_ms()).encode()?,
    };
    let net = BlobHash::of(&genesis_bytes);
    write_new_file(
        &data_dir.join(files::NODE_KEY),
        key_file_text(&key).as_bytes(),
        0o600,
    )?;
    write_new_file(&data_dir.join(files::GENESIS), &genesis_bytes, 0o644)?;
    let token = hex::encode(rand::random::<[u8; 32]>());
    write_new_file(
        &data_dir.join(files::API_TOKEN),
        format!("{token}\n").as_bytes(),
        0o600,
    )?;
    let config = config_path(data_dir);
    if !config.exists() {
        write_new_file(&config, Config::default_file_text().as_bytes(), 0o644)?;
    }
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(InitReport {
        data_dir: data_dir.to_path_buf(),
        node,
        net,
    })
}

/// Reads the API token of a data directory.
pub fn read_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(files::API_TOKEN);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading API token {}", path.display()))?;
    Ok(text.trim().to_string())
}

/// The running parts of a node.
#[derive(Debug)]
pub struct Node {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Effective configuration.
    pub config: Config,
    /// The node's signing key.
    pub key: SigningKey,
    /// The node's public key.
    pub node: AuthorKey,
    /// The genesis document.
    pub genesis: Genesis,
    /// The network id.
    pub net: BlobHash,
    /// The blob store.
    pub store: Store,
    /// The ledger.
    pub ledger: Ledger,
    /// SQL and vector search over the ledger.
    pub query: Query,
    /// The bearer token that authorises writes.
    pub token: String,
    /// When the node started.
    pub started: Instant,
    /// The node's peer-to-peer endpoint, once `serve` started it.
    pub mesh: std::sync::OnceLock<meshnode_sync::Mesh>,
    /// Held while the node signs an event of its own log ([`Node::append_own`]).
    own: tokio::sync::Mutex<()>,
    /// [`Node::blobs_hosted`]'s last count and when it was taken.
    hosted: std::sync::Mutex<Option<(Instant, u64)>>,
    /// The last count, for requests that come while one is being taken.
    hosted_last: std::sync::atomic::AtomicU64,
}

impl Node {
    /// Opens an initialised data directory: loads keys and genesis, opens the store (recovering
    /// from a crash if needed) and makes sure the genesis document is stored and pinned.
    pub async fn open(data_dir: &Path, config: Config) -> anyhow::Result<Self> {
        if !data_dir.join(files::NODE_KEY).exists() {
            bail!(
                "{} is not initialised; run `meshnode --data-dir {} init` first",
                data_dir.display(),
                data_dir.display()
            );
        }
        let key = read_key_file(&data_dir.join(files::NODE_KEY))?;
        let genesis_path = data_dir.join(files::GENESIS);
        let genesis_bytes = std::fs::read(&genesis_path)
            .with_context(|| format!("reading {}", genesis_path.display()))?;
        let genesis = Genesis::decode(&genesis_bytes)
            .with_context(|| format!("genesis {}", genesis_path.display()))?;
        let net = BlobHash::of(&genesis_bytes);
        let token = read_token(data_dir)?;
        let opening = Instant::now();
        let store = Store::open(
            &data_dir.join(files::BLOBS),
            StoreConfig {
                gc_interval: Duration::from_secs(config.store.gc_interval_secs.max(1)),
                gc_waits_for_roots: true,
            },
        )
        .await?;
        store.add_bytes(genesis_bytes, PinMode::Pin).await?;
        let store_ms = opening.elapsed().as_millis() as u64;
        let ledger = Ledger::open(
            &data_dir.join(files::LEDGER),
            store.clone(),
            genesis.clone(),
            net,
            key.clone(),
            LedgerConfig::default(),
        )
        .await
        .context("opening the ledger")?;
        // The ledger's roots are registered: from here GC may delete what nothing holds.
        store.enable_gc();
        let ledger_ms = opening.elapsed().as_millis() as u64;
        let embedder = load_embedder(&config).await?;
        let query = Query::open(
            &data_dir.join(files::QUERY),
            ledger.clone(),
            store.clone(),
            QueryConfig {
                ann_rows_min: config.query.ann_rows_min,
                ann_metric: config.query.ann_metric.clone(),
                ..QueryConfig::default()
            },
            SqlLimits {
                timeout: Duration::from_millis(config.query.timeout_ms.max(1)),
                rows_max: config.query.rows_max.max(1),
                memory_bytes_max: config.query.memory_bytes_max.max(1 << 20),
                workers: Some(query_workers(&config)?),
                ..SqlLimits::default()
            },
            embedder,
        )
        .await
        .context("opening the query tables")?;
        let total_ms = opening.elapsed().as_millis() as u64;
        // Cumulative milliseconds; worth a line at the default level only when slow.
        if total_ms >= 1000 {
            tracing::info!(store_ms, ledger_ms, total_ms, "node opened");
        } else {
            tracing::debug!(store_ms, ledger_ms, total_ms, "node opened");
        }
        Ok(Self {
            data_dir: data_dir.to_path_buf(),
            config,
            node: author_of(&key),
            key,
            genesis,
            net,
            store,
            ledger,
            query,
            token,
            started: Instant::now(),
            mesh: std::sync::OnceLock::new(),
            hosted: std::sync::Mutex::new(None),
            hosted_last: std::sync::atomic::AtomicU64::new(0),
            own: tokio::sync::Mutex::new(()),
        })
    }

    /// Starts the peer-to-peer endpoint (the node key is its endpoint id) and replication
    /// from the peers remembered in the data directory.
    pub async fn start_mesh(&self) -> anyhow::Result<&meshnode_sync::Mesh> {
        let settings = &self.config.sync;
        let config = meshnode_sync::MeshConfig {
            bind: self.config.p2p_addr,
            advertise: self.config.p2p_advertise.clone(),
            pull_interval: std::time::Duration::from_millis(settings.pull_interval_ms.max(10)),
            allow: settings.allow.clone(),
            block: settings.block.clone(),
            ban_score: settings.ban_score.max(1),
            ban_first: std::time::Duration::from_secs(settings.ban_secs),
            new_authors_per_hour: settings.new_authors_per_hour,
            blob_bytes_max: self.config.limits.blob_bytes_max,
            relays: settings
                .relays
                .iter()
                .map(|r| {
                    r.parse::<meshnode_sync::RelayUrl>()
                        .map_err(|e| anyhow::anyhow!("[sync] relays: `{r}` is not a URL: {e}"))
                })
                .collect::<anyhow::Result<_>>()?,
            address_lookup: settings
                .address_lookup
                .as_ref()
                .map(|u| {
                    u.parse::<meshnode_sync::RelayUrl>().map_err(|e| {
                        anyhow::anyhow!("[sync] address_lookup: `{u}` is not a URL: {e}")
                    })
                })
                .transpose()?,
        };
        let mesh = meshnode_sync::Mesh::start(
            self.key.to_bytes(),
            self.ledger.clone(),
            self.store.clone(),
            &self.data_dir,
            config,
        )
        .await?;
        Ok(self.mesh.get_or_init(|| mesh))
    }

    /// Appends an event to the node's own log, signed with the node key. One at a time, and
    /// only on an accepted head with accepted deps: two events signed at the same seq would
    /// fork the node's log for good (every event of it from there on contested, its mints
    /// included). Everything that signs as the node goes through here: the hosting loop,
    /// `POST /v1/events/own`, and `meshnode event` with the node's key.
    pub async fn append_own(
        &self,
        deps: Vec<EventId>,
        payload: Payload,
    ) -> anyhow::Result<meshnode_ledger::Submitted> {
        let _one = self.own.lock().await;
        // A host must be reachable by those who read its `blob.host`, peers or not (an
        // announcement that fails does not stop the event).
        if matches!(payload, Payload::BlobHost(_))
            && let Err(e) = self.announce_address_locked(false).await
        {
            tracing::warn!("announcing this node's address: {e:#}");
        }
        self.append_own_locked(deps, payload).await
    }

    /// Appends a `node.announce` with this node's current ticket as `addr` if its registry
    /// entry has another one; with `only_if_announced`, only when it announced before (at
    /// start: a node whose address changed says so, one that never announced stays quiet).
    pub async fn announce_address(&self, only_if_announced: bool) -> anyhow::Result<bool> {
        let _one = self.own.lock().await;
        self.announce_address_locked(only_if_announced).await
    }

    async fn announce_address_locked(&self, only_if_announced: bool) -> anyhow::Result<bool> {
        // No endpoint (not started, or shut down): no address to give.
        let Some(mesh) = self.mesh.get().filter(|m| m.is_running()) else {
            return Ok(false);
        };
        let entry = self.ledger.node_entry(&self.node)?;
        let stale = match &entry {
            Some(entry) => entry.addr != mesh.ticket(),
            None => !only_if_announced,
        };
        if !stale {
            return Ok(false);
        }
        // Only the address changes: what the operator announced stays.
        let payload = Payload::NodeAnnounce(match entry {
            Some(entry) => NodeAnnounce {
                service: entry.service,
                endpoints: entry.endpoints,
                capabilities: entry.capabilities,
                basin_signature: Vector::new(&entry.basin_signature)?,
                addr: mesh.ticket().to_string(),
            },
            None => NodeAnnounce {
                service: "meshnode".into(),
                endpoints: Vec::new(),
                capabilities: vec!["sync/1".into(), "blobs".into()],
                basin_signature: Vector::new(&[])?,
                addr: mesh.ticket().to_string(),
            },
        });
        self.append_own_locked(Vec::new(), payload).await?;
        tracing::info!("announced this node's address: {}", mesh.ticket());
        Ok(true)
    }

    /// [`Node::append_own`] with the `own` lock held.
    async fn append_own_locked(
        &self,
        mut deps: Vec<EventId>,
        payload: Payload,
    ) -> anyhow::Result<meshnode_ledger::Submitted> {
        deps.sort();
        deps.dedup();
        for dep in &deps {
            if self.ledger.event_record(dep)?.is_none() {
                bail!("dependency {dep} is not an accepted event of this node");
            }
        }
        let account = self.ledger.account(&self.node)?;
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let body = EventBody {
            net: self.net,
            author: self.node,
            seq: account.head_seq + 1,
            prev: account.head_id,
            deps,
            ts,
            payload,
        };
        let event = SignedEvent::sign(body, &self.key)?;
        let submitted = self
            .ledger
            .submit(bytes::Bytes::from(event.envelope))
            .await?;
        // The head moved before the lock is released (accepted), or nothing was taken.
        debug_assert!(!matches!(
            submitted.status,
            meshnode_ledger::Status::Pending(_)
        ));
        Ok(submitted)
    }

    /// Blobs this node announces with its own `blob.host`, counted at most every 10 s (the
    /// count reads every host row).
    pub fn blobs_hosted(&self) -> u64 {
        // Another request counting now: its last count will do.
        let mut cached = match self.hosted.try_lock() {
            Ok(cached) => cached,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return self.hosted_last.load(std::sync::atomic::Ordering::Relaxed);
            }
        };
        match *cached {
            Some((at, n)) if at.elapsed() < Duration::from_secs(10) => n,
            last => match self.ledger.hosted_by(&self.node) {
                Ok(n) => {
                    *cached = Some((Instant::now(), n));
                    self.hosted_last
                        .store(n, std::sync::atomic::Ordering::Relaxed);
                    n
                }
                Err(e) => {
                    tracing::warn!("counting hosted blobs: {e}");
                    last.map_or(0, |(_, n)| n)
                }
            },
        }
    }

    /// Flushes and closes every component.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        if let Some(mesh) = self.mesh.get() {
            mesh.shutdown().await;
        }
        self.query.shutdown().await;
        self.ledger.shutdown().await;
        self.store.shutdown().await?;
        Ok(())
    }
}

/// SQL runs in worker processes: this binary, started with its hidden `query-worker`
/// subcommand, each under `query.worker_memory_bytes`.
fn query_workers(config: &Config) -> anyhow::Result<WorkerProgram> {
    // The running binary itself, even when an upgrade replaced the file on disk meanwhile
    // (a worker of another version would not speak this node's protocol).
    let own = std::path::Path::new("/proc/self/exe");
    let program = if own.exists() {
        own.to_path_buf()
    } else {
        std::env::current_exe().context("finding this binary to start query workers")?
    };
    // DataFusion's pool must fit, with room for the values that are not counted there.
    let floor = (config.query.memory_bytes_max as u64).saturating_add(256 << 20);
    if config.query.worker_memory_bytes < floor {
        anyhow::bail!(
            "query.worker_memory_bytes is {}; it must be at least query.memory_bytes_max + 256 MiB \
             ({floor})",
            config.query.worker_memory_bytes
        );
    }
    Ok(WorkerProgram {
        program,
        args: vec!["query-worker".into()],
        memory_bytes: config.query.worker_memory_bytes,
    })
}

/// The embedding model, if installed. A missing model is a warning (text routes answer 503);
/// weights that fail their hash, or files that do not load, stop the start.
async fn load_embedder(
    config: &Config,
) -> anyhow::Result<Option<std::sync::Arc<meshnode_embed::Embedder>>> {
    let dir = if config.query.model_dir.is_empty() {
        match meshnode_embed::default_model_dir() {
            Some(dir) => dir,
            None => return Ok(None),
        }
    } else {
        PathBuf::from(&config.query.model_dir)
    };
    let opened = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || meshnode_embed::Embedder::open(&dir)).await?
    };
    match opened {
        Ok(embedder) => {
            tracing::debug!(model = embedder.model_id(), dir = %dir.display(), "embedding model loaded");
            Ok(Some(std::sync::Arc::new(embedder)))
        }
        Err(e @ meshnode_embed::Error::Missing { .. }) => {
            tracing::warn!("{e}; until then text routes answer 503 no_embed_model");
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e).context("loading the embedding model")),
    }
}
