//! Samplers. A model holds one shared [`SchedulerConfig`]; every job builds its own stateful
//! [`Sampler`] from it with [`build`], so concurrent jobs never share step state.

pub mod config;
mod ddim;
mod ddpm;
mod dpmpp;
mod euler;
mod flow;
mod heun;
mod kdpm2;
mod lcm;
mod lms;
mod pndm;
mod unipc;

use std::str::FromStr;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use config::{PredictionType, SchedulerConfig, TimestepSpacing};

use crate::engine::error::{EngineError, Result};
use crate::engine::rng::BatchNoise;

/// The sampler a request names (A1111-style names; diffusers class in the comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// `EulerDiscreteScheduler`
    Euler,
    /// `EulerAncestralDiscreteScheduler`
    EulerA,
    /// `DDIMScheduler` (eta = 0)
    Ddim,
    /// `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`
    DpmPp2m,
    /// `DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)`
    DpmPp2mSde,
    /// `PNDMScheduler` (PLMS; the SD 1.x default)
    Pndm,
    /// `HeunDiscreteScheduler`
    Heun,
    /// `DDPMScheduler`
    Ddpm,
    /// `LCMScheduler` (for LCM-distilled models and LCM-LoRA)
    Lcm,
    /// `KDPM2DiscreteScheduler`
    Dpm2,
    /// `KDPM2AncestralDiscreteScheduler`
    Dpm2A,
    /// `LMSDiscreteScheduler`
    Lms,
    /// `UniPCMultistepScheduler` (bh2, order from the config, default 2)
    UniPc,
    /// `FlowMatchEulerDiscreteScheduler` (rectified-flow models: SD3, FLUX)
    FlowEuler,
}

