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
//!
//! The graph holds its vectors in bfloat16: half the bytes to read per comparison, which is
//! what a search spends its time on (usearch's f32 dot product accumulates in f64: 0.41 ms
//! per search at ef 64 on 100k × 384 against 0.15 ms in bf16, same recall to within 0.015).
//! Each index also keeps the f32 vectors: the graph's candidates are ranked again by exact
//! distance from them, and exact searches compare every one of them (never the graph's
//! copies), so every distance a search returns is exact.
//!
//! Cosine indexes hold unit vectors and rank by inner product (`1 - dot` of unit vectors is
//! the cosine distance): one product per comparison instead of three. Zero vectors, whose
//! cosine is undefined, are left out like nulls.
//!
//! The rows themselves (every column but the vectors) are kept in memory too
//! ([`crate::hot::HotRows`]), so a search reads no file unless it asks for a vector column.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float32Type, UInt64Type};
use arrow_array::{Float32Array, RecordBatch};
use arrow_schema::{DataType, Schema};
use lance::Dataset;
use lance_linalg::distance::DistanceType;
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::error::{Result, internal};
use crate::hot::HotRows;
use crate::tables::Tables;

/// Columns that get an in-memory index: (table, column).
pub(crate) const INDEXED: [(&str, &str); 3] = [
    ("skills", "embedding"),
    ("skills", "text_vec"),
    ("basin_versions", "values"),
];

/// Candidates a graph search takes per result asked for, ranked again by f32 distance.
const CANDIDATES_PER_RESULT: usize = 2;
/// Largest ef at which graph searches run on the caller's task ([`AnnIndexes::inline_ok`]).
const INLINE_EF_MAX: usize = 128;
/// HNSW edges per node (FAISS's `IndexHNSWFlat(dim, 32)` in the bench uses the same).
const CONNECTIVITY: usize = 32;
/// Candidates kept while inserting.
const EXPANSION_ADD: usize = 200;
/// Thread contexts: concurrent searches plus the builder's threads.
const THREADS: usize = 32;

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
    /// Holds unit vectors, ranked by inner product (cosine indexes).
    normalized: bool,
    /// The tables' generation it was built for ([`Tables::generation`]).
    generation: u64,
    /// `leaf_index` of every row in it, by position; its length is the rows covered.
    leaves: RwLock<Vec<u64>>,
    /// Every row's vector in f32 (unit length in cosine indexes); NaN for a row not in the
    /// graph (null, zero or not finite). Appended before `leaves`.
    vectors: RwLock<Copies>,
    /// Searches hold it shared; growing the index's capacity (which moves its memory) and
    /// changing its settings hold it exclusively. Graph searches run alongside adds, as
    /// usearch allows.
    gate: RwLock<()>,
}

/// The f32 vectors of an index, in the batches they were added in (no reallocation of the
/// whole as the index grows).
#[derive(Default)]
struct Copies {
    chunks: Vec<Vec<f32>>,
    /// Position of each chunk's first row.
    starts: Vec<usize>,
    rows: usize,
}

impl Copies {
    fn push(&mut self, start: usize, n: usize, values: Vec<f32>) -> Result<()> {
        if start != self.rows {
            return Err(internal("in-memory index: vectors added out of order"));
        }
        self.starts.push(start);
        self.chunks.push(values);
        self.rows += n;
        Ok(())
    }

    /// The vector at `position`, `None` past the rows or for a row left out.
    fn get(&self, position: u64, dim: usize) -> Option<&[f32]> {
        let position = usize::try_from(position).ok()?;
        if position >= self.rows {
            return None;
        }
        let chunk = self.starts.partition_point(|&s| s <= position) - 1;
        let at = (position - self.starts[chunk]) * dim;
        let v = self.chunks[chunk].get(at..at + dim)?;
        (!v[0].is_nan()).then_some(v)
    }
}

/// Distance as Lance computes it between `a` and the unit (cosine) or raw query `q`.
fn distance(metric: DistanceType, a: &[f32], q: &[f32]) -> f32 {
    match metric {
        DistanceType::Cosine => (1.0 - dot(a, q)).clamp(0.0, 2.0),
        // lance-linalg's dot distance is 1 - dot.
        DistanceType::Dot => 1.0 - dot(a, q),
        _ => a.iter().zip(q).map(|(x, y)| (x - y) * (x - y)).sum(),
    }
}

