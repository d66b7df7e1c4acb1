//! Event bodies: the header fields, every kind and its payload, and their field limits.

use std::collections::BTreeMap;
use std::fmt;

use ipld_core::ipld::Ipld;
use serde::{Deserialize, Serialize};

use crate::cbor::to_canonical;
use crate::error::{Error, Result};
use crate::ids::{AuthorKey, BlobHash, Digest32, EventId};
use crate::limits::*;

/// A vector of finite `f32` values, carried on the wire as little-endian IEEE-754 bytes.
///
/// Decoding keeps the raw bytes so that a malformed vector is reported by
/// [`EventBody::validate`] with a precise error instead of as a decoding failure.
#[derive(Clone, PartialEq)]
pub struct Vector {
    bytes: Vec<u8>,
}

impl Vector {
    /// Builds a vector, refusing NaN, ±Inf and more than [`VECTOR_DIM_MAX`] dimensions.
    pub fn new(values: &[f32]) -> Result<Self> {
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for value in values {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        let vector = Self { bytes };
        vector.check("vector")?;
        Ok(vector)
    }

    /// The number of dimensions (bytes / 4, rounded down).
    pub fn dim(&self) -> usize {
        self.bytes.len() / 4
    }

    /// The values. Only meaningful once [`Vector::check`] passed.
    pub fn values(&self) -> Vec<f32> {
        self.bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// The raw little-endian bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Checks length and values: a multiple of 4 bytes, at most [`VECTOR_DIM_MAX`] values, all
    /// finite.
    pub fn check(&self, field: &'static str) -> Result<()> {
        let bad = |reason: String| Error::BadVector { field, reason };
        if !self.bytes.len().is_multiple_of(4) {
            return Err(bad(format!(
                "{} bytes is not a whole number of little-endian f32 values",
                self.bytes.len()
            )));
        }
        if self.dim() > VECTOR_DIM_MAX {
            return Err(bad(format!(
                "{} dimensions, at most {VECTOR_DIM_MAX} allowed",
                self.dim()
            )));
        }
        if let Some(idx) = self.values().iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("value at index {idx} is NaN or infinite")));
        }
        Ok(())
    }
}

impl fmt::Debug for Vector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Vector(dim={})", self.dim())
    }
}

impl Serialize for Vector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.bytes)
    }
}

impl<'de> Deserialize<'de> for Vector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
        Ok(Self {
            bytes: bytes.into_vec(),
        })
    }
}

/// The kinds of event (DESIGN.md §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// `node.announce`
    NodeAnnounce,
    /// `skill.publish`
    SkillPublish,
    /// `skill.endorse`
    SkillEndorse,
    /// `basin.publish`
    BasinPublish,
    /// `basin.delta`
    BasinDelta,
    /// `reputation.delta`
    ReputationDelta,
    /// `token.mint`
    TokenMint,
    /// `token.transfer`
    TokenTransfer,
    /// `blob.host`
    BlobHost,
    /// `key.rotate`
    KeyRotate,
}

impl Kind {
    /// Every kind, in a fixed order.
    pub const ALL: [Kind; 10] = [
        Kind::NodeAnnounce,
        Kind::SkillPublish,
        Kind::SkillEndorse,
        Kind::BasinPublish,
        Kind::BasinDelta,
        Kind::ReputationDelta,
        Kind::TokenMint,
        Kind::TokenTransfer,
        Kind::BlobHost,
        Kind::KeyRotate,
    ];

    /// The wire name, e.g. `token.transfer`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::NodeAnnounce => "node.announce",
            Kind::SkillPublish => "skill.publish",
            Kind::SkillEndorse => "skill.endorse",
            Kind::BasinPublish => "basin.publish",
            Kind::BasinDelta => "basin.delta",
            Kind::ReputationDelta => "reputation.delta",
            Kind::TokenMint => "token.mint",
            Kind::TokenTransfer => "token.transfer",
            Kind::BlobHost => "blob.host",
            Kind::KeyRotate => "key.rotate",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Result<Self> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == name)
            .ok_or_else(|| Error::UnknownKind(name.chars().take(64).collect()))
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `node.announce`: a node's registry entry and heartbeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAnnounce {
    /// Service name.
    pub service: String,
    /// Reachable endpoints (URLs).
    pub endpoints: Vec<String>,
    /// Capabilities offered.
    pub capabilities: Vec<String>,
    /// The node's basin signature.
    pub basin_signature: Vector,
    /// Its iroh address or ticket.
    pub addr: String,
}

