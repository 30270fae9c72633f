//! GGML-quantized Linear layers on the CPU, held once: their blocks dequantized a cache-sized
//! part at a time and multiplied in f32.
//!
//! candle 0.11's own CPU product of a quantized layer (`QMatMul`) has two costs this avoids. For
//! q8_0, q4k and q6k it repacks the blocks into int8 tiles on first use and keeps the tiles beside
//! the blocks (`quantized/repack.rs`), so the weights are held twice: FLUX.1-dev in q6k or q8_0
//! then outgrew a 24 GiB machine in its first forward. For the other formats (q4_0, q4_1, q5_0,
//! q5_1, q5k) it has no tiles and takes a row-by-row dot product, 3.5–11× the f32 layer's time at
//! FLUX's shapes. Here a task's output columns are dequantized [`DEPTH`] inputs at a time into the
//! same per-thread part the half-precision layers widen into ([`widened_product`]), so every
//! format costs about the f32 layer's time at the blocks' memory. The products are f32 products
//! of the dequantized weights — diffusers' GGUF layers compute the same (dequantize, then
//! multiply); candle's tiles also round the activations to 8 bits.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0,
};
use candle_core::quantized::{GgmlDType, GgmlType, QStorage, QTensor, QuantizedType};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::cpu_half_linear::{forward_f32, widened_product, PartLayout, DEPTH};

/// A block format's two row operations, for its candle block type.
#[derive(Debug, Clone, Copy)]
struct BlockFns {
    /// [`quantize_rows`].
    quantize: fn(&[f32], usize) -> Box<dyn QuantizedType>,
    /// [`dequantize_part`].
    dequantize: fn(&[u8], [usize; 5], &mut [f32]),
}

impl BlockFns {
    fn of<T: GgmlType + Send + Sync + 'static>() -> Self {
        Self {
            quantize: quantize_rows::<T>,
            dequantize: dequantize_part::<T>,
        }
    }

    /// The formats `--quantize` offers and GGUF files hold, by their candle block type: the one
    /// table of them.
    fn for_format(format: GgmlDType) -> Option<Self> {
        Some(match format {
            GgmlDType::Q8_0 => Self::of::<BlockQ8_0>(),
            GgmlDType::Q4_0 => Self::of::<BlockQ4_0>(),
            GgmlDType::Q4_1 => Self::of::<BlockQ4_1>(),
            GgmlDType::Q5_0 => Self::of::<BlockQ5_0>(),
            GgmlDType::Q5_1 => Self::of::<BlockQ5_1>(),
            GgmlDType::Q4K => Self::of::<BlockQ4K>(),
            GgmlDType::Q5K => Self::of::<BlockQ5K>(),
            GgmlDType::Q6K => Self::of::<BlockQ6K>(),
            // Not offered by `--quantize`, but in GGUF files (q2_k, q3_k_s, …).
            GgmlDType::Q2K => Self::of::<BlockQ2K>(),
            GgmlDType::Q3K => Self::of::<BlockQ3K>(),
            _ => return None,
        })
    }
}

/// A Linear layer whose weight (out, in) is held as GGML blocks on the CPU; its bias in f32.
#[derive(Debug)]
pub struct QuantizedCpuLinear {
    /// The blocks, each output row's one after another along its inputs (boxed: a `QTensor`
    /// holds candle's repack cache and, with CUDA, its device storage inline, ~270 bytes).
    blocks: Box<QTensor>,
    /// The blocks' dequantization, chosen once for their format.
    dequantize: fn(&[u8], [usize; 5], &mut [f32]),
    bias: Option<Vec<f32>>,
    inputs: usize,
    outputs: usize,
}

// A part's inputs start at a multiple of DEPTH: whole blocks for every format (k-quants' blocks
// are the largest, 256 values).
const _: () = assert!(DEPTH.is_multiple_of(256));

