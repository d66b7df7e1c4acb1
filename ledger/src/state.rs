//! What the ledger keeps per accepted event and the state folded from all of them, with the
//! invariants that hold between the two and the state digest that nodes compare.
//!
//! Everything here except the fields marked *local* is a function of the set of accepted
//! events alone (DESIGN.md §3 "Convergence"); the digest covers exactly those fields.

use std::collections::{BTreeMap, BTreeSet};

use meshnode_schemas::{AuthorKey, BlobHash, EventId, Kind};
use serde::{Deserialize, Serialize};

use crate::proof::ForkProof;

/// Fixed-point scale of basin sums: a coordinate `v` counts as `round(v · 2^32)`.
pub(crate) const BASIN_FIXED_SCALE: f64 = 4_294_967_296.0;
/// Largest coordinate magnitude a basin sum takes as it is (larger values are clamped in the
/// sum only): `2^40 · 2^32 · 10^6` per contribution leaves room for 2^35 contributions in i128.
pub(crate) const BASIN_VALUE_ABS_MAX: f64 = 1_099_511_627_776.0;

/// A credit an event gives (mints and transfers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    /// Recipient.
    pub to: AuthorKey,
    /// Amount in base units.
    pub amount: u64,
}

/// What the ledger keeps of an accepted event (the envelope itself is a blob).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// The event id.
    pub id: EventId,
    /// BlobHash of the envelope.
    pub envelope: BlobHash,
    /// The log.
    pub author: AuthorKey,
    /// Position in the log.
    pub seq: u64,
    /// Kind.
    pub kind: Kind,
    /// Author's clock (advisory).
    pub ts: i64,
    /// Previous event of the log.
    pub prev: Option<EventId>,
    /// Causal dependencies.
    pub deps: Vec<EventId>,
    /// Position in this node's transparency log (acceptance order). *Local.*
    pub index: u64,
    /// The credit this event gives, if any.
    pub credit: Option<Credit>,
    /// The amount this event debits from its author (transfers).
    pub debit: u64,
    /// Whether the event is contested (its log forked at or before its seq, or it spends a
    /// contested credit). Recomputed when a fork proof arrives.
    pub contested: bool,
    /// Causal depth: 1 + the largest depth of `prev` and `deps`. An event in the causal past
    /// of another has a smaller depth, which bounds searches of the causal past.
    pub depth: u64,
    /// The key that signs the next event of this branch of the log, when it is not the log's
    /// own key (`None` until a `key.rotate`: 32 bytes less in most rows).
    pub rotated_key: Option<AuthorKey>,
    /// Σ amounts of the credits this branch of the log has brought into its causal past
    /// (coverage), through this event.
    pub covered: u128,
    /// Σ debits of this branch of the log, through this event.
    pub sent: u128,
    /// The credits (and amounts) this event added to its branch's coverage, in coverage order.
    /// Debits spend coverage first in, first out: this event's debit spends the coverage range
    /// `[sent - debit, sent)`.
    pub covers: Vec<(EventId, u64)>,
}

impl EventRecord {
    /// The key that signs the next event of this branch of the log.
    pub fn key_next(&self) -> AuthorKey {
        self.rotated_key.unwrap_or(self.author)
    }

    /// The coverage range `[start, end)` this event's debit spends.
    pub fn spend_range(&self) -> (u128, u128) {
        (self.sent - u128::from(self.debit), self.sent)
    }

    /// The coverage range `[start, end)` of `credit` if this event covers it.
    pub fn cover_range(&self, credit: &EventId) -> Option<(u128, u128)> {
        let total: u128 = self.covers.iter().map(|(_, a)| u128::from(*a)).sum();
        let mut start = self.covered - total;
        for (id, amount) in &self.covers {
            let end = start + u128::from(*amount);
            if id == credit {
                return Some((start, end));
            }
            start = end;
        }
        None
    }
}

