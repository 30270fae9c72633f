//! Winograd convolution for the CPU's 3×3 / stride-1 / padding-1 convolutions (Lavin & Gray,
//! 2015): each output tile comes from a larger input tile through element-wise products in a
//! transformed domain, so the channel mixing is a few matrix products of (Co × Ci)·(Ci × tiles)
//! instead of nine of (Co × Ci)·(Ci × pixels). Two tile sizes, by schedule:
//!
//! * many tiles (the tile schedule, [`f43`]): F(4×4, 3×3), 36 products per 16 outputs — 4× fewer
//!   multiplications than the direct convolution — with the whole weight transformed once per
//!   call into a buffer the thread keeps; rounding within ~1e-5 of the output's scale;
//! * few tiles (the channel schedule: the UNets' widest layers at 8² and 16²): F(2×2, 3×3), 16
//!   products per 4 outputs (2.25× fewer), each task transforming a slice of the weight in cache;
//!   only ±1 and ½ in its matrices, so results match the direct convolution to ~1e-6.
//!
//! The weight is held at its own size (see [`WinogradWeight`]); the input and output transforms
//! run per chunk of tiles inside each parallel task, so the transformed tiles stay in cache.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::cpu_util::{gemm_f32, with_cpu_slice, SharedOut, Strided};

mod f43;

/// Tiles per parallel task in the channel schedule: the transformed input and output of a chunk
/// (16·(Ci + Co)·TILES floats) stay within a core's cache for SD's channel counts.
const TILES: usize = 96;

/// A 3×3 weight for Winograd's path, held at its own size, tap-major, and transformed at every
/// call — inside the channel schedule's tasks where the call has few tiles, else into a buffer
/// the calling thread keeps. Holding the transformed form instead (16 values per 9) cost SD 1.5
/// 1.6 GiB for no step time this machine could measure (session 12, docs/performance.md).
pub struct WinogradWeight {
    /// (Co, 9, Ci): the transform combines contiguous rows of Ci.
    taps: Taps,
    co: usize,
    ci: usize,
}

/// The taps in the dtype the model holds its weights in: a half-precision model on the CPU
/// holds them in bf16 / f16, widened exactly one output channel at a time as the per-call
/// transform reads them.
enum Taps {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

impl Taps {
    /// Output channel `o`'s `len` (9 × Ci) taps in f32: the held ones, or widened into `scratch`.
    fn channel<'a>(&'a self, o: usize, len: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        use super::cpu_half_linear::{widen_bf16_slice, widen_f16_slice};
        let at = o * len..(o + 1) * len;
        if let Self::F32(taps) = self {
            return &taps[at];
        }
        scratch.resize(len, 0.0);
        match self {
            Self::Bf16(taps) => widen_bf16_slice(&taps[at], scratch),
            Self::F16(taps) => widen_f16_slice(&taps[at], scratch),
            Self::F32(_) => {}
        }
        scratch
    }

    fn len(&self) -> usize {
        match self {
            Self::F32(t) => t.len(),
            Self::Bf16(t) => t.len(),
            Self::F16(t) => t.len(),
        }
    }
}

/// (Co, Ci, 3, 3) values → tap-major (Co, 9, Ci).
fn tap_major<T: Copy + Default + Send + Sync>(weight: &[T], co: usize, ci: usize) -> Vec<T> {
    let mut taps = vec![T::default(); co * ci * 9];
    taps.par_chunks_mut(9 * ci)
        .zip(weight.par_chunks(9 * ci))
        .for_each(|(taps, weight)| {
            for (i, g) in weight.chunks_exact(9).enumerate() {
                for (tap, value) in g.iter().enumerate() {
                    taps[tap * ci + i] = *value;
                }
            }
        });
    taps
}

