//! The parts of a generation timed on their own (`candela bench`): prompt encoding, one denoiser
//! forward at the batch a guided step runs, and one VAE decode — for every family, with the
//! same inputs diffusers' side of the benchmark (`tools/bench/bench_diffusers.py`) builds.

use std::ffi::CStr;
use std::time::Instant;

use candle_core::{DType, Tensor};

use super::{autoencoder::Autoencoder, flux, sd3, Pipeline};
use crate::engine::error::Result;
use crate::engine::profile::{self, ProfileRow};

/// The prompt every benchmark encodes.
pub const BENCH_PROMPT: &str = "a photo of a cat sitting on a windowsill, soft morning light";

/// One benchmark shape.
#[derive(Debug, Clone, Copy)]
pub struct BenchShape {
    pub width: usize,
    pub height: usize,
    /// Rows of the denoiser's batch: 2 for classifier-free guidance, 1 for guidance-distilled
    /// models (FLUX, Turbo).
    pub batch: usize,
    /// Timed denoiser forwards, and prompt encodings, after one warm-up of each.
    pub repeats: usize,
    /// Also profile this many denoiser forwards and one decode module by module
    /// ([`crate::engine::profile`]; the device waits at every module boundary, so these runs
    /// are not the timed ones).
    pub profiled_forwards: usize,
    /// Also time the denoiser forward replayed as one CUDA graph
    /// ([`crate::engine::cuda::step_graph::time_graph_replays`]).
    pub cuda_graph: bool,
}

/// Per-module times of one denoiser forward (averaged over the profiled forwards) and of one
/// VAE decode.
#[derive(Debug, Clone, Default)]
pub struct PartProfiles {
    pub denoiser: Vec<ProfileRow>,
    pub vae_decode: Vec<ProfileRow>,
}

#[derive(Debug, Clone)]
pub struct PartTimings {
    pub text_encode_ms: f64,
    /// Each timed denoiser forward (warm-up excluded).
    pub denoiser_ms: Vec<f64>,
    pub vae_decode_ms: f64,
    /// One picture's encode at the benchmark's size (img2img, inpainting), from 8-bit RGB.
    pub vae_encode_ms: f64,
    pub profiles: PartProfiles,
    /// The graph-replayed forward's median, or why it could not be captured.
    pub graph_forward_ms: Option<std::result::Result<f64, String>>,
}

/// The median of `values` (the upper middle one of an even count); `values` must not be empty.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// The median of `repeats` (at least one) timed calls of `f` after one untimed warm-up call, in
/// milliseconds; `sync` waits for the device before each clock stops.
pub fn median_ms<E>(
    repeats: usize,
    sync: impl Fn() -> std::result::Result<(), E>,
    mut f: impl FnMut() -> std::result::Result<(), E>,
) -> std::result::Result<f64, E> {
    f()?;
    sync()?;
    let mut times = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        f()?;
        sync()?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(times))
}

/// Time `f`, waiting for the device to finish (`sync`) before the clock stops.
fn timed<T>(sync: &dyn Fn() -> Result<()>, f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let start = Instant::now();
    let out = f()?;
    sync()?;
    Ok((out, start.elapsed().as_secs_f64() * 1000.0))
}

/// `f` after one untimed warm-up call (first-use costs — page faults, lazy buffers, on a GPU
/// module loads and handle creation — stay out of the figure, on both sides of the comparison):
/// the median of `repeats` (at least one) timed calls, the first of them kernel-traced, and that
/// call's output.
fn timed_warm<T>(
    label: &CStr,
    sync: &dyn Fn() -> Result<()>,
    repeats: usize,
    f: impl Fn() -> Result<T>,
) -> Result<(T, f64)> {
    f()?;
    sync()?;
    let (out, first) = profile::kernel_trace_window(label, || timed(sync, &f))?;
    let mut times = vec![first];
    for _ in 1..repeats {
        times.push(timed(sync, &f)?.1);
    }
    Ok((out, median(times)))
}

/// Each timed forward (ms), the profile, and the CUDA-graph replay time or why there is none.
type ForwardTimes = (
    Vec<f64>,
    Vec<ProfileRow>,
    Option<std::result::Result<f64, String>>,
);

