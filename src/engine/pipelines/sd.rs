//! Stable Diffusion 1.x/2.x text-to-image, step for step as diffusers' `StableDiffusionPipeline`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::engine::error::{EngineError, Result};
use crate::engine::loader::{
    weights::{RandomWeights, SafetensorsFile},
    ModelDir,
};
use crate::engine::models::{clip::ClipTextModel, unet::UNet2DConditionModel, vae::VaeDecoder};
use crate::engine::rng::BatchNoise;
use crate::engine::schedulers::{
    self, PredictionType, SamplerKind, SamplerOptions, SchedulerConfig, SigmaSchedule,
};
use crate::engine::tokenizer::ClipTokenizer;
use crate::engine::{latents_to_images, GeneratedImage, Progress};

/// What one generation asks for. Validated by [`StableDiffusion::validate`].
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub seed: u64,
    pub sampler: SamplerKind,
    pub schedule: SigmaSchedule,
    /// The multistep samplers' order (1–3); the sampler's default when `None`.
    pub solver_order: Option<usize>,
    pub n: usize,
    /// Skip this many final CLIP layers (A1111 "clip skip" minus one; diffusers' `clip_skip`).
    pub clip_skip: usize,
}

/// What requests must share to be denoised together in one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchKey {
    width: usize,
    height: usize,
    steps: usize,
    sampler: SamplerKind,
    schedule: SigmaSchedule,
    solver_order: Option<usize>,
    /// Exact guidance (bits), so a batch applies one scale as each request alone would.
    guidance_bits: u64,
}

impl BatchKey {
    /// (width, height, classifier-free guidance on) — what working memory depends on.
    pub fn geometry(&self) -> (usize, usize, bool) {
        (
            self.width,
            self.height,
            f64::from_bits(self.guidance_bits) > 1.0,
        )
    }
}

impl GenerateParams {
    pub fn batch_key(&self) -> BatchKey {
        BatchKey {
            width: self.width,
            height: self.height,
            steps: self.steps,
            sampler: self.sampler,
            schedule: self.schedule,
            solver_order: self.solver_order,
            guidance_bits: self.guidance_scale.to_bits(),
        }
    }
}

pub struct Generated {
    /// Final denoised latents (n, C, H/8, W/8), before the VAE scaling factor is undone.
    pub latents: Tensor,
    pub images: Vec<GeneratedImage>,
}

#[derive(Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: String,
}

/// Pipeline classes whose folders have the SD 1.x/2.x component set.
const SD_PIPELINES: &[&str] = &[
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "AltDiffusionPipeline",
];

pub struct StableDiffusion {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: VaeDecoder,
    scheduler: SchedulerConfig,
    device: Device,
    dtype: DType,
}

/// The largest image side accepted (pixels); beyond this the attention maps do not fit anywhere sensible.
pub const MAX_SIDE: usize = 4096;

impl StableDiffusion {
    pub fn load(dir: &ModelDir, device: &Device, dtype: DType) -> Result<Self> {
        Self::build(dir, device, dtype, false)
    }

    /// The architecture of `dir`'s configs with random weights, for benchmarks: speed does not
    /// depend on the weights' values, and no download is needed.
    pub fn with_random_weights(dir: &ModelDir, device: &Device, dtype: DType) -> Result<Self> {
        Self::build(dir, device, dtype, true)
    }

    fn build(dir: &ModelDir, device: &Device, dtype: DType, random: bool) -> Result<Self> {
        if device.is_cpu() && dtype == DType::BF16 {
            // candle's CPU backend has no bf16 matmul; fail before loading gigabytes.
            return Err(EngineError::invalid(
                "dtype",
                "bf16 is not supported on CPU; use f32 or f16",
            ));
        }
        let weights = |_component: &str, stem: &str| -> Result<candle_nn::VarBuilder<'static>> {
            if random {
                Ok(candle_nn::VarBuilder::from_backend(
                    Box::new(RandomWeights),
                    dtype,
                    device.clone(),
                ))
            } else {
                Ok(SafetensorsFile::open(&dir.weights(stem)?)?.into_var_builder(dtype, device))
            }
        };
        let index: ModelIndex = dir.read_json("model_index.json")?;
        if !SD_PIPELINES.contains(&index.class_name.as_str()) {
            return Err(EngineError::Unsupported(format!(
                "{}: pipeline `{}` is not a Stable Diffusion 1.x/2.x pipeline",
                dir.file("model_index.json").display(),
                index.class_name
            )));
        }
        let scheduler: SchedulerConfig = dir.read_json("scheduler/scheduler_config.json")?;
        scheduler.check()?;
        let tokenizer = ClipTokenizer::load(dir, "tokenizer")?;

