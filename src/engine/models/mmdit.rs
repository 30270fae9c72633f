//! SD3's MMDiT and SD3.5-Medium's MMDiT-X, as diffusers' `SD3Transformer2DModel` (its weight
//! names and config): patchified latents with a cropped sin-cos position table, timestep +
//! pooled-text conditioning, joint image/text transformer blocks (dual attention in MMDiT-X,
//! optional per-head RMS norm on queries and keys), and the last block's text stream cut short.

use std::path::Path;

use candle_core::{Module, Tensor};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, VarBuilder};

use super::blocks::{computing, linear, Linear};
use serde::Deserialize;

use super::blocks::timestep_features;
use super::dit::{
    gated_add, ContextOrder, FeedForward, JointAttention, JointAttentionConfig, Modulation,
    PlainLayerNorm, Rope, SiluMlp,
};
use super::quantized::{LayerSource, WeightFormat};
use crate::engine::error::{EngineError, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct Sd3TransformerConfig {
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub caption_projection_dim: usize,
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default)]
    pub pos_embed_max_size: Option<usize>,
    /// MMDiT-X (SD3.5 Medium): blocks with a second, image-only attention.
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    #[serde(default)]
    pub qk_norm: Option<String>,
}

fn default_sample_size() -> usize {
    128
}
fn default_patch_size() -> usize {
    2
}
fn default_channels() -> usize {
    16
}

impl Sd3TransformerConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// The largest latent side (in latents, not patches) the position table covers.
    pub fn max_latent_side(&self) -> usize {
        self.pos_embed_max_size.unwrap_or(0) * self.patch_size
    }
}

const EPS: f64 = 1e-6;

/// The text stream's norm: modulated like the image's (6 chunks), or, in the last block whose
/// text output is dropped, only scaled and shifted (`AdaLayerNormContinuous`: scale, shift).
enum ContextNorm {
    Zero(Modulation),
    Continuous(Modulation),
}

/// The joint (two-stream) transformer block: SD3's `JointTransformerBlock` and FLUX's
/// `FluxTransformerBlock` (which puts the text first and rotates positions).
pub(crate) struct JointBlock {
    norm1: Modulation,
    norm1_context: ContextNorm,
    attn: JointAttention,
    /// MMDiT-X's image-only attention, modulated by norm1's last three chunks.
    attn2: Option<JointAttention>,
    ff: FeedForward,
    ff_context: Option<FeedForward>,
    norm: PlainLayerNorm,
}

/// A joint block's shape.
pub(crate) struct JointBlockConfig<'a> {
    pub dim: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub qk_norm: bool,
    /// The last MMDiT block: its text stream output is dropped.
    pub context_pre_only: bool,
    /// MMDiT-X: a second, image-only attention.
    pub dual: bool,
    pub layers: LayerSource<'a>,
}

impl JointBlock {
    /// Bytes its Linear layers hold (as the memory planner counts them).
    pub(crate) fn bytes(&self) -> usize {
        let (ContextNorm::Zero(norm) | ContextNorm::Continuous(norm)) = &self.norm1_context;
        self.norm1.bytes()
            + norm.bytes()
            + self.attn.bytes()
            + self.attn2.as_ref().map_or(0, JointAttention::bytes)
            + self.ff.bytes()
            + self.ff_context.as_ref().map_or(0, FeedForward::bytes)
    }

    pub(crate) fn new(vb: VarBuilder, c: &JointBlockConfig) -> candle_core::Result<Self> {
        let (dim, qk_norm, context_pre_only, dual) = (c.dim, c.qk_norm, c.context_pre_only, c.dual);
        let attention = |with_context: bool| JointAttentionConfig {
            dim,
            heads: c.heads,
            head_dim: c.head_dim,
            qk_norm,
            with_context,
            context_out: !context_pre_only,
            image_out: true,
            layers: c.layers,
        };
        Ok(Self {
            norm1: Modulation::new(
                vb.pp("norm1.linear"),
                dim,
                if dual { 9 } else { 6 },
                c.layers,
            )?,
            norm1_context: if context_pre_only {
                ContextNorm::Continuous(Modulation::new(
                    vb.pp("norm1_context.linear"),
                    dim,
                    2,
                    c.layers,
                )?)
            } else {
                ContextNorm::Zero(Modulation::new(
                    vb.pp("norm1_context.linear"),
                    dim,
                    6,
                    c.layers,
                )?)
            },
            attn: JointAttention::new(vb.pp("attn"), &attention(true))?,
            attn2: if dual {
                Some(JointAttention::new(vb.pp("attn2"), &attention(false))?)
            } else {
                None
            },
            ff: FeedForward::new(vb.pp("ff"), dim, 4 * dim, c.layers)?,
            ff_context: if context_pre_only {
                None
            } else {
                Some(FeedForward::new(
                    vb.pp("ff_context"),
                    dim,
                    4 * dim,
                    c.layers,
                )?)
            },
            norm: PlainLayerNorm::new(dim, EPS, &vb)?,
        })
    }

