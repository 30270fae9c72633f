//! What the CPU kernels (`cpu_*`) share: the f32 test that routes a tensor to them, zero-copy
//! access to candle's buffer, the `gemm` crate's product over strided operands, and a vectorisable
//! exponential.

use candle_core::{DType, Device, Storage, Tensor};

/// A Linear weight (out, in) as a view of contiguous (in, out) data: the gemm crate multiplies by
/// that layout 1.3–2.8× faster than by the (out, in) weight read transposed (a 77-token prompt's
/// 3072→768 layer: 33 → 93 GFLOP/s). Other devices' GEMMs take either layout at the same speed.
pub fn gemm_layout(weight: &Tensor) -> candle_core::Result<Tensor> {
    if !(is_cpu_f32(weight) && weight.is_contiguous()) {
        return weight.t()?.contiguous()?.t();
    }
    let (rows, cols) = weight.dims2()?;
    let transposed = with_cpu_slice(weight, |data| transpose(data, rows, cols))?;
    Tensor::from_vec(transposed, (cols, rows), &Device::Cpu)?.t()
}

/// `data` (rows × cols, row-major) transposed, by square tiles over every core. At load time
/// every CPU Linear weight goes through here: candle's strided copy reads a column at a time, one
/// cache line per element, and took 2.6–4.4 s for a T5-XL-sized encoder's 1.8 GB (its loading
/// from the file: 0.3 s).
pub(crate) fn transpose<T: Copy + Send + Sync>(data: &[T], rows: usize, cols: usize) -> Vec<T> {
    use rayon::prelude::*;
    const TILE: usize = 32;
    // Every element is written below, so the block is not zeroed first: a large one is then
    // pages this load freed (the file's copy of the previous weight, see `large_pages`) rather
    // than fresh pages the kernel zeroes (its zeroing was ~70 % of loading time on this VM).
    let mut out = Vec::with_capacity(data.len());
    if data.is_empty() {
        return out;
    }
    // A task writes TILE output rows (input columns) whole.
    out.spare_capacity_mut()
        .par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(block, dst)| {
            let c0 = block * TILE;
            let width = dst.len() / rows;
            for r0 in (0..rows).step_by(TILE) {
                let r1 = (r0 + TILE).min(rows);
                for c in 0..width {
                    let dst_row = &mut dst[c * rows..(c + 1) * rows];
                    for r in r0..r1 {
                        dst_row[r].write(data[r * cols + c0 + c]);
                    }
                }
            }
        });
    // SAFETY: the chunks cover the whole capacity (`data.len()` = rows · cols elements, each
    // chunk's `width` columns of `rows`), every element written above.
    unsafe { out.set_len(data.len()) };
    out
}

/// For half-precision values on the CPU, `f` over them widened to f32 and rounded back once, as
/// PyTorch computes its CPU softmax and activations (candle computes them in f16/bf16 there:
/// its softmax 12×, its GELU 2× one rounding's error, measured); `None` for anything else.
pub(crate) fn widened_on_cpu(
    xs: &Tensor,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> Option<candle_core::Result<Tensor>> {
    let half = matches!(xs.dtype(), DType::F16 | DType::BF16);
    (half && xs.device().is_cpu()).then(|| f(&xs.to_dtype(DType::F32)?)?.to_dtype(xs.dtype()))
}

/// Whether the CPU kernels handle this tensor: non-empty f32 on the CPU.
pub fn is_cpu_f32(xs: &Tensor) -> bool {
    matches!(xs.device(), Device::Cpu) && xs.dtype() == DType::F32 && xs.elem_count() > 0
}

/// The f32 data of a CPU tensor from its first element, with its layout, without copying.
fn with_cpu_data<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32], &candle_core::Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("CPU kernel on a non-CPU tensor");
    };
    f(&cpu.as_slice::<f32>()?[layout.start_offset()..], layout)
}

/// The f32 data of a contiguous CPU tensor, without copying.
pub(crate) fn with_cpu_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    with_cpu_data(t, |data, layout| {
        Ok(f(&data[..layout.shape().elem_count()]))
    })
}

/// A 2-D CPU f32 tensor's data from its first element with its (row, column) strides, without
/// copying (a transposed view too); the strided extent is checked to lie inside the buffer.
pub(crate) fn with_cpu_strided<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32], (isize, isize)) -> R,
) -> candle_core::Result<R> {
    let (rows, cols) = t.dims2()?;
    with_cpu_data(t, |data, layout| {
        let [rs, cs] = layout.stride() else {
            candle_core::bail!("a 2-D tensor has two strides");
        };
        let extent = rows.saturating_sub(1) * rs + cols.saturating_sub(1) * cs + 1;
        if rows * cols > 0 && extent > data.len() {
            candle_core::bail!("a {rows}×{cols} view reaches past its buffer");
        }
        Ok(f(data, (*rs as isize, *cs as isize)))
    })
}

