//! The JSON form of event payloads at the HTTP and CLI boundary: ids, keys and hashes as
//! lowercase hex, vectors as arrays of numbers, everything else as in DESIGN.md §3.

use std::collections::BTreeMap;

use meshnode_schemas::{
    AuthorKey, BasinDelta, BasinPublish, BlobHash, BlobHost, Digest32, EventBody, EventId,
    KeyRotate, Kind, NodeAnnounce, Payload, ReputationDelta, SkillEndorse, SkillPublish, TokenMint,
    TokenTransfer, Vector,
};
use serde_json::{Map, Value, json};

type Result<T> = std::result::Result<T, String>;

struct Fields<'a> {
    map: &'a Map<String, Value>,
    kind: Kind,
}

impl<'a> Fields<'a> {
    fn new(kind: Kind, value: &'a Value, allowed: &[&str]) -> Result<Self> {
        let map = value
            .as_object()
            .ok_or_else(|| format!("payload of {kind} must be a JSON object"))?;
        if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!(
                "unknown field `{unknown}` in {kind}; allowed: {}",
                allowed.join(", ")
            ));
        }
        Ok(Self { map, kind })
    }

    fn get(&self, name: &str) -> Result<&'a Value> {
        self.map
            .get(name)
            .ok_or_else(|| format!("{} needs field `{name}`", self.kind))
    }

    fn text(&self, name: &str) -> Result<String> {
        self.get(name)?
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("`{name}` must be a string"))
    }

    fn text_or_empty(&self, name: &str) -> Result<String> {
        match self.map.get(name) {
            None => Ok(String::new()),
            Some(_) => self.text(name),
        }
    }

    fn texts(&self, name: &str) -> Result<Vec<String>> {
        match self.map.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("`{name}` must be an array of strings"))
                })
                .collect(),
            Some(_) => Err(format!("`{name}` must be an array of strings")),
        }
    }

    fn uint(&self, name: &str) -> Result<u64> {
        self.get(name)?
            .as_u64()
            .ok_or_else(|| format!("`{name}` must be a non-negative integer"))
    }

    fn int(&self, name: &str) -> Result<i64> {
        self.get(name)?
            .as_i64()
            .ok_or_else(|| format!("`{name}` must be an integer"))
    }

    fn boolean(&self, name: &str) -> Result<bool> {
        self.get(name)?
            .as_bool()
            .ok_or_else(|| format!("`{name}` must be true or false"))
    }

    fn hex32(&self, name: &str) -> Result<[u8; 32]> {
        let text = self.text(name)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&text, &mut out)
            .map_err(|_| format!("`{name}` must be 64 hex characters"))?;
        Ok(out)
    }

    fn vector(&self, name: &str) -> Result<Vector> {
        let values = vector_values(self.get(name)?).map_err(|e| format!("`{name}`: {e}"))?;
        Vector::new(&values).map_err(|e| e.to_string())
    }
}

/// Parses a JSON array of numbers as f32 values (NaN and ±Inf are not representable in JSON;
/// values outside the f32 range are refused).
pub fn vector_values(value: &Value) -> Result<Vec<f32>> {
    let items = value
        .as_array()
        .ok_or_else(|| "must be an array of numbers".to_string())?;
    items
        .iter()
        .map(|v| {
            let x = v
                .as_f64()
                .ok_or_else(|| "must be an array of numbers".to_string())?;
            let f = x as f32;
            if !f.is_finite() {
                return Err(format!("{x} is outside the f32 range"));
            }
            Ok(f)
        })
        .collect()
}

