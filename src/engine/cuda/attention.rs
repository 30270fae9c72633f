//! Fused attention on CUDA (`attention.cu`): softmax(q kᵀ · scale) v without materialising the
//! scores. The unfused path wrote, re-read and rewrote a (heads × tokens × tokens) matrix per
//! layer — 3 GB per SD3.5-Large attention at 1024² — with candle's one-warp-per-row softmax: 27 ms
//! against PyTorch's fused 0.96 ms on an H200.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{CustomOp3, DType, Layout, Shape, Tensor};

use super::cuda_error;
pub use crate::engine::cuda_geometry::AttentionKernel as Kernel;
use crate::engine::cuda_geometry::{padded_head_dim, Layouts, Strides};

/// Passed by value to the kernels: `#[repr(C)]` plain data, the layout of attention.cu's struct.
unsafe impl DeviceRepr for Layouts {}

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
/// The Hopper kernel, compute_90a code (empty when the build targets an older architecture).
const PTX_HOPPER: &str = include_str!(concat!(env!("OUT_DIR"), "/attention_hopper.ptx"));

/// Whether `kernel` is built for this head size and runs on `device`.
pub fn available(kernel: Kernel, head_dim: usize, device: &candle_core::Device) -> bool {
    let built = match kernel.is_hopper() {
        true => !PTX_HOPPER.is_empty(),
        false => !PTX.is_empty(),
    };
    built
        && kernel.handles(head_dim)
        && super::compute_capability(device).is_some_and(|cc| kernel.runs_on(cc))
}

/// Whether [`attention`] takes these (batch, heads, tokens, head_dim) tensors.
pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    cfg!(candela_flash_attention)
        && q.device().is_cuda()
        && matches!(q.dtype(), DType::F16 | DType::BF16)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && q.rank() == 4
        && k.dims() == v.dims()
        && q.dims()[..2] == k.dims()[..2]
        && q.dims()[3] == k.dims()[3]
        && padded_head_dim(q.dims()[3]).is_some()
        && [q, k, v].iter().all(|t| starts_aligned(t))
        && super::self_check::passed(super::self_check::Fused::Attention)
}

/// Whether `t`'s rows can reach the kernel on 16-byte boundaries: a view it cannot read in place
/// is copied (to offset 0), but a contiguous one would not move — it must start at a multiple of
/// 8 half-precision elements.
fn starts_aligned(t: &Tensor) -> bool {
    !t.is_contiguous() || t.layout().start_offset().is_multiple_of(8)
}

/// The kernel the models run (process-wide: a benchmark's choice, not a per-request one), or
/// [`BY_HEAD_SIZE`], the default.
static MODEL_KERNEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(BY_HEAD_SIZE);

/// The default: a Hopper kernel chosen by head size where one runs (9.0 devices, head sizes 64
/// and 128; the tiled one elsewhere). Session 25's H200 run, denoiser steps against the tiled
/// kernel's: `Hopper` 0.71× (FLUX-dev), 0.76× (SD3.5 Large), 0.87× (SDXL); `Hopper128` 0.69×,
/// 0.79×, 0.90× — the two-warpgroup kernel wins at FLUX's head size 128 (139.9 against 143.3 ms)
/// and loses at the others' 64.
const BY_HEAD_SIZE: u8 = u8::MAX;

/// Makes [`attention`] run `kernel` from now on, in this process.
pub fn set_model_kernel(kernel: Kernel) {
    MODEL_KERNEL.store(kernel as u8, std::sync::atomic::Ordering::Relaxed);
}

/// How [`attention`] uses cuDNN's fused attention (`attention_graph.rs`; our kernel where cuDNN
/// has no plan for a shape). A candidate until a GPU run has measured it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CudnnUse {
    /// Our kernels only (the default).
    Never = 0,
    /// cuDNN wherever it has a plan.
    Always = 1,
    /// Per shape, whichever of cuDNN's plan and our kernel ran it faster when the shape was
    /// first met (both timed on that call's own tensors): no one choice wins at every head size
    /// and sequence length on every card.
    WhereFaster = 2,
}

static CUDNN: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(CudnnUse::Never as u8);

/// Makes [`attention`] use cuDNN's fused attention so from now on, in this process. Without the
/// cudnn feature there is nothing to switch on.
pub fn set_cudnn(use_: CudnnUse) {
    let use_ = if cfg!(feature = "cudnn") {
        use_
    } else {
        CudnnUse::Never
    };
    CUDNN.store(use_ as u8, std::sync::atomic::Ordering::Relaxed);
}