thread_local! {
    /// The tile schedule's transformed weight: grown to the widest layer this thread has run
    /// and reused, so most calls neither allocate nor fault pages in.
    static TRANSFORMED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Frees this thread's tile-schedule buffer (the widest transform it has run). Pipelines call
/// it between a run's phases and at its end: the denoiser's buffer (SD 1.5 at 512²: 236 MB) would
/// otherwise sit through the VAE decode, where the run peaks, and through an idle server's
/// waits. Growing it again costs one allocation per run.
pub fn release_thread_buffer() {
    TRANSFORMED.with(|buffer| {
        if let Ok(mut buffer) = buffer.try_borrow_mut() {
            *buffer = Vec::new();
        }
    });
}

/// Bytes this thread's tile-schedule buffer holds now.
pub fn thread_buffer_bytes() -> usize {
    TRANSFORMED.with(|buffer| buffer.try_borrow().map_or(0, |b| b.capacity() * 4))
}

impl WinogradWeight {
    /// From (Co, Ci, 3, 3) values.
    pub fn new(weight: &[f32], co: usize, ci: usize) -> Self {
        Self {
            taps: Taps::F32(tap_major(weight, co, ci)),
            co,
            ci,
        }
    }

    /// From a (Co, Ci, 3, 3) CPU tensor, held in its dtype when that is bf16 or f16 (f32
    /// otherwise).
    pub fn from_tensor(weight: &Tensor) -> candle_core::Result<Self> {
        let (co, ci, kh, kw) = weight.dims4()?;
        if (kh, kw) != (3, 3) || !weight.device().is_cpu() {
            candle_core::bail!(
                "winograd weight: a 3×3 CPU weight, got {:?}",
                weight.shape()
            );
        }
        let flat = weight.contiguous()?.flatten_all()?;
        let taps = match weight.dtype() {
            DType::BF16 => Taps::Bf16(tap_major(&flat.to_vec1()?, co, ci)),
            DType::F16 => Taps::F16(tap_major(&flat.to_vec1()?, co, ci)),
            _ => return with_cpu_slice(&flat.to_dtype(DType::F32)?, |w| Self::new(w, co, ci)),
        };
        Ok(Self { taps, co, ci })
    }

    /// Bytes the weight is held in.
    pub fn bytes(&self) -> usize {
        let size = match self.taps {
            Taps::F32(_) => 4,
            Taps::Bf16(_) | Taps::F16(_) => 2,
        };
        self.taps.len() * size
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.co, self.ci)
    }

    /// Bytes of the buffer a call transforms this weight into when it runs by tiles: at most
    /// F(4×4, 3×3)'s 36 matrices.
    pub fn transformed_bytes(co: usize, ci: usize) -> usize {
        36 * co * ci * 4
    }

    /// Runs `f` with the tile schedule's transformed matrices, F(4×4)'s (Co, 36, Ci).
    fn with_transformed<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        let len = 36 * self.co * self.ci;
        TRANSFORMED.with(|buffer| match buffer.try_borrow_mut() {
            Ok(mut buffer) => {
                // Grown to the widest layer, but not kept at more than 4× a layer's need: the
                // VAE decoder's 512-wide transform (38 MB) would otherwise sit through its
                // 128-wide layers at full size, where the run peaks.
                if buffer.len() < len || buffer.len() > 4 * len {
                    *buffer = Vec::new();
                    buffer.resize(len, 0.0);
                }
                f43::transform_weight(&self.taps, self.ci, &mut buffer[..len]);
                f(&buffer[..len])
            }
            // A convolution inside another on this thread (a rayon worker that took another
            // task while waiting): a buffer of its own.
            Err(_) => {
                let mut own = vec![0f32; len];
                f43::transform_weight(&self.taps, self.ci, &mut own);
                f(&own)
            }
        })
    }
}