/// The state of one author's log and account.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorState {
    /// Last seq of the branch this node extended first (0: none). *Local* once the log forks.
    pub head_seq: u64,
    /// Last event of that branch. *Local* once the log forks.
    pub head_id: Option<EventId>,
    /// The last two signing keys of that branch: `(from_seq, key)`. A hint for the parallel
    /// signature pre-check (the records hold every branch's keys). *Local* once the log forks.
    pub keys: Vec<(u64, AuthorKey)>,
    /// Lowest forked seq: every event of the log from there on is contested.
    pub frozen_from: Option<u64>,
    /// Accepted events of this log (all branches).
    pub n_events: u64,
    /// Highest accepted seq (all branches).
    pub max_seq: u64,
    /// Credits to this author from accepted events.
    pub received: u128,
    /// The part of `received` from contested events.
    pub received_contested: u128,
    /// Debits of accepted transfers by this author.
    pub sent: u128,
    /// The part of `sent` from contested transfers.
    pub sent_contested: u128,
    /// Minted by this author (issuers).
    pub minted: u128,
    /// The part of `minted` from contested mints.
    pub minted_contested: u128,
    /// Coverage ranges of contested credits, recorded while the covering event was on the
    /// log's unforked prefix: a transfer on the prefix whose spend range meets one is
    /// contested. An index for that test, not part of the digest (a range recorded before a
    /// lower fork was known is harmless: everything above the fork is contested anyway).
    pub contested_ranges: Vec<(u128, u128)>,
    /// Credits to this author that no event of its log has covered yet (candidates for
    /// `deps`). Kept in a table of its own by the ledger (a popular account can collect many).
    #[serde(skip)]
    pub uncovered: BTreeSet<EventId>,
    /// `uncovered` by sender and seq, built on first use: a transfer's coverage then reads
    /// only the credits its `deps` reach, not every credit the account was ever sent (dust
    /// sent by others must not slow the owner's transfers). Derived, not in the digest.
    #[serde(skip)]
    pub credit_index: CreditIndex,
}

/// The unreferenced credits of one author, by `(sender, seq)`. Built lazily (from the
/// records of [`AuthorState::uncovered`]) and kept in step with it by the fold. Equal to any
/// other index: it is a cache, never part of the state's value.
#[derive(Clone, Default)]
pub struct CreditIndex(std::sync::OnceLock<CreditsBySender>);

/// See [`CreditIndex`].
#[derive(Clone, Default, Debug)]
pub struct CreditsBySender {
    by_sender: BTreeSet<(AuthorKey, u64, EventId)>,
    at: std::collections::HashMap<EventId, (AuthorKey, u64)>,
}

impl CreditsBySender {
    /// Adds one credit sent by `sender` at `seq`.
    pub fn insert(&mut self, id: EventId, sender: AuthorKey, seq: u64) {
        if self.at.insert(id, (sender, seq)).is_none() {
            self.by_sender.insert((sender, seq, id));
        }
    }

    /// Removes one credit.
    pub fn remove(&mut self, id: &EventId) {
        if let Some((sender, seq)) = self.at.remove(id) {
            self.by_sender.remove(&(sender, seq, *id));
        }
    }

    /// Credits sent by `sender` at seqs up to `seq`.
    pub fn up_to(&self, sender: AuthorKey, seq: u64) -> impl Iterator<Item = &EventId> + '_ {
        let low = (sender, 0, EventId::from_bytes([0; 32]));
        let high = (sender, seq, EventId::from_bytes([0xff; 32]));
        self.by_sender.range(low..=high).map(|(_, _, id)| id)
    }

    /// Every credit indexed, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = &EventId> + '_ {
        self.at.keys()
    }

    /// Credits indexed.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// Whether no credit is indexed.
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

impl CreditIndex {
    /// The index, if built.
    pub fn get(&self) -> Option<&CreditsBySender> {
        self.0.get()
    }

    /// Installs a freshly built index (no-op when one exists).
    pub fn set(&self, index: CreditsBySender) {
        let _ = self.0.set(index);
    }

    /// Keeps a built index in step with a new unreferenced credit.
    pub fn insert(&mut self, id: EventId, sender: AuthorKey, seq: u64) {
        if let Some(index) = self.0.get_mut() {
            index.insert(id, sender, seq);
        }
    }

