//! The node's place in the mesh: its iroh endpoint (the node key is the endpoint id), the
//! peers it knows, and the event plane — each peer's accepted events pulled in bulk, in that
//! peer's acceptance order, and fed to the ledger, which verifies every one.
//!
//! Replication is a cursor per peer into the peer's transparency log. Acceptance order is
//! causal order (an event is accepted only after its `prev` and `deps`), so a log read from
//! any leaf on brings dependencies before the events that name them, and a node that has read
//! a peer's log to its end holds every event that peer accepted. Events a node learnt from
//! one peer are in its own log too, so a line of nodes converges.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use iroh::endpoint::{Connection, QuicTransportConfig, presets};
use iroh::protocol::{AcceptError, ProtocolHandler, Router};
use iroh::{Endpoint, EndpointAddr, SecretKey};
use iroh_tickets::endpoint::EndpointTicket;
use meshnode_ledger::{Ledger, Rule, RuleClass};
use meshnode_schemas::BlobHash;
use serde::Serialize;

use crate::docs::DocKind;
use crate::error::{Error, Result};
use crate::peers::{LEARNT_MAX, PEERS_MAX, PeerRecord, PeerTable};
use crate::wire::{self, Header, Request};

/// Settings of the mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// UDP address the endpoint binds (`127.0.0.1:0` picks a free loopback port).
    pub bind: SocketAddr,
    /// Pause between pulls once a peer's log is read to its end.
    pub pull_interval: Duration,
    /// Only these peers (endpoint ids, hex) may be added or served; empty: any.
    pub allow: Vec<String>,
    /// These peers are never added or served.
    pub block: Vec<String>,
    /// Misbehaviour score at which a peer is disconnected and banned.
    pub ban_score: u32,
    /// The first ban's length; each next one lasts twice as long (at most a day).
    pub ban_first: Duration,
    /// Authors this node has no event of yet that one peer may bring in per hour; past it,
    /// replication from that peer pauses until the hour is over (a peer cannot flood the
    /// node with fresh self-signed authors; their events still arrive through other peers).
    pub new_authors_per_hour: u32,
    /// Largest blob a fetch takes (the gateway's `limits.blob_bytes_max`); a download that
    /// passes it is stopped.
    pub blob_bytes_max: u64,
    /// Addresses the ticket gives (empty: the bound one and the interfaces found).
    pub advertise: Vec<SocketAddr>,
    /// Relay servers to use (empty, the default: relays off, direct addresses only). The
    /// ticket names the first.
    pub relays: Vec<iroh::RelayUrl>,
    /// A pkarr relay (HTTP) to publish this node's addresses to and look peers' up at
    /// (none, the default: address lookup off).
    pub address_lookup: Option<iroh::RelayUrl>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            pull_interval: Duration::from_millis(500),
            allow: Vec::new(),
            block: Vec::new(),
            ban_score: 100,
            ban_first: Duration::from_secs(60),
            new_authors_per_hour: 10_000,
            blob_bytes_max: 8 << 30,
            advertise: Vec::new(),
            relays: Vec::new(),
            address_lookup: None,
        }
    }
}

/// Score added for an envelope that is malformed, of another network or wrongly signed.
const SCORE_MALFORMED: u32 = 10;
/// Score added for an envelope that breaks a ledger rule (an honest peer forwards only
/// events it accepted).
const SCORE_BROKEN: u32 = 2;
/// Score added for a protocol violation (oversized or malformed frames).
const SCORE_PROTOCOL: u32 = 20;
/// Longest ban.
const BAN_MAX: Duration = Duration::from_secs(24 * 3600);
/// Time to connect to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a response may take to arrive in full.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait between two attempts to reach a peer.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often connected peers are asked for their peers.
const EXCHANGE_INTERVAL: Duration = Duration::from_secs(30);
/// Tickets a peer-exchange answer carries.
const EXCHANGE_MAX: usize = 32;
/// Bi-streams a peer may have open on one connection.
const STREAMS_MAX: u32 = 8;
/// Strangers (peers not in the table) banned at once.
const STRANGERS_MAX: usize = 1024;
/// Connections served at once (beyond: refused at once).
const SERVED_MAX: usize = 64;
/// `Log` answers a peer may stop reading on one connection before it is closed.
const STOPPED_MAX: u32 = 4;
/// Bytes of envelopes read from peers' logs and not yet handed to the ledger, all peers
/// together (a frame counts its own length as it is read, so a peer holds only what it
/// sent): pulls hold at most this, plus one frame per peer.
const INFLIGHT_BYTES_MAX: usize = 128 << 20;
/// Pause of a peer whose quota of new authors is used up, before it is asked again.
const THROTTLE_PAUSE: Duration = Duration::from_secs(10);
/// A served connection with no request for this long is closed (pullers ask every
/// `pull_interval`).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time a peer has to send its request once it opened a stream.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Who tells us a peer's ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A user (`peer add`).
    User,
    /// The peer itself, on a connection authenticated as it.
    Itself,
    /// Another peer (peer exchange).
    Exchange,
}

/// What `GET /v1/peers` shows of a peer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerStatus {
    /// Endpoint id (the peer's node key), hex.
    pub id: String,
    /// Its ticket.
    pub ticket: String,
    /// Added by a user, not learnt by peer exchange.
    pub manual: bool,
    /// A connection is open now.
    pub connected: bool,
    /// The address it was dialled at.
    pub address: Option<String>,
    /// Round-trip time of the last request, ms.
    pub rtt_ms: Option<f64>,
    /// When its log was last read to its end, ms since the epoch.
    pub last_sync_ms: Option<u64>,
    /// Next leaf of its log to read.
    pub cursor: u64,
    /// Events of its log not read yet (as of the last answer).
    pub behind: u64,
    /// Events received from it.
    pub events_in: u64,
    /// `Log` requests answered by it (one round trip each).
    pub requests: u64,
    /// Bytes received and sent on its connections (QUIC's count, overhead included).
    pub bytes_in: u64,
    /// See `bytes_in`.
    pub bytes_out: u64,
    /// Seqs its heads document lists past ours (Σ over authors; the hints, see `docs.rs`).
    pub heads_behind: Option<u64>,
    /// Authors its heads document lists.
    pub heads_authors: Option<u64>,
    /// Entries of its catalog document, and of them those whose event this node lacks.
    pub catalog_entries: Option<u64>,
    /// See `catalog_entries`.
    pub catalog_missing: Option<u64>,
    /// Document sessions with it.
    pub doc_sessions: u64,
    /// Round trips of those sessions.
    pub doc_round_trips: u64,
    /// Misbehaviour score.
    pub score: u32,
    /// What it was last scored for.
    pub last_offence: Option<String>,
    /// Banned until (ms since the epoch), when banned.
    pub banned_until_ms: Option<u64>,
}

#[derive(Default)]
struct Live {
    /// New authors brought in this hour, and when the hour began.
    new_authors: u32,
    window: Option<tokio::time::Instant>,
    connected: bool,
    address: Option<String>,
    rtt_ms: Option<f64>,
    last_sync_ms: Option<u64>,
    behind: u64,
    events_in: u64,
    requests: u64,
    bytes_in: u64,
    bytes_out: u64,
}