/// The warm-up and `shape.repeats` timed runs of one denoiser forward, then the profiled ones,
/// then (when asked) the forward as a CUDA graph.
fn time_forwards(
    shape: &BenchShape,
    sync: &dyn Fn() -> Result<()>,
    forward: impl Fn() -> Result<Tensor>,
    log: &mut dyn FnMut(String),
) -> Result<ForwardTimes> {
    let repeats = shape.repeats;
    let mut times = Vec::with_capacity(repeats);
    let mut device = candle_core::Device::Cpu;
    for i in 0..=repeats.max(1) {
        let (out, ms) = if i == 0 {
            timed(sync, &forward)?
        } else {
            profile::kernel_trace_window(c"denoiser", || timed(sync, &forward))?
        };
        device = out.device().clone();
        log(format!(
            "denoiser forward {i}: {ms:.1} ms{}",
            if i == 0 { " (warm-up)" } else { "" }
        ));
        if i > 0 {
            times.push(ms);
        }
    }
    let runs = shape.profiled_forwards;
    let graph = shape
        .cuda_graph
        .then(|| graph_forward(&device, repeats, &forward, log));
    if runs == 0 {
        return Ok((times, Vec::new(), graph));
    }
    let (total, mut rows) = profile::record(|| -> Result<f64> {
        let mut total = 0.0;
        for _ in 0..runs {
            total += timed(sync, &forward)?.1;
        }
        Ok(total)
    });
    rows.insert(0, whole_pass("forward", runs, total?));
    for row in &mut rows {
        row.calls /= runs;
        row.total_ms /= runs as f64;
    }
    Ok((times, rows, graph))
}

/// The forward replayed as one CUDA graph on `device`: its median time, or why capture failed.
fn graph_forward(
    device: &candle_core::Device,
    repeats: usize,
    forward: &dyn Fn() -> Result<Tensor>,
    log: &mut dyn FnMut(String),
) -> std::result::Result<f64, String> {
    #[cfg(feature = "cuda")]
    let result = crate::engine::cuda::step_graph::time_graph_replays(device, repeats, || {
        forward().map_err(|e| candle_core::Error::Msg(e.to_string()))
    })
    .map_err(|e| e.to_string());
    #[cfg(not(feature = "cuda"))]
    let result: std::result::Result<f64, String> = {
        let _ = (device, repeats, forward);
        Err("built without CUDA".to_string())
    };
    match &result {
        Ok(ms) => log(format!("denoiser forward as a CUDA graph: {ms:.1} ms")),
        Err(e) => log(format!("denoiser forward as a CUDA graph: failed: {e}")),
    }
    result
}