    /// Keeps a built index in step with a credit that got covered.
    pub fn remove(&mut self, id: &EventId) {
        if let Some(index) = self.0.get_mut() {
            index.remove(id);
        }
    }
}

impl PartialEq for CreditIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for CreditIndex {}

impl std::fmt::Debug for CreditIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.get() {
            Some(index) => write!(f, "CreditIndex({} credits)", index.len()),
            None => write!(f, "CreditIndex(unbuilt)"),
        }
    }
}

impl AuthorState {
    /// A copy of everything but the unreferenced credits.
    pub fn without_credits(&self) -> AuthorState {
        AuthorState {
            uncovered: BTreeSet::new(),
            credit_index: CreditIndex::default(),
            head_seq: self.head_seq,
            head_id: self.head_id,
            keys: self.keys.clone(),
            frozen_from: self.frozen_from,
            n_events: self.n_events,
            max_seq: self.max_seq,
            received: self.received,
            received_contested: self.received_contested,
            sent: self.sent,
            sent_contested: self.sent_contested,
            minted: self.minted,
            minted_contested: self.minted_contested,
            contested_ranges: self.contested_ranges.clone(),
        }
    }

    /// The key that signs the event at `seq` on the branch this node extended first, as far as
    /// the kept keys tell (exact for seqs after the second-to-last rotation).
    pub fn key_at(&self, author: &AuthorKey, seq: u64) -> AuthorKey {
        self.keys
            .iter()
            .rev()
            .find(|(from, _)| *from <= seq)
            .map(|(_, key)| *key)
            .unwrap_or(*author)
    }

    /// Uncontested credits received.
    pub fn credits(&self) -> u128 {
        self.received - self.received_contested
    }

    /// Uncontested debits.
    pub fn debits(&self) -> u128 {
        self.sent - self.sent_contested
    }

    /// Spendable balance: uncontested credits minus uncontested debits. Never negative (an
    /// uncontested debit spends uncontested coverage only, each range once); `None` would be a
    /// broken invariant, which the audit reports.
    pub fn checked_balance(&self) -> Option<u128> {
        self.credits().checked_sub(self.debits())
    }

    /// Spendable balance (0 if the invariant were broken; see [`Self::checked_balance`]).
    pub fn balance(&self) -> u128 {
        self.checked_balance().unwrap_or(0)
    }

    /// Whether `seq` is on the unforked prefix of the log.
    pub fn on_prefix(&self, seq: u64) -> bool {
        self.frozen_from.is_none_or(|f| seq < f)
    }
}

/// A skill in the catalog.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SkillState {
    /// The `skill.publish` event.
    pub id: EventId,
    /// Publisher.
    pub author: AuthorKey,
    /// Author-chosen id.
    pub skill_id: String,
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Domain.
    pub domain: String,
    /// Weights blob.
    pub blob: BlobHash,
    /// Weights size.
    pub size: u64,
    /// Price.
    pub price: u64,
    /// Embedding dimension.
    pub dim: u32,
    /// `valid` endorsements.
    pub n_valid: u64,
    /// `invalid` endorsements.
    pub n_invalid: u64,
    /// Sum of endorsement scores.
    pub score_sum: u128,
    /// Published by a contested event.
    pub contested: bool,
}

/// A basin: its publish, its exact weighted sums and its latest version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BasinState {
    /// The `basin.publish` event (the basin's identity).
    pub id: EventId,
    /// Owner (publisher).
    pub owner: AuthorKey,
    /// Owner-chosen id.
    pub basin_id: String,
    /// Who besides the owner may send deltas.
    pub writers: Vec<AuthorKey>,
    /// Σ weight_ppm · round(value · 2^32) per coordinate (the publish has weight 10^6). Exact
    /// integers: the sum is the same in any order.
    pub sums: Vec<i128>,
    /// Σ weight_ppm per coordinate.
    pub weights: Vec<u128>,
    /// Number of versions (publish included).
    pub n_versions: u64,
    /// Latest version: the greatest `(depth, id)`.
    pub head: EventId,
    /// Depth of `head` in the version tree (the publish is 0).
    pub head_depth: u64,
}

