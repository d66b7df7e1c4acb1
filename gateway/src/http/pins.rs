//! Pin routes: pin, unpin, list.

use http::{HeaderMap, StatusCode};
use serde::Serialize;
use warp::reply::Response;

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

/// Answer of `GET /v1/pins`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct PinList {
    pins: Vec<PinEntry>,
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
    if !state.node().store.unpin(&hash).await? {
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

/// List pinned blobs.
#[utoipa::path(get, path = "/v1/pins", tag = "pins",
    responses((status = 200, description = "Every pin, in hash order", body = PinList)))]
pub(crate) async fn list(state: AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let store = &state.node().store;
    let mut pins = Vec::new();
    for hash in store.pins().await? {
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
    Ok(json(StatusCode::OK, &PinList { pins }))
}
