//! The fused memory-bound ops of `elementwise.cu` as candle ops: a Linear's bias, GEGLU, the tanh
//! GELU, GroupNorm(+SiLU), the rotary embedding, the DiTs' modulation, gated residual and per-head
//! q/k norm, for f32/f16/bf16 CUDA tensors. Where a Linear's product goes straight into one of
//! the last (GELU, gated add, q/k norm), its bias is added there rather than by a pass of its own.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchArgs};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{
    CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, StorageRef, Tensor,
};

use super::{by_dtype, cuda_error, input};
use crate::engine::cuda_geometry::{norm_row_threads, token_major_view};

pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
pub(crate) const MODULE: &str = "candela_elementwise";
const THREADS: u32 = 256;

/// Whether these kernels take `t` (a CUDA tensor of a float type they are built for).
pub fn supports(t: &Tensor) -> bool {
    t.device().is_cuda()
        && matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && super::fits_32_bit_indices(t.elem_count())
}

/// `y + bias` over the last dimension (a Linear's bias after its matmul).
pub fn bias_add(y: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    add_to_product(y, Some(bias), None)
}

/// `y + bias + residual`: a Linear's product `y`, its bias over the last dimension (or none) and
/// the residual (y's shape, or none) it joins, in one pass.
pub fn add_to_product(
    y: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if let Some(r) = residual {
        if r.dims() != y.dims() {
            candle_core::bail!("a residual of {:?} for {:?}", r.dims(), y.dims());
        }
    }
    y.contiguous()?.apply_op1_no_bwd(&BiasAdd {
        bias: bias.map(Tensor::contiguous).transpose()?,
        residual: residual.map(Tensor::contiguous).transpose()?,
    })
}

/// Nearest-neighbour ×2 upsampling of (B, C, H, W) `x` to (B, C, 2H, 2W), one pass.
pub fn upsample_nearest2x(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&UpsampleNearest2x)
}

/// `x + t` for (B, C, H, W) `x` and one value per sample and channel `t` (B·C values: a ResNet
/// block's projected time embedding), without candle's per-element broadcast indexing.
pub fn channel_add(x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, _, _) = x.dims4()?;
    if t.elem_count() != b * c {
        candle_core::bail!("per-channel values {:?} for {:?}", t.dims(), x.dims());
    }
    x.contiguous()?
        .apply_op2_no_bwd(&t.contiguous()?, &ChannelAdd)
}

/// `(h + bias)[.., :f] · gelu_erf((h + bias)[.., f:])` for `h` of last dimension 2f (diffusers'
/// GEGLU; the projection's bias of 2f, or none).
pub fn geglu(h: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    h.contiguous()?.apply_op1_no_bwd(&Geglu {
        bias: bias.map(Tensor::contiguous).transpose()?,
    })
}

/// GELU with the tanh approximation, of `x + bias` (over the last dimension) when given.
pub fn gelu_tanh(x: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&GeluTanh {
        bias: bias.map(Tensor::contiguous).transpose()?,
    })
}

/// GroupNorm of (B, C, …) with per-channel `scale` and `shift`, then SiLU if `with_silu`.
pub fn group_norm(
    xs: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    groups: usize,
    eps: f64,
    with_silu: bool,
) -> candle_core::Result<Tensor> {
    xs.contiguous()?.apply_op3_no_bwd(
        &scale.contiguous()?,
        &shift.contiguous()?,
        &GroupNorm {
            groups,
            eps: eps as f32,
            with_silu,
        },
    )
}

/// Rotary embedding of (B, H, N, D) `xs` with (N, D/2) f32 `cos` and `sin` (FLUX's RoPE).
///
/// `xs` heads-first (batch, heads, tokens, head_dim); a heads-first view of token-major data (a
/// projection's output) is rotated in place order and returned as such a view, without copies.
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let token_major = !xs.is_contiguous()
        && token_major_view(xs.layout())
        && super::self_check::passed(super::self_check::Fused::TokenMajorRope);
    let xs = if token_major || xs.is_contiguous() {
        xs.clone()
    } else {
        xs.contiguous()?
    };
    let out = xs.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &Rope)?;
    if token_major {
        out.transpose(1, 2)
    } else {
        Ok(out)
    }
}

/// `xs · (1 + scale) + shift` over (B, N, D) `xs` with (B, D) `shift` and `scale`.
pub fn modulate(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    xs.contiguous()?.apply_op3_no_bwd(
        &shift.contiguous()?,
        &scale.contiguous()?,
        &PerSample {
            op: PerSampleOp::Modulate,
            second: None,
            bias: None,
        },
    )
}

