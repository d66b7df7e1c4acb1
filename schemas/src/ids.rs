//! Identity newtypes: `BlobHash`, `EventId`, `AuthorKey`, and their text forms (hex, CIDv1).

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use data_encoding::{Encoding, Specification};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// CIDv1 prefix for a `raw` (0x55) blob hashed with BLAKE3-256 (multihash 0x1e, length 0x20).
const CID_PREFIX: [u8; 4] = [0x01, 0x55, 0x1e, 0x20];

/// Length of every hash, id and key in bytes.
pub const ID_BYTES: usize = 32;

fn base32_lower() -> &'static Encoding {
    static ENCODING: OnceLock<Encoding> = OnceLock::new();
    ENCODING.get_or_init(|| {
        let mut spec = Specification::new();
        spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
        spec.encoding()
            .expect("invariant: the RFC 4648 base32 alphabet is a valid specification")
    })
}

fn parse_hex32(what: &'static str, text: &str) -> Result<[u8; ID_BYTES]> {
    if text.len() != 2 * ID_BYTES {
        return Err(Error::InvalidId {
            what,
            reason: format!(
                "expected {} hex characters, got {}",
                2 * ID_BYTES,
                text.len()
            ),
        });
    }
    let mut out = [0u8; ID_BYTES];
    hex::decode_to_slice(text, &mut out).map_err(|e| Error::InvalidId {
        what,
        reason: format!("not hex: {e}"),
    })?;
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(Error::InvalidId {
            what,
            reason: "hex must be lowercase".into(),
        });
    }
    Ok(out)
}

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; ID_BYTES]);

        impl $name {
            /// Wraps raw bytes (no validation beyond the length, which the type fixes).
            pub const fn from_bytes(bytes: [u8; ID_BYTES]) -> Self {
                Self(bytes)
            }

            /// The raw 32 bytes.
            pub const fn as_bytes(&self) -> &[u8; ID_BYTES] {
                &self.0
            }

            /// Lowercase hex, 64 characters.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// Parses 64 lowercase hex characters.
            pub fn from_hex(text: &str) -> Result<Self> {
                parse_hex32($what, text).map(Self)
            }

            /// Builds from a slice that must be exactly 32 bytes long.
            pub fn from_slice(bytes: &[u8]) -> Result<Self> {
                let array: [u8; ID_BYTES] = bytes.try_into().map_err(|_| Error::InvalidId {
                    what: $what,
                    reason: format!("expected {} bytes, got {}", ID_BYTES, bytes.len()),
                })?;
                Ok(Self(array))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
                serializer.serialize_bytes(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
                let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(deserializer)?;
                Self::from_slice(&bytes).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_newtype!(
    /// BLAKE3-256 of a blob's bytes (exactly iroh-blobs' hash).
    BlobHash,
    "blob hash"
);
id_newtype!(
    /// BLAKE3-256 of an event's canonical body bytes.
    EventId,
    "event id"
);
id_newtype!(
    /// 32 opaque bytes referenced as evidence (a hash or id of any kind).
    Digest32,
    "digest"
);
id_newtype!(
    /// An Ed25519 public key naming an author's log. Validity (canonical, not weak) is checked
    /// by [`AuthorKey::verifying_key`].
    AuthorKey,
    "author key"
);

impl BlobHash {
    /// Hashes `data` with BLAKE3.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// The CIDv1 text form: multibase base32 (`b` prefix), codec `raw`, multihash `blake3`.
    pub fn to_cid(&self) -> String {
        let mut bytes = Vec::with_capacity(CID_PREFIX.len() + ID_BYTES);
        bytes.extend_from_slice(&CID_PREFIX);
        bytes.extend_from_slice(&self.0);
        format!("b{}", base32_lower().encode(&bytes))
    }

    /// Parses a CIDv1 (`raw`, `blake3`, base32 lowercase) into the hash it names.
    pub fn from_cid(text: &str) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidId {
            what: "cid",
            reason: reason.to_string(),
        };
        let body = text
            .strip_prefix('b')
            .ok_or_else(|| invalid("only base32 CIDv1 (prefix 'b') is supported"))?;
        let bytes = base32_lower()
            .decode(body.as_bytes())
            .map_err(|_| invalid("not lowercase base32"))?;
        if bytes.len() != CID_PREFIX.len() + ID_BYTES {
            return Err(invalid("wrong length for a raw blake3 CIDv1"));
        }
        if bytes[..CID_PREFIX.len()] != CID_PREFIX {
            return Err(invalid(
                "not a CIDv1 with codec raw (0x55) and multihash blake3 (0x1e, 32 bytes)",
            ));
        }
        Self::from_slice(&bytes[CID_PREFIX.len()..])
    }

    /// Parses either 64 lowercase hex characters or a CIDv1 (`bafkr4…`).
    pub fn parse(text: &str) -> Result<Self> {
        if text.len() == 2 * ID_BYTES && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            Self::from_hex(text)
        } else if text.starts_with('b') {
            Self::from_cid(text)
        } else {
            Err(Error::InvalidId {
                what: "blob hash",
                reason: "expected 64 lowercase hex characters or a CIDv1 (bafkr4…)".into(),
            })
        }
    }
}

impl FromStr for BlobHash {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        Self::parse(text)
    }
}

impl EventId {
    /// The id of an event: BLAKE3 of its canonical body bytes.
    pub fn of_body(body_bytes: &[u8]) -> Self {
        Self(*blake3::hash(body_bytes).as_bytes())
    }
}

impl FromStr for EventId {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        Self::from_hex(text)
    }
}

/// Keys that passed [`AuthorKey::verifying_key`], decompressed. A mesh has far fewer authors than
/// events, and every event names its author (and transfers a recipient): without this each
/// event would pay two or three point decompressions on top of its signature check.
const KEY_CACHE_ENTRIES: usize = 1 << 16;

fn key_cache() -> &'static quick_cache::sync::Cache<[u8; ID_BYTES], ed25519_dalek::VerifyingKey> {
    static CACHE: OnceLock<quick_cache::sync::Cache<[u8; ID_BYTES], ed25519_dalek::VerifyingKey>> =
        OnceLock::new();
    CACHE.get_or_init(|| quick_cache::sync::Cache::new(KEY_CACHE_ENTRIES))
}

impl AuthorKey {
    /// Decodes the key for verification, refusing encodings that are not canonical and
    /// small-order (weak) keys. Valid keys are remembered (a bounded cache), so repeated
    /// authors cost a lookup, not a decompression.
    pub fn verifying_key(&self) -> Result<ed25519_dalek::VerifyingKey> {
        if let Some(key) = key_cache().get(&self.0) {
            return Ok(key);
        }
        let key = ed25519_dalek::VerifyingKey::from_bytes(&self.0)
            .map_err(|_| Error::BadKey("not a valid Ed25519 point".into()))?;
        // Decompression reduces y modulo p, so y + p decodes too; re-encoding tells.
        if key.to_edwards().compress().to_bytes() != self.0 {
            return Err(Error::BadKey("non-canonical point encoding".into()));
        }
        if key.is_weak() {
            return Err(Error::BadKey("small-order (weak) key".into()));
        }
        key_cache().insert(self.0, key);
        Ok(key)
    }

    /// Checks that the key is canonical and not weak.
    pub fn validate(&self) -> Result<()> {
        self.verifying_key().map(|_| ())
    }
}

impl From<ed25519_dalek::VerifyingKey> for AuthorKey {
    fn from(key: ed25519_dalek::VerifyingKey) -> Self {
        Self(key.to_bytes())
    }
}

impl FromStr for AuthorKey {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        Self::from_hex(text)
    }
}