/// `skill.publish`: a skill (LoRA adapter) in the catalog.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkillPublish {
    /// Stable skill identifier chosen by the author.
    pub skill_id: String,
    /// Human name.
    pub name: String,
    /// Version text.
    pub version: String,
    /// Description.
    pub description: String,
    /// Domain, e.g. `viticulture`.
    pub domain: String,
    /// Capabilities.
    pub capabilities: Vec<String>,
    /// Specializations.
    pub specializations: Vec<String>,
    /// Embedding used for vector search.
    pub embedding: Vector,
    /// BlobHash of the weights.
    pub blob: BlobHash,
    /// Size of the weights in bytes.
    pub size: u64,
    /// Base model the adapter applies to.
    pub base_model: String,
    /// License.
    pub license: String,
    /// Price in token base units.
    pub price: u64,
}

/// `skill.endorse`: a validator's verdict on a published skill.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkillEndorse {
    /// EventId of the `skill.publish`.
    pub skill: EventId,
    /// `valid` or `invalid`.
    pub verdict: String,
    /// 0..=1000.
    pub score: u64,
    /// Free text.
    pub note: String,
}

/// `basin.publish`: a basin's initial coordinates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasinPublish {
    /// Basin identifier (per author).
    pub basin_id: String,
    /// Coordinates.
    pub coordinates: Vector,
    /// Text metadata.
    pub metadata: BTreeMap<String, String>,
    /// Who besides the publisher may send deltas (absent: the publisher only). Unique keys,
    /// at most `LIST_ITEMS_MAX`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writers: Vec<AuthorKey>,
}

/// `basin.delta`: an update of a basin version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasinDelta {
    /// Basin identifier.
    pub basin_id: String,
    /// EventId of the version this delta updates.
    pub parent: EventId,
    /// Indices of the coordinates updated; empty means all.
    pub indices: Vec<u64>,
    /// New values (one per index, or one per coordinate when `indices` is empty).
    pub values: Vector,
    /// Weight of this delta in parts per million, 1..=1_000_000.
    pub weight_ppm: u64,
}

/// `reputation.delta`: a change of a subject's reputation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReputationDelta {
    /// Whose reputation changes.
    pub subject: AuthorKey,
    /// −1000..=1000.
    pub delta: i64,
    /// Why.
    pub reason: String,
    /// Optional 32-byte evidence reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Digest32>,
}

/// `token.mint`: new credits (issuer keys only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenMint {
    /// Recipient.
    pub to: AuthorKey,
    /// Amount in base units.
    pub amount: u64,
    /// Why.
    pub reason: String,
}

/// `token.transfer`: credits moved from the author to `to`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenTransfer {
    /// Recipient.
    pub to: AuthorKey,
    /// Amount in base units.
    pub amount: u64,
    /// Free text.
    pub memo: String,
}

/// `blob.host`: the author hosts (or stops hosting) a blob.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobHost {
    /// The blob.
    pub blob: BlobHash,
    /// Whether the author keeps it pinned.
    pub pinned: bool,
}

/// `key.rotate`: from the next seq on, the log is signed by `new_key`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRotate {
    /// The new signing key.
    pub new_key: AuthorKey,
}

/// A payload of one of the kinds.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
#[allow(missing_docs)]
pub enum Payload {
    NodeAnnounce(NodeAnnounce),
    SkillPublish(SkillPublish),
    SkillEndorse(SkillEndorse),
    BasinPublish(BasinPublish),
    BasinDelta(BasinDelta),
    ReputationDelta(ReputationDelta),
    TokenMint(TokenMint),
    TokenTransfer(TokenTransfer),
    BlobHost(BlobHost),
    KeyRotate(KeyRotate),
}

