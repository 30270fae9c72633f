//! Activations for the CPU in one vectorised pass. GEGLU, `value · gelu(gate)` with the exact
//! (erf) GELU, where candle narrows, copies, evaluates a scalar `erf` per element and multiplies
//! in three passes (7× slower on SD 1.5's feed-forward layers); the tanh GELU of the diffusion
//! transformers' MLPs, where candle calls a scalar `tanh` per element; and the text encoders'
//! exact GELU (scalar `erf` in candle) and `quick_gelu` (three passes in candle).

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::cpu_util::{exp_nonpositive, is_cpu_f32, widened_on_cpu, with_cpu_slice};

/// erf by Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7, the approximation PyTorch's
/// vectorised CPU `erf` uses), written so that it vectorises.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_nonpositive(-a * a);
    y.copysign(x)
}

/// `x · ½(1 + tanh(√(2/π)(x + 0.044715 x³)))`, with tanh from the vectorised exponential of
/// −2|t| (never overflows).
#[inline(always)]
fn gelu_tanh_value(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let t = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    let e = exp_nonpositive(-2.0 * t.abs());
    let tanh = ((1.0 - e) / (1.0 + e)).copysign(t);
    0.5 * x * (1.0 + tanh)
}

#[inline(always)]
fn gelu_tanh_impl(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = gelu_tanh_value(v);
    }
}

avx512_dispatch!(fn gelu_tanh_slice(x: &[f32], out: &mut [f32]) = gelu_tanh_impl);

/// The exact GELU, `x · ½(1 + erf(x/√2))`.
#[inline(always)]
fn gelu_erf_impl(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

avx512_dispatch!(fn gelu_erf_slice(x: &[f32], out: &mut [f32]) = gelu_erf_impl);

/// CLIP's `quick_gelu`, `x · σ(1.702 x)`, σ from the exponential of −|z| (never overflows).
#[inline(always)]
fn quick_gelu_impl(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        let z = 1.702 * v;
        let e = exp_nonpositive(-z.abs());
        let sigmoid = if z >= 0.0 {
            1.0 / (1.0 + e)
        } else {
            e / (1.0 + e)
        };
        *o = v * sigmoid;
    }
}

avx512_dispatch!(fn quick_gelu_slice(x: &[f32], out: &mut [f32]) = quick_gelu_impl);

/// A transformers activation by its `ACT2FN` name, as the text encoders' configs give it
/// (CLIP's `hidden_act`, T5's `feed_forward_proj`), on the functions of this module.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Relu,
    Silu,
    QuickGelu,
    GeluErf,
    GeluTanh,
}

impl Activation {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "relu" => Some(Self::Relu),
            "silu" | "swish" => Some(Self::Silu),
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    pub fn forward(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Relu => xs.relu(),
            Self::Silu => xs.silu(),
            Self::QuickGelu => quick_gelu(xs),
            Self::GeluErf => gelu_erf(xs),
            Self::GeluTanh => gelu_tanh(xs),
        }
    }
}

/// `slice` over an f32 CPU tensor's values in parallel chunks, into a new tensor of its shape.
fn map_cpu_f32(xs: &Tensor, slice: fn(&[f32], &mut [f32])) -> candle_core::Result<Tensor> {
    let out = with_cpu_slice(&xs.contiguous()?, |x| {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(16_384)
            .zip(x.par_chunks(16_384))
            .for_each(|(o, x)| slice(x, o));
        out
    })?;
    Tensor::from_vec(out, xs.shape(), &Device::Cpu)
}

/// candle's `gelu` (the tanh approximation) — vectorised for f32 on the CPU, one fused pass on
/// CUDA.
pub fn gelu_tanh(xs: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::engine::cuda::elementwise::supports(xs) {
        return crate::engine::cuda::elementwise::gelu_tanh(xs, None);
    }
    if let Some(upcast) = widened_on_cpu(xs, gelu_tanh) {
        return upcast;
    }
    if !is_cpu_f32(xs) {
        return xs.gelu();
    }
    map_cpu_f32(xs, gelu_tanh_slice)
}

/// candle's `gelu_erf` (OpenCLIP-G's MLP), where candle calls a scalar `erf` per element:
/// vectorised for f32 on the CPU.
pub fn gelu_erf(xs: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(upcast) = widened_on_cpu(xs, gelu_erf) {
        return upcast;
    }
    if !is_cpu_f32(xs) {
        return xs.gelu_erf();
    }
    map_cpu_f32(xs, gelu_erf_slice)
}

/// `x · sigmoid(1.702 x)` (CLIP-L's MLP), in one vectorised pass for f32 on the CPU where
/// candle takes three.
pub fn quick_gelu(xs: &Tensor) -> candle_core::Result<Tensor> {
    if !is_cpu_f32(xs) {
        return xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?;
    }
    map_cpu_f32(xs, quick_gelu_slice)
}

#[inline(always)]
fn gated_rows(h: &[f32], out: &mut [f32], width: usize, gelu: impl Fn(f32) -> f32) {
    for (src, dst) in h.chunks_exact(2 * width).zip(out.chunks_exact_mut(width)) {
        let (value, gate) = src.split_at(width);
        for ((d, &v), &g) in dst.iter_mut().zip(value).zip(gate) {
            *d = v * gelu(g);
        }
    }
}

#[inline(always)]
fn geglu_rows_impl(h: &[f32], out: &mut [f32], width: usize) {
    gated_rows(h, out, width, |g| {
        0.5 * g * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2))
    })
}

