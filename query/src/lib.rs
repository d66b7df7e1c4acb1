//! meshnode query: Lance datasets materialised from the ledger's event feed, read-only
//! DataFusion SQL and vector search (DESIGN.md §6).
//!
//! The tables live under `<data-dir>/query`, one Lance dataset each, appended in batches from
//! the feed ([`materialize`]); they can be dropped and rebuilt from the ledger at any time.
//! SQL ([`Query::sql`]) and vector search ([`Query::search`]) read a consistent snapshot of
//! them, optionally "as of" a transparency-log size.

mod ann;
mod cancel;
mod error;
mod export;
mod guard;
mod hot;
mod hybrid;
mod knn;
mod materialize;
mod rows;
mod sql;
mod tables;
mod text;
mod worker;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use meshnode_ledger::Ledger;
use meshnode_store::Store;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

pub use error::{Error, Result};
pub use hybrid::{ALPHA, Mode, TextHit, TextSearch};
pub use knn::{
    FILTERED_EXACT_ROWS_MAX, K_MAX, Search, parse_metric, parse_vector, vector_from_json,
};
pub use materialize::{LAYOUT as TABLES_LAYOUT, QueryConfig};
pub use sql::{Answer, SqlLimits, cell};
pub use worker::{WorkerProgram, WorkerStatus, worker_main};

use crate::error::{bad, internal};
use crate::materialize::{Command, Materializer, Shared};
use crate::sql::{Engine, Snapshot};

/// One column of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Name.
    pub name: String,
    /// Arrow type, as text.
    pub data_type: String,
}

/// A table: name, rows, columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    /// Name.
    pub name: String,
    /// Rows.
    pub rows: u64,
    /// Lance version.
    pub version: u64,
    /// Columns.
    pub columns: Vec<ColumnInfo>,
    /// Metric of the ANN index on its vector column, if any.
    pub ann_index: Option<String>,
    /// Rows each in-memory HNSW index of the table holds, by column (complete when equal to
    /// `rows`; searches use it only then).
    pub memory_indexes: std::collections::BTreeMap<String, u64>,
}

/// Progress of the materialization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryStatus {
    /// Events in the tables.
    pub applied: u64,
    /// Events in the ledger.
    pub ledger_size: u64,
    /// Whether the tables had caught up with the ledger at least once since start.
    pub caught_up: bool,
}

/// A search hit: distance and the row as JSON.
#[derive(Clone, Debug)]
pub struct Hit {
    /// Distance under the requested metric (cosine: 1 − similarity; l2: squared Euclidean;
    /// dot: negated dot product).
    pub distance: f32,
    /// The row's columns.
    pub row: Map<String, Value>,
}

/// Most texts one embedding request may carry.
pub const EMBED_INPUTS_MAX: usize = 64;

/// Padded tokens per forward pass of the model (texts × longest text): 8 texts of 256
/// tokens, or 64 short ones; bounds a pass's memory to tens of MiB.
const EMBED_BATCH_TOKENS: usize = 2048;

/// Consecutive ranges of texts, each within [`EMBED_BATCH_TOKENS`] padded tokens (a text
/// longer than that alone is a range of its own).
fn embed_batches(lens: &[usize]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut longest = 0;
    for (i, &len) in lens.iter().enumerate() {
        let wider = longest.max(len);
        if i > start && wider * (i + 1 - start) > EMBED_BATCH_TOKENS {
            out.push((start, i));
            start = i;
            longest = len;
        } else {
            longest = wider;
        }
    }
    if start < lens.len() {
        out.push((start, lens.len()));
    }
    out
}

/// Embeddings of some texts.
#[derive(Clone, Debug)]
pub struct Embedded {
    /// The model's id (name and weights' hash prefix).
    pub model: String,
    /// One L2-normalised vector per text, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens read, over all texts.
    pub tokens: usize,
}

fn no_model() -> Error {
    Error::NoModel(
        "this node has no embedding model: install it with `scripts/ensure-deps.sh model` \
         (make run does) and restart the node"
            .into(),
    )
}

/// The query layer of a node. Cheap to clone.
#[derive(Clone)]
pub struct Query {
    shared: Arc<Shared>,
    engine: Arc<Engine>,
    embedder: Option<Arc<meshnode_embed::Embedder>>,
}

