//! diffusers' `UNet2DConditionModel` for SD 1.x/2.x, every size taken from `unet/config.json`.

use std::path::Path;

use candle_core::{Module, Tensor, D};
use candle_nn::VarBuilder;

use super::blocks::{computing, layer_norm, linear, Biased, LayerNorm, Linear};
use serde::Deserialize;

use super::attention::Attention;
use super::blocks::{
    conv, group_norm, timestep_features, Conv2d, Downsample2D, GroupNorm, PerBlock, ResnetBlock2D,
    ResnetConfig, Upsample2D,
};
use super::quantized::{BlockLinear, WeightFormat};
use crate::engine::error::{EngineError, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    /// Latent side the model was trained at (64 for SD1.5 -> 512 px).
    #[serde(default)]
    pub sample_size: Option<usize>,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "mid_block_default")]
    pub mid_block_type: Option<String>,
    #[serde(default = "two")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "eight")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "one")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "one_usize")]
    pub downsample_padding: usize,
    #[serde(default = "one_f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// SDXL's micro-conditioning: each of the six time ids becomes a sinusoidal feature of this size.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input size of `add_embedding` (pooled text embedding + 6 × addition_time_embed_dim).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub only_cross_attention: PerBlockBool,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    #[serde(default = "one_f64")]
    pub resnet_out_scale_factor: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlockBool {
    One(bool),
    Each(Vec<bool>),
}

impl Default for PerBlockBool {
    fn default() -> Self {
        Self::One(false)
    }
}

fn four() -> usize {
    4
}
fn two() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn one() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn eight() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn one_usize() -> usize {
    1
}
fn three() -> usize {
    3
}
fn thirty_two() -> usize {
    32
}
fn eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn one_f64() -> f64 {
    1.0
}
fn silu() -> String {
    "silu".into()
}
fn default_shift() -> String {
    "default".into()
}
fn positional() -> String {
    "positional".into()
}
fn mid_block_default() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

