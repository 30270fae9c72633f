//! Linear multistep (order 4), as diffusers' `LMSDiscreteScheduler`. Its coefficients are
//! integrals of Lagrange basis polynomials over each sigma interval; diffusers integrates them
//! numerically (scipy `quad`), here they are integrated exactly by Gauss-Legendre quadrature
//! (the integrands are polynomials of degree ≤ 3).

use candle_core::Tensor;

use super::config::{PredictionType, SchedulerConfig};
use super::euler::{discrete_schedule, scale_by_sigma, DiscreteSchedule};
use super::{predict_x0_ve, Sampler, SigmaSchedule};
use crate::engine::rng::BatchNoise;

const ORDER: usize = 4;

pub struct LmsSampler {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    /// Most recent last, at most `ORDER`.
    derivatives: Vec<Tensor>,
}

/// ∫ L_j(τ) dτ over [sigmas[t], sigmas[t+1]], L_j the Lagrange basis on sigmas[t], …, sigmas[t-order+1].
fn lms_coefficient(sigmas: &[f32], order: usize, t: usize, j: usize) -> f64 {
    // 4-point Gauss-Legendre: exact for polynomials up to degree 7.
    const NODES: [f64; 4] = [
        -0.861_136_311_594_052_6,
        -0.339_981_043_584_856_3,
        0.339_981_043_584_856_3,
        0.861_136_311_594_052_6,
    ];
    const WEIGHTS: [f64; 4] = [
        0.347_854_845_137_453_9,
        0.652_145_154_862_546_1,
        0.652_145_154_862_546_1,
        0.347_854_845_137_453_9,
    ];
    let s = |i: usize| sigmas[i] as f64;
    let basis = |tau: f64| -> f64 {
        (0..order)
            .filter(|&k| k != j)
            .map(|k| (tau - s(t - k)) / (s(t - j) - s(t - k)))
            .product()
    };
    let (a, b) = (s(t), s(t + 1));
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    NODES
        .iter()
        .zip(WEIGHTS)
        .map(|(x, w)| w * basis(mid + half * x))
        .sum::<f64>()
        * half
}

impl LmsSampler {
    pub fn new(config: &SchedulerConfig, schedule: SigmaSchedule, steps: usize) -> Self {
        let DiscreteSchedule {
            timesteps,
            mut sigmas,
            init_noise_sigma,
        } = discrete_schedule(config, schedule, steps, false);
        // LMS has no final_sigmas_type: it always ends at 0.
        if let Some(last) = sigmas.last_mut() {
            *last = 0.0;
        }
        Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction: config.prediction_type(),
            derivatives: Vec::new(),
        }
    }
}

impl Sampler for LmsSampler {
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
        let sigma = self.sigmas[i];
        let x0 = predict_x0_ve(self.prediction, model_output, sample, sigma)?;
        self.derivatives.push(((sample - x0)? / sigma as f64)?);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let order = (i + 1).min(ORDER);
        let mut out = sample.clone();
        for (j, derivative) in self.derivatives.iter().rev().enumerate().take(order) {
            let coeff = lms_coefficient(&self.sigmas, order, i, j) as f32;
            out = (out + (derivative * coeff as f64)?)?;
        }
        Ok(out)
    }
}
