//! Events waiting for their `prev` or `deps`: bounded in count, bytes and per author, woken in
//! O(waiters) when what they wait for is accepted, stored with their arrival time.

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
            let (blob, since) = v.value();
            rows.push((
                EventId::from_bytes(k.value()),
                BlobHash::from_bytes(blob),
                since,
            ));
        }
        rows
    };
    let mut jobs = Vec::with_capacity(rows.len());
    for (id, blob, since_ms) in rows {
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
                }),
                _ => tracing::warn!(%id, "dropping an unreadable pending event"),
            },
            Err(e) => tracing::warn!(%id, "pending event envelope unavailable: {e}"),
        }
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
}

/// Events waiting for their prev or deps, bounded in count, in bytes and per author.
#[derive(Default)]
pub(crate) struct Pending {
    pub(crate) entries: HashMap<EventId, PendingEntry>,
    /// Missing event → the pending events that wait for it. Lists are cleaned lazily (an id
    /// whose entry is gone is skipped), so waking N waiters costs O(N).
    pub(crate) waiters: HashMap<EventId, Vec<EventId>>,
    /// Envelope bytes held.
    pub(crate) bytes: usize,
    /// Entries per author.
    pub(crate) per_author: HashMap<AuthorKey, usize>,
}

/// Most envelope bytes held by pending events (each entry also holds its decoded form).
pub const PENDING_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most pending events of one author.
pub const PENDING_PER_AUTHOR_MAX: usize = 512;

impl Pending {
    /// Whether one more event of `author` fits; the error says which limit is reached. A full
    /// pending set delays an event (the submitter or a peer delivers it again later); it is
    /// not a verdict on the event.
    pub(crate) fn admit(&self, event: &SignedEvent, count_max: usize) -> Result<()> {
        let author = event.body.author;
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
        if self.bytes + event.envelope.len() > PENDING_BYTES_MAX {
            return Err(full(format!(
                "waiting events already hold {} MiB",
                PENDING_BYTES_MAX >> 20
            )));
        }
        if self.per_author.get(&author).copied().unwrap_or(0) >= PENDING_PER_AUTHOR_MAX {
            return Err(full(format!(
                "{PENDING_PER_AUTHOR_MAX} events of {author} already wait"
            )));
        }
        Ok(())
    }

    pub(crate) fn insert(&mut self, event: Arc<SignedEvent>, waiting: &Waiting, since: Instant) {
        for key in &waiting.missing {
            self.waiters.entry(*key).or_default().push(event.id);
        }
        self.count(&event);
        if let Some(old) = self.entries.insert(event.id, PendingEntry { event, since }) {
            // Inserted again while still there: counted once.
            self.forget(&old.event);
        }
    }

    pub(crate) fn count(&mut self, event: &SignedEvent) {
        self.bytes += event.envelope.len();
        *self.per_author.entry(event.body.author).or_default() += 1;
    }

    pub(crate) fn forget(&mut self, event: &SignedEvent) {
        self.bytes -= event.envelope.len();
        let author = event.body.author;
        if let Some(n) = self.per_author.get_mut(&author) {
            *n -= 1;
            if *n == 0 {
                self.per_author.remove(&author);
            }
        }
    }

    pub(crate) fn remove(&mut self, id: &EventId) -> Option<PendingEntry> {
        let entry = self.entries.remove(id)?;
        self.forget(&entry.event);
        Some(entry)
    }

    /// Pending events that may now apply because `record` was accepted.
    pub(crate) fn woken_by(&mut self, record: &EventRecord) -> Vec<PendingEntry> {
        let Some(ids) = self.waiters.remove(&record.id) else {
            return Vec::new();
        };
        ids.into_iter().filter_map(|id| self.remove(&id)).collect()
    }

    /// Drops waiter ids whose entries are gone.
    pub(crate) fn compact(&mut self) {
        let entries = &self.entries;
        self.waiters.retain(|_, ids| {
            ids.retain(|id| entries.contains_key(id));
            !ids.is_empty()
        });
    }
}
