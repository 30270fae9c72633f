//! The fused kernels checked on the device at hand, once per process when a CUDA device is opened
//! ([`super::configure`]): each on a small input against the same computation in candle's f32
//! ops. CI checks the kernels' source under a CPU emulation (tests/cuda_emulated.rs) and a GPU
//! run checks whole models (`bench --device-parity`), but neither covers every card, driver and
//! launch path a user has; a kernel that disagrees here is switched off for the process, with
//! an error in the log, and the models take the unfused path instead of making wrong images.
//! The FP8 products are checked when first wanted instead (their cuBLASLt workspace is memory a
//! process without FP8 weights should not spend).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};

/// The fused paths this checks.
#[derive(Clone, Copy, Debug)]
pub enum Fused {
    /// The attention kernel the models run, on strided (token-major) operands.
    Attention = 0,
    /// The DiTs' LayerNorm + modulation.
    LayerNormModulate = 1,
    /// RoPE on heads-first views of token-major data.
    TokenMajorRope = 2,
    /// FP8 weights' products on FP8 tensor cores (cuBLASLt), against widening the weights.
    Fp8Linear = 3,
    /// A Linear's bias added by the kernel consuming its product (tanh GELU, GEGLU, gated
    /// residual, residual add), and our residual and per-channel adds in place of candle's.
    DeferredBias = 4,
    /// The DiTs' q/k projections' bias, per-head RMSNorm and RoPE in one kernel that also joins
    /// the text and image streams; the values' biases added while joining them.
    QkNorm = 5,
    /// Nearest ×2 upsampling in one pass.
    Upsample = 6,
    /// GroupNorm (+SiLU): statistics in slices of each group, merged, then one normalising pass.
    GroupNorm = 7,
    /// A Linear over a narrowed (B, N, K) view with a gap between samples (a joint sequence's
    /// image or text part under CFG) as one strided batched GEMM, where it was copied first.
    /// Not a kernel of ours (cuBLAS, as candle calls it): nothing to check, a switch to time.
    StridedGemm = 8,
    /// A LayerNorm with learned weight and bias (the UNets' transformer blocks, CLIP) in one
    /// pass, where candle's kernel ran.
    LayerNorm = 9,
    /// FP8 weights' matrix-vector products (the DiTs' modulation) decoding the codes in
    /// registers, where the weight was widened for a GEMV.
    Fp8Gemv = 10,
    /// cuDNN's fused attention (graph API) where a selection uses it (`--attention-kernel
    /// cudnn|fastest`); checked with the attention kernels.
    CudnnAttention = 11,
}

impl Fused {
    pub const ALL: [Fused; 12] = [
        Fused::Attention,
        Fused::LayerNormModulate,
        Fused::TokenMajorRope,
        Fused::Fp8Linear,
        Fused::DeferredBias,
        Fused::QkNorm,
        Fused::Upsample,
        Fused::GroupNorm,
        Fused::StridedGemm,
        Fused::LayerNorm,
        Fused::Fp8Gemv,
        Fused::CudnnAttention,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fused::Attention => "attention",
            Fused::LayerNormModulate => "layer-norm-modulate",
            Fused::TokenMajorRope => "token-major-rope",
            Fused::Fp8Linear => "fp8-linear",
            Fused::DeferredBias => "deferred-bias",
            Fused::QkNorm => "qk-norm",
            Fused::Upsample => "upsample",
            Fused::GroupNorm => "group-norm",
            Fused::StridedGemm => "strided-gemm",
            Fused::LayerNorm => "layer-norm",
            Fused::Fp8Gemv => "fp8-gemv",
            Fused::CudnnAttention => "cudnn-attention",
        }
    }
}

static SWITCHED_OFF: [AtomicBool; Fused::ALL.len()] =
    [const { AtomicBool::new(false) }; Fused::ALL.len()];

/// Whether `op` may run (not switched off by a failed check).
pub fn passed(op: Fused) -> bool {
    !SWITCHED_OFF[op as usize].load(Ordering::Relaxed)
}

/// Whether `op` runs on `t`: a CUDA tensor of a dtype our kernels take, `op` not switched off.
pub fn runs_on(op: Fused, t: &Tensor) -> bool {
    super::elementwise::supports(t) && passed(op)
}

/// Switches `op` off for the process (`candela bench --switch-off`: a whole model timed without
/// it, against the default run).
pub fn switch_off(op: Fused) {
    SWITCHED_OFF[op as usize].store(true, Ordering::Relaxed);
}

