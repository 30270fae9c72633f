//! FP8 products for the DiT blocks' FP8 weights (`WeightFormat::Fp8`) on cards with FP8 tensor
//! cores (compute capability 8.9 and 9.0: Ada, Hopper): y = x · (codes · scale)ᵀ + bias, by one
//! cuBLASLt FP8 GEMM (e4m3 × e4m3, f32 accumulation, f16/bf16 output) — "TN", both operands
//! contiguous along the inner dimension, which is how a Linear's weight (out, in) and
//! activations (rows, in) lie — in one of two ways ([`ActivationScale`]):
//!
//! * per row (first choice): the activations quantized with a scale per token in one launch
//!   (`fp8_quantize_rows`), and the GEMM applies both scale vectors (cuBLASLt's outer-vector
//!   scaling, CUDA 12.9+) and adds the bias in its epilogue — torchao's row-wise float8, which
//!   flux-fast runs; two launches a product;
//! * per tensor (where cuBLASLt refuses the first): absmax → one scale → codes (`elementwise.cu`,
//!   on the device, no host synchronisation), the GEMM with that scale, then the weight's
//!   per-channel power-of-two scale and the bias in a pass of their own; five launches, and a
//!   read and write of the output more.
//!
//! Both accumulate with cuBLASLt's fast FP8 accumulation (torchao's choice for inference).
//!
//! Widening the weight to bf16 each forward (the portable path, `BlockLinear`) moves three bytes
//! per weight and runs a bf16 GEMM; this moves one and runs at FP8 rate (twice bf16's on Hopper).
//! The activations' rounding to e4m3 is the price (2⁻⁴ relative per value, as the weights').
//! Any error switches FP8 products off for the process (logged once) and the weights are widened
//! instead; the device self-check compares this path with the widened one when a device opens.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};

use super::elementwise::{config, MODULE, PTX};
use super::{cuda_error, input};
use crate::engine::cuda_geometry::norm_row_threads;

/// cuBLASLt's workspace (NVIDIA's recommendation for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

static SWITCHED_OFF: AtomicBool = AtomicBool::new(false);

/// How the activations are scaled for their e4m3 codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivationScale {
    /// A scale per row (token), applied by the GEMM with the weight's.
    PerRow,
    /// One scale for the tensor, the weight's and the bias in a pass after the GEMM.
    PerTensor,
}

/// Set when cuBLASLt refused the per-row form (older cuBLASLt, or a card without it) or the
/// device check found it wrong: the per-tensor form from then on, in this process.
static PER_ROW_OFF: AtomicBool = AtomicBool::new(false);

/// After `e`: the per-row form is not tried again in this process.
pub fn switch_off_per_row(e: &dyn std::fmt::Display) {
    if !PER_ROW_OFF.swap(true, Ordering::Relaxed) {
        tracing::warn!(error = %e, "row-wise FP8 products unavailable; one scale per tensor instead");
    }
}

/// Whether [`linear`] takes this product: FP8 weights, 16-bit activations on a card with FP8
/// tensor cores, sizes cuBLASLt's FP8 kernels take (multiples of 16), a matrix of activations
/// (a handful of rows — the DiTs' modulation layers run on one per sample — is a matrix-vector
/// product, for which widening the weight is the safer path), not switched off.
pub fn supports(xs: &Tensor, codes: &Tensor) -> bool {
    let rows = xs.elem_count() / xs.dims().last().copied().unwrap_or(1).max(1);
    !SWITCHED_OFF.load(Ordering::Relaxed)
        && rows >= 16
        && matches!(xs.dtype(), DType::F16 | DType::BF16)
        && codes.dtype() == DType::F8E4M3
        && codes
            .dims2()
            .is_ok_and(|(out, inner)| out % 16 == 0 && inner % 16 == 0)
        && has_fp8_tensor_cores(xs.device())
        && super::self_check::fp8_products_pass(xs.device())
}

/// Compute capability 8.9 (Ada) and newer.
pub fn has_fp8_tensor_cores(device: &candle_core::Device) -> bool {
    super::compute_capability(device).is_some_and(|cc| cc >= (8, 9))
}

/// After `e`: FP8 weights are widened for their products from now on, in this process.
pub fn switch_off(e: &candle_core::Error) {
    if !SWITCHED_OFF.swap(true, Ordering::Relaxed) {
        tracing::warn!(error = %e, "FP8 products unavailable; FP8 weights are widened instead");
    }
}