/// One output channel: `g` (9, Ci) → `u` (16, Ci), whole rows at a time (each a combination of
/// rows, which vectorises across Ci); `t` holds the middle rows of G g.
#[inline(always)]
fn transform_channel_impl(g: &[f32], u: &mut [f32], t: &mut [f32], ci: usize) {
    // out = ½ (a ± b + c), element-wise.
    fn half_sum(out: &mut [f32], a: &[f32], b: &[f32], c: &[f32], minus: bool) {
        let sign = if minus { -1.0 } else { 1.0 };
        for (((out, a), b), c) in out.iter_mut().zip(a).zip(b).zip(c) {
            *out = 0.5 * (a + sign * b + c);
        }
    }
    let row = |tap: usize| &g[tap * ci..][..ci];
    // G g (4 × 3 rows), G = [[1,0,0],[½,½,½],[½,−½,½],[0,0,1]]: rows 0 and 3 are g's first and
    // last tap rows; rows 1 and 2 are computed into `t`.
    for c in 0..3 {
        let (sum, difference) = t.split_at_mut(3 * ci);
        half_sum(
            &mut sum[c * ci..][..ci],
            row(c),
            row(3 + c),
            row(6 + c),
            false,
        );
        half_sum(
            &mut difference[c * ci..][..ci],
            row(c),
            row(3 + c),
            row(6 + c),
            true,
        );
    }
    let t = &*t;
    for r in 0..4 {
        let at = |c: usize| match r {
            0 => row(c),
            1 => &t[c * ci..][..ci],
            2 => &t[(3 + c) * ci..][..ci],
            _ => row(6 + c),
        };
        let (a, b, c) = (at(0), at(1), at(2));
        // (G g) Gᵀ: the same combination across the three columns.
        let out = &mut u[4 * r * ci..][..4 * ci];
        let (first, rest) = out.split_at_mut(ci);
        let (sum, rest) = rest.split_at_mut(ci);
        let (difference, last) = rest.split_at_mut(ci);
        first.copy_from_slice(a);
        half_sum(sum, a, b, c, false);
        half_sum(difference, a, b, c, true);
        last.copy_from_slice(c);
    }
}

avx2_dispatch!(fn transform_channel(g: &[f32], u: &mut [f32], t: &mut [f32], ci: usize) = transform_channel_impl);

/// Whether a layer with `ci` input channels takes Winograd's path: with fewer, the 16 products
/// are too thin to beat the direct convolution (`candela bench --kernels`). Image size does not
/// enter: it wins from 8×8 up on SD's layers.
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
        let sizes = [b, ci, co, h, w];
        if b * h.div_ceil(2) * w.div_ceil(2) > CHANNEL_SCHEDULE_TILES {
            let (padded, g) = pad_input(x, sizes, 4, f43::TILES);
            weight.with_transformed(|u| by_tiles(&padded, u, &bias, &mut out, g));
        } else {
            let (padded, g) = pad_input(x, sizes, 2, TILES);
            let slice = (CHANNEL_SLICE_FLOATS / (16 * ci)).clamp(8, co.max(8));
            by_channels(&padded, &weight.taps, &bias, &mut out, g, slice)
        }
        out
    })?;
    Tensor::from_vec(out, (b, co, h, w), &Device::Cpu)
}

/// The sizes one convolution call works with.
#[derive(Clone, Copy)]
struct Geometry {
    /// Values per transformed tile.
    points: usize,
    ci: usize,
    co: usize,
    h: usize,
    w: usize,
    /// Tiles per row, per image.
    tw: usize,
    tiles_per_image: usize,
    /// Tiles of the whole batch.
    total: usize,
    /// Row length and plane size of the padded, column-split input.
    pw: usize,
    plane: usize,
    /// Tiles per task (the column stride of V and M).
    per_task: usize,
}

/// At most this many 2×2 tiles (batch × tiles per image), a call runs output channels in parallel
/// rather than tiles: each task transforms a slice of the weight that stays in cache and runs
/// every tile through it, so the transformed weight never goes through memory — at few tiles
/// (the UNet's 1 280-wide layers at 8² and 16²) that round trip would cost as much as the
/// products. With more tiles the transform is small beside them.
const CHANNEL_SCHEDULE_TILES: usize = 256;

/// Floats of a task's slice of the transformed weight in the channel schedule (16 × channels ×
/// Ci, at least 8 channels): 1 MiB, a core's L2 here. Measured on 2 cores, 1 280 channels at 8²
/// and 16²: 4 MiB slices 22.7 / 51.9 ms, 1 MiB 12.3–13.6 / 41.5–42.2, ½ MiB (8 channels)
/// 15.4 / 41.2; the weight transformed at load 10.1–12.3 / 39.5–41.5.
const CHANNEL_SLICE_FLOATS: usize = 1 << 18;

