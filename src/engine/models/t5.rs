//! T5 encoder (SD3's `text_encoder_3`, FLUX's `text_encoder_2`: T5-XXL v1.1), transformers'
//! `T5EncoderModel` built from the repo's `config.json`.
//!
//! Our own layers, for two reasons:
//! * **f16 as transformers runs it.** T5 v1.1 overflows f16 in its feed-forward output
//!   projection, so transformers keeps every `wo` in f32 when it loads the model in f16
//!   (`_keep_in_fp32_modules`). The residual stream is then promoted to f32 by the first
//!   feed-forward block and stays there; only the layer norms' outputs go back to f16. This
//!   module does the same, where candle-transformers' T5 (used until session 18) ran `wo` in
//!   f16: infinities, then NaN prompt states for SD3 served in f16. A `wo` whose values f16
//!   holds exactly (an fp16 checkpoint's: SD3's T5) stays in f16 and is widened for each
//!   product — the same f32 product without T5-XXL's 2 GB of f32 weights.
//! * **T5-XXL on the CPU at half its f32 size.** In f32 on the CPU, the weights a checkpoint
//!   stores in bf16 or f16 (FLUX's and SD3's T5) are held as stored and widened in cache for
//!   each product ([`HalfLinear`]): 9.5 GB where f32 took 19, the same products.
//! * **The CPU's fused kernels.** In f32 on the CPU the attention runs fused with the relative
//!   position bias accumulated under its product ([`super::cpu_attention`]), the gated GELU's
//!   two projections as one product gated in one pass, and every Linear weight in the layout the
//!   `gemm` crate reads fastest ([`Linear`]).

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::blocks::Linear;
use super::cpu_activation::Activation;
use super::cpu_half_linear::{HeldLinear, Holding};
use super::quantized::{LayerSource, WeightFormat};
use super::tensor_bytes;
use crate::engine::error::{EngineError, Result};
use crate::engine::loader::weights::StoredDtypes;

#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `relu`, `gated-gelu` (T5 v1.1: the tanh GELU), `gated-silu`, …: transformers' parsing.
    #[serde(default = "default_feed_forward")]
    pub feed_forward_proj: String,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_feed_forward() -> String {
    "relu".into()
}

/// The most memory `name` (stored as `stored` in its file) is held in when the model runs in
/// `dtype`, on the CPU when `on_cpu`: the norms' scales take f32; the feed-forward output
/// projections under f16 take f32 unless the file holds them in f16 already (see the module
/// docs); on the CPU in f32, weights stored in half precision but the position-bias table stay
/// so ([`super::cpu_half_linear::held_dtype`]). The loader may still find an f32 or bf16 file's
/// values exact in f16 and hold them so: an upper bound, for the memory planner.
pub fn weight_dtype(name: &str, stored: DType, dtype: DType, on_cpu: bool) -> DType {
    if name.contains("layer_norm") {
        // RmsNorm's scale, read in f32.
        DType::F32
    } else if dtype == DType::F16 && name.contains("DenseReluDense.wo.") && stored != DType::F16 {
        DType::F32
    } else if name.contains("relative_attention_bias") {
        dtype
    } else {
        super::cpu_half_linear::held_dtype(name, stored, dtype, on_cpu)
    }
}