/// `xs + gate · (ys + second + bias)` over (B, N, D) `xs`, `ys` and `second` (or none) with a
/// (B, D) `gate` and a (D) `bias` (or none).
pub fn gated_add(
    xs: &Tensor,
    gate: &Tensor,
    ys: &Tensor,
    second: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if let Some(s) = second {
        if s.dims() != ys.dims() {
            candle_core::bail!("a second product of {:?} for {:?}", s.dims(), ys.dims());
        }
    }
    xs.contiguous()?.apply_op3_no_bwd(
        &gate.contiguous()?,
        &ys.contiguous()?,
        &PerSample {
            op: PerSampleOp::GatedAdd,
            second: second.map(Tensor::contiguous).transpose()?,
            bias: bias.map(Tensor::contiguous).transpose()?,
        },
    )
}

/// One stream of a joint token sequence (FLUX's and SD3's text and image tokens): its (B, N, …)
/// data, what the join adds to it (see [`join_values`], [`qk_norm`]) and where its first token
/// goes.
pub struct Stream<'a> {
    pub x: &'a Tensor,
    pub with: Option<&'a Tensor>,
    pub offset: usize,
}

/// The streams' (B, Nᵢ, C) value projections plus their biases (`with`, or none), each written at
/// its place in one (B, total, C) joint sequence: the bias pass and the join in one.
pub fn join_values(streams: &[Stream], total: usize) -> candle_core::Result<Tensor> {
    joint(streams, total, JointKind::Values)
}

/// Per-head RMSNorm (weight, `eps`) of token-major (B, Nᵢ, H, D) queries or keys plus their
/// projection's bias, then, with `table`, the rotary embedding, each stream written at its place
/// in one (B, total, H, D) joint sequence. Each stream's `with` = [bias (H·D) | weight (D)];
/// `table` (total, D/2, 2) f32 (cos, sin) pairs. D even, at most 256.
pub fn qk_norm(
    streams: &[Stream],
    table: Option<&Tensor>,
    total: usize,
    eps: f32,
) -> candle_core::Result<Tensor> {
    joint(
        streams,
        total,
        JointKind::QkNorm {
            table: table.map(Tensor::contiguous).transpose()?,
            eps,
        },
    )
}

fn joint(streams: &[Stream], total: usize, kind: JointKind) -> candle_core::Result<Tensor> {
    let Some(first) = streams.first() else {
        candle_core::bail!("a joint sequence of no streams");
    };
    if let Some(s) = streams.iter().find(|s| s.x.rank() < 3) {
        candle_core::bail!("a stream of {:?}: (B, N, …) wanted", s.x.dims());
    }
    // Every token of the joint sequence written once: the streams tile it.
    let mut places: Vec<(usize, usize)> = streams
        .iter()
        .map(|s| Ok((s.offset, s.x.dim(1)?)))
        .collect::<candle_core::Result<_>>()?;
    places.sort_unstable();
    let tiled = places
        .iter()
        .try_fold(0, |end, &(offset, n)| (offset == end).then_some(end + n));
    if tiled != Some(total) {
        candle_core::bail!("streams at {places:?} do not tile a sequence of {total} tokens");
    }
    let streams = streams
        .iter()
        .map(|s| {
            if s.x.dims()[2..] != first.x.dims()[2..] || s.x.dim(0)? != first.x.dim(0)? {
                candle_core::bail!(
                    "streams {:?} and {:?} do not join",
                    s.x.dims(),
                    first.x.dims()
                );
            }
            Ok(OwnedStream {
                x: s.x.contiguous()?,
                with: s.with.map(Tensor::contiguous).transpose()?,
                offset: s.offset,
            })
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    streams[0].x.clone().apply_op1_no_bwd(&Joint {
        streams,
        total,
        kind,
    })
}

/// Head sizes [`qk_norm`] takes (a warp's registers hold a row).
pub fn qk_norm_supports(head_dim: usize) -> bool {
    head_dim.is_multiple_of(2) && (2..=256).contains(&head_dim)
}

/// Lanes per row of the q/k norm kernel (`qk_norm_lanes` in elementwise.cu): the fewest of 8, 16
/// and 32 holding the row's pairs at 4 a lane.
fn qk_norm_lanes(head_dim: usize) -> usize {
    match head_dim / 2 {
        0..=32 => 8,
        33..=64 => 16,
        _ => 32,
    }
}

/// LayerNorm over the last dimension without learned parameters (biased variance, `eps`), then
/// `· (1 + scale) + shift` with per-sample (B, D) vectors, over (B, N, D) `xs`: one kernel, one
/// rounding.
pub fn layer_norm_modulate(
    xs: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    xs.contiguous()?.apply_op3_no_bwd(
        &shift.contiguous()?,
        &scale.contiguous()?,
        &LayerNormModulate { eps, affine: false },
    )
}

/// A LayerNorm over the last dimension with a learned `weight` and `bias` (D) shared by every
/// row (biased variance, `eps`): `layer_norm_modulate`'s kernel, the weight in place of 1 + scale.
pub fn layer_norm_affine(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    let d = xs.dim(candle_core::D::Minus1)?;
    let rows = xs.elem_count() / d.max(1);
    let out = xs.contiguous()?.reshape((1, rows, d))?.apply_op3_no_bwd(
        &bias.contiguous()?,
        &weight.contiguous()?,
        &LayerNormModulate { eps, affine: true },
    )?;
    out.reshape(xs.shape())
}

pub(crate) fn suffix(dtype: DType) -> candle_core::Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => candle_core::bail!("no fused CUDA kernel for {other:?}"),
    })
}

