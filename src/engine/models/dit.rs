//! Pieces the diffusion transformers (SD3's MMDiT, FLUX) share, in diffusers' naming:
//! adaptive layer norms driven by the timestep embedding, the tanh-GELU feed-forward, and joint
//! attention over image and text tokens.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{RmsNorm, VarBuilder};

use super::blocks::{compute_dtype, computing, linear, Biased, Linear};
use super::quantized::{BlockLinear, LayerSource, SharedInput};

use super::attention::scaled_dot_product;

/// LayerNorm without learned parameters (`elementwise_affine=False`), as every DiT norm that the
/// timestep modulates.
pub struct PlainLayerNorm {
    ones: Tensor,
    zeros: Tensor,
    eps: f32,
}

impl PlainLayerNorm {
    pub fn new(dim: usize, eps: f64, vb: &VarBuilder) -> candle_core::Result<Self> {
        Self::on(
            dim,
            eps,
            compute_dtype(vb.device(), vb.dtype()),
            vb.device(),
        )
    }

    pub fn on(
        dim: usize,
        eps: f64,
        dtype: DType,
        device: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            ones: Tensor::ones(dim, dtype, device)?,
            zeros: Tensor::zeros(dim, dtype, device)?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(&xs.contiguous()?, &self.ones, &self.zeros, self.eps)
    }

    /// `modulate(self.forward(xs), shift, scale)`: on CUDA one fused kernel (one pass over the
    /// tokens and one rounding instead of two of each).
    pub fn forward_modulated(
        &self,
        xs: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
    ) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if fused_per_sample(xs, &[shift, scale])
            && crate::engine::cuda::self_check::passed(
                crate::engine::cuda::self_check::Fused::LayerNormModulate,
            )
        {
            return crate::engine::cuda::elementwise::layer_norm_modulate(
                xs, shift, scale, self.eps,
            );
        }
        self.forward_then_modulate(xs, shift, scale)
    }

    /// The two steps of [`Self::forward_modulated`] apart (candle's layer norm, then the
    /// modulation): the reference the fused kernel is checked against on a GPU.
    pub fn forward_then_modulate(
        &self,
        xs: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
    ) -> candle_core::Result<Tensor> {
        modulate(&self.forward(xs)?, shift, scale)
    }
}

/// Whether the fused CUDA kernels take these (B, N, D) tokens and operands: one kernel where
/// candle broadcasts through per-element index arithmetic, once per operation.
#[cfg(feature = "cuda")]
fn fused_per_sample(xs: &Tensor, operands: &[&Tensor]) -> bool {
    crate::engine::cuda::elementwise::supports(xs)
        && xs.rank() == 3
        && operands.iter().all(|t| t.dtype() == xs.dtype())
}

/// `x * (1 + scale) + shift` with per-sample (B, D) modulation over (B, N, D) tokens.
pub fn modulate(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_per_sample(xs, &[shift, scale]) {
        return crate::engine::cuda::elementwise::modulate(xs, shift, scale);
    }
    xs.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// `x + gate * y` with a per-sample (B, D) gate; what is still to add to `y` (its bias, the
/// other part's product) added on the way.
pub fn gated_add(xs: &Tensor, gate: &Tensor, ys: Biased) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_per_sample(xs, &[gate, &ys.product])
        && xs.dims() == ys.product.dims()
        && ys.bias.as_ref().is_none_or(|b| b.dtype() == xs.dtype())
        && ys.addend.as_ref().is_none_or(|a| a.dtype() == xs.dtype())
    {
        return crate::engine::cuda::elementwise::gated_add(
            xs,
            gate,
            &ys.product,
            ys.addend.as_ref(),
            ys.bias.as_ref(),
        );
    }
    xs + ys.resolve()?.broadcast_mul(&gate.unsqueeze(1)?)?
}

