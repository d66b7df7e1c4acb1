//! The ledger's GC roots for the store.

use meshnode_schemas::BlobHash;
use meshnode_store::GcRoots;
use redb::{ReadableDatabase, ReadableTable};

use crate::db;
use crate::error::Result;
use crate::fold::{EventRecord, SkillState};
use crate::ledger::Shared;

/// The ledger's GC roots: every accepted and pending envelope, the blobs this node hosts (its
/// `blob.host` announcements) and the weights of every uncontested skill.
pub(crate) struct LedgerRoots {
    /// Weak: the store must not keep the ledger alive. A ledger that is gone aborts GC.
    pub(crate) shared: std::sync::Weak<Shared>,
}

impl GcRoots for LedgerRoots {
    fn add_roots(
        &self,
        roots: &mut std::collections::HashSet<BlobHash>,
    ) -> std::result::Result<(), String> {
        let Some(shared) = self.shared.upgrade() else {
            return Err("the ledger is closed; its roots are unknown".into());
        };
        let mut collect = || -> Result<()> {
            let tx = shared.db.begin_read()?;
            for entry in tx.open_table(db::EVENTS)?.iter()? {
                let (_, v) = entry?;
                let record: EventRecord = db::decode(v.value())?;
                roots.insert(record.envelope);
            }
            for entry in tx.open_table(db::PENDING)?.iter()? {
                roots.insert(BlobHash::from_bytes(entry?.0.value()));
            }
            for entry in tx.open_table(db::HOSTS)?.iter()? {
                let (k, v) = entry?;
                let (blob, host) = k.value();
                if host == *shared.node.as_bytes() && v.value().2 {
                    roots.insert(BlobHash::from_bytes(blob));
                }
            }
            // The weights of every uncontested skill, whoever published it: the catalog lists
            // them, so this node keeps what it has of them.
            for entry in tx.open_table(db::SKILLS)?.iter()? {
                let (_, v) = entry?;
                let skill: SkillState = db::decode(v.value())?;
                if !skill.contested {
                    roots.insert(skill.blob);
                }
            }
            Ok(())
        };
        collect().map_err(|e| e.to_string())
    }
}