/// Grid-stride launch over `items` work items.
pub(crate) fn config(items: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            items.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32,
            1,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn output<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    len: usize,
) -> candle_core::Result<CudaSlice<T>> {
    // A stream placed in a longer joint sequence writes past its own extent: the output, too,
    // must stay within the kernels' 32-bit index arithmetic.
    if !super::fits_32_bit_indices(len) {
        candle_core::bail!("fused CUDA kernel writing 2^32 values or more");
    }
    unsafe { dev.cuda_stream().alloc::<T>(len) }.map_err(cuda_error)
}

/// An optional further operand of a custom op, beyond the three tensors candle passes (a
/// Linear's bias, a second product, a residual): its CUDA storage and layout, read-locked while
/// `f` runs.
fn with_optional_operand<R>(
    t: Option<&Tensor>,
    f: impl FnOnce(Option<(&CudaStorage, &Layout)>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let locked = t.map(Tensor::storage_and_layout);
    f(locked.as_ref().map(locked_cuda).transpose()?)
}

/// An optional operand's data, checked to hold `elements` values, with whether it starts on a
/// 16-byte boundary (none: aligned). The kernels take a null pointer for none ([`NULL`]).
fn optional_input<'a, T: CudaDType>(
    operand: Option<(&'a CudaStorage, &Layout)>,
    elements: usize,
) -> candle_core::Result<(Option<CudaView<'a, T>>, bool)> {
    let Some((s, l)) = operand else {
        return Ok((None, true));
    };
    if l.shape().elem_count() != elements {
        candle_core::bail!(
            "an operand of {:?} where {elements} values were wanted",
            l.shape()
        );
    }
    let (view, aligned) = input::<T>(s, l)?;
    Ok((Some(view), aligned))
}

/// The null device pointer an absent optional operand is passed as.
const NULL: u64 = 0;

/// Pushes an optional operand's data, or the null pointer the kernels test for.
fn push_optional<'a, T>(builder: &mut LaunchArgs<'a>, operand: &'a Option<CudaView<'_, T>>) {
    match operand {
        Some(view) => builder.arg(view),
        None => builder.arg(&NULL),
    };
}

/// Elements per 16-byte pack.
fn pack<T>() -> usize {
    16 / std::mem::size_of::<T>()
}

struct BiasAdd {
    bias: Option<Tensor>,
    residual: Option<Tensor>,
}

impl CustomOp1 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add"
    }

    super::cpu_fwd_unsupported!(1);

    fn cuda_fwd(&self, y: &CudaStorage, yl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let cols = yl.shape().dims().last().copied().unwrap_or(1).max(1);
        let n = yl.shape().elem_count();
        let dev = &y.device;
        let dtype = y.dtype();
        let func =
            dev.get_or_load_custom_func(&format!("bias_add_{}", suffix(dtype)?), MODULE, PTX)?;
        let storage = with_optional_operand(self.bias.as_ref(), |bias| {
            with_optional_operand(self.residual.as_ref(), |residual| {
                Ok(by_dtype!(dtype, T => {
                    let (yv, ya) = input::<T>(y, yl)?;
                    let (bv, ba) = optional_input::<T>(bias, cols)?;
                    let (rv, ra) = optional_input::<T>(residual, n)?;
                    let mut out = output::<T>(dev, n)?;
                    let vec = (ya && ba && ra && cols.is_multiple_of(pack::<T>())) as i32;
                    let rows = n / cols;
                    let mut builder = func.builder();
                    builder.arg(&yv);
                    for operand in [&bv, &rv] {
                        push_optional(&mut builder, operand);
                    }
                    // In place: no stream placement (tokens = out_tokens = rows, offset 0).
                    let offset = 0usize;
                    builder
                        .arg(&mut out)
                        .arg(&rows)
                        .arg(&cols)
                        .arg(&rows)
                        .arg(&rows)
                        .arg(&offset)
                        .arg(&vec);
                    let items = if vec == 1 { n / pack::<T>() } else { n };
                    unsafe { builder.launch(config(items)) }.map_err(cuda_error)?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                }))
            })
        })?;
        Ok((storage, yl.shape().clone()))
    }
}

