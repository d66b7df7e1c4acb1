//! Every automerge sync message from a peer is checked here before automerge sees it
//! (notes/sync.md §2.3): automerge trusts its input, and some of it panics (a bloom filter
//! of zero bits per entry divides by zero), allocates without bound (`num_probes` sizes a
//! `Vec`) or inflates compressed chunks without a cap (a 1 MB deflate bomb became 3 GiB).
//!
//! - A replica's message (`check_ask`, what an owner receives) carries no changes: heads,
//!   needs and one `Have` whose bloom filter's parameters are in automerge's own range.
//! - An owner's message (`check_answer`, what a replica receives) may carry changes, each
//!   a change chunk (document and bundle chunks are refused); a compressed chunk is inflated
//!   here under a cap and handed on uncompressed; every change must be written by the
//!   document's actor, reference no other actor, and consist of puts and deletes of keys at
//!   the root that fit the document's grammar.
//! - The message handed on has its flags dropped: this node speaks sync V1 only, so a peer
//!   can neither make it send a whole document nor switch it to another mode.

use std::io::Read;

use automerge::legacy::{Key, ObjectId, OpType};
use automerge::sync::{Message, MessageVersion};
use automerge::{ActorId, Change, ScalarValue};
use sha2::Digest;

use crate::amchange::Reader;
use crate::docs::DocKind;

/// Largest message a replica sends (no changes in it).
pub(crate) const ASK_BYTES_MAX: usize = 512 << 10;
/// Largest message an owner sends.
pub(crate) const ANSWER_BYTES_MAX: usize = 4 << 20;
const HEADS_MAX: usize = 32;
const NEED_MAX: usize = 1024;
const HAVE_MAX: usize = 1;
const LAST_SYNC_MAX: usize = 32;
/// Bloom filters: automerge itself uses 10 bits per entry and 7 probes.
const BITS_PER_ENTRY_MAX: u64 = 32;
const PROBES_MAX: u64 = 16;
const BLOOM_BYTES_MAX: u64 = 256 << 10;
const CHANGES_MAX: usize = 1024;
/// Inflated size of one compressed change, and of all of a message's changes.
pub(crate) const CHUNK_INFLATED_MAX: usize = 1 << 20;
const MESSAGE_INFLATED_MAX: usize = 8 << 20;
const OPS_PER_CHANGE_MAX: usize = 20_000;
const DEPS_MAX: usize = 8;
const EXTRA_BYTES_MAX: usize = 64;
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED: u8 = 2;

/// Why a message was refused.
#[derive(Debug, thiserror::Error)]
#[error("automerge message refused: {0}")]
pub(crate) struct Invalid(pub(crate) String);

fn bad(why: impl Into<String>) -> Invalid {
    Invalid(why.into())
}

/// Checks a replica's message to this node (the owner).
pub(crate) fn check_ask(bytes: &[u8]) -> Result<Message, Invalid> {
    let mut m = decode(bytes, ASK_BYTES_MAX)?;
    if !m.changes.is_empty() {
        return Err(bad(
            "a replica sent changes to a document only its owner writes",
        ));
    }
    m.flags = None;
    Ok(m)
}

/// Checks an owner's message for our replica of its document `kind` written by `actor`.
pub(crate) fn check_answer(
    bytes: &[u8],
    kind: DocKind,
    actor: &ActorId,
) -> Result<Message, Invalid> {
    let mut m = decode(bytes, ANSWER_BYTES_MAX)?;
    if m.changes.len() > CHANGES_MAX {
        return Err(bad(format!(
            "{} changes, at most {CHANGES_MAX}",
            m.changes.len()
        )));
    }
    let mut inflated = 0usize;
    let mut chunks = Vec::with_capacity(m.changes.len());
    for chunk in m.changes.iter() {
        let chunk = change_chunk(chunk, &mut inflated)?;
        check_change(&chunk, kind, actor)?;
        chunks.push(chunk);
    }
    m.changes = chunks.into();
    m.flags = None;
    Ok(m)
}

