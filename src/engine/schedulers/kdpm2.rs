//! DPM-Solver-2 (Karras et al.'s "DPM2"), as diffusers' `KDPM2DiscreteScheduler`, and its
//! ancestral variant (`KDPM2AncestralDiscreteScheduler`): each step evaluates the model at the
//! sigma and at a log-midpoint, so a run makes `2 * steps - 1` model evaluations. Both variants
//! share one stepper; they differ only in the arrays built here (where the midpoint lies, where
//! the step lands, and whether fresh noise is added).

use candle_core::Tensor;

use super::config::{PredictionType, SchedulerConfig};
use super::euler::{
    discrete_schedule, init_noise_sigma_for, scale_by_sigma, sigma_to_t, DiscreteSchedule,
};
use super::{predict_x0_ve, randn_like, Sampler, SigmaSchedule};
use crate::engine::error::{EngineError, Result};
use crate::engine::rng::BatchNoise;

/// torch.lerp(a, b, 0.5) in f32 (the `end - diff * (1 - w)` branch torch takes for w >= 0.5).
fn lerp_half(a: f32, b: f32) -> f32 {
    b - (b - a) * 0.5
}

fn interleave(v: &[f32]) -> Vec<f32> {
    let mut out = vec![v[0]];
    for x in &v[1..] {
        out.extend([*x, *x]);
    }
    out.push(v[v.len() - 1]);
    out
}

/// (timesteps, sigmas, log-sigmas of training, prediction type): see [`prepare`].
type Prepared = (Vec<f32>, Vec<f32>, Vec<f32>, PredictionType);

/// What both DPM2 variants start from: the Euler-family schedule (Karras timesteps rounded, as
/// diffusers does here), the training log-sigmas, and the prediction type.
fn prepare(
    config: &SchedulerConfig,
    schedule: SigmaSchedule,
    steps: usize,
    name: &str,
) -> Result<Prepared> {
    let prediction = config.prediction_type();
    if prediction == PredictionType::Sample {
        return Err(EngineError::Unsupported(format!(
            "{name} with prediction_type `sample` (diffusers rejects it too)"
        )));
    }
    let DiscreteSchedule {
        mut timesteps,
        sigmas,
        ..
    } = discrete_schedule(config, schedule, steps, false);
    if schedule.resolve(config) == SigmaSchedule::Karras {
        timesteps.iter_mut().for_each(|t| *t = t.round_ties_even());
    }
    let log_sigmas: Vec<f32> = config
        .alphas_cumprod()
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt().ln())
        .collect();
    Ok((timesteps, sigmas, log_sigmas, prediction))
}

/// Per-evaluation arrays, aligned so that evaluation `i` of a first half-step reads index `i`
/// and a second half-step reads index `i - 1` (diffusers indexes the two variants differently;
/// the constructors absorb that).
pub struct Kdpm2Sampler {
    timesteps: Vec<f32>,
    /// [s0, s1, s1, …, s_{n-1}, s_{n-1}, 0, 0] (diffusers' interleaving)
    sigmas: Vec<f32>,
    /// The midpoint sigma of the step.
    midpoints: Vec<f32>,
    /// Where the second half-step lands.
    targets: Vec<f32>,
    /// Ancestral only: the size of the fresh noise added after the second half-step.
    noise_scales: Option<Vec<f32>>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    /// The sample at the start of the current step while its second evaluation is pending.
    pending: Option<Tensor>,
}

impl Kdpm2Sampler {
    pub fn new(config: &SchedulerConfig, schedule: SigmaSchedule, steps: usize) -> Result<Self> {
        let (timesteps, sigmas, log_sigmas, prediction) =
            prepare(config, schedule, steps, "dpm_2")?;
        // sigmas has n + 1 entries (final 0). Midpoint i lies between sigma i and sigma i - 1.
        let n1 = sigmas.len();
        let midpoint: Vec<f32> = (0..n1)
            .map(|i| lerp_half(sigmas[i].ln(), sigmas[(i + n1 - 1) % n1].ln()).exp())
            .collect();
        let midpoint_t = to_timesteps(&midpoint, &log_sigmas);
        let all_t = interleave_timesteps(&timesteps, |i| midpoint_t[i]);
        let sigmas_cat = interleave(&sigmas);
        Ok(Self {
            timesteps: all_t,
            midpoints: interleave(&midpoint)[1..].to_vec(),
            targets: sigmas_cat[1..].to_vec(),
            noise_scales: None,
            init_noise_sigma: init_noise_sigma_for(config, &sigmas_cat),
            sigmas: sigmas_cat,
            prediction,
            pending: None,
        })
    }

