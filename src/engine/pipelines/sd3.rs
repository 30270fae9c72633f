//! Stable Diffusion 3 / 3.5 (Medium, Large, Large Turbo), step for step as diffusers'
//! `StableDiffusion3Pipeline` and `StableDiffusion3Img2ImgPipeline`: three text encoders
//! (CLIP-L and OpenCLIP-G penultimate states side by side, zero-padded to T5's width, then T5's
//! states after them; the two pooled projections concatenated), the MMDiT, flow-matching Euler,
//! classifier-free guidance and SD3.5's Skip Layer Guidance.

use super::prompt_cache::PromptCache;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use super::autoencoder::Autoencoder;
use super::params::{GenerateParams, SkipLayerGuidance};
use super::sd::Generated;
use super::LoadOptions;
use crate::engine::error::{EngineError, Result};
use crate::engine::loader::ModelDir;
use crate::engine::models::{
    clip::ClipTextModel,
    mmdit::{Sd3Transformer, Sd3TransformerConfig},
    t5::T5Encoder,
};
use crate::engine::rng::BatchNoise;
use crate::engine::schedulers::{self, SamplerOptions, SchedulerConfig};
use crate::engine::tokenizer::{ClipTokenizer, T5Tokenizer};
use crate::engine::Progress;

/// diffusers' default `max_sequence_length` for SD3.
pub const DEFAULT_T5_TOKENS: usize = 256;
/// The most T5 tokens accepted (T5's own limit in these repos).
pub const MAX_T5_TOKENS: usize = 512;

#[derive(Deserialize)]
struct ModelIndex {
    #[serde(default)]
    text_encoder_3: Option<serde_json::Value>,
}

/// Pipeline classes with SD3's component set.
pub const SD3_PIPELINES: &[&str] = &[
    "StableDiffusion3Pipeline",
    "StableDiffusion3Img2ImgPipeline",
    "StableDiffusion3InpaintPipeline",
];

/// One prompt's conditioning: the joint text states (1, 77 + T5 tokens, D) and the pooled
/// projections (1, P).
#[derive(Clone)]
pub struct Sd3Embeds {
    pub context: Tensor,
    pub pooled: Tensor,
}

pub struct StableDiffusion3 {
    clip_l: (ClipTokenizer, ClipTextModel),
    clip_g: (ClipTokenizer, ClipTextModel),
    t5: Option<(T5Tokenizer, T5Encoder)>,
    transformer: Sd3Transformer,
    pub(super) vae: Autoencoder,
    scheduler: SchedulerConfig,
    device: Device,
    /// Where the text encoders run (the CPU with `text_encoders_on_cpu`).
    text_device: Device,
    dtype: DType,
    /// By (prompt, clip_skip, T5 tokens).
    prompts: PromptCache<(String, usize, usize), Sd3Embeds>,
}

