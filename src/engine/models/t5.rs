//! T5 v1.1 encoder (SD3's `text_encoder_3`, FLUX's `text_encoder_2`: T5-XXL), built from the
//! repo's transformers `config.json`. The layers are candle-transformers' T5 (checked against
//! transformers here, `tests/parity_components.rs`); this wrapper loads the config, hides the
//! model's `&mut` forward (it caches its relative position bias) behind a lock, and names errors.

use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{var_builder::SimpleBackend, Init, VarBuilder};
use candle_transformers::models::t5;

use crate::engine::error::{EngineError, Result};
use crate::engine::loader::weights::SafetensorsFile;

pub struct T5Encoder {
    model: Mutex<t5::T5EncoderModel>,
    pub config: t5::Config,
}

impl T5Encoder {
    pub fn new(vb: VarBuilder, config_json: serde_json::Value) -> Result<Self> {
        let mut config_json = config_json;
        // Encoder-only checkpoints may omit the decoder fields candle's config requires.
        if let Some(fields) = config_json.as_object_mut() {
            fields
                .entry("is_encoder_decoder")
                .or_insert(serde_json::Value::Bool(true));
            fields
                .entry("initializer_factor")
                .or_insert(serde_json::json!(1.0));
            fields
                .entry("dropout_rate")
                .or_insert(serde_json::json!(0.0));
        }
        let config: t5::Config = serde_json::from_value(config_json)
            .map_err(|e| EngineError::Unsupported(format!("T5 config: {e}")))?;
        let model = t5::T5EncoderModel::load(vb, &config)?;
        Ok(Self {
            model: Mutex::new(model),
            config,
        })
    }

    /// The last hidden state, (B, tokens, d_model).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let mut model = self
            .model
            .lock()
            .map_err(|_| EngineError::Internal("the T5 encoder lock was poisoned".into()))?;
        Ok(model.forward(input_ids)?)
    }
}

/// The encoder's weights from `file`. candle-transformers' layers are not ours, so on the CPU
/// the Linear weights come out of the file already in the layout the CPU's products read
/// fastest (`cpu_util::gemm_layout`, as `blocks::Linear` keeps its own); the embeddings, read
/// by row, stay as they are.
pub fn var_builder(file: SafetensorsFile, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(CpuGemmLayout(file)), dtype, device.clone())
}

struct CpuGemmLayout(SafetensorsFile);

impl CpuGemmLayout {
    fn arrange(name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        let by_row = ["shared", "embed_tokens", "relative_attention_bias"]
            .iter()
            .any(|k| name.contains(k));
        if t.device().is_cpu() && t.rank() == 2 && name.ends_with(".weight") && !by_row {
            super::cpu_util::gemm_layout(&t)
        } else {
            Ok(t)
        }
    }
}

impl SimpleBackend for CpuGemmLayout {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Self::arrange(name, self.0.get(s, name, h, dtype, dev)?)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Self::arrange(name, self.0.get_unchecked(name, dtype, dev)?)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}
