//! Envelopes (`{"body": bytes, "sig": bytes}`), domain-separated signing and strict verification.

use ed25519_dalek::{Signature, Signer, SigningKey};
use serde::{Deserialize, Serialize};

use crate::cbor::{from_canonical, to_canonical};
use crate::error::{Error, Result};
use crate::event::EventBody;
use crate::ids::{AuthorKey, BlobHash, EventId};
use crate::limits::{EVENT_BYTES_MAX, SIGNING_DOMAIN};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvelopeWire {
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    sig: Vec<u8>,
}

/// The message an author signs for an event: the signing domain followed by the EventId.
pub fn signing_message(id: &EventId) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNING_DOMAIN.len() + 32);
    message.extend_from_slice(SIGNING_DOMAIN);
    message.extend_from_slice(id.as_bytes());
    message
}

/// Verifies `sig` over `id` for `key` with `verify_strict` (refusing weak and non-canonical
/// keys, and non-canonical or small-order signature components).
pub fn verify_signature(key: &AuthorKey, id: &EventId, sig: &[u8; 64]) -> Result<()> {
    let verifying = key.verifying_key()?;
    let signature = Signature::from_bytes(sig);
    verifying
        .verify_strict(&signing_message(id), &signature)
        .map_err(|_| Error::BadSignature)
}

/// A decoded envelope: the canonical body bytes, the decoded body, its id and the signature.
/// Decoding checks encoding and field limits; the signature is checked by
/// [`SignedEvent::verify`] with the key that the ledger says signs this log at this seq.
#[derive(Clone, Debug, PartialEq)]
pub struct SignedEvent {
    /// The event id: BLAKE3 of `body_bytes`.
    pub id: EventId,
    /// The decoded body.
    pub body: EventBody,
    /// The canonical body bytes as signed.
    pub body_bytes: Vec<u8>,
    /// The Ed25519 signature.
    pub sig: [u8; 64],
    /// The envelope bytes (what is stored as a blob).
    pub envelope: Vec<u8>,
}

impl SignedEvent {
    /// Decodes envelope bytes: size limit, canonical envelope, canonical and valid body.
    pub fn decode(envelope: &[u8]) -> Result<Self> {
        if envelope.len() > EVENT_BYTES_MAX {
            return Err(Error::TooLarge {
                what: "event envelope",
                size: envelope.len() as u64,
                max: EVENT_BYTES_MAX as u64,
            });
        }
        let wire: EnvelopeWire = from_canonical(envelope)?;
        let sig: [u8; 64] = wire.sig.as_slice().try_into().map_err(|_| {
            Error::Malformed(format!(
                "signature must be 64 bytes, got {}",
                wire.sig.len()
            ))
        })?;
        let body = EventBody::decode(&wire.body)?;
        Ok(Self {
            id: EventId::of_body(&wire.body),
            body,
            body_bytes: wire.body,
            sig,
            envelope: envelope.to_vec(),
        })
    }

    /// Signs `body` with `key` and builds the envelope. The body is validated first.
    pub fn sign(body: EventBody, key: &SigningKey) -> Result<Self> {
        body.validate()?;
        let body_bytes = body.encode()?;
        if body_bytes.len() > EVENT_BYTES_MAX {
            return Err(Error::TooLarge {
                what: "event body",
                size: body_bytes.len() as u64,
                max: EVENT_BYTES_MAX as u64,
            });
        }
        let id = EventId::of_body(&body_bytes);
        let sig = key.sign(&signing_message(&id)).to_bytes();
        let envelope = to_canonical(&EnvelopeWire {
            body: body_bytes.clone(),
            sig: sig.to_vec(),
        })?;
        if envelope.len() > EVENT_BYTES_MAX {
            return Err(Error::TooLarge {
                what: "event envelope",
                size: envelope.len() as u64,
                max: EVENT_BYTES_MAX as u64,
            });
        }
        Ok(Self {
            id,
            body,
            body_bytes,
            sig,
            envelope,
        })
    }

    /// Verifies the signature with `key` (the author key, or the key the log rotated to).
    pub fn verify(&self, key: &AuthorKey) -> Result<()> {
        verify_signature(key, &self.id, &self.sig)
    }

    /// The BlobHash of the envelope bytes (the key under which the store holds it).
    pub fn blob_hash(&self) -> BlobHash {
        BlobHash::of(&self.envelope)
    }
}
