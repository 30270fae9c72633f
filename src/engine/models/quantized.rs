//! Linear layers whose weights may be quantized on load ([`WeightFormat`]: GGML blocks or FP8),
//! and the product each format runs on the CPU or a GPU: the diffusion transformers' blocks,
//! T5-XXL's layers and the UNet's transformer blocks hold theirs so (`--quantize`).

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{computing, in_f32, linear, linear_no_bias, Biased, Linear};
use super::cpu_int8_tiles::{self as int8_tiles, KQuantTileLinear, Q8TileLinear};
use super::cpu_quantized_linear::QuantizedCpuLinear;

/// How the transformer blocks' dense layers hold their weights: as loaded, quantized on load to
/// a GGML block format (Q8_0, Q4_K, …), or as FP8 — to fit FLUX or SD3.5 Large on smaller cards,
/// and on the CPU to run the products on int8 tiles (SDXL's UNet in q8_0: 0.73× its f32 step).
/// The embedders, the output projection and a UNet's convolutions stay dense, as in the
/// community GGUF and FP8 conversions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    #[default]
    Dense,
    /// GGML blocks, multiplied on the CPU as the second field says.
    Quantized(GgmlDType, CpuQuantized),
    /// FP8 e4m3 codes with one power-of-two scale per output channel: half of bf16's memory, the
    /// format of the community "fp8_e4m3fn" checkpoints (their values load exactly). Each
    /// forward widens a layer's codes to the activations' dtype for the product.
    Fp8,
    /// The blocks as a GGUF transformer file stores them, each layer in its own GGML format
    /// (city96's `flux1-dev-Q4_K_S.gguf` mixes q4k, q5k and f16), multiplied on the CPU as the
    /// field says; layers the file stores as floats stay dense.
    Stored(CpuQuantized),
}

/// How a GGML-quantized layer multiplies on the CPU (a GPU runs candle's kernels either way).
/// Measured at FLUX's shapes (1 536 tokens, 3 072 ↔ 12 288 wide, 2 Zen 4 cores), against the f32
/// layer's time: our int8 tiles 0.37–0.56× (q8_0, q4k, q6k), candle's tiles 0.49–0.85×, the blocks
/// dequantized into f32 products 1.0–1.1× in every format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuQuantized {
    /// q8_0, q4k and q6k on CPUs with VNNI (AVX-512, or AVX-VNNI): our int8 tiles, held once
    /// ([`Q8TileLinear`], 0.37–0.53× the f32 layer's time; [`KQuantTileLinear`], q4k
    /// 0.40–0.56×, q6k 0.46–0.55×; on 256-bit registers 0.63–1.02×).
    /// Otherwise candle's int8
    /// product where it has one for the format ([`cpu_repacks`]), from tiles it repacks the
    /// blocks into on first use and keeps beside them: held twice. Formats it has no tiles for
    /// are held once ([`QuantizedCpuLinear`]): candle's row-by-row product for them took 3.5–11×
    /// the f32 layer's time. [`WeightFormat::cpu_product`] decides.
    #[default]
    Fastest,
    /// Held once and dequantized into f32 products ([`QuantizedCpuLinear`]: diffusers' GGUF
    /// arithmetic, no rounding of the activations): what fits a model the twice-held one would
    /// not (`Footprint::read_fitted` chooses it so; `--quantize q6k-compact` asks for it).
    Compact,
}

/// The product a quantized layer runs on the CPU: the one decision the loader
/// ([`BlockLinear::from_dense`]) and the memory planner
/// ([`WeightFormat::resident_bits_per_weight`]) both read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuProduct {
    /// candle's `QMatMul`, its tiles beside the blocks: held twice.
    CandleTiles,
    /// [`Q8TileLinear`].
    Q8Tiles,
    /// [`KQuantTileLinear`] (q4k, q6k).
    KQuantTiles,
    /// [`QuantizedCpuLinear`]: the blocks dequantized into f32 products.
    Dequantized,
}

/// Whether candle's tiles of a `format` layer end up held on this CPU, beside the blocks: where
/// candle repacks the format ([`candle_repacks`]) and ours do not take it.
pub fn cpu_repacks(format: GgmlDType) -> bool {
    WeightFormat::Quantized(format, CpuQuantized::Fastest).cpu_product()
        == Some(CpuProduct::CandleTiles)
}

/// Whether candle 0.11's CPU product of a `format` layer repacks its blocks into tiles it keeps
/// (`quantized/repack_x86.rs`'s `select`: q4k, q6k, and q8_0 on CPUs with VNNI; aarch64's
/// `repack.rs`: the formats with dot-product kernels, where the CPU has them).
fn candle_repacks(format: GgmlDType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match format {
            GgmlDType::Q4K | GgmlDType::Q6K => true,
            GgmlDType::Q8_0 => {
                std::arch::is_x86_feature_detected!("avx512vnni")
                    || std::arch::is_x86_feature_detected!("avxvnni")
            }
            _ => false,
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        matches!(
            format,
            GgmlDType::Q4_0 | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K | GgmlDType::Q8_0
        ) && std::arch::is_aarch64_feature_detected!("dotprod")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = format;
        false
    }
}

impl WeightFormat {
    /// Bits per weight of the blocks' layers (`None` for dense: the load dtype's width).
    pub fn bits_per_weight(self) -> Option<f64> {
        match self {
            // Stored blocks: each layer's own format's (`GgufFile`), counted per tensor.
            Self::Dense | Self::Stored(_) => None,
            Self::Quantized(t, _) => Some(t.type_size() as f64 * 8.0 / t.block_size() as f64),
            Self::Fp8 => Some(8.0),
        }
    }

