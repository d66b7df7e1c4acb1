//! Intent search (BENCH.md): quality on `bench/intent_quality.json` (40 skills, 40
//! paraphrased intents that share no content word with the skill they should find), and
//! latency of embed + rank over 10k skills (the 40 among 9,960 generated ones).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::builder::{FixedSizeListBuilder, Float32Builder, ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use meshnode_embed::Embedder;
use meshnode_query::{Mode, Query, QueryConfig, SqlLimits, TextSearch};
use meshnode_schemas::tables::table_schema;
use serde::Deserialize;

use super::{Rng, open_node, wait_for_memory_index, write_progress, write_table};

#[derive(Deserialize, Clone)]
struct Skill {
    skill_id: String,
    name: String,
    domain: String,
    description: String,
    capabilities: Vec<String>,
    specializations: Vec<String>,
}

#[derive(Deserialize)]
struct Intent {
    query: String,
    expect: String,
}

#[derive(Deserialize)]
struct QualitySet {
    skills: Vec<Skill>,
    queries: Vec<Intent>,
}

/// Words for the generated skills: generic enough to be plausible catalog entries.
const WORDS: &[&str] = &[
    "inventory",
    "report",
    "catalog",
    "sensor",
    "weather",
    "invoice",
    "shipping",
    "translation",
    "summary",
    "image",
    "audio",
    "video",
    "forecast",
    "schedule",
    "ticket",
    "support",
    "survey",
    "marketing",
    "sales",
    "recruiting",
    "resume",
    "contract",
    "energy",
    "solar",
    "battery",
    "traffic",
    "parking",
    "retail",
    "pricing",
    "music",
    "poetry",
    "story",
    "game",
    "chess",
    "garden",
    "plant",
    "soil",
    "water",
    "river",
    "ocean",
    "fishing",
    "boat",
    "aviation",
    "railway",
    "bridge",
    "building",
    "concrete",
    "steel",
    "textile",
    "fashion",
    "furniture",
    "printing",
    "packaging",
    "warehouse",
    "drone",
    "robot",
    "camera",
    "microscope",
    "chemistry",
    "biology",
    "genome",
    "protein",
    "climate",
    "carbon",
    "recycling",
    "waste",
    "insurance",
    "mortgage",
    "tax",
    "payroll",
    "budget",
    "audit",
    "compliance",
    "privacy",
    "network",
    "database",
    "compiler",
    "kernel",
    "browser",
    "email",
    "calendar",
    "meeting",
    "slides",
    "spreadsheet",
    "chart",
    "map",
    "route",
    "census",
    "election",
    "news",
    "sports",
    "fitness",
    "sleep",
    "nutrition",
    "recipe",
    "bakery",
    "coffee",
    "tea",
];
const VERBS: &[&str] = &[
    "classify",
    "summarize",
    "forecast",
    "detect",
    "rank",
    "translate",
    "extract",
    "plan",
    "monitor",
    "label",
    "compare",
    "optimize",
    "generate",
    "score",
    "clean",
];

fn skill_text(s: &Skill) -> String {
    [
        s.name.clone(),
        s.description.clone(),
        s.domain.clone(),
        s.capabilities.join(", "),
        s.specializations.join(", "),
    ]
    .iter()
    .filter(|p| !p.is_empty())
    .cloned()
    .collect::<Vec<_>>()
    .join(". ")
}