struct UpsampleNearest2x;

impl CustomOp1 for UpsampleNearest2x {
    fn name(&self) -> &'static str {
        "upsample-nearest-2x"
    }

    super::cpu_fwd_unsupported!(1);

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, c, h, w) = xl.shape().dims4()?;
        let (planes, n) = (b * c, b * c * 4 * h * w);
        let dev = &x.device;
        let dtype = x.dtype();
        let func = dev.get_or_load_custom_func(
            &format!("upsample_nearest2x_{}", suffix(dtype)?),
            MODULE,
            PTX,
        )?;
        let storage = by_dtype!(dtype, T => {
            let (xv, _) = input::<T>(x, xl)?;
            let mut out = output::<T>(dev, n)?;
            // Output packs within a row (the input is read element by element).
            let vec = (2 * w).is_multiple_of(pack::<T>()) as i32;
            let mut builder = func.builder();
            builder.arg(&xv).arg(&mut out).arg(&planes).arg(&h).arg(&w).arg(&vec);
            let items = if vec == 1 { n / pack::<T>() } else { n };
            unsafe { builder.launch(config(items)) }.map_err(cuda_error)?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((storage, Shape::from((b, c, 2 * h, 2 * w))))
    }
}

struct ChannelAdd;

impl CustomOp2 for ChannelAdd {
    fn name(&self) -> &'static str {
        "channel-add"
    }

    super::cpu_fwd_unsupported!(2);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        t: &CudaStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, c, h, w) = xl.shape().dims4()?;
        if tl.shape().elem_count() != b * c {
            candle_core::bail!("per-channel values {:?} for {:?}", tl.shape(), xl.shape());
        }
        let (n, hw) = (b * c * h * w, h * w);
        let dev = &x.device;
        let dtype = x.dtype();
        let func =
            dev.get_or_load_custom_func(&format!("channel_add_{}", suffix(dtype)?), MODULE, PTX)?;
        let storage = by_dtype!(dtype, T => {
            let (xv, xa) = input::<T>(x, xl)?;
            let (tv, _) = input::<T>(t, tl)?;
            let mut out = output::<T>(dev, n)?;
            // A pack must not straddle two channels.
            let vec = (xa && hw.is_multiple_of(pack::<T>())) as i32;
            let mut builder = func.builder();
            builder.arg(&xv).arg(&tv).arg(&mut out).arg(&n).arg(&hw).arg(&vec);
            let items = if vec == 1 { n / pack::<T>() } else { n };
            unsafe { builder.launch(config(items)) }.map_err(cuda_error)?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((storage, xl.shape().clone()))
    }
}

struct Geglu {
    /// The projection's bias (2f), added to both halves first.
    bias: Option<Tensor>,
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    super::cpu_fwd_unsupported!(1);

    fn cuda_fwd(&self, h: &CudaStorage, hl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let width = hl.shape().dims().last().copied().unwrap_or(0);
        if width % 2 != 0 {
            candle_core::bail!("GEGLU of an odd width {width}");
        }
        let f = width / 2;
        let rows = hl.shape().elem_count() / width.max(1);
        let dev = &h.device;
        let dtype = h.dtype();
        let func =
            dev.get_or_load_custom_func(&format!("geglu_{}", suffix(dtype)?), MODULE, PTX)?;
        let storage = with_optional_operand(self.bias.as_ref(), |bias| {
            Ok(by_dtype!(dtype, T => {
                let (hv, ha) = input::<T>(h, hl)?;
                let (bv, ba) = optional_input::<T>(bias, width)?;
                let mut out = output::<T>(dev, rows * f)?;
                let vec = (ha && ba && f.is_multiple_of(pack::<T>())) as i32;
                let mut builder = func.builder();
                builder.arg(&hv);
                push_optional(&mut builder, &bv);
                builder.arg(&mut out).arg(&rows).arg(&f).arg(&vec);
                let items = if vec == 1 { rows * f / pack::<T>() } else { rows * f };
                unsafe { builder.launch(config(items)) }.map_err(cuda_error)?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }))
        })?;
        let mut dims = hl.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = f;
        }
        Ok((storage, Shape::from(dims)))
    }
}

