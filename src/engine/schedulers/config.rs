//! The model's `scheduler/scheduler_config.json` and the noise schedule derived from it. One
//! config is shared by every job on a model; each job builds its own stateful sampler from it.

use serde::Deserialize;

use crate::engine::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// Every key is optional: a missing key takes the default of the *sampler* that reads it, as
/// diffusers' `SamplerClass.from_config(model_config)` does (e.g. a missing `timestep_spacing`
/// is "linspace" for Euler but "leading" for DDIM; missing `clip_sample` is true for DDIM).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<PredictionType>,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: Option<usize>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    pub dynamic_thresholding_ratio: Option<f64>,
    pub sample_max_value: Option<f64>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub interpolation_type: Option<String>,
    pub final_sigmas_type: Option<String>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_type: Option<String>,
    // DPM-Solver family.
    pub solver_order: Option<usize>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub lambda_min_clipped: Option<f64>,
    pub algorithm_type: Option<String>,
    pub euler_at_final: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    // UniPC.
    pub predict_x0: Option<bool>,
    pub disable_corrector: Option<Vec<usize>>,
    // PNDM.
    pub skip_prk_steps: Option<bool>,
    // DDPM.
    pub variance_type: Option<String>,
    // LCM.
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f64>,
    // Flow matching (SD3, FLUX).
    pub shift: Option<f64>,
    pub use_dynamic_shifting: Option<bool>,
    pub base_shift: Option<f64>,
    pub max_shift: Option<f64>,
    pub base_image_seq_len: Option<usize>,
    pub max_image_seq_len: Option<usize>,
    pub time_shift_type: Option<String>,
    pub invert_sigmas: Option<bool>,
    pub shift_terminal: Option<f64>,
    pub stochastic_sampling: Option<bool>,
}

impl SchedulerConfig {
    pub fn num_train_timesteps(&self) -> usize {
        self.num_train_timesteps.unwrap_or(1000)
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type.unwrap_or(PredictionType::Epsilon)
    }

    pub fn steps_offset(&self) -> usize {
        self.steps_offset.unwrap_or(0)
    }

    /// Reject settings no sampler here implements, so a model never silently samples wrong.
    pub fn check(&self) -> Result<()> {
        let unsupported = |what: String| {
            Err(EngineError::Unsupported(format!(
                "scheduler_config.json: {what}"
            )))
        };
        if self.use_lu_lambdas == Some(true) {
            return unsupported("use_lu_lambdas".into());
        }
        let schedule_flags = [
            self.use_karras_sigmas,
            self.use_exponential_sigmas,
            self.use_beta_sigmas,
        ];
        if schedule_flags.iter().filter(|f| **f == Some(true)).count() > 1 {
            return Err(EngineError::BadConfig {
                path: "scheduler/scheduler_config.json".into(),
                reason: "only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set"
                    .into(),
            });
        }
        if let Some(t) = self
            .interpolation_type
            .as_deref()
            .filter(|t| *t != "linear")
        {
            return unsupported(format!("interpolation_type `{t}`"));
        }
        if let Some(t) = self.timestep_type.as_deref().filter(|t| *t != "discrete") {
            return unsupported(format!("timestep_type `{t}`"));
        }
        if let Some(t) = self
            .final_sigmas_type
            .as_deref()
            .filter(|t| *t != "zero" && *t != "sigma_min")
        {
            return unsupported(format!("final_sigmas_type `{t}`"));
        }
        match self.beta_schedule.as_deref() {
            None | Some("linear") | Some("scaled_linear") | Some("squaredcos_cap_v2") => {}
            Some(other) if self.trained_betas.is_none() => {
                return unsupported(format!("beta_schedule `{other}`"))
            }
            Some(_) => {}
        }
        if self.num_train_timesteps() < 2 {
            return Err(EngineError::BadConfig {
                path: "scheduler/scheduler_config.json".into(),
                reason: "num_train_timesteps must be at least 2".into(),
            });
        }
        Ok(())
    }

