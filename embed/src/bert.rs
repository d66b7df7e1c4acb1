//! The BERT encoder of all-MiniLM-L6-v2 (6 layers, 12 heads, 384 wide), written for
//! sentence embeddings on CPU:
//! - the four matrix products of a layer are candle's (`Tensor::matmul`, gemm on rayon's
//!   threads); the query, key and value projections are one product (a 384 × 1152 weight);
//! - everything between them (biases, attention, softmax, GELU, residuals, layer norm, mean
//!   pooling) is plain Rust over slices, split over rayon's threads. Done with candle's
//!   element-wise ops it cost 44% of a forward pass (`perf`, batches of 64 texts of 21
//!   tokens): copies for every transpose, one pass per op, and candle's thread pool spinning
//!   between them;
//! - GELU is exact GELU (erf) with a branch-free rational erf that the compiler vectorises
//!   (libm's `erff`, which candle's `gelu_erf` calls per element, was 16% of a pass);
//! - padding is never attended to and padded positions are not computed by attention (their
//!   states are never read: a key is only attended to within its own text).
//!
//! Weights are read by their Hugging Face names (`embeddings.*`, `encoder.layer.N.*`, with or
//! without a `bert.` prefix).

use candle_core::{Result, Tensor, bail};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// What the encoder reads of the model's `config.json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct Config {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    type_vocab_size: usize,
    layer_norm_eps: f64,
    hidden_act: String,
}

/// Rows handed to one rayon task by the row-wise passes.
const ROWS_PER_TASK: usize = 32;

/// A linear layer: `y = x · weight + bias`, the weight stored transposed (inputs, outputs)
/// so the product reads it row-major.
struct Linear {
    weight: Tensor,
    bias: Vec<f32>,
}

impl Linear {
    fn load(vb: &VarBuilder<'_>, inputs: usize, outputs: usize) -> Result<Self> {
        Self::stacked(&[vb], inputs, outputs)
    }

    /// Several layers of the same input side by side: their outputs concatenated.
    fn stacked(vbs: &[&VarBuilder<'_>], inputs: usize, outputs: usize) -> Result<Self> {
        let mut weights = Vec::with_capacity(vbs.len());
        let mut bias = Vec::with_capacity(vbs.len() * outputs);
        for vb in vbs {
            weights.push(vb.get((outputs, inputs), "weight")?);
            bias.extend(vb.get(outputs, "bias")?.to_vec1::<f32>()?);
        }
        let weight = Tensor::cat(&weights, 0)?.t()?.contiguous()?;
        Ok(Self { weight, bias })
    }

    /// `x · weight` (rows, outputs), without the bias: the pass after the product adds it.
    fn product(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight)
    }

    fn outputs(&self) -> usize {
        self.bias.len()
    }
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn load(vb: &VarBuilder<'_>, width: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            gamma: vb.get(width, "weight")?.to_vec1()?,
            beta: vb.get(width, "bias")?.to_vec1()?,
            eps: eps as f32,
        })
    }

    /// Normalises `row` in place.
    fn apply(&self, row: &mut [f32]) {
        let n = row.len() as f32;
        let mean = lanes_sum(row, |v| v) / n;
        let var = lanes_sum(row, |v| (v - mean) * (v - mean)) / n;
        let scale = 1.0 / (var + self.eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(&self.gamma).zip(&self.beta) {
            *v = (*v - mean) * scale * g + b;
        }
    }
}

struct Layer {
    /// Query, key and value, side by side: (hidden, 3·hidden).
    qkv: Linear,
    attention_out: Linear,
    attention_norm: Norm,
    up: Linear,
    down: Linear,
    out_norm: Norm,
}

/// The shape of a batch: `texts` rows of `width` tokens, text `i` has `lens[i]` real tokens
/// (then padding).
pub(crate) struct Batch<'a> {
    pub(crate) width: usize,
    pub(crate) lens: &'a [usize],
}

impl Batch<'_> {
    fn rows(&self) -> usize {
        self.lens.len() * self.width
    }
}