/// How [`attention`] uses cuDNN's fused attention.
pub fn cudnn_use() -> CudnnUse {
    match CUDNN.load(std::sync::atomic::Ordering::Relaxed) {
        1 => CudnnUse::Always,
        2 => CudnnUse::WhereFaster,
        _ => CudnnUse::Never,
    }
}

/// The kernel [`attention`] runs at `head_dim` where it applies: the one chosen, or by default
/// ([`BY_HEAD_SIZE`]) `Hopper128` at head size 128 and `Hopper` elsewhere.
pub fn model_kernel(head_dim: usize) -> Kernel {
    let stored = MODEL_KERNEL.load(std::sync::atomic::Ordering::Relaxed);
    if stored == BY_HEAD_SIZE {
        return match head_dim {
            128 => Kernel::Hopper128,
            _ => Kernel::Hopper,
        };
    }
    Kernel::ALL
        .into_iter()
        .find(|k| *k as u8 == stored)
        .unwrap_or(Kernel::Tiled)
}

/// softmax(q kᵀ · scale) v over (batch, heads, tokens, head_dim) f16/bf16 CUDA tensors (check
/// [`supports`] first), by the models' kernel. Views whose rows are aligned (a projection's
/// output seen heads-first) are read in place; the result is a heads-first view of token-major
/// data, so `transpose(1, 2)` and merging the heads cost nothing.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> candle_core::Result<Tensor> {
    let kernel = runnable_kernel(q);
    #[cfg(feature = "cudnn")]
    match cudnn_use() {
        CudnnUse::Never => {}
        use_ => {
            let op = super::attention_graph::CudnnAttention {
                scale,
                fallback: Some(kernel),
                race: use_ == CudnnUse::WhereFaster,
            };
            return apply(q, k, v, &op);
        }
    }
    run(kernel, q, k, v, scale)
}

/// The chosen kernel where it applies (the Hopper ones: head sizes 64 and 128 on a 9.0 device),
/// the tiled one elsewhere.
fn runnable_kernel(q: &Tensor) -> Kernel {
    let chosen = model_kernel(q.dims()[3]);
    if chosen == Kernel::Tiled || available(chosen, q.dims()[3], q.device()) {
        chosen
    } else {
        Kernel::Tiled
    }
}

/// [`attention`] through cuDNN wherever it has a plan, however [`cudnn_use`] is set, our kernel
/// elsewhere: what the device check compares with candle's ops (a race at its small shapes
/// might never run cuDNN).
pub fn attention_cudnn_first(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cudnn")]
    {
        let op = super::attention_graph::CudnnAttention {
            scale,
            fallback: Some(runnable_kernel(q)),
            race: false,
        };
        apply(q, k, v, &op)
    }
    #[cfg(not(feature = "cudnn"))]
    attention(q, k, v, scale)
}

/// [`attention`] by cuDNN's fused attention alone: an error where it has no plan for the shape.
#[cfg(feature = "cudnn")]
pub fn attention_by_cudnn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let op = super::attention_graph::CudnnAttention {
        scale,
        fallback: None,
        race: false,
    };
    apply(q, k, v, &op)
}

