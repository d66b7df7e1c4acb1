//! Derived text columns of skills, nodes and basins: the text the node embeds and indexes for
//! full-text search (`search_text`), its vector from the node's model (`text_vec`, with the
//! model's id in `text_model`) and `claim_consistency`, the cosine between the author's own
//! vector and `text_vec`. Derived, not signed: a table rebuild recomputes them, and one set of
//! tables only ever holds one model's vectors (`Materializer::open` rebuilds on a change).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use meshnode_embed::{DIM, Embedder, TEXT_BYTES_MAX};
use meshnode_schemas::SkillPublish;
use meshnode_schemas::tables::TEXT_VEC_DIM;

use crate::error::{Result, internal};

// The table schemas (in `schemas`, which knows no model) and the model agree.
const _: () = assert!(DIM == TEXT_VEC_DIM as usize);

/// A row's derived text and, with a model and a non-blank text, its vector.
#[derive(Clone, Debug, Default)]
pub(crate) struct Derived {
    pub(crate) text: String,
    pub(crate) vec: Option<Arc<[f32]>>,
}

/// Joins the non-empty parts with `. `, cut to what the model accepts (on a char boundary).
fn join(parts: &[&str]) -> String {
    let mut text = parts
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(". ");
    if text.len() > TEXT_BYTES_MAX {
        let mut end = TEXT_BYTES_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// A skill's text: name, description, domain, capabilities, specializations.
pub(crate) fn skill_text(p: &SkillPublish) -> String {
    let capabilities = p.capabilities.join(", ");
    let specializations = p.specializations.join(", ");
    join(&[
        &p.name,
        &p.description,
        &p.domain,
        &capabilities,
        &specializations,
    ])
}

/// A node's text: its service and capabilities.
pub(crate) fn node_text(service: &str, capabilities: &[String]) -> String {
    join(&[service, &capabilities.join(", ")])
}

/// A basin's text: its metadata's values, in key order, each after its key.
pub(crate) fn basin_text(metadata: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = metadata
        .iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    join(&refs)
}

/// Cosine between an author's vector and the node's text vector; `None` where the
/// dimensions differ, either is missing or the author's vector is zero.
pub(crate) fn claim_consistency(author: &[f32], text_vec: Option<&[f32]>) -> Option<f32> {
    let text_vec = text_vec?;
    if author.len() != text_vec.len() {
        return None;
    }
    let dot: f32 = author.iter().zip(text_vec).map(|(a, b)| a * b).sum();
    let norm_a = author.iter().map(|a| a * a).sum::<f32>().sqrt();
    let norm_b = text_vec.iter().map(|b| b * b).sum::<f32>().sqrt();
    let cos = dot / (norm_a * norm_b);
    cos.is_finite().then_some(cos.clamp(-1.0, 1.0))
}

type Key = [u8; 32];

/// Per state table: the vectors of its rows' texts, by the texts' hashes.
type StateVectors = HashMap<&'static str, HashMap<Key, Arc<[f32]>>>;

fn key(text: &str) -> Key {
    *blake3::hash(text.as_bytes()).as_bytes()
}

/// The node's model and, per state table, the vectors of its current rows by text (state
/// tables are rewritten whole; their unchanged texts are not embedded again).
pub(crate) struct TextVectors {
    embedder: Option<Arc<Embedder>>,
    state: Mutex<StateVectors>,
}

impl TextVectors {
    pub(crate) fn new(embedder: Option<Arc<Embedder>>) -> Self {
        Self {
            embedder,
            state: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn model(&self) -> Option<&str> {
        self.embedder.as_ref().map(|e| e.model_id())
    }

    /// Vectors of `texts` (blank ones and all, without a model, get none). Runs the model on
    /// a blocking thread, in passes bounded by padded tokens.
    pub(crate) async fn embed(&self, texts: Vec<String>) -> Result<Vec<Derived>> {
        let Some(embedder) = self.embedder.clone() else {
            return Ok(texts
                .into_iter()
                .map(|text| Derived { text, vec: None })
                .collect());
        };
        tokio::task::spawn_blocking(move || embed_blocking(&embedder, texts))
            .await
            .map_err(internal)?
    }

    /// Like [`TextVectors::embed`] for the rows of a state table: texts it had at the last
    /// rewrite are not embedded again, and afterwards it remembers exactly these texts.
    pub(crate) async fn embed_state(
        &self,
        table: &'static str,
        texts: Vec<String>,
    ) -> Result<Vec<Derived>> {
        let known = self.lock().remove(table).unwrap_or_default();
        let missing: Vec<String> = texts
            .iter()
            .filter(|t| !known.contains_key(&key(t)))
            .cloned()
            .collect();
        let mut computed: HashMap<Key, Arc<[f32]>> = HashMap::new();
        for d in self.embed(missing).await? {
            if let Some(vec) = d.vec {
                computed.insert(key(&d.text), vec);
            }
        }
        let mut next = HashMap::with_capacity(texts.len());
        let mut out = Vec::with_capacity(texts.len());
        for text in texts {
            let k = key(&text);
            let vec = known.get(&k).or_else(|| computed.get(&k)).cloned();
            if let Some(v) = &vec {
                next.insert(k, v.clone());
            }
            out.push(Derived { text, vec });
        }
        self.lock().insert(table, next);
        Ok(out)
    }

    /// Remembers a state table row's vector (read back from the table at start).
    pub(crate) fn seed(&self, table: &'static str, text: &str, vec: Arc<[f32]>) {
        if vec.len() == DIM {
            self.lock().entry(table).or_default().insert(key(text), vec);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StateVectors> {
        self.state
            .lock()
            .expect("invariant: text vector cache lock is never poisoned")
    }
}

/// One text's embedding (a query's): its errors are the caller's (`invalid_text`).
pub(crate) fn embed_one(embedder: &Embedder, text: &str) -> Result<Vec<f32>> {
    Embedder::check(text).map_err(|e| crate::error::bad("invalid_text", format!("text: {e}")))?;
    let mut out = embedder.embed(&[text]).map_err(internal)?;
    out.pop()
        .ok_or_else(|| internal("the model gave no vector for one text"))
}

/// Embeds the non-blank texts, deduplicated, shortest first, in passes of bounded padded
/// tokens (texts of like length share a pass, so little of it is padding).
fn embed_blocking(embedder: &Embedder, texts: Vec<String>) -> Result<Vec<Derived>> {
    let mut unique: Vec<&str> = texts
        .iter()
        .map(String::as_str)
        .filter(|t| Embedder::check(t).is_ok())
        .collect();
    unique.sort_unstable();
    unique.dedup();
    // A text the model fails on gets no vector (and a warning); it never stops the others.
    let mut sized: Vec<(usize, &str)> = unique
        .into_iter()
        .filter_map(|t| match embedder.tokenize(t) {
            Ok(ids) => Some((ids.len(), t)),
            Err(e) => {
                tracing::warn!("no text vector for a text the tokenizer refused: {e}");
                None
            }
        })
        .collect();
    sized.sort_unstable();
    let lens: Vec<usize> = sized.iter().map(|(n, _)| *n).collect();
    let mut vectors: HashMap<&str, Arc<[f32]>> = HashMap::with_capacity(sized.len());
    for (start, end) in crate::embed_batches(&lens) {
        let pass: Vec<&str> = sized[start..end].iter().map(|(_, t)| *t).collect();
        match embedder.embed(&pass) {
            Ok(out) => {
                for (text, v) in pass.into_iter().zip(out) {
                    vectors.insert(text, v.into());
                }
            }
            // One by one, to find the text at fault.
            Err(_) => {
                for text in pass {
                    match embedder.embed(&[text]) {
                        Ok(mut v) => {
                            if let Some(v) = v.pop() {
                                vectors.insert(text, v.into());
                            }
                        }
                        Err(e) => tracing::warn!("no text vector for one text: {e}"),
                    }
                }
            }
        }
    }
    Ok(texts
        .iter()
        .map(|text| Derived {
            vec: vectors.get(text.as_str()).cloned(),
            text: text.clone(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_join_non_empty_parts_and_fit_the_model_limit() {
        let mut meta = BTreeMap::new();
        meta.insert("topic".to_string(), "grapes".to_string());
        meta.insert("area".to_string(), " ".to_string());
        assert_eq!(basin_text(&meta), "topic: grapes");
        assert_eq!(
            node_text("wine", &["pairing".into(), "tasting".into()]),
            "wine. pairing, tasting"
        );
        assert_eq!(node_text(" ", &[]), "");
        let long = "é".repeat(TEXT_BYTES_MAX);
        let cut = node_text(&long, &[]);
        assert!(cut.len() <= TEXT_BYTES_MAX && cut.len() > TEXT_BYTES_MAX - 2);
    }

    #[test]
    fn claim_consistency_is_a_cosine_where_dimensions_match() {
        assert_eq!(claim_consistency(&[1.0, 0.0], Some(&[1.0, 0.0])), Some(1.0));
        assert_eq!(claim_consistency(&[0.0, 2.0], Some(&[1.0, 0.0])), Some(0.0));
        assert_eq!(claim_consistency(&[1.0], Some(&[1.0, 0.0])), None);
        assert_eq!(claim_consistency(&[0.0, 0.0], Some(&[1.0, 0.0])), None);
        assert_eq!(claim_consistency(&[1.0, 0.0], None), None);
    }
}
