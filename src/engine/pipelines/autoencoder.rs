//! The VAE as every pipeline uses it: pictures in (image-to-image), latents out, with the
//! config's `scaling_factor` and `shift_factor` applied as diffusers does.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::engine::error::{EngineError, Result};
use crate::engine::loader::ModelDir;
use crate::engine::models::blocks::compute_dtype;
use crate::engine::models::vae::{VaeConfig, VaeDecoder, VaeEncoder};
use crate::engine::rng::TorchGenerator;
use crate::engine::{latents_to_images, GeneratedImage};

pub struct Autoencoder {
    encoder: VaeEncoder,
    decoder: VaeDecoder,
    /// The VAE's own dtype: f32 when the config asks for `force_upcast` and the model runs f16
    /// (SDXL's VAE overflows in f16; diffusers decodes it in f32, and so do we).
    dtype: DType,
    /// The denoiser's dtype, which latents are handed back in.
    latent_dtype: DType,
    device: Device,
    /// Decode and encode in tiles ([`VaeDecoder::decode_tiled`], `VaeEncoder::encode_tiled`).
    tiling: bool,
}

impl Autoencoder {
    /// Load `vae/` with `weights(stem, dtype)` (a file or random weights). `honor_force_upcast`:
    /// run the VAE in f32 under an f16 model when its config says `force_upcast`, as diffusers'
    /// SDXL pipelines do (SDXL's VAE overflows in f16); its SD 1.x/2.x, SD3 and FLUX pipelines
    /// decode in the model's dtype whatever the flag says.
    pub fn load(
        dir: &ModelDir,
        dtype: DType,
        device: &Device,
        weights: &dyn Fn(&str, DType) -> Result<VarBuilder<'static>>,
        honor_force_upcast: bool,
    ) -> Result<Self> {
        let config_path = dir.required("vae/config.json")?;
        let config: VaeConfig = crate::engine::loader::read_json(&config_path)?;
        let vae_dtype = if honor_force_upcast && config.force_upcast && dtype == DType::F16 {
            DType::F32
        } else {
            dtype
        };
        let vb = weights("vae/diffusion_pytorch_model", vae_dtype)?;
        Ok(Self {
            encoder: VaeEncoder::new(vb.clone(), config.clone(), &config_path)?,
            decoder: VaeDecoder::new(vb, config, &config_path)?,
            // The CPU computes in f32 whatever the weights' dtype.
            dtype: compute_dtype(device, vae_dtype),
            latent_dtype: compute_dtype(device, dtype),
            device: device.clone(),
            tiling: false,
        })
    }

    /// Decode latents and encode images larger than one tile in tiles (diffusers'
    /// `enable_tiling()`).
    pub fn set_tiling(&mut self, on: bool) {
        self.tiling = on;
    }

    /// The encoder's (mean, std), whole or tiled.
    fn run_encoder(&self, image: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        if self.tiling {
            self.encoder.encode_tiled(image)
        } else {
            self.encoder.encode(image)
        }
    }

    /// One decoder pass, whole or tiled. It starts without the denoiser's convolution buffer
    /// (CPU: it would sit through the decode, where a run peaks).
    fn run_decoder(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        crate::engine::models::cpu_winograd::release_thread_buffer();
        if self.tiling {
            self.decoder.decode_tiled(z)
        } else {
            self.decoder.decode(z)
        }
    }

    pub fn config(&self) -> &VaeConfig {
        &self.decoder.config
    }

    pub fn latent_channels(&self) -> usize {
        self.decoder.config.latent_channels
    }

    /// Pixels per latent along each side (8 for every SD/SD3/FLUX VAE).
    pub fn scale(&self) -> usize {
        self.decoder.config.scale_factor()
    }

    /// An 8-bit RGB picture as the VAE takes it: (1, 3, H, W) in [-1, 1], as diffusers' image
    /// processor normalises it.
    pub fn image_tensor(&self, rgb: &[u8], width: usize, height: usize) -> Result<Tensor> {
        if rgb.len() != width * height * 3 {
            return Err(EngineError::invalid(
                "image",
                format!("expected {width}x{height} RGB pixels"),
            ));
        }
        let values: Vec<f32> = rgb
            .iter()
            .map(|&v| 2.0 * (v as f32 / 255.0) - 1.0)
            .collect();
        Ok(
            Tensor::from_vec(values, (1, height, width, 3), &self.device)?
                .permute((0, 3, 1, 2))?
                .contiguous()?
                .to_dtype(self.dtype)?,
        )
    }

