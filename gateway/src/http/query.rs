//! Query routes: read-only SQL (JSON, CSV, Arrow IPC), vector search, table listing,
//! rebuild, reindex and Parquet export.

use http::{HeaderMap, StatusCode, header};
use meshnode_query::{Mode, Search, TextSearch, parse_metric, vector_from_json};
use serde::Deserialize;
use serde_json::{Value, json};
use warp::Reply;
use warp::reply::Response;

use super::{ApiError, AppState, json};

impl From<meshnode_query::Error> for ApiError {
    fn from(error: meshnode_query::Error) -> Self {
        use meshnode_query::Error as E;
        let code = error.code();
        match &error {
            E::Query { message, .. } => {
                let status = match code {
                    "unknown_table" => StatusCode::NOT_FOUND,
                    "sql_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
                    _ => StatusCode::BAD_REQUEST,
                };
                ApiError::new(status, code, message.clone())
            }
            E::Timeout(_) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                code,
                format!("{error}; narrow the query or add LIMIT"),
            ),
            E::ResourcesExhausted(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                code,
                format!("{error}; narrow the query"),
            ),
            E::NoModel(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, m.clone()),
            E::Busy | E::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, error.to_string())
                    .with_header(header::RETRY_AFTER, "1".into())
            }
            _ => ApiError::internal(error),
        }
    }
}

/// Body of `POST /v1/sql`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SqlRequest {
    /// One read-only statement.
    sql: String,
    /// Run against the first `as_of` accepted events (a transparency-log tree size).
    as_of: Option<u64>,
    /// `json` (default), `csv` or `arrow` (also chosen by the Accept header).
    format: Option<String>,
}

/// Run a read-only SQL query over the ledger tables.
#[utoipa::path(post, path = "/v1/sql", tag = "query",
    request_body = SqlRequest,
    responses(
        (status = 200, description = "{columns, rows, truncated, applied}; or CSV; or an Arrow IPC stream (Accept: application/vnd.apache.arrow.stream)"),
        (status = 400, description = "sql_error, read_only, sql_too_deep, sql_too_complex (over the shape limits), unknown_table…", body = super::error::ErrorBody),
        (status = 408, description = "query_timeout", body = super::error::ErrorBody),
        (status = 413, description = "sql_too_large", body = super::error::ErrorBody),
        (status = 422, description = "query_too_expensive: memory limit, or a function, value or constant over its limit", body = super::error::ErrorBody),
        (status = 503, description = "too_many_queries", body = super::error::ErrorBody),
    ))]
pub(crate) async fn sql(
    state: AppState,
    headers: HeaderMap,
    request: SqlRequest,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = match request.format.as_deref() {
        Some(f) => f.to_string(),
        None if accept.contains("application/vnd.apache.arrow.stream") => "arrow".into(),
        None if accept.contains("text/csv") => "csv".into(),
        None => "json".into(),
    };
    let query = &state.node().query;
    let (answer, state_at) = query.sql(&request.sql, request.as_of).await?;
    let applied = query.status()?.applied;
    // Encoding multiplies an answer's size a few times: a few at once.
    let _encoding = state
        .inner
        .encodings
        .acquire()
        .await
        .map_err(|_| ApiError::internal("the encoder limit closed"))?;
    match format.as_str() {
        "json" => {
            let mut value = answer.to_json();
            value["applied"] = json!(applied);
            if let Some(n) = request.as_of {
                value["as_of"] = json!({"tree_size": n, "state_tables_at": state_at});
            }
            Ok(json(StatusCode::OK, &value))
        }
        "csv" => Ok(warp::reply::with_header(
            answer.to_csv()?,
            header::CONTENT_TYPE,
            "text/csv; charset=utf-8",
        )
        .into_response()),
        "arrow" => Ok(warp::reply::with_header(
            answer.to_arrow_ipc()?,
            header::CONTENT_TYPE,
            "application/vnd.apache.arrow.stream",
        )
        .into_response()),
        other => Err(ApiError::bad_request(
            "invalid_format",
            format!("format `{other}` is not json, csv or arrow"),
        )),
    }
}