/// The tanh GELU of a Linear's output, its bias (if still to add) added on the way.
pub fn gelu_tanh(h: Biased) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let (Some(bias), None) = (&h.bias, &h.addend) {
        use crate::engine::cuda::elementwise;
        if elementwise::supports(&h.product) && bias.dtype() == h.product.dtype() {
            return elementwise::gelu_tanh(&h.product, Some(bias));
        }
    }
    super::cpu_activation::gelu_tanh(&h.resolve()?)
}

/// `linear(silu(emb))` split into `chunks` equal parts: the shifts, scales and gates of
/// diffusers' `AdaLayerNormZero` (6), `SD35AdaLayerNormZeroX` (9), `AdaLayerNormContinuous`
/// (2: scale, shift) and FLUX's single-block norm (3).
pub struct Modulation {
    linear: BlockLinear,
    chunks: usize,
}

impl Modulation {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        chunks: usize,
        layers: LayerSource,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            linear: layers.linear(dim, chunks * dim, vb)?,
            chunks,
        })
    }

    /// Bytes its layer holds.
    pub fn bytes(&self) -> usize {
        self.linear.bytes()
    }

    /// The `chunks` (B, D) vectors, each contiguous: for one sample the chunks of the output
    /// are; for more, one copy puts the output chunk-major, where each consumer (the fused
    /// modulation kernels take contiguous vectors) would otherwise copy its own (SD3.5 with
    /// guidance: ~15 small copies a block).
    pub fn forward(&self, emb: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let out = self.linear.forward(&emb.silu()?)?;
        let batch = out.dim(0)?;
        if batch == 1 {
            return out.chunk(self.chunks, 1);
        }
        let chunk_major = out
            .reshape((batch, self.chunks, ()))?
            .transpose(0, 1)?
            .contiguous()?;
        (0..self.chunks).map(|i| chunk_major.get(i)).collect()
    }
}

/// `linear_2(silu(linear_1(x)))`: diffusers' `TimestepEmbedding` and
/// `PixArtAlphaTextProjection(act_fn="silu")`.
pub struct SiluMlp {
    linear_1: Linear,
    linear_2: Linear,
}

impl SiluMlp {
    pub fn new(vb: VarBuilder, input: usize, dim: usize) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: linear(input, dim, vb.pp("linear_1"))?,
            linear_2: linear(dim, dim, vb.pp("linear_2"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(xs)?.silu()?)
    }
}

/// diffusers' `FeedForward(activation_fn="gelu-approximate")`: `net.2(gelu_tanh(net.0.proj(x)))`.
pub struct FeedForward {
    proj: BlockLinear,
    out: BlockLinear,
}

impl FeedForward {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        hidden: usize,
        layers: LayerSource,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            proj: layers.linear(dim, hidden, vb.pp("net.0.proj"))?,
            out: layers.linear(hidden, dim, vb.pp("net.2"))?,
        })
    }

    /// Bytes its layers hold.
    pub fn bytes(&self) -> usize {
        self.proj.bytes() + self.out.bytes()
    }

    /// The output, its last bias left to the gated residual that takes it ([`gated_add`]).
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Biased> {
        crate::engine::profile::scope("FeedForward", xs, || {
            let hidden = gelu_tanh(self.proj.forward_deferring_bias(xs)?)?;
            self.out.forward_deferring_bias(&hidden)
        })
    }
}

/// The epsilon of the DiTs' query/key norms.
const QK_NORM_EPS: f64 = 1e-6;

/// Query/key normalisation per head (`qk_norm="rms_norm"`): the norms and their weights.
fn qk_norms(
    vb: &VarBuilder,
    names: [&str; 2],
    head_dim: usize,
) -> candle_core::Result<[(RmsNorm, Tensor); 2]> {
    let norm = |name: &str| -> candle_core::Result<(RmsNorm, Tensor)> {
        let weight = computing(vb.clone()).get(head_dim, &format!("{name}.weight"))?;
        Ok((RmsNorm::new(weight.clone(), QK_NORM_EPS), weight))
    };
    Ok([norm(names[0])?, norm(names[1])?])
}

