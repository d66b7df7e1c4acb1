//! Search by text over the text tables (skills, basins, nodes): by meaning (the query's
//! embedding against `text_vec`), by words (BM25 over `search_text`, Lance's full-text
//! search), or both (the default): a convex combination of the cosine similarity and the BM25
//! score scaled to the best match, weighted to meaning (`alpha`, 0.9), so that a paraphrase
//! finds a skill by what it does and an exact name or jargon word still lifts it by name.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::RecordBatch;
use datafusion::logical_expr::Expr;
use futures::TryStreamExt;
use lance::Dataset;
use lance_index::scalar::FullTextSearchQuery;
use lance_linalg::distance::DistanceType;
use serde_json::{Map, Value};

use crate::error::{Result, bad, internal};
use crate::knn::{self, K_MAX, Search};

/// How a text search ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Meaning and words, weighted to meaning (the default; see [`ALPHA`]).
    Hybrid,
    /// Meaning only: cosine between the query's embedding and `text_vec`.
    Vector,
    /// Words only: BM25 over `search_text` (works without a model).
    Text,
}

impl Mode {
    /// Parses `hybrid`, `vector` or `text`.
    pub fn parse(text: &str) -> Result<Mode> {
        match text.to_ascii_lowercase().as_str() {
            "hybrid" => Ok(Mode::Hybrid),
            "vector" => Ok(Mode::Vector),
            "text" => Ok(Mode::Text),
            other => Err(bad(
                "invalid_mode",
                format!(
                    "mode `{}` is not one of hybrid, vector, text",
                    other.chars().take(32).collect::<String>()
                ),
            )),
        }
    }

    /// Whether the mode needs the embedding model.
    pub fn needs_model(self) -> bool {
        self != Mode::Text
    }
}

/// A text search request.
#[derive(Clone, Debug)]
pub struct TextSearch {
    /// skills, basins or nodes.
    pub table: String,
    /// What the user is looking for, in plain words.
    pub text: String,
    /// How many rows (1..=1000).
    pub k: usize,
    /// SQL boolean expression applied before ranking.
    pub filter: Option<String>,
    /// How to rank.
    pub mode: Mode,
    /// Hybrid only: weight of meaning against words, 0..=1 (default [`ALPHA`]).
    pub alpha: Option<f32>,
    /// The columns each row carries; `None`: every column but the vectors.
    pub columns: Option<Vec<String>>,
}

/// Default weight of meaning in hybrid ranking. Measured on `bench/intent_quality.json`
/// (40 paraphrased intents that share no word with their skill, among its 40 skills), top-1:
/// meaning alone 35, words alone 1, reciprocal rank fusion 5, this combination 4 at alpha 0.5,
/// 10 at 0.7, 23 at 0.8, 32 at 0.9. Words a paraphrase shares with other skills are noise
/// that only a small weight keeps from drowning its meaning; names and jargon still lift.
pub const ALPHA: f32 = 0.9;

/// A text search hit.
#[derive(Clone, Debug)]
pub struct TextHit {
    /// Higher is better. Hybrid: `alpha` × cosine similarity + (1 − `alpha`) × BM25 / the best
    /// BM25 among the candidates; vector: the cosine similarity; text: the BM25 score.
    pub score: f32,
    /// Cosine distance between the query's embedding and the row's `text_vec`, when the
    /// row was among the nearest.
    pub distance: Option<f32>,
    /// BM25 score of the row's `search_text`, when its words matched.
    pub bm25: Option<f32>,
    /// The row's columns.
    pub row: Map<String, Value>,
}

/// Candidates each ranking gives to the fusion.
fn candidates(k: usize) -> usize {
    (k * 2).clamp(50, K_MAX)
}

/// The column that identifies a row of a text table.
fn key_column(table: &str) -> &'static str {
    if table == "nodes" { "author" } else { "id" }
}

