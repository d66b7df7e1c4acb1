//! The deterministic fold: validation rules 1–4 of DESIGN.md §3 and the state they maintain.
//!
//! [`State::apply`] runs in three steps. *Resolve*: a known event is a duplicate; an event whose
//! `prev` or `deps` are not accepted yet waits. *Check* ([`State::check`], pure): the rules,
//! judged on the event and its causal past only, giving an [`Effect`] or a rejection. *Commit*
//! ([`State::commit`]): applies the effect, records a fork when the event's seq is occupied
//! (both branches are kept), and recomputes what is contested. The same code runs at ingest
//! and in the audit, so both compute the same state, and the same events give the same state
//! in any order (DESIGN.md §3 "Convergence").

use std::collections::{BTreeMap, BTreeSet, HashMap};

use meshnode_schemas::{
    AuthorKey, BlobHash, EventId, Genesis, Kind, Payload, SignedEvent, verify_signature,
};

use crate::error::{Error, Result, Rule, Waiting, reject};
pub use crate::past::PAST_SEARCH_EVENTS_MAX;
use crate::past::{Past, descends};
pub use crate::proof::ForkProof;
pub use crate::state::{
    AuthorState, BasinState, BasinVersion, Credit, EventRecord, HostMark, NodeState,
    ReputationState, SkillState, State, StateDigest,
};
use crate::state::{CreditsBySender, basin_fixed};

/// Read access to accepted events and basin versions (the database at ingest, memory in the
/// audit).
pub trait Lookup {
    /// An accepted event by id.
    fn event(&self, id: &EventId) -> Result<Option<EventRecord>>;
    /// Every accepted event of `author` at `seq` (more than one when the log forked there),
    /// ordered by id.
    fn at(&self, author: &AuthorKey, seq: u64) -> Result<Vec<EventId>>;
    /// A basin version by id.
    fn basin_version(&self, id: &EventId) -> Result<Option<BasinVersion>>;
    /// Envelope bytes of an accepted event (for fork proofs).
    fn envelope(&self, id: &EventId) -> Result<Option<Vec<u8>>>;
    /// The events of the recipient's log that covered `credit` (one per branch at most).
    fn covered_by(&self, credit: &EventId) -> Result<Vec<EventId>>;
}

/// New records produced by applying events, on top of a [`Lookup`].
#[derive(Debug, Default)]
pub struct Overlay {
    /// New or updated event records.
    pub events: HashMap<EventId, EventRecord>,
    /// New log entries `(author, seq, id)`.
    pub log: BTreeSet<(AuthorKey, u64, EventId)>,
    /// New basin versions.
    pub versions: HashMap<EventId, BasinVersion>,
    /// Envelopes of events applied in this overlay.
    pub envelopes: HashMap<EventId, Vec<u8>>,
    /// New coverings: credit → covering events.
    pub covered_by: HashMap<EventId, Vec<EventId>>,
    /// Accepted ids in acceptance order.
    pub accepted: Vec<EventId>,
    /// State entries changed, to persist.
    pub touched: Touched,
    /// Changes to the authors' unreferenced credits, in order: `(author, credit, added)`.
    pub uncovered: Vec<(AuthorKey, EventId, bool)>,
    /// New deciding `blob.host` marks, in order.
    pub hosts: Vec<(BlobHash, AuthorKey, HostMark)>,
    /// Events that became contested, in order.
    pub contested: Vec<EventId>,
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
    /// Fork proofs (by forked log).
    pub forks: BTreeSet<AuthorKey>,
}

