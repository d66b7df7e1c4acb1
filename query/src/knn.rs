//! Vector search: k nearest rows by cosine, L2 or dot, with a SQL filter applied before
//! ranking; exact below the ANN threshold, IVF-HNSW past it. Also the `knn` SQL table
//! function, whose `WHERE` clause is pushed into the search as that filter.

use std::sync::Arc;

use arrow_array::{Float32Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableFunctionImpl, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use futures::TryStreamExt;
use lance::Dataset;
use lance_linalg::distance::DistanceType;

use crate::error::{Result, bad, internal};
use crate::tables::{Tables, vector_column};

/// Largest k.
pub const K_MAX: usize = 1000;

/// Parses `cosine`, `l2` (or `euclidean`) and `dot`.
pub fn parse_metric(text: &str) -> Result<DistanceType> {
    match text.to_ascii_lowercase().as_str() {
        "cosine" => Ok(DistanceType::Cosine),
        "l2" | "euclidean" => Ok(DistanceType::L2),
        "dot" => Ok(DistanceType::Dot),
        other => Err(bad(
            "invalid_metric",
            format!("metric `{other}` is not one of cosine, l2, dot"),
        )),
    }
}

/// Parses a vector from JSON text (`[0.1, 0.2, …]`).
pub fn parse_vector(text: &str) -> Result<Vec<f32>> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| bad("invalid_vector", format!("vector is not a JSON array: {e}")))?;
    vector_from_json(&value)
}

/// Checks and converts a JSON array of numbers to f32 values.
pub fn vector_from_json(value: &serde_json::Value) -> Result<Vec<f32>> {
    let items = value
        .as_array()
        .ok_or_else(|| bad("invalid_vector", "vector must be an array of numbers"))?;
    if items.is_empty() || items.len() > meshnode_schemas::limits::VECTOR_DIM_MAX {
        return Err(bad(
            "invalid_vector",
            format!(
                "vector must have 1..={} values",
                meshnode_schemas::limits::VECTOR_DIM_MAX
            ),
        ));
    }
    items
        .iter()
        .map(|v| {
            let x = v
                .as_f64()
                .ok_or_else(|| bad("invalid_vector", "vector must be an array of numbers"))?;
            let f = x as f32;
            if !f.is_finite() {
                return Err(bad("invalid_vector", format!("{x} is not a finite f32")));
            }
            Ok(f)
        })
        .collect()
}

/// A search request.
#[derive(Clone, Debug)]
pub struct Search {
    /// Table with a vector column: skills, basins, nodes, basin_versions.
    pub table: String,
    /// Query vector.
    pub vector: Vec<f32>,
    /// How many rows (1..=1000).
    pub k: usize,
    /// Distance.
    pub metric: DistanceType,
    /// SQL boolean expression applied before ranking, e.g. `domain = 'viticulture'`.
    pub filter: Option<String>,
    /// Exact search even when an index exists.
    pub exact: bool,
    /// Rank by the node's own text vectors (`text_vec`, 384-d) instead of the authors'
    /// vectors (skills, basins and nodes only).
    pub text_vec: bool,
    /// The columns each row carries; `None`: every column but the vectors.
    pub columns: Option<Vec<String>>,
}

/// Most names in a search's `columns`.
pub(crate) const COLUMNS_MAX: usize = 64;