/// Runs a checked text search on one dataset version; `query_vec` is the text's embedding
/// (for the modes that need it).
pub(crate) async fn run(
    tables: &crate::tables::Tables,
    ann: &crate::ann::AnnIndexes,
    dataset: Arc<Dataset>,
    request: &TextSearch,
    query_vec: Option<Vec<f32>>,
    filter: Option<Expr>,
) -> Result<Vec<TextHit>> {
    let n = match request.mode {
        Mode::Hybrid => candidates(request.k),
        _ => request.k,
    };
    // The rows carry the key too, which the fusion joins on.
    let asked = knn::resolve_columns(request.columns.as_deref(), &dataset)?;
    let key = key_column(&request.table);
    let mut columns = asked.clone();
    if !columns.iter().any(|c| c == key) {
        columns.push(key.to_string());
    }
    let nearest = match query_vec {
        Some(vector) if filter.is_none() => {
            match ann
                .search(
                    tables,
                    &request.table,
                    &dataset,
                    "text_vec",
                    &vector,
                    n,
                    DistanceType::Cosine,
                    false,
                    &columns,
                )
                .await?
            {
                Some(found) => ranked(found, "_distance", &columns)?,
                None => nearest_by_lance(&dataset, request, vector, n, None, &columns).await?,
            }
        }
        Some(vector) => {
            nearest_by_lance(&dataset, request, vector, n, filter.clone(), &columns).await?
        }
        None => Vec::new(),
    };
    let matched = if request.mode == Mode::Vector {
        Vec::new()
    } else {
        let found = bm25(&dataset, &request.text, n, filter).await?;
        ranked(found, "_score", &columns)?
    };
    let mut hits = rank(request, nearest, matched)?;
    if !asked.iter().any(|c| c == key) {
        for hit in &mut hits {
            hit.row.remove(key);
        }
    }
    Ok(hits)
}

/// The `n` rows nearest to `vector` by `text_vec`, exact, through Lance (filtered searches,
/// tables without an in-memory index).
async fn nearest_by_lance(
    dataset: &Dataset,
    request: &TextSearch,
    vector: Vec<f32>,
    n: usize,
    filter: Option<Expr>,
    columns: &[String],
) -> Result<Vec<(f32, Map<String, Value>)>> {
    let search = Search {
        table: request.table.clone(),
        vector,
        k: n,
        metric: DistanceType::Cosine,
        filter: None,
        exact: true,
        text_vec: true,
        columns: None,
    };
    ranked(
        knn::run(dataset, "text_vec", &search, filter, false).await?,
        "_distance",
        columns,
    )
}

/// The hits of a mode from the two rankings, best first, at most k.
fn rank(
    request: &TextSearch,
    nearest: Vec<(f32, Map<String, Value>)>,
    matched: Vec<(f32, Map<String, Value>)>,
) -> Result<Vec<TextHit>> {
    let key = key_column(&request.table);
    let mut hits = match request.mode {
        Mode::Vector => nearest
            .into_iter()
            .map(|(d, row)| TextHit {
                score: 1.0 - d,
                distance: Some(d),
                bm25: None,
                row,
            })
            .collect(),
        Mode::Text => matched
            .into_iter()
            .map(|(s, row)| TextHit {
                score: s,
                distance: None,
                bm25: Some(s),
                row,
            })
            .collect(),
        Mode::Hybrid => fuse(
            nearest,
            matched,
            key,
            request.alpha.unwrap_or(ALPHA).clamp(0.0, 1.0),
        ),
    };
    hits.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.row.get(key).map(text).cmp(&b.row.get(key).map(text)))
    });
    hits.truncate(request.k);
    Ok(hits)
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Convex combination of the nearest rows (by cosine distance) and the best-matching rows
/// (by BM25, scaled so that the best is 1). A row only words found gets the lowest
/// similarity among the nearest (it ranks below them by meaning); a row no word matched gets
/// 0 for words.
fn fuse(
    nearest: Vec<(f32, Map<String, Value>)>,
    matched: Vec<(f32, Map<String, Value>)>,
    key: &str,
    alpha: f32,
) -> Vec<TextHit> {
    let floor = nearest
        .iter()
        .map(|(d, _)| 1.0 - d)
        .fold(f32::INFINITY, f32::min);
    let floor = if floor.is_finite() { floor } else { 0.0 };
    let best = matched.iter().map(|(s, _)| *s).fold(0.0f32, f32::max);
    let mut by_key: HashMap<String, TextHit> = HashMap::new();
    for (distance, row) in nearest {
        let id = row.get(key).map(text).unwrap_or("").to_string();
        by_key.insert(
            id,
            TextHit {
                score: alpha * (1.0 - distance),
                distance: Some(distance),
                bm25: None,
                row,
            },
        );
    }
    for (score, row) in matched {
        let id = row.get(key).map(text).unwrap_or("").to_string();
        let hit = by_key.entry(id).or_insert(TextHit {
            score: alpha * floor,
            distance: None,
            bm25: None,
            row,
        });
        if best > 0.0 {
            hit.score += (1.0 - alpha) * score / best;
        }
        hit.bm25 = Some(score);
    }
    by_key.into_values().collect()
}

