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

/// Every tensor of a FLUX transformer file in BFL's naming, with its shape (rows first), for
/// `c`.
pub fn bfl_tensors(c: &FluxTransformerConfig) -> Vec<(String, Vec<usize>)> {
    let d = c.num_attention_heads * c.attention_head_dim;
    let (mlp, head) = (4 * d, c.attention_head_dim);
    let mut tensors = Vec::new();
    let mut linear = |name: String, outputs: usize, inputs: usize| {
        tensors.push((format!("{name}.weight"), vec![outputs, inputs]));
        tensors.push((format!("{name}.bias"), vec![outputs]));
    };
    linear("img_in".into(), d, c.in_channels);
    linear("txt_in".into(), d, c.joint_attention_dim);
    let mut embedders = vec![("time_in", 256), ("vector_in", c.pooled_projection_dim)];
    if c.guidance_embeds {
        embedders.push(("guidance_in", 256));
    }
    for (embedder, inputs) in embedders {
        linear(format!("{embedder}.in_layer"), d, inputs);
        linear(format!("{embedder}.out_layer"), d, d);
    }
    for i in 0..c.num_layers {
        for stream in ["img", "txt"] {
            let b = format!("double_blocks.{i}.{stream}");
            linear(format!("{b}_mod.lin"), 6 * d, d);
            linear(format!("{b}_attn.qkv"), 3 * d, d);
            linear(format!("{b}_attn.proj"), d, d);
            linear(format!("{b}_mlp.0"), mlp, d);
            linear(format!("{b}_mlp.2"), d, mlp);
        }
    }
    for i in 0..c.num_single_layers {
        let b = format!("single_blocks.{i}");
        linear(format!("{b}.modulation.lin"), 3 * d, d);
        linear(format!("{b}.linear1"), 3 * d + mlp, d);
        linear(format!("{b}.linear2"), d, d + mlp);
    }
    linear("final_layer.adaLN_modulation.1".into(), 2 * d, d);
    let outputs = c.patch_size * c.patch_size * c.out_channels.unwrap_or(c.in_channels);
    linear("final_layer.linear".into(), outputs, d);
    for i in 0..c.num_layers {
        for stream in ["img", "txt"] {
            for norm in ["query_norm", "key_norm"] {
                let name = format!("double_blocks.{i}.{stream}_attn.norm.{norm}.scale");
                tensors.push((name, vec![head]));
            }
        }
    }
    for i in 0..c.num_single_layers {
        for norm in ["query_norm", "key_norm"] {
            tensors.push((format!("single_blocks.{i}.norm.{norm}.scale"), vec![head]));
        }
    }
    tensors
}

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
    let tensors = bfl_tensors(&config);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The names and shapes written are those of a real BFL file: the tiny fixture's, tensor for
    /// tensor.
    #[test]
    fn bfl_tensors_are_those_of_a_bfl_file() {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
        let config: FluxTransformerConfig =
            crate::engine::loader::read_json(&models.join("flux-dev-tiny/transformer/config.json"))
                .unwrap();
        let file = models.join("flux1-dev-tiny-bfl.safetensors");
        let stored = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
        let mut expected: Vec<(String, Vec<usize>)> = stored
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        let mut ours = bfl_tensors(&config);
        expected.sort();
        ours.sort();
        assert_eq!(ours, expected);
    }
}
