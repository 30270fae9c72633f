//! Building blocks shared by the UNet and the VAE (diffusers' `resnet.py`, `upsampling.py`,
//! `downsampling.py`), plus small config helpers.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::cpu_half_linear::{is_half, HalfLinear};
use serde::Deserialize;

/// A config value that diffusers accepts either as one number for every block or as a per-block list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T: Clone> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    pub fn expand(&self, blocks: usize) -> Option<Vec<T>> {
        match self {
            Self::One(v) => Some(vec![v.clone(); blocks]),
            Self::Each(v) if v.len() == blocks => Some(v.clone()),
            Self::Each(_) => None,
        }
    }
}

/// diffusers' `get_timestep_embedding`: sinusoidal features of size `dim` for each timestep,
/// computed in f32 in diffusers' order of operations (frequencies `exp(-ln(10000)·i / (half −
/// shift))`, `[sin, cos]` or `[cos, sin]` when flipped, a zero column for odd sizes).
pub fn timestep_features(
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f32,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-(10000f64.ln()) as f32 * i as f32) / (half as f32 - freq_shift)).exp())
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
        if flip_sin_to_cos {
            data.extend(cos);
            data.extend(sin);
        } else {
            data.extend(sin);
            data.extend(cos);
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_vec(data, (timesteps.len(), dim), device)?.to_dtype(dtype)
}

/// A LayerNorm with a learned weight and bias (the UNets' transformer blocks, CLIP): candle's,
/// or on CUDA in half precision our one-pass kernel — candle's took twice PyTorch's time (SDXL's
/// 210 a step: 3.8 against 1.9 ms on an H200).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
    /// candle's LayerNorm keeps its epsilon to itself; our kernel needs it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    eps: f64,
}

/// A LayerNorm of `size` with weight and bias from `vb`.
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm {
        inner: candle_nn::layer_norm(size, eps, vb)?,
        eps,
    })
}

impl LayerNorm {
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(bias) = self.inner.bias() {
            let weight = self.inner.weight();
            if matches!(xs.dtype(), DType::F16 | DType::BF16)
                && weight.dtype() == xs.dtype()
                && bias.dtype() == xs.dtype()
                && crate::engine::cuda::self_check::runs_on(
                    crate::engine::cuda::self_check::Fused::LayerNorm,
                    xs,
                )
            {
                return crate::engine::cuda::elementwise::layer_norm_affine(
                    xs,
                    weight,
                    bias,
                    self.eps as f32,
                );
            }
        }
        self.inner.forward(xs)
    }
}

/// A Linear layer with candle's weights and layout. On CUDA with a bias: one 2-D matmul over the
/// flattened rows and the bias added by a fused kernel, where candle's runs a batched matmul and
/// a broadcasting add whose per-element index arithmetic made the add cost as much as the matmul
/// (H200: 2560-wide outputs of 8192 rows, 0.41 ms against PyTorch's 0.06).
///
/// On the CPU a weight in bf16 or f16 stays so and is widened block by block as it is
/// multiplied in f32 ([`HalfLinear`]): the CPU computes in f32 whatever dtype the model was
/// asked for ([`compute_dtype`]), so a half-precision model there holds its weights at half
/// their f32 memory and computes what the f32 model of those weights computes.
#[derive(Clone, Debug)]
pub struct Linear {
    held: HeldWeight,
}