/// Dot product in eight lanes (so that it vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Ordered by distance, then position (the same order for the same rows everywhere).
fn by_distance(a: &(f32, u64), b: &(f32, u64)) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

impl ColumnIndex {
    /// The `k` nearest of rows `0..below` by comparing every vector: (distance, position).
    fn exact(&self, query: &[f32], k: usize, below: usize) -> Vec<(f32, u64)> {
        let dim = self.index.dimensions();
        let Ok(copies) = self.vectors.read() else {
            return Vec::new();
        };
        let mut heap: std::collections::BinaryHeap<Ranked> =
            std::collections::BinaryHeap::with_capacity(k + 1);
        for (chunk, &start) in copies.chunks.iter().zip(&copies.starts) {
            for (i, v) in chunk.chunks_exact(dim).enumerate() {
                let position = start + i;
                if position >= below {
                    break;
                }
                if v[0].is_nan() {
                    continue;
                }
                heap.push(Ranked((distance(self.metric, v, query), position as u64)));
                if heap.len() > k {
                    heap.pop();
                }
            }
        }
        let mut out: Vec<(f32, u64)> = heap.into_iter().map(|r| r.0).collect();
        out.sort_by(by_distance);
        out
    }

    /// The graph's candidates with their exact distances, nearest first.
    fn rerank(&self, query: &[f32], keys: &[u64]) -> Vec<(f32, u64)> {
        let dim = self.index.dimensions();
        let Ok(copies) = self.vectors.read() else {
            return Vec::new();
        };
        let mut out: Vec<(f32, u64)> = keys
            .iter()
            .filter_map(|&key| Some((distance(self.metric, copies.get(key, dim)?, query), key)))
            .collect();
        out.sort_by(by_distance);
        out
    }

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
    /// Rows of the indexed tables, by table.
    hot: RwLock<HashMap<&'static str, Arc<HotRows>>>,
    /// Columns whose index a background task is building or extending ([`ROWS`] for a
    /// table's in-memory rows).
    busy: Mutex<HashSet<(&'static str, &'static str)>>,
}

/// The `busy` key of a table's in-memory rows.
const ROWS: &str = "";

/// What a search through the index found: the rows (every column plus `_distance`),
/// nearest first.
pub(crate) type Found = Vec<RecordBatch>;

fn metric_kind(metric: DistanceType) -> Option<MetricKind> {
    match metric {
        // Unit vectors (see the module's documentation).
        DistanceType::Cosine => Some(MetricKind::IP),
        DistanceType::L2 => Some(MetricKind::L2sq),
        DistanceType::Dot => Some(MetricKind::IP),
        _ => None,
    }
}

/// Bytes an index of `rows` vectors of `dim` dimensions takes: the vectors, the base
/// layer's edges and the upper layers' share, and per-row bookkeeping.
fn estimate_bytes(rows: usize, dim: usize) -> u64 {
    // bf16 in the graph, f32 beside it.
    (rows as u64) * (dim as u64 * (2 + 4) + CONNECTIVITY as u64 * 2 * 4 * 5 / 4 + 64)
}

