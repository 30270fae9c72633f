//! `candela bench --kernels`: the CPU kernels at SD 1.5 / VAE shapes against candle's own ops,
//! one table (median of a few runs after a warm-up). Tells where a kernel pays and where the
//! thresholds that pick it should sit.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::engine::models::{
    cpu_activation, cpu_attention, cpu_conv, cpu_half_linear,
    cpu_int8_tiles::{self, KQuantTileLinear, Q8TileLinear},
    cpu_norm,
    cpu_quantized_linear::QuantizedCpuLinear,
    cpu_winograd,
};

fn time_ms(repeats: usize, f: impl FnMut() -> candle_core::Result<()>) -> anyhow::Result<f64> {
    Ok(crate::engine::pipelines::timing::median_ms(
        repeats,
        || Ok(()),
        f,
    )?)
}

/// Random input (1, m, k) and weight (n, k), and the f32 Linear layer's time on them: the scale
/// the held-weight rows are read against.
fn f32_linear_case(repeats: usize, [m, k, n]: [usize; 3]) -> anyhow::Result<(Tensor, Tensor, f64)> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (1, m, k), &dev)?;
    let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
    let f32_layer = crate::engine::models::blocks::Linear::new(w.clone(), None);
    let f32_ms = time_ms(repeats, || {
        candle_core::Module::forward(&f32_layer, &x)?;
        Ok(())
    })?;
    Ok((x, w, f32_ms))
}

