//! 3×3, stride-1, padding-1 convolution for the CPU (most of a UNet's and a VAE's convolutions)
//! as nine shifted matrix products on the `gemm` crate, without candle's im2col copy: the input
//! is zero-padded once and each tap multiplies the weights by the padded planes read at an
//! offset, accumulating into an output two columns wider than the image (the extra columns are
//! dropped). 1.6–2.7× faster than candle's CPU conv on SD shapes; exact up to summation order.

use candle_core::{Device, Tensor};

use super::cpu_util::{gemm_f32, with_cpu_slice, SharedOut, Strided};
use rayon::prelude::*;

/// Output columns per parallel task.
const TILE: usize = 256;

/// `xs` (B, Ci, H, W) ⊛ `weight` (Co, Ci, 3, 3) + `bias` (Co), padding 1, stride 1.
pub fn conv3x3(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    conv3x3_strided(xs, weight, bias, 1, [1; 4])
}

/// A 3×3 convolution with stride 1 or 2 and zero padding `[top, left, bottom, right]` (the VAE
/// encoder's downsampling pads only the bottom and right): candle's stride-2 path copies an
/// im2col matrix on one thread (VAE encoder at 512²: 300 MB) and the asymmetric pad twice more.
/// A stride-2 convolution is a stride-1 one over the input's four phases (even/odd rows ×
/// even/odd columns), each tap reading one phase shifted.
pub fn conv3x3_strided(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: [usize; 4],
) -> candle_core::Result<Tensor> {
    let (b, ci, h, w) = xs.dims4()?;
    let (co, wci, kh, kw) = weight.dims4()?;
    if wci != ci || kh != 3 || kw != 3 || !(1..=2).contains(&stride) {
        candle_core::bail!(
            "conv3x3: weight {:?} with stride {stride} for input {:?}",
            weight.dims(),
            xs.dims()
        );
    }
    let [top, left, bottom, right] = pad;
    let (hp, wp) = (h + top + bottom, w + left + right);
    if hp < 3 || wp < 3 {
        candle_core::bail!("conv3x3: input {h}×{w} padded by {pad:?} is smaller than the kernel");
    }
    let g = Geometry {
        ci,
        co,
        h,
        w,
        stride,
        top,
        left,
        ho: (hp - 3) / stride + 1,
        wo: (wp - 3) / stride + 1,
    };
    let bias = super::cpu_util::bias_values(bias, co)?;
    // Read in place: the weight's own (Co, Ci, 3, 3) layout serves every tap through strides,
    // and the input is only read.
    let out = with_cpu_slice(&xs.contiguous()?, |x| {
        with_cpu_slice(&weight.contiguous()?, |wv| {
            let mut out = vec![0f32; b * co * g.ho * g.wo];
            convolve(x, wv, &bias, &mut out, g);
            out
        })
    })??;
    Tensor::from_vec(out, (b, co, g.ho, g.wo), &Device::Cpu)
}

/// One call's sizes: input (Ci, H, W), output (Co, Ho, Wo), stride, and the top/left padding
/// (the bottom/right one only shows in Ho and Wo).
#[derive(Clone, Copy)]
struct Geometry {
    ci: usize,
    co: usize,
    h: usize,
    w: usize,
    stride: usize,
    top: usize,
    left: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    /// Rows and columns of each phase plane: the output's plus the taps' reach (2 / stride).
    fn phase_size(&self) -> (usize, usize) {
        (self.ho + 2 / self.stride, self.wo + 2 / self.stride)
    }
}

