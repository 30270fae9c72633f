//! The denoiser's forward captured once as a CUDA graph and replayed for the later steps of a
//! loop: one launch per step in place of ~1 000-2 000, whose host time left the device idle for
//! 15 of SDXL's 62 ms traced step on an H200, 13 of SD3.5 Large's 206 and 7 of FLUX-dev's 206
//! (session 25).
//!
//! A graph replays the kernels it recorded on the memory it recorded, so the step's changing
//! inputs (the latents, the timestep's features) live in buffers of the graph's own, copied into
//! before each launch, and its output is copied out of one. Everything else the forward reads
//! must be the same every step: weights, the prompt's embeddings, SDXL's time ids (host values
//! uploaded during capture are frozen into the graph by candle's capture cache).
//!
//! Off unless [`set_enabled`] (`candela bench --cuda-graph` until a GPU run has measured it),
//! and only in a process whose CUDA device was opened with cudarc's event tracking off:
//! its cross-stream events cannot be captured.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::cuda_backend::cudarc::driver::sys::{
    CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::{Device, Tensor};

use super::cuda_error;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Makes denoising loops replay their steps as CUDA graphs (or not) from now on.
///
/// # Safety
/// The process's CUDA tensors must have been made with cudarc's event tracking off
/// (`CudaDevice::disable_event_tracking` right after the device was opened): a capture that
/// meets a tracked tensor fails, or records waits on events outside the graph.
pub unsafe fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// One captured forward with its input and output buffers.
pub struct StepGraph {
    /// Destroyed by hand in `drop`, before its pool's memory is trimmed.
    graph: std::mem::ManuallyDrop<CudaGraph>,
    inputs: Vec<Tensor>,
    output: Tensor,
}

impl Drop for StepGraph {
    fn drop(&mut self) {
        // SAFETY: dropped once, here; `self.graph` is not used after.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.graph) };
        // The graph pool keeps what the graph allocated for a later graph; give it back to the
        // device, where the VRAM budget counts it.
        if let Device::Cuda(dev) = self.output.device() {
            let device = dev.cuda_stream().context().cu_device();
            let _ = unsafe {
                candle_core::cuda_backend::cudarc::driver::sys::cuDeviceGraphMemTrim(device)
            };
        }
    }
}

impl StepGraph {
    /// Runs `forward` on copies of `inputs` (the graph's input buffers) on `device`, then
    /// captures it on them: the eager run's output, and the graph that replays it. The eager run
    /// does the first-use work (plans, module loads, kernel parameters uploaded into candle's
    /// capture cache) that cannot happen inside a capture.
    pub fn capture(
        device: &Device,
        inputs: &[&Tensor],
        forward: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<(Self, Tensor)> {
        let Device::Cuda(dev) = device else {
            candle_core::bail!("CUDA graphs need a CUDA device");
        };
        let _cache = dev.enable_cuda_graph_htod_cache();
        let buffers = inputs
            .iter()
            .map(|t| t.contiguous()?.copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let eager = forward(&buffers)?;
        let output = eager.zeros_like()?;
        // The copy the capture ends with, once outside it (its kernel's module loaded).
        output.slice_set(&eager, 0, 0)?;
        let stream = dev.cuda_stream();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(cuda_error)?;
        // Inside the capture everything but the copy into `output` is freed again, so the graph
        // holds no allocation between launches (a graph relaunched with one unfreed fails).
        let captured = forward(&buffers).and_then(|out| output.slice_set(&out, 0, 0));
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        captured?;
        let graph = graph
            .map_err(cuda_error)?
            .ok_or_else(|| candle_core::Error::Msg("the capture recorded nothing".into()))?;
        graph.upload().map_err(cuda_error)?;
        Ok((
            Self {
                graph: std::mem::ManuallyDrop::new(graph),
                inputs: buffers,
                output,
            },
            eager,
        ))
    }

    /// The captured forward on `inputs` (the shapes and dtypes it was captured with).
    pub fn replay(&self, inputs: &[&Tensor]) -> candle_core::Result<Tensor> {
        if inputs.len() != self.inputs.len() {
            candle_core::bail!(
                "a step graph of {} inputs replayed with {}",
                self.inputs.len(),
                inputs.len()
            );
        }
        for (buffer, input) in self.inputs.iter().zip(inputs) {
            if buffer.shape() != input.shape() {
                candle_core::bail!(
                    "a step graph captured for {:?} replayed with {:?}",
                    buffer.shape(),
                    input.shape()
                );
            }
            buffer.slice_set(&input.contiguous()?, 0, 0)?;
        }
        self.graph.launch().map_err(cuda_error)?;
        // The next launch overwrites the output buffer.
        self.output.copy()
    }
}

/// The forward `f` captured as a CUDA graph on `device` (after one eager run), then the median
/// time of `repeats` replays in milliseconds, the output copied out of the graph each time as a
/// loop's step does — what a denoiser step costs with launch overhead gone (`candela bench
/// --cuda-graph`; the process needs event tracking off, as [`set_enabled`]). An error says why
/// capture failed.
pub fn time_graph_replays(
    device: &Device,
    repeats: usize,
    f: impl Fn() -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    let (graph, _) = StepGraph::capture(device, &[], &|_| f())?;
    // The first (untimed) replay is the warm-up.
    crate::engine::pipelines::timing::median_ms(
        repeats,
        || device.synchronize(),
        || graph.replay(&[]).map(drop),
    )
}

/// The denoiser forward of one loop: eager, or with step graphs [`enabled`] on CUDA, captured
/// at the first step and replayed from the second. A capture or replay that fails switches the
/// loop back to eager forwards (logged), so a step graph can cost a loop its speed, not its
/// result.
#[derive(Default)]
pub struct StepReplay {
    state: ReplayState,
}

#[derive(Default)]
enum ReplayState {
    #[default]
    Uncaptured,
    Replaying(StepGraph),
    Eager,
}

impl StepReplay {
    pub fn run(
        &mut self,
        inputs: &[&Tensor],
        forward: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let eager =
            |inputs: &[&Tensor]| forward(&inputs.iter().map(|t| (*t).clone()).collect::<Vec<_>>());
        let device = match inputs.first() {
            Some(t) if enabled() && t.device().is_cuda() => t.device(),
            _ => return eager(inputs),
        };
        match &self.state {
            ReplayState::Eager => eager(inputs),
            ReplayState::Uncaptured => match StepGraph::capture(device, inputs, forward) {
                Ok((graph, out)) => {
                    self.state = ReplayState::Replaying(graph);
                    Ok(out)
                }
                Err(e) => {
                    tracing::warn!("step graph capture failed, eager steps instead: {e}");
                    self.state = ReplayState::Eager;
                    eager(inputs)
                }
            },
            ReplayState::Replaying(graph) => match graph.replay(inputs) {
                Ok(out) => Ok(out),
                Err(e) => {
                    tracing::warn!("step graph replay failed, eager steps instead: {e}");
                    self.state = ReplayState::Eager;
                    eager(inputs)
                }
            },
        }
    }
}