/// Decodes a message and checks everything but its changes.
fn decode(bytes: &[u8], max: usize) -> Result<Message, Invalid> {
    if bytes.len() > max {
        return Err(bad(format!("{} bytes, at most {max}", bytes.len())));
    }
    // Automerge's decoder is bounded by its input (it allocates nothing in advance).
    let m = Message::decode(bytes).map_err(|e| bad(format!("undecodable: {e}")))?;
    if m.version != MessageVersion::V1 {
        return Err(bad(
            "sync V2 messages are not accepted (this node speaks V1)",
        ));
    }
    if m.heads.len() > HEADS_MAX || m.need.len() > NEED_MAX || m.have.len() > HAVE_MAX {
        return Err(bad(format!(
            "{} heads, {} needs, {} haves (at most {HEADS_MAX}, {NEED_MAX}, {HAVE_MAX})",
            m.heads.len(),
            m.need.len(),
            m.have.len()
        )));
    }
    for have in &m.have {
        if have.last_sync.len() > LAST_SYNC_MAX {
            return Err(bad("too many last-sync hashes"));
        }
        check_bloom(&have.bloom.to_bytes())?;
    }
    Ok(m)
}

/// A bloom filter's wire form: nothing (empty), or entries, bits per entry, probes, bits.
fn check_bloom(bytes: &[u8]) -> Result<(), Invalid> {
    if bytes.is_empty() {
        return Ok(());
    }
    let mut r = Reader(bytes);
    let entries = r.uleb()?;
    let per_entry = r.uleb()?;
    let probes = r.uleb()?;
    let bytes = r.0;
    if !(1..=BITS_PER_ENTRY_MAX).contains(&per_entry) || !(1..=PROBES_MAX).contains(&probes) {
        return Err(bad(format!(
            "bloom filter of {per_entry} bits per entry and {probes} probes \
             (1..={BITS_PER_ENTRY_MAX} and 1..={PROBES_MAX})"
        )));
    }
    // Checked: 2^61 entries of 8 bits would wrap to an empty filter.
    let want = entries
        .checked_mul(per_entry)
        .map_or(u64::MAX, |bits| bits.div_ceil(8));
    if entries == 0 || want > BLOOM_BYTES_MAX || bytes.len() as u64 != want {
        return Err(bad(format!(
            "bloom filter of {entries} entries in {} bytes",
            bytes.len()
        )));
    }
    Ok(())
}

/// A chunk's parts: checksum, type, data.
fn split_chunk(chunk: &[u8]) -> Result<([u8; 4], u8, &[u8]), Invalid> {
    if chunk.len() < 9 || chunk[..4] != MAGIC {
        return Err(bad("not an automerge chunk"));
    }
    let checksum: [u8; 4] = chunk[4..8].try_into().expect("4 bytes");
    let kind = chunk[8];
    let mut r = Reader(&chunk[9..]);
    let len = r.uleb()?;
    let rest = r.0;
    if rest.len() as u64 != len {
        return Err(bad("a chunk's length does not match its data"));
    }
    Ok((checksum, kind, rest))
}

/// A change chunk as automerge's own header would write it (type, length, checksum).
pub(crate) fn change_chunk_of(data: &[u8]) -> Vec<u8> {
    let mut len = Vec::new();
    crate::craft::leb128(&mut len, data.len() as u64);
    let mut h = sha2::Sha256::new();
    h.update([CHUNK_CHANGE]);
    h.update(&len);
    h.update(data);
    let sum = h.finalize();
    let mut out = Vec::with_capacity(9 + len.len() + data.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&sum[..4]);
    out.push(CHUNK_CHANGE);
    out.extend_from_slice(&len);
    out.extend_from_slice(data);
    out
}