struct GeluTanh {
    /// Added to each row before the GELU (a Linear's bias).
    bias: Option<Tensor>,
}

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    super::cpu_fwd_unsupported!(1);

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = xl.shape().elem_count();
        let cols = xl.shape().dims().last().copied().unwrap_or(1).max(1);
        let dev = &x.device;
        let dtype = x.dtype();
        let func =
            dev.get_or_load_custom_func(&format!("gelu_tanh_{}", suffix(dtype)?), MODULE, PTX)?;
        let storage = with_optional_operand(self.bias.as_ref(), |bias| {
            Ok(by_dtype!(dtype, T => {
                let (xv, xa) = input::<T>(x, xl)?;
                let (bv, ba) = optional_input::<T>(bias, cols)?;
                let mut out = output::<T>(dev, n)?;
                // With a bias, a pack must not straddle two rows.
                let packs_fit = n.is_multiple_of(pack::<T>())
                    && (bv.is_none() || cols.is_multiple_of(pack::<T>()));
                let vec = (xa && ba && packs_fit) as i32;
                let mut builder = func.builder();
                builder.arg(&xv);
                push_optional(&mut builder, &bv);
                builder.arg(&mut out).arg(&n).arg(&cols).arg(&vec);
                let items = if vec == 1 { n / pack::<T>() } else { n };
                unsafe { builder.launch(config(items)) }.map_err(cuda_error)?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }))
        })?;
        Ok((storage, xl.shape().clone()))
    }
}

