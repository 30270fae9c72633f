//! Winograd F(4×4, 3×3) (Lavin & Gray, 2015; interpolation points 0, ±1, ±2, ∞): each 4×4 output
//! tile from a 6×6 input tile through 36 element-wise products, 2.25 multiplications per output
//! against F(2×2, 3×3)'s 4 and the direct convolution's 9. Its matrices hold 4, 5, 8 and ⅙, 1⁄24,
//! so rounding grows with them: within ~1e-5 of the output's scale in f32 (0.3–1.1e-5 from 1 to
//! 320 input channels), against ~5e-7 for F(2×2)'s ±1 and ½ and for the direct convolution (the
//! tests hold both to it, and the networks to diffusers). Used where a call has
//! enough tiles that the 2.25× larger transformed weight is small beside the products.

use rayon::prelude::*;

use super::{tile_runs, Geometry, Run, Taps};
use crate::engine::models::cpu_util::SharedOut;

/// Tiles per parallel task (V and M of a chunk: 36·(Ci + Co)·TILES floats). 64 splits SD 1.5's
/// 32² layers at batch 2 (128 tiles) evenly over two threads: 1 280→1 280 there took 0.58× of
/// F(2×2)'s time at 64 tiles a task against 0.68–0.72× at 48 (three tasks on two cores).
pub(super) const TILES: usize = 64;