/// The zero-padded input and the sizes of the call, for `[b, ci, co, h, w]`, output tiles of
/// `tile` × `tile` (2 or 4) and at most `max_per_task` tiles to a parallel task. One row and
/// column of zeros before the image, enough after for the last, possibly partial, tile; each
/// padded row split into its `tile` column phases (phase r holds padded columns r, r + tile, …,
/// each tw + 1 long), so that the transforms read every tile's tile + 2 columns as contiguous runs.
fn pad_input(
    x: &[f32],
    [b, ci, co, h, w]: [usize; 5],
    tile: usize,
    max_per_task: usize,
) -> (Vec<f32>, Geometry) {
    debug_assert_eq!(x.len(), b * ci * h * w);
    let (th, tw) = (h.div_ceil(tile), w.div_ceil(tile));
    let phase_len = tw + 1;
    let (ph, pw) = (tile * th + 2, tile * phase_len);
    let plane = ph * pw;
    let mut padded = vec![0f32; b * ci * plane];
    padded
        .par_chunks_mut(plane)
        .zip(x.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for y in 0..h {
                let row = &src[y * w..][..w];
                let dst = &mut dst[(y + 1) * pw..][..pw];
                // Padded column q = x + 1 sits in phase q % tile at q / tile: phase r takes the
                // image's columns tile·j + r − 1 (phase 0 from j = 1).
                for (phase, dst) in dst.chunks_exact_mut(phase_len).enumerate() {
                    let (first, skip) = if phase == 0 {
                        (1, tile - 1)
                    } else {
                        (0, phase - 1)
                    };
                    for (d, value) in dst[first..]
                        .iter_mut()
                        .zip(row.iter().skip(skip).step_by(tile))
                    {
                        *d = *value;
                    }
                }
            }
        });
    let tiles_per_image = th * tw;
    let total = b * tiles_per_image;
    // Small images still spread over every thread.
    let per_task = total
        .div_ceil(rayon::current_num_threads())
        .clamp(1, max_per_task);
    let g = Geometry {
        points: (tile + 2) * (tile + 2),
        ci,
        co,
        h,
        w,
        tw,
        tiles_per_image,
        total,
        pw,
        plane,
        per_task,
    };
    (padded, g)
}

/// M[k] (rows × n) = U[k] (rows × Ci) · V[k] (Ci × n), for the `points` k, with U laid out
/// (rows, points, Ci); V and M have rows `per_task` apart, of which the first n columns are used.
///
/// SAFETY: `u` must hold (rows, points, Ci); `v` and `m` must hold points · Ci and points · rows
/// rows of `per_task`.
unsafe fn mix_channels(u: &[f32], v: &[f32], m: &mut [f32], rows: usize, n: usize, g: Geometry) {
    for k in 0..g.points {
        // SAFETY: as the function's contract.
        unsafe {
            gemm_f32(
                [rows, n, g.ci],
                m[k * rows * g.per_task..].as_mut_ptr(),
                g.per_task as isize,
                false,
                Strided {
                    ptr: u[k * g.ci..].as_ptr(),
                    row: (g.points * g.ci) as isize,
                    col: 1,
                },
                Strided {
                    ptr: v[k * g.ci * g.per_task..].as_ptr(),
                    row: g.per_task as isize,
                    col: 1,
                },
                1.0,
            );
        }
    }
}

/// `out` (B, Co, H, W) = the padded input (laid out by [`pad_input`] for 4×4 tiles) ⊛ weight + `bias`
/// with the weight's F(4×4) matrices `u` (Co, 36, Ci): chunks of tiles in parallel, each through
/// the whole weight.
fn by_tiles(padded: &[f32], u: &[f32], bias: &[f32], out: &mut [f32], g: Geometry) {
    let (co, ci, per_task, total, points) = (g.co, g.ci, g.per_task, g.total, g.points);
    debug_assert_eq!(u.len(), points * co * ci);
    debug_assert_eq!(out.len(), total / g.tiles_per_image * co * g.h * g.w);
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..total.div_ceil(per_task)).into_par_iter().for_each_init(
        || {
            (
                vec![0f32; points * ci * per_task],
                vec![0f32; points * co * per_task],
            )
        },
        |(v, m), chunk| {
            let first = chunk * per_task;
            let n = per_task.min(total - first);
            f43::transform_input(padded, v, first, n, g);
            // SAFETY: U is (Co, points, Ci); V and M are this task's, sized for per_task columns.
            unsafe { mix_channels(u, v, m, co, n, g) };
            // SAFETY: the chunk's tiles are this task's alone.
            unsafe { f43::transform_output(m, bias, out_ptr, [0, co], first, n, g) };
        },
    );
}

