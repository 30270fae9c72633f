//! q8_0 Linear layers on x86 CPUs with AVX-512 VNNI: the weight's q8_0 codes held once, in tiles
//! of 16 output columns laid out for `vpdpbusd`, multiplied in int8 against the activations
//! quantized per 32 inputs (as ggml's and candle's quantized products quantize them).
//!
//! candle 0.11 keeps its own int8 tiles of a q8_0 layer beside the blocks (twice the memory,
//! `dit::cpu_repacks`); at FLUX's shapes they ran 0.6–0.65× the f32 layer's time. These hold the
//! same codes and f16 scales as the q8_0 blocks (8.5 bits a weight, once) and ran 0.37–0.46×
//! (`bench --kernels`). Each 32-input block's integer dot product is exact; its scales and the sum
//! over blocks are f32. Against the blocks dequantized into f32 products (`QuantizedCpuLinear`,
//! `--quantize q8_0-compact`) the difference is the activations' rounding to 8 bits.

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
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
/// Blocks per pass over a panel: 512 inputs, whose tiles (68 KiB) stay in L2 while every row
/// passes.
const PART: usize = 16;
/// Activation rows per kernel call (4 rows × 2 tiles of accumulators fill 16 registers).
const ROWS: usize = 4;

/// A Linear layer held as q8_0 tiles; its bias in f32.
#[derive(Debug, Clone)]
pub struct Q8TileLinear {
    tiles: Vec<u8>,
    bias: Option<Vec<f32>>,
    inputs: usize,
    outputs: usize,
}

impl Q8TileLinear {
    /// Whether this CPU runs the tiles' kernel (AVX-512 F, BW and VNNI: Zen 4, Ice Lake and
    /// later server cores).
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

    /// Whether a layer of these widths fits the tiles: whole blocks of inputs, whole pairs of
    /// tiles of outputs.
    pub fn fits(inputs: usize, outputs: usize) -> bool {
        inputs > 0 && inputs.is_multiple_of(QK) && outputs > 0 && outputs.is_multiple_of(2 * GROUP)
    }

    /// `weight` (out, in) quantized to q8_0 (candle's codes and scales, block for block), with a
    /// bias of `out` values.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Self> {
        let (outputs, inputs) = weight.dims2()?;
        if !weight.device().is_cpu() || !Self::available() || !Self::fits(inputs, outputs) {
            candle_core::bail!("q8_0 tiles for a {outputs}×{inputs} weight on this CPU");
        }
        let blocks = super::cpu_quantized_linear::quantize(weight, GgmlDType::Q8_0)?;
        let tiles = tiles_of(&blocks.data()?, inputs, outputs)?;
        let bias = bias
            .map(|b| cpu_util::bias_values(Some(b), outputs))
            .transpose()?;
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
        let (k, n) = (self.inputs, self.outputs);
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
                        // SAFETY: `new` checked the CPU's features; g + 1 < n / GROUP (n is whole
                        // pairs of tiles), r0 + ROWS ≤ padded rows of `x` and `out`, blocks < k / QK;
                        // tasks write disjoint column panels.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            kernel(
                                &self.tiles,
                                &x,
                                [g, r0, b0, b1],
                                self.bias.as_deref(),
                                dst,
                                [k, n],
                            )
                        };
                    }
                }
            }
        });
        out.truncate(rows * n);
        out
    }
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
/// block's scale and 128 × the sum of its codes (what the +128 on the weight codes adds to a dot
/// product). Rows past `rows` up to `padded` are zeros.
struct QuantizedRows {
    codes: Vec<i8>,
    scales: Vec<f32>,
    offsets: Vec<i32>,
}

impl QuantizedRows {
    fn new(x: &[f32], rows: usize, padded: usize, k: usize) -> Self {
        let blocks = k / QK;
        let mut codes = vec![0i8; padded * k];
        let mut scales = vec![0f32; padded * blocks];
        let mut offsets = vec![0i32; padded * blocks];
        codes
            .par_chunks_mut(k)
            .zip(scales.par_chunks_mut(blocks))
            .zip(offsets.par_chunks_mut(blocks))
            .zip(x.par_chunks(k).take(rows))
            .for_each(|(((codes, scales), offsets), x)| {
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
                    offsets[b] = 128 * sum;
                }
            });
        Self {
            codes,
            scales,
            offsets,
        }
    }
}

