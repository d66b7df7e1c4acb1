//! Read-only, bounded SQL over the query tables (DataFusion), and result encodings.
//!
//! Every query gets a fresh session with only our tables and the `knn` table function
//! registered: no DDL, DML or `SET`, no table factories or file formats (so no file or URL
//! access), no default table functions (no `generate_series` bombs). Text size, parser
//! recursion depth, memory, time and result rows are capped; queries run on their own
//! runtime so that an expensive one cannot stall the node's other requests.

use std::sync::Arc;
use std::time::Duration;

use arrow::util::display::{ArrayFormatter, FormatOptions};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, SchemaRef};
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::SessionStateDefaults;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext, col, lit};
use lance::datafusion::LanceTableProvider;
use serde_json::{Map, Value};

use crate::cancel::Cancel;
use crate::error::{Error, Result, bad, internal};
use crate::knn::KnnFunction;
use crate::tables::Tables;

/// Limits of one SQL query.
#[derive(Clone, Debug)]
pub struct SqlLimits {
    /// Longest SQL text, in bytes. Default 64 KiB.
    pub text_bytes_max: usize,
    /// Most result rows returned (more are cut and `truncated` is set). Default 10 000.
    pub rows_max: usize,
    /// Longest a query may run. Default 10 s.
    pub timeout: Duration,
    /// Memory a query may use for sorts, joins and aggregations. Default 512 MiB.
    pub memory_bytes_max: usize,
    /// Nesting depth the SQL parser accepts. Default 64.
    pub depth_max: usize,
    /// Queries running at once; more wait up to `timeout`. Default 4.
    pub concurrent_max: usize,
    /// Run SQL in worker processes started this way (`None`: on this process's query
    /// runtime). See [`crate::worker`].
    pub workers: Option<crate::worker::WorkerProgram>,
}

impl Default for SqlLimits {
    fn default() -> Self {
        Self {
            text_bytes_max: 64 * 1024,
            rows_max: 10_000,
            timeout: Duration::from_secs(10),
            memory_bytes_max: 512 * 1024 * 1024,
            depth_max: 64,
            concurrent_max: 4,
            workers: None,
        }
    }
}

/// The rows of a query.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Result schema.
    pub schema: SchemaRef,
    /// Result rows (at most `rows_max`).
    pub batches: Vec<RecordBatch>,
    /// Whether rows beyond `rows_max` were cut.
    pub truncated: bool,
}

impl Answer {
    /// The whole answer of a search: every row, none cut.
    pub(crate) fn of_rows(batches: Vec<RecordBatch>) -> Self {
        Self {
            schema: batches
                .first()
                .map(|b| b.schema())
                .unwrap_or_else(|| Arc::new(arrow_schema::Schema::empty())),
            batches,
            truncated: false,
        }
    }

    /// Number of rows.
    pub fn n_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }

    /// `{"columns": [...], "rows": [[...]], "truncated": bool}`.
    pub fn to_json(&self) -> Value {
        let columns: Vec<Value> = self
            .schema
            .fields()
            .iter()
            .map(|f| Value::String(f.name().clone()))
            .collect();
        let mut rows = Vec::with_capacity(self.n_rows());
        for batch in &self.batches {
            for row in 0..batch.num_rows() {
                rows.push(Value::Array(
                    batch
                        .columns()
                        .iter()
                        .map(|c| cell(c.as_ref(), row))
                        .collect(),
                ));
            }
        }
        serde_json::json!({"columns": columns, "rows": rows, "truncated": self.truncated})
    }

    /// Rows as JSON objects keyed by column name.
    pub fn to_objects(&self) -> Vec<Map<String, Value>> {
        let mut out = Vec::with_capacity(self.n_rows());
        for batch in &self.batches {
            for row in 0..batch.num_rows() {
                let mut object = Map::new();
                for (field, column) in self.schema.fields().iter().zip(batch.columns()) {
                    object.insert(field.name().clone(), cell(column.as_ref(), row));
                }
                out.push(object);
            }
        }
        out
    }

    /// CSV with a header row.
    pub fn to_csv(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            for batch in &self.batches {
                // CSV has no lists: render nested columns as JSON text.
                writer.write(&flatten_for_csv(batch)?).map_err(internal)?;
            }
            if self.batches.is_empty() {
                writer
                    .write(&RecordBatch::new_empty(flat_schema(&self.schema)))
                    .map_err(internal)?;
            }
        }
        Ok(out)
    }

    /// An Arrow IPC stream.
    pub fn to_arrow_ipc(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, &self.schema)
                .map_err(internal)?;
            for batch in &self.batches {
                writer.write(batch).map_err(internal)?;
            }
            writer.finish().map_err(internal)?;
        }
        Ok(out)
    }
}