pub(crate) struct Inner {
    endpoint: Endpoint,
    pub(crate) ledger: Ledger,
    store: meshnode_store::Store,
    pub(crate) net: String,
    /// Own documents and replicas of the peers' ones.
    pub(crate) docs: crate::docsync::Docs,
    config: MeshConfig,
    ticket: String,
    table: Mutex<PeerTable>,
    live: Mutex<HashMap<String, Live>>,
    /// Bans of peers not in the table (see [`Inner::ban_stranger`]).
    strangers: Mutex<HashMap<String, u64>>,
    tasks: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Permits of the connections served now.
    served: Arc<tokio::sync::Semaphore>,
    /// Bytes of `Log` envelopes in flight (read and not yet handed to the ledger), all peers
    /// together: what bounds the memory pulls take.
    inflight: tokio::sync::Semaphore,
}

/// The mesh endpoint of a node. Cheap to clone.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
    router: Router,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("ticket", &self.inner.ticket)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where the port the system chose for the endpoint is kept (see [`Mesh::start`]).
const P2P_PORT_FILE: &str = "p2p-port";

/// The address of the last start, when `bind` leaves the port to the system.
fn remembered_port(dir: &Path, bind: SocketAddr) -> Option<SocketAddr> {
    if bind.port() != 0 {
        return None;
    }
    let text = std::fs::read_to_string(dir.join(P2P_PORT_FILE)).ok()?;
    let port: u16 = text.trim().parse().ok().filter(|p| *p != 0)?;
    Some(SocketAddr::new(bind.ip(), port))
}

/// An endpoint with the node's key on `addr`: relays and address lookup off unless the
/// config names them, our ALPNs, bounded QUIC windows and streams.
async fn bind(secret: [u8; 32], addr: SocketAddr, config: &MeshConfig) -> Result<Endpoint> {
    use iroh::address_lookup::{AddrFilter, PkarrPublisher, PkarrResolver};
    let mut builder = Endpoint::builder(presets::Empty);
    if !config.relays.is_empty() {
        builder = builder.relay_mode(iroh::RelayMode::custom(config.relays.iter().cloned()));
    }
    if let Some(lookup) = &config.address_lookup {
        // Direct addresses too: with relays off they are all a peer can dial.
        builder = builder
            .address_lookup(
                PkarrPublisher::builder(lookup.clone().into())
                    .addr_filter(AddrFilter::unfiltered()),
            )
            .address_lookup(PkarrResolver::builder(lookup.clone().into()));
    }
    builder
        .crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .secret_key(SecretKey::from_bytes(&secret))
        .clear_ip_transports()
        .bind_addr(addr)
        .map_err(|e| Error::InvalidPeer(format!("p2p address {addr}: {e}")))?
        .alpns(vec![wire::ALPN.to_vec(), iroh_blobs::ALPN.to_vec()])
        // QUIC's defaults let a peer open 100 streams and buffer without bound.
        .transport_config(
            QuicTransportConfig::builder()
                .max_concurrent_bidi_streams(STREAMS_MAX.into())
                .stream_receive_window((2u32 << 20).into())
                .receive_window((16u32 << 20).into())
                .build(),
        )
        .bind()
        .await
        .map_err(|e| Error::transport(format!("binding {addr}: {e}")))
}

/// Parses a ticket into its endpoint address and id (hex).
pub fn parse_ticket(ticket: &str) -> Result<(EndpointAddr, String)> {
    let parsed: EndpointTicket = ticket
        .trim()
        .parse()
        .map_err(|e| Error::InvalidPeer(format!("not a ticket: {e}")))?;
    let addr = parsed.endpoint_addr().clone();
    let id = hex::encode(addr.id.as_bytes());
    Ok((addr, id))
}

impl Mesh {
    /// Binds the endpoint with the node's key `secret` (relays and address lookup off),
    /// serves `/meshnode/sync/1` and starts pulling from the peers remembered in `dir`.
    pub async fn start(
        secret: [u8; 32],
        ledger: Ledger,
        store: meshnode_store::Store,
        dir: &Path,
        config: MeshConfig,
    ) -> Result<Self> {
        // A port chosen by the system (port 0) is kept across restarts, so that the tickets
        // peers remember stay valid; if it is taken now, another is chosen.
        let remembered = remembered_port(dir, config.bind);
        let endpoint = match remembered {
            Some(addr) => match bind(secret, addr, &config).await {
                Ok(endpoint) => endpoint,
                Err(e) => {
                    tracing::warn!("p2p address {addr} (used last time): {e}; choosing another");
                    bind(secret, config.bind, &config).await?
                }
            },
            None => bind(secret, config.bind, &config).await?,
        };
        if config.bind.port() == 0
            && let Some(socket) = endpoint.bound_sockets().first()
            && let Err(e) = std::fs::write(dir.join(P2P_PORT_FILE), socket.port().to_string())
        {
            tracing::warn!("cannot remember the p2p port: {e}");
        }
        let ticket = own_ticket(&endpoint, &config.advertise, config.relays.first())?;
        let table = PeerTable::load(dir)?;
        let inner = Arc::new(Inner {
            docs: crate::docsync::Docs::new(*endpoint.id().as_bytes()),
            net: hex::encode(ledger.net().as_bytes()),
            endpoint: endpoint.clone(),
            ledger: ledger.clone(),
            store: store.clone(),
            config,
            ticket,
            table: Mutex::new(table),
            live: Mutex::new(HashMap::new()),
            strangers: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            served: Arc::new(tokio::sync::Semaphore::new(SERVED_MAX)),
            inflight: tokio::sync::Semaphore::new(INFLIGHT_BYTES_MAX),
        });
        let refused = {
            let inner = Arc::downgrade(&inner);
            Arc::new(move |id: &str| {
                inner
                    .upgrade()
                    .is_none_or(|i| i.banned(id) || i.admissible(id).is_err())
            })
        };
        let provider = crate::blobs::Provider {
            store: store.iroh().clone().into(),
            events: crate::blobs::guard(crate::blobs::Public::new(ledger)),
            refused,
            served: Arc::new(tokio::sync::Semaphore::new(SERVED_MAX)),
            per_peer: Arc::default(),
        };
        let router = Router::builder(endpoint)
            .accept(
                wire::ALPN,
                Serve {
                    inner: inner.clone(),
                },
            )
            .accept(iroh_blobs::ALPN, provider)
            .spawn();
        tokio::spawn(crate::docsync::write_own(Arc::downgrade(&inner)));
        let ids: Vec<String> = lock(&inner.table).peers.keys().cloned().collect();
        for id in ids {
            spawn_puller(&inner, id);
        }
        Ok(Self { inner, router })
    }

    /// Whether the endpoint still runs (not shut down).
    pub fn is_running(&self) -> bool {
        !self.inner.endpoint.is_closed()
    }

    /// This node's ticket: its endpoint id and direct address.
    pub fn ticket(&self) -> &str {
        &self.inner.ticket
    }

    /// Adds a peer by ticket (remembered across restarts) and starts pulling from it;
    /// returns its endpoint id.
    pub fn add_peer(&self, ticket: &str) -> Result<String> {
        let (addr, id) = parse_ticket(ticket)?;
        // Without a direct address the ticket is dialled through a relay or the address
        // lookup: only if this node has one.
        let config = &self.inner.config;
        let reachable = addr.ip_addrs().next().is_some()
            || (addr.relay_urls().next().is_some() && !config.relays.is_empty())
            || config.address_lookup.is_some();
        if !reachable {
            return Err(Error::InvalidPeer(
                "the ticket has no direct address, and this node has neither relays nor \
                 address lookup ([sync] relays, address_lookup)"
                    .into(),
            ));
        }
        if id == hex::encode(self.inner.endpoint.id().as_bytes()) {
            return Err(Error::InvalidPeer("that is this node's own ticket".into()));
        }
        self.inner.admissible(&id)?;
        self.inner.remember(&id, ticket.trim(), Source::User)?;
        spawn_puller(&self.inner, id.clone());
        Ok(id)
    }