/// x · (codes · scale)ᵀ + bias for x (…, in) f16/bf16, `codes` (out, in) e4m3, `scale` (out) and
/// `bias` (out) in x's dtype: (…, out). Check [`supports`] first.
pub fn linear(
    xs: &Tensor,
    codes: &Tensor,
    scale: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    linear_with(xs, codes, &Operands::new(scale, bias, xs.dtype())?)
}

/// What an FP8 layer keeps for its products (made once, at load).
#[derive(Debug)]
pub struct Operands {
    /// The per-channel scale and the bias side by side (2 · out, the model's dtype): the
    /// per-tensor form's pass after the GEMM.
    scale_bias: Tensor,
    /// The per-channel scale in f32: the per-row form's GEMM scale of the weight.
    scale_f32: Tensor,
    bias: Option<Tensor>,
}

impl Operands {
    pub fn new(scale: &Tensor, bias: Option<&Tensor>, dtype: DType) -> candle_core::Result<Self> {
        // A buffer of its own: a view into a larger bias would start where cuBLASLt's
        // alignment assumptions do not hold.
        let bias = bias.map(|b| b.to_dtype(dtype)?.copy()).transpose()?;
        let zeros = || scale.zeros_like()?.to_dtype(dtype);
        let bias_or_zeros = match &bias {
            Some(b) => b.clone(),
            None => zeros()?,
        };
        Ok(Self {
            scale_bias: Tensor::cat(&[&scale.to_dtype(dtype)?, &bias_or_zeros], 0)?,
            scale_f32: scale.to_dtype(DType::F32)?,
            bias,
        })
    }
}

/// [`linear`] with a layer's [`Operands`]: per row where cuBLASLt takes it, else per tensor.
pub fn linear_with(
    xs: &Tensor,
    codes: &Tensor,
    operands: &Operands,
) -> candle_core::Result<Tensor> {
    if per_row_on() {
        match linear_by(ActivationScale::PerRow, xs, codes, operands) {
            Ok(ys) => return Ok(ys),
            Err(e) => switch_off_per_row(&e),
        }
    }
    linear_by(ActivationScale::PerTensor, xs, codes, operands)
}

/// The most rows of activations [`gemv`] takes (`FP8_GEMV_ROWS` in elementwise.cu).
const GEMV_ROWS: usize = 4;

/// Whether [`gemv`] takes this product: FP8 weights whose rows are a multiple of 16 codes,
/// 1 to 4 rows of 16-bit activations (the DiTs' modulation: one per sample), on any CUDA card
/// (our kernel decodes the codes), not switched off.
pub fn gemv_supports(xs: &Tensor, codes: &Tensor) -> bool {
    let inner = xs.dims().last().copied().unwrap_or(0);
    let rows = xs.elem_count() / inner.max(1);
    (1..=GEMV_ROWS).contains(&rows)
        && inner % 16 == 0
        && matches!(xs.dtype(), DType::F16 | DType::BF16)
        && codes.dtype() == DType::F8E4M3
        && codes.dims2().is_ok_and(|(_, k)| k == inner)
        && codes.layout().start_offset().is_multiple_of(16)
        && codes.is_contiguous()
        && super::self_check::runs_on(super::self_check::Fused::Fp8Gemv, xs)
}

/// After `e`: FP8 matrix-vector products widen their weights from now on, in this process.
pub fn switch_off_gemv(e: &candle_core::Error) {
    use super::self_check::{passed, switch_off, Fused};
    if passed(Fused::Fp8Gemv) {
        tracing::warn!(error = %e, "FP8 matrix-vector kernel failed; FP8 weights are widened for it");
        switch_off(Fused::Fp8Gemv);
    }
}

/// x · (codes · scale)ᵀ + bias for a few rows of x (check [`gemv_supports`]): the codes decoded
/// in registers by our kernel, read once, where widening them wrote and re-read the weight in
/// the activations' dtype.
pub fn gemv(xs: &Tensor, codes: &Tensor, operands: &Operands) -> candle_core::Result<Tensor> {
    let (out, inner) = codes.dims2()?;
    let rows = xs.elem_count() / inner.max(1);
    let ys = xs.contiguous()?.reshape((rows, inner))?.apply_op3_no_bwd(
        codes,
        &operands.scale_bias.to_dtype(xs.dtype())?,
        &Fp8Gemv,
    )?;
    ys.reshape(with_last(xs.dims(), out))
}

