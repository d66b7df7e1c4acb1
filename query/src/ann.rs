//! In-memory HNSW indexes (usearch) for the search hot path: `POST /v1/search` and text
//! search on the append tables' vector columns (skills' `embedding` and `text_vec`,
//! basin_versions' `values`). Lance's scanner plans every search (about 4 ms before the first
//! distance); this index is kept open, searched directly, and the k rows are then read by
//! position with one `take`.
//!
//! Keys are row positions: append tables only ever grow (no deletes; compaction keeps the
//! order), so rows `0..rows` of the table are in the index and new rows are added as flushes
//! append them. Each index also keeps every row's `leaf_index`; the rows a search reads back
//! are checked against it, so an index that no longer matches its table (a rebuild, a
//! reordering) is never served from: it is dropped, the search takes Lance's path and the
//! index is built again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float32Type, UInt64Type};
use arrow_array::{Float32Array, RecordBatch};
use arrow_schema::{DataType, Schema};
use futures::TryStreamExt;
use lance::Dataset;
use lance_linalg::distance::DistanceType;
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::error::{Result, internal};
use crate::tables::Tables;

/// Columns that get an in-memory index: (table, column).
pub(crate) const INDEXED: [(&str, &str); 3] = [
    ("skills", "embedding"),
    ("skills", "text_vec"),
    ("basin_versions", "values"),
];

/// HNSW edges per node (FAISS's `IndexHNSWFlat(dim, 32)` in the bench uses the same).
const CONNECTIVITY: usize = 32;
/// Candidates kept while inserting.
const EXPANSION_ADD: usize = 200;
/// Thread contexts: concurrent searches plus the builder's threads.
const THREADS: usize = 32;
/// Most rows an index may hold beyond a search's snapshot for an exact search through it.
const K_AHEAD_MAX: usize = 1000;

/// Settings of the in-memory indexes.
#[derive(Clone, Debug)]
pub(crate) struct AnnConfig {
    /// Candidates kept while searching (recall against latency).
    pub(crate) ef: usize,
    /// Rows from which searches walk the graph; below, they compare every vector (exact).
    pub(crate) graph_rows_min: usize,
    /// Memory all indexes may take together; a column past it is searched by Lance.
    pub(crate) memory_bytes_max: u64,
    /// Metric of the authors' vector columns (text vectors are always cosine).
    pub(crate) metric: DistanceType,
}

/// One column's index.
pub(crate) struct ColumnIndex {
    index: Index,
    metric: DistanceType,
    /// The tables' generation it was built for ([`Tables::generation`]).
    generation: u64,
    /// `leaf_index` of every row in it, by position; its length is the rows covered.
    leaves: RwLock<Vec<u64>>,
    /// Searches hold it shared; growing the index's capacity (which moves its memory) and
    /// changing its settings hold it exclusively. Graph searches run alongside adds, as
    /// usearch allows.
    gate: RwLock<()>,
    /// Held exclusively while rows are added: an exact search scans every slot, and a slot
    /// being added is not complete yet, so exact searches only run when it is free.
    adding: RwLock<()>,
}

impl ColumnIndex {
    fn rows(&self) -> usize {
        self.leaves.read().map(|l| l.len()).unwrap_or(0)
    }

    fn leaf(&self, position: u64) -> Option<u64> {
        let leaves = self.leaves.read().ok()?;
        leaves.get(usize::try_from(position).ok()?).copied()
    }
}

/// The in-memory indexes of a node's tables.
pub(crate) struct AnnIndexes {
    config: AnnConfig,
    /// Candidates kept while searching, for indexes open now and built later.
    ef: std::sync::atomic::AtomicUsize,
    indexes: RwLock<HashMap<(&'static str, &'static str), Arc<ColumnIndex>>>,
    /// Columns whose index a background task is building or extending.
    busy: Mutex<HashSet<(&'static str, &'static str)>>,
}

/// What a search through the index found: the rows (every column plus `_distance`),
/// nearest first.
pub(crate) type Found = Vec<RecordBatch>;

fn metric_kind(metric: DistanceType) -> Option<MetricKind> {
    match metric {
        DistanceType::Cosine => Some(MetricKind::Cos),
        DistanceType::L2 => Some(MetricKind::L2sq),
        DistanceType::Dot => Some(MetricKind::IP),
        _ => None,
    }
}

/// Bytes an index of `rows` vectors of `dim` dimensions takes: the vectors, the base
/// layer's edges and the upper layers' share, and per-row bookkeeping.
fn estimate_bytes(rows: usize, dim: usize) -> u64 {
    (rows as u64) * (dim as u64 * 4 + CONNECTIVITY as u64 * 2 * 4 * 5 / 4 + 64)
}

