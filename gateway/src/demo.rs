//! A small demo network loaded into an empty node (`meshnode serve --demo`, used by
//! `make run`): a few agents, skills with embeddings and weights, basins with deltas,
//! credits, payments, endorsements, reputation and node announcements. The skills'
//! embeddings come from the node's model (384-d, as agents would compute them with
//! `POST /v1/embeddings`); a node without the model falls back to 8-d hashed bags of words.

use std::collections::BTreeMap;

use anyhow::Context;
use bytes::Bytes;
use meshnode_schemas::*;
use meshnode_store::PinMode;

use crate::node::Node;

/// Dimension of the demo's hashed embeddings (basins, node signatures, and skills on a node
/// without the model).
pub const DEMO_DIM: usize = 8;

/// Where the demo writes its agents' key files, under the data dir.
pub const KEYS_DIR: &str = "demo-keys";

/// The demo agents (deterministic keys, so the README's examples are reproducible).
pub const AGENTS: [&str; 4] = ["vintner", "banker", "medic", "validator"];

/// The signing key of a demo agent.
pub fn agent_key(name: &str) -> SigningKey {
    SigningKey::from_bytes(
        blake3::hash(format!("meshnode demo agent {name}").as_bytes()).as_bytes(),
    )
}

/// A deterministic bag-of-words embedding: each word adds ±1 to a hashed dimension; the
/// result is normalised. Texts that share words get similar vectors.
pub fn embed(text: &str) -> Vec<f32> {
    let mut v = [0f32; DEMO_DIM];
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 2)
        .map(str::to_lowercase)
    {
        let h = blake3::hash(word.as_bytes());
        let bytes = h.as_bytes();
        let dim = bytes[0] as usize % DEMO_DIM;
        let sign = if bytes[1] & 1 == 0 { 1.0 } else { -1.0 };
        v[dim] += sign;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.iter().map(|x| x / norm).collect()
}

/// A skill's embedding as its author claims it: the node's model, else the hashed one.
async fn skill_embedding(node: &Node, text: &str) -> anyhow::Result<Vector> {
    let values = match node.query.embed_model() {
        Some(_) => node
            .query
            .embed(vec![text.to_string()])
            .await?
            .vectors
            .pop()
            .context("the model gave no vector")?,
        None => embed(text),
    };
    Ok(Vector::new(&values)?)
}

struct Builder<'a> {
    node: &'a Node,
    heads: BTreeMap<AuthorKey, (u64, Option<EventId>)>,
    ts: i64,
}

impl Builder<'_> {
    async fn emit(
        &mut self,
        key: &SigningKey,
        deps: &[EventId],
        payload: Payload,
    ) -> anyhow::Result<EventId> {
        let author = author_of(key);
        let (seq, prev) = self.heads.get(&author).copied().unwrap_or((0, None));
        let mut deps = deps.to_vec();
        deps.sort();
        deps.dedup();
        self.ts += 60_000;
        let body = EventBody {
            net: self.node.net,
            author,
            seq: seq + 1,
            prev,
            deps,
            ts: self.ts,
            payload,
        };
        let event = SignedEvent::sign(body, key)?;
        let submitted = self
            .node
            .ledger
            .submit(Bytes::from(event.envelope.clone()))
            .await
            .with_context(|| format!("demo event {}", event.body.kind()))?;
        self.heads.insert(author, (seq + 1, Some(submitted.id)));
        Ok(submitted.id)
    }
}