/// `dims` with the last one `last`: a product's output dims.
fn with_last(dims: &[usize], last: usize) -> Vec<usize> {
    let mut dims = dims.to_vec();
    if let Some(d) = dims.last_mut() {
        *d = last;
    }
    dims
}

/// The weight's codes from its layout's start, and (out, inner), checked e4m3 and contiguous.
fn weight_codes<'a>(
    w: &'a CudaStorage,
    wl: &Layout,
) -> candle_core::Result<(CudaView<'a, float8::F8E4M3>, (usize, usize))> {
    let CudaStorageSlice::F8E4M3(codes) = &w.slice else {
        candle_core::bail!("an fp8 product needs e4m3 weights, got {:?}", w.dtype());
    };
    if !wl.is_contiguous() {
        candle_core::bail!("an fp8 product of a strided weight");
    }
    Ok((codes.slice(wl.start_offset()..), wl.shape().dims2()?))
}

/// (rows, inner, out) of x (rows, inner) by a weight (out, inner) with its scale and bias side by
/// side (2 · out).
fn product_sizes(xl: &Layout, wl: &Layout, sbl: &Layout) -> candle_core::Result<Sizes> {
    let (rows, inner) = xl.shape().dims2()?;
    let (out, k) = wl.shape().dims2()?;
    if k != inner || sbl.shape().elem_count() != 2 * out {
        candle_core::bail!("an fp8 product of {:?} by {:?}", xl.shape(), wl.shape());
    }
    Ok(Sizes { rows, inner, out })
}

struct Fp8Gemv;

impl CustomOp3 for Fp8Gemv {
    fn name(&self) -> &'static str {
        "fp8-gemv"
    }

    super::cpu_fwd_unsupported!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        sb: &CudaStorage,
        sbl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Sizes { rows, inner, out } = product_sizes(xl, wl, sbl)?;
        let (codes, _) = weight_codes(w, wl)?;
        if rows > GEMV_ROWS || !inner.is_multiple_of(16) {
            candle_core::bail!("fp8 gemv of {rows} rows of {inner}");
        }
        if !matches!(x.dtype(), DType::F16 | DType::BF16) {
            candle_core::bail!("fp8 gemv of {:?} activations", x.dtype());
        }
        let dev = &x.device;
        let stream = dev.cuda_stream();
        let suffix = super::elementwise::suffix(x.dtype())?;
        let func = dev.get_or_load_custom_func(&format!("fp8_gemv_{suffix}"), MODULE, PTX)?;
        // Eight warps a block, one output each.
        const WARPS: usize = 8;
        let launch = LaunchConfig {
            grid_dim: (out.div_ceil(WARPS) as u32, 1, 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let storage = super::by_dtype!(x.dtype(), T => {
            let (xv, x_aligned) = input::<T>(x, xl)?;
            if !x_aligned || !wl.start_offset().is_multiple_of(16) {
                candle_core::bail!("fp8 gemv of operands not 16-byte aligned");
            }
            let (sbv, _) = input::<T>(sb, sbl)?;
            let mut ys = unsafe { stream.alloc::<T>(rows * out) }.map_err(cuda_error)?;
            let mut builder = func.builder();
            builder
                .arg(&codes)
                .arg(&xv)
                .arg(&sbv)
                .arg(&mut ys)
                .arg(&out)
                .arg(&inner)
                .arg(&rows);
            unsafe { builder.launch(launch) }.map_err(cuda_error)?;
            CudaStorage::wrap_cuda_slice(ys, dev.clone())
        });
        Ok((storage, Shape::from((rows, out))))
    }
}

/// [`linear_with`] in the given form (the device check and the kernel tables time each).
pub fn linear_by(
    form: ActivationScale,
    xs: &Tensor,
    codes: &Tensor,
    operands: &Operands,
) -> candle_core::Result<Tensor> {
    if form == ActivationScale::PerRow {
        return linear_quantized(&quantize_rows(xs)?, codes, operands);
    }
    let (out, inner) = codes.dims2()?;
    let rows = xs.elem_count() / inner.max(1);
    let ys = xs.contiguous()?.reshape((rows, inner))?.apply_op3_no_bwd(
        codes,
        &operands.scale_bias.to_dtype(xs.dtype())?,
        &Fp8Linear,
    )?;
    ys.reshape(with_last(xs.dims(), out))
}

/// Whether products may take the per-row form (not refused or found wrong in this process).
pub fn per_row_on() -> bool {
    !PER_ROW_OFF.load(Ordering::Relaxed)
}