fn is_nested(t: &DataType) -> bool {
    matches!(
        t,
        DataType::List(_)
            | DataType::LargeList(_)
            | DataType::FixedSizeList(_, _)
            | DataType::Struct(_)
            | DataType::Map(_, _)
    )
}

fn flat_schema(schema: &SchemaRef) -> SchemaRef {
    Arc::new(arrow_schema::Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| {
                if is_nested(f.data_type()) {
                    arrow_schema::Field::new(f.name(), DataType::Utf8, true)
                } else {
                    f.as_ref().clone()
                }
            })
            .collect::<Vec<_>>(),
    ))
}

fn flatten_for_csv(batch: &RecordBatch) -> Result<RecordBatch> {
    let schema = batch.schema();
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| -> arrow_array::ArrayRef {
            if is_nested(f.data_type()) {
                let values: Vec<Option<String>> = (0..c.len())
                    .map(|row| {
                        if c.is_null(row) {
                            None
                        } else {
                            Some(cell(c.as_ref(), row).to_string())
                        }
                    })
                    .collect();
                Arc::new(arrow_array::StringArray::from(values))
            } else {
                c.clone()
            }
        })
        .collect();
    RecordBatch::try_new(flat_schema(&schema), columns).map_err(internal)
}

/// One cell as JSON: numbers, strings, booleans, lists as arrays, structs as objects, other
/// types as their display text; NaN and ±Inf become null.
pub fn cell(array: &dyn Array, row: usize) -> Value {
    use arrow_array::cast::AsArray;
    use arrow_array::types::*;
    if array.is_null(row) {
        return Value::Null;
    }
    let float = |x: f64| {
        serde_json::Number::from_f64(x)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    };
    match array.data_type() {
        DataType::Boolean => Value::Bool(array.as_boolean().value(row)),
        DataType::Int8 => Value::from(array.as_primitive::<Int8Type>().value(row)),
        DataType::Int16 => Value::from(array.as_primitive::<Int16Type>().value(row)),
        DataType::Int32 => Value::from(array.as_primitive::<Int32Type>().value(row)),
        DataType::Int64 => Value::from(array.as_primitive::<Int64Type>().value(row)),
        DataType::UInt8 => Value::from(array.as_primitive::<UInt8Type>().value(row)),
        DataType::UInt16 => Value::from(array.as_primitive::<UInt16Type>().value(row)),
        DataType::UInt32 => Value::from(array.as_primitive::<UInt32Type>().value(row)),
        DataType::UInt64 => Value::from(array.as_primitive::<UInt64Type>().value(row)),
        DataType::Float32 => float(f64::from(array.as_primitive::<Float32Type>().value(row))),
        DataType::Float64 => float(array.as_primitive::<Float64Type>().value(row)),
        DataType::Utf8 => Value::String(array.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Value::String(array.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => Value::String(array.as_string_view().value(row).to_string()),
        DataType::Binary => Value::String(hex::encode(array.as_binary::<i32>().value(row))),
        DataType::LargeBinary => Value::String(hex::encode(array.as_binary::<i64>().value(row))),
        DataType::List(_) => {
            let list = array.as_list::<i32>().value(row);
            Value::Array((0..list.len()).map(|i| cell(list.as_ref(), i)).collect())
        }
        DataType::LargeList(_) => {
            let list = array.as_list::<i64>().value(row);
            Value::Array((0..list.len()).map(|i| cell(list.as_ref(), i)).collect())
        }
        DataType::FixedSizeList(_, _) => {
            let list = array.as_fixed_size_list().value(row);
            Value::Array((0..list.len()).map(|i| cell(list.as_ref(), i)).collect())
        }
        DataType::Decimal128(_, 0) => {
            let v = array.as_primitive::<Decimal128Type>().value(row);
            match i64::try_from(v) {
                Ok(v) => Value::from(v),
                Err(_) => match u64::try_from(v) {
                    Ok(v) => Value::from(v),
                    Err(_) => Value::String(v.to_string()),
                },
            }
        }
        DataType::Struct(fields) => {
            let s = array.as_struct();
            let mut object = Map::new();
            for (field, column) in fields.iter().zip(s.columns()) {
                object.insert(field.name().clone(), cell(column.as_ref(), row));
            }
            Value::Object(object)
        }
        _ => match ArrayFormatter::try_new(array, &FormatOptions::default()) {
            Ok(f) => Value::String(f.value(row).to_string()),
            Err(_) => Value::Null,
        },
    }
}

/// A runtime that may be dropped from async code (it shuts down in the background).
struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl OwnedRuntime {
    fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0
            .as_ref()
            .expect("invariant: the runtime lives until drop")
            .spawn(future)
    }
}

/// Stack of each query thread. Statements are bounded in shape before planning
/// ([`crate::guard::check_shape`]), but parsing, planning and dropping a statement still
/// recurse over its tree; this keeps every bounded statement far from the end of the stack.
/// Only touched pages take memory.
pub(crate) const QUERY_STACK_BYTES: usize = 256 << 20;

/// Most bytes of result batches one query returns (more rows are cut, `truncated` is set).
/// Encoded as JSON an answer takes a few times this; the gateway encodes a few at a time.
pub(crate) const RESULT_BYTES_MAX: usize = 16 << 20;

/// The SQL engine: a dedicated runtime with large stacks, a cap on concurrent queries and a
/// deadline. SQL and vector search both run here.
/// Embeds one text with the node's model (for `knn` with a text).
pub(crate) type EmbedText = Arc<dyn Fn(&str) -> Result<Vec<f32>> + Send + Sync>;

pub(crate) struct Engine {
    /// The model for `knn(table, 'text', k)`, when there is one.
    pub(crate) embed_text: Option<EmbedText>,
    runtime: OwnedRuntime,
    permits: Arc<tokio::sync::Semaphore>,
    pub(crate) limits: SqlLimits,
    /// Worker processes for SQL, when [`SqlLimits::workers`] is set.
    pub(crate) pool: Option<crate::worker::Pool>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// How the tables of one query are pinned.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    /// `(table, dataset)` pairs to register.
    pub(crate) tables: Vec<(&'static str, Arc<lance::Dataset>)>,
    /// Append tables are filtered to `leaf_index < as_of` when set.
    pub(crate) as_of: Option<u64>,
}

impl Engine {
    pub(crate) fn new(limits: SqlLimits) -> Result<Self> {
        Self::with_blocking_threads(limits, 8)
    }

    /// An engine whose runtime has at most `blocking` blocking threads (Lance reads files on
    /// them; each gets the runtime's large stack).
    pub(crate) fn with_blocking_threads(limits: SqlLimits, blocking: usize) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("meshnode-query")
            .thread_stack_size(QUERY_STACK_BYTES)
            // Blocking threads get the same stacks.
            .max_blocking_threads(blocking)
            .enable_all()
            .build()?;
        Ok(Self {
            embed_text: None,
            runtime: OwnedRuntime(Some(runtime)),
            permits: Arc::new(tokio::sync::Semaphore::new(limits.concurrent_max.max(1))),
            limits,
            pool: None,
        })
    }

    /// An engine whose SQL runs in worker processes over the tables under `dir` when the
    /// limits name a worker program.
    /// The workers load the embedding model from `model_dir` when a query needs it.
    pub(crate) fn with_workers(
        limits: SqlLimits,
        dir: &std::path::Path,
        model_dir: Option<std::path::PathBuf>,
    ) -> Result<Self> {
        let pool = match &limits.workers {
            Some(program) => Some(crate::worker::Pool::new(
                program.clone(),
                dir.to_path_buf(),
                model_dir,
                &limits,
            )?),
            None => None,
        };
        Ok(Self {
            pool,
            ..Self::new(limits)?
        })
    }

    /// Runs one query in a worker process under a permit and the deadline.
    pub(crate) async fn run_in_worker(
        &self,
        pool: &crate::worker::Pool,
        request: crate::worker::WorkerRequest,
    ) -> Result<Answer> {
        self.check_text(&request.sql)?;
        let timeout = self.limits.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let _permit = tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| Error::Busy)?
            .map_err(|_| Error::Busy)?;
        pool.run(&request, deadline, timeout).await
    }

    /// The checks of the SQL text itself: size and NUL.
    fn check_text(&self, text: &str) -> Result<()> {
        if text.len() > self.limits.text_bytes_max {
            return Err(bad(
                "sql_too_large",
                format!(
                    "SQL text is {} bytes, at most {} allowed",
                    text.len(),
                    self.limits.text_bytes_max
                ),
            ));
        }
        if text.contains('\0') {
            return Err(bad("sql_error", "SQL text contains NUL"));
        }
        Ok(())
    }

    /// Runs `work` on the query runtime under a permit and the deadline. Past the deadline
    /// the query's [`Cancel`] flag is set (every operator and guarded function of the query
    /// checks it: see [`crate::cancel`]) and its task is aborted, which drops the permit it
    /// holds.
    pub(crate) async fn submit<T, F, Fut>(&self, work: F) -> Result<T>
    where
        F: FnOnce(Cancel) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let timeout = self.limits.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let permit = tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| Error::Busy)?
            .map_err(|_| Error::Busy)?;
        let cancel = Cancel::default();
        let work = work(cancel.clone());
        let task = self.runtime.spawn(async move {
            let _permit = permit;
            work.await
        });
        let abort = task.abort_handle();
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) if e.is_panic() => Err(internal(format!("query task panicked: {e}"))),
            Ok(Err(e)) => Err(internal(format!("query task failed: {e}"))),
            Err(_) => {
                cancel.set();
                abort.abort();
                Err(Error::Timeout(timeout.as_millis() as u64))
            }
        }
    }

    /// A permit if one is free now (work short enough to run on the caller's task).
    pub(crate) fn try_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Permits not in use (for tests and status).
    pub(crate) fn idle_permits(&self) -> usize {
        self.permits.available_permits()
    }

    /// A fresh read-only session over `snapshot`.
    pub(crate) async fn session(
        &self,
        snapshot: &Snapshot,
        tables: &Arc<Tables>,
    ) -> Result<SessionContext> {
        let mut config = SessionConfig::new()
            .with_target_partitions(2)
            .with_information_schema(false);
        config.options_mut().sql_parser.recursion_limit = self.limits.depth_max;
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(self.limits.memory_bytes_max, 1.0)
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()
            .map_err(internal)?;
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_scalar_functions(SessionStateDefaults::default_scalar_functions())
            .with_aggregate_functions(SessionStateDefaults::default_aggregate_functions())
            .with_window_functions(SessionStateDefaults::default_window_functions())
            .with_expr_planners(SessionStateDefaults::default_expr_planners())
            .build();
        let ctx = SessionContext::new_with_state(state);
        for (name, dataset) in &snapshot.tables {
            let provider = Arc::new(LanceTableProvider::new(dataset.clone(), false, false));
            let is_append = meshnode_schemas::tables::APPEND_TABLES.contains(name);
            match (snapshot.as_of, is_append) {
                (Some(n), true) => {
                    let df = ctx
                        .read_table(provider)
                        .map_err(internal)?
                        .filter(col("leaf_index").lt(lit(n)))
                        .map_err(internal)?;
                    ctx.register_table(*name, df.into_view())
                        .map_err(internal)?;
                }
                _ => {
                    ctx.register_table(*name, provider).map_err(internal)?;
                }
            }
        }
        ctx.register_udtf(
            "knn",
            Arc::new(KnnFunction::new(
                snapshot.tables.clone(),
                tables.clone(),
                self.embed_text.clone(),
            )),
        );
        Ok(ctx)
    }

    /// Runs one read-only query under the limits: shape checked before planning, every
    /// function guarded, memory and result size capped, all of it on the query runtime.
    pub(crate) async fn run(&self, ctx: SessionContext, text: String) -> Result<Answer> {
        self.check_text(&text)?;
        let depth_max = self.limits.depth_max;
        let rows_max = self.limits.rows_max;
        self.submit(move |cancel| async move {
            let statement = parse_read_only(&text, depth_max)?;
            let state = ctx.state();
            let plan = state.statement_to_plan(statement).await.map_err(classify)?;
            let options = SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false);
            options.verify_plan(&plan).map_err(classify)?;
            let plan = crate::guard::plan(plan, &cancel).map_err(classify)?;
            // EXPLAIN must stay the root of its plan (and answers a few rows anyway).
            let plan = match plan {
                LogicalPlan::Explain(_) => plan,
                plan => LogicalPlanBuilder::from(plan)
                    .limit(0, Some(rows_max + 1))
                    .and_then(|b| b.build())
                    .map_err(classify)?,
            };
            let schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
            // Optimize here rather than in `create_physical_plan`, so that the join filters
            // the optimizer settles on can be wrapped in cancellation checks.
            let plan = state.optimize(&plan).map_err(classify)?;
            let plan = crate::guard::join_filters(plan, &cancel).map_err(classify)?;
            let physical = state
                .query_planner()
                .create_physical_plan(&plan, &state)
                .await
                .map_err(classify)?;
            let physical = crate::cancel::wrap(physical, &cancel).map_err(classify)?;
            let stream = datafusion::physical_plan::execute_stream(physical, ctx.task_ctx())
                .map_err(classify)?;
            collect_bounded(schema, stream, rows_max).await
        })
        .await
    }
}

