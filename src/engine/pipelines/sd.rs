//! Stable Diffusion 1.x/2.x text-to-image, step for step as diffusers' `StableDiffusionPipeline`.

use super::prompt_cache::PromptCache;
use super::LoadOptions;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use crate::engine::error::{EngineError, Result};
use crate::engine::loader::ModelDir;
use crate::engine::models::{clip::ClipTextModel, unet::UNet2DConditionModel};
use crate::engine::rng::BatchNoise;
use crate::engine::schedulers::{self, PredictionType, SamplerOptions, SchedulerConfig};
use crate::engine::tokenizer::ClipTokenizer;
use crate::engine::{GeneratedImage, Progress};

use super::autoencoder::Autoencoder;

pub use super::params::{BatchKey, GenerateParams, InitImage, RefinerSpec, Stage};

/// diffusers' `discrete_timestep_cutoff`: the training timestep at a fraction of the schedule.
fn timestep_cutoff(train_steps: usize, fraction: f64) -> f64 {
    (train_steps as f64 - fraction * train_steps as f64).round_ties_even()
}

/// One request's start: its latents and, for inpainting, what the loop needs.
struct Start {
    latents: Tensor,
    inpaint: Option<InpaintRows>,
}

/// Inpainting state per batch row: the picture's clean latents (blending only), the starting
/// noise, the latent-size mask (1 = repaint) and the masked picture's latents.
struct InpaintRows {
    clean: Option<Tensor>,
    noise: Tensor,
    mask: Tensor,
    masked: Tensor,
}

impl InpaintRows {
    /// The batch's rows, request after request (every request of a batch inpaints or none does).
    fn concat(starts: &[Start]) -> Result<Option<Self>> {
        let rows: Vec<&InpaintRows> = starts.iter().filter_map(|s| s.inpaint.as_ref()).collect();
        if rows.is_empty() {
            return Ok(None);
        }
        let cat = |f: fn(&InpaintRows) -> &Tensor| -> Result<Tensor> {
            Ok(Tensor::cat(
                &rows.iter().map(|r| f(r)).collect::<Vec<_>>(),
                0,
            )?)
        };
        let clean = if rows.iter().all(|r| r.clean.is_some()) {
            let parts: Vec<&Tensor> = rows.iter().filter_map(|r| r.clean.as_ref()).collect();
            Some(Tensor::cat(&parts, 0)?)
        } else {
            None
        };
        Ok(Some(Self {
            clean,
            noise: cat(|r| &r.noise)?,
            mask: cat(|r| &r.mask)?,
            masked: cat(|r| &r.masked)?,
        }))
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
    /// SDXL: an empty negative prompt means zero embeddings, not the encoding of "".
    #[serde(default)]
    force_zeros_for_empty_prompt: Option<bool>,
    /// SDXL refiner: conditioned on an aesthetic score instead of the target size.
    #[serde(default)]
    requires_aesthetics_score: Option<bool>,
    /// `[library, class]`, or `[null, null]` where the pipeline has no first text encoder (the
    /// SDXL refiner).
    #[serde(default)]
    text_encoder: Option<serde_json::Value>,
}

/// Pipeline classes whose folders have the SD 1.x/2.x component set.
const SD_PIPELINES: &[&str] = &[
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "AltDiffusionPipeline",
];

/// Pipeline classes with SDXL's component set (two text encoders, text_time conditioning).
pub(crate) const SDXL_PIPELINES: &[&str] = &[
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
];

/// SDXL's second text encoder (OpenCLIP-G with projection) and its settings.
struct XlParts {
    tokenizer_2: ClipTokenizer,
    text_encoder_2: ClipTextModel,
    force_zeros_for_empty_prompt: bool,
    /// The refiner's (positive, negative) aesthetic scores (diffusers' defaults 6.0 and 2.5),
    /// which replace the target size in the micro-conditioning.
    aesthetic_scores: Option<(f32, f32)>,
}

/// One prompt's conditioning: the cross-attention context (1, 77, D) and, for SDXL, the pooled
/// embedding (1, P).
#[derive(Clone)]
pub struct PromptEmbeds {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
}

/// The UNet latent-diffusion pipelines: Stable Diffusion 1.x/2.x and SDXL (diffusers'
/// `StableDiffusionPipeline` / `StableDiffusionXLPipeline`), which differ only in how prompts are
/// encoded and in SDXL's added (pooled text + size) conditioning.
pub struct StableDiffusion {
    /// The (first) CLIP text encoder; absent only in the SDXL refiner.
    text: Option<(ClipTokenizer, ClipTextModel)>,
    xl: Option<XlParts>,
    unet: UNet2DConditionModel,
    pub(super) vae: Autoencoder,
    scheduler: SchedulerConfig,
    device: Device,
    dtype: DType,
    /// By (prompt, clip_skip).
    prompts: PromptCache<(String, usize), PromptEmbeds>,
}

/// The largest image side accepted (pixels); beyond this the attention maps do not fit anywhere sensible.
pub const MAX_SIDE: usize = 4096;

impl StableDiffusion {
    /// The model as its files hold it (every layer dense).
    pub fn load(dir: &ModelDir, device: &Device, dtype: DType) -> Result<Self> {
        Self::build(dir, device, dtype, &LoadOptions::default(), false)
    }

