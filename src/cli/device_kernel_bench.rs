//! `candela bench --kernels --device cuda --dtype f16`: the ops a denoiser step is made of, at the
//! shapes of SD 1.5 / SDXL / SD3.5 / FLUX and their VAEs, timed on the device as the models run
//! them (every cuDNN forward algorithm for the convolutions too). One JSON line per figure goes to
//! `--json-out`; `tools/bench/gpu/kernels_torch.py` times the same ops and shapes in PyTorch from
//! that file and prints both side by side, so a slow op shows before any model does.

use std::io::Write;

use candle_core::conv::CudnnFwdAlgo;
use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;

use crate::engine::models::{attention, blocks, cpu_activation};

#[derive(Serialize)]
struct Figure<'a> {
    op: &'a str,
    shape: Vec<usize>,
    variant: String,
    ms: Option<f64>,
    /// Why no time: the variant failed (a cuDNN algorithm that does not support the shape).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Median of `repeats` runs after a warm-up, the device synchronised around each.
fn time_ms(
    device: &Device,
    repeats: usize,
    mut f: impl FnMut() -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    crate::engine::pipelines::timing::median_ms(repeats, || device.synchronize(), || f().map(drop))
}

const ALGOS: [(&str, Option<CudnnFwdAlgo>); 8] = [
    ("heuristic", None),
    ("implicit_gemm", Some(CudnnFwdAlgo::ImplicitGemm)),
    (
        "implicit_precomp_gemm",
        Some(CudnnFwdAlgo::ImplicitPrecompGemm),
    ),
    ("gemm", Some(CudnnFwdAlgo::Gemm)),
    ("fft", Some(CudnnFwdAlgo::Fft)),
    ("fft_tiling", Some(CudnnFwdAlgo::FftTiling)),
    ("winograd", Some(CudnnFwdAlgo::Winograd)),
    ("winograd_nonfused", Some(CudnnFwdAlgo::WinogradNonFused)),
];

