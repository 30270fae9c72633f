//! `candela bench --device-parity --device cuda`: the tiny test models of every family generated on
//! the CPU (f32, the path the diffusers parity tests check) and on the given device and dtype,
//! with the same seed — how far the device's kernels move the result. Exits with an error when an
//! f32 run differs by more than the parity tests allow, or a half-precision image falls under
//! 30 dB PSNR. Quantized runs (a UNet's and FLUX's blocks in fp8, the UNet's in q8_0: the
//! device's quantized products) are held to that floor against the same CPU f32 reference, in any
//! dtype; FLUX from the tiny GGUF file of mixed formats (candle's quantized kernels on the
//! device, the blocks as the file stores them) against the CPU's f32 run of that file.

use std::path::Path;

use candle_core::{DType, Device};

use candle_core::quantized::GgmlDType;

use crate::engine::models::quantized::{CpuQuantized, WeightFormat};
use crate::engine::{
    loader::ModelDir,
    pipelines::{read_card, sd::GenerateParams, LoadOptions, Pipeline},
};

/// The parity tests' limit on latents against diffusers (f32).
const F32_LIMIT: f32 = 1e-3;
const HALF_MIN_PSNR: f64 = 30.0;

pub fn run(fixtures: &Path, device: &Device, dtype: DType, label: &str) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    println!("| model | device dtype | max abs Δ latents | image PSNR (dB) | verdict |");
    println!("|---|---|---|---|---|");
    let q8_0 = WeightFormat::Quantized(GgmlDType::Q8_0, CpuQuantized::Fastest);
    let dense = WeightFormat::Dense;
    let gguf = WeightFormat::Stored(CpuQuantized::Fastest);
    for (name, formats, transformer_file) in [
        ("sd1-tiny", vec![dense], None),
        ("sdxl-tiny", vec![dense, WeightFormat::Fp8, q8_0], None),
        ("sd3-tiny", vec![dense], None),
        ("sd35m-tiny", vec![dense], None),
        ("flux-dev-tiny", vec![dense, WeightFormat::Fp8], None),
        (
            "flux-dev-tiny",
            vec![gguf],
            Some(fixtures.join("flux1-dev-tiny-mixed.gguf")),
        ),
    ] {
        let dir = ModelDir {
            root: fixtures.join(name),
            prefer_fp16_variant: false,
        };
        let card = read_card(&dir, name)?;
        let params = GenerateParams {
            steps: 4,
            seed: 7,
            ..GenerateParams::with_defaults(&card, "a red cube on a blue table", 64, 64)
        };
        let run_on = |device: &Device, dtype: DType, format| -> anyhow::Result<_> {
            let options = LoadOptions {
                transformer_format: format,
                transformer_file: transformer_file.clone(),
                ..Default::default()
            };
            let pipeline = Pipeline::load(&dir, device, dtype, &options)?;
            Ok(pipeline.generate(&params, &mut |_| true)?)
        };
        // One CPU f32 run of the model, the reference of each of its formats on the device (of a
        // GGUF file, its blocks dequantized into f32 products).
        let reference_format = match transformer_file {
            Some(_) => gguf.compact(),
            None => dense,
        };
        let reference = run_on(&Device::Cpu, DType::F32, reference_format)?;
        for format in formats {
            let ours = run_on(device, dtype, format)?;
            let delta = (reference.latents.to_dtype(DType::F32)?
                - ours.latents.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
            let image_psnr = reference.images[0].psnr(&ours.images[0]);
            let ok = if dtype == DType::F32 && format == dense {
                delta <= F32_LIMIT
            } else {
                image_psnr >= HALF_MIN_PSNR
            };
            let row = match format {
                WeightFormat::Dense => name.to_string(),
                _ => format!("{name} {format}"),
            };
            println!(
                "| {row} | {label} | {delta:.2e} | {image_psnr:.1} | {} |",
                if ok { "ok" } else { "FAIL" }
            );
            if !ok {
                failures.push(row);
            }
        }
    }
    if !failures.is_empty() {
        anyhow::bail!("{} differ beyond the limits: {failures:?}", failures.len());
    }
    Ok(())
}
