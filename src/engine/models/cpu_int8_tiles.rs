//! q8_0 and q4k Linear layers on x86 CPUs with AVX-512 VNNI: the weight's codes held once, in
//! tiles of 16 output columns laid out for `vpdpbusd`, multiplied in int8 against the activations
//! quantized per 32 inputs (as ggml's and candle's quantized products quantize them).
//!
//! candle 0.11 keeps its own int8 tiles of such a layer beside the blocks (twice the memory,
//! `dit::cpu_repacks`); at FLUX's shapes they ran 0.49–0.85× the f32 layer's time. These hold the
//! same codes and scales as the blocks, once — q8_0 at 8.5 bits a weight, q4k at 4.75 (its
//! super-blocks' d and dmin widened to f32) — and ran 0.37–0.53× (q8_0) and 0.40–0.56× (q4k)
//! (`bench --kernels`). Each 32-input block's integer dot product is exact; its scales and the sum
//! over blocks are f32. Against the blocks dequantized into f32 products (`QuantizedCpuLinear`,
//! `--quantize q8_0-compact`) the difference is the activations' rounding to 8 bits.

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use half::f16;
use rayon::prelude::*;

use super::cpu_half_linear::forward_f32;
use super::cpu_util::{self, SharedOut};

/// Inputs per q8_0 block.
const QK: usize = 32;
/// Output columns per tile: one 512-bit register of i32 lanes.
const GROUP: usize = 16;
/// A tile of one block: 32 codes of 16 columns (+128, as u8: `vpdpbusd` multiplies unsigned by
/// signed bytes), four inputs of a column per 32-bit lane, then the 16 columns' f16 scales.
const TILE: usize = QK * GROUP + GROUP * 2;
/// Output columns per task.
const PANEL: usize = 128;
/// Blocks per pass over a panel: 512 inputs, whose tiles (q8_0 68 KiB, q4k 36) stay in L2 while
/// every row passes.
const PART: usize = 16;
/// Activation rows per kernel call (4 rows × 2 tiles of accumulators fill 16 registers).
const ROWS: usize = 4;

/// Whether this CPU runs the tiles' kernels (AVX-512 F, BW and VNNI: Zen 4, Ice Lake and later
/// server cores).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A Linear layer held as q8_0 tiles; its bias in f32.
#[derive(Debug, Clone)]
pub struct Q8TileLinear {
    tiles: Vec<u8>,
    bias: Option<Vec<f32>>,
    inputs: usize,
    outputs: usize,
}

impl Q8TileLinear {
    /// Whether a layer of these widths fits the tiles: whole blocks of inputs, whole pairs of
    /// tiles of outputs.
    pub fn fits(inputs: usize, outputs: usize) -> bool {
        inputs > 0 && inputs.is_multiple_of(QK) && outputs > 0 && outputs.is_multiple_of(2 * GROUP)
    }

    /// `weight` (out, in) quantized to q8_0 (candle's codes and scales, block for block), with a
    /// bias of `out` values.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Self> {
        let (outputs, inputs) = weight.dims2()?;
        if !weight.device().is_cpu() || !available() || !Self::fits(inputs, outputs) {
            candle_core::bail!("q8_0 tiles for a {outputs}×{inputs} weight on this CPU");
        }
        let blocks = super::cpu_quantized_linear::quantize(weight, GgmlDType::Q8_0)?;
        let tiles = tiles_of(&blocks.data()?, inputs, outputs)?;
        let bias = cpu_util::optional_bias(bias, outputs)?;
        Ok(Self {
            tiles,
            bias,
            inputs,
            outputs,
        })
    }

    /// Bytes the tiles and bias are held in.
    pub fn bytes(&self) -> usize {
        self.tiles.len() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    /// `xs` (…, in), f32 on the CPU, times the weight: (…, out) in f32.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        forward_f32("a q8_0-tile", xs, self.inputs, self.outputs, |lhs, rows| {
            self.product(lhs, rows)
        })
    }

    fn product(&self, lhs: &[f32], rows: usize) -> Vec<f32> {
        tiled_product(lhs, rows, [self.inputs, self.outputs], |x, at, dst| {
            // SAFETY: `new` checked the CPU's features; `tiled_product` keeps `at` inside the
            // tiles, `x` and `dst`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                q8_kernel(
                    &self.tiles,
                    x,
                    at,
                    self.bias.as_deref(),
                    dst,
                    [self.inputs, self.outputs],
                )
            }
        })
    }
}

