//! Linear weights held on the CPU in the half precision their file stores them in (bf16, f16),
//! multiplied in f32.
//!
//! T5-XXL is 19 GB in f32 and 9.5 GB as its checkpoints store it (FLUX's in bf16, SD3's in
//! f16). candle's CPU backend has no bf16 product and rounds f16 products' outputs to f16, so
//! until now a CPU T5 (`--text-encoders-on-cpu`, or CPU-only serving) was widened to f32 at
//! load. Here a column block of the weight is widened into a per-thread buffer that stays in
//! cache and multiplied from there. The values multiplied are the file's, widened exactly, so
//! the result is the f32 model's — at half its weights' memory, and with half the weight bytes
//! read from memory per product, which makes it faster than the f32 layer (T5-XXL's layers:
//! 0.8–0.95× its time in bf16, 0.85–1.0× in f16, `bench --kernels`). CLIP and T5 hold their
//! weights so through [`Holding`].

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use super::blocks::Linear;
use super::cpu_util::{self, SharedOut, Strided};
use super::quantized::{BlockLinear, LayerSource, WeightFormat};
use crate::engine::loader::weights::StoredDtypes;

/// A weight's values as stored, (in, out) row-major: the layout the `gemm` crate reads fastest
/// (see [`cpu_util::gemm_layout`]).
#[derive(Debug, Clone)]
enum Values {
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// A Linear layer whose weight is held in bf16 or f16, computing in f32; its bias, if any, in
/// f32 (as the model's norms and biases are read: they are small).
#[derive(Debug, Clone)]
pub struct HalfLinear {
    values: Values,
    bias: Option<Vec<f32>>,
    inputs: usize,
    outputs: usize,
}

/// A task's output columns, widened and multiplied [`DEPTH`] input rows at a time: 512 × 256
/// f32 is 512 KiB, half a Zen 4 core's L2, so the product packs the widened values from cache.
/// Measured (`bench --kernels`, T5-XXL's layers at 77 and 512 tokens, 2 cores, with the `half`
/// crate's widening): 0.9–1.2× the f32 layer's time, against 1.1–1.5× when a task widened its
/// whole column block first (the block then left L2 before the product read it); 128- or
/// 64-column blocks, and parts of 128 to 2048 rows, within noise of this. The vectorised
/// widening below then took it to 0.8–1.0×.
const BLOCK: usize = 256;
pub(crate) const DEPTH: usize = 512;

impl HalfLinear {
    /// From a CPU weight (out, in) in bf16 or f16, and a bias of `out` values.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Self> {
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
        let bias = cpu_util::optional_bias(bias, outputs)?;
        Ok(Self {
            values,
            bias,
            inputs,
            outputs,
        })
    }

    /// (outputs, inputs).
    pub fn shape(&self) -> (usize, usize) {
        (self.outputs, self.inputs)
    }

    /// Bytes the weight and bias are held in.
    pub fn bytes(&self) -> usize {
        self.inputs * self.outputs * 2 + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    /// `xs` (…, in), f32 on the CPU, times the weight, plus the bias: (…, out) in f32.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.product(xs, true)
    }

    /// [`Self::forward`] without the bias.
    pub fn forward_unbiased(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.product(xs, false)
    }

    /// The weight widened to f32, (out, in): for a layer quantized from it.
    pub fn widened_weight(&self) -> candle_core::Result<Tensor> {
        let (k, n) = (self.inputs, self.outputs);
        let values: Vec<f32> = match &self.values {
            Values::Bf16(v) => v.to_f32_vec(),
            Values::F16(v) => v.to_f32_vec(),
        };
        Tensor::from_vec(values, (k, n), &Device::Cpu)?
            .t()?
            .contiguous()
    }

    fn product(&self, xs: &Tensor, with_bias: bool) -> candle_core::Result<Tensor> {
        let (k, n) = (self.inputs, self.outputs);
        forward_f32("a half-precision", xs, k, n, |lhs, rows| {
            widened_product(
                lhs,
                rows,
                [k, n],
                self.bias.as_deref().filter(|_| with_bias),
                PartLayout::InputsMajor,
                |[r0, depth, c0, width], part| {
                    // `depth` rows of `width` values, `n` apart, from (r0, c0).
                    let (at, len) = (r0 * n + c0, (depth - 1) * n + width);
                    match &self.values {
                        Values::Bf16(v) => {
                            widen_bf16(v[at..][..len].reinterpret_cast(), n, width, part)
                        }
                        Values::F16(v) => {
                            widen_f16(v[at..][..len].reinterpret_cast(), n, width, part)
                        }
                    }
                },
            )
        })
    }
}