impl std::fmt::Debug for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Query")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl Query {
    /// Opens the tables under `dir` and starts keeping them current from `ledger`. Tables
    /// that are behind the ledger (after a crash or downtime) catch up in the background;
    /// [`Query::status`] tells when they did. With `embedder`, the text tables get text
    /// vectors and text search works; tables made with another model (or none) are rebuilt.
    pub async fn open(
        dir: &Path,
        ledger: Ledger,
        store: Store,
        config: QueryConfig,
        limits: SqlLimits,
        embedder: Option<Arc<meshnode_embed::Embedder>>,
    ) -> Result<Self> {
        let tables = Arc::new(tables::Tables::open(dir).await?);
        let (commands, rx) = mpsc::channel(16);
        let ann_config = ann::AnnConfig {
            ef: config.ann_ef.max(1),
            graph_rows_min: config.ann_rows_min,
            memory_bytes_max: config.ann_memory_bytes,
            metric: knn::parse_metric(&config.ann_metric)?,
        };
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            tables,
            ledger,
            store,
            config,
            applied: AtomicU64::new(0),
            caught_up: AtomicBool::new(false),
            history: std::sync::Mutex::new(Vec::new()),
            commands,
            text: text::TextVectors::new(embedder.clone()),
            ann: Arc::new(ann::AnnIndexes::new(ann_config)),
        });
        let materializer = Materializer::open(shared.clone()).await?;
        tokio::spawn(materializer.run(rx));
        let mut engine = Engine::with_workers(
            limits,
            dir,
            embedder.as_ref().map(|e| e.dir().to_path_buf()),
        )?;
        engine.embed_text = embedder
            .clone()
            .map(|e| -> sql::EmbedText { Arc::new(move |text: &str| text::embed_one(&e, text)) });
        let engine = Arc::new(engine);
        Ok(Self {
            shared,
            engine,
            embedder,
        })
    }

    /// The embedding model's id, if the node has one.
    pub fn embed_model(&self) -> Option<&str> {
        self.embedder.as_ref().map(|e| e.model_id())
    }

    /// Embeds at most [`EMBED_INPUTS_MAX`] texts under a query permit and the deadline (the
    /// model takes CPU like a query does, so it shares the query engine's slots).
    pub async fn embed(&self, texts: Vec<String>) -> Result<Embedded> {
        let Some(embedder) = self.embedder.clone() else {
            return Err(no_model());
        };
        if texts.is_empty() {
            return Err(bad("invalid_input", "give at least one text to embed"));
        }
        if texts.len() > EMBED_INPUTS_MAX {
            return Err(bad(
                "too_many_inputs",
                format!(
                    "{} texts, at most {EMBED_INPUTS_MAX} per request",
                    texts.len()
                ),
            ));
        }
        for (i, text) in texts.iter().enumerate() {
            meshnode_embed::Embedder::check(text)
                .map_err(|e| bad("invalid_input", format!("input {i}: {e}")))?;
        }
        self.engine
            .submit(move |cancel| async move {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                let mut lens = Vec::with_capacity(refs.len());
                for text in &refs {
                    lens.push(embedder.tokenize(text).map_err(internal)?.len());
                }
                let tokens = lens.iter().sum();
                // Forward passes of at most EMBED_BATCH_TOKENS padded tokens: the memory of
                // a pass grows with its texts times its longest text (squared, for
                // attention), and a request past its deadline stops between passes.
                let mut vectors = Vec::with_capacity(refs.len());
                for (start, end) in embed_batches(&lens) {
                    cancel.check().map_err(crate::sql::classify)?;
                    vectors.extend(embedder.embed(&refs[start..end]).map_err(internal)?);
                    tokio::task::yield_now().await;
                }
                Ok(Embedded {
                    model: embedder.model_id().to_string(),
                    vectors,
                    tokens,
                })
            })
            .await
    }

    fn live_tables(&self) -> &tables::Tables {
        &self.shared.tables
    }

    /// Rows each in-memory HNSW index holds, as `table.column` (an index is complete when
    /// it holds every row of its table).
    pub fn memory_indexes(&self) -> Vec<(String, usize)> {
        self.shared.ann.covered(self.shared.tables.generation())
    }

    /// Sets the candidates the in-memory HNSW searches keep (`query.ann_ef`; recall against
    /// latency), for every index now open.
    pub fn set_ann_ef(&self, ef: usize) {
        self.shared.ann.set_ef(ef);
    }

    /// Query permits not in use (SQL and search share them).
    pub fn idle_permits(&self) -> usize {
        self.engine.idle_permits()
    }

    /// The SQL worker processes (None when SQL runs in this process).
    pub fn workers(&self) -> Option<WorkerStatus> {
        self.engine.pool.as_ref().map(|p| p.status())
    }

    /// Progress of the materialization.
    pub fn status(&self) -> Result<QueryStatus> {
        Ok(QueryStatus {
            applied: self.shared.applied.load(Ordering::Acquire),
            ledger_size: self.shared.ledger.tree_size()?,
            caught_up: self.shared.caught_up.load(Ordering::Acquire),
        })
    }

    async fn command<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> Command,
        timeout: Duration,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .commands
            .send(make(tx))
            .await
            .map_err(|_| Error::Unavailable("materializer stopped".into()))?;
        tokio::time::timeout(timeout, rx)
            .await
            .map_err(|_| Error::Unavailable("materializer did not answer in time".into()))?
            .map_err(|_| Error::Unavailable("materializer stopped".into()))?
    }

    /// Waits until every event the ledger has now is in the tables (and the state tables are
    /// written).
    pub async fn sync(&self, timeout: Duration) -> Result<()> {
        self.command(Command::Sync, timeout).await
    }

    /// Drops every table and rebuilds them from the ledger.
    pub async fn rebuild(&self) -> Result<()> {
        self.command(Command::Rebuild, Duration::from_secs(24 * 3600))
            .await
    }

    /// Builds (or rebuilds) the ANN indexes of the vector tables; returns the indexed tables.
    pub async fn reindex(&self) -> Result<Vec<String>> {
        self.command(Command::Reindex, Duration::from_secs(24 * 3600))
            .await
    }

    /// The tables, their rows and columns.
    pub async fn tables(&self) -> Result<Vec<TableInfo>> {
        let mut out = Vec::new();
        for (name, ds) in self.live_tables().all() {
            let schema = arrow_schema::Schema::from(ds.schema());
            out.push(TableInfo {
                name: name.to_string(),
                rows: ds.count_rows(None).await.map_err(internal)? as u64,
                version: ds.version().version,
                columns: schema
                    .fields()
                    .iter()
                    .map(|f| ColumnInfo {
                        name: f.name().clone(),
                        data_type: f.data_type().to_string(),
                    })
                    .collect(),
                ann_index: self
                    .live_tables()
                    .index_metric(name)
                    .await
                    .map(|m| format!("{m:?}").to_lowercase()),
                memory_indexes: self
                    .shared
                    .ann
                    .covered(self.live_tables().generation())
                    .into_iter()
                    .filter_map(|(c, n)| {
                        let column = c.strip_prefix(name)?.strip_prefix('.')?;
                        Some((column.to_string(), n as u64))
                    })
                    .collect(),
            });
        }
        Ok(out)
    }

    /// The tables as of `as_of` events (or now). Append tables are filtered to
    /// `leaf_index < as_of`; state tables are taken at the last write at or before it.
    async fn snapshot(&self, as_of: Option<u64>) -> Result<(Snapshot, Option<u64>)> {
        let Some(n) = as_of else {
            return Ok((
                Snapshot {
                    tables: self.live_tables().all(),
                    as_of: None,
                },
                None,
            ));
        };
        let applied = self.shared.applied.load(Ordering::Acquire);
        if n > applied {
            return Err(bad(
                "as_of_ahead",
                format!("as_of {n} is beyond the {applied} events in the tables"),
            ));
        }
        let entry = {
            let history = self
                .shared
                .history
                .lock()
                .expect("invariant: history lock is never poisoned");
            history.iter().rev().find(|e| e.applied <= n).cloned()
        };
        let mut tables = Vec::new();
        let mut state_at = None;
        for (name, ds) in self.live_tables().all() {
            let is_append = meshnode_schemas::tables::APPEND_TABLES.contains(&name);
            if is_append {
                tables.push((name, ds));
                continue;
            }
            // A state table without an entry did not exist yet at that point.
            if let Some(version) = entry.as_ref().and_then(|e| e.versions.get(name)) {
                tables.push((name, self.live_tables().at_version(name, *version).await?));
                state_at = entry.as_ref().map(|e| e.applied);
            }
        }
        Ok((
            Snapshot {
                tables,
                as_of: Some(n),
            },
            state_at.or(Some(0)),
        ))
    }

    /// Runs a read-only SQL query, optionally as of the first `as_of` events. Returns the
    /// answer and, for `as_of`, the event count the state tables reflect.
    pub async fn sql(&self, text: &str, as_of: Option<u64>) -> Result<(Answer, Option<u64>)> {
        let (snapshot, state_at) = self.snapshot(as_of).await?;
        let answer = match &self.engine.pool {
            Some(pool) => {
                let request = worker::WorkerRequest {
                    sql: text.to_string(),
                    tables: snapshot
                        .tables
                        .iter()
                        .map(|(name, ds)| {
                            let (version, timestamp_nanos) = tables::version_stamp(ds);
                            worker::TableVersion {
                                name: name.to_string(),
                                version,
                                timestamp_nanos,
                            }
                        })
                        .collect(),
                    as_of: snapshot.as_of,
                };
                self.engine.run_in_worker(pool, request).await?
            }
            None => {
                let ctx = self.engine.session(&snapshot, &self.shared.tables).await?;
                self.engine.run(ctx, text.to_string()).await?
            }
        };
        Ok((answer, state_at))
    }

    /// The k nearest rows of a vector table, nearest first.
    pub async fn search(&self, request: &Search) -> Result<Vec<Hit>> {
        let table = tables::table_name(&request.table).ok_or_else(|| {
            bad(
                "unknown_table",
                format!(
                    "no table `{}`",
                    request.table.chars().take(64).collect::<String>()
                ),
            )
        })?;
        let Some(dataset) = self.live_tables().get(table) else {
            // A known table that has no rows yet.
            knn::check(request, self.live_tables())?;
            return Ok(Vec::new());
        };
        // A graph search through the in-memory index takes a few hundred µs: it runs here,
        // under a permit, rather than pay the two thread wake-ups of the hop below (75 µs).
        if let Some(_permit) = self.engine.try_permit()
            && let Some(batches) =
                knn::search_inline(&self.shared.tables, &self.shared.ann, &dataset, request).await?
        {
            return Ok(hits_of(batches));
        }
        // Same runtime, permits, deadline and function guards as SQL.
        let tables = self.shared.tables.clone();
        let ann = self.shared.ann.clone();
        let request_owned = request.clone();
        let batches = self
            .engine
            .submit(move |cancel| async move {
                knn::search(&tables, &ann, dataset, &request_owned, &cancel).await
            })
            .await?;
        Ok(hits_of(batches))
    }

    /// Rows of a text table (skills, basins, nodes) that match `request.text` by meaning,
    /// by words or both ([`Mode`]), best first, filtered before ranking.
    pub async fn search_text(&self, request: &TextSearch) -> Result<Vec<TextHit>> {
        let table = knn::text_table(&request.table)?;
        knn::check_k(request.k)?;
        meshnode_embed::Embedder::check(&request.text)
            .map_err(|e| bad("invalid_text", format!("text: {e}")))?;
        if let Some(filter) = &request.filter {
            knn::parse_filter(filter)?;
        }
        let embedder = match (request.mode.needs_model(), &self.embedder) {
            (false, _) => None,
            (true, Some(e)) => Some(e.clone()),
            (true, None) => return Err(no_model()),
        };
        let Some(dataset) = self.live_tables().get(table) else {
            return Ok(Vec::new());
        };
        let request = request.clone();
        let (tables, ann) = (self.shared.tables.clone(), self.shared.ann.clone());
        self.engine
            .submit(move |cancel| async move {
                let query_vec = match embedder {
                    Some(e) => Some(text::embed_one(&e, &request.text)?),
                    None => None,
                };
                cancel.check().map_err(crate::sql::classify)?;
                let filter = match &request.filter {
                    Some(text) => {
                        let schema = arrow_schema::Schema::from(dataset.schema());
                        Some(knn::filter_expr(text, &schema, &cancel)?)
                    }
                    None => None,
                };
                hybrid::run(&tables, &ann, dataset, &request, query_vec, filter).await
            })
            .await
    }

    /// Stops materializing (after the flush in progress).
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.shared.commands.send(Command::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Writes every table as `<dir>/<table>.parquet`; returns (table, rows).
    pub async fn export_parquet(&self, dir: &Path) -> Result<Vec<(String, u64)>> {
        export::parquet(self.live_tables(), dir).await
    }
}