/// The columns a search's rows carry, checked against the table: the ones asked for (each
/// once, in order), else every column but the vectors.
pub(crate) fn resolve_columns(
    columns: Option<&[String]>,
    dataset: &Dataset,
) -> Result<Vec<String>> {
    let schema = Schema::from(dataset.schema());
    let Some(asked) = columns else {
        return Ok(crate::hot::scalar_columns(&schema));
    };
    if asked.is_empty() || asked.len() > COLUMNS_MAX {
        return Err(bad(
            "invalid_columns",
            format!("`columns` takes 1..={COLUMNS_MAX} column names"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(asked.len());
    for name in asked {
        if schema.field_with_name(name).is_err() {
            return Err(bad(
                "unknown_column",
                format!(
                    "no column `{}`; GET /v1/tables lists them",
                    name.chars().take(64).collect::<String>()
                ),
            ));
        }
        if !out.contains(name) {
            out.push(name.clone());
        }
    }
    Ok(out)
}

/// `batch` with only `columns` and its `_distance` (if any), in that order.
pub(crate) fn select(batch: &RecordBatch, columns: &[String]) -> Result<RecordBatch> {
    let schema = batch.schema();
    let mut indices: Vec<usize> = Vec::with_capacity(columns.len() + 1);
    for name in columns.iter().map(String::as_str).chain(["_distance"]) {
        if let Ok(i) = schema.index_of(name)
            && !indices.contains(&i)
        {
            indices.push(i);
        }
    }
    batch.project(&indices).map_err(internal)
}

/// Checks a request against a dataset and returns the vector column.
pub(crate) fn check(search: &Search, tables: &Tables) -> Result<&'static str> {
    if search.text_vec {
        return check_text_vec(search);
    }
    let column = vector_column(&search.table).ok_or_else(|| {
        bad(
            "not_a_vector_table",
            format!(
                "table `{}` has no vector column; use skills, basins, basin_versions or nodes",
                search.table.chars().take(64).collect::<String>()
            ),
        )
    })?;
    check_k(search.k)?;
    if let Some(dim) = tables.dim(&search.table)
        && dim as usize != search.vector.len()
    {
        return Err(bad(
            "dimension_mismatch",
            format!(
                "table `{}` has {dim}-dimensional vectors; the query has {}",
                search.table,
                search.vector.len()
            ),
        ));
    }
    if let Some(filter) = &search.filter {
        // Parse it here so that a broken filter is the caller's error.
        parse_filter(filter)?;
    }
    Ok(column)
}

/// [`check`] for a search of the `text_vec` column.
fn check_text_vec(search: &Search) -> Result<&'static str> {
    use meshnode_schemas::tables::TEXT_VEC_DIM;
    text_table(&search.table)?;
    check_k(search.k)?;
    if search.vector.len() != TEXT_VEC_DIM as usize {
        return Err(bad(
            "dimension_mismatch",
            format!(
                "text vectors have {TEXT_VEC_DIM} dimensions; the query has {}",
                search.vector.len()
            ),
        ));
    }
    if let Some(filter) = &search.filter {
        parse_filter(filter)?;
    }
    Ok("text_vec")
}

/// A table with text columns (skills, basins, nodes), or `not_a_text_table`.
pub(crate) fn text_table(name: &str) -> Result<&'static str> {
    crate::tables::table_name(name)
        .filter(|t| meshnode_schemas::tables::TEXT_TABLES.contains(t))
        .ok_or_else(|| {
            bad(
                "not_a_text_table",
                format!(
                    "table `{}` cannot be searched by text; use skills, basins or nodes",
                    name.chars().take(64).collect::<String>()
                ),
            )
        })
}

pub(crate) fn check_k(k: usize) -> Result<()> {
    if k == 0 || k > K_MAX {
        return Err(bad("invalid_k", format!("k must be 1..={K_MAX}")));
    }
    Ok(())
}

/// Longest search filter, in bytes.
pub(crate) const FILTER_BYTES_MAX: usize = 8 * 1024;

/// Parses a search filter (bounded depth) to its very end and checks its shape: `a = 1 b`
/// is an error, not `a = 1`.
pub(crate) fn parse_filter(text: &str) -> Result<datafusion::sql::sqlparser::ast::Expr> {
    use datafusion::sql::sqlparser::{dialect::GenericDialect, parser::Parser, tokenizer::Token};
    if text.len() > FILTER_BYTES_MAX {
        return Err(bad(
            "filter_too_large",
            format!("filter is longer than {FILTER_BYTES_MAX} bytes"),
        ));
    }
    let shown: String = text.chars().take(200).collect();
    let invalid =
        |e: &dyn std::fmt::Display| bad("invalid_filter", format!("filter `{shown}`: {e}"));
    let mut parser = Parser::new(&GenericDialect {})
        .with_recursion_limit(64)
        .try_with_sql(text)
        .map_err(|e| invalid(&e))?;
    let expr = parser.parse_expr().map_err(|e| invalid(&e))?;
    let next = parser.peek_token();
    if next.token != Token::EOF {
        return Err(invalid(&format!(
            "unexpected `{}` after the expression (line {}, column {})",
            next.token, next.span.start.line, next.span.start.column
        )));
    }
    crate::guard::check_shape(&expr)?;
    Ok(expr)
}

/// A search filter as a planned expression over `schema`, with the SQL engine's functions,
/// each guarded ([`crate::guard`]). Run it on the query runtime (it parses recursively).
pub(crate) fn filter_expr(
    text: &str,
    schema: &arrow_schema::Schema,
    cancel: &crate::cancel::Cancel,
) -> Result<Expr> {
    use datafusion::common::DFSchema;
    use datafusion::sql::sqlparser::ast::ExprWithAlias;
    let ast = parse_filter(text)?;
    let shown: String = text.chars().take(200).collect();
    let df_schema = DFSchema::try_from(schema.clone()).map_err(internal)?;
    let expr = crate::sql::function_state()
        .create_logical_expr_from_sql_expr(
            ExprWithAlias {
                expr: ast,
                alias: None,
            },
            &df_schema,
        )
        .map_err(|e| {
            bad(
                "invalid_filter",
                format!("filter `{shown}`: {}", e.find_root()),
            )
        })?;
    crate::guard::expr(expr, cancel).map_err(internal)
}

/// Runs a search on one dataset version. Rows carry every column plus `_distance`.
pub(crate) async fn run(
    dataset: &Dataset,
    column: &str,
    search: &Search,
    filter_expr: Option<Expr>,
    use_index: bool,
) -> Result<Vec<RecordBatch>> {
    if search.filter.is_some() || filter_expr.is_some() {
        // A selective filter leaves few rows: rank them exactly (recall 1) instead of asking
        // an index whose partitions and graph hold mostly rows the filter removes.
        let rows_max = if use_index && !search.exact {
            FILTERED_EXACT_ROWS_MAX
        } else {
            usize::MAX
        };
        if let Some(batches) =
            exact_filtered(dataset, column, search, filter_expr.clone(), rows_max).await?
        {
            return Ok(batches);
        }
    }
    let query = Float32Array::from(search.vector.clone());
    let mut scan = dataset.scan();
    scan.nearest(column, &query, search.k)
        .map_err(|e| bad("knn_error", e.to_string()))?;
    scan.distance_metric(search.metric);
    scan.prefilter(true);
    scan.use_index(use_index && !search.exact);
    if use_index && !search.exact {
        // Wider beams and a re-rank with the full vectors keep recall high.
        // Measured on 384-dim uniform random vectors (the hard case; `make bench-query`):
        // ef 512 with a 20x re-rank gives recall@10 ~0.96 on one graph; clustered data
        // reaches 1.0 at any setting. Every partition is probed (there are few, see
        // `Tables::build_index`).
        scan.ef((search.k * 40).max(512));
        scan.nprobes(ANN_PARTITIONS_MAX);
        scan.refine(20);
    }
    if let Some(filter) = &search.filter {
        scan.filter(filter)
            .map_err(|e| bad("invalid_filter", format!("filter `{filter}`: {e}")))?;
    }
    if let Some(expr) = filter_expr {
        scan.filter_expr(expr);
    }
    let stream = scan.try_into_stream().await.map_err(scan_error)?;
    let batches: Vec<RecordBatch> = stream.try_collect().await.map_err(stream_error)?;
    Ok(batches)
}

/// Most IVF partitions of an ANN index (each holds an HNSW graph; searches probe them all).
pub(crate) const ANN_PARTITIONS_MAX: usize = 16;

/// Rows per IVF partition of an ANN index: one HNSW graph up to this many rows.
pub(crate) const ANN_ROWS_PER_PARTITION: usize = 250_000;

/// Filtered searches over an indexed table that match at most this many rows are exact.
pub const FILTERED_EXACT_ROWS_MAX: usize = 100_000;

/// An error while the search ran: a function guard's refusal is the query's cost, anything
/// else the search's.
fn stream_error(e: impl std::fmt::Display) -> crate::error::Error {
    let text = e.to_string();
    if text.contains("Resources exhausted") {
        crate::error::Error::ResourcesExhausted(text)
    } else {
        bad("knn_error", text)
    }
}

fn scan_error(e: lance::Error) -> crate::error::Error {
    let text = e.to_string();
    if text.contains("parsing") || text.contains("not found") || text.contains("No field named") {
        bad("invalid_filter", text)
    } else {
        bad("knn_error", text)
    }
}

/// A candidate of the exact search; ordered by distance (NaN last), then row id.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    distance: f32,
    row: u64,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.distance
            .total_cmp(&other.distance)
            .then(self.row.cmp(&other.row))
    }
}

