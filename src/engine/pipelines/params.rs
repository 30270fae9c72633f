//! What a generation asks for, shared by every pipeline.

use candle_core::Tensor;

use crate::engine::schedulers::{SamplerKind, SigmaSchedule};

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
    /// Image-to-image: start from this picture instead of pure noise.
    pub init: Option<InitImage>,
    /// Two-stage SDXL (base + refiner, "ensemble of experts"): where the stages hand over, as a
    /// fraction of the noise schedule (diffusers' `denoising_end` / `denoising_start`).
    pub stage: Option<Stage>,
    /// The refiner model a served job hands over to (the scheduler loads both).
    pub refiner: Option<RefinerSpec>,
    /// Settings only the diffusion-transformer pipelines (SD3, FLUX) read.
    pub transformer: TransformerOptions,
}

/// Settings of the diffusion-transformer pipelines; the defaults are diffusers'.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TransformerOptions {
    /// T5 prompt tokens (diffusers' `max_sequence_length`; SD3 256, FLUX-dev 512, schnell 256).
    pub max_sequence_length: Option<usize>,
    /// SD3.5 Skip Layer Guidance.
    pub skip_layer_guidance: Option<SkipLayerGuidance>,
    /// FLUX: true classifier-free guidance with the negative prompt (diffusers'
    /// `true_cfg_scale`; on above 1 when a negative prompt is given). FLUX's `guidance_scale` is
    /// the distilled guidance the dev model takes as an input.
    pub true_cfg_scale: Option<f64>,
}

/// diffusers' `skip_guidance_layers` and friends: between `start` and `stop` (fractions of the
/// steps) a second guidance term pushes away from the model run without `layers`.
#[derive(Debug, Clone, PartialEq)]
pub struct SkipLayerGuidance {
    pub layers: Vec<usize>,
    pub scale: f64,
    pub start: f64,
    pub stop: f64,
}

impl SkipLayerGuidance {
    /// Stability's recommendation for SD3.5 Medium (diffusers' docstring): layers 7–9, scale
    /// 2.8, from 1 % to 20 % of the steps.
    pub fn sd35_medium() -> Self {
        Self {
            layers: vec![7, 8, 9],
            scale: 2.8,
            start: 0.01,
            stop: 0.2,
        }
    }

    /// Whether step `i` of `steps` applies it (diffusers' strict comparisons).
    pub fn active_at(&self, i: usize, steps: usize) -> bool {
        (i as f64) > steps as f64 * self.start && (i as f64) < steps as f64 * self.stop
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RefinerSpec {
    pub model: String,
    pub switch: f64,
}

/// One side of a two-stage run.
#[derive(Debug, Clone)]
pub enum Stage {
    /// Denoise only until the `switch` fraction of the schedule and return the latents (not
    /// decoded).
    Base { switch: f64 },
    /// Continue the base's latents (n, C, h, w) from the `switch` fraction to the end.
    Refiner { switch: f64, latents: Tensor },
}

/// The starting picture of an image-to-image run, already `width`×`height`.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// Row-major 8-bit RGB, `width * height * 3` bytes.
    pub rgb: std::sync::Arc<Vec<u8>>,
    /// How much to change it, (0, 1]: the run starts `strength × steps` steps before the end
    /// (1 = from pure noise, ignoring the picture's content but keeping its size).
    pub strength: f64,
    /// Inpainting: `width * height` 8-bit values, ≥ 128 (white) = repaint, < 128 = keep.
    pub mask: Option<std::sync::Arc<Vec<u8>>>,
}

/// Which guidance a run asks for — what decides whether its denoiser runs two rows per image.
/// Which of the two doubles the rows is the model's to say (`memory::Footprint`): classifier-free
/// guidance for SD, SDXL and SD3; for FLUX, whose `guidance_scale` is a distilled input, only
/// true CFG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guidance {
    /// `guidance_scale` above 1.
    pub scale: bool,
    /// `true_cfg_scale` above 1 (FLUX; it also needs negative prompts, which the estimate does
    /// not wait for).
    pub true_cfg: bool,
}

impl Guidance {
    /// A run at a model's defaults: guidance on, no true CFG.
    pub const DEFAULT: Self = Self {
        scale: true,
        true_cfg: false,
    };

    fn from_scales(guidance_scale: f64, true_cfg_scale: Option<f64>) -> Self {
        Self {
            scale: guidance_scale > 1.0,
            true_cfg: true_cfg_scale.is_some_and(|s| s > 1.0),
        }
    }
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
    /// Image-to-image strength (bits): it decides where the run starts.
    strength_bits: Option<u64>,
    /// Two-stage runs: which stage and where it switches (bits).
    stage: Option<(bool, u64)>,
    refiner: Option<(String, u64)>,
    inpaint: bool,
    max_sequence_length: Option<usize>,
    /// Skip Layer Guidance: layers and (scale, start, stop) bits.
    skip_layer_guidance: Option<(Vec<usize>, [u64; 3])>,
    true_cfg_bits: Option<u64>,
}

impl BatchKey {
    /// (width, height, guidance) — what working memory depends on.
    pub fn geometry(&self) -> (usize, usize, Guidance) {
        (
            self.width,
            self.height,
            Guidance::from_scales(
                f64::from_bits(self.guidance_bits),
                self.true_cfg_bits.map(f64::from_bits),
            ),
        )
    }
}

impl GenerateParams {
    /// Text to image at the model's own defaults (steps, guidance, sampler): seed 0, one image.
    pub fn with_defaults(
        card: &super::ModelCard,
        prompt: &str,
        width: usize,
        height: usize,
    ) -> Self {
        Self {
            transformer: Default::default(),
            prompt: prompt.into(),
            negative_prompt: None,
            width,
            height,
            steps: card.default_steps,
            guidance_scale: card.default_guidance,
            seed: 0,
            sampler: card.default_sampler,
            schedule: crate::engine::schedulers::SigmaSchedule::Default,
            n: 1,
            solver_order: None,
            clip_skip: 0,
            refiner: None,
            stage: None,
            init: None,
        }
    }

    /// The guidance this request asks for.
    pub fn guidance(&self) -> Guidance {
        Guidance::from_scales(self.guidance_scale, self.transformer.true_cfg_scale)
    }

    pub fn batch_key(&self) -> BatchKey {
        BatchKey {
            width: self.width,
            height: self.height,
            steps: self.steps,
            sampler: self.sampler,
            schedule: self.schedule,
            solver_order: self.solver_order,
            guidance_bits: self.guidance_scale.to_bits(),
            strength_bits: self.init.as_ref().map(|i| i.strength.to_bits()),
            inpaint: self.init.as_ref().is_some_and(|i| i.mask.is_some()),
            max_sequence_length: self.transformer.max_sequence_length,
            true_cfg_bits: self.transformer.true_cfg_scale.map(f64::to_bits),
            skip_layer_guidance: self.transformer.skip_layer_guidance.as_ref().map(|g| {
                (
                    g.layers.clone(),
                    [g.scale.to_bits(), g.start.to_bits(), g.stop.to_bits()],
                )
            }),
            refiner: self
                .refiner
                .as_ref()
                .map(|r| (r.model.clone(), r.switch.to_bits())),
            stage: self.stage.as_ref().map(|s| match s {
                Stage::Base { switch } => (false, switch.to_bits()),
                Stage::Refiner { switch, .. } => (true, switch.to_bits()),
            }),
        }
    }
}