/// Collects at most `rows_max` rows and [`RESULT_BYTES_MAX`] bytes of a result stream.
async fn collect_bounded(
    schema: SchemaRef,
    mut stream: datafusion::physical_plan::SendableRecordBatchStream,
    rows_max: usize,
) -> Result<Answer> {
    use futures::StreamExt;
    let mut n = 0usize;
    let mut bytes = 0usize;
    let mut truncated = false;
    let mut kept = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(classify)?;
        let size = batch.get_array_memory_size();
        if n + batch.num_rows() > rows_max || bytes + size > RESULT_BYTES_MAX {
            let take = (rows_max - n).min(batch.num_rows());
            // Keep whole rows up to the byte cap: rows of one batch share its buffers, so
            // count them proportionally.
            let per_row = size / batch.num_rows().max(1);
            let fit = (RESULT_BYTES_MAX.saturating_sub(bytes) / per_row.max(1)).min(take);
            if fit > 0 {
                kept.push(batch.slice(0, fit));
            }
            truncated = true;
            break;
        }
        n += batch.num_rows();
        bytes += size;
        kept.push(batch);
    }
    Ok(Answer {
        schema,
        batches: kept,
        truncated,
    })
}

/// A session state with the SQL engine's functions and nothing else (for planning search
/// filters).
pub(crate) fn function_state() -> datafusion::execution::SessionState {
    SessionStateBuilder::new()
        .with_scalar_functions(SessionStateDefaults::default_scalar_functions())
        .with_aggregate_functions(SessionStateDefaults::default_aggregate_functions())
        .with_window_functions(SessionStateDefaults::default_window_functions())
        .with_expr_planners(SessionStateDefaults::default_expr_planners())
        .build()
}