/// Activations quantized per row for [`linear_quantized`]: the e4m3 codes (rows × inner bytes)
/// and then the rows' f32 scales, in one buffer; quantized once for every layer that reads the
/// same input (q, k and v).
pub struct QuantizedRows {
    packed: Tensor,
    /// The activations' dims and dtype (the products' output dtype).
    dims: Vec<usize>,
    dtype: DType,
}

/// `xs` (…, inner) f16/bf16 quantized per row (check [`supports`] first).
pub fn quantize_rows(xs: &Tensor) -> candle_core::Result<QuantizedRows> {
    let inner = xs.dims().last().copied().unwrap_or(0);
    let rows = xs.elem_count() / inner.max(1);
    let packed = xs
        .contiguous()?
        .reshape((rows, inner))?
        .apply_op1_no_bwd(&QuantizeRows)?;
    Ok(QuantizedRows {
        packed,
        dims: xs.dims().to_vec(),
        dtype: xs.dtype(),
    })
}

/// The per-row product of quantized activations: (…, out) in the activations' dtype.
pub fn linear_quantized(
    x: &QuantizedRows,
    codes: &Tensor,
    operands: &Operands,
) -> candle_core::Result<Tensor> {
    let (out, inner) = codes.dims2()?;
    if x.dims.last() != Some(&inner) {
        candle_core::bail!("fp8 linear of {:?} by {:?}", x.dims, codes.dims());
    }
    let rows = x.dims.iter().product::<usize>() / inner.max(1);
    let bias = (operands.bias.as_ref())
        .map(|b| b.to_dtype(x.dtype))
        .transpose()?;
    let op = Fp8LinearPerRow {
        bias,
        rows,
        dtype: x.dtype,
    };
    let ys = x.packed.apply_op3_no_bwd(codes, &operands.scale_f32, &op)?;
    ys.reshape(with_last(&x.dims, out))
}

/// `t` (F8E4M3 codes, or f32/f16/bf16 values) cast to `dtype` (a float dtype, or F8E4M3: the
/// nearest-even code, saturating at ±448) by our kernels: candle 0.11.1 looks its CUDA casts for
/// F8E4M3 up under names its kernels do not define (`cast_f32_f8e4m3` for `cast_f32_f8_e4m3`),
/// so `to_dtype` to or from F8E4M3 fails on every CUDA device.
pub fn cast(t: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    if t.dtype() == dtype {
        return Ok(t.clone());
    }
    t.contiguous()?.apply_op1_no_bwd(&Fp8Cast { to: dtype })
}

struct Fp8Cast {
    to: DType,
}

impl CustomOp1 for Fp8Cast {
    fn name(&self) -> &'static str {
        "fp8-cast"
    }

    super::cpu_fwd_unsupported!(1);

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = xl.shape().elem_count();
        let dev = &x.device;
        let stream = dev.cuda_stream();
        let storage = match (x.dtype(), self.to) {
            (DType::F8E4M3, to) => {
                let (codes, _) = input::<float8::F8E4M3>(x, xl)?;
                let func = dev.get_or_load_custom_func(
                    &format!("fp8_decode_{}", super::elementwise::suffix(to)?),
                    MODULE,
                    PTX,
                )?;
                super::by_dtype!(to, T => {
                    let mut out = unsafe { stream.alloc::<T>(n) }.map_err(cuda_error)?;
                    let mut builder = func.builder();
                    builder.arg(&codes).arg(&mut out).arg(&n);
                    unsafe { builder.launch(config(n)) }.map_err(cuda_error)?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                })
            }
            (_, DType::F8E4M3) => {
                let func = dev.get_or_load_custom_func(
                    &format!("fp8_encode_{}", super::elementwise::suffix(x.dtype())?),
                    MODULE,
                    PTX,
                )?;
                super::by_dtype!(x.dtype(), T => {
                    let (xv, _) = input::<T>(x, xl)?;
                    let mut out = unsafe { stream.alloc::<float8::F8E4M3>(n) }.map_err(cuda_error)?;
                    let mut builder = func.builder();
                    builder.arg(&xv).arg(&mut out).arg(&n);
                    unsafe { builder.launch(config(n)) }.map_err(cuda_error)?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                })
            }
            (_, to) => candle_core::bail!("an e4m3 cast from {:?} to {to:?}", x.dtype()),
        };
        Ok((storage, xl.shape().clone()))
    }
}

struct Fp8Linear;