impl UNetConfig {
    /// Reject what this UNet does not implement, naming the config key.
    fn check(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| {
            Err(EngineError::BadConfig {
                path: path.to_path_buf(),
                reason,
            })
        };
        let unsupported = |reason: String| {
            Err(EngineError::Unsupported(format!(
                "{}: {reason}",
                path.display()
            )))
        };
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(format!(
                "block_out_channels ({n}), down_block_types ({}) and up_block_types ({}) must have the same non-zero length",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for ch in &self.block_out_channels {
            if self.norm_num_groups == 0 || ch % self.norm_num_groups != 0 {
                return bad(format!(
                    "block_out_channels {ch} is not divisible by norm_num_groups {}",
                    self.norm_num_groups
                ));
            }
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return unsupported(format!("down_block_types entry `{t}`"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return unsupported(format!("up_block_types entry `{t}`"));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => return unsupported(format!("mid_block_type {other:?}")),
        }
        if self.class_embed_type.is_some() {
            return unsupported("class_embed_type (upscaler/unCLIP UNets)".into());
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time")
                if (self.addition_time_embed_dim.is_none()
                    || self.projection_class_embeddings_input_dim.is_none()) =>
            {
                return bad("addition_embed_type `text_time` needs addition_time_embed_dim and projection_class_embeddings_input_dim".into());
            }
            Some("text_time") => {}
            Some(other) => return unsupported(format!("addition_embed_type `{other}`")),
        }
        if self.time_cond_proj_dim.is_some() {
            return unsupported("time_cond_proj_dim (LCM guidance embedding)".into());
        }
        if self.dual_cross_attention || matches!(self.only_cross_attention, PerBlockBool::One(true))
        {
            return unsupported("dual_cross_attention / only_cross_attention".into());
        }
        if let PerBlockBool::Each(v) = &self.only_cross_attention {
            if v.iter().any(|b| *b) {
                return unsupported("only_cross_attention".into());
            }
        }
        if self.resnet_time_scale_shift != "default"
            || self.time_embedding_type != "positional"
            || self.act_fn != "silu"
        {
            return unsupported(format!(
                "resnet_time_scale_shift `{}` / time_embedding_type `{}` / act_fn `{}`",
                self.resnet_time_scale_shift, self.time_embedding_type, self.act_fn
            ));
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return bad("conv_in_kernel/conv_out_kernel must be odd".into());
        }
        Ok(())
    }
}

/// Per-block numbers resolved from the config (diffusers' quirk: `attention_head_dim` is really
/// the number of heads when `num_attention_heads` is unset).
struct Resolved {
    heads: Vec<usize>,
    layers: Vec<usize>,
    transformer_layers: Vec<usize>,
    cross_dims: Vec<usize>,
}

fn resolve(c: &UNetConfig, path: &Path) -> Result<Resolved> {
    let n = c.block_out_channels.len();
    let bad = |key: &str| EngineError::BadConfig {
        path: path.to_path_buf(),
        reason: format!("`{key}` must be a number or a list with one entry per block ({n})"),
    };
    let heads = c
        .num_attention_heads
        .as_ref()
        .unwrap_or(&c.attention_head_dim);
    let r = Resolved {
        heads: heads.expand(n).ok_or_else(|| bad("attention_head_dim"))?,
        layers: c
            .layers_per_block
            .expand(n)
            .ok_or_else(|| bad("layers_per_block"))?,
        transformer_layers: c
            .transformer_layers_per_block
            .expand(n)
            .ok_or_else(|| bad("transformer_layers_per_block"))?,
        cross_dims: c
            .cross_attention_dim
            .expand(n)
            .ok_or_else(|| bad("cross_attention_dim"))?,
    };
    for (ch, h) in c.block_out_channels.iter().zip(&r.heads) {
        if *h == 0 || ch % h != 0 {
            return Err(EngineError::BadConfig {
                path: path.to_path_buf(),
                reason: format!("{ch} channels cannot be split into {h} attention heads"),
            });
        }
    }
    Ok(r)
}

/// Whether tensor `name` of a UNet's file is the weight of one of its transformer blocks' Linear
/// layers (attention and feed-forward): those `--quantize` holds in its format (the memory
/// planner's rule; the model builds them with [`BlockLinear`]).
pub fn quantizes(name: &str) -> bool {
    const LAYERS: [&str; 4] = [".attn1.to_", ".attn2.to_", ".ff.net.0.proj.", ".ff.net.2."];
    name.contains(".transformer_blocks.")
        && name.ends_with(".weight")
        && LAYERS.iter().any(|layer| name.contains(layer))
}

struct FeedForward {
    proj: BlockLinear,
    out: BlockLinear,
}

impl FeedForward {
    /// The output, its last bias left to the residual add that takes it ([`Biased::add_to`]).
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Biased> {
        crate::engine::profile::scope("FeedForward", xs, || {
            // GEGLU: the projection's first half is the value, the second half its (exact-gelu)
            // gate; on CUDA the projection's bias is added on the way.
            let h = self.proj.forward_deferring_bias(xs)?;
            #[cfg(feature = "cuda")]
            if crate::engine::cuda::elementwise::supports(&h.product) {
                let gated = crate::engine::cuda::elementwise::geglu(&h.product, h.bias.as_ref())?;
                return self.out.forward_deferring_bias(&gated);
            }
            let h = h.resolve()?;
            let gated = if super::cpu_util::is_cpu_f32(&h) {
                super::cpu_activation::geglu(&h)?
            } else {
                let half = h.dim(D::Minus1)? / 2;
                let value = h.narrow(D::Minus1, 0, half)?;
                let gate = h.narrow(D::Minus1, half, half)?;
                (value * gate.gelu_erf()?)?
            };
            self.out.forward_deferring_bias(&gated)
        })
    }
}

struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(
        vb: VarBuilder,
        (dim, heads, context_dim): (usize, usize, usize),
        upcast: bool,
        format: WeightFormat,
    ) -> candle_core::Result<Self> {
        let head_dim = dim / heads;
        let inner_ff = dim * 4;
        let attention = |name: &str, context_dim: usize| {
            Attention::new(
                vb.pp(name),
                (dim, context_dim),
                (heads, head_dim),
                upcast,
                format,
            )
        };
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, computing(vb.pp("norm1")))?,
            attn1: attention("attn1", dim)?,
            norm2: layer_norm(dim, 1e-5, computing(vb.pp("norm2")))?,
            attn2: attention("attn2", context_dim)?,
            norm3: layer_norm(dim, 1e-5, computing(vb.pp("norm3")))?,
            ff: FeedForward {
                proj: BlockLinear::new(dim, inner_ff * 2, vb.pp("ff.net.0.proj"), format)?,
                out: BlockLinear::new(inner_ff, dim, vb.pp("ff.net.2"), format)?,
            },
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        crate::engine::profile::scope("BasicTransformerBlock", xs, || {
            // Each residual joins its Linear's output in the pass that adds the bias (CUDA).
            let xs = self
                .attn1
                .forward_deferring_bias(&self.norm1.forward(xs)?, None)?
                .add_to(xs)?;
            let xs = self
                .attn2
                .forward_deferring_bias(&self.norm2.forward(&xs)?, Some(context))?
                .add_to(&xs)?;
            self.ff.forward(&self.norm3.forward(&xs)?)?.add_to(&xs)
        })
    }
}

enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    /// The weight (Co, Ci) and bias: both kinds are the same per-position product.
    fn as_pointwise(&self) -> Option<(Tensor, Option<&Tensor>)> {
        match self {
            Self::Conv(c) => c.as_pointwise(),
            Self::Linear(l) => Some((l.dense_weight().ok()?, l.bias())),
        }
    }

    /// The module diffusers has here (profiled under its name).
    fn label(&self) -> &'static str {
        match self {
            Self::Conv(_) => "Conv2d",
            Self::Linear(_) => "Linear",
        }
    }