impl SamplerKind {
    pub const ALL: &'static [SamplerKind] = &[
        SamplerKind::Euler,
        SamplerKind::EulerA,
        SamplerKind::Ddim,
        SamplerKind::DpmPp2m,
        SamplerKind::DpmPp2mSde,
        SamplerKind::Pndm,
        SamplerKind::Heun,
        SamplerKind::Ddpm,
        SamplerKind::Lcm,
        SamplerKind::Dpm2,
        SamplerKind::Dpm2A,
        SamplerKind::Lms,
        SamplerKind::UniPc,
        SamplerKind::FlowEuler,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::EulerA => "euler_a",
            Self::Ddim => "ddim",
            Self::DpmPp2m => "dpmpp_2m",
            Self::DpmPp2mSde => "dpmpp_2m_sde",
            Self::Pndm => "pndm",
            Self::Heun => "heun",
            Self::Ddpm => "ddpm",
            Self::Lcm => "lcm",
            Self::Dpm2 => "dpm_2",
            Self::Dpm2A => "dpm_2_a",
            Self::Lms => "lms",
            Self::UniPc => "unipc",
            Self::FlowEuler => "flow_euler",
        }
    }

    /// Names people type in A1111 / ComfyUI / diffusers, mapped to ours (after normalisation:
    /// lower-case, `+` -> `p`, spaces and dashes -> `_`).
    const ALIASES: &'static [(&'static str, SamplerKind)] = &[
        ("euler_a", SamplerKind::EulerA),
        ("euler_ancestral", SamplerKind::EulerA),
        ("k_euler_a", SamplerKind::EulerA),
        ("k_euler_ancestral", SamplerKind::EulerA),
        ("k_euler", SamplerKind::Euler),
        ("eulerdiscretescheduler", SamplerKind::Euler),
        ("eulerancestraldiscretescheduler", SamplerKind::EulerA),
        ("ddimscheduler", SamplerKind::Ddim),
        ("dpmpp_2m", SamplerKind::DpmPp2m),
        ("k_dpmpp_2m", SamplerKind::DpmPp2m),
        ("dpmsolvermultistepscheduler", SamplerKind::DpmPp2m),
        ("dpmpp_2m_sde", SamplerKind::DpmPp2mSde),
        ("dpmpp_2m_sde_gpu", SamplerKind::DpmPp2mSde),
        ("k_dpmpp_2m_sde", SamplerKind::DpmPp2mSde),
        ("plms", SamplerKind::Pndm),
        ("k_heun", SamplerKind::Heun),
        ("heundiscretescheduler", SamplerKind::Heun),
        ("ddpmscheduler", SamplerKind::Ddpm),
        ("lcmscheduler", SamplerKind::Lcm),
        ("dpm2", SamplerKind::Dpm2),
        ("k_dpm_2", SamplerKind::Dpm2),
        ("kdpm2discretescheduler", SamplerKind::Dpm2),
        ("dpm2_a", SamplerKind::Dpm2A),
        ("k_dpm_2_a", SamplerKind::Dpm2A),
        ("kdpm2ancestraldiscretescheduler", SamplerKind::Dpm2A),
        ("k_lms", SamplerKind::Lms),
        ("lmsdiscretescheduler", SamplerKind::Lms),
        ("flowmatcheulerdiscretescheduler", SamplerKind::FlowEuler),
        ("pndmscheduler", SamplerKind::Pndm),
        ("uni_pc", SamplerKind::UniPc),
        ("uni_pc_bh2", SamplerKind::UniPc),
        ("unipcmultistepscheduler", SamplerKind::UniPc),
    ];

    /// Every accepted spelling (for `/v1/models` and the docs).
    pub fn accepted_names() -> Vec<String> {
        let mut names: Vec<String> = Self::ALL.iter().map(|k| k.name().to_string()).collect();
        names.extend(
            [
                "Euler",
                "Euler a",
                "DDIM",
                "DPM++ 2M",
                "DPM++ 2M Karras",
                "DPM++ 2M SDE",
                "DPM++ 2M SDE Karras",
                "dpmpp_2m_sde_gpu",
                "k_euler_a",
                "PLMS",
                "Heun",
                "Heun Karras",
                "DPM2",
                "DPM2 Karras",
                "DPM2 a",
                "DPM2 a Karras",
                "LMS",
                "LMS Karras",
                "UniPC",
                "uni_pc_bh2",
                "Euler SGM Uniform",
                "DPM++ 2M Beta",
            ]
            .map(String::from),
        );
        for (alias, _) in Self::ALIASES {
            if !names.iter().any(|n| n == alias) {
                names.push(alias.to_string());
            }
        }
        names
    }

    /// Parse a sampler name, possibly with a schedule suffix ("DPM++ 2M Karras").
    pub fn parse_with_schedule(s: &str) -> Result<(Self, Option<SigmaSchedule>)> {
        let mut norm: String = s
            .trim()
            .to_lowercase()
            .replace('+', "p")
            .chars()
            .map(|c| if c == ' ' || c == '-' { '_' } else { c })
            .collect();
        let mut schedule = None;
        for (suffix, sched) in [
            ("_karras", SigmaSchedule::Karras),
            ("_exponential", SigmaSchedule::Exponential),
            ("_beta", SigmaSchedule::Beta),
            ("_sgm_uniform", SigmaSchedule::SgmUniform),
        ] {
            if let Some(stripped) = norm.strip_suffix(suffix) {
                norm = stripped.to_string();
                schedule = Some(sched);
            }
        }
        let kind = Self::ALL
            .iter()
            .copied()
            .find(|k| k.name() == norm)
            .or_else(|| {
                Self::ALIASES
                    .iter()
                    .find(|(a, _)| *a == norm)
                    .map(|(_, k)| *k)
            })
            .ok_or_else(|| {
                EngineError::invalid(
                    "sampler",
                    format!(
                        "unknown sampler `{s}`; available: {}",
                        Self::accepted_names().join(", ")
                    ),
                )
            })?;
        Ok((kind, schedule))
    }

    /// Samplers for rectified-flow models (SD3, FLUX) rather than diffusion (SD 1.x/2.x, SDXL).
    pub fn is_flow(self) -> bool {
        self == Self::FlowEuler
    }

    /// The schedules diffusers offers for this sampler.
    pub fn schedules(self) -> &'static [SigmaSchedule] {
        match self {
            Self::Euler
            | Self::DpmPp2m
            | Self::DpmPp2mSde
            | Self::Heun
            | Self::Dpm2
            | Self::Dpm2A
            | Self::Lms
            | Self::UniPc => SigmaSchedule::ALL,
            Self::EulerA | Self::Ddim | Self::Pndm | Self::Ddpm => {
                &[SigmaSchedule::Default, SigmaSchedule::SgmUniform]
            }
            // LCM picks its timesteps from its distillation schedule, ignoring the spacing.
            Self::FlowEuler => &[
                SigmaSchedule::Default,
                SigmaSchedule::Karras,
                SigmaSchedule::Exponential,
                SigmaSchedule::Beta,
            ],
            Self::Lcm => &[SigmaSchedule::Default],
        }
    }

    /// Samplers whose diffusers class applies dynamic thresholding (`thresholding: true`).
    fn honours_thresholding(self) -> bool {
        matches!(
            self,
            Self::Ddim | Self::Ddpm | Self::Lcm | Self::DpmPp2m | Self::DpmPp2mSde | Self::UniPc
        )
    }

    /// Samplers whose diffusers class applies `rescale_betas_zero_snr`.
    fn honours_zero_snr(self) -> bool {
        matches!(
            self,
            Self::Ddim
                | Self::Ddpm
                | Self::Lcm
                | Self::Euler
                | Self::EulerA
                | Self::DpmPp2m
                | Self::DpmPp2mSde
                | Self::UniPc
        )
    }

    /// A model config feature this sampler would silently ignore (diffusers' `from_config` drops
    /// keys a class does not know) is refused instead: the images would be wrong.
    fn check_config(self, config: &SchedulerConfig) -> Result<()> {
        let refuse = |feature: &str, ok: fn(SamplerKind) -> bool| {
            let usable: Vec<&str> = Self::ALL
                .iter()
                .filter(|k| ok(**k))
                .map(|k| k.name())
                .collect();
            Err(EngineError::Incompatible {
                param: "sampler",
                message: format!(
                    "this model's scheduler config sets `{feature}`, which sampler `{}` does not implement; use one of: {}",
                    self.name(),
                    usable.join(", ")
                ),
            })
        };
        if config.thresholding == Some(true) && !self.honours_thresholding() {
            return refuse("thresholding", Self::honours_thresholding);
        }
        if config.rescale_betas_zero_snr == Some(true) && !self.honours_zero_snr() {
            return refuse("rescale_betas_zero_snr", Self::honours_zero_snr);
        }
        Ok(())
    }

    /// A clear error for a combination diffusers does not offer (never a silent fallback).
    pub fn check_schedule(self, schedule: SigmaSchedule) -> Result<()> {
        if self.schedules().contains(&schedule) {
            Ok(())
        } else {
            Err(EngineError::Incompatible {
                param: "schedule",
                message: format!(
                    "sampler `{}` supports only the schedules: {}",
                    self.name(),
                    self.schedules()
                        .iter()
                        .map(|s| s.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
        }
    }
}

impl FromStr for SamplerKind {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse_with_schedule(s).map(|(k, _)| k)
    }
}

/// How noise levels are spaced over the steps: the model config's own rule, Karras, exponential,
/// beta, or SGM-uniform (the default sigmas at "trailing" timestep spacing, as ComfyUI's
/// `sgm_uniform` and diffusers' docs map it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SigmaSchedule {
    #[default]
    Default,
    Karras,
    Exponential,
    Beta,
    SgmUniform,
}

impl SigmaSchedule {
    pub const ALL: &'static [SigmaSchedule] = &[
        SigmaSchedule::Default,
        SigmaSchedule::Karras,
        SigmaSchedule::Exponential,
        SigmaSchedule::Beta,
        SigmaSchedule::SgmUniform,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Karras => "karras",
            Self::Exponential => "exponential",
            Self::Beta => "beta",
            Self::SgmUniform => "sgm_uniform",
        }
    }

    /// `Default` means whatever the model's config asks for (`use_karras_sigmas`, ...), as
    /// diffusers' `from_config` would build it.
    pub(crate) fn resolve(self, config: &SchedulerConfig) -> SigmaSchedule {
        match self {
            Self::Default if config.use_karras_sigmas == Some(true) => Self::Karras,
            Self::Default if config.use_exponential_sigmas == Some(true) => Self::Exponential,
            Self::Default if config.use_beta_sigmas == Some(true) => Self::Beta,
            s => s,
        }
    }

    /// The noise levels of the Karras / exponential / beta rules between the given ends, from
    /// high to low (`None` for the schedules that come from timesteps instead).
    pub(crate) fn sigmas_between(
        self,
        sigma_min: f64,
        sigma_max: f64,
        steps: usize,
    ) -> Option<Vec<f64>> {
        match self {
            Self::Karras => Some(config::karras_sigmas(sigma_min, sigma_max, steps)),
            Self::Exponential => Some(config::exponential_sigmas(sigma_min, sigma_max, steps)),
            Self::Beta => Some(config::beta_sigmas(sigma_min, sigma_max, steps)),
            Self::Default | Self::SgmUniform => None,
        }
    }
}