/// Relative L2 error above which a kernel is wrong rather than rounded differently: the kernels
/// measured 3e-4 (f16) on an H200; an indexing error is of order one.
pub(super) const LIMIT: f64 = 1e-2;

/// One check: the fused op's relative error against candle's ops on the device.
type Check = fn(&Device) -> candle_core::Result<f64>;

/// Runs every check on `device` and switches off what fails.
pub fn run(device: &Device) {
    let checks: [(Fused, Check); 9] = [
        (Fused::Attention, attention),
        (Fused::LayerNormModulate, layer_norm_modulate),
        (Fused::LayerNorm, layer_norm),
        (Fused::TokenMajorRope, token_major_rope),
        (Fused::DeferredBias, deferred_bias),
        (Fused::QkNorm, qk_norm),
        (Fused::Upsample, upsample),
        (Fused::GroupNorm, group_norm),
        (Fused::Fp8Gemv, fp8_gemv),
    ];
    for (op, check) in checks {
        judge(op, check(device), LIMIT);
    }
    #[cfg(feature = "cudnn")]
    graph_api_convolution(device);
}

/// The graph API's half-precision convolution where the models' convolutions go through it (by
/// default on every card since the per-shape race, measured on Hopper only) against candle's
/// f32 convolution: the legacy API for the process if it disagrees or fails.
#[cfg(feature = "cudnn")]
fn graph_api_convolution(device: &Device) {
    use super::conv_graph::{engine_for, set_engine, ConvEngine};
    if engine_for(device) == ConvEngine::Legacy {
        return;
    }
    type Convolution = fn(&Tensor, &Tensor, &Tensor, usize, usize) -> candle_core::Result<Tensor>;
    let error = |convolution: Convolution| -> candle_core::Result<f64> {
        let half = |t: Tensor| t.to_dtype(DType::F16);
        let x = half(values(&[2, 16, 12, 12], 0.7, device)?)?;
        let w = half((values(&[32, 16, 3, 3], 0.8, device)? * 0.2)?)?;
        let b = half(values(&[32], 0.9, device)?)?;
        let graph = convolution(&x, &w, &b, 1, 1)?;
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let exact = f32(&x)?
            .conv2d(&f32(&w)?, 1, 1, 1, 1)?
            .broadcast_add(&f32(&b)?.reshape((1, 32, 1, 1))?)?;
        relative_error(&graph, &exact)
    };
    // The conv-bias fusion on its own (where cuDNN has a fused plan for the shape; the timed
    // choice might not pick it here and pick it elsewhere).
    let fused = error(super::conv::conv2d_bias_fused);
    if let (true, Some(why)) = (fused.is_ok(), failure(&fused, LIMIT)) {
        super::conv::switch_off_bias_fusion(&why);
    }
    let timed = |x: &Tensor, w: &Tensor, b: &Tensor, padding, stride| {
        super::conv::conv2d_by(ConvEngine::Graph, x, w, b, padding, stride)
    };
    if let Some(why) = failure(&error(timed), LIMIT) {
        tracing::error!("graph-API convolution {why} on this device; the legacy API instead");
        set_engine(ConvEngine::Legacy);
    }
}

/// Why a check's outcome fails at `limit` (None: it passed).
fn failure(outcome: &candle_core::Result<f64>, limit: f64) -> Option<String> {
    match outcome {
        Ok(error) if *error <= limit => None,
        Ok(error) => Some(format!("disagrees with candle's ops by {error:.2e}")),
        Err(e) => Some(format!("failed: {e}")),
    }
}

/// The FP8 products' check, once per process when they are first wanted (it creates cuBLASLt's
/// handle and workspace, which a process without FP8 weights should not pay for).
pub fn fp8_products_pass(device: &Device) -> bool {
    static PASSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // Switched off (`--switch-off fp8-linear`): not even checked.
    passed(Fused::Fp8Linear)
        && *PASSED.get_or_init(|| judge(Fused::Fp8Linear, fp8_linear(device), LIMIT))
}

/// Logs a check's outcome and switches `op` off if it failed; whether it passed.
fn judge(op: Fused, outcome: candle_core::Result<f64>, limit: f64) -> bool {
    let Some(why) = failure(&outcome, limit) else {
        tracing::debug!(?op, error = ?outcome.ok(), "fused CUDA kernel checked against candle's ops");
        return true;
    };
    tracing::error!(?op, "fused CUDA kernel {why} on this device; switched off");
    SWITCHED_OFF[op as usize].store(true, Ordering::Relaxed);
    false
}

