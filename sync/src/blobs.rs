//! Blobs between peers, over iroh-blobs (its own ALPN on the mesh endpoint):
//! - the provider serves only public blobs — announced by this node's own `blob.host` (signed
//!   with the node key, which is its endpoint id) or the weights of an uncontested skill — to
//!   `get` and `get-many` alike; `observe` likewise; `push` is refused; HashSeq requests are
//!   refused (they would reach unchecked children). Anyone's `blob.host` would not do: a
//!   fresh key costs nothing, and it would unlock any blob stored here whose hash is known;
//! - a fetch asks the peers that host a blob first (a host's key is its endpoint id), then
//!   every other connected peer, one at a time, with verified streaming into the store under
//!   a GC hold; a peer whose data fails verification is scored and the next one tried; the
//!   blob is durable and pinned before the fetch returns.
//!
//! Envelopes (the ledger's small blobs live outside iroh-blobs' store) are not served here:
//! peers get them through `/meshnode/sync/1`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler};
use iroh_blobs::Hash;
use iroh_blobs::provider::events::{
    AbortReason, ConnectMode, EventMask, EventSender, ObserveMode, ProviderMessage, RequestMode,
    ThrottleMode,
};
use meshnode_ledger::Ledger;
use meshnode_schemas::BlobHash;

/// Provider requests waiting for a decision.
const DECISIONS_MAX: usize = 64;
/// Decisions made at once (each on a blocking thread, reading the ledger).
const DECIDING_MAX: usize = 8;
/// Hashes a `get-many` may name (it is refused beyond).
const GET_MANY_MAX: usize = 1024;
/// How long the set of skill weights is reused before it is read again (if the ledger grew).
const SKILL_BLOBS_TTL: Duration = Duration::from_secs(2);

/// What the provider asks us about (every request kind but throttling).
const MASK: EventMask = EventMask {
    connected: ConnectMode::None,
    get: RequestMode::Intercept,
    get_many: RequestMode::Intercept,
    push: RequestMode::Disabled,
    throttle: ThrottleMode::None,
    observe: ObserveMode::Intercept,
};

/// The blobs this node lets peers read.
pub(crate) struct Public {
    ledger: Ledger,
    skills: Mutex<SkillBlobs>,
}

#[derive(Default)]
struct SkillBlobs {
    /// The ledger's size when `blobs` was read, and when.
    tree_size: u64,
    read_at: Option<Instant>,
    blobs: Arc<HashSet<BlobHash>>,
}

impl Public {
    pub(crate) fn new(ledger: Ledger) -> Arc<Self> {
        Arc::new(Self {
            ledger,
            skills: Mutex::new(SkillBlobs::default()),
        })
    }

    /// Whether `blob` may be served. Blocking (ledger reads).
    pub(crate) fn allows(&self, blob: &BlobHash) -> bool {
        match self.ledger.hosts_blob(blob, &self.ledger.node()) {
            Ok(true) => return true,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!("blob provider: reading hosts: {e}");
                return false;
            }
        }
        self.skill_blobs().contains(blob)
    }

    /// The weights of every uncontested skill, read again when the ledger grew and the last
    /// read is older than [`SKILL_BLOBS_TTL`].
    fn skill_blobs(&self) -> Arc<HashSet<BlobHash>> {
        let size = self.ledger.tree_size().unwrap_or(0);
        let mut cached = crate::mesh::lock(&self.skills);
        let fresh = cached
            .read_at
            .is_some_and(|t| t.elapsed() < SKILL_BLOBS_TTL);
        if cached.read_at.is_some() && (fresh || cached.tree_size == size) {
            return cached.blobs.clone();
        }
        match self.ledger.skills() {
            Ok(skills) => {
                let blobs = skills
                    .iter()
                    .filter(|s| !s.contested)
                    .map(|s| s.blob)
                    .collect();
                *cached = SkillBlobs {
                    tree_size: size,
                    read_at: Some(Instant::now()),
                    blobs: Arc::new(blobs),
                };
            }
            Err(e) => tracing::warn!("blob provider: reading skills: {e}"),
        }
        cached.blobs.clone()
    }

    /// Whether every one of `hashes` may be served: at most [`GET_MANY_MAX`] distinct ones.
    fn allows_all(&self, hashes: &[Hash]) -> bool {
        let distinct: HashSet<&Hash> = hashes.iter().collect();
        distinct.len() <= GET_MANY_MAX
            && distinct
                .iter()
                .all(|h| self.allows(&BlobHash::from_bytes(*h.as_bytes())))
    }
}