fn pick(rng: &mut Rng, list: &[&'static str]) -> &'static str {
    list[(rng.next() % list.len() as u64) as usize]
}

fn generated(i: usize, rng: &mut Rng) -> Skill {
    let (a, b, c) = (pick(rng, WORDS), pick(rng, WORDS), pick(rng, WORDS));
    let verb = pick(rng, VERBS);
    Skill {
        skill_id: format!("generated-{i}"),
        name: format!("{a} {b} {verb}er"),
        domain: c.to_string(),
        description: format!("{verb} {a} and {b} records for {c} teams"),
        capabilities: vec![verb.to_string()],
        specializations: vec![a.to_string(), b.to_string()],
    }
}

/// A skills table of `skills` with their text vectors (the embedding column holds the same).
fn skills_batch(
    skills: &[Skill],
    vectors: &[Vec<f32>],
    model: &str,
) -> anyhow::Result<RecordBatch> {
    let schema = table_schema("skills", 384).ok_or_else(|| anyhow::anyhow!("schema"))?;
    let n = skills.len();
    let text = |f: &dyn Fn(&Skill) -> String| -> ArrayRef {
        Arc::new(arrow_array::StringArray::from(
            skills.iter().map(f).collect::<Vec<_>>(),
        ))
    };
    let list = |f: &dyn Fn(&Skill) -> &Vec<String>| -> ArrayRef {
        let mut b = ListBuilder::new(StringBuilder::new());
        for s in skills {
            for item in f(s) {
                b.values().append_value(item);
            }
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let vector = || -> ArrayRef {
        let mut b = FixedSizeListBuilder::new(Float32Builder::new(), 384);
        for v in vectors {
            b.values().append_slice(v);
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let zeros = Arc::new(arrow_array::UInt64Array::from(vec![0u64; n])) as ArrayRef;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(arrow_array::UInt64Array::from_iter_values(0..n as u64)),
        text(&|s| format!("{:064x}", blake3_like(&s.skill_id))),
        text(&|_| "a".repeat(64)),
        text(&|s| s.skill_id.clone()),
        text(&|s| s.name.clone()),
        text(&|_| "1.0.0".into()),
        text(&|s| s.description.clone()),
        text(&|s| s.domain.clone()),
        list(&|s| &s.capabilities),
        list(&|s| &s.specializations),
        vector(),
        text(&|_| "b".repeat(64)),
        zeros.clone(),
        text(&|_| "llama-3-8b".into()),
        text(&|_| "Apache-2.0".into()),
        zeros,
        Arc::new(arrow_array::Int64Array::from(vec![0i64; n])),
        text(&skill_text),
        vector(),
        Arc::new(arrow_array::StringArray::from(vec![Some(model); n])),
        Arc::new(arrow_array::Float32Array::from(vec![Some(1.0f32); n])),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// A stable 128-bit id from a name (the bench needs unique ids, not real hashes).
fn blake3_like(name: &str) -> u128 {
    name.bytes()
        .fold(0x6c62_272e_07bb_0142_62b8_2175_6295_c58du128, |h, b| {
            (h ^ u128::from(b)).wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013B)
        })
}

/// Top-1 and top-3 hits and the median latency of every intent, in one mode.
async fn measure(
    query: &Query,
    intents: &[Intent],
    (mode, alpha): (Mode, Option<f32>),
) -> anyhow::Result<serde_json::Value> {
    let (mut top1, mut top3) = (0, 0);
    let mut latencies = Vec::new();
    let mut misses = Vec::new();
    for intent in intents {
        let search = TextSearch {
            table: "skills".into(),
            text: intent.query.clone(),
            k: 3,
            filter: None,
            mode,
            alpha,
            columns: None,
        };
        let started = Instant::now();
        let hits = query.search_text(&search).await?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        let ids: Vec<&str> = hits
            .iter()
            .map(|h| h.row["skill_id"].as_str().unwrap_or(""))
            .collect();
        if ids.first() == Some(&intent.expect.as_str()) {
            top1 += 1;
        } else {
            misses.push(
                serde_json::json!({"query": intent.query, "expect": intent.expect, "got": ids}),
            );
        }
        if ids.contains(&intent.expect.as_str()) {
            top3 += 1;
        }
    }
    latencies.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "top1": top1, "top3": top3, "queries": intents.len(),
        "p50_ms": latencies[latencies.len() / 2], "misses": misses,
    }))
}

/// The modes measured, with hybrid's weight of meaning (None: the default).
const MODES: [(&str, (Mode, Option<f32>)); 6] = [
    ("hybrid", (Mode::Hybrid, None)),
    ("hybrid_alpha_0.5", (Mode::Hybrid, Some(0.5))),
    ("hybrid_alpha_0.7", (Mode::Hybrid, Some(0.7))),
    ("hybrid_alpha_0.9", (Mode::Hybrid, Some(0.9))),
    ("vector", (Mode::Vector, None)),
    ("text", (Mode::Text, None)),
];

pub(super) async fn intent_bench(n: usize, scratch: &Path) -> anyhow::Result<serde_json::Value> {
    let set: QualitySet = serde_json::from_slice(&std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/intent_quality.json"),
    )?)?;
    let dir = meshnode_embed::default_model_dir()
        .ok_or_else(|| anyhow::anyhow!("no model dir: run scripts/ensure-deps.sh model"))?;
    let embedder = Arc::new(Embedder::open(&dir)?);
    let model = embedder.model_id().to_string();
    let (_dir, data, store, ledger) = open_node(scratch).await?;
    let mut rng = Rng(0x1a7e_a7c4_5eed_0001);
    let mut skills = set.skills.clone();
    skills.extend((skills.len()..n.max(skills.len())).map(|i| generated(i, &mut rng)));
    eprintln!("intent: embedding {} skills", skills.len());
    let started = Instant::now();
    let mut vectors = Vec::with_capacity(skills.len());
    for chunk in skills.chunks(64) {
        let texts: Vec<String> = chunk.iter().map(skill_text).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        vectors.extend(embedder.embed(&refs)?);
    }
    let embed_secs = started.elapsed().as_secs_f64();
    let mut out = serde_json::json!({
        "mode": "intent", "model": model, "n": skills.len(),
        "ingest_texts_per_s": skills.len() as f64 / embed_secs,
    });
    for (label, rows) in [("quality_40", set.skills.len()), ("all", skills.len())] {
        let table_dir = data.join(format!("query-{label}"));
        std::fs::create_dir_all(&table_dir)?;
        let batch = skills_batch(&skills[..rows], &vectors[..rows], &model)?;
        write_table(&table_dir, "skills", vec![batch]).await?;
        write_progress(&table_dir, Some(&model))?;
        let query = Query::open(
            &table_dir,
            ledger.clone(),
            store.clone(),
            QueryConfig::default(),
            SqlLimits::default(),
            Some(embedder.clone()),
        )
        .await?;
        wait_for_memory_index(&query, "skills.text_vec", rows).await?;
        // As the node's materializer would have: the full-text index of search_text.
        query.reindex().await?;
        // Warm the model and the tables once.
        let _ = measure(&query, &set.queries[..1], (Mode::Hybrid, None)).await?;
        for (mode_label, mode) in MODES {
            out[label][mode_label] = measure(&query, &set.queries, mode).await?;
        }
        query.shutdown().await;
    }
    ledger.shutdown().await;
    store.shutdown().await?;
    Ok(out)
}

/// Embedding throughput in this process: `n` texts of about 21 tokens, 64 to a call (as
/// `POST /v1/embeddings` takes them), on every core. Also the token ids of the text, for
/// onnxruntime to run the same input.
pub(super) fn embed_bench(n: usize) -> anyhow::Result<serde_json::Value> {
    let dir = meshnode_embed::default_model_dir()
        .ok_or_else(|| anyhow::anyhow!("no model dir: run scripts/ensure-deps.sh model"))?;
    let embedder = Embedder::open(&dir)?;
    let texts: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "skill {i}: pruning vines and managing a vineyard with care, grape cultivation \
                 and wine chemistry"
            )
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    embedder.embed(&refs[..8])?;
    let started = Instant::now();
    for chunk in refs.chunks(64) {
        embedder.embed(chunk)?;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "mode": "embed", "n": n, "texts_per_s": n as f64 / secs,
        "tokens": embedder.tokenize(refs[0])?,
    }))
}
