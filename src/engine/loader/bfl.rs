//! FLUX transformers saved in Black Forest Labs' single-file naming (`flux1-dev.safetensors`,
//! most community fine-tunes, ComfyUI's `model.diffusion_model.` prefix), read as diffusers'
//! `FluxTransformer2DModel` names: fused q/k/v and single-block `linear1` (q, k, v, MLP) are cut
//! into diffusers' separate projections, and the final modulation's (shift, scale) halves are
//! swapped into diffusers' (scale, shift) order, as diffusers' own single-file converter does.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{var_builder::SimpleBackend, Init};

use super::weights::SafetensorsFile;

/// How a diffusers tensor is cut from a BFL one.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Take {
    All,
    /// Rows of part `index` when the tensor's rows split in the proportions `parts`.
    Part {
        index: usize,
        parts: &'static [usize],
    },
    SwapHalves,
}

const QKV: &[usize] = &[1, 1, 1];
/// Single blocks: q, k, v (one width each) then the MLP (four widths).
const QKV_MLP: &[usize] = &[1, 1, 1, 4];

/// The BFL tensor and cut for a diffusers name, `None` for names BFL files do not have.
fn source(name: &str) -> Option<(String, Take)> {
    let (stem, param) = name.rsplit_once('.')?;
    let plain = |s: &str| Some((format!("{s}.{param}"), Take::All));
    let part = |s: &str, index: usize, parts: &'static [usize]| {
        Some((format!("{s}.{param}"), Take::Part { index, parts }))
    };
    let fixed = match stem {
        "x_embedder" => plain("img_in"),
        "context_embedder" => plain("txt_in"),
        "time_text_embed.timestep_embedder.linear_1" => plain("time_in.in_layer"),
        "time_text_embed.timestep_embedder.linear_2" => plain("time_in.out_layer"),
        "time_text_embed.text_embedder.linear_1" => plain("vector_in.in_layer"),
        "time_text_embed.text_embedder.linear_2" => plain("vector_in.out_layer"),
        "time_text_embed.guidance_embedder.linear_1" => plain("guidance_in.in_layer"),
        "time_text_embed.guidance_embedder.linear_2" => plain("guidance_in.out_layer"),
        "proj_out" => plain("final_layer.linear"),
        "norm_out.linear" => Some((
            format!("final_layer.adaLN_modulation.1.{param}"),
            Take::SwapHalves,
        )),
        _ => None,
    };
    if fixed.is_some() {
        return fixed;
    }
    // RMS-norm scales are `.scale` in BFL files.
    let norm = |s: &str| Some((format!("{s}.scale"), Take::All));
    if let Some(rest) = stem.strip_prefix("transformer_blocks.") {
        let (i, inner) = rest.split_once('.')?;
        let b = format!("double_blocks.{i}");
        return match inner {
            "norm1.linear" => plain(&format!("{b}.img_mod.lin")),
            "norm1_context.linear" => plain(&format!("{b}.txt_mod.lin")),
            "attn.to_q" => part(&format!("{b}.img_attn.qkv"), 0, QKV),
            "attn.to_k" => part(&format!("{b}.img_attn.qkv"), 1, QKV),
            "attn.to_v" => part(&format!("{b}.img_attn.qkv"), 2, QKV),
            "attn.add_q_proj" => part(&format!("{b}.txt_attn.qkv"), 0, QKV),
            "attn.add_k_proj" => part(&format!("{b}.txt_attn.qkv"), 1, QKV),
            "attn.add_v_proj" => part(&format!("{b}.txt_attn.qkv"), 2, QKV),
            "attn.to_out.0" => plain(&format!("{b}.img_attn.proj")),
            "attn.to_add_out" => plain(&format!("{b}.txt_attn.proj")),
            "attn.norm_q" => norm(&format!("{b}.img_attn.norm.query_norm")),
            "attn.norm_k" => norm(&format!("{b}.img_attn.norm.key_norm")),
            "attn.norm_added_q" => norm(&format!("{b}.txt_attn.norm.query_norm")),
            "attn.norm_added_k" => norm(&format!("{b}.txt_attn.norm.key_norm")),
            "ff.net.0.proj" => plain(&format!("{b}.img_mlp.0")),
            "ff.net.2" => plain(&format!("{b}.img_mlp.2")),
            "ff_context.net.0.proj" => plain(&format!("{b}.txt_mlp.0")),
            "ff_context.net.2" => plain(&format!("{b}.txt_mlp.2")),
            _ => None,
        };
    }
    if let Some(rest) = stem.strip_prefix("single_transformer_blocks.") {
        let (i, inner) = rest.split_once('.')?;
        let b = format!("single_blocks.{i}");
        return match inner {
            "norm.linear" => plain(&format!("{b}.modulation.lin")),
            "attn.to_q" => part(&format!("{b}.linear1"), 0, QKV_MLP),
            "attn.to_k" => part(&format!("{b}.linear1"), 1, QKV_MLP),
            "attn.to_v" => part(&format!("{b}.linear1"), 2, QKV_MLP),
            "proj_mlp" => part(&format!("{b}.linear1"), 3, QKV_MLP),
            "proj_out" => plain(&format!("{b}.linear2")),
            "attn.norm_q" => norm(&format!("{b}.norm.query_norm")),
            "attn.norm_k" => norm(&format!("{b}.norm.key_norm")),
            _ => None,
        };
    }
    None
}

