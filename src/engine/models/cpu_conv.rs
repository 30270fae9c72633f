//! 3×3, stride-1, padding-1 convolution for the CPU (most of a UNet's and a VAE's convolutions)
//! as nine shifted matrix products on the `gemm` crate, without candle's im2col copy: the input
//! is zero-padded once and each tap multiplies the weights by the padded planes read at an
//! offset, accumulating into an output two columns wider than the image (the extra columns are
//! dropped). 1.6–2.7× faster than candle's CPU conv on SD shapes; exact up to summation order.

use candle_core::{DType, Device, Tensor};

use super::cpu_util::{gemm_f32, with_cpu_slice, SharedOut, Strided};
use rayon::prelude::*;

/// Output columns per parallel task.
const TILE: usize = 256;

/// `xs` (B, Ci, H, W) ⊛ `weight` (Co, Ci, 3, 3) + `bias` (Co), padding 1, stride 1.
pub fn conv3x3(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let (b, ci, h, w) = xs.dims4()?;
    let (co, wci, kh, kw) = weight.dims4()?;
    if wci != ci || kh != 3 || kw != 3 {
        candle_core::bail!(
            "conv3x3: weight {:?} for input {:?}",
            weight.dims(),
            xs.dims()
        );
    }
    let bias = match bias {
        Some(b) => b.to_dtype(DType::F32)?.to_vec1()?,
        None => vec![0.0; co],
    };
    // Read in place: the weight's own (Co, Ci, 3, 3) layout serves every tap through strides,
    // and the input is only read.
    let out = with_cpu_slice(&xs.contiguous()?, |x| {
        with_cpu_slice(&weight.contiguous()?, |wv| {
            let mut out = vec![0f32; b * co * h * w];
            convolve(x, wv, &bias, &mut out, [ci, co, h, w]);
            out
        })
    })??;
    Tensor::from_vec(out, (b, co, h, w), &Device::Cpu)
}

/// `out` (B, Co, H, W) = `x` (B, Ci, H, W) ⊛ `weight` (Co, Ci, 3, 3) + `bias`.
fn convolve(x: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32], shape: [usize; 4]) {
    let [ci, co, h, w] = shape;
    let (ph, pw) = (h + 2, w + 2);
    let plane = ph * pw;
    let n = h * pw;
    for (bi, out_b) in out.chunks_mut(co * h * w).enumerate() {
        // The padded input, with a tail so that the last taps' shifted reads stay inside.
        let mut padded = vec![0f32; ci * plane + 2 * pw + 2];
        for c in 0..ci {
            for y in 0..h {
                let src = &x[((bi * ci + c) * h + y) * w..][..w];
                padded[c * plane + (y + 1) * pw + 1..][..w].copy_from_slice(src);
            }
        }
        let mut wide = vec![0f32; co * n];
        // Parallel over column tiles of the (Co × n) output: each task owns every output
        // channel of its columns, so the accumulator tile stays in cache across the nine taps.
        let wide_ptr = SharedOut(wide.as_mut_ptr());
        (0..n.div_ceil(TILE)).into_par_iter().for_each(|tile| {
            let c0 = tile * TILE;
            let cols = TILE.min(n - c0);
            let dst = wide_ptr.at(c0);
            for t in 0..9 {
                let shift = (t / 3) * pw + t % 3;
                // SAFETY: tasks write disjoint column ranges [c0, c0 + cols) of every row of
                // `wide` (Co × n, row stride n); tap t of weight (o, i) is at (o·Ci + i)·9 + t; the
                // shifted read of `padded` spans Ci planes within its padded tail.
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
                            ptr: padded[shift + c0..].as_ptr(),
                            row: plane as isize,
                            col: 1,
                        },
                        1.0,
                    );
                }
            }
        });
        for o in 0..co {
            let add = bias[o];
            for y in 0..h {
                let dst = &mut out_b[(o * h + y) * w..][..w];
                dst.copy_from_slice(&wide[o * n + y * pw..][..w]);
                if add != 0.0 {
                    dst.iter_mut().for_each(|v| *v += add);
                }
            }
        }
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
}