    /// Returns the new (image tokens, text tokens); the text tokens are `None` after the last
    /// block.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        temb: &Tensor,
        order: ContextOrder,
        rope: Option<&Rope>,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        crate::engine::profile::scope("JointTransformerBlock", xs, || {
            let m = self.norm1.forward(temb)?;
            let block_input = xs;
            let attn_in = self.norm.forward_modulated(xs, &m[0], &m[1])?;
            let (context_in, context_mods) = match &self.norm1_context {
                ContextNorm::Zero(norm) => {
                    let c = norm.forward(temb)?;
                    (self.norm.forward_modulated(context, &c[0], &c[1])?, Some(c))
                }
                ContextNorm::Continuous(norm) => {
                    let c = norm.forward(temb)?;
                    (self.norm.forward_modulated(context, &c[1], &c[0])?, None)
                }
            };
            let (attn_out, context_attn_out) =
                self.attn
                    .forward(&attn_in, Some(&context_in), order, rope)?;
            let mut xs = gated_add(xs, &m[2], attn_out)?;
            if let Some(attn2) = &self.attn2 {
                // SD3.5's second attention reads the block's input, normalised anew.
                let attn2_in = self.norm.forward_modulated(block_input, &m[6], &m[7])?;
                let (out2, _) = attn2.forward(&attn2_in, None, order, None)?;
                xs = gated_add(&xs, &m[8], out2)?;
            }
            let ff_in = self.norm.forward_modulated(&xs, &m[3], &m[4])?;
            xs = gated_add(&xs, &m[5], self.ff.forward(&ff_in)?)?;

            let context = match (context_mods, context_attn_out, &self.ff_context) {
                (Some(c), Some(attn), Some(ff)) => {
                    let context = gated_add(context, &c[2], attn)?;
                    let ff_in = self.norm.forward_modulated(&context, &c[3], &c[4])?;
                    Some(gated_add(&context, &c[5], ff.forward(&ff_in)?)?)
                }
                _ => None,
            };
            Ok((xs, context))
        })
    }
}

pub struct Sd3Transformer {
    patch_proj: Conv2d,
    /// (1, max², D) sin-cos table (saved with the weights), cropped to each size.
    pos_embed: Tensor,
    timestep_embedder: SiluMlp,
    text_embedder: SiluMlp,
    context_embedder: Linear,
    blocks: Vec<JointBlock>,
    norm_out: Modulation,
    norm: PlainLayerNorm,
    proj_out: Linear,
    pub config: Sd3TransformerConfig,
}

impl Sd3Transformer {
    /// Bytes the blocks' Linear layers hold (what `--quantize` and GGUF files change).
    pub fn block_layer_bytes(&self) -> usize {
        self.blocks.iter().map(JointBlock::bytes).sum()
    }

    pub fn new(
        vb: VarBuilder,
        config: Sd3TransformerConfig,
        config_path: &Path,
        layers: LayerSource,
    ) -> Result<Self> {
        let bad = |reason: String| EngineError::BadConfig {
            path: config_path.to_path_buf(),
            reason,
        };
        let c = &config;
        if c.caption_projection_dim != c.inner_dim() {
            return Err(bad(format!(
                "caption_projection_dim {} must equal num_attention_heads × attention_head_dim = {}",
                c.caption_projection_dim,
                c.inner_dim()
            )));
        }
        match c.qk_norm.as_deref() {
            None | Some("rms_norm") => {}
            Some(other) => {
                return Err(EngineError::Unsupported(format!(
                    "{}: qk_norm `{other}` (SD3 models use none or rms_norm)",
                    config_path.display()
                )))
            }
        }
        let Some(max) = c.pos_embed_max_size else {
            return Err(EngineError::Unsupported(format!(
                "{}: an SD3 transformer without pos_embed_max_size",
                config_path.display()
            )));
        };
        if let Some(bad_layer) = c.dual_attention_layers.iter().find(|&&l| l >= c.num_layers) {
            return Err(bad(format!(
                "dual_attention_layers names layer {bad_layer} of {}",
                c.num_layers
            )));
        }
        let dim = c.inner_dim();
        let p = c.patch_size;
        let patch_proj = conv2d(
            c.in_channels,
            dim,
            p,
            Conv2dConfig {
                stride: p,
                ..Default::default()
            },
            // Small: read in the compute dtype (f32 on the CPU) whatever the blocks' dtype.
            computing(vb.pp("pos_embed.proj")),
        )?;
        let pos_embed = computing(vb.clone()).get((1, max * max, dim), "pos_embed.pos_embed")?;
        let blocks = (0..c.num_layers)
            .map(|i| {
                JointBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    &JointBlockConfig {
                        dim,
                        heads: c.num_attention_heads,
                        head_dim: c.attention_head_dim,
                        qk_norm: c.qk_norm.is_some(),
                        context_pre_only: i + 1 == c.num_layers,
                        dual: c.dual_attention_layers.contains(&i),
                        layers,
                    },
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            patch_proj,
            pos_embed,
            timestep_embedder: SiluMlp::new(vb.pp("time_text_embed.timestep_embedder"), 256, dim)?,
            text_embedder: SiluMlp::new(
                vb.pp("time_text_embed.text_embedder"),
                c.pooled_projection_dim,
                dim,
            )?,
            context_embedder: linear(
                c.joint_attention_dim,
                c.caption_projection_dim,
                vb.pp("context_embedder"),
            )?,
            blocks,
            norm_out: Modulation::new(
                vb.pp("norm_out.linear"),
                dim,
                2,
                WeightFormat::Dense.into(),
            )?,
            norm: PlainLayerNorm::new(dim, EPS, &vb)?,
            proj_out: linear(dim, p * p * config.out_channels(), vb.pp("proj_out"))?,
            config,
        })
    }