impl CustomOp3 for Fp8Linear {
    fn name(&self) -> &'static str {
        "fp8-linear"
    }

    super::cpu_fwd_unsupported!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        sb: &CudaStorage,
        sbl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let sizes = product_sizes(xl, wl, sbl)?;
        let (codes, _) = weight_codes(w, wl)?;
        let Sizes { rows, out, .. } = sizes;
        let storage = match x.dtype() {
            DType::F16 => run::<half::f16>(x, xl, &codes, sb, sbl, sizes, "f16")?,
            DType::BF16 => run::<half::bf16>(x, xl, &codes, sb, sbl, sizes, "bf16")?,
            other => candle_core::bail!("fp8 linear of {other:?} activations"),
        };
        Ok((storage, Shape::from((rows, out))))
    }
}

/// The per-row quantization: (rows, inner) f16/bf16 → codes then f32 scales, one U8 buffer.
struct QuantizeRows;

impl CustomOp1 for QuantizeRows {
    fn name(&self) -> &'static str {
        "fp8-quantize-rows"
    }

    super::cpu_fwd_unsupported!(1);

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, inner) = xl.shape().dims2()?;
        if !matches!(x.dtype(), DType::F16 | DType::BF16) {
            candle_core::bail!("fp8 quantization of {:?} activations", x.dtype());
        }
        let dev = &x.device;
        let stream = dev.cuda_stream();
        let suffix = super::elementwise::suffix(x.dtype())?;
        let func =
            dev.get_or_load_custom_func(&format!("fp8_quantize_rows_{suffix}"), MODULE, PTX)?;
        let bytes = packed_bytes(rows, inner);
        let mut packed = unsafe { stream.alloc::<u8>(bytes) }.map_err(cuda_error)?;
        super::by_dtype!(x.dtype(), T => {
            let (xv, x_aligned) = input::<T>(x, xl)?;
            let vec = (x_aligned && inner % 8 == 0) as i32;
            // The scales start 16-byte aligned (rows × inner is a multiple of 16 in every
            // product this takes; checked).
            if !(rows * inner).is_multiple_of(16) {
                candle_core::bail!("fp8 quantization of rows {inner} wide");
            }
            let (mut codes, mut scales) = packed.split_at_mut(rows * inner);
            let mut scales = unsafe { scales.transmute_mut::<f32>(rows) }
                .ok_or_else(|| candle_core::Error::Msg("fp8 scales' buffer".into()))?;
            let mut builder = func.builder();
            builder
                .arg(&xv)
                .arg(&inner)
                .arg(&mut codes)
                .arg(&mut scales)
                .arg(&vec);
            // One block per row, sized to it.
            let per_access = if vec == 1 { 8 } else { 1 };
            let launch = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (norm_row_threads(inner, per_access), 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { builder.launch(launch) }.map_err(cuda_error)?;
        });
        Ok((
            CudaStorage::wrap_cuda_slice(packed, dev.clone()),
            Shape::from(bytes),
        ))
    }
}

/// Bytes of [`QuantizedRows`]' buffer: the codes, then a f32 scale per row.
fn packed_bytes(rows: usize, inner: usize) -> usize {
    rows * inner + 4 * rows
}

/// The per-row product: the quantized activations' buffer ([`QuantizeRows`]), the weight's
/// codes (out, in), its per-channel scale (out) in f32; the bias (out, the output's dtype) read
/// through its storage (an op takes three tensors).
struct Fp8LinearPerRow {
    bias: Option<Tensor>,
    rows: usize,
    /// The output's dtype (the activations').
    dtype: DType,
}

impl CustomOp3 for Fp8LinearPerRow {
    fn name(&self) -> &'static str {
        "fp8-linear-per-row"
    }

    super::cpu_fwd_unsupported!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        s: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (codes, (out, inner)) = weight_codes(w, wl)?;
        let rows = self.rows;
        if xl.shape().elem_count() != packed_bytes(rows, inner)
            || sl.shape().elem_count() != out
            || !xl.is_contiguous()
        {
            candle_core::bail!("fp8 linear of {rows} rows by {:?}", wl.shape());
        }
        let packed = x.as_cuda_slice::<u8>()?.slice(xl.start_offset()..);
        let (w_scale, _) = input::<f32>(s, sl)?;
        let bias = self.bias.as_ref().map(Tensor::storage_and_layout);
        let bias = bias
            .as_ref()
            .map(super::elementwise::locked_cuda)
            .transpose()?;
        if bias.is_some_and(|(b, l)| l.shape().elem_count() != out || b.dtype() != self.dtype) {
            candle_core::bail!("fp8 linear's bias is not {out} {:?} values", self.dtype);
        }
        let sizes = Sizes { rows, inner, out };
        let dev = &x.device;
        let storage = match self.dtype {
            DType::F16 => gemm_per_row::<half::f16>(dev, &packed, &codes, &w_scale, bias, sizes)?,
            DType::BF16 => gemm_per_row::<half::bf16>(dev, &packed, &codes, &w_scale, bias, sizes)?,
            other => candle_core::bail!("fp8 linear into {other:?}"),
        };
        Ok((storage, Shape::from((rows, out))))
    }
}

