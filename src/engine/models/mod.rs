//! Network definitions. Each reads its sizes from the component's `config.json`.

pub mod attention;
pub mod blocks;
pub mod clip;
pub mod cpu_activation;
pub mod cpu_attention;
pub mod cpu_conv;
pub mod cpu_norm;
pub mod cpu_winograd;
pub mod dit;
pub mod flux;
pub mod mmdit;
pub mod t5;
pub mod unet;
pub mod vae;

/// The largest absolute difference between two tensors of one shape (kernel tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("comparable tensors")
}
