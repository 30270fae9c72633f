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

/// How [`attention`] picks what runs a shape. The last two are candidates until a GPU run has
/// measured them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Selection {
    /// The models' kernel ([`model_kernel`]; the default).
    ModelKernel = 0,
    /// cuDNN's fused attention wherever it has a plan (`attention_graph.rs`), the models'
    /// kernel elsewhere.
    Cudnn = 1,
    /// Per shape, the fastest of every kernel that runs it here and cuDNN's plan, each timed on
    /// the first call's own tensors and checked against the models' kernel there: no one
    /// choice wins at every head size and sequence length on every card, and the run's log
    /// gives every entrant's time (`attention raced`).
    Fastest = 2,
}

static SELECTION: std::sync::atomic::AtomicU8 =
    std::sync::atomic::AtomicU8::new(Selection::ModelKernel as u8);

/// Makes [`attention`] select so from now on, in this process (cuDNN's fused attention only with
/// the cudnn feature: without it `Cudnn` is the models' kernel, and `Fastest` races ours).
pub fn set_selection(selection: Selection) {
    SELECTION.store(selection as u8, std::sync::atomic::Ordering::Relaxed);
}

/// How [`attention`] picks what runs a shape.
pub fn selection() -> Selection {
    match SELECTION.load(std::sync::atomic::Ordering::Relaxed) {
        1 if cfg!(feature = "cudnn") => Selection::Cudnn,
        2 => Selection::Fastest,
        _ => Selection::ModelKernel,
    }
}

/// Whether cuDNN's fused attention may run: the cudnn feature, a selection that uses it, not
/// switched off (by the device check, or `--switch-off cudnn-attention`).
pub fn cudnn_selected() -> bool {
    use super::self_check::{passed, Fused};
    cfg!(feature = "cudnn")
        && selection() != Selection::ModelKernel
        && passed(Fused::CudnnAttention)
}

/// cuDNN's fused attention out of every selection from now on, in this process.
pub fn switch_off_cudnn() {
    super::self_check::switch_off(super::self_check::Fused::CudnnAttention);
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
    match selection() {
        Selection::Cudnn if cudnn_selected() => attention_cudnn_first(q, k, v, scale),
        Selection::ModelKernel | Selection::Cudnn => run(runnable_kernel(q), q, k, v, scale),
        Selection::Fastest => {
            let winner = fastest(q, k, v, scale)?;
            let fallback = runnable_kernel(q);
            match winner.run(q, k, v, scale) {
                // A winner that fails later (it ran when it won): the models' kernel.
                Err(e) if winner != Entrant::Ours(fallback) => {
                    let demoted = Entrant::Ours(fallback);
                    WINNERS.with(|w| w.borrow_mut().insert(RaceKey::of(q, k, v), demoted));
                    tracing::warn!(
                        winner = winner.name(),
                        "attention failed, {} instead: {e}",
                        fallback.name()
                    );
                    run(fallback, q, k, v, scale)
                }
                outcome => outcome,
            }
        }
    }
}

/// What runs one attention shape under [`Selection::Fastest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entrant {
    Ours(Kernel),
    /// cuDNN's plan (an error where it has none).
    Cudnn,
}

impl Entrant {
    fn run(self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> candle_core::Result<Tensor> {
        match self {
            Self::Ours(kernel) => run(kernel, q, k, v, scale),
            #[cfg(feature = "cudnn")]
            Self::Cudnn => attention_by_cudnn(q, k, v, scale),
            #[cfg(not(feature = "cudnn"))]
            Self::Cudnn => candle_core::bail!("built without cuDNN"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Ours(kernel) => kernel.name(),
            Self::Cudnn => "cudnn",
        }
    }
}

/// One attention shape and layout, as a race remembers it (looked up on every call: no
/// allocation; q, k and v are rank 4, [`supports`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct RaceKey {
    location: candle_core::DeviceLocation,
    dtype: DType,
    dims: [[usize; 4]; 3],
    strides: [[usize; 4]; 3],
}

impl RaceKey {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor) -> Self {
        let four = |x: &[usize]| std::array::from_fn(|i| x.get(i).copied().unwrap_or(0));
        Self {
            location: q.device().location(),
            dtype: q.dtype(),
            dims: [q, k, v].map(|t| four(t.dims())),
            strides: [q, k, v].map(|t| four(t.stride())),
        }
    }
}

thread_local! {
    /// The winner of each shape raced on this thread.
    static WINNERS: std::cell::RefCell<std::collections::HashMap<RaceKey, Entrant>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The fastest entrant for this shape: on its first call every kernel that runs it here and
/// cuDNN's plan, each checked against the models' kernel on these tensors (an entrant that
/// fails or disagrees is out) and timed (one more untimed run, then five), remembered after. The
/// first call synchronises the device: it happens in a loop's first, eager step, never inside
/// a CUDA-graph capture (the capture replays shapes already met).
fn fastest(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> candle_core::Result<Entrant> {
    let key = RaceKey::of(q, k, v);
    if let Some(winner) = WINNERS.with(|w| w.borrow().get(&key).copied()) {
        return Ok(winner);
    }
    const RUNS: usize = 5;
    let device = q.device();
    let candle_core::Device::Cuda(cuda) = device else {
        candle_core::bail!("fused attention off a CUDA device");
    };
    let stream = cuda.cuda_stream();
    let head_dim = q.dims()[3];
    let reference_kernel = runnable_kernel(q);
    let reference = run(reference_kernel, q, k, v, scale)?;
    let mut entrants: Vec<Entrant> = (Kernel::ALL.into_iter())
        .filter(|kernel| available(*kernel, head_dim, device))
        .map(Entrant::Ours)
        .collect();
    if cudnn_selected() {
        entrants.push(Entrant::Cudnn);
    }
    let mut winner = (Entrant::Ours(reference_kernel), f64::INFINITY);
    let mut report = Vec::new();
    for entrant in entrants {
        let timed = (|| -> candle_core::Result<f64> {
            let error =
                super::self_check::relative_error(&entrant.run(q, k, v, scale)?, &reference)?;
            if error > super::self_check::LIMIT {
                candle_core::bail!("disagrees with {} by {error:.1e}", reference_kernel.name());
            }
            super::seconds_per_run(&stream, RUNS, || entrant.run(q, k, v, scale).map(drop))
        })();
        match timed {
            Ok(seconds) => {
                report.push(format!("{} {:.3} ms", entrant.name(), seconds * 1e3));
                if seconds < winner.1 {
                    winner = (entrant, seconds);
                }
            }
            Err(e) => report.push(format!("{}: {e}", entrant.name())),
        }
    }
    tracing::info!(
        shape = ?key.dims,
        entrants = %report.join(", "),
        chosen = winner.0.name(),
        "attention raced"
    );
    WINNERS.with(|w| w.borrow_mut().insert(key, winner.0));
    Ok(winner.0)
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

/// [`attention`] through cuDNN wherever it has a plan, however [`selection`] is set, the models'
/// kernel elsewhere: what the device check compares with candle's ops (a race at its small
/// shapes might never run cuDNN).
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
