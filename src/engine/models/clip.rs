//! CLIP text encoder (transformers' `CLIPTextModel`), built from `text_encoder/config.json`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};

use super::blocks::{layer_norm, LayerNorm};
use super::cpu_activation::Activation;
use super::cpu_half_linear::{HeldLinear, Holding};
use serde::Deserialize;

use crate::engine::error::{EngineError, Result};
use crate::engine::loader::weights::StoredDtypes;

#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// Where the pooled output is read: the first position holding this id (transformers'
    /// legacy value 2 means "the largest id", which is the end-of-text token in CLIP's vocab).
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// transformers' class names; `CLIPTextModelWithProjection` has a `text_projection`.
    #[serde(default)]
    pub architectures: Vec<String>,
}

fn default_positions() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

struct ClipAttention {
    q_proj: HeldLinear,
    k_proj: HeldLinear,
    v_proj: HeldLinear,
    out_proj: HeldLinear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, c: &ClipTextConfig, holding: &Holding) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q_proj: holding.linear(vb.pp("q_proj"), d, d, true)?,
            k_proj: holding.linear(vb.pp("k_proj"), d, d, true)?,
            v_proj: holding.linear(vb.pp("v_proj"), d, d, true)?,
            out_proj: holding.linear(vb.pp("out_proj"), d, d, true)?,
            heads: c.num_attention_heads,
            head_dim: d / c.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, d) = xs.dims3()?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, n, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(xs)?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let out = crate::engine::models::attention::scaled_dot_product(
            &q,
            &k,
            &v,
            Some(causal_mask),
            false,
        )?;
        let out = out.transpose(1, 2)?.reshape((b, n, d))?;
        self.out_proj.forward(&out)
    }
}

struct ClipLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: HeldLinear,
    fc2: HeldLinear,
    act: Activation,
}

impl ClipLayer {
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask)?;
        let xs = (xs + h)?;
        let h = self.fc2.forward(
            &self
                .act
                .forward(&self.fc1.forward(&self.layer_norm2.forward(&xs)?)?)?,
        )?;
        xs + h
    }
}

pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
    /// `CLIPTextModelWithProjection`'s pooled-output projection (SDXL's second encoder).
    text_projection: Option<HeldLinear>,
    /// The model's dtype (embeddings held as stored are widened to it per looked-up row).
    dtype: DType,
    pub config: ClipTextConfig,
}

impl ClipTextModel {
    /// `vb` points at the file root; both `text_model.*` (transformers 4, all real SD repos) and
    /// bare (transformers 5) key names load. On the CPU in f32, the weights `stored` in bf16/f16
    /// are held so ([`Holding`]): SDXL's and SD3's OpenCLIP-G at 1.3 GB, not 2.6.
    pub fn new(vb_root: VarBuilder, config: ClipTextConfig, stored: &StoredDtypes) -> Result<Self> {
        let holding = Holding::new(stored, &vb_root);
        let vb = vb_root.clone();
        let act = Activation::from_name(&config.hidden_act).ok_or_else(|| {
            EngineError::Unsupported(format!("CLIP hidden_act `{}`", config.hidden_act))
        })?;
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(EngineError::Unsupported(format!(
                "CLIP hidden_size {} is not divisible by num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let c = &config;
        let emb = vb.pp("embeddings");
        let held_embedding =
            |vb: VarBuilder, rows: usize| embedding(rows, c.hidden_size, holding.reading(vb));
        let token_embedding = held_embedding(emb.pp("token_embedding"), c.vocab_size)?;
        let position_embedding =
            held_embedding(emb.pp("position_embedding"), c.max_position_embeddings)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layers.{i}"));
                Ok(ClipLayer {
                    layer_norm1: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
                    self_attn: ClipAttention::new(vb.pp("self_attn"), c, &holding)?,
                    layer_norm2: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
                    fc1: holding.linear(
                        vb.pp("mlp.fc1"),
                        c.hidden_size,
                        c.intermediate_size,
                        true,
                    )?,
                    fc2: holding.linear(
                        vb.pp("mlp.fc2"),
                        c.intermediate_size,
                        c.hidden_size,
                        true,
                    )?,
                    act,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm =
            layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("final_layer_norm"))?;
        // The weights tell for a real model; the config for one built with random weights.
        let with_projection = vb_root.contains_tensor("text_projection.weight")
            || c.architectures
                .iter()
                .any(|a| a == "CLIPTextModelWithProjection");
        let text_projection = if with_projection {
            let dim = c.projection_dim.unwrap_or(c.hidden_size);
            Some(holding.linear(vb_root.pp("text_projection"), c.hidden_size, dim, false)?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            dtype: vb_root.dtype(),
            config,
        })
    }

    /// Bytes the weights are held in (what the memory planner counts with
    /// [`super::cpu_half_linear::held_dtype`]).
    pub fn weight_bytes(&self) -> usize {
        use super::tensor_bytes as bytes;
        let norm = |n: &LayerNorm| bytes(n.weight()) + n.bias().map_or(0, bytes);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.self_attn;
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.out_proj, &l.fc1, &l.fc2]
                    .iter()
                    .map(|p| p.bytes())
                    .sum::<usize>()
                    + norm(&l.layer_norm1)
                    + norm(&l.layer_norm2)
            })
            .sum();
        bytes(self.token_embedding.embeddings())
            + bytes(self.position_embedding.embeddings())
            + layers
            + norm(&self.final_layer_norm)
            + self.text_projection.as_ref().map_or(0, HeldLinear::bytes)
    }

    fn causal_mask(n: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (n, n), device)?.to_dtype(dtype)
    }