    /// Forgets a peer and stops pulling from it; `false` if it was not known.
    pub fn remove_peer(&self, id: &str) -> Result<bool> {
        let id = id.trim().to_ascii_lowercase();
        let removed = {
            let mut table = lock(&self.inner.table);
            let removed = table.peers.remove(&id).is_some();
            if removed {
                table.save()?;
            }
            removed
        };
        self.inner.forget(&id);
        Ok(removed)
    }

    /// Every known peer's status, by id.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let hints = lock(&self.inner.docs.hints).clone();
        let table = lock(&self.inner.table);
        let live = lock(&self.inner.live);
        let now = now_ms();
        table
            .peers
            .iter()
            .map(|(id, record)| {
                let l = live.get(id);
                let h = hints.get(id);
                let heads = h.and_then(|h| h.heads);
                let catalog = h.and_then(|h| h.catalog);
                PeerStatus {
                    heads_behind: heads.map(|h| h.behind),
                    heads_authors: heads.map(|h| h.authors),
                    catalog_entries: catalog.map(|c| c.0),
                    catalog_missing: catalog.map(|c| c.1),
                    doc_sessions: h.map_or(0, |h| h.sessions),
                    doc_round_trips: h.map_or(0, |h| h.round_trips),
                    id: id.clone(),
                    ticket: record.ticket.clone(),
                    manual: record.manual,
                    connected: l.is_some_and(|l| l.connected),
                    address: l.and_then(|l| l.address.clone()),
                    rtt_ms: l.and_then(|l| l.rtt_ms),
                    last_sync_ms: l.and_then(|l| l.last_sync_ms),
                    cursor: record.cursor,
                    behind: l.map_or(0, |l| l.behind),
                    events_in: l.map_or(0, |l| l.events_in),
                    requests: l.map_or(0, |l| l.requests),
                    bytes_in: l.map_or(0, |l| l.bytes_in),
                    bytes_out: l.map_or(0, |l| l.bytes_out),
                    score: record.score,
                    last_offence: record.last_offence.clone(),
                    banned_until_ms: (record.banned_until_ms > now)
                        .then_some(record.banned_until_ms),
                }
            })
            .collect()
    }

    /// Gets `hash` from a peer into the store: first from the nodes that host it (a host's
    /// key is its endpoint id; one that is not a known peer is dialled at the address it
    /// announced), then from every other connected peer, one at a time. The
    /// data is verified as it streams in (a peer whose data fails is scored and the next one
    /// asked), kept from GC while it arrives, and durable and pinned before this returns.
    /// At most `max` bytes (and `limits.blob_bytes_max`): a peer's verified size is asked for
    /// first, so a larger blob is not downloaded at all.
    pub async fn fetch_blob(&self, hash: &BlobHash, max: u64) -> Result<Fetched> {
        let max = max.min(self.inner.config.blob_bytes_max);
        let inner = &self.inner;
        let hold = inner
            .store
            .hold_download(hash)
            .await
            .map_err(|e| Error::transport(format!("store: {e}")))?;
        let mut tried = Vec::new();
        for (id, ticket) in fetch_order(inner, hash)? {
            if inner.banned(&id) || inner.admissible(&id).is_err() {
                continue;
            }
            match fetch_from(inner, &ticket, hash, max).await {
                Ok(size) => {
                    let store = &inner.store;
                    let stored = async {
                        store.make_durable(&[*hash]).await?;
                        store.pin(hash).await
                    };
                    stored
                        .await
                        .map_err(|e| Error::transport(format!("store: {e}")))?;
                    drop(hold);
                    return Ok(Fetched { size, from: id });
                }
                Err(e) => {
                    let why = match e {
                        FetchError::Corrupt(why) => {
                            inner.penalise(&id, SCORE_CORRUPT_BLOB, &format!("blob {hash}: {why}"));
                            format!("corrupt data ({why})")
                        }
                        FetchError::TooLarge(why) => {
                            tried.push(format!("{id}: {why}"));
                            continue;
                        }
                        FetchError::Other(why) => {
                            tracing::info!(peer = id, %hash, "blob not fetched: {why}");
                            why
                        }
                    };
                    if !lock(&inner.table).peers.contains_key(&id) {
                        // A host no one introduced that announced what it does not serve.
                        inner.ban_stranger(&id);
                    }
                    tried.push(format!("{id}: {why}"));
                }
            }
        }
        Err(Error::NotFound(if tried.is_empty() {
            format!("no peer to fetch blob {hash} from; add a peer first")
        } else {
            format!("no peer served blob {hash}: {}", tried.join("; "))
        }))
    }

    /// Stops pulling and closes the endpoint (the blob store and ledger stay open).
    pub async fn shutdown(&self) {
        for (_, task) in lock(&self.inner.tasks).drain() {
            task.abort();
        }
        if let Err(e) = self.router.shutdown().await {
            tracing::warn!("mesh router shutdown: {e}");
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The ticket: the `advertise` addresses, else the bound one (an unspecified IP given as
/// loopback plus the interface addresses found on that port).
fn own_ticket(
    endpoint: &Endpoint,
    advertise: &[SocketAddr],
    relay: Option<&iroh::RelayUrl>,
) -> Result<String> {
    let mut addr = EndpointAddr::new(endpoint.id());
    if let Some(relay) = relay {
        addr = addr.with_relay_url(relay.clone());
    }
    for socket in advertise {
        addr = addr.with_ip_addr(*socket);
    }
    if advertise.is_empty() {
        for mut socket in endpoint.bound_sockets() {
            if socket.ip().is_unspecified() {
                // Loopback, and the interface addresses the endpoint found on that port.
                for found in endpoint.addr().ip_addrs() {
                    if found.port() == socket.port() && !found.ip().is_loopback() {
                        addr = addr.with_ip_addr(*found);
                    }
                }
                socket.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            addr = addr.with_ip_addr(socket);
        }
    }
    if addr.ip_addrs().next().is_none() && addr.relay_urls().next().is_none() {
        return Err(Error::transport("the endpoint has no bound address"));
    }
    Ok(EndpointTicket::new(addr).to_string())
}

impl Inner {
    /// Refuses a peer the policy keeps out.
    fn admissible(&self, id: &str) -> Result<()> {
        if self.config.block.iter().any(|b| b.eq_ignore_ascii_case(id)) {
            return Err(Error::InvalidPeer(format!(
                "peer {id} is on the block list"
            )));
        }
        if !self.config.allow.is_empty()
            && !self.config.allow.iter().any(|a| a.eq_ignore_ascii_case(id))
        {
            return Err(Error::InvalidPeer(format!(
                "peer {id} is not on the allow list"
            )));
        }
        Ok(())
    }

    fn banned(&self, id: &str) -> bool {
        let now = now_ms();
        lock(&self.table)
            .peers
            .get(id)
            .is_some_and(|r| r.banned_until_ms > now)
            || lock(&self.strangers)
                .get(id)
                .is_some_and(|&until| until > now)
    }

    /// Bans a peer that is not in the peers table (a stranger that dialled us) for the first
    /// ban's length, in a set of at most [`STRANGERS_MAX`] (expired bans, then the one ending
    /// soonest, make room): fresh keys cost an attacker nothing, so they must not fill the
    /// peers table.
    fn ban_stranger(&self, id: &str) {
        let now = now_ms();
        let mut strangers = lock(&self.strangers);
        strangers.retain(|_, until| *until > now);
        if strangers.len() >= STRANGERS_MAX
            && let Some(first) = strangers
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(k, _)| k.clone())
        {
            strangers.remove(&first);
        }
        let until = now + self.config.ban_first.as_millis() as u64;
        strangers.insert(id.to_string(), until);
        tracing::warn!(
            peer = id,
            "stranger banned for {} s",
            self.config.ban_first.as_secs()
        );
    }

    /// Adds a peer's record, or updates its ticket as `source` may: a user's `peer add`
    /// always (keeping the cursor); the peer itself, on its own connection, only for a
    /// record it created (a user's ticket is never replaced); peer exchange never (a third
    /// party cannot redirect a known peer). Saves only on a change; `true` if added.
    ///
    /// Learnt peers (by exchange or by dialling us) take at most [`LEARNT_MAX`] records:
    /// fresh keys cost nothing, so past that a new one replaces a learnt peer that is
    /// neither connected nor banned, and is refused if there is none. A user's peer always
    /// finds room while any learnt one is unbanned.
    fn remember(&self, id: &str, ticket: &str, source: Source) -> Result<bool> {
        let connected: HashSet<String> = lock(&self.live)
            .iter()
            .filter(|(_, l)| l.connected)
            .map(|(id, _)| id.clone())
            .collect();
        let mut table = lock(&self.table);
        if let Some(record) = table.peers.get_mut(id) {
            let update = match source {
                Source::User => true,
                Source::Itself => !record.manual,
                Source::Exchange => false,
            };
            let manual = record.manual || source == Source::User;
            if (!update || record.ticket == ticket) && manual == record.manual {
                return Ok(false);
            }
            if update {
                record.ticket = ticket.to_string();
            }
            record.manual = manual;
            table.save()?;
            return Ok(false);
        }
        let evicted = make_room(&mut table, source, &connected)?;
        table.peers.insert(
            id.to_string(),
            PeerRecord {
                ticket: ticket.to_string(),
                manual: source == Source::User,
                ..PeerRecord::default()
            },
        );
        debug_assert!(table.peers.len() <= PEERS_MAX);
        table.save()?;
        drop(table);
        if let Some(old) = evicted {
            tracing::info!(peer = old, "forgotten to make room for {id}");
            self.forget(&old);
        }
        Ok(true)
    }

    /// Stops pulling from a peer whose record is gone and drops what is kept of it.
    fn forget(&self, id: &str) {
        if let Some(task) = lock(&self.tasks).remove(id) {
            task.abort();
        }
        lock(&self.live).remove(id);
        self.docs.drop_peer(id);
    }

    /// Adds `score` to a peer's; past the limit it is banned (each ban twice the last).
    /// Returns whether it is banned now.
    pub(crate) fn penalise(&self, id: &str, score: u32, why: &str) -> bool {
        let mut table = lock(&self.table);
        let Some(record) = table.peers.get_mut(id) else {
            drop(table);
            if score >= self.config.ban_score {
                tracing::warn!(peer = id, "stranger misbehaved: {why}");
                self.ban_stranger(id);
                return true;
            }
            return false;
        };
        record.score = record.score.saturating_add(score);
        record.last_offence = Some(
            why.char_indices()
                .take_while(|(i, _)| *i < OFFENCE_BYTES_MAX)
                .map(|(_, c)| c)
                .collect(),
        );
        tracing::warn!(peer = id, score = record.score, "peer misbehaved: {why}");
        if record.score < self.config.ban_score {
            return false;
        }
        let factor = 1u32.checked_shl(record.bans.min(16)).unwrap_or(u32::MAX);
        let ban = self.config.ban_first.saturating_mul(factor).min(BAN_MAX);
        record.banned_until_ms = now_ms() + ban.as_millis() as u64;
        record.bans = record.bans.saturating_add(1);
        record.score = 0;
        tracing::warn!(peer = id, "peer banned for {} s", ban.as_secs());
        if let Err(e) = table.save() {
            tracing::warn!("saving peers: {e}");
        }
        true
    }

    fn set_cursor(&self, id: &str, cursor: u64) {
        let mut table = lock(&self.table);
        if let Some(record) = table.peers.get_mut(id)
            && record.cursor != cursor
        {
            record.cursor = cursor;
            record.score = record.score.saturating_sub(1);
            if let Err(e) = table.save() {
                tracing::warn!("saving peers: {e}");
            }
        }
    }

    fn cursor(&self, id: &str) -> Option<u64> {
        lock(&self.table).peers.get(id).map(|r| r.cursor)
    }

    fn live<R>(&self, id: &str, f: impl FnOnce(&mut Live) -> R) -> R {
        f(lock(&self.live).entry(id.to_string()).or_default())
    }

    /// Takes one new author from a peer's hourly quota; `false` when it is used up.
    fn take_new_author(&self, id: &str) -> bool {
        let limit = self.config.new_authors_per_hour;
        self.live(id, |l| {
            let now = tokio::time::Instant::now();
            if l.window
                .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(3600))
            {
                l.window = Some(now);
                l.new_authors = 0;
            }
            if l.new_authors >= limit {
                return false;
            }
            l.new_authors += 1;
            true
        })
    }
}

/// Makes room in `table` for a new peer from `source`, removing at most one learnt peer
/// that is not banned — one not in `connected` if there is any (for a learnt newcomer,
/// only such a one) —, chosen at random: a peer that sends us many fresh tickets cannot
/// pick which honest peers go. Returns it.
fn make_room(
    table: &mut PeerTable,
    source: Source,
    connected: &HashSet<String>,
) -> Result<Option<String>> {
    let learnt = table.peers.values().filter(|r| !r.manual).count();
    let full = table.peers.len() >= PEERS_MAX || (source != Source::User && learnt >= LEARNT_MAX);
    if !full {
        return Ok(None);
    }
    let now = now_ms();
    let unbanned = |r: &PeerRecord| !r.manual && r.banned_until_ms <= now;
    let mut eligible: Vec<&String> = table
        .peers
        .iter()
        .filter(|(id, r)| unbanned(r) && !connected.contains(*id))
        .map(|(id, _)| id)
        .collect();
    if eligible.is_empty() && source == Source::User {
        eligible = table
            .peers
            .iter()
            .filter(|(_, r)| unbanned(r))
            .map(|(id, _)| id)
            .collect();
    }
    if eligible.is_empty() {
        return Err(Error::InvalidPeer(if source == Source::User {
            format!("{PEERS_MAX} peers are known already; remove one first")
        } else {
            "no room for a learnt peer: the known ones are connected, banned or added by a user"
                .to_string()
        }));
    }
    let victim = eligible[(rand::random::<u64>() % eligible.len() as u64) as usize].clone();
    table.peers.remove(&victim);
    Ok(Some(victim))
}

/// Where a blob came from.
#[derive(Debug, Clone, Serialize)]
pub struct Fetched {
    /// Its size in bytes.
    pub size: u64,
    /// The peer that served it (endpoint id, hex).
    pub from: String,
}

/// Longest offence kept in a peer's record.
const OFFENCE_BYTES_MAX: usize = 200;

/// Score added for blob data that fails verification.
const SCORE_CORRUPT_BLOB: u32 = 50;
/// Longest a single peer may take to send a blob.
const FETCH_TIMEOUT: Duration = Duration::from_secs(600);
/// Host announcements read per fetch.
const FETCH_HOSTS_MAX: usize = 64;
/// Hosts outside the peers table dialled per fetch (at their announced address), after
/// every known peer; one that does not serve the blob is banned like a misbehaving
/// stranger, so fake announcements cost a fetch at most this many attempts per ban.
const FETCH_STRANGERS_MAX: usize = 4;

enum FetchError {
    /// The peer sent data that does not match the hash.
    Corrupt(String),
    /// The blob is larger than this fetch may take (our limit, not the peer's fault).
    TooLarge(String),
    /// Anything else: unreachable, refused, not there, too slow.
    Other(String),
}

/// The peers to ask for `hash`, as (id, ticket): the known peers that host it, then the
/// other connected known peers, then the rest of them, and last at most
/// [`FETCH_STRANGERS_MAX`] hosts that are not known peers, at the address they announced
/// (`node.announce`) if that is a ticket of their own key — anyone can announce a host, so
/// strangers come after everyone we chose to know.
fn fetch_order(inner: &Inner, hash: &BlobHash) -> Result<Vec<(String, String)>> {
    let (hosts, _) = inner.ledger.hosts_up_to(hash, FETCH_HOSTS_MAX)?;
    let known: Vec<(String, String)> = lock(&inner.table)
        .peers
        .iter()
        .map(|(id, r)| (id.clone(), r.ticket.clone()))
        .collect();
    let own = hex::encode(inner.endpoint.id().as_bytes());
    let mut order: Vec<(String, String)> = Vec::new();
    let mut strangers: Vec<(String, String)> = Vec::new();
    for host in hosts {
        let id = hex::encode(host.as_bytes());
        if let Some(peer) = known.iter().find(|(k, _)| *k == id) {
            order.push(peer.clone());
        } else if id != own
            && strangers.len() < FETCH_STRANGERS_MAX
            && !inner.banned(&id)
            && let Some(node) = inner.ledger.node_entry(&host)?
            && parse_ticket(&node.addr).is_ok_and(|(_, of)| of == id)
        {
            strangers.push((id, node.addr));
        }
    }
    let connected = |id: &String| lock(&inner.live).get(id).is_some_and(|l| l.connected);
    let (up, down): (Vec<_>, Vec<_>) = known.into_iter().partition(|(id, _)| connected(id));
    for peer in up.into_iter().chain(down) {
        if !order.iter().any(|(id, _)| *id == peer.0) {
            order.push(peer);
        }
    }
    order.extend(strangers);
    Ok(order)
}

/// Only data that fails its hash is the peer's fault: a dropped connection, a reset or a
/// peer without the whole blob decode-fail too, and are not scored.
fn classify(e: iroh_blobs::get::GetError) -> FetchError {
    use iroh_blobs::get::fsm::DecodeError;
    match e {
        iroh_blobs::get::GetError::Decode {
            source:
                source @ (DecodeError::LeafHashMismatch { .. } | DecodeError::ParentHashMismatch { .. }),
            ..
        } => FetchError::Corrupt(source.to_string()),
        e => match e.iroh_error_code() {
            Some(code) => FetchError::Other(format!(
                "refused or stopped (code {code}; a peer serves only blobs it announced \
                 with its own blob.host, and skills' weights)"
            )),
            None => FetchError::Other(e.to_string()),
        },
    }
}

/// Runs a download to its end, or stops it (by dropping it) once it read more than `max`
/// bytes of payload.
async fn capped(
    progress: iroh_blobs::api::remote::GetProgress,
    max: u64,
) -> Result<(), FetchError> {
    use futures_lite::StreamExt;
    use iroh_blobs::api::remote::GetProgressItem;
    let mut items = std::pin::pin!(progress.stream());
    while let Some(item) = items.next().await {
        match item {
            GetProgressItem::Progress(read) if read > max => {
                return Err(FetchError::TooLarge(format!(
                    "the blob is larger than this fetch may take ({max} bytes)"
                )));
            }
            GetProgressItem::Progress(_) => {}
            GetProgressItem::Done(_) => return Ok(()),
            GetProgressItem::Error(e) => return Err(classify(e)),
        }
    }
    Err(FetchError::Other(
        "the download ended without a result".into(),
    ))
}

/// Gets `hash` over `conn` into the store, at most `max` bytes. The size, proven by the last
/// chunk, is asked for first: a blob over the cap is not fetched at all (a cap on progress
/// alone could be passed by resuming from another peer).
async fn download(
    inner: &Inner,
    conn: &Connection,
    hash: &BlobHash,
    max: u64,
) -> Result<(), FetchError> {
    let timed_out = |_| FetchError::Other("timed out".into());
    let iroh_hash = iroh_blobs::Hash::from_bytes(*hash.as_bytes());
    let (size, _) = tokio::time::timeout(
        RESPONSE_TIMEOUT,
        iroh_blobs::get::request::get_verified_size(conn, &iroh_hash),
    )
    .await
    .map_err(timed_out)?
    .map_err(classify)?;
    if size > max {
        return Err(FetchError::TooLarge(format!(
            "the blob is {size} bytes, more than this fetch may take ({max} bytes; \
             limits.blob_bytes_max or the hosting quota)"
        )));
    }
    let progress = inner.store.iroh().remote().fetch(conn.clone(), iroh_hash);
    tokio::time::timeout(FETCH_TIMEOUT, capped(progress, max))
        .await
        .map_err(timed_out)?
}

async fn fetch_from(
    inner: &Inner,
    ticket: &str,
    hash: &BlobHash,
    max: u64,
) -> Result<u64, FetchError> {
    let other = |e: &dyn std::fmt::Display| FetchError::Other(e.to_string());
    let (addr, _) = parse_ticket(ticket).map_err(|e| other(&e))?;
    let conn = tokio::time::timeout(
        CONNECT_TIMEOUT,
        inner.endpoint.connect(addr, iroh_blobs::ALPN),
    )
    .await
    .map_err(|_| FetchError::Other("connect timed out".into()))?
    .map_err(|e| other(&e))?;
    let downloaded = download(inner, &conn, hash, max).await;
    conn.close(0u32.into(), b"done");
    downloaded?;
    match inner.store.stat(hash).await {
        Ok(Some(stat)) if stat.complete => Ok(stat.size),
        Ok(_) => Err(FetchError::Other("the peer does not have it all".into())),
        Err(e) => Err(other(&e)),
    }
}

fn spawn_puller(inner: &Arc<Inner>, id: String) {
    let mut tasks = lock(&inner.tasks);
    if tasks.get(&id).is_some_and(|t| !t.is_finished()) {
        return;
    }
    let task = tokio::spawn(run_peer(inner.clone(), id.clone()));
    tasks.insert(id, task);
}

/// Connects to a peer and pulls from it, reconnecting with backoff, until it is forgotten.
async fn run_peer(inner: Arc<Inner>, id: String) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let Some(ticket) = lock(&inner.table).peers.get(&id).map(|r| r.ticket.clone()) else {
            return;
        };
        if inner.banned(&id) || inner.admissible(&id).is_err() {
            tokio::time::sleep(Duration::from_secs(5)).await;
            continue;
        }
        match connect(&inner, &ticket).await {
            Ok(conn) => {
                backoff = Duration::from_millis(250);
                let address = parse_ticket(&ticket)
                    .ok()
                    .and_then(|(a, _)| a.ip_addrs().next().map(|s| s.to_string()));
                inner.live(&id, |l| {
                    l.connected = true;
                    l.address = address;
                });
                let result = pull(&inner, &id, &conn).await;
                inner.live(&id, |l| l.connected = false);
                if let Err(e) = result {
                    tracing::info!(peer = id, "sync stopped: {e}");
                    if matches!(e, Error::Protocol(_)) {
                        inner.penalise(&id, SCORE_PROTOCOL, &e.to_string());
                    }
                }
                conn.close(0u32.into(), b"bye");
            }
            Err(e) => tracing::debug!(peer = id, "cannot reach: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn connect(inner: &Inner, ticket: &str) -> Result<Connection> {
    let (addr, _) = parse_ticket(ticket)?;
    tokio::time::timeout(CONNECT_TIMEOUT, inner.endpoint.connect(addr, wire::ALPN))
        .await
        .map_err(|_| Error::transport("connect timed out"))?
        .map_err(Error::transport)
}

/// Reads the peer's log from our cursor on, batch after batch, and asks for its peers now
/// and then; returns when the connection fails, the peer misbehaves or it is banned.
async fn pull(inner: &Arc<Inner>, id: &str, conn: &Connection) -> Result<()> {
    let mut exchanged: Option<tokio::time::Instant> = None;
    let mut catalog_synced: Option<tokio::time::Instant> = None;
    let mut caught_up = true;
    loop {
        if inner.banned(id) {
            return Err(Error::transport("banned"));
        }
        if exchanged.is_none_or(|t| t.elapsed() >= EXCHANGE_INTERVAL) {
            tokio::time::timeout(RESPONSE_TIMEOUT, exchange(inner, conn))
                .await
                .map_err(|_| Error::transport("the peer's answer timed out"))??;
            exchanged = Some(tokio::time::Instant::now());
        }
        if catalog_synced.is_none_or(|t| t.elapsed() >= crate::docsync::CATALOG_INTERVAL) {
            hinted(
                tokio::time::timeout(
                    RESPONSE_TIMEOUT,
                    crate::docsync::pull(inner, id, conn, DocKind::Catalog),
                )
                .await,
            )?;
            catalog_synced = Some(tokio::time::Instant::now());
        }
        let Some(cursor) = inner.cursor(id) else {
            return Ok(());
        };
        // Caught up: the peer's heads document tells whether it holds anything we lack.
        if caught_up && skip_log(inner, id, conn, cursor).await? {
            tokio::time::sleep(inner.config.pull_interval).await;
            continue;
        }
        let started = tokio::time::Instant::now();
        let (size, envelopes, budget) = tokio::time::timeout(
            RESPONSE_TIMEOUT,
            request_log(inner, conn, cursor, wire::EVENTS_PER_RESPONSE_MAX),
        )
        .await
        .map_err(|_| Error::transport("the peer's answer timed out"))??;
        if size < cursor {
            // Its log is shorter than what we read of it (rebuilt, restored): read it again.
            tracing::warn!(
                peer = id,
                size,
                cursor,
                "the peer's log shrank; reading it again"
            );
            inner.set_cursor(id, 0);
            continue;
        }
        let n = envelopes
            .iter()
            .filter(|e| e.as_ref() != wire::ELIDED)
            .count() as u64;
        let stats = conn.stats();
        inner.live(id, |l| {
            l.rtt_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
            l.bytes_in = stats.udp_rx.bytes;
            l.bytes_out = stats.udp_tx.bytes;
            l.events_in += n;
            l.requests += 1;
        });
        let (next, throttled) = ingest(inner, id, cursor, envelopes).await?;
        drop(budget);
        inner.set_cursor(id, next);
        inner.live(id, |l| {
            l.behind = size.saturating_sub(next);
            if l.behind == 0 {
                l.last_sync_ms = Some(now_ms());
            }
        });
        caught_up = next >= size;
        if throttled {
            tokio::time::sleep(THROTTLE_PAUSE).await;
        } else if next == cursor || next >= size {
            tokio::time::sleep(inner.config.pull_interval).await;
        }
    }
}

/// A document session's outcome: a peer that does not serve documents, or whose session
/// timed out, is read by its log alone; a protocol error (scored already) ends the pull.
fn hinted<T>(
    r: std::result::Result<Result<Option<T>>, tokio::time::error::Elapsed>,
) -> Result<Option<T>> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e @ Error::Protocol(_))) => Err(e),
        Ok(Err(e)) => {
            tracing::debug!("document session: {e}");
            Ok(None)
        }
        Err(_) => Ok(None),
    }
}

