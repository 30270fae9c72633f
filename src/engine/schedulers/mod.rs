//! Samplers. A model holds one shared [`SchedulerConfig`]; every job builds its own stateful
//! [`Sampler`] from it with [`build`], so concurrent jobs never share step state.

pub mod config;
mod ddim;
mod euler;

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
}

impl SamplerKind {
    pub const ALL: &'static [SamplerKind] = &[SamplerKind::Euler, SamplerKind::EulerA, SamplerKind::Ddim];

    pub fn name(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::EulerA => "euler_a",
            Self::Ddim => "ddim",
        }
    }
}

impl FromStr for SamplerKind {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.iter().copied().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
            EngineError::invalid("sampler", format!("unknown sampler `{s}`; available: {}", names.join(", ")))
        })
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

impl FromStr for SigmaSchedule {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "default" => Ok(Self::Default),
            "karras" => Ok(Self::Karras),
            "exponential" => Ok(Self::Exponential),
            _ => Err(EngineError::invalid("schedule", format!("unknown schedule `{s}`; available: default, karras, exponential"))),
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
    /// Multiplier for the initial unit-variance noise.
    fn init_noise_sigma(&self) -> f32;
    fn scale_model_input(&self, sample: &Tensor, step: usize) -> candle_core::Result<Tensor>;
    /// Advance one step; ancestral samplers draw their noise from `rng` exactly as diffusers does.
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, rng: &mut TorchGenerator) -> candle_core::Result<Tensor>;
}

pub fn build(config: &SchedulerConfig, kind: SamplerKind, schedule: SigmaSchedule, steps: usize) -> Result<Box<dyn Sampler>> {
    config.check()?;
    let train = config.num_train_timesteps();
    if steps == 0 || steps > train {
        return Err(EngineError::invalid("steps", format!("steps must be between 1 and {train}")));
    }
    Ok(match kind {
        SamplerKind::Euler => Box::new(euler::EulerSampler::new(config, schedule, steps, false)?),
        SamplerKind::EulerA => Box::new(euler::EulerSampler::new(config, schedule, steps, true)?),
        SamplerKind::Ddim => {
            if schedule != SigmaSchedule::Default {
                return Err(EngineError::invalid("schedule", "ddim uses the model's own timestep schedule; use schedule=default"));
            }
            Box::new(ddim::DdimSampler::new(config, steps))
        }
    })
}

/// Noise of `like`'s shape from the job's generator (torch.randn order), in `like`'s dtype/device.
pub fn randn_like(like: &Tensor, rng: &mut TorchGenerator) -> candle_core::Result<Tensor> {
    let values = rng.randn(like.elem_count());
    Tensor::from_vec(values, like.shape(), like.device())?.to_dtype(like.dtype())
}