/// Exact k nearest among the rows that pass the filter: reads only the vector column of the
/// matching rows, keeps the best k, then fetches those rows whole. `None` when more than
/// `rows_max` rows match (the caller uses the index instead).
async fn exact_filtered(
    dataset: &Dataset,
    column: &str,
    search: &Search,
    filter_expr: Option<Expr>,
    rows_max: usize,
) -> Result<Option<Vec<RecordBatch>>> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::UInt64Type;

    let mut scan = dataset.scan();
    scan.project(&[column])
        .map_err(|e| bad("knn_error", e.to_string()))?;
    scan.with_row_id();
    if let Some(filter) = &search.filter {
        scan.filter(filter)
            .map_err(|e| bad("invalid_filter", format!("filter `{filter}`: {e}")))?;
    }
    if let Some(expr) = filter_expr {
        scan.filter_expr(expr);
    }
    let mut stream = scan.try_into_stream().await.map_err(scan_error)?;
    let distance = search.metric.arrow_batch_func();
    let query = Float32Array::from(search.vector.clone());
    let mut best = std::collections::BinaryHeap::<Candidate>::with_capacity(search.k + 1);
    let mut seen = 0usize;
    while let Some(batch) = stream.try_next().await.map_err(stream_error)? {
        seen += batch.num_rows();
        if seen > rows_max {
            return Ok(None);
        }
        let (Some(vectors), Some(rows)) = (
            batch
                .column_by_name(column)
                .and_then(|c| c.as_fixed_size_list_opt()),
            batch
                .column_by_name("_rowid")
                .and_then(|c| c.as_primitive_opt::<UInt64Type>()),
        ) else {
            return Err(internal(format!("knn: scan of {column} lost its columns")));
        };
        let distances = distance(&query, vectors).map_err(|e| bad("knn_error", e.to_string()))?;
        for i in 0..distances.len() {
            if distances.is_null(i) || distances.value(i).is_nan() {
                continue;
            }
            let candidate = Candidate {
                distance: distances.value(i),
                row: rows.value(i),
            };
            if best.len() < search.k {
                best.push(candidate);
            } else if best.peek().is_some_and(|worst| candidate < *worst) {
                best.pop();
                best.push(candidate);
            }
        }
    }
    if best.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let row_ids: Vec<u64> = best.iter().map(|c| c.row).collect();
    let rows = dataset
        .take_rows(&row_ids, dataset.schema().clone())
        .await
        .map_err(|e| bad("knn_error", e.to_string()))?;
    let vectors = rows
        .column_by_name(column)
        .and_then(|c| c.as_fixed_size_list_opt())
        .ok_or_else(|| internal(format!("knn: rows without {column}")))?;
    let distances = distance(&query, vectors).map_err(|e| bad("knn_error", e.to_string()))?;
    let order = arrow::compute::sort_to_indices(distances.as_ref(), None, None)
        .map_err(|e| internal(e.to_string()))?;
    let distances = arrow::compute::take(distances.as_ref(), &order, None).map_err(internal)?;
    Ok(Some(vec![with_distance(&rows, &order, distances)?]))
}

