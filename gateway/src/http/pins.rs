//! Pin routes: pin, unpin, list.

use std::collections::HashMap;

use http::{HeaderMap, StatusCode};
use meshnode_schemas::BlobHash;
use serde::Serialize;
use warp::reply::Response;

use super::ledger::page_query;
use super::{ApiError, AppState, json, parse_hash};

/// A pin's state after a pin or unpin.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct PinState {
    hash: String,
    cid: String,
    pinned: bool,
}

/// One pinned blob.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct PinEntry {
    hash: String,
    cid: String,
    /// Size in bytes; `null` if the blob is currently missing (e.g. quarantined).
    size: Option<u64>,
}

/// Answer of `GET /v1/pins`: a page of pins in hash order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct PinList {
    pins: Vec<PinEntry>,
    /// Pass as `after` for the next page (the hash of the last pin, hex); `null` on the last
    /// page.
    next: Option<String>,
}

/// Pin a stored blob: GC never removes it. Durable on return.
#[utoipa::path(put, path = "/v1/pins/{hash}", tag = "pins",
    params(("hash" = String, Path, description = "BLAKE3 hex or CIDv1")),
    responses(
        (status = 200, description = "Pinned", body = PinState),
        (status = 401, description = "Missing or wrong bearer token", body = super::error::ErrorBody),
        (status = 404, description = "Blob not stored here", body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn put(
    state: AppState,
    id: String,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, true)?;
    let hash = parse_hash(&id)?;
    state.node().store.pin(&hash).await?;
    state.pins_changed();
    Ok(json(
        StatusCode::OK,
        &PinState {
            hash: hash.to_hex(),
            cid: hash.to_cid(),
            pinned: true,
        },
    ))
}

/// Remove a pin. The blob stays until a GC run finds nothing else referencing it.
#[utoipa::path(delete, path = "/v1/pins/{hash}", tag = "pins",
    params(("hash" = String, Path, description = "BLAKE3 hex or CIDv1")),
    responses(
        (status = 200, description = "Unpinned", body = PinState),
        (status = 401, description = "Missing or wrong bearer token", body = super::error::ErrorBody),
        (status = 404, description = "Was not pinned", body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn delete(
    state: AppState,
    id: String,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, true)?;
    let hash = parse_hash(&id)?;
    let was_pinned = state.node().store.unpin(&hash).await?;
    state.pins_changed();
    if !was_pinned {
        return Err(ApiError::not_found(
            "not_pinned",
            format!("blob {hash} is not pinned"),
        ));
    }
    Ok(json(
        StatusCode::OK,
        &PinState {
            hash: hash.to_hex(),
            cid: hash.to_cid(),
            pinned: false,
        },
    ))
}

/// List pinned blobs, paged in hash order.
#[utoipa::path(get, path = "/v1/pins", tag = "pins",
    params(("limit" = Option<usize>, Query, description = "At most this many (1 to 1000, larger is clamped; default 100)"),
           ("after" = Option<String>, Query, description = "The `next` of the previous page: pins whose hash (BLAKE3 hex) is after this one")),
    responses((status = 200, description = "A page of pins in hash order, and `next`: the cursor of the next page or null", body = PinList),
              (status = 400, description = "Bad limit (`invalid_query`) or cursor (`invalid_cursor`)", body = super::error::ErrorBody)))]
pub(crate) async fn list(
    state: AppState,
    query: HashMap<String, String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let (limit, after) = page_query(&query, BlobHash::from_hex)?;
    let store = &state.node().store;
    let (hashes, next) = store.pins_page(after, limit).await?;
    let mut pins = Vec::with_capacity(hashes.len());
    for hash in hashes {
        let size = store
            .stat(&hash)
            .await?
            .filter(|s| s.complete)
            .map(|s| s.size);
        pins.push(PinEntry {
            hash: hash.to_hex(),
            cid: hash.to_cid(),
            size,
        });
    }
    Ok(json(
        StatusCode::OK,
        &PinList {
            pins,
            next: next.map(|h| h.to_hex()),
        },
    ))
}