/// The encoder: token ids in, one hidden state per token out.
pub(crate) struct Encoder {
    /// Word embeddings (vocab, hidden).
    words: Vec<f32>,
    /// Position embeddings (max_positions, hidden).
    positions: Vec<f32>,
    /// The embedding of token type 0 (every token here), (hidden,).
    token_type: Vec<f32>,
    norm: Norm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
    vocab: usize,
    max_positions: usize,
}

/// Runs `f` on a 2-D f32 tensor's values, in row-major order, without copying them.
fn values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*storage else {
        bail!("encoder: expected f32 values on the CPU");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("encoder: expected contiguous values");
    };
    Ok(f(&data[start..end]))
}

fn tensor(values: Vec<f32>, rows: usize, cols: usize) -> Result<Tensor> {
    Tensor::from_vec(values, (rows, cols), &candle_core::Device::Cpu)
}

/// `x[r] = norm(x[r] + product[r] + bias)` for every row.
fn add_and_norm(x: &mut [f32], product: &[f32], bias: &[f32], norm: &Norm) {
    let width = bias.len();
    x.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(product.par_chunks(width * ROWS_PER_TASK))
        .for_each(|(xs, ps)| {
            for (row, p) in xs.chunks_mut(width).zip(ps.chunks(width)) {
                for ((v, p), b) in row.iter_mut().zip(p).zip(bias) {
                    *v += p + b;
                }
                norm.apply(row);
            }
        });
}

impl Layer {
    fn load(vb: &VarBuilder<'_>, c: &Config) -> Result<Self> {
        let h = c.hidden_size;
        let attention = vb.pp("attention");
        let own = attention.pp("self");
        let (q, k, v) = (own.pp("query"), own.pp("key"), own.pp("value"));
        let output = attention.pp("output");
        Ok(Self {
            qkv: Linear::stacked(&[&q, &k, &v], h, h)?,
            attention_out: Linear::load(&output.pp("dense"), h, h)?,
            attention_norm: Norm::load(&output.pp("LayerNorm"), h, c.layer_norm_eps)?,
            up: Linear::load(&vb.pp("intermediate").pp("dense"), h, c.intermediate_size)?,
            down: Linear::load(&vb.pp("output").pp("dense"), c.intermediate_size, h)?,
            out_norm: Norm::load(&vb.pp("output").pp("LayerNorm"), h, c.layer_norm_eps)?,
        })
    }

    /// One layer over `x` (rows, hidden), in place.
    fn forward(&self, x: &mut Vec<f32>, batch: &Batch<'_>, heads: usize) -> Result<()> {
        let hidden = self.attention_out.outputs();
        let rows = batch.rows();
        let input = tensor(std::mem::take(x), rows, hidden)?;
        let qkv = self.qkv.product(&input)?;
        let context = values(&qkv, |qkv| attention(qkv, &self.qkv.bias, batch, heads))?;
        let projected = self
            .attention_out
            .product(&tensor(context, rows, hidden)?)?;
        *x = input.flatten_all()?.to_vec1()?;
        values(&projected, |p| {
            add_and_norm(x, p, &self.attention_out.bias, &self.attention_norm)
        })?;
        let inner = self.up.outputs();
        let up = self.up.product(&tensor(x.clone(), rows, hidden)?)?;
        let activated = values(&up, |u| gelu_biased(u, &self.up.bias))?;
        let down = self.down.product(&tensor(activated, rows, inner)?)?;
        values(&down, |d| {
            add_and_norm(x, d, &self.down.bias, &self.out_norm)
        })
    }
}

/// `gelu(u + bias)` for every row of `u`.
fn gelu_biased(u: &[f32], bias: &[f32]) -> Vec<f32> {
    let width = bias.len();
    let mut out = vec![0f32; u.len()];
    out.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(u.par_chunks(width * ROWS_PER_TASK))
        .for_each(|(os, us)| {
            for (o, u) in os.chunks_mut(width).zip(us.chunks(width)) {
                for ((o, &u), &b) in o.iter_mut().zip(u).zip(bias) {
                    *o = gelu(u + b);
                }
            }
        });
    out
}