/// Rows (`columns` of them) as JSON objects with the value of `column` taken out, in the
/// order given by it (`_distance` ascending, `_score` descending).
fn ranked(
    batches: Vec<RecordBatch>,
    column: &str,
    columns: &[String],
) -> Result<Vec<(f32, Map<String, Value>)>> {
    let mut keep: Vec<String> = columns.to_vec();
    keep.push(column.to_string());
    let batches = batches
        .iter()
        .map(|b| knn::select(b, &keep))
        .collect::<Result<Vec<_>>>()?;
    let answer = crate::sql::Answer::of_rows(batches);
    let mut rows: Vec<(f32, Map<String, Value>)> = answer
        .to_objects()
        .into_iter()
        .map(|mut row| {
            let value = row
                .remove(column)
                .and_then(|d| d.as_f64())
                .unwrap_or(f64::NAN) as f32;
            (value, row)
        })
        .filter(|(v, _)| v.is_finite())
        .collect();
    if column == "_distance" {
        rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    } else {
        rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    }
    Ok(rows)
}

/// The `n` rows whose `search_text` best matches `text` by BM25, among those that pass the
/// filter; rows carry every column plus `_score`.
async fn bm25(
    dataset: &Dataset,
    text: &str,
    n: usize,
    filter: Option<Expr>,
) -> Result<Vec<RecordBatch>> {
    let query = FullTextSearchQuery::new(text.to_string())
        .with_column("search_text".to_string())
        .map_err(|e| bad("invalid_text", e.to_string()))?
        .limit(Some(n as i64));
    let mut scan = dataset.scan();
    scan.full_text_search(query)
        .map_err(|e| bad("invalid_text", e.to_string()))?;
    if let Some(expr) = filter {
        scan.filter_expr(expr);
        scan.prefilter(true);
    }
    let stream = scan
        .try_into_stream()
        .await
        .map_err(|e| internal(format!("full-text search: {e}")))?;
    stream
        .try_collect()
        .await
        .map_err(|e| internal(format!("full-text search: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), Value::String(id.into()));
        m
    }

    #[test]
    fn fusion_weighs_meaning_and_lifts_rows_whose_words_match() {
        let nearest = vec![(0.1, row("a")), (0.2, row("b")), (0.3, row("c"))];
        let matched = vec![(9.0, row("c")), (4.5, row("d"))];
        let mut hits = fuse(nearest, matched, "id", 0.8);
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        let order: Vec<&str> = hits.iter().map(|h| text(&h.row["id"])).collect();
        // c: 0.8·0.7 + 0.2·1 = 0.76 beats a: 0.8·0.9 = 0.72; d (words only, at the lowest
        // similarity): 0.8·0.7 + 0.2·0.5 = 0.66 beats b: 0.8·0.8 = 0.64.
        assert_eq!(order, ["c", "a", "d", "b"]);
        assert!((hits[0].score - 0.76).abs() < 1e-6, "{}", hits[0].score);
        assert_eq!(hits[0].distance, Some(0.3));
        assert_eq!(hits[0].bm25, Some(9.0));
        assert_eq!((hits[2].distance, hits[2].bm25), (None, Some(4.5)));
        // All meaning: a row only words found ranks with the least similar of the nearest.
        let hits = fuse(
            vec![(0.1, row("a")), (0.5, row("c"))],
            vec![(1.0, row("b"))],
            "id",
            1.0,
        );
        let a = hits.iter().find(|h| h.row["id"] == "a").map(|h| h.score);
        let b = hits.iter().find(|h| h.row["id"] == "b").map(|h| h.score);
        assert!(a > b, "{a:?} {b:?}");
    }

    #[test]
    fn modes_parse_and_say_what_they_need() {
        assert_eq!(Mode::parse("HYBRID").ok(), Some(Mode::Hybrid));
        assert!(Mode::parse("text").is_ok_and(|m| !m.needs_model()));
        assert!(Mode::parse("fuzzy").is_err_and(|e| e.code() == "invalid_mode"));
    }
}
