//! Euler and Euler-ancestral over discrete sigmas, as diffusers' `EulerDiscreteScheduler`
//! (s_churn = 0) and `EulerAncestralDiscreteScheduler`.

use candle_core::Tensor;

use super::config::{spaced_timesteps, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{div_scalar, predict_x0_ve, randn_like, Sampler, SigmaSchedule};
use crate::engine::error::Result;
use crate::engine::rng::BatchNoise;

pub struct EulerSampler {
    timesteps: Vec<f32>,
    /// One more than the timesteps: the last is the final sigma (0 unless `final_sigmas_type="sigma_min"`).
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    ancestral: bool,
}

/// `np.interp(x, arange(len(fp)), fp)` for x inside [0, len-1].
pub(super) fn interp_index(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    slope * (x - j as f64) + fp[j] as f64
}

/// diffusers' `_sigma_to_t`: invert the training sigmas by linear interpolation in log space.
pub(super) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // cumsum(dists >= 0).argmax(): the last index where log_sigma >= log_sigmas[i] (0 if none).
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0);
    let low = low.min(n - 2);
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[high] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// Timesteps and sigmas (final sigma appended) of the Euler family — shared by Euler, Euler a
/// and Heun, which build them identically in diffusers.
pub(super) struct DiscreteSchedule {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
}

/// `ancestral`: Euler a ignores the config's Karras/exponential flags and `final_sigmas_type`.
pub(super) fn discrete_schedule(
    config: &SchedulerConfig,
    schedule: SigmaSchedule,
    steps: usize,
    ancestral: bool,
) -> DiscreteSchedule {
    let train = config.num_train_timesteps();
    let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
    let alphas_cumprod = config.alphas_cumprod_sigma_safe();
    let train_sigmas: Vec<f32> = alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect();
    let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();

    let mut timesteps: Vec<f64> = spaced_timesteps(spacing, train, steps, config.steps_offset())
        .into_iter()
        .map(|t| t as f32 as f64)
        .collect();
    let mut sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&t| interp_index(t, &train_sigmas))
        .collect();

    let schedule = if ancestral {
        schedule
    } else {
        schedule.resolve(config)
    };
    let last = sigmas.len() - 1;
    let sigma_min = config.sigma_min.unwrap_or(sigmas[last]);
    let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
    if let Some(s) = schedule.sigmas_between(sigma_min, sigma_max, steps) {
        timesteps = s.iter().map(|&x| sigma_to_t(x, &log_sigmas)).collect();
        sigmas = s;
    }
    let final_sigma = if !ancestral && config.final_sigmas_type.as_deref() == Some("sigma_min") {
        train_sigmas[0] as f64
    } else {
        0.0
    };
    sigmas.push(final_sigma);
    let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
    let timesteps: Vec<f32> = timesteps.into_iter().map(|t| t as f32).collect();
    let init_noise_sigma = init_noise_sigma_for(config, &sigmas);
    DiscreteSchedule {
        timesteps,
        sigmas,
        init_noise_sigma,
    }
}

/// The initial noise scale of the sigma-space samplers: the largest sigma, or sqrt(σ² + 1) with
/// "leading" spacing (diffusers' rule).
pub(super) fn init_noise_sigma_for(config: &SchedulerConfig, sigmas: &[f32]) -> f32 {
    let max_sigma = sigmas.iter().copied().fold(f32::MIN, f32::max);
    match config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace) {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
        TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
    }
}

/// The model input of the sigma-space samplers: `x / sqrt(σ² + 1)`.
pub(super) fn scale_by_sigma(sample: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
    sample / ((sigma * sigma + 1.0).sqrt() as f64)
}

impl EulerSampler {
    pub fn new(
        config: &SchedulerConfig,
        schedule: SigmaSchedule,
        steps: usize,
        ancestral: bool,
    ) -> Result<Self> {
        let DiscreteSchedule {
            timesteps,
            sigmas,
            init_noise_sigma,
        } = discrete_schedule(config, schedule, steps, ancestral);
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction: config.prediction_type(),
            ancestral,
        })
    }

    fn sigma_index(&self, step: usize) -> usize {
        step.min(self.sigmas.len() - 2)
    }
}

impl Sampler for EulerSampler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        scale_by_sigma(sample, self.sigmas[self.sigma_index(step)])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        rng: &mut BatchNoise,
    ) -> candle_core::Result<Tensor> {
        let i = self.sigma_index(step);
        let sigma = self.sigmas[i];
        let x0 = predict_x0_ve(self.prediction, model_output, sample, sigma)?;
        let derivative = div_scalar(&(sample - x0)?, sigma)?;
        if !self.ancestral {
            let dt = self.sigmas[i + 1] - sigma;
            return sample + (derivative * dt as f64)?;
        }
        let (from, to) = (sigma, self.sigmas[i + 1]);
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let prev = (sample + (derivative * (sigma_down - sigma) as f64)?)?;
        let noise = randn_like(model_output, rng)?;
        prev + (noise * sigma_up as f64)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigma_to_t_inverts_training_sigmas() {
        let log_sigmas: Vec<f32> = (0..10).map(|i| (i as f32 * 0.5) - 2.0).collect();
        for i in 0..10 {
            let t = sigma_to_t((log_sigmas[i] as f64).exp(), &log_sigmas);
            assert!((t - i as f64).abs() < 1e-6, "{i} -> {t}");
        }
        let mid = sigma_to_t(
            ((log_sigmas[3] as f64 + log_sigmas[4] as f64) / 2.0).exp(),
            &log_sigmas,
        );
        assert!((mid - 3.5).abs() < 1e-6);
    }
}