/// [`attention`] by a given kernel.
pub fn attention_by(
    kernel: Kernel,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> candle_core::Result<Tensor> {
    if !available(kernel, q.dims()[3], q.device()) {
        candle_core::bail!(
            "the {} attention kernel does not run head size {} on this device",
            kernel.name(),
            q.dims()[3]
        );
    }
    run(kernel, q, k, v, scale)
}

fn run(
    kernel: Kernel,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> candle_core::Result<Tensor> {
    apply(q, k, v, &FlashAttention { scale, kernel })
}

/// Applies an attention op (token-major output) to heads-first operands, seen heads-first.
fn apply(q: &Tensor, k: &Tensor, v: &Tensor, op: &impl CustomOp3) -> candle_core::Result<Tensor> {
    // A view the ops cannot read in place is copied (a fresh copy always can be).
    let ready = |t: &Tensor| match Strides::of_view(t.layout()) {
        Some(_) => Ok(t.clone()),
        None => t.contiguous(),
    };
    ready(q)?
        .apply_op3_no_bwd(&ready(k)?, &ready(v)?, op)?
        .transpose(1, 2)
}

/// What an attention op reads of its heads-first operands: (batch, heads, queries, keys, head
/// size) and each operand's row strides — rows on 16-byte boundaries, q, k and v of one dtype.
pub(super) struct Operands {
    pub dims: [usize; 5],
    pub q: Strides,
    pub k: Strides,
    pub v: Strides,
}

impl Operands {
    pub fn read(
        [(q, ql), (k, kl), (v, vl)]: [(&CudaStorage, &Layout); 3],
    ) -> candle_core::Result<Self> {
        let (b, h, n, d) = ql.shape().dims4()?;
        let (_, _, m, _) = kl.shape().dims4()?;
        if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
            candle_core::bail!("fused attention needs q, k and v of one dtype");
        }
        // 16-byte loads: every row must start on a 16-byte boundary.
        let strides = |layout: &Layout| {
            Strides::of_view(layout).ok_or_else(|| {
                candle_core::Error::Msg("fused attention of rows not 16-byte aligned".into())
            })
        };
        Ok(Self {
            dims: [b, h, n, m, d],
            q: strides(ql)?,
            k: strides(kl)?,
            v: strides(vl)?,
        })
    }
}

/// An operand's data from its layout's start, read in place at its strides.
pub(super) fn view_from<'a, T: CudaDType>(
    (s, l): (&'a CudaStorage, &Layout),
) -> candle_core::Result<CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// Our kernels' op (also the fallback of cuDNN's where it has no plan for a shape).
pub(super) struct FlashAttention {
    pub scale: f32,
    pub kernel: Kernel,
}

impl FlashAttention {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        &self,
        dev: &CudaDevice,
        kernel: &str,
        q: CudaView<T>,
        k: CudaView<T>,
        v: CudaView<T>,
        (bh, n, m, d): (usize, usize, usize, usize),
        layouts: Layouts,
    ) -> candle_core::Result<CudaSlice<T>> {
        let (module, ptx) = match self.kernel.is_hopper() {
            true => ("candela_attention_hopper", PTX_HOPPER),
            false => ("candela_attention", PTX),
        };
        let func = dev.get_or_load_custom_func(kernel, module, ptx)?;
        let padded = padded_head_dim(d).unwrap_or(d);
        let shared_mem_bytes = self.kernel.shared_bytes(padded, std::mem::size_of::<T>()) as u32;
        // Past the 48 KiB a launch gets without asking.
        if shared_mem_bytes > 48 * 1024 {
            use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute as Attribute;
            func.set_attribute(
                Attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_mem_bytes as i32,
            )
            .map_err(cuda_error)?;
        }
        let stream = dev.cuda_stream();
        let mut out = unsafe { stream.alloc::<T>(bh * n * d) }.map_err(cuda_error)?;
        let (n32, m32, d32) = (n as i32, m as i32, d as i32);
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let config = LaunchConfig {
            grid_dim: (
                n.div_ceil(self.kernel.queries_per_block()) as u32,
                bh as u32,
                1,
            ),
            block_dim: (self.kernel.threads() as u32, 1, 1),
            shared_mem_bytes,
        };
        let mut builder = func.builder();
        builder
            .arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&mut out)
            .arg(&n32)
            .arg(&m32)
            .arg(&d32)
            .arg(&layouts)
            .arg(&scale_log2);
        unsafe { builder.launch(config) }.map_err(cuda_error)?;
        Ok(out)
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    super::cpu_fwd_unsupported!(3);

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_layout: &Layout,
        k: &CudaStorage,
        k_layout: &Layout,
        v: &CudaStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let operands = [(q, q_layout), (k, k_layout), (v, v_layout)];
        let read = Operands::read(operands)?;
        let [b, h, n, m, d] = read.dims;
        let Some(padded) = padded_head_dim(d) else {
            candle_core::bail!("fused attention for head size {d}");
        };
        let layouts = Layouts {
            heads: h as i32,
            q: read.q,
            k: read.k,
            v: read.v,
            o: Strides::token_major(n, h, d),
        };
        let dims = (b * h, n, m, d);
        // The same kernel for f16 and bf16, named by the element type.
        fn run<T: CudaDType + DeviceRepr>(
            op: &FlashAttention,
            dtype: &str,
            padded: usize,
            [q, k, v]: [(&CudaStorage, &Layout); 3],
            dims: (usize, usize, usize, usize),
            layouts: Layouts,
        ) -> candle_core::Result<CudaStorage> {
            let kernel = format!("flash_attention_{}{dtype}_{padded}", op.kernel.infix());
            let out = op.launch(
                &q.0.device,
                &kernel,
                view_from::<T>(q)?,
                view_from::<T>(k)?,
                view_from::<T>(v)?,
                dims,
                layouts,
            )?;
            Ok(CudaStorage::wrap_cuda_slice(out, q.0.device.clone()))
        }
        let storage = match q.dtype() {
            DType::F16 => run::<half::f16>(self, "f16", padded, operands, dims, layouts)?,
            DType::BF16 => run::<half::bf16>(self, "bf16", padded, operands, dims, layouts)?,
            other => candle_core::bail!("fused attention of {other:?} tensors"),
        };
        // Token-major: the caller sees it heads-first through a transposition.
        Ok((storage, Shape::from((b, n, h, d))))
    }
}
