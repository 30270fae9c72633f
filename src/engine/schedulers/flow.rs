//! Flow-matching Euler for rectified-flow models (SD3, FLUX), as diffusers'
//! `FlowMatchEulerDiscreteScheduler` with a static `shift`. The model predicts a velocity and each
//! step is `x + (sigma_next - sigma) * v`. Resolution-dependent shifting (`use_dynamic_shifting`)
//! needs the pipeline's `mu` and arrives with the SD3/FLUX pipelines.

use candle_core::Tensor;

use super::config::SchedulerConfig;
use super::Sampler;
use crate::engine::error::{EngineError, Result};
use crate::engine::rng::TorchGenerator;

pub struct FlowEulerSampler {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
}

impl FlowEulerSampler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        if config.use_dynamic_shifting == Some(true) {
            return Err(EngineError::Unsupported(
                "flow_euler with use_dynamic_shifting (needs the SD3/FLUX pipeline's resolution-dependent mu)".into(),
            ));
        }
        if config.invert_sigmas == Some(true)
            || config.shift_terminal.is_some()
            || config.stochastic_sampling == Some(true)
        {
            return Err(EngineError::Unsupported(
                "flow_euler with invert_sigmas, shift_terminal or stochastic_sampling".into(),
            ));
        }
        let n = config.num_train_timesteps();
        let shift = config.shift.unwrap_or(1.0) as f32;
        let shift_f32 = |s: f32| shift * s / (1.0 + (shift - 1.0) * s);
        // Construction: sigmas = shift(t / N) for t = N..1 (f32), giving sigma_max and sigma_min.
        let sigma_max = shift_f32(n as f32 / n as f32);
        let sigma_min = shift_f32(1.0 / n as f32);
        // set_timesteps: linspace in timestep units (f64), back to sigmas, shifted again (as diffusers does).
        let shift_f64 = |s: f64| shift as f64 * s / (1.0 + (shift as f64 - 1.0) * s);
        let mut sigmas: Vec<f32> = super::config::np_linspace(
            sigma_max as f64 * n as f64,
            sigma_min as f64 * n as f64,
            steps,
        )
        .into_iter()
        .map(|t| shift_f64(t / n as f64) as f32)
        .collect();
        let timesteps: Vec<f32> = sigmas.iter().map(|s| s * n as f32).collect();
        sigmas.push(0.0);
        Ok(Self { timesteps, sigmas })
    }
}

impl Sampler for FlowEulerSampler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor> {
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        sample + (model_output * dt as f64)?
    }
}
