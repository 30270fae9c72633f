//! Memory estimates the scheduler plans with: resident weights per component (exact, from the
//! safetensors headers at the load dtype) and working memory per job (a per-architecture model).
//!
//! SD 1.x/2.x working memory, per denoising step with `r` = batch rows (×2 with classifier-free
//! guidance), `T` = latent tokens = (H/8)·(W/8), `s` = bytes per element:
//! * attention without a fused kernel materialises the first block's scores and softmax:
//!   `2 · r · heads · T² · s` — the dominant term (SD 1.5, 512², CFG, f16: 1.07 GB);
//! * feature maps kept for the skip connections and the ResNet temporaries, counted as
//!   24 tensors of the first block's size: `24 · r · T · C₀ · s`.
//!
//! VAE decoding (one image at a time) needs `4 · C_max · H · W · s` for the full-resolution
//! feature maps plus `2 · T² · s` for the single-head mid-block attention. The job needs the
//! larger of the two phases. These coefficients are an upper-bound model, to be calibrated
//! against measured peak device memory on a GPU (`candela bench` reports both).

use candle_core::DType;

use crate::engine::error::Result;
use crate::engine::loader::{weights::SafetensorsFile, ModelDir};
use crate::engine::models::{unet::UNetConfig, vae::VaeConfig};

/// What one Stable Diffusion model needs on a device.
#[derive(Debug, Clone)]
pub struct SdFootprint {
    /// (component folder, resident bytes at the load dtype)
    pub components: Vec<(String, u64)>,
    heads: usize,
    channels: usize,
    vae_channels: usize,
    latent_scale: usize,
    dtype_bytes: usize,
}

impl SdFootprint {
    pub fn read(dir: &ModelDir, dtype: DType) -> Result<Self> {
        let mut components = Vec::new();
        for (folder, stem) in [
            ("text_encoder", "text_encoder/model"),
            ("text_encoder_2", "text_encoder_2/model"),
            ("unet", "unet/diffusion_pytorch_model"),
            ("vae", "vae/diffusion_pytorch_model"),
        ] {
            // Text encoders are optional: SD has no second one, the SDXL refiner no first one.
            if folder.starts_with("text_encoder")
                && !dir.file(&format!("{folder}/config.json")).is_file()
            {
                continue;
            }
            let file = SafetensorsFile::open(&dir.weights(stem)?)?;
            components.push((folder.to_string(), file.loaded_bytes(dtype)));
        }
        let unet: UNetConfig = dir.read_json("unet/config.json")?;
        let vae: VaeConfig = dir.read_json("vae/config.json")?;
        let channels = unet.block_out_channels.first().copied().unwrap_or(320);
        // diffusers' quirk: `attention_head_dim` is the head count unless `num_attention_heads` is set.
        let heads = unet
            .num_attention_heads
            .as_ref()
            .unwrap_or(&unet.attention_head_dim)
            .expand(unet.block_out_channels.len())
            .and_then(|h| h.first().copied())
            .unwrap_or(8);
        let vae_channels = vae.block_out_channels.iter().copied().max().unwrap_or(512);
        let latent_scale = vae.scale_factor();
        Ok(Self {
            components,
            heads,
            channels,
            vae_channels,
            latent_scale,
            dtype_bytes: dtype.size_in_bytes(),
        })
    }

    /// Pixels per latent along each side.
    pub fn latent_scale(&self) -> usize {
        self.latent_scale
    }

    pub fn weights_bytes(&self) -> u64 {
        self.components.iter().map(|(_, b)| b).sum()
    }

    /// Working memory of one denoising run of `rows` images at `width`×`height`.
    pub fn activation_bytes(&self, rows: usize, width: usize, height: usize, cfg: bool) -> u64 {
        let s = self.dtype_bytes as u64;
        let tokens =
            ((width / self.latent_scale.max(1)) * (height / self.latent_scale.max(1))) as u64;
        let r = (rows * if cfg { 2 } else { 1 }) as u64;
        let unet = 2 * r * self.heads as u64 * tokens * tokens * s
            + 24 * r * tokens * self.channels as u64 * s;
        let vae =
            4 * self.vae_channels as u64 * (width * height) as u64 * s + 2 * tokens * tokens * s;
        unet.max(vae)
    }
}