const ID_MIN: EventId = EventId::from_bytes([0; 32]);
const ID_MAX: EventId = EventId::from_bytes([0xff; 32]);

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
    fn at(&self, author: &AuthorKey, seq: u64) -> Result<Vec<EventId>> {
        let mut ids = self.base.at(author, seq)?;
        ids.extend(
            self.overlay
                .log
                .range((*author, seq, ID_MIN)..=(*author, seq, ID_MAX))
                .map(|(_, _, id)| *id),
        );
        ids.sort();
        ids.dedup();
        Ok(ids)
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
    fn covered_by(&self, credit: &EventId) -> Result<Vec<EventId>> {
        let mut ids = self.base.covered_by(credit)?;
        if let Some(more) = self.overlay.covered_by.get(credit) {
            ids.extend(more);
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
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

/// What a valid event changes: its record (with its chain values and coverage) and, for basin
/// events, its version. Produced by [`State::check`], applied by [`State::commit`].
#[derive(Debug)]
pub struct Effect {
    /// The record to store.
    pub record: EventRecord,
    /// The basin version it adds.
    pub version: Option<BasinVersion>,
}

/// The rules, bound to a genesis.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The network's genesis.
    pub genesis: Genesis,
    /// Its hash.
    pub net: BlobHash,
}

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::Corrupt(what.to_string())
}

fn record_of<L: Lookup>(lookup: &L, id: &EventId) -> Result<EventRecord> {
    lookup
        .event(id)?
        .ok_or_else(|| corrupt(format!("event {id} not indexed")))
}

/// Rotations an author's row keeps (see `commit_log`).
const AUTHOR_KEYS_KEPT: usize = 2;

/// The amount a credit record gives (every candidate credit gives something).
fn credit_amount(record: &EventRecord) -> Result<u64> {
    record
        .credit
        .map(|c| c.amount)
        .ok_or_else(|| corrupt(format!("credit {} gives nothing", record.id)))
}

/// The seq of the event whose predecessor is `prev`.
fn past_seq(prev: Option<&EventRecord>) -> u64 {
    prev.map_or(1, |p| p.seq + 1)
}

fn ranges_meet(ranges: &[(u128, u128)], (lo, hi): (u128, u128)) -> bool {
    lo < hi && ranges.iter().any(|&(a, b)| a < hi && lo < b)
}

impl State {
    fn author_mut(&mut self, key: &AuthorKey) -> &mut AuthorState {
        self.authors.entry(*key).or_default()
    }

    /// Applies one decoded event whose envelope is stored at `envelope_hash`. `verified_with`
    /// is the key the signature was already checked against (by a parallel pre-check), if any.
    /// On a rejection ([`Error::Rejected`]) nothing changed; on any other error (a lookup that
    /// failed mid-commit) the state may be part-applied and the caller must discard it (the
    /// worker reloads from the index, the audit stops).
    pub fn apply<L: Lookup>(
        &mut self,
        rules: &Rules,
        base: &L,
        overlay: &mut Overlay,
        event: &SignedEvent,
        envelope_hash: BlobHash,
        verified_with: Option<AuthorKey>,
    ) -> Result<Applied> {
        let effect = {
            let lookup = Layered {
                base,
                overlay: &*overlay,
            };
            if let Some(record) = lookup.event(&event.id)? {
                return Ok(Applied::Duplicate(record));
            }
            let body = &event.body;
            if body.net != rules.net {
                return Err(reject(
                    Rule::WrongNet,
                    format!(
                        "event is for network {} but this node is on {}",
                        body.net, rules.net
                    ),
                ));
            }
            let prev = match &body.prev {
                None => None,
                Some(id) => match lookup.event(id)? {
                    Some(r) => Some(r),
                    None => {
                        return Ok(Applied::Waiting(Waiting {
                            reason: "seq_gap",
                            missing: vec![*id],
                        }));
                    }
                },
            };
            self.check_chain(event, prev.as_ref(), verified_with)?;
            let mut deps = Vec::with_capacity(body.deps.len());
            let mut missing = Vec::new();
            for dep in &body.deps {
                match lookup.event(dep)? {
                    Some(r) => deps.push(r),
                    None => missing.push(*dep),
                }
            }
            if !missing.is_empty() {
                return Ok(Applied::Waiting(Waiting {
                    reason: "missing_deps",
                    missing,
                }));
            }
            self.check(rules, &lookup, event, envelope_hash, prev, deps)?
        };
        let record = self.commit(base, overlay, event, effect)?;
        Ok(Applied::Accepted(record))
    }

    /// Rule 1 and 2 for an event whose `prev` is accepted: `prev` is the log's event at
    /// `seq - 1` and the signature verifies under the key that branch uses at `seq`.
    fn check_chain(
        &self,
        event: &SignedEvent,
        prev: Option<&EventRecord>,
        verified_with: Option<AuthorKey>,
    ) -> Result<()> {
        let body = &event.body;
        let author = body.author;
        if let Some(p) = prev
            && (p.author != author || p.seq + 1 != body.seq)
        {
            return Err(reject(
                Rule::WrongPrev,
                format!(
                    "prev {} is seq {} of log {}, not seq {} of log {author}",
                    p.id,
                    p.seq,
                    p.author,
                    body.seq.saturating_sub(1)
                ),
            ));
        }
        let signer = prev.map_or(author, |p| p.key_next());
        if verified_with == Some(signer) {
            return Ok(());
        }
        let Err(e) = verify_signature(&signer, &event.id, &event.sig) else {
            return Ok(());
        };
        // A signature by a key this log rotated away from gets its own code. Only the log's
        // first key and the one before its latest rotation are tried (one bad envelope must
        // not cost a signature check per rotation).
        let before_latest = self
            .authors
            .get(&author)
            .and_then(|a| a.keys.iter().rev().nth(1).map(|(_, k)| *k));
        if [Some(author), before_latest]
            .into_iter()
            .flatten()
            .any(|old| old != signer && verify_signature(&old, &event.id, &event.sig).is_ok())
        {
            return Err(reject(
                Rule::KeyRotated,
                format!("signed with a key that log {author} rotated away from"),
            ));
        }
        Err(e.into())
    }

    /// Rule 3: the kind rules, judged on the event and its causal past (`prev`, `deps` and
    /// what they reach) only. Pure: returns the effect to commit.
    pub fn check<L: Lookup>(
        &self,
        rules: &Rules,
        lookup: &L,
        event: &SignedEvent,
        envelope_hash: BlobHash,
        prev: Option<EventRecord>,
        deps: Vec<EventRecord>,
    ) -> Result<Effect> {
        let body = &event.body;
        let author = body.author;
        let depth = prev.iter().chain(&deps).map(|r| r.depth).max().unwrap_or(0) + 1;
        let (covered_prev, sent_prev, key) = prev
            .as_ref()
            .map_or((0, 0, author), |p| (p.covered, p.sent, p.key_next()));
        debug_assert!(
            sent_prev <= covered_prev,
            "invariant: a branch spends only coverage"
        );
        let mut record = EventRecord {
            id: event.id,
            envelope: envelope_hash,
            author,
            seq: body.seq,
            kind: body.kind(),
            ts: body.ts,
            prev: body.prev,
            deps: body.deps.clone(),
            index: self.n_events,
            credit: None,
            debit: 0,
            contested: false,
            depth,
            rotated_key: (key != author).then_some(key),
            covered: covered_prev,
            sent: sent_prev,
            covers: Vec::new(),
        };
        let past = Past {
            state: self,
            lookup,
            prev: prev.as_ref(),
            deps: &deps,
        };
        let mut version = None;
        match &body.payload {
            Payload::TokenMint(p) => {
                if !rules.genesis.is_issuer(&author) {
                    return Err(reject(
                        Rule::NotIssuer,
                        format!("{author} is not an issuer of this network's genesis"),
                    ));
                }
                record.credit = Some(Credit {
                    to: p.to,
                    amount: p.amount,
                });
            }
            Payload::TokenTransfer(p) => {
                let covers = self.cover(&past, lookup, author, prev.as_ref(), p.amount)?;
                let new: u128 = covers.iter().map(|(_, a)| u128::from(*a)).sum();
                let spendable = covered_prev + new - sent_prev;
                if u128::from(p.amount) > spendable {
                    return Err(reject(
                        Rule::InsufficientBalance,
                        format!(
                            "transfer of {} exceeds the {spendable} spendable from credits in \
                             this event's causal past; name unreferenced credits in deps",
                            p.amount
                        ),
                    ));
                }
                record.covers = covers;
                record.covered += new;
                record.debit = p.amount;
                record.sent += u128::from(p.amount);
                record.credit = Some(Credit {
                    to: p.to,
                    amount: p.amount,
                });
            }
            Payload::SkillEndorse(p) => {
                let skill = lookup.event(&p.skill)?;
                if skill.as_ref().map(|r| r.kind) != Some(Kind::SkillPublish) {
                    return Err(reject(
                        Rule::UnknownSkill,
                        format!("{} is not an accepted skill.publish", p.skill),
                    ));
                }
                require_in_past(&past, &p.skill, "skill")?;
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
                    anchor: event.id,
                    depth: 0,
                });
            }
            Payload::BasinDelta(p) => {
                version = Some(self.check_delta(rules, lookup, &past, event, p)?);
            }
            Payload::KeyRotate(p) => {
                if p.new_key == key {
                    return Err(reject(
                        Rule::InvalidField,
                        "new_key is the key already in use",
                    ));
                }
                record.rotated_key = (p.new_key != author).then_some(p.new_key);
            }
            Payload::NodeAnnounce(_)
            | Payload::SkillPublish(_)
            | Payload::ReputationDelta(_)
            | Payload::BlobHost(_) => {}
        }
        // A credit to the author itself is in the causal past of its next event: covered here.
        if let Some(credit) = record.credit
            && credit.to == author
        {
            record.covers.push((event.id, credit.amount));
            record.covered += u128::from(credit.amount);
        }
        Ok(Effect { record, version })
    }

    /// The coverage rule: which credits a transfer of `amount` brings into its branch's
    /// coverage. None when what the branch already covers suffices. Otherwise every candidate
    /// (a credit to the author not yet covered on this branch) that is named in `deps` or
    /// below a dep in its own log, then — while that is not enough — the other candidates in
    /// EventId order that one bounded walk of the causal past reaches. Candidates outside the
    /// causal past are never reached, so the result depends on the causal past alone. Ordered
    /// by EventId.
    fn cover<L: Lookup>(
        &self,
        past: &Past<'_, L>,
        lookup: &L,
        author: AuthorKey,
        prev: Option<&EventRecord>,
        amount: u64,
    ) -> Result<Vec<(EventId, u64)>> {
        let available = prev.map_or(0, |p| p.covered - p.sent);
        if u128::from(amount) <= available {
            return Ok(Vec::new());
        }
        let need = u128::from(amount) - available;
        let covers = match self.authors.get(&author) {
            // The common case: one branch, extended at its head. The candidates are the
            // unreferenced credits, and the index finds those below the deps directly.
            Some(a) if a.frozen_from.is_none() && prev.map(|p| p.id) == a.head_id => {
                debug_assert_eq!(
                    prev.map(|p| p.id),
                    past.prev.map(|p| p.id),
                    "the indexed path reads the causal past's prev"
                );
                self.cover_indexed(past, lookup, author, a, need)?
            }
            _ => self.cover_scan(past, lookup, author, prev, need)?,
        };
        // Every coverage the tests compute on small accounts is checked against the scan.
        #[cfg(test)]
        if self
            .authors
            .get(&author)
            .is_some_and(|a| a.uncovered.len() <= 512)
        {
            assert_eq!(
                covers,
                self.cover_scan(past, lookup, author, prev, need)?,
                "the indexed coverage differs from the reference scan"
            );
        }
        Ok(covers)
    }

    /// [`State::cover`] when the candidates are exactly `a.uncovered`: reads the credits
    /// each of prev and deps has below it in its sender's log (from the [`CreditIndex`]),
    /// then the bounded walk's; never every unreferenced credit.
    fn cover_indexed<L: Lookup>(
        &self,
        past: &Past<'_, L>,
        lookup: &L,
        author: AuthorKey,
        a: &AuthorState,
        need: u128,
    ) -> Result<Vec<(EventId, u64)>> {
        if a.credit_index.get().is_none() {
            let mut index = CreditsBySender::default();
            for id in &a.uncovered {
                let record = record_of(lookup, id)?;
                index.insert(*id, record.author, record.seq);
            }
            a.credit_index.set(index);
        }
        let index = a
            .credit_index
            .get()
            .expect("invariant: the credit index was just built");
        let mut found: BTreeMap<EventId, u64> = BTreeMap::new();
        for x in past.prev.into_iter().chain(past.deps) {
            for id in index.up_to(x.author, x.seq) {
                if found.contains_key(id) {
                    continue;
                }
                let record = record_of(lookup, id)?;
                if descends(self, lookup, x, &record)? {
                    found.insert(*id, credit_amount(&record)?);
                }
            }
        }
        let mut total: u128 = found.values().map(|a| u128::from(*a)).sum();
        // Like the scan, walk only when some candidate is still unfound.
        if total < need && found.len() < a.uncovered.len() {
            let mut reached: Vec<EventId> = past
                .credits_to(&author)?
                .into_iter()
                .filter(|id| a.uncovered.contains(id) && !found.contains_key(id))
                .collect();
            reached.sort();
            for id in reached {
                if total >= need {
                    break;
                }
                let amount = credit_amount(&record_of(lookup, &id)?)?;
                found.insert(id, amount);
                total += u128::from(amount);
            }
        }
        Ok(found.into_iter().collect())
    }

    /// [`State::cover`] over every candidate, for branches of a forked log (and, in tests,
    /// the reference the indexed path is checked against).
    fn cover_scan<L: Lookup>(
        &self,
        past: &Past<'_, L>,
        lookup: &L,
        author: AuthorKey,
        prev: Option<&EventRecord>,
        need: u128,
    ) -> Result<Vec<(EventId, u64)>> {
        let mut found = Vec::new();
        let mut rest = Vec::new();
        for id in self.candidates(lookup, author, prev, past_seq(prev))? {
            let record = record_of(lookup, &id)?;
            let amount = credit_amount(&record)?;
            if past.contains_fast(&record)? {
                found.push((id, amount));
            } else {
                rest.push((id, amount));
            }
        }
        let mut total: u128 = found.iter().map(|(_, a)| u128::from(*a)).sum();
        if total < need && !rest.is_empty() {
            // One bounded walk of the causal past, whatever the number of candidates (a
            // candidate outside the causal past is never in it, so the result is the same on
            // every node).
            let reached = past.credits_to(&author)?;
            for (id, amount) in rest {
                if total >= need {
                    break;
                }
                if reached.contains(&id) {
                    found.push((id, amount));
                    total += u128::from(amount);
                }
            }
        }
        found.sort_by_key(|(id, _)| *id);
        Ok(found)
    }

    /// Credits to `author` not yet covered on the branch ending at `prev` (the event at
    /// `seq`'s predecessor), ordered by id.
    fn candidates<L: Lookup>(
        &self,
        lookup: &L,
        author: AuthorKey,
        prev: Option<&EventRecord>,
        seq: u64,
    ) -> Result<BTreeSet<EventId>> {
        let Some(a) = self.authors.get(&author) else {
            return Ok(BTreeSet::new());
        };
        let mut out = a.uncovered.clone();
        let extends_head = prev.map(|p| p.id) == a.head_id;
        let from = match a.frozen_from {
            // One branch, and this event extends it: every covered credit is covered on it.
            None if extends_head => return Ok(out),
            // Events at or after this seq, or after the lowest fork, are not on this branch
            // below the new event; what only they covered is a candidate here.
            frozen => frozen.map_or(seq, |f| f.min(seq)),
        };
        let mut covered_elsewhere = BTreeSet::new();
        for seq in from..=a.max_seq {
            for id in lookup.at(&author, seq)? {
                let record = record_of(lookup, &id)?;
                covered_elsewhere.extend(record.covers.iter().map(|(c, _)| *c));
            }
        }
        if covered_elsewhere.is_empty() {
            return Ok(out);
        }
        // This branch from `from` up to `prev`, walked once; below `from` every event is on
        // the log's single prefix, so on this branch.
        let mut branch = std::collections::HashSet::new();
        let mut cur = prev.cloned();
        while let Some(x) = cur.filter(|x| x.seq >= from) {
            branch.insert(x.id);
            cur = match x.prev {
                Some(p) => Some(record_of(lookup, &p)?),
                None => None,
            };
        }
        for credit in covered_elsewhere {
            let mut on_branch = false;
            for y in lookup.covered_by(&credit)? {
                let y = record_of(lookup, &y)?;
                if y.author == author && (y.seq < from || branch.contains(&y.id)) {
                    on_branch = true;
                    break;
                }
            }
            if !on_branch {
                out.insert(credit);
            }
        }
        Ok(out)
    }

    /// The rules of a `basin.delta`: its parent is a version of the basin it names, in its
    /// causal past; its author is the basin's owner or a writer the publish names; its values
    /// lie within `basin_outlier_max` of the anchor (the nearest version above it the owner
    /// signed).
    fn check_delta<L: Lookup>(
        &self,
        rules: &Rules,
        lookup: &L,
        past: &Past<'_, L>,
        event: &SignedEvent,
        p: &meshnode_schemas::BasinDelta,
    ) -> Result<BasinVersion> {
        let author = event.body.author;
        let parent = lookup.basin_version(&p.parent)?.ok_or_else(|| {
            reject(
                Rule::UnknownParent,
                format!("{} is not an accepted basin version", p.parent),
            )
        })?;
        let basin = self.basins.get(&parent.basin).ok_or_else(|| {
            corrupt(format!(
                "basin {} of version {} missing",
                parent.basin, p.parent
            ))
        })?;
        if basin.basin_id != p.basin_id {
            return Err(reject(
                Rule::BasinMismatch,
                format!(
                    "parent {} is a version of basin `{}`, not `{}`",
                    p.parent, basin.basin_id, p.basin_id
                ),
            ));
        }
        if !basin.admits(&author) {
            return Err(reject(
                Rule::NotAWriter,
                format!(
                    "{author} is neither the owner of basin `{}` nor one of the writers its \
                     publish names",
                    basin.basin_id
                ),
            ));
        }
        require_in_past(past, &p.parent, "parent")?;
        let dim = parent.coordinates.len();
        let values = p.values.values();
        let indices: Vec<usize> = if p.indices.is_empty() {
            if values.len() != dim {
                return Err(reject(
                    Rule::DimensionMismatch,
                    format!("{} values for a basin of {dim} coordinates", values.len()),
                ));
            }
            (0..dim).collect()
        } else {
            if p.indices.iter().any(|&i| i >= dim as u64) {
                return Err(reject(
                    Rule::DimensionMismatch,
                    format!("an index is outside the basin's {dim} coordinates"),
                ));
            }
            p.indices.iter().map(|&i| i as usize).collect()
        };
        let anchor = if parent.author == basin.owner {
            parent.clone()
        } else {
            lookup
                .basin_version(&parent.anchor)?
                .ok_or_else(|| corrupt(format!("anchor {} missing", parent.anchor)))?
        };
        let distance = indices
            .iter()
            .zip(&values)
            .map(|(&i, &v)| {
                let d = f64::from(v) - f64::from(anchor.coordinates[i]);
                d * d
            })
            .sum::<f64>()
            .sqrt();
        if distance > rules.genesis.basin_outlier_max {
            return Err(reject(
                Rule::BasinOutlier,
                format!(
                    "delta is {distance:.4} away from version {} (the latest its owner signed \
                     on this path), more than the network's basin_outlier_max {}",
                    anchor.id, rules.genesis.basin_outlier_max
                ),
            ));
        }
        let w = p.weight_ppm as f32 / meshnode_schemas::limits::WEIGHT_PPM_MAX as f32;
        let mut coordinates = parent.coordinates.clone();
        for (&i, &v) in indices.iter().zip(&values) {
            coordinates[i] += w * (v - coordinates[i]);
        }
        Ok(BasinVersion {
            id: event.id,
            basin: parent.basin,
            parent: Some(p.parent),
            author,
            coordinates,
            distance,
            weight_ppm: p.weight_ppm,
            anchor: if author == basin.owner {
                event.id
            } else {
                anchor.id
            },
            depth: parent.depth + 1,
        })
    }

    /// Applies a checked event: the log, the accounts, the kind's state, then forks and what
    /// is contested. Returns the record as stored.
    pub fn commit<L: Lookup>(
        &mut self,
        base: &L,
        overlay: &mut Overlay,
        event: &SignedEvent,
        effect: Effect,
    ) -> Result<EventRecord> {
        let Effect { record, version } = effect;
        assert_eq!(
            record.index, self.n_events,
            "invariant: an effect is committed on the state it was checked on"
        );
        let id = record.id;
        let author = record.author;
        // Another event at this seq can exist only below the log's highest seq so far.
        let occupied = self
            .authors
            .get(&author)
            .is_some_and(|a| a.max_seq >= record.seq);
        self.n_events += 1;
        self.commit_log(overlay, event, &record);
        if let Some(credit) = record.credit {
            let recipient = self.author_mut(&credit.to);
            recipient.received += u128::from(credit.amount);
            if credit.to != author {
                recipient.uncovered.insert(id);
                recipient.credit_index.insert(id, author, record.seq);
                overlay.uncovered.push((credit.to, id, true));
            }
            if record.kind == Kind::TokenMint {
                self.supply += u128::from(credit.amount);
                self.author_mut(&author).minted += u128::from(credit.amount);
            }
            overlay.touched.authors.insert(credit.to);
        }
        self.commit_kind(overlay, event, &record, version.as_ref());
        if let Some(v) = version {
            overlay.versions.insert(id, v);
        }
        overlay.log.insert((author, record.seq, id));
        overlay.events.insert(id, record.clone());
        overlay.envelopes.insert(id, event.envelope.clone());
        overlay.accepted.push(id);
        self.contest_on_accept(base, overlay, &record, occupied)?;
        let mut stored = record;
        stored.contested = overlay
            .events
            .get(&id)
            .expect("invariant: the record was just inserted")
            .contested;
        let a = &self.authors[&author];
        assert!(
            a.checked_balance().is_some(),
            "invariant: spendable balance of {author} is never negative"
        );
        Ok(stored)
    }

    /// The author's log and account: counts, the branch this node extends first, coverage.
    fn commit_log(&mut self, overlay: &mut Overlay, event: &SignedEvent, record: &EventRecord) {
        let author = record.author;
        let a = self.author_mut(&author);
        a.n_events += 1;
        a.max_seq = a.max_seq.max(record.seq);
        if a.head_id == record.prev && a.head_seq + 1 == record.seq {
            a.head_seq = record.seq;
            a.head_id = Some(record.id);
            if let Payload::KeyRotate(p) = &event.body.payload {
                a.keys.push((record.seq + 1, p.new_key));
                // The last two keys are all a hint needs (the records hold the chain's keys):
                // an author that rotates on every event must not grow its row with each one.
                if a.keys.len() > AUTHOR_KEYS_KEPT {
                    a.keys.remove(0);
                }
            }
        }
        a.sent += u128::from(record.debit);
        for (credit, _) in &record.covers {
            if a.uncovered.remove(credit) {
                a.credit_index.remove(credit);
                overlay.uncovered.push((author, *credit, false));
            }
            overlay
                .covered_by
                .entry(*credit)
                .or_default()
                .push(record.id);
        }
        overlay.touched.authors.insert(author);
    }

    /// The state of the event's kind: skills, endorsements, basins, reputation, nodes, hosts.
    /// Every update is a sum or a "greatest (seq, id) wins" choice, so the order of arrival
    /// does not matter.
    fn commit_kind(
        &mut self,
        overlay: &mut Overlay,
        event: &SignedEvent,
        record: &EventRecord,
        version: Option<&BasinVersion>,
    ) {
        let id = record.id;
        let author = record.author;
        let touched = &mut overlay.touched;
        match &event.body.payload {
            Payload::SkillPublish(p) => {
                self.skills.insert(
                    id,
                    SkillState {
                        id,
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
                touched.skills.insert(id);
            }
            Payload::SkillEndorse(p) => {
                if let Some(skill) = self.skills.get_mut(&p.skill) {
                    if p.verdict == "valid" {
                        skill.n_valid += 1;
                    } else {
                        skill.n_invalid += 1;
                    }
                    skill.score_sum += u128::from(p.score);
                    touched.skills.insert(p.skill);
                }
            }
            Payload::BasinPublish(p) => {
                let values = p.coordinates.values();
                let ppm = meshnode_schemas::limits::WEIGHT_PPM_MAX;
                self.basins.insert(
                    id,
                    BasinState {
                        id,
                        owner: author,
                        basin_id: p.basin_id.clone(),
                        writers: p.writers.clone(),
                        sums: values
                            .iter()
                            .map(|&v| basin_fixed(v) * i128::from(ppm))
                            .collect(),
                        weights: vec![u128::from(ppm); values.len()],
                        n_versions: 1,
                        head: id,
                        head_depth: 0,
                    },
                );
                touched.basins.insert(id);
            }
            Payload::BasinDelta(p) => {
                let v = version.expect("invariant: a valid delta has a version");
                if let Some(basin) = self.basins.get_mut(&v.basin) {
                    let values = p.values.values();
                    let indices: Vec<usize> = if p.indices.is_empty() {
                        (0..basin.sums.len()).collect()
                    } else {
                        p.indices.iter().map(|&i| i as usize).collect()
                    };
                    for (&i, &value) in indices.iter().zip(&values) {
                        // At most 2^92 per delta: 2^35 deltas of one basin before i128 ends.
                        basin.sums[i] = basin.sums[i]
                            .saturating_add(basin_fixed(value) * i128::from(p.weight_ppm));
                        basin.weights[i] += u128::from(p.weight_ppm);
                    }
                    basin.n_versions += 1;
                    if (v.depth, id) > (basin.head_depth, basin.head) {
                        basin.head = id;
                        basin.head_depth = v.depth;
                    }
                    touched.basins.insert(v.basin);
                }
            }
            Payload::ReputationDelta(p) => {
                let r = self.reputation.entry(p.subject).or_default();
                r.score += i128::from(p.delta);
                r.n_deltas += 1;
                touched.reputation.insert(p.subject);
            }
            Payload::NodeAnnounce(p) => {
                let seq = record.seq;
                let entry = self.nodes.entry(author).or_insert_with(|| NodeState {
                    author,
                    service: String::new(),
                    endpoints: Vec::new(),
                    capabilities: Vec::new(),
                    addr: String::new(),
                    basin_signature: Vec::new(),
                    last_event: id,
                    last_seq: 0,
                    last_ts: record.ts,
                    n_announces: 0,
                });
                entry.n_announces += 1;
                if entry.n_announces == 1 || (seq, id) > (entry.last_seq, entry.last_event) {
                    entry.service = p.service.clone();
                    entry.endpoints = p.endpoints.clone();
                    entry.capabilities = p.capabilities.clone();
                    entry.addr = p.addr.clone();
                    entry.basin_signature = p.basin_signature.values();
                    entry.last_event = id;
                    entry.last_seq = seq;
                    entry.last_ts = record.ts;
                }
                touched.nodes.insert(author);
            }
            Payload::BlobHost(p) => {
                let mark = HostMark {
                    seq: record.seq,
                    id,
                    pinned: p.pinned,
                };
                let marks = self.hosts.entry(p.blob).or_default();
                if marks
                    .get(&author)
                    .is_none_or(|m| (m.seq, m.id) < (mark.seq, mark.id))
                {
                    marks.insert(author, mark);
                    overlay.hosts.push((p.blob, author, mark));
                }
            }
            Payload::TokenMint(_) | Payload::TokenTransfer(_) | Payload::KeyRotate(_) => {}
        }
    }

    /// After an event is accepted: the ranges of contested credits it covered, a fork if its
    /// seq was occupied, and whether it is contested itself.
    fn contest_on_accept<L: Lookup>(
        &mut self,
        base: &L,
        overlay: &mut Overlay,
        record: &EventRecord,
        occupied: bool,
    ) -> Result<()> {
        let author = record.author;
        if self.authors[&author].on_prefix(record.seq) {
            let mut ranges = Vec::new();
            for (credit, _) in &record.covers {
                if *credit == record.id {
                    continue;
                }
                let lookup = Layered {
                    base,
                    overlay: &*overlay,
                };
                if record_of(&lookup, credit)?.contested {
                    ranges.push(
                        record
                            .cover_range(credit)
                            .expect("invariant: the event covers its covers"),
                    );
                }
            }
            if !ranges.is_empty() {
                self.author_mut(&author).contested_ranges.extend(ranges);
            }
        }
        if occupied {
            let ids = Layered {
                base,
                overlay: &*overlay,
            }
            .at(&author, record.seq)?;
            if ids.len() > 1 {
                self.record_fork(base, overlay, author, record.seq, &ids)?;
            }
        }
        let a = &self.authors[&author];
        if !a.on_prefix(record.seq)
            || (record.debit > 0 && ranges_meet(&a.contested_ranges, record.spend_range()))
        {
            self.contest(base, overlay, record.id)?;
        }
        Ok(())
    }

    /// Records that `author` has the events `ids` (ordered, more than one) at `seq`: the
    /// canonical proof (lowest forked seq, two smallest ids) and everything of the log from
    /// the lowest forked seq on contested.
    fn record_fork<L: Lookup>(
        &mut self,
        base: &L,
        overlay: &mut Overlay,
        author: AuthorKey,
        seq: u64,
        ids: &[EventId],
    ) -> Result<()> {
        let pair = [ids[0], ids[1]];
        let replace = self
            .forks
            .get(&author)
            .is_none_or(|p| seq < p.seq || (seq == p.seq && p.ids() != pair));
        if replace {
            let proof = self.build_proof(base, overlay, author, seq, pair)?;
            self.forks.insert(author, proof);
            overlay.touched.forks.insert(author);
        }
        let a = self.author_mut(&author);
        let old = a.frozen_from;
        let frozen = old.map_or(seq, |f| f.min(seq));
        a.frozen_from = Some(frozen);
        let last = match old {
            Some(f) if f <= frozen => return Ok(()),
            Some(f) => f - 1,
            None => a.max_seq,
        };
        overlay.touched.authors.insert(author);
        for s in frozen..=last {
            let ids = Layered {
                base,
                overlay: &*overlay,
            }
            .at(&author, s)?;
            for id in ids {
                self.contest(base, overlay, id)?;
            }
        }
        Ok(())
    }

    fn build_proof<L: Lookup>(
        &self,
        base: &L,
        overlay: &Overlay,
        author: AuthorKey,
        seq: u64,
        pair: [EventId; 2],
    ) -> Result<ForkProof> {
        let lookup = Layered { base, overlay };
        let envelope = |id: &EventId| {
            lookup
                .envelope(id)?
                .ok_or_else(|| corrupt(format!("envelope of {id} missing")))
        };
        let first = record_of(&lookup, &pair[0])?;
        let signer = match &first.prev {
            Some(prev) => record_of(&lookup, prev)?.key_next(),
            None => author,
        };
        // The rotations below the fork: walk the (single) prefix down from the shared prev.
        // Once per new proof, so at most a few times per forked log.
        let mut rotations = Vec::new();
        let mut cur = first.prev;
        while let Some(id) = cur {
            let record = record_of(&lookup, &id)?;
            if record.kind == Kind::KeyRotate {
                rotations.push(envelope(&id)?);
            }
            cur = record.prev;
        }
        rotations.reverse();
        Ok(ForkProof {
            author,
            seq,
            signer,
            envelopes: [envelope(&pair[0])?, envelope(&pair[1])?],
            rotations,
        })
    }

    /// Marks `id` contested and everything that follows from it: its debit and credit count
    /// on neither side, a contested credit's coverage range is recorded, and the transfers that
    /// spend that range are contested in turn.
    fn contest<L: Lookup>(&mut self, base: &L, overlay: &mut Overlay, id: EventId) -> Result<()> {
        let mut stack = vec![id];
        while let Some(id) = stack.pop() {
            let mut record = record_of(
                &Layered {
                    base,
                    overlay: &*overlay,
                },
                &id,
            )?;
            if record.contested {
                continue;
            }
            record.contested = true;
            overlay.events.insert(id, record.clone());
            overlay.contested.push(id);
            self.contested.insert(id);
            let author = record.author;
            overlay.touched.authors.insert(author);
            if record.debit > 0 {
                self.author_mut(&author).sent_contested += u128::from(record.debit);
            }
            if record.kind == Kind::SkillPublish
                && let Some(skill) = self.skills.get_mut(&id)
            {
                skill.contested = true;
                overlay.touched.skills.insert(id);
            }
            let Some(credit) = record.credit else {
                continue;
            };
            if record.kind == Kind::TokenMint {
                self.supply -= u128::from(credit.amount);
                self.author_mut(&author).minted_contested += u128::from(credit.amount);
            }
            self.author_mut(&credit.to).received_contested += u128::from(credit.amount);
            overlay.touched.authors.insert(credit.to);
            let coverers = Layered {
                base,
                overlay: &*overlay,
            }
            .covered_by(&id)?;
            for y in coverers {
                let y = record_of(
                    &Layered {
                        base,
                        overlay: &*overlay,
                    },
                    &y,
                )?;
                if y.author != credit.to || !self.authors[&credit.to].on_prefix(y.seq) {
                    // Covered on a forked branch: whatever spends it there is contested anyway.
                    continue;
                }
                let range = y
                    .cover_range(&id)
                    .ok_or_else(|| corrupt(format!("{} covers {id} without a range", y.id)))?;
                let ranges = &mut self.author_mut(&credit.to).contested_ranges;
                if !ranges.contains(&range) {
                    ranges.push(range);
                }
                stack.extend(self.spenders(base, overlay, credit.to, y.seq, range)?);
            }
        }
        Ok(())
    }

    /// Transfers on the unforked prefix of `author`'s log, from `from_seq` on, whose spend
    /// range meets `range`. The branch's `sent` only grows, so a binary search finds the
    /// first one.
    fn spenders<L: Lookup>(
        &self,
        base: &L,
        overlay: &Overlay,
        author: AuthorKey,
        from_seq: u64,
        (lo, hi): (u128, u128),
    ) -> Result<Vec<EventId>> {
        let lookup = Layered { base, overlay };
        let a = &self.authors[&author];
        let last = a.frozen_from.map_or(a.max_seq, |f| f - 1);
        let at = |seq: u64| -> Result<Option<EventRecord>> {
            match lookup.at(&author, seq)?.first() {
                Some(id) => lookup.event(id),
                None => Ok(None),
            }
        };
        let (mut l, mut r) = (from_seq, last + 1);
        while l < r {
            let m = l + (r - l) / 2;
            match at(m)? {
                Some(x) if x.sent > lo => r = m,
                Some(_) => l = m + 1,
                None => r = m,
            }
        }
        let mut out = Vec::new();
        for seq in l..=last {
            let Some(x) = at(seq)? else { break };
            let (start, end) = x.spend_range();
            if start >= hi {
                break;
            }
            if x.debit > 0 && end > lo && !x.contested {
                out.push(x.id);
            }
        }
        Ok(out)
    }
}

/// Requires `target` in the causal past; a search that runs out of steps is a rejection
/// every node makes alike (the step count depends on the causal past only).
fn require_in_past<L: Lookup>(past: &Past<'_, L>, target: &EventId, what: &str) -> Result<()> {
    match past.contains(target)? {
        Some(true) => Ok(()),
        Some(false) => Err(reject(
            Rule::NotInCausalPast,
            format!("{what} {target} must be in deps or their causal past"),
        )),
        None => Err(reject(
            Rule::CausalPastTooLarge,
            format!(
                "finding {what} {target} in this event's causal past needs more than \
                 {PAST_SEARCH_EVENTS_MAX} steps; name it (or a later event of its log) in deps"
            ),
        )),
    }
}
