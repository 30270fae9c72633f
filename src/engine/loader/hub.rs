//! Hugging Face hub downloads through hf-hub's blocking client, with its progress bars. The caller
//! passes every setting (cache folder, offline mode, token): nothing here reads the environment.

use std::path::PathBuf;

use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};

use super::{SD_COMPONENT_FILES, SD_WEIGHT_FILES};
use crate::engine::error::{EngineError, Result};

#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// The hub cache (`$HF_HOME/hub`); `None` uses hf-hub's default (`~/.cache/huggingface/hub`).
    pub cache_dir: Option<PathBuf>,
    /// Only use what is already in the cache (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    pub token: Option<String>,
    pub progress: bool,
}

impl HubOptions {
    fn cache(&self) -> Cache {
        match &self.cache_dir {
            Some(dir) => Cache::new(dir.clone()),
            None => Cache::from_env(),
        }
    }
}

/// Fetch the files of a diffusers pipeline; returns the snapshot folder, which has the repo's layout.
pub fn fetch_pipeline(
    opts: &HubOptions,
    repo_id: &str,
    revision: &str,
    prefer_fp16: bool,
) -> Result<PathBuf> {
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let fetch = |file: &str| -> Result<PathBuf> {
        let path = if opts.offline {
            opts.cache()
                .repo(repo.clone())
                .get(file)
                .ok_or_else(|| EngineError::Download {
                    repo: repo_id.to_string(),
                    file: file.to_string(),
                    reason: "not in the local cache and offline mode is on".into(),
                })?
        } else {
            let api = ApiBuilder::from_cache(opts.cache())
                .with_progress(opts.progress)
                .with_token(opts.token.clone())
                .build()
                .map_err(|e| download_error(repo_id, file, e))?;
            api.repo(repo.clone())
                .get(file)
                .map_err(|e| download_error(repo_id, file, e))?
        };
        Ok(path)
    };
    for file in SD_COMPONENT_FILES {
        fetch(file)?;
    }
    for stem in SD_WEIGHT_FILES {
        let plain = format!("{stem}.safetensors");
        let fp16 = format!("{stem}.fp16.safetensors");
        let order = if prefer_fp16 {
            [&fp16, &plain]
        } else {
            [&plain, &fp16]
        };
        let first = fetch(order[0]);
        if first.is_err() {
            fetch(order[1])?;
        }
    }
    // Every file sits at <snapshot>/<relative path>; walk up from the last one to the snapshot.
    let model_index = fetch("model_index.json")?;
    model_index
        .parent()
        .map(|p| p.to_path_buf())
        .ok_or_else(|| EngineError::ModelNotFound(repo_id.to_string()))
}

fn download_error(repo: &str, file: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Download {
        repo: repo.to_string(),
        file: file.to_string(),
        reason: e.to_string(),
    }
}
