//! Reads of the committed index: events, logs, accounts, the derived state and its digest,
//! the catalog, checkpoints and transparency-log proofs.

use meshnode_schemas::{AuthorKey, BlobHash, EventId, SignedEvent};
use meshnode_store::Store;
use redb::{Database, ReadableDatabase, ReadableTable};

use crate::db::{self, DbView};
use crate::error::{Error, Result, Rule, reject};
use crate::fold::{
    AuthorState, BasinState, BasinVersion, EventRecord, ForkProof, NodeState, ReputationState,
    Rules, SkillState, State,
};
use crate::ledger::{Account, Ledger};
use crate::tlog::{self, TreeHash};

impl Ledger {
    /// Number of events waiting for prev or deps.
    pub fn n_pending(&self) -> usize {
        *self
            .shared
            .n_pending
            .lock()
            .expect("invariant: pending counter lock is never poisoned")
    }

    fn read(&self) -> Result<redb::ReadTransaction> {
        Ok(self.shared.db.begin_read()?)
    }

    /// Committed number of accepted events (= transparency-log size).
    pub fn tree_size(&self) -> Result<u64> {
        db::meta_u64(&self.read()?, "n_events")
    }

    /// The record of an accepted event.
    pub fn event_record(&self, id: &EventId) -> Result<Option<EventRecord>> {
        // The map first: an id in it is committed, so a transaction begun after sees it.
        let Some(index) = self.ids().get(id).copied() else {
            return Ok(None);
        };
        let tx = self.read()?;
        let table = tx.open_table(db::EVENTS)?;
        match table.get(index)? {
            Some(v) => Ok(Some(db::decode(v.value())?)),
            None => Err(Error::Corrupt(format!(
                "event {id} is leaf {index} but has no record"
            ))),
        }
    }

