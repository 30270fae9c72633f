//! Transformers saved as the model makers' single files, read under diffusers' names (which the
//! model code uses), as diffusers' own single-file converters map them:
//! * FLUX in Black Forest Labs' naming (`flux1-dev.safetensors`, most fine-tunes): fused q/k/v
//!   and single-block `linear1` (q, k, v, MLP) are cut into separate projections;
//! * SD3 / SD3.5 in Stability's naming (`sd3.5_large.safetensors`' `model.diffusion_model.*`):
//!   `joint_blocks.N.{x_block, context_block}` with fused q/k/v.
//!
//! In both, (shift, scale) modulations (the final norm; SD3's last context norm) are swapped into
//! diffusers' (scale, shift) order. ComfyUI's `model.diffusion_model.` prefix is accepted.

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

/// The single-file naming a file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// Black Forest Labs' FLUX.
    Bfl,
    /// Stability's SD3 / SD3.5 MMDiT with this many joint blocks (the config's `num_layers`:
    /// the last block's context modulation is stored differently).
    Sai { blocks: usize },
}

impl Naming {
    fn probe(self) -> &'static str {
        match self {
            Self::Bfl => "double_blocks.0.img_attn.qkv.weight",
            Self::Sai { .. } => "joint_blocks.0.x_block.attn.qkv.weight",
        }
    }

    fn source(self, name: &str) -> Option<(String, Take)> {
        match self {
            Self::Bfl => bfl_source(name),
            Self::Sai { blocks } => sai_source(name, blocks),
        }
    }
}

/// The SAI tensor and cut for a diffusers `SD3Transformer2DModel` name.
fn sai_source(name: &str, blocks: usize) -> Option<(String, Take)> {
    if name == "pos_embed.pos_embed" {
        return Some(("pos_embed".into(), Take::All));
    }
    let (stem, param) = name.rsplit_once('.')?;
    let plain = |s: &str| Some((format!("{s}.{param}"), Take::All));
    let part =
        |s: &str, index: usize| Some((format!("{s}.{param}"), Take::Part { index, parts: QKV }));
    let fixed = match stem {
        "pos_embed.proj" => plain("x_embedder.proj"),
        "context_embedder" => plain("context_embedder"),
        "time_text_embed.timestep_embedder.linear_1" => plain("t_embedder.mlp.0"),
        "time_text_embed.timestep_embedder.linear_2" => plain("t_embedder.mlp.2"),
        "time_text_embed.text_embedder.linear_1" => plain("y_embedder.mlp.0"),
        "time_text_embed.text_embedder.linear_2" => plain("y_embedder.mlp.2"),
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
    let rest = stem.strip_prefix("transformer_blocks.")?;
    let (i, inner) = rest.split_once('.')?;
    let (x, c) = (
        format!("joint_blocks.{i}.x_block"),
        format!("joint_blocks.{i}.context_block"),
    );
    match inner {
        "norm1.linear" => plain(&format!("{x}.adaLN_modulation.1")),
        // The last block's context norm is `AdaLayerNormContinuous`: (scale, shift) in
        // diffusers, (shift, scale) in the file.
        "norm1_context.linear" => Some((
            format!("{c}.adaLN_modulation.1.{param}"),
            if i.parse::<usize>().ok()? + 1 == blocks {
                Take::SwapHalves
            } else {
                Take::All
            },
        )),
        "attn.to_q" => part(&format!("{x}.attn.qkv"), 0),
        "attn.to_k" => part(&format!("{x}.attn.qkv"), 1),
        "attn.to_v" => part(&format!("{x}.attn.qkv"), 2),
        "attn.add_q_proj" => part(&format!("{c}.attn.qkv"), 0),
        "attn.add_k_proj" => part(&format!("{c}.attn.qkv"), 1),
        "attn.add_v_proj" => part(&format!("{c}.attn.qkv"), 2),
        "attn.to_out.0" => plain(&format!("{x}.attn.proj")),
        "attn.to_add_out" => plain(&format!("{c}.attn.proj")),
        "attn.norm_q" => plain(&format!("{x}.attn.ln_q")),
        "attn.norm_k" => plain(&format!("{x}.attn.ln_k")),
        "attn.norm_added_q" => plain(&format!("{c}.attn.ln_q")),
        "attn.norm_added_k" => plain(&format!("{c}.attn.ln_k")),
        "attn2.to_q" => part(&format!("{x}.attn2.qkv"), 0),
        "attn2.to_k" => part(&format!("{x}.attn2.qkv"), 1),
        "attn2.to_v" => part(&format!("{x}.attn2.qkv"), 2),
        "attn2.to_out.0" => plain(&format!("{x}.attn2.proj")),
        "attn2.norm_q" => plain(&format!("{x}.attn2.ln_q")),
        "attn2.norm_k" => plain(&format!("{x}.attn2.ln_k")),
        "ff.net.0.proj" => plain(&format!("{x}.mlp.fc1")),
        "ff.net.2" => plain(&format!("{x}.mlp.fc2")),
        "ff_context.net.0.proj" => plain(&format!("{c}.mlp.fc1")),
        "ff_context.net.2" => plain(&format!("{c}.mlp.fc2")),
        _ => None,
    }
}

/// The BFL tensor and cut for a diffusers name, `None` for names BFL files do not have.
fn bfl_source(name: &str) -> Option<(String, Take)> {
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

/// A single-file checkpoint seen through diffusers' names.
pub struct SingleFileWeights {
    file: SafetensorsFile,
    naming: Naming,
    /// `model.diffusion_model.` in Stability's and ComfyUI-style files, empty otherwise.
    prefix: &'static str,
}

impl SingleFileWeights {
    const PREFIX: &'static str = "model.diffusion_model.";

    /// `Ok` when `file` uses `naming` (with or without the prefix); the file back otherwise.
    pub fn detect(
        file: SafetensorsFile,
        naming: Naming,
    ) -> std::result::Result<Self, SafetensorsFile> {
        for prefix in ["", Self::PREFIX] {
            if file.contains_tensor(&format!("{prefix}{}", naming.probe())) {
                return Ok(Self {
                    file,
                    naming,
                    prefix,
                });
            }
        }
        Err(file)
    }

    /// The file as a var builder: renamed when it uses `naming`, as it is otherwise (a
    /// diffusers-named file).
    pub fn var_builder(
        file: SafetensorsFile,
        naming: Naming,
        dtype: DType,
        device: &Device,
    ) -> candle_nn::VarBuilder<'static> {
        match Self::detect(file, naming) {
            Ok(renamed) => {
                candle_nn::VarBuilder::from_backend(Box::new(renamed), dtype, device.clone())
            }
            Err(file) => file.into_var_builder(dtype, device),
        }
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((bfl, take)) = self.naming.source(name) else {
            candle_core::bail!(
                "`{name}` has no counterpart in the {:?} single-file naming",
                self.naming
            );
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
            Take::SwapHalves => swap_halves(&t),
        }
    }
}

fn swap_halves(t: &Tensor) -> candle_core::Result<Tensor> {
    let half = t.dim(0)? / 2;
    Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)
}