impl AnnIndexes {
    pub(crate) fn new(config: AnnConfig) -> Self {
        Self {
            ef: std::sync::atomic::AtomicUsize::new(config.ef),
            config,
            indexes: RwLock::new(HashMap::new()),
            busy: Mutex::new(HashSet::new()),
        }
    }

    fn get(&self, table: &str, column: &str) -> Option<Arc<ColumnIndex>> {
        let indexes = self.indexes.read().ok()?;
        indexes
            .iter()
            .find(|((t, c), _)| *t == table && *c == column)
            .map(|(_, ix)| ix.clone())
    }

    fn drop_index(&self, key: (&'static str, &'static str)) {
        if let Ok(mut indexes) = self.indexes.write() {
            indexes.remove(&key);
        }
    }

    /// Drops `key`'s index if it is still `ix` (not one built since).
    fn drop_if_same(&self, key: (&'static str, &'static str), ix: &Arc<ColumnIndex>) {
        if let Ok(mut indexes) = self.indexes.write()
            && indexes
                .get(&key)
                .is_some_and(|current| Arc::ptr_eq(current, ix))
        {
            indexes.remove(&key);
        }
    }

    /// Sets the candidates every index keeps while searching (recall against latency).
    pub(crate) fn set_ef(&self, ef: usize) {
        let ef = ef.max(1);
        self.ef.store(ef, std::sync::atomic::Ordering::Release);
        if let Ok(indexes) = self.indexes.read() {
            for ix in indexes.values() {
                // usearch reads it unsynchronised during a search.
                if let Ok(_exclusive) = ix.gate.write() {
                    ix.index.change_expansion_search(ef);
                }
            }
        }
    }

    /// Rows covered per indexed column, for indexes of the tables' `generation` (status).
    pub(crate) fn covered(&self, generation: u64) -> Vec<(String, usize)> {
        let Ok(indexes) = self.indexes.read() else {
            return Vec::new();
        };
        let mut out: Vec<(String, usize)> = indexes
            .iter()
            .filter(|(_, ix)| ix.generation == generation)
            .map(|((t, c), ix)| (format!("{t}.{c}"), ix.rows()))
            .collect();
        out.sort();
        out
    }

    /// Brings every column's index up to its table in the background: new rows are added,
    /// an index of another generation is built again. Returns at once.
    pub(crate) fn refresh(self: &Arc<Self>, tables: &Arc<Tables>) {
        for (table, column) in INDEXED {
            let key = (table, column);
            {
                let Ok(mut busy) = self.busy.lock() else {
                    return;
                };
                if !busy.insert(key) {
                    continue;
                }
            }
            let this = self.clone();
            let tables = tables.clone();
            tokio::spawn(async move {
                // Until the index covers the table (flushes may append meanwhile).
                loop {
                    match this.extend(&tables, key).await {
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(e) => {
                            tracing::warn!("in-memory index of {table}.{column}: {e}");
                            this.drop_index(key);
                            break;
                        }
                    }
                }
                if let Ok(mut busy) = this.busy.lock() {
                    busy.remove(&key);
                }
            });
        }
    }

    /// Adds the rows the index lacks; `Ok(true)` when it added some (look again).
    async fn extend(&self, tables: &Tables, key: (&'static str, &'static str)) -> Result<bool> {
        let (table, column) = key;
        // Before the dataset: a rebuild in between then only makes this index stale.
        let generation = tables.generation();
        let Some(dataset) = tables.get(table) else {
            self.drop_index(key);
            return Ok(false);
        };
        let Some(dim) = vector_dim(&dataset, column) else {
            return Ok(false);
        };
        let rows = dataset.count_rows(None).await.map_err(internal)?;
        let metric = if column == "text_vec" {
            DistanceType::Cosine
        } else {
            self.config.metric
        };
        let current = self
            .get(table, column)
            .filter(|ix| ix.generation == generation && ix.metric == metric && ix.rows() <= rows);
        if current.as_ref().is_some_and(|ix| ix.rows() == rows) {
            return Ok(false);
        }
        // The bound holds as indexes grow, not only when they are made.
        if estimate_bytes(rows, dim) + self.others_bytes(key) > self.config.memory_bytes_max {
            tracing::warn!(
                "{table}.{column}: {rows} rows would take the in-memory indexes past \
                 ann_memory_bytes; searched through Lance"
            );
            self.drop_index(key);
            return Ok(false);
        }
        let index = match current {
            Some(ix) => ix,
            None => {
                let ef = self.ef.load(std::sync::atomic::Ordering::Acquire);
                let ix = Arc::new(new_index(dim, metric, generation, ef)?);
                if let Ok(mut indexes) = self.indexes.write() {
                    indexes.insert(key, ix.clone());
                }
                ix
            }
        };
        let from = index.rows();
        add_rows(&index, &dataset, column, from, rows).await?;
        Ok(true)
    }

