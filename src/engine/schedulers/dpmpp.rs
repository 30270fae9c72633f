//! DPM-Solver++ multistep (2M, 3M) and its SDE variant, as diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type` "dpmsolver++" / "sde-dpmsolver++",
//! `solver_order` 1–3 and the midpoint solver (or "heun" from the config). The timestep/sigma
//! schedule here is shared with UniPC, which diffusers builds the same way.

use candle_core::Tensor;

use super::config::{np_linspace, PredictionType, SchedulerConfig, TimestepSpacing};
use super::euler::{interp_index, sigma_to_t};
use super::{randn_like, Sampler, SigmaSchedule, X0Limit};
use crate::engine::error::{EngineError, Result};
use crate::engine::rng::BatchNoise;

/// Which of the two multistep classes' schedule rules to follow where they differ.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum MultistepRules {
    DpmSolver,
    UniPc,
}

/// Timesteps (as diffusers' int64) and sigmas (final sigma appended) of the multistep solvers.
pub(super) fn multistep_schedule(
    config: &SchedulerConfig,
    schedule: SigmaSchedule,
    steps: usize,
    rules: MultistepRules,
) -> (Vec<f32>, Vec<f32>) {
    let train = config.num_train_timesteps();
    let alphas_cumprod = config.alphas_cumprod_sigma_safe();
    let last_timestep = match (rules, config.lambda_min_clipped) {
        (MultistepRules::DpmSolver, Some(clip)) if clip.is_finite() => {
            // lambda_t = log(alpha_t) - log(sigma_t) in f32;
            // torch.searchsorted(flip(lambda_t), clip) = count of flipped values below clip.
            let clipped = alphas_cumprod
                .iter()
                .rev()
                .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
                .take_while(|&l| (l as f64) < clip)
                .count();
            train - clipped
        }
        _ => train,
    };
    let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
    let mut timesteps: Vec<f64> = match spacing {
        TimestepSpacing::Linspace => {
            let mut v: Vec<f64> = np_linspace(0.0, (last_timestep - 1) as f64, steps + 1)
                .into_iter()
                .map(f64::round_ties_even)
                .collect();
            v.reverse();
            v.pop();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = last_timestep / (steps + 1);
            (1..=steps)
                .rev()
                .map(|i| (i * ratio + config.steps_offset()) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = train as f64 / steps as f64;
            let len = (last_timestep as f64 / ratio).ceil() as usize;
            (0..len)
                .map(|i| (last_timestep as f64 - i as f64 * ratio).round_ties_even() - 1.0)
                .collect()
        }
    };
    let train_sigmas: Vec<f32> = alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect();
    let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
    let schedule = schedule.resolve(config);
    let final_sigma_min = config.final_sigmas_type.as_deref() == Some("sigma_min");
    let mut last = if final_sigma_min {
        train_sigmas[0] as f64
    } else {
        0.0
    };
    // Karras / exponential / beta spread over the whole training range, not the spaced timesteps.
    let sigma_min = config.sigma_min.unwrap_or(train_sigmas[0] as f64);
    let sigma_max = config
        .sigma_max
        .unwrap_or(train_sigmas[train_sigmas.len() - 1] as f64);
    let sigmas: Vec<f64> = match schedule.sigmas_between(sigma_min, sigma_max, steps) {
        None => timesteps
            .iter()
            .map(|&t| interp_index(t, &train_sigmas))
            .collect(),
        Some(s) => {
            let round = schedule == SigmaSchedule::Karras
                && (rules == MultistepRules::UniPc
                    || config.beta_schedule.as_deref() != Some("squaredcos_cap_v2"));
            timesteps = s
                .iter()
                .map(|&x| {
                    let t = sigma_to_t(x, &log_sigmas);
                    if round {
                        t.round_ties_even()
                    } else {
                        t
                    }
                })
                .collect();
            if final_sigma_min && rules == MultistepRules::UniPc {
                last = s[s.len() - 1];
            }
            s
        }
    };
    let sigmas: Vec<f32> = sigmas
        .into_iter()
        .chain(std::iter::once(last))
        .map(|s| s as f32)
        .collect();
    // diffusers stores these timesteps as int64 (truncating the interpolated ones).
    let timesteps: Vec<f32> = timesteps.into_iter().map(|t| t.trunc() as f32).collect();
    (timesteps, sigmas)
}

/// `alpha_t`, `sigma_t` of the variance-preserving form for a sigma of the VE form.
pub(super) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// The multistep solvers' noising: `α·x0 + σ_vp·noise` at the VE sigma of evaluation `index`.
pub(super) fn add_noise_multistep(
    x0: &Tensor,
    noise: &Tensor,
    sigmas: &[f32],
    index: usize,
) -> candle_core::Result<Tensor> {
    let (alpha, sigma) = alpha_sigma(sigmas[index.min(sigmas.len() - 1)]);
    (x0 * alpha as f64)? + (noise * sigma as f64)?
}

/// `lambda = log(alpha_t) - log(sigma_t)`, the half log-SNR the solvers step in.
pub(super) fn lambda_of(sigma: f32) -> f32 {
    let (alpha, sigma) = alpha_sigma(sigma);
    alpha.ln() - sigma.ln()
}

/// The data prediction x0 from the model output in the VP form at noise level `sigma`.
pub(super) fn data_prediction(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> candle_core::Result<Tensor> {
    let (alpha, sigma) = alpha_sigma(sigma);
    match prediction {
        PredictionType::Epsilon => (sample - (model_output * sigma as f64)?)? / alpha as f64,
        PredictionType::Sample => Ok(model_output.clone()),
        PredictionType::VPrediction => (sample * alpha as f64)? - (model_output * sigma as f64)?,
    }
}

pub struct DpmppSampler {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    prediction: PredictionType,
    x0_limit: X0Limit,
    sde: bool,
    order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    /// Data predictions (x0) of the previous steps, newest last, for the multistep updates.
    history: Vec<Tensor>,
    lower_order_nums: usize,
}

impl DpmppSampler {
    pub fn new(
        config: &SchedulerConfig,
        schedule: SigmaSchedule,
        steps: usize,
        sde: bool,
        order: usize,
    ) -> Result<Self> {
        if !(1..=3).contains(&order) {
            return Err(EngineError::Unsupported(format!(
                "DPM++ solver_order {order} (1 to 3 are implemented)"
            )));
        }
        let heun = match config.solver_type.as_deref() {
            None | Some("midpoint") => false,
            Some("heun") => true,
            Some(other) => {
                return Err(EngineError::Unsupported(format!(
                    "DPM++ solver_type `{other}`"
                )))
            }
        };
        let (timesteps, sigmas) =
            multistep_schedule(config, schedule, steps, MultistepRules::DpmSolver);
        Ok(Self {
            timesteps,
            sigmas,
            prediction: config.prediction_type(),
            x0_limit: X0Limit::from_config(config, None),
            sde,
            order,
            heun,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_zero: config.final_sigmas_type.as_deref() != Some("sigma_min"),
            history: Vec::with_capacity(3),
            lower_order_nums: 0,
        })
    }
}

impl Sampler for DpmppSampler {
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, index: usize) -> candle_core::Result<Tensor> {
        add_noise_multistep(x0, noise, &self.sigmas, index)
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
        rng: &mut BatchNoise,
    ) -> candle_core::Result<Tensor> {
        let n = self.timesteps.len();
        let short_run = self.lower_order_final && n < 15;
        let lower_order_final = i == n - 1 && (self.euler_at_final || short_run || self.final_zero);
        let lower_order_second = i + 2 == n && short_run;

        let x0 = data_prediction(self.prediction, model_output, sample, self.sigmas[i])?;
        let x0 = self.x0_limit.apply(x0)?;
        if self.history.len() == self.order {
            self.history.remove(0);
        }
        self.history.push(x0);
        let noise = if self.sde {
            Some(randn_like(model_output, rng)?)
        } else {
            None
        };

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (_, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let lambda_t = lambda_of(self.sigmas[i + 1]);
        let lambda_s0 = lambda_of(self.sigmas[i]);
        let h = lambda_t - lambda_s0;
        let (e, e2) = ((-h).exp(), (-2.0 * h).exp());
        let m = |k: usize| &self.history[self.history.len() - 1 - k];

        // The solver's order this step: warm-up from 1, and lower near the end of short runs.
        let this_order = if self.order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if self.order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        };
        // x_t = base + Σ coef_k · D_k (+ noise): D0 = m0, then the divided differences.
        let (base_coef, d0_coef) = if self.sde {
            (sigma_t / sigma_s0 * e, alpha_t * (1.0 - e2))
        } else {
            (sigma_t / sigma_s0, -(alpha_t * (e - 1.0)))
        };
        let mut out = ((sample * base_coef as f64)? + (m(0) * d0_coef as f64)?)?;
        match this_order {
            1 => {}
            2 => {
                let lambda_s1 = lambda_of(self.sigmas[i - 1]);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let d1 = ((m(0) - m(1))? * (1.0 / r0) as f64)?;
                let d1_coef = match (self.sde, self.heun) {
                    (false, false) => -0.5 * (alpha_t * (e - 1.0)),
                    (false, true) => alpha_t * ((e - 1.0) / h + 1.0),
                    (true, false) => 0.5 * (alpha_t * (1.0 - e2)),
                    (true, true) => alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0),
                };
                out = (out + (d1 * d1_coef as f64)?)?;
            }
            _ => {
                let lambda_s1 = lambda_of(self.sigmas[i - 1]);
                let lambda_s2 = lambda_of(self.sigmas[i - 2]);
                let (h0, h1) = (lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
                let (r0, r1) = (h0 / h, h1 / h);
                let d1_0 = ((m(0) - m(1))? * (1.0 / r0) as f64)?;
                let d1_1 = ((m(1) - m(2))? * (1.0 / r1) as f64)?;
                let diff = (&d1_0 - &d1_1)?;
                let d1 = (&d1_0 + (&diff * (r0 / (r0 + r1)) as f64)?)?;
                let d2 = (diff * (1.0 / (r0 + r1)) as f64)?;
                let (d1_coef, d2_coef) = if self.sde {
                    (
                        alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0),
                        alpha_t * ((1.0 - e2 - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5),
                    )
                } else {
                    (
                        alpha_t * ((e - 1.0) / h + 1.0),
                        -(alpha_t * ((e - 1.0 + h) / (h * h) - 0.5)),
                    )
                };
                out = ((out + (d1 * d1_coef as f64)?)? + (d2 * d2_coef as f64)?)?;
            }
        }
        if let Some(noise) = noise {
            out = (out + (noise * (sigma_t * (1.0 - e2).sqrt()) as f64)?)?;
        }
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(out)
    }
}
