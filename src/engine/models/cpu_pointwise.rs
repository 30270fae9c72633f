//! Per-position products on the CPU: 1×1 convolutions and the projections between a feature map
//! and its tokens (a Transformer2D's `proj_in` / `proj_out`), as one `gemm` product per image that
//! reads its input and writes its output in whichever layout they are in.
//!
//! candle's 1×1 convolution copies each image element by element into a matrix, multiplies, and
//! copies the result back element by element (both on one thread per image); the
//! feature map ↔ tokens permutes around a projection are two more strided copies on one thread.
//! Here the transposes live in the operands' strides, the bias and any residual are written into
//! the output before the product accumulates onto them, and `gemm` splits the product over the
//! threads.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::cpu_util::{bias_values, with_cpu_slice, with_cpu_strided};

/// How a (B, C, N) activation lies in memory: channels-first (a feature map, (B, C, H·W)) or
/// token-major ((B, N, C), as attention blocks take it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    ChannelsFirst,
    TokenMajor,
}

impl Layout {
    /// (channels, positions) of a 3-D activation in this layout.
    fn channels_positions(self, dims: (usize, usize, usize)) -> (usize, usize) {
        match self {
            Self::ChannelsFirst => (dims.1, dims.2),
            Self::TokenMajor => (dims.2, dims.1),
        }
    }

    /// Strides of one image's (channels × positions) matrix in this layout.
    fn strides(self, channels: usize, positions: usize) -> (isize, isize) {
        let (c, n) = (channels as isize, positions as isize);
        match self {
            Self::ChannelsFirst => (n, 1),
            Self::TokenMajor => (1, c),
        }
    }

    fn shape(self, batch: usize, channels: usize, positions: usize) -> (usize, usize, usize) {
        match self {
            Self::ChannelsFirst => (batch, channels, positions),
            Self::TokenMajor => (batch, positions, channels),
        }
    }
}

/// `weight` (Co, Ci) applied at every position of `xs` — (B, Ci, N) or (B, N, Ci) as `input`
/// says — plus `bias` (Co) and `addend` (the output's shape), written in `output`'s layout.
pub fn pointwise(
    xs: &Tensor,
    input: Layout,
    weight: &Tensor,
    bias: Option<&Tensor>,
    addend: Option<&Tensor>,
    output: Layout,
) -> candle_core::Result<Tensor> {
    let (b, ci, n) = {
        let dims = xs.dims3()?;
        let (c, n) = input.channels_positions(dims);
        (dims.0, c, n)
    };
    let (co, wci) = weight.dims2()?;
    if wci != ci {
        candle_core::bail!(
            "pointwise: weight {:?} for input {:?}",
            weight.dims(),
            xs.dims()
        );
    }
    let out_shape = output.shape(b, co, n);
    let bias = bias.map(|t| bias_values(Some(t), co)).transpose()?;
    let mut out = match addend {
        Some(a) if a.dims3()? == out_shape => with_cpu_slice(&a.contiguous()?, parallel_copy)?,
        Some(a) => candle_core::bail!("pointwise: addend {:?} for output {out_shape:?}", a.dims()),
        None => vec![0f32; b * co * n],
    };
    let accumulate = addend.is_some() || bias.is_some();
    if let Some(bias) = &bias {
        add_bias(&mut out, bias, output, n);
    }
    let xs = xs.contiguous()?;
    with_cpu_slice(&xs, |x| {
        with_cpu_strided(weight, |w, (w_out, w_in)| {
            let threads = gemm::Parallelism::Rayon(rayon::current_num_threads());
            let (x_c, x_n) = input.strides(ci, n);
            let (d_c, d_n) = output.strides(co, n);
            for (bi, dst) in out.chunks_mut(co * n).enumerate() {
                let x = &x[bi * ci * n..][..ci * n];
                // SAFETY: `x` holds ci × n values at the strides its layout gives, `w` co × ci at
                // its own (checked by `with_cpu_strided`), `dst` co × n at the output's.
                unsafe {
                    gemm::gemm(
                        co,
                        n,
                        ci,
                        dst.as_mut_ptr(),
                        d_n,
                        d_c,
                        accumulate,
                        w.as_ptr(),
                        w_in,
                        w_out,
                        x.as_ptr(),
                        x_n,
                        x_c,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        threads,
                    )
                }
            }
        })
    })??;
    Tensor::from_vec(out, out_shape, &Device::Cpu)
}

