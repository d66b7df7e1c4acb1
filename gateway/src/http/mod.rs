//! The HTTP API (DESIGN.md §8): warp routes, shared state, auth, errors, server.

mod audit_job;
mod blobs;
mod body;
pub mod error;
mod ledger;
pub mod metrics;
mod openapi;
mod ops;
mod peers;
mod pins;
mod query;
pub mod server;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::HeaderMap;
use meshnode_schemas::BlobHash;
use quick_cache::Weighter;
use warp::Filter;
use warp::Reply;
use warp::reply::Response;

pub use blobs::parse_range;
pub use error::ApiError;
pub use metrics::Metrics;
pub use openapi::openapi_json;

use crate::node::Node;

/// A small blob's verified bytes with its response headers, ready to serve.
#[derive(Clone)]
pub(crate) struct CachedBlob {
    pub(crate) bytes: Bytes,
    pub(crate) etag: http::HeaderValue,
    pub(crate) cid: http::HeaderValue,
}

#[derive(Clone)]
pub(crate) struct BytesWeighter;

impl Weighter<BlobHash, CachedBlob> for BytesWeighter {
    fn weight(&self, _key: &BlobHash, value: &CachedBlob) -> u64 {
        // Count a fixed overhead so that many empty blobs still have a bound.
        value.bytes.len() as u64 + 256
    }
}

pub(crate) type BlobCache = quick_cache::sync::Cache<BlobHash, CachedBlob, BytesWeighter>;

struct StateInner {
    node: Arc<Node>,
    metrics: Arc<Metrics>,
    /// Verified bytes of small blobs. Blobs are immutable, so a hit is always correct; the
    /// cache is cleared after GC so that deleted blobs stop being served.
    cache: BlobCache,
    /// The store's GC generation the cache was last checked against.
    cache_generation: std::sync::atomic::AtomicU64,
    ready: AtomicBool,
    /// Audits: one at a time, detached from requests, results reused (see `audit_job`).
    audits: audit_job::Audits,
    /// SQL answers being encoded at once (each takes a few times its 16 MiB cap).
    encodings: tokio::sync::Semaphore,
    /// The number of pins, counted at most every [`PINS_COUNT_TTL`] (listing every pin per
    /// `/v1/status` or `/metrics` request would cost O(pins) each).
    pins_count: tokio::sync::Mutex<Option<(std::time::Instant, u64, u64)>>,
    /// Bumped by every pin change made through this node (a cached count of another
    /// generation is not reused).
    pins_generation: std::sync::atomic::AtomicU64,
}

/// Everything a request handler needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

