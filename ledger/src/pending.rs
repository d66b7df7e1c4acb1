//! Events waiting for their `prev` or `deps`: bounded in count, bytes and per author, woken in
//! O(waiters) when what they wait for is accepted, stored with their arrival time.
//!
//! Entries are keyed by envelope hash, not EventId: until its `prev` is known an event's
//! signature cannot be checked, so a copy of an honest body with a bad signature must not be
//! able to take the honest envelope's place. Both wait; the wake-up tries each.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode_schemas::{AuthorKey, BlobHash, EventId, SignedEvent};
use redb::{ReadableDatabase, ReadableTable};

use crate::db;
use crate::error::{Result, Rule, Waiting, reject};
use crate::fold::EventRecord;
use crate::ledger::{Shared, now_ms};
use crate::worker::Job;

/// The pending events stored in the index, as jobs to try again.
pub(crate) async fn load_pending_jobs(shared: &Arc<Shared>) -> Result<Vec<Job>> {
    let rows = {
        let tx = shared.db.begin_read()?;
        let mut rows = Vec::new();
        for entry in tx.open_table(db::PENDING)?.iter()? {
            let (k, v) = entry?;
            let (id, since) = v.value();
            rows.push((
                BlobHash::from_bytes(k.value()),
                EventId::from_bytes(id),
                since,
            ));
        }
        rows
    };
    let mut jobs = Vec::with_capacity(rows.len());
    let mut unreadable = Vec::new();
    for (blob, id, since_ms) in rows {
        match shared
            .store
            .get_bytes(&blob, meshnode_schemas::limits::EVENT_BYTES_MAX as u64)
            .await
        {
            Ok(bytes) => match SignedEvent::decode(&bytes) {
                Ok(event) if event.id == id => jobs.push(Job {
                    event: Arc::new(event),
                    reply: None,
                    since_ms: Some(since_ms),
                    from: None,
                }),
                _ => {
                    tracing::warn!(%id, "dropping an unreadable pending event");
                    unreadable.push(blob);
                }
            },
            Err(
                e @ (meshnode_store::Error::NotFound(_)
                | meshnode_store::Error::Corrupt(_)
                | meshnode_store::Error::Quarantined(_)),
            ) => {
                tracing::warn!(%id, "dropping a pending event whose envelope is gone: {e}");
                unreadable.push(blob);
            }
            // A passing failure: the row stays and is tried at the next reload or start.
            Err(e) => tracing::warn!(%id, "pending event envelope unavailable now: {e}"),
        }
    }
    if !unreadable.is_empty() {
        let tx = db::begin_write(&shared.db)?;
        {
            let mut table = tx.open_table(db::PENDING)?;
            for blob in &unreadable {
                table.remove(*blob.as_bytes())?;
            }
        }
        tx.commit()?;
    }
    Ok(jobs)
}