/// `rows` in `order`, with `distances` (already in that order) as a last `_distance` column.
pub(crate) fn with_distance(
    rows: &RecordBatch,
    order: &arrow_array::UInt32Array,
    distances: arrow_array::ArrayRef,
) -> Result<RecordBatch> {
    let mut columns = Vec::with_capacity(rows.num_columns() + 1);
    for c in rows.columns() {
        columns.push(arrow::compute::take(c.as_ref(), order, None).map_err(internal)?);
    }
    columns.push(distances);
    let mut fields: Vec<Field> = rows
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new("_distance", DataType::Float32, true));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(internal)
}

/// The `knn(table, vector_json, k [, metric])` SQL table function.
pub(crate) struct KnnFunction {
    datasets: Vec<(&'static str, Arc<Dataset>)>,
    tables: Arc<Tables>,
    embed_text: Option<crate::sql::EmbedText>,
}

impl std::fmt::Debug for KnnFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnnFunction").finish_non_exhaustive()
    }
}

impl KnnFunction {
    pub(crate) fn new(
        datasets: Vec<(&'static str, Arc<Dataset>)>,
        tables: Arc<Tables>,
        embed_text: Option<crate::sql::EmbedText>,
    ) -> Self {
        Self {
            datasets,
            tables,
            embed_text,
        }
    }

    /// The query of `knn`'s second argument: a JSON array is a vector for the authors'
    /// vectors; anything else is text, embedded and ranked against `text_vec`.
    fn query_vector(&self, argument: &str) -> datafusion::common::Result<(Vec<f32>, bool)> {
        if argument.trim_start().starts_with('[') {
            let vector =
                parse_vector(argument).map_err(|e| DataFusionError::Plan(e.to_string()))?;
            return Ok((vector, false));
        }
        let embed = self.embed_text.as_ref().ok_or_else(|| {
            DataFusionError::Plan(
                "knn: this node has no embedding model, so knn takes a vector ('[0.1, ...]'), \
                 not text; install the model with `scripts/ensure-deps.sh model` and restart"
                    .into(),
            )
        })?;
        let vector = embed(argument).map_err(|e| DataFusionError::Plan(format!("knn: {e}")))?;
        Ok((vector, true))
    }
}

fn literal_text(expr: Option<&Expr>) -> Option<String> {
    match expr {
        Some(Expr::Literal(ScalarValue::Utf8(Some(s)), _))
        | Some(Expr::Literal(ScalarValue::LargeUtf8(Some(s)), _))
        | Some(Expr::Literal(ScalarValue::Utf8View(Some(s)), _)) => Some(s.clone()),
        _ => None,
    }
}

fn literal_int(expr: Option<&Expr>) -> Option<i64> {
    match expr {
        Some(Expr::Literal(ScalarValue::Int64(Some(v)), _)) => Some(*v),
        Some(Expr::Literal(ScalarValue::Int32(Some(v)), _)) => Some(i64::from(*v)),
        Some(Expr::Literal(ScalarValue::UInt64(Some(v)), _)) => i64::try_from(*v).ok(),
        _ => None,
    }
}

fn df_error(e: crate::error::Error) -> DataFusionError {
    match e {
        // A guarded function's refusal stays what it is (422), not a knn error.
        crate::error::Error::ResourcesExhausted(m) => DataFusionError::ResourcesExhausted(m),
        e => DataFusionError::Execution(format!("knn: {e}")),
    }
}

impl TableFunctionImpl for KnnFunction {
    fn call(&self, args: &[Expr]) -> datafusion::common::Result<Arc<dyn TableProvider>> {
        let usage = "knn(table, '[v1, v2, ...]' or 'text', k [, 'cosine'|'l2'|'dot'])";
        if args.len() < 3 || args.len() > 4 {
            return Err(DataFusionError::Plan(format!(
                "knn takes 3 or 4 arguments: {usage}"
            )));
        }
        let table = literal_text(args.first()).ok_or_else(|| {
            DataFusionError::Plan(format!("knn: the table must be a string literal: {usage}"))
        })?;
        let vector_text = literal_text(args.get(1)).ok_or_else(|| {
            DataFusionError::Plan(format!("knn: the vector must be a string literal: {usage}"))
        })?;
        let k = literal_int(args.get(2)).ok_or_else(|| {
            DataFusionError::Plan(format!("knn: k must be an integer literal: {usage}"))
        })?;
        let metric = match literal_text(args.get(3)) {
            Some(m) => parse_metric(&m).map_err(|e| DataFusionError::Plan(e.to_string()))?,
            None if args.len() == 4 => {
                return Err(DataFusionError::Plan(format!(
                    "knn: the metric must be a string: {usage}"
                )));
            }
            None => DistanceType::Cosine,
        };
        let (vector, text_vec) = self.query_vector(&vector_text)?;
        let search = Search {
            table: table.clone(),
            vector,
            k: usize::try_from(k).unwrap_or(0),
            metric,
            filter: None,
            exact: false,
            text_vec,
            columns: None,
        };
        let column =
            check(&search, &self.tables).map_err(|e| DataFusionError::Plan(e.to_string()))?;
        let dataset = self
            .datasets
            .iter()
            .find(|(t, _)| *t == table)
            .map(|(_, d)| d.clone())
            .ok_or_else(|| {
                DataFusionError::Plan(format!("knn: table `{table}` is empty or unknown"))
            })?;
        let mut fields: Vec<Field> = Schema::from(dataset.schema())
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new("_distance", DataType::Float32, true));
        Ok(Arc::new(KnnProvider {
            dataset,
            column,
            search,
            schema: Arc::new(Schema::new(fields)),
            tables: self.tables.clone(),
        }))
    }
}