    /// Bits each weight holds resident (`None` for dense) on the CPU when `on_cpu`: candle
    /// 0.11's CPU product of a GGML layer it has tiles for repacks the blocks into them on first
    /// use and keeps them beside the blocks (`quantized/repack.rs`, `PackedCache`), so those
    /// are held twice ([`CpuQuantized::Fastest`]). Measured: FLUX's blocks in q6k / q8_0 grew
    /// the resident set by 1.2× their size in the first forward, which killed FLUX-dev on a
    /// 24 GiB machine.
    pub fn resident_bits_per_weight(self, on_cpu: bool) -> Option<f64> {
        let bits = self.bits_per_weight()?;
        Some(match (self, self.cpu_product()) {
            _ if !on_cpu => bits,
            (_, Some(CpuProduct::CandleTiles)) => 2.0 * bits,
            // Our k-quant tiles widen the super-blocks' d (and dmin) to f32.
            (Self::Quantized(t, _), Some(CpuProduct::KQuantTiles)) => {
                KQuantTileLinear::bits_per_weight(t).unwrap_or(bits)
            }
            _ => bits,
        })
    }

    /// Bytes a layer of `rows` × `inputs` weights holds in this format (`None` for dense): the
    /// resident bits of each weight ([`Self::resident_bits_per_weight`]), and FP8's scale per
    /// row in `compute` (the layer's compute dtype); as [`BlockLinear::bytes`] counts them, but
    /// the bias.
    pub fn layer_bytes(
        self,
        [rows, inputs]: [usize; 2],
        on_cpu: bool,
        compute: DType,
    ) -> Option<u64> {
        let bits = self.resident_bits_per_weight(on_cpu)?;
        let scales = match self {
            Self::Fp8 => rows * compute.size_in_bytes(),
            _ => 0,
        };
        Some(((rows * inputs) as f64 * bits / 8.0).round() as u64 + scales as u64)
    }

    /// Whether the CPU holds these blocks twice (candle's tiles beside them).
    pub fn held_twice_on_cpu(self) -> bool {
        self.cpu_product() == Some(CpuProduct::CandleTiles)
    }

    /// The product a layer in this format runs on this CPU (`None` when not GGML-quantized).
    pub fn cpu_product(self) -> Option<CpuProduct> {
        let Self::Quantized(t, choice) = self else {
            return None;
        };
        Some(match (t, choice) {
            (_, CpuQuantized::Compact) => CpuProduct::Dequantized,
            (GgmlDType::Q8_0, _) if int8_tiles::takes(t) => CpuProduct::Q8Tiles,
            (GgmlDType::Q4K | GgmlDType::Q6K, _) if int8_tiles::takes(t) => CpuProduct::KQuantTiles,
            _ if candle_repacks(t) => CpuProduct::CandleTiles,
            _ => CpuProduct::Dequantized,
        })
    }

    /// The format one stored layer of GGML `blocks` is held in under this one: its own format,
    /// multiplied as a `Stored` format says (`None` for other formats).
    pub fn stored_as(self, blocks: GgmlDType) -> Option<Self> {
        match self {
            Self::Stored(choice) => Some(Self::Quantized(blocks, choice)),
            _ => None,
        }
    }

    /// How this format's blocks multiply on the CPU (the fastest product where it says none).
    pub fn cpu_choice(self) -> CpuQuantized {
        match self {
            Self::Quantized(_, choice) | Self::Stored(choice) => choice,
            Self::Dense | Self::Fp8 => CpuQuantized::Fastest,
        }
    }

    /// The format a layer of `inputs` inputs is held in: this one where its blocks divide the
    /// row; for the k-quants (256-value blocks) on other rows, llama.cpp's fallback for them
    /// (q4k → q5_0, q5k → q5_1, q6k → q8_0: 32-value blocks, a little more precise) — SD3.5
    /// Large's rows are 2 432 wide, so under q4k most of its layers had stayed dense; else dense.
    pub fn for_inputs(self, inputs: usize) -> Self {
        let Self::Quantized(t, product) = self else {
            return self;
        };
        if inputs.is_multiple_of(t.block_size()) {
            return self;
        }
        let fallback = match t {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            _ => return Self::Dense,
        };
        Self::Quantized(fallback, product).for_inputs(inputs)
    }

    /// The same blocks held once on the CPU.
    pub fn compact(self) -> Self {
        match self {
            Self::Quantized(t, _) => Self::Quantized(t, CpuQuantized::Compact),
            Self::Stored(_) => Self::Stored(CpuQuantized::Compact),
            other => other,
        }
    }
}

/// The name [`WeightFormat`]'s `FromStr` reads (`--quantize`'s).
impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (t, product) = match self {
            Self::Dense => return write!(f, "dense"),
            Self::Fp8 => return write!(f, "fp8"),
            Self::Stored(CpuQuantized::Fastest) => return write!(f, "gguf"),
            Self::Stored(CpuQuantized::Compact) => return write!(f, "gguf-compact"),
            Self::Quantized(t, product) => (t, product),
        };
        let name = match t {
            GgmlDType::Q8_0 => "q8_0",
            GgmlDType::Q4_0 => "q4_0",
            GgmlDType::Q4_1 => "q4_1",
            GgmlDType::Q5_0 => "q5_0",
            GgmlDType::Q5_1 => "q5_1",
            GgmlDType::Q4K => "q4k",
            GgmlDType::Q5K => "q5k",
            GgmlDType::Q6K => "q6k",
            other => return write!(f, "{other:?}"),
        };
        let compact = if *product == CpuQuantized::Compact {
            "-compact"
        } else {
            ""
        };
        write!(f, "{name}{compact}")
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = String;

    /// `dense`, `fp8`, or a GGML block format: `q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`, `q4k`,
    /// `q5k`, `q6k`, each optionally `-compact` (held once on the CPU, [`CpuQuantized`]); `gguf`
    /// (`-compact`): as a GGUF transformer file stores them, what such a file loads as anyway.
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase().replace('_', "");
        let (name, product) = match lower.strip_suffix("-compact") {
            Some(name) => (name, CpuQuantized::Compact),
            None => (lower.as_str(), CpuQuantized::Fastest),
        };
        let t = match name {
            "dense" | "none" => return Ok(Self::Dense),
            "fp8" | "fp8e4m3" | "fp8e4m3fn" | "f8e4m3" => return Ok(Self::Fp8),
            "gguf" => return Ok(Self::Stored(product)),
            "q80" => GgmlDType::Q8_0,
            "q40" => GgmlDType::Q4_0,
            "q41" => GgmlDType::Q4_1,
            "q50" => GgmlDType::Q5_0,
            "q51" => GgmlDType::Q5_1,
            "q4k" => GgmlDType::Q4K,
            "q5k" => GgmlDType::Q5K,
            "q6k" => GgmlDType::Q6K,
            _ => {
                return Err(format!(
                    "unknown weight format `{s}`; use dense, fp8, q8_0, q6k, q5k, q4k, q5_0, q5_1, q4_0 or q4_1 (each with `-compact` to hold it once on the CPU), or gguf for a GGUF transformer file's own formats"
                ))
            }
        };
        Ok(Self::Quantized(t, product))
    }
}

