//! Operational routes: health, readiness, metrics, status, GC.

use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use serde::Serialize;
use warp::Reply;
use warp::reply::Response;

use super::{ApiError, AppState, json};
use crate::node::Node;

/// Answer of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Health {
    /// `ok`, `ready` or `starting`.
    status: &'static str,
}

/// Answer of `GET /v1/status`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Status {
    /// The node's public key (hex); also its iroh endpoint id.
    node: String,
    /// The network id: hash of the genesis document (hex).
    net: String,
    /// The network name from the genesis document.
    network: String,
    /// meshnode version.
    version: &'static str,
    /// Seconds since the node started.
    uptime_secs: u64,
    /// Number of pinned blobs.
    pins: u64,
    /// Corrupt blobs detected since start.
    blobs_corrupt: u64,
    /// Accepted events (transparency-log size).
    events: u64,
    /// Events waiting for their prev or deps.
    pending: u64,
    /// Total token supply: uncontested mints (= the sum of spendable balances).
    #[schema(value_type = u64)]
    #[serde(serialize_with = "super::serialize_amount")]
    supply: u128,
    /// Hash over all derived state (hex): equal on every node that holds the same events,
    /// whatever the order they arrived in.
    state_digest: String,
    /// Query tables: events materialized, and whether they caught up since start.
    #[schema(value_type = Object)]
    query: serde_json::Value,
    /// Garbage collection: finished runs, failures, the last error, and whether the blob
    /// collector stopped (after an error; a restart resumes it).
    #[schema(value_type = Object)]
    gc: serde_json::Value,
    /// This node's ticket (give it to `meshnode peer add` on another node); null before the
    /// peer-to-peer endpoint runs.
    ticket: Option<String>,
    /// Peers: known, connected, and events of theirs not read yet (sum over peers).
    #[schema(value_type = Object)]
    peers: serde_json::Value,
}

/// Answer of `POST /v1/gc`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct GcDone {
    deleted: u64,
    kept: u64,
}

/// Liveness: the process answers HTTP.
#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "Alive", body = Health)))]
pub(crate) fn healthz() -> Response {
    json(StatusCode::OK, &Health { status: "ok" })
}

/// Readiness: the node finished starting and serves requests.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, description = "Ready", body = Health),
              (status = 503, description = "Still starting", body = Health)))]
pub(crate) fn readyz(state: AppState) -> Response {
    if state.is_ready() {
        json(StatusCode::OK, &Health { status: "ready" })
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            &Health { status: "starting" },
        )
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Metrics", content_type = "text/plain", body = String)))]
pub(crate) async fn metrics(state: AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    // Metrics are a read: public only when reads are.
    state.authorize(&headers, false)?;
    let store = &state.node().store;
    state.metrics().blobs_corrupt.set(store.n_corrupt() as i64);
    if let Ok(pins) = state.pins_count().await {
        state.metrics().pins.set(pins as i64);
    }
    let ledger = &state.node().ledger;
    if let Ok(size) = ledger.tree_size() {
        state.metrics().ledger_events.set(size as i64);
    }
    state
        .metrics()
        .ledger_pending
        .set(ledger.n_pending() as i64);
    state
        .metrics()
        .blobs_hosted
        .set(blobs_hosted(state.node()).await as i64);
    let gc = store.gc_health();
    state.metrics().gc_runs.set(gc.runs as i64);
    state.metrics().gc_failures.set(gc.failures as i64);
    state.metrics().gc_stopped.set(i64::from(gc.stopped));
    if let Some(mesh) = state.node().mesh.get() {
        let family = &state.metrics().peers;
        family.clear();
        for p in mesh.peers() {
            let values: [(&'static str, u64); 10] = [
                ("connected", u64::from(p.connected)),
                ("behind", p.behind),
                ("heads_behind", p.heads_behind.unwrap_or(0)),
                ("doc_sessions", p.doc_sessions),
                ("doc_round_trips", p.doc_round_trips),
                ("events_in", p.events_in),
                ("bytes_in", p.bytes_in),
                ("bytes_out", p.bytes_out),
                ("score", u64::from(p.score)),
                ("banned", u64::from(p.banned_until_ms.is_some())),
            ];
            for (what, value) in values {
                let labels = super::metrics::PeerLabels {
                    peer: p.id.clone(),
                    what,
                };
                family
                    .get_or_create(&labels)
                    .set(i64::try_from(value).unwrap_or(i64::MAX));
            }
        }
    }
    if let Some(w) = state.node().query.workers() {
        let m = state.metrics();
        m.query_workers_started.set(w.started as i64);
        m.query_workers_ended.set(w.ended as i64);
        m.query_workers_killed.set(w.killed_at_deadline as i64);
    }
    Ok(warp::reply::with_header(
        state.metrics().encode(),
        http::header::CONTENT_TYPE,
        "text/plain; version=0.0.4; charset=utf-8",
    )
    .into_response())
}

/// [`Node::blobs_hosted`] off the async workers (a recount reads every host row).
async fn blobs_hosted(node: &Arc<Node>) -> u64 {
    let node = node.clone();
    tokio::task::spawn_blocking(move || node.blobs_hosted())
        .await
        .unwrap_or(0)
}

/// Node identity and counters.
#[utoipa::path(get, path = "/v1/status", tag = "mesh",
    responses((status = 200, description = "Status", body = Status)))]
