//! Reads of the committed index: events, logs, accounts, the derived state and its digest,
//! the catalog, checkpoints and transparency-log proofs.

use std::ops::Bound;

use bytes::Bytes;
use meshnode_schemas::{AuthorKey, BlobHash, EventId, SignedEvent};
use meshnode_store::Store;
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};

use crate::db::{self, DbView};
use crate::error::{Error, Result, Rule, reject};
use crate::fold::{
    AuthorState, BasinState, BasinVersion, EventRecord, ForkProof, NodeState, ReputationState,
    Rules, SkillState, State,
};
use crate::ledger::{Account, Ledger};
use crate::tlog::{self, TreeHash};

/// One page of a list read in key order: at most the asked number of items, strictly after
/// the asked cursor, and `next`, the cursor of the following page (the key of the last item),
/// or `None` when nothing follows this page. Reading a page costs O(limit), whatever the size
/// of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T, C> {
    /// The items, in key order.
    pub items: Vec<T>,
    /// Pass as `after` to read the next page; `None` on the last page.
    pub next: Option<C>,
}

/// Rows reserved up front for a page (a large limit on a small table allocates no more).
const PAGE_PREALLOC: usize = 256;

/// Cuts `rows` — read in strict key order with at most one row beyond `limit` — to `limit`
/// rows, and returns the cursor of the next page: the key of the last row kept, when a row
/// beyond it was read.
fn cut_page<T, C: Copy + Ord>(
    rows: &mut Vec<T>,
    limit: usize,
    after: Option<C>,
    key: impl Fn(&T) -> C,
) -> Option<C> {
    debug_assert!(limit > 0, "a page holds at least one item");
    debug_assert!(
        rows.len() <= limit.saturating_add(1),
        "read at most one extra row"
    );
    debug_assert!(
        rows.windows(2).all(|w| key(&w[0]) < key(&w[1])),
        "rows are in strict key order"
    );
    debug_assert!(
        after.is_none_or(|a| rows.first().is_none_or(|r| key(r) > a)),
        "rows are strictly after the cursor"
    );
    if rows.len() <= limit {
        return None;
    }
    rows.truncate(limit);
    let next = rows.last().map(&key);
    debug_assert!(next.is_some(), "a cut page is not empty");
    next
}

/// A state-table row with its key.
type KeyedRow<T> = ([u8; 32], T);
/// A key of two 32-byte parts (author, event).
type PairKey = ([u8; 32], [u8; 32]);

