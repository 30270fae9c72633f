//! The inference engine: model loading, networks, samplers and pipelines, on candle.
//! Nothing here reads the environment or knows about HTTP; callers pass every setting in.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod cuda_geometry;
pub mod demo;
pub mod error;
pub mod loader;
pub mod memory;
pub mod models;
pub mod pipelines;
pub mod profile;

pub mod rng;
pub mod schedulers;
pub mod tokenizer;

use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

pub use error::{EngineError, Result};

/// Progress of one generation, reported after each denoising step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub step: usize,
    pub total: usize,
    pub elapsed_s: f64,
}

impl Progress {
    pub fn steps_per_second(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.step as f64 / self.elapsed_s
        } else {
            0.0
        }
    }
}

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl GeneratedImage {
    /// Peak signal-to-noise ratio (dB) against another picture of the same size; infinite when
    /// they are identical.
    pub fn psnr(&self, other: &GeneratedImage) -> f64 {
        let mse = self
            .rgb
            .iter()
            .zip(&other.rgb)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>()
            / self.rgb.len().max(1) as f64;
        if mse == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (255.0f64.powi(2) / mse).log10()
        }
    }
}

/// Decoder output (B, 3, H, W) in [-1, 1] -> 8-bit RGB, as diffusers' `VaeImageProcessor.postprocess`:
/// `(x * 0.5 + 0.5).clamp(0, 1)`, then `(x * 255).round()` (round half to even, like numpy).
pub fn latents_to_images(decoded: &Tensor) -> Result<Vec<GeneratedImage>> {
    let x = decoded.to_dtype(DType::F32)?;
    let x = ((x * 0.5)? + 0.5)?.clamp(0f32, 1f32)?;
    let (b, c, h, w) = x.dims4()?;
    if c != 3 {
        return Err(EngineError::Unsupported(format!(
            "decoder produced {c} channels, expected 3"
        )));
    }
    let hwc = x.permute((0, 2, 3, 1))?.contiguous()?;
    let values = hwc.flatten_all()?.to_vec1::<f32>()?;
    let per = h * w * 3;
    Ok((0..b)
        .map(|i| GeneratedImage {
            width: w as u32,
            height: h as u32,
            rgb: values[i * per..(i + 1) * per]
                .iter()
                .map(|v| (v * 255.0).round_ties_even() as u8)
                .collect(),
        })
        .collect())
}

/// `cpu`, `cuda`, `cuda:N`, `metal`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let bad = |m: String| EngineError::invalid("device", m);
    match spec {
        "cpu" => Ok(Device::Cpu),
        "metal" => Device::new_metal(0).map_err(|e| bad(format!("metal unavailable: {e}"))),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map(usize::from_str)
                .transpose()
                .map_err(|_| bad(format!("bad device `{s}`")))?;
            let device = Device::new_cuda(ordinal.unwrap_or(0)).map_err(|e| {
                bad(format!(
                    "{s} unavailable (was candela built with --features cuda?): {e}"
                ))
            })?;
            #[cfg(feature = "cuda")]
            cuda::configure(&device)?;
            Ok(device)
        }
        s => Err(bad(format!(
            "unknown device `{s}`; use cpu, cuda, cuda:N or metal"
        ))),
    }
}

/// Makes the denoising loops replay their steps as CUDA graphs from now on (`--cuda-graphs`):
/// one launch a step in place of ~1 000-2 000, where the host's launch time left the device idle
/// for a quarter of SDXL's step on an H200. Call right after [`parse_device`], before any model
/// is loaded. While a loop runs, the graph's pool holds a second copy of the denoiser's
/// activations ([`memory::Footprint`] counts it).
pub fn enable_step_graphs(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            // SAFETY: a device's models run on the engine's one thread and the device's one
            // stream, so cudarc's cross-stream events (which a capture cannot record) are not
            // needed; the tensors made from now on go without them, and the device check's
            // tensors are gone.
            unsafe {
                dev.disable_event_tracking();
                pipelines::set_step_graphs(true);
            }
            Ok(())
        }
        _ => Err(EngineError::invalid(
            "cuda_graphs",
            "CUDA graphs need a CUDA device (--device cuda)",
        )),
    }
}

pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        s => Err(EngineError::invalid(
            "dtype",
            format!("unknown dtype `{s}`; use f32, f16 or bf16"),
        )),
    }
}