    /// The product of a feature map (B, C, H, W) as tokens (B, H·W, C'). On the CPU in f32 the
    /// product reads the map as tokens through its strides; candle's permute before or after was
    /// a single-threaded strided copy.
    fn to_tokens(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        use super::cpu_pointwise::{pointwise, Layout};
        if let Some((w, b)) = self.cpu_pointwise(xs) {
            let xs = xs.flatten_from(2)?;
            return crate::engine::profile::scope(self.label(), &xs, || {
                pointwise(&xs, Layout::ChannelsFirst, &w, b, None, Layout::TokenMajor)
            });
        }
        let (b, ch, h, w) = xs.dims4()?;
        let tokens = |t: Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch));
        match self {
            Self::Conv(c) => tokens(c.forward(xs)?),
            Self::Linear(l) => l.forward(&tokens(xs.clone())?),
        }
    }

    /// `residual` (B, C, H, W) plus the product of `tokens` as a feature map: on the CPU written
    /// onto the residual straight from the tokens.
    fn to_image_onto(&self, tokens: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        use super::cpu_pointwise::{pointwise, Layout};
        let (b, ch, h, w) = residual.dims4()?;
        if let Some((wt, bias)) = self.cpu_pointwise(tokens) {
            let residual = residual.flatten_from(2)?;
            let out = crate::engine::profile::scope(self.label(), tokens, || {
                let (tm, cf) = (Layout::TokenMajor, Layout::ChannelsFirst);
                pointwise(tokens, tm, &wt, bias, Some(&residual), cf)
            })?;
            return out.reshape((b, ch, h, w));
        }
        let image = |t: &Tensor| {
            t.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        let out = match self {
            Self::Conv(c) => c.forward(&image(tokens)?)?,
            Self::Linear(l) => image(&l.forward(tokens)?)?,
        };
        Biased::done(out).add_to(residual)
    }

    /// The weight and bias when the CPU product takes `xs`.
    fn cpu_pointwise(&self, xs: &Tensor) -> Option<(Tensor, Option<&Tensor>)> {
        super::cpu_util::is_cpu_f32(xs)
            .then(|| self.as_pointwise())
            .flatten()
    }
}

/// diffusers' `Transformer2DModel` on continuous (image) input.
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    /// `block`: the (heads, layers, context width) of its level.
    fn new(
        vb: VarBuilder,
        channels: usize,
        (heads, layers, context_dim): (usize, usize, usize),
        c: &UNetConfig,
        format: WeightFormat,
    ) -> candle_core::Result<Self> {
        let (proj_in, proj_out) = if c.use_linear_projection {
            (
                Projection::Linear(linear(channels, channels, vb.pp("proj_in"))?),
                Projection::Linear(linear(channels, channels, vb.pp("proj_out"))?),
            )
        } else {
            (
                Projection::Conv(conv(vb.pp("proj_in"), channels, channels, 1, 1, 0)?),
                Projection::Conv(conv(vb.pp("proj_out"), channels, channels, 1, 1, 0)?),
            )
        };
        let blocks = (0..layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    (channels, heads, context_dim),
                    c.upcast_attention,
                    format,
                )
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            norm: group_norm(c.norm_num_groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        crate::engine::profile::scope("Transformer2DModel", xs, || {
            let mut tokens = self.proj_in.to_tokens(&self.norm.forward(xs)?)?;
            for block in &self.blocks {
                tokens = block.forward(&tokens, context)?;
            }
            self.proj_out.to_image_onto(&tokens, xs)
        })
    }
}

struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Downsample2D>,
}

struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Upsample2D>,
}

struct MidBlock {
    resnet_in: ResnetBlock2D,
    attention: Transformer2D,
    resnet_out: ResnetBlock2D,
}

pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    /// SDXL's `add_embedding` (text_time): pooled text + time-id features → time embedding.
    add_embedding: Option<(Linear, Linear)>,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    pub config: UNetConfig,
}

impl UNet2DConditionModel {
    /// The transformer blocks' Linear layers held in `format` (`--quantize`); the rest as read.
    pub fn new(
        vb: VarBuilder,
        config: UNetConfig,
        config_path: &Path,
        format: WeightFormat,
    ) -> Result<Self> {
        config.check(config_path)?;
        let r = resolve(&config, config_path)?;
        let c = &config;
        // The transformer of level `i`'s blocks.
        let transformer = |vb: VarBuilder, channels: usize, i: usize| {
            let block = (r.heads[i], r.transformer_layers[i], r.cross_dims[i]);
            Transformer2D::new(vb, channels, block, c, format)
        };
        let n = c.block_out_channels.len();
        let ch0 = c.block_out_channels[0];
        let temb = ch0 * 4;
        let resnet = |temb: Option<usize>, scale: f64| ResnetConfig {
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            temb_channels: temb,
            output_scale_factor: scale,
        };
        let block_resnet = resnet(Some(temb), c.resnet_out_scale_factor);

        let conv_in = conv(
            vb.pp("conv_in"),
            c.in_channels,
            ch0,
            c.conv_in_kernel,
            1,
            c.conv_in_kernel / 2,
        )?;
        let time_linear_1 = linear(ch0, temb, vb.pp("time_embedding.linear_1"))?;
        let time_linear_2 = linear(temb, temb, vb.pp("time_embedding.linear_2"))?;
        let add_embedding = match c.projection_class_embeddings_input_dim {
            Some(input) if c.addition_embed_type.as_deref() == Some("text_time") => Some((
                linear(input, temb, vb.pp("add_embedding.linear_1"))?,
                linear(temb, temb, vb.pp("add_embedding.linear_2"))?,
            )),
            _ => None,
        };

        let mut down = Vec::with_capacity(n);
        let mut out_ch = ch0;
        for i in 0..n {
            let in_ch = out_ch;
            out_ch = c.block_out_channels[i];
            let vb = vb.pp(format!("down_blocks.{i}"));
            let cross = c.down_block_types[i] == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..r.layers[i] {
                let cin = if j == 0 { in_ch } else { out_ch };
                resnets.push(ResnetBlock2D::new(
                    vb.pp(format!("resnets.{j}")),
                    cin,
                    out_ch,
                    &block_resnet,
                )?);
                if cross {
                    attentions.push(transformer(vb.pp(format!("attentions.{j}")), out_ch, i)?);
                }
            }
            let downsample = if i + 1 < n {
                Some(Downsample2D::new(
                    vb.pp("downsamplers.0"),
                    out_ch,
                    c.downsample_padding,
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                downsample,
            });
        }

        let last = c.block_out_channels[n - 1];
        let mid_vb = vb.pp("mid_block");
        let mid_resnet = resnet(Some(temb), c.mid_block_scale_factor);
        let mid = MidBlock {
            resnet_in: ResnetBlock2D::new(mid_vb.pp("resnets.0"), last, last, &mid_resnet)?,
            attention: transformer(mid_vb.pp("attentions.0"), last, n - 1)?,
            resnet_out: ResnetBlock2D::new(mid_vb.pp("resnets.1"), last, last, &mid_resnet)?,
        };

        let rev_ch: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut out_ch = rev_ch[0];
        for i in 0..n {
            let prev_out = out_ch;
            out_ch = rev_ch[i];
            let in_ch = rev_ch[(i + 1).min(n - 1)];
            let bi = n - 1 - i; // the matching down block, for per-block settings
            let vb = vb.pp(format!("up_blocks.{i}"));
            let cross = c.up_block_types[i] == "CrossAttnUpBlock2D";
            let count = r.layers[bi] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..count {
                let skip = if j == count - 1 { in_ch } else { out_ch };
                let cin = if j == 0 { prev_out } else { out_ch };
                resnets.push(ResnetBlock2D::new(
                    vb.pp(format!("resnets.{j}")),
                    cin + skip,
                    out_ch,
                    &block_resnet,
                )?);
                if cross {
                    attentions.push(transformer(vb.pp(format!("attentions.{j}")), out_ch, bi)?);
                }
            }
            let upsample = if i + 1 < n {
                Some(Upsample2D::new(vb.pp("upsamplers.0"), out_ch)?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                upsample,
            });
        }

        Ok(Self {
            conv_in,
            time_linear_1,
            time_linear_2,
            add_embedding,
            down,
            mid,
            up,
            conv_norm_out: group_norm(c.norm_num_groups, ch0, c.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv(
                vb.pp("conv_out"),
                ch0,
                c.out_channels,
                c.conv_out_kernel,
                1,
                c.conv_out_kernel / 2,
            )?,
            config,
        })
    }

    /// Bytes the transformer blocks' Linear layers (those [`quantizes`] names) hold, biases
    /// included.
    pub fn transformer_layer_bytes(&self) -> usize {
        let transformers = (self.down.iter().flat_map(|b| &b.attentions))
            .chain(std::iter::once(&self.mid.attention))
            .chain(self.up.iter().flat_map(|b| &b.attentions));
        transformers
            .flat_map(|t| &t.blocks)
            .map(|b| {
                b.attn1.layer_bytes() + b.attn2.layer_bytes() + b.ff.proj.bytes() + b.ff.out.bytes()
            })
            .sum()
    }

    /// `sample`: (B, C, H, W) latents; `timestep`: one value for the whole batch;
    /// `context`: (B, tokens, cross_attention_dim) text embeddings.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f32,
        context: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.forward_with(sample, timestep, context, None)
    }

    /// As [`Self::forward`], with SDXL's added conditioning: `text_embeds` (B, P) and the time
    /// ids, row-major (B × 5 or 6), kept on the host: they are fixed for the run, and reading
    /// them back from the device every step would be a sync per step.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: f32,
        context: &Tensor,
        added: Option<(&Tensor, &[f32])>,
    ) -> candle_core::Result<Tensor> {
        let t = self.timestep_input(timestep, sample)?;
        self.forward_from_timestep_input(sample, &t, context, added)
    }