impl BasinState {
    /// Current coordinates: the weighted average of the publish and every accepted delta.
    pub fn coordinates(&self) -> Vec<f32> {
        self.sums
            .iter()
            .zip(&self.weights)
            .map(|(s, w)| (*s as f64 / (*w as f64 * BASIN_FIXED_SCALE)) as f32)
            .collect()
    }

    /// Whether `author` may send deltas to this basin.
    pub fn admits(&self, author: &AuthorKey) -> bool {
        *author == self.owner || self.writers.contains(author)
    }
}

/// `round(v · 2^32)` with `v` clamped to ±[`BASIN_VALUE_ABS_MAX`].
pub(crate) fn basin_fixed(value: f32) -> i128 {
    let v = f64::from(value).clamp(-BASIN_VALUE_ABS_MAX, BASIN_VALUE_ABS_MAX);
    (v * BASIN_FIXED_SCALE).round() as i128
}

/// One version of a basin (a node of its Merkle-DAG history).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BasinVersion {
    /// The version's event.
    pub id: EventId,
    /// The basin (its publish event).
    pub basin: EventId,
    /// The version it updates (`None` for the publish).
    pub parent: Option<EventId>,
    /// Author of the version.
    pub author: AuthorKey,
    /// Coordinates along the path from the publish: each delta moves its parent's coordinates
    /// toward its values by its weight.
    pub coordinates: Vec<f32>,
    /// Distance of the delta's values from its anchor's coordinates (0 for the publish).
    pub distance: f64,
    /// Weight in parts per million (1 000 000 for the publish).
    pub weight_ppm: u64,
    /// The nearest version at or above this one that the basin's owner signed: outliers are
    /// measured from it, so a chain of deltas by writers cannot move the bound.
    pub anchor: EventId,
    /// Depth in the version tree (the publish is 0).
    pub depth: u64,
}

/// Reputation of a subject.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReputationState {
    /// Sum of deltas.
    pub score: i128,
    /// Number of deltas.
    pub n_deltas: u64,
}

/// A node registry entry (its latest `node.announce`: greatest `(seq, id)`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    /// The node's author key.
    pub author: AuthorKey,
    /// Service name.
    pub service: String,
    /// Endpoints.
    pub endpoints: Vec<String>,
    /// Capabilities.
    pub capabilities: Vec<String>,
    /// iroh address or ticket.
    pub addr: String,
    /// Basin signature.
    pub basin_signature: Vec<f32>,
    /// The announce event.
    pub last_event: EventId,
    /// Its seq.
    pub last_seq: u64,
    /// Author clock of the last announce (the heartbeat).
    pub last_ts: i64,
    /// Number of announces.
    pub n_announces: u64,
}

/// An author's latest `blob.host` for one blob (greatest `(seq, id)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMark {
    /// Seq of the deciding event.
    pub seq: u64,
    /// The deciding event.
    pub id: EventId,
    /// Whether it hosts the blob.
    pub pinned: bool,
}

/// Everything derived from the accepted events.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Accepted events.
    pub n_events: u64,
    /// Uncontested mints (= Σ spendable balances).
    pub supply: u128,
    /// Per author.
    pub authors: BTreeMap<AuthorKey, AuthorState>,
    /// Skill catalog, by publish event.
    pub skills: BTreeMap<EventId, SkillState>,
    /// Basins, by publish event.
    pub basins: BTreeMap<EventId, BasinState>,
    /// Reputation, by subject.
    pub reputation: BTreeMap<AuthorKey, ReputationState>,
    /// Node registry, by author.
    pub nodes: BTreeMap<AuthorKey, NodeState>,
    /// Who hosts which blob: each author's latest `blob.host` per blob.
    pub hosts: BTreeMap<BlobHash, BTreeMap<AuthorKey, HostMark>>,
    /// Canonical fork proofs, one per forked log.
    pub forks: BTreeMap<AuthorKey, ForkProof>,
    /// Contested events.
    pub contested: BTreeSet<EventId>,
}