impl StableDiffusion3 {
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
            random_stored: DType::F16,
        };
        let weights = |stem: &str, dtype: DType| source.get(stem, dtype, device);
        let text_device = super::text_encoder_device(device, options);
        let text_weights = |stem: &str| source.get_with_stored(stem, dtype, &text_device);
        super::pipeline_class(dir, SD3_PIPELINES, "Stable Diffusion 3")?;
        let index: ModelIndex = dir.read_json("model_index.json")?;
        let scheduler = super::read_scheduler(dir)?;
        let clip = |n: &str| -> Result<(ClipTokenizer, ClipTextModel)> {
            let tokenizer = ClipTokenizer::load(dir, &format!("tokenizer{n}"))?;
            let config = dir.read_json(&format!("text_encoder{n}/config.json"))?;
            let (vb, stored) = text_weights(&format!("text_encoder{n}/model"))?;
            let model = ClipTextModel::new(vb, config, &stored)?;
            Ok((tokenizer, model))
        };
        let clip_l = clip("")?;
        let clip_g = clip("_2")?;
        let t5_in_folder = index
            .text_encoder_3
            .as_ref()
            .is_none_or(|v| v.as_array().is_none_or(|a| a.iter().all(|x| !x.is_null())));
        let t5 = if t5_in_folder && !options.without_t5 {
            let tokenizer = T5Tokenizer::load(dir, "tokenizer_3")?;
            let config = dir.read_json("text_encoder_3/config.json")?;
            Some((tokenizer, {
                let (w, stored) =
                    source.t5(options, "text_encoder_3/model", dtype, &text_device)?;
                T5Encoder::new(w.vb.clone(), config, &stored, w.layers())?
            }))
        } else {
            None
        };
        let config_path = dir.required("transformer/config.json")?;
        let config: Sd3TransformerConfig = crate::engine::loader::read_json(&config_path)?;
        let naming = crate::engine::loader::single_file::Naming::Sai {
            blocks: config.num_layers,
        };
        let transformer_weights = source.transformer(options, naming, dtype, device)?;
        let transformer = Sd3Transformer::new(
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
        let clip_width = clip_l.1.config.hidden_size + clip_g.1.config.hidden_size;
        if clip_width > c.joint_attention_dim {
            return Err(bad(format!(
                "joint_attention_dim {} is narrower than the CLIP states ({clip_width})",
                c.joint_attention_dim
            )));
        }
        if let Some((_, t5)) = &t5 {
            if t5.config.d_model != c.joint_attention_dim {
                return Err(bad(format!(
                    "joint_attention_dim {} does not match T5's d_model {}",
                    c.joint_attention_dim, t5.config.d_model
                )));
            }
        }
        let pooled = |m: &ClipTextModel| m.config.projection_dim.unwrap_or(m.config.hidden_size);
        if pooled(&clip_l.1) + pooled(&clip_g.1) != c.pooled_projection_dim {
            return Err(bad(format!(
                "pooled_projection_dim {} does not match the CLIP projections ({} + {})",
                c.pooled_projection_dim,
                pooled(&clip_l.1),
                pooled(&clip_g.1)
            )));
        }
        if vae.latent_channels() != c.in_channels {
            return Err(bad(format!(
                "in_channels {} does not match the VAE's latent_channels {}",
                c.in_channels,
                vae.latent_channels()
            )));
        }
        Ok(Self {
            clip_l,
            clip_g,
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

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    pub fn has_t5(&self) -> bool {
        self.t5.is_some()
    }

    /// Pixels per latent (8).
    pub fn vae_scale(&self) -> usize {
        self.vae.scale()
    }

    /// Width and height must be multiples of this: VAE scale × patch size (16).
    pub fn size_multiple(&self) -> usize {
        self.vae.scale() * self.transformer.config.patch_size
    }

    /// diffusers' default size: `transformer.sample_size` × VAE scale (1024 for SD3.x).
    pub fn default_size(&self) -> usize {
        self.transformer.config.sample_size * self.vae.scale()
    }

    /// The largest side the position table covers (pixels).
    pub fn max_side(&self) -> usize {
        self.transformer.config.max_latent_side() * self.vae.scale()
    }

    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        let multiple = self.size_multiple();
        let max = self.max_side();
        for (param, v) in [("width", p.width), ("height", p.height)] {
            if v == 0 || v % multiple != 0 || v > max {
                return Err(EngineError::invalid(
                    param,
                    format!("{param} must be a positive multiple of {multiple} up to {max} for this model, got {v}"),
                ));
            }
        }
        super::check_common(p, self.scheduler.num_train_timesteps())?;
        if !p.sampler.is_flow() {
            return Err(EngineError::Incompatible {
                param: "sampler",
                message: format!(
                    "SD3 is a flow-matching model: use `flow_euler`, not `{}`",
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
                message: "inpainting is not supported for SD3 models yet; send no mask".into(),
            });
        }
        let layers = self
            .clip_l
            .1
            .config
            .num_hidden_layers
            .min(self.clip_g.1.config.num_hidden_layers);
        if p.clip_skip >= layers {
            return Err(EngineError::invalid(
                "clip_skip",
                "clip_skip must be smaller than the number of CLIP layers",
            ));
        }
        if let Some(n) = p.transformer.max_sequence_length {
            if n == 0 || n > MAX_T5_TOKENS {
                return Err(EngineError::invalid(
                    "max_sequence_length",
                    format!("max_sequence_length must be between 1 and {MAX_T5_TOKENS}"),
                ));
            }
        }
        if let Some(slg) = &p.transformer.skip_layer_guidance {
            let blocks = self.transformer.config.num_layers;
            if let Some(l) = slg.layers.iter().find(|&&l| l >= blocks) {
                return Err(EngineError::invalid(
                    "skip_layer_guidance",
                    format!(
                        "layer {l} does not exist: this transformer has {blocks} blocks (0–{})",
                        blocks - 1
                    ),
                ));
            }
            if slg.layers.is_empty()
                || !slg.scale.is_finite()
                || !(0.0..=1.0).contains(&slg.start)
                || !(0.0..=1.0).contains(&slg.stop)
            {
                return Err(EngineError::invalid(
                    "skip_layer_guidance",
                    "skip_layer_guidance needs layers, a finite scale and start/stop between 0 and 1",
                ));
            }
        }
        Ok(())
    }

    fn clip_embed(
        &self,
        (tokenizer, model): &(ClipTokenizer, ClipTextModel),
        prompt: &str,
        clip_skip: usize,
    ) -> Result<(Tensor, Tensor)> {
        let ids = super::clip_token_ids(tokenizer, prompt, &self.text_device)?;
        let (hidden, pooled) = model.forward_penultimate(&ids, clip_skip)?;
        let to_model =
            |t: Tensor| -> Result<Tensor> { Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?) };
        Ok((to_model(hidden)?, to_model(pooled)?))
    }

    /// One prompt's joint conditioning (diffusers' `encode_prompt` for one prompt).
    pub fn embed(&self, prompt: &str, clip_skip: usize, t5_tokens: usize) -> Result<Sd3Embeds> {
        self.prompts
            .get_or_encode((prompt.to_string(), clip_skip, t5_tokens), || {
                self.embed_uncached(prompt, clip_skip, t5_tokens)
            })
    }

    /// [`Self::embed`] past the cache of recent prompts (benchmarks time this).
    pub fn embed_uncached(
        &self,
        prompt: &str,
        clip_skip: usize,
        t5_tokens: usize,
    ) -> Result<Sd3Embeds> {
        let (l, pooled_l) = self.clip_embed(&self.clip_l, prompt, clip_skip)?;
        let (g, pooled_g) = self.clip_embed(&self.clip_g, prompt, clip_skip)?;
        let width = self.transformer.config.joint_attention_dim;
        let clip = Tensor::cat(&[&l, &g], D::Minus1)?;
        let clip = clip.pad_with_zeros(D::Minus1, 0, width - clip.dim(D::Minus1)?)?;
        let t5 = match &self.t5 {
            Some((tokenizer, encoder)) => {
                let ids = tokenizer.encode_padded(prompt, t5_tokens)?;
                let ids = Tensor::new(ids, &self.text_device)?.unsqueeze(0)?;
                encoder
                    .forward(&ids)?
                    .to_device(&self.device)?
                    .to_dtype(clip.dtype())?
            }
            None => Tensor::zeros((1, t5_tokens, width), clip.dtype(), &self.device)?,
        };
        Ok(Sd3Embeds {
            context: Tensor::cat(&[&clip, &t5], 1)?,
            pooled: Tensor::cat(&[&pooled_l, &pooled_g], D::Minus1)?,
        })
    }

    /// The transformer on its own (component checks and benchmarks).
    pub fn transformer_forward(
        &self,
        latents: &Tensor,
        timestep: f32,
        context: &Tensor,
        pooled: &Tensor,
        skip_layers: &[usize],
    ) -> Result<Tensor> {
        Ok(self
            .transformer
            .forward(latents, timestep, context, pooled, skip_layers)?)
    }

    pub fn vae(&self) -> &Autoencoder {
        &self.vae
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

    /// Denoise requests sharing a [`super::params::BatchKey`] together, each with its own
    /// prompts, `n` and seed.
    pub fn generate_batch(
        &self,
        requests: &[GenerateParams],
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Vec<Generated>> {
        let Some(first) = super::check_batch(requests, |p| self.validate(p))? else {
            return Ok(Vec::new());
        };
        let started = Instant::now();
        let cfg = first.guidance_scale > 1.0;
        let rows: usize = requests.iter().map(|p| p.n).sum();
        let t5_tokens = first
            .transformer
            .max_sequence_length
            .unwrap_or(DEFAULT_T5_TOKENS);
        // Rows: [every request's negatives..., every request's positives...] with CFG.
        let mut positives = Vec::with_capacity(requests.len());
        let mut negatives = Vec::with_capacity(requests.len());
        for p in requests {
            positives.push(self.embed(&p.prompt, p.clip_skip, t5_tokens)?);
            if cfg {
                // diffusers encodes the negative prompt ("" when none) without clip_skip.
                negatives.push(self.embed(
                    p.negative_prompt.as_deref().unwrap_or(""),
                    0,
                    t5_tokens,
                )?);
            }
        }
        let stack = |embeds: &[Sd3Embeds]| -> Result<(Tensor, Tensor)> {
            let mut contexts = Vec::new();
            let mut pooled = Vec::new();
            for (p, e) in requests.iter().zip(embeds) {
                contexts.push(e.context.repeat((p.n, 1, 1))?);
                pooled.push(e.pooled.repeat((p.n, 1))?);
            }
            Ok((Tensor::cat(&contexts, 0)?, Tensor::cat(&pooled, 0)?))
        };
        let (positive_context, positive_pooled) = stack(&positives)?;
        let (context, pooled) = if cfg {
            let (nc, np) = stack(&negatives)?;
            (
                Tensor::cat(&[&nc, &positive_context], 0)?,
                Tensor::cat(&[&np, &positive_pooled], 0)?,
            )
        } else {
            (positive_context.clone(), positive_pooled.clone())
        };

        let scale = self.vae.scale();
        let (h, w) = (first.height / scale, first.width / scale);
        let patch = self.transformer.config.patch_size;
        let options = SamplerOptions {
            solver_order: first.solver_order,
            image_seq_len: Some((h / patch) * (w / patch)),
            ..Default::default()
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
            let start = self
                .vae
                .flow_start(p, (h, w), generator, sampler.as_ref(), begin)?;
            starts.push(start);
        }
        let mut latents = Tensor::cat(&starts, 0)?;

        let slg = first
            .transformer
            .skip_layer_guidance
            .as_ref()
            .filter(|_| cfg);
        let total = timesteps.len() - begin;
        // The guided forward of every step (the latents and the timestep's features change).
        let mut steps = super::StepRunner::default();
        for (i, &t) in timesteps.iter().enumerate().skip(begin) {
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let t_input = self.transformer.timestep_input(t, &input)?;
            let out = steps.run([&input, &t_input], &|[input, t_input]| {
                self.transformer
                    .forward_from_timestep_input(input, t_input, &context, &pooled, &[])
            })?;
            let mut guided = if cfg {
                let uncond = out.narrow(0, 0, rows)?;
                let text = out.narrow(0, rows, rows)?;
                let guided = (&uncond + ((&text - &uncond)? * first.guidance_scale)?)?;
                match slg {
                    Some(g) if g.active_at(i, first.steps) => self.skip_layer_term(
                        g,
                        &latents,
                        t,
                        &positive_context,
                        &positive_pooled,
                        &text,
                        guided,
                    )?,
                    _ => guided,
                }
            } else {
                out
            };
            guided = guided.to_dtype(latents.dtype())?;
            latents = sampler.step(&guided, i, &latents, &mut noise)?;
            if !progress(Progress {
                step: i + 1 - begin,
                total,
                elapsed_s: started.elapsed().as_secs_f64(),
            }) {
                return Err(EngineError::Cancelled);
            }
        }

        super::split_rows(requests, &latents, |_, rows| {
            self.vae.decode_to_images(rows)
        })
    }

    /// Skip Layer Guidance: `guided + (text − skipped) × scale`, where `skipped` is the
    /// positive prompt's prediction with `g.layers` left out.
    #[allow(clippy::too_many_arguments)]
    fn skip_layer_term(
        &self,
        g: &SkipLayerGuidance,
        latents: &Tensor,
        t: f32,
        context: &Tensor,
        pooled: &Tensor,
        text: &Tensor,
        guided: Tensor,
    ) -> Result<Tensor> {
        let skipped = self
            .transformer
            .forward(latents, t, context, pooled, &g.layers)?;
        Ok((guided + ((text - skipped)? * g.scale)?)?)
    }
}
