//! Transformers saved as the model makers' single files, read under diffusers' names (which the
//! model code uses), as diffusers' own single-file converters map them:
//! * FLUX in Black Forest Labs' naming (`flux1-dev.safetensors`, most fine-tunes): fused q/k/v
//!   and single-block `linear1` (q, k, v, MLP) are cut into separate projections;
//! * SD3 / SD3.5 in Stability's naming (`sd3.5_large.safetensors`' `model.diffusion_model.*`):
//!   `joint_blocks.N.{x_block, context_block}` with fused q/k/v.
//!
//! Either may come as safetensors or as a GGUF file (city96's quantized conversions), whose
//! block-format tensors are cut into the same layers without touching their blocks.
//!
//! In both, (shift, scale) modulations (the final norm; SD3's last context norm) are swapped into
//! diffusers' (scale, shift) order. ComfyUI's `model.diffusion_model.` prefix is accepted.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{var_builder::SimpleBackend, Init};

use super::gguf::{is_block_format, GgufFile};
use super::weights::{SafetensorsFile, StoredDtypes};
use crate::engine::error::Result;
use crate::engine::models::flux::FluxTransformerConfig;
use crate::engine::models::quantized::StoredBlocks;

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
    /// llama.cpp's T5 encoder (`enc.blk.N.attn_q`, …: the GGUF T5-XXL files), read as
    /// transformers' `T5EncoderModel` names.
    T5,
}

impl Naming {
    fn probe(self) -> &'static str {
        match self {
            Self::Bfl => "double_blocks.0.img_attn.qkv.weight",
            Self::Sai { .. } => "joint_blocks.0.x_block.attn.qkv.weight",
            Self::T5 => "enc.blk.0.attn_q.weight",
        }
    }

    /// A tensor every file of this model in its library's own naming (diffusers',
    /// transformers') has.
    fn library_probe(self) -> &'static str {
        match self {
            Self::Bfl | Self::Sai { .. } => "transformer_blocks.0.attn.to_q.weight",
            Self::T5 => "encoder.block.0.layer.0.SelfAttention.q.weight",
        }
    }

    fn source(self, name: &str) -> Option<(String, Take)> {
        match self {
            Self::Bfl => bfl_source(name),
            Self::Sai { blocks } => sai_source(name, blocks),
            Self::T5 => t5_source(name).map(|s| (s, Take::All)),
        }
    }
}

