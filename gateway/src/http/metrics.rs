//! Prometheus metrics of the gateway and the components behind it.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: &'static str,
    status: u16,
}

/// Bounded label values for methods.
fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        "PATCH" => "PATCH",
        _ => "OTHER",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

/// Labels of a per-peer metric (at most `meshnode_sync::PEERS_MAX` peers).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The peer's endpoint id (hex).
    pub peer: String,
    /// What is counted: connected, behind, heads_behind, doc_sessions, doc_round_trips, events_in, bytes_in, bytes_out, score, banned.
    pub what: &'static str,
}

/// Every metric the node exports.
#[derive(Debug)]
pub struct Metrics {
    /// Per peer (`GET /v1/peers` as gauges), refreshed at each scrape.
    pub peers: Family<PeerLabels, Gauge>,
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram>,
    /// Connections currently open.
    pub connections_open: Gauge,
    /// Connections accepted since start.
    pub connections_total: Counter,
    /// Bytes stored by blob uploads.
    pub blob_bytes_added: Counter,
    /// Blob GETs answered from the in-memory cache.
    pub blob_cache_hits: Counter,
    /// Corrupt blobs detected (mirrors the store's counter at scrape time).
    pub blobs_corrupt: Gauge,
    /// Pinned blobs (at scrape time).
    pub pins: Gauge,
    /// Events accepted through `POST /v1/events`.
    pub events_accepted: Counter,
    /// Events rejected by `POST /v1/events`.
    pub events_rejected: Counter,
    /// Ledger size (transparency-log leaves, at scrape time).
    pub ledger_events: Gauge,
    /// Events waiting for prev or deps (at scrape time).
    pub ledger_pending: Gauge,
    pub blobs_hosted: Gauge,
    /// Finished GC runs.
    pub gc_runs: Gauge,
    /// Failed GC runs.
    pub gc_failures: Gauge,
    /// 1 when the blob collector stopped after an error.
    pub gc_stopped: Gauge,
    /// Connections refused because their client had too many open.
    pub connections_refused: Counter,
    /// SQL worker processes started (at scrape time).
    pub query_workers_started: Gauge,
    /// SQL workers that ended during a query: out of memory, or a crash (at scrape time).
    pub query_workers_ended: Gauge,
    /// SQL workers killed at their query's deadline (at scrape time).
    pub query_workers_killed: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshnode");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route, method and status",
            requests.clone(),
        );
        let durations = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register(
            "http_request_duration_seconds",
            "Time to produce the response head, by route",
            durations.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "http_connections_open",
            "HTTP connections currently open",
            connections_open.clone(),
        );
        let connections_total = Counter::default();
        registry.register(
            "http_connections",
            "HTTP connections accepted",
            connections_total.clone(),
        );
        let blob_bytes_added = Counter::default();
        registry.register(
            "blob_added_bytes",
            "Bytes stored by blob uploads",
            blob_bytes_added.clone(),
        );
        let blob_cache_hits = Counter::default();
        registry.register(
            "blob_cache_hits",
            "Blob reads answered from the in-memory cache",
            blob_cache_hits.clone(),
        );
        let blobs_corrupt = Gauge::default();
        registry.register(
            "blobs_corrupt",
            "Blobs that failed verification since start (quarantined, never served)",
            blobs_corrupt.clone(),
        );
        let pins = Gauge::default();
        registry.register("pins", "Pinned blobs", pins.clone());
        let events_accepted = Counter::default();
        registry.register(
            "events_accepted",
            "Events accepted over HTTP",
            events_accepted.clone(),
        );
        let events_rejected = Counter::default();
        registry.register(
            "events_rejected",
            "Events rejected over HTTP",
            events_rejected.clone(),
        );
        let ledger_events = Gauge::default();
        registry.register(
            "ledger_events",
            "Accepted events (log size)",
            ledger_events.clone(),
        );
        let ledger_pending = Gauge::default();
        registry.register(
            "ledger_pending",
            "Events waiting for prev or deps",
            ledger_pending.clone(),
        );
        let blobs_hosted = Gauge::default();
        registry.register(
            "blobs_hosted",
            "Blobs this node announces with its own blob.host (pinned)",
            blobs_hosted.clone(),
        );
        let gc_runs = Gauge::default();
        registry.register(
            "gc_runs",
            "Finished garbage-collection runs",
            gc_runs.clone(),
        );
        let gc_failures = Gauge::default();
        registry.register(
            "gc_failures",
            "Failed garbage-collection runs",
            gc_failures.clone(),
        );
        let gc_stopped = Gauge::default();
        registry.register(
            "gc_stopped",
            "1 when the blob collector stopped after an error (restart to resume)",
            gc_stopped.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "http_connections_refused",
            "Connections refused because their client had too many open",
            connections_refused.clone(),
        );
        let query_workers_started = Gauge::default();
        registry.register(
            "query_workers_started",
            "SQL worker processes started",
            query_workers_started.clone(),
        );
        let query_workers_ended = Gauge::default();
        registry.register(
            "query_workers_ended",
            "SQL workers that ended during a query (out of memory, or a crash)",
            query_workers_ended.clone(),
        );
        let peers = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "peer",
            "Per peer: connected (0/1), behind (events of its log not read yet), heads_behind \
             (seqs its heads document lists past ours), doc_sessions, doc_round_trips, events_in, bytes_in and bytes_out (QUIC, overhead included), score, banned (0/1)",
            peers.clone(),
        );
        let query_workers_killed = Gauge::default();
        registry.register(
            "query_workers_killed",
            "SQL workers killed at their query's deadline",
            query_workers_killed.clone(),
        );
        Self {
            peers,
            registry: Mutex::new(registry),
            requests,
            durations,
            connections_open,
            connections_total,
            blob_bytes_added,
            blob_cache_hits,
            blobs_corrupt,
            pins,
            events_accepted,
            events_rejected,
            ledger_events,
            ledger_pending,
            blobs_hosted,
            gc_runs,
            gc_failures,
            gc_stopped,
            connections_refused,
            query_workers_started,
            query_workers_ended,
            query_workers_killed,
        }
    }

    /// Records one answered request.
    pub fn observe(&self, route: &'static str, method: &str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method: method_label(method),
                status,
            })
            .inc();
        self.durations
            .get_or_create(&RouteLabels { route })
            .observe(elapsed.as_secs_f64());
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let registry = self
            .registry
            .lock()
            .expect("invariant: metrics registry lock is never poisoned");
        if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
            return String::new();
        }
        // The OpenMetrics terminator is not part of the classic Prometheus text format.
        if let Some(stripped) = text.strip_suffix("# EOF\n") {
            text.truncate(stripped.len());
        }
        text
    }
}