/// Inputs per q4k super-block (its d and dmin); 8 blocks of [`QK`] each with a 6-bit scale and
/// minimum.
const QK_K: usize = 256;
/// A q4k tile of one block: 32 codes of 16 columns as nibbles (byte t of lane j in the h-th 64
/// bytes: code 4h + t low, code 4(h + 4) + t high), then the columns' 6-bit scales and minimums.
const Q4K_TILE: usize = QK * GROUP / 2 + 2 * GROUP;

/// A Linear layer held as q4k tiles: the q4k codes, block scales and minimums as stored, the
/// super-blocks' d and dmin widened to f32 (4.75 bits a weight, against q4k's 4.5 and candle's
/// tiles beside its blocks, 9); its bias in f32.
#[derive(Debug, Clone)]
pub struct Q4kTileLinear {
    tiles: Vec<u8>,
    /// Per tile group and super-block: 16 columns' d, then their dmin.
    supers: Vec<f32>,
    bias: Option<Vec<f32>>,
    inputs: usize,
    outputs: usize,
}

impl Q4kTileLinear {
    /// Bits each weight is held in.
    pub const BITS_PER_WEIGHT: f64 =
        (Q4K_TILE * 8 + 2 * GROUP * 4) as f64 * 8.0 / (QK_K * GROUP) as f64;

    /// Whether a layer of these widths fits the tiles: whole super-blocks of inputs, whole pairs
    /// of tiles of outputs.
    pub fn fits(inputs: usize, outputs: usize) -> bool {
        inputs > 0
            && inputs.is_multiple_of(QK_K)
            && outputs > 0
            && outputs.is_multiple_of(2 * GROUP)
    }

    /// `weight` (out, in) quantized to q4k (candle's codes, block for block), with a bias.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Self> {
        let (outputs, inputs) = weight.dims2()?;
        if !weight.device().is_cpu() || !available() || !Self::fits(inputs, outputs) {
            candle_core::bail!("q4k tiles for a {outputs}×{inputs} weight on this CPU");
        }
        let blocks = super::cpu_quantized_linear::quantize(weight, GgmlDType::Q4K)?;
        let (tiles, supers) = q4k_tiles_of(&blocks.data()?, inputs, outputs)?;
        let bias = cpu_util::optional_bias(bias, outputs)?;
        Ok(Self {
            tiles,
            supers,
            bias,
            inputs,
            outputs,
        })
    }

    /// Bytes the tiles, super-block scales and bias are held in.
    pub fn bytes(&self) -> usize {
        self.tiles.len() + 4 * self.supers.len() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    /// `xs` (…, in), f32 on the CPU, times the weight: (…, out) in f32.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (k, n) = (self.inputs, self.outputs);
        forward_f32("a q4k-tile", xs, k, n, |lhs, rows| {
            tiled_product(lhs, rows, [k, n], |x, at, dst| {
                // SAFETY: as for q8_0's.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    q4k_kernel(self, x, at, dst)
                }
            })
        })
    }
}