/// Bytes a model loaded in `dtype` (on the CPU when `on_cpu`) with its blocks' Linear layers in
/// `format` holds tensor `name` of `shape` (stored as `stored`) in: [`weight_dtype`]'s, but a
/// quantized layer's resident bits per weight in the format its rows take. For the memory
/// planner.
pub fn held_bytes(
    name: &str,
    stored: DType,
    shape: &[usize],
    (dtype, format): (DType, WeightFormat),
    on_cpu: bool,
) -> u64 {
    let numel: usize = shape.iter().product();
    let held = weight_dtype(name, stored, dtype, on_cpu);
    let dense = (numel * held.size_in_bytes()) as u64;
    let layer = name.contains("encoder.block.")
        && name.ends_with(".weight")
        && (name.contains(".SelfAttention.") || name.contains(".DenseReluDense."))
        && !name.contains("relative_attention_bias")
        // Under f16 the output projections keep the f16 rule (`OutputProjection`).
        && !(dtype == DType::F16 && name.contains("DenseReluDense.wo."));
    // A quantized layer at its format's size (FP8's per-row scales in the layer's dtype too).
    let quantized = match shape {
        [rows, inputs] if layer => {
            format
                .for_inputs(*inputs)
                .layer_bytes([*rows, *inputs], on_cpu, held)
        }
        _ => None,
    };
    quantized.unwrap_or(dense)
}

/// transformers' `T5Config` parsing of `feed_forward_proj`, `[gated-]ACT`: the activation and
/// whether it gates; `gated-gelu` (T5 v1.1) means the tanh GELU.
fn parse_feed_forward(feed_forward_proj: &str) -> Option<(Activation, bool)> {
    match feed_forward_proj.split_once('-') {
        Some(("gated", "gelu")) => Some((Activation::GeluTanh, true)),
        Some(("gated", name)) => Some((Activation::from_name(name)?, true)),
        Some(_) => None,
        None => Some((Activation::from_name(feed_forward_proj)?, false)),
    }
}

/// T5's RMS norm: statistics in f32, the output in the model's dtype.
struct RmsNorm {
    /// f32: candle's kernel scales in the input's dtype, and the input is f32 here.
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn new(width: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(width, "weight")?.to_dtype(DType::F32)?,
            eps: eps as f32,
        })
    }

    /// transformers rounds the normalised value to f16/bf16 and then scales it there; this
    /// scales in f32 and rounds once (within one rounding of it).
    fn forward(&self, xs: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&xs.to_dtype(DType::F32)?, &self.weight, self.eps)?.to_dtype(dtype)
    }
}

struct SelfAttention {
    q: HeldLinear,
    k: HeldLinear,
    v: HeldLinear,
    o: HeldLinear,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, c: &T5Config, holding: &Holding) -> candle_core::Result<Self> {
        let inner = c.num_heads * c.d_kv;
        Ok(Self {
            q: holding.linear(vb.pp("q"), c.d_model, inner, false)?,
            k: holding.linear(vb.pp("k"), c.d_model, inner, false)?,
            v: holding.linear(vb.pp("v"), c.d_model, inner, false)?,
            o: holding.linear(vb.pp("o"), inner, c.d_model, false)?,
            heads: c.num_heads,
            head_dim: c.d_kv,
        })
    }

    /// softmax(q kᵀ + bias) v — T5 does not scale the scores — with `bias` (heads, n, n).
    fn forward(&self, xs: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, _) = xs.dims3()?;
        let heads_first = |t: Tensor| {
            t.reshape((b, n, self.heads, self.head_dim))?
                .transpose(1, 2)
        };
        let q = heads_first(self.q.forward(xs)?)?;
        let k = heads_first(self.k.forward(xs)?)?;
        let v = heads_first(self.v.forward(xs)?)?;
        let out = if super::cpu_util::is_cpu_f32(&q) {
            super::cpu_attention::attention_with_bias(&q, &k, &v, 1.0, Some(bias))?
        } else {
            let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
            let scores = q.matmul(&k.t()?)?;
            // One prompt (the pipelines' case): a same-shape add, not a broadcasting one.
            let scores = if b == 1 {
                (scores + bias.unsqueeze(0)?)?
            } else {
                scores.broadcast_add(bias)?
            };
            super::attention::softmax_last_dim(&scores)?.matmul(&v)?
        };
        self.o.forward(
            &out.transpose(1, 2)?
                .reshape((b, n, self.heads * self.head_dim))?,
        )
    }
}

