//! FLUX.1 dev and schnell, step for step as diffusers' `FluxPipeline`: CLIP-L's pooled output
//! and T5's states as conditioning, 2×2-packed latents with (t, h, w) position ids,
//! flow-matching Euler over `linspace(1, 1/n, n)` sigmas (resolution-dependent shift where the
//! scheduler config asks for it: dev), the guidance scale fed to the model (dev's guidance
//! distillation), and optional true classifier-free guidance with a negative prompt.

use super::prompt_cache::PromptCache;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::autoencoder::Autoencoder;
use super::params::GenerateParams;
use super::sd::Generated;
use super::LoadOptions;
use crate::engine::error::{EngineError, Result};
use crate::engine::loader::{single_file::Naming, ModelDir};
use crate::engine::models::{
    clip::ClipTextModel,
    dit::Rope,
    flux::{FluxTransformer, FluxTransformerConfig},
    t5::T5Encoder,
};
use crate::engine::rng::BatchNoise;
use crate::engine::schedulers::{self, SamplerOptions, SchedulerConfig};
use crate::engine::tokenizer::{ClipTokenizer, T5Tokenizer};
use crate::engine::Progress;

/// Pipeline classes with FLUX's component set.
pub const FLUX_PIPELINES: &[&str] = &["FluxPipeline", "FluxImg2ImgPipeline"];

/// T5 tokens when a request names none: diffusers' 512 for dev; 256 for schnell, which was
/// distilled with 256 (Black Forest Labs' reference code and model card).
pub fn default_t5_tokens(guidance_embeds: bool) -> usize {
    if guidance_embeds {
        512
    } else {
        256
    }
}

/// One prompt's conditioning: T5 states (1, L, D) and CLIP's pooled output (1, P).
#[derive(Clone)]
pub struct FluxEmbeds {
    pub context: Tensor,
    pub pooled: Tensor,
}

pub struct Flux {
    clip: (ClipTokenizer, ClipTextModel),
    t5: (T5Tokenizer, T5Encoder),
    transformer: FluxTransformer,
    pub(super) vae: Autoencoder,
    scheduler: SchedulerConfig,
    device: Device,
    /// Where the text encoders run (the CPU with `text_encoders_on_cpu`).
    text_device: Device,
    dtype: DType,
    /// By (prompt, T5 tokens).
    prompts: PromptCache<(String, usize), FluxEmbeds>,
}

impl Flux {
    /// Load `dir`; `options.transformer_file` replaces the folder's transformer weights with one
    /// file in diffusers' or Black Forest Labs' naming.
    pub fn load(
        dir: &ModelDir,
        device: &Device,
        dtype: DType,
        options: &LoadOptions,
    ) -> Result<Self> {
        Self::build(dir, device, dtype, options, false)
    }