/// Multi-head self-attention of every text over its own tokens: `qkv` (rows, 3·hidden)
/// without bias, `bias` (3·hidden,). Returns the context (rows, hidden); padded rows are 0.
fn attention(qkv: &[f32], bias: &[f32], batch: &Batch<'_>, heads: usize) -> Vec<f32> {
    let hidden = bias.len() / 3;
    let width = batch.width;
    let mut context = vec![0f32; batch.rows() * hidden];
    context
        .par_chunks_mut(width * hidden)
        .zip(qkv.par_chunks(width * 3 * hidden))
        .zip(batch.lens.par_iter())
        .for_each(|((out, text), &len)| text_attention(out, text, bias, len, heads));
    context
}

/// Attention within one text: `text` (width, 3·hidden), `out` (width, hidden).
fn text_attention(out: &mut [f32], text: &[f32], bias: &[f32], len: usize, heads: usize) {
    let hidden = bias.len() / 3;
    let head = hidden / heads;
    let scale = 1.0 / (head as f32).sqrt();
    // The text's query, key and value rows with their biases: (len, 3·hidden).
    let mut qkv: Vec<f32> = text[..len * 3 * hidden].to_vec();
    for row in qkv.chunks_mut(3 * hidden) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
    let mut probs = vec![0f32; len];
    for h in 0..heads {
        let at = |row: usize, part: usize| {
            let start = row * 3 * hidden + part * hidden + h * head;
            &qkv[start..start + head]
        };
        for i in 0..len {
            let q = at(i, 0);
            for (j, p) in probs.iter_mut().enumerate() {
                *p = dot(q, at(j, 1)) * scale;
            }
            softmax(&mut probs);
            let dst = &mut out[i * hidden + h * head..i * hidden + (h + 1) * head];
            for (j, &p) in probs.iter().enumerate() {
                for (d, v) in dst.iter_mut().zip(at(j, 2)) {
                    *d += p * v;
                }
            }
        }
    }
}

/// Lanes summed side by side: a plain `f32` sum is one chain of additions (the compiler may
/// not reorder them), eight independent ones vectorise.
const LANES: usize = 8;

/// Σ f(x) over `xs`, in [`LANES`] partial sums.
#[inline(always)]
fn lanes_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// a · b, in [`LANES`] partial sums.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((acc, x), y) in acc.iter_mut().zip(x).zip(y) {
            *acc += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn softmax(xs: &mut [f32]) {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in xs.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in xs.iter_mut() {
        *x /= sum;
    }
}

impl Encoder {
    pub(crate) fn load(vb: VarBuilder<'_>, c: &Config) -> Result<Self> {
        if c.hidden_act != "gelu" {
            bail!("hidden_act `{}`: only gelu is supported", c.hidden_act);
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            bail!("hidden size not divisible by the number of heads");
        }
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let h = c.hidden_size;
        let e = vb.pp("embeddings");
        let flat = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
        let words = flat(e.pp("word_embeddings").get((c.vocab_size, h), "weight")?)?;
        let positions = flat(
            e.pp("position_embeddings")
                .get((c.max_position_embeddings, h), "weight")?,
        )?;
        let token_type = e
            .pp("token_type_embeddings")
            .get((c.type_vocab_size, h), "weight")?
            .get(0)?
            .to_vec1()?;
        let norm = Norm::load(&e.pp("LayerNorm"), h, c.layer_norm_eps)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::load(&vb.pp(format!("encoder.layer.{i}")), c))
            .collect::<Result<_>>()?;
        Ok(Self {
            words,
            positions,
            token_type,
            norm,
            layers,
            heads: c.num_attention_heads,
            hidden: h,
            vocab: c.vocab_size,
            max_positions: c.max_position_embeddings,
        })
    }

    /// Hidden states (rows, hidden) of token ids (rows = texts × width, padded with anything).
    pub(crate) fn forward(&self, ids: &[u32], batch: &Batch<'_>) -> Result<Vec<f32>> {
        let h = self.hidden;
        if batch.width == 0 || batch.lens.iter().any(|&l| l == 0 || l > batch.width) {
            bail!(
                "encoder: texts of {:?} tokens in rows of {}",
                batch.lens,
                batch.width
            );
        }
        if batch.width > self.max_positions {
            bail!(
                "encoder: {} tokens, the model reads at most {}",
                batch.width,
                self.max_positions
            );
        }
        if ids.len() != batch.rows() {
            bail!("encoder: {} ids for {} rows", ids.len(), batch.rows());
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            bail!("encoder: token id {id} outside the vocabulary");
        }
        let mut x = vec![0f32; batch.rows() * h];
        for (r, (row, &id)) in x.chunks_mut(h).zip(ids).enumerate() {
            let word = &self.words[id as usize * h..(id as usize + 1) * h];
            let pos = r % batch.width;
            let position = &self.positions[pos * h..(pos + 1) * h];
            for (((v, w), p), t) in row.iter_mut().zip(word).zip(position).zip(&self.token_type) {
                *v = w + p + t;
            }
            self.norm.apply(row);
        }
        for layer in &self.layers {
            layer.forward(&mut x, batch, self.heads)?;
        }
        debug_assert_eq!(x.len(), batch.rows() * h);
        Ok(x)
    }
}