/// The FP8 product as FP8 tensor cores compute it (engine/cuda/fp8.rs), in f32 tensor ops on any
/// device: x rounded to e4m3 at a scale per row (`per_row`) or one for the whole tensor (absmax /
/// 448), times the e4m3 codes, then the activation scales, the weight's per-channel scale and
/// the bias. The reference the device self-check holds each CUDA form to (the same rounding of
/// x, so only the order of the sums and the output's rounding differ).
pub fn fp8_product_reference(
    xs: &Tensor,
    codes: &Tensor,
    scale: &Tensor,
    bias: Option<&Tensor>,
    per_row: bool,
) -> candle_core::Result<Tensor> {
    let x = xs.to_dtype(DType::F32)?;
    let maxima = match per_row {
        true => x.abs()?.max_keepdim(candle_core::D::Minus1)?,
        false => x.abs()?.max_all()?.reshape(vec![1; x.rank()])?,
    };
    // A true division, as the CUDA kernels' (a product by the reciprocal rounds differently).
    let x_scale: Vec<f32> = (maxima.flatten_all()?.to_vec1::<f32>()?.into_iter())
        .map(|m| if m > 0.0 { m / E4M3_MAX } else { 1.0 })
        .collect();
    let x_scale = Tensor::from_vec(x_scale, maxima.shape(), xs.device())?;
    let x_codes = cast(
        &cast(&x.broadcast_div(&x_scale)?, DType::F8E4M3)?,
        DType::F32,
    )?;
    let ys = x_codes
        .broadcast_matmul(&cast(codes, DType::F32)?.t()?)?
        .broadcast_mul(&x_scale)?
        .broadcast_mul(&scale.to_dtype(DType::F32)?)?;
    match bias {
        Some(b) => ys.broadcast_add(&b.to_dtype(DType::F32)?),
        None => Ok(ys),
    }
}

/// One input several layers read (a stream's q, k and v projections): FP8 layers quantize it
/// once, on the first product that wants it, where each quantized it for itself.
pub struct SharedInput<'a> {
    pub xs: &'a Tensor,
    #[cfg(feature = "cuda")]
    fp8_rows: std::cell::OnceCell<Option<crate::engine::cuda::fp8::QuantizedRows>>,
}

impl<'a> SharedInput<'a> {
    pub fn new(xs: &'a Tensor) -> Self {
        Self {
            xs,
            #[cfg(feature = "cuda")]
            fp8_rows: std::cell::OnceCell::new(),
        }
    }
}

/// A dense layer whose weight may be quantized ([`WeightFormat`]). Layers whose input width is
/// not a multiple of the format's block stay dense.
#[derive(Debug)]
pub enum BlockLinear {
    Dense(Linear),
    Quantized {
        weight: QMatMul,
        bias: Tensor,
    },
    /// GGML blocks on the CPU, held once (see [`CpuQuantized`]).
    QuantizedCpu(QuantizedCpuLinear),
    /// q8_0 as int8 tiles on the CPU, held once (see [`CpuQuantized`]).
    Q8Tiles(Q8TileLinear),
    /// q4k or q6k as tiles on the CPU, held once (see [`CpuQuantized`]).
    KQuantTiles(KQuantTileLinear),
    /// y = (x · codesᵀ) · scale + bias: `codes` (out, in) in F8E4M3, `scale` (out) powers of two
    /// in the model's dtype (exact there, and |w / scale| ≤ 448, e4m3's largest value).
    Fp8 {
        codes: Tensor,
        scale: Tensor,
        bias: Option<Tensor>,
        /// CUDA: what the FP8 products take of the scale and bias (made once).
        #[cfg(feature = "cuda")]
        operands: Option<crate::engine::cuda::fp8::Operands>,
    },
}

/// `vb` as a layer of `inputs` inputs held in `format` reads its weight: a quantized one in the
/// compute dtype (on the CPU a weight stored in half precision is widened once and quantized,
/// not held in half first).
pub(crate) fn vb_for<'a>(
    vb: &VarBuilder<'a>,
    inputs: usize,
    format: WeightFormat,
) -> VarBuilder<'a> {
    match format.for_inputs(inputs) {
        WeightFormat::Dense | WeightFormat::Stored(_) => vb.clone(),
        _ => computing(vb.clone()),
    }
}

/// GGML blocks a transformer file stores (a GGUF file's), by the diffusers name of the weight
/// they hold (`transformer_blocks.0.attn.to_q.weight`), cut to what that layer takes.
pub trait StoredBlocks {
    /// The layer's blocks (out, in) on the CPU; `None` when the file stores it as floats.
    fn blocks(&self, name: &str) -> Option<candle_core::Result<QTensor>>;

    /// The file, for errors.
    fn path(&self) -> &std::path::Path;
}

