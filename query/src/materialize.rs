//! Keeping the query tables current from the ledger: batched appends from its event feed,
//! the state tables as projections of its committed state, crash-safe progress, catch-up,
//! rebuild, indexing. No ledger rule runs here: the ledger's fold is the only one.
//!
//! Crash safety: each flush appends rows to the append-only tables (each append is one Lance
//! commit, fsynced), then records `progress.json` (events applied). The state tables are
//! rewritten from a snapshot of the ledger's state (at most every `state_interval` while
//! events arrive, when caught up, and when a fork changes what is contested). On start,
//! events from the recorded count are replayed; rows an append table already has (by
//! `leaf_index`) are skipped, so nothing is duplicated and nothing is missed; the state
//! tables are rewritten once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshnode_ledger::{EventRecord, ForkProof, Ledger, State};
use meshnode_schemas::tables::{APPEND_TABLES, STATE_TABLES};
use meshnode_schemas::{BlobHash, EventId, Payload, SignedEvent};
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
    /// Candidates the in-memory HNSW keeps while searching (recall against latency).
    pub ann_ef: usize,
    /// Memory the in-memory indexes may take together; columns past it search through Lance.
    pub ann_memory_bytes: u64,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            flush_events_max: 20_000,
            flush_interval: Duration::from_millis(200),
            state_interval: Duration::from_secs(2),
            ann_rows_min: 20_000,
            ann_metric: "cosine".into(),
            ann_ef: 128,
            ann_memory_bytes: 4 << 30,
        }
    }
}

/// The tables' layout: a node whose tables were written by a build with another layout
/// rebuilds them at start. 2: the derived text columns (`search_text`, `text_vec`, …).
/// 3: `events.via`.
pub const LAYOUT: u32 = 3;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Progress {
    /// Every event below this leaf index is in the append tables.
    applied: u64,
    /// The tables' layout ([`LAYOUT`]; absent in older builds).
    #[serde(default)]
    layout: u32,
    /// The model that made the `text_vec` columns (none: they are null).
    #[serde(default)]
    text_model: Option<String>,
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
    /// The embedding model and the state tables' text vectors.
    pub(crate) text: crate::text::TextVectors,
    /// In-memory HNSW indexes of the append tables' vector columns.
    pub(crate) ann: Arc<crate::ann::AnnIndexes>,
}

