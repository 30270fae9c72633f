//! Flow-matching Euler for rectified-flow models (SD3, FLUX), as diffusers'
//! `FlowMatchEulerDiscreteScheduler`: static `shift`, or the resolution-dependent shift
//! (`use_dynamic_shifting`, mu from the image's token count as the SD3/FLUX pipelines compute it),
//! `shift_terminal`, and Karras / exponential / beta spacing of the shifted sigmas. The model
//! predicts a velocity and each step is `x + (sigma_next - sigma) * v`.

use candle_core::Tensor;

use super::config::{np_linspace, SchedulerConfig};
use super::{Sampler, SamplerOptions, SigmaSchedule};
use crate::engine::error::{EngineError, Result};
use crate::engine::rng::BatchNoise;

pub struct FlowEulerSampler {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
}

/// diffusers' `calculate_shift`: mu grows linearly with the image's latent token count between
/// (`base_image_seq_len`, `base_shift`) and (`max_image_seq_len`, `max_shift`).
pub fn dynamic_shift_mu(config: &SchedulerConfig, image_seq_len: usize) -> f64 {
    let base_len = config.base_image_seq_len.unwrap_or(256) as f64;
    let max_len = config.max_image_seq_len.unwrap_or(4096) as f64;
    let base_shift = config.base_shift.unwrap_or(0.5);
    let max_shift = config.max_shift.unwrap_or(1.15);
    let m = (max_shift - base_shift) / (max_len - base_len);
    let b = base_shift - m * base_len;
    image_seq_len as f64 * m + b
}

impl FlowEulerSampler {
    pub fn new(
        config: &SchedulerConfig,
        schedule: SigmaSchedule,
        steps: usize,
        options: &SamplerOptions,
    ) -> Result<Self> {
        if config.invert_sigmas == Some(true) || config.stochastic_sampling == Some(true) {
            return Err(EngineError::Unsupported(
                "flow_euler with invert_sigmas or stochastic_sampling".into(),
            ));
        }
        let n = config.num_train_timesteps() as f64;
        let shift = config.shift.unwrap_or(1.0);
        let static_shift = |s: f64| shift * s / (1.0 + (shift - 1.0) * s);
        let base: Vec<f64> = match &options.flow_sigmas {
            Some(sigmas) => sigmas.iter().map(|&s| s as f64).collect(),
            None => {
                // Construction: sigmas = t / N for t = N..1 (f32), statically shifted unless the
                // shift is dynamic, give sigma_max and sigma_min; set_timesteps spaces timesteps
                // linearly between them.
                let construction_shift = if config.use_dynamic_shifting == Some(true) {
                    1.0
                } else {
                    shift as f32
                };
                let shift_f32 =
                    |s: f32| construction_shift * s / (1.0 + (construction_shift - 1.0) * s);
                let sigma_max = shift_f32(1.0) as f64;
                let sigma_min = shift_f32(1.0 / n as f32) as f64;
                np_linspace(sigma_max * n, sigma_min * n, steps)
                    .into_iter()
                    .map(|t| t / n)
                    .collect()
            }
        };
        let mut sigmas: Vec<f64> = if config.use_dynamic_shifting == Some(true) {
            let seq_len = options.image_seq_len.ok_or_else(|| {
                EngineError::Internal(
                    "flow_euler with use_dynamic_shifting needs the image's token count".into(),
                )
            })?;
            let mu = dynamic_shift_mu(config, seq_len);
            let linear = match config.time_shift_type.as_deref() {
                None | Some("exponential") => false,
                Some("linear") => true,
                Some(other) => {
                    return Err(EngineError::Unsupported(format!(
                        "flow_euler time_shift_type `{other}`"
                    )))
                }
            };
            base.iter()
                .map(|&t| {
                    let tail = 1.0 / t - 1.0;
                    if linear {
                        mu / (mu + tail)
                    } else {
                        mu.exp() / (mu.exp() + tail)
                    }
                })
                .collect()
        } else {
            base.iter().map(|&s| static_shift(s)).collect()
        };
        if let Some(terminal) = config.shift_terminal {
            // Stretch so the last sigma lands on `shift_terminal`.
            let scale = (1.0 - sigmas[sigmas.len() - 1]) / (1.0 - terminal);
            sigmas
                .iter_mut()
                .for_each(|s| *s = 1.0 - (1.0 - *s) / scale);
        }
        let schedule = schedule.resolve(config);
        let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
        let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
        if let Some(s) = schedule.sigmas_between(sigma_min, sigma_max, sigmas.len()) {
            sigmas = s;
        }
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        let timesteps: Vec<f32> = sigmas.iter().map(|s| s * n as f32).collect();
        sigmas.push(0.0);
        Ok(Self { timesteps, sigmas })
    }
}

impl Sampler for FlowEulerSampler {
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, index: usize) -> candle_core::Result<Tensor> {
        // Flow matching interpolates: (1 − σ)·x0 + σ·noise (diffusers' `scale_noise`).
        let sigma = self.sigmas[index.min(self.sigmas.len() - 1)];
        (x0 * (1.0 - sigma) as f64)? + (noise * sigma as f64)?
    }

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
        _rng: &mut BatchNoise,
    ) -> candle_core::Result<Tensor> {
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        sample + (model_output * dt as f64)?
    }
}
