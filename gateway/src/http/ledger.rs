//! Ledger routes: submit events, read events and logs, accounts, forks, the transparency log,
//! audit, and the derived catalog (skills, basins, reputation, nodes).

use std::collections::HashMap;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use meshnode_ledger::{EventRecord, ForkProof, Status};
use meshnode_schemas::{AuthorKey, EventId};
use serde::Deserialize;
use serde_json::{Value, json};
use warp::Reply;
use warp::reply::Response;

use super::{ApiError, AppState, amount, json, score};
use crate::events_json::body_to_json;

/// Most log entries one request returns.
const LOG_PAGE_MAX: usize = 1000;

/// Items of a list page when the request names no `limit`.
pub(crate) const PAGE_DEFAULT: usize = 100;
/// Most items of a list page: a larger `limit` is clamped to it.
pub(crate) const PAGE_MAX: usize = 1000;

/// `?limit=N&after=CURSOR` of a list route: the page size (1..=[`PAGE_MAX`], default
/// [`PAGE_DEFAULT`]) and the key of the last item of the previous page, parsed by `cursor`
/// (items strictly after it are returned). 400 `invalid_query` for a bad limit, 400
/// `invalid_cursor` for a cursor `cursor` refuses.
pub(crate) fn page_query<C, E: std::fmt::Display>(
    query: &HashMap<String, String>,
    cursor: impl FnOnce(&str) -> Result<C, E>,
) -> Result<(usize, Option<C>), ApiError> {
    let limit = match query.get("limit").map(String::as_str) {
        None => PAGE_DEFAULT,
        Some(text) if !is_positive_integer(text) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!(
                    "`limit` must be an integer from 1 to {PAGE_MAX} (larger values are \
                     clamped to {PAGE_MAX}; default {PAGE_DEFAULT}), not `{}`",
                    text.chars().take(40).collect::<String>()
                ),
            ));
        }
        // Digits only, not zero; beyond u64 it is a very large limit, clamped as any other.
        Some(text) => text
            .parse::<u64>()
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .map_or(PAGE_MAX, |n| n.min(PAGE_MAX)),
    };
    debug_assert!((1..=PAGE_MAX).contains(&limit));
    let after = query
        .get("after")
        .map(|text| {
            cursor(text.as_str()).map_err(|e| {
                ApiError::bad_request(
                    "invalid_cursor",
                    format!(
                        "`after` must be the `next` cursor of the previous page (64 lowercase \
                         hex characters), not `{}`: {e}",
                        text.chars().take(80).collect::<String>()
                    ),
                )
            })
        })
        .transpose()?;
    Ok((limit, after))
}

/// Whether `text` is a decimal integer above zero (any number of digits).
fn is_positive_integer(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) && text.bytes().any(|b| b != b'0')
}

/// A list answer: the items under `key` and `next`, the cursor of the next page (`null` on
/// the last page).
fn page_json(key: &str, items: Vec<Value>, next: Option<String>) -> Response {
    let mut body = serde_json::Map::new();
    body.insert(key.to_string(), Value::Array(items));
    body.insert("next".to_string(), json!(next));
    json(StatusCode::OK, &Value::Object(body))
}

impl From<meshnode_ledger::Error> for ApiError {
    fn from(error: meshnode_ledger::Error) -> Self {
        use meshnode_ledger::Error as E;
        let code = error.code();
        match &error {
            E::Rejected { rule, message } => {
                use meshnode_ledger::RuleClass;
                let status = match rule.class() {
                    RuleClass::Malformed => StatusCode::BAD_REQUEST,
                    RuleClass::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                    RuleClass::Busy => StatusCode::SERVICE_UNAVAILABLE,
                    RuleClass::Broken => StatusCode::UNPROCESSABLE_ENTITY,
                };
                ApiError::new(status, code, message.clone())
            }
            E::NotFound(what) => ApiError::not_found("not_found", format!("{what} not found")),
            E::Invalid(message) => ApiError::bad_request("invalid_request", message.clone()),
            E::Unavailable(message) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                message.clone(),
            ),
            _ => ApiError::internal(error),
        }
    }
}