/// Search results as hits, nearest first.
fn hits_of(batches: Vec<arrow_array::RecordBatch>) -> Vec<Hit> {
    let answer = crate::sql::Answer::of_rows(batches);
    let mut hits: Vec<Hit> = answer
        .to_objects()
        .into_iter()
        .map(|mut row| {
            let distance = row
                .remove("_distance")
                .and_then(|d| d.as_f64())
                .unwrap_or(f64::NAN) as f32;
            Hit { distance, row }
        })
        .collect();
    hits.sort_by(|a, b| a.distance.total_cmp(&b.distance));
    hits
}

#[cfg(test)]
mod embed_batch_tests {
    use super::{EMBED_BATCH_TOKENS, embed_batches};

    #[test]
    fn batches_cover_every_text_once_within_the_token_budget() {
        let cases: [&[usize]; 5] = [
            &[],
            &[21; 64],
            &[256; 64],
            &[3, 256, 5, 7, 256, 9],
            &[4000, 2],
        ];
        for lens in cases {
            let batches = embed_batches(lens);
            let mut next = 0;
            for &(start, end) in &batches {
                assert_eq!(start, next, "{lens:?}: contiguous");
                assert!(end > start);
                let longest = lens[start..end].iter().max().copied().unwrap_or(0);
                assert!(
                    end - start == 1 || longest * (end - start) <= EMBED_BATCH_TOKENS,
                    "{lens:?}: {start}..{end}"
                );
                next = end;
            }
            assert_eq!(next, lens.len(), "{lens:?}: every text");
        }
        assert_eq!(embed_batches(&[21; 64]).len(), 1);
        assert_eq!(embed_batches(&[256; 64]).len(), 8);
    }
}