impl FromStr for SigmaSchedule {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        let norm = s.trim().to_lowercase().replace([' ', '-'], "_");
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.name() == norm)
            .ok_or_else(|| {
                EngineError::invalid(
                    "schedule",
                    format!(
                        "unknown schedule `{s}`; available: {}",
                        Self::ALL
                            .iter()
                            .map(|k| k.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })
    }
}

/// One job's sampler state. The pipeline calls, for each `i` in `0..timesteps().len()`:
/// `scale_model_input(x, i)`, the model, then `step(out, i, x, rng)`.
pub trait Sampler: Send {
    /// The timestep fed to the model at each step.
    fn timesteps(&self) -> &[f32];
    /// The noise levels, one more than the timesteps (samplers that work in sigma space only).
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
    /// Multiplier for the initial unit-variance noise (1 for samplers in the variance-preserving form).
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }
    /// The model's input at `step` (identity for samplers in the variance-preserving form).
    fn scale_model_input(&self, sample: &Tensor, _step: usize) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }
    /// Evaluations per step (2 for Heun and DPM2, whose timestep lists interleave two); an
    /// image-to-image run starting `k` steps in begins at evaluation `k × order`.
    fn order(&self) -> usize {
        1
    }
    /// Noise clean latents `x0` to the level of evaluation `index`, as diffusers' `add_noise`
    /// (image-to-image's starting point). The default is the sigma-space samplers'
    /// `x0 + σ·noise`; variance-preserving and flow samplers override it.
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, index: usize) -> candle_core::Result<Tensor> {
        let sigmas = self.sigmas().ok_or_else(|| {
            candle_core::Error::Msg("this sampler must define how it adds noise".into())
        })?;
        add_noise_ve(x0, noise, sigmas[index.min(sigmas.len() - 1)])
    }
    /// Advance one step; ancestral samplers draw their noise from `rng` exactly as diffusers does.
    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        rng: &mut BatchNoise,
    ) -> candle_core::Result<Tensor>;
}