fn parse_event_id(text: &str) -> Result<EventId, ApiError> {
    EventId::from_hex(text).map_err(|e| {
        ApiError::bad_request(
            "invalid_id",
            format!(
                "`{}` is not an event id: {e}",
                text.chars().take(80).collect::<String>()
            ),
        )
    })
}

pub(crate) fn parse_key(text: &str) -> Result<AuthorKey, ApiError> {
    AuthorKey::from_hex(text).map_err(|e| {
        ApiError::bad_request(
            "invalid_id",
            format!(
                "`{}` is not a key: {e}",
                text.chars().take(80).collect::<String>()
            ),
        )
    })
}

fn record_json(record: &EventRecord) -> Value {
    json!({
        "id": record.id.to_hex(),
        "blob": record.envelope.to_hex(),
        "author": record.author.to_hex(),
        "seq": record.seq,
        "kind": record.kind.as_str(),
        "ts": record.ts,
        "prev": record.prev.map(|p| p.to_hex()),
        "deps": record.deps.iter().map(|d| d.to_hex()).collect::<Vec<_>>(),
        "index": record.index,
        "contested": record.contested,
    })
}

/// Submit a signed event envelope (DAG-CBOR bytes).
#[utoipa::path(post, path = "/v1/events", tag = "ledger",
    request_body(content = Vec<u8>, content_type = "application/cbor",
        description = "The envelope `{\"body\": bytes, \"sig\": bytes}` (docs/formats.md)"),
    responses(
        (status = 201, description = "Accepted and durable: {id, blob, seq, index, status}"),
        (status = 200, description = "Accepted before; the original result"),
        (status = 202, description = "Stored, waiting for its prev or deps: {id, blob, seq, status: pending, reason, missing}"),
        (status = 400, description = "Malformed, non-canonical, bad signature, wrong net", body = super::error::ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = super::error::ErrorBody),
        (status = 408, description = "body_timeout: the body did not arrive in time", body = super::error::ErrorBody),
        (status = 413, description = "Larger than 64 KiB", body = super::error::ErrorBody),
        (status = 507, description = "insufficient_storage: the disk is full; nothing was kept", body = super::error::ErrorBody),
        (status = 422, description = "Breaks a ledger rule; error.code names it", body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn submit(
    state: AppState,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.authorize(&headers, true)?;
    let result = state.node().ledger.submit(body).await;
    reply_submitted(&state, result)
}

/// `POST /v1/events/own` body: an event for the node to sign as itself.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct OwnEvent {
    /// Kind, e.g. `blob.host`, `token.mint` (DESIGN.md §3).
    kind: String,
    /// Payload as JSON, as `meshnode event --payload` takes it.
    #[schema(value_type = Object)]
    payload: serde_json::Value,
    /// Causal dependencies (EventIds, hex); each must be accepted here.
    #[serde(default)]
    deps: Vec<String>,
}

/// Appends an event to the node's own log, signed with the node key by the node (one at a
/// time: an event signed elsewhere with the node key could take the same seq and fork the
/// node's log).
#[utoipa::path(post, path = "/v1/events/own", tag = "ledger", request_body = OwnEvent,
    responses((status = 201, description = "Accepted: {id, blob, seq, index, status}"),
              (status = 400, description = "invalid_event: unknown kind, bad payload or deps", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn submit_own(
    state: AppState,
    headers: HeaderMap,
    request: OwnEvent,
) -> Result<Response, ApiError> {
    state.authorize(&headers, true)?;
    let invalid = |m: String| ApiError::bad_request("invalid_event", m);
    let kind = meshnode_schemas::Kind::parse(&request.kind).map_err(|e| invalid(e.to_string()))?;
    let payload = crate::events_json::payload_from_json(kind, &request.payload)
        .map_err(|e| invalid(format!("payload: {e}")))?;
    let mut deps = Vec::with_capacity(request.deps.len());
    for d in request
        .deps
        .iter()
        .take(meshnode_schemas::limits::DEPS_MAX + 1)
    {
        deps.push(EventId::from_hex(d).map_err(|e| invalid(format!("deps: {e}")))?);
    }
    let result = match state.node().append_own(deps, payload).await {
        Ok(submitted) => Ok(submitted),
        Err(e) => match e.downcast::<meshnode_ledger::Error>() {
            Ok(ledger) => Err(ledger),
            Err(other) => return Err(invalid(format!("{other:#}"))),
        },
    };
    reply_submitted(&state, result)
}

/// The answer to a submitted event, as `POST /v1/events` gives it.
fn reply_submitted(
    state: &AppState,
    result: Result<meshnode_ledger::Submitted, meshnode_ledger::Error>,
) -> Result<Response, ApiError> {
    let submitted = match result {
        Ok(s) => s,
        Err(e) => {
            state.metrics().events_rejected.inc();
            return Err(e.into());
        }
    };
    let mut value = json!({
        "id": submitted.id.to_hex(),
        "blob": submitted.blob.to_hex(),
        "seq": submitted.seq,
        "index": submitted.index,
    });
    let status = match &submitted.status {
        Status::Accepted => {
            state.metrics().events_accepted.inc();
            value["status"] = json!("accepted");
            StatusCode::CREATED
        }
        Status::Duplicate => {
            value["status"] = json!("accepted");
            value["duplicate"] = json!(true);
            StatusCode::OK
        }
        Status::Pending(w) => {
            value["status"] = json!("pending");
            value["reason"] = json!(w.reason);
            value["missing"] = json!(w.missing.iter().map(|m| m.to_hex()).collect::<Vec<_>>());
            StatusCode::ACCEPTED
        }
    };
    Ok(json(status, &value))
}

/// An accepted event: its record and decoded body.
#[utoipa::path(get, path = "/v1/events/{id}", tag = "ledger",
    params(("id" = String, Path, description = "EventId (hex)")),
    responses((status = 200, description = "The event"), (status = 404, description = "Not accepted here")))]
pub(crate) async fn event(
    state: AppState,
    id: String,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let id = parse_event_id(&id)?;
    let Some((record, event)) = state.node().ledger.event(&id).await? else {
        return Err(ApiError::not_found(
            "event_not_found",
            format!("event {id} is not accepted on this node"),
        ));
    };
    let mut value = record_json(&record);
    value["body"] = body_to_json(&event.body);
    value["sig"] = json!(hex::encode(event.sig));
    Ok(json(StatusCode::OK, &value))
}

#[derive(Debug, Deserialize)]
pub(crate) struct LogQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

/// An author's log, oldest first, paged by seq.
#[utoipa::path(get, path = "/v1/logs/{author}", tag = "ledger",
    params(("author" = String, Path, description = "Author key (hex)"),
           ("after" = Option<u64>, Query, description = "Return events with seq > after"),
           ("limit" = Option<usize>, Query, description = "At most this many (≤ 1000)")),
    responses((status = 200, description = "{author, head_seq, events}")))]