struct GroupNorm {
    groups: usize,
    eps: f32,
    with_silu: bool,
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    super::cpu_fwd_unsupported!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        scale: &CudaStorage,
        sl: &Layout,
        shift: &CudaStorage,
        hl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dims = xl.shape().dims();
        if dims.len() < 2 || self.groups == 0 || !dims[1].is_multiple_of(self.groups) {
            candle_core::bail!("group norm of {dims:?} in {} groups", self.groups);
        }
        let (b, c) = (dims[0], dims[1]);
        let n = xl.shape().elem_count();
        let hw = n / (b * c).max(1);
        let per_group = c / self.groups;
        let group_size = per_group * hw;
        if sl.shape().elem_count() != c || hl.shape().elem_count() != c {
            candle_core::bail!("group norm scale/shift for {c} channels");
        }
        let dev = &x.device;
        let dtype = x.dtype();
        let name = suffix(dtype)?;
        let partial_fn =
            dev.get_or_load_custom_func(&format!("group_norm_partial_{name}"), MODULE, PTX)?;
        let apply_fn =
            dev.get_or_load_custom_func(&format!("group_norm_apply_{name}"), MODULE, PTX)?;
        let storage = by_dtype!(dtype, T => {
            let (xv, xa) = input::<T>(x, xl)?;
            let (sv, _) = input::<T>(scale, sl)?;
            let (hv, _) = input::<T>(shift, hl)?;
            let groups = b * self.groups;
            let slices = group_norm_slices(groups, group_size);
            // A multiple of 8 values: every slice starts on a 16-byte pack.
            let slice = group_size.div_ceil(slices).next_multiple_of(8);
            let mut partial = output::<f32>(dev, 3 * groups * slices)?;
            let vec_stats = (xa && group_size.is_multiple_of(pack::<T>())) as i32;
            let mut builder = partial_fn.builder();
            builder
                .arg(&xv)
                .arg(&mut partial)
                .arg(&group_size)
                .arg(&slice)
                .arg(&self.eps)
                .arg(&vec_stats);
            let launch = LaunchConfig {
                grid_dim: (groups as u32, slices as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { builder.launch(launch) }.map_err(cuda_error)?;
            // One slice a group: the statistics are in `partial` already.
            let stats = if slices == 1 {
                partial
            } else {
                let merge_fn = dev.get_or_load_custom_func("group_norm_merge_f32", MODULE, PTX)?;
                let mut stats = output::<f32>(dev, 2 * groups)?;
                let mut builder = merge_fn.builder();
                builder.arg(&partial).arg(&mut stats).arg(&groups).arg(&slices).arg(&self.eps);
                unsafe { builder.launch(config(groups)) }.map_err(cuda_error)?;
                stats
            };
            let mut out = output::<T>(dev, n)?;
            let vec = (xa && hw.is_multiple_of(pack::<T>())) as i32;
            let silu = self.with_silu as i32;
            let mut builder = apply_fn.builder();
            builder
                .arg(&xv)
                .arg(&stats)
                .arg(&sv)
                .arg(&hv)
                .arg(&mut out)
                .arg(&n)
                .arg(&c)
                .arg(&hw)
                .arg(&per_group)
                .arg(&silu)
                .arg(&vec);
            let items = if vec == 1 { n / pack::<T>() } else { n };
            unsafe { builder.launch(config(items)) }.map_err(cuda_error)?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((storage, xl.shape().clone()))
    }
}

/// Blocks per group for a GroupNorm's statistics: about 1 024 blocks in all (every SM of a large
/// GPU busy; one per group left a VAE decoder's 32 groups on 32 SMs), none under 4 096 values.
fn group_norm_slices(groups: usize, group_size: usize) -> usize {
    1024usize
        .div_ceil(groups.max(1))
        .min(group_size / 4096)
        .max(1)
}

struct Rope;

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    super::cpu_fwd_unsupported!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        cos: &CudaStorage,
        cl: &Layout,
        sin: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, h, n, d) = xl.shape().dims4()?;
        let half = d / 2;
        // Heads-first data, or a heads-first view of token-major data (rotated, and returned,
        // in its own order).
        let token_major = !xl.is_contiguous() && token_major_view(xl);
        if d % 2 != 0 || cl.shape().elem_count() != n * half || sl.shape().elem_count() != n * half
        {
            candle_core::bail!("rope of {:?} with {:?} tables", xl.shape(), cl.shape());
        }
        let count = xl.shape().elem_count();
        let pairs = count / 2;
        let dev = &x.device;
        let dtype = x.dtype();
        let func = dev.get_or_load_custom_func(&format!("rope_{}", suffix(dtype)?), MODULE, PTX)?;
        let heads_inner = if token_major { h } else { 1 };
        let storage = by_dtype!(dtype, T => {
            let xv = if token_major {
                x.as_cuda_slice::<T>()?.slice(xl.start_offset()..)
            } else {
                input::<T>(x, xl)?.0
            };
            let (cv, _) = input::<f32>(cos, cl)?;
            let (sv, _) = input::<f32>(sin, sl)?;
            let mut out = output::<T>(dev, count)?;
            let mut builder = func.builder();
            builder.arg(&xv).arg(&cv).arg(&sv).arg(&mut out).arg(&pairs).arg(&n).arg(&half).arg(&heads_inner);
            unsafe { builder.launch(config(pairs)) }.map_err(cuda_error)?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        let shape = if token_major {
            Shape::from((b, n, h, d))
        } else {
            xl.shape().clone()
        };
        Ok((storage, shape))
    }
}

#[derive(Clone, Copy)]
enum PerSampleOp {
    Modulate,
    GatedAdd,
}

/// The DiT's per-sample modulation ops: the first operand (B, N, D) and the per-sample (B, D)
/// vectors; for `GatedAdd` the third operand is (B, N, D) too, and `bias` (D) is added to it.
struct PerSample {
    op: PerSampleOp,
    /// `GatedAdd`: a second (B, N, D) product added to the third operand.
    second: Option<Tensor>,
    bias: Option<Tensor>,
}

impl CustomOp3 for PerSample {
    fn name(&self) -> &'static str {
        match self.op {
            PerSampleOp::Modulate => "modulate",
            PerSampleOp::GatedAdd => "gated-add",
        }
    }

    super::cpu_fwd_unsupported!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (batch, tokens, d) = xl.shape().dims3()?;
        let vector = batch * d;
        let (b_len, kernel) = match self.op {
            PerSampleOp::Modulate => (vector, "modulate"),
            PerSampleOp::GatedAdd => (xl.shape().elem_count(), "gated_add"),
        };
        if al.shape().elem_count() != vector || bl.shape().elem_count() != b_len {
            candle_core::bail!(
                "{} of {:?} with {:?} and {:?}",
                self.name(),
                xl.shape(),
                al.shape(),
                bl.shape()
            );
        }
        let count = xl.shape().elem_count();
        let per_batch = tokens * d;
        let dev = &x.device;
        let dtype = x.dtype();
        let func =
            dev.get_or_load_custom_func(&format!("{kernel}_{}", suffix(dtype)?), MODULE, PTX)?;
        let storage = with_optional_operand(self.second.as_ref(), |second| {
            with_optional_operand(self.bias.as_ref(), |bias| {
                Ok(by_dtype!(dtype, T => {
                    let (xv, xa) = input::<T>(x, xl)?;
                    let (av, aa) = input::<T>(a, al)?;
                    let (bv, ba) = input::<T>(b, bl)?;
                    let (secondv, seconda) = optional_input::<T>(second, count)?;
                    let (biasv, biasa) = optional_input::<T>(bias, d)?;
                    let mut out = output::<T>(dev, count)?;
                    let aligned = xa && aa && ba && seconda && biasa;
                    let vec = (aligned && d.is_multiple_of(pack::<T>())) as i32;
                    let mut builder = func.builder();
                    builder.arg(&xv).arg(&av).arg(&bv);
                    if let PerSampleOp::GatedAdd = self.op {
                        for operand in [&secondv, &biasv] {
                            push_optional(&mut builder, operand);
                        }
                    }
                    builder.arg(&mut out).arg(&count).arg(&per_batch).arg(&d).arg(&vec);
                    let items = if vec == 1 { count / pack::<T>() } else { count };
                    unsafe { builder.launch(config(items)) }.map_err(cuda_error)?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                }))
            })
        })?;
        Ok((storage, xl.shape().clone()))
    }
}