/// What a job asks of its sampler beyond the name, schedule and step count.
#[derive(Debug, Clone, Default)]
pub struct SamplerOptions {
    /// The multistep solvers' order (DPM++, UniPC), 1 to 3; each sampler's own default if unset.
    pub solver_order: Option<usize>,
    /// The image's latent token count, for flow models with resolution-dependent shift.
    pub image_seq_len: Option<usize>,
    /// Explicit flow sigmas before shifting (FLUX's pipeline passes linspace(1, 1/n, n)).
    pub flow_sigmas: Option<Vec<f32>>,
}

impl SamplerOptions {
    /// Options that make no sense for `kind` are an error, not silently dropped.
    pub fn check(&self, kind: SamplerKind) -> Result<()> {
        if let Some(order) = self.solver_order {
            if !(1..=3).contains(&order) {
                return Err(EngineError::invalid(
                    "solver_order",
                    "solver_order must be 1, 2 or 3",
                ));
            }
            if !matches!(
                kind,
                SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde | SamplerKind::UniPc
            ) {
                return Err(EngineError::Incompatible {
                    param: "solver_order",
                    message: format!(
                        "solver_order applies to the multistep samplers (dpmpp_2m, dpmpp_2m_sde, unipc), not `{}`",
                        kind.name()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The sampler for one job, with default options.
pub fn build(
    config: &SchedulerConfig,
    kind: SamplerKind,
    schedule: SigmaSchedule,
    steps: usize,
) -> Result<Box<dyn Sampler>> {
    build_with(config, kind, schedule, steps, &SamplerOptions::default())
}

pub fn build_with(
    config: &SchedulerConfig,
    kind: SamplerKind,
    schedule: SigmaSchedule,
    steps: usize,
    options: &SamplerOptions,
) -> Result<Box<dyn Sampler>> {
    options.check(kind)?;
    config.check()?;
    let train = config.num_train_timesteps();
    if steps == 0 || steps > train {
        return Err(EngineError::invalid(
            "steps",
            format!("steps must be between 1 and {train}"),
        ));
    }
    kind.check_schedule(schedule)?;
    kind.check_config(config)?;
    let trailing;
    let (config, schedule) = if schedule == SigmaSchedule::SgmUniform {
        trailing = SchedulerConfig {
            timestep_spacing: Some(TimestepSpacing::Trailing),
            use_karras_sigmas: None,
            use_exponential_sigmas: None,
            use_beta_sigmas: None,
            ..config.clone()
        };
        (&trailing, SigmaSchedule::Default)
    } else {
        (config, schedule)
    };
    Ok(match kind {
        SamplerKind::Euler => Box::new(euler::EulerSampler::new(config, schedule, steps, false)?),
        SamplerKind::EulerA => Box::new(euler::EulerSampler::new(config, schedule, steps, true)?),
        SamplerKind::Ddim => Box::new(ddim::DdimSampler::new(config, steps)),
        SamplerKind::DpmPp2m => Box::new(dpmpp::DpmppSampler::new(
            config,
            schedule,
            steps,
            false,
            options.solver_order.unwrap_or(2),
        )?),
        SamplerKind::DpmPp2mSde => Box::new(dpmpp::DpmppSampler::new(
            config,
            schedule,
            steps,
            true,
            options.solver_order.unwrap_or(2),
        )?),
        SamplerKind::Pndm => Box::new(pndm::PndmSampler::new(config, steps)?),
        SamplerKind::Heun => Box::new(heun::HeunSampler::new(config, schedule, steps)),
        SamplerKind::Ddpm => Box::new(ddpm::DdpmSampler::new(config, steps)?),
        SamplerKind::Lcm => Box::new(lcm::LcmSampler::new(config, steps)?),
        SamplerKind::Dpm2 => Box::new(kdpm2::Kdpm2Sampler::new(config, schedule, steps)?),
        SamplerKind::Dpm2A => Box::new(kdpm2::Kdpm2Sampler::ancestral(config, schedule, steps)?),
        SamplerKind::Lms => Box::new(lms::LmsSampler::new(config, schedule, steps)),
        SamplerKind::UniPc => Box::new(unipc::UniPcSampler::new(
            config,
            schedule,
            steps,
            options.solver_order.or(config.solver_order).unwrap_or(2),
        )?),
        SamplerKind::FlowEuler => Box::new(flow::FlowEulerSampler::new(
            config, schedule, steps, options,
        )?),
    })
}

/// Noise of `like`'s shape from the batch's generators (torch.randn order per request), in
/// `like`'s dtype/device.
pub fn randn_like(like: &Tensor, rng: &mut BatchNoise) -> candle_core::Result<Tensor> {
    let values = rng
        .randn_in(like.elem_count(), like.dtype())
        .map_err(candle_core::Error::Msg)?;
    Tensor::from_vec(values, like.shape(), like.device())?.to_dtype(like.dtype())
}

/// The clean-sample prediction x0 from a model output, in the variance-preserving form
/// (`alpha_prod` = ᾱ_t), as DDIM, DDPM and LCM compute it.
pub(crate) fn predict_x0_vp(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod: f32,
) -> candle_core::Result<Tensor> {
    let (sqrt_a, sqrt_b) = (alpha_prod.sqrt() as f64, (1.0 - alpha_prod).sqrt() as f64);
    match prediction {
        PredictionType::Epsilon => (sample - (model_output * sqrt_b)?)? / sqrt_a,
        PredictionType::Sample => Ok(model_output.clone()),
        PredictionType::VPrediction => (sample * sqrt_a)? - (model_output * sqrt_b)?,
    }
}

/// The clean-sample prediction from a model output, in the sigma (variance-exploding) form the
/// Euler family uses.
pub(crate) fn predict_x0_ve(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> candle_core::Result<Tensor> {
    match prediction {
        PredictionType::Epsilon => sample - (model_output * sigma as f64)?,
        PredictionType::Sample => Ok(model_output.clone()),
        PredictionType::VPrediction => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            (model_output * c_out as f64)? + div_scalar(sample, sigma * sigma + 1.0)?
        }
    }
}

/// `x0 + σ·noise`: the sigma-space samplers' (variance-exploding) noising.
pub(crate) fn add_noise_ve(x0: &Tensor, noise: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
    x0 + (noise * sigma as f64)?
}

/// `sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·noise`: the variance-preserving samplers' noising.
pub(crate) fn add_noise_vp(
    x0: &Tensor,
    noise: &Tensor,
    alpha_prod: f32,
) -> candle_core::Result<Tensor> {
    (x0 * alpha_prod.sqrt() as f64)? + (noise * (1.0 - alpha_prod).sqrt() as f64)?
}

/// [`add_noise_vp`] at the integer timestep of evaluation `index` (DDIM, DDPM, PNDM, LCM).
pub(crate) fn add_noise_at(
    x0: &Tensor,
    noise: &Tensor,
    int_timesteps: &[usize],
    alphas_cumprod: &[f32],
    index: usize,
) -> candle_core::Result<Tensor> {
    let t = int_timesteps[index.min(int_timesteps.len() - 1)];
    add_noise_vp(x0, noise, alphas_cumprod[t.min(alphas_cumprod.len() - 1)])
}

/// `t / v` as a true division. candle's `Tensor / f64` multiplies by the reciprocal, which
/// differs by an ulp; where a step divides a large sample by a large sigma (zero-terminal-SNR
/// schedules start at sigma 4096) that ulp is amplified back by the step size.
pub(crate) fn div_scalar(t: &Tensor, v: f32) -> candle_core::Result<Tensor> {
    t.broadcast_div(&Tensor::new(v, t.device())?.to_dtype(t.dtype())?)
}

/// What a sampler does to its x0 prediction before using it: nothing, clip to a range
/// (`clip_sample`), or dynamic thresholding (Imagen's; `thresholding`, which wins over clipping
/// as in diffusers).
#[derive(Debug, Clone, Copy)]
pub(crate) enum X0Limit {
    None,
    Clip(f32),
    Threshold { ratio: f32, max: f32 },
}

impl X0Limit {
    /// `clip_default`: the sampler's default for a missing `clip_sample` (`None` for samplers
    /// without that option).
    pub fn from_config(config: &SchedulerConfig, clip_default: Option<bool>) -> Self {
        if config.thresholding == Some(true) {
            return Self::Threshold {
                ratio: config.dynamic_thresholding_ratio.unwrap_or(0.995) as f32,
                max: config.sample_max_value.unwrap_or(1.0) as f32,
            };
        }
        match clip_default {
            Some(default_on) if config.clip_sample.unwrap_or(default_on) => {
                Self::Clip(config.clip_sample_range.unwrap_or(1.0) as f32)
            }
            _ => Self::None,
        }
    }

    pub fn apply(&self, x0: Tensor) -> candle_core::Result<Tensor> {
        match *self {
            Self::None => Ok(x0),
            Self::Clip(r) => x0.clamp(-r, r),
            Self::Threshold { ratio, max } => dynamic_threshold(&x0, ratio, max),
        }
    }
}

/// Per batch item: s = the `ratio` quantile of |x0| (torch.quantile's linear interpolation),
/// clamped to [1, max]; then x0 is clamped to [-s, s] and divided by s.
fn dynamic_threshold(x0: &Tensor, ratio: f32, max: f32) -> candle_core::Result<Tensor> {
    let dtype = x0.dtype();
    let batch = x0.dim(0)?;
    let flat = x0.to_dtype(candle_core::DType::F32)?.reshape((batch, ()))?;
    let mut rows = Vec::with_capacity(batch);
    for b in 0..batch {
        let row = flat.get(b)?;
        let mut abs: Vec<f32> = row.abs()?.to_vec1()?;
        abs.sort_by(f32::total_cmp);
        let rank = ratio * (abs.len() - 1) as f32;
        let lo = rank.floor();
        let w = rank - lo;
        let (a, z) = (
            abs[lo as usize],
            abs[(rank.ceil() as usize).min(abs.len() - 1)],
        );
        // torch.lerp's two-sided formula.
        let q = if w < 0.5 {
            a + w * (z - a)
        } else {
            z - (z - a) * (1.0 - w)
        };
        let s = q.clamp(1.0, max.max(1.0));
        rows.push((row.clamp(-s, s)? / s as f64)?);
    }
    Tensor::stack(&rows, 0)?
        .reshape(x0.shape())?
        .to_dtype(dtype)
}