/// Output rows r0..r0 + 4 of tiles g and g + 1 (32 columns), accumulated over blocks b0..b1 onto
/// what `out` holds (or onto the bias, or zero, when b0 = 0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel(
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
    let at = |r: usize, c: usize| out.at((r0 + r) * n + (g + c) * GROUP);
    let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
    for (r, acc) in acc.iter_mut().enumerate() {
        for (c, acc) in acc.iter_mut().enumerate() {
            *acc = match (b0, bias) {
                (0, Some(bias)) => _mm512_loadu_ps(bias.as_ptr().add((g + c) * GROUP)),
                (0, None) => _mm512_setzero_ps(),
                _ => _mm512_loadu_ps(at(r, c)),
            };
        }
    }
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
            let offset = _mm512_set1_epi32(*x.offsets.get_unchecked(row));
            for (c, d) in [d0, d1].into_iter().enumerate() {
                let dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(dots[c], offset));
                acc[c] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, scale), acc[c]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (c, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(at(r, c), *acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::Device;

    /// Against the same arithmetic in f64 — the activations' codes and scales times candle's
    /// dequantized q8_0 weight, block by block — within the f32 rounding of each block's scaling
    /// and of the sum over blocks ((blocks + 3) roundings of the sum of the terms' magnitudes);
    /// and against the f32 product of the dequantized weight within the activations' rounding
    /// (half a code, max|block| / 254, per input). Shapes: one row, a partial pass over the
    /// inputs and a partial panel with a bias, rows not a multiple of four.
    #[test]
    fn tiles_multiply_the_q8_0_codes_exactly_per_block() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (rows, inputs, outputs, with_bias) in [
            (1, 32, 32, false),
            (5, QK * (PART + 1), PANEL + 32, true),
            (77, 64, 64, false),
        ] {
            let weight = Tensor::randn(0f32, 0.5, (outputs, inputs), &dev)?;
            let bias = with_bias
                .then(|| Tensor::randn(0f32, 3., outputs, &dev))
                .transpose()?;
            if !Q8TileLinear::available() {
                assert!(Q8TileLinear::new(&weight, bias.as_ref()).is_err());
                continue;
            }
            let layer = Q8TileLinear::new(&weight, bias.as_ref())?;
            assert_eq!(
                layer.bytes(),
                inputs * outputs * 17 / 16 + 4 * outputs * usize::from(with_bias)
            );
            let xs = Tensor::randn(0f32, 1., (rows, inputs), &dev)?;
            let ours: Vec<Vec<f32>> = layer.forward(&xs)?.to_vec2()?;
            let w: Vec<Vec<f32>> = QTensor::quantize(&weight, GgmlDType::Q8_0)?
                .dequantize(&dev)?
                .to_vec2()?;
            let x: Vec<f32> = xs.flatten_all()?.to_vec1()?;
            let b: Vec<f32> = match &bias {
                Some(b) => b.to_vec1()?,
                None => vec![0.0; outputs],
            };
            let q = QuantizedRows::new(&x, rows, rows, inputs);
            let blocks = inputs / QK;
            for i in 0..rows {
                for j in 0..outputs {
                    let (mut exact, mut magnitude) = (f64::from(b[j]), f64::from(b[j].abs()));
                    let (mut f32_product, mut activation) = (f64::from(b[j]), 0f64);
                    for blk in 0..blocks {
                        let d = f64::from(q.scales[i * blocks + blk]);
                        let mut term = 0f64;
                        for t in blk * QK..(blk + 1) * QK {
                            let wt = f64::from(w[j][t]);
                            term += f64::from(q.codes[i * inputs + t]) * wt;
                            f32_product += f64::from(x[i * inputs + t]) * wt;
                            activation += d / 2.0 * wt.abs();
                        }
                        exact += d * term;
                        magnitude += (d * term).abs();
                    }
                    let bound = (blocks + 3) as f64 * f64::from(f32::EPSILON) * magnitude;
                    let got = ours[i][j] as f64;
                    assert!(
                        (got - exact).abs() <= bound,
                        "{rows}×{inputs}→{outputs} ({i}, {j}): {got} vs {exact} (bound {bound})"
                    );
                    // The activations' rounding: half a code of its block's scale per input.
                    assert!((got - f32_product).abs() <= activation + bound);
                }
            }
        }
        Ok(())
    }

    /// Codes within half a step of x / d and inside ±127; the offset is 128 × their sum; padded
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
                assert_eq!(q.offsets[row * 2 + blk], 128 * sum);
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