/// Syncs the peer's heads document; whether it shows that we hold every event of its log
/// (then the cursor moves to the log's end and no `Log` request is needed). Only when the
/// document is as current as the log (its `size` is the log's size when the session was
/// served) and we hold every head it lists: a head's id, held here, means its whole chain is.
async fn skip_log(inner: &Arc<Inner>, id: &str, conn: &Connection, cursor: u64) -> Result<bool> {
    let seen = hinted(
        tokio::time::timeout(
            RESPONSE_TIMEOUT,
            crate::docsync::pull(inner, id, conn, DocKind::Heads),
        )
        .await,
    )?;
    let Some(seen) = seen else {
        return Ok(false);
    };
    let h = seen.hint;
    if !(h.covered && h.size >= seen.size && h.size >= cursor) {
        return Ok(false);
    }
    if h.size > cursor {
        inner.set_cursor(id, h.size);
    }
    let stats = conn.stats();
    inner.live(id, |l| {
        l.behind = 0;
        l.last_sync_ms = Some(now_ms());
        l.bytes_in = stats.udp_rx.bytes;
        l.bytes_out = stats.udp_tx.bytes;
    });
    Ok(true)
}

/// One `Log` request: the peer's log size, the envelopes from `from`, and their share of
/// the in-flight budget (held until they are handed to the ledger).
async fn request_log<'a>(
    inner: &'a Inner,
    conn: &Connection,
    from: u64,
    max_events: u32,
) -> Result<(
    u64,
    Vec<bytes::Bytes>,
    Option<tokio::sync::SemaphorePermit<'a>>,
)> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(Error::transport)?;
    let request = Request::Log {
        net: inner.net.clone(),
        from,
        max_events,
        ticket: Some(inner.ticket.clone()),
        elide: true,
        have: inner.ledger.tree_size()?,
    };
    wire::write_json(&mut send, &request).await?;
    send.finish().map_err(Error::transport)?;
    let header: Header = wire::read_json(&mut recv, wire::HEADER_BYTES_MAX).await?;
    if let Some(code) = header.error {
        return Err(Error::Refused {
            code,
            message: header.message.unwrap_or_default(),
        });
    }
    let mut envelopes = Vec::new();
    let mut total = 0usize;
    let mut budget: Option<tokio::sync::SemaphorePermit<'a>> = None;
    while let Some(frame) =
        wire::read_frame(&mut recv, meshnode_schemas::limits::EVENT_BYTES_MAX).await?
    {
        total += frame.len();
        if envelopes.len() >= max_events as usize
            || (!envelopes.is_empty() && total > wire::RESPONSE_BYTES_MAX)
        {
            return Err(Error::protocol("more events than asked for"));
        }
        // At most an envelope's cap (64 KiB), so it fits a u32.
        let bytes = frame.len().max(1) as u32;
        let permit = match inner.inflight.try_acquire_many(bytes) {
            Ok(permit) => permit,
            // The budget is taken: what was read goes on to the ledger (the cursor moves past
            // it alone) and the rest of this answer is not read. Only an answer that holds
            // nothing yet waits, so no two pulls ever wait on each other.
            Err(tokio::sync::TryAcquireError::NoPermits) if budget.is_some() => {
                envelopes.push(bytes::Bytes::from(frame));
                let _ = recv.stop(0u32.into());
                return Ok((header.size, envelopes, budget));
            }
            Err(_) => inner
                .inflight
                .acquire_many(bytes)
                .await
                .map_err(|_| Error::transport("the mesh is stopping"))?,
        };
        match &mut budget {
            Some(b) => b.merge(permit),
            None => budget = Some(permit),
        }
        envelopes.push(bytes::Bytes::from(frame));
    }
    Ok((header.size, envelopes, budget))
}