/// Removes the version history, then the progress record, durably: a crash in between
/// never leaves a history of dropped tables next to new ones.
fn forget_progress(dir: &Path) -> std::io::Result<()> {
    for file in ["versions.jsonl", "progress.json"] {
        match std::fs::remove_file(dir.join(file)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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
    /// Events in the append tables (the next leaf index).
    applied: u64,
    /// Whether the state tables are older than the ledger's state.
    state_dirty: bool,
    /// A `sync` waits: the state tables are written as soon as caught up, not on schedule.
    sync_waiting: bool,
    /// Per append table: the largest leaf index it holds.
    appended: HashMap<&'static str, u64>,
    state_written: Instant,
    feed: broadcast::Receiver<Arc<meshnode_ledger::Accepted>>,
    forks: broadcast::Receiver<ForkProof>,
    /// Basins' texts, from their publish events (immutable, so read once).
    basin_texts: HashMap<EventId, String>,
    /// The model the tables' text vectors come from (recorded in `progress.json`).
    text_model: Option<String>,
}

impl Materializer {
    pub(crate) async fn open(shared: Arc<Shared>) -> Result<Self> {
        let feed = shared.ledger.subscribe();
        let forks = shared.ledger.subscribe_forks();
        let model = shared.text.model().map(str::to_string);
        let mut progress: Progress = match std::fs::read(shared.dir.join("progress.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                internal(format!(
                    "progress.json is unreadable ({e}); run `meshnode query rebuild`"
                ))
            })?,
            // Tables without a record of what wrote them (a crash in a rebuild, an older
            // build): never trusted.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Progress {
                layout: if shared.tables.all().is_empty() {
                    LAYOUT
                } else {
                    0
                },
                text_model: model.clone(),
                ..Progress::default()
            },
            Err(e) => return Err(e.into()),
        };
        let other_model = match (&progress.text_model, &model) {
            (Some(was), Some(now)) => was != now,
            // The first model: the tables have no vectors yet.
            (None, Some(_)) => true,
            // The model is missing now: keep the tables (rows added meanwhile get no vector).
            (_, None) => false,
        };
        if progress.layout != LAYOUT || other_model {
            // Another layout, or vectors of another model: never mix them.
            tracing::warn!(
                layout = progress.layout,
                was = ?progress.text_model,
                now = ?model,
                "query tables were written with another layout or embedding model: rebuilding them"
            );
            // The record first: tables without one are rebuilt at the next start.
            forget_progress(&shared.dir)?;
            shared.tables.drop_all()?;
            progress = Progress {
                layout: LAYOUT,
                text_model: model,
                ..Progress::default()
            };
        } else if model.is_none()
            && let Some(was) = &progress.text_model
        {
            tracing::warn!(
                "the query tables hold text vectors of {was} but this node has no model: rows \
                 added now get none; run `meshnode query rebuild` once the model is back"
            );
        }
        seed_text_vectors(&shared).await?;
        // The state fold of older builds is not used any more.
        std::fs::remove_file(shared.dir.join("fold.bin")).ok();
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
        shared.applied.store(progress.applied, Ordering::Release);
        // The in-memory indexes start empty: build them from the tables in the background.
        shared.ann.refresh(&shared.tables);
        Ok(Self {
            shared,
            applied: progress.applied,
            state_dirty: true,
            sync_waiting: false,
            appended,
            state_written: Instant::now(),
            feed,
            forks,
            basin_texts: HashMap::new(),
            text_model: progress.text_model,
        })
    }

    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
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
                fork = self.forks.recv() => {
                    // A fork changes what is contested: the state tables follow the ledger.
                    if !matches!(fork, Err(broadcast::error::RecvError::Closed)) {
                        self.state_dirty = true;
                    }
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
            self.sync_waiting = !waiting_sync.is_empty();
            if let Err(e) = self.catch_up().await {
                tracing::error!("query: materializing failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let applied = self.applied;
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
            if self.applied >= size {
                // At most every `state_interval` (a trickle of events would otherwise rewrite
                // every state table every tick), at once when a sync waits for it.
                let due = self.state_written.elapsed() >= self.shared.config.state_interval;
                if self.state_dirty && (due || self.sync_waiting) {
                    self.write_state().await?;
                }
                self.shared.caught_up.store(true, Ordering::Release);
                return Ok(());
            }
            let events = self
                .shared
                .ledger
                .events_since(self.applied, self.shared.config.flush_events_max)
                .await?;
            if events.is_empty() {
                return Ok(());
            }
            self.flush(cap_skill_publishes(events)).await?;
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
        let mut derived = self.skill_texts(&events).await?;
        let ids: Vec<_> = events.iter().map(|(r, _)| r.id).collect();
        let via = self.shared.ledger.delivered_by(&ids).map_err(internal)?;
        for ((record, event), via) in events.iter().zip(via) {
            if record.index != self.applied {
                return Err(internal(format!(
                    "feed gap: expected leaf {}, got {}",
                    self.applied, record.index
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
            let text = derived.remove(&record.index);
            let via = via.map(hex::encode);
            rows::append_rows(
                &mut builders,
                record,
                event,
                via.as_deref(),
                text.as_ref(),
                self.shared.text.model(),
            );
            self.version_row(&mut builders, record, event)?;
            builders.extend(targets);
            self.applied = record.index + 1;
            self.state_dirty = true;
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
            applied: self.applied,
            layout: LAYOUT,
            text_model: self.text_model.clone(),
        };
        write_atomic(
            &self.shared.dir.join("progress.json"),
            &serde_json::to_vec(&progress).map_err(internal)?,
        )?;
        self.shared.applied.store(self.applied, Ordering::Release);
        self.shared.ann.refresh(&self.shared.tables);
        if self.state_written.elapsed() >= self.shared.config.state_interval {
            self.write_state().await?;
        }
        self.maybe_index().await?;
        Ok(())
    }

    /// The derived texts and vectors of the skills published by `events` that the skills
    /// table does not hold yet, by leaf index.
    async fn skill_texts(
        &self,
        events: &[(EventRecord, SignedEvent)],
    ) -> Result<HashMap<u64, crate::text::Derived>> {
        let held = self.appended.get("skills").copied();
        let mut leaves = Vec::new();
        let mut texts = Vec::new();
        for (record, event) in events {
            if let Payload::SkillPublish(p) = &event.body.payload
                && held.is_none_or(|m| m < record.index)
            {
                leaves.push(record.index);
                texts.push(crate::text::skill_text(p));
            }
        }
        let derived = self.shared.text.embed(texts).await?;
        Ok(leaves.into_iter().zip(derived).collect())
    }

    /// Adds the basin_versions row of a publish or delta (the ledger's version record names
    /// the basin).
    fn version_row(
        &self,
        builders: &mut BTreeMap<&'static str, Builder>,
        record: &EventRecord,
        event: &SignedEvent,
    ) -> Result<()> {
        let Some(builder) = builders.get_mut("basin_versions") else {
            return Ok(());
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
                    .shared
                    .ledger
                    .basin_version(&record.id)?
                    .map(|v| v.basin)
                    .ok_or_else(|| internal(format!("basin version {} missing", record.id)))?;
                (
                    basin,
                    p.basin_id.clone(),
                    Some(p.parent.to_hex()),
                    p.indices.clone(),
                    p.values.values(),
                    p.weight_ppm,
                )
            }
            _ => return Ok(()),
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
        Ok(())
    }

    /// Rewrites the state tables from a snapshot of the ledger's committed state.
    async fn write_state(&mut self) -> Result<()> {
        let pins: BTreeSet<BlobHash> = self.shared.store.pins().await?.into_iter().collect();
        let ledger = self.shared.ledger.clone();
        let state = tokio::task::spawn_blocking(move || ledger.state())
            .await
            .map_err(internal)??;
        for table in STATE_TABLES {
            let derived = self.state_texts(table, &state).await?;
            let batch = self.state_rows(table, &state, &pins, &derived)?;
            // A table is created by its first row: a vector table's dimension comes from it.
            if batch.num_rows() == 0 && self.shared.tables.get(table).is_none() {
                continue;
            }
            self.shared.tables.overwrite(table, batch).await?;
        }
        self.state_written = Instant::now();
        // Record the versions this state corresponds to (for queries "as of" a tree size).
        let entry = VersionEntry {
            applied: state.n_events,
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
        // Only now: a failed write leaves the tables marked stale, so the next pass retries.
        self.state_dirty = false;
        Ok(())
    }

    /// The derived texts and vectors of a text table's rows, in row order (empty for other
    /// tables).
    async fn state_texts(
        &mut self,
        table: &'static str,
        state: &State,
    ) -> Result<Vec<crate::text::Derived>> {
        let texts: Vec<String> = match table {
            "nodes" => state
                .nodes
                .values()
                .map(|n| crate::text::node_text(&n.service, &n.capabilities))
                .collect(),
            "basins" => {
                let mut texts = Vec::with_capacity(state.basins.len());
                for id in state.basins.keys() {
                    texts.push(self.basin_text(id).await?);
                }
                texts
            }
            _ => return Ok(Vec::new()),
        };
        self.shared.text.embed_state(table, texts).await
    }

    /// A basin's text, from the metadata of its publish event.
    async fn basin_text(&mut self, id: &EventId) -> Result<String> {
        if let Some(text) = self.basin_texts.get(id) {
            return Ok(text.clone());
        }
        let text = match self.shared.ledger.event(id).await? {
            Some((_, event)) => match &event.body.payload {
                Payload::BasinPublish(p) => crate::text::basin_text(&p.metadata),
                _ => String::new(),
            },
            None => String::new(),
        };
        self.basin_texts.insert(*id, text.clone());
        Ok(text)
    }

    /// One state table's rows, projected from the ledger's state; `derived` holds the text
    /// tables' derived columns in row order.
    fn state_rows(
        &self,
        table: &'static str,
        state: &State,
        pins: &BTreeSet<BlobHash>,
        derived: &[crate::text::Derived],
    ) -> Result<arrow_array::RecordBatch> {
        let model = self.shared.text.model();
        let no_text = crate::text::Derived::default();
        let text_of = |i: usize| derived.get(i).unwrap_or(&no_text);
        let dim_of =
            |t: &str, fallback: usize| self.shared.tables.dim(t).unwrap_or(fallback.max(1) as i32);
        let clamp = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
        match table {
            "balances" => {
                let mut b = Builder::new(table, 1)?;
                for (key, a) in &state.authors {
                    b.push(&[
                        Value::Text(&key.to_hex()),
                        Value::I64(i64::try_from(a.balance()).unwrap_or(i64::MAX)),
                        Value::U64(clamp(a.received)),
                        Value::U64(clamp(a.received_contested)),
                        Value::U64(clamp(a.sent)),
                        Value::U64(clamp(a.sent_contested)),
                        Value::U64(clamp(a.minted)),
                    ]);
                }
                b.finish()
            }
            "reputation" => {
                let mut b = Builder::new(table, 1)?;
                for (key, r) in &state.reputation {
                    b.push(&[
                        Value::Text(&key.to_hex()),
                        Value::I64(r.score.clamp(i64::MIN.into(), i64::MAX.into()) as i64),
                        Value::U64(r.n_deltas),
                    ]);
                }
                b.finish()
            }
            "nodes" => {
                let first = state
                    .nodes
                    .values()
                    .next()
                    .map(|n| n.basin_signature.len())
                    .unwrap_or(1);
                let mut b = Builder::new(table, dim_of("nodes", first))?;
                for (i, (key, n)) in state.nodes.iter().enumerate() {
                    let text = text_of(i);
                    let text_vec = text.vec.as_deref();
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
                        Value::Text(&text.text),
                        Value::OptVector(text_vec),
                        Value::OptText(text_vec.and(model)),
                        Value::OptF32(crate::text::claim_consistency(&n.basin_signature, text_vec)),
                    ]);
                }
                b.finish()
            }
            "basins" => {
                let first = state
                    .basins
                    .values()
                    .next()
                    .map(|b| b.sums.len())
                    .unwrap_or(1);
                let mut b = Builder::new(table, dim_of("basins", first))?;
                for (i, (id, basin)) in state.basins.iter().enumerate() {
                    let text = text_of(i);
                    let text_vec = text.vec.as_deref();
                    let coordinates = basin.coordinates();
                    b.push(&[
                        Value::Text(&id.to_hex()),
                        Value::Text(&basin.owner.to_hex()),
                        Value::Text(&basin.basin_id),
                        Value::Vector(&coordinates),
                        Value::U64(basin.n_versions),
                        Value::Text(&basin.head.to_hex()),
                        Value::Text(&text.text),
                        Value::OptVector(text_vec),
                        Value::OptText(text_vec.and(model)),
                        Value::OptF32(crate::text::claim_consistency(&coordinates, text_vec)),
                    ]);
                }
                b.finish()
            }
            "blobs" => {
                // A blob's skill: the uncontested publish with the smallest id, if any.
                let mut skills: BTreeMap<BlobHash, (u64, EventId)> = BTreeMap::new();
                for skill in state.skills.values() {
                    if !skill.contested {
                        skills.entry(skill.blob).or_insert((skill.size, skill.id));
                    }
                }
                let mut all: BTreeSet<BlobHash> = pins.clone();
                all.extend(skills.keys().copied());
                all.extend(
                    state
                        .hosts
                        .iter()
                        .filter(|(_, m)| m.values().any(|mark| mark.pinned))
                        .map(|(blob, _)| *blob),
                );
                let mut b = Builder::new(table, 1)?;
                for blob in all {
                    let hosts: Vec<String> =
                        state.hosts_of(&blob).iter().map(|k| k.to_hex()).collect();
                    let skill = skills.get(&blob);
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

    async fn rebuild(&mut self) -> Result<()> {
        self.shared.caught_up.store(false, Ordering::Release);
        forget_progress(&self.shared.dir)?;
        self.shared.tables.drop_all()?;
        self.text_model = self.shared.text.model().map(str::to_string);
        self.shared
            .history
            .lock()
            .expect("invariant: history lock is never poisoned")
            .clear();
        self.applied = 0;
        self.state_dirty = true;
        self.appended.clear();
        self.shared.applied.store(0, Ordering::Release);
        self.catch_up().await?;
        self.write_state().await
    }

    fn metric(&self) -> lance_linalg::distance::DistanceType {
        crate::knn::parse_metric(&self.shared.config.ann_metric)
            .unwrap_or(lance_linalg::distance::DistanceType::Cosine)
    }

    /// Builds missing ANN indexes on vector tables past the size threshold, and the
    /// full-text index of the skills' text.
    async fn maybe_index(&mut self) -> Result<()> {
        if self.shared.tables.maybe_text_index("skills").await? {
            tracing::info!(table = "skills", "built the full-text index");
        }
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
        if self.shared.tables.maybe_text_index("skills").await? {
            built.push("skills.search_text".to_string());
        }
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

/// Skill publishes per flush at most: each is embedded before its flush is appended (up to
/// ~10 s of model time for 256 texts of 256 tokens on 2 cores), so a flood of publishes is
/// taken in bounded steps, between which syncs, state writes and a stop get their turn.
const SKILLS_PER_FLUSH: usize = 256;

/// The events up to (not including) the publish past [`SKILLS_PER_FLUSH`].
fn cap_skill_publishes(
    mut events: Vec<(EventRecord, SignedEvent)>,
) -> Vec<(EventRecord, SignedEvent)> {
    let cut = events
        .iter()
        .enumerate()
        .filter(|(_, (_, e))| matches!(e.body.payload, Payload::SkillPublish(_)))
        .nth(SKILLS_PER_FLUSH)
        .map(|(i, _)| i);
    if let Some(cut) = cut {
        events.truncate(cut);
    }
    events
}

/// Remembers the text vectors the state tables hold (made by this node's model), so that
/// the first rewrite after a start embeds only texts that changed.
async fn seed_text_vectors(shared: &Shared) -> Result<()> {
    use arrow::array::{Array, AsArray};
    use futures::TryStreamExt;
    let Some(model) = shared.text.model() else {
        return Ok(());
    };
    for table in ["nodes", "basins"] {
        let Some(ds) = shared.tables.get(table) else {
            continue;
        };
        let mut scan = ds.scan();
        scan.project(&["search_text", "text_vec", "text_model"])
            .map_err(internal)?;
        let mut stream = scan.try_into_stream().await.map_err(internal)?;
        while let Some(batch) = stream.try_next().await.map_err(internal)? {
            let (Some(texts), Some(vecs), Some(models)) = (
                batch.column(0).as_string_opt::<i32>(),
                batch.column(1).as_fixed_size_list_opt(),
                batch.column(2).as_string_opt::<i32>(),
            ) else {
                return Err(internal(format!(
                    "{table}: text columns of unexpected types"
                )));
            };
            for i in 0..batch.num_rows() {
                if vecs.is_null(i) || models.is_null(i) || models.value(i) != model {
                    continue;
                }
                let values = vecs.value(i);
                let Some(values) = values.as_primitive_opt::<arrow::datatypes::Float32Type>()
                else {
                    continue;
                };
                shared
                    .text
                    .seed(table, texts.value(i), values.values().to_vec().into());
            }
        }
    }
    Ok(())
}