/// The events channel of the provider, answered by a task that checks every request
/// against [`Public`].
pub(crate) fn guard(public: Arc<Public>) -> EventSender {
    let (sender, mut requests) = EventSender::channel(DECISIONS_MAX, MASK);
    let deciding = Arc::new(tokio::sync::Semaphore::new(DECIDING_MAX));
    tokio::spawn(async move {
        while let Some(message) = requests.recv().await {
            // At most DECIDING_MAX at once; past that the channel fills and the provider
            // waits, so a flood of requests cannot take the blocking pool from the ledger.
            let Ok(permit) = deciding.clone().acquire_owned().await else {
                break;
            };
            let public = public.clone();
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                decide(&public, message);
            });
        }
    });
    sender
}

fn verdict(ok: bool) -> Result<(), AbortReason> {
    if ok {
        Ok(())
    } else {
        Err(AbortReason::Permission)
    }
}

fn decide(public: &Public, message: ProviderMessage) {
    use futures_lite::future::block_on;
    // A requester that is gone needs no answer: send errors are ignored.
    match message {
        ProviderMessage::GetRequestReceived(m) => {
            let r = &m.request;
            let ok = r.ranges.is_blob() && public.allows_all(&[r.hash]);
            let _ = block_on(m.tx.send(verdict(ok)));
        }
        ProviderMessage::GetManyRequestReceived(m) => {
            let ok = public.allows_all(&m.request.hashes);
            let _ = block_on(m.tx.send(verdict(ok)));
        }
        ProviderMessage::ObserveRequestReceived(m) => {
            let ok = public.allows_all(&[m.request.hash]);
            let _ = block_on(m.tx.send(verdict(ok)));
        }
        ProviderMessage::PushRequestReceived(m) => {
            let _ = block_on(m.tx.send(verdict(false)));
        }
        _ => {}
    }
}

/// The iroh-blobs protocol over the node's store. Unlike `iroh_blobs::BlobsProtocol`, shutting
/// the router down does not shut the store down (the ledger still writes to it).
#[derive(Clone)]
pub(crate) struct Provider {
    pub(crate) store: iroh_blobs::api::Store,
    pub(crate) events: EventSender,
    /// Whether a peer (endpoint id, hex) is refused: banned, blocked or not allowed.
    pub(crate) refused: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    /// Permits of the connections served now.
    pub(crate) served: Arc<tokio::sync::Semaphore>,
    /// Connections served now, per peer (at most [`PER_PEER_MAX`] each).
    pub(crate) per_peer: Arc<Mutex<HashMap<String, usize>>>,
}

/// Blob connections one peer may have open at once.
const PER_PEER_MAX: usize = 4;

/// A peer's slot among [`Provider::per_peer`], given back on drop.
struct PeerSlot {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    id: String,
}

impl PeerSlot {
    fn take(counts: &Arc<Mutex<HashMap<String, usize>>>, id: String) -> Option<Self> {
        let mut map = crate::mesh::lock(counts);
        let n = map.entry(id.clone()).or_insert(0);
        if *n >= PER_PEER_MAX {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: counts.clone(),
            id,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = crate::mesh::lock(&self.counts);
        if let Some(n) = map.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.id);
            }
        }
    }
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Provider")
    }
}

impl ProtocolHandler for Provider {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let id = hex::encode(conn.remote_id().as_bytes());
        if (self.refused)(&id) {
            conn.close(1u32.into(), b"refused");
            return Ok(());
        }
        let Some(slot) = PeerSlot::take(&self.per_peer, id) else {
            conn.close(2u32.into(), b"busy");
            return Ok(());
        };
        let Ok(permit) = self.served.clone().try_acquire_owned() else {
            conn.close(2u32.into(), b"busy");
            return Ok(());
        };
        // Its own task: a panic there never reaches the router.
        let (store, events) = (self.store.clone(), self.events.clone());
        tokio::spawn(async move {
            let _held = (permit, slot);
            iroh_blobs::provider::handle_connection(conn, store, events).await;
        });
        Ok(())
    }
}
