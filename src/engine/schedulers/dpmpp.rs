//! DPM-Solver++ multistep (2M) and its SDE variant, as diffusers' `DPMSolverMultistepScheduler`
//! with `algorithm_type` "dpmsolver++" / "sde-dpmsolver++", `solver_order` 1–2 and the default
//! midpoint solver (or "heun" from the config).

use candle_core::Tensor;

use super::config::{
    exponential_sigmas, karras_sigmas, np_linspace, PredictionType, SchedulerConfig,
    TimestepSpacing,
};
use super::euler::{interp_index, sigma_to_t};
use super::{randn_like, Sampler, SigmaSchedule};
use crate::engine::error::{EngineError, Result};
use crate::engine::rng::TorchGenerator;

pub struct DpmppSampler {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    prediction: PredictionType,
    sde: bool,
    order: usize,
    heun: bool,
    lower_order_final: bool,
    final_zero: bool,
    /// Data predictions (x0) of the previous step, for the second-order update.
    previous_x0: Option<Tensor>,
    lower_order_nums: usize,
}

impl DpmppSampler {
    pub fn new(
        config: &SchedulerConfig,
        schedule: SigmaSchedule,
        steps: usize,
        sde: bool,
    ) -> Result<Self> {
        let order = config.solver_order.unwrap_or(2);
        if !(1..=2).contains(&order) {
            return Err(EngineError::Unsupported(format!(
                "DPM++ solver_order {order} (1 or 2 are implemented)"
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
        let train = config.num_train_timesteps();
        let alphas_cumprod = config.alphas_cumprod();
        // lambda_t = log(alpha_t) - log(sigma_t) in f32; clipping sets where the schedule ends.
        let lambdas: Vec<f32> = alphas_cumprod
            .iter()
            .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
            .collect();
        let last_timestep = match config.lambda_min_clipped {
            Some(clip) if clip.is_finite() => {
                // torch.searchsorted(flip(lambda_t), clip): count of flipped values below clip.
                let clipped = lambdas
                    .iter()
                    .rev()
                    .take_while(|&&l| (l as f64) < clip)
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
        let schedule = match schedule {
            SigmaSchedule::Default if config.use_karras_sigmas == Some(true) => {
                SigmaSchedule::Karras
            }
            SigmaSchedule::Default if config.use_exponential_sigmas == Some(true) => {
                SigmaSchedule::Exponential
            }
            s => s,
        };
        let round_timesteps = config.beta_schedule.as_deref() != Some("squaredcos_cap_v2");
        let sigmas: Vec<f64> = match schedule {
            SigmaSchedule::Default => timesteps
                .iter()
                .map(|&t| interp_index(t, &train_sigmas))
                .collect(),
            SigmaSchedule::Karras | SigmaSchedule::Exponential => {
                // These spread over the whole training range, not the spaced timesteps.
                let sigma_min = config.sigma_min.unwrap_or(train_sigmas[0] as f64);
                let sigma_max = config
                    .sigma_max
                    .unwrap_or(train_sigmas[train_sigmas.len() - 1] as f64);
                let s = if schedule == SigmaSchedule::Karras {
                    karras_sigmas(sigma_min, sigma_max, steps)
                } else {
                    exponential_sigmas(sigma_min, sigma_max, steps)
                };
                timesteps = s
                    .iter()
                    .map(|&x| {
                        let t = sigma_to_t(x, &log_sigmas);
                        if round_timesteps && schedule == SigmaSchedule::Karras {
                            t.round_ties_even()
                        } else {
                            t
                        }
                    })
                    .collect();
                s
            }
        };
        let final_zero = config.final_sigmas_type.as_deref() != Some("sigma_min");
        let last = if final_zero {
            0.0
        } else {
            train_sigmas[0] as f64
        };
        let sigmas: Vec<f32> = sigmas
            .into_iter()
            .chain(std::iter::once(last))
            .map(|s| s as f32)
            .collect();
        // diffusers stores these timesteps as int64 (truncating the interpolated ones).
        let timesteps: Vec<f32> = timesteps.into_iter().map(|t| t.trunc() as f32).collect();
        Ok(Self {
            timesteps,
            sigmas,
            prediction: config.prediction_type(),
            sde,
            order,
            heun,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            final_zero,
            previous_x0: None,
            lower_order_nums: 0,
        })
    }

    fn alpha_sigma(sigma: f32) -> (f32, f32) {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha, sigma * alpha)
    }

    fn lambda(alpha: f32, sigma: f32) -> f32 {
        alpha.ln() - sigma.ln()
    }
}

impl Sampler for DpmppSampler {
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
        rng: &mut TorchGenerator,
    ) -> candle_core::Result<Tensor> {
        let n = self.timesteps.len();
        let lower_order_final =
            i == n - 1 && ((self.lower_order_final && n < 15) || self.final_zero);

        // Data prediction x0 from the model output.
        let (alpha_s0, sigma_s0) = Self::alpha_sigma(self.sigmas[i]);
        let x0 = match self.prediction {
            PredictionType::Epsilon => {
                ((sample - (model_output * sigma_s0 as f64)?)? / alpha_s0 as f64)?
            }
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => {
                ((sample * alpha_s0 as f64)? - (model_output * sigma_s0 as f64)?)?
            }
        };
        let noise = if self.sde {
            Some(randn_like(model_output, rng)?)
        } else {
            None
        };

        let (alpha_t, sigma_t) = Self::alpha_sigma(self.sigmas[i + 1]);
        let lambda_t = Self::lambda(alpha_t, sigma_t);
        let lambda_s0 = Self::lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let first_order = self.order == 1 || self.lower_order_nums < 1 || lower_order_final;

        let out = if first_order {
            if self.sde {
                let e = (-h).exp();
                let e2 = (-2.0 * h).exp();
                let noise = noise
                    .as_ref()
                    .ok_or_else(|| candle_core::Error::Msg("sde noise".into()))?;
                ((sample * (sigma_t / sigma_s0 * e) as f64)?
                    + (&x0 * (alpha_t * (1.0 - e2)) as f64)?)?
                    + (noise * (sigma_t * (1.0 - e2).sqrt()) as f64)?
            } else {
                (sample * (sigma_t / sigma_s0) as f64)?
                    - (&x0 * (alpha_t * ((-h).exp() - 1.0)) as f64)?
            }
        } else {
            let prev = self
                .previous_x0
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg("missing previous step".into()))?;
            let (alpha_s1, sigma_s1) = Self::alpha_sigma(self.sigmas[i - 1]);
            let lambda_s1 = Self::lambda(alpha_s1, sigma_s1);
            let h0 = lambda_s0 - lambda_s1;
            let r0 = h0 / h;
            let d0 = &x0;
            let d1 = ((&x0 - prev)? * (1.0 / r0) as f64)?;
            if self.sde {
                let e = (-h).exp();
                let e2 = (-2.0 * h).exp();
                let noise = noise
                    .as_ref()
                    .ok_or_else(|| candle_core::Error::Msg("sde noise".into()))?;
                let d1_coef = if self.heun {
                    alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0)
                } else {
                    0.5 * (alpha_t * (1.0 - e2))
                };
                (((sample * (sigma_t / sigma_s0 * e) as f64)?
                    + (d0 * (alpha_t * (1.0 - e2)) as f64)?)?
                    + (d1 * d1_coef as f64)?)?
                    + (noise * (sigma_t * (1.0 - e2).sqrt()) as f64)?
            } else {
                let c = alpha_t * ((-h).exp() - 1.0);
                let base = ((sample * (sigma_t / sigma_s0) as f64)? - (d0 * c as f64)?)?;
                if self.heun {
                    base + (d1 * (alpha_t * (((-h).exp() - 1.0) / h + 1.0)) as f64)?
                } else {
                    base - (d1 * (0.5 * c) as f64)?
                }
            }
        }?;
        self.previous_x0 = Some(x0);
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(out)
    }
}