#[derive(Clone, Copy)]
struct Sizes {
    rows: usize,
    inner: usize,
    out: usize,
}

/// The element type cuBLASLt names for T.
trait OutputType {
    const CUDA: sys::cudaDataType;
}
impl OutputType for half::f16 {
    const CUDA: sys::cudaDataType = sys::cudaDataType::CUDA_R_16F;
}
impl OutputType for half::bf16 {
    const CUDA: sys::cudaDataType = sys::cudaDataType::CUDA_R_16BF;
}

fn run<T: CudaDType + DeviceRepr + ValidAsZeroBits + OutputType>(
    x: &CudaStorage,
    xl: &Layout,
    codes: &CudaView<'_, impl DeviceRepr>,
    sb: &CudaStorage,
    sbl: &Layout,
    Sizes { rows, inner, out }: Sizes,
    suffix: &str,
) -> candle_core::Result<CudaStorage> {
    let dev = &x.device;
    let stream = dev.cuda_stream();
    let (xv, x_aligned) = input::<T>(x, xl)?;
    let (sbv, sb_aligned) = input::<T>(sb, sbl)?;
    let load = |name: &str| dev.get_or_load_custom_func(&format!("{name}_{suffix}"), MODULE, PTX);
    let n = rows * inner;
    // 16-byte packs of eight activations.
    let vec = (x_aligned && inner % 8 == 0) as i32;
    let items = if vec == 1 { n / 8 } else { n };
    let mut absmax = stream.alloc_zeros::<u32>(1).map_err(cuda_error)?;
    let mut quantized = unsafe { stream.alloc::<u8>(n) }.map_err(cuda_error)?;
    let mut x_scale = unsafe { stream.alloc::<f32>(1) }.map_err(cuda_error)?;
    {
        let func = load("fp8_absmax")?;
        let mut builder = func.builder();
        builder.arg(&xv).arg(&n).arg(&mut absmax).arg(&vec);
        unsafe { builder.launch(config(items)) }.map_err(cuda_error)?;
    }
    {
        let func = load("fp8_quantize")?;
        let mut builder = func.builder();
        builder
            .arg(&xv)
            .arg(&n)
            .arg(&absmax)
            .arg(&mut quantized)
            .arg(&mut x_scale)
            .arg(&vec);
        unsafe { builder.launch(config(items)) }.map_err(cuda_error)?;
    }
    let mut ys = unsafe { stream.alloc::<T>(rows * out) }.map_err(cuda_error)?;
    let (b_scale, _b_scale) = x_scale.device_ptr(&stream);
    gemm::<T>(
        dev,
        codes,
        &quantized.slice(..),
        Scaling::PerTensor { b_scale },
        &mut ys,
        (out, rows, inner),
    )?;
    {
        let func = load("fp8_rescale")?;
        let vec = (sb_aligned && out % 8 == 0) as i32;
        let items = if vec == 1 { rows * out / 8 } else { rows * out };
        let mut builder = func.builder();
        builder
            .arg(&mut ys)
            .arg(&sbv)
            .arg(&rows)
            .arg(&out)
            .arg(&vec);
        unsafe { builder.launch(config(items)) }.map_err(cuda_error)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(ys, dev.clone()))
}