/// Where a transformer block's Linear layers come from: read as loaded and held in `format`,
/// or — under [`WeightFormat::Stored`] — the blocks `stored` holds, as they are.
#[derive(Clone, Copy)]
pub struct LayerSource<'a> {
    pub format: WeightFormat,
    pub stored: Option<&'a dyn StoredBlocks>,
}

impl From<WeightFormat> for LayerSource<'_> {
    fn from(format: WeightFormat) -> Self {
        Self {
            format,
            stored: None,
        }
    }
}

impl LayerSource<'_> {
    /// The layer `vb` names (`input` → `output`, with its bias).
    pub fn linear(
        &self,
        input: usize,
        output: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<BlockLinear> {
        match self.stored_blocks(&vb, input, output)? {
            Some(blocks) => {
                let bias = computing(vb.clone()).get(output, "bias")?;
                let choice = self.format.cpu_choice();
                BlockLinear::from_blocks(blocks, Some(&bias), choice, vb.device())
            }
            None => BlockLinear::new(input, output, vb, self.format),
        }
    }

    /// The blocks stored for `vb`'s weight, checked to be (`output`, `input`).
    pub fn stored_blocks(
        &self,
        vb: &VarBuilder,
        input: usize,
        output: usize,
    ) -> candle_core::Result<Option<QTensor>> {
        let (WeightFormat::Stored(_), Some(stored)) = (self.format, self.stored) else {
            return Ok(None);
        };
        let name = format!("{}.weight", vb.prefix());
        let Some(blocks) = stored.blocks(&name).transpose()? else {
            return Ok(None);
        };
        if blocks.shape().dims() != [output, input] {
            let reason = format!(
                "shape mismatch: the file's blocks are {:?}, the config implies {:?}",
                blocks.shape().dims(),
                [output, input]
            );
            let path = stored.path();
            return Err(crate::engine::loader::weights::weights_error(
                path, &name, reason,
            ));
        }
        Ok(Some(blocks))
    }
}

/// Columns `from..from + count` of `blocks` (out, in): whole blocks of each row, so the values
/// are the same as the whole layer's. `from` and `count` must be multiples of the block size.
pub fn block_columns(blocks: &QTensor, from: usize, count: usize) -> candle_core::Result<QTensor> {
    let (outputs, inputs) = blocks.shape().dims2()?;
    let format = blocks.dtype();
    let size = format.block_size();
    if !from.is_multiple_of(size) || !count.is_multiple_of(size) || from + count > inputs {
        candle_core::bail!(
            "columns {from}..{} of {inputs} do not fall on {format:?}'s {size}-value blocks",
            from + count
        );
    }
    let data = blocks.data()?;
    let row = inputs / size * format.type_size();
    let (start, width) = (
        from / size * format.type_size(),
        count / size * format.type_size(),
    );
    let mut columns = Vec::with_capacity(outputs * width);
    for r in 0..outputs {
        columns.extend_from_slice(&data[r * row + start..][..width]);
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(columns), &blocks.device(), format)?;
    QTensor::new(storage, (outputs, count))
}

/// `t.to_dtype(dtype)` where `t` or `dtype` may be F8E4M3: on CUDA by our kernels (candle
/// 0.11.1's CUDA casts for F8E4M3 fail: `engine::cuda::fp8::cast`), elsewhere candle's.
pub fn cast(t: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() && (t.dtype() == DType::F8E4M3 || dtype == DType::F8E4M3) {
        return crate::engine::cuda::fp8::cast(t, dtype);
    }
    t.to_dtype(dtype)
}

/// Largest finite e4m3 value.
const E4M3_MAX: f32 = 448.0;

/// e4m3 codes and per-row power-of-two scales of a (out, in) weight: scale = 2^⌈log₂(max|row| /
/// 448)⌉, so the largest value of a row lands in [224, 448] and every value keeps e4m3's 3-bit
/// relative precision (half an ulp: 2⁻⁴) down to its subnormals. Powers of two multiply exactly in
/// any float format; the exponent stays within f16's range (2⁻²⁴ … 2¹⁵).
pub fn quantize_fp8(weight: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let w = weight.to_dtype(DType::F32)?;
    let row_max: Vec<f32> = w.abs()?.max(1)?.to_vec1()?;
    let scales: Vec<f32> = row_max
        .iter()
        .map(|&m| {
            let exponent = (m / E4M3_MAX).log2().ceil();
            // An all-zero row (log2(0) = -inf) takes the smallest scale.
            2f32.powi(
                if exponent.is_finite() {
                    exponent as i32
                } else {
                    -24
                }
                .clamp(-24, 15),
            )
        })
        .collect();
    let scale = Tensor::from_vec(scales, row_max.len(), weight.device())?;
    let codes = cast(&w.broadcast_div(&scale.unsqueeze(1)?)?, DType::F8E4M3)?;
    Ok((codes, scale.to_dtype(weight.dtype())?))
}

/// Whether [`widened_product`] takes this product: GGML blocks on a GPU, a matrix of 16 rows or
/// more of half-precision activations. candle's quantized matrix product (activations rounded to
/// q8_1, integer dot products) ran FLUX-dev's step at 3.3× (q8_0) and 3.5× (q4k) its dense bf16
/// step on an H200 (session 25); a handful of rows (the DiTs' modulation) keeps it: a
/// matrix–vector product reads the blocks once, where widening would write them out first.
fn widens_on_device(weight: &QMatMul, xs: &Tensor) -> bool {
    let rows = xs.elem_count() / xs.dims().last().copied().unwrap_or(1).max(1);
    !WIDENING_FAILED.load(std::sync::atomic::Ordering::Relaxed)
        && matches!(weight, QMatMul::QTensor(_))
        && xs.device().is_cuda()
        && matches!(xs.dtype(), DType::F16 | DType::BF16)
        && rows >= 16
}