/// Builds a payload of `kind` from its JSON form.
pub fn payload_from_json(kind: Kind, value: &Value) -> Result<Payload> {
    Ok(match kind {
        Kind::NodeAnnounce => {
            let f = Fields::new(
                kind,
                value,
                &[
                    "service",
                    "endpoints",
                    "capabilities",
                    "basin_signature",
                    "addr",
                ],
            )?;
            Payload::NodeAnnounce(NodeAnnounce {
                service: f.text("service")?,
                endpoints: f.texts("endpoints")?,
                capabilities: f.texts("capabilities")?,
                basin_signature: f.vector("basin_signature")?,
                addr: f.text_or_empty("addr")?,
            })
        }
        Kind::SkillPublish => {
            let f = Fields::new(
                kind,
                value,
                &[
                    "skill_id",
                    "name",
                    "version",
                    "description",
                    "domain",
                    "capabilities",
                    "specializations",
                    "embedding",
                    "blob",
                    "size",
                    "base_model",
                    "license",
                    "price",
                ],
            )?;
            Payload::SkillPublish(SkillPublish {
                skill_id: f.text("skill_id")?,
                name: f.text("name")?,
                version: f.text_or_empty("version")?,
                description: f.text_or_empty("description")?,
                domain: f.text_or_empty("domain")?,
                capabilities: f.texts("capabilities")?,
                specializations: f.texts("specializations")?,
                embedding: f.vector("embedding")?,
                blob: BlobHash::from_bytes(f.hex32("blob")?),
                size: f.uint("size")?,
                base_model: f.text_or_empty("base_model")?,
                license: f.text_or_empty("license")?,
                price: f.uint("price")?,
            })
        }
        Kind::SkillEndorse => {
            let f = Fields::new(kind, value, &["skill", "verdict", "score", "note"])?;
            Payload::SkillEndorse(SkillEndorse {
                skill: EventId::from_bytes(f.hex32("skill")?),
                verdict: f.text("verdict")?,
                score: f.uint("score")?,
                note: f.text_or_empty("note")?,
            })
        }
        Kind::BasinPublish => {
            let f = Fields::new(
                kind,
                value,
                &["basin_id", "coordinates", "metadata", "writers"],
            )?;
            let mut metadata = BTreeMap::new();
            if let Some(m) = f.map.get("metadata") {
                let m = m
                    .as_object()
                    .ok_or_else(|| "`metadata` must be an object of strings".to_string())?;
                for (k, v) in m {
                    metadata.insert(
                        k.clone(),
                        v.as_str()
                            .ok_or_else(|| "`metadata` values must be strings".to_string())?
                            .to_string(),
                    );
                }
            }
            let writers = f
                .texts("writers")?
                .iter()
                .map(|text| {
                    let mut key = [0u8; 32];
                    hex::decode_to_slice(text, &mut key)
                        .map_err(|_| "`writers` must be keys of 64 hex characters".to_string())?;
                    Ok(AuthorKey::from_bytes(key))
                })
                .collect::<Result<Vec<_>>>()?;
            Payload::BasinPublish(BasinPublish {
                basin_id: f.text("basin_id")?,
                coordinates: f.vector("coordinates")?,
                metadata,
                writers,
            })
        }
        Kind::BasinDelta => {
            let f = Fields::new(
                kind,
                value,
                &["basin_id", "parent", "indices", "values", "weight_ppm"],
            )?;
            let indices = match f.map.get("indices") {
                None => Vec::new(),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| {
                        v.as_u64()
                            .ok_or_else(|| "`indices` must be integers".to_string())
                    })
                    .collect::<Result<_>>()?,
                Some(_) => return Err("`indices` must be an array of integers".into()),
            };
            Payload::BasinDelta(BasinDelta {
                basin_id: f.text("basin_id")?,
                parent: EventId::from_bytes(f.hex32("parent")?),
                indices,
                values: f.vector("values")?,
                weight_ppm: f.uint("weight_ppm")?,
            })
        }
        Kind::ReputationDelta => {
            let f = Fields::new(kind, value, &["subject", "delta", "reason", "evidence"])?;
            Payload::ReputationDelta(ReputationDelta {
                subject: AuthorKey::from_bytes(f.hex32("subject")?),
                delta: f.int("delta")?,
                reason: f.text_or_empty("reason")?,
                evidence: match f.map.get("evidence") {
                    None | Some(Value::Null) => None,
                    Some(_) => Some(Digest32::from_bytes(f.hex32("evidence")?)),
                },
            })
        }
        Kind::TokenMint => {
            let f = Fields::new(kind, value, &["to", "amount", "reason"])?;
            Payload::TokenMint(TokenMint {
                to: AuthorKey::from_bytes(f.hex32("to")?),
                amount: f.uint("amount")?,
                reason: f.text_or_empty("reason")?,
            })
        }
        Kind::TokenTransfer => {
            let f = Fields::new(kind, value, &["to", "amount", "memo"])?;
            Payload::TokenTransfer(TokenTransfer {
                to: AuthorKey::from_bytes(f.hex32("to")?),
                amount: f.uint("amount")?,
                memo: f.text_or_empty("memo")?,
            })
        }
        Kind::BlobHost => {
            let f = Fields::new(kind, value, &["blob", "pinned"])?;
            Payload::BlobHost(BlobHost {
                blob: BlobHash::from_bytes(f.hex32("blob")?),
                pinned: f.boolean("pinned")?,
            })
        }
        Kind::KeyRotate => {
            let f = Fields::new(kind, value, &["new_key"])?;
            Payload::KeyRotate(KeyRotate {
                new_key: AuthorKey::from_bytes(f.hex32("new_key")?),
            })
        }
    })
}