/// The GEMM of the quantized activations (`packed`: codes, then the rows' scales) with both
/// scale vectors and the bias.
fn gemm_per_row<T: CudaDType + DeviceRepr + OutputType>(
    dev: &CudaDevice,
    packed: &CudaView<'_, u8>,
    codes: &CudaView<'_, impl DeviceRepr>,
    w_scale: &CudaView<'_, f32>,
    bias: Option<(&CudaStorage, &Layout)>,
    Sizes { rows, inner, out }: Sizes,
) -> candle_core::Result<CudaStorage> {
    let stream = dev.cuda_stream();
    let quantized = packed.slice(..rows * inner);
    let x_scales = packed.slice(rows * inner..);
    let bias = bias.map(|(s, l)| input::<T>(s, l)).transpose()?;
    let mut ys = unsafe { stream.alloc::<T>(rows * out) }.map_err(cuda_error)?;
    let (a_scale, _a_scale) = w_scale.device_ptr(&stream);
    let (b_scale, _b_scale) = x_scales.device_ptr(&stream);
    let bias_pointer = bias.as_ref().map(|(b, _)| b.device_ptr(&stream));
    gemm::<T>(
        dev,
        codes,
        &quantized,
        Scaling::PerRow {
            a_scale,
            b_scale,
            bias: bias_pointer.as_ref().map(|(p, _)| *p),
        },
        &mut ys,
        (out, rows, inner),
    )?;
    Ok(CudaStorage::wrap_cuda_slice(ys, dev.clone()))
}

/// What the GEMM scales by (device addresses of f32 values) and adds.
#[derive(Clone, Copy)]
enum Scaling {
    /// B's (the activations') one scale; the weight's scale and the bias come after.
    PerTensor { b_scale: u64 },
    /// A's per-channel and B's per-token scale vectors (cuBLASLt's outer-vector scaling), and
    /// the bias (in the output's type) in the epilogue.
    PerRow {
        a_scale: u64,
        b_scale: u64,
        bias: Option<u64>,
    },
}

/// A cuBLASLt handle and its workspace, one per device, kept for the process, with the
/// heuristics' algorithm per product.
struct Handle {
    ordinal: usize,
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    algorithms: HashMap<AlgorithmKey, sys::cublasLtMatmulAlgo_t>,
}

/// What the heuristics' choice depends on: sizes, output type, form and epilogue.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct AlgorithmKey {
    mnk: (usize, usize, usize),
    output: u32,
    per_row: bool,
    bias: bool,
}
// The handle is used under the mutex only.
unsafe impl Send for Handle {}

static HANDLES: Mutex<Vec<Handle>> = Mutex::new(Vec::new());