enum FeedForward {
    /// `act(wi x)`.
    Plain { wi: HeldLinear },
    /// `act(wi_0 x) · wi_1 x`, each projection on its own.
    Gated { wi_0: HeldLinear, wi_1: HeldLinear },
    /// The same with `[wi_1; wi_0]` as one projection, gated by one CPU kernel (f32, GELU).
    GatedFused { wi: HeldLinear },
}

/// `wo`, whose product runs in f32 when the model runs in f16.
enum OutputProjection {
    /// In the model's dtype (or as stored, on the CPU in f32), or f32 under f16.
    Held(HeldLinear),
    /// Under f16, values f16 holds exactly: kept in f16, widened for each product.
    Widened(Tensor),
}

impl OutputProjection {
    fn new(
        vb: VarBuilder,
        input: usize,
        output: usize,
        holding: &Holding,
    ) -> candle_core::Result<Self> {
        // A GGUF file's blocks are multiplied in f32 already.
        if vb.dtype() != DType::F16 || holding.takes_stored_blocks() {
            return Ok(Self::Held(holding.linear(vb, input, output, false)?));
        }
        let exact = vb.to_dtype(DType::F32).get((output, input), "weight")?;
        let narrow = exact.to_dtype(DType::F16)?;
        let round_trips = narrow
            .to_dtype(DType::F32)?
            .eq(&exact)?
            .flatten_all()?
            .min(0)?
            .to_scalar::<u8>()?
            == 1;
        Ok(if round_trips {
            Self::Widened(narrow)
        } else {
            Self::Held(HeldLinear::Full(Linear::new(exact, None)))
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            // f32 under f16: the input widened to it.
            Self::Held(HeldLinear::Full(wo)) => wo.forward(&xs.to_dtype(wo.input_dtype())?),
            Self::Held(wo) => wo.forward(xs),
            // A plain product: `Linear::new` would lay the widened weight out again per call.
            Self::Widened(weight) => xs
                .to_dtype(DType::F32)?
                .broadcast_matmul(&weight.to_dtype(DType::F32)?.t()?),
        }
    }
}

struct FeedForwardBlock {
    ff: FeedForward,
    act: Activation,
    wo: OutputProjection,
}

impl FeedForwardBlock {
    fn new(
        vb: VarBuilder,
        c: &T5Config,
        act: Activation,
        gated: bool,
        holding: &Holding,
    ) -> Result<Self> {
        let (d, f) = (c.d_model, c.d_ff);
        // A GGUF file's gate and value may be stored in different formats: kept apart.
        let fused_kernel = vb.device().is_cpu()
            && vb.dtype() == DType::F32
            && matches!(act, Activation::GeluErf | Activation::GeluTanh)
            && !holding.takes_stored_blocks();
        let ff = match (gated, fused_kernel) {
            (false, _) => FeedForward::Plain {
                wi: holding.linear(vb.pp("wi"), d, f, false)?,
            },
            (true, false) => FeedForward::Gated {
                wi_0: holding.linear(vb.pp("wi_0"), d, f, false)?,
                wi_1: holding.linear(vb.pp("wi_1"), d, f, false)?,
            },
            (true, true) => {
                let (value, gate) = (vb.pp("wi_1"), vb.pp("wi_0"));
                // Both as stored when both are stored in the same half precision (and not
                // quantized: then read in the model's dtype).
                let held = match (holding.as_stored(&value), holding.as_stored(&gate)) {
                    _ if holding.quantizes(d) => None,
                    (Some(a), Some(b)) if a == b => Some(a),
                    _ => None,
                };
                let (value, gate) = match held {
                    Some(dtype) => (value.to_dtype(dtype), gate.to_dtype(dtype)),
                    None => (value, gate),
                };
                let weight = Tensor::cat(
                    &[value.get((f, d), "weight")?, gate.get((f, d), "weight")?],
                    0,
                )?;
                FeedForward::GatedFused {
                    wi: holding.hold(weight, None)?,
                }
            }
        };
        let wo = OutputProjection::new(vb.pp("wo"), f, d, holding)?;
        Ok(Self { ff, act, wo })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = match &self.ff {
            FeedForward::Plain { wi } => self.act.forward(&wi.forward(xs)?)?,
            FeedForward::Gated { wi_0, wi_1 } => {
                (self.act.forward(&wi_0.forward(xs)?)? * wi_1.forward(xs)?)?
            }
            FeedForward::GatedFused { wi } => {
                let h = wi.forward(xs)?;
                match self.act {
                    Activation::GeluTanh => super::cpu_activation::geglu_tanh(&h)?,
                    _ => super::cpu_activation::geglu(&h)?,
                }
            }
        };
        self.wo.forward(&h)
    }
}

struct Block {
    attention_norm: RmsNorm,
    attention: SelfAttention,
    ff_norm: RmsNorm,
    ff: FeedForwardBlock,
}

pub struct T5Encoder {
    embedding: Tensor,
    /// (heads, buckets): the first block's table (stored (buckets, heads)), which every block
    /// uses, laid out so that a head's row gathers its bias in one `index_select`.
    relative_attention_bias: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    dtype: DType,
    pub config: T5Config,
}

impl T5Encoder {
    /// `vb` at the file root (`shared.weight`, `encoder.block.*`), in the model's dtype, with the
    /// dtype each tensor is stored in (on the CPU in f32, those stored in half precision are
    /// held so).
    /// `layers`: the blocks' Linear layers quantized on load (`--quantize-t5`; dense: as held
    /// above), or a GGUF file's blocks taken as they are. Under f16 the feed-forward output
    /// projections stay as that rule holds them.
    pub fn new(
        vb: VarBuilder,
        config_json: serde_json::Value,
        stored: &StoredDtypes,
        layers: LayerSource,
    ) -> Result<Self> {
        let c: T5Config = serde_json::from_value(config_json)
            .map_err(|e| EngineError::Unsupported(format!("T5 config: {e}")))?;
        let (act, gated) = parse_feed_forward(&c.feed_forward_proj).ok_or_else(|| {
            EngineError::Unsupported(format!("T5 feed_forward_proj `{}`", c.feed_forward_proj))
        })?;
        if c.num_heads == 0 || c.d_kv == 0 || c.relative_attention_num_buckets < 4 {
            return Err(EngineError::Unsupported(format!(
                "T5 with {} heads of {} and {} position buckets",
                c.num_heads, c.d_kv, c.relative_attention_num_buckets
            )));
        }
        let embedding_vb = if vb.contains_tensor("shared.weight") {
            vb.pp("shared")
        } else {
            vb.pp("encoder.embed_tokens")
        };
        let holding = Holding::new(stored, &vb).with_layers(layers);
        // Rows are looked up, then widened to the model's dtype ([`Self::forward`]).
        let embedding = holding
            .reading(embedding_vb)
            .get((c.vocab_size, c.d_model), "weight")?;
        let encoder = vb.pp("encoder");
        let relative_attention_bias = encoder
            .pp("block.0.layer.0.SelfAttention.relative_attention_bias")
            .get((c.relative_attention_num_buckets, c.num_heads), "weight")?
            .t()?
            .contiguous()?;
        let blocks = (0..c.num_layers)
            .map(|i| {
                let vb = encoder.pp(format!("block.{i}.layer"));
                let eps = c.layer_norm_epsilon;
                Ok(Block {
                    attention_norm: RmsNorm::new(c.d_model, eps, vb.pp("0.layer_norm"))?,
                    attention: SelfAttention::new(vb.pp("0.SelfAttention"), &c, &holding)?,
                    ff_norm: RmsNorm::new(c.d_model, eps, vb.pp("1.layer_norm"))?,
                    ff: FeedForwardBlock::new(vb.pp("1.DenseReluDense"), &c, act, gated, &holding)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = RmsNorm::new(
            c.d_model,
            c.layer_norm_epsilon,
            encoder.pp("final_layer_norm"),
        )?;
        Ok(Self {
            embedding,
            relative_attention_bias,
            blocks,
            final_norm,
            dtype: vb.dtype(),
            config: c,
        })
    }

    /// Bytes the weights are held in (what the memory planner counts with [`weight_dtype`]).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .blocks
            .iter()
            .map(|block| {
                let a = &block.attention;
                let ff = match &block.ff.ff {
                    FeedForward::Plain { wi } | FeedForward::GatedFused { wi } => wi.bytes(),
                    FeedForward::Gated { wi_0, wi_1 } => wi_0.bytes() + wi_1.bytes(),
                };
                let wo = match &block.ff.wo {
                    OutputProjection::Held(wo) => wo.bytes(),
                    OutputProjection::Widened(weight) => tensor_bytes(weight),
                };
                [&a.q, &a.k, &a.v, &a.o]
                    .iter()
                    .map(|p| p.bytes())
                    .sum::<usize>()
                    + ff
                    + wo
                    + tensor_bytes(&block.attention_norm.weight)
                    + tensor_bytes(&block.ff_norm.weight)
            })
            .sum();
        tensor_bytes(&self.embedding)
            + tensor_bytes(&self.relative_attention_bias)
            + layers
            + tensor_bytes(&self.final_norm.weight)
    }

    /// The last hidden state, (B, tokens, d_model), in the model's dtype.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, n) = input_ids.dims2()?;
        let mut xs = self
            .embedding
            .index_select(&input_ids.flatten_all()?, 0)?
            .to_dtype(self.dtype)?
            .reshape((b, n, self.config.d_model))?;
        let bias = self.position_bias(n, input_ids.device())?;
        for block in &self.blocks {
            let h = block
                .attention
                .forward(&block.attention_norm.forward(&xs, self.dtype)?, &bias)?;
            xs = clamp_f16(residual(&xs, &h)?)?;
            let h = block.ff.forward(&block.ff_norm.forward(&xs, self.dtype)?)?;
            xs = clamp_f16(residual(&xs, &h)?)?;
        }
        Ok(self.final_norm.forward(&xs, self.dtype)?)
    }

    /// (heads, n, n): each head's learned bias for the bucket of every key's offset from every
    /// query.
    fn position_bias(&self, n: usize, device: &Device) -> candle_core::Result<Tensor> {
        let c = &self.config;
        // A bucket per offset (2n − 1 logarithms), then the n × n table by lookup.
        let by_offset: Vec<u32> = (0..2 * n as i64 - 1)
            .map(|i| {
                relative_position_bucket(
                    i - (n as i64 - 1),
                    c.relative_attention_num_buckets,
                    c.relative_attention_max_distance,
                ) as u32
            })
            .collect();
        let buckets: Vec<u32> = (0..n)
            .flat_map(|query| by_offset[n - 1 - query..][..n].iter().copied())
            .collect();
        let buckets = Tensor::from_vec(buckets, n * n, device)?;
        self.relative_attention_bias
            .index_select(&buckets, 1)?
            .reshape((c.num_heads, n, n))
    }
}

/// transformers' bidirectional `_relative_position_bucket` for `key − query`: half the buckets
/// for keys after the query; in each half, exact offsets below a quarter of the buckets, then
/// logarithmic bins up to `max_distance`, computed in f32 as torch does (the bin edges fall on
/// whole numbers, where another rounding could move a bucket).
fn relative_position_bucket(relative: i64, buckets: usize, max_distance: usize) -> usize {
    let half = buckets / 2;
    let base = if relative > 0 { half } else { 0 };
    let distance = relative.unsigned_abs() as usize;
    let max_exact = half / 2;
    if distance < max_exact {
        return base + distance;
    }
    let log_ratio = (distance as f32 / max_exact as f32).ln()
        / ((max_distance as f64 / max_exact as f64).ln() as f32)
        * (half - max_exact) as f32;
    base + (max_exact + log_ratio as usize).min(half - 1)
}

/// transformers' residual add: a half-precision stream meeting an f32 `wo` output becomes f32.
fn residual(xs: &Tensor, h: &Tensor) -> candle_core::Result<Tensor> {
    if xs.dtype() == h.dtype() {
        xs + h
    } else {
        xs.to_dtype(DType::F32)? + h.to_dtype(DType::F32)?
    }
}

/// transformers' guard for an f16 stream: infinities become ±(f16::MAX − 1000).
fn clamp_f16(xs: Tensor) -> candle_core::Result<Tensor> {
    if xs.dtype() != DType::F16 {
        return Ok(xs);
    }
    let largest = xs
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    if largest.is_finite() {
        return Ok(xs);
    }
    let limit = f64::from(half::f16::MAX) - 1000.0;
    xs.clamp(-limit, limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets of T5 v1.1's configuration (32 buckets, distance 128) at the offsets that
    /// matter: exact ones, the first logarithmic bins (whose edges are whole numbers in f32),
    /// the clamp past `max_distance`, and keys after the query in the upper half.
    #[test]
    fn relative_position_buckets_follow_transformers() {
        let bucket = |r| relative_position_bucket(r, 32, 128);
        // Values from transformers' `_relative_position_bucket` (torch 2.15).
        for (relative, want) in [
            (0, 0),
            (-1, 1),
            (-7, 7),
            (-8, 8),
            (-15, 9),
            (-16, 10),
            (-31, 11),
            (-32, 12),
            (-64, 14),
            (-127, 15),
            (-128, 15),
            (-500, 15),
            (1, 17),
            (7, 23),
            (8, 24),
            (16, 26),
            (32, 28),
            (500, 31),
        ] {
            assert_eq!(bucket(relative), want, "offset {relative}");
        }
    }

    /// Under f16, `wo` is held in f16 only when that loses nothing, and either way its product
    /// is the f32 product of the file's values.
    #[test]
    fn output_projection_under_f16_computes_in_f32() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1., (2, 3, 8), &dev)?.to_dtype(DType::F16)?;
        let exact_in_f16 = Tensor::randn(0f32, 1., (4, 8), &dev)?
            .to_dtype(DType::F16)?
            .to_dtype(DType::F32)?;
        let not_exact = (&exact_in_f16 + 1e-4)?;
        for (weight, widened) in [(exact_in_f16, true), (not_exact, false)] {
            let tensors = std::collections::HashMap::from([("weight".to_string(), weight.clone())]);
            let vb = VarBuilder::from_tensors(tensors, DType::F16, &dev);
            let wo = OutputProjection::new(vb, 8, 4, &Holding::none())?;
            assert_eq!(matches!(wo, OutputProjection::Widened(_)), widened);
            let ours = wo.forward(&xs)?;
            assert_eq!(ours.dtype(), DType::F32);
            let expected = xs.to_dtype(DType::F32)?.broadcast_matmul(&weight.t()?)?;
            let diff = (ours - expected)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "widened {widened}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn feed_forward_names_parse_as_transformers_does() {
        assert_eq!(
            parse_feed_forward("gated-gelu"),
            Some((Activation::GeluTanh, true))
        );
        assert_eq!(parse_feed_forward("relu"), Some((Activation::Relu, false)));
        assert_eq!(
            parse_feed_forward("gelu"),
            Some((Activation::GeluErf, false))
        );
        assert_eq!(
            parse_feed_forward("gated-silu"),
            Some((Activation::Silu, true))
        );
        assert_eq!(parse_feed_forward("fancy-gelu"), None);
        assert_eq!(parse_feed_forward("gated-mish"), None);
    }
}