/// Parses the text (with the recursion limit), accepts exactly one query statement
/// (`SELECT`, `WITH`, `VALUES`, or `EXPLAIN` of one, never `EXPLAIN ANALYZE`, which runs the
/// query) and checks its shape.
pub(crate) fn parse_read_only(
    text: &str,
    depth_max: usize,
) -> Result<datafusion::sql::parser::Statement> {
    use datafusion::sql::parser::{DFParserBuilder, Statement as DfStatement};
    use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
    let mut parser = DFParserBuilder::new(text)
        .with_recursion_limit(depth_max)
        .build()
        .map_err(classify)?;
    let mut statements = parser.parse_statements().map_err(classify)?;
    if statements.len() != 1 {
        return Err(bad(
            "sql_error",
            format!("expected exactly one statement, got {}", statements.len()),
        ));
    }
    let statement = statements.pop_front().expect("invariant: one statement");
    let is_query = |s: &SqlStatement| matches!(s, SqlStatement::Query(_));
    let query: Option<&SqlStatement> = match &statement {
        DfStatement::Statement(s) => match s.as_ref() {
            SqlStatement::Explain {
                statement, analyze, ..
            } if !*analyze && is_query(statement) => Some(statement.as_ref()),
            other if is_query(other) => Some(other),
            _ => None,
        },
        DfStatement::Explain(e) if !e.analyze => match e.statement.as_ref() {
            DfStatement::Statement(s) if is_query(s) => Some(s.as_ref()),
            _ => None,
        },
        _ => None,
    };
    let Some(query) = query else {
        return Err(bad(
            "read_only",
            "only read-only queries (SELECT, WITH, VALUES, EXPLAIN without ANALYZE) are allowed",
        ));
    };
    crate::guard::check_shape(query)?;
    Ok(statement)
}