/// A 4-D CPU f32 view whose last dimension is contiguous — (batch, heads, rows, width), say a
/// projection's token-major output seen heads-first — from its first element, with the strides
/// of its first three dimensions, without copying; the strided extent is checked to lie inside
/// the buffer.
pub(crate) fn with_cpu_rows<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32], [usize; 3]) -> R,
) -> candle_core::Result<R> {
    with_cpu_data(t, |data, layout| {
        let (dims, stride) = (layout.dims(), layout.stride());
        let ([d0, d1, d2, d3], [s0, s1, s2, 1]) = (dims, stride) else {
            candle_core::bail!("a 4-D view with contiguous rows, not {dims:?} strided {stride:?}");
        };
        let extent = || (d0 - 1) * s0 + (d1 - 1) * s1 + (d2 - 1) * s2 + d3;
        if t.elem_count() > 0 && extent() > data.len() {
            candle_core::bail!("a {dims:?} view reaches past its buffer");
        }
        Ok(f(data, [*s0, *s1, *s2]))
    })
}

/// A layer's bias, if it has one, as `channels` f32 values (the held-weight Linear layers
/// write it under their product).
pub(crate) fn optional_bias(
    bias: Option<&Tensor>,
    channels: usize,
) -> candle_core::Result<Option<Vec<f32>>> {
    bias.map(|b| bias_values(Some(b), channels)).transpose()
}

/// A kernel's bias as f32 values, one per output channel (zeros without one).
pub(crate) fn bias_values(bias: Option<&Tensor>, channels: usize) -> candle_core::Result<Vec<f32>> {
    let Some(bias) = bias else {
        return Ok(vec![0.0; channels]);
    };
    let values = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if values.len() != channels {
        candle_core::bail!("a bias of {} values for {channels} channels", values.len());
    }
    Ok(values)
}

/// An output buffer that parallel tasks write through at disjoint places.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub *mut f32);
// SAFETY: each kernel's tasks write disjoint elements (see the kernels).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

/// A strided f32 matrix operand: element (r, c) is at `ptr + r·row + c·col`.
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    pub ptr: *const f32,
    pub row: isize,
    pub col: isize,
}

/// `dst` (m × n, rows `dst_row` apart, columns adjacent) = [`dst` +] `scale` · `lhs` (m × k) ·
/// `rhs` (k × n), on the calling thread (callers parallelise over blocks themselves).
///
/// SAFETY: every operand's strided extent, and `dst`'s, must lie inside its buffer.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    dst_row: isize,
    accumulate: bool,
    lhs: Strided,
    rhs: Strided,
    scale: f32,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row,
            accumulate,
            lhs.ptr,
            lhs.col,
            lhs.row,
            rhs.ptr,
            rhs.col,
            rhs.row,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `e^x` for `x ≤ 0` (softmax arguments after subtracting the row maximum): Cephes' polynomial
/// on `[-ln2/2, ln2/2]` times `2^n`, relative error ~1e-7, written so that it vectorises.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    let x = x.max(-87.3);
    // Round to nearest with the 1.5·2²³ trick (vectorises, unlike `round`).
    const MAGIC: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + MAGIC;
    let n = shifted - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let p = p * r * r + r + 1.0;
    // n as an integer straight from the shifted float's bits (its last mantissa bits), which
    // stays in vector registers where a float-to-int cast would not.
    let n_int = shifted.to_bits().wrapping_sub(MAGIC.to_bits());
    p * f32::from_bits(n_int.wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiled transpose holds the same values as candle's strided copy, with the same view
    /// (shape, strides), at sizes that leave partial tiles on both axes.
    #[test]
    fn gemm_layout_matches_candles_transposed_copy() -> candle_core::Result<()> {
        for (rows, cols) in [(1, 1), (3, 70), (77, 33), (64, 64), (100, 257)] {
            let weight =
                Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?.reshape((rows, cols))?;
            let ours = gemm_layout(&weight)?;
            let candles = weight.t()?.contiguous()?.t()?;
            assert_eq!(ours.dims(), candles.dims());
            assert_eq!(ours.stride(), candles.stride(), "{rows}×{cols}");
            assert_eq!(ours.to_vec2::<f32>()?, weight.to_vec2::<f32>()?);
            // Its storage is the transposed matrix itself (what the products read).
            assert_eq!(
                ours.t()?.flatten_all()?.to_vec1::<f32>()?,
                candles.t()?.flatten_all()?.to_vec1::<f32>()?
            );
        }
        Ok(())
    }
}