    /// The position table cropped to the centre `h × w` patches, (1, h·w, D).
    fn cropped_pos_embed(&self, h: usize, w: usize) -> candle_core::Result<Tensor> {
        let max = self.config.pos_embed_max_size.unwrap_or(0);
        if h > max || w > max {
            candle_core::bail!("{h}x{w} patches exceed the position table ({max}x{max})");
        }
        let (top, left) = ((max - h) / 2, (max - w) / 2);
        self.pos_embed
            .reshape((1, max, max, ()))?
            .narrow(1, top, h)?
            .narrow(2, left, w)?
            .reshape((1, h * w, ()))
    }

    /// The velocity for `latents` (B, C, H, W) at `timestep` (σ·1000), conditioned on the
    /// joint text states `context` (B, L, joint_attention_dim) and `pooled` (B, P). Blocks listed
    /// in `skip_layers` are left out (Skip Layer Guidance).
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: f32,
        context: &Tensor,
        pooled: &Tensor,
        skip_layers: &[usize],
    ) -> candle_core::Result<Tensor> {
        let t = self.timestep_input(timestep, latents)?;
        self.forward_from_timestep_input(latents, &t, context, pooled, skip_layers)
    }

    /// The timestep's sinusoidal features (B, 256) for `latents`' batch, made on the host apart
    /// from the forward (a CUDA graph of the forward takes them as an input).
    pub fn timestep_input(&self, timestep: f32, latents: &Tensor) -> candle_core::Result<Tensor> {
        timestep_features(
            &vec![timestep; latents.dim(0)?],
            256,
            true,
            0.0,
            latents.dtype(),
            latents.device(),
        )
    }

    /// [`Self::forward`] from the timestep's features ([`Self::timestep_input`]).
    pub fn forward_from_timestep_input(
        &self,
        latents: &Tensor,
        t: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        skip_layers: &[usize],
    ) -> candle_core::Result<Tensor> {
        let (b, _, height, width) = latents.dims4()?;
        let p = self.config.patch_size;
        let (h, w) = (height / p, width / p);
        let dtype = latents.dtype();
        let xs = self
            .patch_proj
            .forward(latents)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let mut xs = xs
            .broadcast_add(&self.cropped_pos_embed(h, w)?.to_dtype(dtype)?)?
            .contiguous()?;
        let temb = (self.timestep_embedder.forward(t)?
            + self.text_embedder.forward(&pooled.to_dtype(dtype)?)?)?;
        let mut context = Some(self.context_embedder.forward(&context.to_dtype(dtype)?)?);
        for (i, block) in self.blocks.iter().enumerate() {
            if skip_layers.contains(&i) {
                continue;
            }
            let Some(ctx) = &context else {
                candle_core::bail!("MMDiT block {i} has no text tokens (a block after the last)");
            };
            let (next, next_context) = block.forward(&xs, ctx, &temb, ContextOrder::After, None)?;
            xs = next;
            context = next_context;
        }
        let m = self.norm_out.forward(&temb)?;
        let xs = self.norm.forward_modulated(&xs, &m[1], &m[0])?;
        let xs = self.proj_out.forward(&xs)?;
        let c = self.config.out_channels();
        xs.reshape((b, h, w, p, p, c))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((b, c, h * p, w * p))
    }
}
