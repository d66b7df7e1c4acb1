//! Keeping the query tables current from the ledger's event feed: batched appends, the
//! in-memory fold of the state tables, crash-safe progress, catch-up, rebuild, indexing.
//!
//! Crash safety: each flush appends rows to the append-only tables (each append is one Lance
//! commit, fsynced), then records `progress.json` (events applied), then — when state changed —
//! `fold.bin` (the state fold and the event count it reflects) and the state tables. On start,
//! events from the fold's count are replayed; rows an append table already has (by
//! `leaf_index`) are skipped, so nothing is duplicated and nothing is missed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow_array::{Array, StringArray, UInt64Array};
use futures::TryStreamExt;
use meshnode_ledger::{EventRecord, ForkProof, Ledger};
use meshnode_schemas::tables::{APPEND_TABLES, STATE_TABLES};
use meshnode_schemas::{AuthorKey, BlobHash, EventId, Payload, SignedEvent};
use meshnode_store::Store;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::error::{Error, Result, internal};
use crate::rows::{self, Builder, Value};
use crate::tables::Tables;

/// Query materialization settings.
#[derive(Clone, Debug)]
pub struct QueryConfig {
    /// Events per flush at most (one Lance commit per table per flush).
    pub flush_events_max: usize,
    /// Longest a new event waits before it is flushed.
    pub flush_interval: Duration,
    /// Shortest time between rewrites of the state tables while events keep arriving.
    pub state_interval: Duration,
    /// Rows from which a vector table gets an ANN index (below: exact search).
    pub ann_rows_min: usize,
    /// Metric the ANN index is built for (`cosine`, `l2`, `dot`); other metrics search exactly.
    pub ann_metric: String,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            flush_events_max: 20_000,
            flush_interval: Duration::from_millis(200),
            state_interval: Duration::from_secs(2),
            ann_rows_min: 20_000,
            ann_metric: "cosine".into(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Balance {
    pub(crate) received: u64,
    pub(crate) received_contested: u64,
    pub(crate) sent: u64,
    pub(crate) minted: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct NodeRow {
    service: String,
    endpoints: Vec<String>,
    capabilities: Vec<String>,
    addr: String,
    basin_signature: Vec<f32>,
    last_event: EventId,
    last_ts: i64,
    n_announces: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct BasinAcc {
    owner: AuthorKey,
    basin_id: String,
    sums: Vec<f64>,
    weights: Vec<f64>,
    n_versions: u64,
    head: EventId,
}

/// The state tables, folded from events.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Fold {
    /// Events folded (the next leaf index).
    pub(crate) applied: u64,
    pub(crate) balances: BTreeMap<AuthorKey, Balance>,
    reputation: BTreeMap<AuthorKey, (i64, u64)>,
    nodes: BTreeMap<AuthorKey, NodeRow>,
    basins: BTreeMap<EventId, BasinAcc>,
    version_basin: HashMap<EventId, EventId>,
    skill_blobs: BTreeMap<BlobHash, (u64, EventId)>,
    hosts: BTreeMap<BlobHash, BTreeSet<AuthorKey>>,
    /// Forked logs: first contested seq.
    frozen: BTreeMap<AuthorKey, u64>,
    #[serde(skip)]
    dirty: BTreeSet<&'static str>,
}

impl Fold {
    fn apply(&mut self, record: &EventRecord, event: &SignedEvent) {
        let author = record.author;
        match &event.body.payload {
            Payload::TokenMint(p) => {
                self.balances.entry(author).or_default().minted += p.amount;
                self.credit(p.to, p.amount, author, record.seq);
            }
            Payload::TokenTransfer(p) => {
                self.balances.entry(author).or_default().sent += p.amount;
                self.credit(p.to, p.amount, author, record.seq);
            }
            Payload::ReputationDelta(p) => {
                let r = self.reputation.entry(p.subject).or_default();
                r.0 += p.delta;
                r.1 += 1;
                self.dirty.insert("reputation");
            }
            Payload::NodeAnnounce(p) => {
                let n = self.nodes.entry(author).or_insert_with(|| NodeRow {
                    service: String::new(),
                    endpoints: vec![],
                    capabilities: vec![],
                    addr: String::new(),
                    basin_signature: vec![],
                    last_event: record.id,
                    last_ts: record.ts,
                    n_announces: 0,
                });
                n.service = p.service.clone();
                n.endpoints = p.endpoints.clone();
                n.capabilities = p.capabilities.clone();
                n.addr = p.addr.clone();
                n.basin_signature = p.basin_signature.values();
                n.last_event = record.id;
                n.last_ts = record.ts;
                n.n_announces += 1;
                self.dirty.insert("nodes");
            }
            Payload::BasinPublish(p) => {
                let values = p.coordinates.values();
                self.basins.insert(
                    record.id,
                    BasinAcc {
                        owner: author,
                        basin_id: p.basin_id.clone(),
                        sums: values.iter().map(|&v| f64::from(v)).collect(),
                        weights: vec![1.0; values.len()],
                        n_versions: 1,
                        head: record.id,
                    },
                );
                self.version_basin.insert(record.id, record.id);
                self.dirty.insert("basins");
            }
            Payload::BasinDelta(p) => {
                if let Some(basin_id) = self.version_basin.get(&p.parent).copied() {
                    self.version_basin.insert(record.id, basin_id);
                    if let Some(b) = self.basins.get_mut(&basin_id) {
                        let w = p.weight_ppm as f64 / 1_000_000.0;
                        let values = p.values.values();
                        let indices: Vec<usize> = if p.indices.is_empty() {
                            (0..b.sums.len()).collect()
                        } else {
                            p.indices.iter().map(|&i| i as usize).collect()
                        };
                        for (&i, &v) in indices.iter().zip(&values) {
                            if i < b.sums.len() {
                                b.sums[i] += w * f64::from(v);
                                b.weights[i] += w;
                            }
                        }
                        b.n_versions += 1;
                        b.head = record.id;
                        self.dirty.insert("basins");
                    }
                }
            }
            Payload::SkillPublish(p) => {
                self.skill_blobs.insert(p.blob, (p.size, record.id));
                self.dirty.insert("blobs");
            }
            Payload::BlobHost(p) => {
                let hosts = self.hosts.entry(p.blob).or_default();
                if p.pinned {
                    hosts.insert(author);
                } else {
                    hosts.remove(&author);
                }
                self.dirty.insert("blobs");
            }
            Payload::SkillEndorse(_) | Payload::KeyRotate(_) => {}
        }
        self.applied = record.index + 1;
    }

    fn credit(&mut self, to: AuthorKey, amount: u64, from: AuthorKey, seq: u64) {
        let b = self.balances.entry(to).or_default();
        b.received += amount;
        if self.frozen.get(&from).is_some_and(|f| seq >= *f) {
            b.received_contested += amount;
        }
        self.dirty.insert("balances");
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Progress {
    /// Every event below this leaf index is in the append tables.
    applied: u64,
}

/// One entry of the version history: after `applied` events, the tables were at these versions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct VersionEntry {
    pub(crate) applied: u64,
    pub(crate) versions: BTreeMap<String, u64>,
}

pub(crate) enum Command {
    /// Reply once every event the ledger had when asked is materialized.
    Sync(oneshot::Sender<Result<()>>),
    Rebuild(oneshot::Sender<Result<()>>),
    Reindex(oneshot::Sender<Result<Vec<String>>>),
    Stop(oneshot::Sender<()>),
}

/// State shared between the materializer and readers.
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) tables: Arc<Tables>,
    pub(crate) ledger: Ledger,
    pub(crate) store: Store,
    pub(crate) config: QueryConfig,
    pub(crate) applied: AtomicU64,
    pub(crate) caught_up: AtomicBool,
    pub(crate) history: std::sync::Mutex<Vec<VersionEntry>>,
    pub(crate) commands: mpsc::Sender<Command>,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&temp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&temp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

pub(crate) struct Materializer {
    shared: Arc<Shared>,
    fold: Fold,
    /// Per append table: the largest leaf index it holds.
    appended: HashMap<&'static str, u64>,
    state_written: Instant,
    feed: broadcast::Receiver<Arc<meshnode_ledger::Accepted>>,
    forks: broadcast::Receiver<ForkProof>,
}

impl Materializer {
    pub(crate) async fn open(shared: Arc<Shared>) -> Result<Self> {
        let feed = shared.ledger.subscribe();
        let forks = shared.ledger.subscribe_forks();
        let fold: Fold = match std::fs::read(shared.dir.join("fold.bin")) {
            Ok(bytes) => postcard::from_bytes(&bytes).map_err(|e| {
                internal(format!(
                    "fold.bin is unreadable ({e}); run `meshnode query rebuild`"
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Fold::default(),
            Err(e) => return Err(e.into()),
        };
        let mut appended = HashMap::new();
        for table in APPEND_TABLES {
            if let Some(max) = shared.tables.max_leaf_index(table).await? {
                appended.insert(table, max);
            }
        }
        if let Ok(text) = std::fs::read_to_string(shared.dir.join("versions.jsonl")) {
            let mut history = shared
                .history
                .lock()
                .expect("invariant: history lock is never poisoned");
            for line in text.lines() {
                if let Ok(entry) = serde_json::from_str::<VersionEntry>(line) {
                    history.push(entry);
                }
            }
        }
        shared.applied.store(fold.applied, Ordering::Release);
        Ok(Self {
            shared,
            fold,
            appended,
            state_written: Instant::now(),
            feed,
            forks,
        })
    }

    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        // Forks this node learned while the tables were not running.
        if let Ok(forks) = self.shared.ledger.forks() {
            for fork in forks {
                if let Err(e) = self.on_fork(&fork).await {
                    tracing::warn!("query: applying a fork: {e}");
                }
            }
        }
        let mut tick = tokio::time::interval(self.shared.config.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut waiting_sync: Vec<(u64, oneshot::Sender<Result<()>>)> = Vec::new();
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Sync(reply)) => {
                        let target = self.shared.ledger.tree_size().unwrap_or(0);
                        waiting_sync.push((target, reply));
                    }
                    Some(Command::Rebuild(reply)) => {
                        let result = self.rebuild().await;
                        let _ = reply.send(result);
                    }
                    Some(Command::Reindex(reply)) => {
                        let result = self.reindex().await;
                        let _ = reply.send(result);
                    }
                    Some(Command::Stop(reply)) => {
                        let _ = reply.send(());
                        return;
                    }
                },
                fork = self.forks.recv() => match fork {
                    Ok(fork) => {
                        if let Err(e) = self.on_fork(&fork).await {
                            tracing::warn!("query: applying a fork: {e}");
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if let Ok(forks) = self.shared.ledger.forks() {
                            for fork in forks {
                                let _ = self.on_fork(&fork).await;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {}
                },
                _ = tick.tick() => {}
                item = self.feed.recv() => {
                    // The feed only wakes us; `catch_up` reads what it needs in order.
                    if let Err(broadcast::error::RecvError::Closed) = item {
                        tokio::time::sleep(self.shared.config.flush_interval).await;
                    }
                }
            }
            // Drain everything queued on the feed: the catch-up reads in order anyway.
            while self.feed.try_recv().is_ok() {}
            if let Err(e) = self.catch_up().await {
                tracing::error!("query: materializing failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let applied = self.fold.applied;
            let mut i = 0;
            while i < waiting_sync.len() {
                if waiting_sync[i].0 <= applied {
                    let (_, reply) = waiting_sync.swap_remove(i);
                    let _ = reply.send(Ok(()));
                } else {
                    i += 1;
                }
            }
        }
    }

    /// Reads everything the ledger has beyond what is applied, in flushes.
    async fn catch_up(&mut self) -> Result<()> {
        loop {
            let size = self.shared.ledger.tree_size()?;
            if self.fold.applied >= size {
                if self.fold.dirty.is_empty() {
                    self.shared.caught_up.store(true, Ordering::Release);
                } else {
                    self.write_state().await?;
                    self.shared.caught_up.store(true, Ordering::Release);
                }
                return Ok(());
            }
            let events = self
                .shared
                .ledger
                .events_since(self.fold.applied, self.shared.config.flush_events_max)
                .await?;
            if events.is_empty() {
                return Ok(());
            }
            self.flush(events).await?;
        }
    }

    async fn flush(&mut self, events: Vec<(EventRecord, SignedEvent)>) -> Result<()> {
        let mut builders: BTreeMap<&'static str, Builder> = BTreeMap::new();
        for table in APPEND_TABLES {
            let dim = match self.shared.tables.dim(table) {
                Some(d) => d,
                None => events
                    .iter()
                    .filter_map(|(_, e)| rows::vector_dim(e))
                    .find(|(t, _)| *t == table)
                    .map(|(_, d)| d)
                    .unwrap_or(1),
            };
            builders.insert(table, Builder::new(table, dim)?);
        }
        for (record, event) in &events {
            if record.index != self.fold.applied {
                return Err(internal(format!(
                    "feed gap: expected leaf {}, got {}",
                    self.fold.applied, record.index
                )));
            }
            // Tables that already hold this event (replay after a crash) are skipped.
            let mut targets: BTreeMap<&'static str, Builder> = BTreeMap::new();
            for (table, builder) in std::mem::take(&mut builders) {
                if self.appended.get(table).is_some_and(|m| *m >= record.index) {
                    targets.insert(table, builder);
                } else {
                    builders.insert(table, builder);
                }
            }
            rows::append_rows(&mut builders, record, event);
            self.version_row(&mut builders, record, event);
            builders.extend(targets);
            self.fold.apply(record, event);
        }
        for (table, mut builder) in builders {
            if builder.len() == 0 {
                continue;
            }
            let batch = builder.finish()?;
            self.shared.tables.append(table, batch).await?;
            if let Some((last, _)) = events.last() {
                self.appended.insert(table, last.index);
            }
            self.shared.tables.maybe_compact(table).await?;
        }
        let progress = Progress {
            applied: self.fold.applied,
        };
        write_atomic(
            &self.shared.dir.join("progress.json"),
            &serde_json::to_vec(&progress).map_err(internal)?,
        )?;
        self.shared
            .applied
            .store(self.fold.applied, Ordering::Release);
        if self.state_written.elapsed() >= self.shared.config.state_interval {
            self.write_state().await?;
        }
        self.maybe_index().await?;
        Ok(())
    }

    /// Adds the basin_versions row of a publish or delta (it needs the fold to know the basin).
    fn version_row(
        &self,
        builders: &mut BTreeMap<&'static str, Builder>,
        record: &EventRecord,
        event: &SignedEvent,
    ) {
        let Some(builder) = builders.get_mut("basin_versions") else {
            return;
        };
        let (basin, basin_id, parent, indices, values, weight) = match &event.body.payload {
            Payload::BasinPublish(p) => (
                record.id,
                p.basin_id.clone(),
                None,
                Vec::new(),
                p.coordinates.values(),
                1_000_000,
            ),
            Payload::BasinDelta(p) => {
                let basin = self
                    .fold
                    .version_basin
                    .get(&p.parent)
                    .copied()
                    .unwrap_or(p.parent);
                (
                    basin,
                    p.basin_id.clone(),
                    Some(p.parent.to_hex()),
                    p.indices.clone(),
                    p.values.values(),
                    p.weight_ppm,
                )
            }
            _ => return,
        };
        builder.push(&[
            Value::U64(record.index),
            Value::Text(&record.id.to_hex()),
            Value::Text(&basin.to_hex()),
            Value::OptText(parent.as_deref()),
            Value::Text(&record.author.to_hex()),
            Value::Text(&basin_id),
            Value::U64s(&indices),
            Value::Vector(&values),
            Value::U64(weight),
            Value::I64(record.ts),
        ]);
    }

    /// Rewrites the changed state tables from the fold, then records the fold itself.
    async fn write_state(&mut self) -> Result<()> {
        let dirty: Vec<&'static str> = std::mem::take(&mut self.fold.dirty).into_iter().collect();
        let pins: BTreeSet<BlobHash> = self.shared.store.pins().await?.into_iter().collect();
        for table in STATE_TABLES {
            // Pins change outside the ledger: the blobs table is refreshed on every write.
            if !dirty.contains(&table) && table != "blobs" {
                continue;
            }
            let batch = self.state_rows(table, &pins)?;
            self.shared.tables.overwrite(table, batch).await?;
        }
        let bytes = postcard::to_stdvec(&self.fold).map_err(internal)?;
        write_atomic(&self.shared.dir.join("fold.bin"), &bytes)?;
        self.state_written = Instant::now();
        // Record the versions this state corresponds to (for queries "as of" a tree size).
        let entry = VersionEntry {
            applied: self.fold.applied,
            versions: self
                .shared
                .tables
                .versions()
                .into_iter()
                .map(|(t, v)| (t.to_string(), v))
                .collect(),
        };
        let line = serde_json::to_string(&entry).map_err(internal)? + "\n";
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.shared.dir.join("versions.jsonl"))?;
            f.write_all(line.as_bytes())?;
            f.sync_data()?;
        }
        self.shared
            .history
            .lock()
            .expect("invariant: history lock is never poisoned")
            .push(entry);
        Ok(())
    }

    fn state_rows(
        &self,
        table: &'static str,
        pins: &BTreeSet<BlobHash>,
    ) -> Result<arrow_array::RecordBatch> {
        let dim_of =
            |t: &str, fallback: usize| self.shared.tables.dim(t).unwrap_or(fallback.max(1) as i32);
        match table {
            "balances" => {
                let mut b = Builder::new(table, 1)?;
                for (key, bal) in &self.fold.balances {
                    let balance = i128::from(bal.received)
                        - i128::from(bal.received_contested)
                        - i128::from(bal.sent);
                    b.push(&[
                        Value::Text(&key.to_hex()),
                        Value::I64(balance.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64),
                        Value::U64(bal.received),
                        Value::U64(bal.received_contested),
                        Value::U64(bal.sent),
                        Value::U64(bal.minted),
                    ]);
                }
                b.finish()
            }
            "reputation" => {
                let mut b = Builder::new(table, 1)?;
                for (key, (score, n)) in &self.fold.reputation {
                    b.push(&[
                        Value::Text(&key.to_hex()),
                        Value::I64(*score),
                        Value::U64(*n),
                    ]);
                }
                b.finish()
            }
            "nodes" => {
                let first = self
                    .fold
                    .nodes
                    .values()
                    .next()
                    .map(|n| n.basin_signature.len())
                    .unwrap_or(1);
                let mut b = Builder::new(table, dim_of("nodes", first))?;
                for (key, n) in &self.fold.nodes {
                    b.push(&[
                        Value::Text(&key.to_hex()),
                        Value::Text(&n.service),
                        Value::Texts(&n.endpoints),
                        Value::Texts(&n.capabilities),
                        Value::Text(&n.addr),
                        Value::Vector(&n.basin_signature),
                        Value::Text(&n.last_event.to_hex()),
                        Value::I64(n.last_ts),
                        Value::U64(n.n_announces),
                    ]);
                }
                b.finish()
            }
            "basins" => {
                let first = self
                    .fold
                    .basins
                    .values()
                    .next()
                    .map(|b| b.sums.len())
                    .unwrap_or(1);
                let mut b = Builder::new(table, dim_of("basins", first))?;
                for (id, acc) in &self.fold.basins {
                    let coordinates: Vec<f32> = acc
                        .sums
                        .iter()
                        .zip(&acc.weights)
                        .map(|(s, w)| (s / w) as f32)
                        .collect();
                    b.push(&[
                        Value::Text(&id.to_hex()),
                        Value::Text(&acc.owner.to_hex()),
                        Value::Text(&acc.basin_id),
                        Value::Vector(&coordinates),
                        Value::U64(acc.n_versions),
                        Value::Text(&acc.head.to_hex()),
                    ]);
                }
                b.finish()
            }
            "blobs" => {
                let mut all: BTreeSet<BlobHash> = pins.clone();
                all.extend(self.fold.skill_blobs.keys().copied());
                all.extend(self.fold.hosts.keys().copied());
                let mut b = Builder::new(table, 1)?;
                for blob in all {
                    let hosts: Vec<String> = self
                        .fold
                        .hosts
                        .get(&blob)
                        .map(|h| h.iter().map(|k| k.to_hex()).collect())
                        .unwrap_or_default();
                    let skill = self.fold.skill_blobs.get(&blob);
                    let skill_id = skill.map(|(_, id)| id.to_hex());
                    b.push(&[
                        Value::Text(&blob.to_hex()),
                        Value::OptU64(skill.map(|(size, _)| *size)),
                        Value::Bool(pins.contains(&blob)),
                        Value::Texts(&hosts),
                        Value::U64(hosts.len() as u64),
                        Value::OptText(skill_id.as_deref()),
                    ]);
                }
                b.finish()
            }
            other => Err(internal(format!("{other} is not a state table"))),
        }
    }

    /// Marks the credits of a forked log from the fork on as contested.
    async fn on_fork(&mut self, fork: &ForkProof) -> Result<()> {
        let first = self.fold.frozen.get(&fork.author).copied();
        if first.is_some_and(|f| f <= fork.seq) {
            return Ok(());
        }
        // Credits already counted as contested (from a later fork seq of the same log) stay.
        let already_from = first.unwrap_or(u64::MAX);
        self.fold.frozen.insert(fork.author, fork.seq);
        let Some(ds) = self.shared.tables.get("transfers") else {
            return Ok(());
        };
        let mut scan = ds.scan();
        scan.project(&["to", "amount", "seq"]).map_err(internal)?;
        scan.filter(&format!(
            "author = '{}' AND seq >= {}",
            fork.author, fork.seq
        ))
        .map_err(internal)?;
        let mut stream = scan.try_into_stream().await.map_err(internal)?;
        while let Some(batch) = stream.try_next().await.map_err(internal)? {
            let to = batch.column(0).as_any().downcast_ref::<StringArray>();
            let amount = batch.column(1).as_any().downcast_ref::<UInt64Array>();
            let seq = batch.column(2).as_any().downcast_ref::<UInt64Array>();
            let (Some(to), Some(amount), Some(seq)) = (to, amount, seq) else {
                continue;
            };
            for i in 0..batch.num_rows() {
                if to.is_null(i) || seq.value(i) >= already_from {
                    continue;
                }
                if let Ok(key) = AuthorKey::from_hex(to.value(i)) {
                    self.fold
                        .balances
                        .entry(key)
                        .or_default()
                        .received_contested += amount.value(i);
                }
            }
        }
        self.fold.dirty.insert("balances");
        self.write_state().await
    }

    async fn rebuild(&mut self) -> Result<()> {
        self.shared.caught_up.store(false, Ordering::Release);
        self.shared.tables.drop_all()?;
        for file in ["fold.bin", "progress.json", "versions.jsonl"] {
            std::fs::remove_file(self.shared.dir.join(file)).ok();
        }
        self.shared
            .history
            .lock()
            .expect("invariant: history lock is never poisoned")
            .clear();
        self.fold = Fold::default();
        self.appended.clear();
        self.shared.applied.store(0, Ordering::Release);
        if let Ok(forks) = self.shared.ledger.forks() {
            for fork in forks {
                self.fold.frozen.insert(fork.author, fork.seq);
            }
        }
        self.catch_up().await?;
        self.write_state().await
    }

    fn metric(&self) -> lance_linalg::distance::DistanceType {
        crate::knn::parse_metric(&self.shared.config.ann_metric)
            .unwrap_or(lance_linalg::distance::DistanceType::Cosine)
    }

    /// Builds missing ANN indexes on vector tables past the size threshold.
    async fn maybe_index(&mut self) -> Result<()> {
        for (table, _) in meshnode_schemas::tables::VECTOR_COLUMNS {
            if self.shared.tables.index_metric(table).await.is_some() {
                continue;
            }
            if self.shared.tables.count(table).await? < self.shared.config.ann_rows_min {
                continue;
            }
            let table = crate::tables::table_name(table).expect("invariant: a known table");
            if self.shared.tables.build_index(table, self.metric()).await? {
                self.shared
                    .tables
                    .record_index_metric(table, &self.shared.config.ann_metric)?;
                tracing::info!(table, "built ANN index");
            }
        }
        Ok(())
    }

    async fn reindex(&mut self) -> Result<Vec<String>> {
        let mut built = Vec::new();
        for (table, _) in meshnode_schemas::tables::VECTOR_COLUMNS {
            let table = crate::tables::table_name(table).expect("invariant: a known table");
            if self.shared.tables.build_index(table, self.metric()).await? {
                self.shared
                    .tables
                    .record_index_metric(table, &self.shared.config.ann_metric)?;
                built.push(table.to_string());
            }
        }
        Ok(built)
    }
}

impl From<postcard::Error> for Error {
    fn from(e: postcard::Error) -> Self {
        Error::Internal(e.to_string())
    }
}