/// Exact GELU, x·(1 + erf(x/√2))/2, with [`erf`].
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf(x) in f32 as a ratio of two polynomials on [-4, 4] (outside it erf is ±1 in f32):
/// the approximation XLA and Eigen use for f32, within a few ulp of the true value. No
/// branches or table lookups, so a loop over a slice vectorises.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub(crate) fn erf(x: f32) -> f32 {
    const ALPHA: [f32; 7] = [
        -2.72614225801306e-10,
        2.77068142495902e-08,
        -2.10102402082508e-06,
        -5.69250639462346e-05,
        -7.34990630326855e-04,
        -2.95459980854025e-03,
        -1.60960333262415e-02,
    ];
    const BETA: [f32; 5] = [
        -1.45660718464996e-05,
        -2.13374055278905e-04,
        -1.68282697438203e-03,
        -7.37332916720468e-03,
        -1.42647390514189e-02,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ALPHA[1..].iter().fold(ALPHA[0], |acc, &a| acc * x2 + a);
    let q = BETA[1..].iter().fold(BETA[0], |acc, &b| acc * x2 + b);
    x * p / q
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn rational_erf_agrees_with_libm_and_gelu_with_candles() {
        let xs: Vec<f32> = (-40_000..=40_000).map(|i| i as f32 / 5000.0).collect();
        let t = Tensor::new(&xs[..], &Device::Cpu).expect("tensor");
        let libm: Vec<f32> = t.erf().and_then(|e| e.to_vec1()).expect("erf");
        let worst = xs
            .iter()
            .zip(&libm)
            .map(|(&x, &e)| (super::erf(x) - e).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-6, "worst |erf - libm erff| = {worst}");
        // Through the row pass, with a bias of 0.25 on every other column.
        let bias: Vec<f32> = (0..xs.len()).map(|i| (i % 2) as f32 * 0.25).collect();
        let ours = super::gelu_biased(&xs, &bias);
        let shifted: Vec<f32> = xs.iter().zip(&bias).map(|(x, b)| x + b).collect();
        let candle: Vec<f32> = Tensor::new(&shifted[..], &Device::Cpu)
            .and_then(|t| t.gelu_erf())
            .and_then(|g| g.to_vec1())
            .expect("gelu_erf");
        for ((x, a), b) in shifted.iter().zip(&ours).zip(&candle) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "gelu({x}): {a} vs {b}"
            );
        }
    }

    #[test]
    fn lane_sums_agree_with_plain_sums() {
        for n in [0, 1, 7, 8, 9, 32, 383, 384] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((super::dot(&a, &b) - plain).abs() < 1e-4, "dot, n = {n}");
            let squares: f32 = a.iter().map(|x| x * x).sum();
            assert!(
                (super::lanes_sum(&a, |x| x * x) - squares).abs() < 1e-4,
                "sum, n = {n}"
            );
        }
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut xs = [1.0f32, 3.0, -2.0, 3.0, 80.0];
        super::softmax(&mut xs);
        assert!((xs.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(xs[4] > 0.999 && xs[1] == xs[3] && xs[1] > xs[0] && xs[0] > xs[2]);
    }
}