#[derive(Clone, Debug)]
enum HeldWeight {
    Candle(candle_nn::Linear),
    CpuHalf {
        layer: std::sync::Arc<HalfLinear>,
        /// f32, also inside `layer` (which adds it under its product).
        bias: Option<Tensor>,
    },
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        // A layout HalfLinear does not take falls through to candle's, whose product then
        // reports it.
        if let Some(Ok(held)) = Self::cpu_half(&weight, bias.as_ref()) {
            return Self { held };
        }
        // On the CPU the weight is kept in the layout the gemm crate reads fastest.
        let weight = match weight.device() {
            Device::Cpu if weight.rank() == 2 => {
                super::cpu_util::gemm_layout(&weight).unwrap_or(weight)
            }
            _ => weight,
        };
        Self {
            held: HeldWeight::Candle(candle_nn::Linear::new(weight, bias)),
        }
    }

    /// A CPU weight in half precision, held so; its bias widened to f32.
    fn cpu_half(weight: &Tensor, bias: Option<&Tensor>) -> Option<candle_core::Result<HeldWeight>> {
        let half = weight.device().is_cpu() && is_half(weight.dtype()) && weight.rank() == 2;
        half.then(|| {
            let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
            Ok(HeldWeight::CpuHalf {
                layer: std::sync::Arc::new(HalfLinear::new(weight, bias.as_ref())?),
                bias,
            })
        })
    }

    /// The weight (out, in) in the dtype it is multiplied in: widened to f32 where it is held in
    /// half precision on the CPU (a copy: for quantizing it).
    pub fn dense_weight(&self) -> candle_core::Result<Tensor> {
        match &self.held {
            HeldWeight::Candle(inner) => Ok(inner.weight().clone()),
            HeldWeight::CpuHalf { layer, .. } => layer.widened_weight(),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        match &self.held {
            HeldWeight::Candle(inner) => inner.bias(),
            HeldWeight::CpuHalf { bias, .. } => bias.as_ref(),
        }
    }

    /// The dtype the layer takes and gives.
    pub fn input_dtype(&self) -> DType {
        match &self.held {
            HeldWeight::Candle(inner) => inner.weight().dtype(),
            HeldWeight::CpuHalf { .. } => DType::F32,
        }
    }

    /// (outputs, inputs).
    pub fn shape(&self) -> (usize, usize) {
        match &self.held {
            HeldWeight::Candle(inner) => inner.weight().dims2().unwrap_or_default(),
            HeldWeight::CpuHalf { layer, .. } => layer.shape(),
        }
    }

    /// Bytes the weight and bias are held in.
    pub fn bytes(&self) -> usize {
        match &self.held {
            HeldWeight::Candle(inner) => {
                super::tensor_bytes(inner.weight()) + inner.bias().map_or(0, super::tensor_bytes)
            }
            HeldWeight::CpuHalf { layer, .. } => layer.bytes(),
        }
    }

    /// The product without the bias ([`Self::bias`]); on CUDA one 2-D matmul over the flattened
    /// rows.
    pub fn forward_unbiased(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let inner = match &self.held {
            HeldWeight::Candle(inner) => inner,
            HeldWeight::CpuHalf { layer, .. } => return in_f32(xs, |x| layer.forward_unbiased(x)),
        };
        #[cfg(feature = "cuda")]
        if crate::engine::cuda::elementwise::supports(xs) {
            use crate::engine::cuda::self_check::{runs_on, switch_off, Fused};
            if samples_strided(xs) && runs_on(Fused::StridedGemm, xs) {
                // Each sample's rows contiguous, a gap between samples: cuBLAS reads the view
                // in place (a batch stride, the weight's 0), where a copy took ~1.5 TB/s.
                match xs.broadcast_matmul(&inner.weight().t()?) {
                    Ok(ys) => return Ok(ys),
                    Err(e) => {
                        tracing::warn!(error = %e, "strided GEMM refused; such views are copied first");
                        switch_off(Fused::StridedGemm);
                    }
                }
            }
            let (out, width) = inner.weight().dims2()?;
            let mut dims = xs.dims().to_vec();
            let rows = xs.elem_count() / width.max(1);
            let ys = xs
                .contiguous()?
                .reshape((rows, width))?
                .matmul(&inner.weight().t()?)?;
            if let Some(last) = dims.last_mut() {
                *last = out;
            }
            return ys.reshape(dims);
        }
        candle_nn::Linear::new(inner.weight().clone(), None).forward(xs)
    }

    /// The product with its bias left to the fused kernel that consumes it where one runs
    /// ([`Biased`]); added here otherwise.
    pub fn forward_deferring_bias(&self, xs: &Tensor) -> candle_core::Result<Biased> {
        match self.bias() {
            Some(bias) if defers_bias(xs, bias) => Ok(Biased {
                product: self.forward_unbiased(xs)?,
                bias: Some(bias.clone()),
                addend: None,
            }),
            _ => Ok(Biased::done(self.forward(xs)?)),
        }
    }
}

/// A (B, N, K) view whose rows lie contiguously within each sample but not from one sample to the
/// next: the image or text part of a joint sequence narrowed out of a batch of several.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn samples_strided(xs: &Tensor) -> bool {
    match (xs.dims(), xs.stride()) {
        (&[b, n, k], &[_, row, 1]) => b > 1 && n > 1 && row == k && !xs.is_contiguous(),
        _ => false,
    }
}

/// Whether a Linear's bias may be left to the kernel consuming its product: CUDA tensors the
/// fused kernels take, while their check on this device has not switched them off.
fn defers_bias(xs: &Tensor, bias: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        use crate::engine::cuda::self_check::{runs_on, Fused};
        xs.dtype() == bias.dtype() && runs_on(Fused::DeferredBias, xs)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (xs, bias);
        false
    }
}

/// `xs` (B, C, H, W) plus `t` (B, C): one value per sample and channel. On CUDA our kernel
/// (candle broadcasts through per-element index arithmetic).
pub fn add_per_channel(xs: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        use crate::engine::cuda::self_check::{runs_on, Fused};
        if t.dtype() == xs.dtype() && runs_on(Fused::DeferredBias, xs) {
            return crate::engine::cuda::elementwise::channel_add(xs, t);
        }
    }
    xs.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)
}

/// A Linear's product and what is still to be added to it: its bias (over the last dimension)
/// and, for a layer multiplied in two parts by input columns, the other part's product. On CUDA
/// the kernel that consumes the product (the tanh GELU, the DiTs' gated residual, their q/k
/// norm) adds them on the way: one pass over the output less than a pass of their own.
pub struct Biased {
    pub product: Tensor,
    pub bias: Option<Tensor>,
    pub addend: Option<Tensor>,
}

impl Biased {
    /// An output with nothing left to add.
    pub fn done(output: Tensor) -> Self {
        Self {
            product: output,
            bias: None,
            addend: None,
        }
    }

    /// `self` plus the product of the layer's other input columns (`other`, with its bias). One
    /// bias and one addend are carried; what does not fit is added first.
    pub fn plus(self, other: Biased) -> candle_core::Result<Self> {
        let other = match other.addend {
            Some(_) => Biased::done(other.resolve()?),
            None => other,
        };
        let mut sum = match (&self.addend, &self.bias, &other.bias) {
            (None, None, _) | (None, _, None) => self,
            _ => Biased::done(self.resolve()?),
        };
        sum.bias = sum.bias.or(other.bias);
        sum.addend = Some(other.product);
        Ok(sum)
    }

