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

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
/// Queries per block (4 warps × 16 rows) and keys per tile, as `BLOCK_M` / `BLOCK_N` in the kernel.
const BLOCK_M: usize = 64;
const BLOCK_N: usize = 64;

/// The padded head size the kernel is built for, if any: the real size must be a multiple of 8.
fn padded_head_dim(d: usize) -> Option<usize> {
    if !d.is_multiple_of(8) {
        return None;
    }
    [48, 64, 80, 128, 160]
        .into_iter()
        .find(|&p| d <= p && p - d < 16)
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
}

/// Whether `t`'s data reaches the kernel on a 16-byte boundary: a non-contiguous tensor is copied
/// (to offset 0); a contiguous view must start at a multiple of 8 half-precision elements.
fn starts_aligned(t: &Tensor) -> bool {
    !t.is_contiguous() || t.layout().start_offset().is_multiple_of(8)
}

/// softmax(q kᵀ · scale) v over (batch, heads, tokens, head_dim) f16/bf16 CUDA tensors (check
/// [`supports`] first).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> candle_core::Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &FlashAttention {
            scale,
            pipelined: false,
        },
    )
}

/// [`attention`] by the candidate kernel that loads the next k/v tile while computing the current
/// one (`flash_attention_pipelined` in attention.cu). Measured by `candela bench --kernels` on a
/// GPU (time and error against f32) before the models use it.
pub fn attention_pipelined(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
) -> candle_core::Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &FlashAttention {
            scale,
            pipelined: true,
        },
    )
}

struct FlashAttention {
    scale: f32,
    pipelined: bool,
}

impl FlashAttention {
    /// The kernel name's infix.
    fn variant(&self) -> &'static str {
        if self.pipelined {
            "pipelined_"
        } else {
            ""
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn launch<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        &self,
        dev: &CudaDevice,
        kernel: &str,
        q: CudaView<T>,
        k: CudaView<T>,
        v: CudaView<T>,
        (bh, n, m, d): (usize, usize, usize, usize),
    ) -> candle_core::Result<CudaSlice<T>> {
        let func = dev.get_or_load_custom_func(kernel, "candela_attention", PTX)?;
        // The pipelined kernel's two stages of k and v live in dynamic shared memory, past the
        // 48 KiB a launch gets without asking for head sizes from 96.
        let shared_mem_bytes = if self.pipelined {
            let padded = padded_head_dim(d).unwrap_or(d);
            (4 * BLOCK_N * (padded + 8) * std::mem::size_of::<T>()) as u32
        } else {
            0
        };
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
            grid_dim: (n.div_ceil(BLOCK_M) as u32, bh as u32, 1),
            block_dim: (128, 1, 1),
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
        let (b, h, n, d) = q_layout.shape().dims4()?;
        let (_, _, m, _) = k_layout.shape().dims4()?;
        let Some(padded) = padded_head_dim(d) else {
            candle_core::bail!("fused attention for head size {d}");
        };
        // 16-byte loads: every tensor must start on a 16-byte boundary (its rows then do too,
        // d being a multiple of 8 halves).
        for layout in [q_layout, k_layout, v_layout] {
            if !layout.is_contiguous() || layout.start_offset() % 8 != 0 {
                candle_core::bail!("fused attention of non-contiguous or unaligned tensors");
            }
        }
        let dims = (b * h, n, m, d);
        // The same kernel for f16 and bf16, named by the element type.
        fn run<T: CudaDType + DeviceRepr>(
            op: &FlashAttention,
            dtype: &str,
            padded: usize,
            [q, k, v]: [(&CudaStorage, &Layout); 3],
            dims: (usize, usize, usize, usize),
        ) -> candle_core::Result<CudaStorage> {
            fn view<'a, T: CudaDType>(
                (s, l): (&'a CudaStorage, &Layout),
            ) -> candle_core::Result<CudaView<'a, T>> {
                Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
            }
            let kernel = format!("flash_attention_{}{dtype}_{padded}", op.variant());
            let out = op.launch(
                &q.0.device,
                &kernel,
                view::<T>(q)?,
                view::<T>(k)?,
                view::<T>(v)?,
                dims,
            )?;
            Ok(CudaStorage::wrap_cuda_slice(out, q.0.device.clone()))
        }
        let operands = [(q, q_layout), (k, k_layout), (v, v_layout)];
        if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
            candle_core::bail!("fused attention needs q, k and v of one dtype");
        }
        let storage = match q.dtype() {
            DType::F16 => run::<half::f16>(self, "f16", padded, operands, dims)?,
            DType::BF16 => run::<half::bf16>(self, "bf16", padded, operands, dims)?,
            other => candle_core::bail!("fused attention of {other:?} tensors"),
        };
        Ok((storage, Shape::from((b, h, n, d))))
    }
}