/// G (6 × 3): U = G g Gᵀ.
const G: [[f32; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// `u` (Co, 36, Ci) = G g Gᵀ for each (Co, Ci) pair of `taps` (Co, 9, Ci), output channels in
/// parallel.
pub(super) fn transform_weight(taps: &Taps, ci: usize, u: &mut [f32]) {
    u.par_chunks_mut(36 * ci).enumerate().for_each_init(
        || (vec![0f32; 18 * ci], Vec::new()),
        |(t, widened), (o, u)| transform_channel(taps.channel(o, 9 * ci, widened), u, t, ci),
    );
}

/// One output channel: `g` (9, Ci) → `u` (36, Ci), whole rows of Ci at a time; `t` holds G g
/// (6 × 3 rows).
#[inline(always)]
fn transform_channel_impl(g: &[f32], u: &mut [f32], t: &mut [f32], ci: usize) {
    // out = Σ coefficient · row, over three rows, element-wise.
    fn combine(out: &mut [f32], coefficients: [f32; 3], rows: [&[f32]; 3]) {
        let [a, b, c] = coefficients;
        for (((out, x), y), z) in out.iter_mut().zip(rows[0]).zip(rows[1]).zip(rows[2]) {
            *out = a * x + b * y + c * z;
        }
    }
    for (r, coefficients) in G.iter().enumerate() {
        for c in 0..3 {
            let tap = |k: usize| &g[(3 * k + c) * ci..][..ci];
            combine(
                &mut t[(3 * r + c) * ci..][..ci],
                *coefficients,
                [tap(0), tap(1), tap(2)],
            );
        }
    }
    let t = &*t;
    for r in 0..6 {
        let row = |c: usize| &t[(3 * r + c) * ci..][..ci];
        for (s, coefficients) in G.iter().enumerate() {
            combine(
                &mut u[(6 * r + s) * ci..][..ci],
                *coefficients,
                [row(0), row(1), row(2)],
            );
        }
    }
}

avx2_dispatch!(fn transform_channel(g: &[f32], u: &mut [f32], t: &mut [f32], ci: usize) = transform_channel_impl);

/// Tiles transformed side by side: the transforms below work on `[f32; LANES]` rows, which
/// the compiler turns into vector operations (per-tile scalar code it would not vectorise).
const LANES: usize = 8;
type Lanes = [f32; LANES];

/// Bᵀ x, lane by lane, for six values, Bᵀ = [[4,0,−5,0,1,0], [0,−4,−4,1,1,0], [0,4,−4,−1,1,0],
/// [0,−2,−1,2,1,0], [0,2,−1,−2,1,0], [0,4,0,−5,0,1]].
#[inline(always)]
fn bt(d: [Lanes; 6]) -> [Lanes; 6] {
    let mut out = [[0f32; LANES]; 6];
    for l in 0..LANES {
        let (a, b) = (d[4][l] - 4.0 * d[2][l], d[3][l] - 4.0 * d[1][l]);
        let (c, e) = (d[4][l] - d[2][l], 2.0 * (d[3][l] - d[1][l]));
        out[0][l] = 4.0 * d[0][l] - 5.0 * d[2][l] + d[4][l];
        out[1][l] = a + b;
        out[2][l] = a - b;
        out[3][l] = c + e;
        out[4][l] = c - e;
        out[5][l] = 4.0 * d[1][l] - 5.0 * d[3][l] + d[5][l];
    }
    out
}

/// Aᵀ x, lane by lane, for six values, Aᵀ = [[1,1,1,1,1,0], [0,1,−1,2,−2,0], [0,1,1,4,4,0],
/// [0,1,−1,8,−8,1]].
#[inline(always)]
fn at(m: [Lanes; 6]) -> [Lanes; 4] {
    let mut out = [[0f32; LANES]; 4];
    for l in 0..LANES {
        let (sum12, diff12) = (m[1][l] + m[2][l], m[1][l] - m[2][l]);
        let (sum34, diff34) = (m[3][l] + m[4][l], m[3][l] - m[4][l]);
        out[0][l] = m[0][l] + sum12 + sum34;
        out[1][l] = diff12 + 2.0 * diff34;
        out[2][l] = sum12 + 4.0 * sum34;
        out[3][l] = diff12 + 8.0 * diff34 + m[5][l];
    }
    out
}

/// `n` ≤ LANES values from `src` into lanes (the rest zero). A whole group is one fixed-size
/// (vector) load; the partial group at a run's end is a function of its own, because merged
/// into one path both became a call to `memcpy` per group (7–14 % of SD 1.5's step in `perf`).
#[inline(always)]
fn load(src: &[f32], n: usize) -> Lanes {
    match src.first_chunk::<LANES>() {
        Some(group) if n == LANES => *group,
        _ => load_partial(src, n),
    }
}

#[cold]
#[inline(never)]
fn load_partial(src: &[f32], n: usize) -> Lanes {
    let mut lanes = [0f32; LANES];
    lanes[..n].copy_from_slice(&src[..n]);
    lanes
}

/// The first `n` ≤ LANES lanes into `dst` (a whole group: one vector store; see [`load`]).
#[inline(always)]
fn store(dst: &mut [f32], lanes: &Lanes, n: usize) {
    match dst.first_chunk_mut::<LANES>() {
        Some(group) if n == LANES => *group = *lanes,
        _ => store_partial(dst, lanes, n),
    }
}

#[cold]
#[inline(never)]
fn store_partial(dst: &mut [f32], lanes: &Lanes, n: usize) {
    dst[..n].copy_from_slice(&lanes[..n]);
}

/// V[k] (Ci × n) = Bᵀ d B for each tile's 6×6 patch d, LANES tiles of a row at a time.
#[inline(always)]
fn transform_input_impl(padded: &[f32], v: &mut [f32], first: usize, n: usize, g: Geometry) {
    let quarter = g.pw / 4;
    for run in tile_runs(first, n, g) {
        let Run {
            b: bi,
            ty,
            tx0,
            len,
            p,
        } = run;
        for c in 0..g.ci {
            let base = (bi * g.ci + c) * g.plane + 4 * ty * g.pw + tx0;
            for i in (0..len).step_by(LANES) {
                let lanes = LANES.min(len - i);
                // Column `col` of the patches of tiles i.. (row r): phase col % 4, one tile
                // further for columns 4 and 5.
                let column = |r: usize, col: usize| {
                    let start = base + r * g.pw + (col % 4) * quarter + i + col / 4;
                    load(&padded[start..], lanes)
                };
                // Bᵀ d, column by column; then (Bᵀ d) B, the same along each row. (Loops
                // rather than `array::from_fn`, whose closures were left as calls.)
                let mut columns = [[[0f32; LANES]; 6]; 6];
                for (col, transformed) in columns.iter_mut().enumerate() {
                    let mut d = [[0f32; LANES]; 6];
                    for (r, d) in d.iter_mut().enumerate() {
                        *d = column(r, col);
                    }
                    *transformed = bt(d);
                }
                for j in 0..6 {
                    let mut row = [[0f32; LANES]; 6];
                    for (value, column) in row.iter_mut().zip(&columns) {
                        *value = column[j];
                    }
                    for (k, values) in bt(row).iter().enumerate() {
                        let start = ((6 * j + k) * g.ci + c) * g.per_task + p + i;
                        store(&mut v[start..], values, lanes);
                    }
                }
            }
        }
    }
}

/// The output tiles Aᵀ M A + bias of the output channels `o0..o0 + rows` (M's rows), written
/// into `out`.
///
/// SAFETY: those tiles of those channels must belong to the caller alone; `out` must hold
/// (B, Co, H, W).
#[inline(always)]
unsafe fn transform_output_impl(
    m: &[f32],
    bias: &[f32],
    out: SharedOut,
    [o0, channels]: [usize; 2],
    first: usize,
    n: usize,
    g: Geometry,
) {
    for run in tile_runs(first, n, g) {
        let Run {
            b: bi,
            ty,
            tx0,
            len,
            p,
        } = run;
        let (y0, x0) = (4 * ty, 4 * tx0);
        // Columns and rows of the run inside the image (the last tiles may be partly outside).
        let cols = (4 * len).min(g.w - x0);
        let rows = (g.h - y0).min(4);
        let mut lines = [[0f32; 4 * TILES]; 4];
        for row in 0..channels {
            let o = o0 + row;
            let add = bias[o];
            for i in (0..len).step_by(LANES) {
                let lanes = LANES.min(len - i);
                let value = |k: usize| load(&m[(k * channels + row) * g.per_task + p + i..], lanes);
                // s = Aᵀ M (4 × 6), column by column, then s A.
                let mut columns = [[[0f32; LANES]; 4]; 6];
                for (col, transformed) in columns.iter_mut().enumerate() {
                    let mut column = [[0f32; LANES]; 6];
                    for (r, entry) in column.iter_mut().enumerate() {
                        *entry = value(6 * r + col);
                    }
                    *transformed = at(column);
                }
                for (r, line) in lines.iter_mut().enumerate() {
                    let mut s = [[0f32; LANES]; 6];
                    for (value, column) in s.iter_mut().zip(&columns) {
                        *value = column[r];
                    }
                    let y = at(s);
                    for l in 0..lanes {
                        for (x, values) in y.iter().enumerate() {
                            line[4 * (i + l) + x] = values[l] + add;
                        }
                    }
                }
            }
            let at_out = ((bi * g.co + o) * g.h + y0) * g.w + x0;
            for (r, line) in lines.iter().take(rows).enumerate() {
                // SAFETY: rows y0..y0 + rows of these columns are this run's output, in bounds.
                unsafe {
                    std::ptr::copy_nonoverlapping(line.as_ptr(), out.0.add(at_out + r * g.w), cols)
                };
            }
        }
    }
}

avx2_dispatch!(pub(super) fn transform_input(padded: &[f32], v: &mut [f32], first: usize, n: usize, g: Geometry) = transform_input_impl);

avx2_dispatch!(
    /// SAFETY: as [`transform_output_impl`].
    pub(super) unsafe fn transform_output(m: &[f32], bias: &[f32], out: SharedOut, channels: [usize; 2], first: usize, n: usize, g: Geometry) = transform_output_impl
);