impl QuantizedCpuLinear {
    /// `weight` (out, in) quantized to `format`, with a bias of `out` values. `in` must be a
    /// multiple of the format's block.
    pub fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        format: GgmlDType,
    ) -> candle_core::Result<Self> {
        let inputs = weight.dim(1)?;
        if !weight.device().is_cpu() {
            candle_core::bail!("a quantized CPU Linear from a weight on another device");
        }
        if !inputs.is_multiple_of(format.block_size()) {
            candle_core::bail!("a quantized CPU Linear of {inputs} inputs in {format:?}");
        }
        Self::from_blocks(quantize(weight, format)?, bias)
    }

    /// Whether this product takes blocks of `format`.
    pub fn takes(format: GgmlDType) -> bool {
        BlockFns::for_format(format).is_some()
    }

    /// A layer of `blocks` (out, in) as they are (a GGUF file's), with a bias of `out` values.
    pub fn from_blocks(blocks: QTensor, bias: Option<&Tensor>) -> candle_core::Result<Self> {
        let (outputs, inputs) = blocks.shape().dims2()?;
        let format = blocks.dtype();
        let fns =
            BlockFns::for_format(format).filter(|_| inputs.is_multiple_of(format.block_size()));
        let Some(fns) = fns else {
            candle_core::bail!("a quantized CPU Linear of {inputs} inputs in {format:?}");
        };
        if !blocks.device().is_cpu() {
            candle_core::bail!("a quantized CPU Linear from blocks on another device");
        }
        let bias = super::cpu_util::optional_bias(bias, outputs)?;
        Ok(Self {
            blocks: Box::new(blocks),
            dequantize: fns.dequantize,
            bias,
            inputs,
            outputs,
        })
    }

    /// Bytes the blocks and bias are held in.
    pub fn bytes(&self) -> usize {
        self.blocks.storage_size_in_bytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    /// `xs` (…, in), f32 on the CPU, times the weight: (…, out) in f32.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (k, n) = (self.inputs, self.outputs);
        let (bytes, dequantize) = (self.blocks.data()?, self.dequantize);
        forward_f32("a quantized", xs, k, n, |lhs, rows| {
            widened_product(
                lhs,
                rows,
                [k, n],
                self.bias.as_deref(),
                PartLayout::OutputsMajor,
                |[r0, depth, c0, width], part| dequantize(&bytes, [k, r0, depth, c0, width], part),
            )
        })
    }
}

/// `weight` (out, in) quantized to `format` as candle's `QTensor::quantize` does it, block for
/// block, but on every core for a CPU weight: candle quantizes a tensor on one thread (a GPU's
/// too, copied to the CPU), which took ~200 s of FLUX.1-dev's 352 s q6k build here. Blocks are
/// independent, so rows quantized apart give the same bytes.
pub fn quantize(weight: &Tensor, format: GgmlDType) -> candle_core::Result<QTensor> {
    let weight = weight.to_dtype(DType::F32)?;
    let (outputs, inputs) = weight.dims2()?;
    if !weight.device().is_cpu() || !inputs.is_multiple_of(format.block_size()) {
        return QTensor::quantize(&weight, format);
    }
    let Some(BlockFns { quantize: rows, .. }) = BlockFns::for_format(format) else {
        return QTensor::quantize(&weight, format);
    };
    let weight = weight.contiguous()?;
    let storage = super::cpu_util::with_cpu_slice(&weight, |values| rows(values, inputs))?;
    QTensor::new(QStorage::Cpu(storage), (outputs, inputs))
}

/// Rows of `inputs` values (a whole number of `T` blocks each) quantized to `T`, a few rows per
/// task.
fn quantize_rows<T: GgmlType + Send + Sync + 'static>(
    values: &[f32],
    inputs: usize,
) -> Box<dyn QuantizedType> {
    const ROWS: usize = 16;
    let per_row = inputs / T::BLCK_SIZE;
    let mut blocks = vec![T::zeros(); values.len() / T::BLCK_SIZE];
    blocks
        .par_chunks_mut(ROWS * per_row)
        .zip(values.par_chunks(ROWS * inputs))
        .for_each(|(dst, src)| T::from_float(src, dst));
    Box::new(blocks)
}

