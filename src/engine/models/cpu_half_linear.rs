//! Linear weights held on the CPU in the half precision their file stores them in (bf16, f16),
//! multiplied in f32.
//!
//! T5-XXL is 19 GB in f32 and 9.5 GB as its checkpoints store it (FLUX's in bf16, SD3's in
//! f16). candle's CPU backend has no bf16 product and rounds f16 products' outputs to f16, so
//! until now a CPU T5 (`--text-encoders-on-cpu`, or CPU-only serving) was widened to f32 at
//! load. Here a column block of the weight is widened into a per-thread buffer that stays in
//! cache and multiplied from there. The values multiplied are the file's, widened exactly, so
//! the result is the f32 model's — at half its weights' memory, and with half the weight bytes
//! read from memory per product.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use super::cpu_util::{self, SharedOut, Strided};

/// A weight's values as stored, (in, out) row-major: the layout the `gemm` crate reads fastest
/// (see [`cpu_util::gemm_layout`]).
#[derive(Debug, Clone)]
enum Values {
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// A bias-free Linear layer whose weight is held in bf16 or f16, computing in f32.
#[derive(Debug, Clone)]
pub struct HalfLinear {
    values: Values,
    inputs: usize,
    outputs: usize,
}

/// A task's output columns, widened and multiplied [`DEPTH`] input rows at a time: 512 × 256
/// f32 is 512 KiB, half a Zen 4 core's L2, so the product packs the widened values from cache.
/// Measured (`bench --kernels`, T5-XXL's layers at 77 and 512 tokens, 2 cores): 0.9–1.2× the
/// f32 layer's time, against 1.1–1.5× when a task widened its whole column block first (the
/// block then left L2 before the product read it). 128- or 64-column blocks were no faster.
const BLOCK: usize = 256;
const DEPTH: usize = 512;

impl HalfLinear {
    /// From a CPU weight (out, in) in bf16 or f16.
    pub fn new(weight: &Tensor) -> candle_core::Result<Self> {
        let (outputs, inputs) = weight.dims2()?;
        if !weight.device().is_cpu() {
            candle_core::bail!("a half-precision CPU Linear from a weight on another device");
        }
        let weight = weight.contiguous()?;
        let values = match weight.dtype() {
            DType::BF16 => Values::Bf16(cpu_util::transpose(
                &weight.flatten_all()?.to_vec1::<bf16>()?,
                outputs,
                inputs,
            )),
            DType::F16 => Values::F16(cpu_util::transpose(
                &weight.flatten_all()?.to_vec1::<f16>()?,
                outputs,
                inputs,
            )),
            other => candle_core::bail!("a half-precision CPU Linear from a {other:?} weight"),
        };
        Ok(Self {
            values,
            inputs,
            outputs,
        })
    }

    /// The dtype the weight is held in.
    pub fn dtype(&self) -> DType {
        match self.values {
            Values::Bf16(_) => DType::BF16,
            Values::F16(_) => DType::F16,
        }
    }

    /// Bytes the weight is held in.
    pub fn bytes(&self) -> usize {
        self.inputs * self.outputs * 2
    }