/// The order-independent part of an author's state, as the digest sees it (the branch this
/// node extended first and the contested-range index are left out).
#[derive(Serialize)]
struct AuthorDigest<'a> {
    frozen_from: Option<u64>,
    n_events: u64,
    max_seq: u64,
    received: u128,
    received_contested: u128,
    sent: u128,
    sent_contested: u128,
    minted: u128,
    minted_contested: u128,
    uncovered: &'a BTreeSet<EventId>,
}

/// A BLAKE3 hash over the derived state, identical on every node that holds the same events.
pub type StateDigest = [u8; 32];

impl State {
    /// Blobs hosted by someone now.
    pub fn hosts_of(&self, blob: &BlobHash) -> Vec<AuthorKey> {
        self.hosts
            .get(blob)
            .map(|m| {
                m.iter()
                    .filter(|(_, mark)| mark.pinned)
                    .map(|(k, _)| *k)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The state digest: BLAKE3 over a canonical encoding of every order-independent part of
    /// the state (accounts and their contested parts, unreferenced credits, the contested set,
    /// fork proofs, skills, basins, reputation, nodes, hosts). Local fields (acceptance
    /// indexes, which branch this node extended first) are left out.
    pub fn digest(&self) -> StateDigest {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"meshnode/state/v1");
        let mut put = |label: &str, bytes: Vec<u8>| {
            hasher.update(label.as_bytes());
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
        };
        put("n_events", enc(&self.n_events));
        put("supply", enc(&self.supply));
        for (key, a) in &self.authors {
            let d = AuthorDigest {
                frozen_from: a.frozen_from,
                n_events: a.n_events,
                max_seq: a.max_seq,
                received: a.received,
                received_contested: a.received_contested,
                sent: a.sent,
                sent_contested: a.sent_contested,
                minted: a.minted,
                minted_contested: a.minted_contested,
                uncovered: &a.uncovered,
            };
            put("author", enc(&(key, &d)));
        }
        put("skills", enc(&self.skills));
        put("basins", enc(&self.basins));
        put("reputation", enc(&self.reputation));
        put("nodes", enc(&self.nodes));
        put("hosts", enc(&self.hosts));
        for (key, proof) in &self.forks {
            put("fork", enc(&(key, proof.seq, proof.ids())));
        }
        put("contested", enc(&self.contested));
        *hasher.finalize().as_bytes()
    }

    /// Checks the invariants that must hold between the parts of the state; returns what
    /// does not hold (empty when all do). The audit reports them; tests assert them.
    pub fn invariant_violations(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let minted: u128 = self
            .authors
            .values()
            .map(|a| a.minted - a.minted_contested)
            .sum();
        if minted != self.supply {
            out.push((
                "supply_mismatch",
                format!(
                    "supply {} but uncontested mints sum to {minted}",
                    self.supply
                ),
            ));
        }
        let mut held: u128 = 0;
        for (key, a) in &self.authors {
            match a.checked_balance() {
                Some(b) => held += b,
                None => out.push((
                    "negative_balance",
                    format!(
                        "{key} has uncontested debits {} above its uncontested credits {}",
                        a.debits(),
                        a.credits()
                    ),
                )),
            }
            if a.received_contested > a.received
                || a.sent_contested > a.sent
                || a.minted_contested > a.minted
            {
                out.push((
                    "contested_mismatch",
                    format!("{key} has more contested than total"),
                ));
            }
        }
        if held != self.supply {
            out.push((
                "supply_mismatch",
                format!("accounts hold {held} but the supply is {}", self.supply),
            ));
        }
        let n: u64 = self.authors.values().map(|a| a.n_events).sum();
        if n != self.n_events {
            out.push((
                "count_mismatch",
                format!("logs hold {n} events but {} were accepted", self.n_events),
            ));
        }
        out
    }
}

/// Canonical encoding for the digest (postcard: fixed field order, maps in key order).
fn enc<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("invariant: state values always encode")
}
