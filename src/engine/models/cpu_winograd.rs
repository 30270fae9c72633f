//! Winograd F(2×2, 3×3) for the CPU's 3×3 / stride-1 / padding-1 convolutions at larger image
//! sizes (Lavin & Gray, 2015): each 2×2 output tile comes from a 4×4 input tile through 16
//! element-wise products in a transformed domain, so the channel mixing is 16 matrix products of
//! (Co × Ci)·(Ci × tiles) instead of nine of (Co × Ci)·(Ci × 4·tiles) — 2.25× fewer
//! multiplications. The weight transform is done once per weight (the caller keeps it); the input
//! and output transforms run per chunk of tiles inside each parallel task, so the transformed
//! tiles stay in cache. F(2,3) has only ±1 and ½ in its matrices: results match the direct
//! convolution to ~1e-6 relative.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::cpu_util::{gemm_f32, with_cpu_slice, SharedOut, Strided};

/// Tiles per parallel task: the transformed input and output of a chunk (16·(Ci + Co)·TILES
/// floats) stay within a core's cache for SD's channel counts.
const TILES: usize = 96;

/// A 3×3 weight (Co, Ci, 3, 3) in the transformed domain: 16 matrices (Co × Ci), `U = G g Gᵀ`.
pub struct WinogradWeight {
    data: Vec<f32>,
    co: usize,
    ci: usize,
}

impl WinogradWeight {
    pub fn new(weight: &[f32], co: usize, ci: usize) -> Self {
        let mut data = vec![0f32; 16 * co * ci];
        for o in 0..co {
            for i in 0..ci {
                let g = &weight[(o * ci + i) * 9..][..9];
                // t = G g (4 × 3), G = [[1,0,0],[½,½,½],[½,−½,½],[0,0,1]].
                let mut t = [[0f32; 3]; 4];
                for c in 0..3 {
                    let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                    t[0][c] = g0;
                    t[1][c] = 0.5 * (g0 + g1 + g2);
                    t[2][c] = 0.5 * (g0 - g1 + g2);
                    t[3][c] = g2;
                }
                // U = t Gᵀ (4 × 4).
                for (r, row) in t.iter().enumerate() {
                    let u = [
                        row[0],
                        0.5 * (row[0] + row[1] + row[2]),
                        0.5 * (row[0] - row[1] + row[2]),
                        row[2],
                    ];
                    for (c, value) in u.into_iter().enumerate() {
                        data[((r * 4 + c) * co + o) * ci + i] = value;
                    }
                }
            }
        }
        Self { data, co, ci }
    }

    /// From a (Co, Ci, 3, 3) f32 CPU tensor.
    pub fn from_tensor(weight: &Tensor) -> candle_core::Result<Self> {
        let (co, ci, _, _) = weight.dims4()?;
        with_cpu_slice(&weight.to_dtype(DType::F32)?.contiguous()?, |w| {
            Self::new(w, co, ci)
        })
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.co, self.ci)
    }

    /// Bytes held (16/9 of the f32 weight).
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// Whether a layer with `ci` input channels takes Winograd's path: with fewer, the 16 products
/// are too thin to beat the direct convolution (`candela bench --kernels`). Image size does not
/// enter: it wins from 8×8 up on SD's layers, and the layer keeps no other copy of its weight.
pub fn worthwhile(ci: usize) -> bool {
    ci >= MIN_CHANNELS
}
pub const MIN_CHANNELS: usize = 32;

/// `xs` (B, Ci, H, W) f32 on the CPU ⊛ `weight` + `bias`, padding 1, stride 1.
pub fn conv3x3(
    xs: &Tensor,
    weight: &WinogradWeight,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, ci, h, w) = xs.dims4()?;
    if ci != weight.ci {
        candle_core::bail!(
            "winograd conv: {} input channels for a weight of {}",
            ci,
            weight.ci
        );
    }
    let co = weight.co;
    let bias = super::cpu_util::bias_values(bias, co)?;
    let out = with_cpu_slice(&xs.contiguous()?, |x| {
        let mut out = vec![0f32; b * co * h * w];
        convolve(x, weight, &bias, &mut out, [b, h, w]);
        out
    })?;
    Tensor::from_vec(out, (b, co, h, w), &Device::Cpu)
}

