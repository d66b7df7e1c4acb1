//! The deterministic fold: validation rules 2–4 of DESIGN.md §3 and the derived state they
//! maintain. The same code runs at ingest (over the database) and in the audit (over events
//! re-read from blobs), so both compute exactly the same state.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use meshnode_schemas::{
    AuthorKey, BlobHash, EventId, Genesis, Kind, Payload, SignedEvent, verify_signature,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, Waiting, reject};

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
    /// Position in the transparency log (acceptance order).
    pub index: u64,
    /// The credit this event gives, if any.
    pub credit: Option<Credit>,
    /// The amount this event debits from its author (transfers).
    pub debit: u64,
    /// Whether the event is at or after a fork of its log.
    pub contested: bool,
}

/// The state of one author's log and account.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorState {
    /// Last accepted seq (0: none).
    pub head_seq: u64,
    /// Last accepted event.
    pub head_id: Option<EventId>,
    /// Signing keys over time: `(from_seq, key)`; the last applies to new events.
    pub keys: Vec<(u64, AuthorKey)>,
    /// First forked seq: the log is frozen from there on.
    pub frozen_from: Option<u64>,
    /// Credits to this author from accepted events.
    pub received: u64,
    /// The part of `received` from contested events (unspendable).
    pub received_contested: u64,
    /// Uncontested credits in the causal past of the log's head.
    pub covered: u64,
    /// Amount transferred out.
    pub sent: u64,
    /// Amount minted by this author (issuers).
    pub minted: u64,
    /// Credits to this author not yet in the causal past of its log (candidates for `deps`).
    /// Kept in a table of its own by the ledger (a popular account can collect many), so not
    /// part of the serialized row.
    #[serde(skip)]
    pub uncovered: BTreeSet<EventId>,
}

impl AuthorState {
    /// A copy of everything but the unreferenced credits.
    pub fn without_credits(&self) -> AuthorState {
        AuthorState {
            head_seq: self.head_seq,
            head_id: self.head_id,
            keys: self.keys.clone(),
            frozen_from: self.frozen_from,
            received: self.received,
            received_contested: self.received_contested,
            covered: self.covered,
            sent: self.sent,
            minted: self.minted,
            uncovered: BTreeSet::new(),
        }
    }

    /// The key that must sign the event at `seq`.
    pub fn key_at(&self, author: &AuthorKey, seq: u64) -> AuthorKey {
        self.keys
            .iter()
            .rev()
            .find(|(from, _)| *from <= seq)
            .map(|(_, key)| *key)
            .unwrap_or(*author)
    }

    /// Spendable balance: credits to this author that are not contested, minus what it sent.
    /// This is what the author can transfer next (after naming the uncovered credits in `deps`).
    pub fn balance(&self) -> i128 {
        i128::from(self.received) - i128::from(self.received_contested) - i128::from(self.sent)
    }

    /// What the author holds, contested credits included (sums to the supply over all authors).
    pub fn held(&self) -> i128 {
        i128::from(self.received) - i128::from(self.sent)
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
    pub score_sum: u64,
    /// Published by a contested event.
    pub contested: bool,
}

/// A basin: its publish, its running weighted average and its latest version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BasinState {
    /// The `basin.publish` event (the basin's identity).
    pub id: EventId,
    /// Owner (publisher).
    pub owner: AuthorKey,
    /// Owner-chosen id.
    pub basin_id: String,
    /// Σ weight·value per coordinate (the publish has weight 1).
    pub sums: Vec<f64>,
    /// Σ weight per coordinate.
    pub weights: Vec<f64>,
    /// Number of versions (publish included).
    pub n_versions: u64,
    /// Latest accepted version.
    pub head: EventId,
}

impl BasinState {
    /// Current coordinates: the weighted average of the publish and every accepted delta.
    pub fn coordinates(&self) -> Vec<f32> {
        self.sums
            .iter()
            .zip(&self.weights)
            .map(|(s, w)| (s / w) as f32)
            .collect()
    }
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
    /// Distance of the delta's values from the parent's coordinates (0 for the publish).
    pub distance: f64,
    /// Weight in parts per million (1 000 000 for the publish).
    pub weight_ppm: u64,
}

/// Reputation of a subject.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReputationState {
    /// Sum of deltas.
    pub score: i64,
    /// Number of deltas.
    pub n_deltas: u64,
}

