//! `GET|POST /v1/peers`, `DELETE /v1/peers/{id}`: the peers this node replicates with.

use http::StatusCode;
use serde::Deserialize;
use warp::http::HeaderMap;
use warp::reply::Response;

use super::error::ApiError;
use super::{AppState, json};

/// `POST /v1/peers` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddPeer {
    /// A peer's ticket, as its `meshnode serve` prints and its `GET /v1/status` shows.
    ticket: String,
}

fn mesh(state: &AppState) -> Result<&meshnode_sync::Mesh, ApiError> {
    state.node().mesh.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_mesh",
            "this node's peer-to-peer endpoint is not running (it starts with `meshnode serve`)",
        )
    })
}

/// Known peers with their replication status.
#[utoipa::path(get, path = "/v1/peers", tag = "peers",
    responses((status = 200, description = "{ticket, peers: [{id, ticket, manual, connected, address, rtt_ms, last_sync_ms, cursor, behind, heads_behind, heads_authors, catalog_entries, catalog_missing, doc_sessions, doc_round_trips, events_in, requests, bytes_in, bytes_out, score, last_offence, banned_until_ms}]}")))]
pub(crate) async fn list(state: AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let mesh = mesh(&state)?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"ticket": mesh.ticket(), "peers": mesh.peers()}),
    ))
}

/// Adds a peer by ticket; it is remembered across restarts and replicated with at once.
#[utoipa::path(post, path = "/v1/peers", tag = "peers", request_body = AddPeer,
    responses((status = 201, description = "{id}"),
              (status = 400, description = "invalid_peer: not a ticket, this node's own, blocked, not allowed, or too many peers", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn add(
    state: AppState,
    headers: HeaderMap,
    request: AddPeer,
) -> Result<Response, ApiError> {
    state.authorize(&headers, true)?;
    let id = mesh(&state)?
        .add_peer(&request.ticket)
        .map_err(peer_error)?;
    Ok(json(StatusCode::CREATED, &serde_json::json!({"id": id})))
}

/// Forgets a peer.
#[utoipa::path(delete, path = "/v1/peers/{id}", tag = "peers",
    responses((status = 200, description = "{removed: true}"),
              (status = 404, description = "unknown_peer", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn remove(
    state: AppState,
    id: String,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, true)?;
    if mesh(&state)?.remove_peer(&id).map_err(peer_error)? {
        Ok(json(StatusCode::OK, &serde_json::json!({"removed": true})))
    } else {
        let shown: String = id.chars().take(80).collect();
        Err(ApiError::not_found(
            "unknown_peer",
            format!("no peer `{shown}`; GET /v1/peers lists them"),
        ))
    }
}

fn peer_error(e: meshnode_sync::Error) -> ApiError {
    match e {
        meshnode_sync::Error::InvalidPeer(m) => ApiError::bad_request("invalid_peer", m),
        other => ApiError::internal(other),
    }
}