/// `src` copied on every thread (a large residual: one thread copies at a fraction of the
/// memory bandwidth).
fn parallel_copy(src: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(1 << 16)
        .zip(src.par_chunks(1 << 16))
        .for_each(|(d, s)| d.copy_from_slice(s));
    out
}

/// `out` (B images of Co × N in `layout`) += the bias of each output channel.
fn add_bias(out: &mut [f32], bias: &[f32], layout: Layout, positions: usize) {
    match layout {
        Layout::ChannelsFirst => {
            out.par_chunks_mut(positions.max(1))
                .enumerate()
                .for_each(|(i, plane)| {
                    let v = bias[i % bias.len()];
                    plane.iter_mut().for_each(|o| *o += v);
                })
        }
        Layout::TokenMajor => out.par_chunks_mut(bias.len()).for_each(|token| {
            token.iter_mut().zip(bias).for_each(|(o, v)| *o += v);
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::models::max_abs_diff;

    fn random(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap()
    }

    /// Every layout pair, with and without bias and addend, against candle's conv2d / matmul.
    #[test]
    fn matches_candle_in_every_layout() {
        let (b, ci, co, h, w) = (2, 40, 24, 5, 7);
        let n = h * w;
        let xs = random(&[b, ci, h, w]);
        let weight = random(&[co, ci]);
        let bias = random(&[co]);
        let addend = random(&[b, co, h, w]);
        // Reference: candle's 1×1 convolution, channels-first.
        let reference = xs
            .conv2d(&weight.reshape((co, ci, 1, 1)).unwrap(), 0, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
            .unwrap();
        let reference_sum = (&reference + &addend).unwrap();
        let to_tokens = |t: &Tensor, c: usize| {
            t.reshape((b, c, n))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let xs_cf = xs.reshape((b, ci, n)).unwrap();
        let xs_tm = to_tokens(&xs, ci);
        // The weight also as a view of (Ci, Co) data, the layout CPU Linear layers keep.
        let weight_t = super::super::cpu_util::gemm_layout(&weight).unwrap();
        for weight in [&weight, &weight_t] {
            for (input, xs) in [
                (Layout::ChannelsFirst, &xs_cf),
                (Layout::TokenMajor, &xs_tm),
            ] {
                for output in [Layout::ChannelsFirst, Layout::TokenMajor] {
                    let expect = |t: &Tensor| match output {
                        Layout::ChannelsFirst => t.reshape((b, co, n)).unwrap(),
                        Layout::TokenMajor => to_tokens(t, co),
                    };
                    let add = expect(&addend);
                    let got =
                        pointwise(xs, input, weight, Some(&bias), Some(&add), output).unwrap();
                    let diff = max_abs_diff(&got, &expect(&reference_sum));
                    assert!(diff < 1e-5, "{input:?}→{output:?} with addend: {diff}");
                    let got = pointwise(xs, input, weight, Some(&bias), None, output).unwrap();
                    let diff = max_abs_diff(&got, &expect(&reference));
                    assert!(diff < 1e-5, "{input:?}→{output:?}: {diff}");
                    let unbiased = (&reference
                        - bias
                            .reshape((1, co, 1, 1))
                            .unwrap()
                            .broadcast_as(reference.shape())
                            .unwrap())
                    .unwrap();
                    let got = pointwise(xs, input, weight, None, None, output).unwrap();
                    let diff = max_abs_diff(&got, &expect(&unbiased));
                    assert!(diff < 1e-5, "{input:?}→{output:?} without bias: {diff}");
                }
            }
        }
    }

    #[test]
    fn refuses_mismatched_shapes() {
        let xs = random(&[1, 8, 4]);
        let weight = random(&[3, 6]);
        assert!(pointwise(
            &xs,
            Layout::ChannelsFirst,
            &weight,
            None,
            None,
            Layout::TokenMajor
        )
        .is_err());
        let weight = random(&[3, 8]);
        let wrong = random(&[1, 3, 5]);
        assert!(pointwise(
            &xs,
            Layout::ChannelsFirst,
            &weight,
            None,
            Some(&wrong),
            Layout::ChannelsFirst
        )
        .is_err());
    }
}