/// One image's decode (the first row of `latents`), after a warm-up decode as for the denoiser;
/// then, when profiling, one more decode module by module.
fn time_decode(
    shape: &BenchShape,
    sync: &dyn Fn() -> Result<()>,
    latents: &Tensor,
    decode: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(f64, Vec<ProfileRow>)> {
    let z = latents.narrow(0, 0, 1)?;
    let ms = timed_warm(c"vae decode", sync, 1, || decode(&z))?.1;
    if shape.profiled_forwards == 0 {
        return Ok((ms, Vec::new()));
    }
    let (total, mut rows) = profile::record(|| timed(sync, || decode(&z)));
    rows.insert(0, whole_pass("decode", 1, total?.1));
    Ok((ms, rows))
}

/// One picture's encode (mid-grey noise, 8-bit RGB as uploaded), after a warm-up encode.
fn time_encode(
    shape: &BenchShape,
    sync: &dyn Fn() -> Result<()>,
    vae: &Autoencoder,
) -> Result<f64> {
    let rgb: Vec<u8> = (0..shape.width * shape.height * 3)
        .map(|i| (96 + (i * 7919) % 64) as u8)
        .collect();
    Ok(timed_warm(c"vae encode", sync, 1, || {
        vae.encode_rgb(&rgb, shape.width, shape.height)
    })?
    .1)
}

/// The row of a whole profiled pass, which the module rows divide.
fn whole_pass(label: &'static str, calls: usize, total_ms: f64) -> ProfileRow {
    ProfileRow {
        label,
        calls,
        total_ms,
    }
}

impl Pipeline {
    /// Time prompt encoding, `shape.repeats` denoiser forwards and a VAE decode. `sync` waits
    /// for the device; `log` receives a line per forward.
    pub fn time_parts(
        &self,
        shape: BenchShape,
        sync: &dyn Fn() -> Result<()>,
        log: &mut dyn FnMut(String),
    ) -> Result<PartTimings> {
        let batch = shape.batch.max(1);
        match self {
            Self::Sd(m) => {
                let (embeds, text_encode_ms) =
                    timed_warm(c"text encoding", sync, shape.repeats, || {
                        m.embed_uncached(BENCH_PROMPT, 0)
                    })?;
                let scale = m.vae_scale();
                let (h, w) = (shape.height / scale, shape.width / scale);
                let sample = random(&[batch, m.latent_channels(), h, w], &embeds.context)?;
                let context = embeds.context.repeat((batch, 1, 1))?;
                let (denoiser_ms, denoiser_profile, graph_forward_ms) = match &embeds.pooled {
                    None => time_forwards(
                        &shape,
                        sync,
                        || m.unet_forward(&sample, 500.0, &context),
                        log,
                    )?,
                    Some(pooled) => {
                        let pooled = pooled.repeat((batch, 1))?;
                        let time_ids = m.positive_time_ids(shape.width, shape.height).repeat(batch);
                        time_forwards(
                            &shape,
                            sync,
                            || m.unet_forward_added(&sample, 500.0, &context, &pooled, &time_ids),
                            log,
                        )?
                    }
                };
                let (vae_decode_ms, vae_profile) =
                    time_decode(&shape, sync, &sample, |z| m.vae_decode(z))?;
                let vae_encode_ms = time_encode(&shape, sync, &m.vae)?;
                Ok(PartTimings {
                    text_encode_ms,
                    denoiser_ms,
                    vae_decode_ms,
                    vae_encode_ms,
                    profiles: PartProfiles {
                        denoiser: denoiser_profile,
                        vae_decode: vae_profile,
                    },
                    graph_forward_ms,
                })
            }
            Self::Sd3(m) => {
                let (embeds, text_encode_ms) =
                    timed_warm(c"text encoding", sync, shape.repeats, || {
                        m.embed_uncached(BENCH_PROMPT, 0, sd3::DEFAULT_T5_TOKENS)
                    })?;
                let scale = m.vae_scale();
                let (h, w) = (shape.height / scale, shape.width / scale);
                let sample = random(&[batch, m.vae().latent_channels(), h, w], &embeds.context)?;
                let context = embeds.context.repeat((batch, 1, 1))?;
                let pooled = embeds.pooled.repeat((batch, 1))?;
                let (denoiser_ms, denoiser_profile, graph_forward_ms) = time_forwards(
                    &shape,
                    sync,
                    || m.transformer_forward(&sample, 500.0, &context, &pooled, &[]),
                    log,
                )?;
                let (vae_decode_ms, vae_profile) =
                    time_decode(&shape, sync, &sample, |z| m.vae().decode(z))?;
                let vae_encode_ms = time_encode(&shape, sync, m.vae())?;
                Ok(PartTimings {
                    text_encode_ms,
                    denoiser_ms,
                    vae_decode_ms,
                    vae_encode_ms,
                    profiles: PartProfiles {
                        denoiser: denoiser_profile,
                        vae_decode: vae_profile,
                    },
                    graph_forward_ms,
                })
            }
            Self::Flux(m) => {
                let guidance = m.has_guidance_embeds();
                let (embeds, text_encode_ms) =
                    timed_warm(c"text encoding", sync, shape.repeats, || {
                        m.embed_uncached(BENCH_PROMPT, flux::default_t5_tokens(guidance))
                    })?;
                let scale = m.vae().scale();
                let (h, w) = (shape.height / scale, shape.width / scale);
                let latents = random(&[batch, m.vae().latent_channels(), h, w], &embeds.context)?;
                let packed = flux::Flux::pack(&latents)?;
                let context = embeds.context.repeat((batch, 1, 1))?;
                let pooled = embeds.pooled.repeat((batch, 1))?;
                // As a generation: positions made once, outside the timed step.
                let rope = m.rope_for(context.dim(1)?, (h, w))?;
                let (denoiser_ms, denoiser_profile, graph_forward_ms) = time_forwards(
                    &shape,
                    sync,
                    || {
                        m.transformer_forward(
                            &packed,
                            500.0,
                            guidance.then_some(3.5),
                            &context,
                            &pooled,
                            &rope,
                        )
                    },
                    log,
                )?;
                let (vae_decode_ms, vae_profile) =
                    time_decode(&shape, sync, &latents, |z| m.vae().decode(z))?;
                let vae_encode_ms = time_encode(&shape, sync, m.vae())?;
                Ok(PartTimings {
                    text_encode_ms,
                    denoiser_ms,
                    vae_decode_ms,
                    vae_encode_ms,
                    profiles: PartProfiles {
                        denoiser: denoiser_profile,
                        vae_decode: vae_profile,
                    },
                    graph_forward_ms,
                })
            }
        }
    }
}

/// Standard-normal values of `like`'s dtype and device.
fn random(dims: &[usize], like: &Tensor) -> Result<Tensor> {
    Ok(
        Tensor::randn(0f32, 1f32, dims, like.device())?.to_dtype(match like.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => like.dtype(),
            _ => DType::F32,
        })?,
    )
}
