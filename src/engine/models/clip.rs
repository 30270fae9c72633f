//! CLIP text encoder (transformers' `CLIPTextModel`), built from `text_encoder/config.json`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};

use super::blocks::{linear, Linear};
use super::cpu_activation::Activation;
use serde::Deserialize;

use crate::engine::error::{EngineError, Result};

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
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
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
    fc1: Linear,
    fc2: Linear,
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
    text_projection: Option<Linear>,
    pub config: ClipTextConfig,
}

impl ClipTextModel {
    /// `vb` points at the file root; both `text_model.*` (transformers 4, all real SD repos) and
    /// bare (transformers 5) key names load.
    pub fn new(vb_root: VarBuilder, config: ClipTextConfig) -> Result<Self> {
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
        let token_embedding = embedding(c.vocab_size, c.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = embedding(
            c.max_position_embeddings,
            c.hidden_size,
            emb.pp("position_embedding"),
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layers.{i}"));
                Ok(ClipLayer {
                    layer_norm1: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
                    self_attn: ClipAttention::new(vb.pp("self_attn"), c)?,
                    layer_norm2: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
                    fc1: linear(c.hidden_size, c.intermediate_size, vb.pp("mlp.fc1"))?,
                    fc2: linear(c.intermediate_size, c.hidden_size, vb.pp("mlp.fc2"))?,
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
            Some(super::blocks::linear_no_bias(
                c.hidden_size,
                dim,
                vb_root.pp("text_projection"),
            )?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config,
        })
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
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
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