    /// `xs` (…, in), f32 on the CPU, times the weight: (…, out) in f32.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dims = xs.dims();
        if xs.dtype() != DType::F32 || !xs.device().is_cpu() || dims.last() != Some(&self.inputs)
        {
            candle_core::bail!(
                "a half-precision CPU Linear takes f32 CPU input of width {}, not {:?} {dims:?}",
                self.inputs,
                xs.dtype()
            );
        }
        let rows = xs.elem_count() / self.inputs.max(1);
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.outputs;
        }
        let xs = xs.contiguous()?;
        let out = cpu_util::with_cpu_slice(&xs, |lhs| self.product(lhs, rows))?;
        Tensor::from_vec(out, out_dims, &Device::Cpu)
    }

    /// `lhs` (rows × in) times the weight, by blocks of [`BLOCK`] output columns over every core,
    /// each accumulated over [`DEPTH`] input rows at a time.
    fn product(&self, lhs: &[f32], rows: usize) -> Vec<f32> {
        let (k, n) = (self.inputs, self.outputs);
        let mut out = vec![0f32; rows * n];
        if rows == 0 || n == 0 {
            return out;
        }
        let dst = SharedOut(out.as_mut_ptr());
        (0..n.div_ceil(BLOCK)).into_par_iter().for_each(|block| {
            let c0 = block * BLOCK;
            let width = BLOCK.min(n - c0);
            WIDENED.with_borrow_mut(|widened| {
                widened.resize(DEPTH.min(k) * width, 0.0);
                for r0 in (0..k).step_by(DEPTH) {
                    let depth = DEPTH.min(k - r0);
                    for r in 0..depth {
                        let dst_row = &mut widened[r * width..(r + 1) * width];
                        let at = (r0 + r) * n + c0;
                        match &self.values {
                            Values::Bf16(v) => v[at..][..width].convert_to_f32_slice(dst_row),
                            Values::F16(v) => v[at..][..width].convert_to_f32_slice(dst_row),
                        }
                    }
                    let lhs = Strided {
                        ptr: lhs[r0..].as_ptr(),
                        row: k as isize,
                        col: 1,
                    };
                    let rhs = Strided {
                        ptr: widened.as_ptr(),
                        row: width as isize,
                        col: 1,
                    };
                    // SAFETY: lhs is rows × depth from column r0 of a rows × k buffer, rhs
                    // depth × width, and the destination block (rows × width at column c0, rows
                    // n apart) lies inside `out`; blocks are disjoint columns, so tasks write
                    // disjoint elements.
                    unsafe {
                        cpu_util::gemm_f32(
                            [rows, width, depth],
                            dst.at(c0),
                            n as isize,
                            r0 > 0,
                            lhs,
                            rhs,
                            1.0,
                        )
                    };
                }
            });
        });
        out
    }
}

thread_local! {
    /// Each thread's widened part of a column block ([`DEPTH`] × [`BLOCK`] f32 at most, 512 KiB),
    /// kept between products.
    static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product equals the f32 product of the widened weight — the same values — at shapes
    /// with a partial column block, a partial part of the inputs, one row, and a batch
    /// dimension; for both half types.
    #[test]
    fn half_held_product_is_the_f32_product_of_its_values() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            for (dims, inputs, outputs) in [
                (vec![1, 1], 7, 3),
                (vec![2, 5], 33, 300),
                (vec![77], 64, 257),
                // Past one [`DEPTH`] of inputs: accumulated over a partial last part.
                (vec![3], 2 * DEPTH + 76, 260),
            ] {
                let weight =
                    Tensor::randn(0f32, 1., (outputs, inputs), &dev)?.to_dtype(dtype)?;
                let mut x_dims = dims.clone();
                x_dims.push(inputs);
                let xs = Tensor::randn(0f32, 1., x_dims, &dev)?;
                let ours = HalfLinear::new(&weight)?.forward(&xs)?;
                let exact = xs.broadcast_matmul(&weight.to_dtype(DType::F32)?.t()?)?;
                assert_eq!(ours.dims(), exact.dims());
                let diff = super::super::max_abs_diff(&ours, &exact);
                let scale = super::super::max_abs(&exact);
                // Only the summation order may differ: a few f32 roundings of a sum of `inputs`.
                assert!(
                    diff <= scale * 1e-6,
                    "{dtype:?} {dims:?}×{inputs}→{outputs}: {diff} of {scale}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn refuses_what_it_cannot_multiply() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let f32_weight = Tensor::zeros((4, 8), DType::F32, &dev)?;
        assert!(HalfLinear::new(&f32_weight).is_err());
        let layer = HalfLinear::new(&f32_weight.to_dtype(DType::BF16)?)?;
        assert!(layer.forward(&Tensor::zeros((2, 7), DType::F32, &dev)?).is_err());
        assert!(layer
            .forward(&Tensor::zeros((2, 8), DType::F16, &dev)?)
            .is_err());
        assert_eq!(layer.forward(&Tensor::zeros((2, 8), DType::F32, &dev)?)?.dims(), [2, 4]);
        Ok(())
    }
}