    /// The encoder's latent distribution (mean, std) of an 8-bit RGB picture.
    pub fn encode_rgb(&self, rgb: &[u8], width: usize, height: usize) -> Result<(Tensor, Tensor)> {
        let image = self.image_tensor(rgb, width, height)?;
        Ok(self.upcast_scope(|| self.run_encoder(&image))?)
    }

    /// One draw from the latent distribution of `image` (a tensor from [`Self::image_tensor`]),
    /// as the denoiser sees latents: `(sample − shift) × scale`.
    pub fn sample_latents(&self, image: &Tensor, generator: &mut TorchGenerator) -> Result<Tensor> {
        let (mean, std) = self.upcast_scope(|| self.run_encoder(image))?;
        let draw = generator.randn_in(mean.elem_count(), mean.dtype());
        let noise = Tensor::from_vec(draw, mean.shape(), &self.device)?.to_dtype(mean.dtype())?;
        let mut sample = (mean + (std * noise)?)?;
        if let Some(shift) = self.config().shift_factor {
            sample = (sample - shift)?;
        }
        Ok((sample * self.config().scaling_factor)?.to_dtype(self.latent_dtype)?)
    }

    /// Where one request of a flow-matching pipeline (diffusers' SD3 / FLUX) starts, (n, C, h, w)
    /// latents: noise for text to image; for image to image the picture's latent sample (one draw
    /// from `generator`), then the noise (a second draw), mixed at step `begin`.
    pub fn flow_start(
        &self,
        p: &crate::engine::pipelines::params::GenerateParams,
        (h, w): (usize, usize),
        generator: &mut TorchGenerator,
        sampler: &dyn crate::engine::schedulers::Sampler,
        begin: usize,
    ) -> Result<Tensor> {
        let shape = (p.n, self.latent_channels(), h, w);
        let noise = |generator: &mut TorchGenerator| -> Result<Tensor> {
            let draw = generator.randn_in(shape.0 * shape.1 * h * w, self.latent_dtype);
            Ok(Tensor::from_vec(draw, shape, &self.device)?.to_dtype(self.latent_dtype)?)
        };
        match &p.init {
            None => noise(generator),
            Some(init) => {
                let image = self.image_tensor(&init.rgb, p.width, p.height)?;
                let clean = self
                    .sample_latents(&image, generator)?
                    .repeat((p.n, 1, 1, 1))?;
                Ok(sampler.add_noise(&clean, &noise(generator)?, begin)?)
            }
        }
    }

    /// The raw decoder on already-unscaled latents (of any float dtype).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.upcast_scope(|| Ok(self.run_decoder(&z.to_dtype(self.dtype)?)?))
    }

    /// Run `f` with TF32 convolutions allowed when this VAE is upcast to f32 under a half model
    /// (as PyTorch runs diffusers' upcast SDXL VAE; on an H200 the exact-f32 decode at 1024² took
    /// 367 ms against diffusers' 87).
    fn upcast_scope<T>(&self, f: impl FnOnce() -> T) -> T {
        #[cfg(feature = "cudnn")]
        {
            let upcast = self.dtype != self.latent_dtype;
            crate::engine::cuda::conv::allow_tf32(upcast, f)
        }
        #[cfg(not(feature = "cudnn"))]
        f()
    }

    /// `vae.decode(latents / scale + shift)`, one image at a time, then diffusers' postprocess
    /// to 8-bit RGB.
    pub fn decode_to_images(&self, latents: &Tensor) -> Result<Vec<GeneratedImage>> {
        let mut z = (latents.to_dtype(self.dtype)? / self.config().scaling_factor)?;
        if let Some(shift) = self.config().shift_factor {
            z = (z + shift)?;
        }
        let mut images = Vec::new();
        for i in 0..z.dim(0)? {
            let decoded = self.upcast_scope(|| self.run_decoder(&z.narrow(0, i, 1)?))?;
            images.extend(latents_to_images(&decoded)?);
        }
        Ok(images)
    }
}