pub(crate) async fn log(
    state: AppState,
    author: String,
    query: LogQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let author = parse_key(&author)?;
    let limit = query.limit.unwrap_or(100).min(LOG_PAGE_MAX);
    let ledger = &state.node().ledger;
    let records = ledger.log(&author, query.after.unwrap_or(0), limit)?;
    let account = ledger.account_summary(&author)?;
    Ok(json(
        StatusCode::OK,
        &json!({
            "author": author.to_hex(),
            "head_seq": account.head_seq,
            "head_id": account.head_id.map(|h| h.to_hex()),
            "frozen_from": account.frozen_from,
            "events": records.iter().map(record_json).collect::<Vec<_>>(),
        }),
    ))
}

/// An account: spendable balance and what makes it up, with the first page of its
/// unreferenced credits.
#[utoipa::path(get, path = "/v1/accounts/{key}", tag = "ledger",
    params(("key" = String, Path, description = "Author key (hex)"),
           ("limit" = Option<usize>, Query, description = "At most this many unreferenced credits (1 to 1000, larger is clamped; default 1000)"),
           ("after" = Option<String>, Query, description = "Only credits with an EventId after this one (hex)")),
    responses((status = 200, description = "{key, balance, received, received_contested, sent, sent_contested, minted, unreferenced_credits, credits_next, head_seq, head_id, signing_key, frozen_from, reputation}: `unreferenced_credits` holds the first credits in EventId order; `credits_next` is the cursor to page on with GET /v1/accounts/{key}/credits?after=, null when they are all"),
              (status = 400, description = "Bad key, limit (`invalid_query`) or cursor (`invalid_cursor`)", body = super::error::ErrorBody)))]