/// Destroys cuBLASLt descriptors when a call ends, however it ends.
struct Descriptors {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: Vec<sys::cublasLtMatrixLayout_t>,
    preference: sys::cublasLtMatmulPreference_t,
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        unsafe {
            for layout in &self.layouts {
                let _ = lt::destroy_matrix_layout(*layout);
            }
            if !self.preference.is_null() {
                let _ = lt::destroy_matmul_pref(self.preference);
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}

/// D (n columns of m, column-major: row-major (n, m)) = A(k × m)ᵀ · B(k × n), scaled as
/// `scaling` says; A and B e4m3 column-major with leading dimension k ("TN"), f32 accumulation
/// (fast).
fn gemm<T: DeviceRepr + OutputType>(
    dev: &CudaDevice,
    a: &CudaView<'_, impl DeviceRepr>,
    b: &CudaView<'_, u8>,
    scaling: Scaling,
    d: &mut CudaSlice<T>,
    (m, n, k): (usize, usize, usize),
) -> candle_core::Result<()> {
    let stream = dev.cuda_stream();
    let ordinal = stream.context().ordinal();
    let mut handles = HANDLES
        .lock()
        .map_err(|_| candle_core::Error::Msg("the cuBLASLt handles' lock was poisoned".into()))?;
    if !handles.iter().any(|h| h.ordinal == ordinal) {
        stream.context().bind_to_thread().map_err(cuda_error)?;
        let handle = lt::create_handle().map_err(cuda_error)?;
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }.map_err(cuda_error)?;
        handles.push(Handle {
            ordinal,
            handle,
            workspace,
            algorithms: HashMap::new(),
        });
    }
    let Some(h) = handles.iter_mut().find(|h| h.ordinal == ordinal) else {
        candle_core::bail!("no cuBLASLt handle for device {ordinal}");
    };
    let lt_error = |e: lt::CublasError| cuda_error(e);
    let mut descriptors = Descriptors {
        desc: std::ptr::null_mut(),
        layouts: Vec::new(),
        preference: std::ptr::null_mut(),
    };
    descriptors.desc = lt::create_matmul_desc(
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cudaDataType::CUDA_R_32F,
    )
    .map_err(lt_error)?;
    use sys::cublasLtMatmulDescAttributes_t as Attribute;
    fn bytes<V>(value: &V) -> (*const std::ffi::c_void, usize) {
        ((value as *const V).cast(), std::mem::size_of::<V>())
    }
    let set_value = |attribute, (value, size)| unsafe {
        lt::set_matmul_desc_attribute(descriptors.desc, attribute, value, size).map_err(lt_error)
    };
    // cublasOperation_t (a C enum): 1 = CUBLAS_OP_T, 0 = CUBLAS_OP_N.
    let (transpose, keep) = (1i32, 0i32);
    set_value(Attribute::CUBLASLT_MATMUL_DESC_TRANSA, bytes(&transpose))?;
    set_value(Attribute::CUBLASLT_MATMUL_DESC_TRANSB, bytes(&keep))?;
    // Sums not promoted to full f32 at intervals along k: faster on Hopper, what torchao's
    // float8 inference (and so flux-fast) runs.
    set_value(Attribute::CUBLASLT_MATMUL_DESC_FAST_ACCUM, bytes(&1i8))?;
    // The scale attributes hold device addresses (CUdeviceptr: a u64).
    match scaling {
        Scaling::PerTensor { b_scale } => {
            set_value(
                Attribute::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                bytes(&b_scale),
            )?;
        }
        Scaling::PerRow {
            a_scale,
            b_scale,
            bias,
        } => {
            let outer =
                sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
            set_value(
                Attribute::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                bytes(&(outer as u32)),
            )?;
            set_value(
                Attribute::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
                bytes(&(outer as u32)),
            )?;
            set_value(
                Attribute::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                bytes(&a_scale),
            )?;
            set_value(
                Attribute::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                bytes(&b_scale),
            )?;
            if let Some(bias) = bias {
                let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32;
                set_value(Attribute::CUBLASLT_MATMUL_DESC_EPILOGUE, bytes(&epilogue))?;
                set_value(Attribute::CUBLASLT_MATMUL_DESC_BIAS_POINTER, bytes(&bias))?;
                let bias_type = T::CUDA as u32;
                set_value(
                    Attribute::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    bytes(&bias_type),
                )?;
            }
        }
    }
    let key = AlgorithmKey {
        mnk: (m, n, k),
        output: T::CUDA as u32,
        per_row: matches!(scaling, Scaling::PerRow { .. }),
        bias: matches!(scaling, Scaling::PerRow { bias: Some(_), .. }),
    };
    let layout = |dtype, rows: usize, cols: usize, ld: usize| {
        lt::create_matrix_layout(dtype, rows as u64, cols as u64, ld as i64)
    };
    let e4m3 = sys::cudaDataType::CUDA_R_8F_E4M3;
    descriptors
        .layouts
        .push(layout(e4m3, k, m, k).map_err(lt_error)?);
    descriptors
        .layouts
        .push(layout(e4m3, k, n, k).map_err(lt_error)?);
    descriptors
        .layouts
        .push(layout(T::CUDA, m, n, m).map_err(lt_error)?);
    let [a_layout, b_layout, d_layout] = [0, 1, 2].map(|i| descriptors.layouts[i]);
    // The heuristics' choice per shape and form, asked once (host time on every product else).
    let algorithm = match h.algorithms.get(&key) {
        Some(algorithm) => *algorithm,
        None => {
            descriptors.preference = lt::create_matmul_pref().map_err(lt_error)?;
            let workspace_size = WORKSPACE_BYTES as u64;
            unsafe {
                lt::set_matmul_pref_attribute(
                    descriptors.preference,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&workspace_size as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
                .map_err(lt_error)?;
            }
            let heuristic = unsafe {
                lt::get_matmul_algo_heuristic(
                    h.handle,
                    descriptors.desc,
                    a_layout,
                    b_layout,
                    d_layout,
                    d_layout,
                    descriptors.preference,
                )
            }
            .map_err(lt_error)?;
            h.algorithms.insert(key, heuristic.algo);
            heuristic.algo
        }
    };
    let (alpha, beta) = (1f32, 0f32);
    let (a_ptr, _a_record) = a.device_ptr(&stream);
    let (b_ptr, _b_record) = b.device_ptr(&stream);
    let (d_ptr, _d_record) = d.device_ptr_mut(&stream);
    let (w_ptr, _w_record) = h.workspace.device_ptr(&stream);
    unsafe {
        lt::matmul(
            h.handle,
            descriptors.desc,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            a_ptr as *const _,
            a_layout,
            b_ptr as *const _,
            b_layout,
            d_ptr as *const _,
            d_layout,
            d_ptr as *mut _,
            d_layout,
            &algorithm,
            w_ptr as *mut _,
            WORKSPACE_BYTES,
            stream.cu_stream() as *mut _,
        )
    }
    .map_err(lt_error)
}