/// A node registry entry (latest `node.announce`).
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
    /// Basin signature dimension.
    pub dim: u32,
    /// The announce event.
    pub last_event: EventId,
    /// Author clock of the last announce (the heartbeat).
    pub last_ts: i64,
    /// Number of announces.
    pub n_announces: u64,
}

/// A portable proof that an author signed two different events at the same seq.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkProof {
    /// The forked log.
    pub author: AuthorKey,
    /// The seq with two events.
    pub seq: u64,
    /// The key that signed both.
    pub signer: AuthorKey,
    /// The two envelopes (canonical DAG-CBOR bytes), in order of arrival here.
    #[serde(with = "serde_bytes_vec")]
    pub envelopes: [Vec<u8>; 2],
    /// Envelopes of the log's `key.rotate` events before `seq`, oldest first, proving that
    /// `signer` signs this log at `seq`.
    pub rotations: Vec<Vec<u8>>,
    /// How many events this node had accepted when it detected the fork (to replay it in
    /// the audit at the same point). Not part of what the proof proves.
    pub detected_at: u64,
}

mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[Vec<u8>; 2], s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(serde_bytes::Bytes::new(&v[0]))?;
        t.serialize_element(serde_bytes::Bytes::new(&v[1]))?;
        t.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[Vec<u8>; 2], D::Error> {
        let (a, b): (serde_bytes::ByteBuf, serde_bytes::ByteBuf) = Deserialize::deserialize(d)?;
        Ok([a.into_vec(), b.into_vec()])
    }
}

impl ForkProof {
    /// Verifies the proof on its own: both envelopes decode, name the same author and seq,
    /// differ, and verify strictly under `signer`, and the rotation chain proves `signer` signs
    /// the log at `seq`.
    pub fn verify(&self) -> Result<(EventId, EventId)> {
        let a = SignedEvent::decode(&self.envelopes[0])?;
        let b = SignedEvent::decode(&self.envelopes[1])?;
        for e in [&a, &b] {
            if e.body.author != self.author || e.body.seq != self.seq {
                return Err(reject(
                    "invalid_fork_proof",
                    "envelopes are not of this author and seq",
                ));
            }
        }
        if a.body.net != b.body.net {
            return Err(reject(
                "invalid_fork_proof",
                "envelopes are of different networks",
            ));
        }
        if a.id == b.id {
            return Err(reject(
                "invalid_fork_proof",
                "the two envelopes are the same event",
            ));
        }
        let mut key = self.author;
        let mut last_seq = 0;
        for bytes in &self.rotations {
            let rotation = SignedEvent::decode(bytes)?;
            let Payload::KeyRotate(r) = &rotation.body.payload else {
                return Err(reject(
                    "invalid_fork_proof",
                    "rotation envelope is not key.rotate",
                ));
            };
            if rotation.body.author != self.author
                || rotation.body.seq <= last_seq
                || rotation.body.seq >= self.seq
            {
                return Err(reject("invalid_fork_proof", "rotation chain out of order"));
            }
            rotation.verify(&key)?;
            key = r.new_key;
            last_seq = rotation.body.seq;
        }
        if key != self.signer {
            return Err(reject(
                "invalid_fork_proof",
                "signer is not the log's key at this seq",
            ));
        }
        a.verify(&self.signer)?;
        b.verify(&self.signer)?;
        Ok((a.id, b.id))
    }
}

/// Everything derived from the accepted events. Equality of two `State`s is what the audit
/// compares.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Accepted events.
    pub n_events: u64,
    /// Sum of all mints.
    pub supply: u64,
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
    /// Who hosts which blob.
    pub hosts: BTreeMap<BlobHash, BTreeSet<AuthorKey>>,
    /// Detected forks, by (author, seq).
    pub forks: BTreeMap<(AuthorKey, u64), ForkProof>,
}

/// Read access to accepted events and basin versions (the database at ingest, memory in the
/// audit).
pub trait Lookup {
    /// An accepted event by id.
    fn event(&self, id: &EventId) -> Result<Option<EventRecord>>;
    /// The accepted event of `author` at `seq`.
    fn at(&self, author: &AuthorKey, seq: u64) -> Result<Option<EventId>>;
    /// A basin version by id.
    fn basin_version(&self, id: &EventId) -> Result<Option<BasinVersion>>;
    /// Envelope bytes of an accepted event (for fork proofs).
    fn envelope(&self, id: &EventId) -> Result<Option<Vec<u8>>>;
}

