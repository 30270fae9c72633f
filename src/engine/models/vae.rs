//! diffusers' `AutoencoderKL` decoder (latents -> RGB in [-1, 1]), from `vae/config.json`.

use std::path::Path;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{linear, Linear};
use serde::Deserialize;

use super::blocks::{
    conv, group_norm, Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, ResnetConfig, Upsample2D,
};
use crate::engine::error::{EngineError, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "sd_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub force_upcast: bool,
    /// The image size the VAE was trained at: the tile size of tiled decoding.
    #[serde(default)]
    pub sample_size: Option<SampleSize>,
}

/// `sample_size` as diffusers writes it: one side, or (height, width).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(usize),
    Sides(Vec<usize>),
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn sd_scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    /// Pixels per latent along each side (8 for every SD VAE).
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// The side of a decoding tile in pixels (diffusers' `tile_sample_min_size`: the first of
    /// `sample_size`), if the config gives one.
    pub fn tile_pixels(&self) -> Option<usize> {
        match self.sample_size.as_ref()? {
            SampleSize::Square(s) => Some(*s),
            SampleSize::Sides(s) => s.first().copied(),
        }
        .filter(|&s| s >= self.scale_factor())
    }
}

/// diffusers' tile overlap (`tile_overlap_factor`).
const TILE_OVERLAP: f64 = 0.25;

/// `b` with its first `extent` rows (`dim` 2) or columns (`dim` 3) blended from `a`'s last ones:
/// row y becomes `a[-extent + y] · (1 − y/extent) + b[y] · (y/extent)` (diffusers' `blend_v` /
/// `blend_h`, weights rounded to the tensor's dtype as torch does with Python scalars).
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> candle_core::Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let (dtype, device) = (b.dtype(), b.device());
    let mut shape = [1usize; 4];
    shape[dim] = extent;
    let weights = |f: &dyn Fn(f64) -> f64| -> candle_core::Result<Tensor> {
        let values: Vec<f64> = (0..extent).map(|y| f(y as f64 / extent as f64)).collect();
        Tensor::from_vec(values, shape.to_vec(), device)?.to_dtype(dtype)
    };
    let from_a = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let head = (from_a.broadcast_mul(&weights(&|w| 1.0 - w)?)?
        + b.narrow(dim, 0, extent)?.broadcast_mul(&weights(&|w| w)?)?)?;
    Tensor::cat(&[&head, &b.narrow(dim, extent, b.dim(dim)? - extent)?], dim)
}

/// Single-head self-attention over pixels with its own group norm (the VAE mid block).
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn new(vb: VarBuilder, ch: usize, groups: usize) -> candle_core::Result<Self> {
        // Old checkpoints name the projections query/key/value/proj_attn; diffusers renames on load.
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        Ok(Self {
            group_norm: group_norm(groups, ch, 1e-6, vb.pp("group_norm"))?,
            to_q: linear(ch, ch, vb.pp(name("to_q", "query")))?,
            to_k: linear(ch, ch, vb.pp(name("to_k", "key")))?,
            to_v: linear(ch, ch, vb.pp(name("to_v", "value")))?,
            to_out: linear(ch, ch, vb.pp(name("to_out.0", "proj_attn")))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        crate::engine::profile::scope("Attention", xs, || {
            let (b, c, h, w) = xs.dims4()?;
            let tokens = self
                .group_norm
                .forward(xs)?
                .reshape((b, c, h * w))?
                .transpose(1, 2)?
                .contiguous()?;
            let q = self.to_q.forward(&tokens)?.unsqueeze(1)?;
            let k = self.to_k.forward(&tokens)?.unsqueeze(1)?;
            let v = self.to_v.forward(&tokens)?.unsqueeze(1)?;
            let out = super::attention::scaled_dot_product(&q, &k, &v, None, true)?.squeeze(1)?;
            let out = self.to_out.forward(&out)?;
            let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
            out + xs
        })
    }
}

struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsample: Option<Upsample2D>,
}

/// resnet → (single-head attention) → resnet at the lowest resolution, shared by encoder and
/// decoder.
struct VaeMidBlock {
    resnet_in: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet_out: ResnetBlock2D,
}

impl VaeMidBlock {
    fn new(
        vb: VarBuilder,
        ch: usize,
        c: &VaeConfig,
        rc: &ResnetConfig,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            resnet_in: ResnetBlock2D::new(vb.pp("resnets.0"), ch, ch, rc)?,
            attention: if c.mid_block_add_attention {
                Some(VaeAttention::new(
                    vb.pp("attentions.0"),
                    ch,
                    c.norm_num_groups,
                )?)
            } else {
                None
            },
            resnet_out: ResnetBlock2D::new(vb.pp("resnets.1"), ch, ch, rc)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.resnet_in.forward(xs, None)?;
        if let Some(a) = &self.attention {
            xs = a.forward(&xs)?;
        }
        self.resnet_out.forward(&xs, None)
    }
}

