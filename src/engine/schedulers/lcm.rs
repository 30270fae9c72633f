//! Latent Consistency Model sampling, as diffusers' `LCMScheduler`: each step predicts the clean
//! sample with the consistency boundary condition, then re-noises to the next timestep (noise
//! from the job's stream), except after the last step.

use candle_core::Tensor;

use super::config::{PredictionType, SchedulerConfig};
use super::{predict_x0_vp, randn_like, Sampler, X0Limit};
use crate::engine::error::{EngineError, Result};
use crate::engine::rng::BatchNoise;

pub struct LcmSampler {
    timesteps: Vec<f32>,
    int_timesteps: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: PredictionType,
    x0_limit: X0Limit,
    timestep_scaling: f32,
}

impl LcmSampler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let train = config.num_train_timesteps();
        let original = config.original_inference_steps.unwrap_or(50);
        if original == 0 || original > train {
            return Err(EngineError::Unsupported(format!(
                "LCM original_inference_steps {original}"
            )));
        }
        if steps > original {
            return Err(EngineError::invalid(
                "steps",
                format!(
                    "the LCM sampler allows at most {original} steps (original_inference_steps)"
                ),
            ));
        }
        let k = train / original;
        // The distillation schedule, newest first, then `steps` evenly spaced indices into it.
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        let int_timesteps: Vec<usize> = (0..steps)
            .map(|i| {
                ((i as f64 * original as f64 / steps as f64).floor() as usize).min(original - 1)
            })
            .map(|idx| origin[idx])
            .collect();
        let alphas_cumprod = config.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            timesteps: int_timesteps.iter().map(|&t| t as f32).collect(),
            int_timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            prediction: config.prediction_type(),
            x0_limit: X0Limit::from_config(config, Some(false)),
            timestep_scaling: config.timestep_scaling.unwrap_or(10.0) as f32,
        })
    }
}

impl Sampler for LcmSampler {
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, index: usize) -> candle_core::Result<Tensor> {
        super::add_noise_at(x0, noise, &self.int_timesteps, &self.alphas_cumprod, index)
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        rng: &mut BatchNoise,
    ) -> candle_core::Result<Tensor> {
        let t = self.int_timesteps[i];
        let last = i + 1 == self.int_timesteps.len();
        let prev_t = if last { t } else { self.int_timesteps[i + 1] };
        let a_t = self.alphas_cumprod[t];
        let a_prev = self
            .alphas_cumprod
            .get(prev_t)
            .copied()
            .unwrap_or(self.final_alpha_cumprod);
        let scaled = t as f32 * self.timestep_scaling;
        let c_skip = 0.25 / (scaled * scaled + 0.25);
        let c_out = scaled / (scaled * scaled + 0.25).sqrt();
        let mut x0 = predict_x0_vp(self.prediction, model_output, sample, a_t)?;
        x0 = self.x0_limit.apply(x0)?;
        let denoised = ((x0 * c_out as f64)? + (sample * c_skip as f64)?)?;
        if last {
            return Ok(denoised);
        }
        let noise = randn_like(model_output, rng)?;
        (denoised * a_prev.sqrt() as f64)? + (noise * (1.0 - a_prev).sqrt() as f64)?
    }
}