    /// The output, its bias and addend added.
    pub fn resolve(self) -> candle_core::Result<Tensor> {
        if self.bias.is_none() && self.addend.is_none() {
            return Ok(self.product);
        }
        #[cfg(feature = "cuda")]
        {
            let dtype = self.product.dtype();
            if crate::engine::cuda::elementwise::supports(&self.product)
                && self.bias.as_ref().is_none_or(|b| b.dtype() == dtype)
                && self.addend.as_ref().is_none_or(|a| a.dtype() == dtype)
            {
                return crate::engine::cuda::elementwise::add_to_product(
                    &self.product,
                    self.bias.as_ref(),
                    self.addend.as_ref(),
                );
            }
        }
        let mut out = self.product;
        if let Some(addend) = self.addend {
            out = (out + addend)?;
        }
        match self.bias {
            Some(bias) => out.broadcast_add(&bias),
            None => Ok(out),
        }
    }

    /// `residual` plus the output: on CUDA one pass of our kernel that adds the bias too (also
    /// the residual adds with nothing left to add: candle's add ran 4–6× PyTorch's on an H200).
    pub fn add_to(self, residual: &Tensor) -> candle_core::Result<Tensor> {
        if self.addend.is_some() {
            return Biased::done(self.resolve()?).add_to(residual);
        }
        #[cfg(feature = "cuda")]
        {
            use crate::engine::cuda::self_check::{runs_on, Fused};
            let dtype = self.product.dtype();
            if residual.dtype() == dtype
                && residual.dims() == self.product.dims()
                && self.bias.as_ref().is_none_or(|b| b.dtype() == dtype)
                && runs_on(Fused::DeferredBias, &self.product)
            {
                return crate::engine::cuda::elementwise::add_to_product(
                    &self.product,
                    self.bias.as_ref(),
                    Some(residual),
                );
            }
        }
        self.resolve()? + residual
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let inner = match &self.held {
            HeldWeight::Candle(inner) => inner,
            // A half-precision input (a model run in f16 on the CPU: the tests of the GPU's
            // path) widened, and the product narrowed back, as a GPU's f32 accumulation does.
            HeldWeight::CpuHalf { layer, .. } => return in_f32(xs, |x| layer.forward(x)),
        };
        #[cfg(feature = "cuda")]
        if let Some(bias) = inner.bias() {
            if crate::engine::cuda::elementwise::supports(xs) && xs.dtype() == bias.dtype() {
                return Biased {
                    product: self.forward_unbiased(xs)?,
                    bias: Some(bias.clone()),
                    addend: None,
                }
                .resolve();
            }
        }
        inner.forward(xs)
    }
}

/// The dtype a model computes in when its weights are read in `dtype` on `device`: f32 on the
/// CPU, where a half-precision dtype only says how the products' weights are held ([`Linear`],
/// [`Conv2d`]; candle's CPU backend has no bf16 product and rounds f16 products to f16, 2.4–6.5×
/// slower than f32 on FLUX's blocks and the VAE); that dtype elsewhere.
pub fn compute_dtype(device: &Device, dtype: DType) -> DType {
    if device.is_cpu() && !HALF_ARITHMETIC_ON_THE_CPU.get() {
        DType::F32
    } else {
        dtype
    }
}

/// The half precision a model asked for in `dtype` holds its weights in while computing in f32:
/// bf16 or f16 on the CPU; `None` elsewhere, and for f32.
pub fn cpu_half_dtype(device: &Device, dtype: DType) -> Option<DType> {
    (is_half(dtype) && compute_dtype(device, dtype) == DType::F32).then_some(dtype)
}