impl SimpleBackend for SingleFileWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.file
            .expect_shape(name, self.load(name, dtype, dev)?, &s)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.naming
            .source(name)
            .is_some_and(|(bfl, _)| self.file.contains_tensor(&format!("{}{bfl}", self.prefix)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_fused_projections_and_swapped_modulation() {
        assert_eq!(
            bfl_source("transformer_blocks.3.attn.add_k_proj.weight"),
            Some((
                "double_blocks.3.txt_attn.qkv.weight".into(),
                Take::Part {
                    index: 1,
                    parts: QKV
                }
            ))
        );
        assert_eq!(
            bfl_source("single_transformer_blocks.0.proj_mlp.bias"),
            Some((
                "single_blocks.0.linear1.bias".into(),
                Take::Part {
                    index: 3,
                    parts: QKV_MLP
                }
            ))
        );
        assert_eq!(
            bfl_source("norm_out.linear.weight"),
            Some((
                "final_layer.adaLN_modulation.1.weight".into(),
                Take::SwapHalves
            ))
        );
        assert_eq!(
            bfl_source("transformer_blocks.0.attn.norm_q.weight").map(|s| s.0),
            Some("double_blocks.0.img_attn.norm.query_norm.scale".into())
        );
        assert_eq!(bfl_source("pos_embed.proj.weight"), None);
        assert_eq!(
            sai_source("transformer_blocks.2.attn2.to_v.bias", 4),
            Some((
                "joint_blocks.2.x_block.attn2.qkv.bias".into(),
                Take::Part {
                    index: 2,
                    parts: QKV
                }
            ))
        );
    }
}