    /// `random`: the architecture with random weights (benchmarks: speed does not depend on
    /// the values).
    pub(crate) fn build(
        dir: &ModelDir,
        device: &Device,
        dtype: DType,
        options: &LoadOptions,
        random: bool,
    ) -> Result<Self> {
        let source = super::WeightSource {
            dir,
            random,
            random_stored: DType::BF16,
        };
        let weights = |stem: &str, dtype: DType| source.get(stem, dtype, device);
        let text_device = super::text_encoder_device(device, options);
        let text_weights = |stem: &str| source.get_with_stored(stem, dtype, &text_device);
        super::pipeline_class(dir, FLUX_PIPELINES, "FLUX")?;
        let scheduler = super::read_scheduler(dir)?;
        let clip = (ClipTokenizer::load(dir, "tokenizer")?, {
            let (vb, stored) = text_weights("text_encoder/model")?;
            ClipTextModel::new(vb, dir.read_json("text_encoder/config.json")?, &stored)?
        });
        let t5 = (T5Tokenizer::load(dir, "tokenizer_2")?, {
            let (w, stored) = source.t5(options, "text_encoder_2/model", dtype, &text_device)?;
            let config = dir.read_json("text_encoder_2/config.json")?;
            T5Encoder::new(w.vb.clone(), config, &stored, w.layers())?
        });
        let config_path = dir.required("transformer/config.json")?;
        let config: FluxTransformerConfig = crate::engine::loader::read_json(&config_path)?;
        let transformer_weights = source.transformer(options, Naming::Bfl, dtype, device)?;
        let transformer = FluxTransformer::new(
            transformer_weights.vb.clone(),
            config,
            &config_path,
            transformer_weights.layers(),
        )?;
        let vae = Autoencoder::load(dir, dtype, device, &weights, false)?;
        let c = &transformer.config;
        let bad = |reason: String| EngineError::BadConfig {
            path: config_path.clone(),
            reason,
        };
        if t5.1.config.d_model != c.joint_attention_dim {
            return Err(bad(format!(
                "joint_attention_dim {} does not match T5's d_model {}",
                c.joint_attention_dim, t5.1.config.d_model
            )));
        }
        if clip.1.config.hidden_size != c.pooled_projection_dim {
            return Err(bad(format!(
                "pooled_projection_dim {} does not match CLIP's hidden_size {}",
                c.pooled_projection_dim, clip.1.config.hidden_size
            )));
        }
        if 4 * vae.latent_channels() != c.in_channels || c.patch_size != 1 {
            return Err(bad(format!(
                "in_channels {} must be 4 × the VAE's latent_channels {} (2×2 packing, patch_size 1)",
                c.in_channels,
                vae.latent_channels()
            )));
        }
        Ok(Self {
            clip,
            t5,
            transformer,
            vae,
            scheduler,
            device: device.clone(),
            text_device,
            // The CPU computes in f32 whatever the weights' dtype.
            dtype: crate::engine::models::blocks::compute_dtype(device, dtype),
            prompts: PromptCache::default(),
        })
    }

    pub fn vae(&self) -> &Autoencoder {
        &self.vae
    }

    /// Whether the model takes the guidance scale as an input (dev) or has none (schnell).
    pub fn has_guidance_embeds(&self) -> bool {
        self.transformer.config.guidance_embeds
    }

    /// Width and height must be multiples of this (VAE scale × 2 for the packing).
    pub fn size_multiple(&self) -> usize {
        self.vae.scale() * 2
    }