    fn ids(&self) -> std::sync::RwLockReadGuard<'_, db::EventIds> {
        self.shared
            .ids
            .read()
            .expect("invariant: id map lock is never poisoned")
    }

    /// An accepted event with its decoded envelope.
    pub async fn event(&self, id: &EventId) -> Result<Option<(EventRecord, SignedEvent)>> {
        let Some(record) = self.event_record(id)? else {
            return Ok(None);
        };
        let bytes = self
            .shared
            .store
            .get_bytes(
                &record.envelope,
                meshnode_schemas::limits::EVENT_BYTES_MAX as u64,
            )
            .await?;
        Ok(Some((record, SignedEvent::decode(&bytes)?)))
    }

    /// Accepted events in acceptance order from leaf `start`, at most `limit`.
    pub async fn events_since(
        &self,
        start: u64,
        limit: usize,
    ) -> Result<Vec<(EventRecord, SignedEvent)>> {
        let records: Vec<EventRecord> = {
            let tx = self.read()?;
            let events = tx.open_table(db::EVENTS)?;
            let mut out = Vec::new();
            for entry in events.range(start..)?.take(limit) {
                out.push(db::decode(entry?.1.value())?);
            }
            out
        };
        let hashes: Vec<BlobHash> = records.iter().map(|r| r.envelope).collect();
        let envelopes = self
            .shared
            .store
            .get_many(&hashes, meshnode_schemas::limits::EVENT_BYTES_MAX as u64)
            .await;
        let mut out = Vec::with_capacity(records.len());
        for (record, bytes) in records.into_iter().zip(envelopes) {
            let event = SignedEvent::decode(&bytes?)?;
            out.push((record, event));
        }
        Ok(out)
    }

    /// An author's log from `after_seq` (exclusive), at most `limit` records, in seq order
    /// (at a forked seq, every event there, by id).
    pub fn log(
        &self,
        author: &AuthorKey,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>> {
        let Some(from_seq) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        let ids = self.ids();
        let tx = self.read()?;
        let log = tx.open_table(db::LOG)?;
        let events = tx.open_table(db::EVENTS)?;
        let mut out = Vec::new();
        let key = *author.as_bytes();
        for entry in log
            .range((key, from_seq, [0; 32])..=(key, u64::MAX, [0xff; 32]))?
            .take(limit)
        {
            let (k, _) = entry?;
            let v = ids
                .get(&EventId::from_bytes(k.value().2))
                .map(|index| events.get(*index))
                .transpose()?
                .flatten()
                .ok_or_else(|| Error::Corrupt("log entry without event".into()))?;
            out.push(db::decode(v.value())?);
        }
        Ok(out)
    }

    fn get_state<T: serde::de::DeserializeOwned>(
        &self,
        table: redb::TableDefinition<'static, [u8; 32], &'static [u8]>,
        key: &[u8; 32],
    ) -> Result<Option<T>> {
        let tx = self.read()?;
        let t = tx.open_table(table)?;
        match t.get(*key)? {
            Some(v) => Ok(Some(db::decode(v.value())?)),
            None => Ok(None),
        }
    }

    fn all_state<T: serde::de::DeserializeOwned>(
        &self,
        table: redb::TableDefinition<'static, [u8; 32], &'static [u8]>,
    ) -> Result<Vec<T>> {
        let tx = self.read()?;
        let t = tx.open_table(table)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (_, v) = entry?;
            out.push(db::decode(v.value())?);
        }
        Ok(out)
    }

    /// An account (every key has one; unknown keys have zero balances).
    pub fn account(&self, key: &AuthorKey) -> Result<Account> {
        let mut state: AuthorState = self
            .get_state(db::AUTHORS, key.as_bytes())?
            .unwrap_or_default();
        {
            let tx = self.read()?;
            let table = tx.open_table(db::UNCOVERED)?;
            let k = *key.as_bytes();
            for entry in table.range((k, [0u8; 32])..=(k, [0xffu8; 32]))? {
                let (credit, _) = entry?;
                state
                    .uncovered
                    .insert(EventId::from_bytes(credit.value().1));
            }
        }
        let reputation: ReputationState = self
            .get_state(db::REPUTATION, key.as_bytes())?
            .unwrap_or_default();
        Ok(Account {
            key: *key,
            balance: state.balance(),
            received: state.received,
            received_contested: state.received_contested,
            sent: state.sent,
            sent_contested: state.sent_contested,
            minted: state.minted,
            unreferenced_credits: state.uncovered.iter().copied().collect(),
            head_seq: state.head_seq,
            head_id: state.head_id,
            signing_key: state.key_at(key, state.head_seq + 1),
            frozen_from: state.frozen_from,
            reputation: reputation.score,
        })
    }

    /// Every account with activity, in key order.
    pub fn accounts(&self) -> Result<Vec<(AuthorKey, AuthorState)>> {
        let tx = self.read()?;
        let t = tx.open_table(db::AUTHORS)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push((AuthorKey::from_bytes(k.value()), db::decode(v.value())?));
        }
        Ok(out)
    }

    /// Total supply: uncontested mints (= the sum of spendable balances).
    pub fn supply(&self) -> Result<u128> {
        db::meta_u128(&self.read()?, "supply")
    }

    /// The whole derived state as of the last committed batch, read in one transaction.
    pub fn state(&self) -> Result<State> {
        db::load_state_in(&self.read()?)
    }

    /// The state digest (see [`State::digest`]) and the number of events it covers. Computed
    /// from the committed state once per tree size and cached.
    pub fn state_digest(&self) -> Result<(u64, crate::StateDigest)> {
        let size = self.tree_size()?;
        if let Some((n, d)) = *self
            .shared
            .digest
            .lock()
            .expect("invariant: digest lock is never poisoned")
            && n == size
        {
            return Ok((n, d));
        }
        let state = self.state()?;
        let computed = (state.n_events, state.digest());
        *self
            .shared
            .digest
            .lock()
            .expect("invariant: digest lock is never poisoned") = Some(computed);
        Ok(computed)
    }

    /// Canonical fork proofs, one per forked log.
    pub fn forks(&self) -> Result<Vec<ForkProof>> {
        let tx = self.read()?;
        let t = tx.open_table(db::FORKS)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (_, v) = entry?;
            out.push(db::decode(v.value())?);
        }
        Ok(out)
    }

    /// Checks a portable fork proof (e.g. from a peer): it verifies on its own for this
    /// network ([`ForkProof::verify`]), and its signer is the key this node's own history of
    /// the log names at that seq — a proof that leaves out a rotation (say, two events signed
    /// at seq 9 with a key the log retired at seq 5) is refused. Returns the two event ids.
    /// [`Error::Invalid`] when this node does not hold the log up to the forked seq (it cannot
    /// judge the key history yet).
    pub fn check_fork_proof(&self, proof: &ForkProof) -> Result<(EventId, EventId)> {
        let ids = proof.verify(&self.net())?;
        let first = SignedEvent::decode(&proof.envelopes[0])?;
        let key = match first.body.prev {
            None => proof.author,
            Some(prev) => self
                .event_record(&prev)?
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "this node does not hold event {prev} (seq {} of {}): it cannot check \
                         the proof's key history yet",
                        proof.seq - 1,
                        proof.author
                    ))
                })?
                .key_next(),
        };
        if key != proof.signer {
            return Err(reject(
                Rule::InvalidForkProof,
                format!(
                    "the log {} is signed by {key} at seq {}, not by the proof's signer {}: the \
                     proof's key history is incomplete",
                    proof.author, proof.seq, proof.signer
                ),
            ));
        }
        Ok(ids)
    }

    /// The skill catalog.
    pub fn skills(&self) -> Result<Vec<SkillState>> {
        self.all_state(db::SKILLS)
    }

    /// Hosts of a blob (authors whose latest `blob.host` for it says pinned).
    pub fn hosts(&self, blob: &BlobHash) -> Result<Vec<AuthorKey>> {
        let tx = self.shared.db.begin_read()?;
        let table = tx.open_table(db::HOSTS)?;
        let from = (*blob.as_bytes(), [0u8; 32]);
        let to = (*blob.as_bytes(), [0xffu8; 32]);
        let mut out = Vec::new();
        for entry in table.range(from..=to)? {
            let (k, v) = entry?;
            if v.value().2 {
                out.push(AuthorKey::from_bytes(k.value().1));
            }
        }
        Ok(out)
    }

    /// Basins.
    pub fn basins(&self) -> Result<Vec<BasinState>> {
        self.all_state(db::BASINS)
    }

    /// A basin by its publish event.
    pub fn basin(&self, id: &EventId) -> Result<Option<BasinState>> {
        self.get_state(db::BASINS, id.as_bytes())
    }

    /// One basin version by its event.
    pub fn basin_version(&self, id: &EventId) -> Result<Option<BasinVersion>> {
        let tx = self.read()?;
        let versions = tx.open_table(db::VERSIONS)?;
        match versions.get(*id.as_bytes())? {
            Some(v) => Ok(Some(db::decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// A basin's versions in acceptance order.
    pub fn basin_history(&self, id: &EventId) -> Result<Vec<BasinVersion>> {
        let tx = self.read()?;
        let history = tx.open_table(db::BASIN_HISTORY)?;
        let versions = tx.open_table(db::VERSIONS)?;
        let key = *id.as_bytes();
        let mut out = Vec::new();
        for entry in history.range((key, 0)..=(key, u64::MAX))? {
            let (_, vid) = entry?;
            let v = versions
                .get(vid.value())?
                .ok_or_else(|| Error::Corrupt("history entry without version".into()))?;
            out.push(db::decode(v.value())?);
        }
        Ok(out)
    }

    /// Reputation scores.
    pub fn reputation(&self) -> Result<Vec<(AuthorKey, ReputationState)>> {
        let tx = self.read()?;
        let t = tx.open_table(db::REPUTATION)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push((AuthorKey::from_bytes(k.value()), db::decode(v.value())?));
        }
        Ok(out)
    }

    /// The node registry.
    pub fn nodes(&self) -> Result<Vec<NodeState>> {
        self.all_state(db::NODES)
    }

    /// The latest signed checkpoint (C2SP signed note).
    pub fn checkpoint(&self) -> String {
        self.shared
            .checkpoint
            .read()
            .expect("invariant: checkpoint lock is never poisoned")
            .clone()
    }

    fn with_view<T>(
        &self,
        f: impl FnOnce(&DbView<'_, fn(&BlobHash) -> Result<Option<Vec<u8>>>>, u64) -> Result<T>,
    ) -> Result<T> {
        let tx = self.read()?;
        let size = db::meta_u64(&tx, "n_events")?;
        let noop: fn(&BlobHash) -> Result<Option<Vec<u8>>> = |_| Ok(None);
        let ids = self.ids();
        let view = DbView::new(&tx, &ids, &noop)?;
        f(&view, size)
    }

    /// The root of the tree of the first `size` events.
    pub fn root(&self, size: u64) -> Result<TreeHash> {
        self.with_view(|view, committed| {
            if size > committed {
                return Err(Error::Invalid(format!(
                    "tree size {size} is larger than the log ({committed})"
                )));
            }
            tlog::root(view, size)
        })
    }

    /// An inclusion proof of event `id` in the tree of `tree_size` leaves (default: the
    /// committed size). Returns (leaf index, tree size, path).
    pub fn inclusion_proof(
        &self,
        id: &EventId,
        tree_size: Option<u64>,
    ) -> Result<(u64, u64, Vec<TreeHash>)> {
        let record = self
            .event_record(id)?
            .ok_or_else(|| Error::NotFound(format!("event {id}")))?;
        self.with_view(|view, committed| {
            let size = tree_size.unwrap_or(committed);
            if size > committed {
                return Err(Error::Invalid(format!(
                    "tree_size {size} is larger than the log ({committed})"
                )));
            }
            if record.index >= size {
                return Err(Error::Invalid(format!(
                    "event {id} is leaf {}, not in a tree of size {size}",
                    record.index
                )));
            }
            Ok((
                record.index,
                size,
                tlog::inclusion_path(view, record.index, size)?,
            ))
        })
    }

    /// A consistency proof between tree sizes `from` and `to` (default: committed size).
    pub fn consistency_proof(&self, from: u64, to: Option<u64>) -> Result<(u64, Vec<TreeHash>)> {
        self.with_view(|view, committed| {
            let to = to.unwrap_or(committed);
            if to > committed {
                return Err(Error::Invalid(format!(
                    "to={to} is larger than the log ({committed})"
                )));
            }
            Ok((to, tlog::consistency_path(view, from, to)?))
        })
    }

    /// Tests: the next batch panics while it is applied.
    #[cfg(test)]
    pub(crate) fn fail_next_batch(&self) {
        self.shared
            .fail_next_batch
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The database (for the audit).
    pub(crate) fn db(&self) -> &Database {
        &self.shared.db
    }

    /// The store (for the audit).
    pub(crate) fn store(&self) -> &Store {
        &self.shared.store
    }

    /// The rules (for the audit).
    pub(crate) fn rules(&self) -> &Rules {
        &self.shared.rules
    }

    /// The signing key (for the audit's checkpoint).
    pub(crate) fn verifying_key(&self) -> ed25519_dalek::VerifyingKey {
        self.shared.key.verifying_key()
    }
}
