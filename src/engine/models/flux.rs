//! FLUX.1's transformer as diffusers' `FluxTransformer2DModel` (its weight names and config):
//! packed 2×2 latent patches, timestep (+ distilled guidance for dev) + pooled CLIP conditioning,
//! double-stream blocks (text first, rotary positions over (t, h, w) ids), then single-stream
//! blocks over the joint sequence with a parallel MLP.

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{computing, linear, Biased, Linear};
use serde::Deserialize;

use super::blocks::timestep_features;
use super::dit::{
    gated_add, gelu_tanh, ContextOrder, JointAttention, JointAttentionConfig, Modulation,
    PlainLayerNorm, Rope, SiluMlp,
};
use super::mmdit::{JointBlock, JointBlockConfig};
use super::quantized::{block_columns, vb_for, BlockLinear, LayerSource, WeightFormat};
use crate::engine::error::{EngineError, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct FluxTransformerConfig {
    #[serde(default = "one")]
    pub patch_size: usize,
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub pooled_projection_dim: usize,
    /// FLUX.1-dev: the guidance scale is an input (guidance distillation); schnell has none.
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "default_axes")]
    pub axes_dims_rope: Vec<usize>,
}

fn one() -> usize {
    1
}
fn default_in_channels() -> usize {
    64
}
fn default_axes() -> Vec<usize> {
    vec![16, 56, 56]
}

impl FluxTransformerConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }
}

const EPS: f64 = 1e-6;
const ROPE_THETA: f64 = 10000.0;

/// diffusers' `FluxSingleTransformerBlock`.
struct SingleBlock {
    norm: Modulation,
    attn: JointAttention,
    proj_mlp: BlockLinear,
    proj_out: SingleOutput,
    layer_norm: PlainLayerNorm,
}

/// A single block's output projection over its [attention | MLP] features, kept as its two
/// column blocks and multiplied apart, the products summed where the gated residual takes them:
/// the block never joins its (tokens × 3072) and (tokens × 12288) outputs, a copy of both every
/// block. The split is at a multiple of every quantization block, so each format holds the same
/// values as over the whole layer.
struct SingleOutput {
    attn: BlockLinear,
    mlp: BlockLinear,
}

impl SingleOutput {
    fn new(
        dim: usize,
        mlp: usize,
        vb: VarBuilder,
        layers: LayerSource,
    ) -> candle_core::Result<Self> {
        let bias = computing(vb.clone()).get(dim, "bias")?;
        if let Some(blocks) = layers.stored_blocks(&vb, dim + mlp, dim)? {
            let part = |from, count, bias| {
                let columns = block_columns(&blocks, from, count)?;
                BlockLinear::from_blocks(columns, bias, layers.format.cpu_choice(), vb.device())
            };
            return Ok(Self {
                attn: part(0, dim, None)?,
                mlp: part(dim, mlp, Some(&bias))?,
            });
        }
        let format = layers.format;
        let weight = vb_for(&vb, dim, format).get((dim, dim + mlp), "weight")?;
        let part = |from, count, bias| -> candle_core::Result<BlockLinear> {
            let columns = weight.narrow(1, from, count)?.contiguous()?;
            BlockLinear::from_dense(Linear::new(columns, bias), format)
        };
        Ok(Self {
            attn: part(0, dim, None)?,
            mlp: part(dim, mlp, Some(bias))?,
        })
    }

    fn bytes(&self) -> usize {
        self.attn.bytes() + self.mlp.bytes()
    }

    /// The projection of [attn | mlp], its bias (and the second part's product) left to the
    /// gated residual.
    fn forward(&self, attn: &Tensor, mlp: &Tensor) -> candle_core::Result<Biased> {
        Biased::done(self.attn.forward_unbiased(attn)?).plus(self.mlp.forward_deferring_bias(mlp)?)
    }
}

/// diffusers' guard in f16, after each single block and each double block's text stream: FLUX's
/// activations outgrow f16 there, and an infinity becomes f16's largest value instead of NaN
/// in the next layer norm.
fn clip_f16(xs: Tensor) -> candle_core::Result<Tensor> {
    if xs.dtype() != candle_core::DType::F16 {
        return Ok(xs);
    }
    let largest = f64::from(half::f16::MAX);
    xs.clamp(-largest, largest)
}