impl AnnIndexes {
    pub(crate) fn new(config: AnnConfig) -> Self {
        Self {
            ef: std::sync::atomic::AtomicUsize::new(config.ef),
            config,
            indexes: RwLock::new(HashMap::new()),
            hot: RwLock::new(HashMap::new()),
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
        if key.1 == ROWS {
            if let Ok(mut hot) = self.hot.write() {
                hot.remove(key.0);
            }
        } else if let Ok(mut indexes) = self.indexes.write() {
            indexes.remove(&key);
        }
    }

    fn hot_rows(&self, table: &str) -> Option<Arc<HotRows>> {
        let hot = self.hot.read().ok()?;
        hot.iter()
            .find(|(t, _)| **t == table)
            .map(|(_, h)| h.clone())
    }

    /// Reads into memory the rows of `table` its copy lacks; `Ok(true)` when it added some.
    async fn extend_rows(&self, tables: &Tables, table: &'static str) -> Result<bool> {
        let key = (table, ROWS);
        let generation = tables.generation();
        let Some(dataset) = tables.get(table) else {
            self.drop_index(key);
            return Ok(false);
        };
        let rows = dataset.count_rows(None).await.map_err(internal)?;
        let current = self
            .hot_rows(table)
            .filter(|h| h.generation == generation && h.rows() <= rows);
        if current.as_ref().is_some_and(|h| h.rows() == rows) {
            return Ok(false);
        }
        let hot = match current {
            Some(h) => h,
            None => {
                let h = Arc::new(HotRows::new(generation, &dataset)?);
                if let Ok(mut hot) = self.hot.write() {
                    hot.insert(table, h.clone());
                }
                h
            }
        };
        let room = self
            .config
            .memory_bytes_max
            .saturating_sub(self.others_bytes(key));
        if !hot.extend(&dataset, hot.rows(), rows, room).await? {
            tracing::warn!(
                "{table}: its rows would take the in-memory indexes past ann_memory_bytes; \
                 searches read them through Lance"
            );
            self.drop_index(key);
            return Ok(false);
        }
        Ok(true)
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

    /// Largest ef at which a graph search runs on the caller's task: at most a few hundred
    /// µs on 100k rows (0.15 ms at ef 64), less than the hop to the query runtime costs.
    /// Rows from which searches walk the graph.
    pub(crate) fn graph_rows_min(&self) -> usize {
        self.config.graph_rows_min
    }

    pub(crate) fn inline_ok(&self) -> bool {
        self.ef.load(std::sync::atomic::Ordering::Acquire) <= INLINE_EF_MAX
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
        let mut keys: Vec<(&'static str, &'static str)> = INDEXED.to_vec();
        for (table, _) in INDEXED {
            if !keys.contains(&(table, ROWS)) {
                keys.push((table, ROWS));
            }
        }
        for key in keys {
            let (table, column) = key;
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
                    let extended = if column == ROWS {
                        this.extend_rows(&tables, table).await
                    } else {
                        this.extend(&tables, key).await
                    };
                    match extended {
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
        let indexes: u64 = indexes
            .iter()
            .filter(|(k, _)| **k != key)
            .map(|(_, ix)| estimate_bytes(ix.rows(), ix.index.dimensions()))
            .sum();
        let rows: u64 = self.hot.read().map_or(0, |hot| {
            hot.iter()
                .filter(|(t, _)| (**t, ROWS) != key)
                .map(|(_, h)| h.bytes())
                .sum()
        });
        indexes + rows
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
        columns: &[String],
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
        let unit;
        let query = if ix.normalized {
            let Some(u) = unit_vector(query) else {
                return Ok(None);
            };
            unit = u;
            &unit[..]
        } else {
            query
        };
        let nearest = if exact || rows < self.config.graph_rows_min {
            ix.exact(query, k, rows)
        } else {
            let Ok(_shared) = ix.gate.read() else {
                return Ok(None);
            };
            // The predicate is a call back into Rust per visited node: only when rows were
            // added since the snapshot.
            // bf16 blurs distances closer than about 0.4%: twice the candidates, ranked
            // again in f32 (recall@10 0.85 → 0.99 on tight clusters, for 10 µs).
            let candidates = k * CANDIDATES_PER_RESULT;
            let plain = if ix.rows() == rows {
                ix.index.search(query, candidates).ok()
            } else {
                None
            };
            let matches = match plain {
                // Rows added between the check and the search: filter after all.
                Some(m) if m.keys.iter().all(|&key| key < below) => Ok(m),
                _ => ix
                    .index
                    .filtered_search(query, candidates, |key| key < below),
            };
            // No free thread context (more concurrent searches than reserved) and the like.
            let Ok(matches) = matches else {
                return Ok(None);
            };
            let mut nearest = ix.rerank(query, &matches.keys);
            nearest.truncate(k);
            nearest
        };
        let keys: Vec<u64> = nearest.iter().map(|(_, key)| *key).collect();
        let distances: Vec<f32> = nearest.iter().map(|(d, _)| *d).collect();
        let found = self
            .take_rows(table, dataset, &ix, &keys, &distances, columns)
            .await?;
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
        quantization: ScalarKind::BF16,
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
        normalized: metric == DistanceType::Cosine,
        generation,
        leaves: RwLock::new(Vec::new()),
        vectors: RwLock::new(Copies::default()),
        gate: RwLock::new(()),
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
    let mut rows = crate::hot::RowRange::open(dataset, &[column, "leaf_index"], from, to).await?;
    while let Some((start, batch)) = rows.next().await? {
        let ix = ix.clone();
        tokio::task::spawn_blocking(move || add_batch(&ix, &batch, start))
            .await
            .map_err(internal)??;
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
    // The f32 copies first (unit length in cosine indexes; NaN for rows left out).
    let mut copies = Vec::with_capacity(n * dim);
    for i in 0..n {
        let offset = vectors.value_offset(i) as usize;
        let v = &values.values()[offset..offset + dim];
        let kept = match (vectors.is_null(i), ix.normalized) {
            (true, _) => None,
            (false, true) => unit_vector(v),
            (false, false) => v.iter().all(|x| x.is_finite()).then(|| v.to_vec()),
        };
        match kept {
            Some(v) => copies.extend_from_slice(&v),
            None => copies.extend(std::iter::repeat_n(f32::NAN, dim)),
        }
    }
    let add = |range: std::ops::Range<usize>| -> Result<()> {
        for i in range {
            let v = &copies[i * dim..(i + 1) * dim];
            if v[0].is_nan() {
                continue;
            }
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
    ix.vectors
        .write()
        .map_err(|_| internal("in-memory index: lock poisoned"))?
        .push(start, n, copies)?;
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

/// A max-heap entry by [`by_distance`].
struct Ranked((f32, u64));

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        by_distance(&self.0, &other.0).is_eq()
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        by_distance(&self.0, &other.0)
    }
}

/// `v` scaled to length 1; `None` for a zero (or not finite) vector.
fn unit_vector(v: &[f32]) -> Option<Vec<f32>> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    (norm.is_finite() && norm > 0.0).then(|| v.iter().map(|x| x / norm).collect())
}

impl AnnIndexes {
    /// Reads the matched rows (`columns` of them) by position, from memory when the table's
    /// rows are there, else through Lance; checks each is the row the index holds there (by
    /// `leaf_index`), orders them as matched and appends `_distance`. `None` on a mismatch.
    #[allow(clippy::too_many_arguments)]
    async fn take_rows(
        &self,
        table: &str,
        dataset: &Dataset,
        ix: &ColumnIndex,
        keys: &[u64],
        distances: &[f32],
        columns: &[String],
    ) -> Result<Option<Found>> {
        if keys.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let mut read: Vec<String> = columns.to_vec();
        if !read.iter().any(|c| c == "leaf_index") {
            read.push("leaf_index".into());
        }
        let hot = self
            .hot_rows(table)
            .filter(|h| h.generation == ix.generation && h.holds(&read));
        let in_memory = match hot {
            Some(h) => h.take(keys, &read)?,
            None => None,
        };
        let rows = match in_memory {
            Some(rows) => rows,
            None => {
                let schema = dataset.schema().project(&read).map_err(internal)?;
                dataset.take(keys, schema).await.map_err(internal)?
            }
        };
        let Some(order) = matched_order(&rows, ix, keys)? else {
            return Ok(None);
        };
        let distances = Arc::new(Float32Array::from(distances.to_vec()));
        let found = crate::knn::with_distance(&rows, &order, distances)?;
        Ok(Some(vec![crate::knn::select(&found, columns)?]))
    }
}

/// For each key, the row of `rows` the index holds at that position (by `leaf_index`);
/// `None` when one is missing.
fn matched_order(
    rows: &RecordBatch,
    ix: &ColumnIndex,
    keys: &[u64],
) -> Result<Option<arrow_array::UInt32Array>> {
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
    Ok(Some(arrow_array::UInt32Array::from(order)))
}