/// New records produced by applying events, on top of a [`Lookup`].
#[derive(Debug, Default)]
pub struct Overlay {
    /// New or updated event records.
    pub events: HashMap<EventId, EventRecord>,
    /// New log entries.
    pub log: HashMap<(AuthorKey, u64), EventId>,
    /// New basin versions.
    pub versions: HashMap<EventId, BasinVersion>,
    /// Envelopes of events applied in this overlay.
    pub envelopes: HashMap<EventId, Vec<u8>>,
    /// Accepted ids in acceptance order.
    pub accepted: Vec<EventId>,
    /// State entries changed, to persist.
    pub touched: Touched,
    /// Changes to the authors' unreferenced credits, in order: `(author, credit, added)`.
    pub uncovered: Vec<(AuthorKey, EventId, bool)>,
    /// Changes to who hosts which blob, in order: `(blob, host, added)`.
    pub hosts: Vec<(BlobHash, AuthorKey, bool)>,
}

/// Keys of [`State`] entries changed by applying events.
#[derive(Debug, Default)]
pub struct Touched {
    /// Authors.
    pub authors: BTreeSet<AuthorKey>,
    /// Skills.
    pub skills: BTreeSet<EventId>,
    /// Basins.
    pub basins: BTreeSet<EventId>,
    /// Reputation subjects.
    pub reputation: BTreeSet<AuthorKey>,
    /// Node registry entries.
    pub nodes: BTreeSet<AuthorKey>,
    /// Forks.
    pub forks: BTreeSet<(AuthorKey, u64)>,
}

impl Touched {
    fn merge(&mut self, other: Touched) {
        self.authors.extend(other.authors);
        self.skills.extend(other.skills);
        self.basins.extend(other.basins);
        self.reputation.extend(other.reputation);
        self.nodes.extend(other.nodes);
        self.forks.extend(other.forks);
    }
}

/// A [`Lookup`] that sees an [`Overlay`] first.
pub(crate) struct Layered<'a, L: Lookup> {
    /// The base.
    pub(crate) base: &'a L,
    /// The overlay.
    pub(crate) overlay: &'a Overlay,
}

impl<L: Lookup> Lookup for Layered<'_, L> {
    fn event(&self, id: &EventId) -> Result<Option<EventRecord>> {
        match self.overlay.events.get(id) {
            Some(r) => Ok(Some(r.clone())),
            None => self.base.event(id),
        }
    }
    fn at(&self, author: &AuthorKey, seq: u64) -> Result<Option<EventId>> {
        match self.overlay.log.get(&(*author, seq)) {
            Some(id) => Ok(Some(*id)),
            None => self.base.at(author, seq),
        }
    }
    fn basin_version(&self, id: &EventId) -> Result<Option<BasinVersion>> {
        match self.overlay.versions.get(id) {
            Some(v) => Ok(Some(v.clone())),
            None => self.base.basin_version(id),
        }
    }
    fn envelope(&self, id: &EventId) -> Result<Option<Vec<u8>>> {
        match self.overlay.envelopes.get(id) {
            Some(e) => Ok(Some(e.clone())),
            None => self.base.envelope(id),
        }
    }
}

/// What applying one event did.
#[derive(Debug)]
pub enum Applied {
    /// Accepted at this transparency-log index.
    Accepted(EventRecord),
    /// The same event was accepted before.
    Duplicate(EventRecord),
    /// It cannot be applied yet.
    Waiting(Waiting),
}

/// The rules, bound to a genesis.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The network's genesis.
    pub genesis: Genesis,
    /// Its hash.
    pub net: BlobHash,
}

impl State {
    fn author_mut(&mut self, key: &AuthorKey) -> &mut AuthorState {
        self.authors.entry(*key).or_default()
    }