/// One stream's projections: q, k, v (with optional per-head RMS norms on q and k).
struct Projections {
    q: BlockLinear,
    k: BlockLinear,
    v: BlockLinear,
    norms: Option<[RmsNorm; 2]>,
    /// CUDA: q's and k's [bias | norm weight], the parameters of the fused bias + norm (+ RoPE)
    /// kernel (made once; a quantized layer adds its own bias, and zeros stand in).
    fused_norm_params: Option<[Tensor; 2]>,
}

/// One stream's projections for the fused path: q, k, v (B, N, heads, head_dim) without their
/// biases, q's and k's [bias | norm weight], v's bias.
#[cfg(feature = "cuda")]
struct Unbiased<'a> {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    norm_params: &'a [Tensor; 2],
    v_bias: Option<&'a Tensor>,
}

impl Projections {
    /// The q, k, v projections `names` (and their norms `norm_names` when `c.qk_norm`).
    fn new(
        vb: &VarBuilder,
        names: [&str; 3],
        norm_names: [&str; 2],
        c: &JointAttentionConfig,
    ) -> candle_core::Result<Self> {
        let (dim, inner, head_dim, layers) = (c.dim, c.heads * c.head_dim, c.head_dim, c.layers);
        let q = layers.linear(dim, inner, vb.pp(names[0]))?;
        let k = layers.linear(dim, inner, vb.pp(names[1]))?;
        let norms = if c.qk_norm {
            Some(qk_norms(vb, norm_names, head_dim)?)
        } else {
            None
        };
        let fused_norm_params = match &norms {
            Some([(_, wq), (_, wk)]) if fused_qk_norm_possible(vb.device(), head_dim) => {
                let params = |layer: &BlockLinear, weight: &Tensor| match layer.unapplied_bias() {
                    Some(bias) => Tensor::cat(&[bias, weight], 0),
                    None => Tensor::cat(
                        &[&Tensor::zeros(inner, vb.dtype(), vb.device())?, weight],
                        0,
                    ),
                };
                Some([params(&q, wq)?, params(&k, wk)?])
            }
            _ => None,
        };
        Ok(Self {
            q,
            k,
            v: layers.linear(dim, inner, vb.pp(names[2]))?,
            norms: norms.map(|[(nq, _), (nk, _)]| [nq, nk]),
            fused_norm_params,
        })
    }

    fn bytes(&self) -> usize {
        self.q.bytes() + self.k.bytes() + self.v.bytes()
    }

    /// Token-major (B, N, heads, head_dim) queries, keys and values: the projections' own
    /// order (attention reads them through heads-first views, on CUDA without copying).
    fn forward(&self, xs: &Tensor, heads: usize) -> candle_core::Result<[Tensor; 3]> {
        let (b, n, _) = xs.dims3()?;
        let split = |t: Tensor| t.reshape((b, n, heads, ()));
        let input = SharedInput::new(xs);
        let mut q = split(self.q.forward_shared(&input)?)?;
        let mut k = split(self.k.forward_shared(&input)?)?;
        let v = split(self.v.forward_shared(&input)?)?;
        if let Some([nq, nk]) = &self.norms {
            q = nq.forward(&q)?;
            k = nk.forward(&k)?;
        }
        Ok([q, k, v])
    }