/// ggml's 6-bit scale and minimum of block `j` of a q4k super-block.
fn q4k_scale_min(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// The tiles and super-block scales of q4k `blocks` (candle's layout: per output row, 144-byte
/// super-blocks of f16 d and dmin, 12 bytes of packed 6-bit scales and minimums, then 128 bytes
/// of codes: byte l of the c-th 32 holds input 64c + l low, 64c + 32 + l high).
fn q4k_tiles_of(
    blocks: &[u8],
    inputs: usize,
    outputs: usize,
) -> candle_core::Result<(Vec<u8>, Vec<f32>)> {
    const SUPER: usize = 4 + 12 + QK_K / 2;
    let per_row = inputs / QK_K;
    if GgmlDType::Q4K.type_size() != SUPER || blocks.len() != outputs * per_row * SUPER {
        candle_core::bail!("q4k blocks of an unexpected size");
    }
    let groups = outputs / GROUP;
    let mut tiles = vec![0u8; groups * per_row * (QK_K / QK) * Q4K_TILE];
    let mut supers = vec![0f32; groups * per_row * 2 * GROUP];
    tiles
        .par_chunks_mut(per_row * (QK_K / QK) * Q4K_TILE)
        .zip(supers.par_chunks_mut(per_row * 2 * GROUP))
        .enumerate()
        .for_each(|(g, (tiles, supers))| {
            for j in 0..GROUP {
                for sb in 0..per_row {
                    let at = ((g * GROUP + j) * per_row + sb) * SUPER;
                    let block = &blocks[at..at + SUPER];
                    let half = |i: usize| f16::from_le_bytes([block[i], block[i + 1]]).to_f32();
                    supers[sb * 2 * GROUP + j] = half(0);
                    supers[sb * 2 * GROUP + GROUP + j] = half(2);
                    let (scales, codes) = (&block[4..16], &block[16..]);
                    for sub in 0..QK_K / QK {
                        let tile = &mut tiles[(sb * (QK_K / QK) + sub) * Q4K_TILE..][..Q4K_TILE];
                        let (scale, min) = q4k_scale_min(sub, scales);
                        tile[QK * GROUP / 2 + j] = scale;
                        tile[QK * GROUP / 2 + GROUP + j] = min;
                        for i in 0..QK {
                            let byte = codes[(sub / 2) * QK + i];
                            let code = if sub % 2 == 0 { byte & 0xF } else { byte >> 4 };
                            let (quad, t) = (i / 4, i % 4);
                            let at = (quad % 4) * 4 * GROUP + j * 4 + t;
                            tile[at] |= if quad < 4 { code } else { code << 4 };
                        }
                    }
                }
            }
        });
    Ok((tiles, supers))
}

/// The accumulators of rows r0..r0 + 4 of tiles g and g + 1: the bias (or zero) at the first
/// block, else what `out` holds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn accumulators(
    bias: Option<&[f32]>,
    out: SharedOut,
    [g, r0, b0]: [usize; 3],
    n: usize,
) -> [[std::arch::x86_64::__m512; 2]; ROWS] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
    for (r, acc) in acc.iter_mut().enumerate() {
        for (c, acc) in acc.iter_mut().enumerate() {
            *acc = match (b0, bias) {
                (0, Some(bias)) => _mm512_loadu_ps(bias.as_ptr().add((g + c) * GROUP)),
                (0, None) => _mm512_setzero_ps(),
                _ => _mm512_loadu_ps(out.at((r0 + r) * n + (g + c) * GROUP)),
            };
        }
    }
    acc
}

/// [`accumulators`]' rows and tiles written back to `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store(
    acc: &[[std::arch::x86_64::__m512; 2]; ROWS],
    out: SharedOut,
    [g, r0]: [usize; 2],
    n: usize,
) {
    use std::arch::x86_64::*;
    for (r, acc) in acc.iter().enumerate() {
        for (c, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.at((r0 + r) * n + (g + c) * GROUP), *acc);
        }
    }
}