/// `out` (B, Co, Ho, Wo) = `x` (B, Ci, H, W) ⊛ `weight` (Co, Ci, 3, 3) + `bias`.
fn convolve(x: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32], g: Geometry) {
    let Geometry { ci, co, h, w, .. } = g;
    let s = g.stride;
    let (hq, wq) = g.phase_size();
    let plane = hq * wq;
    let phase = ci * plane;
    // Output columns are computed `wq` to a row, the extra ones dropped.
    let n = g.ho * wq;
    for (bi, out_b) in out.chunks_mut(co * g.ho * g.wo).enumerate() {
        // The padded input as s² phase planes per channel — phase (a, b) holds padded rows
        // s·r + a and columns s·q + b — with a tail so that the last taps' shifted reads of the
        // dropped columns stay inside.
        let mut phases = vec![0f32; s * s * phase + 2 * wq + 2];
        let x_b = &x[bi * ci * h * w..][..ci * h * w];
        phases[..s * s * phase]
            .par_chunks_mut(phase)
            .enumerate()
            .for_each(|(ab, dst)| {
                let (a, b) = (ab / s, ab % s);
                for (c, dst) in dst.chunks_mut(plane).enumerate() {
                    for r in 0..hq {
                        // Padded row s·r + a is input row s·r + a − top, if any.
                        let Some(y) = (s * r + a).checked_sub(g.top).filter(|&y| y < h) else {
                            continue;
                        };
                        let src = &x_b[(c * h + y) * w..][..w];
                        let row = &mut dst[r * wq..][..wq];
                        // Padded column s·q + b is input column s·q + b − left, if any.
                        let first = g.left.saturating_sub(b).div_ceil(s);
                        for (q, v) in row.iter_mut().enumerate().skip(first) {
                            let Some(&value) = src.get(s * q + b - g.left) else {
                                break;
                            };
                            *v = value;
                        }
                    }
                }
            });
        let mut wide = vec![0f32; co * n];
        // Parallel over column tiles of the (Co × n) output: each task owns every output
        // channel of its columns, so the accumulator tile stays in cache across the nine taps.
        let wide_ptr = SharedOut(wide.as_mut_ptr());
        (0..n.div_ceil(TILE)).into_par_iter().for_each(|tile| {
            let c0 = tile * TILE;
            let cols = TILE.min(n - c0);
            let dst = wide_ptr.at(c0);
            for t in 0..9 {
                let (ky, kx) = (t / 3, t % 3);
                let at = ((ky % s) * s + kx % s) * phase + (ky / s) * wq + kx / s;
                // SAFETY: tasks write disjoint column ranges [c0, c0 + cols) of every row of
                // `wide` (Co × n, row stride n); tap t of weight (o, i) is at (o·Ci + i)·9 + t; the
                // shifted read of a phase spans Ci planes within the buffer and its tail.
                unsafe {
                    gemm_f32(
                        [co, cols, ci],
                        dst,
                        n as isize,
                        t > 0,
                        Strided {
                            ptr: weight[t..].as_ptr(),
                            row: (ci * 9) as isize,
                            col: 9,
                        },
                        Strided {
                            ptr: phases[at + c0..].as_ptr(),
                            row: plane as isize,
                            col: 1,
                        },
                        1.0,
                    );
                }
            }
        });
        out_b
            .par_chunks_mut(g.ho * g.wo)
            .zip(wide.par_chunks(n))
            .zip(bias.par_iter())
            .for_each(|((dst, src), &add)| {
                for (dst, src) in dst.chunks_mut(g.wo).zip(src.chunks(wq)) {
                    dst.copy_from_slice(&src[..g.wo]);
                    if add != 0.0 {
                        dst.iter_mut().for_each(|v| *v += add);
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_candles_convolution() {
        let dev = Device::Cpu;
        for (b, ci, co, h, w) in [(2, 5, 7, 9, 6), (1, 16, 33, 4, 11), (3, 4, 8, 1, 1)] {
            let x = Tensor::randn(0f32, 1., (b, ci, h, w), &dev).unwrap();
            let k = Tensor::randn(0f32, 0.2, (co, ci, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., co, &dev).unwrap();
            let ours = conv3x3(&x, &k, Some(&bias)).unwrap();
            let expected = x
                .conv2d(&k, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            let diff = super::super::max_abs_diff(&ours, &expected);
            assert!(diff < 1e-5, "{b}x{ci}->{co} {h}x{w}: {diff}");
        }
    }

    #[test]
    fn strided_and_asymmetrically_padded_match_candle() {
        let dev = Device::Cpu;
        // Odd and even sizes; the UNet's stride 2 with padding 1 and the VAE encoder's bottom-right
        // pad with none around.
        for (b, ci, co, h, w) in [(2, 5, 7, 9, 6), (1, 16, 33, 8, 11), (1, 3, 4, 3, 3)] {
            let x = Tensor::randn(0f32, 1., (b, ci, h, w), &dev).unwrap();
            let k = Tensor::randn(0f32, 0.2, (co, ci, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., co, &dev).unwrap();
            let with_bias = |t: Tensor| t.broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap());
            for stride in [1, 2] {
                let ours = conv3x3_strided(&x, &k, Some(&bias), stride, [1; 4]).unwrap();
                let expected = with_bias(x.conv2d(&k, 1, stride, 1, 1).unwrap()).unwrap();
                let diff = super::super::max_abs_diff(&ours, &expected);
                assert!(
                    diff < 1e-5,
                    "stride {stride} {b}x{ci}->{co} {h}x{w}: {diff}"
                );
                let ours = conv3x3_strided(&x, &k, Some(&bias), stride, [0, 0, 1, 1]).unwrap();
                let padded = x
                    .pad_with_zeros(3, 0, 1)
                    .and_then(|t| t.pad_with_zeros(2, 0, 1))
                    .unwrap();
                let expected = with_bias(padded.conv2d(&k, 0, stride, 1, 1).unwrap()).unwrap();
                let diff = super::super::max_abs_diff(&ours, &expected);
                assert!(
                    diff < 1e-5,
                    "stride {stride}, bottom-right pad, {h}x{w}: {diff}"
                );
            }
        }
    }
}
