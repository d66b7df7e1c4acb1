//! The Lance datasets of the query tables: create, append, overwrite, fsync, compaction,
//! vector indexes, versions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arrow_array::{RecordBatch, RecordBatchIterator, UInt64Array};
use futures::TryStreamExt;
use lance::Dataset;
use lance::dataset::optimize::{CompactionOptions, compact_files};
use lance::dataset::{WriteMode, WriteParams};
use lance::index::vector::VectorIndexParams;
use lance::index::{DatasetIndexExt, DatasetIndexInternalExt};
use lance_index::IndexType;
use lance_index::vector::hnsw::builder::HnswBuildParams;
use lance_index::vector::ivf::IvfBuildParams;
use lance_index::vector::sq::builder::SQBuildParams;
use lance_linalg::distance::DistanceType;
use meshnode_schemas::tables::{TABLES, VECTOR_COLUMNS};

use crate::error::{Error, Result, internal};

/// Compact a table once it has this many fragments (every append adds at least one).
const COMPACT_FRAGMENTS_MIN: usize = 64;

/// The datasets under `<data-dir>/query`.
pub(crate) struct Tables {
    dir: PathBuf,
    current: Mutex<HashMap<&'static str, Arc<Dataset>>>,
    /// Bumped whenever tables are dropped (a rebuild): rows of another generation are
    /// other rows, even at the same positions.
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Tables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tables")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

pub(crate) fn table_name(name: &str) -> Option<&'static str> {
    TABLES.iter().copied().find(|t| *t == name)
}

pub(crate) fn vector_column(table: &str) -> Option<&'static str> {
    VECTOR_COLUMNS
        .iter()
        .find(|(t, _)| *t == table)
        .map(|(_, c)| *c)
}

/// Fsyncs every file under `dir` modified at or after `since`, and every directory, so that a
/// Lance commit survives power loss (Lance does not fsync local files itself).
/// Rows from which a text table gets a full-text index (below, BM25 reads them flat).
pub(crate) const FTS_ROWS_MIN: usize = 2_000;

/// Name of the full-text index on `search_text`.
const FTS_INDEX: &str = "search_text_fts";

fn fsync_since(dir: &Path, since: SystemTime) -> std::io::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.modified().map(|m| m >= since).unwrap_or(true) {
                std::fs::File::open(entry.path())?.sync_all()?;
            }
        }
        std::fs::File::open(&d)?.sync_all()?;
    }
    Ok(())
}