    /// Estimated bytes of every index but `key`'s.
    fn others_bytes(&self, key: (&'static str, &'static str)) -> u64 {
        let Ok(indexes) = self.indexes.read() else {
            return 0;
        };
        indexes
            .iter()
            .filter(|(k, _)| **k != key)
            .map(|(_, ix)| estimate_bytes(ix.rows(), ix.index.dimensions()))
            .sum()
    }

    /// The k nearest rows of `table` (its current `dataset`) by `column`, through the
    /// in-memory index; `None` when this column has no index for this metric that covers
    /// every row of the dataset (the caller takes Lance's path).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn search(
        &self,
        tables: &Tables,
        table: &str,
        dataset: &Dataset,
        column: &str,
        query: &[f32],
        k: usize,
        metric: DistanceType,
        exact: bool,
    ) -> Result<Option<Found>> {
        let generation = tables.generation();
        let Some(ix) = self.get(table, column) else {
            return Ok(None);
        };
        if ix.metric != metric
            || ix.generation != generation
            || ix.index.dimensions() != query.len()
        {
            return Ok(None);
        }
        // The rows of the caller's snapshot: every one must be in the index, and keys past
        // them (rows added since) must not come back.
        let rows = dataset.count_rows(None).await.map_err(internal)?;
        if rows == 0 || ix.rows() < rows {
            return Ok(None);
        }
        let below = rows as u64;
        let matches = if exact || rows < self.config.graph_rows_min {
            // Never while rows are being added (see `adding`); Lance answers meanwhile.
            let Ok(_no_adds) = ix.adding.try_read() else {
                return Ok(None);
            };
            let ahead = ix.rows() - rows;
            if ahead > K_AHEAD_MAX {
                return Ok(None);
            }
            let Ok(_shared) = ix.gate.read() else {
                return Ok(None);
            };
            ix.index
                .exact_search(query, k + ahead)
                .map(|m| keep_below(m, below, k))
        } else {
            let Ok(_shared) = ix.gate.read() else {
                return Ok(None);
            };
            // The predicate is a call back into Rust per visited node: only when rows were
            // added since the snapshot.
            let plain = if ix.rows() == rows {
                ix.index.search(query, k).ok()
            } else {
                None
            };
            match plain {
                // Rows added between the check and the search: filter after all.
                Some(m) if m.keys.iter().all(|&key| key < below) => Ok(m),
                _ => ix.index.filtered_search(query, k, |key| key < below),
            }
        };
        // No free thread context (more concurrent searches than reserved) and the like.
        let Ok(matches) = matches else {
            return Ok(None);
        };
        // usearch's inner-product distance is 1 - dot; Lance's (and ours) is -dot.
        let distances: Vec<f32> = match metric {
            DistanceType::Dot => matches.distances.iter().map(|d| d - 1.0).collect(),
            _ => matches.distances.clone(),
        };
        let found = take_rows(dataset, &ix, &matches.keys, &distances).await?;
        if found.is_none() {
            // A row at a position the index holds is another row: the table changed under it.
            tracing::warn!("in-memory index of {table}.{column} no longer matches its table");
            if let Some(key) = INDEXED.iter().find(|(t, c)| *t == table && *c == column) {
                self.drop_if_same(*key, &ix);
            }
        }
        Ok(found)
    }
}

fn vector_dim(dataset: &Dataset, column: &str) -> Option<usize> {
    let schema = Schema::from(dataset.schema());
    match schema.field_with_name(column).ok()?.data_type() {
        DataType::FixedSizeList(_, d) => usize::try_from(*d).ok(),
        _ => None,
    }
}

fn new_index(dim: usize, metric: DistanceType, generation: u64, ef: usize) -> Result<ColumnIndex> {
    let kind = metric_kind(metric).ok_or_else(|| internal("no in-memory index for this metric"))?;
    let index = Index::new(&IndexOptions {
        dimensions: dim,
        metric: kind,
        quantization: ScalarKind::F32,
        connectivity: CONNECTIVITY,
        expansion_add: EXPANSION_ADD,
        expansion_search: ef,
        multi: false,
    })
    .map_err(internal)?;
    index
        .reserve_capacity_and_threads(1024, THREADS)
        .map_err(internal)?;
    Ok(ColumnIndex {
        index,
        metric,
        generation,
        leaves: RwLock::new(Vec::new()),
        gate: RwLock::new(()),
        adding: RwLock::new(()),
    })
}

