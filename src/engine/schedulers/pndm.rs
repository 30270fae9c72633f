//! PNDM in its PLMS form (`skip_prk_steps=True`, the SD 1.x default), as diffusers'
//! `PNDMScheduler`: a 4th-order linear multistep method over the noise predictions. Runs
//! `steps + 1` model evaluations (the second timestep is evaluated twice, Heun-style warm-up).

use candle_core::Tensor;

use super::config::{spaced_timesteps, PredictionType, SchedulerConfig, TimestepSpacing};
use super::Sampler;
use crate::engine::error::{EngineError, Result};
use crate::engine::rng::BatchNoise;

pub struct PndmSampler {
    timesteps: Vec<f32>,
    int_timesteps: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    step_ratio: usize,
    prediction: PredictionType,
    ets: Vec<Tensor>,
    counter: usize,
    cur_sample: Option<Tensor>,
}

impl PndmSampler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        if config.skip_prk_steps == Some(false) {
            return Err(EngineError::Unsupported(
                "PNDM with skip_prk_steps=false (Runge-Kutta warm-up); every SD checkpoint uses the PLMS form".into(),
            ));
        }
        let prediction = config.prediction_type();
        if prediction == PredictionType::Sample {
            return Err(EngineError::Unsupported(
                "PNDM with prediction_type `sample` (diffusers rejects it too)".into(),
            ));
        }
        let train = config.num_train_timesteps();
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        // Ascending training timesteps, rounded as diffusers does for this sampler.
        let mut ascending: Vec<usize> =
            spaced_timesteps(spacing, train, steps, config.steps_offset())
                .into_iter()
                .map(|t| t.round_ties_even().max(0.0) as usize)
                .collect();
        ascending.reverse();
        // PLMS order: [t[:-1], t[-2:-1], t[-1:]] reversed -> the second-highest timestep twice.
        let n = ascending.len();
        let mut plms: Vec<usize> = ascending[..n - 1].to_vec();
        if n >= 2 {
            plms.push(ascending[n - 2]);
        }
        plms.push(ascending[n - 1]);
        plms.reverse();
        let alphas_cumprod = config.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            timesteps: plms.iter().map(|&t| t as f32).collect(),
            int_timesteps: plms,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: train / steps,
            prediction,
            ets: Vec::new(),
            counter: 0,
            cur_sample: None,
        })
    }

    /// Formula (9) of the PNDM paper.
    fn prev_sample(
        &self,
        sample: &Tensor,
        t: usize,
        prev_t: Option<usize>,
        eps: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let a_t = self.alphas_cumprod[t.min(self.alphas_cumprod.len() - 1)];
        let a_prev = prev_t.map_or(self.final_alpha_cumprod, |p| self.alphas_cumprod[p]);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.prediction {
            PredictionType::VPrediction => {
                ((eps * a_t.sqrt() as f64)? + (sample * b_t.sqrt() as f64)?)?
            }
            _ => eps.clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        (sample * sample_coeff as f64)? - ((eps * (a_prev - a_t) as f64)? / denom as f64)?
    }
}

impl Sampler for PndmSampler {
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
        _rng: &mut BatchNoise,
    ) -> candle_core::Result<Tensor> {
        let mut t = self.int_timesteps[i];
        let mut prev_t = t.checked_sub(self.step_ratio);
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_t = Some(t);
            t += self.step_ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let mut sample = sample.clone();
        let eps = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.clone()
        } else if k == 1 && self.counter == 1 {
            sample = self.cur_sample.take().unwrap_or(sample);
            ((model_output + &e[0])? / 2.0)?
        } else if k == 2 {
            (((&e[1] * 3.0)? - &e[0])? / 2.0)?
        } else if k == 3 {
            ((((&e[2] * 23.0)? - (&e[1] * 16.0)?)? + (&e[0] * 5.0)?)? / 12.0)?
        } else {
            ((((((&e[3] * 55.0)? - (&e[2] * 59.0)?)? + (&e[1] * 37.0)?)? - (&e[0] * 9.0)?)?)
                * (1.0 / 24.0))?
        };
        let out = self.prev_sample(&sample, t, prev_t, &eps)?;
        self.counter += 1;
        Ok(out)
    }
}