    /// The fused path's inputs ([`Self::fuses_qk_norm`]).
    #[cfg(feature = "cuda")]
    fn unbiased(&self, xs: &Tensor, heads: usize) -> candle_core::Result<Unbiased<'_>> {
        let Some(norm_params) = &self.fused_norm_params else {
            candle_core::bail!("the fused q/k path without its parameters");
        };
        let (b, n, _) = xs.dims3()?;
        let split = |t: Tensor| t.reshape((b, n, heads, ()));
        let input = SharedInput::new(xs);
        Ok(Unbiased {
            q: split(self.q.forward_unbiased_shared(&input)?)?,
            k: split(self.k.forward_unbiased_shared(&input)?)?,
            v: split(self.v.forward_unbiased_shared(&input)?)?,
            norm_params,
            v_bias: self.v.unapplied_bias(),
        })
    }

    /// Whether the fused q/k kernel takes this stream for `xs`.
    fn fuses_qk_norm(&self, xs: &Tensor) -> bool {
        self.fused_norm_params
            .as_ref()
            .is_some_and(|[pq, _]| pq.dtype() == xs.dtype() && pq.device().same_device(xs.device()))
    }
}

/// Whether a device and head size can run the fused q/k norm kernel (made at load for CUDA
/// models).
fn fused_qk_norm_possible(device: &candle_core::Device, head_dim: usize) -> bool {
    #[cfg(feature = "cuda")]
    {
        device.is_cuda() && crate::engine::cuda::elementwise::qk_norm_supports(head_dim)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, head_dim);
        false
    }
}

/// Whether the fused q/k kernel runs now: CUDA tensors it takes, while its check on this device
/// has not switched it off.
fn fused_qk_norm_enabled(xs: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        use crate::engine::cuda::self_check::{runs_on, Fused};
        runs_on(Fused::QkNorm, xs)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = xs;
        false
    }
}

/// diffusers' `Attention` with the joint processors (SD3's `JointAttnProcessor2_0`, FLUX's
/// `FluxAttnProcessor`): image tokens and, optionally, text tokens each get their own
/// projections, attend together over the concatenated sequence, and are split again.
pub struct JointAttention {
    image: Projections,
    context: Option<Projections>,
    to_out: Option<BlockLinear>,
    to_add_out: Option<BlockLinear>,
    heads: usize,
}

/// Where the text tokens go in the joint sequence: SD3 appends them, FLUX puts them first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextOrder {
    After,
    Before,
}

pub struct JointAttentionConfig<'a> {
    pub dim: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub qk_norm: bool,
    /// Text-token projections (`add_{q,k,v}_proj`).
    pub with_context: bool,
    /// The text tokens' output projection (`to_add_out`); absent in the last MMDiT block.
    pub context_out: bool,
    /// The image tokens' output projection (`to_out.0`); FLUX's single blocks have none.
    pub image_out: bool,
    pub layers: LayerSource<'a>,
}

impl JointAttention {
    /// Bytes its Linear layers hold.
    pub fn bytes(&self) -> usize {
        let optional = |l: &Option<BlockLinear>| l.as_ref().map_or(0, BlockLinear::bytes);
        self.image.bytes()
            + self.context.as_ref().map_or(0, Projections::bytes)
            + optional(&self.to_out)
            + optional(&self.to_add_out)
    }

    pub fn new(vb: VarBuilder, c: &JointAttentionConfig) -> candle_core::Result<Self> {
        let inner = c.heads * c.head_dim;
        let image = Projections::new(&vb, ["to_q", "to_k", "to_v"], ["norm_q", "norm_k"], c)?;
        let context = if c.with_context {
            Some(Projections::new(
                &vb,
                ["add_q_proj", "add_k_proj", "add_v_proj"],
                ["norm_added_q", "norm_added_k"],
                c,
            )?)
        } else {
            None
        };
        Ok(Self {
            image,
            context,
            to_out: if c.image_out {
                Some(c.layers.linear(inner, c.dim, vb.pp("to_out.0"))?)
            } else {
                None
            },
            to_add_out: if c.with_context && c.context_out {
                Some(c.layers.linear(inner, c.dim, vb.pp("to_add_out"))?)
            } else {
                None
            },
            heads: c.heads,
        })
    }