    /// `random`: the architecture of `dir`'s configs with random weights, for benchmarks (speed
    /// does not depend on the weights' values, and no download is needed). Of `options`, the
    /// UNet takes `transformer_format` for its transformer blocks.
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
            random_stored: DType::F32,
        };
        let weights = |stem: &str, dtype: DType| source.get(stem, dtype, device);
        // The CPU computes in f32 whatever the weights' dtype.
        let compute = crate::engine::models::blocks::compute_dtype(device, dtype);
        let text_weights = |stem: &str| source.get_with_stored(stem, dtype, device);
        if let Some(file) = &options.transformer_file {
            return Err(EngineError::Unsupported(format!(
                "a transformer file ({}) replaces an SD3 or FLUX transformer; this model has a UNet",
                file.display()
            )));
        }
        let index: ModelIndex = dir.read_json("model_index.json")?;
        let is_xl = SDXL_PIPELINES.contains(&index.class_name.as_str());
        if !is_xl && !SD_PIPELINES.contains(&index.class_name.as_str()) {
            return Err(EngineError::Unsupported(format!(
                "{}: pipeline `{}` is not a Stable Diffusion 1.x/2.x/XL pipeline",
                dir.file("model_index.json").display(),
                index.class_name
            )));
        }
        let scheduler = super::read_scheduler(dir)?;
        let has_first_encoder = !is_xl
            || index
                .text_encoder
                .as_ref()
                .is_none_or(|v| v.as_array().is_none_or(|a| a.iter().all(|x| !x.is_null())));
        let text = if has_first_encoder {
            let tokenizer = ClipTokenizer::load(dir, "tokenizer")?;
            let te_config = dir.read_json("text_encoder/config.json")?;
            let (te_vb, stored) = text_weights("text_encoder/model")?;
            Some((tokenizer, ClipTextModel::new(te_vb, te_config, &stored)?))
        } else {
            None
        };

        let unet_config_path = dir.required("unet/config.json")?;
        let unet_config = crate::engine::loader::read_json(&unet_config_path)?;
        let unet_vb = weights("unet/diffusion_pytorch_model", dtype)?;
        let unet = UNet2DConditionModel::new(
            unet_vb,
            unet_config,
            &unet_config_path,
            options.transformer_format,
        )?;

        let vae = Autoencoder::load(dir, dtype, device, &weights, is_xl)?;