/// Body of `POST /v1/search`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchRequest {
    /// skills, basins, basin_versions or nodes (text: skills, basins or nodes).
    table: String,
    /// What to look for in plain words (searches the node's text vectors and words); give
    /// this or `vector`.
    text: Option<String>,
    /// hybrid (default: meaning and words fused), vector (meaning) or text (words, BM25);
    /// with `text` only.
    mode: Option<String>,
    /// Hybrid only: weight of meaning against words, 0..=1 (default 0.9).
    alpha: Option<f32>,
    /// Query vector (same dimension as the table's author vectors); give this or `text`.
    #[schema(value_type = Option<Vec<f32>>)]
    vector: Option<Value>,
    /// How many results, 1..=1000.
    k: Option<u64>,
    /// cosine (default), l2 or dot.
    metric: Option<String>,
    /// SQL boolean expression applied before ranking, e.g. `domain = 'viticulture'`.
    filter: Option<String>,
    /// Force exact search even if an ANN index exists.
    exact: Option<bool>,
    /// The columns each row carries (default: every column but the vectors; name a vector
    /// column to get it).
    columns: Option<Vec<String>>,
}

/// The k nearest rows of a vector table, nearest first, filtered before ranking; or, with
/// `text`, the rows of a text table that match it best by meaning and words.
#[utoipa::path(post, path = "/v1/search", tag = "query",
    request_body = SearchRequest,
    responses(
        (status = 200, description = "{results: [{distance, row}]}; with text: {results: [{score, distance, bm25, row}], mode, model}"),
        (status = 400, description = "invalid_search, invalid_vector, invalid_text, invalid_mode, not_a_text_table, dimension_mismatch, invalid_k, invalid_metric, invalid_filter, invalid_columns, unknown_column…", body = super::error::ErrorBody),
        (status = 503, description = "no_embed_model: a text search in mode hybrid or vector on a node without the model", body = super::error::ErrorBody),
        (status = 404, description = "unknown_table", body = super::error::ErrorBody),
    ))]
pub(crate) async fn search(
    state: AppState,
    headers: HeaderMap,
    request: SearchRequest,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let k = usize::try_from(request.k.unwrap_or(10)).unwrap_or(usize::MAX);
    let vector = match (request.text, request.vector) {
        (Some(text), None) => {
            if request.metric.is_some() || request.exact.is_some() {
                return Err(ApiError::bad_request(
                    "invalid_search",
                    "`metric` and `exact` go with `vector`; a text search ranks by cosine",
                ));
            }
            let search = TextSearch {
                table: request.table,
                text,
                k,
                filter: request.filter,
                mode: Mode::parse(request.mode.as_deref().unwrap_or("hybrid"))?,
                alpha: match request.alpha {
                    Some(a) if !(0.0..=1.0).contains(&a) => {
                        return Err(ApiError::bad_request(
                            "invalid_search",
                            "`alpha` is the weight of meaning against words, 0 to 1",
                        ));
                    }
                    a => a,
                },
                columns: request.columns,
            };
            return text_search(&state, &search).await;
        }
        (None, Some(vector)) if request.mode.is_none() && request.alpha.is_none() => {
            vector_from_json(&vector)?
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_search",
                "give either `text` (with an optional `mode`) or `vector`",
            ));
        }
    };
    let search = Search {
        table: request.table,
        vector,
        k,
        metric: parse_metric(request.metric.as_deref().unwrap_or("cosine"))?,
        filter: request.filter,
        exact: request.exact.unwrap_or(false),
        text_vec: false,
        columns: request.columns,
    };
    let hits = state.node().query.search(&search).await?;
    let results: Vec<Value> = hits
        .into_iter()
        .map(|h| json!({"distance": h.distance, "row": h.row}))
        .collect();
    Ok(json(StatusCode::OK, &json!({"results": results})))
}

