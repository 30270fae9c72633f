//! `bench --write-random-gguf`: a FLUX transformer of a real architecture with random weights,
//! written as the community's GGUF conversions store it (Black Forest Labs' naming, the blocks'
//! Linear layers in one GGML format, the rest f16 / f32) — a real-size GGUF file to load, time
//! and measure (`bench --transformer FILE`) where none can be downloaded.

use std::path::Path;

use anyhow::Context;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::engine::loader::ModelDir;
use crate::engine::models::flux::FluxTransformerConfig;
use crate::engine::models::quantized::WeightFormat;

/// Writes `configs`' FLUX transformer with random weights (N(0, 0.02)) to `path` as GGUF: the
/// blocks' Linear weights in `format`'s blocks where their rows take them, other matrices in
/// f16, vectors in f32.
pub fn write(configs: &ModelDir, format: WeightFormat, path: &Path) -> anyhow::Result<()> {
    let WeightFormat::Quantized(blocks, _) = format else {
        anyhow::bail!(
            "--write-random-gguf needs --quantize with a GGML block format (q4k, q8_0, …)"
        );
    };
    let config: FluxTransformerConfig = configs.read_json("transformer/config.json").context(
        "--write-random-gguf writes FLUX transformers (a FluxTransformer2DModel config)",
    )?;
    let tensors = crate::engine::loader::single_file::bfl_tensors(&config);
    let progress = indicatif::ProgressBar::new(tensors.len() as u64);
    let mut stored = Vec::with_capacity(tensors.len());
    for (name, shape) in &tensors {
        let values = Tensor::randn(0f32, 0.02, shape.as_slice(), &Device::Cpu)?;
        let in_blocks = crate::engine::loader::single_file::in_transformer_blocks(name);
        let q = match shape.as_slice() {
            [_, inputs] if in_blocks && inputs % blocks.block_size() == 0 => {
                crate::engine::models::cpu_quantized_linear::quantize(&values, blocks)?
            }
            [_, _] => QTensor::quantize(&values, GgmlDType::F16)?,
            _ => QTensor::quantize(&values, GgmlDType::F32)?,
        };
        stored.push((name.as_str(), q));
        progress.inc(1);
    }
    progress.finish_and_clear();
    let architecture = gguf_file::Value::String("flux".into());
    let refs: Vec<(&str, &QTensor)> = stored.iter().map(|(n, q)| (*n, q)).collect();
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    gguf_file::write(&mut out, &[("general.architecture", &architecture)], &refs)?;
    Ok(())
}