/// A BFL-named FLUX file seen through diffusers' names.
pub struct BflFluxWeights {
    file: SafetensorsFile,
    /// `model.diffusion_model.` in ComfyUI-style files, empty otherwise.
    prefix: &'static str,
}

impl BflFluxWeights {
    const COMFY_PREFIX: &'static str = "model.diffusion_model.";
    const PROBE: &'static str = "double_blocks.0.img_attn.qkv.weight";

    /// `Some` when `file` uses BFL's naming.
    pub fn detect(file: SafetensorsFile) -> std::result::Result<Self, SafetensorsFile> {
        for prefix in ["", Self::COMFY_PREFIX] {
            if file.contains_tensor(&format!("{prefix}{}", Self::PROBE)) {
                return Ok(Self { file, prefix });
            }
        }
        Err(file)
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((bfl, take)) = source(name) else {
            candle_core::bail!("`{name}` has no counterpart in Black Forest Labs' FLUX naming");
        };
        let t = self
            .file
            .get_unchecked(&format!("{}{bfl}", self.prefix), dtype, dev)?;
        match take {
            Take::All => Ok(t),
            Take::Part { index, parts } => {
                let rows = t.dim(0)?;
                let unit = rows / parts.iter().sum::<usize>();
                let start: usize = parts[..index].iter().sum::<usize>() * unit;
                t.narrow(0, start, parts[index] * unit)
            }
            Take::SwapHalves => {
                let half = t.dim(0)? / 2;
                Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)
            }
        }
    }
}

impl SimpleBackend for BflFluxWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "`{name}` from the FLUX single file has shape {:?}, the config implies {:?}",
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        source(name)
            .is_some_and(|(bfl, _)| self.file.contains_tensor(&format!("{}{bfl}", self.prefix)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_fused_projections_and_swapped_modulation() {
        assert_eq!(
            source("transformer_blocks.3.attn.add_k_proj.weight"),
            Some((
                "double_blocks.3.txt_attn.qkv.weight".into(),
                Take::Part {
                    index: 1,
                    parts: QKV
                }
            ))
        );
        assert_eq!(
            source("single_transformer_blocks.0.proj_mlp.bias"),
            Some((
                "single_blocks.0.linear1.bias".into(),
                Take::Part {
                    index: 3,
                    parts: QKV_MLP
                }
            ))
        );
        assert_eq!(
            source("norm_out.linear.weight"),
            Some((
                "final_layer.adaLN_modulation.1.weight".into(),
                Take::SwapHalves
            ))
        );
        assert_eq!(
            source("transformer_blocks.0.attn.norm_q.weight").map(|s| s.0),
            Some("double_blocks.0.img_attn.norm.query_norm.scale".into())
        );
        assert_eq!(source("pos_embed.proj.weight"), None);
    }
}