/// Feeds a batch to the ledger in order; returns the cursor after the last event judged
/// (an event this node could not judge now — busy — is asked for again later).
async fn ingest(
    inner: &Inner,
    id: &str,
    cursor: u64,
    mut envelopes: Vec<bytes::Bytes>,
) -> Result<(u64, bool)> {
    let admitted = admit_authors(inner, id, &envelopes)?;
    let throttled = admitted < envelopes.len();
    envelopes.truncate(admitted);
    let n = envelopes.len() as u64;
    let mut peer = [0u8; 32];
    hex::decode_to_slice(id, &mut peer)
        .map_err(|_| Error::transport(format!("peer id {id} is not 32 bytes of hex")))?;
    // Leaves the peer elided (events we delivered to it) are ours already: skipped, counted.
    let (positions, real): (Vec<usize>, Vec<bytes::Bytes>) = envelopes
        .into_iter()
        .enumerate()
        .filter(|(_, e)| e.as_ref() != wire::ELIDED)
        .unzip();
    let receipts = inner.ledger.enqueue_many_from(real, Some(peer)).await;
    if receipts.len() != positions.len() {
        // Never move the cursor past events the ledger did not take.
        return Err(Error::transport("the ledger did not take the batch"));
    }
    let mut next = cursor + n;
    for (&i, receipt) in positions.iter().zip(receipts) {
        let Err(e) = receipt.wait().await else {
            continue;
        };
        // An event before it that was not judged (our limit, our failure, or a copy of it
        // from another peer in the same batch) may be what this one depends on: not the
        // peer's fault, and it is read again from there.
        let unjudged_before = next < cursor + n;
        let banned = match e.rule().map(|r| (r, r.class())) {
            Some((Rule::OutOfOrder, _)) if unjudged_before => false,
            Some((Rule::OutOfOrder, _)) => inner.penalise(id, SCORE_PROTOCOL, &e.to_string()),
            Some((_, class)) => match class {
                RuleClass::Malformed | RuleClass::TooLarge => {
                    inner.penalise(id, SCORE_MALFORMED, &e.to_string())
                }
                RuleClass::Broken => inner.penalise(id, SCORE_BROKEN, &e.to_string()),
                // Not judged (a limit of ours): ask again later.
                RuleClass::Busy => {
                    next = next.min(cursor + i as u64);
                    false
                }
            },
            // Not judged (the ledger is stopping): ask again later.
            None => {
                next = next.min(cursor + i as u64);
                false
            }
        };
        if banned {
            return Err(Error::transport("banned"));
        }
    }
    Ok((next, throttled))
}