impl SingleBlock {
    fn new(
        vb: VarBuilder,
        c: &FluxTransformerConfig,
        layers: LayerSource,
    ) -> candle_core::Result<Self> {
        let dim = c.inner_dim();
        let mlp = 4 * dim;
        Ok(Self {
            norm: Modulation::new(vb.pp("norm.linear"), dim, 3, layers)?,
            attn: JointAttention::new(
                vb.pp("attn"),
                &JointAttentionConfig {
                    dim,
                    heads: c.num_attention_heads,
                    head_dim: c.attention_head_dim,
                    qk_norm: true,
                    with_context: false,
                    context_out: false,
                    image_out: false,
                    layers,
                },
            )?,
            proj_mlp: layers.linear(dim, mlp, vb.pp("proj_mlp"))?,
            proj_out: SingleOutput::new(dim, mlp, vb.pp("proj_out"), layers)?,
            layer_norm: PlainLayerNorm::new(dim, EPS, &vb)?,
        })
    }

    fn bytes(&self) -> usize {
        self.norm.bytes() + self.attn.bytes() + self.proj_mlp.bytes() + self.proj_out.bytes()
    }

    fn forward(&self, xs: &Tensor, temb: &Tensor, rope: &Rope) -> candle_core::Result<Tensor> {
        crate::engine::profile::scope("FluxSingleTransformerBlock", xs, || {
            let m = self.norm.forward(temb)?;
            let normed = self.layer_norm.forward_modulated(xs, &m[0], &m[1])?;
            let mlp = gelu_tanh(self.proj_mlp.forward_deferring_bias(&normed)?)?;
            let (attn, _) = self
                .attn
                .forward(&normed, None, ContextOrder::Before, Some(rope))?;
            let out = self.proj_out.forward(&attn.resolve()?, &mlp)?;
            gated_add(xs, &m[2], out)
        })
    }
}

pub struct FluxTransformer {
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: SiluMlp,
    guidance_embedder: Option<SiluMlp>,
    text_embedder: SiluMlp,
    double_blocks: Vec<JointBlock>,
    single_blocks: Vec<SingleBlock>,
    norm_out: Modulation,
    layer_norm: PlainLayerNorm,
    proj_out: Linear,
    pub config: FluxTransformerConfig,
}

impl FluxTransformer {
    /// Bytes the blocks' Linear layers hold (what `--quantize` and GGUF files change).
    pub fn block_layer_bytes(&self) -> usize {
        let double: usize = self.double_blocks.iter().map(JointBlock::bytes).sum();
        double
            + self
                .single_blocks
                .iter()
                .map(SingleBlock::bytes)
                .sum::<usize>()
    }

    pub fn new(
        vb: VarBuilder,
        config: FluxTransformerConfig,
        config_path: &std::path::Path,
        layers: LayerSource,
    ) -> Result<Self> {
        let c = &config;
        let dim = c.inner_dim();
        if c.axes_dims_rope.iter().sum::<usize>() != c.attention_head_dim
            || c.axes_dims_rope.iter().any(|d| d % 2 == 1)
        {
            return Err(EngineError::BadConfig {
                path: config_path.to_path_buf(),
                reason: format!(
                    "axes_dims_rope {:?} must be even and sum to attention_head_dim {}",
                    c.axes_dims_rope, c.attention_head_dim
                ),
            });
        }
        let te = vb.pp("time_text_embed");
        let double_blocks = (0..c.num_layers)
            .map(|i| {
                JointBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    &JointBlockConfig {
                        dim,
                        heads: c.num_attention_heads,
                        head_dim: c.attention_head_dim,
                        qk_norm: true,
                        context_pre_only: false,
                        dual: false,
                        layers,
                    },
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let single_blocks = (0..c.num_single_layers)
            .map(|i| SingleBlock::new(vb.pp(format!("single_transformer_blocks.{i}")), c, layers))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            x_embedder: linear(c.in_channels, dim, vb.pp("x_embedder"))?,
            context_embedder: linear(c.joint_attention_dim, dim, vb.pp("context_embedder"))?,
            timestep_embedder: SiluMlp::new(te.pp("timestep_embedder"), 256, dim)?,
            guidance_embedder: if c.guidance_embeds {
                Some(SiluMlp::new(te.pp("guidance_embedder"), 256, dim)?)
            } else {
                None
            },
            text_embedder: SiluMlp::new(te.pp("text_embedder"), c.pooled_projection_dim, dim)?,
            double_blocks,
            single_blocks,
            norm_out: Modulation::new(
                vb.pp("norm_out.linear"),
                dim,
                2,
                WeightFormat::Dense.into(),
            )?,
            layer_norm: PlainLayerNorm::new(dim, EPS, &vb)?,
            proj_out: linear(
                dim,
                c.patch_size * c.patch_size * c.out_channels(),
                vb.pp("proj_out"),
            )?,
            config,
        })
    }