    /// Attention over `xs` (B, N, D) and, when given, `context` (B, L, D) placed `order`. `rope`
    /// rotates queries and keys of the whole joint sequence (FLUX). Returns the image tokens'
    /// output and the text tokens' output, their output projections' biases left to the gated
    /// residuals that take them ([`gated_add`]).
    pub fn forward(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        order: ContextOrder,
        rope: Option<&Rope>,
    ) -> candle_core::Result<(Biased, Option<Biased>)> {
        crate::engine::profile::scope("Attention", xs, || {
            let (b, n, _) = xs.dims3()?;
            let joint = match (context, &self.context) {
                (Some(ctx), Some(proj)) => Some((ctx, proj)),
                _ => None,
            };
            let text_tokens = match joint {
                Some((ctx, _)) => ctx.dim(1)?,
                None => 0,
            };
            let (image_at, text_at) = match order {
                ContextOrder::After => (0, n),
                ContextOrder::Before => (text_tokens, 0),
            };
            // Where every stream can take it (FLUX, SD3.5 on CUDA): q and k each out of one kernel
            // that adds the bias, normalises, rotates and writes both streams into the joint
            // sequence, v's biases added while joining; otherwise those steps one by one, the
            // rotation after joining.
            let table = rope.map(Rope::table);
            let fused = fused_qk_norm_enabled(xs)
                && self.image.fuses_qk_norm(xs)
                && joint.is_none_or(|(_, proj)| proj.fuses_qk_norm(xs))
                && table.is_none_or(|t| t.is_some());
            let qkv = if fused {
                self.fused_qkv(xs, joint, (image_at, text_at), table.flatten())?
            } else {
                self.separate_qkv(xs, joint, order)?
            };
            let [q, k, v] = qkv.map(|t| t.transpose(1, 2));
            let (mut q, mut k, v) = (q?, k?, v?);
            if let (Some(rope), false) = (rope, fused) {
                q = rope.apply(&q)?;
                k = rope.apply(&k)?;
            }
            let out = scaled_dot_product(&q, &k, &v, None, false)?;
            let total = out.dim(2)?;
            let out = out.transpose(1, 2)?.reshape((b, total, ()))?;
            let image = out.narrow(1, image_at, n)?;
            let image = match &self.to_out {
                Some(proj) => proj.forward_deferring_bias(&image)?,
                None => Biased::done(image),
            };
            let text = match (&self.to_add_out, text_tokens) {
                (_, 0) => None,
                (Some(proj), _) => {
                    Some(proj.forward_deferring_bias(&out.narrow(1, text_at, text_tokens)?)?)
                }
                (None, _) => None,
            };
            Ok((image, text))
        })
    }

    /// Token-major q, k, v of the joint sequence from the fused kernels, every stream written
    /// at its place (`at`: the image's and the text's first tokens).
    #[cfg(feature = "cuda")]
    fn fused_qkv(
        &self,
        xs: &Tensor,
        joint: Option<(&Tensor, &Projections)>,
        (image_at, text_at): (usize, usize),
        table: Option<&Tensor>,
    ) -> candle_core::Result<[Tensor; 3]> {
        use crate::engine::cuda::elementwise::{join_values, qk_norm, Stream};
        let mut parts = vec![(self.image.unbiased(xs, self.heads)?, image_at)];
        let mut total = xs.dim(1)?;
        if let Some((ctx, proj)) = joint {
            parts.push((proj.unbiased(ctx, self.heads)?, text_at));
            total += ctx.dim(1)?;
        }
        let eps = QK_NORM_EPS as f32;
        // 0: queries, 1: keys.
        let normed = |which: usize| {
            let streams: Vec<Stream> = parts
                .iter()
                .map(|(part, offset)| Stream {
                    x: if which == 0 { &part.q } else { &part.k },
                    with: Some(&part.norm_params[which]),
                    offset: *offset,
                })
                .collect();
            qk_norm(&streams, table, total, eps)
        };
        let (q, k) = (normed(0)?, normed(1)?);
        let values: Vec<Stream> = parts
            .iter()
            .map(|(part, offset)| Stream {
                x: &part.v,
                with: part.v_bias,
                offset: *offset,
            })
            .collect();
        Ok([q, k, join_values(&values, total)?])
    }