/// Output rows c0..c0 + `width` of a weight of `k` inputs a row, held as `T` blocks in `bytes`,
/// dequantized over inputs r0..r0 + `depth` (whole blocks) into `part`: `width` rows of `depth`.
fn dequantize_part<T: GgmlType>(
    bytes: &[u8],
    [k, r0, depth, c0, width]: [usize; 5],
    part: &mut [f32],
) {
    // SAFETY: `bytes` are a CPU QTensor's storage of `T` blocks (its dtype chose `T`): a
    // `Vec<T>`'s buffer, so aligned for `T` and a whole number of blocks long.
    let blocks: &[T] = unsafe {
        std::slice::from_raw_parts(
            bytes.as_ptr().cast::<T>(),
            bytes.len() / std::mem::size_of::<T>(),
        )
    };
    let per_row = k / T::BLCK_SIZE;
    let (first, count) = (r0 / T::BLCK_SIZE, depth / T::BLCK_SIZE);
    for (j, out) in part.chunks_exact_mut(depth).take(width).enumerate() {
        let row = (c0 + j) * per_row + first;
        T::to_float(&blocks[row..row + count], out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GGML block formats `--quantize` offers.
    const FORMATS: [GgmlDType; 8] = [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];
    use candle_core::{Device, Module};

    /// Against candle's own dequantization of the same blocks multiplied in f32, within the
    /// rounding of a sum of the same terms in another order ((inputs + 1) roundings of the sum of
    /// their magnitudes, per element): every format, with and without a bias, at shapes with a
    /// partial column block, several parts of the inputs with a partial last one, and one row.
    #[test]
    fn product_is_the_f32_product_of_the_dequantized_blocks() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for format in FORMATS {
            for (dims, inputs, outputs, with_bias) in [
                (vec![1], 256, 3, false),
                (vec![2, 5], 2 * DEPTH + 256, 300, true),
                (vec![77], 512, 64, false),
            ] {
                let weight = Tensor::randn(0f32, 1., (outputs, inputs), &dev)?;
                let bias = with_bias
                    .then(|| Tensor::randn(0f32, 10., outputs, &dev))
                    .transpose()?;
                let mut x_dims = dims.clone();
                x_dims.push(inputs);
                let xs = Tensor::randn(0f32, 1., x_dims, &dev)?;
                let layer = QuantizedCpuLinear::new(&weight, bias.as_ref(), format)?;
                let ours = layer.forward(&xs)?;
                let dequantized = QTensor::quantize(&weight, format)?.dequantize(&dev)?;
                let exact = super::super::blocks::Linear::new(dequantized.clone(), bias.clone())
                    .forward(&xs)?;
                assert_eq!(ours.dims(), exact.dims());
                let magnitudes = xs.abs()?.broadcast_matmul(&dequantized.abs()?.t()?)?;
                let magnitudes = match &bias {
                    Some(b) => magnitudes.broadcast_add(&b.abs()?)?,
                    None => magnitudes,
                };
                let bound = (magnitudes * ((inputs + 1) as f64 * f64::from(f32::EPSILON) / 2.0))?;
                let excess = ((ours - exact)?.abs()? - bound)?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                assert!(
                    excess <= 0.0,
                    "{format:?} {dims:?}×{inputs}→{outputs}: {excess}"
                );
                // Held once: the blocks (and the bias), nothing beside them.
                let block_bytes = inputs / format.block_size() * format.type_size() * outputs;
                assert_eq!(
                    layer.bytes(),
                    block_bytes + 4 * outputs * usize::from(with_bias)
                );
            }
        }
        Ok(())
    }

    /// Quantized on every core, block for block what candle's one-thread `QTensor::quantize`
    /// gives, for every format (rows past one task's, and a partial last task).
    #[test]
    fn quantized_on_every_core_as_candle_quantizes() -> candle_core::Result<()> {
        let weight = Tensor::randn(0f32, 1., (37, 512), &Device::Cpu)?;
        for format in FORMATS {
            let ours = quantize(&weight, format)?;
            let candle = QTensor::quantize(&weight, format)?;
            assert_eq!(ours.shape(), candle.shape());
            assert_eq!(ours.dtype(), format);
            assert!(ours.data()? == candle.data()?, "{format:?}");
        }
        Ok(())
    }

    #[test]
    fn refuses_what_it_cannot_hold_or_multiply() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let weight = Tensor::zeros((4, 64), DType::F32, &dev)?;
        // 64 inputs are not a whole k-quant block, and q8_1 is no `--quantize` format.
        assert!(QuantizedCpuLinear::new(&weight, None, GgmlDType::Q4K).is_err());
        assert!(QuantizedCpuLinear::new(&weight, None, GgmlDType::Q8_1).is_err());
        let layer = QuantizedCpuLinear::new(&weight, None, GgmlDType::Q8_0)?;
        assert!(layer
            .forward(&Tensor::zeros((2, 63), DType::F32, &dev)?)
            .is_err());
        assert!(layer
            .forward(&Tensor::zeros((2, 64), DType::F16, &dev)?)
            .is_err());
        assert_eq!(
            layer
                .forward(&Tensor::zeros((2, 64), DType::F32, &dev)?)?
                .dims(),
            [2, 4]
        );
        Ok(())
    }
}