pub(crate) async fn account(
    state: AppState,
    key: String,
    query: HashMap<String, String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let key = parse_key(&key)?;
    let (limit, after) = page_query(&query, EventId::from_hex)?;
    // Unpaged clients keep every credit of any account up to a page's maximum.
    let limit = if query.contains_key("limit") {
        limit
    } else {
        PAGE_MAX
    };
    let (a, credits_next) = state
        .node()
        .ledger
        .account_page(&key, after.as_ref(), limit)?;
    Ok(json(
        StatusCode::OK,
        &json!({
            "key": a.key.to_hex(),
            "balance": amount(a.balance),
            "received": amount(a.received),
            "received_contested": amount(a.received_contested),
            "sent": amount(a.sent),
            "sent_contested": amount(a.sent_contested),
            "minted": amount(a.minted),
            "unreferenced_credits": a.unreferenced_credits.iter().map(|c| c.to_hex()).collect::<Vec<_>>(),
            "credits_next": credits_next.map(|c| c.to_hex()),
            "head_seq": a.head_seq,
            "head_id": a.head_id.map(|h| h.to_hex()),
            "signing_key": a.signing_key.to_hex(),
            "frozen_from": a.frozen_from,
            "reputation": score(a.reputation),
        }),
    ))
}

/// An account's unreferenced credits, paged in EventId order.
#[utoipa::path(get, path = "/v1/accounts/{key}/credits", tag = "ledger",
    params(("key" = String, Path, description = "Author key (hex)"),
           ("limit" = Option<usize>, Query, description = "At most this many (1 to 1000, larger is clamped; default 100)"),
           ("after" = Option<String>, Query, description = "The `next` of the previous page: credits with an EventId after this one (hex)")),
    responses((status = 200, description = "{credits: [EventId hex], next: cursor of the next page or null}"),
              (status = 400, description = "Bad key, limit (`invalid_query`) or cursor (`invalid_cursor`)", body = super::error::ErrorBody)))]
pub(crate) async fn account_credits(
    state: AppState,
    key: String,
    query: HashMap<String, String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let key = parse_key(&key)?;
    let (limit, after) = page_query(&query, EventId::from_hex)?;
    let page = state
        .node()
        .ledger
        .unreferenced_credits(&key, after.as_ref(), limit)?;
    Ok(page_json(
        "credits",
        page.items.iter().map(|c| json!(c.to_hex())).collect(),
        page.next.map(|c| c.to_hex()),
    ))
}

fn fork_json(proof: &ForkProof) -> Value {
    let ids: Vec<String> = proof
        .envelopes
        .iter()
        .map(|e| {
            meshnode_schemas::SignedEvent::decode(e)
                .map(|s| s.id.to_hex())
                .unwrap_or_default()
        })
        .collect();
    json!({
        "author": proof.author.to_hex(),
        "seq": proof.seq,
        "signer": proof.signer.to_hex(),
        "ids": ids,
        "envelopes": proof.envelopes.iter().map(hex::encode).collect::<Vec<_>>(),
        "rotations": proof.rotations.iter().map(hex::encode).collect::<Vec<_>>(),
    })
}

/// Detected forks with self-contained proofs (two envelopes signed by the same key), paged in
/// order of the forked log's author key.
#[utoipa::path(get, path = "/v1/forks", tag = "ledger",
    params(("limit" = Option<usize>, Query, description = "At most this many (1 to 1000, larger is clamped; default 100)"),
           ("after" = Option<String>, Query, description = "The `next` of the previous page: forks of authors after this key (hex)")),
    responses((status = 200, description = "{forks: [{author, seq, signer, ids, envelopes, rotations}], next: cursor of the next page or null}"),
              (status = 400, description = "Bad limit (`invalid_query`) or cursor (`invalid_cursor`)", body = super::error::ErrorBody)))]