fn floats(v: &Vector) -> Value {
    Value::Array(v.values().into_iter().map(|x| json!(x)).collect())
}

/// The JSON form of a payload.
pub fn payload_to_json(payload: &Payload) -> Value {
    match payload {
        Payload::NodeAnnounce(p) => json!({
            "service": p.service, "endpoints": p.endpoints, "capabilities": p.capabilities,
            "basin_signature": floats(&p.basin_signature), "addr": p.addr,
        }),
        Payload::SkillPublish(p) => json!({
            "skill_id": p.skill_id, "name": p.name, "version": p.version,
            "description": p.description, "domain": p.domain, "capabilities": p.capabilities,
            "specializations": p.specializations, "embedding": floats(&p.embedding),
            "blob": p.blob.to_hex(), "size": p.size, "base_model": p.base_model,
            "license": p.license, "price": p.price,
        }),
        Payload::SkillEndorse(p) => json!({
            "skill": p.skill.to_hex(), "verdict": p.verdict, "score": p.score, "note": p.note,
        }),
        Payload::BasinPublish(p) => json!({
            "basin_id": p.basin_id, "coordinates": floats(&p.coordinates), "metadata": p.metadata,
            "writers": p.writers.iter().map(|k| k.to_hex()).collect::<Vec<_>>(),
        }),
        Payload::BasinDelta(p) => json!({
            "basin_id": p.basin_id, "parent": p.parent.to_hex(), "indices": p.indices,
            "values": floats(&p.values), "weight_ppm": p.weight_ppm,
        }),
        Payload::ReputationDelta(p) => json!({
            "subject": p.subject.to_hex(), "delta": p.delta, "reason": p.reason,
            "evidence": p.evidence.map(|e| e.to_hex()),
        }),
        Payload::TokenMint(p) => {
            json!({"to": p.to.to_hex(), "amount": p.amount, "reason": p.reason})
        }
        Payload::TokenTransfer(p) => {
            json!({"to": p.to.to_hex(), "amount": p.amount, "memo": p.memo})
        }
        Payload::BlobHost(p) => json!({"blob": p.blob.to_hex(), "pinned": p.pinned}),
        Payload::KeyRotate(p) => json!({"new_key": p.new_key.to_hex()}),
    }
}

/// The JSON form of an event body.
pub fn body_to_json(body: &EventBody) -> Value {
    json!({
        "v": 1,
        "net": body.net.to_hex(),
        "author": body.author.to_hex(),
        "seq": body.seq,
        "prev": body.prev.map(|p| p.to_hex()),
        "deps": body.deps.iter().map(|d| d.to_hex()).collect::<Vec<_>>(),
        "ts": body.ts,
        "kind": body.kind().as_str(),
        "payload": payload_to_json(&body.payload),
    })
}