static WIDENING_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// After `e`: candle's quantized product from now on, in this process (logged once).
fn stop_widening(e: &candle_core::Error) {
    if !WIDENING_FAILED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(error = %e, "widening quantized weights failed; candle's quantized product runs instead");
    }
}

/// x · Wᵀ + b with the blocks widened to f16 on the device for this product (one pass over the
/// weight, candle's kernel), then the activations' dtype, and one dense GEMM: what diffusers' GGUF
/// layers do on a GPU. The bias goes through the dense Linear, whose fused kernel adds it on CUDA
/// (candle's broadcasting add cost as much as the product: `blocks::Linear`).
fn widened_product(weight: &QMatMul, bias: &Tensor, xs: &Tensor) -> candle_core::Result<Tensor> {
    let QMatMul::QTensor(blocks) = weight else {
        candle_core::bail!("widened product of a layer without blocks");
    };
    let dtype = xs.dtype();
    let w = blocks.dequantize_f16(xs.device())?.to_dtype(dtype)?;
    Linear::new(w, Some(bias.to_dtype(dtype)?)).forward(xs)
}

impl BlockLinear {
    pub fn new(
        input: usize,
        output: usize,
        vb: VarBuilder,
        format: WeightFormat,
    ) -> candle_core::Result<Self> {
        Self::from_dense(linear(input, output, vb_for(&vb, input, format))?, format)
    }

    /// [`Self::new`] of a layer without bias.
    pub fn unbiased(
        input: usize,
        output: usize,
        vb: VarBuilder,
        format: WeightFormat,
    ) -> candle_core::Result<Self> {
        let dense = linear_no_bias(input, output, vb_for(&vb, input, format))?;
        Self::from_dense(dense, format)
    }

    /// A dense layer held in `format` (or its fallback for the layer's rows,
    /// [`WeightFormat::for_inputs`]).
    pub fn from_dense(dense: Linear, format: WeightFormat) -> candle_core::Result<Self> {
        let input = dense.shape().1;
        let format = format.for_inputs(input);
        let (weight, bias) = (&dense.dense_weight()?, dense.bias());
        match format {
            // A stored layer is made from its blocks ([`LayerSource::linear`]); this one was
            // stored as floats.
            WeightFormat::Dense | WeightFormat::Stored(_) => Ok(Self::Dense(dense)),
            WeightFormat::Fp8 => Self::new_fp8(weight.clone(), bias),
            // Quantized on every host core (candle quantizes a device tensor on one CPU
            // thread), then held as a file's blocks are.
            WeightFormat::Quantized(t, choice) => {
                let cpu_weight = weight.to_device(&candle_core::Device::Cpu)?;
                let blocks = super::cpu_quantized_linear::quantize(&cpu_weight, t)?;
                Self::from_blocks(blocks, bias, choice, weight.device())
            }
        }
    }

    /// A layer of GGML `blocks` (out, in) on the CPU (a file's, or a weight's quantized on
    /// load) on `device`: multiplied on the CPU as `choice` says for their format
    /// ([`WeightFormat::cpu_product`]; also tiles the layer's widths do not fit are held once),
    /// with candle's kernels on a GPU.
    pub fn from_blocks(
        blocks: QTensor,
        bias: Option<&Tensor>,
        choice: CpuQuantized,
        device: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        let (output, input) = blocks.shape().dims2()?;
        let held = WeightFormat::Quantized(blocks.dtype(), choice);
        if !device.is_cpu() {
            let storage = QStorage::from_data(blocks.data()?, device, blocks.dtype())?;
            let blocks = QTensor::new(storage, (output, input))?;
            return Self::quantized_product(blocks, bias);
        }
        let isa = int8_tiles::isa();
        match held.cpu_product() {
            Some(CpuProduct::Q8Tiles) if Q8TileLinear::fits(input, output) => Ok(Self::Q8Tiles(
                Q8TileLinear::from_blocks_with(&blocks, bias, isa)?,
            )),
            Some(CpuProduct::KQuantTiles) if KQuantTileLinear::fits(input, output) => Ok(
                Self::KQuantTiles(KQuantTileLinear::from_blocks_with(&blocks, bias, isa)?),
            ),
            Some(CpuProduct::CandleTiles) => Self::quantized_product(blocks, bias),
            // Formats our dequantizing product has no table for (q8_1, q8k) take candle's.
            _ if QuantizedCpuLinear::takes(blocks.dtype()) => Ok(Self::QuantizedCpu(
                QuantizedCpuLinear::from_blocks(blocks, bias)?,
            )),
            _ => Self::quantized_product(blocks, bias),
        }
    }

    /// A layer on candle's quantized product of `blocks` (`QMatMul`), its bias in f32.
    fn quantized_product(blocks: QTensor, bias: Option<&Tensor>) -> candle_core::Result<Self> {
        let device = blocks.device();
        let bias = match bias {
            Some(b) => b.to_dtype(DType::F32)?.to_device(&device)?,
            None => Tensor::zeros(blocks.shape().dims2()?.0, DType::F32, &device)?,
        };
        Ok(Self::Quantized {
            weight: QMatMul::from_qtensor(blocks)?,
            bias,
        })
    }

    /// An FP8 layer from a dense weight (out, in) and bias.
    pub fn new_fp8(weight: Tensor, bias: Option<&Tensor>) -> candle_core::Result<Self> {
        let (codes, scale) = quantize_fp8(&weight)?;
        #[cfg(feature = "cuda")]
        let operands = if weight.device().is_cuda() {
            Some(crate::engine::cuda::fp8::Operands::new(
                &scale,
                bias,
                weight.dtype(),
            )?)
        } else {
            None
        };
        Ok(Self::Fp8 {
            codes,
            scale,
            bias: bias.cloned(),
            #[cfg(feature = "cuda")]
            operands,
        })
    }

