//! Blob routes: upload (streamed, capped), GET/HEAD with Range and ETag, fetch.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures::{Stream, StreamExt};
use http::{HeaderMap, StatusCode, header};
use meshnode_schemas::BlobHash;
use meshnode_store::PinMode;
use serde::{Deserialize, Serialize};
use warp::Reply;
use warp::reply::Response;

use super::{ApiError, AppState, json, parse_hash};

/// Reads up to this size are verified completely before the response starts, so that a
/// corrupt blob gets a clean error status; larger ones stream, verified piece by piece.
const BUFFERED_READ_BYTES_MAX: u64 = 1024 * 1024;

/// Size of the pieces blob bodies are streamed in (uploads to the store, downloads to the
/// socket).
const STREAM_CHUNK_BYTES: usize = 1024 * 1024;

/// Immutable content: cache for a year.
const CACHE_CONTROL: &str = "public, max-age=31536000, immutable";

/// Query of `POST /v1/blobs`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(crate) struct UploadQuery {
    /// Pin the blob (default true). Unpinned blobs are removed by the next GC unless
    /// something else references them.
    pin: Option<bool>,
}

/// Answer of `POST /v1/blobs`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct BlobAdded {
    /// BLAKE3 hash, lowercase hex.
    hash: String,
    /// CIDv1 (raw, blake3), base32.
    cid: String,
    /// Size in bytes.
    size: u64,
}

/// Answer of `POST /v1/blobs/{hash}/fetch`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct BlobFetched {
    hash: String,
    size: u64,
    /// Where the bytes came from: `local` if already stored.
    source: String,
}