pub fn run(repeats: usize) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    println!("| op | shape | candle ms | candela ms | candela (alt) ms |");
    println!("|---|---|---|---|---|");
    // 3×3 convolutions: (batch, in, out, size). UNet at 512² (batch 2), VAE decoder at 512².
    for (b, ci, co, s) in [
        (2, 320, 320, 64),
        (2, 960, 320, 64),
        (2, 640, 640, 32),
        (2, 1280, 1280, 16),
        (2, 1280, 1280, 8),
        (1, 512, 512, 64),
        (1, 512, 512, 128),
        (1, 256, 256, 256),
        (1, 128, 128, 512),
        (2, 4, 320, 64),
    ] {
        let x = Tensor::randn(0f32, 1., (b, ci, s, s), &dev)?;
        let k = Tensor::randn(0f32, 0.05, (co, ci, 3, 3), &dev)?;
        let bias = Tensor::randn(0f32, 1., co, &dev)?;
        let candle = time_ms(repeats, || {
            x.conv2d(&k, 1, 1, 1, 1)?
                .broadcast_add(&bias.reshape((1, co, 1, 1))?)?;
            Ok(())
        })?;
        let direct = time_ms(repeats, || {
            cpu_conv::conv3x3(&x, &k, Some(&bias))?;
            Ok(())
        })?;
        let wino = cpu_winograd::WinogradWeight::from_tensor(&k)?;
        let winograd = time_ms(repeats, || {
            cpu_winograd::conv3x3(&x, &wino, Some(&bias))?;
            Ok(())
        })?;
        let picked = if cpu_winograd::worthwhile(ci) {
            " (winograd picked)"
        } else {
            ""
        };
        println!(
            "| conv 3×3 direct / winograd{picked} | {b}×{ci}→{co} @{s}² | {candle:.1} | {direct:.1} | {winograd:.1} |"
        );
    }
    // Stride-2 downsampling: the UNet's (padding 1) and the VAE encoder's (bottom-right pad).
    for (b, c, s, vae) in [
        (2, 320, 64, false),
        (2, 640, 32, false),
        (2, 1280, 16, false),
        (1, 128, 512, true),
        (1, 256, 256, true),
        (1, 512, 128, true),
    ] {
        let x = Tensor::randn(0f32, 1., (b, c, s, s), &dev)?;
        let k = Tensor::randn(0f32, 0.05, (c, c, 3, 3), &dev)?;
        let (pad, candle_pad) = if vae { ([0, 0, 1, 1], 0) } else { ([1; 4], 1) };
        let candle = time_ms(repeats, || {
            let x = if vae {
                x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?
            } else {
                x.clone()
            };
            x.conv2d(&k, candle_pad, 2, 1, 1)?;
            Ok(())
        })?;
        let ours = time_ms(repeats, || {
            cpu_conv::conv3x3_strided(&x, &k, None, 2, pad)?;
            Ok(())
        })?;
        println!(
            "| conv 3×3 stride 2{} | {b}×{c} @{s}² | {candle:.1} | {ours:.1} | - |",
            if vae { ", bottom-right pad" } else { "" }
        );
    }
    // Attention: (batch·heads, tokens, keys, head dim).
    for (bh, n, m, d) in [
        (16, 4096, 4096, 40),
        (16, 4096, 77, 40),
        (16, 1024, 1024, 80),
        // SDXL at 512² (CFG): self- and cross-attention at the 16² and 32² levels.
        (40, 256, 256, 64),
        (40, 256, 77, 64),
        (20, 1024, 1024, 64),
        (20, 1024, 77, 64),
        // SD3.5 Medium at 512² (CFG): joint attention over 1024 + 333 tokens, the image-only
        // second attention; the VAE's single 512-wide head at 512².
        (48, 1357, 1357, 64),
        (48, 1024, 1024, 64),
        (1, 4096, 4096, 512),
        // Larger images (CFG): SD 1.5 at 768², SDXL's 64² level at 1024².
        (16, 9216, 9216, 40),
        (20, 4096, 4096, 64),
    ] {
        let q = Tensor::randn(0f32, 1., (1, bh, n, d), &dev)?;
        let k = Tensor::randn(0f32, 1., (1, bh, m, d), &dev)?;
        let v = Tensor::randn(0f32, 1., (1, bh, m, d), &dev)?;
        let scale = 1.0 / (d as f64).sqrt();
        // candle's unfused form holds every score at once: not past 4 GiB of them.
        let candle = if bh * n * m > 1 << 30 {
            "-".to_string()
        } else {
            let ms = time_ms(repeats, || {
                let s = (q.matmul(&k.t()?)? * scale)?;
                candle_nn::ops::softmax_last_dim(&s)?.matmul(&v)?;
                Ok(())
            })?;
            format!("{ms:.1}")
        };
        let ours = time_ms(repeats, || {
            cpu_attention::attention(&q, &k, &v, scale as f32)?;
            Ok(())
        })?;
        // As the models call it: projections' token-major outputs seen heads-first.
        let heads_first = |t: &Tensor| t.transpose(1, 2)?.contiguous()?.transpose(1, 2);
        let (qv, kv, vv) = (heads_first(&q)?, heads_first(&k)?, heads_first(&v)?);
        let views = time_ms(repeats, || {
            cpu_attention::attention(&qv, &kv, &vv, scale as f32)?;
            Ok(())
        })?;
        println!(
            "| attention (alt: token-major views) | {bh} heads × {n}×{m} × {d} | {candle} | {ours:.1} | {views:.1} |"
        );
    }
    // Linear layers (rows, in, out): the text encoders' at a CFG pair of prompts (CLIP-L,
    // OpenCLIP-G), T5-XXL at 512 tokens, SDXL's and SD 1.5's transformer blocks, FLUX's MLP at
    // 512². candle: the weight as stored, (out, in); candela: `blocks::Linear`'s CPU layout.
    for (m, k, n) in [
        (154, 768, 3072),
        (154, 1280, 5120),
        (154, 5120, 1280),
        (512, 4096, 10240),
        (512, 10240, 4096),
        (512, 1280, 10240),
        (2048, 640, 5120),
        (8192, 320, 2560),
        (1536, 3072, 12288),
    ] {
        let x = Tensor::randn(0f32, 1., (1, m, k), &dev)?;
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let bias = Tensor::randn(0f32, 1., n, &dev)?;
        let stored = candle_nn::Linear::new(w.clone(), Some(bias.clone()));
        let candle = time_ms(repeats, || {
            candle_core::Module::forward(&stored, &x)?;
            Ok(())
        })?;
        let ours = crate::engine::models::blocks::Linear::new(w, Some(bias));
        let candela = time_ms(repeats, || {
            candle_core::Module::forward(&ours, &x)?;
            Ok(())
        })?;
        let rate = |ms: f64| 2.0 * (m * k * n) as f64 / ms / 1e6;
        println!(
            "| Linear (GFLOP/s: {:.0} / {:.0}) | {m}×{k}→{n} | {candle:.1} | {candela:.1} | - |",
            rate(candle),
            rate(candela)
        );
    }
    // T5-XXL's Linear layers held as its checkpoints store them (bf16, f16) against f32 in the
    // gemm layout (the T5 of a CPU user): prompts of 77 and 512 tokens; q/k/v/o, the gated
    // feed-forward's two projections as one, and `wo`.
    for (m, k, n) in [
        (77, 4096, 4096),
        (77, 4096, 20480),
        (77, 10240, 4096),
        (512, 4096, 4096),
        (512, 4096, 20480),
        (512, 10240, 4096),
    ] {
        let (x, w, f32_ms) = f32_linear_case(repeats, [m, k, n])?;
        let mut half_ms = [0.0; 2];
        for (ms, dtype) in half_ms.iter_mut().zip([DType::BF16, DType::F16]) {
            let layer = cpu_half_linear::HalfLinear::new(&w.to_dtype(dtype)?, None)?;
            *ms = time_ms(repeats, || {
                layer.forward(&x)?;
                Ok(())
            })?;
        }
        println!(
            "| Linear f32 / held bf16 / held f16 | {m}×{k}→{n} | {f32_ms:.1} | {:.1} | {:.1} |",
            half_ms[0], half_ms[1]
        );
    }
    // FLUX's block layers at 512² (1 536 tokens) quantized: candle's `QMatMul` (tiles kept
    // beside the blocks for q8_0 / q4k, a row-by-row product for q5k) against the blocks held
    // once (`QuantizedCpuLinear`); the f32 layer for scale.
    for (m, k, n) in [(1536, 3072, 12288), (1536, 12288, 3072)] {
        let (x, w, f32_ms) = f32_linear_case(repeats, [m, k, n])?;
        for format in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q5K] {
            let tiles = QMatMul::from_qtensor(QTensor::quantize(&w, format)?)?;
            let candle = time_ms(repeats, || {
                candle_core::Module::forward(&tiles, &x)?;
                Ok(())
            })?;
            let once = QuantizedCpuLinear::new(&w, None, format)?;
            let ours = time_ms(repeats, || {
                once.forward(&x)?;
                Ok(())
            })?;
            println!(
                "| Linear {format:?}: candle / held once / f32 | {m}×{k}→{n} | {candle:.1} | {ours:.1} | {f32_ms:.1} |"
            );
        }
        // Our tiles with each set of kernels this CPU runs (AVX2 alone takes no q8_0).
        for isa in cpu_int8_tiles::Isa::ALL
            .into_iter()
            .filter(|isa| isa.runs_here())
        {
            let timed = |layer: &dyn Fn() -> candle_core::Result<Tensor>| {
                time_ms(repeats, || {
                    layer()?;
                    Ok(())
                })
            };
            let q8_ms = match Q8TileLinear::with_kernels(&w, None, Some(isa)) {
                Ok(q8) => format!("{:.1}", timed(&|| q8.forward(&x))?),
                Err(_) => "-".into(),
            };
            let k_quant_ms = |format| -> anyhow::Result<f64> {
                let layer = KQuantTileLinear::with_kernels(&w, None, format, Some(isa))?;
                timed(&|| layer.forward(&x))
            };
            let (q4k_ms, q6k_ms) = (k_quant_ms(GgmlDType::Q4K)?, k_quant_ms(GgmlDType::Q6K)?);
            println!(
                "| Linear int8 tiles held once ({isa:?}): Q8_0 / Q4K, Q6K / f32 | {m}×{k}→{n} | {q8_ms} | {q4k_ms:.1}, {q6k_ms:.1} | {f32_ms:.1} |"
            );
        }
    }
    // GEGLU: (batch, tokens, 2 × width).
    for (b, n, f) in [(2, 4096, 1280), (2, 1024, 2560)] {
        let h = Tensor::randn(0f32, 1., (b, n, 2 * f), &dev)?;
        let candle = time_ms(repeats, || {
            let value = h.narrow(2, 0, f)?;
            (value * h.narrow(2, f, f)?.gelu_erf()?)?;
            Ok(())
        })?;
        let ours = time_ms(repeats, || {
            cpu_activation::geglu(&h)?;
            Ok(())
        })?;
        println!("| GEGLU (erf) | {b}×{n}×2·{f} | {candle:.1} | {ours:.1} | - |");
    }
    // The tanh GELU of FLUX's MLPs: (tokens, 4 × 3072) at 1024².
    let x = Tensor::randn(0f32, 1., (1, 4608, 12288), &dev)?;
    let candle = time_ms(repeats, || {
        x.gelu()?;
        Ok(())
    })?;
    let ours = time_ms(repeats, || {
        cpu_activation::gelu_tanh(&x)?;
        Ok(())
    })?;
    println!("| GELU (tanh) | 1×4608×12288 | {candle:.1} | {ours:.1} | - |");
    // GroupNorm + SiLU.
    for (b, c, s) in [(2, 320, 64), (1, 512, 128)] {
        let x = Tensor::randn(0f32, 1., (b, c, s, s), &dev)?;
        let w = vec![1f32; c];
        let bias = vec![0f32; c];
        let gn = candle_nn::GroupNorm::new(
            Tensor::new(w.as_slice(), &dev)?,
            Tensor::new(bias.as_slice(), &dev)?,
            c,
            32,
            1e-5,
        )?;
        let candle = time_ms(repeats, || {
            candle_core::Module::forward(&gn, &x)?.silu()?;
            Ok(())
        })?;
        let ours = time_ms(repeats, || {
            cpu_norm::group_norm(&x, &w, &bias, 32, 1e-5, true)?;
            Ok(())
        })?;
        println!("| GroupNorm+SiLU | {b}×{c} @{s}² | {candle:.1} | {ours:.1} | - |");
    }
    Ok(())
}