/// ‖a − b‖ / ‖b‖ in f32.
pub(super) fn relative_error(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let norm = |t: &Tensor| -> candle_core::Result<f64> {
        Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()? as f64)
    };
    Ok((norm(&(a - &b)?)? / norm(&b)?.max(f64::MIN_POSITIVE)).sqrt())
}

/// Values spread over [-1, 1], the same on every run.
fn values(dims: &[usize], seed: f32, device: &Device) -> candle_core::Result<Tensor> {
    let count: usize = dims.iter().product();
    let v: Vec<f32> = (0..count)
        .map(|i| (i as f32 * 0.7548 + seed).sin())
        .collect();
    Tensor::from_vec(v, dims, device)
}

/// The models' attention kernel at head sizes 64 and 128 (the larger error). A chosen candidate
/// kernel that fails is replaced by the tiled one (the one measured on GPUs), which is then
/// checked in turn.
fn attention(device: &Device) -> candle_core::Result<f64> {
    use super::attention::{
        attention_cudnn_first, cudnn_selected, model_kernel, set_model_kernel, switch_off_cudnn,
        Kernel,
    };
    type Attention = fn(&Tensor, &Tensor, &Tensor, f32) -> candle_core::Result<Tensor>;
    let worst_by = |attention: Attention| -> candle_core::Result<f64> {
        Ok(attention_at(device, 64, attention)?.max(attention_at(device, 128, attention)?))
    };
    let worst = || worst_by(super::attention::attention);
    // cuDNN's fused attention where chosen (its shapes without a plan run our kernel, checked
    // below either way): switched off if it fails or disagrees.
    if cudnn_selected() {
        if let Some(why) = failure(&worst_by(attention_cudnn_first), LIMIT) {
            tracing::error!("cuDNN's fused attention {why} on this device; switched off");
            switch_off_cudnn();
        }
    }
    // The kernels the models run at the two head sizes checked.
    let kernels = [model_kernel(64), model_kernel(128)];
    if kernels == [Kernel::Tiled; 2] {
        return worst();
    }
    let outcome = worst();
    let Some(why) = failure(&outcome, LIMIT) else {
        return outcome;
    };
    tracing::error!(
        kernels = ?kernels.map(Kernel::name),
        "the chosen attention kernels {why} on this device; the tiled kernel runs instead"
    );
    set_model_kernel(Kernel::Tiled);
    worst()
}

/// Token-major (batch, tokens, heads, d) f16 operands seen heads-first, as the models pass them.
fn attention_at(
    device: &Device,
    d: usize,
    attention: fn(&Tensor, &Tensor, &Tensor, f32) -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    let heads = 2;
    let operand = |tokens: usize, seed: f32| -> candle_core::Result<Tensor> {
        values(&[1, tokens, heads, d], seed, device)?
            .to_dtype(DType::F16)?
            .transpose(1, 2)
    };
    let (q, k, v) = (operand(70, 0.1)?, operand(90, 0.2)?, operand(90, 0.3)?);
    if !super::attention::supports(&q, &k, &v) {
        return Ok(0.0);
    }
    let scale = 1.0 / (d as f32).sqrt();
    let fused = attention(&q, &k, &v, scale)?;
    let f32 = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let exact =
        crate::engine::models::attention::unfused(&f32(&q)?, &f32(&k)?, &f32(&v)?, None, false)?;
    relative_error(&fused, &exact)
}

fn layer_norm_modulate(device: &Device) -> candle_core::Result<f64> {
    use crate::engine::models::dit::PlainLayerNorm;
    let (b, n, width, eps) = (2, 33, 256, 1e-6);
    let x = (values(&[b, n, width], 0.4, device)? * 2.0)?;
    let shift = values(&[b, width], 0.5, device)?;
    let scale = (values(&[b, width], 0.6, device)? * 0.5)?;
    let half = |t: &Tensor| t.to_dtype(DType::F16);
    let fused = PlainLayerNorm::on(width, eps, DType::F16, device)?.forward_modulated(
        &half(&x)?,
        &half(&shift)?,
        &half(&scale)?,
    )?;
    let f32 = |t: &Tensor| half(t)?.to_dtype(DType::F32);
    let exact = PlainLayerNorm::on(width, eps, DType::F32, device)?.forward_then_modulate(
        &f32(&x)?,
        &f32(&shift)?,
        &f32(&scale)?,
    )?;
    relative_error(&fused, &exact)
}