pub(crate) async fn status(state: AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let node = state.node();
    let pins = state.pins_count().await?;
    let hosted = blobs_hosted(node).await;
    Ok(json(
        StatusCode::OK,
        &Status {
            node: node.node.to_hex(),
            net: node.net.to_hex(),
            network: node.genesis.name.clone(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_secs: node.started.elapsed().as_secs(),
            pins,
            blobs_corrupt: node.store.n_corrupt(),
            events: node.ledger.tree_size()?,
            pending: node.ledger.n_pending() as u64,
            supply: node.ledger.supply()?,
            state_digest: hex::encode(node.ledger.state_digest()?.1),
            gc: {
                let gc = node.store.gc_health();
                serde_json::json!({
                    "runs": gc.runs,
                    "failures": gc.failures,
                    "last_error": gc.last_error,
                    "stopped": gc.stopped,
                })
            },
            ticket: node.mesh.get().map(|m| m.ticket().to_string()),
            peers: match node.mesh.get() {
                Some(mesh) => {
                    let peers = mesh.peers();
                    serde_json::json!({
                        "known": peers.len(),
                        "connected": peers.iter().filter(|p| p.connected).count(),
                        "banned": peers.iter().filter(|p| p.banned_until_ms.is_some()).count(),
                        "behind": peers.iter().map(|p| p.behind).sum::<u64>(),
                        "heads_behind": peers.iter().filter_map(|p| p.heads_behind).max().unwrap_or(0),
                        "blobs_hosted": hosted,
                    })
                }
                None => serde_json::Value::Null,
            },
            query: match node.query.status() {
                Ok(q) => serde_json::json!({
                    "applied": q.applied,
                    "caught_up": q.caught_up,
                    "idle_permits": node.query.idle_permits(),
                    "embed_model": node.query.embed_model(),
                    "workers": node.query.workers().map(|w| serde_json::json!({
                        "started": w.started,
                        "ended": w.ended,
                        "killed_at_deadline": w.killed_at_deadline,
                        "idle": w.idle,
                    })),
                }),
                Err(e) => serde_json::json!({"error": e.to_string()}),
            },
        },
    ))
}

/// Run garbage collection now: deletes blobs that nothing pins or references.
#[utoipa::path(post, path = "/v1/gc", tag = "blobs",
    responses((status = 200, description = "GC finished", body = GcDone),
              (status = 401, description = "Missing or wrong bearer token", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn gc(state: AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    state.authorize(&headers, true)?;
    let report = state.node().store.gc().await?;
    state.inner.cache.clear();
    Ok(json(
        StatusCode::OK,
        &GcDone {
            deleted: report.n_deleted,
            kept: report.n_kept,
        },
    ))
}