/// As [`q8_kernel`] for q4k: a weight is d·scale·code − dmin·min (codes 0..15, unsigned as
/// `vpdpbusd` takes them), so a block adds d_x·(d·scale·Σ code·c − dmin·min·Σ c) for the
/// activation codes c of scale d_x.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q4k_kernel(
    layer: &Q4kTileLinear,
    x: &QuantizedRows,
    [g, r0, b0, b1]: [usize; 4],
    out: SharedOut,
) {
    use std::arch::x86_64::*;
    let (k, n) = (layer.inputs, layer.outputs);
    let blocks = k / QK;
    let per_super = QK_K / QK;
    let tile = |g: usize, b: usize| layer.tiles.as_ptr().add((g * blocks + b) * Q4K_TILE);
    let supers = |g: usize, b: usize| {
        layer
            .supers
            .as_ptr()
            .add((g * (k / QK_K) + b / per_super) * 2 * GROUP)
    };
    let mut acc = accumulators(layer.bias.as_deref(), out, [g, r0, b0], n);
    let low = _mm512_set1_epi8(0x0F);
    for b in b0..b1 {
        let w = [tile(g, b), tile(g + 1, b)];
        let mut dots = [[_mm512_setzero_si512(); 2]; ROWS];
        for h in 0..4 {
            let mut lo = [_mm512_setzero_si512(); 2];
            let mut hi = [_mm512_setzero_si512(); 2];
            for c in 0..2 {
                let raw = _mm512_loadu_si512(w[c].add(h * 4 * GROUP).cast());
                lo[c] = _mm512_and_si512(raw, low);
                hi[c] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
            }
            for (r, dots) in dots.iter_mut().enumerate() {
                let codes = x.codes.as_ptr().add((r0 + r) * k + b * QK);
                let first = _mm512_set1_epi32(codes.add(h * 4).cast::<i32>().read_unaligned());
                let second =
                    _mm512_set1_epi32(codes.add((h + 4) * 4).cast::<i32>().read_unaligned());
                for c in 0..2 {
                    dots[c] = _mm512_dpbusd_epi32(dots[c], lo[c], first);
                    dots[c] = _mm512_dpbusd_epi32(dots[c], hi[c], second);
                }
            }
        }
        let mut scale = [_mm512_setzero_ps(); 2];
        let mut min = [_mm512_setzero_ps(); 2];
        for c in 0..2 {
            let ds = supers(g + c, b);
            let bytes = w[c].add(QK * GROUP / 2);
            let widen =
                |p: *const u8| _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast())));
            scale[c] = _mm512_mul_ps(widen(bytes), _mm512_loadu_ps(ds));
            min[c] = _mm512_mul_ps(widen(bytes.add(GROUP)), _mm512_loadu_ps(ds.add(GROUP)));
        }
        for (r, (acc, dots)) in acc.iter_mut().zip(&dots).enumerate() {
            let row = (r0 + r) * blocks + b;
            let dx = *x.scales.get_unchecked(row);
            let sum = _mm512_set1_ps(dx * *x.sums.get_unchecked(row) as f32);
            let dx = _mm512_set1_ps(dx);
            for c in 0..2 {
                let dot = _mm512_cvtepi32_ps(dots[c]);
                acc[c] = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale[c], dx), acc[c]);
                acc[c] = _mm512_fnmadd_ps(min[c], sum, acc[c]);
            }
        }
    }
    store(&acc, out, [g, r0], n);
}

/// `lhs` (rows × k) quantized per 32 inputs, times a weight held in tiles of 16 output columns
/// (n of them, whole pairs of tiles): by panels of [`PANEL`] columns over every core, each
/// passing [`PART`] blocks of inputs at a time over every [`ROWS`] rows, `kernel(x, [g, r0, b0,
/// b1], out)` accumulating tiles g and g + 1 over blocks b0..b1 for rows r0.. (onto the bias when
/// b0 = 0). Tasks write disjoint column panels.
fn tiled_product(
    lhs: &[f32],
    rows: usize,
    [k, n]: [usize; 2],
    kernel: impl Fn(&QuantizedRows, [usize; 4], SharedOut) + Sync,
) -> Vec<f32> {
    let padded = rows.next_multiple_of(ROWS);
    let x = QuantizedRows::new(lhs, rows, padded, k);
    let mut out = vec![0f32; padded * n];
    let dst = SharedOut(out.as_mut_ptr());
    let blocks = k / QK;
    (0..n.div_ceil(PANEL)).into_par_iter().for_each(|panel| {
        let groups = panel * PANEL / GROUP..((panel + 1) * PANEL).min(n) / GROUP;
        for b0 in (0..blocks).step_by(PART) {
            let b1 = (b0 + PART).min(blocks);
            for r0 in (0..padded).step_by(ROWS) {
                for g in groups.clone().step_by(2) {
                    kernel(&x, [g, r0, b0, b1], dst);
                }
            }
        }
    });
    out.truncate(rows * n);
    out
}