/// A LayerNorm with weight and bias over (2, 33, 320) f16 rows, against candle's in f32.
fn layer_norm(device: &Device) -> candle_core::Result<f64> {
    let (b, n, width, eps) = (2, 33, 320, 1e-5);
    let x = (values(&[b, n, width], 0.9, device)? * 2.0)?;
    let weight = (values(&[width], 1.0, device)? + 1.0)?;
    let bias = values(&[width], 1.1, device)?;
    let half = |t: &Tensor| t.to_dtype(DType::F16);
    let f32 = |t: &Tensor| half(t)?.to_dtype(DType::F32);
    let fused =
        super::elementwise::layer_norm_affine(&half(&x)?, &half(&weight)?, &half(&bias)?, eps)?;
    let exact = candle_nn::ops::layer_norm(&f32(&x)?, &f32(&weight)?, &f32(&bias)?, eps)?;
    relative_error(&fused, &exact)
}

/// (1, tokens, heads, d) f16 data seen heads-first, rotated by the fused kernel in its own order.
fn token_major_rope(device: &Device) -> candle_core::Result<f64> {
    use crate::engine::models::dit::Rope;
    let (tokens, heads, d) = (20, 2, 64);
    let x = values(&[1, tokens, heads, d], 0.7, device)?.to_dtype(DType::F16)?;
    let view = x.transpose(1, 2)?;
    let angles = (values(&[tokens, d / 2], 0.8, device)? * 3.0)?;
    let (cos, sin) = (angles.cos()?, angles.sin()?);
    let fused = super::elementwise::rope(&view, &cos, &sin)?;
    let rope = Rope::new(cos, sin)?;
    let exact = rope.apply_unfused(&view.to_dtype(DType::F32)?)?;
    relative_error(&fused, &exact)
}

/// The tanh GELU, GEGLU, the gated residual and the residual add taking a Linear's bias with its
/// f16 product, against adding it first in f32 ops.
fn deferred_bias(device: &Device) -> candle_core::Result<f64> {
    let (b, n, width) = (2, 33, 256);
    let half = |t: &Tensor| t.to_dtype(DType::F16);
    let f32 = |t: &Tensor| half(t)?.to_dtype(DType::F32);
    let h = (values(&[b, n, width], 1.2, device)? * 2.0)?;
    let bias = values(&[width], 1.3, device)?;
    let x = values(&[b, n, width], 1.4, device)?;
    let gate = values(&[b, width], 1.5, device)?;
    let biased = f32(&h)?.broadcast_add(&f32(&bias)?)?;
    let gelu = super::elementwise::gelu_tanh(&half(&h)?, Some(&half(&bias)?))?;
    let gelu_error = relative_error(&gelu, &biased.gelu()?)?;
    let added = super::elementwise::gated_add(
        &half(&x)?,
        &half(&gate)?,
        &half(&h)?,
        None,
        Some(&half(&bias)?),
    )?;
    let exact = (f32(&x)? + biased.broadcast_mul(&f32(&gate)?.unsqueeze(1)?)?)?;
    // With a second product (FLUX's single blocks multiply in two parts).
    let second = values(&[b, n, width], 2.2, device)?;
    let summed = super::elementwise::gated_add(
        &half(&x)?,
        &half(&gate)?,
        &half(&h)?,
        Some(&half(&second)?),
        Some(&half(&bias)?),
    )?;
    let exact_sum =
        (f32(&x)? + (&biased + f32(&second)?)?.broadcast_mul(&f32(&gate)?.unsqueeze(1)?)?)?;
    let gated_error = relative_error(&added, &exact)?.max(relative_error(&summed, &exact_sum)?);
    let joined =
        super::elementwise::add_to_product(&half(&h)?, Some(&half(&bias)?), Some(&half(&x)?))?;
    let residual_error = relative_error(&joined, &(&biased + f32(&x)?)?)?;
    // GEGLU over (2, 33, 2·128) with the projection's bias.
    let geglu = super::elementwise::geglu(&half(&h)?, Some(&half(&bias)?))?;
    let (value, gate) = (
        biased.narrow(2, 0, width / 2)?,
        biased.narrow(2, width / 2, width / 2)?,
    );
    let geglu_error = relative_error(&geglu, &(value * gate.gelu_erf()?)?)?;
    // The ResNet blocks' time embedding, one value per sample and channel over (2, 33, 16, 16).
    let image = values(&[b, n, 16, 16], 2.0, device)?;
    let per_channel = values(&[b, n], 2.1, device)?;
    let summed = super::elementwise::channel_add(&half(&image)?, &half(&per_channel)?)?;
    let exact = f32(&image)?.broadcast_add(&f32(&per_channel)?.unsqueeze(2)?.unsqueeze(3)?)?;
    let channel_error = relative_error(&summed, &exact)?;
    Ok(gelu_error
        .max(gated_error)
        .max(residual_error)
        .max(geglu_error)
        .max(channel_error))
}

