//! CUDA pieces candle lacks or runs slowly (built with the `cuda` feature). Measured on an H200
//! against PyTorch 2.11 in docs/performance.md, where each of these is explained.

pub mod attention;
#[cfg(feature = "cudnn")]
pub mod attention_graph;
#[cfg(feature = "cudnn")]
pub mod conv;
#[cfg(feature = "cudnn")]
pub mod conv_graph;
#[cfg(feature = "cudnn")]
pub mod cudnn_graph;
pub mod elementwise;
pub mod fp8;
pub mod self_check;
pub mod step_graph;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaView};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{Device, Layout};

/// The `cpu_fwd` of a CUDA-only custom op taking 1, 2 or 3 tensors: an error naming the op (the
/// models call these ops only for CUDA tensors; the CPU has its own kernels).
macro_rules! cpu_fwd_unsupported {
    (@fn ($($arg:ident),*)) => {
        fn cpu_fwd(
            &self,
            $($arg: &candle_core::CpuStorage, _: &candle_core::Layout),*
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $(let _ = $arg;)*
            candle_core::bail!("{} runs on CUDA devices only", self.name())
        }
    };
    (1) => { $crate::engine::cuda::cpu_fwd_unsupported!(@fn (a)); };
    (2) => { $crate::engine::cuda::cpu_fwd_unsupported!(@fn (a, b)); };
    (3) => { $crate::engine::cuda::cpu_fwd_unsupported!(@fn (a, b, c)); };
}
pub(crate) use cpu_fwd_unsupported;

/// Run `$body` with `$t` bound to the Rust type of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => candle_core::bail!("no fused CUDA kernel for {other:?}"),
        }
    };
}
pub(crate) use by_dtype;

/// A tensor's data as a typed slice at its offset, checked contiguous, with whether it starts
/// on a 16-byte boundary.
pub(crate) fn input<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<(CudaView<'a, T>, bool)> {
    if !l.is_contiguous() {
        candle_core::bail!("fused CUDA kernel on a non-contiguous tensor");
    }
    if !fits_32_bit_indices(l.shape().elem_count()) {
        candle_core::bail!("fused CUDA kernel on 2^32 values or more");
    }
    let offset = l.start_offset();
    let aligned = (offset * std::mem::size_of::<T>()).is_multiple_of(16);
    Ok((s.as_cuda_slice::<T>()?.slice(offset..), aligned))
}

/// Whether a tensor of `count` values can go to our element-wise kernels, whose index arithmetic
/// divides in 32 bits (elementwise.cu's `div32`).
pub fn fits_32_bit_indices(count: usize) -> bool {
    count < 1 << 32
}

/// The compute capability (major, minor) of a CUDA device, asked of the driver once per device:
/// the fused paths choose by it on every call (attention per layer, FP8 per Linear).
pub fn compute_capability(device: &Device) -> Option<(i32, i32)> {
    use std::sync::Mutex;
    static KNOWN: Mutex<Vec<(usize, (i32, i32))>> = Mutex::new(Vec::new());
    let Device::Cuda(dev) = device else {
        return None;
    };
    let stream = dev.cuda_stream();
    let context = stream.context();
    let ordinal = context.ordinal();
    let mut known = KNOWN.lock().ok()?;
    if let Some((_, cc)) = known.iter().find(|(o, _)| *o == ordinal) {
        return Some(*cc);
    }
    let cc = context.compute_capability().ok()?;
    known.push((ordinal, cc));
    Some(cc)
}

/// Wraps a CUDA library error as candle's.
pub(crate) fn cuda_error<E: std::error::Error + Send + Sync + 'static>(e: E) -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(e))
}

/// Per-device settings made once when a CUDA device is opened.
///
/// Memory: candle allocates through the driver's stream-ordered pool (`cuMemAllocAsync`), whose
/// default release threshold is 0 — at every synchronisation the pool hands its free memory back
/// to the driver, and the next allocations map it again. A denoising loop synchronises every step
/// (progress, cancellation), so each step re-mapped its whole working set: a 512 MiB buffer took
/// 2.6 ms to add to itself against PyTorch's 0.28 ms (its caching allocator keeps memory). Keeping
/// freed memory in the pool is what PyTorch does; the memory stays reserved for this process, as
/// PyTorch's does, and the VRAM budget counts peaks, not averages.
pub fn configure(device: &Device) -> candle_core::Result<()> {
    let Device::Cuda(dev) = device else {
        return Ok(());
    };
    let stream = dev.cuda_stream();
    let context = stream.context();
    context.bind_to_thread().map_err(cuda_error)?;
    unsafe {
        let mut pool = std::mem::MaybeUninit::uninit();
        sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), context.cu_device())
            .result()
            .map_err(cuda_error)?;
        let mut threshold = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool.assume_init(),
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(cuda_error)?;
    }
    // Once per process: the fused kernels against candle's ops on this card.
    static CHECKED: std::sync::Once = std::sync::Once::new();
    CHECKED.call_once(|| self_check::run(device));
    Ok(())
}

/// The device time of one `run` on `stream`: one untimed run (first-use costs: module loads,
/// runtime compilation), then the mean of `runs`, from the host between synchronisations.
pub fn seconds_per_run(
    stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
    runs: usize,
    mut run: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<f64> {
    let sync = || stream.synchronize().map_err(cuda_error);
    run()?;
    sync()?;
    let start = std::time::Instant::now();
    for _ in 0..runs {
        run()?;
    }
    sync()?;
    Ok(start.elapsed().as_secs_f64() / runs.max(1) as f64)
}