/// The `Instant` of a wall-clock time in ms since the epoch (for arrival times read back).
pub(crate) fn instant_of_ms(ms: u64) -> Instant {
    let age = Duration::from_millis(now_ms().saturating_sub(ms));
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

pub(crate) struct PendingEntry {
    pub(crate) event: Arc<SignedEvent>,
    pub(crate) since: Instant,
    /// Signed by a key its log is known to use (so not a stranger's or a forger's filler).
    pub(crate) trusted: bool,
}

/// Events waiting for their prev or deps, bounded in count, in bytes, per author, and for
/// untrusted events (an unknown author, or a signature no known key of the log verifies) as a
/// class.
#[derive(Default)]
pub(crate) struct Pending {
    /// Envelope hash → entry.
    pub(crate) entries: HashMap<BlobHash, PendingEntry>,
    /// Missing event → the envelopes that wait for it. Lists are cleaned lazily (a hash whose
    /// entry is gone is skipped), so waking N waiters costs O(N).
    pub(crate) waiters: HashMap<EventId, Vec<BlobHash>>,
    /// Envelope bytes held.
    pub(crate) bytes: usize,
    /// Untrusted entries and their bytes.
    pub(crate) untrusted: (usize, usize),
    /// Entries per author.
    pub(crate) per_author: HashMap<AuthorKey, usize>,
}

/// Most envelope bytes held by pending events (each entry also holds its decoded form).
pub const PENDING_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most pending events of one author.
pub const PENDING_PER_AUTHOR_MAX: usize = 512;
/// The share of the count and bytes limits that untrusted events may take (1/4), so that
/// fresh keys and unsigned filler cannot starve known logs' out-of-order events.
const UNTRUSTED_SHARE_DIVISOR: usize = 4;

impl Pending {
    /// Whether one more event fits; the error says which limit is reached. A full pending set
    /// delays an event (the submitter or a peer delivers it again later); it is not a verdict
    /// on the event.
    pub(crate) fn admit(&self, event: &SignedEvent, trusted: bool, count_max: usize) -> Result<()> {
        let author = event.body.author;
        let size = event.envelope.len();
        let full = |what: String| {
            reject(
                Rule::PendingFull,
                format!("{what}; deliver the events it waits for first, or retry later"),
            )
        };
        if self.entries.len() >= count_max {
            return Err(full(format!(
                "{count_max} events already wait for their prev or deps"
            )));
        }
        if self.bytes + size > PENDING_BYTES_MAX {
            return Err(full(format!(
                "waiting events already hold {} MiB",
                PENDING_BYTES_MAX >> 20
            )));
        }
        if !trusted
            && (self.untrusted.0 >= count_max / UNTRUSTED_SHARE_DIVISOR
                || self.untrusted.1 + size > PENDING_BYTES_MAX / UNTRUSTED_SHARE_DIVISOR)
        {
            return Err(full(
                "the share of waiting events from unknown authors or unverified signatures is \
                 full"
                    .into(),
            ));
        }
        if self.per_author.get(&author).copied().unwrap_or(0) >= PENDING_PER_AUTHOR_MAX {
            return Err(full(format!(
                "{PENDING_PER_AUTHOR_MAX} events of {author} already wait"
            )));
        }
        Ok(())
    }

    /// Whether this envelope waits already.
    pub(crate) fn contains(&self, event: &SignedEvent) -> bool {
        self.entries.contains_key(&BlobHash::of(&event.envelope))
    }

    pub(crate) fn insert(
        &mut self,
        event: Arc<SignedEvent>,
        waiting: &Waiting,
        since: Instant,
        trusted: bool,
    ) {
        let blob = BlobHash::of(&event.envelope);
        for key in &waiting.missing {
            self.waiters.entry(*key).or_default().push(blob);
        }
        let entry = PendingEntry {
            event,
            since,
            trusted,
        };
        self.count(&entry, true);
        if let Some(old) = self.entries.insert(blob, entry) {
            // Inserted again while still there: counted once.
            self.count(&old, false);
        }
    }

    fn count(&mut self, entry: &PendingEntry, add: bool) {
        let size = entry.event.envelope.len();
        let author = entry.event.body.author;
        if add {
            self.bytes += size;
            if !entry.trusted {
                self.untrusted.0 += 1;
                self.untrusted.1 += size;
            }
            *self.per_author.entry(author).or_default() += 1;
            return;
        }
        self.bytes -= size;
        if !entry.trusted {
            self.untrusted.0 -= 1;
            self.untrusted.1 -= size;
        }
        if let Some(n) = self.per_author.get_mut(&author) {
            *n -= 1;
            if *n == 0 {
                self.per_author.remove(&author);
            }
        }
    }

    pub(crate) fn remove(&mut self, blob: &BlobHash) -> Option<PendingEntry> {
        let entry = self.entries.remove(blob)?;
        self.count(&entry, false);
        Some(entry)
    }

    /// Pending events that may now apply because `record` was accepted.
    pub(crate) fn woken_by(&mut self, record: &EventRecord) -> Vec<PendingEntry> {
        let Some(blobs) = self.waiters.remove(&record.id) else {
            return Vec::new();
        };
        blobs.into_iter().filter_map(|b| self.remove(&b)).collect()
    }

    /// Drops waiter entries whose events are gone.
    pub(crate) fn compact(&mut self) {
        let entries = &self.entries;
        self.waiters.retain(|_, blobs| {
            blobs.retain(|b| entries.contains_key(b));
            !blobs.is_empty()
        });
    }
}