impl Payload {
    /// The kind this payload belongs to.
    pub fn kind(&self) -> Kind {
        match self {
            Payload::NodeAnnounce(_) => Kind::NodeAnnounce,
            Payload::SkillPublish(_) => Kind::SkillPublish,
            Payload::SkillEndorse(_) => Kind::SkillEndorse,
            Payload::BasinPublish(_) => Kind::BasinPublish,
            Payload::BasinDelta(_) => Kind::BasinDelta,
            Payload::ReputationDelta(_) => Kind::ReputationDelta,
            Payload::TokenMint(_) => Kind::TokenMint,
            Payload::TokenTransfer(_) => Kind::TokenTransfer,
            Payload::BlobHost(_) => Kind::BlobHost,
            Payload::KeyRotate(_) => Kind::KeyRotate,
        }
    }

    fn from_ipld(kind: Kind, ipld: Ipld) -> Result<Self> {
        fn de<T: serde::de::DeserializeOwned>(kind: Kind, ipld: Ipld) -> Result<T> {
            ipld_core::serde::from_ipld(ipld)
                .map_err(|e| Error::Malformed(format!("payload of `{kind}`: {e}")))
        }
        Ok(match kind {
            Kind::NodeAnnounce => Payload::NodeAnnounce(de(kind, ipld)?),
            Kind::SkillPublish => Payload::SkillPublish(de(kind, ipld)?),
            Kind::SkillEndorse => Payload::SkillEndorse(de(kind, ipld)?),
            Kind::BasinPublish => Payload::BasinPublish(de(kind, ipld)?),
            Kind::BasinDelta => Payload::BasinDelta(de(kind, ipld)?),
            Kind::ReputationDelta => Payload::ReputationDelta(de(kind, ipld)?),
            Kind::TokenMint => Payload::TokenMint(de(kind, ipld)?),
            Kind::TokenTransfer => Payload::TokenTransfer(de(kind, ipld)?),
            Kind::BlobHost => Payload::BlobHost(de(kind, ipld)?),
            Kind::KeyRotate => Payload::KeyRotate(de(kind, ipld)?),
        })
    }