/// The route template of a request path, for metric labels (bounded cardinality).
pub fn route_of(method: &http::Method, path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["healthz"] => "/healthz",
        ["readyz"] => "/readyz",
        ["metrics"] => "/metrics",
        ["openapi.json"] => "/openapi.json",
        ["v1", "blobs"] => "/v1/blobs",
        ["v1", "blobs", _] => "/v1/blobs/{hash}",
        ["v1", "blobs", _, "fetch"] => "/v1/blobs/{hash}/fetch",
        ["v1", "pins"] => "/v1/pins",
        ["v1", "pins", _] => "/v1/pins/{hash}",
        ["v1", "status"] => "/v1/status",
        ["v1", "gc"] => "/v1/gc",
        ["v1", "events"] => "/v1/events",
        ["v1", "events", "own"] => "/v1/events/own",
        ["v1", "events", _] => "/v1/events/{id}",
        ["v1", "logs", _] => "/v1/logs/{author}",
        ["v1", "accounts", _] => "/v1/accounts/{key}",
        ["v1", "accounts", _, "credits"] => "/v1/accounts/{key}/credits",
        ["v1", "forks"] => "/v1/forks",
        ["v1", "checkpoint"] => "/v1/checkpoint",
        ["v1", "proofs", "inclusion"] => "/v1/proofs/inclusion",
        ["v1", "proofs", "consistency"] => "/v1/proofs/consistency",
        ["v1", "audit"] => "/v1/audit",
        ["v1", "audit", "export"] => "/v1/audit/export",
        ["v1", "sql"] => "/v1/sql",
        ["v1", "search"] => "/v1/search",
        ["v1", "embeddings"] => "/v1/embeddings",
        ["v1", "tables"] => "/v1/tables",
        ["v1", "query"] => "/v1/query",
        ["v1", "export"] => "/v1/export",
        ["v1", "peers"] => "/v1/peers",
        ["v1", "skills"] => "/v1/skills",
        ["v1", "basins"] => "/v1/basins",
        ["v1", "basins", _] => "/v1/basins/{id}",
        ["v1", "reputation"] => "/v1/reputation",
        ["v1", "nodes"] => "/v1/nodes",
        ["v1", rest @ ..] if !rest.is_empty() && *method == http::Method::GET => "/v1/other",
        _ => "other",
    }
}