    /// transformers' `hidden_states` (embeddings first, then each layer's output), for the
    /// first `layers` layers.
    fn hidden_states(&self, input_ids: &Tensor, layers: usize) -> candle_core::Result<Vec<Tensor>> {
        let (_, n) = input_ids.dims2()?;
        let positions = Tensor::arange(0u32, n as u32, input_ids.device())?.unsqueeze(0)?;
        let mut xs = self
            .token_embedding
            .forward(input_ids)?
            .to_dtype(self.dtype)?
            .broadcast_add(
                &self
                    .position_embedding
                    .forward(&positions)?
                    .to_dtype(self.dtype)?,
            )?;
        let mask = Self::causal_mask(n, xs.dtype(), xs.device())?;
        let mut states = vec![xs.clone()];
        for layer in &self.layers[..layers.min(self.layers.len())] {
            xs = layer.forward(&xs, &mask)?;
            states.push(xs.clone());
        }
        Ok(states)
    }

    /// The state after the first `layers` layers (`hidden_states[layers]`), running no more.
    fn state_after(&self, input_ids: &Tensor, layers: usize) -> candle_core::Result<Tensor> {
        self.hidden_states(input_ids, layers)?
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("CLIP produced no hidden state".into()))
    }

    /// Hidden states after the final layer norm, skipping the last `clip_skip` layers
    /// (diffusers' `clip_skip`: `hidden_states[-(clip_skip + 1)]` then `final_layer_norm`).
    pub fn forward(&self, input_ids: &Tensor, clip_skip: usize) -> candle_core::Result<Tensor> {
        let used = self.layers.len().saturating_sub(clip_skip);
        self.final_layer_norm
            .forward(&self.state_after(input_ids, used)?)
    }

    /// The raw (un-normalised) `hidden_states[-(clip_skip + 2)]` alone: SDXL's first encoder,
    /// whose pooled output is not used, so the layers after that state are not run.
    pub fn penultimate(&self, input_ids: &Tensor, clip_skip: usize) -> candle_core::Result<Tensor> {
        let used = self
            .layers
            .len()
            .checked_sub(clip_skip + 1)
            .ok_or_else(|| candle_core::Error::Msg("clip_skip exceeds the CLIP layers".into()))?;
        self.state_after(input_ids, used)
    }

    /// SDXL's use of an encoder: the raw (un-normalised) `hidden_states[-(clip_skip + 2)]`, and
    /// the pooled output — the final-layer-normed state at the end-of-text token, through
    /// `text_projection` when the model has one.
    pub fn forward_penultimate(
        &self,
        input_ids: &Tensor,
        clip_skip: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let states = self.hidden_states(input_ids, self.layers.len())?;
        let pick = states
            .len()
            .checked_sub(clip_skip + 2)
            .ok_or_else(|| candle_core::Error::Msg("clip_skip exceeds the CLIP layers".into()))?;
        let hidden = states[pick].clone();
        let last = self.final_layer_norm.forward(&states[states.len() - 1])?;
        let ids: Vec<Vec<u32>> = input_ids.to_dtype(DType::U32)?.to_vec2()?;
        let mut rows = Vec::with_capacity(ids.len());
        for (b, row) in ids.iter().enumerate() {
            let eos = match self.config.eos_token_id {
                Some(id) if id != 2 => id,
                _ => row.iter().copied().max().unwrap_or(0),
            };
            let pos = row.iter().position(|&t| t == eos).unwrap_or(row.len() - 1);
            rows.push(last.get(b)?.get(pos)?);
        }
        let mut pooled = Tensor::stack(&rows, 0)?;
        if let Some(p) = &self.text_projection {
            pooled = p.forward(&pooled)?;
        }
        Ok((hidden, pooled))
    }
}