    /// The timestep's sinusoidal features (B, first block's channels) for `sample`'s batch, the
    /// time embedding's input. Made on the host: apart from the forward, so that a CUDA graph of
    /// the forward takes them as an input instead of freezing one step's values.
    pub fn timestep_input(&self, timestep: f32, sample: &Tensor) -> candle_core::Result<Tensor> {
        self.sinusoid(
            &vec![timestep; sample.dim(0)?],
            self.config.block_out_channels[0],
            sample,
        )
    }

    fn sinusoid(&self, t: &[f32], dim: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        timestep_features(
            t,
            dim,
            self.config.flip_sin_to_cos,
            self.config.freq_shift as f32,
            sample.dtype(),
            sample.device(),
        )
    }

    /// [`Self::forward_with`] from the timestep's features ([`Self::timestep_input`]).
    pub fn forward_from_timestep_input(
        &self,
        sample: &Tensor,
        t: &Tensor,
        context: &Tensor,
        added: Option<(&Tensor, &[f32])>,
    ) -> candle_core::Result<Tensor> {
        let b = sample.dim(0)?;
        let mut xs = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let mut emb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(t)?.silu()?)?;
        match (&self.add_embedding, added) {
            (Some((l1, l2)), Some((text_embeds, time_ids))) => {
                let dim = self.config.addition_time_embed_dim.unwrap_or(256);
                let time_embeds = self.sinusoid(time_ids, dim, sample)?.reshape((b, ()))?;
                let add = Tensor::cat(&[&text_embeds.to_dtype(sample.dtype())?, &time_embeds], 1)?;
                emb = (emb + l2.forward(&l1.forward(&add)?.silu()?)?)?;
            }
            (Some(_), None) => {
                return Err(candle_core::Error::Msg(
                    "this UNet needs SDXL's added conditioning (text_embeds, time_ids)".into(),
                ))
            }
            (None, _) => {}
        }

