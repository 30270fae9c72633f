//! Attention shared by the CLIP encoder, the UNet's transformer blocks and the VAE mid block.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{linear, linear_no_bias, Linear};

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
        if mask.is_none() && super::cpu_util::is_cpu_f32(q) {
            return super::cpu_attention::attention(q, k, v, scale as f32);
        }
        // Fused on CUDA in half precision (f32 accumulation and softmax, so `upcast` holds too).
        #[cfg(feature = "cuda")]
        if mask.is_none() && crate::engine::cuda::attention::supports(q, k, v) {
            return crate::engine::cuda::attention::attention(q, k, v, scale as f32);
        }
        unfused(q, k, v, mask, upcast)
    })
}

/// The attention of [`scaled_dot_product`] as plain tensor ops (scores materialised): every
/// device, masks, any head size.
pub fn unfused(
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
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    probs.matmul(v)
}

/// diffusers' `Attention` with the default processor: separate q/k/v projections, optional
/// cross-attention context, output projection `to_out.0`.
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    upcast: bool,
}

impl Attention {
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        upcast: bool,
    ) -> candle_core::Result<Self> {
        let inner = heads * head_dim;
        let proj = |name: &str, input: usize| {
            if qkv_bias {
                linear(input, inner, vb.pp(name))
            } else {
                linear_no_bias(input, inner, vb.pp(name))
            }
        };
        Ok(Self {
            to_q: proj("to_q", query_dim)?,
            to_k: proj("to_k", context_dim)?,
            to_v: proj("to_v", context_dim)?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            upcast,
        })
    }

    /// `xs`: (batch, tokens, query_dim); `context`: (batch, context_tokens, context_dim) or None for self-attention.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
        crate::engine::profile::scope("Attention", xs, || {
            let context = context.unwrap_or(xs);
            let (b, n, _) = xs.dims3()?;
            let q = self.to_q.forward(xs)?;
            let k = self.to_k.forward(context)?;
            let v = self.to_v.forward(context)?;
            let inner = q.dim(2)?;
            let head_dim = inner / self.heads;
            let split = |t: Tensor| -> candle_core::Result<Tensor> {
                let m = t.dim(1)?;
                t.reshape((b, m, self.heads, head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let out = scaled_dot_product(&split(q)?, &split(k)?, &split(v)?, None, self.upcast)?;
            let out = out.transpose(1, 2)?.reshape((b, n, inner))?;
            self.to_out.forward(&out)
        })
    }
}
