//! DDIM (eta = 0), as diffusers' `DDIMScheduler`.

use candle_core::Tensor;

use super::config::{spaced_timesteps, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{Sampler, X0Limit};
use crate::engine::rng::BatchNoise;

pub struct DdimSampler {
    timesteps: Vec<f32>,
    int_timesteps: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    step_ratio: usize,
    prediction: PredictionType,
    x0_limit: X0Limit,
}

/// Spaced integer timesteps as DDIM/DDPM compute them (missing `timestep_spacing` = "leading").
pub(super) fn integer_timesteps(config: &SchedulerConfig, steps: usize) -> Vec<usize> {
    let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
    spaced_timesteps(
        spacing,
        config.num_train_timesteps(),
        steps,
        config.steps_offset(),
    )
    .into_iter()
    .map(|t| t.round_ties_even().max(0.0) as usize)
    .collect()
}

impl DdimSampler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Self {
        let train = config.num_train_timesteps();
        let int_timesteps = integer_timesteps(config, steps);
        let alphas_cumprod = config.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let x0_limit = X0Limit::from_config(config, Some(true));
        Self {
            timesteps: int_timesteps.iter().map(|&t| t as f32).collect(),
            int_timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: train / steps,
            prediction: config.prediction_type(),
            x0_limit,
        }
    }
}

impl Sampler for DdimSampler {
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, index: usize) -> candle_core::Result<Tensor> {
        super::add_noise_at(x0, noise, &self.int_timesteps, &self.alphas_cumprod, index)
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        _rng: &mut BatchNoise,
    ) -> candle_core::Result<Tensor> {
        let t = self.int_timesteps[step];
        let alpha_t = self.alphas_cumprod[t.min(self.alphas_cumprod.len() - 1)];
        let alpha_prev = match t.checked_sub(self.step_ratio) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        let beta_t = 1.0 - alpha_t;
        let (sqrt_a, sqrt_b) = (alpha_t.sqrt() as f64, beta_t.sqrt() as f64);
        let (mut x0, eps) = match self.prediction {
            PredictionType::Epsilon => (
                ((sample - (model_output * sqrt_b)?)? / sqrt_a)?,
                model_output.clone(),
            ),
            PredictionType::Sample => (
                model_output.clone(),
                ((sample - (model_output * sqrt_a)?)? / sqrt_b)?,
            ),
            PredictionType::VPrediction => (
                ((sample * sqrt_a)? - (model_output * sqrt_b)?)?,
                ((model_output * sqrt_a)? + (sample * sqrt_b)?)?,
            ),
        };
        x0 = self.x0_limit.apply(x0)?;
        let direction = (eps * ((1.0 - alpha_prev).sqrt() as f64))?;
        (x0 * (alpha_prev.sqrt() as f64))? + direction
    }
}
