//! Text-to-image pipelines, one per model family, and the checks they share.

pub mod autoencoder;
pub mod params;
pub mod sd;
pub mod sd3;

use candle_core::{DType, Device};

use crate::engine::error::{EngineError, Result};
use params::GenerateParams;

/// candle's CPU backend has no bf16 matmul; fail before loading gigabytes.
pub(crate) fn check_dtype(device: &Device, dtype: DType) -> Result<()> {
    if device.is_cpu() && dtype == DType::BF16 {
        return Err(EngineError::invalid(
            "dtype",
            "bf16 is not supported on CPU; use f32 or f16",
        ));
    }
    Ok(())
}

/// The limits every pipeline applies: steps, images per request, guidance.
pub(crate) fn check_common(p: &GenerateParams, train_steps: usize) -> Result<()> {
    let max_steps = train_steps.min(1000);
    if p.steps == 0 || p.steps > max_steps {
        return Err(EngineError::invalid(
            "steps",
            format!("steps must be between 1 and {max_steps}"),
        ));
    }
    if p.n == 0 || p.n > 16 {
        return Err(EngineError::invalid("n", "n must be between 1 and 16"));
    }
    if !p.guidance_scale.is_finite() || !(0.0..=100.0).contains(&p.guidance_scale) {
        return Err(EngineError::invalid(
            "guidance_scale",
            "guidance_scale must be between 0 and 100",
        ));
    }
    Ok(())
}
