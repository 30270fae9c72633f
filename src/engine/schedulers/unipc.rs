//! UniPC (Zhao et al. 2023), as diffusers' `UniPCMultistepScheduler`: a multistep predictor
//! (UniP) followed at the next step by a corrector (UniC) that reuses that step's model output, so
//! the correction costs no extra evaluation. B(h) variants "bh1"/"bh2", `solver_order` 1–3,
//! data (x0) or noise prediction, and `disable_corrector` steps.

use candle_core::Tensor;

use super::dpmpp::{
    add_noise_multistep, alpha_sigma, data_prediction, lambda_of, multistep_schedule,
    MultistepRules,
};
use super::{PredictionType, Sampler, SchedulerConfig, SigmaSchedule, X0Limit};
use crate::engine::error::{EngineError, Result};
use crate::engine::rng::BatchNoise;

pub struct UniPcSampler {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    prediction: PredictionType,
    x0_limit: X0Limit,
    order: usize,
    /// "bh1" uses B(h) = h, "bh2" B(h) = e^h - 1.
    bh1: bool,
    predict_x0: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    /// Converted model outputs of the last `order` steps, newest last.
    history: Vec<Tensor>,
    /// The sample the last predictor started from, which the corrector revisits.
    last_sample: Option<Tensor>,
    /// The order the last predictor used (the corrector uses the same).
    last_order: usize,
    lower_order_nums: usize,
}

impl UniPcSampler {
    pub fn new(
        config: &SchedulerConfig,
        schedule: SigmaSchedule,
        steps: usize,
        order: usize,
    ) -> Result<Self> {
        if !(1..=3).contains(&order) {
            return Err(EngineError::Unsupported(format!(
                "UniPC solver_order {order} (1 to 3 are implemented)"
            )));
        }
        // diffusers maps the DPM-Solver names to bh2 when a DPM config is reused for UniPC.
        let bh1 = match config.solver_type.as_deref() {
            None | Some("bh2") | Some("midpoint") | Some("heun") | Some("logrho") => false,
            Some("bh1") => true,
            Some(other) => {
                return Err(EngineError::Unsupported(format!(
                    "UniPC solver_type `{other}`"
                )))
            }
        };
        let (timesteps, sigmas) =
            multistep_schedule(config, schedule, steps, MultistepRules::UniPc);
        let lower_order_final = config.lower_order_final.unwrap_or(true);
        if !lower_order_final && order > 1 && sigmas.last() == Some(&0.0) {
            // The last step's divided differences divide by an infinite log-SNR step.
            return Err(EngineError::Unsupported(
                "UniPC with lower_order_final=false, solver_order > 1 and a final sigma of 0 \
                 (its last step is undefined; diffusers produces an error or NaNs there too)"
                    .into(),
            ));
        }
        Ok(Self {
            timesteps,
            sigmas,
            prediction: config.prediction_type(),
            x0_limit: X0Limit::from_config(config, None),
            order,
            bh1,
            predict_x0: config.predict_x0.unwrap_or(true),
            lower_order_final,
            disable_corrector: config.disable_corrector.clone().unwrap_or_default(),
            history: Vec::with_capacity(order),
            last_sample: None,
            last_order: 0,
            lower_order_nums: 0,
        })
    }