thread_local! {
    static HALF_ARITHMETIC_ON_THE_CPU: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `f` with models loaded and run on this thread computing in their own dtype on the CPU too,
/// as on a GPU: the tests of the GPU's half-precision paths (FLUX's f16 clamps, T5's f32 `wo`)
/// against diffusers' half-precision runs, where no GPU is.
#[doc(hidden)]
pub fn with_half_arithmetic_on_the_cpu<R>(f: impl FnOnce() -> R) -> R {
    HALF_ARITHMETIC_ON_THE_CPU.set(true);
    let result = f();
    HALF_ARITHMETIC_ON_THE_CPU.set(false);
    result
}

/// `f` (an f32 product) on `xs` in f32, its result in `xs`'s dtype.
pub fn in_f32(
    xs: &Tensor,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    f(&xs.to_dtype(DType::F32)?)?.to_dtype(xs.dtype())
}

/// Whether a model on the CPU holds tensor `name` of `shape` in its own dtype: the products'
/// weights ([`linear`], [`conv`]; SD3's small patch embedding is read in f32). Everything else
/// it reads in f32 ([`computing`]). The memory planner counts by this.
pub fn cpu_holds_in_model_dtype(name: &str, shape: &[usize]) -> bool {
    name.ends_with(".weight") && shape.len() >= 2 && !name.ends_with("pos_embed.proj.weight")
}

/// The dtype a model asked for in `dtype` reads its products' weights in, when its file stores
/// them all in `stored` half precision (`SafetensorsFile::products_stored_in_half`): on the CPU,
/// which computes in f32 whatever the dtype, that one — as stored, widened exactly as they are
/// multiplied. In f32 that is the f32 model's result at half its weights' memory (FLUX's and
/// SD3's checkpoints store bf16/f16: FLUX.1-dev's transformer 23.8 GB instead of 47.6); under
/// bf16 an fp16 file (the variant `--dtype` f16/bf16 downloads) keeps its own values. `dtype`
/// otherwise.
pub fn weights_dtype(device: &Device, dtype: DType, stored: Option<DType>) -> DType {
    match stored {
        Some(half) if compute_dtype(device, dtype) == DType::F32 && device.is_cpu() => half,
        _ => dtype,
    }
}

/// `vb` reading in its model's [`compute_dtype`]: for everything but the products' weights
/// (biases, norms, position tables).
pub fn computing(vb: VarBuilder) -> VarBuilder {
    let dtype = compute_dtype(vb.device(), vb.dtype());
    vb.to_dtype(dtype)
}

/// A Linear layer's weight read as `vb` reads it, its bias in the [`compute_dtype`] (candle's
/// initialisation for random weights).
pub fn linear(input: usize, output: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let bias = product_bias(&vb, output, input)?;
    Ok(Linear::new(
        product_weight(&vb, (output, input))?,
        Some(bias),
    ))
}

pub fn linear_no_bias(input: usize, output: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    Ok(Linear::new(product_weight(&vb, (output, input))?, None))
}

/// A product's `bias` (`outputs` values) in the [`compute_dtype`]; random ones as candle draws
/// them for `inputs` inputs.
fn product_bias(vb: &VarBuilder, outputs: usize, inputs: usize) -> candle_core::Result<Tensor> {
    let bound = 1. / (inputs as f64).sqrt();
    computing(vb.clone()).get_with_hints(
        outputs,
        "bias",
        candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )
}

/// A product's `weight` in `vb`'s dtype.
fn product_weight(
    vb: &VarBuilder,
    shape: impl Into<candle_core::Shape>,
) -> candle_core::Result<Tensor> {
    vb.get_with_hints(shape, "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)
}

/// GroupNorm with learned per-channel scale and shift; on the CPU in f32 one fused pass
/// ([`super::cpu_norm`]), which can also apply the SiLU that follows it in ResNet blocks.
pub struct GroupNorm {
    /// Scale and shift as tensors (the device path) and, on the CPU, as host values (its kernel).
    scale: Tensor,
    shift: Tensor,
    weight: Vec<f32>,
    bias: Vec<f32>,
    groups: usize,
    eps: f64,
}

pub fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> candle_core::Result<GroupNorm> {
    let vb = computing(vb);
    GroupNorm::from_parts(
        vb.get(channels, "weight")?,
        vb.get(channels, "bias")?,
        groups,
        eps,
    )
}

impl GroupNorm {
    /// A GroupNorm from its learned scale and shift.
    pub fn from_parts(
        scale: Tensor,
        shift: Tensor,
        groups: usize,
        eps: f64,
    ) -> candle_core::Result<Self> {
        // Host copies for the CPU kernel only: on a GPU they would cost a device-to-host copy
        // per layer at load for values never read.
        let host = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
            if t.device().is_cpu() {
                t.to_dtype(candle_core::DType::F32)?.to_vec1()
            } else {
                Ok(Vec::new())
            }
        };
        Ok(Self {
            weight: host(&scale)?,
            bias: host(&shift)?,
            scale,
            shift,
            groups,
            eps,
        })
    }

    fn run(&self, xs: &Tensor, with_silu: bool) -> candle_core::Result<Tensor> {
        crate::engine::profile::scope("GroupNorm", xs, || {
            if super::cpu_util::is_cpu_f32(xs) {
                return super::cpu_norm::group_norm(
                    xs,
                    &self.weight,
                    &self.bias,
                    self.groups,
                    self.eps,
                    with_silu,
                );
            }
            #[cfg(feature = "cuda")]
            let fused = if crate::engine::cuda::self_check::runs_on(
                crate::engine::cuda::self_check::Fused::GroupNorm,
                xs,
            ) && self.scale.dtype() == xs.dtype()
            {
                crate::engine::cuda::elementwise::group_norm
            } else {
                group_norm_fused
            };
            #[cfg(not(feature = "cuda"))]
            let fused = group_norm_fused;
            fused(
                xs,
                &self.scale,
                &self.shift,
                self.groups,
                self.eps,
                with_silu,
            )
        })
    }

    /// `silu(group_norm(xs))`.
    pub fn forward_silu(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.run(xs, true)
    }
}

/// GroupNorm off the CPU-f32 path (GPUs, half precision) as candle's fused `layer_norm` over each
/// group's values — one kernel with f32 statistics — then the per-channel scale and shift:
/// four passes over the tensor where `candle_nn::GroupNorm` makes fourteen (f32 copies, separate
/// mean, centring, square, variance, division and casts).
pub(crate) fn group_norm_fused(
    xs: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    groups: usize,
    eps: f64,
    with_silu: bool,
) -> candle_core::Result<Tensor> {
    let dims = xs.dims();
    if dims.len() < 3 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group norm of {dims:?} in {groups} groups");
    }
    let (b, c) = (dims[0], dims[1]);
    let per_group = xs.elem_count() / (b * groups);
    let (dtype, device) = (xs.dtype(), xs.device());
    let unit = Tensor::ones(per_group, dtype, device)?;
    let zero = Tensor::zeros(per_group, dtype, device)?;
    let normed = candle_nn::ops::layer_norm(
        &xs.contiguous()?.reshape((b, groups, per_group))?,
        &unit,
        &zero,
        eps as f32,
    )?
    .reshape(dims)?;
    let mut channel = vec![1; dims.len()];
    channel[1] = c;
    let ys = normed
        .broadcast_mul(&scale.reshape(channel.as_slice())?)?
        .broadcast_add(&shift.reshape(channel.as_slice())?)?;
    if with_silu {
        ys.silu()
    } else {
        Ok(ys)
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.run(xs, false)
    }
}