/// The chunk as an uncompressed change chunk; a compressed one is inflated here, at most
/// [`CHUNK_INFLATED_MAX`] (and `inflated` counts the message's total).
fn change_chunk(chunk: &[u8], inflated: &mut usize) -> Result<Vec<u8>, Invalid> {
    let (checksum, kind, data) = split_chunk(chunk)?;
    match kind {
        CHUNK_CHANGE => Ok(chunk.to_vec()),
        CHUNK_COMPRESSED => {
            let mut out = Vec::new();
            flate2::read::DeflateDecoder::new(data)
                .take(CHUNK_INFLATED_MAX as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| bad(format!("a compressed change does not inflate: {e}")))?;
            *inflated += out.len();
            if out.len() > CHUNK_INFLATED_MAX || *inflated > MESSAGE_INFLATED_MAX {
                return Err(bad(format!(
                    "a compressed change inflates past {CHUNK_INFLATED_MAX} bytes \
                     (or the message's past {MESSAGE_INFLATED_MAX})"
                )));
            }
            let rebuilt = change_chunk_of(&out);
            if rebuilt[4..8] != checksum {
                return Err(bad("a compressed change's checksum does not match"));
            }
            Ok(rebuilt)
        }
        0 => Err(bad(
            "document chunks are not accepted (sync V1 sends changes)",
        )),
        3 => Err(bad("bundle chunks are not accepted")),
        other => Err(bad(format!("unknown chunk type {other}"))),
    }
}

