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

use std::str::FromStr;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use config::{PredictionType, SchedulerConfig, TimestepSpacing};

use crate::engine::error::{EngineError, Result};
use crate::engine::rng::TorchGenerator;

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
            ]
            .map(String::from),
        );
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
            | Self::Lms => &[
                SigmaSchedule::Default,
                SigmaSchedule::Karras,
                SigmaSchedule::Exponential,
            ],
            Self::EulerA | Self::Ddim | Self::Pndm | Self::Ddpm | Self::Lcm | Self::FlowEuler => {
                &[SigmaSchedule::Default]
            }
        }
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

/// How sigmas are spaced over the steps: the model config's own rule, or Karras / exponential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SigmaSchedule {
    #[default]
    Default,
    Karras,
    Exponential,
}

impl SigmaSchedule {
    pub fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Karras => "karras",
            Self::Exponential => "exponential",
        }
    }
}

impl FromStr for SigmaSchedule {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "default" => Ok(Self::Default),
            "karras" => Ok(Self::Karras),
            "exponential" => Ok(Self::Exponential),
            _ => Err(EngineError::invalid(
                "schedule",
                format!("unknown schedule `{s}`; available: default, karras, exponential"),
            )),
        }
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
    /// Advance one step; ancestral samplers draw their noise from `rng` exactly as diffusers does.
    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor>;
}

pub fn build(
    config: &SchedulerConfig,
    kind: SamplerKind,
    schedule: SigmaSchedule,
    steps: usize,
) -> Result<Box<dyn Sampler>> {
    config.check()?;
    let train = config.num_train_timesteps();
    if steps == 0 || steps > train {
        return Err(EngineError::invalid(
            "steps",
            format!("steps must be between 1 and {train}"),
        ));
    }
    kind.check_schedule(schedule)?;
    Ok(match kind {
        SamplerKind::Euler => Box::new(euler::EulerSampler::new(config, schedule, steps, false)?),
        SamplerKind::EulerA => Box::new(euler::EulerSampler::new(config, schedule, steps, true)?),
        SamplerKind::Ddim => Box::new(ddim::DdimSampler::new(config, steps)),
        SamplerKind::DpmPp2m => Box::new(dpmpp::DpmppSampler::new(config, schedule, steps, false)?),
        SamplerKind::DpmPp2mSde => {
            Box::new(dpmpp::DpmppSampler::new(config, schedule, steps, true)?)
        }
        SamplerKind::Pndm => Box::new(pndm::PndmSampler::new(config, steps)?),
        SamplerKind::Heun => Box::new(heun::HeunSampler::new(config, schedule, steps)),
        SamplerKind::Ddpm => Box::new(ddpm::DdpmSampler::new(config, steps)?),
        SamplerKind::Lcm => Box::new(lcm::LcmSampler::new(config, steps)?),
        SamplerKind::Dpm2 => Box::new(kdpm2::Kdpm2Sampler::new(config, schedule, steps)?),
        SamplerKind::Dpm2A => Box::new(kdpm2::Kdpm2Sampler::ancestral(config, schedule, steps)?),
        SamplerKind::Lms => Box::new(lms::LmsSampler::new(config, schedule, steps)),
        SamplerKind::FlowEuler => Box::new(flow::FlowEulerSampler::new(config, steps)?),
    })
}

/// Noise of `like`'s shape from the job's generator (torch.randn order), in `like`'s dtype/device.
pub fn randn_like(like: &Tensor, rng: &mut TorchGenerator) -> candle_core::Result<Tensor> {
    let values = rng.randn(like.elem_count());
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
            let c_skip = 1.0 / (sigma * sigma + 1.0);
            (model_output * c_out as f64)? + (sample * c_skip as f64)?
        }
    }
}

/// `clip_sample` / `clip_sample_range` with the sampler's own default for a missing key.
pub(crate) fn clip_range(config: &SchedulerConfig, default_on: bool) -> Option<f32> {
    config
        .clip_sample
        .unwrap_or(default_on)
        .then(|| config.clip_sample_range.unwrap_or(1.0) as f32)
}