    /// `alphas_cumprod` exactly as diffusers computes it: f32 betas (torch.linspace rules),
    /// cumulative product accumulated in f64 and stored as f32 (torch's CPU cumprod), betas
    /// rescaled to zero terminal SNR when the config asks for it.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let betas = self.betas();
        if self.rescale_betas_zero_snr == Some(true) {
            cumprod(&rescale_zero_terminal_snr(&betas))
        } else {
            cumprod(&betas)
        }
    }

    /// `alphas_cumprod` for the samplers that work with sigmas = sqrt((1 - ᾱ) / ᾱ): with zero
    /// terminal SNR the last ᾱ is 0, so diffusers sets it to 2^-24 (the smallest f16 subnormal)
    /// to keep the first sigma finite.
    pub fn alphas_cumprod_sigma_safe(&self) -> Vec<f32> {
        let mut a = self.alphas_cumprod();
        if self.rescale_betas_zero_snr == Some(true) {
            if let Some(last) = a.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        a
    }

    fn betas(&self) -> Vec<f32> {
        let n = self.num_train_timesteps();
        let start = self.beta_start.unwrap_or(0.0001);
        let end = self.beta_end.unwrap_or(0.02);
        let betas: Vec<f32> = if let Some(b) = &self.trained_betas {
            b.iter().map(|&x| x as f32).collect()
        } else {
            match self.beta_schedule.as_deref().unwrap_or("linear") {
                "scaled_linear" => torch_linspace_f32(start.sqrt() as f32, end.sqrt() as f32, n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                "squaredcos_cap_v2" => {
                    let alpha_bar = |t: f64| {
                        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                            .cos()
                            .powi(2)
                    };
                    (0..n)
                        .map(|i| {
                            let t1 = i as f64 / n as f64;
                            let t2 = (i + 1) as f64 / n as f64;
                            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                        })
                        .collect()
                }
                _ => torch_linspace_f32(start as f32, end as f32, n),
            }
        };
        betas
    }
}

/// torch's CPU `cumprod(1 - betas)`: accumulated in f64, stored as f32.
fn cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, Algorithm 1) in torch's f32 steps:
/// shift sqrt(ᾱ) so the last is 0, scale so the first is unchanged, and turn back into betas.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let sqrt_bar: Vec<f32> = cumprod(betas).iter().map(|a| a.sqrt()).collect();
    let (Some(&first), Some(&last)) = (sqrt_bar.first(), sqrt_bar.last()) else {
        return betas.to_vec();
    };
    let scale = first / (first - last);
    let bar: Vec<f32> = sqrt_bar
        .iter()
        .map(|s| {
            let v = (s - last) * scale;
            v * v
        })
        .collect();
    (0..bar.len())
        .map(|i| {
            let alpha = if i == 0 { bar[0] } else { bar[i] / bar[i - 1] };
            1.0 - alpha
        })
        .collect()
}

/// `torch.linspace(start, end, steps, dtype=float32)` on CPU: f32 arithmetic, filled from both
/// ends towards the middle.
pub fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in f64.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| start + i as f64 * step).collect();
    v[num - 1] = stop;
    v
}

/// The inference timesteps of diffusers' `timestep_spacing` rules, in f64 before any rounding
/// that the caller applies (DDIM rounds linspace values to integers, Euler keeps them).
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    train_steps: usize,
    steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut v = np_linspace(0.0, (train_steps - 1) as f64, steps);
            v.reverse();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = train_steps / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            // np.arange(train_steps, 0, -ratio).round() - 1, with numpy's length rule.
            let ratio = train_steps as f64 / steps as f64;
            let len = ((0.0 - train_steps as f64) / -ratio).ceil() as usize;
            (0..len)
                .map(|i| (train_steps as f64 - i as f64 * ratio).round_ties_even() - 1.0)
                .collect()
        }
    }
}

/// Karras et al. (2022) noise levels, rho = 7, from `sigma_max` down to `sigma_min`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Noise levels evenly spaced in log space, from `sigma_max` down to `sigma_min`.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), steps)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// Noise levels placed at the quantiles of a Beta(0.6, 0.6) distribution ("Beta Sampling is All
/// You Need", Lee et al. 2024): dense at both ends, sparse in the middle.
pub fn beta_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| {
            let ppf = statrs::function::beta::inv_beta_reg(0.6, 0.6, (1.0 - r).clamp(0.0, 1.0));
            sigma_min + ppf * (sigma_max - sigma_min)
        })
        .collect()
}
