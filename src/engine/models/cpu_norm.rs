//! GroupNorm (optionally followed by SiLU, as every ResNet block applies it) for the CPU in one
//! pass per group instead of candle's chain of reductions and broadcasts: 3–5× faster on SD's
//! feature maps, which matters most in the VAE decoder's full-resolution blocks.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::cpu_util::{exp_nonpositive, with_cpu_slice};

/// `y · sigmoid(y)` with the vectorisable exponential.
#[inline(always)]
fn silu(y: f32) -> f32 {
    let e = exp_nonpositive(-y.abs());
    let sigmoid = if y >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    };
    y * sigmoid
}

/// Σ x (or Σ (x − centre)² with `squares`) in f64, accumulated in sixteen f32 lanes per block of
/// 1 024 values: vectorised and free of the one-add-at-a-time dependency chain of a plain f64
/// sum, which made the statistics most of GroupNorm's time. Each lane sums 64 values before
/// the f64 total.
#[inline(always)]
fn lane_sum(x: &[f32], centre: f32, squares: bool) -> f64 {
    const LANES: usize = 16;
    let mut total = 0f64;
    for block in x.chunks(1024) {
        let mut acc = [0f32; LANES];
        let mut rows = block.chunks_exact(LANES);
        for row in &mut rows {
            for i in 0..LANES {
                let d = row[i] - centre;
                acc[i] += if squares { d * d } else { d };
            }
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>();
        for &v in rows.remainder() {
            let d = (v - centre) as f64;
            total += if squares { d * d } else { d };
        }
    }
    total
}

/// One group: `len` channels × `spatial` values, normalised then scaled per channel.
#[inline(always)]
fn normalise_group(
    x: &[f32],
    out: &mut [f32],
    weight: &[f32],
    bias: &[f32],
    spatial: usize,
    eps: f64,
    with_silu: bool,
) {
    let n = x.len() as f64;
    let mean = lane_sum(x, 0.0, false) / n;
    let var = lane_sum(x, mean as f32, true) / n;
    let inv_std = 1.0 / (var + eps).sqrt();
    for (c, (xc, oc)) in x.chunks(spatial).zip(out.chunks_mut(spatial)).enumerate() {
        let scale = (weight[c] as f64 * inv_std) as f32;
        let shift = (bias[c] as f64 - mean * weight[c] as f64 * inv_std) as f32;
        if with_silu {
            for (o, &v) in oc.iter_mut().zip(xc) {
                *o = silu(v * scale + shift);
            }
        } else {
            for (o, &v) in oc.iter_mut().zip(xc) {
                *o = v * scale + shift;
            }
        }
    }
}

avx512_dispatch!(fn normalise_group_fast(
    x: &[f32],
    out: &mut [f32],
    weight: &[f32],
    bias: &[f32],
    spatial: usize,
    eps: f64,
    with_silu: bool,
) = normalise_group);

/// GroupNorm over (B, C, …) f32 CPU tensors with per-channel `weight` and `bias`, then SiLU when
/// `with_silu`.
pub fn group_norm(
    xs: &Tensor,
    weight: &[f32],
    bias: &[f32],
    groups: usize,
    eps: f64,
    with_silu: bool,
) -> candle_core::Result<Tensor> {
    let dims = xs.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    if groups == 0
        || c % groups != 0
        || weight.len() != c
        || bias.len() != c
        || xs.elem_count() == 0
    {
        candle_core::bail!("group norm: {c} channels, {groups} groups");
    }
    let spatial = xs.elem_count() / (b * c).max(1);
    let per_group = c / groups;
    // The input is only read: normalise straight from candle's buffer.
    let out = with_cpu_slice(&xs.contiguous()?, |x| {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(per_group * spatial)
            .zip(x.par_chunks(per_group * spatial))
            .enumerate()
            .for_each(|(i, (o, xg))| {
                let g = i % groups;
                let (w, bi) = (
                    &weight[g * per_group..][..per_group],
                    &bias[g * per_group..][..per_group],
                );
                normalise_group_fast(xg, o, w, bi, spatial, eps, with_silu)
            });
        out
    })?;
    Tensor::from_vec(out, dims, &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Module};

    #[test]
    fn matches_candles_group_norm_and_silu() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2., (2, 8, 5, 7), &dev).unwrap() + 0.5).unwrap();
        let w = Tensor::randn(0f32, 1., 8, &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 8, &dev).unwrap();
        let reference = candle_nn::GroupNorm::new(w.clone(), b.clone(), 8, 4, 1e-5)
            .unwrap()
            .forward(&x)
            .unwrap();
        let (wv, bv) = (w.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        for with_silu in [false, true] {
            let ours = group_norm(&x, &wv, &bv, 4, 1e-5, with_silu).unwrap();
            let expected = if with_silu {
                reference.silu().unwrap()
            } else {
                reference.clone()
            };
            let diff = super::super::max_abs_diff(&ours, &expected);
            assert!(diff < 2e-6, "silu {with_silu}: {diff}");
        }
        let _ = DType::F32;
    }
}
