//! The scaled dot product the models' attention runs (CLIP, the UNet, the VAE's mid block, the
//! DiTs; T5 its softmax), and the UNet's transformer blocks' attention module.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::blocks::Biased;
use super::quantized::{BlockLinear, WeightFormat};

/// softmax(q kᵀ / sqrt(d) + mask) v over (batch, heads, tokens, head_dim) tensors.
/// `upcast` computes scores and softmax in f32 (diffusers' `upcast_attention`/`upcast_softmax`),
/// which only changes anything for half-precision weights.
pub fn scaled_dot_product(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    upcast: bool,
) -> candle_core::Result<Tensor> {
    crate::engine::profile::scope("sdpa", q, || {
        let head_dim = q.dim(candle_core::D::Minus1)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        // Fused on CUDA in half precision (f32 accumulation and softmax, so `upcast` holds too),
        // reading strided views in place.
        #[cfg(feature = "cuda")]
        if mask.is_none() && crate::engine::cuda::attention::supports(q, k, v) {
            return crate::engine::cuda::attention::attention(q, k, v, scale as f32);
        }
        // Fused on the CPU in f32, reading views with contiguous rows in place too.
        if mask.is_none() && super::cpu_util::is_cpu_f32(q) {
            return super::cpu_attention::attention(q, k, v, scale as f32);
        }
        let [q, k, v] = [q, k, v].map(|t| t.contiguous());
        unfused(&q?, &k?, &v?, mask, upcast)
    })
}

/// Largest score matrix [`unfused`] materialises at once. Past it the queries go in slices
/// (diffusers' attention slicing, chosen by size): the VAE's single 512-wide head at 2048² would
/// otherwise need a 16 GiB matrix, and f32 models on CUDA one per head of every layer.
pub const MAX_SCORE_BYTES: usize = 256 << 20;

/// The attention of [`scaled_dot_product`] as plain tensor ops (scores materialised, a slice of
/// queries at a time past [`MAX_SCORE_BYTES`]): every device, masks, any head size.
pub fn unfused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    upcast: bool,
) -> candle_core::Result<Tensor> {
    unfused_in_slices(q, k, v, mask, upcast, MAX_SCORE_BYTES)
}

/// [`unfused`] with the score matrix of each slice of queries under `max_score_bytes`. Each
/// query's row of scores is computed and normalised alone, so slicing changes no result.
pub fn unfused_in_slices(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    upcast: bool,
    max_score_bytes: usize,
) -> candle_core::Result<Tensor> {
    let query_dim = q.rank().saturating_sub(2);
    let queries = q.dim(query_dim)?;
    let keys = k.dim(k.rank().saturating_sub(2))?;
    let score_dtype = if upcast { DType::F32 } else { q.dtype() };
    let rows_of_scores = q.elem_count() / q.dim(candle_core::D::Minus1)?.max(1);
    let bytes_per_query = (rows_of_scores / queries.max(1)) * keys * score_dtype.size_in_bytes();
    let per_slice = (max_score_bytes / bytes_per_query.max(1)).max(1);
    if queries <= per_slice {
        return unfused_whole(q, k, v, mask, upcast);
    }
    let mut slices = Vec::with_capacity(queries.div_ceil(per_slice));
    for start in (0..queries).step_by(per_slice) {
        let len = per_slice.min(queries - start);
        // A mask with a row per query is sliced with the queries; a broadcast one is kept.
        let mask = match mask {
            Some(m) if m.rank() >= 2 && m.dim(m.rank() - 2)? == queries => {
                Some(m.narrow(m.rank() - 2, start, len)?)
            }
            other => other.cloned(),
        };
        let q = q.narrow(query_dim, start, len)?;
        slices.push(unfused_whole(&q, k, v, mask.as_ref(), upcast)?);
    }
    Tensor::cat(&slices, query_dim)
}

fn unfused_whole(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    upcast: bool,
) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let scale = 1.0 / (q.dim(candle_core::D::Minus1)? as f64).sqrt();
    let (q, k) = if upcast && dtype != DType::F32 {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q.clone(), k.clone())
    };
    // Scaling the queries is a pass over (tokens × head_dim); scaling the scores would be one
    // over (tokens × keys), the largest tensor here.
    let mut scores = (q * scale)?.matmul(&k.t()?)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    }
    let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
    probs.matmul(v)
}

/// Softmax over the last dimension, rounded once as PyTorch's is: candle's CUDA kernel
/// accumulates half-precision rows in f32; on the CPU they are widened first.
pub fn softmax_last_dim(scores: &Tensor) -> candle_core::Result<Tensor> {
    super::cpu_util::widened_on_cpu(scores, candle_nn::ops::softmax_last_dim)
        .unwrap_or_else(|| candle_nn::ops::softmax_last_dim(scores))
}

/// diffusers' `Attention` with the default processor (the UNet's transformer blocks): separate
/// q/k/v projections without bias, optional cross-attention context, output projection
/// `to_out.0`; the projections held in `format` (`--quantize`).
pub struct Attention {
    to_q: BlockLinear,
    to_k: BlockLinear,
    to_v: BlockLinear,
    to_out: BlockLinear,
    heads: usize,
    upcast: bool,
}

impl Attention {
    pub fn new(
        vb: VarBuilder,
        (query_dim, context_dim): (usize, usize),
        (heads, head_dim): (usize, usize),
        upcast: bool,
        format: WeightFormat,
    ) -> candle_core::Result<Self> {
        let inner = heads * head_dim;
        let proj =
            |name: &str, input: usize| BlockLinear::unbiased(input, inner, vb.pp(name), format);
        Ok(Self {
            to_q: proj("to_q", query_dim)?,
            to_k: proj("to_k", context_dim)?,
            to_v: proj("to_v", context_dim)?,
            to_out: BlockLinear::new(inner, query_dim, vb.pp("to_out.0"), format)?,
            heads,
            upcast,
        })
    }