    /// The ancestral variant: the second half-step lands on `sigma_down` and adds fresh noise of
    /// size `sigma_up` from the job's stream.
    pub fn ancestral(
        config: &SchedulerConfig,
        schedule: SigmaSchedule,
        steps: usize,
    ) -> Result<Self> {
        let (timesteps, sigmas, log_sigmas, prediction) =
            prepare(config, schedule, steps, "dpm_2_a")?;
        let n1 = sigmas.len();
        let next: Vec<f32> = (0..n1)
            .map(|i| if i + 1 < n1 { sigmas[i + 1] } else { 0.0 })
            .collect();
        let up: Vec<f32> = (0..n1)
            .map(|i| {
                (next[i] * next[i] * (sigmas[i] * sigmas[i] - next[i] * next[i])
                    / (sigmas[i] * sigmas[i]))
                    .sqrt()
            })
            .collect();
        let mut down: Vec<f32> = (0..n1)
            .map(|i| (next[i] * next[i] - up[i] * up[i]).sqrt())
            .collect();
        down[n1 - 1] = 0.0;
        let mut midpoint: Vec<f32> = (0..n1)
            .map(|i| lerp_half(sigmas[i].ln(), down[i].ln()).exp())
            .collect();
        midpoint[n1 - 2..].iter_mut().for_each(|s| *s = 0.0);
        let midpoint_t = to_timesteps(&midpoint, &log_sigmas);
        let all_t = interleave_timesteps(&timesteps, |i| midpoint_t[i - 1]);
        let sigmas_cat = interleave(&sigmas);
        Ok(Self {
            timesteps: all_t,
            midpoints: interleave(&midpoint),
            targets: interleave(&down),
            noise_scales: Some(interleave(&up)),
            init_noise_sigma: init_noise_sigma_for(config, &sigmas_cat),
            sigmas: sigmas_cat,
            prediction,
            pending: None,
        })
    }
}

fn to_timesteps(sigmas: &[f32], log_sigmas: &[f32]) -> Vec<f32> {
    sigmas
        .iter()
        .map(|&s| sigma_to_t(s as f64, log_sigmas) as f32)
        .collect()
}

/// [t0, mid(1), t1, mid(2), t2, …]: the first evaluation, then midpoint and sigma of each step.
fn interleave_timesteps(timesteps: &[f32], midpoint_t: impl Fn(usize) -> f32) -> Vec<f32> {
    let mut all = vec![timesteps[0]];
    for (i, &t) in timesteps.iter().enumerate().skip(1) {
        all.extend([midpoint_t(i), t]);
    }
    all
}

impl Sampler for Kdpm2Sampler {
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
        let sigma = if self.pending.is_none() {
            self.sigmas[i]
        } else {
            self.midpoints[i - 1]
        };
        scale_by_sigma(sample, sigma)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        rng: &mut BatchNoise,
    ) -> candle_core::Result<Tensor> {
        match self.pending.take() {
            None => {
                let (sigma, midpoint) = (self.sigmas[i], self.midpoints[i]);
                let x0 = predict_x0_ve(self.prediction, model_output, sample, sigma)?;
                let derivative = ((sample - x0)? / sigma as f64)?;
                let out = (sample + (derivative * (midpoint - sigma) as f64)?)?;
                self.pending = Some(sample.clone());
                Ok(out)
            }
            Some(start) => {
                let (sigma, midpoint, target) = (
                    self.sigmas[i - 1],
                    self.midpoints[i - 1],
                    self.targets[i - 1],
                );
                let x0 = predict_x0_ve(self.prediction, model_output, sample, midpoint)?;
                let derivative = ((sample - x0)? / midpoint as f64)?;
                let out = (start + (derivative * (target - sigma) as f64)?)?;
                match &self.noise_scales {
                    Some(up) => out + (randn_like(model_output, rng)? * up[i - 1] as f64)?,
                    None => Ok(out),
                }
            }
        }
    }
}