    /// Applies one decoded event whose envelope is stored at `envelope_hash`. `verified_with`
    /// is the key the signature was already checked against (by a parallel pre-check), if any.
    /// On `Err`, nothing changed (except that a detected fork is recorded, see
    /// `fork_detected`).
    pub fn apply<L: Lookup>(
        &mut self,
        rules: &Rules,
        base: &L,
        overlay: &mut Overlay,
        event: &SignedEvent,
        envelope_hash: BlobHash,
        verified_with: Option<AuthorKey>,
    ) -> Result<Applied> {
        let body = &event.body;
        if body.net != rules.net {
            return Err(reject(
                "wrong_net",
                format!(
                    "event is for network {} but this node is on {}",
                    body.net, rules.net
                ),
            ));
        }
        let author = body.author;
        let lookup = Layered { base, overlay };
        // A copy without the unreferenced credits (they can be many; read in place below).
        let state = self
            .authors
            .get(&author)
            .map(AuthorState::without_credits)
            .unwrap_or_default();
        let signer = state.key_at(&author, body.seq);
        let check_signature = |key: &AuthorKey| -> Result<()> {
            if verified_with == Some(*key) {
                Ok(())
            } else {
                verify_signature(key, &event.id, &event.sig).map_err(Error::from)
            }
        };

        // Rule 4 first: an event at an occupied seq is a duplicate or a fork.
        if body.seq <= state.head_seq {
            let existing = lookup.at(&author, body.seq)?.ok_or_else(|| {
                Error::Corrupt(format!("log of {author} has no event at seq {}", body.seq))
            })?;
            if existing == event.id {
                let record = lookup
                    .event(&existing)?
                    .ok_or_else(|| Error::Corrupt(format!("event {existing} not indexed")))?;
                return Ok(Applied::Duplicate(record));
            }
            check_signature(&signer)?;
            let (error, updates, touched) = self.fork(&lookup, event, existing, signer)?;
            for record in updates {
                overlay.events.insert(record.id, record);
            }
            overlay.touched.merge(touched);
            return Err(error);
        }
        if let Some(from) = state.frozen_from {
            return Err(reject(
                "author_frozen",
                format!("log {author} forked at seq {from} and accepts no more events"),
            ));
        }
        if let Err(e) = check_signature(&signer) {
            // A signature by a key this log rotated away from gets its own code.
            if state
                .keys
                .iter()
                .map(|(_, k)| *k)
                .chain([author])
                .any(|old| old != signer && verify_signature(&old, &event.id, &event.sig).is_ok())
            {
                return Err(reject(
                    "key_rotated",
                    format!("signed with a key that log {author} rotated away from"),
                ));
            }
            return Err(e);
        }

        // Rule 2: chain and dependencies.
        if body.seq > state.head_seq + 1 {
            return Ok(Applied::Waiting(Waiting {
                reason: "seq_gap",
                missing: body.prev.into_iter().collect(),
            }));
        }
        if body.prev != state.head_id {
            return Err(reject(
                "wrong_prev",
                format!(
                    "prev must be {} (the log's event at seq {})",
                    state
                        .head_id
                        .map(|i| i.to_hex())
                        .unwrap_or_else(|| "absent".into()),
                    state.head_seq
                ),
            ));
        }
        let mut missing = Vec::new();
        let mut dep_records = Vec::with_capacity(body.deps.len());
        for dep in &body.deps {
            match lookup.event(dep)? {
                Some(r) => dep_records.push(r),
                None => missing.push(*dep),
            }
        }
        if !missing.is_empty() {
            return Ok(Applied::Waiting(Waiting {
                reason: "missing_deps",
                missing,
            }));
        }

        // Rule 3: kind rules. Compute everything first, mutate only once the event is valid.
        let past = Past {
            lookup: &lookup,
            author,
            prev_seq: state.head_seq,
            deps: &dep_records,
            visited: std::cell::Cell::new(0),
        };
        let index = self.n_events;
        let mut record = EventRecord {
            id: event.id,
            envelope: envelope_hash,
            author,
            seq: body.seq,
            kind: body.kind(),
            ts: body.ts,
            prev: body.prev,
            deps: body.deps.clone(),
            index,
            credit: None,
            debit: 0,
            contested: false,
        };
        // Credits to the author that this event brings into its causal past. Only a transfer
        // needs them, and only as many as it spends beyond what is already covered.
        let mut newly_covered = Vec::new();
        let mut covered_amount = 0u64;
        if let Payload::TokenTransfer(p) = &body.payload {
            let spendable =
                |extra: u64| i128::from(state.covered) + i128::from(extra) - i128::from(state.sent);
            if i128::from(p.amount) > spendable(0) {
                let empty = BTreeSet::new();
                let uncovered = self.authors.get(&author).map_or(&empty, |a| &a.uncovered);
                let mut candidates = Vec::with_capacity(uncovered.len());
                for credit_id in uncovered {
                    let credit = lookup
                        .event(credit_id)?
                        .ok_or_else(|| Error::Corrupt(format!("credit {credit_id} not indexed")))?;
                    candidates.push(credit);
                }
                // Newest first: the search for recent credits is short.
                candidates.sort_by_key(|c| std::cmp::Reverse(c.index));
                let mut remaining = Vec::new();
                for credit in candidates {
                    if past.contains_fast(&credit) {
                        newly_covered.push(credit.id);
                        if !credit.contested {
                            covered_amount += credit.credit.map(|c| c.amount).unwrap_or(0);
                        }
                    } else {
                        remaining.push(credit);
                    }
                }
                for credit in remaining {
                    if i128::from(p.amount) <= spendable(covered_amount) {
                        break;
                    }
                    if past.contains(&credit.id)? {
                        newly_covered.push(credit.id);
                        if !credit.contested {
                            covered_amount += credit.credit.map(|c| c.amount).unwrap_or(0);
                        }
                    }
                }
            }
        }
        let mut version = None;
        match &body.payload {
            Payload::TokenMint(p) => {
                if !rules.genesis.is_issuer(&author) {
                    return Err(reject(
                        "not_issuer",
                        format!("{author} is not an issuer of this network's genesis"),
                    ));
                }
                self.supply
                    .checked_add(p.amount)
                    .ok_or_else(|| reject("overflow", "mint would overflow the total supply"))?;
                record.credit = Some(Credit {
                    to: p.to,
                    amount: p.amount,
                });
            }
            Payload::TokenTransfer(p) => {
                let spendable =
                    i128::from(state.covered) + i128::from(covered_amount) - i128::from(state.sent);
                if i128::from(p.amount) > spendable {
                    return Err(reject(
                        "insufficient_balance",
                        format!(
                            "transfer of {} exceeds the {} spendable from credits in this \
                             event's causal past; name unreferenced credits in deps",
                            p.amount,
                            spendable.max(0)
                        ),
                    ));
                }
                record.credit = Some(Credit {
                    to: p.to,
                    amount: p.amount,
                });
                record.debit = p.amount;
            }
            Payload::SkillEndorse(p) => {
                let skill = lookup.event(&p.skill)?;
                if skill.as_ref().map(|r| r.kind) != Some(Kind::SkillPublish)
                    || !self.skills.contains_key(&p.skill)
                {
                    return Err(reject(
                        "unknown_skill",
                        format!("{} is not an accepted skill.publish", p.skill),
                    ));
                }
                if !past.contains(&p.skill)? {
                    return Err(reject(
                        "not_in_causal_past",
                        format!("skill {} must be in deps or their causal past", p.skill),
                    ));
                }
            }
            Payload::BasinPublish(p) => {
                version = Some(BasinVersion {
                    id: event.id,
                    basin: event.id,
                    parent: None,
                    author,
                    coordinates: p.coordinates.values(),
                    distance: 0.0,
                    weight_ppm: meshnode_schemas::limits::WEIGHT_PPM_MAX,
                });
            }
            Payload::BasinDelta(p) => {
                let parent = lookup.basin_version(&p.parent)?.ok_or_else(|| {
                    reject(
                        "unknown_parent",
                        format!("{} is not an accepted basin version", p.parent),
                    )
                })?;
                let basin = self.basins.get(&parent.basin).ok_or_else(|| {
                    Error::Corrupt(format!(
                        "basin {} of version {} missing",
                        parent.basin, p.parent
                    ))
                })?;
                if basin.basin_id != p.basin_id {
                    return Err(reject(
                        "basin_mismatch",
                        format!(
                            "parent {} is a version of basin `{}`, not `{}`",
                            p.parent, basin.basin_id, p.basin_id
                        ),
                    ));
                }
                if !past.contains(&p.parent)? {
                    return Err(reject(
                        "not_in_causal_past",
                        format!("parent {} must be in deps or their causal past", p.parent),
                    ));
                }
                let dim = parent.coordinates.len();
                let values = p.values.values();
                let indices: Vec<usize> = if p.indices.is_empty() {
                    if values.len() != dim {
                        return Err(reject(
                            "dimension_mismatch",
                            format!("{} values for a basin of {dim} coordinates", values.len()),
                        ));
                    }
                    (0..dim).collect()
                } else {
                    if p.indices.iter().any(|&i| i as usize >= dim) {
                        return Err(reject(
                            "dimension_mismatch",
                            format!("an index is outside the basin's {dim} coordinates"),
                        ));
                    }
                    p.indices.iter().map(|&i| i as usize).collect()
                };
                let distance = indices
                    .iter()
                    .zip(&values)
                    .map(|(&i, &v)| {
                        let d = f64::from(v) - f64::from(parent.coordinates[i]);
                        d * d
                    })
                    .sum::<f64>()
                    .sqrt();
                if distance > rules.genesis.basin_outlier_max {
                    return Err(reject(
                        "basin_outlier",
                        format!(
                            "delta is {distance:.4} away from its parent, more than the \
                             network's basin_outlier_max {}",
                            rules.genesis.basin_outlier_max
                        ),
                    ));
                }
                let w = p.weight_ppm as f32 / meshnode_schemas::limits::WEIGHT_PPM_MAX as f32;
                let mut coordinates = parent.coordinates.clone();
                for (&i, &v) in indices.iter().zip(&values) {
                    coordinates[i] += w * (v - coordinates[i]);
                }
                version = Some(BasinVersion {
                    id: event.id,
                    basin: parent.basin,
                    parent: Some(p.parent),
                    author,
                    coordinates,
                    distance,
                    weight_ppm: p.weight_ppm,
                });
            }
            Payload::KeyRotate(p) => {
                if p.new_key == signer {
                    return Err(reject("invalid_field", "new_key is the key already in use"));
                }
            }
            Payload::NodeAnnounce(_)
            | Payload::SkillPublish(_)
            | Payload::ReputationDelta(_)
            | Payload::BlobHost(_) => {}
        }

        // The event is valid: apply it.
        self.n_events += 1;
        {
            let a = self.author_mut(&author);
            a.head_seq = body.seq;
            a.head_id = Some(event.id);
            for id in &newly_covered {
                a.uncovered.remove(id);
            }
            overlay
                .uncovered
                .extend(newly_covered.iter().map(|id| (author, *id, false)));
            a.covered += covered_amount;
            a.sent += record.debit;
        }
        match &body.payload {
            Payload::TokenMint(p) => {
                self.supply += p.amount;
                self.author_mut(&author).minted += p.amount;
            }
            Payload::KeyRotate(p) => {
                self.author_mut(&author)
                    .keys
                    .push((body.seq + 1, p.new_key));
            }
            Payload::SkillPublish(p) => {
                self.skills.insert(
                    event.id,
                    SkillState {
                        id: event.id,
                        author,
                        skill_id: p.skill_id.clone(),
                        name: p.name.clone(),
                        version: p.version.clone(),
                        domain: p.domain.clone(),
                        blob: p.blob,
                        size: p.size,
                        price: p.price,
                        dim: p.embedding.dim() as u32,
                        n_valid: 0,
                        n_invalid: 0,
                        score_sum: 0,
                        contested: false,
                    },
                );
            }
            Payload::SkillEndorse(p) => {
                if let Some(skill) = self.skills.get_mut(&p.skill) {
                    if p.verdict == "valid" {
                        skill.n_valid += 1;
                    } else {
                        skill.n_invalid += 1;
                    }
                    skill.score_sum += p.score;
                }
            }
            Payload::BasinPublish(p) => {
                let values = p.coordinates.values();
                self.basins.insert(
                    event.id,
                    BasinState {
                        id: event.id,
                        owner: author,
                        basin_id: p.basin_id.clone(),
                        sums: values.iter().map(|&v| f64::from(v)).collect(),
                        weights: vec![1.0; values.len()],
                        n_versions: 1,
                        head: event.id,
                    },
                );
            }
            Payload::BasinDelta(p) => {
                let v = version
                    .as_ref()
                    .expect("invariant: a valid delta has a version");
                if let Some(basin) = self.basins.get_mut(&v.basin) {
                    let w = p.weight_ppm as f64 / meshnode_schemas::limits::WEIGHT_PPM_MAX as f64;
                    let values = p.values.values();
                    let indices: Vec<usize> = if p.indices.is_empty() {
                        (0..basin.sums.len()).collect()
                    } else {
                        p.indices.iter().map(|&i| i as usize).collect()
                    };
                    for (&i, &value) in indices.iter().zip(&values) {
                        basin.sums[i] += w * f64::from(value);
                        basin.weights[i] += w;
                    }
                    basin.n_versions += 1;
                    basin.head = event.id;
                }
            }
            Payload::ReputationDelta(p) => {
                let r = self.reputation.entry(p.subject).or_default();
                r.score += p.delta;
                r.n_deltas += 1;
            }
            Payload::NodeAnnounce(p) => {
                let entry = self.nodes.entry(author).or_insert_with(|| NodeState {
                    author,
                    service: String::new(),
                    endpoints: Vec::new(),
                    capabilities: Vec::new(),
                    addr: String::new(),
                    dim: 0,
                    last_event: event.id,
                    last_ts: body.ts,
                    n_announces: 0,
                });
                entry.service = p.service.clone();
                entry.endpoints = p.endpoints.clone();
                entry.capabilities = p.capabilities.clone();
                entry.addr = p.addr.clone();
                entry.dim = p.basin_signature.dim() as u32;
                entry.last_event = event.id;
                entry.last_ts = body.ts;
                entry.n_announces += 1;
            }
            Payload::BlobHost(p) => {
                let hosts = self.hosts.entry(p.blob).or_default();
                let changed = if p.pinned {
                    hosts.insert(author)
                } else {
                    let removed = hosts.remove(&author);
                    if hosts.is_empty() {
                        self.hosts.remove(&p.blob);
                    }
                    removed
                };
                if changed {
                    overlay.hosts.push((p.blob, author, p.pinned));
                }
            }
            Payload::TokenTransfer(_) => {}
        }
        if let Some(credit) = record.credit {
            let recipient = self.author_mut(&credit.to);
            recipient.received += credit.amount;
            if credit.to == author {
                // A transfer to oneself is in the causal past of the author's next event.
                recipient.covered += credit.amount;
            } else {
                recipient.uncovered.insert(event.id);
                overlay.uncovered.push((credit.to, event.id, true));
            }
        }
        let touched = &mut overlay.touched;
        touched.authors.insert(author);
        if let Some(credit) = record.credit {
            touched.authors.insert(credit.to);
        }
        match &body.payload {
            Payload::SkillPublish(_) => {
                touched.skills.insert(event.id);
            }
            Payload::SkillEndorse(p) => {
                touched.skills.insert(p.skill);
            }
            Payload::BasinPublish(_) => {
                touched.basins.insert(event.id);
            }
            Payload::ReputationDelta(p) => {
                touched.reputation.insert(p.subject);
            }
            Payload::NodeAnnounce(_) => {
                touched.nodes.insert(author);
            }
            _ => {}
        }
        if let Some(v) = version {
            if let Some(parent) = v.parent.is_some().then_some(v.basin) {
                touched.basins.insert(parent);
            }
            overlay.versions.insert(event.id, v);
        }
        overlay.log.insert((author, body.seq), event.id);
        overlay.events.insert(event.id, record.clone());
        overlay.envelopes.insert(event.id, event.envelope.clone());
        overlay.accepted.push(event.id);
        Ok(Applied::Accepted(record))
    }