/// Envelopes [`Ledger::envelopes_since`] reads from the store at once.
const ENVELOPES_PER_READ: usize = 256;

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

    /// The records of accepted events in acceptance order from leaf `start`, at most `limit`
    /// (no envelopes read: what the sync crate's heads document is written from).
    pub fn records_since(&self, start: u64, limit: usize) -> Result<Vec<EventRecord>> {
        let tx = self.read()?;
        let events = tx.open_table(db::EVENTS)?;
        let mut out = Vec::new();
        for entry in events.range(start..)?.take(limit) {
            out.push(db::decode(entry?.1.value())?);
        }
        Ok(out)
    }

    /// The highest accepted seq of each author's log (all branches; 0: no event), read in one
    /// transaction.
    pub fn max_seqs(&self, authors: &[AuthorKey]) -> Result<Vec<u64>> {
        let tx = self.read()?;
        let table = tx.open_table(db::AUTHORS)?;
        authors
            .iter()
            .map(|a| match table.get(*a.as_bytes())? {
                Some(v) => Ok(db::decode::<AuthorState>(v.value())?.max_seq),
                None => Ok(0),
            })
            .collect()
    }

    /// Whether an event is accepted here (an in-memory lookup).
    pub fn has_event(&self, id: &EventId) -> bool {
        self.ids().get(id).is_some()
    }

    /// The envelopes of accepted events in acceptance order from leaf `start`, read
    /// [`ENVELOPES_PER_READ`] at a time: at most
    /// `limit` of them and, past the first, at most `bytes_max` bytes together. What a peer
    /// replicates (dependencies always come before the events that name them). With `elide`
    /// (a peer's endpoint id), the leaves of events that peer delivered are `None`.
    pub async fn envelopes_since(
        &self,
        start: u64,
        limit: usize,
        bytes_max: usize,
        elide: Option<[u8; 32]>,
    ) -> Result<Vec<Option<Bytes>>> {
        // Per leaf: its envelope's hash, or `None` when `elide` delivered it.
        let leaves: Vec<Option<BlobHash>> = {
            let tx = self.read()?;
            let events = tx.open_table(db::EVENTS)?;
            let delivered = tx.open_table(db::DELIVERED)?;
            let mut out = Vec::new();
            for entry in events.range(start..)?.take(limit) {
                let record: EventRecord = db::decode(entry?.1.value())?;
                let elided = match elide {
                    Some(peer) => delivered
                        .get(*record.id.as_bytes())?
                        .is_some_and(|v| v.value() == peer),
                    None => false,
                };
                out.push((!elided).then_some(record.envelope));
            }
            out
        };
        // In chunks, so that at most one chunk is read past the byte cap.
        let mut out = Vec::with_capacity(leaves.len());
        let mut total = 0usize;
        for chunk in leaves.chunks(ENVELOPES_PER_READ) {
            let hashes: Vec<BlobHash> = chunk.iter().flatten().copied().collect();
            let mut envelopes = self
                .shared
                .store
                .get_many(&hashes, meshnode_schemas::limits::EVENT_BYTES_MAX as u64)
                .await
                .into_iter();
            for leaf in chunk {
                if leaf.is_none() {
                    out.push(None);
                    continue;
                }
                let bytes = envelopes
                    .next()
                    .ok_or_else(|| Error::Io(std::io::Error::other("an envelope is missing")))??;
                total += bytes.len();
                if !out.is_empty() && total > bytes_max {
                    return Ok(out);
                }
                out.push(Some(bytes));
            }
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

    /// At most `limit` rows of a state table with keys strictly after `after`, in key order,
    /// and the key to continue after: one range read of `limit + 1` rows.
    fn state_page<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<'static, [u8; 32], &'static [u8]>,
        after: Option<&[u8; 32]>,
        limit: usize,
    ) -> Result<Page<KeyedRow<T>, [u8; 32]>> {
        debug_assert!(limit > 0, "a page holds at least one item");
        let tx = self.read()?;
        let t = tx.open_table(table)?;
        let lower = match after {
            Some(key) => Bound::Excluded(*key),
            None => Bound::Unbounded,
        };
        let range: (Bound<[u8; 32]>, Bound<[u8; 32]>) = (lower, Bound::Unbounded);
        let mut rows = Vec::with_capacity(limit.min(PAGE_PREALLOC) + 1);
        for entry in t.range(range)?.take(limit.saturating_add(1)) {
            let (k, v) = entry?;
            rows.push((k.value(), db::decode::<T>(v.value())?));
        }
        let next = cut_page(&mut rows, limit, after.copied(), |(k, _)| *k);
        Ok(Page { items: rows, next })
    }

    /// An account's summary from one read transaction: its state and reputation rows, without
    /// the unreferenced credits (`unreferenced_credits` is empty).
    fn account_in(tx: &ReadTransaction, key: &AuthorKey) -> Result<Account> {
        let state: AuthorState = match tx.open_table(db::AUTHORS)?.get(*key.as_bytes())? {
            Some(v) => db::decode(v.value())?,
            None => AuthorState::default(),
        };
        let reputation: ReputationState =
            match tx.open_table(db::REPUTATION)?.get(*key.as_bytes())? {
                Some(v) => db::decode(v.value())?,
                None => ReputationState::default(),
            };
        Ok(Account {
            key: *key,
            balance: state.balance(),
            received: state.received,
            received_contested: state.received_contested,
            sent: state.sent,
            sent_contested: state.sent_contested,
            minted: state.minted,
            unreferenced_credits: Vec::new(),
            head_seq: state.head_seq,
            head_id: state.head_id,
            signing_key: state.key_at(key, state.head_seq + 1),
            frozen_from: state.frozen_from,
            reputation: reputation.score,
        })
    }

    /// At most `limit` unreferenced credits of `key` after `after`, in EventId order, from one
    /// read transaction: one range read of `limit + 1` rows of `uncovered`.
    fn credits_in(
        tx: &ReadTransaction,
        key: &AuthorKey,
        after: Option<&EventId>,
        limit: usize,
    ) -> Result<Page<EventId, EventId>> {
        debug_assert!(limit > 0, "a page holds at least one item");
        let table = tx.open_table(db::UNCOVERED)?;
        let k = *key.as_bytes();
        let lower = match after {
            Some(credit) => Bound::Excluded((k, *credit.as_bytes())),
            None => Bound::Included((k, [0u8; 32])),
        };
        let range: (Bound<PairKey>, Bound<PairKey>) = (lower, Bound::Included((k, [0xffu8; 32])));
        let mut items = Vec::with_capacity(limit.min(PAGE_PREALLOC) + 1);
        for entry in table.range(range)?.take(limit.saturating_add(1)) {
            let (row, _) = entry?;
            let (recipient, credit) = row.value();
            debug_assert_eq!(recipient, k, "the range holds this account's credits only");
            items.push(EventId::from_bytes(credit));
        }
        let next = cut_page(&mut items, limit, after.copied(), |c| *c);
        Ok(Page { items, next })
    }

    /// An account without its unreferenced credits (`unreferenced_credits` is empty): two
    /// point reads, however many credits the account has.
    pub fn account_summary(&self, key: &AuthorKey) -> Result<Account> {
        Self::account_in(&self.read()?, key)
    }

    /// An account with a page of its unreferenced credits in `unreferenced_credits` (at most
    /// `limit` (> 0) after `after`, in EventId order), and the cursor of the next page of
    /// credits (see [`Ledger::unreferenced_credits`]), `None` when none follow; read in one
    /// transaction, O(limit).
    pub fn account_page(
        &self,
        key: &AuthorKey,
        after: Option<&EventId>,
        limit: usize,
    ) -> Result<(Account, Option<EventId>)> {
        let tx = self.read()?;
        let mut account = Self::account_in(&tx, key)?;
        let credits = Self::credits_in(&tx, key, after, limit)?;
        account.unreferenced_credits = credits.items;
        Ok((account, credits.next))
    }

    /// A page of an account's unreferenced credits: at most `limit` (> 0) after `after`, in
    /// EventId order. O(limit).
    pub fn unreferenced_credits(
        &self,
        key: &AuthorKey,
        after: Option<&EventId>,
        limit: usize,
    ) -> Result<Page<EventId, EventId>> {
        Self::credits_in(&self.read()?, key, after, limit)
    }

    /// An account (every key has one; unknown keys have zero balances) with every one of its
    /// unreferenced credits: O(credits). The HTTP API pages them ([`Ledger::account_page`]).
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

    /// A page of the fork proofs, by forked log (author key): at most `limit` (> 0) after
    /// `after`. O(limit).
    pub fn forks_page(
        &self,
        after: Option<&AuthorKey>,
        limit: usize,
    ) -> Result<Page<ForkProof, AuthorKey>> {
        let page =
            self.state_page::<ForkProof>(db::FORKS, after.map(AuthorKey::as_bytes), limit)?;
        debug_assert!(page.items.iter().all(|(k, p)| k == p.author.as_bytes()));
        Ok(Page {
            items: page.items.into_iter().map(|(_, p)| p).collect(),
            next: page.next.map(AuthorKey::from_bytes),
        })
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

    /// A page of the skill catalog, by `skill.publish` EventId: at most `limit` (> 0) after
    /// `after`. O(limit).
    pub fn skills_page(
        &self,
        after: Option<&EventId>,
        limit: usize,
    ) -> Result<Page<SkillState, EventId>> {
        let page =
            self.state_page::<SkillState>(db::SKILLS, after.map(EventId::as_bytes), limit)?;
        debug_assert!(page.items.iter().all(|(k, s)| k == s.id.as_bytes()));
        Ok(Page {
            items: page.items.into_iter().map(|(_, s)| s).collect(),
            next: page.next.map(EventId::from_bytes),
        })
    }

    /// The peers (endpoint ids) whose logs delivered `ids`, in order; `None` for an event
    /// posted to this node, woken from the pending set, or not accepted.
    pub fn delivered_by(&self, ids: &[EventId]) -> Result<Vec<Option<[u8; 32]>>> {
        let tx = self.shared.db.begin_read()?;
        let table = tx.open_table(db::DELIVERED)?;
        ids.iter()
            .map(|id| Ok(table.get(*id.as_bytes())?.map(|v| v.value())))
            .collect()
    }

    /// How many blobs `host`'s latest `blob.host` says it pins. Reads every host row: O(rows).
    pub fn hosted_by(&self, host: &AuthorKey) -> Result<u64> {
        let tx = self.shared.db.begin_read()?;
        let mut n = 0;
        for entry in tx.open_table(db::HOSTS)?.iter()? {
            let (k, v) = entry?;
            if k.value().1 == *host.as_bytes() && v.value().2 {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Whether `host`'s latest `blob.host` for `blob` says pinned. O(1).
    pub fn hosts_blob(&self, blob: &BlobHash, host: &AuthorKey) -> Result<bool> {
        let tx = self.shared.db.begin_read()?;
        let table = tx.open_table(db::HOSTS)?;
        Ok(table
            .get((*blob.as_bytes(), *host.as_bytes()))?
            .is_some_and(|v| v.value().2))
    }

    /// Hosts of a blob (authors whose latest `blob.host` for it says pinned).
    pub fn hosts(&self, blob: &BlobHash) -> Result<Vec<AuthorKey>> {
        Ok(self.hosts_up_to(blob, usize::MAX)?.0)
    }

    /// At most `max` hosts of a blob, and whether there are (or may be) more: reads at most
    /// `4 × max` host rows, so a blob with a million announcements costs the same as one.
    pub fn hosts_up_to(&self, blob: &BlobHash, max: usize) -> Result<(Vec<AuthorKey>, bool)> {
        let tx = self.shared.db.begin_read()?;
        let table = tx.open_table(db::HOSTS)?;
        let from = (*blob.as_bytes(), [0u8; 32]);
        let to = (*blob.as_bytes(), [0xffu8; 32]);
        let scan_max = max.saturating_mul(4).max(1);
        let mut out = Vec::new();
        for (scanned, entry) in table.range(from..=to)?.enumerate() {
            if scanned == scan_max {
                return Ok((out, true));
            }
            let (k, v) = entry?;
            if v.value().2 {
                if out.len() == max {
                    return Ok((out, true));
                }
                out.push(AuthorKey::from_bytes(k.value().1));
            }
        }
        Ok((out, false))
    }

    /// Basins.
    pub fn basins(&self) -> Result<Vec<BasinState>> {
        self.all_state(db::BASINS)
    }

    /// A page of the basins, by `basin.publish` EventId: at most `limit` (> 0) after `after`.
    /// O(limit).
    pub fn basins_page(
        &self,
        after: Option<&EventId>,
        limit: usize,
    ) -> Result<Page<BasinState, EventId>> {
        let page =
            self.state_page::<BasinState>(db::BASINS, after.map(EventId::as_bytes), limit)?;
        debug_assert!(page.items.iter().all(|(k, b)| k == b.id.as_bytes()));
        Ok(Page {
            items: page.items.into_iter().map(|(_, b)| b).collect(),
            next: page.next.map(EventId::from_bytes),
        })
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

    /// A page of the reputation scores, by subject key: at most `limit` (> 0) after `after`.
    /// O(limit).
    pub fn reputation_page(
        &self,
        after: Option<&AuthorKey>,
        limit: usize,
    ) -> Result<Page<(AuthorKey, ReputationState), AuthorKey>> {
        let page = self.state_page::<ReputationState>(
            db::REPUTATION,
            after.map(AuthorKey::as_bytes),
            limit,
        )?;
        Ok(Page {
            items: page
                .items
                .into_iter()
                .map(|(k, r)| (AuthorKey::from_bytes(k), r))
                .collect(),
            next: page.next.map(AuthorKey::from_bytes),
        })
    }

    /// The node registry.
    pub fn nodes(&self) -> Result<Vec<NodeState>> {
        self.all_state(db::NODES)
    }

    /// One node's registry entry (its latest `node.announce`), if it announced. O(1).
    pub fn node_entry(&self, key: &AuthorKey) -> Result<Option<NodeState>> {
        self.get_state(db::NODES, key.as_bytes())
    }

    /// A page of the node registry, by node author key: at most `limit` (> 0) after `after`.
    /// O(limit).
    pub fn nodes_page(
        &self,
        after: Option<&AuthorKey>,
        limit: usize,
    ) -> Result<Page<NodeState, AuthorKey>> {
        let page =
            self.state_page::<NodeState>(db::NODES, after.map(AuthorKey::as_bytes), limit)?;
        debug_assert!(page.items.iter().all(|(k, n)| k == n.author.as_bytes()));
        Ok(Page {
            items: page.items.into_iter().map(|(_, n)| n).collect(),
            next: page.next.map(AuthorKey::from_bytes),
        })
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