impl AppState {
    /// Builds the state for a node.
    pub fn new(node: Arc<Node>, metrics: Arc<Metrics>) -> Self {
        let limits = &node.config.limits;
        let capacity = limits.cache_bytes_max.max(1);
        let estimated_items = (capacity / 1024).clamp(16, 1 << 20) as usize;
        let cache = BlobCache::with_weighter(estimated_items, capacity, BytesWeighter);
        Self {
            inner: Arc::new(StateInner {
                node,
                metrics,
                cache,
                cache_generation: std::sync::atomic::AtomicU64::new(0),
                ready: AtomicBool::new(false),
                audits: audit_job::Audits::default(),
                encodings: tokio::sync::Semaphore::new(4),
                pins_count: tokio::sync::Mutex::new(None),
                pins_generation: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// The node.
    pub fn node(&self) -> &Arc<Node> {
        &self.inner.node
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The cache of small blobs, emptied first if any GC pass (scheduled or not) ran since
    /// the last look: a deleted blob must stop being served.
    pub(crate) fn cache(&self) -> &BlobCache {
        let now = self.inner.node.store.gc_generation();
        if self.inner.cache_generation.swap(now, Ordering::AcqRel) != now {
            self.inner.cache.clear();
        }
        &self.inner.cache
    }

    /// The number of pins, recounted at most every [`PINS_COUNT_TTL`]; concurrent callers
    /// wait for one count.
    pub(crate) async fn pins_count(&self) -> Result<u64, ApiError> {
        let mut cached = self.inner.pins_count.lock().await;
        let generation = self.inner.pins_generation.load(Ordering::Acquire);
        if let Some((at, n, g)) = *cached
            && at.elapsed() < PINS_COUNT_TTL
            && g == generation
        {
            return Ok(n);
        }
        let n = self.inner.node.store.pins().await?.len() as u64;
        *cached = Some((std::time::Instant::now(), n, generation));
        Ok(n)
    }

    /// Forgets the pins count (after a pin, an unpin or a pinned upload through this node).
    pub(crate) fn pins_changed(&self) {
        self.inner.pins_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Marks the node ready (or not) for `/readyz`.
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Release);
    }

    fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Checks the bearer token: always for writes, for reads only if reads are not public.
    fn authorize(&self, headers: &HeaderMap, write: bool) -> Result<(), ApiError> {
        if !write && self.inner.node.config.public_reads {
            return Ok(());
        }
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "this route needs `Authorization: Bearer <token>`; the token is in \
                 <data-dir>/api-token",
            ));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        // Comparing BLAKE3 digests is constant-time (blake3::Hash's PartialEq).
        if blake3::hash(presented.as_bytes()) != blake3::hash(self.inner.node.token.as_bytes()) {
            return Err(ApiError::unauthorized(
                "wrong bearer token; use the one in <data-dir>/api-token",
            ));
        }
        Ok(())
    }
}

/// How long a count of the pins is reused.
const PINS_COUNT_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Free space below which a failed write is taken for a full disk.
const LOW_SPACE_BYTES: u64 = 16 << 20;

impl AppState {
    /// A failed write as `507 insufficient_storage` when the disk holding the data dir is
    /// (nearly) full, with what to do; other errors unchanged. `needed` is what the write
    /// tried to store (0 if unknown).
    pub(crate) fn on_write_error(&self, error: ApiError, needed: u64) -> ApiError {
        if !error.status.is_server_error() {
            return error;
        }
        match self.inner.node.store.free_bytes() {
            Ok(free) if free < LOW_SPACE_BYTES.max(needed.saturating_add(1 << 20)) => {
                tracing::warn!(free, "a write failed on a full disk: {}", error.message);
                ApiError::new(
                    http::StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient_storage",
                    format!(
                        "the node's disk is full ({free} bytes free): nothing of this request \
                         was kept. Free space (unpin blobs and run GC, or grow the disk), then \
                         retry"
                    ),
                )
            }
            _ => error,
        }
    }
}

/// Turns the result of a write into a response, a failure on a full disk as a 507.
fn respond_write(state: &AppState, result: Result<Response, ApiError>) -> Response {
    respond(result.map_err(|e| state.on_write_error(e, 0)))
}

/// Turns a handler result into a response.
fn respond(result: Result<Response, ApiError>) -> Response {
    match result {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

fn with_state(state: AppState) -> impl Filter<Extract = (AppState,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// Checks the bearer token before anything of the body is read: an unauthorized client
/// cannot make the node buffer a body or hold a connection while it trickles one.
fn authorized(
    state: AppState,
    write: bool,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::header::headers_cloned()
        .and_then(move |headers: HeaderMap| {
            let state = state.clone();
            async move {
                state
                    .authorize(&headers, write)
                    .map_err(|e| warp::reject::custom(body::Denied(e)))
            }
        })
        .untuple_one()
}

/// Every route of the API, with JSON errors for anything that does not match.
pub fn routes(
    state: AppState,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    let s = || with_state(state.clone());
    let headers = warp::header::headers_cloned;

    let blob_upload = warp::path!("v1" / "blobs")
        .and(warp::post())
        .and(s())
        .and(headers())
        .and(warp::query::<blobs::UploadQuery>())
        .and(warp::body::stream())
        .then(|state, headers, query, body| async move {
            respond(blobs::upload(state, headers, query, body).await)
        })
        .boxed();
    let blob_get = warp::path!("v1" / "blobs" / String)
        .and(warp::get())
        .and(s())
        .and(headers())
        .then(|id: String, state, headers| async move {
            respond(blobs::get(state, id, headers, false).await)
        })
        .boxed();
    let blob_head =
        warp::path!("v1" / "blobs" / String)
            .and(warp::head())
            .and(s())
            .and(headers())
            .then(|id: String, state, headers| async move {
                respond(blobs::head(state, id, headers).await)
            })
            .boxed();
    let blob_fetch = warp::path!("v1" / "blobs" / String / "fetch")
        .and(warp::post())
        .and(s())
        .and(headers())
        .then(|id: String, state, headers| async move {
            respond(blobs::fetch(state, id, headers).await)
        })
        .boxed();
    let pin_put = warp::path!("v1" / "pins" / String)
        .and(warp::put())
        .and(s())
        .and(headers())
        .then(|id: String, state: AppState, headers| async move {
            {
                let st: AppState = state.clone();
                respond_write(&st, pins::put(state, id, headers).await)
            }
        })
        .boxed();
    let pin_delete = warp::path!("v1" / "pins" / String)
        .and(warp::delete())
        .and(s())
        .and(headers())
        .then(|id: String, state: AppState, headers| async move {
            {
                let st: AppState = state.clone();
                respond_write(&st, pins::delete(state, id, headers).await)
            }
        })
        .boxed();
    let pin_list = warp::path!("v1" / "pins")
        .and(warp::get())
        .and(s())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .and(headers())
        .then(
            |state, query, headers| async move { respond(pins::list(state, query, headers).await) },
        )
        .boxed();
    let gc = warp::path!("v1" / "gc")
        .and(warp::post())
        .and(s())
        .and(headers())
        .then(|state: AppState, headers| async move {
            {
                let st: AppState = state.clone();
                respond_write(&st, ops::gc(state, headers).await)
            }
        })
        .boxed();
    let status = warp::path!("v1" / "status")
        .and(warp::get())
        .and(s())
        .and(headers())
        .then(|state, headers| async move { respond(ops::status(state, headers).await) })
        .boxed();
    let healthz = warp::path!("healthz")
        .and(warp::get().or(warp::head()).unify())
        .map(ops::healthz)
        .boxed();
    let readyz = warp::path!("readyz")
        .and(warp::get().or(warp::head()).unify())
        .and(s())
        .map(ops::readyz)
        .boxed();
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(s())
        .and(headers())
        .then(|state, headers| async move { respond(ops::metrics(state, headers).await) })
        .boxed();
    let event_limit = meshnode_schemas::limits::EVENT_BYTES_MAX as u64 + 1024;
    let body_deadline =
        std::time::Duration::from_millis(state.node().config.server.body_timeout_ms.max(1));
    let events_post = warp::path!("v1" / "events")
        .and(warp::post())
        .and(authorized(state.clone(), true))
        .and(s())
        .and(headers())
        .and(body::bounded(event_limit, body_deadline))
        .then(|state: AppState, headers, body| async move {
            {
                let st: AppState = state.clone();
                respond_write(&st, ledger::submit(state, headers, body).await)
            }
        })
        .boxed();
    let events_own = warp::path!("v1" / "events" / "own")
        .and(warp::post())
        .and(authorized(state.clone(), true))
        .and(s())
        .and(headers())
        .and(body::json::<ledger::OwnEvent>(
            state.node().config.limits.json_bytes_max,
            body_deadline,
        ))
        .then(|state: AppState, headers, request| async move {
            let st: AppState = state.clone();
            respond_write(&st, ledger::submit_own(state, headers, request).await)
        })
        .boxed();
    let event_get = warp::path!("v1" / "events" / String)
        .and(warp::get())
        .and(s())
        .and(headers())
        .then(|id: String, state, headers| async move {
            respond(ledger::event(state, id, headers).await)
        })
        .boxed();
    let log = warp::path!("v1" / "logs" / String)
        .and(warp::get())
        .and(s())
        .and(warp::query::<ledger::LogQuery>())
        .and(headers())
        .then(|author: String, state, query, headers| async move {
            respond(ledger::log(state, author, query, headers).await)
        })
        .boxed();
    let account = warp::path!("v1" / "accounts" / String)
        .and(warp::get())
        .and(s())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .and(headers())
        .then(|key: String, state, query, headers| async move {
            respond(ledger::account(state, key, query, headers).await)
        })
        .boxed();
    let account_credits = warp::path!("v1" / "accounts" / String / "credits")
        .and(warp::get())
        .and(s())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .and(headers())
        .then(|key: String, state, query, headers| async move {
            respond(ledger::account_credits(state, key, query, headers).await)
        })
        .boxed();
    let account = account.or(account_credits).unify().boxed();
    let forks =
        warp::path!("v1" / "forks")
            .and(warp::get())
            .and(s())
            .and(warp::query::<std::collections::HashMap<String, String>>())
            .and(headers())
            .then(|state, query, headers| async move {
                respond(ledger::forks(state, query, headers).await)
            })
            .boxed();
    let checkpoint = warp::path!("v1" / "checkpoint")
        .and(warp::get())
        .and(s())
        .and(headers())
        .then(|state, headers| async move { respond(ledger::checkpoint(state, headers).await) })
        .boxed();
    let inclusion = warp::path!("v1" / "proofs" / "inclusion")
        .and(warp::get())
        .and(s())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .and(headers())
        .then(|state, query, headers| async move {
            respond(ledger::inclusion(state, query, headers).await)
        })
        .boxed();
    let consistency = warp::path!("v1" / "proofs" / "consistency")
        .and(warp::get())
        .and(s())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .and(headers())
        .then(|state, query, headers| async move {
            respond(ledger::consistency(state, query, headers).await)
        })
        .boxed();
    let audit = warp::path!("v1" / "audit")
        .and(warp::get())
        .and(s())
        .and(headers())
        .then(|state, headers| async move { respond(ledger::audit(state, headers).await) })
        .boxed();
    let json_limit = state.node().config.limits.json_bytes_max;
    let audit_export = warp::path!("v1" / "audit" / "export")
        .and(warp::post())
        .and(authorized(state.clone(), true))
        .and(s())
        .and(headers())
        .and(body::json::<ledger::ExportRequest>(
            json_limit,
            body_deadline,
        ))
        .then(|state: AppState, headers, request| async move {
            {
                let st: AppState = state.clone();
                respond_write(&st, ledger::audit_export(state, headers, request).await)
            }
        })
        .boxed();
    let skills = warp::path!("v1" / "skills")
        .and(warp::get())
        .and(s())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .and(headers())
        .then(|state, query, headers| async move {
            respond(ledger::skills(state, query, headers).await)
        })
        .boxed();
    let basins = warp::path!("v1" / "basins")
        .and(warp::get())
        .and(s())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .and(headers())
        .then(|state, query, headers| async move {
            respond(ledger::basins(state, query, headers).await)
        })
        .boxed();
    let basin = warp::path!("v1" / "basins" / String)
        .and(warp::get())
        .and(s())
        .and(headers())
        .then(|id: String, state, headers| async move {
            respond(ledger::basin(state, id, headers).await)
        })
        .boxed();
    let reputation = warp::path!("v1" / "reputation")
        .and(warp::get())
        .and(s())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .and(headers())
        .then(|state, query, headers| async move {
            respond(ledger::reputation(state, query, headers).await)
        })
        .boxed();
    let nodes =
        warp::path!("v1" / "nodes")
            .and(warp::get())
            .and(s())
            .and(warp::query::<std::collections::HashMap<String, String>>())
            .and(headers())
            .then(|state, query, headers| async move {
                respond(ledger::nodes(state, query, headers).await)
            })
            .boxed();
    let ledger_routes = events_own
        .or(events_post)
        .unify()
        .or(event_get)
        .unify()
        .or(log)
        .unify()
        .or(account)
        .unify()
        .or(forks)
        .unify()
        .or(checkpoint)
        .unify()
        .or(inclusion)
        .unify()
        .or(consistency)
        .unify()
        .or(audit)
        .unify()
        .or(audit_export)
        .unify()
        .or(skills)
        .unify()
        .or(basins)
        .unify()
        .or(basin)
        .unify()
        .or(reputation)
        .unify()
        .or(nodes)
        .unify()
        .boxed();
    let sql = warp::path!("v1" / "sql")
        .and(warp::post())
        .and(authorized(state.clone(), false))
        .and(s())
        .and(headers())
        .and(body::json::<query::SqlRequest>(json_limit, body_deadline))
        .then(|state, headers, request| async move {
            respond(query::sql(state, headers, request).await)
        })
        .boxed();
    let search = warp::path!("v1" / "search")
        .and(warp::post())
        .and(authorized(state.clone(), false))
        .and(s())
        .and(headers())
        .and(body::json::<query::SearchRequest>(
            json_limit,
            body_deadline,
        ))
        .then(|state, headers, request| async move {
            respond(query::search(state, headers, request).await)
        })
        .boxed();
    let embeddings = warp::path!("v1" / "embeddings")
        .and(warp::post())
        .and(authorized(state.clone(), false))
        .and(s())
        .and(headers())
        .and(body::json::<query::EmbeddingsRequest>(
            json_limit,
            body_deadline,
        ))
        .then(|state, headers, request| async move {
            respond(query::embeddings(state, headers, request).await)
        })
        .boxed();
    let tables = warp::path!("v1" / "tables")
        .and(warp::get())
        .and(s())
        .and(headers())
        .then(|state, headers| async move { respond(query::tables(state, headers).await) })
        .boxed();
    let maintenance = warp::path!("v1" / "query")
        .and(warp::post())
        .and(authorized(state.clone(), true))
        .and(s())
        .and(headers())
        .and(body::json::<query::Maintenance>(json_limit, body_deadline))
        .then(|state: AppState, headers, request| async move {
            {
                let st: AppState = state.clone();
                respond_write(&st, query::maintenance(state, headers, request).await)
            }
        })
        .boxed();
    let export = warp::path!("v1" / "export")
        .and(warp::post())
        .and(authorized(state.clone(), true))
        .and(s())
        .and(headers())
        .and(body::json::<query::ExportRequest>(
            json_limit,
            body_deadline,
        ))
        .then(|state: AppState, headers, request| async move {
            {
                let st: AppState = state.clone();
                respond_write(&st, query::export(state, headers, request).await)
            }
        })
        .boxed();
    let query_routes = sql
        .or(search)
        .unify()
        .or(embeddings)
        .unify()
        .or(tables)
        .unify()
        .or(maintenance)
        .unify()
        .or(export)
        .unify()
        .boxed();
    let openapi = warp::path!("openapi.json")
        .and(warp::get())
        .map(|| {
            warp::reply::with_header(
                openapi_json(),
                http::header::CONTENT_TYPE,
                "application/json",
            )
            .into_response()
        })
        .boxed();

    let json_limit = state.node().config.limits.json_bytes_max;
    let peer_list = warp::path!("v1" / "peers")
        .and(warp::get())
        .and(s())
        .and(headers())
        .then(|state, headers| async move { respond(peers::list(state, headers).await) })
        .boxed();
    let peer_add = warp::path!("v1" / "peers")
        .and(warp::post())
        .and(s())
        .and(headers())
        .and(body::json::<peers::AddPeer>(json_limit, body_deadline))
        .then(|state: AppState, headers, request| async move {
            let st = state.clone();
            respond_write(&st, peers::add(state, headers, request).await)
        })
        .boxed();
    let peer_remove = warp::path!("v1" / "peers" / String)
        .and(warp::delete())
        .and(s())
        .and(headers())
        .then(|id: String, state: AppState, headers| async move {
            let st = state.clone();
            respond_write(&st, peers::remove(state, id, headers).await)
        })
        .boxed();
    blob_upload
        .or(peer_list)
        .unify()
        .or(peer_add)
        .unify()
        .or(peer_remove)
        .unify()
        .or(blob_get)
        .unify()
        .or(blob_head)
        .unify()
        .or(blob_fetch)
        .unify()
        .or(pin_put)
        .unify()
        .or(pin_delete)
        .unify()
        .or(pin_list)
        .unify()
        .or(gc)
        .unify()
        .or(status)
        .unify()
        .or(healthz)
        .unify()
        .or(readyz)
        .unify()
        .or(metrics)
        .unify()
        .or(openapi)
        .unify()
        .or(ledger_routes)
        .unify()
        .or(query_routes)
        .unify()
        .recover(error::recover)
        .unify()
}

/// Parses a blob hash path segment (hex or CID) into a 400 on failure.
fn parse_hash(id: &str) -> Result<BlobHash, ApiError> {
    BlobHash::parse(id).map_err(|e| {
        let shown: String = id.chars().take(80).collect();
        ApiError::bad_request("invalid_id", format!("`{shown}` is not a blob hash: {e}"))
    })
}

/// A JSON response with a status.
/// An amount as a JSON integer. `serde_json::Value` holds at most a u64; a sum beyond that
/// (more than 2^64 base units, reachable only by recirculation) is written as a decimal
/// string rather than cut.
pub(crate) fn amount(value: u128) -> serde_json::Value {
    u64::try_from(value)
        .map(serde_json::Value::from)
        .unwrap_or_else(|_| serde_json::Value::String(value.to_string()))
}

/// Serializes an amount as [`amount`] does (for `#[serde(serialize_with)]`).
pub(crate) fn serialize_amount<S: serde::Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
    match u64::try_from(*v) {
        Ok(x) => s.serialize_u64(x),
        Err(_) => s.serialize_str(&v.to_string()),
    }
}

/// A signed sum (reputation) as a JSON integer, as [`amount`] does.
pub(crate) fn score(value: i128) -> serde_json::Value {
    i64::try_from(value)
        .map(serde_json::Value::from)
        .unwrap_or_else(|_| serde_json::Value::String(value.to_string()))
}

fn json(status: http::StatusCode, value: &impl serde::Serialize) -> Response {
    warp::reply::with_status(warp::reply::json(value), status).into_response()
}