/// Maps DataFusion errors: planning and SQL problems are the user's; resource limits get
/// their own code; anything else is ours.
pub(crate) fn classify(e: datafusion::error::DataFusionError) -> Error {
    use datafusion::error::DataFusionError as D;
    let root = e.find_root();
    match root {
        D::SQL(..) | D::Plan(..) | D::SchemaError(..) | D::NotImplemented(..) => {
            let text = root.to_string();
            let code = if text.to_lowercase().contains("recursion limit") {
                "sql_too_deep"
            } else if text.contains("not supported")
                && (text.contains("DDL") || text.contains("DML") || text.contains("Statement"))
            {
                "read_only"
            } else if text.contains("table function") && text.contains("not found") {
                "unknown_function"
            } else if text.contains("table") && text.contains("not found") {
                "unknown_table"
            } else {
                "sql_error"
            };
            bad(code, text)
        }
        D::ResourcesExhausted(m) => Error::ResourcesExhausted(m.clone()),
        D::Execution(m) if m.contains("knn") => bad("knn_error", m.clone()),
        _ => {
            let text = root.to_string();
            let lower = text.to_lowercase();
            if lower.contains("recursion limit") || lower.contains("nested too deeply") {
                bad("sql_too_deep", text)
            } else {
                Error::Internal(text)
            }
        }
    }
}