/// How many of `envelopes` (a prefix) fit in the peer's quota of new authors. Envelopes
/// that do not decode are left to the ledger (which rejects them and the peer is scored).
fn admit_authors(inner: &Inner, id: &str, envelopes: &[bytes::Bytes]) -> Result<usize> {
    let mut seen = std::collections::HashSet::new();
    for (i, envelope) in envelopes.iter().enumerate() {
        let Ok(event) = meshnode_schemas::SignedEvent::decode(envelope) else {
            continue;
        };
        let author = event.body.author;
        if seen.contains(&author) || !inner.ledger.log(&author, 0, 1)?.is_empty() {
            continue;
        }
        if !inner.take_new_author(id) {
            tracing::warn!(
                peer = id,
                "the peer's quota of new authors for this hour is used up; pausing it"
            );
            return Ok(i);
        }
        seen.insert(author);
    }
    Ok(envelopes.len())
}

/// Asks a peer for its peers and remembers the new ones (peer exchange).
async fn exchange(inner: &Arc<Inner>, conn: &Connection) -> Result<()> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(Error::transport)?;
    wire::write_json(
        &mut send,
        &Request::Peers {
            net: inner.net.clone(),
        },
    )
    .await?;
    send.finish().map_err(Error::transport)?;
    let header: Header = wire::read_json(&mut recv, wire::HEADER_BYTES_MAX).await?;
    if header.peers.len() > EXCHANGE_MAX {
        return Err(Error::protocol("too many peers in an exchange"));
    }
    let own = hex::encode(inner.endpoint.id().as_bytes());
    for ticket in header.peers {
        let Ok((_, id)) = parse_ticket(&ticket) else {
            continue;
        };
        if id == own || inner.admissible(&id).is_err() {
            continue;
        }
        if let Ok(true) = inner.remember(&id, &ticket, Source::Exchange) {
            spawn_puller(inner, id);
        }
    }
    Ok(())
}

