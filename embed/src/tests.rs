//! The model against the reference data of `testdata/minilm_golden.json`: token ids and
//! embeddings from an independent numpy implementation of the same weights.

use super::*;

fn model_dir() -> PathBuf {
    let dir = default_model_dir().expect("HOME or MESHNODE_MODEL_DIR is set");
    assert!(
        dir.join("model.safetensors").exists(),
        "the model is not installed in {}: run `scripts/ensure-deps.sh model` (make test does)",
        dir.display()
    );
    dir
}

fn embedder() -> &'static Embedder {
    static EMBEDDER: std::sync::OnceLock<Embedder> = std::sync::OnceLock::new();
    EMBEDDER.get_or_init(|| Embedder::open(&model_dir()).expect("open the model"))
}

#[derive(serde::Deserialize)]
struct Golden {
    model_safetensors_sha256: String,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    token_ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn golden() -> Golden {
    serde_json::from_str(include_str!("../testdata/minilm_golden.json")).expect("golden json")
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

#[test]
fn token_ids_and_embeddings_match_the_reference() {
    let golden = golden();
    assert_eq!(golden.model_safetensors_sha256, MODEL_SHA256);
    let e = embedder();
    let texts: Vec<&str> = golden.cases.iter().map(|c| c.text.as_str()).collect();
    // One batch of every case (padded to the longest), so padding must not change a vector.
    let vectors = e.embed(&texts).expect("embed");
    for (case, vector) in golden.cases.iter().zip(&vectors) {
        assert_eq!(
            e.tokenize(&case.text).expect("tokenize"),
            case.token_ids,
            "{}",
            case.text
        );
        assert_eq!(vector.len(), DIM);
        let cosine = dot(vector, &case.embedding) / (norm(vector) * norm(&case.embedding));
        assert!(cosine >= 0.9999, "{}: cosine {cosine}", case.text);
        let worst = vector
            .iter()
            .zip(&case.embedding)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-4, "{}: max |Δ| {worst}", case.text);
        // Alone, the same text gives the same vector.
        let alone = e.embed(&[case.text.as_str()]).expect("embed one");
        assert!(dot(&alone[0], vector) >= 0.99999, "{}", case.text);
    }
}

#[test]
fn other_scripts_long_texts_and_odd_characters_embed_to_unit_vectors() {
    let e = embedder();
    let long = "grape ".repeat(2000);
    let texts = [
        "C++/Rust: tokio::spawn()",
        "東京でワインを作る",
        "Ελληνικά ΣΑΣ",
        "🍷🍇 sommelier",
        "zero\u{200b}width\ttab\nnewline",
        long.as_str(),
    ];
    for text in texts {
        let ids = e.tokenize(text).expect("tokenize");
        assert!(ids.len() <= TOKENS_MAX, "{} tokens", ids.len());
        assert_eq!(ids.first(), Some(&101), "[CLS] first");
        assert_eq!(ids.last(), Some(&102), "[SEP] last, also after the cut");
    }
    for v in e.embed(&texts).expect("embed") {
        assert!((norm(&v) - 1.0).abs() < 1e-4);
        assert!(v.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn paraphrases_are_nearer_than_unrelated_texts() {
    let e = embedder();
    let v = e
        .embed(&[
            "who can bandage a cut?",
            "triage medic: wound care and first aid",
            "bartending basics: cocktails and margaritas",
        ])
        .expect("embed");
    assert!(dot(&v[0], &v[1]) > dot(&v[0], &v[2]) + 0.1);
}

#[test]
fn bad_texts_and_missing_or_wrong_models_are_refused_with_what_to_do() {
    let e = embedder();
    for text in ["", "   \n\t"] {
        assert!(matches!(e.embed(&[text]), Err(Error::Input(_))), "{text:?}");
    }
    let huge = "x".repeat(TEXT_BYTES_MAX + 1);
    assert!(matches!(e.embed(&[huge.as_str()]), Err(Error::Input(_))));
    assert!(e.embed(&[]).expect("no texts").is_empty());

    let empty = tempfile::tempdir().expect("tempdir");
    let missing = Embedder::open(empty.path()).expect_err("no files");
    assert!(matches!(
        missing,
        Error::Missing {
            missing: "model.safetensors",
            ..
        }
    ));
    assert!(
        missing.to_string().contains("ensure-deps.sh model"),
        "{missing}"
    );

    // The right config and tokenizer, weights with one byte changed: refused at open.
    let dir = model_dir();
    let wrong = tempfile::tempdir().expect("tempdir");
    let mut weights = std::fs::read(dir.join("model.safetensors")).expect("weights");
    let last = weights.len() - 1;
    weights[last] ^= 1;
    std::fs::write(wrong.path().join("model.safetensors"), weights).expect("write");
    for name in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.join(name), wrong.path().join(name)).expect("copy");
    }
    let refused = Embedder::open(wrong.path()).expect_err("wrong hash");
    assert!(matches!(refused, Error::WrongModel { .. }), "{refused}");
}