/// Upload a blob (raw body, streamed into the store under the size cap).
#[utoipa::path(post, path = "/v1/blobs", tag = "blobs",
    params(UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored durably (and pinned unless pin=false)", body = BlobAdded),
        (status = 401, description = "Missing or wrong bearer token", body = super::error::ErrorBody),
        (status = 408, description = "body_timeout: the upload fell behind the transfer pace", body = super::error::ErrorBody),
        (status = 413, description = "Body larger than limits.blob_bytes_max", body = super::error::ErrorBody),
        (status = 507, description = "insufficient_storage: the disk is full; nothing was kept", body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn upload<S, B>(
    state: AppState,
    headers: HeaderMap,
    query: UploadQuery,
    body: S,
) -> Result<Response, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: Buf + Send + 'static,
{
    state.authorize(&headers, true)?;
    let limit = state.node().config.limits.blob_bytes_max;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = declared
        && length > limit
    {
        // Refuse before reading a byte; hyper closes the connection instead of draining it.
        return Err(ApiError::too_large(limit));
    }
    let pin = if query.pin.unwrap_or(true) {
        PinMode::Pin
    } else {
        PinMode::NoPin
    };
    let chunks = Box::pin(body.map(|item| {
        item.map(|mut buf| buf.copy_to_bytes(buf.remaining()))
            .map_err(std::io::Error::other)
    }));
    let too_slow = Arc::new(AtomicBool::new(false));
    let chunks = Box::pin(paced(chunks, Pace::of(&state), too_slow.clone()));
    // The store writes each piece it gets; give it large ones.
    let chunks = Box::pin(meshnode_store::coalesce(chunks, STREAM_CHUNK_BYTES));
    let stream = Box::pin(sync_wrapper::SyncStream::new(chunks));
    let added = match state.node().store.add_stream(stream, limit, pin).await {
        Ok(added) => added,
        Err(_) if too_slow.load(Ordering::Acquire) => {
            return Err(super::error::upload_too_slow(Pace::of(&state)));
        }
        Err(e) => return Err(state.on_write_error(e.into(), declared.unwrap_or(0))),
    };
    state.metrics().blob_bytes_added.inc_by(added.size);
    state.pins_changed();
    let mut response = json(
        StatusCode::CREATED,
        &BlobAdded {
            hash: added.hash.to_hex(),
            cid: added.hash.to_cid(),
            size: added.size,
        },
    );
    if let Ok(location) = http::HeaderValue::from_str(&format!("/v1/blobs/{}", added.hash)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// The slowest a blob transfer (upload or download) may go: a client that trickles cannot
/// hold a connection, an upload or a read of a blob open indefinitely. From
/// `server.transfer_rate_min` and `server.transfer_grace_ms`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pace {
    /// Bytes per second, on average since the start, once the grace period is over.
    rate: u64,
    /// Time before the rate applies; also the longest pause of an upload.
    grace: Duration,
}

impl Pace {
    pub(crate) fn of(state: &AppState) -> Self {
        let server = &state.node().config.server;
        Self {
            rate: server.transfer_rate_min.max(1),
            grace: Duration::from_millis(server.transfer_grace_ms.max(1)),
        }
    }

    /// When a transfer that started at `start` and moved `bytes` must have moved more.
    fn deadline(&self, start: tokio::time::Instant, bytes: u64) -> tokio::time::Instant {
        start + self.grace + Duration::from_secs_f64(bytes as f64 / self.rate as f64)
    }
}

/// Ends `body` with an error once it falls behind the pace: the next piece must arrive by
/// [`Pace::deadline`], and within the grace period of the previous one.
fn paced<S>(
    body: S,
    pace: Pace,
    too_slow: Arc<AtomicBool>,
) -> impl Stream<Item = std::io::Result<Bytes>>
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    let start = tokio::time::Instant::now();
    futures::stream::unfold((body, 0u64, false), move |(mut body, seen, done)| {
        let too_slow = too_slow.clone();
        async move {
            if done {
                return None;
            }
            // The average since the start, and no pause longer than the grace either (a fast
            // start banks no credit for a long stall).
            let by_rate = pace.deadline(start, seen);
            let deadline = by_rate.min(tokio::time::Instant::now() + pace.grace);
            match tokio::time::timeout_at(deadline, body.next()).await {
                Ok(Some(Ok(piece))) => {
                    let seen = seen + piece.len() as u64;
                    Some((Ok(piece), (body, seen, false)))
                }
                Ok(Some(Err(e))) => Some((Err(e), (body, seen, true))),
                Ok(None) => None,
                Err(_) => {
                    too_slow.store(true, Ordering::Release);
                    let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "upload too slow");
                    Some((Err(e), (body, seen, true)))
                }
            }
        }
    })
}

/// Ends a download whose client reads slower than the pace: the stream is polled when the
/// connection can take more, so a client that trickles its reads shows up as late polls.
/// (One that stops reading is cut by the write stall timeout. Socket buffers take a few MiB
/// early, so the cut comes that much later.)
fn read_paced(body: meshnode_store::ByteStream, pace: Pace) -> meshnode_store::ByteStream {
    let start = tokio::time::Instant::now();
    Box::pin(futures::stream::unfold(
        (body, 0u64),
        move |(mut body, sent)| async move {
            let allowed = pace.deadline(start, sent);
            if tokio::time::Instant::now() > allowed {
                tracing::debug!(sent, "download cut: the client reads too slowly");
                return None;
            }
            let piece = body.next().await?;
            let sent = sent + piece.as_ref().map_or(0, |b| b.len() as u64);
            Some((piece, (body, sent)))
        },
    ))
}

/// Download a blob, or a byte range of it, verified against its hash.
#[utoipa::path(get, path = "/v1/blobs/{hash}", tag = "blobs",
    params(("hash" = String, Path, description = "BLAKE3 hex or CIDv1 (bafkr4…)"),
           ("Range" = Option<String>, Header, description = "One byte range: bytes=a-b, a-, -n")),
    responses(
        (status = 200, description = "The blob", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The requested range", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 304, description = "If-None-Match matched the ETag"),
        (status = 400, description = "Not a hash or CID", body = super::error::ErrorBody),
        (status = 404, description = "Not stored here", body = super::error::ErrorBody),
        (status = 416, description = "Malformed or unsatisfiable Range", body = super::error::ErrorBody),
        (status = 503, description = "Failed verification, quarantined", body = super::error::ErrorBody),
    ))]