    /// The e4m3 codes and per-channel scale of an FP8 layer.
    pub fn fp8_parts(&self) -> Option<(&Tensor, &Tensor)> {
        match self {
            Self::Fp8 { codes, scale, .. } => Some((codes, scale)),
            _ => None,
        }
    }

    /// An FP8 layer's product with its weight widened to the activations' dtype (every device;
    /// the other formats' own forward).
    pub fn forward_widened(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let Self::Fp8 {
            codes, scale, bias, ..
        } = self
        else {
            return self.forward(xs);
        };
        let weight = cast(codes, xs.dtype())?;
        let ys = Linear::new(weight, None)
            .forward(xs)?
            .broadcast_mul(scale)?;
        match bias {
            Some(bias) => ys.broadcast_add(bias),
            None => Ok(ys),
        }
    }

    pub fn is_quantized(&self) -> bool {
        !matches!(self, Self::Dense(_))
    }

    /// Bytes the layer holds, as the memory planner counts them
    /// ([`WeightFormat::resident_bits_per_weight`]): candle's quantized product on the CPU
    /// twice, for the tiles it keeps beside the blocks from the first product on.
    pub fn bytes(&self) -> usize {
        let bias = |b: Option<&Tensor>| b.map_or(0, super::tensor_bytes);
        match self {
            Self::Dense(l) => l.bytes(),
            Self::Quantized { weight, bias: b } => {
                let blocks = match weight {
                    QMatMul::QTensor(q) => {
                        let twice = q.device().is_cpu() && candle_repacks(q.dtype());
                        q.storage_size_in_bytes() * if twice { 2 } else { 1 }
                    }
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => super::tensor_bytes(t),
                };
                blocks + super::tensor_bytes(b)
            }
            Self::QuantizedCpu(layer) => layer.bytes(),
            Self::Q8Tiles(layer) => layer.bytes(),
            Self::KQuantTiles(layer) => layer.bytes(),
            Self::Fp8 {
                codes,
                scale,
                bias: b,
                ..
            } => super::tensor_bytes(codes) + super::tensor_bytes(scale) + bias(b.as_ref()),
        }
    }

    /// The product, its bias left to the fused kernel consuming it where one runs ([`Biased`]):
    /// dense layers on CUDA (the other formats add theirs inside their own product).
    pub fn forward_deferring_bias(&self, xs: &Tensor) -> candle_core::Result<Biased> {
        match self {
            Self::Dense(l) => {
                crate::engine::profile::scope("Linear", xs, || l.forward_deferring_bias(xs))
            }
            _ => Ok(Biased::done(self.forward(xs)?)),
        }
    }