/// The fused q/k kernel on two f16 streams (2 samples, 5 text and 20 image tokens, 3 heads of
/// 128) joined text first, with FLUX's rotary table and without (SD3.5), against bias, candle's
/// RMSNorm, joining and the unfused rotation in f32; and the values' bias + join.
fn qk_norm(device: &Device) -> candle_core::Result<f64> {
    use super::elementwise::{join_values, Stream};
    use crate::engine::models::dit::Rope;
    use candle_core::Module;
    let (batch, heads, d, eps) = (2, 3, 128, 1e-6);
    let stream = |tokens: usize, seed: f32| -> candle_core::Result<[Tensor; 3]> {
        let x = (values(&[batch, tokens, heads, d], seed, device)? * 2.0)?;
        let bias = values(&[heads * d], seed + 0.1, device)?;
        let weight = ((values(&[d], seed + 0.2, device)? * 0.3)? + 1.0)?;
        let params = Tensor::cat(&[&bias, &weight], 0)?.to_dtype(DType::F16)?;
        Ok([x.to_dtype(DType::F16)?, params, bias.to_dtype(DType::F16)?])
    };
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let (text, image) = (stream(5, 1.6)?, stream(20, 1.7)?);
    let total = 25;
    // Reference: each stream biased and normalised, then joined text first.
    let normed = |[x, params, _]: &[Tensor; 3]| -> candle_core::Result<Tensor> {
        let bias = f32(&params.narrow(0, 0, heads * d)?)?.reshape((heads, d))?;
        let weight = f32(&params.narrow(0, heads * d, d)?)?;
        candle_nn::RmsNorm::new(weight, eps).forward(&f32(x)?.broadcast_add(&bias)?)
    };
    let joined = Tensor::cat(&[normed(&text)?, normed(&image)?], 1)?;
    let streams = |with: fn(&[Tensor; 3]) -> &Tensor| {
        [(&text, 0), (&image, 5)].map(|(s, offset)| Stream {
            x: &s[0],
            with: Some(with(s)),
            offset,
        })
    };
    let plain = super::elementwise::qk_norm(&streams(|s| &s[1]), None, total, eps as f32)?;
    let plain_error = relative_error(&plain, &joined)?;
    let angles = (values(&[1, 1, total, d / 2], 1.9, device)? * 3.0)?;
    let rope = Rope::new(angles.cos()?, angles.sin()?)?;
    let rotated =
        super::elementwise::qk_norm(&streams(|s| &s[1]), rope.table(), total, eps as f32)?;
    let exact = rope.apply_unfused(&joined.transpose(1, 2)?)?;
    let rotated_error = relative_error(&rotated.transpose(1, 2)?, &exact)?;
    // The values: each stream's bias added while joining.
    let flat = |s: &[Tensor; 3]| s[0].reshape((batch, (), heads * d));
    let (text_v, image_v) = (flat(&text)?, flat(&image)?);
    let values_joined = join_values(
        &[
            Stream {
                x: &text_v,
                with: Some(&text[2]),
                offset: 0,
            },
            Stream {
                x: &image_v,
                with: Some(&image[2]),
                offset: 5,
            },
        ],
        total,
    )?;
    let biased = |v: &Tensor, b: &Tensor| f32(v)?.broadcast_add(&f32(b)?);
    let exact_values = Tensor::cat(
        &[biased(&text_v, &text[2])?, biased(&image_v, &image[2])?],
        1,
    )?;
    let values_error = relative_error(&values_joined, &exact_values)?;
    Ok(plain_error.max(rotated_error).max(values_error))
}