    /// Records a fork of `event`'s log at its seq: a proof, the log frozen from there, its
    /// events from there contested and their credits unspendable. Returns the rejection to
    /// report for `event`.
    fn fork<L: Lookup>(
        &mut self,
        lookup: &Layered<'_, L>,
        event: &SignedEvent,
        existing: EventId,
        signer: AuthorKey,
    ) -> Result<(Error, Vec<EventRecord>, Touched)> {
        let author = event.body.author;
        let seq = event.body.seq;
        if self.forks.contains_key(&(author, seq)) {
            return Ok((
                reject(
                    "fork_detected",
                    format!("log {author} is already known to fork at seq {seq}"),
                ),
                Vec::new(),
                Touched::default(),
            ));
        }
        let existing_envelope = lookup
            .envelope(&existing)?
            .ok_or_else(|| Error::Corrupt(format!("envelope of {existing} missing")))?;
        let state = self.authors.get(&author).cloned().unwrap_or_default();
        let mut rotations = Vec::new();
        for s in 1..seq {
            if state.keys.iter().any(|(from, _)| *from == s + 1) {
                let id = lookup
                    .at(&author, s)?
                    .ok_or_else(|| Error::Corrupt(format!("log {author} misses seq {s}")))?;
                rotations.push(
                    lookup
                        .envelope(&id)?
                        .ok_or_else(|| Error::Corrupt(format!("envelope of {id} missing")))?,
                );
            }
        }
        let proof = ForkProof {
            author,
            seq,
            signer,
            envelopes: [existing_envelope, event.envelope.clone()],
            rotations,
            detected_at: self.n_events,
        };
        self.forks.insert((author, seq), proof);
        let mut updates = Vec::new();
        let mut touched = Touched::default();
        touched.authors.insert(author);
        touched.forks.insert((author, seq));
        let head_seq = state.head_seq;
        let first = state.frozen_from.map_or(seq, |f| f.min(seq));
        self.author_mut(&author).frozen_from = Some(first);
        // Everything of the log from the fork on is contested; its credits become unspendable.
        for s in seq..=head_seq {
            let Some(id) = lookup.at(&author, s)? else {
                continue;
            };
            let Some(mut record) = lookup.event(&id)? else {
                continue;
            };
            if record.contested {
                continue;
            }
            record.contested = true;
            if record.kind == Kind::SkillPublish
                && let Some(skill) = self.skills.get_mut(&id)
            {
                skill.contested = true;
            }
            if let Some(credit) = record.credit {
                let recipient = self.author_mut(&credit.to);
                recipient.received_contested += credit.amount;
                if !recipient.uncovered.contains(&id) && credit.to != author {
                    recipient.covered = recipient.covered.saturating_sub(credit.amount);
                }
                touched.authors.insert(credit.to);
            }
            if record.kind == Kind::SkillPublish {
                touched.skills.insert(id);
            }
            updates.push(record);
        }
        Ok((
            reject(
                "fork_detected",
                format!(
                    "log {author} already has event {existing} at seq {seq}; both are now \
                     contested and the log is frozen (GET /v1/forks has the proof)"
                ),
            ),
            updates,
            touched,
        ))
    }
}