        let te_config = dir.read_json("text_encoder/config.json")?;
        let te_vb = weights("text_encoder", "text_encoder/model")?;
        let text_encoder = ClipTextModel::new(te_vb, te_config)?;

        let unet_config_path = dir.required("unet/config.json")?;
        let unet_config = crate::engine::loader::read_json(&unet_config_path)?;
        let unet_vb = weights("unet", "unet/diffusion_pytorch_model")?;
        let unet = UNet2DConditionModel::new(unet_vb, unet_config, &unet_config_path)?;

        let vae_config_path = dir.required("vae/config.json")?;
        let vae_config = crate::engine::loader::read_json(&vae_config_path)?;
        let vae_vb = weights("vae", "vae/diffusion_pytorch_model")?;
        let vae = VaeDecoder::new(vae_vb, vae_config, &vae_config_path)?;

        let text_dim = text_encoder.config.hidden_size;
        let cross = unet
            .config
            .cross_attention_dim
            .expand(1)
            .map(|v| v[0])
            .unwrap_or(text_dim);
        if cross != text_dim {
            return Err(EngineError::BadConfig {
                path: unet_config_path,
                reason: format!("cross_attention_dim {cross} does not match the text encoder's hidden_size {text_dim}"),
            });
        }
        if vae.config.latent_channels != unet.config.in_channels {
            return Err(EngineError::BadConfig {
                path: vae_config_path,
                reason: format!(
                    "latent_channels {} does not match the UNet's in_channels {}",
                    vae.config.latent_channels, unet.config.in_channels
                ),
            });
        }
        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler,
            device: device.clone(),
            dtype,
        })
    }

    /// Pixels per latent (8 for every SD VAE).
    pub fn vae_scale(&self) -> usize {
        self.vae.config.scale_factor()
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.scheduler.prediction_type()
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// The image side the model was trained at (`unet.sample_size` × VAE scale), diffusers' default size.
    pub fn default_size(&self) -> usize {
        self.unet.config.sample_size.unwrap_or(64) * self.vae_scale()
    }

    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        let scale = self.vae_scale();
        for (param, v) in [("width", p.width), ("height", p.height)] {
            if v == 0 || v % scale != 0 || v > MAX_SIDE {
                return Err(EngineError::invalid(
                    param,
                    format!(
                        "{param} must be a positive multiple of {scale} up to {MAX_SIDE}, got {v}"
                    ),
                ));
            }
        }
        let train = self.scheduler.num_train_timesteps();
        if p.steps == 0 || p.steps > train.min(1000) {
            return Err(EngineError::invalid(
                "steps",
                format!("steps must be between 1 and {}", train.min(1000)),
            ));
        }
        if p.n == 0 || p.n > 16 {
            return Err(EngineError::invalid("n", "n must be between 1 and 16"));
        }
        if !p.guidance_scale.is_finite() || !(0.0..=100.0).contains(&p.guidance_scale) {
            return Err(EngineError::invalid(
                "guidance_scale",
                "guidance_scale must be between 0 and 100",
            ));
        }
        if p.sampler.is_flow() {
            return Err(EngineError::Incompatible {
                param: "sampler",
                message: format!(
                    "`{}` is for flow-matching models (SD3, FLUX), not Stable Diffusion 1.x/2.x",
                    p.sampler.name()
                ),
            });
        }
        if p.clip_skip >= self.text_encoder.config.num_hidden_layers {
            return Err(EngineError::invalid(
                "clip_skip",
                "clip_skip must be smaller than the number of CLIP layers",
            ));
        }
        Ok(())
    }

    /// CLIP embeddings of one prompt, (1, 77, D).
    pub fn encode_prompt(&self, prompt: &str, clip_skip: usize) -> Result<Tensor> {
        let (ids, cut) = self.tokenizer.encode_counting_cut(prompt)?;
        if cut > 0 {
            tracing::warn!(
                tokens = cut,
                "prompt longer than CLIP's {} tokens; the end was cut",
                self.tokenizer.max_length()
            );
        }
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        Ok(self.text_encoder.forward(&ids, clip_skip)?)
    }

    pub fn unet_forward(&self, sample: &Tensor, timestep: f32, context: &Tensor) -> Result<Tensor> {
        Ok(self.unet.forward(sample, timestep, context)?)
    }

    pub fn vae_decode(&self, z: &Tensor) -> Result<Tensor> {
        Ok(self.vae.decode(z)?)
    }

    /// Run the whole pipeline. `progress` is called after every step; returning false cancels.
    pub fn generate(
        &self,
        p: &GenerateParams,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Generated> {
        self.generate_batch(std::slice::from_ref(p), progress)?
            .pop()
            .ok_or_else(|| EngineError::Internal("a batch of one produced no result".into()))
    }

    /// Denoise several requests in one batch (one UNet call per step for all of them). They must
    /// share a [`BatchKey`]; each keeps its own prompt, negative prompt, `n`, seed and
    /// `clip_skip`, and its noise comes from its own generator, so every result equals the
    /// request's run on its own.
    pub fn generate_batch(
        &self,
        requests: &[GenerateParams],
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Vec<Generated>> {
        let Some(first) = requests.first() else {
            return Ok(Vec::new());
        };
        let key = first.batch_key();
        for p in requests {
            self.validate(p)?;
            if p.batch_key() != key {
                return Err(EngineError::Internal(
                    "requests with different sizes, samplers, steps or guidance cannot share a batch"
                        .into(),
                ));
            }
        }
        let started = Instant::now();
        let cfg = first.guidance_scale > 1.0;
        let rows: usize = requests.iter().map(|p| p.n).sum();
        let mut positives = Vec::with_capacity(requests.len());
        let mut negatives = Vec::with_capacity(requests.len());
        for p in requests {
            positives.push(
                self.encode_prompt(&p.prompt, p.clip_skip)?
                    .repeat((p.n, 1, 1))?,
            );
            if cfg {
                // diffusers encodes the negative prompt without clip_skip.
                negatives.push(
                    self.encode_prompt(p.negative_prompt.as_deref().unwrap_or(""), 0)?
                        .repeat((p.n, 1, 1))?,
                );
            }
        }
        let context = Tensor::cat(&[negatives, positives].concat(), 0)?;

        let options = SamplerOptions {
            solver_order: first.solver_order,
            ..Default::default()
        };
        let mut sampler = schedulers::build_with(
            &self.scheduler,
            first.sampler,
            first.schedule,
            first.steps,
            &options,
        )?;
        let seeds: Vec<(u64, usize)> = requests.iter().map(|p| (p.seed, p.n)).collect();
        let mut noise = BatchNoise::per_request(&seeds);
        let scale = self.vae_scale();
        let channels = self.unet.config.in_channels;
        let shape = (rows, channels, first.height / scale, first.width / scale);
        let initial = noise
            .randn(shape.0 * shape.1 * shape.2 * shape.3)
            .map_err(EngineError::Internal)?;
        let mut latents = (Tensor::from_vec(initial, shape, &self.device)?
            .to_dtype(self.dtype)?
            * sampler.init_noise_sigma() as f64)?;

        let timesteps = sampler.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = sampler.scale_model_input(&input, i)?;
            let out = self.unet.forward(&input, t, &context)?;
            let guided = if cfg {
                let uncond = out.narrow(0, 0, rows)?;
                let text = out.narrow(0, rows, rows)?;
                (&uncond + ((text - &uncond)? * first.guidance_scale)?)?
            } else {
                out
            };
            latents = sampler.step(&guided, i, &latents, &mut noise)?;
            let elapsed = started.elapsed().as_secs_f64();
            if !progress(Progress {
                step: i + 1,
                total,
                elapsed_s: elapsed,
            }) {
                return Err(EngineError::Cancelled);
            }
        }

        let mut results = Vec::with_capacity(requests.len());
        let mut row = 0;
        for p in requests {
            let latents = latents.narrow(0, row, p.n)?;
            row += p.n;
            let images = self.decode_to_images(&latents)?;
            results.push(Generated { latents, images });
        }
        Ok(results)
    }

    /// `vae.decode(latents / scaling_factor)` then diffusers' postprocess to 8-bit RGB.
    pub fn decode_to_images(&self, latents: &Tensor) -> Result<Vec<GeneratedImage>> {
        let mut z = (latents / self.vae.config.scaling_factor)?;
        if let Some(shift) = self.vae.config.shift_factor {
            z = (z + shift)?;
        }
        let mut images = Vec::new();
        for i in 0..z.dim(0)? {
            let decoded = self.vae.decode(&z.narrow(0, i, 1)?)?;
            images.extend(latents_to_images(&decoded)?);
        }
        Ok(images)
    }
}