#[inline(always)]
fn geglu_tanh_rows_impl(h: &[f32], out: &mut [f32], width: usize) {
    gated_rows(h, out, width, gelu_tanh_value)
}

avx512_dispatch!(fn geglu_rows(h: &[f32], out: &mut [f32], width: usize) = geglu_rows_impl);
avx512_dispatch!(fn geglu_tanh_rows(h: &[f32], out: &mut [f32], width: usize) = geglu_tanh_rows_impl);

/// `h` (…, 2F) f32 on the CPU → `h[..., :F] · gelu_erf(h[..., F:])` (…, F).
pub fn geglu(h: &Tensor) -> candle_core::Result<Tensor> {
    gated(h, geglu_rows)
}

/// `h` (…, 2F) f32 on the CPU → `h[..., :F] · gelu_tanh(h[..., F:])` (…, F): T5's gated GELU
/// (`gelu_new`) over its two input projections side by side.
pub fn geglu_tanh(h: &Tensor) -> candle_core::Result<Tensor> {
    gated(h, geglu_tanh_rows)
}

fn gated(h: &Tensor, rows_fn: fn(&[f32], &mut [f32], usize)) -> candle_core::Result<Tensor> {
    let mut dims = h.dims().to_vec();
    let Some(last) = dims.last_mut() else {
        candle_core::bail!("geglu on a scalar");
    };
    if *last % 2 != 0 {
        candle_core::bail!("geglu over an odd width {}", *last);
    }
    let width = *last / 2;
    *last = width;
    let rows = h.elem_count() / (2 * width).max(1);
    let out = with_cpu_slice(&h.contiguous()?, |h| {
        let mut out = vec![0f32; rows * width];
        // ~64 KiB of output per task.
        let rows_per_task = (16_384 / width.max(1)).max(1);
        out.par_chunks_mut(rows_per_task * width)
            .zip(h.par_chunks(rows_per_task * 2 * width))
            .for_each(|(dst, src)| rows_fn(src, dst, width));
        out
    })?;
    Tensor::from_vec(out, dims, &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dispatched kernels (AVX-512 or AVX2 where the CPU has them) give the bits of the
    /// same source compiled for the baseline: no tier may change a result.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 997) as f32 - 498.0) * 0.013)
            .collect();
        for (dispatched, baseline) in [
            (
                gelu_tanh_slice as fn(&[f32], &mut [f32]),
                gelu_tanh_impl as fn(&[f32], &mut [f32]),
            ),
            (gelu_erf_slice, gelu_erf_impl),
            (quick_gelu_slice, quick_gelu_impl),
        ] {
            let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            dispatched(&x, &mut a);
            baseline(&x, &mut b);
            assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let (mut a, mut b) = (vec![0f32; 500], vec![0f32; 500]);
        geglu_rows(&x, &mut a, 50);
        geglu_rows_impl(&x, &mut b, 50);
        assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
        geglu_tanh_rows(&x, &mut a, 50);
        geglu_tanh_rows_impl(&x, &mut b, 50);
        assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn matches_candles_tanh_gelu() {
        let dev = Device::Cpu;
        // Across the range where tanh saturates, both signs.
        let x = (Tensor::randn(0f32, 1., (3, 1000), &dev).unwrap() * 6.0).unwrap();
        let diff = super::super::max_abs_diff(&gelu_tanh(&x).unwrap(), &x.gelu().unwrap());
        assert!(diff < 2e-6, "{diff}");
    }

    /// CLIP's two activations against candle's ops, across both tails.
    #[test]
    fn matches_candles_gelu_erf_and_quick_gelu() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1., (3, 1000), &dev).unwrap() * 8.0).unwrap();
        let diff = super::super::max_abs_diff(&gelu_erf(&x).unwrap(), &x.gelu_erf().unwrap());
        assert!(diff < 2e-6, "gelu_erf: {diff}");
        let expected = (&x * candle_nn::ops::sigmoid(&(&x * 1.702).unwrap()).unwrap()).unwrap();
        let diff = super::super::max_abs_diff(&quick_gelu(&x).unwrap(), &expected);
        assert!(diff < 2e-6, "quick_gelu: {diff}");
    }

    #[test]
    fn matches_candles_geglu() {
        let dev = Device::Cpu;
        // Gates across erf's whole range (the tails saturate to 0 and x).
        let h = (Tensor::randn(0f32, 1., (2, 5, 2 * 37), &dev).unwrap() * 4.0).unwrap();
        let ours = geglu(&h).unwrap();
        let value = h.narrow(2, 0, 37).unwrap();
        let gate = h.narrow(2, 37, 37).unwrap();
        let expected = (value * gate.gelu_erf().unwrap()).unwrap();
        let diff = super::super::max_abs_diff(&ours, &expected);
        assert!(diff < 1e-5, "{diff}");
        // The tanh form (T5's gated `gelu_new`).
        let tanh_form = geglu_tanh(&h).unwrap();
        let expected = (h.narrow(2, 0, 37).unwrap() * h.narrow(2, 37, 37).unwrap().gelu()).unwrap();
        let diff = super::super::max_abs_diff(&tanh_form, &expected);
        assert!(diff < 1e-5, "tanh: {diff}");
        let xs: Vec<f32> = (-600..=600).map(|i| i as f32 * 0.01).collect();
        let exact: Vec<f32> = Tensor::new(xs.as_slice(), &dev)
            .unwrap()
            .erf()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (x, exact) in xs.into_iter().zip(exact) {
            assert!(
                (erf(x) - exact).abs() < 3e-7,
                "erf({x}) = {} vs {exact}",
                erf(x)
            );
        }
    }
}