/// The server side of `/meshnode/sync/1`.
#[derive(Clone)]
struct Serve {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Serve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Serve")
    }
}

impl ProtocolHandler for Serve {
    async fn accept(&self, conn: Connection) -> std::result::Result<(), AcceptError> {
        let id = hex::encode(conn.remote_id().as_bytes());
        if self.inner.banned(&id) || self.inner.admissible(&id).is_err() {
            conn.close(1u32.into(), b"refused");
            return Ok(());
        }
        let Ok(permit) = self.inner.served.clone().try_acquire_owned() else {
            conn.close(2u32.into(), b"busy");
            return Ok(());
        };
        // Its own task: a panic there never reaches the router (which would stop every
        // protocol).
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_connection(&inner, &id, &conn).await {
                tracing::debug!(peer = id, "serving stopped: {e}");
            }
        });
        Ok(())
    }
}

/// Answers a connection's requests one at a time.
async fn serve_connection(inner: &Arc<Inner>, id: &str, conn: &Connection) -> Result<()> {
    // Answers the peer stopped reading: each cost us a read of its range, so a few end
    // the connection (an honest asker stops one only when its budget is full).
    let mut stopped = 0u32;
    loop {
        let (mut send, mut recv) = tokio::time::timeout(IDLE_TIMEOUT, conn.accept_bi())
            .await
            .map_err(|_| Error::transport("idle"))?
            .map_err(Error::transport)?;
        if inner.banned(id) {
            return Err(Error::transport("banned"));
        }
        let read = wire::read_json(&mut recv, wire::REQUEST_BYTES_MAX);
        let request: Request = match tokio::time::timeout(REQUEST_TIMEOUT, read)
            .await
            .unwrap_or_else(|_| Err(Error::protocol("no request within 10 s")))
        {
            Ok(r) => r,
            Err(e) => {
                let _ = refuse(&mut send, "bad_request", &e.to_string()).await;
                inner.penalise(id, SCORE_PROTOCOL, &e.to_string());
                // Whether or not it is a known peer: the connection ends.
                return Err(e);
            }
        };
        match request {
            Request::Log {
                net,
                from,
                max_events,
                ticket,
                elide,
                have,
            } => {
                if net != inner.net {
                    refuse(&mut send, "net_mismatch", "this node is of another network").await?;
                    continue;
                }
                if let Some(ticket) = ticket {
                    learn_dialer(inner, id, &ticket);
                }
                // The connection is authenticated as `id`: what it delivered, it has — unless
                // it lost its data since (a wiped data dir under the same key): then its log
                // is shorter than ours and nothing is elided.
                let elide = (elide && have >= inner.ledger.tree_size()?)
                    .then(|| conn.remote_id().as_bytes().to_owned());
                let served = tokio::time::timeout(
                    RESPONSE_TIMEOUT,
                    serve_log(inner, &mut send, from, max_events, elide),
                )
                .await
                .map_err(|_| Error::transport("the peer did not read its answer in time"))?;
                // An asker that stopped reading (its in-flight budget was full: it keeps what
                // it read) ends that stream, not the connection.
                match served {
                    Err(e @ (Error::Protocol(_) | Error::Ledger(_))) => return Err(e),
                    Err(e) => {
                        tracing::debug!(peer = id, "log answer ended: {e}");
                        stopped += 1;
                        if stopped > STOPPED_MAX {
                            return Err(Error::transport("the peer stopped too many answers"));
                        }
                    }
                    Ok(()) => {}
                }
            }
            Request::Doc { net, kind } => {
                if net != inner.net {
                    refuse(&mut send, "net_mismatch", "this node is of another network").await?;
                    continue;
                }
                // A session the replica ended early (it stopped reading an answer to a
                // document that was replaced) ends that stream, not the connection.
                match crate::docsync::serve(inner, id, &mut send, &mut recv, kind).await {
                    Err(e @ Error::Protocol(_)) => return Err(e),
                    Err(e) => tracing::debug!(peer = id, "document session ended: {e}"),
                    Ok(()) => {}
                }
            }
            Request::Peers { net } => {
                if net != inner.net {
                    refuse(&mut send, "net_mismatch", "this node is of another network").await?;
                    continue;
                }
                let now = now_ms();
                let peers: Vec<String> = lock(&inner.table)
                    .peers
                    .iter()
                    .filter(|(peer, r)| peer.as_str() != id && r.banned_until_ms <= now)
                    .take(EXCHANGE_MAX)
                    .map(|(_, r)| r.ticket.clone())
                    .collect();
                let header = Header {
                    size: inner.ledger.tree_size()?,
                    peers,
                    ..Header::default()
                };
                wire::write_json(&mut send, &header).await?;
                wire::write_frame(&mut send, &[]).await?;
                send.finish().map_err(Error::transport)?;
            }
        }
    }
}