/// `xs` (…, `inputs`), f32 on the CPU, through `product` (rows × inputs → rows × outputs, f32):
/// (…, `outputs`). `what` names the layer kind in the error for any other input.
pub(crate) fn forward_f32(
    what: &str,
    xs: &Tensor,
    inputs: usize,
    outputs: usize,
    product: impl FnOnce(&[f32], usize) -> Vec<f32>,
) -> candle_core::Result<Tensor> {
    let dims = xs.dims();
    if xs.dtype() != DType::F32 || !xs.device().is_cpu() || dims.last() != Some(&inputs) {
        candle_core::bail!(
            "{what} CPU Linear takes f32 CPU input of width {inputs}, not {:?} {dims:?}",
            xs.dtype()
        );
    }
    let rows = xs.elem_count() / inputs.max(1);
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = outputs;
    }
    let xs = xs.contiguous()?;
    let out = cpu_util::with_cpu_slice(&xs, |lhs| product(lhs, rows))?;
    Tensor::from_vec(out, out_dims, &Device::Cpu)
}

/// How [`widened_product`]'s `widen` lays out a part of the weight: `depth` input rows of `width`
/// output columns (a weight held (in, out)), or `width` output rows of `depth` inputs (one held
/// (out, in), as GGML blocks run along a row's inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PartLayout {
    InputsMajor,
    OutputsMajor,
}