pub(crate) async fn get(
    state: AppState,
    id: String,
    headers: HeaderMap,
    head: bool,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let hash = parse_hash(&id)?;
    let etag = format!("\"{}\"", hash.to_hex());
    if if_none_match(&headers, &etag) {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        set_cache_headers(response.headers_mut(), &hash, &etag);
        return Ok(response);
    }
    let range_header = headers
        .get(header::RANGE)
        .map(|v| v.to_str().map(str::to_string).unwrap_or_default());

    let generation = state.node().store.gc_generation();
    if let Some(cached) = state.cache().get(&hash) {
        state.metrics().blob_cache_hits.inc();
        let size = cached.bytes.len() as u64;
        if range_header.is_none() && !head {
            // The common case, with headers prepared when the blob was cached.
            let mut response = Response::new(cached.bytes.clone().into());
            let headers = response.headers_mut();
            headers.insert(header::ETAG, cached.etag.clone());
            headers.insert(
                header::CACHE_CONTROL,
                http::HeaderValue::from_static(CACHE_CONTROL),
            );
            headers.insert("x-blob-cid", cached.cid.clone());
            headers.insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(
                header::ACCEPT_RANGES,
                http::HeaderValue::from_static("bytes"),
            );
            headers.insert(header::CONTENT_LENGTH, http::HeaderValue::from(size));
            return Ok(response);
        }
        let range = parse_range(range_header.as_deref(), size)?;
        let wanted = range.clone().unwrap_or(0..size);
        let body = cached
            .bytes
            .slice(wanted.start as usize..wanted.end as usize);
        return Ok(blob_response(&hash, &etag, size, range, head, body.into()));
    }

    if state.node().store.is_quarantined(&hash) {
        return Err(meshnode_store::Error::Quarantined(hash).into());
    }
    let stat = state
        .node()
        .store
        .stat(&hash)
        .await?
        .filter(|s| s.complete)
        .ok_or_else(|| ApiError::from(meshnode_store::Error::NotFound(hash)))?;
    let size = stat.size;
    let range = parse_range(range_header.as_deref(), size)?;
    if head {
        return Ok(blob_response(&hash, &etag, size, range, true, Body::Empty));
    }
    let read = state.node().store.read(&hash, range.clone()).await?;
    let length = read.range.end - read.range.start;
    if length <= BUFFERED_READ_BYTES_MAX {
        let bytes = meshnode_store::collect(read).await?;
        // Not if a GC pass ran meanwhile: it may have deleted what was just read.
        if range.is_none()
            && size <= state.node().config.limits.cache_blob_bytes_max
            && state.node().store.gc_generation() == generation
            && let (Ok(etag_value), Ok(cid)) = (
                http::HeaderValue::from_str(&etag),
                http::HeaderValue::from_str(&hash.to_cid()),
            )
        {
            state.cache().insert(
                hash,
                super::CachedBlob {
                    bytes: bytes.clone(),
                    etag: etag_value,
                    cid,
                },
            );
        }
        return Ok(blob_response(
            &hash,
            &etag,
            size,
            range,
            false,
            bytes.into(),
        ));
    }
    let stream = sync_wrapper::SyncStream::new(read_paced(read.stream, Pace::of(&state)));
    Ok(blob_response(
        &hash,
        &etag,
        size,
        range,
        false,
        Body::Stream(Box::new(stream)),
    ))
}

enum Body {
    Empty,
    Bytes(Bytes),
    Stream(Box<sync_wrapper::SyncStream<meshnode_store::ByteStream>>),
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Self {
        Body::Bytes(bytes)
    }
}

fn blob_response(
    hash: &BlobHash,
    etag: &str,
    size: u64,
    range: Option<Range<u64>>,
    head: bool,
    body: Body,
) -> Response {
    let mut response = match body {
        _ if head => Response::new(Default::default()),
        Body::Empty => Response::new(Default::default()),
        Body::Bytes(bytes) => Response::new(bytes.into()),
        Body::Stream(stream) => warp::reply::stream(*stream).into_response(),
    };
    let headers = response.headers_mut();
    set_cache_headers(headers, hash, etag);
    headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(
        header::ACCEPT_RANGES,
        http::HeaderValue::from_static("bytes"),
    );
    let length = match &range {
        Some(r) => {
            if let Ok(v) =
                http::HeaderValue::from_str(&format!("bytes {}-{}/{size}", r.start, r.end - 1))
            {
                headers.insert(header::CONTENT_RANGE, v);
            }
            r.end - r.start
        }
        None => size,
    };
    headers.insert(header::CONTENT_LENGTH, http::HeaderValue::from(length));
    if range.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    response
}

fn set_cache_headers(headers: &mut HeaderMap, hash: &BlobHash, etag: &str) {
    if let Ok(v) = http::HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, v);
    }
    headers.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static(CACHE_CONTROL),
    );
    if let Ok(v) = http::HeaderValue::from_str(&hash.to_cid()) {
        headers.insert("x-blob-cid", v);
    }
}

fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

/// Parses a `Range` header against a blob of `size` bytes. `None` means the whole blob: no
/// header, a unit other than `bytes` (RFC 9110 §14.2: ignore it; unit names are
/// case-insensitive), or several ranges (which a server may ignore). An end past the blob,
/// however large, is clamped to its last byte. A malformed or unsatisfiable single byte
/// range is a 416.
pub fn parse_range(value: Option<&str>, size: u64) -> Result<Option<Range<u64>>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let unsatisfiable = |why: &str| {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "range_not_satisfiable",
            format!(
                "Range `{}`: {why} (blob size {size})",
                value.chars().take(80).collect::<String>()
            ),
        )
        .with_header(header::CONTENT_RANGE, format!("bytes */{size}"))
    };
    let Some((unit, spec)) = value.trim().split_once('=') else {
        return Err(unsatisfiable("expected `bytes=start-end`"));
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Ok(None);
    }
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Err(unsatisfiable("expected `start-end`, `start-` or `-suffix`"));
    };
    let number = |s: &str| -> Result<u64, ApiError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(unsatisfiable("not a number"));
        }
        s.parse::<u64>()
            .map_err(|_| unsatisfiable("number too large"))
    };
    let (first, last) = (first.trim(), last.trim());
    let range = if first.is_empty() {
        let suffix = number(last)?;
        if suffix == 0 || size == 0 {
            return Err(unsatisfiable("empty suffix range"));
        }
        size.saturating_sub(suffix)..size
    } else {
        let start = number(first)?;
        let end_inclusive = if last.is_empty() {
            size.saturating_sub(1)
        } else if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
            // Any end past the blob means "to the end", even one beyond u64.
            last.parse::<u64>().unwrap_or(u64::MAX)
        } else {
            number(last)?
        };
        if end_inclusive < start {
            return Err(unsatisfiable("end before start"));
        }
        if start >= size {
            return Err(unsatisfiable("starts at or past the end"));
        }
        start..end_inclusive.min(size - 1) + 1
    };
    Ok(Some(range))
}

/// Size and headers of a blob without its bytes.
#[utoipa::path(head, path = "/v1/blobs/{hash}", tag = "blobs",
    params(("hash" = String, Path, description = "BLAKE3 hex or CIDv1 (bafkr4…)")),
    responses(
        (status = 200, description = "Stored here; Content-Length is its size"),
        (status = 400, description = "Not a hash or CID"),
        (status = 404, description = "Not stored here"),
    ))]
pub(crate) async fn head(
    state: AppState,
    id: String,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    get(state, id, headers, true).await
}

/// Make a blob available on this node: a no-op if it is stored here already, else fetched
/// from a peer that hosts it (verified as it streams in, durable and pinned on return).
#[utoipa::path(post, path = "/v1/blobs/{hash}/fetch", tag = "blobs",
    params(("hash" = String, Path, description = "BLAKE3 hex or CIDv1")),
    responses(
        (status = 200, description = "Available locally: `source` is `local` or the id of the peer it came from", body = BlobFetched),
        (status = 404, description = "not_available: not stored here and no peer served it (the message lists what was tried), or the peer-to-peer endpoint is not running", body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn fetch(
    state: AppState,
    id: String,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, true)?;
    let hash = parse_hash(&id)?;
    let node = state.node();
    if let Some(stat) = node.store.stat(&hash).await?
        && stat.complete
    {
        return Ok(json(
            StatusCode::OK,
            &BlobFetched {
                hash: hash.to_hex(),
                size: stat.size,
                source: "local".into(),
            },
        ));
    }
    let Some(mesh) = node.mesh.get() else {
        return Err(ApiError::not_found(
            "not_available",
            format!(
                "blob {hash} is not stored here and this node's peer-to-peer endpoint is not \
                 running (it starts with `meshnode serve`)"
            ),
        ));
    };
    match mesh.fetch_blob(&hash, u64::MAX).await {
        Ok(fetched) => Ok(json(
            StatusCode::OK,
            &BlobFetched {
                hash: hash.to_hex(),
                size: fetched.size,
                source: fetched.from,
            },
        )),
        Err(meshnode_sync::Error::NotFound(message)) => {
            Err(ApiError::not_found("not_available", message))
        }
        Err(other) => Err(ApiError::internal(other)),
    }
}