struct LayerNormModulate {
    eps: f32,
    /// A LayerNorm's weight and bias (one of each, (D)) in place of per-sample 1 + scale and
    /// shift ((B, D)).
    affine: bool,
}

impl CustomOp3 for LayerNormModulate {
    fn name(&self) -> &'static str {
        "layer-norm-modulate"
    }

    super::cpu_fwd_unsupported!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        shift: &CudaStorage,
        sl: &Layout,
        scale: &CudaStorage,
        cl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (batch, tokens, d) = xl.shape().dims3()?;
        if sl.shape().elem_count() != batch * d || cl.shape().elem_count() != batch * d {
            candle_core::bail!(
                "layer norm of {:?} modulated by {:?} and {:?}",
                xl.shape(),
                sl.shape(),
                cl.shape()
            );
        }
        let rows = batch * tokens;
        let dev = &x.device;
        let dtype = x.dtype();
        let kernel = match self.affine {
            true => "layer_norm_affine",
            false => "layer_norm_modulate",
        };
        let func =
            dev.get_or_load_custom_func(&format!("{kernel}_{}", suffix(dtype)?), MODULE, PTX)?;
        let storage = by_dtype!(dtype, T => {
            let (xv, xa) = input::<T>(x, xl)?;
            let (sv, sa) = input::<T>(shift, sl)?;
            let (cv, ca) = input::<T>(scale, cl)?;
            let mut out = output::<T>(dev, rows * d)?;
            let vec = (xa && sa && ca && d.is_multiple_of(pack::<T>())) as i32;
            let mut builder = func.builder();
            builder.arg(&xv).arg(&sv).arg(&cv).arg(&mut out).arg(&d).arg(&tokens).arg(&self.eps).arg(&vec);
            // One block per row, sized to it.
            let launch = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (norm_row_threads(d, if vec == 1 { pack::<T>() } else { 1 }), 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { builder.launch(launch) }.map_err(cuda_error)?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((storage, xl.shape().clone()))
    }
}

/// A locked operand's CUDA storage.
pub(super) fn locked_cuda<'g, 'a: 'g>(
    (storage, layout): &'g (StorageRef<'a>, &'a Layout),
) -> candle_core::Result<(&'g CudaStorage, &'g Layout)> {
    match &**storage {
        Storage::Cuda(s) => Ok((s, *layout)),
        _ => candle_core::bail!("an operand off the CUDA device"),
    }
}

enum JointKind {
    /// Each stream's bias added ([`join_values`]).
    Values,
    /// Bias, per-head RMSNorm and rotary embedding ([`qk_norm`]).
    QkNorm { table: Option<Tensor>, eps: f32 },
}

struct OwnedStream {
    x: Tensor,
    with: Option<Tensor>,
    offset: usize,
}

/// A kernel per stream into one output. Candle passes a custom op at most three tensors: the
/// op is applied to the first stream and reads the others through their storage.
struct Joint {
    streams: Vec<OwnedStream>,
    total: usize,
    kind: JointKind,
}

