//! The BERT encoder of all-MiniLM-L6-v2 (6 layers, 12 heads, 384 wide), written for
//! sentence embeddings on CPU with candle's tensors:
//! - the query, key and value projections are one matrix product (one 384 × 1152 weight);
//! - GELU is exact GELU (erf) with a branch-free rational erf that the compiler vectorises:
//!   libm's `erff`, which candle's `gelu_erf` calls per element, was 16% of a forward pass
//!   (`perf`, batches of 64 texts of 21 tokens).
//!
//! Weights are read by their Hugging Face names (`embeddings.*`, `encoder.layer.N.*`, with or
//! without a `bert.` prefix).

use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor, bail};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

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

struct Layer {
    /// Query, key and value, stacked: weight (3·hidden, hidden).
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
}

/// The encoder: token ids in, one hidden state per token out.
pub(crate) struct Encoder {
    words: Embedding,
    /// Position embeddings (max_positions, hidden).
    positions: Tensor,
    /// The embedding of token type 0 (every token here), (hidden,).
    token_type: Tensor,
    norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
}

fn linear(vb: &VarBuilder<'_>, name: &str, inputs: usize, outputs: usize) -> Result<Linear> {
    let vb = vb.pp(name);
    Ok(Linear::new(
        vb.get((outputs, inputs), "weight")?,
        Some(vb.get(outputs, "bias")?),
    ))
}

fn layer_norm(vb: &VarBuilder<'_>, name: &str, width: usize, eps: f64) -> Result<LayerNorm> {
    let vb = vb.pp(name);
    Ok(LayerNorm::new(
        vb.get(width, "weight")?,
        vb.get(width, "bias")?,
        eps,
    ))
}

impl Layer {
    fn load(vb: &VarBuilder<'_>, c: &Config) -> Result<Self> {
        let h = c.hidden_size;
        let attention = vb.pp("attention");
        let own = attention.pp("self");
        let (q, k, v) = (
            linear(&own, "query", h, h)?,
            linear(&own, "key", h, h)?,
            linear(&own, "value", h, h)?,
        );
        let weight = Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?;
        let bias = match (q.bias(), k.bias(), v.bias()) {
            (Some(a), Some(b), Some(c)) => Tensor::cat(&[a, b, c], 0)?,
            _ => bail!("attention projections without bias"),
        };
        Ok(Self {
            qkv: Linear::new(weight, Some(bias)),
            attention_out: linear(&attention.pp("output"), "dense", h, h)?,
            attention_norm: layer_norm(&attention.pp("output"), "LayerNorm", h, c.layer_norm_eps)?,
            up: linear(&vb.pp("intermediate"), "dense", h, c.intermediate_size)?,
            down: linear(&vb.pp("output"), "dense", c.intermediate_size, h)?,
            out_norm: layer_norm(&vb.pp("output"), "LayerNorm", h, c.layer_norm_eps)?,
        })
    }

    /// One layer over `x` (n, width, hidden); `bias` (n, 1, 1, width) masks out padding.
    fn forward(&self, x: &Tensor, bias: &Tensor, heads: usize) -> Result<Tensor> {
        let (n, width, hidden) = x.dims3()?;
        let head = hidden / heads;
        let qkv = self.qkv.forward(x)?; // (n, width, 3·hidden)
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * hidden, hidden)?
                .reshape((n, width, heads, head))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (head as f64).sqrt()))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(bias)?)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, width, hidden))?;
        let x = self
            .attention_norm
            .forward(&(self.attention_out.forward(&context)? + x)?)?;
        let inner = self.up.forward(&x)?.apply_op1_no_bwd(&Gelu)?;
        self.out_norm.forward(&(self.down.forward(&inner)? + x)?)
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
        let words = Embedding::new(e.pp("word_embeddings").get((c.vocab_size, h), "weight")?, h);
        let positions = e
            .pp("position_embeddings")
            .get((c.max_position_embeddings, h), "weight")?;
        let token_type = e
            .pp("token_type_embeddings")
            .get((c.type_vocab_size, h), "weight")?
            .get(0)?;
        let norm = layer_norm(&e, "LayerNorm", h, c.layer_norm_eps)?;
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
        })
    }

    /// Hidden states (n, width, hidden) of token ids (n, width), u32; `mask` (n, width) is 1
    /// for a text's tokens and 0 for padding, f32.
    pub(crate) fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (n, width) = ids.dims2()?;
        let positions = self.positions.narrow(0, 0, width)?;
        let x = self
            .words
            .forward(ids)?
            .broadcast_add(&positions)?
            .broadcast_add(&self.token_type)?;
        let mut x = self.norm.forward(&x)?;
        // Padding gets the most negative score, as Hugging Face's BERT does.
        let bias =
            ((mask.ones_like()? - mask)? * f64::from(f32::MIN))?.reshape((n, 1, 1, width))?;
        for layer in &self.layers {
            x = layer.forward(&x, &bias, self.heads)?;
        }
        debug_assert_eq!(x.dims(), [n, width, self.hidden]);
        Ok(x)
    }
}

/// Exact GELU, x·(1 + erf(x/√2))/2, with [`erf`].
struct Gelu;

/// Elements from which GELU splits across two threads.
const GELU_SPLIT_MIN: usize = 1 << 16;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf-rational"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            bail!("gelu: f32 only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("gelu: contiguous input only");
        };
        let input = &data[start..end];
        let mut out = vec![0f32; input.len()];
        if input.len() >= GELU_SPLIT_MIN {
            let half = input.len() / 2;
            let (a_in, b_in) = input.split_at(half);
            let (a_out, b_out) = out.split_at_mut(half);
            std::thread::scope(|s| {
                s.spawn(|| gelu_into(a_in, a_out));
                gelu_into(b_in, b_out);
            });
        } else {
            gelu_into(input, &mut out);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

fn gelu_into(input: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(input) {
        *o = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    }
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
        // More than GELU_SPLIT_MIN values, so the two-thread path runs too.
        let xs: Vec<f32> = (-40_000..=40_000).map(|i| i as f32 / 5000.0).collect();
        assert!(xs.len() >= super::GELU_SPLIT_MIN);
        let t = Tensor::new(&xs[..], &Device::Cpu).expect("tensor");
        let libm: Vec<f32> = t.erf().and_then(|e| e.to_vec1()).expect("erf");
        let worst = xs
            .iter()
            .zip(&libm)
            .map(|(&x, &e)| (super::erf(x) - e).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-6, "worst |erf - libm erff| = {worst}");
        let ours: Vec<f32> = t
            .apply_op1_no_bwd(&super::Gelu)
            .and_then(|g| g.to_vec1())
            .expect("gelu");
        let candle: Vec<f32> = t.gelu_erf().and_then(|g| g.to_vec1()).expect("gelu_erf");
        for ((x, a), b) in xs.iter().zip(&ours).zip(&candle) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "gelu({x}): {a} vs {b}"
            );
        }
    }
}