/// A 2-D convolution. On the CPU in f32, a 3×3 / stride-1 / padding-1 convolution with enough
/// input channels runs as Winograd's ([`super::cpu_winograd`], its weight held tap-major at its
/// own size); other 3×3 ones with stride 1 or 2 run on [`super::cpu_conv`] (no im2col copy);
/// everything else, and every other device, is candle's.
pub enum Conv2d {
    Candle {
        inner: candle_nn::Conv2d,
        /// A 3×3 kernel with stride 1 or 2 (and no dilation or groups): the CPU kernel takes it.
        direct_3x3: bool,
    },
    Winograd {
        weight: super::cpu_winograd::WinogradWeight,
        bias: Option<Tensor>,
    },
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        crate::engine::profile::scope("Conv2d", xs, || match self {
            Self::Winograd { weight, bias } => in_f32(xs, |x| {
                super::cpu_winograd::conv3x3(x, weight, bias.as_ref())
            }),
            Self::Candle { inner, .. } => {
                if let Some(direct) = self.cpu_direct(xs, [0; 4]) {
                    return direct();
                }
                if let Some(pointwise) = self.cpu_pointwise(xs, None) {
                    return pointwise();
                }
                if inner.weight().dtype() != xs.dtype() && xs.device().is_cpu() {
                    // A weight held in half precision on the CPU, for a layer none of the CPU
                    // kernels take (the models' 1×1 and 3×3 ones do).
                    return widened(inner.weight()).and_then(|w| {
                        candle_nn::Conv2d::new(w, inner.bias().cloned(), *inner.config())
                            .forward(xs)
                    });
                }
                #[cfg(feature = "cudnn")]
                if let (true, Some(bias)) = (xs.device().is_cuda(), inner.bias()) {
                    let c = inner.config();
                    if c.dilation == 1 && c.groups == 1 {
                        return crate::engine::cuda::conv::conv2d(
                            xs,
                            inner.weight(),
                            bias,
                            c.padding,
                            c.stride,
                        );
                    }
                }
                inner.forward(xs)
            }
        })
    }
}

/// Whether candle's im2col + gemm beats the direct 3×3 kernel: wide layers with outputs of 16²
/// and below (measured on 2 cores: 1280 channels at 16², 161 against 204 ms; at 8², 72 against
/// 78; stride 2 from 32² and 16², 41 against 57 and 91 against 119). Wide stride-1 layers of a
/// model take Winograd's path instead; they get here only through [`Conv2d::from_parts`].
fn im2col_wins(xs: &Tensor, stride: usize) -> bool {
    match xs.dims4() {
        Ok((_, c, h, w)) => {
            let output = h.div_ceil(stride) * w.div_ceil(stride);
            c >= super::cpu_winograd::MIN_CHANNELS && output <= 16 * 16
        }
        Err(_) => false,
    }
}