impl CustomOp1 for Joint {
    fn name(&self) -> &'static str {
        match self.kind {
            JointKind::Values => "join-values",
            JointKind::QkNorm { .. } => "qk-norm",
        }
    }

    super::cpu_fwd_unsupported!(1);

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dims = xl.shape().dims();
        let (batch, width) = (dims[0], dims[2..].iter().product::<usize>());
        let mut out_dims = dims.to_vec();
        out_dims[1] = self.total;
        let (kernel, head_dim) = match &self.kind {
            JointKind::Values => ("bias_add", 0),
            JointKind::QkNorm { .. } => {
                let [_, _, _, d] = dims else {
                    candle_core::bail!("q/k norm of {dims:?}: (B, N, H, D) wanted");
                };
                if !qk_norm_supports(*d) {
                    candle_core::bail!("q/k norm at head size {d}");
                }
                ("qk_norm", *d)
            }
        };
        let dev = &x.device;
        let dtype = x.dtype();
        let func =
            dev.get_or_load_custom_func(&format!("{kernel}_{}", suffix(dtype)?), MODULE, PTX)?;
        // The first stream's data is this op's argument (already locked by candle).
        let locked: Vec<_> = self
            .streams
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let data = (i > 0).then(|| s.x.storage_and_layout());
                (data, s.with.as_ref().map(Tensor::storage_and_layout))
            })
            .collect();
        let table = match &self.kind {
            JointKind::QkNorm { table: Some(t), .. } => Some(t.storage_and_layout()),
            _ => None,
        };
        let storage = by_dtype!(dtype, T => {
            let mut out = output::<T>(dev, batch * self.total * width)?;
            let table = table.as_ref().map(locked_cuda).transpose()?;
            let (tv, _) = match (&self.kind, table) {
                (JointKind::QkNorm { .. }, Some((ts, tl))) => {
                    if tl.shape().elem_count() < self.total * head_dim {
                        candle_core::bail!("rotary table {:?} for {} tokens", tl.shape(), self.total);
                    }
                    optional_input::<f32>(Some((ts, tl)), tl.shape().elem_count())?
                }
                _ => (None, true),
            };
            for (stream, (x_locked, with_locked)) in self.streams.iter().zip(&locked) {
                let (xs, xl) = match x_locked {
                    Some(data) => locked_cuda(data)?,
                    None => (x, xl),
                };
                let with = with_locked.as_ref().map(locked_cuda).transpose()?;
                let tokens = xl.shape().dims()[1];
                let rows = batch * tokens;
                let (xv, xa) = input::<T>(xs, xl)?;
                let mut builder = func.builder();
                builder.arg(&xv);
                match &self.kind {
                    JointKind::Values => {
                        let (bv, ba) = optional_input::<T>(with, width)?;
                        let vec = (xa && ba && width.is_multiple_of(pack::<T>())) as i32;
                        push_optional(&mut builder, &bv);
                        builder
                            .arg(&NULL)
                            .arg(&mut out)
                            .arg(&rows)
                            .arg(&width)
                            .arg(&tokens)
                            .arg(&self.total)
                            .arg(&stream.offset)
                            .arg(&vec);
                        let items = if vec == 1 { rows * width / pack::<T>() } else { rows * width };
                        unsafe { builder.launch(config(items)) }.map_err(cuda_error)?;
                    }
                    JointKind::QkNorm { eps, .. } => {
                        let heads = width / head_dim;
                        let (pv, pa) = optional_input::<T>(with, (heads + 1) * head_dim)?;
                        let Some(pv) = pv else {
                            candle_core::bail!("q/k norm without its parameters");
                        };
                        builder.arg(&pv);
                        push_optional(&mut builder, &tv);
                        let rows = rows * heads;
                        // Each pair as one access where x and the parameters start 16-byte
                        // aligned (the output is fresh; the table is read value by value).
                        let paired = (xa && pa) as i32;
                        builder
                            .arg(&mut out)
                            .arg(&rows)
                            .arg(&head_dim)
                            .arg(&heads)
                            .arg(&tokens)
                            .arg(&self.total)
                            .arg(&stream.offset)
                            .arg(eps)
                            .arg(&paired);
                        // 32 / qk_norm_lanes(d) rows a warp, blocks of 8 warps (grid-stride
                        // beyond).
                        let rows_per_block = THREADS as usize / qk_norm_lanes(head_dim);
                        let launch = LaunchConfig {
                            grid_dim: (rows.div_ceil(rows_per_block).clamp(1, 1 << 16) as u32, 1, 1),
                            block_dim: (THREADS, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        unsafe { builder.launch(launch) }.map_err(cuda_error)?;
                    }
                }
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((storage, Shape::from(out_dims)))
    }
}
