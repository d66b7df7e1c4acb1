//! Canonical, portable fork proofs: two envelopes an author signed at the same seq.

use meshnode_schemas::{AuthorKey, BlobHash, EventId, Payload, SignedEvent};
use serde::{Deserialize, Serialize};

use crate::error::{Result, Rule, reject};

/// A portable proof that an author signed two different events at the same seq. Canonical:
/// `seq` is the log's lowest forked seq, `envelopes` are the two events with the smallest
/// EventIds there, ordered by EventId, and nothing node-local is inside, so every node that
/// holds the same events holds the same proof.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkProof {
    /// The forked log.
    pub author: AuthorKey,
    /// The lowest seq with two events.
    pub seq: u64,
    /// The key that signed both.
    pub signer: AuthorKey,
    /// The two envelopes (canonical DAG-CBOR bytes), ordered by EventId.
    #[serde(with = "serde_bytes_vec")]
    pub envelopes: [Vec<u8>; 2],
    /// Envelopes of the log's `key.rotate` events before `seq`, oldest first, proving that
    /// `signer` signs this log at `seq`.
    pub rotations: Vec<Vec<u8>>,
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

fn invalid(message: &str) -> crate::error::Error {
    reject(Rule::InvalidForkProof, message)
}

impl ForkProof {
    /// The two event ids (BLAKE3 of the bodies), in the proof's order; zeros for an envelope
    /// that does not decode (a proof built by this node always decodes).
    pub fn ids(&self) -> [EventId; 2] {
        self.envelopes.each_ref().map(|e| {
            SignedEvent::decode(e)
                .map(|s| s.id)
                .unwrap_or(EventId::from_bytes([0; 32]))
        })
    }

    /// Verifies the proof on its own, for network `net`: both envelopes decode, are of `net`,
    /// name this author and seq, share their `prev`, differ, are ordered by EventId, and verify
    /// strictly under `signer`; the rotation chain is of this log and network, in order, each
    /// signed by the key before it, ends at `signer`, and — when its last rotation is the
    /// event right before `seq` — is the forked events' `prev`. What a proof alone cannot show
    /// is that no rotation was left out between its rotations; a node checks that against its
    /// own history of the log ([`crate::Ledger`] and the audit compare proofs with theirs).
    pub fn verify(&self, net: &BlobHash) -> Result<(EventId, EventId)> {
        let a = SignedEvent::decode(&self.envelopes[0])?;
        let b = SignedEvent::decode(&self.envelopes[1])?;
        for e in [&a, &b] {
            if e.body.author != self.author || e.body.seq != self.seq {
                return Err(invalid("envelopes are not of this author and seq"));
            }
            if e.body.net != *net {
                return Err(invalid("envelopes are of another network"));
            }
        }
        if a.id >= b.id {
            return Err(invalid(
                "the two envelopes must differ and be ordered by EventId",
            ));
        }
        if a.body.prev != b.body.prev {
            return Err(invalid(
                "the two envelopes must share their prev (a proof names the lowest forked seq)",
            ));
        }
        let mut key = self.author;
        let mut last: Option<(u64, EventId)> = None;
        for bytes in &self.rotations {
            let rotation = SignedEvent::decode(bytes)?;
            let Payload::KeyRotate(r) = &rotation.body.payload else {
                return Err(invalid("rotation envelope is not key.rotate"));
            };
            let seq = rotation.body.seq;
            if rotation.body.author != self.author
                || rotation.body.net != *net
                || last.is_some_and(|(s, _)| seq <= s)
                || seq >= self.seq
            {
                return Err(invalid("rotation chain out of order or of another log"));
            }
            rotation.verify(&key)?;
            key = r.new_key;
            last = Some((seq, rotation.id));
        }
        if let Some((seq, id)) = last
            && seq + 1 == self.seq
            && a.body.prev != Some(id)
        {
            return Err(invalid(
                "the last rotation is not the forked events' prev: the key history is incomplete",
            ));
        }
        if key != self.signer {
            return Err(invalid(
                "signer is not the log's key at this seq: the key history is incomplete",
            ));
        }
        a.verify(&self.signer)?;
        b.verify(&self.signer)?;
        Ok((a.id, b.id))
    }
}