/// llama.cpp's name of a transformers T5 encoder tensor (gguf-py's `tensor_mapping.py`).
pub fn t5_source(name: &str) -> Option<String> {
    match name {
        "shared.weight" | "encoder.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "encoder.final_layer_norm.weight" => return Some("enc.output_norm.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("encoder.block.")?;
    let (i, inner) = rest.split_once('.')?;
    let tensor = match inner {
        "layer.0.layer_norm.weight" => "attn_norm",
        "layer.0.SelfAttention.q.weight" => "attn_q",
        "layer.0.SelfAttention.k.weight" => "attn_k",
        "layer.0.SelfAttention.v.weight" => "attn_v",
        "layer.0.SelfAttention.o.weight" => "attn_o",
        "layer.0.SelfAttention.relative_attention_bias.weight" => "attn_rel_b",
        "layer.1.layer_norm.weight" => "ffn_norm",
        "layer.1.DenseReluDense.wi_0.weight" => "ffn_gate",
        "layer.1.DenseReluDense.wi_1.weight" | "layer.1.DenseReluDense.wi.weight" => "ffn_up",
        "layer.1.DenseReluDense.wo.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("enc.blk.{i}.{tensor}.weight"))
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

/// Every tensor of a FLUX transformer file in BFL's naming, with its shape (rows first), for
/// `c` (`bench --write-random-gguf` writes them; the planner's tests read their headers).
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

/// Whether a single file's tensor `name` (any of the namings, with or without Stability's
/// prefix) belongs to the transformer blocks, whose Linear layers may be held quantized.
pub fn in_transformer_blocks(name: &str) -> bool {
    const BLOCKS: [&str; 5] = [
        "transformer_blocks.",
        "single_transformer_blocks.",
        "double_blocks.",
        "single_blocks.",
        "joint_blocks.",
    ];
    let name = name.strip_prefix(SingleFileWeights::PREFIX).unwrap_or(name);
    BLOCKS.iter().any(|b| name.starts_with(b))
}

/// A single-file transformer: safetensors, or a GGUF file whose block-format tensors quantized
/// layers keep as stored.
pub enum TransformerFile {
    Safetensors(SafetensorsFile),
    Gguf(GgufFile),
}

impl TransformerFile {
    /// `path` as what its first bytes say it is.
    pub fn open(path: &Path) -> Result<Self> {
        if GgufFile::is_gguf(path) {
            return Ok(Self::Gguf(GgufFile::open(path)?));
        }
        Ok(Self::Safetensors(SafetensorsFile::open(path)?))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match self {
            Self::Safetensors(f) => f.contains_tensor(name),
            Self::Gguf(f) => f.contains_tensor(name),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Safetensors(f) => f.path(),
            Self::Gguf(f) => f.path(),
        }
    }

    /// The half precision the products' weights are all stored in, if one
    /// ([`SafetensorsFile::products_stored_in_half`]); a GGUF file's float layers (embedders,
    /// norms) are held in the compute dtype.
    pub fn products_stored_in_half(&self) -> Option<DType> {
        match self {
            Self::Safetensors(f) => f.products_stored_in_half(),
            Self::Gguf(_) => None,
        }
    }

    /// The dtype each tensor is stored in, for a model that holds some as stored; a GGUF
    /// file's float tensors are read in the compute dtype.
    pub fn stored_dtypes(&self) -> StoredDtypes {
        match self {
            Self::Safetensors(f) => f.stored_dtypes(),
            Self::Gguf(_) => StoredDtypes::ByName(Default::default()),
        }
    }
}

impl Take {
    /// The rows (along the first dimension) of a tensor of `rows` rows this cut takes, in
    /// order.
    fn rows(self, rows: usize) -> Vec<Range<usize>> {
        match self {
            Self::All => std::iter::once(0..rows).collect(),
            Self::Part { index, parts } => {
                let unit = rows / parts.iter().sum::<usize>();
                let start = parts[..index].iter().sum::<usize>() * unit;
                std::iter::once(start..start + parts[index] * unit).collect()
            }
            Self::SwapHalves => vec![rows / 2..rows, 0..rows / 2],
        }
    }
}

/// A single-file checkpoint seen through diffusers' names: renamed and cut when it uses the
/// model makers' naming, as it is when it uses diffusers' own.
pub struct SingleFileWeights {
    file: TransformerFile,
    /// `None`: the file already uses diffusers' names.
    naming: Option<Naming>,
    /// `model.diffusion_model.` in Stability's and ComfyUI-style files, empty otherwise.
    prefix: &'static str,
}

impl SingleFileWeights {
    const PREFIX: &'static str = "model.diffusion_model.";

    /// `file` read through `naming` when it uses it (with or without the prefix), as it is when
    /// it uses diffusers' names; a file in neither (another family's) is refused, named.
    pub fn new(file: TransformerFile, naming: Naming) -> Result<Self> {
        for prefix in ["", Self::PREFIX] {
            if file.contains_tensor(&format!("{prefix}{}", naming.probe())) {
                return Ok(Self {
                    file,
                    naming: Some(naming),
                    prefix,
                });
            }
        }
        if !file.contains_tensor(naming.library_probe()) {
            return Err(crate::engine::error::EngineError::Weights {
                path: file.path().to_path_buf(),
                tensor: naming.probe().to_string(),
                reason: format!(
                    "not a file of this model's family: it has neither this tensor (the model makers' or llama.cpp's naming) nor `{}` (the library's)",
                    naming.library_probe()
                ),
            });
        }
        Ok(Self {
            file,
            naming: None,
            prefix: "",
        })
    }

    /// The file's tensor and cut for a diffusers name.
    fn source(&self, name: &str) -> Option<(String, Take)> {
        let (stored, take) = match self.naming {
            Some(naming) => naming.source(name)?,
            None => (name.to_string(), Take::All),
        };
        Some((format!("{}{stored}", self.prefix), take))
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((stored, take)) = self.source(name) else {
            candle_core::bail!(
                "`{name}` has no counterpart in the {:?} single-file naming",
                self.naming
            );
        };
        match &self.file {
            TransformerFile::Safetensors(file) => {
                let t = file.get_unchecked(&stored, dtype, dev)?;
                if take == Take::All {
                    return Ok(t);
                }
                let parts = (take.rows(t.dim(0)?).into_iter())
                    .map(|r| t.narrow(0, r.start, r.len()))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)
            }
            TransformerFile::Gguf(file) => {
                let rows = file.dims(&stored).and_then(|d| d.first().copied());
                let ranges = take.rows(rows.unwrap_or(0));
                file.dense_rows(&stored, &ranges, dtype, dev)
            }
        }
    }

    /// A var builder over these weights; `self` stays shared with the model's constructor,
    /// which takes stored blocks from it ([`StoredBlocks`]).
    pub fn var_builder(
        self: &Arc<Self>,
        dtype: DType,
        device: &Device,
    ) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_backend(Box::new(Shared(self.clone())), dtype, device.clone())
    }
}

impl StoredBlocks for SingleFileWeights {
    fn blocks(&self, name: &str) -> Option<candle_core::Result<QTensor>> {
        let TransformerFile::Gguf(file) = &self.file else {
            return None;
        };
        let (stored, take) = self.source(name)?;
        if !is_block_format(file.format(&stored)?) {
            return None;
        }
        let rows = file.dims(&stored)?.first().copied()?;
        Some(file.rows(&stored, &take.rows(rows)))
    }

    fn path(&self) -> &Path {
        self.file.path()
    }
}

/// [`SingleFileWeights`] shared between a var builder and the model's constructor.
struct Shared(Arc<SingleFileWeights>);

impl SimpleBackend for Shared {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.0.load(name, dtype, dev)?;
        super::weights::expect_shape(self.0.file.path(), name, t, &s)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0
            .source(name)
            .is_some_and(|(stored, _)| self.0.file.contains_tensor(&stored))
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

    /// The names and shapes written are those of a real BFL file: the tiny fixture's, tensor for
    /// tensor.
    #[test]
    fn bfl_tensors_are_those_of_a_bfl_file() {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
        let config: FluxTransformerConfig =
            crate::engine::loader::read_json(&models.join("flux-dev-tiny/transformer/config.json"))
                .unwrap();
        let file = models.join("flux1-dev-tiny-bfl.safetensors");
        let stored = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
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