    /// The model output in the form the solver works with: x0 (default) or epsilon.
    fn convert(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> candle_core::Result<Tensor> {
        let sigma = self.sigmas[i];
        if self.predict_x0 {
            let x0 = data_prediction(self.prediction, model_output, sample, sigma)?;
            return self.x0_limit.apply(x0);
        }
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        match self.prediction {
            PredictionType::Epsilon => Ok(model_output.clone()),
            PredictionType::Sample => (sample - (model_output * alpha_t as f64)?)? / sigma_t as f64,
            PredictionType::VPrediction => {
                (model_output * alpha_t as f64)? + (sample * sigma_t as f64)?
            }
        }
    }

    /// The shared part of UniP and UniC between noise levels `sigma_s0` → `sigma_t`:
    /// h·φ₁(h), B(h), the divided differences D1_k of the older outputs (at `older` sigmas,
    /// newest first) against m0, and the right-hand side b of the order conditions.
    fn coefficients(
        &self,
        sigma_t: f32,
        sigma_s0: f32,
        older: &[f32],
        order: usize,
    ) -> (f32, f32, Vec<f32>, Vec<f32>) {
        let lambda_s0 = lambda_of(sigma_s0);
        let h = lambda_of(sigma_t) - lambda_s0;
        let mut rks: Vec<f32> = older
            .iter()
            .take(order.saturating_sub(1))
            .map(|&s| (lambda_of(s) - lambda_s0) / h)
            .collect();
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.bh1 { hh } else { hh.exp_m1() };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0f32;
        let mut b = Vec::with_capacity(order);
        for k in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (k + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        (h_phi_1, b_h, rks, b)
    }

    /// The first-order part shared by predictor and corrector: the exponential-integrator step
    /// from `x` (at `sigma_s0`) to `sigma_t` with the newest output `m0`.
    fn base_step(
        &self,
        x: &Tensor,
        m0: &Tensor,
        sigma_t: f32,
        sigma_s0: f32,
        h_phi_1: f32,
    ) -> candle_core::Result<(Tensor, f32)> {
        let (alpha_t, sigma_t_vp) = alpha_sigma(sigma_t);
        let (alpha_s0, sigma_s0_vp) = alpha_sigma(sigma_s0);
        if self.predict_x0 {
            let x_t =
                ((x * (sigma_t_vp / sigma_s0_vp) as f64)? - (m0 * (alpha_t * h_phi_1) as f64)?)?;
            Ok((x_t, alpha_t))
        } else {
            let x_t = ((x * (alpha_t / alpha_s0) as f64)? - (m0 * (sigma_t_vp * h_phi_1) as f64)?)?;
            Ok((x_t, sigma_t_vp))
        }
    }

    /// Σ rho_k · (m_k - m0) / r_k over the older outputs.
    fn weighted_differences(
        &self,
        rks: &[f32],
        rhos: &[f32],
    ) -> candle_core::Result<Option<Tensor>> {
        let newest = self.history.len() - 1;
        let mut acc: Option<Tensor> = None;
        for (k, (&rk, &rho)) in rks.iter().zip(rhos).enumerate() {
            let d = ((&self.history[newest - 1 - k] - &self.history[newest])? * (rho / rk) as f64)?;
            acc = Some(match acc {
                Some(a) => (a + d)?,
                None => d,
            });
        }
        Ok(acc)
    }

    /// UniP: predict the sample at step `i + 1` from `x` at step `i`.
    fn predict(&self, x: &Tensor, i: usize, order: usize) -> candle_core::Result<Tensor> {
        let older: Vec<f32> = (1..order).map(|k| self.sigmas[i - k]).collect();
        let (h_phi_1, b_h, rks, b) =
            self.coefficients(self.sigmas[i + 1], self.sigmas[i], &older, order);
        let m0 = &self.history[self.history.len() - 1];
        let (x_t, scale) = self.base_step(x, m0, self.sigmas[i + 1], self.sigmas[i], h_phi_1)?;
        let rhos: Vec<f32> = match order {
            1 => return Ok(x_t),
            2 => vec![0.5],
            _ => solve(&vandermonde(&rks, order - 1), &b[..order - 1]),
        };
        match self.weighted_differences(&rks[..order - 1], &rhos)? {
            Some(res) => x_t - (res * (scale * b_h) as f64)?,
            None => Ok(x_t),
        }
    }

    /// UniC: redo the step that ended at step `i` from `last_sample`, now also using the model
    /// output `model_t` evaluated at its result; `history` still ends with the output the
    /// predictor used.
    fn correct(
        &self,
        model_t: &Tensor,
        last_sample: &Tensor,
        i: usize,
        order: usize,
    ) -> candle_core::Result<Tensor> {
        let older: Vec<f32> = (1..order).map(|k| self.sigmas[i - 1 - k]).collect();
        let (h_phi_1, b_h, rks, b) =
            self.coefficients(self.sigmas[i], self.sigmas[i - 1], &older, order);
        let m0 = &self.history[self.history.len() - 1];
        let (x_t, scale) =
            self.base_step(last_sample, m0, self.sigmas[i], self.sigmas[i - 1], h_phi_1)?;
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve(&vandermonde(&rks, order), &b)
        };
        let last_rho = rhos[rhos.len() - 1];
        let d1_t = ((model_t - m0)? * last_rho as f64)?;
        let total = match self.weighted_differences(&rks[..order - 1], &rhos[..order - 1])? {
            Some(res) => (res + d1_t)?,
            None => d1_t,
        };
        x_t - (total * (scale * b_h) as f64)?
    }
}

/// Rows r_k^(j-1) for j = 1..=n over the first n of `rks` (the order conditions' matrix).
fn vandermonde(rks: &[f32], n: usize) -> Vec<Vec<f64>> {
    (0..n)
        .map(|j| {
            rks[..n]
                .iter()
                .map(|&r| (r as f64).powi(j as i32))
                .collect()
        })
        .collect()
}

/// Solve a small dense system (Gaussian elimination with partial pivoting, as LAPACK's gesv).
fn solve(matrix: &[Vec<f64>], rhs: &[f32]) -> Vec<f32> {
    let n = rhs.len();
    let mut a: Vec<Vec<f64>> = matrix.to_vec();
    let mut x: Vec<f64> = rhs.iter().map(|&v| v as f64).collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        x.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            let (above, below) = a.split_at_mut(row);
            for (target, &source) in below[0][col..].iter_mut().zip(&above[col][col..]) {
                *target -= f * source;
            }
            x[row] -= f * x[col];
        }
    }
    for col in (0..n).rev() {
        let s: f64 = (col + 1..n).map(|k| a[col][k] * x[k]).sum();
        x[col] = (x[col] - s) / a[col][col];
    }
    x.into_iter().map(|v| v as f32).collect()
}

impl Sampler for UniPcSampler {
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
        _rng: &mut BatchNoise,
    ) -> candle_core::Result<Tensor> {
        let converted = self.convert(model_output, sample, i)?;
        let sample = match &self.last_sample {
            Some(last) if i > 0 && !self.disable_corrector.contains(&(i - 1)) => {
                self.correct(&converted, last, i, self.last_order)?
            }
            _ => sample.clone(),
        };
        if self.history.len() == self.order {
            self.history.remove(0);
        }
        self.history.push(converted);
        let n = self.timesteps.len();
        let order = if self.lower_order_final {
            self.order.min(n - i)
        } else {
            self.order
        };
        let order = order.min(self.lower_order_nums + 1);
        let prev = self.predict(&sample, i, order)?;
        self.last_sample = Some(sample);
        self.last_order = order;
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }
}
