//! Ancestral DDPM sampling over spaced timesteps, as diffusers' `DDPMScheduler` (variance types
//! `fixed_small`, `fixed_small_log`, `fixed_large`; noise from the job's stream while t > 0).

use candle_core::Tensor;

use super::config::{PredictionType, SchedulerConfig};
use super::{predict_x0_vp, randn_like, Sampler, X0Limit};
use crate::engine::error::{EngineError, Result};
use crate::engine::rng::BatchNoise;

/// diffusers' `variance_type`: fixed_small, fixed_small_log, fixed_large.
#[derive(Clone, Copy, PartialEq)]
enum Variance {
    Small,
    SmallLog,
    Large,
}

pub struct DdpmSampler {
    timesteps: Vec<f32>,
    int_timesteps: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    prediction: PredictionType,
    x0_limit: X0Limit,
    variance: Variance,
}

impl DdpmSampler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let variance = match config.variance_type.as_deref() {
            None | Some("fixed_small") => Variance::Small,
            Some("fixed_small_log") => Variance::SmallLog,
            Some("fixed_large") => Variance::Large,
            Some(other) => {
                return Err(EngineError::Unsupported(format!(
                    "DDPM variance_type `{other}`"
                )))
            }
        };
        let int_timesteps = super::ddim::integer_timesteps(config, steps);
        Ok(Self {
            timesteps: int_timesteps.iter().map(|&t| t as f32).collect(),
            int_timesteps,
            alphas_cumprod: config.alphas_cumprod(),
            prediction: config.prediction_type(),
            x0_limit: X0Limit::from_config(config, Some(true)),
            variance,
        })
    }
}

impl Sampler for DdpmSampler {
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
        let a_t = self.alphas_cumprod[t];
        let a_prev = self
            .int_timesteps
            .get(i + 1)
            .map_or(1.0, |&p| self.alphas_cumprod[p]);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let mut x0 = predict_x0_vp(self.prediction, model_output, sample, a_t)?;
        x0 = self.x0_limit.apply(x0)?;
        let x0_coeff = a_prev.sqrt() * cur_beta / b_t;
        let sample_coeff = cur_alpha.sqrt() * b_prev / b_t;
        let prev = ((x0 * x0_coeff as f64)? + (sample * sample_coeff as f64)?)?;
        if t == 0 {
            return Ok(prev);
        }
        let noise = randn_like(model_output, rng)?;
        let small = ((b_prev / b_t) * cur_beta).max(1e-20);
        let scale = match self.variance {
            Variance::Small => small.sqrt(),
            Variance::SmallLog => (0.5 * small.ln()).exp(),
            Variance::Large => cur_beta.sqrt(),
        };
        prev + (noise * scale as f64)?
    }
}