impl Conv2d {
    /// A convolution from its tensors (benchmarks; models load through [`conv`]).
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>, padding: usize, stride: usize) -> Self {
        let (_, _, kh, kw) = weight.dims4().unwrap_or_default();
        let config = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        Self::Candle {
            direct_3x3: direct_3x3(kh, kw, stride),
            inner: candle_nn::Conv2d::new(weight, bias, config),
        }
    }

    /// The CPU direct kernel's run of this convolution over `xs` zero-padded by `extra`
    /// (`[top, left, bottom, right]`, on top of the layer's own padding), when it takes it.
    fn cpu_direct<'a>(
        &'a self,
        xs: &'a Tensor,
        extra: [usize; 4],
    ) -> Option<impl FnOnce() -> candle_core::Result<Tensor> + 'a> {
        let Self::Candle {
            inner,
            direct_3x3: true,
        } = self
        else {
            return None;
        };
        let c = inner.config();
        let taken = super::cpu_util::is_cpu_f32(xs) && !im2col_wins(xs, c.stride);
        taken.then_some(move || {
            let pad = extra.map(|p| p + c.padding);
            let weight = widened(inner.weight())?;
            super::cpu_conv::conv3x3_strided(xs, &weight, inner.bias(), c.stride, pad)
        })
    }

    /// The weight (Co, Ci) and bias of a 1×1, stride-1, unpadded convolution: a per-position
    /// product ([`super::cpu_pointwise`]); on the CPU in f32.
    pub fn as_pointwise(&self) -> Option<(Tensor, Option<&Tensor>)> {
        let Self::Candle { inner, .. } = self else {
            return None;
        };
        let c = inner.config();
        let (co, ci, kh, kw) = inner.weight().dims4().ok()?;
        let plain = (kh, kw) == (1, 1) && c.stride == 1 && c.padding == 0 && c.dilation == 1;
        if !plain || c.groups != 1 {
            return None;
        }
        let weight = inner.weight().reshape((co, ci)).ok()?;
        Some((widened(&weight).ok()?, inner.bias()))
    }

    /// The CPU run of a 1×1 convolution over `xs`, plus `addend` (the output's shape) when given.
    fn cpu_pointwise<'a>(
        &'a self,
        xs: &'a Tensor,
        addend: Option<&'a Tensor>,
    ) -> Option<impl FnOnce() -> candle_core::Result<Tensor> + 'a> {
        use super::cpu_pointwise::{pointwise, Layout};
        if !super::cpu_util::is_cpu_f32(xs) {
            return None;
        }
        let (weight, bias) = self.as_pointwise()?;
        Some(move || {
            let (b, _, h, w) = xs.dims4()?;
            let flat = |t: &Tensor| t.flatten_from(2);
            let addend = addend.map(flat).transpose()?;
            let (xs, layout) = (flat(xs)?, Layout::ChannelsFirst);
            let out = pointwise(&xs, layout, &weight, bias, addend.as_ref(), layout)?;
            out.reshape((b, (), h, w))
        })
    }

    /// `self(xs) + addend`: on the CPU a 1×1 convolution writes onto the addend (a ResNet
    /// block's shortcut), saving the separate add.
    pub fn forward_adding(&self, xs: &Tensor, addend: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(pointwise) = self.cpu_pointwise(xs, Some(addend)) {
            return crate::engine::profile::scope("Conv2d", xs, pointwise);
        }
        Biased::done(self.forward(xs)?).add_to(addend)
    }

    /// The convolution of `xs` zero-padded by `[top, left, bottom, right]` first (on top of the
    /// layer's own padding): on the CPU kernel, without the padded copy.
    pub fn forward_padded(&self, xs: &Tensor, pad: [usize; 4]) -> candle_core::Result<Tensor> {
        if let Some(direct) = self.cpu_direct(xs, pad) {
            return crate::engine::profile::scope("Conv2d", xs, direct);
        }
        let [top, left, bottom, right] = pad;
        let xs = xs
            .pad_with_zeros(3, left, right)?
            .pad_with_zeros(2, top, bottom)?;
        self.forward(&xs)
    }
}

/// A CPU weight held in half precision widened to f32 for the product (a copy per call: the
/// layers that take this are the narrow ones, and those of 16² outputs and below); others as
/// they are.
fn widened(weight: &Tensor) -> candle_core::Result<Tensor> {
    if weight.device().is_cpu() && is_half(weight.dtype()) {
        weight.to_dtype(DType::F32)
    } else {
        Ok(weight.clone())
    }
}

/// Whether [`super::cpu_conv`] takes a convolution of this kernel and stride (on the CPU in f32).
fn direct_3x3(kh: usize, kw: usize, stride: usize) -> bool {
    (kh, kw) == (3, 3) && stride <= 2
}