    /// The product without the bias [`Self::unapplied_bias`] returns: dense layers leave theirs
    /// out, the other formats add theirs (and return none).
    pub fn forward_unbiased(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(l) => {
                crate::engine::profile::scope("Linear", xs, || l.forward_unbiased(xs))
            }
            _ => self.forward(xs),
        }
    }

    /// [`Self::forward`] of a shared input.
    pub fn forward_shared(&self, input: &SharedInput) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(ys) = self.fp8_shared(input)? {
            return Ok(ys);
        }
        self.forward(input.xs)
    }

    /// [`Self::forward_unbiased`] of a shared input.
    pub fn forward_unbiased_shared(&self, input: &SharedInput) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(ys) = self.fp8_shared(input)? {
            return Ok(ys);
        }
        self.forward_unbiased(input.xs)
    }

    /// An FP8 layer's per-row product of the input quantized once (None: the layer's own
    /// forward applies — another format, no FP8 tensor cores, the per-row form off).
    #[cfg(feature = "cuda")]
    fn fp8_shared(&self, input: &SharedInput) -> candle_core::Result<Option<Tensor>> {
        use crate::engine::cuda::fp8;
        let Self::Fp8 {
            codes,
            operands: Some(operands),
            ..
        } = self
        else {
            return Ok(None);
        };
        if !fp8::per_row_on() || !fp8::supports(input.xs, codes) {
            return Ok(None);
        }
        let rows = input.fp8_rows.get_or_init(|| {
            fp8::quantize_rows(input.xs)
                .map_err(|e| fp8::switch_off_per_row(&e))
                .ok()
        });
        let Some(rows) = rows else {
            return Ok(None);
        };
        crate::engine::profile::scope("Linear", input.xs, || {
            match fp8::linear_quantized(rows, codes, operands) {
                Ok(ys) => Ok(Some(ys)),
                Err(e) => {
                    fp8::switch_off_per_row(&e);
                    Ok(None)
                }
            }
        })
    }

    /// The bias [`Self::forward_unbiased`] leaves out.
    pub fn unapplied_bias(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(l) => l.bias(),
            _ => None,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        crate::engine::profile::scope("Linear", xs, || {
            match self {
                Self::Dense(l) => l.forward(xs),
                Self::Quantized { weight, bias } if widens_on_device(weight, xs) => {
                    match widened_product(weight, bias, xs) {
                        Ok(ys) => Ok(ys),
                        Err(e) => {
                            stop_widening(&e);
                            in_f32(xs, |x| weight.forward(x)?.broadcast_add(bias))
                        }
                    }
                }
                // The quantized products take and give f32.
                Self::Quantized { weight, bias } => {
                    in_f32(xs, |x| weight.forward(x)?.broadcast_add(bias))
                }
                Self::QuantizedCpu(layer) => in_f32(xs, |x| layer.forward(x)),
                Self::Q8Tiles(layer) => in_f32(xs, |x| layer.forward(x)),
                Self::KQuantTiles(layer) => in_f32(xs, |x| layer.forward(x)),
                Self::Fp8 { .. } => {
                    // On FP8 tensor cores when the card has them; widened otherwise.
                    #[cfg(feature = "cuda")]
                    if let Self::Fp8 {
                        codes,
                        operands: Some(operands),
                        ..
                    } = self
                    {
                        use crate::engine::cuda::fp8;
                        if fp8::supports(xs, codes) {
                            match fp8::linear_with(xs, codes, operands) {
                                Ok(ys) => return Ok(ys),
                                Err(e) => fp8::switch_off(&e),
                            }
                        } else if fp8::gemv_supports(xs, codes) {
                            match fp8::gemv(xs, codes, operands) {
                                Ok(ys) => return Ok(ys),
                                Err(e) => fp8::switch_off_gemv(&e),
                            }
                        }
                    }
                    self.forward_widened(xs)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A layer made from stored blocks (a GGUF file's) is the layer `--quantize` makes of the
    /// same blocks: the same product on this CPU (int8 tiles, candle's tiles, or held once),
    /// the same bytes, the same output bit for bit — in every format GGUF files hold, the
    /// k-quants' 256-value blocks included; and columns cut from the blocks compute what the
    /// whole layer's columns do.
    #[test]
    fn stored_blocks_make_the_layer_quantizing_makes() -> candle_core::Result<()> {
        use candle_core::Device;
        let (outputs, inputs) = (64, 512);
        let weight = Tensor::randn(0f32, 0.05, (outputs, inputs), &Device::Cpu)?;
        let bias = Tensor::randn(0f32, 0.1, outputs, &Device::Cpu)?;
        let xs = Tensor::randn(0f32, 1.0, (3, inputs), &Device::Cpu)?;
        for t in [
            GgmlDType::Q8_0,
            GgmlDType::Q6K,
            GgmlDType::Q5K,
            GgmlDType::Q4K,
            GgmlDType::Q3K,
            GgmlDType::Q2K,
            GgmlDType::Q5_1,
            GgmlDType::Q4_0,
        ] {
            for choice in [CpuQuantized::Fastest, CpuQuantized::Compact] {
                let blocks = super::super::cpu_quantized_linear::quantize(&weight, t)?;
                let stored = BlockLinear::from_blocks(blocks, Some(&bias), choice, &Device::Cpu)?;
                let dense = Linear::new(weight.clone(), Some(bias.clone()));
                let quantized = BlockLinear::from_dense(dense, WeightFormat::Quantized(t, choice))?;
                assert_eq!(
                    std::mem::discriminant(&stored),
                    std::mem::discriminant(&quantized),
                    "{t:?} {choice:?}: another product"
                );
                assert_eq!(stored.bytes(), quantized.bytes(), "{t:?} {choice:?}");
                let (a, b) = (stored.forward(&xs)?, quantized.forward(&xs)?);
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert_eq!(d, 0.0, "{t:?} {choice:?}: outputs differ by {d}");
            }
        }
        // Columns 256..512 of q4k blocks: the layer of the weight's same columns.
        let blocks = super::super::cpu_quantized_linear::quantize(&weight, GgmlDType::Q4K)?;
        let right = block_columns(&blocks, 256, 256)?;
        let whole = blocks.dequantize(&Device::Cpu)?.narrow(1, 256, 256)?;
        let d = (right.dequantize(&Device::Cpu)? - whole)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        assert!(
            block_columns(&blocks, 128, 256).is_err(),
            "cut inside a block"
        );
        Ok(())
    }

    /// Rows the format's blocks do not divide take llama.cpp's fallback (k-quants → 32-value
    /// blocks), or stay dense; the CPU product choice carries over; a layer so loaded holds the
    /// fallback's blocks.
    #[test]
    fn rows_take_the_format_their_blocks_divide() -> candle_core::Result<()> {
        let f = |s: &str| s.parse::<WeightFormat>().unwrap();
        for (format, inputs, held) in [
            ("q6k", 3072, "q6k"),
            ("q6k", 2432, "q8_0"),
            ("q4k", 2432, "q5_0"),
            ("q5k-compact", 2432, "q5_1-compact"),
            ("q4_0", 2432, "q4_0"),
            ("q8_0", 48, "dense"),
            ("q4k", 48, "dense"),
            ("fp8", 48, "fp8"),
            ("dense", 48, "dense"),
        ] {
            assert_eq!(
                f(format).for_inputs(inputs),
                f(held),
                "{format} at {inputs}"
            );
        }
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1., (8, 2432), &dev)?;
        let layer = BlockLinear::from_dense(Linear::new(weight, None), f("q4k-compact"))?;
        let BlockLinear::QuantizedCpu(held) = &layer else {
            panic!("q4k at 2432 inputs not held as blocks");
        };
        assert_eq!(held.bytes(), 8 * 2432 / 32 * GgmlDType::Q5_0.type_size());
        // On CPUs with our int8 kernels, q8_0, q4k and q6k take our tiles, held once (the
        // k-quants with their super-blocks' scales in f32); the planner counts what they hold.
        let weight = Tensor::randn(0f32, 1., (32, 256), &dev)?;
        for (format, t, bits) in [
            ("q8_0", GgmlDType::Q8_0, 8.5),
            ("q4k", GgmlDType::Q4K, 4.75),
            ("q6k", GgmlDType::Q6K, 6.625),
        ] {
            let layer = BlockLinear::from_dense(Linear::new(weight.clone(), None), f(format))?;
            let tiles = matches!(layer, BlockLinear::Q8Tiles(_) | BlockLinear::KQuantTiles(_));
            assert_eq!(tiles, int8_tiles::takes(t), "{format}");
            if tiles {
                assert_eq!(f(format).resident_bits_per_weight(true), Some(bits));
            }
        }
        Ok(())
    }

    /// Each format prints as the name `--quantize` reads back.
    #[test]
    fn formats_print_as_they_parse() {
        for name in [
            "dense",
            "fp8",
            "q8_0",
            "q4_0",
            "q4_1",
            "q5_0",
            "q5_1",
            "q4k",
            "q5k",
            "q6k",
            "q6k-compact",
            "q8_0-compact",
        ] {
            let format: WeightFormat = name.parse().unwrap();
            assert_eq!(format.to_string(), name);
        }
    }

    /// The GPU's product for a matrix of activations ([`widened_product`], run here on the CPU):
    /// the dense product of the blocks' own values, within the f16 rounding of the widened
    /// weight and of the activations (a transposed weight or a lost bias is off by far more).
    #[test]
    fn widened_product_is_the_dense_product_of_the_blocks_values() {
        let dev = Device::Cpu;
        let (rows, input, output) = (20, 256, 24);
        let w = Tensor::randn(0f32, 1.0, (output, input), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, output, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, rows, input), &dev).unwrap();
        for format in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            let blocks = QTensor::quantize(&w, format).unwrap();
            let values = blocks.dequantize(&dev).unwrap();
            let exact = Linear::new(values, Some(bias.clone())).forward(&x).unwrap();
            let weight = QMatMul::from_qtensor(blocks).unwrap();
            let got = widened_product(&weight, &bias, &x.to_dtype(DType::F16).unwrap())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            assert_eq!(got.dims(), exact.dims());
            let error = (got - &exact).unwrap().sqr().unwrap().sum_all().unwrap();
            let norm = exact.sqr().unwrap().sum_all().unwrap();
            let relative =
                (error.to_scalar::<f32>().unwrap() / norm.to_scalar::<f32>().unwrap()).sqrt();
            assert!(relative < 2e-3, "{format:?}: relative error {relative}");
        }
    }

    /// e4m3 keeps 3 bits of mantissa: each weight within half an ulp, 2⁻⁴ of itself (or of the
    /// row's smallest normal, 2⁻⁶ · scale, below it), so |y − y_fp8| ≤ 2⁻⁴ Σ|x||w| + 2⁻¹⁰·scale Σ|x|
    /// row by row. A wrong scale, transposition or rounding breaks that by orders of magnitude.
    #[test]
    fn fp8_layer_stays_within_e4m3_rounding_of_the_dense_layer() {
        let dev = Device::Cpu;
        let (rows, input, output) = (5, 96, 40);
        // Rows of very different magnitudes (the scale is per row), and one all zero.
        let magnitudes: Vec<f32> = (0..output)
            .map(|o| {
                if o == 3 {
                    0.0
                } else {
                    10f32.powi(o as i32 % 7 - 3)
                }
            })
            .collect();
        let w = (Tensor::randn(0f32, 1.0, (output, input), &dev)
            .unwrap()
            .broadcast_mul(
                &Tensor::new(magnitudes.as_slice(), &dev)
                    .unwrap()
                    .unsqueeze(1)
                    .unwrap(),
            ))
        .unwrap();
        let bias = Tensor::randn(0f32, 1.0, output, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, rows, input), &dev).unwrap();
        let dense = Linear::new(w.clone(), Some(bias.clone()));
        let fp8 = BlockLinear::new_fp8(w.clone(), Some(&bias)).unwrap();
        let (codes, scale) = fp8.fp8_parts().unwrap();
        assert_eq!(codes.dtype(), DType::F8E4M3);
        let scales: Vec<f32> = scale.to_vec1().unwrap();
        for (s, m) in scales.iter().zip(&magnitudes) {
            assert_eq!(s.log2().fract(), 0.0, "scale {s} not a power of two");
            assert!(
                *m == 0.0 || *s < m * 4.0,
                "scale {s} too coarse for rows of ~{m}"
            );
        }
        let exact = dense.forward(&x).unwrap();
        let got = fp8.forward(&x).unwrap();
        let error = (got - &exact).unwrap().abs().unwrap();
        let bound = (x
            .abs()
            .unwrap()
            .broadcast_matmul(&w.abs().unwrap().t().unwrap())
            .unwrap()
            / 16.0
            + x.abs()
                .unwrap()
                .sum_keepdim(2)
                .unwrap()
                .broadcast_mul(&(Tensor::new(scales.as_slice(), &dev).unwrap() / 1024.0).unwrap())
                .unwrap())
        .unwrap();
        let over: f32 = (error - &bound)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(over <= 1e-5, "fp8 error exceeds e4m3 rounding by {over}");
        // And it is not the dense layer in disguise.
        let rounded: f32 = (fp8.forward(&x).unwrap() - &exact)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(rounded > 0.0);
        // The FP8-product reference (activations rounded to e4m3 too) stays within both
        // operands' rounding: 2⁻⁴ of |x|, 2⁻⁴ of |w| (and the subnormal terms, doubled).
        let (codes, scale) = fp8.fp8_parts().unwrap();
        // Per row, each row's step is at most the tensor's: the same bound holds.
        for per_row in [false, true] {
            let product = fp8_product_reference(&x, codes, scale, Some(&bias), per_row).unwrap();
            let error = (product - &exact).unwrap().abs().unwrap();
            let x_step = x
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                / 448.0
                / 1024.0;
            let both = ((bound.clone() * (2.0 + 1.0 / 16.0)).unwrap()
                + (w.abs().unwrap().sum_keepdim(1).unwrap().t().unwrap()
                    * (x_step * (1.0 + 1.0 / 16.0)) as f64)
                    .unwrap()
                    .broadcast_add(&Tensor::zeros((1, rows, output), DType::F32, &dev).unwrap())
                    .unwrap())
            .unwrap();
            let over: f32 = (error - both)
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(over <= 1e-5, "fp8 product exceeds e4m3 rounding by {over}");
        }
        // Rows of normal values have maxima of their own: the forms round them differently.
        let [tensor, row] = [false, true]
            .map(|per_row| fp8_product_reference(&x, codes, scale, Some(&bias), per_row).unwrap());
        let apart: f32 = (tensor - row)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(apart > 0.0, "the per-row reference used the tensor's scale");
        assert_eq!("fp8".parse::<WeightFormat>(), Ok(WeightFormat::Fp8));
        assert_eq!(WeightFormat::Fp8.bits_per_weight(), Some(8.0));
    }
}