pub(crate) async fn forks(
    state: AppState,
    query: HashMap<String, String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let (limit, after) = page_query(&query, AuthorKey::from_hex)?;
    let page = state.node().ledger.forks_page(after.as_ref(), limit)?;
    Ok(page_json(
        "forks",
        page.items.iter().map(fork_json).collect(),
        page.next.map(|k| k.to_hex()),
    ))
}

/// The latest signed checkpoint (C2SP signed note).
#[utoipa::path(get, path = "/v1/checkpoint", tag = "ledger",
    responses((status = 200, description = "origin, size and base64 root, signed", content_type = "text/plain", body = String)))]
pub(crate) async fn checkpoint(state: AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    Ok(warp::reply::with_header(
        state.node().ledger.checkpoint(),
        http::header::CONTENT_TYPE,
        "text/plain; charset=utf-8",
    )
    .into_response())
}

fn query_u64(query: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    query
        .get(name)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("`{name}` must be a non-negative integer"),
                )
            })
        })
        .transpose()
}

/// Inclusion proof of an event in the tree of `tree_size` leaves (RFC 9162).
#[utoipa::path(get, path = "/v1/proofs/inclusion", tag = "ledger",
    params(("id" = String, Query, description = "EventId (hex)"),
           ("tree_size" = Option<u64>, Query, description = "Default: the current size")),
    responses((status = 200, description = "{leaf_index, tree_size, path: [hex]}"),
              (status = 400, description = "Bad parameters", body = super::error::ErrorBody),
              (status = 404, description = "Event not in the log", body = super::error::ErrorBody)))]
pub(crate) async fn inclusion(
    state: AppState,
    query: HashMap<String, String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let id = query
        .get("id")
        .ok_or_else(|| ApiError::bad_request("invalid_query", "`id` is required"))?;
    let id = parse_event_id(id)?;
    let tree_size = query_u64(&query, "tree_size")?;
    let (leaf_index, tree_size, path) = state.node().ledger.inclusion_proof(&id, tree_size)?;
    Ok(json(
        StatusCode::OK,
        &json!({
            "leaf_index": leaf_index,
            "tree_size": tree_size,
            "path": path.iter().map(hex::encode).collect::<Vec<_>>(),
        }),
    ))
}

/// Consistency proof between two tree sizes (RFC 9162).
#[utoipa::path(get, path = "/v1/proofs/consistency", tag = "ledger",
    params(("from" = u64, Query, description = "Older size"),
           ("to" = Option<u64>, Query, description = "Newer size (default: current)")),
    responses((status = 200, description = "{from, to, path: [hex]}"),
              (status = 400, description = "Bad parameters", body = super::error::ErrorBody)))]
pub(crate) async fn consistency(
    state: AppState,
    query: HashMap<String, String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let from = query_u64(&query, "from")?
        .ok_or_else(|| ApiError::bad_request("invalid_query", "`from` is required"))?;
    let to = query_u64(&query, "to")?;
    let (to, path) = state.node().ledger.consistency_proof(from, to)?;
    Ok(json(
        StatusCode::OK,
        &json!({"from": from, "to": to, "path": path.iter().map(hex::encode).collect::<Vec<_>>()}),
    ))
}

/// Re-verify the whole ledger from its blobs. One audit runs at a time, detached from the
/// request; concurrent requests share it, and a result is reused (header `x-audit-reused`)
/// while the log did not grow (up to 5 minutes); a new audit starts no sooner than 2 s (and
/// twice the last audit's duration) after the last one. Writes nothing.
#[utoipa::path(get, path = "/v1/audit", tag = "ledger",
    responses((status = 200, description = "Audit report {ok, n_events, tree_size, root, checkpoint, findings, …}"),
              (status = 429, description = "An audit is already running", body = super::error::ErrorBody)))]