    /// Checks the payload's field limits (text lengths, list sizes, ranges, vectors).
    pub fn validate(&self) -> Result<()> {
        match self {
            Payload::NodeAnnounce(p) => {
                text("service", &p.service, TEXT_SHORT_BYTES_MAX)?;
                texts("endpoints", &p.endpoints, TEXT_LONG_BYTES_MAX)?;
                texts("capabilities", &p.capabilities, TEXT_SHORT_BYTES_MAX)?;
                p.basin_signature.check("basin_signature")?;
                text("addr", &p.addr, TEXT_LONG_BYTES_MAX)?;
            }
            Payload::SkillPublish(p) => {
                nonempty_text("skill_id", &p.skill_id, TEXT_SHORT_BYTES_MAX)?;
                text("name", &p.name, TEXT_SHORT_BYTES_MAX)?;
                text("version", &p.version, TEXT_SHORT_BYTES_MAX)?;
                text("description", &p.description, TEXT_LONG_BYTES_MAX)?;
                text("domain", &p.domain, TEXT_SHORT_BYTES_MAX)?;
                texts("capabilities", &p.capabilities, TEXT_SHORT_BYTES_MAX)?;
                texts("specializations", &p.specializations, TEXT_SHORT_BYTES_MAX)?;
                p.embedding.check("embedding")?;
                if p.embedding.dim() == 0 {
                    return Err(Error::BadVector {
                        field: "embedding",
                        reason: "must have at least one dimension".into(),
                    });
                }
                text("base_model", &p.base_model, TEXT_SHORT_BYTES_MAX)?;
                text("license", &p.license, TEXT_SHORT_BYTES_MAX)?;
            }
            Payload::SkillEndorse(p) => {
                if p.verdict != "valid" && p.verdict != "invalid" {
                    return Err(field("verdict", "must be \"valid\" or \"invalid\""));
                }
                if p.score > ENDORSE_SCORE_MAX {
                    return Err(field("score", format!("must be 0..={ENDORSE_SCORE_MAX}")));
                }
                text("note", &p.note, TEXT_LONG_BYTES_MAX)?;
            }
            Payload::BasinPublish(p) => {
                nonempty_text("basin_id", &p.basin_id, TEXT_SHORT_BYTES_MAX)?;
                p.coordinates.check("coordinates")?;
                if p.coordinates.dim() == 0 {
                    return Err(Error::BadVector {
                        field: "coordinates",
                        reason: "must have at least one dimension".into(),
                    });
                }
                if p.metadata.len() > METADATA_ENTRIES_MAX {
                    return Err(too_large(
                        "metadata",
                        p.metadata.len(),
                        METADATA_ENTRIES_MAX,
                    ));
                }
                for (key, value) in &p.metadata {
                    text("metadata", key, TEXT_SHORT_BYTES_MAX)?;
                    text("metadata", value, TEXT_LONG_BYTES_MAX)?;
                }
                if p.writers.len() > LIST_ITEMS_MAX {
                    return Err(too_large("writers", p.writers.len(), LIST_ITEMS_MAX));
                }
                let mut seen = std::collections::BTreeSet::new();
                for writer in &p.writers {
                    writer
                        .validate()
                        .map_err(|e| Error::BadKey(format!("writers: {e}")))?;
                    if !seen.insert(*writer) {
                        return Err(field("writers", format!("{writer} is listed twice")));
                    }
                }
            }
            Payload::BasinDelta(p) => {
                nonempty_text("basin_id", &p.basin_id, TEXT_SHORT_BYTES_MAX)?;
                p.values.check("values")?;
                if p.values.dim() == 0 {
                    return Err(Error::BadVector {
                        field: "values",
                        reason: "must have at least one value".into(),
                    });
                }
                if !p.indices.is_empty() {
                    if p.indices.len() != p.values.dim() {
                        return Err(Error::BadVector {
                            field: "values",
                            reason: format!(
                                "{} values for {} indices",
                                p.values.dim(),
                                p.indices.len()
                            ),
                        });
                    }
                    if p.indices.windows(2).any(|w| w[0] >= w[1]) {
                        return Err(field("indices", "must be strictly increasing"));
                    }
                    if p.indices.iter().any(|&i| i >= VECTOR_DIM_MAX as u64) {
                        return Err(field("indices", format!("must be < {VECTOR_DIM_MAX}")));
                    }
                }
                if p.weight_ppm == 0 || p.weight_ppm > WEIGHT_PPM_MAX {
                    return Err(field("weight_ppm", format!("must be 1..={WEIGHT_PPM_MAX}")));
                }
            }
            Payload::ReputationDelta(p) => {
                p.subject
                    .validate()
                    .map_err(|e| Error::BadKey(format!("subject: {e}")))?;
                // `unsigned_abs`: `abs` of i64::MIN overflows (a panic in debug, itself in release).
                if p.delta.unsigned_abs() > REPUTATION_DELTA_ABS_MAX.unsigned_abs() {
                    return Err(field(
                        "delta",
                        format!("must be -{REPUTATION_DELTA_ABS_MAX}..={REPUTATION_DELTA_ABS_MAX}"),
                    ));
                }
                text("reason", &p.reason, TEXT_SHORT_BYTES_MAX)?;
            }
            Payload::TokenMint(p) => {
                p.to.validate()
                    .map_err(|e| Error::BadKey(format!("to: {e}")))?;
                if p.amount == 0 {
                    return Err(field("amount", "must be positive"));
                }
                text("reason", &p.reason, TEXT_SHORT_BYTES_MAX)?;
            }
            Payload::TokenTransfer(p) => {
                p.to.validate()
                    .map_err(|e| Error::BadKey(format!("to: {e}")))?;
                if p.amount == 0 {
                    return Err(field("amount", "must be positive"));
                }
                text("memo", &p.memo, TEXT_SHORT_BYTES_MAX)?;
            }
            Payload::BlobHost(_) => {}
            Payload::KeyRotate(p) => {
                p.new_key
                    .validate()
                    .map_err(|e| Error::BadKey(format!("new_key: {e}")))?;
            }
        }
        Ok(())
    }
}

fn field(name: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidField {
        field: name,
        reason: reason.into(),
    }
}

fn too_large(what: &'static str, size: usize, max: usize) -> Error {
    Error::TooLarge {
        what,
        size: size as u64,
        max: max as u64,
    }
}

fn text(name: &'static str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(field(
            name,
            format!("{} bytes, at most {max} allowed", value.len()),
        ));
    }
    if value.chars().any(|c| c == '\0') {
        return Err(field(name, "must not contain NUL"));
    }
    Ok(())
}

fn nonempty_text(name: &'static str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Err(field(name, "must not be empty"));
    }
    text(name, value, max)
}

