//! Heun's second-order method over discrete sigmas, as diffusers' `HeunDiscreteScheduler`:
//! `2 * steps - 1` model evaluations (every sigma after the first is visited twice).

use candle_core::Tensor;

use super::config::{PredictionType, SchedulerConfig};
use super::euler::{discrete_schedule, init_noise_sigma_for, scale_by_sigma, DiscreteSchedule};
use super::{predict_x0_ve, Sampler, SigmaSchedule, X0Limit};
use crate::engine::rng::BatchNoise;

pub struct HeunSampler {
    timesteps: Vec<f32>,
    /// [s0, s1, s1, s2, s2, …, s_{n-1}, s_{n-1}, 0]
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    x0_limit: X0Limit,
    /// The first-order half-step: derivative, dt and the sample it started from.
    pending: Option<(Tensor, f32, Tensor)>,
}

impl HeunSampler {
    pub fn new(config: &SchedulerConfig, schedule: SigmaSchedule, steps: usize) -> Self {
        let DiscreteSchedule {
            timesteps, sigmas, ..
        } = discrete_schedule(config, schedule, steps, false);
        // Heun always ends at sigma 0 (it has no final_sigmas_type).
        let n = sigmas.len();
        let mut doubled = vec![sigmas[0]];
        for s in &sigmas[1..n - 1] {
            doubled.extend([*s, *s]);
        }
        doubled.push(0.0);
        let mut ts = vec![timesteps[0]];
        for t in &timesteps[1..] {
            ts.extend([*t, *t]);
        }
        let init_noise_sigma = init_noise_sigma_for(config, &doubled);
        Self {
            timesteps: ts,
            sigmas: doubled,
            init_noise_sigma,
            prediction: config.prediction_type(),
            x0_limit: X0Limit::from_config(config, Some(false)),
            pending: None,
        }
    }

    fn x0(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        sigma: f32,
    ) -> candle_core::Result<Tensor> {
        let x0 = predict_x0_ve(self.prediction, model_output, sample, sigma)?;
        self.x0_limit.apply(x0)
    }
}

impl Sampler for HeunSampler {
    fn order(&self) -> usize {
        2
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        scale_by_sigma(sample, self.sigmas[i])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _rng: &mut BatchNoise,
    ) -> candle_core::Result<Tensor> {
        match self.pending.take() {
            None => {
                let (sigma, sigma_next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = self.x0(model_output, sample, sigma)?;
                let derivative = ((sample - x0)? / sigma as f64)?;
                let dt = sigma_next - sigma;
                let out = (sample + (&derivative * dt as f64)?)?;
                self.pending = Some((derivative, dt, sample.clone()));
                Ok(out)
            }
            Some((prev_derivative, dt, start)) => {
                let sigma_next = self.sigmas[i];
                let x0 = self.x0(model_output, sample, sigma_next)?;
                let derivative = ((sample - x0)? / sigma_next as f64)?;
                let derivative = ((prev_derivative + derivative)? / 2.0)?;
                start + (derivative * dt as f64)?
            }
        }
    }
}