    /// Rotary angles for `ids` (tokens × axes positions), computed in f64 as diffusers does.
    pub fn rope(&self, ids: &[[f32; 3]], device: &Device) -> candle_core::Result<Rope> {
        let half = self.config.attention_head_dim / 2;
        let mut cos = Vec::with_capacity(ids.len() * half);
        let mut sin = Vec::with_capacity(ids.len() * half);
        for id in ids {
            for (axis, &d) in self.config.axes_dims_rope.iter().enumerate() {
                let pos = id.get(axis).copied().unwrap_or(0.0) as f64;
                for j in 0..d / 2 {
                    let freq = 1.0 / ROPE_THETA.powf((2 * j) as f64 / d as f64);
                    let angle = pos * freq;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let shape = (1, 1, ids.len(), half);
        Rope::new(
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        )
    }

    /// The velocity for packed latents `xs` (B, tokens, in_channels) at `timestep` (σ·1000),
    /// with text states `context` (B, L, joint_attention_dim), pooled CLIP `pooled` (B, P), the
    /// distilled `guidance` scale (dev) and the positions `rope` of [text..., image...] tokens.
    pub fn forward(
        &self,
        xs: &Tensor,
        timestep: f32,
        guidance: Option<f32>,
        context: &Tensor,
        pooled: &Tensor,
        rope: &Rope,
    ) -> candle_core::Result<Tensor> {
        let t = self.timestep_input(timestep, xs)?;
        self.forward_from_timestep_input(xs, &t, guidance, context, pooled, rope)
    }

    /// The timestep's sinusoidal features (B, 256) for `xs`'s batch, made on the host apart from
    /// the forward (a CUDA graph of the forward takes them as an input).
    pub fn timestep_input(&self, timestep: f32, xs: &Tensor) -> candle_core::Result<Tensor> {
        // The pipeline hands σ (t / 1000) over and the model scales it back, in f32.
        let t = (timestep / 1000.0) * 1000.0;
        timestep_features(
            &vec![t; xs.dim(0)?],
            256,
            true,
            0.0,
            xs.dtype(),
            xs.device(),
        )
    }

    /// [`Self::forward`] from the timestep's features ([`Self::timestep_input`]).
    pub fn forward_from_timestep_input(
        &self,
        xs: &Tensor,
        t: &Tensor,
        guidance: Option<f32>,
        context: &Tensor,
        pooled: &Tensor,
        rope: &Rope,
    ) -> candle_core::Result<Tensor> {
        let b = xs.dim(0)?;
        let dtype = xs.dtype();
        let device = xs.device();
        let mut xs = self.x_embedder.forward(xs)?;
        let features = |v: f32| timestep_features(&vec![v; b], 256, true, 0.0, dtype, device);
        let mut temb = self.timestep_embedder.forward(t)?;
        match (&self.guidance_embedder, guidance) {
            (Some(embedder), Some(g)) => {
                temb = (temb + embedder.forward(&features(g * 1000.0)?)?)?;
            }
            (Some(_), None) => candle_core::bail!("this FLUX model needs a guidance value"),
            (None, _) => {}
        }
        let temb = (temb + self.text_embedder.forward(&pooled.to_dtype(dtype)?)?)?;
        let mut context = self.context_embedder.forward(&context.to_dtype(dtype)?)?;
        for block in &self.double_blocks {
            let (next, next_context) =
                block.forward(&xs, &context, &temb, ContextOrder::Before, Some(rope))?;
            xs = next;
            context = clip_f16(next_context.ok_or_else(|| {
                candle_core::Error::Msg("a FLUX double block lost its text stream".into())
            })?)?;
        }
        let text_tokens = context.dim(1)?;
        let mut joint = Tensor::cat(&[&context, &xs], 1)?;
        for block in &self.single_blocks {
            joint = clip_f16(block.forward(&joint, &temb, rope)?)?;
        }
        let image_tokens = joint.dim(1)? - text_tokens;
        let xs = joint.narrow(1, text_tokens, image_tokens)?;
        let m = self.norm_out.forward(&temb)?;
        let xs = self.layer_norm.forward_modulated(&xs, &m[1], &m[0])?;
        self.proj_out.forward(&xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// In f16 an infinity becomes ±f16::MAX and finite values stay; other dtypes pass as they are.
    #[test]
    fn f16_states_are_clipped_to_finite_values_as_diffusers_does() -> candle_core::Result<()> {
        let values = [f32::INFINITY, -f32::INFINITY, 1.5, -65504.0];
        let xs = Tensor::new(&values, &Device::Cpu)?;
        let clipped = clip_f16(xs.to_dtype(DType::F16)?)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        assert_eq!(clipped, [65504.0, -65504.0, 1.5, -65504.0]);
        let f32_values = clip_f16(xs)?.to_vec1::<f32>()?;
        assert!(f32_values[0].is_infinite());
        Ok(())
    }
}
