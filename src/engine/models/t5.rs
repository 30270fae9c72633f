//! T5 v1.1 encoder (SD3's `text_encoder_3`, FLUX's `text_encoder_2`: T5-XXL), built from the
//! repo's transformers `config.json`. The layers are candle-transformers' T5 (checked against
//! transformers here, `tests/parity_components.rs`); this wrapper loads the config, hides the
//! model's `&mut` forward (it caches its relative position bias) behind a lock, and names errors.

use std::sync::Mutex;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use candle_transformers::models::t5;

use crate::engine::error::{EngineError, Result};

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