pub fn run(
    device: &Device,
    dtype: DType,
    repeats: usize,
    json_out: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    // Written line by line: a run cut short by its time limit keeps what it measured.
    let mut file = json_out.map(std::fs::File::create).transpose()?;
    let mut record =
        |op: &'static str, shape: &[usize], variant: &str, result: candle_core::Result<f64>| {
            let (ms, error) = match result {
                Ok(ms) => (Some(ms), None),
                Err(e) => (
                    None,
                    Some(e.to_string().lines().next().unwrap_or("").to_string()),
                ),
            };
            println!(
                "| {op} | {shape:?} | {variant} | {} |",
                ms.map(|m| format!("{m:.3}"))
                    .unwrap_or_else(|| format!("failed: {}", error.as_deref().unwrap_or("")))
            );
            let figure = Figure {
                op,
                shape: shape.to_vec(),
                variant: variant.to_string(),
                ms,
                error,
            };
            if let Some(file) = file.as_mut() {
                let written = serde_json::to_string(&figure)
                    .map_err(std::io::Error::from)
                    .and_then(|line| writeln!(file, "{line}"));
                if let Err(e) = written {
                    eprintln!("writing the kernel figures: {e}");
                }
            }
        };
    let randn = |dims: &[usize], std: f64| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, std as f32, dims, device)?.to_dtype(dtype)
    };
    println!("| op | shape | variant | ms |");
    println!("|---|---|---|---|");

    // The fused kernels ("ours", what the models run) against candle's ops, each with its
    // relative error against candle's result.
    let check = |op: &str, shape: &[usize], ours: &Tensor, theirs: &Tensor, against: &str| {
        let error = (|| -> candle_core::Result<f64> {
            let (a, b) = (ours.to_dtype(DType::F32)?, theirs.to_dtype(DType::F32)?);
            let norm = |t: &Tensor| -> candle_core::Result<f64> {
                Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64)
            };
            Ok(norm(&(a - &b)?)? / norm(&b)?)
        })();
        match error {
            Ok(e) => {
                println!("| {op} | {shape:?} | relative error of ours vs {against} | {e:.2e} |")
            }
            Err(e) => println!("| {op} | {shape:?} | relative error | failed: {e} |"),
        }
    };
    // A fused kernel against the same work done apart: both timed ("ours" second), then the
    // fused result's error against the other's. (Only the CUDA build has fused kernels.)
    #[cfg(feature = "cuda")]
    macro_rules! fused_against {
        ($op:expr, $shape:expr, $apart_label:expr, $apart:expr, $fused:expr, $against:expr) => {{
            let (apart, fused) = ($apart, $fused);
            record($op, &$shape, $apart_label, time_ms(device, repeats, apart));
            record($op, &$shape, "ours", time_ms(device, repeats, fused));
            check($op, &$shape, &fused()?, &apart()?, $against);
        }};
    }
    // 3×3 convolutions (batch, in, out, side): SD 1.5 UNet at 512² and SDXL's at 1024² (batch 2,
    // guidance), the VAE decoders at 512² and 1024².
    for shape in [
        [2, 320, 320, 64],
        [2, 640, 640, 32],
        [2, 1280, 1280, 16],
        [2, 2560, 1280, 8],
        [2, 320, 320, 128],
        [2, 640, 640, 64],
        [2, 1280, 1280, 32],
        [1, 512, 512, 128],
        [1, 256, 256, 512],
        [1, 128, 128, 1024],
    ] {
        let [b, ci, co, s] = shape;
        let x = randn(&[b, ci, s, s], 1.0)?;
        let k = randn(&[co, ci, 3, 3], 0.02)?;
        let bias = randn(&[co], 1.0)?;
        let conv = blocks::Conv2d::from_parts(k.clone(), Some(bias.clone()), 1, 1);
        let t = time_ms(device, repeats, || candle_core::Module::forward(&conv, &x));
        record("conv3x3", &shape, "ours (with bias)", t);
        for (name, algo) in ALGOS {
            let t = time_ms(device, repeats, || {
                x.conv2d_with_algo(&k, 1, 1, 1, 1, algo)?
                    .broadcast_add(&bias.reshape((1, co, 1, 1))?)
            });
            record("conv3x3", &shape, &format!("candle {name} + bias"), t);
        }
        // The graph-API candidate, with its output against the legacy API's.
        #[cfg(feature = "cudnn")]
        {
            use crate::engine::cuda::{conv::conv2d_by, conv_graph::ConvEngine};
            let by = |engine| conv2d_by(engine, &x, &k, &bias, 1, 1);
            let t = time_ms(device, repeats, || by(ConvEngine::Graph));
            record("conv3x3", &shape, "ours, graph API (with bias)", t);
            match (by(ConvEngine::Graph), by(ConvEngine::Legacy)) {
                (Ok(graph), Ok(legacy)) => check(
                    "conv3x3",
                    &shape,
                    &graph,
                    &legacy,
                    "the legacy API (graph API)",
                ),
                (Err(e), _) | (_, Err(e)) => {
                    println!("| conv3x3 | {shape:?} | graph API | failed: {e} |")
                }
            }
        }
    }
    // GroupNorm (32 groups) + SiLU as the ResNet blocks run it.
    for shape in [
        [2, 320, 64, 64],
        [2, 1280, 16, 16],
        [1, 512, 128, 128],
        [1, 128, 1024, 1024],
    ] {
        let [_, c, _, _] = shape;
        let x = (randn(&shape, 1.0)? + 0.5)?;
        let (w, b) = (randn(&[c], 1.0)?, randn(&[c], 1.0)?);
        let norm = blocks::GroupNorm::from_parts(w.clone(), b.clone(), 32, 1e-5)?;
        let t = time_ms(device, repeats, || norm.forward_silu(&x));
        record("group_norm_silu", &shape, "ours", t);
        let t = time_ms(device, repeats, || {
            blocks::group_norm_fused(&x, &w, &b, 32, 1e-5, true)
        });
        record("group_norm_silu", &shape, "candle layer_norm per group", t);
        check(
            "group_norm_silu",
            &shape,
            &norm.forward_silu(&x)?,
            &blocks::group_norm_fused(&x, &w, &b, 32, 1e-5, true)?,
            "candle",
        );
    }
    // LayerNorm over tokens (tokens, width): SD 1.5's and SDXL's transformer blocks (guided
    // batch), the DiTs' widths; candle's kernel and (CUDA) ours, which the UNets and CLIP run.
    for shape in [
        [8192, 320],
        [8192, 640],
        [2048, 1280],
        [4608, 3072],
        [8858, 2432],
    ] {
        let x = randn(&shape, 1.0)?;
        let (w, b) = (randn(&[shape[1]], 1.0)?, randn(&[shape[1]], 1.0)?);
        let candle = || candle_nn::ops::layer_norm(&x, &w, &b, 1e-5);
        #[cfg(feature = "cuda")]
        if crate::engine::cuda::elementwise::supports(&x) {
            use crate::engine::cuda::elementwise::layer_norm_affine;
            fused_against!(
                "layer_norm",
                shape,
                "candle",
                candle,
                || layer_norm_affine(&x, &w, &b, 1e-5),
                "candle"
            );
            continue;
        }
        record(
            "layer_norm",
            &shape,
            "candle",
            time_ms(device, repeats, candle),
        );
    }
    // A DiT's LayerNorm (no parameters) and modulation (batch, tokens, width): candle's layer norm
    // then our modulate kernel, against the fused kernel the DiTs run.
    #[cfg(feature = "cuda")]
    for shape in [[1, 4608, 3072], [2, 4429, 2432]] {
        use crate::engine::cuda::elementwise::{layer_norm_modulate, modulate};
        let [b, _, width] = shape;
        let x = randn(&shape, 1.0)?;
        let (shift, scale) = (randn(&[b, width], 1.0)?, randn(&[b, width], 0.5)?);
        let (ones, zeros) = (
            Tensor::ones(width, dtype, device)?,
            Tensor::zeros(width, dtype, device)?,
        );
        let two_passes = || {
            modulate(
                &candle_nn::ops::layer_norm(&x, &ones, &zeros, 1e-6)?,
                &shift,
                &scale,
            )
        };
        fused_against!(
            "layer_norm_modulate",
            shape,
            "candle layer_norm + ours modulate",
            two_passes,
            || layer_norm_modulate(&x, &shift, &scale, 1e-6),
            "candle layer_norm + modulate"
        );
    }
    // A Linear's bias left to the kernel consuming its product (what the DiTs run on CUDA),
    // against a bias pass of its own before it: FLUX's MLP (tanh GELU) and gated residual, and its
    // q/k bias + per-head RMSNorm + RoPE (candle's rms_norm and our rope kernel, unfused).
    #[cfg(feature = "cuda")]
    {
        use crate::engine::cuda::elementwise::{
            self, bias_add, gated_add, gelu_tanh, qk_norm, rope,
        };
        let shape = [4608, 12288];
        let (h, bias) = (randn(&shape, 1.0)?, randn(&[shape[1]], 1.0)?);
        fused_against!(
            "bias_gelu_tanh",
            shape,
            "bias pass + ours gelu",
            || gelu_tanh(&bias_add(&h, &bias)?, None),
            || gelu_tanh(&h, Some(&bias)),
            "bias pass + gelu"
        );

        let shape = [1, 4608, 3072];
        let (x, h, gate) = (
            randn(&shape, 1.0)?,
            randn(&shape, 1.0)?,
            randn(&[1, 3072], 1.0)?,
        );
        let bias = randn(&[3072], 1.0)?;
        fused_against!(
            "gated_add_bias",
            shape,
            "bias pass + ours gated add",
            || gated_add(&x, &gate, &bias_add(&h, &bias)?, None, None),
            || gated_add(&x, &gate, &h, None, Some(&bias)),
            "bias pass + gated add"
        );

        // The UNet's transformer blocks (SDXL, 32² level, CFG batch): GEGLU with the
        // projection's bias, and the residual add with the output projection's.
        let shape = [2048, 10240];
        let (h, bias) = (randn(&shape, 1.0)?, randn(&[shape[1]], 1.0)?);
        fused_against!(
            "geglu_bias",
            shape,
            "bias pass + ours geglu",
            || elementwise::geglu(&bias_add(&h, &bias)?, None),
            || elementwise::geglu(&h, Some(&bias)),
            "bias pass + geglu"
        );
        let shape = [2, 1024, 1280];
        let (y, residual) = (randn(&shape, 1.0)?, randn(&shape, 1.0)?);
        let bias = randn(&[shape[2]], 1.0)?;
        fused_against!(
            "bias_residual_add",
            shape,
            "bias pass + candle add",
            || bias_add(&y, &bias)? + &residual,
            || elementwise::add_to_product(&y, Some(&bias), Some(&residual)),
            "bias pass + add"
        );

        // SDXL's last UNet upsampling (CFG batch): candle's two index_selects against ours.
        let shape = [2, 640, 64, 64];
        let x = randn(&shape, 1.0)?;
        fused_against!(
            "upsample_nearest2x",
            shape,
            "candle index_select ×2",
            || blocks::resize_nearest_by_index(&x, 128, 128),
            || elementwise::upsample_nearest2x(&x),
            "candle"
        );

        // The ResNet blocks' time embedding over SDXL's first level (CFG batch).
        let shape = [2, 320, 128, 128];
        let (x, t) = (randn(&shape, 1.0)?, randn(&[2, 320], 1.0)?);
        fused_against!(
            "channel_add",
            shape,
            "candle broadcast_add",
            || x.broadcast_add(&t.reshape((2, 320, 1, 1))?),
            || elementwise::channel_add(&x, &t),
            "candle"
        );

        // SD3.5 Large's values (CFG batch): each stream's bias, then the join, against both in
        // one pass per stream.
        let shape = [2, 4429, 2432];
        let (image, text) = (randn(&[2, 4096, 2432], 1.0)?, randn(&[2, 333, 2432], 1.0)?);
        let (image_bias, text_bias) = (randn(&[2432], 1.0)?, randn(&[2432], 1.0)?);
        let apart = || {
            Tensor::cat(
                &[
                    &bias_add(&image, &image_bias)?,
                    &bias_add(&text, &text_bias)?,
                ],
                1,
            )
        };
        let streams = [
            elementwise::Stream {
                x: &image,
                with: Some(&image_bias),
                offset: 0,
            },
            elementwise::Stream {
                x: &text,
                with: Some(&text_bias),
                offset: 4096,
            },
        ];
        fused_against!(
            "join_values",
            shape,
            "bias passes + candle cat",
            apart,
            || elementwise::join_values(&streams, 4429),
            "bias passes + cat"
        );

        let shape = [1, 4608, 24, 128];
        let [_, tokens, heads, d] = shape;
        let q = randn(&shape, 1.0)?;
        let bias = randn(&[heads * d], 1.0)?;
        let weight = (randn(&[d], 0.1)? + 1.0)?;
        let params = Tensor::cat(&[&bias, &weight], 0)?;
        let angles = Tensor::randn(0f32, 3.0, (1, 1, tokens, d / 2), device)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let table = Tensor::stack(&[&cos, &sin], D::Minus1)?;
        let norm = candle_nn::RmsNorm::new(weight.clone(), 1e-6);
        let apart = || {
            let normed = candle_core::Module::forward(
                &norm,
                &bias_add(&q.reshape((tokens, heads * d))?, &bias)?.reshape(&shape[..])?,
            )?;
            rope(&normed.transpose(1, 2)?, &cos, &sin)?.transpose(1, 2)
        };
        let stream = [elementwise::Stream {
            x: &q,
            with: Some(&params),
            offset: 0,
        }];
        fused_against!(
            "qk_norm_rope",
            shape,
            "bias pass + candle rms_norm + ours rope",
            apart,
            || qk_norm(&stream, Some(&table), tokens, 1e-6),
            "bias + rms_norm + rope"
        );
    }
    for shape in [[8192, 2560], [4608, 12288]] {
        let x = randn(&shape, 1.0)?;
        let t = time_ms(device, repeats, || x.gelu_erf());
        record("gelu_erf", &shape, "candle", t);
        let t = time_ms(device, repeats, || cpu_activation::gelu_tanh(&x));
        record("gelu_tanh", &shape, "ours", t);
        let t = time_ms(device, repeats, || x.gelu());
        record("gelu_tanh", &shape, "candle", t);
        check(
            "gelu_tanh",
            &shape,
            &cpu_activation::gelu_tanh(&x)?,
            &x.gelu()?,
            "candle",
        );
        let half = shape[1] / 2;
        let candle_geglu =
            || x.narrow(D::Minus1, 0, half)? * x.narrow(D::Minus1, half, half)?.gelu_erf()?;
        #[cfg(feature = "cuda")]
        {
            use crate::engine::cuda::elementwise;
            let t = time_ms(device, repeats, || elementwise::geglu(&x, None));
            record("geglu", &shape, "ours", t);
            check(
                "geglu",
                &shape,
                &elementwise::geglu(&x, None)?,
                &candle_geglu()?,
                "candle",
            );
        }
        let t = time_ms(device, repeats, candle_geglu);
        record("geglu", &shape, "candle (narrow, gelu, mul)", t);
    }
    // Linear layers (tokens, in, out) on (1, tokens, in) input.
    for shape in [
        [8192, 320, 320],
        [8192, 320, 2560],
        [4608, 3072, 3072],
        [4608, 3072, 12288],
        [8858, 2432, 2432],
        // FLUX's double-block modulation: one row (FP8 weights: the matrix-vector kernel).
        [1, 3072, 18432],
    ] {
        let [n, i, o] = shape;
        let x = randn(&[1, n, i], 1.0)?;
        let w = randn(&[o, i], 0.02)?;
        let bias = randn(&[o], 0.02)?;
        let ours = blocks::Linear::new(w.clone(), Some(bias.clone()));
        let fp8 = crate::engine::models::quantized::BlockLinear::new_fp8(w.clone(), Some(&bias))?;
        let t = time_ms(device, repeats, || candle_core::Module::forward(&ours, &x));
        record("linear", &shape, "ours", t);
        let theirs = candle_nn::Linear::new(w, Some(bias.clone()));
        let t = time_ms(device, repeats, || {
            candle_core::Module::forward(&theirs, &x)
        });
        record("linear", &shape, "candle_nn::Linear", t);
        check(
            "linear",
            &shape,
            &candle_core::Module::forward(&ours, &x)?,
            &candle_core::Module::forward(&theirs, &x)?,
            "candle",
        );
        // FP8 weights (`--quantize fp8`): widened per forward (every card), and on the FP8
        // tensor cores (cuBLASLt, compute capability ≥ 8.9), each against the dense layer.
        let t = time_ms(device, repeats, || fp8.forward(&x));
        record("linear", &shape, "fp8 weights (as the models run them)", t);
        let exact = candle_core::Module::forward(&ours, &x)?;
        check(
            "linear",
            &shape,
            &fp8.forward(&x)?,
            &exact,
            "dense (fp8 weights)",
        );
        #[cfg(feature = "cuda")]
        if let Some((codes, scale)) = fp8.fp8_parts() {
            let t = time_ms(device, repeats, || fp8.forward_widened(&x));
            record("linear", &shape, "fp8 weights widened to bf16/f16", t);
            use crate::engine::cuda::fp8::{self, ActivationScale};
            if fp8::supports(&x, codes) {
                // The layer's operands, made once as at load.
                let operands = fp8::Operands::new(scale, Some(&bias), x.dtype())?;
                for (form, name) in [
                    (
                        ActivationScale::PerRow,
                        "fp8 tensor cores, per-row scales (cuBLASLt)",
                    ),
                    (
                        ActivationScale::PerTensor,
                        "fp8 tensor cores, one scale (cuBLASLt)",
                    ),
                ] {
                    let tensor_cores = || fp8::linear_by(form, &x, codes, &operands);
                    let t = time_ms(device, repeats, tensor_cores);
                    record("linear", &shape, name, t);
                    match tensor_cores() {
                        Ok(out) => check("linear", &shape, &out, &exact, name),
                        Err(e) => println!("| linear | {shape:?} | {name} | failed: {e} |"),
                    }
                }
            }
        }
    }
    // (Late in the table: a candidate kernel that faults takes the CUDA context down with it.)
    // Attention (batch, heads, queries, keys, head dim) as `attention::scaled_dot_product` runs
    // it (fused where the head size allows) and unfused, with the fused result's error against an
    // f32 computation: SD 1.5's three head sizes at 64², 32², 16² and its 77-token cross
    // attention, SDXL's self and cross attention at 64² and 32², SD3.5 Large's joint 4096 + 333
    // tokens, FLUX's 4096 + 512, the VAE's single 512-wide head at 128² (upcast, as in the
    // decoder).
    for (shape, upcast) in [
        ([2, 8, 4096, 4096, 40], false),
        ([2, 8, 4096, 77, 40], false),
        ([2, 8, 1024, 1024, 80], false),
        ([2, 8, 256, 256, 160], false),
        ([2, 10, 4096, 4096, 64], false),
        ([2, 10, 4096, 77, 64], false),
        ([2, 20, 1024, 1024, 64], false),
        ([2, 20, 1024, 77, 64], false),
        ([2, 38, 4429, 4429, 64], false),
        ([1, 24, 4608, 4608, 128], false),
        ([1, 1, 16384, 16384, 512], true),
    ] {
        let [b, h, n, m, d] = shape;
        let q = randn(&[b, h, n, d], 1.0)?;
        let k = randn(&[b, h, m, d], 1.0)?;
        let v = randn(&[b, h, m, d], 1.0)?;
        let t = time_ms(device, repeats, || {
            attention::scaled_dot_product(&q, &k, &v, None, upcast)
        });
        record("sdpa", &shape, "ours", t);
        let t = time_ms(device, repeats, || {
            attention::unfused(&q, &k, &v, None, upcast)
        });
        record("sdpa", &shape, "unfused", t);
        let exact = {
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            attention::unfused(&f32(&q)?, &f32(&k)?, &f32(&v)?, None, false)?
        };
        // Every fused kernel by name (the candidates beside the models' one), each with its error.
        #[cfg(feature = "cuda")]
        if crate::engine::cuda::attention::supports(&q, &k, &v) {
            use crate::engine::cuda::attention::{attention_by, available, Kernel};
            let scale = 1.0 / (d as f32).sqrt();
            for kernel in Kernel::ALL.into_iter().filter(|k| available(*k, d, device)) {
                let variant = format!("kernel {}", kernel.name());
                let t = time_ms(device, repeats, || attention_by(kernel, &q, &k, &v, scale));
                record("sdpa", &shape, &variant, t);
                match attention_by(kernel, &q, &k, &v, scale) {
                    Ok(out) => check("sdpa", &shape, &out, &exact, &format!("f32 ({variant})")),
                    Err(e) => println!("| sdpa | {shape:?} | {variant} | failed: {e} |"),
                }
            }
            // cuDNN's fused attention (graph API), PyTorch's SDPA kernel on Hopper.
            #[cfg(feature = "cudnn")]
            {
                use crate::engine::cuda::attention::attention_by_cudnn;
                let variant = "cudnn fused";
                let t = time_ms(device, repeats, || attention_by_cudnn(&q, &k, &v, scale));
                record("sdpa", &shape, variant, t);
                match attention_by_cudnn(&q, &k, &v, scale) {
                    Ok(out) => check("sdpa", &shape, &out, &exact, &format!("f32 ({variant})")),
                    Err(e) => println!("| sdpa | {shape:?} | {variant} | failed: {e} |"),
                }
            }
        }
        // ‖ours − f32‖ / ‖f32‖: f16 operands land near 1e-3.
        let ours = attention::scaled_dot_product(&q, &k, &v, None, upcast)?;
        check("sdpa", &shape, &ours, &exact, "f32");
    }
    // Memory bandwidth: one add over 256 Mi elements, and a strided (transposed) copy.
    let x = randn(&[16384, 16384], 1.0)?;
    let t = time_ms(device, repeats, || x.clone() + &x);
    record("add", &[16384, 16384], "candle", t);
    let t = time_ms(device, repeats, || x.t()?.contiguous());
    record("transpose_copy", &[16384, 16384], "candle", t);
    let t = time_ms(device, repeats, || x.to_dtype(DType::F32));
    record("cast_to_f32", &[16384, 16384], "candle", t);
    // Launch overhead: many tiny adds, µs per op (host-bound), with candle's per-tensor event
    // tracking (cudarc's multi-stream safety) and, last since it cannot be turned back on,
    // without it for the tensors made afterwards.
    let per_op_us = |device: &Device| -> candle_core::Result<f64> {
        let a = Tensor::ones(256, dtype, device)?;
        let ms = time_ms(device, repeats, || {
            let mut x = a.clone();
            for _ in 0..1000 {
                x = (x + &a)?;
            }
            Ok(x)
        })?;
        Ok(ms)
    };
    record(
        "tiny_add_x1000",
        &[256],
        "event tracking",
        per_op_us(device),
    );
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        unsafe { dev.disable_event_tracking() };
        record(
            "tiny_add_x1000",
            &[256],
            "no event tracking",
            per_op_us(device),
        );
    }
    Ok(())
}