/// The sizes one convolution call works with.
#[derive(Clone, Copy)]
struct Geometry {
    ci: usize,
    co: usize,
    h: usize,
    w: usize,
    /// Tiles per row, per image.
    tw: usize,
    tiles_per_image: usize,
    /// Row length and plane size of the padded, column-split input.
    pw: usize,
    plane: usize,
    /// Tiles per task (the column stride of V and M).
    per_task: usize,
}

/// `out` (B, Co, H, W) = `x` (B, Ci, H, W) ⊛ weight + `bias`, padding 1.
pub fn convolve(
    x: &[f32],
    weight: &WinogradWeight,
    bias: &[f32],
    out: &mut [f32],
    [b, h, w]: [usize; 3],
) {
    let (co, ci) = (weight.co, weight.ci);
    debug_assert_eq!(x.len(), b * ci * h * w);
    debug_assert_eq!(out.len(), b * co * h * w);
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    // The zero-padded input (one row/column before, enough after for the last, possibly half,
    // tile) with each row split into its even and odd padded columns, so that the transform
    // reads every tile's columns as contiguous runs: row = [even (tw + 1) | odd (tw + 1)].
    let half = tw + 1;
    let (ph, pw) = (2 * th + 2, 2 * half);
    let plane = ph * pw;
    let mut padded = vec![0f32; b * ci * plane];
    padded
        .par_chunks_mut(plane)
        .zip(x.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for y in 0..h {
                let row = &src[y * w..][..w];
                let (even, odd) = dst[(y + 1) * pw..][..pw].split_at_mut(half);
                // Padded column 2i holds x[2i − 1], column 2i + 1 holds x[2i].
                for (i, value) in row.iter().skip(1).step_by(2).enumerate() {
                    even[i + 1] = *value;
                }
                for (i, value) in row.iter().step_by(2).enumerate() {
                    odd[i] = *value;
                }
            }
        });
    let tiles_per_image = th * tw;
    let total = b * tiles_per_image;
    // Small images still spread over every thread.
    let per_task = total.div_ceil(rayon::current_num_threads()).clamp(1, TILES);
    let g = Geometry {
        ci,
        co,
        h,
        w,
        tw,
        tiles_per_image,
        pw,
        plane,
        per_task,
    };
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..total.div_ceil(per_task)).into_par_iter().for_each_init(
        || {
            (
                vec![0f32; 16 * ci * per_task],
                vec![0f32; 16 * co * per_task],
            )
        },
        |(v, m), chunk| {
            let first = chunk * per_task;
            let n = per_task.min(total - first);
            transform_input(&padded, v, first, n, g);
            // Channel mixing: M[k] (Co × n) = U[k] (Co × Ci) · V[k] (Ci × n).
            for k in 0..16 {
                // SAFETY: U[k] is Co × Ci row-major, V[k] Ci × per_task and M[k] Co × per_task
                // row-major, of which the first n columns are used.
                unsafe {
                    gemm_f32(
                        [co, n, ci],
                        m[k * co * per_task..].as_mut_ptr(),
                        per_task as isize,
                        false,
                        Strided {
                            ptr: weight.data[k * co * ci..].as_ptr(),
                            row: ci as isize,
                            col: 1,
                        },
                        Strided {
                            ptr: v[k * ci * per_task..].as_ptr(),
                            row: per_task as isize,
                            col: 1,
                        },
                        1.0,
                    );
                }
            }
            // SAFETY: the chunk's tiles are this task's alone.
            unsafe { transform_output(m, bias, out_ptr, first, n, g) };
        },
    );
}

/// A run of a chunk's tiles that lies in one tile row: image `b`, tile row `ty`, tiles
/// `tx0..tx0 + len`, at column `p` of V and M.
#[derive(Clone, Copy)]
struct Run {
    b: usize,
    ty: usize,
    tx0: usize,
    len: usize,
    p: usize,
}