/// The tiles of q8_0 `blocks` (candle's layout: per output row, 34-byte blocks of an f16 scale
/// then 32 signed codes) of a weight (`outputs`, `inputs`).
fn tiles_of(blocks: &[u8], inputs: usize, outputs: usize) -> candle_core::Result<Vec<u8>> {
    const BLOCK: usize = 2 + QK;
    let per_row = inputs / QK;
    if GgmlDType::Q8_0.type_size() != BLOCK || blocks.len() != outputs * per_row * BLOCK {
        candle_core::bail!("q8_0 blocks of an unexpected size");
    }
    let mut tiles = vec![0u8; outputs / GROUP * per_row * TILE];
    tiles
        .par_chunks_mut(per_row * TILE)
        .enumerate()
        .for_each(|(g, group)| {
            for (b, tile) in group.chunks_exact_mut(TILE).enumerate() {
                for j in 0..GROUP {
                    let at = ((g * GROUP + j) * per_row + b) * BLOCK;
                    let block = &blocks[at..at + BLOCK];
                    for (t, &code) in block[2..].iter().enumerate() {
                        tile[(t / 4) * 4 * GROUP + j * 4 + t % 4] = (code as i8 as i16 + 128) as u8;
                    }
                    tile[QK * GROUP + 2 * j..][..2].copy_from_slice(&block[..2]);
                }
            }
        });
    Ok(tiles)
}

/// Activation rows quantized per 32 inputs: d = max|x| / 127, codes round(x / d); with each
/// block's scale and the sum of its codes (q8_0: 128 × it is what the +128 on the weight codes
/// adds to a dot product; q4k: what a block's minimum multiplies). Rows past `rows` up to
/// `padded` are zeros.
struct QuantizedRows {
    codes: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
}

impl QuantizedRows {
    fn new(x: &[f32], rows: usize, padded: usize, k: usize) -> Self {
        let blocks = k / QK;
        let mut codes = vec![0i8; padded * k];
        let mut scales = vec![0f32; padded * blocks];
        let mut sums = vec![0i32; padded * blocks];
        codes
            .par_chunks_mut(k)
            .zip(scales.par_chunks_mut(blocks))
            .zip(sums.par_chunks_mut(blocks))
            .zip(x.par_chunks(k).take(rows))
            .for_each(|(((codes, scales), sums), x)| {
                for (b, values) in x.chunks_exact(QK).enumerate() {
                    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = max / 127.0;
                    let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
                    let mut sum = 0i32;
                    for (c, &v) in codes[b * QK..][..QK].iter_mut().zip(values) {
                        let q = (v * inverse).round() as i32;
                        *c = q as i8;
                        sum += q;
                    }
                    scales[b] = d;
                    sums[b] = sum;
                }
            });
        Self {
            codes,
            scales,
            sums,
        }
    }
}