    pub fn default_size(&self) -> usize {
        1024
    }

    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        let multiple = self.size_multiple();
        for (param, v) in [("width", p.width), ("height", p.height)] {
            if v == 0 || v % multiple != 0 || v > super::sd::MAX_SIDE {
                return Err(EngineError::invalid(
                    param,
                    format!(
                        "{param} must be a positive multiple of {multiple} up to {}, got {v}",
                        super::sd::MAX_SIDE
                    ),
                ));
            }
        }
        super::check_common(p, self.scheduler.num_train_timesteps())?;
        if !p.sampler.is_flow() {
            return Err(EngineError::Incompatible {
                param: "sampler",
                message: format!(
                    "FLUX is a flow-matching model: use `flow_euler`, not `{}`",
                    p.sampler.name()
                ),
            });
        }
        if p.stage.is_some() || p.refiner.is_some() {
            return Err(EngineError::Incompatible {
                param: "refiner",
                message: "a refiner stage is an SDXL feature".into(),
            });
        }
        if p.init.as_ref().is_some_and(|i| i.mask.is_some()) {
            return Err(EngineError::Incompatible {
                param: "mask",
                message: "inpainting is not supported for FLUX yet; send no mask".into(),
            });
        }
        if p.transformer.skip_layer_guidance.is_some() {
            return Err(EngineError::Incompatible {
                param: "skip_layer_guidance",
                message: "Skip Layer Guidance is for SD3.5 models".into(),
            });
        }
        if let Some(n) = p.transformer.max_sequence_length {
            if n == 0 || n > 512 {
                return Err(EngineError::invalid(
                    "max_sequence_length",
                    "max_sequence_length must be between 1 and 512",
                ));
            }
        }
        if let Some(s) = p.transformer.true_cfg_scale {
            if !s.is_finite() || !(0.0..=100.0).contains(&s) {
                return Err(EngineError::invalid(
                    "true_cfg_scale",
                    "true_cfg_scale must be between 0 and 100",
                ));
            }
        }
        Ok(())
    }

    /// One prompt's conditioning: CLIP's pooled output (the final-layer-normed end-of-text
    /// state) and T5's last hidden states over `t5_tokens` tokens.
    pub fn embed(&self, prompt: &str, t5_tokens: usize) -> Result<FluxEmbeds> {
        self.prompts
            .get_or_encode((prompt.to_string(), t5_tokens), || {
                self.embed_uncached(prompt, t5_tokens)
            })
    }

    /// [`Self::embed`] past the cache of recent prompts (benchmarks time this).
    pub fn embed_uncached(&self, prompt: &str, t5_tokens: usize) -> Result<FluxEmbeds> {
        let (tokenizer, clip) = &self.clip;
        let ids = super::clip_token_ids(tokenizer, prompt, &self.text_device)?;
        let (_, pooled) = clip.forward_penultimate(&ids, 0)?;
        let (tokenizer, t5) = &self.t5;
        let ids = Tensor::new(
            tokenizer.encode_padded(prompt, t5_tokens)?,
            &self.text_device,
        )?
        .unsqueeze(0)?;
        let to_model =
            |t: Tensor| -> Result<Tensor> { Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?) };
        Ok(FluxEmbeds {
            context: to_model(t5.forward(&ids)?)?,
            pooled: to_model(pooled)?,
        })
    }

    /// The position ids of `text_tokens` text tokens (all zero) and the image's `h × w` packed
    /// latent grid ((0, row, column)).
    fn position_ids(text_tokens: usize, h: usize, w: usize) -> Vec<[f32; 3]> {
        let mut ids = vec![[0.0; 3]; text_tokens];
        for r in 0..h {
            for c in 0..w {
                ids.push([0.0, r as f32, c as f32]);
            }
        }
        ids
    }

    /// (B, C, H, W) → (B, H/2 · W/2, C · 4): diffusers' `_pack_latents`.
    pub fn pack(latents: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = latents.dims4()?;
        Ok(latents
            .reshape((b, c, h / 2, 2, w / 2, 2))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, (h / 2) * (w / 2), c * 4))?)
    }

    /// The inverse of [`Self::pack`] for a latent grid of `h × w`.
    pub fn unpack(latents: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (b, _, channels) = latents.dims3()?;
        let c = channels / 4;
        Ok(latents
            .reshape((b, h / 2, w / 2, c, 2, 2))?
            .permute((0, 3, 1, 4, 2, 5))?
            .reshape((b, c, h, w))?)
    }

    /// The rotary positions of `text_tokens` text tokens and an `(h, w)` latent image: made
    /// once per generation (and per benchmark), not per step.
    pub fn rope_for(&self, text_tokens: usize, (h, w): (usize, usize)) -> Result<Rope> {
        Ok(self
            .transformer
            .rope(&Self::position_ids(text_tokens, h / 2, w / 2), &self.device)?)
    }

    /// The transformer on packed latents with positions `rope` ([`Self::rope_for`]; component
    /// checks and benchmarks).
    pub fn transformer_forward(
        &self,
        packed: &Tensor,
        timestep: f32,
        guidance: Option<f32>,
        context: &Tensor,
        pooled: &Tensor,
        rope: &Rope,
    ) -> Result<Tensor> {
        Ok(self
            .transformer
            .forward(packed, timestep, guidance, context, pooled, rope)?)
    }

    pub fn generate(
        &self,
        p: &GenerateParams,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Generated> {
        self.generate_batch(std::slice::from_ref(p), progress)?
            .pop()
            .ok_or_else(|| EngineError::Internal("a batch of one produced no result".into()))
    }

    pub fn generate_batch(
        &self,
        requests: &[GenerateParams],
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Vec<Generated>> {
        let Some(first) = super::check_batch(requests, |p| self.validate(p))? else {
            return Ok(Vec::new());
        };
        let started = Instant::now();
        let t5_tokens = first
            .transformer
            .max_sequence_length
            .unwrap_or_else(|| default_t5_tokens(self.has_guidance_embeds()));
        // True CFG (diffusers' `true_cfg_scale`): only with a scale above 1 and negative prompts
        // on every request of the batch.
        let true_cfg = first
            .transformer
            .true_cfg_scale
            .filter(|&s| s > 1.0 && requests.iter().all(|p| p.negative_prompt.is_some()));
        let rows: usize = requests.iter().map(|p| p.n).sum();
        let mut contexts = Vec::new();
        let mut pooled = Vec::new();
        let prompts: Vec<(&str, usize)> = true_cfg
            .iter()
            .flat_map(|_| {
                requests
                    .iter()
                    .map(|p| (p.negative_prompt.as_deref().unwrap_or(""), p.n))
            })
            .chain(requests.iter().map(|p| (p.prompt.as_str(), p.n)))
            .collect();
        for (prompt, n) in prompts {
            let e = self.embed(prompt, t5_tokens)?;
            contexts.push(e.context.repeat((n, 1, 1))?);
            pooled.push(e.pooled.repeat((n, 1))?);
        }
        let context = Tensor::cat(&contexts, 0)?;
        let pooled = Tensor::cat(&pooled, 0)?;

        let scale = self.vae.scale();
        // diffusers: 2 · (side // (scale · 2)) latents per side.
        let (h, w) = (
            2 * (first.height / (scale * 2)),
            2 * (first.width / (scale * 2)),
        );
        let seq_len = (h / 2) * (w / 2);
        let n = first.steps;
        // diffusers' `np.linspace(1.0, 1 / n, n)`, cast to f32 by the scheduler.
        let flow_sigmas: Vec<f32> =
            crate::engine::schedulers::config::np_linspace(1.0, 1.0 / n as f64, n)
                .into_iter()
                .map(|s| s as f32)
                .collect();
        let options = SamplerOptions {
            solver_order: first.solver_order,
            image_seq_len: Some(seq_len),
            flow_sigmas: Some(flow_sigmas),
        };
        let mut sampler = schedulers::build_with(
            &self.scheduler,
            first.sampler,
            first.schedule,
            first.steps,
            &options,
        )?;
        let timesteps = sampler.timesteps().to_vec();
        let begin = super::image_to_image_begin(first, timesteps.len())?;
        let seeds: Vec<(u64, usize)> = requests.iter().map(|p| (p.seed, p.n)).collect();
        let mut noise = BatchNoise::per_request(&seeds);
        let mut starts = Vec::with_capacity(requests.len());
        for (k, p) in requests.iter().enumerate() {
            let generator = noise
                .stream(k)
                .ok_or_else(|| EngineError::Internal("missing noise stream".into()))?;
            // diffusers' FluxImg2ImgPipeline packs the start after mixing.
            let start = self
                .vae
                .flow_start(p, (h, w), generator, sampler.as_ref(), begin)?;
            starts.push(Self::pack(&start)?);
        }
        let mut latents = Tensor::cat(&starts, 0)?;
        let rope = self.rope_for(t5_tokens, (h, w))?;
        let guidance = self
            .has_guidance_embeds()
            .then_some(first.guidance_scale as f32);

        let total = timesteps.len() - begin;
        let mut steps = super::StepRunner::default();
        for (i, &t) in timesteps.iter().enumerate().skip(begin) {
            let input = if true_cfg.is_some() {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            // The latents and the timestep's features change between steps; the guidance value,
            // the prompt and the rotary tables do not.
            let t_input = self.transformer.timestep_input(t, &input)?;
            let out = steps.run([&input, &t_input], &|[input, t_input]| {
                self.transformer
                    .forward_from_timestep_input(input, t_input, guidance, &context, &pooled, &rope)
            })?;
            let velocity = match true_cfg {
                Some(s) => {
                    let negative = out.narrow(0, 0, rows)?;
                    let positive = out.narrow(0, rows, rows)?;
                    (&negative + ((positive - &negative)? * s)?)?
                }
                None => out,
            };
            latents = sampler.step(&velocity, i, &latents, &mut noise)?;
            if !progress(Progress {
                step: i + 1 - begin,
                total,
                elapsed_s: started.elapsed().as_secs_f64(),
            }) {
                return Err(EngineError::Cancelled);
            }
        }

        let latents = Self::unpack(&latents, h, w)?;
        super::split_rows(requests, &latents, |_, rows| {
            self.vae.decode_to_images(rows)
        })
    }
}