    /// Bytes the four projections hold.
    pub fn layer_bytes(&self) -> usize {
        [&self.to_q, &self.to_k, &self.to_v, &self.to_out]
            .iter()
            .map(|l| l.bytes())
            .sum()
    }

    /// `xs`: (batch, tokens, query_dim); `context`: (batch, context_tokens, context_dim) or None for self-attention.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
        self.forward_deferring_bias(xs, context)?.resolve()
    }

    /// [`Self::forward`] with the output projection's bias left to the kernel adding the
    /// residual ([`Biased::add_to`]).
    pub fn forward_deferring_bias(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
    ) -> candle_core::Result<Biased> {
        crate::engine::profile::scope("Attention", xs, || {
            let context = context.unwrap_or(xs);
            let (b, n, _) = xs.dims3()?;
            let q = self.to_q.forward(xs)?;
            let k = self.to_k.forward(context)?;
            let v = self.to_v.forward(context)?;
            let inner = q.dim(2)?;
            let head_dim = inner / self.heads;
            // Heads-first views of the projections (the fused CUDA and CPU kernels read them in
            // place; the unfused path copies them).
            let split = |t: Tensor| -> candle_core::Result<Tensor> {
                let m = t.dim(1)?;
                t.reshape((b, m, self.heads, head_dim))?.transpose(1, 2)
            };
            let out = scaled_dot_product(&split(q)?, &split(k)?, &split(v)?, None, self.upcast)?;
            let out = out.transpose(1, 2)?.reshape((b, n, inner))?;
            self.to_out.forward_deferring_bias(&out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Half-precision softmax on the CPU is the f32 softmax rounded once: within half a unit in
    /// the last place of f16 (2⁻¹² for probabilities up to 1), where candle's own kernel was
    /// 12× that.
    #[test]
    fn half_precision_softmax_rounds_once() {
        let scores = (Tensor::randn(0f32, 3., (77, 64), &Device::Cpu).unwrap())
            .to_dtype(DType::F16)
            .unwrap();
        let exact =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32).unwrap()).unwrap();
        let ours = softmax_last_dim(&scores).unwrap();
        assert_eq!(ours.dtype(), DType::F16);
        let diff = max_difference(&ours, &exact);
        assert!(diff <= 1.0 / 4096.0, "{diff}");
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        crate::engine::models::max_abs_diff(&f32(a), &f32(b))
    }

    /// Slices of queries (a remainder slice included) give the whole computation's result, with
    /// a per-query mask sliced along and a broadcast one kept, in f32 and in upcast f16.
    #[test]
    fn sliced_attention_matches_the_whole() {
        let dev = Device::Cpu;
        let (b, h, n, m, d) = (2, 3, 50, 37, 8);
        // Deterministic values spread over [-1, 1] (the same test on every run).
        let values = |dims: &[usize], seed: f32| {
            let count: usize = dims.iter().product();
            let v: Vec<f32> = (0..count)
                .map(|i| (i as f32 * 0.7548 + seed).sin())
                .collect();
            Tensor::from_vec(v, dims, &dev).unwrap()
        };
        let q = values(&[b, h, n, d], 0.1);
        let k = values(&[b, h, m, d], 0.2);
        let v = values(&[b, h, m, d], 0.3);
        let per_query_mask = (values(&[n, m], 0.4) * 3.0).unwrap();
        let broadcast_mask = values(&[1, 1, 1, m], 0.5);
        // 7 queries' scores per slice: 8 slices, the last of 1.
        let slice_bytes = 7 * b * h * m * 4;
        let max_v = max_difference(&v, &v.zeros_like().unwrap());
        let f16_bound = 2.0 * m as f32 * 2f32.powi(-11) * max_v;
        for mask in [None, Some(&per_query_mask), Some(&broadcast_mask)] {
            // f32: to its rounding, relative to the largest output. f16: the CPU's half-precision
            // p·v product may sum in f16, in an order that depends on the number of rows; each
            // result is within m·u·Σ|p·v| ≤ m·u·max|v| of the exact one (u = 2⁻¹¹, Σp = 1), so
            // the two within twice that. Mask-slicing errors are of order one.
            for dtype in [DType::F32, DType::F16] {
                let upcast = dtype == DType::F16;
                let [q, k, v] = [&q, &k, &v].map(|t| t.to_dtype(dtype).unwrap());
                let whole = unfused_whole(&q, &k, &v, mask, upcast).unwrap();
                let sliced = unfused_in_slices(&q, &k, &v, mask, upcast, slice_bytes).unwrap();
                assert_eq!(sliced.dims(), whole.dims());
                let tolerance = if dtype == DType::F32 {
                    1e-6 * max_difference(&whole, &whole.zeros_like().unwrap())
                } else {
                    f16_bound
                };
                let diff = max_difference(&sliced, &whole);
                assert!(
                    diff <= tolerance,
                    "{dtype:?} mask {:?}: {diff}",
                    mask.map(|m| m.dims().to_vec())
                );
            }
        }
        // A wrong mask slice would show: the masked rows differ from the unmasked result.
        let unmasked = unfused_whole(&q, &k, &v, None, false).unwrap();
        let masked =
            unfused_in_slices(&q, &k, &v, Some(&per_query_mask), false, slice_bytes).unwrap();
        assert!(max_difference(&masked, &unmasked) > 1e-2);
    }
}