/// The runs of the chunk `[first, first + n)`. (An iterator rather than a callback, so the
/// loop bodies are compiled inside the callers' `target_feature` functions.)
fn tile_runs(first: usize, n: usize, g: Geometry) -> impl Iterator<Item = Run> {
    let mut p = 0;
    std::iter::from_fn(move || {
        if p >= n {
            return None;
        }
        let tile = first + p;
        let (b, t) = (tile / g.tiles_per_image, tile % g.tiles_per_image);
        let (ty, tx0) = (t / g.tw, t % g.tw);
        let len = (g.tw - tx0).min(n - p);
        let run = Run { b, ty, tx0, len, p };
        p += len;
        Some(run)
    })
}

/// V[k] (Ci × n) = Bᵀ d B for each tile's 4×4 patch d, Bᵀ = [[1,0,−1,0],[0,1,1,0],[0,−1,1,0],
/// [0,1,0,−1]], vectorised over the tiles of a row.
#[inline(always)]
fn transform_input_impl(padded: &[f32], v: &mut [f32], first: usize, n: usize, g: Geometry) {
    let half = g.pw / 2;
    for Run {
        b: bi,
        ty,
        tx0,
        len,
        p,
    } in tile_runs(first, n, g)
    {
        for c in 0..g.ci {
            let base = (bi * g.ci + c) * g.plane + 2 * ty * g.pw + tx0;
            // Rows of the patch, even and odd columns: tile i reads even[i], odd[i],
            // even[i + 1], odd[i + 1].
            let row = |r: usize| {
                let start = base + r * g.pw;
                (
                    &padded[start..][..len + 1],
                    &padded[start + half..][..len + 1],
                )
            };
            let (e0, o0) = row(0);
            let (e1, o1) = row(1);
            let (e2, o2) = row(2);
            let (e3, o3) = row(3);
            // V[k][c][p..p + len] for the 16 k.
            let dst: [*mut f32; 16] =
                std::array::from_fn(|k| v[(k * g.ci + c) * g.per_task + p..][..len].as_mut_ptr());
            for i in 0..len {
                // Bᵀ d: the patch's rows combined, for its four columns.
                let col = |e: &[f32], o: &[f32]| [e[i], o[i], e[i + 1], o[i + 1]];
                let (d0, d1, d2, d3) = (col(e0, o0), col(e1, o1), col(e2, o2), col(e3, o3));
                for j in 0..4 {
                    let t = match j {
                        0 => [d0[0] - d2[0], d0[1] - d2[1], d0[2] - d2[2], d0[3] - d2[3]],
                        1 => [d1[0] + d2[0], d1[1] + d2[1], d1[2] + d2[2], d1[3] + d2[3]],
                        2 => [d2[0] - d1[0], d2[1] - d1[1], d2[2] - d1[2], d2[3] - d1[3]],
                        _ => [d1[0] - d3[0], d1[1] - d3[1], d1[2] - d3[2], d1[3] - d3[3]],
                    };
                    // (Bᵀ d) B: the same combination across columns.
                    // SAFETY: each dst[k] points at `len` elements of V (checked above), i < len.
                    unsafe {
                        *dst[j * 4].add(i) = t[0] - t[2];
                        *dst[j * 4 + 1].add(i) = t[1] + t[2];
                        *dst[j * 4 + 2].add(i) = t[2] - t[1];
                        *dst[j * 4 + 3].add(i) = t[1] - t[3];
                    }
                }
            }
        }
    }
}