/// `lhs` (rows × inputs) times a weight (inputs → outputs) held in some compact form, by blocks
/// of [`block_width`] output columns over every core, each accumulated over [`DEPTH`] inputs at a
/// time from the f32 values `widen([r0, depth, c0, width], part)` writes into a per-thread part
/// (inputs r0.. and columns c0.., in `layout`); the bias, if any, under the product. `r0` is a
/// multiple of [`DEPTH`].
pub(crate) fn widened_product(
    lhs: &[f32],
    rows: usize,
    [k, n]: [usize; 2],
    bias: Option<&[f32]>,
    layout: PartLayout,
    widen: impl Fn([usize; 4], &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    if rows == 0 || n == 0 {
        return out;
    }
    let dst = SharedOut(out.as_mut_ptr());
    let block_width = block_width(n, rayon::current_num_threads());
    (0..n.div_ceil(block_width))
        .into_par_iter()
        .for_each(|block| {
            let c0 = block * block_width;
            let width = block_width.min(n - c0);
            if let Some(bias) = bias {
                // The product accumulates onto its bias.
                for row in 0..rows {
                    // SAFETY: row < rows and c0 + width ≤ n: inside `out`, in this task's
                    // columns.
                    let dst_row =
                        unsafe { std::slice::from_raw_parts_mut(dst.at(row * n + c0), width) };
                    dst_row.copy_from_slice(&bias[c0..c0 + width]);
                }
            }
            WIDENED.with_borrow_mut(|widened| {
                widened.resize(DEPTH.min(k) * width, 0.0);
                for r0 in (0..k).step_by(DEPTH) {
                    let depth = DEPTH.min(k - r0);
                    widen([r0, depth, c0, width], &mut widened[..depth * width]);
                    let lhs = Strided {
                        ptr: lhs[r0..].as_ptr(),
                        row: k as isize,
                        col: 1,
                    };
                    let rhs = match layout {
                        PartLayout::InputsMajor => Strided {
                            ptr: widened.as_ptr(),
                            row: width as isize,
                            col: 1,
                        },
                        PartLayout::OutputsMajor => Strided {
                            ptr: widened.as_ptr(),
                            row: 1,
                            col: depth as isize,
                        },
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
                            r0 > 0 || bias.is_some(),
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

/// Which weights a model holds as its file stores them: on the CPU in f32, the Linear weights
/// (and embeddings) stored in bf16 or f16. A model asks per layer; names the file does not
/// know (a renamed single-file checkpoint's, say) are read in the model's dtype as before.
pub struct Holding<'a> {
    stored: Option<&'a StoredDtypes>,
    cpu_f32: bool,
    /// The Linear layers quantized on load, or a GGUF file's blocks taken as they are
    /// ([`Self::with_layers`]); dense: as above.
    layers: LayerSource<'a>,
}

impl<'a> Holding<'a> {
    /// For a model read through `vb` (its device and dtype decide) from a file storing `stored`.
    pub fn new(stored: &'a StoredDtypes, vb: &VarBuilder) -> Self {
        Self {
            stored: Some(stored),
            cpu_f32: vb.device().is_cpu() && vb.dtype() == DType::F32,
            layers: WeightFormat::Dense.into(),
        }
    }

    /// The Linear layers read in the model's dtype and held in `layers.format`
    /// ([`BlockLinear`]: a quantized T5) where the format takes their rows
    /// ([`WeightFormat::for_inputs`]), or taken as a GGUF file's blocks (`layers.stored`).
    pub fn with_layers(self, layers: LayerSource<'a>) -> Self {
        Self { layers, ..self }
    }

    /// Whether layers are taken from stored blocks (a GGUF file's).
    pub fn takes_stored_blocks(&self) -> bool {
        matches!(self.layers.format, WeightFormat::Stored(_)) && self.layers.stored.is_some()
    }

    /// Every weight in the model's dtype.
    #[cfg(test)]
    pub fn none() -> Self {
        Self {
            stored: None,
            cpu_f32: false,
            layers: WeightFormat::Dense.into(),
        }
    }

    /// The half-precision dtype `vb`'s `weight` is held in, if it is held as stored.
    pub fn as_stored(&self, vb: &VarBuilder) -> Option<DType> {
        let stored = self.stored?.of(&format!("{}.weight", vb.prefix()))?;
        (self.cpu_f32 && is_half(stored)).then_some(stored)
    }

    /// Whether a layer of `input` inputs is quantized: then its weight is read in the model's
    /// dtype (not as stored) and made into blocks.
    pub fn quantizes(&self, input: usize) -> bool {
        !matches!(
            self.layers.format.for_inputs(input),
            WeightFormat::Dense | WeightFormat::Stored(_)
        )
    }

    /// `vb` reading its `weight` as it is held: as stored where [`Self::as_stored`] says.
    pub fn reading(&self, vb: VarBuilder<'a>) -> VarBuilder<'a> {
        match self.as_stored(&vb) {
            Some(stored) => vb.to_dtype(stored),
            None => vb,
        }
    }

    /// A Linear layer (`input` → `output`, with or without its bias), held as stored where
    /// [`Self::as_stored`] says, or quantized ([`Self::quantizes`]).
    pub fn linear(
        &self,
        vb: VarBuilder<'a>,
        input: usize,
        output: usize,
        with_bias: bool,
    ) -> candle_core::Result<HeldLinear> {
        if let Some(blocks) = self.layers.stored_blocks(&vb, input, output)? {
            let bias = with_bias.then(|| vb.get(output, "bias")).transpose()?;
            let choice = self.layers.format.cpu_choice();
            let layer = BlockLinear::from_blocks(blocks, bias.as_ref(), choice, vb.device())?;
            return Ok(HeldLinear::Quantized(Box::new(layer)));
        }
        let weight = if self.quantizes(input) {
            vb.get((output, input), "weight")?
        } else {
            self.reading(vb.clone()).get((output, input), "weight")?
        };
        let bias = with_bias.then(|| vb.get(output, "bias")).transpose()?;
        self.hold(weight, bias)
    }

    /// A Linear layer of `weight` (out, in) and `bias` as this holding holds it: quantized, or
    /// as it is (a `weight` in bf16 or f16 on the CPU, [`Self::as_stored`]'s, [`Linear`] holds
    /// so and multiplies in f32).
    pub fn hold(&self, weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<HeldLinear> {
        if self.quantizes(weight.dim(1)?) {
            let dense = Linear::new(weight, bias);
            return Ok(HeldLinear::Quantized(Box::new(BlockLinear::from_dense(
                dense,
                self.layers.format,
            )?)));
        }
        Ok(HeldLinear::Full(Linear::new(weight, bias)))
    }
}

/// The dtype a model loaded through [`Holding`] holds `name` (stored as `stored`) in when it
/// runs in `dtype`, on the CPU when `on_cpu`: the Linear weights and embeddings (`*.weight`
/// but the layer norms') as stored when that is half precision on the CPU in f32; biases and
/// norms in the model's dtype. For the memory planner.
pub fn held_dtype(name: &str, stored: DType, dtype: DType, on_cpu: bool) -> DType {
    let held = name.ends_with(".weight") && !name.contains("layer_norm");
    if on_cpu && dtype == DType::F32 && is_half(stored) && held {
        stored
    } else {
        dtype
    }
}

/// Whether a dtype is bf16 or f16.
pub fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// A Linear layer as [`Holding`] holds it.
#[derive(Debug)]
pub enum HeldLinear {
    /// In the model's dtype, or in half precision on the CPU ([`Linear`]).
    Full(Linear),
    /// Quantized on load ([`Holding::with_layers`]).
    Quantized(Box<BlockLinear>),
}

impl HeldLinear {
    /// Bytes the weight and bias are held in.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Full(layer) => layer.bytes(),
            Self::Quantized(layer) => layer.bytes(),
        }
    }
}

impl candle_core::Module for HeldLinear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Full(layer) => layer.forward(xs),
            Self::Quantized(layer) => layer.forward(xs),
        }
    }
}

/// `dst` (rows × `width`) from bf16 bits whose rows lie `stride` apart in `src`: the bits shifted
/// into an f32's upper half, exact.
#[inline(always)]
fn widen_bf16_impl(src: &[u16], stride: usize, width: usize, dst: &mut [f32]) {
    for (row, out) in dst.chunks_exact_mut(width.max(1)).enumerate() {
        for (o, &bits) in out.iter_mut().zip(&src[row * stride..]) {
            *o = f32::from_bits(u32::from(bits) << 16);
        }
    }
}

/// As [`widen_bf16_impl`] for f16 bits, branch-free so that it vectorises (the `half` crate's
/// slice conversion ran 7.5–8 G values/s on a Zen 4 core, this 3× that): exponent and mantissa
/// moved into an f32's places and scaled by 2¹¹² (15 − 127 exponent bias; f16 subnormals come
/// out normal, exactly), infinities and NaN given f32's all-ones exponent, the sign put back.
#[inline(always)]
fn widen_f16_impl(src: &[u16], stride: usize, width: usize, dst: &mut [f32]) {
    const TWO_POW_112: f32 = 5.192_297e33;
    for (row, out) in dst.chunks_exact_mut(width.max(1)).enumerate() {
        for (o, &bits) in out.iter_mut().zip(&src[row * stride..]) {
            let h = u32::from(bits);
            let magnitude = (h & 0x7fff) << 13;
            let finite = (f32::from_bits(magnitude) * TWO_POW_112).to_bits();
            let widened = if h & 0x7c00 == 0x7c00 {
                magnitude | 0x7f80_0000
            } else {
                finite
            };
            *o = f32::from_bits(widened | ((h & 0x8000) << 16));
        }
    }
}

avx512_dispatch!(fn widen_bf16(src: &[u16], stride: usize, width: usize, dst: &mut [f32]) = widen_bf16_impl);
avx512_dispatch!(fn widen_f16(src: &[u16], stride: usize, width: usize, dst: &mut [f32]) = widen_f16_impl);

/// `dst` = `src` widened to f32, exactly.
pub(crate) fn widen_bf16_slice(src: &[bf16], dst: &mut [f32]) {
    widen_bf16(src.reinterpret_cast(), src.len(), src.len(), dst)
}

/// `dst` = `src` widened to f32, exactly.
pub(crate) fn widen_f16_slice(src: &[f16], dst: &mut [f32]) {
    widen_f16(src.reinterpret_cast(), src.len(), src.len(), dst)
}

/// Columns per task: [`BLOCK`], or fewer where that would leave under four tasks a thread (a
/// 1280-wide layer in five blocks kept one of two cores idle a fifth of the time).
fn block_width(outputs: usize, threads: usize) -> usize {
    let even = outputs.div_ceil(4 * threads.max(1)).next_multiple_of(16);
    even.clamp(64, BLOCK)
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
                let weight = Tensor::randn(0f32, 1., (outputs, inputs), &dev)?.to_dtype(dtype)?;
                let mut x_dims = dims.clone();
                x_dims.push(inputs);
                let xs = Tensor::randn(0f32, 1., x_dims, &dev)?;
                let ours = HalfLinear::new(&weight, None)?.forward(&xs)?;
                let exact = xs.broadcast_matmul(&weight.to_dtype(DType::F32)?.t()?)?;
                assert_eq!(ours.dims(), exact.dims());
                let excess = beyond_summation_error(&ours, &exact, &xs, &weight, None)?;
                assert!(
                    excess <= 0.0,
                    "{dtype:?} {dims:?}×{inputs}→{outputs}: {excess}"
                );
            }
        }
        Ok(())
    }

    /// How far `ours` lies from `exact` beyond what summing the same f32 terms in another order
    /// may change (at most, per element, (inputs + 1) roundings of the sum of the terms'
    /// magnitudes); ≤ 0 when within it. Any wrong term or block is far outside.
    fn beyond_summation_error(
        ours: &Tensor,
        exact: &Tensor,
        xs: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<f32> {
        let inputs = weight.dim(1)?;
        let magnitudes = xs
            .abs()?
            .broadcast_matmul(&weight.to_dtype(DType::F32)?.abs()?.t()?)?;
        let magnitudes = match bias {
            Some(b) => magnitudes.broadcast_add(&b.abs()?)?,
            None => magnitudes,
        };
        let bound = (magnitudes * ((inputs + 1) as f64 * f64::from(f32::EPSILON) / 2.0))?;
        ((ours - exact)?.abs()? - bound)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()
    }

    /// Every f16 and bf16 value (NaN by class) widens as the `half` crate widens it.
    #[test]
    fn widening_is_exact_for_every_half_value() {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        for (name, widen, reference) in [
            (
                "f16",
                widen_f16 as fn(&[u16], usize, usize, &mut [f32]),
                (|b| f16::from_bits(b).to_f32()) as fn(u16) -> f32,
            ),
            ("bf16", widen_bf16, |b| bf16::from_bits(b).to_f32()),
        ] {
            // As 256 rows of 256 (stride 256) and as 128 rows of 200 values 512 apart.
            let mut whole = vec![0f32; bits.len()];
            widen(&bits, 256, 256, &mut whole);
            for (&b, &w) in bits.iter().zip(&whole) {
                let want = reference(b);
                assert!(
                    w.to_bits() == want.to_bits() || (w.is_nan() && want.is_nan()),
                    "{name} {b:#06x}: {w} for {want}"
                );
            }
            let mut strided = vec![0f32; 128 * 200];
            widen(&bits[..127 * 512 + 200], 512, 200, &mut strided);
            for (i, &w) in strided.iter().enumerate() {
                let want = whole[(i / 200) * 512 + i % 200];
                assert!(w.to_bits() == want.to_bits() || (w.is_nan() && want.is_nan()));
            }
        }
    }

    /// With a bias, over a partial column block and more than one part of the inputs.
    #[test]
    fn half_held_product_adds_its_bias() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (inputs, outputs) = (DEPTH + 3, BLOCK + 5);
        let weight = Tensor::randn(0f32, 1., (outputs, inputs), &dev)?.to_dtype(DType::F16)?;
        let bias = Tensor::randn(0f32, 10., outputs, &dev)?;
        let xs = Tensor::randn(0f32, 1., (2, 3, inputs), &dev)?;
        let ours = HalfLinear::new(&weight, Some(&bias))?.forward(&xs)?;
        let exact = xs
            .broadcast_matmul(&weight.to_dtype(DType::F32)?.t()?)?
            .broadcast_add(&bias)?;
        let excess = beyond_summation_error(&ours, &exact, &xs, &weight, Some(&bias))?;
        assert!(excess <= 0.0, "{excess}");
        Ok(())
    }

    #[test]
    fn refuses_what_it_cannot_multiply() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let f32_weight = Tensor::zeros((4, 8), DType::F32, &dev)?;
        assert!(HalfLinear::new(&f32_weight, None).is_err());
        let layer = HalfLinear::new(&f32_weight.to_dtype(DType::BF16)?, None)?;
        assert!(layer
            .forward(&Tensor::zeros((2, 7), DType::F32, &dev)?)
            .is_err());
        assert!(layer
            .forward(&Tensor::zeros((2, 8), DType::F16, &dev)?)
            .is_err());
        assert_eq!(
            layer
                .forward(&Tensor::zeros((2, 8), DType::F32, &dev)?)?
                .dims(),
            [2, 4]
        );
        Ok(())
    }
}