/// Checks shared by encoder and decoder configs.
fn check_channels(c: &VaeConfig, config_path: &Path) -> Result<ResnetConfig> {
    let n = c.block_out_channels.len();
    if n == 0
        || c.block_out_channels
            .iter()
            .any(|ch| c.norm_num_groups == 0 || ch % c.norm_num_groups != 0)
    {
        return Err(EngineError::BadConfig {
            path: config_path.to_path_buf(),
            reason: format!(
                "block_out_channels {:?} must be non-empty and divisible by norm_num_groups {}",
                c.block_out_channels, c.norm_num_groups
            ),
        });
    }
    Ok(ResnetConfig {
        groups: c.norm_num_groups,
        eps: 1e-6,
        temb_channels: None,
        output_scale_factor: 1.0,
    })
}

struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsample: Option<Downsample2D>,
}

/// The VAE encoder (`vae.encode(x).latent_dist`), for image-to-image and inpainting.
pub struct VaeEncoder {
    conv_in: Conv2d,
    down: Vec<DownEncoderBlock>,
    mid: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    pub config: VaeConfig,
}

impl VaeEncoder {
    pub fn new(vb: VarBuilder, config: VaeConfig, config_path: &Path) -> Result<Self> {
        let c = &config;
        let rc = check_channels(c, config_path)?;
        let n = c.block_out_channels.len();
        let quant_conv = if c.use_quant_conv {
            let ch = 2 * c.latent_channels;
            Some(conv(vb.pp("quant_conv"), ch, ch, 1, 1, 0)?)
        } else {
            None
        };
        let vb = vb.pp("encoder");
        let ch0 = c.block_out_channels[0];
        let conv_in = conv(vb.pp("conv_in"), c.in_channels, ch0, 3, 1, 1)?;
        let mut down = Vec::with_capacity(n);
        let mut out_ch = ch0;
        for i in 0..n {
            let in_ch = out_ch;
            out_ch = c.block_out_channels[i];
            let vb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(
                        vb.pp(format!("resnets.{j}")),
                        if j == 0 { in_ch } else { out_ch },
                        out_ch,
                        &rc,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let downsample = if i + 1 < n {
                Some(Downsample2D::new(vb.pp("downsamplers.0"), out_ch, 0)?)
            } else {
                None
            };
            down.push(DownEncoderBlock {
                resnets,
                downsample,
            });
        }
        let top = c.block_out_channels[n - 1];
        Ok(Self {
            conv_in,
            down,
            mid: VaeMidBlock::new(vb.pp("mid_block"), top, c, &rc)?,
            conv_norm_out: group_norm(c.norm_num_groups, top, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv(vb.pp("conv_out"), top, 2 * c.latent_channels, 3, 1, 1)?,
            quant_conv,
            config,
        })
    }

    /// The latent distribution's (mean, std) for images in [-1, 1], (B, 3, H, W).
    pub fn encode(&self, xs: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        self.distribution(&self.moments(xs)?)
    }

    /// diffusers' tiled encode (`_tiled_encode` under `enable_tiling()`): images larger than one
    /// tile are encoded in tiles of `sample_size` pixels every 3/4 tile and the moments blended
    /// as in [`VaeDecoder::decode_tiled`]; smaller ones whole.
    pub fn encode_tiled(&self, xs: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (_, _, h, w) = xs.dims4()?;
        let Some(tile) = self.config.tile_pixels().filter(|&t| h > t || w > t) else {
            return self.encode(xs);
        };
        let tile_latents = tile / self.config.scale_factor();
        let extent = (tile_latents as f64 * TILE_OVERLAP) as usize;
        let stride = (tile as f64 * (1.0 - TILE_OVERLAP)) as usize;
        let moments = run_tiled(xs, tile, stride, extent, tile_latents - extent, |t| {
            self.moments(t)
        })?;
        self.distribution(&moments)
    }

    /// The encoder's output: mean and log-variance channels (after `quant_conv`).
    fn moments(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for block in &self.down {
            for r in &block.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(d) = &block.downsample {
                xs = d.forward(&xs)?;
            }
        }
        xs = self.mid.forward(&xs)?;
        xs = self
            .conv_out
            .forward(&self.conv_norm_out.forward_silu(&xs)?)?;
        if let Some(q) = &self.quant_conv {
            xs = q.forward(&xs)?;
        }
        Ok(xs)
    }

    /// diffusers' `DiagonalGaussianDistribution`: (mean, std) of the moments.
    fn distribution(&self, xs: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let latent = self.config.latent_channels;
        let mean = xs.narrow(1, 0, latent)?;
        let logvar = xs.narrow(1, latent, latent)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok((mean, std))
    }
}

pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: VaeMidBlock,
    up: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    pub config: VaeConfig,
}

impl VaeDecoder {
    pub fn new(vb: VarBuilder, config: VaeConfig, config_path: &Path) -> Result<Self> {
        let c = &config;
        let rc = check_channels(c, config_path)?;
        let n = c.block_out_channels.len();
        if let Some(t) = c
            .up_block_types
            .iter()
            .find(|t| t.as_str() != "UpDecoderBlock2D")
        {
            return Err(EngineError::Unsupported(format!(
                "{}: up_block_types entry `{t}`",
                config_path.display()
            )));
        }
        let post_quant_conv = if c.use_post_quant_conv {
            Some(conv(
                vb.pp("post_quant_conv"),
                c.latent_channels,
                c.latent_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let vb = vb.pp("decoder");
        let top = c.block_out_channels[n - 1];
        let conv_in = conv(vb.pp("conv_in"), c.latent_channels, top, 3, 1, 1)?;
        let mid = VaeMidBlock::new(vb.pp("mid_block"), top, c, &rc)?;
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut out_ch = rev[0];
        let mut up = Vec::with_capacity(n);
        for (i, &channels) in rev.iter().enumerate() {
            let prev = out_ch;
            out_ch = channels;
            let vb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock2D::new(
                        vb.pp(format!("resnets.{j}")),
                        if j == 0 { prev } else { out_ch },
                        out_ch,
                        &rc,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsample = if i + 1 < n {
                Some(Upsample2D::new(vb.pp("upsamplers.0"), out_ch)?)
            } else {
                None
            };
            up.push(UpDecoderBlock { resnets, upsample });
        }
        let ch0 = c.block_out_channels[0];
        Ok(Self {
            post_quant_conv,
            conv_in,
            mid,
            up,
            conv_norm_out: group_norm(c.norm_num_groups, ch0, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv(vb.pp("conv_out"), ch0, c.out_channels, 3, 1, 1)?,
            config,
        })
    }

    /// `vae.decode(z).sample`: z is already divided by the scaling factor.
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        xs = self.conv_in.forward(&xs)?;
        xs = self.mid.forward(&xs)?;
        for block in &self.up {
            for r in &block.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(u) = &block.upsample {
                xs = u.forward(&xs, None)?;
            }
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }

    /// diffusers' `tiled_decode` (`AutoencoderKL.enable_tiling()`): latents larger than one tile
    /// are decoded in tiles of `sample_size` pixels every 3/4 tile, each tile's top and left
    /// quarter blended with its neighbours' decoded overlap, the blended tiles cropped to 3/4 and
    /// joined. Memory is that of one tile whatever the image size; the result differs from a whole
    /// decode at the seams, exactly as diffusers' does. Smaller latents decode whole.
    pub fn decode_tiled(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let Some(tile) = self.config.tile_pixels() else {
            return self.decode(z);
        };
        let tile_latents = tile / self.config.scale_factor();
        let (_, _, h, w) = z.dims4()?;
        if h <= tile_latents && w <= tile_latents {
            return self.decode(z);
        }
        let stride = (tile_latents as f64 * (1.0 - TILE_OVERLAP)) as usize;
        let extent = (tile as f64 * TILE_OVERLAP) as usize;
        run_tiled(z, tile_latents, stride, extent, tile - extent, |t| {
            self.decode(t)
        })
    }
}

/// diffusers' tiling (`tiled_decode` / `_tiled_encode`): `xs` cut into `tile`-sided tiles every
/// `stride` (the last ones shorter), each mapped by `f`; each output blended over `extent` with
/// its upper then left neighbour, as already blended (diffusers blends in place, in row order),
/// cropped to `keep` and joined.
fn run_tiled(
    xs: &Tensor,
    tile: usize,
    stride: usize,
    extent: usize,
    keep: usize,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..h).step_by(stride.max(1)) {
        let mut row = Vec::new();
        for j in (0..w).step_by(stride.max(1)) {
            let part = xs
                .narrow(2, i, tile.min(h - i))?
                .narrow(3, j, tile.min(w - j))?;
            row.push(f(&part)?);
        }
        rows.push(row);
    }
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            let mut t = rows[i][j].clone();
            if i > 0 {
                t = blend(&rows[i - 1][j], &t, extent, 2)?;
            }
            if j > 0 {
                t = blend(&rows[i][j - 1], &t, extent, 3)?;
            }
            rows[i][j] = t;
        }
    }
    let joined = rows
        .iter()
        .map(|row| {
            let cropped = row
                .iter()
                .map(|t| {
                    t.narrow(2, 0, keep.min(t.dim(2)?))?
                        .narrow(3, 0, keep.min(t.dim(3)?))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&cropped, 3)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&joined, 2)
}