/// Whether a Lance dataset directory holds a committed version (a manifest under
/// `_versions`). Only a missing or readable `_versions` without a manifest says no: a
/// directory that cannot be read now (too many open files…) is taken as committed, and its
/// open reports the error.
fn committed(path: &Path) -> bool {
    match std::fs::read_dir(path.join("_versions")) {
        // An entry that cannot be read: assume a manifest.
        Ok(mut entries) => entries.any(|e| {
            e.map(|e| e.file_name().to_string_lossy().ends_with(".manifest"))
                .unwrap_or(true)
        }),
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

impl Tables {
    /// Opens every table that exists under `dir`.
    pub(crate) async fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut current = HashMap::new();
        for table in TABLES {
            let path = dir.join(format!("{table}.lance"));
            if path.exists() && !committed(&path) {
                // Killed during the table's first write: nothing of it was ever readable,
                // and `progress.json` is written only after every commit, so the rows come
                // back from the ledger.
                tracing::warn!(
                    "query table {table} was created but never committed (a crash during its \
                     first write); removed, it is filled again from the ledger"
                );
                std::fs::remove_dir_all(&path)?;
            }
            if path.exists() {
                let ds = Dataset::open(&path.display().to_string())
                    .await
                    .map_err(|e| internal(format!("opening table {table}: {e}")))?;
                current.insert(table, Arc::new(ds));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            current: Mutex::new(current),
            generation: Default::default(),
        })
    }

    /// The tables under `dir`, none opened yet ([`Tables::checkout`] opens them): for a
    /// process that only reads what another one writes.
    pub(crate) fn unopened(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            current: Mutex::new(HashMap::new()),
            generation: Default::default(),
        }
    }

    fn path(&self, table: &str) -> PathBuf {
        self.dir.join(format!("{table}.lance"))
    }

    /// The tables' generation (see [`Tables::drop_all`]).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The current dataset of a table, if it exists.
    pub(crate) fn get(&self, table: &str) -> Option<Arc<Dataset>> {
        self.current
            .lock()
            .expect("invariant: tables lock is never poisoned")
            .get(table)
            .cloned()
    }

    /// Every existing table with its current dataset.
    pub(crate) fn all(&self) -> Vec<(&'static str, Arc<Dataset>)> {
        let current = self
            .current
            .lock()
            .expect("invariant: tables lock is never poisoned");
        TABLES
            .iter()
            .filter_map(|t| current.get(t).map(|d| (*t, d.clone())))
            .collect()
    }

    /// A table at an older version.
    pub(crate) async fn at_version(&self, table: &str, version: u64) -> Result<Arc<Dataset>> {
        let ds = self
            .get(table)
            .ok_or_else(|| internal(format!("table {table} does not exist")))?;
        Ok(Arc::new(ds.checkout_version(version).await.map_err(
            |e| internal(format!("{table} version {version}: {e}")),
        )?))
    }

    /// A table at `version`, committed at `timestamp_nanos` (see [`version_stamp`]): the
    /// current dataset when it is that one, else the version opened from the directory, which
    /// becomes current when it is newer. For a process that reads tables another process
    /// writes (the query workers). A stamp that does not match means the table was rebuilt
    /// meanwhile: unavailable, retry.
    pub(crate) async fn checkout(
        &self,
        table: &'static str,
        version: u64,
        timestamp_nanos: i64,
    ) -> Result<Arc<Dataset>> {
        if let Some(ds) = self.get(table)
            && version_stamp(&ds) == (version, timestamp_nanos)
        {
            return Ok(ds);
        }
        let path = self.path(table).display().to_string();
        let ds = lance::dataset::builder::DatasetBuilder::from_uri(&path)
            .with_version(version)
            .load()
            .await
            .map_err(|e| Error::Unavailable(format!("table {table} version {version}: {e}")))?;
        if version_stamp(&ds) != (version, timestamp_nanos) {
            return Err(Error::Unavailable(format!(
                "table {table} was rebuilt while the query started; retry"
            )));
        }
        let ds = Arc::new(ds);
        let mut current = self
            .current
            .lock()
            .expect("invariant: tables lock is never poisoned");
        let newer = current
            .get(table)
            .is_none_or(|c| version_stamp(c).1 <= timestamp_nanos);
        if newer {
            current.insert(table, ds.clone());
        }
        Ok(ds)
    }

    /// The dimension of a table's vector column (fixed when the table was created).
    pub(crate) fn dim(&self, table: &str) -> Option<i32> {
        let column = vector_column(table)?;
        let ds = self.get(table)?;
        let schema = arrow_schema::Schema::from(ds.schema());
        match schema.field_with_name(column).ok()?.data_type() {
            arrow_schema::DataType::FixedSizeList(_, d) => Some(*d),
            _ => None,
        }
    }

    async fn write(&self, table: &'static str, batch: RecordBatch, mode: WriteMode) -> Result<()> {
        if batch.num_rows() == 0 && matches!(mode, WriteMode::Append) {
            return Ok(());
        }
        let started = SystemTime::now();
        let schema = batch.schema();
        let reader = RecordBatchIterator::new(vec![Ok(batch)], schema);
        let path = self.path(table);
        let ds = match (self.get(table), mode) {
            (Some(mut ds), WriteMode::Append) => {
                Arc::make_mut(&mut ds)
                    .append(reader, None)
                    .await
                    .map_err(|e| internal(format!("appending to {table}: {e}")))?;
                ds
            }
            _ => {
                let mode = if path.exists() {
                    WriteMode::Overwrite
                } else {
                    WriteMode::Create
                };
                let params = WriteParams {
                    mode,
                    ..WriteParams::default()
                };
                Arc::new(
                    Dataset::write(reader, path.display().to_string().as_str(), Some(params))
                        .await
                        .map_err(|e| internal(format!("writing {table}: {e}")))?,
                )
            }
        };
        self.install(table, ds, started).await
    }

    /// Makes what a table's directory got since `started` durable, then makes `ds` the
    /// table's current version.
    async fn install(
        &self,
        table: &'static str,
        ds: Arc<Dataset>,
        started: SystemTime,
    ) -> Result<()> {
        let dir = self.path(table);
        tokio::task::spawn_blocking(move || fsync_since(&dir, started))
            .await
            .map_err(internal)??;
        self.current
            .lock()
            .expect("invariant: tables lock is never poisoned")
            .insert(table, ds);
        Ok(())
    }

    /// Appends rows (creating the table on first use). Durable on return.
    pub(crate) async fn append(&self, table: &'static str, batch: RecordBatch) -> Result<()> {
        self.write(table, batch, WriteMode::Append).await
    }

    /// Replaces a table's rows with a new version. Durable on return.
    pub(crate) async fn overwrite(&self, table: &'static str, batch: RecordBatch) -> Result<()> {
        self.write(table, batch, WriteMode::Overwrite).await
    }

    /// The largest `leaf_index` of an append-only table (`None` if empty or missing).
    pub(crate) async fn max_leaf_index(&self, table: &str) -> Result<Option<u64>> {
        let Some(ds) = self.get(table) else {
            return Ok(None);
        };
        let mut scan = ds.scan();
        scan.project(&["leaf_index"]).map_err(internal)?;
        let mut stream = scan.try_into_stream().await.map_err(internal)?;
        let mut max: Option<u64> = None;
        while let Some(batch) = stream.try_next().await.map_err(internal)? {
            if let Some(col) = batch.column(0).as_any().downcast_ref::<UInt64Array>()
                && let Some(m) = arrow::compute::max(col)
            {
                max = Some(max.map_or(m, |x: u64| x.max(m)));
            }
        }
        Ok(max)
    }

    /// Merges small fragments when a table has many.
    pub(crate) async fn maybe_compact(&self, table: &'static str) -> Result<()> {
        let Some(ds) = self.get(table) else {
            return Ok(());
        };
        if ds.count_fragments() < COMPACT_FRAGMENTS_MIN {
            return Ok(());
        }
        let started = SystemTime::now();
        let mut ds = (*ds).clone();
        compact_files(&mut ds, CompactionOptions::default(), None)
            .await
            .map_err(|e| internal(format!("compacting {table}: {e}")))?;
        self.install(table, Arc::new(ds), started).await?;
        Ok(())
    }

    /// Builds (or rebuilds) the ANN index of a table's vector column for `metric`:
    /// IVF partitions with an HNSW graph over scalar-quantised vectors.
    pub(crate) async fn build_index(
        &self,
        table: &'static str,
        metric: DistanceType,
    ) -> Result<bool> {
        let Some(column) = vector_column(table) else {
            return Ok(false);
        };
        let Some(ds) = self.get(table) else {
            return Ok(false);
        };
        let n_rows = ds.count_rows(None).await.map_err(internal)?;
        if n_rows < 256 {
            return Ok(false);
        }
        let started = SystemTime::now();
        // Few large partitions, each one HNSW graph, all probed by every search: IVF's
        // coarse cut loses neighbours on data without clusters, HNSW does not. A denser
        // graph (32 edges, ef_construction 300) is what gets recall@10 past 0.95 on 384-dim
        // random vectors.
        let partitions = n_rows
            .div_ceil(crate::knn::ANN_ROWS_PER_PARTITION)
            .clamp(1, crate::knn::ANN_PARTITIONS_MAX);
        let hnsw = HnswBuildParams::default()
            .num_edges(32)
            .ef_construction(300);
        let params = VectorIndexParams::with_ivf_hnsw_sq_params(
            metric,
            IvfBuildParams::new(partitions),
            hnsw,
            SQBuildParams::default(),
        );
        let mut ds = (*ds).clone();
        ds.create_index(
            &[column],
            IndexType::Vector,
            Some(format!("{column}_ann")),
            &params,
            true,
        )
        .await
        .map_err(|e| internal(format!("indexing {table}.{column}: {e}")))?;
        self.install(table, Arc::new(ds), started).await?;
        Ok(true)
    }

    /// Builds (or rebuilds) the full-text (BM25) index of a text table's `search_text` once
    /// it has [`FTS_ROWS_MIN`] rows, and again when a fifth of its rows are not in it (Lance
    /// searches those flat meanwhile). Returns whether it built one.
    pub(crate) async fn maybe_text_index(&self, table: &'static str) -> Result<bool> {
        if !meshnode_schemas::tables::TEXT_TABLES.contains(&table) {
            return Ok(false);
        }
        let Some(ds) = self.get(table) else {
            return Ok(false);
        };
        let rows = ds.count_rows(None).await.map_err(internal)?;
        if rows < FTS_ROWS_MIN {
            return Ok(false);
        }
        let indexed = ds
            .load_indices()
            .await
            .map_err(internal)?
            .iter()
            .any(|i| i.name == FTS_INDEX);
        if indexed {
            let unindexed: usize = ds
                .unindexed_fragments(FTS_INDEX)
                .await
                .map_err(internal)?
                .iter()
                .map(|f| f.num_rows().unwrap_or(0))
                .sum();
            if unindexed * 5 < rows {
                return Ok(false);
            }
        }
        let started = SystemTime::now();
        let mut ds = (*ds).clone();
        ds.create_index(
            &["search_text"],
            IndexType::Inverted,
            Some(FTS_INDEX.to_string()),
            &lance_index::scalar::InvertedIndexParams::default(),
            true,
        )
        .await
        .map_err(|e| internal(format!("full-text index of {table}: {e}")))?;
        self.install(table, Arc::new(ds), started).await?;
        Ok(true)
    }

    /// Whether a table has an ANN index on its vector column, and for which metric.
    pub(crate) async fn index_metric(&self, table: &str) -> Option<DistanceType> {
        let column = vector_column(table)?;
        let ds = self.get(table)?;
        let indices = ds.load_indices().await.ok()?;
        let name = format!("{column}_ann");
        let index = indices.iter().find(|i| i.name == name)?;
        let _ = index;
        // The metric is recorded in our own sidecar (Lance keeps it inside the index files).
        let text = std::fs::read_to_string(self.dir.join(format!("{table}.index-metric"))).ok()?;
        crate::knn::parse_metric(text.trim()).ok()
    }

    /// Records the metric an index was built for.
    pub(crate) fn record_index_metric(&self, table: &str, metric: &str) -> Result<()> {
        let path = self.dir.join(format!("{table}.index-metric"));
        std::fs::write(&path, metric)?;
        std::fs::File::open(&path)?.sync_all()?;
        Ok(())
    }

    /// Deletes every table (the ledger is the truth; they are rebuilt from it).
    pub(crate) fn drop_all(&self) -> Result<()> {
        let mut current = self
            .current
            .lock()
            .expect("invariant: tables lock is never poisoned");
        current.clear();
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        for table in TABLES {
            let path = self.path(table);
            if path.exists() {
                std::fs::remove_dir_all(&path)?;
            }
            std::fs::remove_file(self.dir.join(format!("{table}.index-metric"))).ok();
        }
        Ok(())
    }

    /// Row count of a table.
    pub(crate) async fn count(&self, table: &str) -> Result<usize> {
        match self.get(table) {
            Some(ds) => ds.count_rows(None).await.map_err(internal),
            None => Ok(0),
        }
    }

    /// Current version of every existing table.
    pub(crate) fn versions(&self) -> HashMap<&'static str, u64> {
        self.all()
            .into_iter()
            .map(|(t, d)| (t, d.version().version))
            .collect()
    }
}

/// A dataset's version and commit time: together they name one version of one incarnation
/// of a table (a rebuilt table starts its versions over).
pub(crate) fn version_stamp(ds: &Dataset) -> (u64, i64) {
    let v = ds.version();
    (v.version, v.timestamp.timestamp_nanos_opt().unwrap_or(0))
}

impl From<lance::Error> for Error {
    fn from(e: lance::Error) -> Self {
        Error::Internal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_table_killed_in_its_first_write_is_removed_at_open() {
        let dir = tempfile::tempdir().expect("dir");
        // What a kill -9 during a table's first write leaves: data, no manifest.
        let half = dir.path().join("reputation.lance");
        std::fs::create_dir_all(half.join("data")).expect("mkdir");
        std::fs::write(half.join("data").join("x.lance"), b"partial").expect("write");
        std::fs::create_dir_all(half.join("_versions")).expect("mkdir");
        let tables = Tables::open(dir.path()).await.expect("opens");
        assert!(tables.get("reputation").is_none());
        assert!(!half.exists());
    }
}