#[derive(Debug)]
struct KnnProvider {
    dataset: Arc<Dataset>,
    column: &'static str,
    search: Search,
    schema: SchemaRef,
    tables: Arc<Tables>,
}

#[async_trait]
impl TableProvider for KnnProvider {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::common::Result<Vec<TableProviderFilterPushDown>> {
        // Filters on the table's own columns run inside the search, before ranking.
        Ok(filters
            .iter()
            .map(|f| {
                let columns = f.column_refs();
                if columns.iter().any(|c| c.name == "_distance") {
                    TableProviderFilterPushDown::Unsupported
                } else {
                    TableProviderFilterPushDown::Exact
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let filter = filters.iter().cloned().reduce(Expr::and);
        let index = self.tables.index_metric(&self.search.table).await;
        let use_index = !self.search.text_vec && index == Some(self.search.metric);
        let batches = run(&self.dataset, self.column, &self.search, filter, use_index)
            .await
            .map_err(df_error)?;
        // Lance returns the table's columns and `_distance`; align to our declared schema.
        let mut aligned = Vec::with_capacity(batches.len());
        for batch in batches {
            let columns = self
                .schema
                .fields()
                .iter()
                .map(|f| {
                    batch.column_by_name(f.name()).cloned().ok_or_else(|| {
                        DataFusionError::Execution(format!("knn: no column {}", f.name()))
                    })
                })
                .collect::<datafusion::common::Result<Vec<_>>>()?;
            aligned.push(RecordBatch::try_new(self.schema.clone(), columns)?);
        }
        let table = MemTable::try_new(self.schema.clone(), vec![aligned])?;
        table.scan(state, projection, &[], limit).await
    }
}

/// An unfiltered, approximate search through the in-memory index, on the caller's task:
/// `None` when it cannot answer (filtered, exact, no index covering the table, a high ef).
/// Exact comparisons happen only on tables below the graph threshold, which are small.
pub(crate) async fn search_inline(
    tables: &Arc<Tables>,
    ann: &crate::ann::AnnIndexes,
    dataset: &Dataset,
    search: &Search,
) -> Result<Option<Vec<RecordBatch>>> {
    if search.filter.is_some() || search.exact || !ann.inline_ok() {
        return Ok(None);
    }
    let column = check(search, tables)?;
    let columns = resolve_columns(search.columns.as_deref(), dataset)?;
    let Some(table) = crate::tables::table_name(&search.table) else {
        return Ok(None);
    };
    // Below the graph threshold the index compares every vector: not on this task.
    if dataset.count_rows(None).await.map_err(internal)? < ann.graph_rows_min() {
        return Ok(None);
    }
    ann.search(
        tables,
        table,
        dataset,
        column,
        &search.vector,
        search.k,
        search.metric,
        false,
        &columns,
    )
    .await
}

/// A search on the current version (used by `POST /v1/search`): unfiltered, through the
/// in-memory index when it covers the table; otherwise through Lance.
pub(crate) async fn search(
    tables: &Arc<Tables>,
    ann: &crate::ann::AnnIndexes,
    dataset: Arc<Dataset>,
    search: &Search,
    cancel: &crate::cancel::Cancel,
) -> Result<Vec<RecordBatch>> {
    let column = check(search, tables)?;
    let columns = resolve_columns(search.columns.as_deref(), &dataset)?;
    if search.filter.is_none()
        && let Some(table) = crate::tables::table_name(&search.table)
        && let Some(found) = ann
            .search(
                tables,
                table,
                &dataset,
                column,
                &search.vector,
                search.k,
                search.metric,
                search.exact,
                &columns,
            )
            .await?
    {
        return Ok(found);
    }
    let index = tables.index_metric(&search.table).await;
    let use_index = !search.text_vec && index == Some(search.metric);
    let filter = match &search.filter {
        Some(text) => {
            let schema = arrow_schema::Schema::from(dataset.schema());
            Some(filter_expr(text, &schema, cancel)?)
        }
        None => None,
    };
    let planned = Search {
        filter: None,
        ..search.clone()
    };
    let batches = run(&dataset, column, &planned, filter, use_index)
        .await
        .map_err(|e| match e {
            crate::error::Error::Query { .. } | crate::error::Error::ResourcesExhausted(_) => e,
            other => internal(other),
        })?;
    batches.iter().map(|b| select(b, &columns)).collect()
}