/// Remembers a peer that dialled us, by the ticket it sent, if that ticket is its own: so
/// that we pull from it as it pulls from us.
fn learn_dialer(inner: &Arc<Inner>, id: &str, ticket: &str) {
    let Ok((_, ticket_id)) = parse_ticket(ticket) else {
        return;
    };
    if ticket_id != id || inner.admissible(id).is_err() {
        return;
    }
    if let Ok(true) = inner.remember(id, ticket, Source::Itself) {
        spawn_puller(inner, id.to_string());
    }
}

async fn serve_log(
    inner: &Inner,
    send: &mut iroh::endpoint::SendStream,
    from: u64,
    max_events: u32,
    elide: Option<[u8; 32]>,
) -> Result<()> {
    let size = inner.ledger.tree_size()?;
    let limit = max_events.min(wire::EVENTS_PER_RESPONSE_MAX) as usize;
    let envelopes = if from < size {
        inner
            .ledger
            .envelopes_since(from, limit, wire::RESPONSE_BYTES_MAX, elide)
            .await?
    } else {
        Vec::new()
    };
    wire::write_json(
        send,
        &Header {
            size,
            ..Header::default()
        },
    )
    .await?;
    for envelope in &envelopes {
        wire::write_frame(send, envelope.as_deref().unwrap_or(wire::ELIDED)).await?;
    }
    wire::write_frame(send, &[]).await?;
    send.finish().map_err(Error::transport)
}

async fn refuse(send: &mut iroh::endpoint::SendStream, code: &str, message: &str) -> Result<()> {
    wire::write_json(
        send,
        &Header {
            error: Some(code.to_string()),
            message: Some(message.to_string()),
            ..Header::default()
        },
    )
    .await?;
    send.finish().map_err(Error::transport)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_of(dir: &Path, learnt: usize, manual: usize) -> PeerTable {
        let mut table = PeerTable::load(dir).expect("empty table");
        for i in 0..learnt + manual {
            let record = PeerRecord {
                manual: i >= learnt,
                ..PeerRecord::default()
            };
            table.peers.insert(format!("{i:04}"), record);
        }
        table
    }

    #[test]
    fn learnt_peers_make_room_for_each_other_and_never_crowd_out_a_users() {
        let dir = tempfile::tempdir().expect("dir");
        let none = HashSet::new();
        // Under the cap: nothing to remove.
        let mut table = table_of(dir.path(), LEARNT_MAX - 1, 0);
        assert_eq!(
            make_room(&mut table, Source::Exchange, &none).expect("room"),
            None
        );
        // At the cap: a learnt peer that is not connected goes, not a connected one.
        let mut table = table_of(dir.path(), LEARNT_MAX, 0);
        let connected: HashSet<String> = (1..LEARNT_MAX).map(|i| format!("{i:04}")).collect();
        let gone = make_room(&mut table, Source::Itself, &connected).expect("room");
        assert_eq!(gone.as_deref(), Some("0000"));
        assert_eq!(table.peers.len(), LEARNT_MAX - 1);
        // All connected or banned: a learnt newcomer is refused.
        let mut table = table_of(dir.path(), LEARNT_MAX, 0);
        table.peers.get_mut("0000").expect("peer").banned_until_ms = u64::MAX;
        assert!(make_room(&mut table, Source::Exchange, &connected).is_err());
        assert_eq!(table.peers.len(), LEARNT_MAX);
        // A user's peer with the table full: a learnt one (even connected) makes room, a
        // banned one never does; with only users' peers, the user is told to remove one.
        let mut table = table_of(dir.path(), LEARNT_MAX, PEERS_MAX - LEARNT_MAX);
        table.peers.get_mut("0000").expect("peer").banned_until_ms = u64::MAX;
        let gone = make_room(&mut table, Source::User, &connected).expect("room");
        assert!(gone.is_some_and(|id| id != "0000"));
        // Users' peers and a few learnt ones fill the table: a learnt newcomer replaces one
        // of those (the table never passes its size).
        let mut table = table_of(dir.path(), 56, PEERS_MAX - 56);
        let gone = make_room(&mut table, Source::Exchange, &none).expect("room");
        assert!(gone.is_some_and(|id| id.as_str() < "0056"));
        assert_eq!(table.peers.len(), PEERS_MAX - 1);
        let mut table = table_of(dir.path(), 0, PEERS_MAX);
        let e = make_room(&mut table, Source::User, &none).expect_err("full");
        assert!(e.to_string().contains("remove one first"), "{e}");
    }
}