/// A text search's answer: `{results: [{score, distance, bm25, row}], mode, model}`.
async fn text_search(state: &AppState, search: &TextSearch) -> Result<Response, ApiError> {
    let query = &state.node().query;
    let hits = query.search_text(search).await?;
    let results: Vec<Value> = hits
        .into_iter()
        .map(|h| json!({"score": h.score, "distance": h.distance, "bm25": h.bm25, "row": h.row}))
        .collect();
    let mode = match search.mode {
        Mode::Hybrid => "hybrid",
        Mode::Vector => "vector",
        Mode::Text => "text",
    };
    Ok(json(
        StatusCode::OK,
        &json!({"results": results, "mode": mode, "model": query.embed_model()}),
    ))
}

/// The query tables with their columns, and materialization progress.
#[utoipa::path(get, path = "/v1/tables", tag = "query",
    responses((status = 200, description = "{tables: [{name, rows, version, columns, ann_index, memory_indexes}], status}")))]
pub(crate) async fn tables(state: AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let query = &state.node().query;
    let tables: Vec<Value> = query
        .tables()
        .await?
        .into_iter()
        .map(|t| {
            json!({
                "name": t.name,
                "rows": t.rows,
                "version": t.version,
                "ann_index": t.ann_index,
                "memory_indexes": t.memory_indexes,
                "columns": t.columns.iter().map(|c| json!({"name": c.name, "type": c.data_type})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let status = query.status()?;
    Ok(json(
        StatusCode::OK,
        &json!({
            "tables": tables,
            "status": {"applied": status.applied, "ledger_size": status.ledger_size, "caught_up": status.caught_up},
        }),
    ))
}

/// Body of maintenance routes.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Maintenance {
    /// `rebuild` (drop the tables and rebuild them from the ledger), `reindex` (rebuild the
    /// ANN indexes) or `sync` (wait until the tables hold every accepted event).
    action: String,
}

/// Rebuild the query tables, rebuild their indexes, or wait until they are current.
#[utoipa::path(post, path = "/v1/query", tag = "query",
    request_body = Maintenance,
    responses((status = 200, description = "Done"),
              (status = 401, description = "Missing or wrong bearer token", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn maintenance(
    state: AppState,
    headers: HeaderMap,
    request: Maintenance,
) -> Result<Response, ApiError> {
    state.authorize(&headers, true)?;
    let query = &state.node().query;
    let detail = match request.action.as_str() {
        "rebuild" => {
            query.rebuild().await?;
            json!(null)
        }
        "reindex" => json!(query.reindex().await?),
        "sync" => {
            query.sync(std::time::Duration::from_secs(600)).await?;
            json!(null)
        }
        other => {
            return Err(ApiError::bad_request(
                "invalid_action",
                format!("action `{other}` is not rebuild, reindex or sync"),
            ));
        }
    };
    let status = query.status()?;
    Ok(json(
        StatusCode::OK,
        &json!({"action": request.action, "detail": detail, "applied": status.applied, "ledger_size": status.ledger_size}),
    ))
}

/// Body of `POST /v1/export`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExportRequest {
    /// Absolute directory on the node's machine.
    dir: String,
    /// `parquet` (the only format).
    format: Option<String>,
}

/// Write every query table as Parquet to a directory on the node's machine.
#[utoipa::path(post, path = "/v1/export", tag = "query",
    request_body = ExportRequest,
    responses((status = 200, description = "{tables: [{name, rows, file}]}"),
              (status = 400, description = "Not an absolute path, or another format", body = super::error::ErrorBody),
              (status = 401, description = "Missing or wrong bearer token", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn export(
    state: AppState,
    headers: HeaderMap,
    request: ExportRequest,
) -> Result<Response, ApiError> {
    state.authorize(&headers, true)?;
    if request.format.as_deref().unwrap_or("parquet") != "parquet" {
        return Err(ApiError::bad_request(
            "invalid_format",
            "only parquet export is supported",
        ));
    }
    let dir = std::path::PathBuf::from(&request.dir);
    if !dir.is_absolute() || request.dir.contains('\0') {
        return Err(ApiError::bad_request(
            "invalid_path",
            "`dir` must be an absolute path",
        ));
    }
    let query = &state.node().query;
    query.sync(std::time::Duration::from_secs(600)).await?;
    let written = query.export_parquet(&dir).await?;
    let tables: Vec<Value> = written
        .into_iter()
        .map(|(name, rows)| {
            let file = dir.join(format!("{name}.parquet")).display().to_string();
            json!({"name": name, "rows": rows, "file": file})
        })
        .collect();
    Ok(json(StatusCode::OK, &json!({"tables": tables})))
}

/// Body of `POST /v1/embeddings` (OpenAI's shape; fields this node does not use are ignored).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct EmbeddingsRequest {
    /// A text, or an array of at most 64 texts.
    #[schema(value_type = Object)]
    input: Value,
    /// `all-MiniLM-L6-v2` (also accepted: `sentence-transformers/all-MiniLM-L6-v2` and the
    /// model id with its hash). Default: the node's model.
    model: Option<String>,
    /// `float` (default) or `base64` (little-endian f32).
    encoding_format: Option<String>,
}

/// Sentence embeddings of texts with the node's model, in OpenAI's format (any OpenAI client
/// pointed at `http://node/v1` works): the vectors agents put in a publish.
#[utoipa::path(post, path = "/v1/embeddings", tag = "query",
    request_body = EmbeddingsRequest,
    responses(
        (status = 200, description = "{object: list, data: [{object: embedding, embedding, index}], model, usage: {prompt_tokens, total_tokens}}"),
        (status = 400, description = "invalid_input (empty, blank, over 16 KiB, not a string), too_many_inputs (over 64), unknown_model, invalid_encoding_format", body = super::error::ErrorBody),
        (status = 503, description = "no_embed_model: the node has no model installed; too_many_queries", body = super::error::ErrorBody),
    ))]
pub(crate) async fn embeddings(
    state: AppState,
    headers: HeaderMap,
    request: EmbeddingsRequest,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let query = &state.node().query;
    if let (Some(asked), Some(ours)) = (request.model.as_deref(), query.embed_model()) {
        let name = meshnode_embed::MODEL_NAME;
        let known = [name, ours, "sentence-transformers/all-MiniLM-L6-v2"];
        if !known.iter().any(|k| k.eq_ignore_ascii_case(asked)) {
            return Err(ApiError::bad_request(
                "unknown_model",
                format!(
                    "this node embeds with {name} ({ours}) only; ask for that model, not `{}`",
                    asked.chars().take(80).collect::<String>()
                ),
            ));
        }
    }
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_encoding_format",
                format!(
                    "encoding_format `{}`: use float or base64",
                    other.chars().take(40).collect::<String>()
                ),
            ));
        }
    };
    let texts = embedding_inputs(request.input)?;
    let embedded = query.embed(texts).await?;
    let data: Vec<Value> = embedded
        .vectors
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(data_encoding::BASE64.encode(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "embedding": embedding, "index": index})
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": meshnode_embed::MODEL_NAME,
            "usage": {"prompt_tokens": embedded.tokens, "total_tokens": embedded.tokens},
        }),
    ))
}

/// `input` as texts: a string or an array of strings (token arrays are not taken).
fn embedding_inputs(input: Value) -> Result<Vec<String>, ApiError> {
    let invalid = |what: &str| {
        ApiError::bad_request(
            "invalid_input",
            format!("input must be a text or an array of texts; {what}"),
        )
    };
    match input {
        Value::String(text) => Ok(vec![text]),
        Value::Array(items) => {
            if items.len() > meshnode_query::EMBED_INPUTS_MAX {
                return Err(ApiError::bad_request(
                    "too_many_inputs",
                    format!(
                        "{} texts, at most {} per request",
                        items.len(),
                        meshnode_query::EMBED_INPUTS_MAX
                    ),
                ));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(text) => Ok(text),
                    _ => Err(invalid(&format!(
                        "item {i} is not a string (token arrays are not taken)"
                    ))),
                })
                .collect()
        }
        _ => Err(invalid("got another JSON type")),
    }
}