/// Reads rows `from..to` of `column` and `leaf_index` and adds them (null vectors are
/// skipped, their positions kept), on blocking threads.
async fn add_rows(
    ix: &Arc<ColumnIndex>,
    dataset: &Dataset,
    column: &str,
    from: usize,
    to: usize,
) -> Result<()> {
    let mut scan = dataset.scan();
    scan.project(&[column, "leaf_index"]).map_err(internal)?;
    scan.limit(Some((to - from) as i64), Some(from as i64))
        .map_err(internal)?;
    let mut stream = scan.try_into_stream().await.map_err(internal)?;
    let mut position = from;
    while let Some(batch) = stream.try_next().await.map_err(internal)? {
        let n = batch.num_rows();
        let ix = ix.clone();
        let start = position;
        tokio::task::spawn_blocking(move || add_batch(&ix, &batch, start))
            .await
            .map_err(internal)??;
        position += n;
    }
    if position != to {
        return Err(internal(format!(
            "read {} rows of {column}, expected {}",
            position - from,
            to - from
        )));
    }
    Ok(())
}

/// Adds one batch whose first row is at `start`, on two threads.
fn add_batch(ix: &ColumnIndex, batch: &RecordBatch, start: usize) -> Result<()> {
    let (Some(vectors), Some(leaves)) = (
        batch.column(0).as_fixed_size_list_opt(),
        batch.column(1).as_primitive_opt::<UInt64Type>(),
    ) else {
        return Err(internal("in-memory index: unexpected column types"));
    };
    let values = vectors
        .values()
        .as_primitive_opt::<Float32Type>()
        .ok_or_else(|| internal("in-memory index: vectors are not f32"))?;
    let dim = ix.index.dimensions();
    let n = batch.num_rows();
    let needed = start + n;
    if ix.index.capacity() < needed {
        let _exclusive = ix
            .gate
            .write()
            .map_err(|_| internal("in-memory index: lock poisoned"))?;
        ix.index
            .reserve_capacity_and_threads(needed + needed / 4, THREADS)
            .map_err(internal)?;
    }
    let _adding = ix
        .adding
        .write()
        .map_err(|_| internal("in-memory index: lock poisoned"))?;
    let add = |range: std::ops::Range<usize>| -> Result<()> {
        for i in range {
            if vectors.is_null(i) {
                continue;
            }
            let offset = vectors.value_offset(i) as usize;
            let v = &values.values()[offset..offset + dim];
            ix.index
                .add((start + i) as u64, v)
                .map_err(|e| internal(format!("adding row {}: {e}", start + i)))?;
        }
        Ok(())
    };
    let half = n / 2;
    let (a, b) = std::thread::scope(|s| {
        let first = s.spawn(|| add(0..half));
        let second = add(half..n);
        (first.join(), second)
    });
    a.map_err(|_| internal("in-memory index: an insert thread panicked"))??;
    b?;
    let mut covered = ix
        .leaves
        .write()
        .map_err(|_| internal("in-memory index: lock poisoned"))?;
    if covered.len() != start {
        return Err(internal("in-memory index: rows added out of order"));
    }
    covered.extend(leaves.values().iter().copied());
    Ok(())
}

/// The first `k` matches whose keys are below `below`.
fn keep_below(mut m: usearch::ffi::Matches, below: u64, k: usize) -> usearch::ffi::Matches {
    let keep: Vec<usize> = (0..m.keys.len())
        .filter(|&i| m.keys[i] < below)
        .take(k)
        .collect();
    m.distances = keep.iter().map(|&i| m.distances[i]).collect();
    m.keys = keep.iter().map(|&i| m.keys[i]).collect();
    m
}

/// Reads the matched rows by position, checks each is the row the index holds there (by
/// `leaf_index`), orders them as matched and appends `_distance`. `None` on a mismatch.
async fn take_rows(
    dataset: &Dataset,
    ix: &ColumnIndex,
    keys: &[u64],
    distances: &[f32],
) -> Result<Option<Found>> {
    if keys.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let rows = dataset
        .take(keys, dataset.schema().clone())
        .await
        .map_err(internal)?;
    let leaves = rows
        .column_by_name("leaf_index")
        .and_then(|c| c.as_primitive_opt::<UInt64Type>())
        .ok_or_else(|| internal("in-memory index: rows without leaf_index"))?;
    let mut at: HashMap<u64, u32> = HashMap::with_capacity(keys.len());
    for i in 0..rows.num_rows() {
        at.insert(leaves.value(i), i as u32);
    }
    let mut order = Vec::with_capacity(keys.len());
    for key in keys {
        let Some(leaf) = ix.leaf(*key) else {
            return Ok(None);
        };
        let Some(i) = at.get(&leaf) else {
            return Ok(None);
        };
        order.push(*i);
    }
    let order = arrow_array::UInt32Array::from(order);
    let distances = Arc::new(Float32Array::from(distances.to_vec()));
    Ok(Some(vec![crate::knn::with_distance(
        &rows, &order, distances,
    )?]))
}