/// Most events a causal-past search of one new event may visit. Credits are found in O(1) when
/// named in `deps` (or when a dep is a later event of the credit's log); the search is for
/// credits reached only transitively.
pub const PAST_SEARCH_EVENTS_MAX: usize = 200_000;

/// The causal past of a new event: its author's log up to `prev_seq` and everything reachable
/// from its deps.
struct Past<'a, L: Lookup> {
    lookup: &'a Layered<'a, L>,
    author: AuthorKey,
    prev_seq: u64,
    deps: &'a [EventRecord],
    visited: std::cell::Cell<usize>,
}

impl<L: Lookup> Past<'_, L> {
    /// The O(deps) cases: `t` is in the author's own log, named in deps, or a dep is a later
    /// event of `t`'s log.
    fn contains_fast(&self, t: &EventRecord) -> bool {
        (t.author == self.author && t.seq <= self.prev_seq)
            || self
                .deps
                .iter()
                .any(|d| d.id == t.id || (d.author == t.author && d.seq >= t.seq))
    }

    /// Whether `target` (an accepted event) is in this causal past. The search only visits
    /// events accepted after `target` (an event is accepted only after its whole causal past),
    /// so it is cheap for recent targets.
    fn contains(&self, target: &EventId) -> Result<bool> {
        let Some(t) = self.lookup.event(target)? else {
            return Ok(false);
        };
        if self.contains_fast(&t) {
            return Ok(true);
        }
        let mut stack: Vec<EventRecord> = self.deps.to_vec();
        // The author's own earlier events are in the past too; start from its head.
        if self.prev_seq > 0
            && let Some(head) = self.lookup.at(&self.author, self.prev_seq)?
            && let Some(r) = self.lookup.event(&head)?
        {
            stack.push(r);
        }
        let mut seen: HashSet<EventId> = HashSet::new();
        while let Some(x) = stack.pop() {
            if x.id == t.id || (x.author == t.author && x.seq >= t.seq) {
                return Ok(true);
            }
            if x.index < t.index || !seen.insert(x.id) {
                continue;
            }
            let visited = self.visited.get() + 1;
            self.visited.set(visited);
            if visited > PAST_SEARCH_EVENTS_MAX {
                return Err(reject(
                    "causal_past_too_large",
                    format!(
                        "finding {target} in this event's causal past needs more than \
                         {PAST_SEARCH_EVENTS_MAX} steps; name it (or a later event of its log) \
                         in deps"
                    ),
                ));
            }
            for id in x.prev.iter().chain(&x.deps) {
                if seen.contains(id) {
                    continue;
                }
                if let Some(r) = self.lookup.event(id)?
                    && r.index >= t.index
                {
                    stack.push(r);
                }
            }
        }
        Ok(false)
    }
}