/// Output rows r0..r0 + 4 of tiles g and g + 1 (32 columns), accumulated over blocks b0..b1 onto
/// what `out` holds (or onto the bias, or zero, when b0 = 0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q8_kernel(
    tiles: &[u8],
    x: &QuantizedRows,
    [g, r0, b0, b1]: [usize; 4],
    bias: Option<&[f32]>,
    out: SharedOut,
    [k, n]: [usize; 2],
) {
    use std::arch::x86_64::*;
    let blocks = k / QK;
    let tile = |g: usize, b: usize| tiles.as_ptr().add((g * blocks + b) * TILE);
    let mut acc = accumulators(bias, out, [g, r0, b0], n);
    for b in b0..b1 {
        let (w0, w1) = (tile(g, b), tile(g + 1, b));
        let mut dots = [[_mm512_setzero_si512(); 2]; ROWS];
        for quad in 0..QK / 4 {
            let c0 = _mm512_loadu_si512(w0.add(quad * 4 * GROUP).cast());
            let c1 = _mm512_loadu_si512(w1.add(quad * 4 * GROUP).cast());
            for (r, dots) in dots.iter_mut().enumerate() {
                let four = x
                    .codes
                    .as_ptr()
                    .add((r0 + r) * k + b * QK + quad * 4)
                    .cast::<i32>()
                    .read_unaligned();
                let four = _mm512_set1_epi32(four);
                dots[0] = _mm512_dpbusd_epi32(dots[0], c0, four);
                dots[1] = _mm512_dpbusd_epi32(dots[1], c1, four);
            }
        }
        let d0 = _mm512_cvtph_ps(_mm256_loadu_si256(w0.add(QK * GROUP).cast()));
        let d1 = _mm512_cvtph_ps(_mm256_loadu_si256(w1.add(QK * GROUP).cast()));
        for (r, (acc, dots)) in acc.iter_mut().zip(&dots).enumerate() {
            let row = (r0 + r) * blocks + b;
            let scale = _mm512_set1_ps(*x.scales.get_unchecked(row));
            let offset = _mm512_set1_epi32(128 * *x.sums.get_unchecked(row));
            for (c, d) in [d0, d1].into_iter().enumerate() {
                let dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(dots[c], offset));
                acc[c] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, scale), acc[c]);
            }
        }
    }
    store(&acc, out, [g, r0], n);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::Device;

    /// q8_0's tiles against [`check_against_codes`]. Shapes: one row, a partial pass over the
    /// inputs and a partial panel with a bias, rows not a multiple of four.
    #[test]
    fn q8_0_tiles_multiply_the_codes_exactly_per_block() -> candle_core::Result<()> {
        for (rows, inputs, outputs, with_bias) in [
            (1, 32, 32, false),
            (5, QK * (PART + 1), PANEL + 32, true),
            (77, 64, 64, false),
        ] {
            let (weight, bias, xs) = case(rows, inputs, outputs, with_bias)?;
            if !available() {
                assert!(Q8TileLinear::new(&weight, bias.as_ref()).is_err());
                continue;
            }
            let layer = Q8TileLinear::new(&weight, bias.as_ref())?;
            let expected = inputs * outputs * 17 / 16 + 4 * outputs * usize::from(with_bias);
            assert_eq!(layer.bytes(), expected);
            check_against_codes(
                &layer.forward(&xs)?,
                GgmlDType::Q8_0,
                &weight,
                bias.as_ref(),
                &xs,
            )?;
        }
        Ok(())
    }

    /// q4k's tiles against [`check_against_codes`]: one super-block and one row; three
    /// super-blocks (past one pass) over a partial panel with a bias; 77 rows.
    #[test]
    fn q4k_tiles_multiply_the_codes_exactly_per_block() -> candle_core::Result<()> {
        for (rows, inputs, outputs, with_bias) in [
            (1, QK_K, 32, false),
            (5, 3 * QK_K, PANEL + 32, true),
            (77, QK_K, 64, false),
        ] {
            let (weight, bias, xs) = case(rows, inputs, outputs, with_bias)?;
            if !available() {
                assert!(Q4kTileLinear::new(&weight, bias.as_ref()).is_err());
                continue;
            }
            let layer = Q4kTileLinear::new(&weight, bias.as_ref())?;
            let held = (inputs * outputs) as f64 * Q4kTileLinear::BITS_PER_WEIGHT / 8.0;
            assert_eq!(
                layer.bytes(),
                held as usize + 4 * outputs * usize::from(with_bias)
            );
            check_against_codes(
                &layer.forward(&xs)?,
                GgmlDType::Q4K,
                &weight,
                bias.as_ref(),
                &xs,
            )?;
        }
        Ok(())
    }

    /// A random weight (out, in), bias and input (rows, in).
    fn case(
        rows: usize,
        inputs: usize,
        outputs: usize,
        with_bias: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>, Tensor)> {
        let dev = Device::Cpu;
        let bias = with_bias
            .then(|| Tensor::randn(0f32, 3., outputs, &dev))
            .transpose()?;
        Ok((
            Tensor::randn(0f32, 0.5, (outputs, inputs), &dev)?,
            bias,
            Tensor::randn(0f32, 1., (rows, inputs), &dev)?,
        ))
    }

    /// `ours` against the same arithmetic in f64: the activations' codes and scales times
    /// candle's dequantization of `weight` in `format`, block by block. Within f32's rounding of
    /// each block's scaling and of the sum over blocks ((blocks + 3) roundings of the terms'
    /// magnitudes: d_x Σ|c|(|w| + 2 max|w|), which bounds q4k's two parts, d·scale·Σ code·c and
    /// dmin·min·Σ c, whose minimum lies within the block's range), plus candle's own rounding of
    /// each dequantized weight. And against the f32 product of the dequantized weight within the
    /// activations' rounding: half a code of its block's scale per input.
    fn check_against_codes(
        ours: &Tensor,
        format: GgmlDType,
        weight: &Tensor,
        bias: Option<&Tensor>,
        xs: &Tensor,
    ) -> candle_core::Result<()> {
        let (rows, inputs) = xs.dims2()?;
        let outputs = weight.dim(0)?;
        let ours: Vec<Vec<f32>> = ours.to_vec2()?;
        let w: Vec<Vec<f32>> = QTensor::quantize(weight, format)?
            .dequantize(&Device::Cpu)?
            .to_vec2()?;
        let x: Vec<f32> = xs.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = match bias {
            Some(b) => b.to_vec1()?,
            None => vec![0.0; outputs],
        };
        let q = QuantizedRows::new(&x, rows, rows, inputs);
        let blocks = inputs / QK;
        let eps = f64::from(f32::EPSILON);
        for i in 0..rows {
            for j in 0..outputs {
                let (mut exact, mut magnitude) = (f64::from(b[j]), f64::from(b[j].abs()));
                let (mut f32_product, mut activation) = (f64::from(b[j]), 0f64);
                for blk in 0..blocks {
                    let d = f64::from(q.scales[i * blocks + blk]);
                    let span = blk * QK..(blk + 1) * QK;
                    let largest = w[j][span.clone()]
                        .iter()
                        .fold(0f64, |m, v| m.max(f64::from(v.abs())));
                    for t in span {
                        let (wt, c) = (f64::from(w[j][t]), f64::from(q.codes[i * inputs + t]));
                        exact += d * c * wt;
                        magnitude += d * c.abs() * (wt.abs() + 2.0 * largest);
                        f32_product += f64::from(x[i * inputs + t]) * wt;
                        activation += d / 2.0 * wt.abs();
                    }
                }
                let bound = (blocks + 3) as f64 * eps * magnitude;
                let got = f64::from(ours[i][j]);
                assert!(
                    (got - exact).abs() <= bound,
                    "{format:?} {rows}×{inputs}→{outputs} ({i}, {j}): {got} vs {exact} (bound {bound})"
                );
                assert!((got - f32_product).abs() <= activation + bound);
            }
        }
        Ok(())
    }

    /// Codes within half a step of x / d and inside ±127, with their sum; padded
    /// rows are zeros.
    #[test]
    fn activations_quantize_per_block() -> candle_core::Result<()> {
        let x: Vec<f32> = Tensor::randn(0f32, 2., (3, 64), &Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        let q = QuantizedRows::new(&x, 3, 4, 64);
        for row in 0..4 {
            for blk in 0..2 {
                let d = q.scales[row * 2 + blk];
                let codes = &q.codes[row * 64 + blk * QK..][..QK];
                let sum: i32 = codes.iter().map(|&c| i32::from(c)).sum();
                assert_eq!(q.sums[row * 2 + blk], sum);
                for (t, &c) in codes.iter().enumerate() {
                    assert!(c.unsigned_abs() <= 127);
                    if row == 3 {
                        assert_eq!((c, d), (0, 0.0));
                    } else {
                        let v = x[row * 64 + blk * QK + t];
                        assert!((v / d - c as f32).abs() <= 0.5 + 1e-4, "{v} {d} {c}");
                    }
                }
            }
        }
        Ok(())
    }
}