/// `out` = the padded input ⊛ weight + `bias` with the weight held tap-major (Co, 9, Ci): every
/// tile transformed first, then slices of `slice` output channels in parallel, each task
/// transforming its slice of the weight and running all the tiles through it.
fn by_channels(
    padded: &[f32],
    taps: &Taps,
    bias: &[f32],
    out: &mut [f32],
    g: Geometry,
    slice: usize,
) {
    let (co, ci, per_task, total) = (g.co, g.ci, g.per_task, g.total);
    debug_assert_eq!(taps.len(), 9 * co * ci);
    debug_assert_eq!(out.len(), total / g.tiles_per_image * co * g.h * g.w);
    let chunks = total.div_ceil(per_task);
    let mut v = vec![0f32; chunks * 16 * ci * per_task];
    v.par_chunks_mut(16 * ci * per_task)
        .enumerate()
        .for_each(|(chunk, v)| {
            let first = chunk * per_task;
            transform_input(padded, v, first, per_task.min(total - first), g);
        });
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..co.div_ceil(slice)).into_par_iter().for_each_init(
        || {
            (
                vec![0f32; 16 * slice * ci],
                vec![0f32; 16 * slice * per_task],
                vec![0f32; 6 * ci],
                Vec::new(),
            )
        },
        |(u, m, t, widened), s| {
            let o0 = s * slice;
            let rows = slice.min(co - o0);
            for (o, u) in u.chunks_exact_mut(16 * ci).take(rows).enumerate() {
                transform_channel(taps.channel(o0 + o, 9 * ci, widened), u, t, ci);
            }
            for (chunk, v) in v.chunks_exact(16 * ci * per_task).enumerate() {
                let first = chunk * per_task;
                let n = per_task.min(total - first);
                // SAFETY: U is this slice's (rows, 16, Ci); V is the chunk's and M this task's,
                // sized for per_task columns.
                unsafe { mix_channels(u, v, m, rows, n, g) };
                // SAFETY: these output channels are this task's alone.
                unsafe { transform_output(m, bias, out_ptr, [o0, rows], first, n, g) };
            }
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
    for run in tile_runs(first, n, g) {
        let Run {
            b: bi,
            ty,
            tx0,
            len,
            p,
        } = run;
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

/// The output tiles Aᵀ M A + bias, Aᵀ = [[1,1,1,0],[0,1,−1,−1]], of the output channels
/// `o0..o0 + rows` (M's rows), written into `out`.
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
        let (y0, x0) = (2 * ty, 2 * tx0);
        // Columns of the run inside the image (the last tile of an odd width is half outside).
        let cols = (2 * len).min(g.w - x0);
        let rows = if y0 + 1 < g.h { 2 } else { 1 };
        let mut top = [0f32; 2 * TILES];
        let mut bottom = [0f32; 2 * TILES];
        for row in 0..channels {
            let o = o0 + row;
            let at = |k: usize| &m[(k * channels + row) * g.per_task + p..][..len];
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
    unsafe fn transform_output(m: &[f32], bias: &[f32], out: SharedOut, channels: [usize; 2], first: usize, n: usize, g: Geometry) = transform_output_impl
);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// F(4×4, 3×3)'s rounding bound in the tests, relative to the output's largest magnitude:
    /// measured 0.3–1.1e-5 on random data from 1 to 320 input channels (F(2×2) and the direct
    /// convolution: ~5e-7). A wrong coefficient or tile offset is off by O(1).
    const F43_TOLERANCE: f32 = 2e-5;

    fn direct(x: &Tensor, k: &Tensor, bias: &Tensor) -> Tensor {
        let co = k.dim(0).unwrap();
        x.conv2d(k, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
            .unwrap()
    }

    #[test]
    fn matches_direct_convolution() {
        let dev = Device::Cpu;
        // Odd sizes (partial tiles at the edges), single pixels, more tiles than one chunk; the
        // channel schedule, F(2×2) (up to CHANNEL_SCHEDULE_TILES 2×2 tiles, channels in slices
        // of at least 8 with a short last one), and the tile schedule, F(4×4) (the last five:
        // every remainder of the size by 4, a wider layer).
        for (case, (b, ci, co, h, w)) in [
            (2usize, 5usize, 7usize, 9usize, 6usize),
            (1, 16, 33, 4, 11),
            (3, 4, 8, 1, 1),
            (2, 8, 3, 17, 23),
            (1, 6, 5, 37, 30),
            (2, 9, 12, 33, 17),
            (1, 10, 7, 70, 61),
            (2, 12, 9, 45, 50),
            (2, 128, 16, 34, 35),
        ]
        .into_iter()
        .enumerate()
        {
            let tiled = b * h.div_ceil(2) * w.div_ceil(2) > CHANNEL_SCHEDULE_TILES;
            assert_eq!(tiled, case >= 4);
            let x = Tensor::randn(0f32, 1., (b, ci, h, w), &dev).unwrap();
            let k = Tensor::randn(0f32, 0.2, (co, ci, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., co, &dev).unwrap();
            // Another weight of this shape first: its transform must not leak into this one's
            // (the tile schedule's buffer is reused).
            let other = Tensor::randn(0f32, 0.2, (co, ci, 3, 3), &dev).unwrap();
            conv3x3(&x, &WinogradWeight::from_tensor(&other).unwrap(), None).unwrap();
            let ours = conv3x3(&x, &WinogradWeight::from_tensor(&k).unwrap(), Some(&bias)).unwrap();
            let expected = direct(&x, &k, &bias);
            let diff = super::super::max_abs_diff(&ours, &expected);
            let limit = if tiled {
                F43_TOLERANCE * super::super::max_abs(&expected)
            } else {
                1e-5
            };
            assert!(diff < limit, "{b}x{ci}->{co} {h}x{w}: {diff}");
        }
    }

    /// The tile schedule's buffer is the widest transform run, freed on request, and grown
    /// again (with the same results) by the next call.
    #[test]
    fn released_buffer_grows_again() {
        let (b, ci, co, h, w) = (1, 6, 5, 37, 30);
        let x = Tensor::randn(0f32, 1., (b, ci, h, w), &Device::Cpu).unwrap();
        let k = Tensor::randn(0f32, 0.2, (co, ci, 3, 3), &Device::Cpu).unwrap();
        let weight = WinogradWeight::from_tensor(&k).unwrap();
        let first = conv3x3(&x, &weight, None).unwrap();
        assert!(thread_buffer_bytes() >= WinogradWeight::transformed_bytes(co, ci));
        release_thread_buffer();
        assert_eq!(thread_buffer_bytes(), 0);
        let again = conv3x3(&x, &weight, None).unwrap();
        assert!(thread_buffer_bytes() >= WinogradWeight::transformed_bytes(co, ci));
        assert_eq!(super::super::max_abs_diff(&first, &again), 0.0);
    }

    /// Both schedules on one input: channel slices of 8 with a short last one (33 channels), and
    /// the tile schedule, which `conv3x3` would not pick for so few tiles.
    #[test]
    fn schedules_agree() {
        let (b, ci, co, h, w) = (2, 16, 33, 7, 10);
        let x = Tensor::randn(0f32, 1., (b, ci, h, w), &Device::Cpu).unwrap();
        let k = Tensor::randn(0f32, 0.2, (co, ci, 3, 3), &Device::Cpu).unwrap();
        let bias: Vec<f32> = (0..co).map(|o| o as f32 / 10.).collect();
        let expected = direct(&x, &k, &Tensor::new(bias.as_slice(), &Device::Cpu).unwrap());
        let weight = WinogradWeight::from_tensor(&k).unwrap();
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let run = |schedule: &dyn Fn(&mut [f32])| {
            let mut out = vec![0f32; b * co * h * w];
            schedule(&mut out);
            Tensor::from_vec(out, (b, co, h, w), &Device::Cpu).unwrap()
        };
        let sliced = run(&|out| {
            let (padded, g) = pad_input(&x, [b, ci, co, h, w], 2, TILES);
            by_channels(&padded, &weight.taps, &bias, out, g, 8)
        });
        let tiled = run(&|out| {
            let (padded, g) = pad_input(&x, [b, ci, co, h, w], 4, f43::TILES);
            weight.with_transformed(|u| by_tiles(&padded, u, &bias, out, g))
        });
        let tiled_limit = F43_TOLERANCE * super::super::max_abs(&expected);
        for (name, ours, limit) in [
            ("channel slices", sliced, 1e-5),
            ("tiles", tiled, tiled_limit),
        ] {
            let diff = super::super::max_abs_diff(&ours, &expected);
            assert!(diff < limit, "{name}: {diff}");
        }
    }
}