        let xl = if is_xl {
            let tokenizer_2 = ClipTokenizer::load(dir, "tokenizer_2")?;
            let config = dir.read_json("text_encoder_2/config.json")?;
            let (vb, stored) = text_weights("text_encoder_2/model")?;
            let text_encoder_2 = ClipTextModel::new(vb, config, &stored)?;
            Some(XlParts {
                tokenizer_2,
                text_encoder_2,
                force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(true),
                aesthetic_scores: index
                    .requires_aesthetics_score
                    .unwrap_or(false)
                    .then_some((6.0, 2.5)),
            })
        } else {
            None
        };
        if is_xl != unet.config.addition_embed_type.is_some() {
            return Err(EngineError::BadConfig {
                path: unet_config_path,
                reason: format!(
                    "pipeline `{}` does not match this UNet (addition_embed_type {:?})",
                    index.class_name, unet.config.addition_embed_type
                ),
            });
        }
        // SDXL concatenates both encoders' states.
        let text_dim = text.as_ref().map_or(0, |(_, te)| te.config.hidden_size)
            + xl.as_ref()
                .map_or(0, |x| x.text_encoder_2.config.hidden_size);
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
        // Inpainting UNets take latents + mask + masked-image latents.
        let inpainting_channels = 2 * vae.latent_channels() + 1;
        if vae.latent_channels() != unet.config.in_channels
            && unet.config.in_channels != inpainting_channels
        {
            return Err(EngineError::BadConfig {
                path: dir.file("vae/config.json"),
                reason: format!(
                    "latent_channels {} does not match the UNet's in_channels {}",
                    vae.latent_channels(),
                    unet.config.in_channels
                ),
            });
        }
        Ok(Self {
            text,
            xl,
            unet,
            vae,
            scheduler,
            device: device.clone(),
            dtype: compute,
            prompts: PromptCache::default(),
        })
    }

    /// Pixels per latent (8 for every SD VAE).
    pub fn vae_scale(&self) -> usize {
        self.vae.scale()
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
        super::check_common(p, self.scheduler.num_train_timesteps())?;
        if self
            .xl
            .as_ref()
            .is_some_and(|x| x.aesthetic_scores.is_some())
            && p.init.is_none()
            && !matches!(p.stage, Some(Stage::Refiner { .. }))
        {
            return Err(EngineError::Incompatible {
                param: "image",
                message: "the SDXL refiner refines a picture: send one (edits, --init-image)"
                    .into(),
            });
        }
        if self.is_inpainting_unet() && p.init.as_ref().is_none_or(|i| i.mask.is_none()) {
            return Err(EngineError::Incompatible {
                param: "mask",
                message: "this is an inpainting model: it needs a picture and a mask".into(),
            });
        }
        if let Some(mask) = p.init.as_ref().and_then(|i| i.mask.as_ref()) {
            if mask.len() != p.width * p.height {
                return Err(EngineError::invalid(
                    "mask",
                    format!("expected a {}x{} mask", p.width, p.height),
                ));
            }
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
        let layers = self
            .text
            .as_ref()
            .map_or(usize::MAX, |(_, te)| te.config.num_hidden_layers)
            .min(
                self.xl
                    .as_ref()
                    .map_or(usize::MAX, |x| x.text_encoder_2.config.num_hidden_layers),
            );
        if p.clip_skip >= layers {
            return Err(EngineError::invalid(
                "clip_skip",
                "clip_skip must be smaller than the number of CLIP layers",
            ));
        }
        Ok(())
    }

    /// The cross-attention context of one prompt, (1, 77, D).
    pub fn encode_prompt(&self, prompt: &str, clip_skip: usize) -> Result<Tensor> {
        Ok(self.embed(prompt, clip_skip)?.context)
    }

    /// One prompt's conditioning. SD: the final-layer-normed states (`clip_skip` layers from the
    /// end). SDXL: both encoders' raw `hidden_states[-(clip_skip + 2)]` concatenated, plus the
    /// second encoder's pooled projection.
    pub fn embed(&self, prompt: &str, clip_skip: usize) -> Result<PromptEmbeds> {
        self.prompts
            .get_or_encode((prompt.to_string(), clip_skip), || {
                self.embed_uncached(prompt, clip_skip)
            })
    }

    /// [`Self::embed`] past the cache of recent prompts (benchmarks time this).
    pub fn embed_uncached(&self, prompt: &str, clip_skip: usize) -> Result<PromptEmbeds> {
        match (&self.xl, &self.text) {
            (None, Some((tokenizer, encoder))) => {
                let ids = super::clip_token_ids(tokenizer, prompt, &self.device)?;
                Ok(PromptEmbeds {
                    context: encoder.forward(&ids, clip_skip)?,
                    pooled: None,
                })
            }
            (None, None) => Err(EngineError::Internal(
                "a Stable Diffusion pipeline without its text encoder".into(),
            )),
            (Some(xl), first) => {
                let mut states = Vec::with_capacity(2);
                if let Some((tokenizer, encoder)) = first {
                    let ids = super::clip_token_ids(tokenizer, prompt, &self.device)?;
                    states.push(encoder.penultimate(&ids, clip_skip)?);
                }
                let ids_2 = super::clip_token_ids(&xl.tokenizer_2, prompt, &self.device)?;
                let (h2, pooled) = xl.text_encoder_2.forward_penultimate(&ids_2, clip_skip)?;
                states.push(h2);
                Ok(PromptEmbeds {
                    context: Tensor::cat(&states, D::Minus1)?,
                    pooled: Some(pooled),
                })
            }
        }
    }

    /// The unconditional side of guidance. diffusers encodes the negative prompt without
    /// `clip_skip`; SDXL with `force_zeros_for_empty_prompt` uses zeros when none is given.
    fn embed_negative(
        &self,
        negative: Option<&str>,
        positive: &PromptEmbeds,
    ) -> Result<PromptEmbeds> {
        if let (Some(xl), None) = (&self.xl, negative) {
            if xl.force_zeros_for_empty_prompt {
                return Ok(PromptEmbeds {
                    context: positive.context.zeros_like()?,
                    pooled: positive
                        .pooled
                        .as_ref()
                        .map(|p| p.zeros_like())
                        .transpose()?,
                });
            }
        }
        self.embed(negative.unwrap_or(""), 0)
    }

    pub fn unet_forward(&self, sample: &Tensor, timestep: f32, context: &Tensor) -> Result<Tensor> {
        Ok(self.unet.forward(sample, timestep, context)?)
    }

    /// The UNet with SDXL's added conditioning `(text_embeds, time_ids)`: `time_ids` on the
    /// host, each row's six values after the other's (the pipeline builds them there; read back
    /// from a device each forward would wait for the device, and cannot be captured in a CUDA
    /// graph — session 25's H200 run).
    pub fn unet_forward_added(
        &self,
        sample: &Tensor,
        timestep: f32,
        context: &Tensor,
        text_embeds: &Tensor,
        time_ids: &[f32],
    ) -> Result<Tensor> {
        Ok(self
            .unet
            .forward_with(sample, timestep, context, Some((text_embeds, time_ids)))?)
    }

    /// SDXL's micro-conditioning of a positive row at diffusers' defaults (benchmarks).
    pub fn positive_time_ids(&self, width: usize, height: usize) -> Vec<f32> {
        let (h, w) = (height as f32, width as f32);
        match self.xl.as_ref().and_then(|x| x.aesthetic_scores) {
            Some((positive, _)) => vec![h, w, 0.0, 0.0, positive],
            None => vec![h, w, 0.0, 0.0, h, w],
        }
    }

    pub fn latent_channels(&self) -> usize {
        self.vae.latent_channels()
    }

    pub fn vae_decode(&self, z: &Tensor) -> Result<Tensor> {
        self.vae.decode(z)
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

    /// SDXL base + refiner ("ensemble of experts"): this (base) model denoises until `switch`
    /// (a fraction of the schedule), `refiner` continues its latents to the end and decodes.
    /// Each stage draws from a generator seeded with the request's seed, as when diffusers' two
    /// pipelines are each given `torch.Generator().manual_seed(seed)`.
    pub fn generate_with_refiner(
        &self,
        refiner: &StableDiffusion,
        p: &GenerateParams,
        switch: f64,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Generated> {
        if !(switch > 0.0 && switch < 1.0) {
            return Err(EngineError::invalid(
                "refiner_switch",
                format!("refiner_switch must be between 0 and 1, got {switch}"),
            ));
        }
        if p.init.is_some() {
            return Err(EngineError::Incompatible {
                param: "refiner",
                message: "the two-stage refiner runs after text-to-image only".into(),
            });
        }
        let base_params = GenerateParams {
            stage: Some(Stage::Base { switch }),
            ..p.clone()
        };
        let base = self.generate(&base_params, progress)?;
        let refine_params = GenerateParams {
            stage: Some(Stage::Refiner {
                switch,
                latents: base.latents,
            }),
            ..p.clone()
        };
        refiner.generate(&refine_params, progress)
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
        let Some(first) = super::check_batch(requests, |p| self.validate(p))? else {
            return Ok(Vec::new());
        };
        let started = Instant::now();
        let cfg = first.guidance_scale > 1.0;
        let rows: usize = requests.iter().map(|p| p.n).sum();
        // Rows: [every request's negatives..., every request's positives...] with CFG.
        let (mut contexts, mut pooled, mut time_ids) = (Vec::new(), Vec::new(), Vec::new());
        let mut positives = Vec::with_capacity(requests.len());
        let mut negatives = Vec::with_capacity(requests.len());
        for p in requests {
            let positive = self.embed(&p.prompt, p.clip_skip)?;
            if cfg {
                negatives.push(self.embed_negative(p.negative_prompt.as_deref(), &positive)?);
            }
            positives.push(positive);
        }
        for (row, (p, e)) in requests
            .iter()
            .cycle()
            .zip(negatives.iter().chain(&positives))
            .enumerate()
        {
            let negative_row = row < negatives.len();
            contexts.push(e.context.repeat((p.n, 1, 1))?);
            if let Some(pool) = &e.pooled {
                pooled.push(pool.repeat((p.n, 1))?);
                // SDXL micro-conditioning at diffusers' defaults: original size = target size =
                // the output size, no crop: (h, w, top, left, h, w).
                let (h, w) = (p.height as f32, p.width as f32);
                let aesthetic = self.xl.as_ref().and_then(|x| x.aesthetic_scores);
                let ids: Vec<f32> = match aesthetic {
                    // The refiner: (h, w, top, left, aesthetic score), lower for the negative side.
                    Some((pos, neg)) => {
                        vec![h, w, 0.0, 0.0, if negative_row { neg } else { pos }]
                    }
                    None => vec![h, w, 0.0, 0.0, h, w],
                };
                for _ in 0..p.n {
                    time_ids.extend_from_slice(&ids);
                }
            }
        }
        let context = Tensor::cat(&contexts, 0)?;
        let added = if pooled.is_empty() {
            None
        } else {
            Some((Tensor::cat(&pooled, 0)?.to_dtype(self.dtype)?, time_ids))
        };

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
        let timesteps = sampler.timesteps().to_vec();
        let train = self.scheduler.num_train_timesteps();
        // Image-to-image starts `strength × steps` steps before the end (diffusers' get_timesteps);
        // a refiner stage where the base stopped; a base stage stops at its switch.
        let begin = match (&first.stage, &first.init) {
            (Some(Stage::Refiner { switch, .. }), _) => {
                let cutoff = timestep_cutoff(train, *switch);
                let mut remaining = timesteps.iter().filter(|&&t| (t as f64) < cutoff).count();
                if sampler.order() == 2 && remaining % 2 == 0 {
                    remaining += 1;
                }
                timesteps.len().saturating_sub(remaining)
            }
            (_, Some(init)) => {
                let kept = ((first.steps as f64 * init.strength) as usize).min(first.steps);
                (first.steps - kept) * sampler.order()
            }
            _ => 0,
        };
        let end = match &first.stage {
            Some(Stage::Base { switch }) => {
                let cutoff = timestep_cutoff(train, *switch);
                timesteps.iter().filter(|&&t| t as f64 >= cutoff).count()
            }
            _ => timesteps.len(),
        };
        if begin >= timesteps.len() {
            return Err(super::no_step_left(first));
        }
        let mut starts = Vec::with_capacity(requests.len());
        for (k, p) in requests.iter().enumerate() {
            let generator = noise
                .stream(k)
                .ok_or_else(|| EngineError::Internal("missing noise stream".into()))?;
            starts.push(match &p.stage {
                // The refiner continues the base's latents as they are (no noise added).
                Some(Stage::Refiner { latents, .. }) => Start {
                    latents: latents.to_dtype(self.dtype)?,
                    inpaint: None,
                },
                _ => self.initial_latents(p, generator, sampler.as_ref(), begin)?,
            });
        }
        let mut latents = Tensor::cat(&starts.iter().map(|s| &s.latents).collect::<Vec<_>>(), 0)?;
        let inpaint = InpaintRows::concat(&starts)?;
        // The 9-channel UNet's extra input, doubled for guidance like the latents.
        let extra_input = match (&inpaint, self.is_inpainting_unet()) {
            (Some(rows), true) => {
                let one = Tensor::cat(&[&rows.mask, &rows.masked], 1)?;
                Some(if cfg {
                    Tensor::cat(&[&one, &one], 0)?
                } else {
                    one
                })
            }
            _ => None,
        };

        let total = end.saturating_sub(begin);
        let added = added.as_ref().map(|(pooled, ids)| (pooled, ids.as_slice()));
        let mut steps = super::StepRunner::default();
        for (i, &t) in timesteps.iter().enumerate().take(end).skip(begin) {
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let mut input = sampler.scale_model_input(&input, i)?;
            if let Some(extra) = &extra_input {
                input = Tensor::cat(&[&input, extra], 1)?;
            }
            // The latents and the timestep's features change between steps; the prompt does not.
            let t_input = self.unet.timestep_input(t, &input)?;
            let out = steps.run([&input, &t_input], &|[input, t_input]| {
                self.unet
                    .forward_from_timestep_input(input, t_input, &context, added)
            })?;
            let guided = if cfg {
                let uncond = out.narrow(0, 0, rows)?;
                let text = out.narrow(0, rows, rows)?;
                (&uncond + ((text - &uncond)? * first.guidance_scale)?)?
            } else {
                out
            };
            latents = sampler.step(&guided, i, &latents, &mut noise)?;
            if let Some(InpaintRows {
                clean: Some(clean),
                noise: start_noise,
                mask,
                ..
            }) = &inpaint
            {
                // Blending inpainting (4-channel UNets): outside the mask, put back the picture
                // noised to the next step's level.
                let proper = if i + 1 < timesteps.len() {
                    sampler.add_noise(clean, start_noise, i + 1)?
                } else {
                    clean.clone()
                };
                latents = (mask.affine(-1.0, 1.0)?.broadcast_mul(&proper)?
                    + mask.broadcast_mul(&latents)?)?;
            }
            let elapsed = started.elapsed().as_secs_f64();
            if !progress(Progress {
                step: i + 1 - begin,
                total,
                elapsed_s: elapsed,
            }) {
                return Err(EngineError::Cancelled);
            }
        }

        // A base stage hands its latents to the refiner undecoded.
        super::split_rows(requests, &latents, |p, rows| {
            if matches!(p.stage, Some(Stage::Base { .. })) {
                Ok(Vec::new())
            } else {
                self.vae.decode_to_images(rows)
            }
        })
    }

    /// Whether the UNet is an inpainting one (latents + mask + masked-image latents in).
    pub fn is_inpainting_unet(&self) -> bool {
        self.unet.config.in_channels == 2 * self.vae.latent_channels() + 1
    }

    /// One request's starting latents (n, C, h, w) and, for inpainting, what the loop needs,
    /// drawn from its generator in diffusers' order. Text-to-image: `randn × init_noise_sigma`.
    /// Image-to-image: the picture's latent sample (one draw), repeated n times, noised to
    /// evaluation `begin` (a second draw). Inpainting (diffusers' inpaint pipeline): the picture's
    /// sample when blending (4-channel UNet) or strength < 1, the noise, then the masked
    /// picture's sample; strength 1 starts from pure noise.
    fn initial_latents(
        &self,
        p: &GenerateParams,
        generator: &mut crate::engine::rng::TorchGenerator,
        sampler: &dyn schedulers::Sampler,
        begin: usize,
    ) -> Result<Start> {
        let scale = self.vae_scale();
        let (h, w) = (p.height / scale, p.width / scale);
        let shape = (p.n, self.vae.latent_channels(), h, w);
        let numel = shape.0 * shape.1 * shape.2 * shape.3;
        let randn = |generator: &mut crate::engine::rng::TorchGenerator| -> Result<Tensor> {
            Ok(
                Tensor::from_vec(generator.randn_in(numel, self.dtype), shape, &self.device)?
                    .to_dtype(self.dtype)?,
            )
        };
        let Some(init) = &p.init else {
            return Ok(Start {
                latents: (randn(generator)? * sampler.init_noise_sigma() as f64)?,
                inpaint: None,
            });
        };
        let image = self.vae.image_tensor(&init.rgb, p.width, p.height)?;
        let Some(mask) = &init.mask else {
            let clean = self
                .vae
                .sample_latents(&image, generator)?
                .repeat((p.n, 1, 1, 1))?;
            let noise = randn(generator)?;
            return Ok(Start {
                latents: sampler.add_noise(&clean, &noise, begin)?,
                inpaint: None,
            });
        };
        let blend = !self.is_inpainting_unet();
        let full_strength = init.strength == 1.0;
        let clean = if blend || !full_strength {
            Some(
                self.vae
                    .sample_latents(&image, generator)?
                    .repeat((p.n, 1, 1, 1))?,
            )
        } else {
            None
        };
        let noise = randn(generator)?;
        let latents = match (&clean, full_strength) {
            (Some(clean), false) => sampler.add_noise(clean, &noise, begin)?,
            _ => (&noise * sampler.init_noise_sigma() as f64)?,
        };
        // The mask binarised at 0.5 (diffusers' mask processor), and the picture with the area
        // to repaint blacked out (zero in [-1, 1] space).
        let binary: Vec<f32> = mask
            .iter()
            .map(|&v| if (v as f32 / 255.0) < 0.5 { 0.0 } else { 1.0 })
            .collect();
        let full = Tensor::from_vec(binary, (1, 1, p.height, p.width), &self.device)?;
        let keep = full.affine(-1.0, 1.0)?;
        let masked_image = image.broadcast_mul(&keep.to_dtype(image.dtype())?)?;
        let masked = self
            .vae
            .sample_latents(&masked_image, generator)?
            .repeat((p.n, 1, 1, 1))?;
        let small = crate::engine::models::blocks::resize_nearest(&full, h, w)?
            .to_dtype(self.dtype)?
            .repeat((p.n, 1, 1, 1))?;
        Ok(Start {
            latents,
            inpaint: Some(InpaintRows {
                clean: if blend { clean } else { None },
                noise,
                mask: small,
                masked,
            }),
        })
    }

    /// The VAE encoder's latent distribution (mean, std) of an 8-bit RGB picture.
    pub fn encode_image(
        &self,
        rgb: &[u8],
        width: usize,
        height: usize,
    ) -> Result<(Tensor, Tensor)> {
        self.vae.encode_rgb(rgb, width, height)
    }

    /// `vae.decode(latents / scaling_factor)` then diffusers' postprocess to 8-bit RGB.
    pub fn decode_to_images(&self, latents: &Tensor) -> Result<Vec<GeneratedImage>> {
        self.vae.decode_to_images(latents)
    }
}
