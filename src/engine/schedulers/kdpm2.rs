//! DPM-Solver-2 (Karras et al.'s "DPM2"), as diffusers' `KDPM2DiscreteScheduler`: each step
//! evaluates the model at the sigma and at the log-midpoint towards the next sigma, so a run
//! makes `2 * steps - 1` model evaluations.

use candle_core::Tensor;

use super::config::{PredictionType, SchedulerConfig};
use super::euler::{
    discrete_schedule, init_noise_sigma_for, scale_by_sigma, sigma_to_t, DiscreteSchedule,
};
use super::{predict_x0_ve, Sampler, SigmaSchedule};
use crate::engine::error::{EngineError, Result};
use crate::engine::rng::TorchGenerator;

pub struct Kdpm2Sampler {
    timesteps: Vec<f32>,
    /// [s0, s1, s1, …, s_{n-1}, s_{n-1}, 0, 0] (diffusers' interleaving)
    sigmas: Vec<f32>,
    /// Log-midpoints between consecutive sigmas, interleaved the same way.
    sigmas_interpol: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    /// The sample at the start of the current step while its second evaluation is pending.
    pending: Option<Tensor>,
}

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

/// What both DPM2 variants start from: the Euler-family schedule (Karras timesteps rounded, as
/// diffusers does here), the training log-sigmas, and the prediction type.
fn prepare(
    config: &SchedulerConfig,
    schedule: SigmaSchedule,
    steps: usize,
    name: &str,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>, PredictionType)> {
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
    let karras = schedule == SigmaSchedule::Karras
        || (schedule == SigmaSchedule::Default && config.use_karras_sigmas == Some(true));
    if karras {
        timesteps.iter_mut().for_each(|t| *t = t.round_ties_even());
    }
    let log_sigmas: Vec<f32> = config
        .alphas_cumprod()
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt().ln())
        .collect();
    Ok((timesteps, sigmas, log_sigmas, prediction))
}

impl Kdpm2Sampler {
    pub fn new(config: &SchedulerConfig, schedule: SigmaSchedule, steps: usize) -> Result<Self> {
        let (timesteps, sigmas, log_sigmas, prediction) =
            prepare(config, schedule, steps, "dpm_2")?;
        // sigmas has n + 1 entries (final 0). Midpoint i lies between sigma i and sigma i - 1.
        let n1 = sigmas.len();
        let interpol: Vec<f32> = (0..n1)
            .map(|i| {
                let prev = sigmas[(i + n1 - 1) % n1];
                lerp_half(sigmas[i].ln(), prev.ln()).exp()
            })
            .collect();
        let interpol_t: Vec<f32> = interpol
            .iter()
            .map(|&s| sigma_to_t(s as f64, &log_sigmas) as f32)
            .collect();
        let mut all_t = vec![timesteps[0]];
        for i in 1..timesteps.len() {
            all_t.extend([interpol_t[i], timesteps[i]]);
        }
        let sigmas_cat = interleave(&sigmas);
        let init_noise_sigma = init_noise_sigma_for(config, &sigmas_cat);
        Ok(Self {
            timesteps: all_t,
            sigmas: sigmas_cat,
            sigmas_interpol: interleave(&interpol),
            init_noise_sigma,
            prediction,
            pending: None,
        })
    }
}

impl Sampler for Kdpm2Sampler {
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
            self.sigmas_interpol[i]
        };
        scale_by_sigma(sample, sigma)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor> {
        match self.pending.take() {
            None => {
                let (sigma, sigma_interpol) = (self.sigmas[i], self.sigmas_interpol[i + 1]);
                let x0 = predict_x0_ve(self.prediction, model_output, sample, sigma)?;
                let derivative = ((sample - x0)? / sigma as f64)?;
                let out = (sample + (derivative * (sigma_interpol - sigma) as f64)?)?;
                self.pending = Some(sample.clone());
                Ok(out)
            }
            Some(start) => {
                let (sigma, sigma_interpol, sigma_next) =
                    (self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i]);
                let x0 = predict_x0_ve(self.prediction, model_output, sample, sigma_interpol)?;
                let derivative = ((sample - x0)? / sigma_interpol as f64)?;
                start + (derivative * (sigma_next - sigma) as f64)?
            }
        }
    }
}

/// The ancestral variant, as diffusers' `KDPM2AncestralDiscreteScheduler`: the second half-step
/// lands on `sigma_down` and adds fresh noise of size `sigma_up` from the job's stream.
pub struct Kdpm2AncestralSampler {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    sigmas_interpol: Vec<f32>,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    pending: Option<Tensor>,
}

impl Kdpm2AncestralSampler {
    pub fn new(config: &SchedulerConfig, schedule: SigmaSchedule, steps: usize) -> Result<Self> {
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
        let mut interpol: Vec<f32> = (0..n1)
            .map(|i| lerp_half(sigmas[i].ln(), down[i].ln()).exp())
            .collect();
        interpol[n1 - 2..].iter_mut().for_each(|s| *s = 0.0);
        let interpol_t: Vec<f32> = interpol
            .iter()
            .map(|&s| sigma_to_t(s as f64, &log_sigmas) as f32)
            .collect();
        let mut all_t = vec![timesteps[0]];
        for i in 1..timesteps.len() {
            all_t.extend([interpol_t[i - 1], timesteps[i]]);
        }
        let sigmas_cat = interleave(&sigmas);
        let init_noise_sigma = init_noise_sigma_for(config, &sigmas_cat);
        Ok(Self {
            timesteps: all_t,
            sigmas: sigmas_cat,
            sigmas_interpol: interleave(&interpol),
            sigmas_up: interleave(&up),
            sigmas_down: interleave(&down),
            init_noise_sigma,
            prediction,
            pending: None,
        })
    }
}

impl Sampler for Kdpm2AncestralSampler {
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
            self.sigmas_interpol[i - 1]
        };
        scale_by_sigma(sample, sigma)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor> {
        match self.pending.take() {
            None => {
                let (sigma, sigma_interpol) = (self.sigmas[i], self.sigmas_interpol[i]);
                let x0 = predict_x0_ve(self.prediction, model_output, sample, sigma)?;
                let derivative = ((sample - x0)? / sigma as f64)?;
                let out = (sample + (derivative * (sigma_interpol - sigma) as f64)?)?;
                self.pending = Some(sample.clone());
                Ok(out)
            }
            Some(start) => {
                let (sigma, sigma_interpol) = (self.sigmas[i - 1], self.sigmas_interpol[i - 1]);
                let (sigma_up, sigma_down) = (self.sigmas_up[i - 1], self.sigmas_down[i - 1]);
                let x0 = predict_x0_ve(self.prediction, model_output, sample, sigma_interpol)?;
                let derivative = ((sample - x0)? / sigma_interpol as f64)?;
                let out = (start + (derivative * (sigma_down - sigma) as f64)?)?;
                let noise = super::randn_like(model_output, rng)?;
                out + (noise * sigma_up as f64)?
            }
        }
    }
}