    #[cfg(not(feature = "cuda"))]
    fn fused_qkv(
        &self,
        _: &Tensor,
        _: Option<(&Tensor, &Projections)>,
        _: (usize, usize),
        _: Option<&Tensor>,
    ) -> candle_core::Result<[Tensor; 3]> {
        candle_core::bail!("the fused q/k path runs on CUDA only")
    }

    /// Token-major q, k, v of each stream (projection, bias, norm), joined in `order`.
    fn separate_qkv(
        &self,
        xs: &Tensor,
        joint: Option<(&Tensor, &Projections)>,
        order: ContextOrder,
    ) -> candle_core::Result<[Tensor; 3]> {
        let [mut q, mut k, mut v] = self.image.forward(xs, self.heads)?;
        if let Some((ctx, proj)) = joint {
            let [cq, ck, cv] = proj.forward(ctx, self.heads)?;
            let join = |img: &Tensor, txt: &Tensor| match order {
                ContextOrder::After => Tensor::cat(&[img, txt], 1),
                ContextOrder::Before => Tensor::cat(&[txt, img], 1),
            };
            q = join(&q, &cq)?;
            k = join(&k, &ck)?;
            v = join(&v, &cv)?;
        }
        Ok([q, k, v])
    }
}

/// Rotary position embedding as FLUX applies it (diffusers' `apply_rotary_emb` with
/// `use_real_unbind_dim=-1`): consecutive pairs of each head's channels rotate by per-token angles.
pub struct Rope {
    /// (1, 1, tokens, head_dim / 2) cosines and sines.
    cos: Tensor,
    sin: Tensor,
    /// CUDA: (1, 1, tokens, head_dim / 2, 2) (cos, sin) pairs, the fused q/k kernel's table.
    table: Option<Tensor>,
}

impl Rope {
    pub fn new(cos: Tensor, sin: Tensor) -> candle_core::Result<Self> {
        let table = if cos.device().is_cuda() {
            Some(Tensor::stack(&[&cos, &sin], D::Minus1)?)
        } else {
            None
        };
        Ok(Self { cos, sin, table })
    }

    /// The (cos, sin) pairs the fused q/k kernel reads (CUDA).
    pub fn table(&self) -> Option<&Tensor> {
        self.table.as_ref()
    }

    pub fn apply(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        // One fused pass on CUDA; as tensor ops (ten passes with f32 copies) it cost FLUX-dev
        // about 75 ms of a 1024² step on an H200.
        #[cfg(feature = "cuda")]
        if crate::engine::cuda::elementwise::supports(xs) && self.cos.dtype() == DType::F32 {
            return crate::engine::cuda::elementwise::rope(xs, &self.cos, &self.sin);
        }
        self.apply_unfused(xs)
    }

    /// [`Self::apply`] as tensor ops on any device (the reference of the fused kernel).
    pub fn apply_unfused(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = xs.dtype();
        let (b, h, n, d) = xs.dims4()?;
        // diffusers rotates in f32 and casts back.
        let pairs = xs.to_dtype(DType::F32)?.reshape((b, h, n, d / 2, 2))?;
        let re = pairs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
        let im = pairs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
        let out_re = (re.broadcast_mul(&self.cos)? - im.broadcast_mul(&self.sin)?)?;
        let out_im = (im.broadcast_mul(&self.cos)? + re.broadcast_mul(&self.sin)?)?;
        Tensor::stack(&[out_re, out_im], D::Minus1)?
            .reshape((b, h, n, d))?
            .to_dtype(dtype)
    }
}