/// One change: its actor, its size and every operation.
fn check_change(chunk: &[u8], kind: DocKind, actor: &ActorId) -> Result<(), Invalid> {
    // Automerge iterates every operation the columns declare: their runs are summed first.
    let (_, _, data) = split_chunk(chunk)?;
    let walked = crate::amchange::walk(data, OPS_PER_CHANGE_MAX as u64)?;
    if walked.other_actors != 0 {
        return Err(bad(format!(
            "a change naming {} other actors (this document is written by {actor} alone)",
            walked.other_actors
        )));
    }
    let change =
        Change::from_bytes(chunk.to_vec()).map_err(|e| bad(format!("a bad change: {e}")))?;
    if change.actor_id() != actor || !change.other_actor_ids().is_empty() {
        return Err(bad(format!(
            "a change by actor {} (this document is written by {actor} alone)",
            change.actor_id()
        )));
    }
    if change.len() > OPS_PER_CHANGE_MAX
        || change.deps().len() > DEPS_MAX
        || change.extra_bytes().len() > EXTRA_BYTES_MAX
        || change.message().is_some_and(|m| !m.is_empty())
    {
        return Err(bad(format!(
            "a change of {} operations and {} deps (at most {OPS_PER_CHANGE_MAX} and \
             {DEPS_MAX}; no message, at most {EXTRA_BYTES_MAX} extra bytes)",
            change.len(),
            change.deps().len()
        )));
    }
    for op in change.decode().operations {
        let Key::Map(key) = &op.key else {
            return Err(bad("an operation on a list"));
        };
        let value = match &op.action {
            OpType::Put(ScalarValue::Bytes(b)) => Some(b.as_slice()),
            OpType::Delete => None,
            _ => {
                return Err(bad(format!(
                    "operation {:?} (only puts of bytes and deletes)",
                    op.action
                )));
            }
        };
        if op.obj != ObjectId::Root || op.insert || !kind.entry_ok(key, value) {
            return Err(bad(format!(
                "entry {key:?} does not fit the {kind:?} document"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::craft::{ask_with_bloom, message_with_chunk};
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ROOT, ReadDoc};

    const OWNER: [u8; 32] = [7; 32];

    fn head_key(i: u8) -> String {
        hex::encode([i; 32])
    }

    /// An owner document of `n` heads written by `actor`, and the messages a fresh replica
    /// and that owner exchange first.
    fn exchange(actor: ActorId, n: u8, value_len: usize) -> (Vec<u8>, Vec<u8>) {
        let mut doc = Automerge::new().with_actor(actor);
        let mut tx = doc.transaction();
        for i in 0..n {
            tx.put(ROOT, head_key(i), ScalarValue::Bytes(vec![i; value_len]))
                .expect("test");
        }
        tx.commit();
        let mut replica = Automerge::new();
        let (mut rs, mut os) = (automerge::sync::State::new(), automerge::sync::State::new());
        let mut ask = replica.generate_sync_message(&mut rs).expect("test");
        // As our replicas send it: V1 only.
        ask.flags = None;
        let ask_bytes = ask.clone().encode();
        doc.receive_sync_message(&mut os, ask).expect("test");
        let answer = doc.generate_sync_message(&mut os).expect("test").encode();
        let _ = replica.receive_sync_message(&mut rs, Message::decode(&answer).expect("test"));
        (ask_bytes, answer)
    }

    fn actor() -> ActorId {
        crate::docs::actor(&OWNER, DocKind::Heads, 1)
    }

    #[test]
    fn honest_messages_pass_and_apply() {
        // 200 heads: big enough that automerge compresses the change.
        let (ask, answer) = exchange(actor(), 200, 72);
        check_ask(&ask).expect("test");
        let m = check_answer(&answer, DocKind::Heads, &actor()).expect("test");
        let mut replica = Automerge::new();
        replica
            .receive_sync_message(&mut automerge::sync::State::new(), m)
            .expect("test");
        assert_eq!(replica.length(ROOT), 200);
    }

    #[test]
    fn foreign_actor_and_foreign_keys_are_refused() {
        let (_, answer) = exchange(ActorId::from(&[9u8; 16][..]), 3, 72);
        let e = check_answer(&answer, DocKind::Heads, &actor()).expect_err("refused");
        assert!(e.0.contains("actor"), "{e}");
        // Right actor, wrong value size.
        let (_, answer) = exchange(actor(), 3, 10);
        let e = check_answer(&answer, DocKind::Heads, &actor()).expect_err("refused");
        assert!(e.0.contains("does not fit"), "{e}");
        // A nested object.
        let mut doc = Automerge::new().with_actor(actor());
        let mut tx = doc.transaction();
        tx.put_object(ROOT, head_key(1), automerge::ObjType::Map)
            .expect("test");
        tx.commit();
        let chunk = doc
            .get_last_local_change()
            .expect("test")
            .raw_bytes()
            .to_vec();
        let m = Message {
            heads: doc.get_heads(),
            need: vec![],
            have: vec![],
            changes: vec![chunk].into(),
            flags: None,
            version: MessageVersion::V1,
        };
        let e = check_answer(&m.encode(), DocKind::Heads, &actor()).expect_err("refused");
        assert!(e.0.contains("operation"), "{e}");
    }

    #[test]
    fn run_length_bombs_are_refused_before_automerge_sees_them() {
        let chunk = crate::craft::run_length_bomb();
        assert_eq!(chunk.len(), 79);
        // Its checksum is automerge's: automerge itself would take it and spin.
        let e = check_answer(&message_with_chunk(chunk), DocKind::Heads, &actor())
            .expect_err("refused");
        assert!(e.0.contains("more than 20000 values"), "{e}");
    }

    #[test]
    fn bloom_parameters_are_checked() {
        check_ask(&ask_with_bloom(10, 10, 7, 13)).expect("test");
        // Zero bits per entry: automerge divides by zero.
        assert!(check_ask(&ask_with_bloom(10, 0, 7, 0)).is_err());
        // u32::MAX probes: automerge reserves 16 GiB.
        assert!(check_ask(&ask_with_bloom(10, 10, u32::MAX as u64, 13)).is_err());
        assert!(check_ask(&ask_with_bloom(10, 10, 0, 13)).is_err());
        // Fewer bits than the parameters say, or a filter past the cap.
        assert!(check_ask(&ask_with_bloom(10, 10, 7, 12)).is_err());
        assert!(check_ask(&ask_with_bloom(1 << 20, 10, 7, 1 << 17)).is_err());
        // Entries × bits past u64 (wrapping, it would claim an empty filter).
        assert!(check_ask(&ask_with_bloom(1 << 61, 8, 7, 0)).is_err());
    }

    #[test]
    fn counts_sizes_and_versions_are_checked() {
        // 100 haves.
        let mut m = vec![0x42, 0, 0, 100];
        m.extend(std::iter::repeat_n([0u8, 0u8], 100).flatten());
        m.push(0);
        assert!(check_ask(&m).expect_err("refused").0.contains("haves"));
        // V2.
        let mut v2 = ask_with_bloom(10, 10, 7, 13);
        v2[0] = 0x43;
        assert!(check_ask(&v2).expect_err("refused").0.contains("V2"));
        // Oversized.
        assert!(check_ask(&vec![0x42; ASK_BYTES_MAX + 1]).is_err());
        // A replica sending changes.
        let (_, answer) = exchange(actor(), 1, 72);
        assert!(check_ask(&answer).is_err());
    }

    #[test]
    fn compressed_chunk_bombs_and_document_chunks_are_refused() {
        // 64 MiB of zeros deflate to about 64 KiB.
        let mut chunk = crate::craft::deflate_bomb_chunk(64);
        assert!(chunk.len() < ANSWER_BYTES_MAX);
        let e = check_answer(&message_with_chunk(chunk.clone()), DocKind::Heads, &actor())
            .expect_err("refused");
        assert!(e.0.contains("inflates past"), "{e}");
        // A document chunk (what V2 sends).
        chunk[8] = 0;
        let e = check_answer(&message_with_chunk(chunk), DocKind::Heads, &actor())
            .expect_err("refused");
        assert!(e.0.contains("document chunks"), "{e}");
        // Not a chunk at all.
        assert!(
            check_answer(&message_with_chunk(vec![1, 2, 3]), DocKind::Heads, &actor()).is_err()
        );
    }

    #[test]
    fn own_documents_pass_the_checks_of_their_replicas() {
        let mut own = crate::docs::OwnDoc::new(OWNER, DocKind::Catalog, Default::default());
        let key = format!("s{}", hex::encode([3u8; 32]));
        own.apply(vec![(key.clone(), Some(vec![1; 80]))]);
        own.apply(vec![(key, None)]);
        let mut replica = crate::docs::Replica::new();
        session(&mut own, &mut replica, DocKind::Catalog);
        assert_eq!(replica.heads(), own.doc().get_heads());
        assert_eq!(replica.doc.length(ROOT), 0);
    }

    /// A session as `docsync` runs one: a fresh state on the owner's side, a new session on
    /// the replica's, every message through the checks.
    fn session(own: &mut crate::docs::OwnDoc, replica: &mut crate::docs::Replica, kind: DocKind) {
        let actor = crate::docs::actor(&OWNER, kind, own.epoch());
        replica.new_session();
        let mut os = automerge::sync::State::new();
        for _ in 0..4 {
            let Some(ask) = replica.generate() else { break };
            let ask = check_ask(&ask).expect("test");
            own.doc().receive_sync_message(&mut os, ask).expect("test");
            let Some(answer) = own.doc().generate_sync_message(&mut os) else {
                break;
            };
            let m = check_answer(&answer.encode(), kind, &actor).expect("test");
            replica
                .doc
                .receive_sync_message(&mut replica.state, m)
                .expect("test");
        }
    }

    #[test]
    fn a_replica_that_ended_in_step_learns_the_owners_next_change() {
        let mut own = crate::docs::OwnDoc::new(OWNER, DocKind::Heads, Default::default());
        own.apply(vec![(head_key(1), Some(vec![1; 72]))]);
        let mut replica = crate::docs::Replica::new();
        session(&mut own, &mut replica, DocKind::Heads);
        assert_eq!(replica.heads(), own.doc().get_heads());
        own.apply(vec![(head_key(2), Some(vec![2; 72]))]);
        session(&mut own, &mut replica, DocKind::Heads);
        assert_eq!(replica.heads(), own.doc().get_heads());
        assert_eq!(replica.doc.length(ROOT), 2);
    }

    #[test]
    fn a_document_outgrowing_its_live_data_gets_a_new_epoch() {
        let mut own = crate::docs::OwnDoc::new(OWNER, DocKind::Heads, Default::default());
        let key = head_key(1);
        for i in 0..2000u64 {
            let mut v = i.to_be_bytes().to_vec();
            v.resize(72, 0);
            own.apply(vec![(key.clone(), Some(v))]);
        }
        assert!(own.outgrown(std::time::Duration::ZERO));
        let (epoch, history) = (own.epoch(), own.history_bytes());
        own.renew();
        assert_ne!(own.epoch(), epoch);
        assert_eq!(own.len(), 1);
        assert!(
            own.history_bytes() < history / 100,
            "{}",
            own.history_bytes()
        );
        assert!(!own.outgrown(std::time::Duration::ZERO));
    }
}