/// Nearest ×2 upsampling against candle's index_select (a copy: exact).
fn upsample(device: &Device) -> candle_core::Result<f64> {
    use crate::engine::models::blocks::resize_nearest_by_index;
    let x = values(&[2, 3, 5, 8], 2.3, device)?.to_dtype(DType::F16)?;
    relative_error(
        &super::elementwise::upsample_nearest2x(&x)?,
        &resize_nearest_by_index(&x, 10, 16)?,
    )
}

/// GroupNorm + SiLU against candle's layer_norm over each group, at groups of 16 384 values (their
/// statistics in 4 slices: the merge is exercised).
fn group_norm(device: &Device) -> candle_core::Result<f64> {
    let (channels, groups) = (32, 8);
    // An offset from zero: the variance must not come from a mean of zero.
    let x = values(&[2, channels, 64, 64], 2.9, device)?
        .affine(3.0, 1.0)?
        .to_dtype(DType::F16)?;
    let scale = values(&[channels], 3.1, device)?.to_dtype(DType::F16)?;
    let shift = values(&[channels], 3.3, device)?.to_dtype(DType::F16)?;
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    relative_error(
        &super::elementwise::group_norm(&x, &scale, &shift, groups, 1e-6, true)?,
        &crate::engine::models::blocks::group_norm_fused(
            &f32(&x)?,
            &f32(&scale)?,
            &f32(&shift)?,
            groups,
            1e-6,
            true,
        )?,
    )
}

/// The FP8 matrix-vector product (two rows, as under guidance) against the widened weight's
/// product in f32.
fn fp8_gemv(device: &Device) -> candle_core::Result<f64> {
    use crate::engine::models::quantized::{cast, quantize_fp8};
    let (rows, inner, out) = (2, 256, 72);
    let weight = (values(&[out, inner], 1.2, device)? * 0.05)?;
    let (codes, scale) = quantize_fp8(&weight.to_dtype(DType::BF16)?)?;
    let bias = values(&[out], 1.3, device)?.to_dtype(DType::BF16)?;
    let x = values(&[rows, inner], 1.4, device)?.to_dtype(DType::BF16)?;
    let operands = super::fp8::Operands::new(&scale, Some(&bias), DType::BF16)?;
    let fused = super::fp8::gemv(&x, &codes, &operands)?;
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let exact = f32(&x)?
        .matmul(&cast(&codes, DType::F32)?.t()?)?
        .broadcast_mul(&f32(&scale)?)?
        .broadcast_add(&f32(&bias)?)?;
    relative_error(&fused, &exact)
}

/// An FP8 layer's product on the FP8 tensor cores against the same product in f32 tensor ops
/// (`fp8_product_reference`: the activations rounded to e4m3 the same way), where the card has
/// them (compute capability ≥ 8.9): the per-row form first (the per-tensor one for the process
/// if it fails or disagrees), then the per-tensor form, which products fall back on.
fn fp8_linear(device: &Device) -> candle_core::Result<f64> {
    use super::fp8::{self, ActivationScale};
    use crate::engine::models::quantized::{fp8_product_reference, quantize_fp8};
    if !fp8::has_fp8_tensor_cores(device) {
        return Ok(0.0);
    }
    let (rows, inner, out) = (40, 256, 96);
    let weight = (values(&[out, inner], 0.9, device)? * 0.05)?;
    let (codes, scale) = quantize_fp8(&weight.to_dtype(DType::BF16)?)?;
    let bias = values(&[out], 1.0, device)?.to_dtype(DType::BF16)?;
    // Rows of different ranges, as tokens are.
    let ranges = Tensor::arange(1u32, rows as u32 + 1, device)?
        .to_dtype(DType::F32)?
        .reshape((1, rows, 1))?;
    let x = values(&[1, rows, inner], 1.1, device)?
        .broadcast_mul(&ranges)?
        .to_dtype(DType::BF16)?;
    let operands = fp8::Operands::new(&scale, Some(&bias), DType::BF16)?;
    let error = |form: ActivationScale| -> candle_core::Result<f64> {
        let fused = fp8::linear_by(form, &x, &codes, &operands)?;
        let per_row = form == ActivationScale::PerRow;
        relative_error(
            &fused,
            &fp8_product_reference(&x, &codes, &scale, Some(&bias), per_row)?,
        )
    };
    if let Some(why) = failure(&error(ActivationScale::PerRow), LIMIT) {
        fp8::switch_off_per_row(&why);
    }
    error(ActivationScale::PerTensor)
}