/// The output tiles Aᵀ M A + bias, Aᵀ = [[1,1,1,0],[0,1,−1,−1]], written into `out`.
///
/// SAFETY: the tiles `[first, first + n)` must belong to the caller alone; `out` must hold
/// (B, Co, H, W).
#[inline(always)]
unsafe fn transform_output_impl(
    m: &[f32],
    bias: &[f32],
    out: SharedOut,
    first: usize,
    n: usize,
    g: Geometry,
) {
    for Run {
        b: bi,
        ty,
        tx0,
        len,
        p,
    } in tile_runs(first, n, g)
    {
        let (y0, x0) = (2 * ty, 2 * tx0);
        // Columns of the run inside the image (the last tile of an odd width is half outside).
        let cols = (2 * len).min(g.w - x0);
        let rows = if y0 + 1 < g.h { 2 } else { 1 };
        let mut top = [0f32; 2 * TILES];
        let mut bottom = [0f32; 2 * TILES];
        for o in 0..g.co {
            let at = |k: usize| &m[(k * g.co + o) * g.per_task + p..][..len];
            let (m0, m1, m2, m3) = (at(0), at(1), at(2), at(3));
            let (m4, m5, m6, m7) = (at(4), at(5), at(6), at(7));
            let (m8, m9, m10, m11) = (at(8), at(9), at(10), at(11));
            let (m12, m13, m14, m15) = (at(12), at(13), at(14), at(15));
            let add = bias[o];
            for i in 0..len {
                // s = Aᵀ M (2 × 4), then s A.
                let s0 = [
                    m0[i] + m4[i] + m8[i],
                    m1[i] + m5[i] + m9[i],
                    m2[i] + m6[i] + m10[i],
                    m3[i] + m7[i] + m11[i],
                ];
                let s1 = [
                    m4[i] - m8[i] - m12[i],
                    m5[i] - m9[i] - m13[i],
                    m6[i] - m10[i] - m14[i],
                    m7[i] - m11[i] - m15[i],
                ];
                top[2 * i] = s0[0] + s0[1] + s0[2] + add;
                top[2 * i + 1] = s0[1] - s0[2] - s0[3] + add;
                bottom[2 * i] = s1[0] + s1[1] + s1[2] + add;
                bottom[2 * i + 1] = s1[1] - s1[2] - s1[3] + add;
            }
            let at_out = ((bi * g.co + o) * g.h + y0) * g.w + x0;
            // SAFETY: rows y0 (and y0 + 1) of these columns are this run's output, in bounds.
            unsafe {
                std::ptr::copy_nonoverlapping(top.as_ptr(), out.0.add(at_out), cols);
                if rows == 2 {
                    std::ptr::copy_nonoverlapping(bottom.as_ptr(), out.0.add(at_out + g.w), cols);
                }
            }
        }
    }
}

avx2_dispatch!(fn transform_input(padded: &[f32], v: &mut [f32], first: usize, n: usize, g: Geometry) = transform_input_impl);

avx2_dispatch!(
    /// SAFETY: as [`transform_output_impl`].
    unsafe fn transform_output(m: &[f32], bias: &[f32], out: SharedOut, first: usize, n: usize, g: Geometry) = transform_output_impl
);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_direct_convolution() {
        let dev = Device::Cpu;
        // Odd sizes (half tiles at the edges), single pixels, more tiles than one chunk.
        for (b, ci, co, h, w) in [
            (2, 5, 7, 9, 6),
            (1, 16, 33, 4, 11),
            (3, 4, 8, 1, 1),
            (2, 8, 3, 17, 23),
        ] {
            let x = Tensor::randn(0f32, 1., (b, ci, h, w), &dev).unwrap();
            let k = Tensor::randn(0f32, 0.2, (co, ci, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., co, &dev).unwrap();
            let weight = WinogradWeight::new(&k.flatten_all().unwrap().to_vec1().unwrap(), co, ci);
            let mut out = vec![0f32; b * co * h * w];
            convolve(
                &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                &weight,
                &bias.to_vec1::<f32>().unwrap(),
                &mut out,
                [b, h, w],
            );
            let ours = Tensor::from_vec(out, (b, co, h, w), &dev).unwrap();
            let expected = x
                .conv2d(&k, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            let diff = super::super::max_abs_diff(&ours, &expected);
            assert!(diff < 1e-5, "{b}x{ci}->{co} {h}x{w}: {diff}");
        }
    }
}