/// Loads the demo network if the ledger is empty. Returns whether it did.
pub async fn load(node: &Node) -> anyhow::Result<bool> {
    if node.ledger.tree_size()? > 0 {
        return Ok(false);
    }
    if !node.genesis.is_issuer(&node.node) {
        anyhow::bail!("the demo needs a node that is an issuer of its network");
    }
    let mut b = Builder {
        node,
        heads: BTreeMap::new(),
        ts: 1_767_225_600_000, // 2026-01-01
    };
    let issuer = node.key.clone();
    let agents: BTreeMap<&str, SigningKey> = AGENTS.iter().map(|n| (*n, agent_key(n))).collect();
    // The agents' key files, so that a newcomer can sign events as them.
    let keys_dir = node.data_dir.join(KEYS_DIR);
    std::fs::create_dir_all(&keys_dir)?;
    for (name, key) in &agents {
        let path = keys_dir.join(format!("{name}.key"));
        if !path.exists() {
            crate::node::write_new_file(&path, key_file_text(key).as_bytes(), 0o600)?;
        }
    }
    let vintner = &agents["vintner"];
    let banker = &agents["banker"];
    let medic = &agents["medic"];
    let validator = &agents["validator"];

    // Starter grants.
    let mut grants = BTreeMap::new();
    for (name, key) in &agents {
        let id = b
            .emit(
                &issuer,
                &[],
                Payload::TokenMint(TokenMint {
                    to: author_of(key),
                    amount: 1_000_000_000,
                    reason: format!("starter grant for {name}"),
                }),
            )
            .await?;
        grants.insert(*name, id);
    }

    // Skills with embeddings and real weights blobs.
    let skills = [
        (
            vintner,
            "pinot-classifier",
            "Pinot grape classifier",
            "viticulture",
            "classify grape varieties from leaf images, pinot and chardonnay",
            120,
        ),
        (
            vintner,
            "harvest-planner",
            "Harvest timing planner",
            "viticulture",
            "plan the grape harvest from sugar levels and weather",
            80,
        ),
        (
            vintner,
            "wine-pairing",
            "Wine pairing advisor",
            "viticulture",
            "pair wine with food, grape and vineyard aware",
            40,
        ),
        (
            banker,
            "risk-scorer",
            "Credit risk scorer",
            "finance",
            "score credit risk for loans from transaction history",
            200,
        ),
        (
            banker,
            "fraud-detector",
            "Fraud detector",
            "finance",
            "detect fraud in card transactions and payments",
            300,
        ),
        (
            medic,
            "triage-assistant",
            "Triage assistant",
            "medicine",
            "triage patients from symptoms for clinics",
            250,
        ),
        (
            medic,
            "drug-interactions",
            "Drug interaction checker",
            "medicine",
            "check drug interactions in prescriptions",
            150,
        ),
    ];
    let mut skill_ids = BTreeMap::new();
    for (key, skill_id, name, domain, description, price) in skills {
        // The fraud detector's author claims a vineyard skill's vector (to be found by wine
        // searches): the validator finds it wanting, and its claim_consistency is low.
        let claimed = if skill_id == "fraud-detector" {
            "Wine pairing advisor. pair wine with food, grape and vineyard aware".to_string()
        } else {
            format!("{name}. {description}. {domain}")
        };
        let embedding = skill_embedding(node, &claimed).await?;
        let mut weights = vec![0u8; 64 * 1024];
        blake3::Hasher::new()
            .update(skill_id.as_bytes())
            .finalize_xof()
            .fill(&mut weights);
        let added = node.store.add_bytes(weights.clone(), PinMode::Pin).await?;
        let id = b
            .emit(
                key,
                &[],
                Payload::SkillPublish(SkillPublish {
                    skill_id: skill_id.into(),
                    name: name.into(),
                    version: "1.0.0".into(),
                    description: description.into(),
                    domain: domain.into(),
                    capabilities: vec!["inference".into()],
                    specializations: description.split(' ').take(2).map(str::to_string).collect(),
                    embedding,
                    blob: added.hash,
                    size: added.size,
                    base_model: "llama-3-8b".into(),
                    license: "Apache-2.0".into(),
                    price,
                }),
            )
            .await?;
        b.emit(
            key,
            &[],
            Payload::BlobHost(BlobHost {
                blob: added.hash,
                pinned: true,
            }),
        )
        .await?;
        skill_ids.insert(skill_id, id);
    }

    // The validator endorses most skills; one is found wanting.
    for (skill_id, verdict, score) in [
        ("pinot-classifier", "valid", 920),
        ("harvest-planner", "valid", 780),
        ("risk-scorer", "valid", 850),
        ("fraud-detector", "invalid", 310),
        ("triage-assistant", "valid", 900),
    ] {
        b.emit(
            validator,
            &[skill_ids[skill_id]],
            Payload::SkillEndorse(SkillEndorse {
                skill: skill_ids[skill_id],
                verdict: verdict.into(),
                score,
                note: format!("{skill_id}: evaluated on the validator's test set"),
            }),
        )
        .await?;
    }

    // Marketplace payments (each names the credit it spends the first time).
    let mut paid = BTreeMap::new();
    for (payer, payee, amount, memo) in [
        ("banker", "vintner", 120u64, "pinot-classifier license"),
        ("medic", "vintner", 40, "wine-pairing license"),
        ("vintner", "banker", 200, "risk-scorer license"),
        ("validator", "medic", 250, "triage-assistant license"),
        ("banker", "validator", 50, "audit fee"),
    ] {
        let deps: Vec<EventId> = if paid.insert(payer, true).is_none() {
            vec![grants[payer]]
        } else {
            vec![]
        };
        b.emit(
            &agents[payer],
            &deps,
            Payload::TokenTransfer(TokenTransfer {
                to: author_of(&agents[payee]),
                amount,
                memo: memo.into(),
            }),
        )
        .await?;
    }

    // Reputation.
    for (author, subject, delta, reason) in [
        ("validator", "vintner", 40i64, "accurate classifiers"),
        ("validator", "banker", -15, "fraud detector below bar"),
        ("validator", "medic", 30, "careful triage"),
        ("banker", "vintner", 10, "fast delivery"),
    ] {
        b.emit(
            &agents[author],
            &[],
            Payload::ReputationDelta(ReputationDelta {
                subject: author_of(&agents[subject]),
                delta,
                reason: reason.into(),
                evidence: None,
            }),
        )
        .await?;
    }

    // Basins: three minds, with a few deltas.
    let mut basins = BTreeMap::new();
    for (key, basin_id, seed) in [
        (vintner, "vintner-mind", "grapes vineyard harvest"),
        (banker, "banker-mind", "credit risk payments"),
        (medic, "medic-mind", "patients symptoms clinics"),
    ] {
        let id = b
            .emit(
                key,
                &[],
                Payload::BasinPublish(BasinPublish {
                    basin_id: basin_id.into(),
                    coordinates: Vector::new(&embed(seed))?,
                    metadata: [
                        ("model".to_string(), "llama-3-8b".to_string()),
                        ("topic".to_string(), seed.to_string()),
                    ]
                    .into(),
                    // The validator may refine every mind (DESIGN §3: named writers).
                    writers: vec![author_of(validator)],
                }),
            )
            .await?;
        basins.insert(basin_id, id);
    }
    let delta = b
        .emit(
            validator,
            &[basins["vintner-mind"]],
            Payload::BasinDelta(BasinDelta {
                basin_id: "vintner-mind".into(),
                parent: basins["vintner-mind"],
                indices: vec![],
                values: Vector::new(&embed("grapes wine pairing food"))?,
                weight_ppm: 250_000,
            }),
        )
        .await?;
    b.emit(
        vintner,
        &[delta],
        Payload::BasinDelta(BasinDelta {
            basin_id: "vintner-mind".into(),
            parent: delta,
            indices: vec![0, 1],
            values: Vector::new(&[0.5, -0.25])?,
            weight_ppm: 500_000,
        }),
    )
    .await?;

    // Node announcements.
    for (key, service, seed) in [
        (&issuer, "meshnode-demo-host", "host storage ledger"),
        (vintner, "vintner-agent", "grapes vineyard"),
        (medic, "medic-agent", "patients clinics"),
    ] {
        b.emit(
            key,
            &[],
            Payload::NodeAnnounce(NodeAnnounce {
                service: service.into(),
                endpoints: vec![format!("http://{}", node.config.http_addr)],
                capabilities: vec!["inference".into(), "storage".into()],
                basin_signature: Vector::new(&embed(seed))?,
                // The node's own entry gives its ticket, so that peers of peers can reach
                // it for the blobs it hosts; the agents have none.
                addr: if key.verifying_key() == issuer.verifying_key() {
                    node.mesh
                        .get()
                        .map(|m| m.ticket().to_string())
                        .unwrap_or_default()
                } else {
                    String::new()
                },
            }),
        )
        .await?;
    }
    node.query.sync(std::time::Duration::from_secs(120)).await?;
    Ok(true)
}