pub(crate) async fn audit(state: AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let (report, reused) = super::audit_job::audit(&state).await?;
    let mut response = json(StatusCode::OK, report.as_ref());
    if reused {
        response
            .headers_mut()
            .insert("x-audit-reused", http::HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Hosts listed per skill in `GET /v1/skills` (`hosts_more` says when there are more).
const SKILL_HOSTS_SHOWN: usize = 32;

/// The skill catalog with endorsements and hosts, paged in order of the publish EventId.
#[utoipa::path(get, path = "/v1/skills", tag = "catalog",
    params(("limit" = Option<usize>, Query, description = "At most this many (1 to 1000, larger is clamped; default 100)"),
           ("after" = Option<String>, Query, description = "The `next` of the previous page: skills whose id (EventId hex) is after this one")),
    responses((status = 200, description = "{skills: [...], next: cursor of the next page or null}"),
              (status = 400, description = "Bad limit (`invalid_query`) or cursor (`invalid_cursor`)", body = super::error::ErrorBody)))]
pub(crate) async fn skills(
    state: AppState,
    query: HashMap<String, String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let (limit, after) = page_query(&query, EventId::from_hex)?;
    let ledger = &state.node().ledger;
    let page = ledger.skills_page(after.as_ref(), limit)?;
    let mut out = Vec::with_capacity(page.items.len());
    for s in &page.items {
        // A page costs at most limit × a bounded host read, however many hosts a blob has.
        let (hosts, hosts_more) = ledger.hosts_up_to(&s.blob, SKILL_HOSTS_SHOWN)?;
        out.push(json!({
            "id": s.id.to_hex(), "author": s.author.to_hex(), "skill_id": s.skill_id,
            "name": s.name, "version": s.version, "domain": s.domain, "blob": s.blob.to_hex(),
            "size": s.size, "price": s.price, "dim": s.dim,
            "endorsements": {"valid": s.n_valid, "invalid": s.n_invalid, "score_sum": amount(s.score_sum)},
            "hosts": hosts.iter().map(|h| h.to_hex()).collect::<Vec<_>>(),
            "hosts_more": hosts_more,
            "contested": s.contested,
        }));
    }
    Ok(page_json("skills", out, page.next.map(|id| id.to_hex())))
}

/// Basins with their current coordinates, paged in order of the publish EventId.
#[utoipa::path(get, path = "/v1/basins", tag = "catalog",
    params(("limit" = Option<usize>, Query, description = "At most this many (1 to 1000, larger is clamped; default 100)"),
           ("after" = Option<String>, Query, description = "The `next` of the previous page: basins whose id (EventId hex) is after this one")),
    responses((status = 200, description = "{basins: [...], next: cursor of the next page or null}"),
              (status = 400, description = "Bad limit (`invalid_query`) or cursor (`invalid_cursor`)", body = super::error::ErrorBody)))]
pub(crate) async fn basins(
    state: AppState,
    query: HashMap<String, String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let (limit, after) = page_query(&query, EventId::from_hex)?;
    let page = state.node().ledger.basins_page(after.as_ref(), limit)?;
    let out: Vec<Value> = page
        .items
        .iter()
        .map(|b| {
            json!({
                "id": b.id.to_hex(), "owner": b.owner.to_hex(), "basin_id": b.basin_id,
                "writers": b.writers.iter().map(|w| w.to_hex()).collect::<Vec<_>>(),
                "coordinates": b.coordinates(), "n_versions": b.n_versions, "head": b.head.to_hex(),
            })
        })
        .collect();
    Ok(page_json("basins", out, page.next.map(|id| id.to_hex())))
}

/// One basin: current coordinates and full version history (a Merkle DAG by parent).
#[utoipa::path(get, path = "/v1/basins/{id}", tag = "catalog",
    params(("id" = String, Path, description = "EventId of the basin.publish")),
    responses((status = 200, description = "{id, owner, basin_id, coordinates, versions: [...]}"),
              (status = 404, description = "No such basin", body = super::error::ErrorBody)))]
pub(crate) async fn basin(
    state: AppState,
    id: String,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let id = parse_event_id(&id)?;
    let ledger = &state.node().ledger;
    let Some(b) = ledger.basin(&id)? else {
        return Err(ApiError::not_found(
            "basin_not_found",
            format!("no basin published by event {id}"),
        ));
    };
    let versions: Vec<Value> = ledger
        .basin_history(&id)?
        .iter()
        .map(|v| {
            json!({
                "id": v.id.to_hex(), "parent": v.parent.map(|p| p.to_hex()),
                "author": v.author.to_hex(), "coordinates": v.coordinates,
                "distance": v.distance, "weight_ppm": v.weight_ppm,
                "anchor": v.anchor.to_hex(),
            })
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({
            "id": b.id.to_hex(), "owner": b.owner.to_hex(), "basin_id": b.basin_id,
            "writers": b.writers.iter().map(|w| w.to_hex()).collect::<Vec<_>>(),
            "coordinates": b.coordinates(), "n_versions": b.n_versions, "head": b.head.to_hex(),
            "versions": versions,
        }),
    ))
}