pub fn conv(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Conv2d> {
    let same_3x3 = kernel == 3 && stride == 1 && padding == 1;
    // The CPU computes in f32 whatever the weights' dtype ([`compute_dtype`]).
    let on_cpu = vb.device().is_cpu();
    let bias = product_bias(&vb, cout, cin)?;
    let config = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    let weight = product_weight(&vb, (cout, cin, kernel, kernel))?;
    let inner = candle_nn::Conv2d::new(weight, Some(bias), config);
    if same_3x3 && on_cpu && super::cpu_winograd::worthwhile(cin) {
        return Ok(Conv2d::Winograd {
            weight: super::cpu_winograd::WinogradWeight::from_tensor(inner.weight())?,
            bias: inner.bias().cloned(),
        });
    }
    Ok(Conv2d::Candle {
        inner,
        direct_3x3: direct_3x3(kernel, kernel, stride),
    })
}

/// diffusers' `ResnetBlock2D` with `time_embedding_norm="default"`.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

pub struct ResnetConfig {
    pub groups: usize,
    pub eps: f64,
    pub temb_channels: Option<usize>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        c: &ResnetConfig,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: group_norm(c.groups, cin, c.eps, vb.pp("norm1"))?,
            conv1: conv(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: match c.temb_channels {
                Some(t) => Some(linear(t, cout, vb.pp("time_emb_proj"))?),
                None => None,
            },
            norm2: group_norm(c.groups, cout, c.eps, vb.pp("norm2"))?,
            conv2: conv(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(conv(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
            output_scale_factor: c.output_scale_factor,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> candle_core::Result<Tensor> {
        crate::engine::profile::scope("ResnetBlock2D", xs, || {
            let mut h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
            if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
                h = add_per_channel(&h, &proj.forward(&temb.silu()?)?)?;
            }
            let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
            // On CUDA our add kernel (16-byte accesses): candle's ran 4–6× PyTorch's.
            let out = match &self.conv_shortcut {
                Some(c) => c.forward_adding(xs, &h)?,
                None => Biased::done(h).add_to(xs)?,
            };
            if self.output_scale_factor == 1.0 {
                Ok(out)
            } else {
                out / self.output_scale_factor
            }
        })
    }
}

/// Strided 3×3 conv (`downsamplers.0.conv`); padding 0 pads right/bottom by one first, as diffusers does.
pub struct Downsample2D {
    conv: Conv2d,
    pad_first: bool,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> candle_core::Result<Self> {
        Ok(Self {
            conv: conv(vb.pp("conv"), channels, channels, 3, 2, padding)?,
            pad_first: padding == 0,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        crate::engine::profile::scope("Downsample2D", xs, || {
            if self.pad_first {
                // diffusers pads the bottom and right by one, then convolves unpadded.
                self.conv.forward_padded(xs, [0, 0, 1, 1])
            } else {
                self.conv.forward(xs)
            }
        })
    }
}

/// Nearest-neighbour resize to (h, w) with torch's index rule `floor(dst * in / out)`, so odd
/// latent sizes come back to exactly the skip connection's size.
pub fn resize_nearest(xs: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        use crate::engine::cuda::self_check::{runs_on, Fused};
        let (_, _, ih, iw) = xs.dims4()?;
        if (h, w) == (2 * ih, 2 * iw) && runs_on(Fused::Upsample, xs) {
            return crate::engine::cuda::elementwise::upsample_nearest2x(xs);
        }
    }
    resize_nearest_by_index(xs, h, w)
}

/// [`resize_nearest`] as two index selects (any device, any size; the CUDA kernel's reference).
pub fn resize_nearest_by_index(xs: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (_, _, ih, iw) = xs.dims4()?;
    let index = |input: usize, output: usize| -> Vec<u32> {
        if output == 2 * input {
            return (0..output as u32).map(|i| i >> 1).collect();
        }
        let scale = input as f32 / output as f32;
        (0..output)
            .map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as u32)
            .collect()
    };
    let dev = xs.device();
    let rows = Tensor::new(index(ih, h), dev)?;
    let cols = Tensor::new(index(iw, w), dev)?;
    xs.index_select(&rows, 2)?.index_select(&cols, 3)
}

/// Nearest ×2 (or to an explicit size) then a 3×3 conv (`upsamplers.0.conv`).
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> candle_core::Result<Self> {
        Ok(Self {
            conv: conv(vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        size: Option<(usize, usize)>,
    ) -> candle_core::Result<Tensor> {
        crate::engine::profile::scope("Upsample2D", xs, || {
            let (_, _, h, w) = xs.dims4()?;
            let (th, tw) = size.unwrap_or((2 * h, 2 * w));
            let up = if (th, tw) == (2 * h, 2 * w) {
                xs.upsample_nearest2d(th, tw)?
            } else {
                resize_nearest(xs, th, tw)?
            };
            self.conv.forward(&up)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// On the CPU, layers read from a half-precision model hold their weights so (half the
    /// bytes) and compute in f32 what the f32 layers of the rounded weights compute: Linear with
    /// and without its bias, and every convolution path (Winograd's, the direct 3×3 at stride 1
    /// and 2, 1×1, and candle's for the rest); their biases read in f32, unrounded.
    #[test]
    fn half_precision_layers_on_the_cpu_hold_half_and_compute_f32() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let values = |seed: f32, dims: &[usize]| {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
            Tensor::from_vec(v, dims, &dev)
        };
        let (ci, co) = (40, 24);
        let mut tensors = std::collections::HashMap::new();
        tensors.insert("fc.weight".to_string(), values(0.1, &[co, ci])?);
        tensors.insert("fc.bias".to_string(), values(0.2, &[co])?);
        for (name, k) in [("c3", 3), ("c1", 1), ("c2", 2)] {
            tensors.insert(format!("{name}.weight"), values(0.3, &[co, ci, k, k])?);
            tensors.insert(format!("{name}.bias"), values(0.4, &[co])?);
        }
        let xs = values(0.5, &[2, ci, 12, 10])?;
        let tokens = values(0.6, &[2, 7, ci])?;
        for dtype in [DType::F16, DType::BF16] {
            let rounded: std::collections::HashMap<_, _> = tensors
                .iter()
                .map(|(name, t)| {
                    let held = cpu_holds_in_model_dtype(name, t.dims());
                    let t = if held {
                        t.to_dtype(dtype)?.to_dtype(DType::F32)?
                    } else {
                        t.clone()
                    };
                    Ok((name.clone(), t))
                })
                .collect::<candle_core::Result<_>>()?;
            let half = VarBuilder::from_tensors(tensors.clone(), dtype, &dev);
            let f32 = VarBuilder::from_tensors(rounded, DType::F32, &dev);
            let check = |what: &str, ours: Tensor, expected: Tensor| -> candle_core::Result<()> {
                assert_eq!(ours.dtype(), DType::F32, "{what}");
                let d = (ours - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d <= 1e-5 * scale, "{what} {dtype:?}: {d} of {scale}");
                Ok(())
            };
            let (ours, theirs) = (
                linear(ci, co, half.pp("fc"))?,
                linear(ci, co, f32.pp("fc"))?,
            );
            assert_eq!(ours.bytes(), co * ci * 2 + co * 4);
            assert_eq!(ours.bias().map(|b| b.dtype()), Some(DType::F32));
            check("linear", ours.forward(&tokens)?, theirs.forward(&tokens)?)?;
            check(
                "linear unbiased",
                ours.forward_unbiased(&tokens)?,
                theirs.forward_unbiased(&tokens)?,
            )?;
            check(
                "dense weight",
                ours.dense_weight()?,
                f32.get((co, ci), "fc.weight")?,
            )?;
            for (name, k, stride, padding) in [
                ("c3", 3, 1, 1), // Winograd's
                ("c3", 3, 2, 1), // the direct kernel, stride 2
                ("c1", 1, 1, 0), // 1×1
                ("c2", 2, 2, 0), // candle's
            ] {
                let ours = conv(half.pp(name), ci, co, k, stride, padding)?;
                let theirs = conv(f32.pp(name), ci, co, k, stride, padding)?;
                if let Conv2d::Winograd { weight, .. } = &ours {
                    assert_eq!(weight.bytes(), co * ci * 9 * 2, "{dtype:?}");
                }
                let what = format!("conv {k}×{k} stride {stride}");
                check(&what, ours.forward(&xs)?, theirs.forward(&xs)?)?;
                if k == 3 {
                    check(
                        &format!("{what} padded"),
                        ours.forward_padded(&xs, [0, 1, 1, 0])?,
                        theirs.forward_padded(&xs, [0, 1, 1, 0])?,
                    )?;
                }
            }
            // The direct 3×3 kernel at stride 1: too few input channels for Winograd's.
            let narrow = values(0.7, &[2, 4, 9, 9])?;
            let w = values(0.8, &[co, 4, 3, 3])?;
            let ours = Conv2d::from_parts(w.to_dtype(dtype)?, None, 1, 1);
            let theirs = Conv2d::from_parts(w.to_dtype(dtype)?.to_dtype(DType::F32)?, None, 1, 1);
            check(
                "direct 3×3",
                ours.forward(&narrow)?,
                theirs.forward(&narrow)?,
            )?;
        }
        Ok(())
    }

    /// A Linear's output with its bias still to add, summed with another part's (FLUX's split
    /// projection), resolves to the sum of both full outputs whichever of them carries a bias;
    /// added to a residual too.
    #[test]
    fn deferred_biases_and_parts_add_up() {
        let dev = Device::Cpu;
        let t = |seed: f32, dims: &[usize]| {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
            Tensor::from_vec(v, dims, &dev).unwrap()
        };
        let (p1, p2, residual) = (t(0.1, &[2, 3, 4]), t(0.2, &[2, 3, 4]), t(0.5, &[2, 3, 4]));
        let (b1, b2) = (t(0.3, &[4]), t(0.4, &[4]));
        let part = |p: &Tensor, b: &Option<Tensor>| Biased {
            product: p.clone(),
            bias: b.clone(),
            addend: None,
        };
        for (bias1, bias2) in [
            (None, None),
            (Some(b1.clone()), None),
            (None, Some(b2.clone())),
            (Some(b1.clone()), Some(b2.clone())),
        ] {
            let full = |p: &Tensor, b: &Option<Tensor>| match b {
                Some(b) => p.broadcast_add(b).unwrap(),
                None => p.clone(),
            };
            let expected = (full(&p1, &bias1) + full(&p2, &bias2)).unwrap();
            let sum = part(&p1, &bias1).plus(part(&p2, &bias2)).unwrap();
            let got = sum.resolve().unwrap();
            assert!(super::super::max_abs_diff(&got, &expected) < 1e-6);
            let joined = part(&p1, &bias1)
                .plus(part(&p2, &bias2))
                .unwrap()
                .add_to(&residual)
                .unwrap();
            let expected = (expected + &residual).unwrap();
            assert!(super::super::max_abs_diff(&joined, &expected) < 1e-6);
        }
    }

    /// The views a Linear on CUDA reads in place with a strided batched GEMM: a joint sequence's
    /// part narrowed out of several samples — not a contiguous tensor, one sample's part (whose
    /// rows are contiguous anyway), or a view whose rows are not.
    #[test]
    fn strided_samples_are_the_narrowed_parts_of_several() {
        let joint = Tensor::zeros((2, 15, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(samples_strided(&joint.narrow(1, 5, 10).unwrap()));
        assert!(!samples_strided(&joint));
        assert!(!samples_strided(
            &joint.narrow(0, 0, 1).unwrap().narrow(1, 5, 10).unwrap()
        ));
        assert!(!samples_strided(&joint.narrow(2, 0, 4).unwrap()));
        assert!(!samples_strided(&joint.transpose(1, 2).unwrap()));
        assert!(!samples_strided(&joint.narrow(1, 5, 1).unwrap()));
    }

    #[test]
    fn fused_group_norm_matches_candles() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2., (2, 8, 5, 7), &dev).unwrap() + 0.5).unwrap();
        let w = Tensor::randn(0f32, 1., 8, &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 8, &dev).unwrap();
        for (dtype, limit) in [(DType::F32, 2e-5), (DType::F16, 2e-2)] {
            let (x, w, b) = (
                x.to_dtype(dtype).unwrap(),
                w.to_dtype(dtype).unwrap(),
                b.to_dtype(dtype).unwrap(),
            );
            let reference = candle_nn::GroupNorm::new(w.clone(), b.clone(), 8, 4, 1e-5)
                .unwrap()
                .forward(&x)
                .unwrap();
            for with_silu in [false, true] {
                let ours = group_norm_fused(&x, &w, &b, 4, 1e-5, with_silu).unwrap();
                assert_eq!(ours.dtype(), dtype);
                let expected = if with_silu {
                    reference.silu().unwrap()
                } else {
                    reference.clone()
                };
                let diff = super::super::max_abs_diff(
                    &ours.to_dtype(DType::F32).unwrap(),
                    &expected.to_dtype(DType::F32).unwrap(),
                );
                assert!(diff < limit, "{dtype:?} silu {with_silu}: {diff}");
            }
        }
    }
}
