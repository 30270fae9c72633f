//! The embedded demo model: the tiny random-weight SD1-layout pipeline that
//! `tools/reference/make_fixtures.py` builds deterministically (and that the parity tests check
//! against diffusers). It lets a fresh checkout generate an image with nothing downloaded; the
//! pictures are noise-like, since the weights are random.

use std::path::{Path, PathBuf};

use crate::engine::error::{EngineError, Result};

pub const DEMO_MODEL_NAME: &str = "candela-demo-sd1";

macro_rules! demo_files {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/sd1-tiny/", $path)) as &[u8])),*]
    };
}

const FILES: &[(&str, &[u8])] = demo_files!(
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
);

/// Write the demo model under `parent` (once; files are rewritten only if their size differs)
/// and return its folder.
pub fn install(parent: &Path) -> Result<PathBuf> {
    let root = parent.join(DEMO_MODEL_NAME);
    for (relative, bytes) in FILES {
        let path = root.join(relative);
        let current = std::fs::metadata(&path).map(|m| m.len()).ok();
        if current == Some(bytes.len() as u64) {
            continue;
        }
        let io = |source| EngineError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        // Write then rename, so a crash never leaves a half-written weight file behind.
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
    }
    Ok(root)
}