fn texts(name: &'static str, values: &[String], max_item: usize) -> Result<()> {
    if values.len() > LIST_ITEMS_MAX {
        return Err(field(
            name,
            format!("{} items, at most {LIST_ITEMS_MAX} allowed", values.len()),
        ));
    }
    values.iter().try_for_each(|v| text(name, v, max_item))
}

/// An event body: the signed content of an event. Its canonical encoding's BLAKE3 is the
/// [`EventId`].
#[derive(Clone, Debug, PartialEq)]
pub struct EventBody {
    /// Hash of the genesis document of the network.
    pub net: BlobHash,
    /// The log this event belongs to.
    pub author: AuthorKey,
    /// 1-based position in the author's log.
    pub seq: u64,
    /// The author's event at `seq - 1`; `None` exactly when `seq == 1`.
    pub prev: Option<EventId>,
    /// Causal dependencies on other logs.
    pub deps: Vec<EventId>,
    /// The author's clock in milliseconds since the Unix epoch; advisory only.
    pub ts: i64,
    /// Kind-specific content.
    pub payload: Payload,
}

#[derive(Serialize)]
struct BodyWireRef<'a> {
    v: u64,
    net: &'a BlobHash,
    author: &'a AuthorKey,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev: &'a Option<EventId>,
    deps: &'a [EventId],
    ts: i64,
    kind: &'static str,
    payload: &'a Payload,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BodyWire {
    v: u64,
    net: BlobHash,
    author: AuthorKey,
    seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prev: Option<EventId>,
    deps: Vec<EventId>,
    ts: i64,
    kind: String,
    payload: Ipld,
}

impl EventBody {
    /// The kind of this event.
    pub fn kind(&self) -> Kind {
        self.payload.kind()
    }

    /// The canonical DAG-CBOR encoding. Fails only for values that cannot be encoded.
    pub fn encode(&self) -> Result<Vec<u8>> {
        to_canonical(&BodyWireRef {
            v: FORMAT_VERSION,
            net: &self.net,
            author: &self.author,
            seq: self.seq,
            prev: &self.prev,
            deps: &self.deps,
            ts: self.ts,
            kind: self.kind().as_str(),
            payload: &self.payload,
        })
    }

    /// The id of this body (BLAKE3 of its canonical encoding).
    pub fn id(&self) -> Result<EventId> {
        Ok(EventId::of_body(&self.encode()?))
    }

    /// Decodes canonical body bytes and validates every field limit. Does not check the
    /// signature or anything that needs ledger state.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > EVENT_BYTES_MAX {
            return Err(too_large("event body", bytes.len(), EVENT_BYTES_MAX));
        }
        // Decoded loosely here; the typed re-encoding below must give exactly these bytes.
        let wire: BodyWire =
            serde_ipld_dagcbor::from_slice(bytes).map_err(|e| Error::Malformed(e.to_string()))?;
        if wire.v != FORMAT_VERSION {
            return Err(Error::Version(wire.v));
        }
        let kind = Kind::parse(&wire.kind)?;
        let payload = Payload::from_ipld(kind, wire.payload)?;
        let body = EventBody {
            net: wire.net,
            author: wire.author,
            seq: wire.seq,
            prev: wire.prev,
            deps: wire.deps,
            ts: wire.ts,
            payload,
        };
        // The payload went through a generic value: re-encode the whole body to make sure the
        // typed value carries exactly these bytes (e.g. no integer that the type widened).
        if body.encode()? != bytes {
            return Err(Error::NonCanonical);
        }
        body.validate()?;
        Ok(body)
    }

    /// Checks the header and payload limits.
    pub fn validate(&self) -> Result<()> {
        self.author
            .validate()
            .map_err(|e| Error::BadKey(format!("author: {e}")))?;
        if self.seq == 0 {
            return Err(field("seq", "must be >= 1"));
        }
        match (self.seq, &self.prev) {
            (1, Some(_)) => return Err(field("prev", "must be absent for seq 1")),
            (s, None) if s > 1 => return Err(field("prev", "required for seq > 1")),
            _ => {}
        }
        if self.deps.len() > DEPS_MAX {
            return Err(too_large("deps", self.deps.len(), DEPS_MAX));
        }
        if self.deps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(field("deps", "must be sorted and without duplicates"));
        }
        self.payload.validate()
    }
}