        xs = self.conv_in.forward(&xs)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            for (k, resnet) in block.resnets.iter().enumerate() {
                xs = resnet.forward(&xs, Some(&emb))?;
                if let Some(attn) = block.attentions.get(k) {
                    xs = attn.forward(&xs, context)?;
                }
                skips.push(xs.clone());
            }
            if let Some(d) = &block.downsample {
                xs = d.forward(&xs)?;
                skips.push(xs.clone());
            }
        }

        xs = self.mid.resnet_in.forward(&xs, Some(&emb))?;
        xs = self.mid.attention.forward(&xs, context)?;
        xs = self.mid.resnet_out.forward(&xs, Some(&emb))?;

        for block in &self.up {
            for (k, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    candle_core::Error::Msg("UNet skip connections exhausted".into())
                })?;
                xs = Tensor::cat(&[&xs, &skip], 1)?;
                xs = resnet.forward(&xs, Some(&emb))?;
                if let Some(attn) = block.attentions.get(k) {
                    xs = attn.forward(&xs, context)?;
                }
            }
            if let Some(u) = &block.upsample {
                // Upsample to the next skip's size so odd latent sizes line up (diffusers' upsample_size).
                let size = match skips.last() {
                    Some(s) => {
                        let (_, _, h, w) = s.dims4()?;
                        Some((h, w))
                    }
                    None => None,
                };
                xs = u.forward(&xs, size)?;
            }
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::loader::ModelDir;
    use crate::engine::memory::Footprint;
    use crate::engine::pipelines::LoadOptions;
    use candle_core::{DType, Device};

    /// `--quantize` on a UNet holds its transformer blocks' layers as the memory planner counts
    /// them: what a format saves against the dense model is, byte for byte, what the planner's
    /// figure drops by — a layer the model quantizes and [`quantizes`] does not name (or the
    /// reverse) would show. The tiny models' rows take the fallbacks (q4k → q5_0, q6k → q8_0);
    /// SDXL's cross-attention reads 48-wide rows, which stay dense.
    #[test]
    fn quantized_transformer_blocks_hold_what_the_planner_counts() {
        for model in ["sd1-tiny", "sdxl-tiny"] {
            let dir = ModelDir {
                root: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/models")
                    .join(model),
                prefer_fp16_variant: false,
            };
            let build = |format: &str| {
                let config_path = dir.file("unet/config.json");
                let config = crate::engine::loader::read_json(&config_path).unwrap();
                let weights = dir.file("unet/diffusion_pytorch_model.safetensors");
                let vb = unsafe {
                    candle_nn::VarBuilder::from_mmaped_safetensors(
                        &[weights],
                        DType::F32,
                        &Device::Cpu,
                    )
                }
                .unwrap();
                let format = format.parse().unwrap();
                let unet = UNet2DConditionModel::new(vb, config, &config_path, format).unwrap();
                let options = LoadOptions {
                    transformer_format: format,
                    ..Default::default()
                };
                let footprint = Footprint::read(&dir, &Device::Cpu, DType::F32, &options).unwrap();
                let planned = footprint.components.iter().find(|(c, _)| c == "unet");
                (
                    unet.transformer_layer_bytes() as i64,
                    planned.unwrap().1 as i64,
                )
            };
            let (dense_held, dense_planned) = build("dense");
            for format in ["q8_0", "q8_0-compact", "q4k", "q6k-compact"] {
                let (held, planned) = build(format);
                assert!(
                    held < dense_held * 45 / 100,
                    "{model} {format}: {held} of {dense_held}"
                );
                assert_eq!(
                    dense_held - held,
                    dense_planned - planned,
                    "{model} {format}: saved as held vs as planned"
                );
            }
        }
    }
}
