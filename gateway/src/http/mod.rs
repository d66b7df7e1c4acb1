//! The HTTP API (DESIGN.md §8): warp routes, shared state, auth, errors, server.

mod blobs;
pub mod error;
pub mod metrics;
mod openapi;
mod ops;
mod pins;
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

#[derive(Clone)]
struct BytesWeighter;

impl Weighter<BlobHash, Bytes> for BytesWeighter {
    fn weight(&self, _key: &BlobHash, value: &Bytes) -> u64 {
        // Count a fixed overhead so that many empty blobs still have a bound.
        value.len() as u64 + 64
    }
}

type BlobCache = quick_cache::sync::Cache<BlobHash, Bytes, BytesWeighter>;

struct StateInner {
    node: Arc<Node>,
    metrics: Arc<Metrics>,
    /// Verified bytes of small blobs. Blobs are immutable, so a hit is always correct; the
    /// cache is cleared after GC so that deleted blobs stop being served.
    cache: BlobCache,
    ready: AtomicBool,
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
                ready: AtomicBool::new(false),
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
    let pin_put =
        warp::path!("v1" / "pins" / String)
            .and(warp::put())
            .and(s())
            .and(headers())
            .then(|id: String, state, headers| async move {
                respond(pins::put(state, id, headers).await)
            })
            .boxed();
    let pin_delete = warp::path!("v1" / "pins" / String)
        .and(warp::delete())
        .and(s())
        .and(headers())
        .then(|id: String, state, headers| async move {
            respond(pins::delete(state, id, headers).await)
        })
        .boxed();
    let pin_list = warp::path!("v1" / "pins")
        .and(warp::get())
        .and(s())
        .and(headers())
        .then(|state, headers| async move { respond(pins::list(state, headers).await) })
        .boxed();
    let gc = warp::path!("v1" / "gc")
        .and(warp::post())
        .and(s())
        .and(headers())
        .then(|state, headers| async move { respond(ops::gc(state, headers).await) })
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
        .then(|state| async move { ops::metrics(state).await })
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

    blob_upload
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
fn json(status: http::StatusCode, value: &impl serde::Serialize) -> Response {
    warp::reply::with_status(warp::reply::json(value), status).into_response()
}