/// Reputation scores, paged in order of the subject key.
#[utoipa::path(get, path = "/v1/reputation", tag = "catalog",
    params(("limit" = Option<usize>, Query, description = "At most this many (1 to 1000, larger is clamped; default 100)"),
           ("after" = Option<String>, Query, description = "The `next` of the previous page: subjects whose key (hex) is after this one")),
    responses((status = 200, description = "{reputation: [{subject, score, n_deltas}], next: cursor of the next page or null}"),
              (status = 400, description = "Bad limit (`invalid_query`) or cursor (`invalid_cursor`)", body = super::error::ErrorBody)))]
pub(crate) async fn reputation(
    state: AppState,
    query: HashMap<String, String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let (limit, after) = page_query(&query, AuthorKey::from_hex)?;
    let page = state.node().ledger.reputation_page(after.as_ref(), limit)?;
    let out: Vec<Value> = page
        .items
        .iter()
        .map(|(k, r)| json!({"subject": k.to_hex(), "score": score(r.score), "n_deltas": r.n_deltas}))
        .collect();
    Ok(page_json("reputation", out, page.next.map(|k| k.to_hex())))
}

/// The node registry with each node's last heartbeat (its latest node.announce), paged in
/// order of the node's author key.
#[utoipa::path(get, path = "/v1/nodes", tag = "catalog",
    params(("limit" = Option<usize>, Query, description = "At most this many (1 to 1000, larger is clamped; default 100)"),
           ("after" = Option<String>, Query, description = "The `next` of the previous page: nodes whose author key (hex) is after this one")),
    responses((status = 200, description = "{nodes: [...], next: cursor of the next page or null}"),
              (status = 400, description = "Bad limit (`invalid_query`) or cursor (`invalid_cursor`)", body = super::error::ErrorBody)))]
pub(crate) async fn nodes(
    state: AppState,
    query: HashMap<String, String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, false)?;
    let (limit, after) = page_query(&query, AuthorKey::from_hex)?;
    let page = state.node().ledger.nodes_page(after.as_ref(), limit)?;
    let out: Vec<Value> = page
        .items
        .iter()
        .map(|n| {
            json!({
                "author": n.author.to_hex(), "service": n.service, "endpoints": n.endpoints,
                "capabilities": n.capabilities, "addr": n.addr, "dim": n.basin_signature.len(),
                "last_event": n.last_event.to_hex(), "last_heartbeat_ms": n.last_ts,
                "n_announces": n.n_announces,
            })
        })
        .collect();
    Ok(page_json("nodes", out, page.next.map(|k| k.to_hex())))
}

/// Body of `POST /v1/audit/export`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct ExportRequest {
    /// Absolute directory on the node's machine to write the bundle to.
    dir: String,
}

/// Audit and write an offline bundle (events, fork proofs, checkpoint, consistency proof) to a
/// directory on the node's machine; `meshnode audit --bundle DIR` verifies it without a node.
#[utoipa::path(post, path = "/v1/audit/export", tag = "ledger",
    request_body = ExportRequest,
    responses((status = 200, description = "Audit report; the bundle is written"),
              (status = 400, description = "Not an absolute path", body = super::error::ErrorBody),
              (status = 401, description = "Missing or wrong bearer token", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn audit_export(
    state: AppState,
    headers: HeaderMap,
    request: ExportRequest,
) -> Result<Response, ApiError> {
    state.authorize(&headers, true)?;
    let dir = std::path::PathBuf::from(&request.dir);
    if !dir.is_absolute() || request.dir.contains('\0') {
        return Err(ApiError::bad_request(
            "invalid_path",
            "`dir` must be an absolute path",
        ));
    }
    let report = super::audit_job::export(&state, dir).await?;
    Ok(json(StatusCode::OK, report.as_ref()))
}
