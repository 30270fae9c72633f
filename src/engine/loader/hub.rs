//! Hugging Face hub downloads through hf-hub's blocking client, with its progress bars. The caller
//! passes every setting (cache folder, offline mode, token): nothing here reads the environment.

use std::path::PathBuf;

use hf_hub::{
    api::sync::{Api, ApiBuilder},
    Cache, Repo, RepoType,
};

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

/// The weight file stem of a diffusers component folder.
fn weight_stem(component: &str) -> String {
    if component.starts_with("text_encoder") {
        format!("{component}/model")
    } else {
        format!("{component}/diffusion_pytorch_model")
    }
}

/// The components `model_index.json` lists (`name: [library, class]`, nulls for absent ones).
fn components(model_index: &std::path::Path) -> Result<Vec<String>> {
    let index: serde_json::Value = super::read_json(model_index)?;
    let Some(fields) = index.as_object() else {
        return Err(EngineError::BadConfig {
            path: model_index.to_path_buf(),
            reason: "not a JSON object".into(),
        });
    };
    Ok(fields
        .iter()
        .filter(|(name, value)| {
            !name.starts_with('_')
                && value
                    .as_array()
                    .is_some_and(|a| a.len() == 2 && a.iter().all(|x| !x.is_null()))
        })
        .map(|(name, _)| name.clone())
        .collect())
}

/// Which weight files of a component to take, given what the repo has: `stem.fp16.safetensors`
/// or `stem.safetensors` (in the preferred order), else a shard index with its shards.
fn choose_weights(
    stem: &str,
    has: &dyn Fn(&str) -> bool,
    prefer_fp16: bool,
) -> Option<WeightChoice> {
    let single = [
        format!("{stem}.fp16.safetensors"),
        format!("{stem}.safetensors"),
    ];
    let indexes = [
        format!("{stem}.safetensors.index.fp16.json"),
        format!("{stem}.safetensors.index.json"),
    ];
    let ordered = |pair: &[String; 2]| -> Vec<String> {
        if prefer_fp16 {
            pair.to_vec()
        } else {
            vec![pair[1].clone(), pair[0].clone()]
        }
    };
    if let Some(file) = ordered(&single).into_iter().find(|f| has(f)) {
        return Some(WeightChoice::Single(file));
    }
    ordered(&indexes)
        .into_iter()
        .find(|f| has(f))
        .map(WeightChoice::Sharded)
}

enum WeightChoice {
    Single(String),
    /// The index file; its shards are fetched after reading it.
    Sharded(String),
}

/// Config and tokenizer files a component may have (fetched when the repo has them).
const SMALL_FILES: &[&str] = &[
    "config.json",
    "scheduler_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "spiece.model",
    "added_tokens.json",
];

/// Fetch the files of a diffusers pipeline, following `model_index.json`: each listed
/// component's configs, tokenizer files and weights (a single file or shards, the fp16 variant
/// first when `prefer_fp16`). Returns the snapshot folder, which has the repo's layout.
/// A repo at a revision: files downloaded into the cache (with hf-hub's progress bars), or
/// offline taken from it.
struct HubRepo<'a> {
    opts: &'a HubOptions,
    repo_id: &'a str,
    repo: Repo,
    /// `None` offline.
    api: Option<Api>,
}

impl<'a> HubRepo<'a> {
    fn open(opts: &'a HubOptions, repo_id: &'a str, revision: &str) -> Result<Self> {
        let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
        let api = if opts.offline {
            None
        } else {
            Some(
                ApiBuilder::from_cache(opts.cache())
                    .with_progress(opts.progress)
                    .with_token(opts.token.clone())
                    .build()
                    .map_err(|e| download_error(repo_id, "(hub client)", e))?,
            )
        };
        Ok(Self {
            opts,
            repo_id,
            repo,
            api,
        })
    }

    /// `file`'s path in the cache, downloaded first unless offline.
    fn fetch(&self, file: &str) -> Result<PathBuf> {
        match &self.api {
            None => (self.opts.cache().repo(self.repo.clone()).get(file)).ok_or_else(|| {
                EngineError::Download {
                    repo: self.repo_id.to_string(),
                    file: file.to_string(),
                    reason: "not in the local cache and offline mode is on".into(),
                }
            }),
            Some(api) => api
                .repo(self.repo.clone())
                .get(file)
                .map_err(|e| download_error(self.repo_id, file, e)),
        }
    }
}

/// One file of a repo (a single-file transformer: `flux1-dev-Q4_K_S.gguf`), downloaded into
/// the cache unless offline; its path there.
pub fn fetch_file(opts: &HubOptions, repo_id: &str, revision: &str, file: &str) -> Result<PathBuf> {
    HubRepo::open(opts, repo_id, revision)?.fetch(file)
}

pub fn fetch_pipeline(
    opts: &HubOptions,
    repo_id: &str,
    revision: &str,
    prefer_fp16: bool,
) -> Result<PathBuf> {
    let hub = HubRepo::open(opts, repo_id, revision)?;
    let (api, repo) = (&hub.api, &hub.repo);
    let fetch = |file: &str| hub.fetch(file);
    let model_index = fetch("model_index.json")?;
    let snapshot = model_index
        .parent()
        .map(|p| p.to_path_buf())
        .ok_or_else(|| EngineError::ModelNotFound(repo_id.to_string()))?;
    let components = components(&model_index)?;
    // What the repo has: its file list online; the snapshot's files offline.
    let listed: std::collections::HashSet<String> = match &api {
        Some(api) => api
            .repo(repo.clone())
            .info()
            .map_err(|e| download_error(repo_id, "(file list)", e))?
            .siblings
            .into_iter()
            .map(|s| s.rfilename)
            .collect(),
        None => std::collections::HashSet::new(),
    };
    let has = |file: &str| -> bool {
        if api.is_some() {
            listed.contains(file)
        } else {
            snapshot.join(file).is_file()
        }
    };
    for component in &components {
        // Offline, every component must at least have its config in the cache.
        let config = if component == "scheduler" {
            format!("{component}/scheduler_config.json")
        } else if component.starts_with("tokenizer") {
            format!("{component}/tokenizer_config.json")
        } else {
            format!("{component}/config.json")
        };
        fetch(&config)?;
        for small in SMALL_FILES {
            let file = format!("{component}/{small}");
            if file != config && has(&file) {
                fetch(&file)?;
            }
        }
        if component == "scheduler" || component.starts_with("tokenizer") {
            continue;
        }
        let stem = weight_stem(component);
        match choose_weights(&stem, &has, prefer_fp16) {
            Some(WeightChoice::Single(file)) => {
                fetch(&file)?;
            }
            Some(WeightChoice::Sharded(index)) => {
                let path = fetch(&index)?;
                let parsed: super::ShardIndex = super::read_json(&path)?;
                let mut shards: Vec<String> = parsed.weight_map.into_values().collect();
                shards.sort();
                shards.dedup();
                for shard in shards {
                    fetch(&format!("{component}/{shard}"))?;
                }
            }
            None => {
                return Err(EngineError::Download {
                    repo: repo_id.to_string(),
                    file: format!("{stem}.safetensors"),
                    reason: if api.is_some() {
                        "the repo has no safetensors weights for this component (.bin / .ckpt are not loaded)".into()
                    } else {
                        "not in the local cache and offline mode is on".into()
                    },
                });
            }
        }
    }
    Ok(snapshot)
}

fn download_error(repo: &str, file: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Download {
        repo: repo.to_string(),
        file: file.to_string(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(files: &[&str], stem: &str, fp16: bool) -> Option<String> {
        let has = |f: &str| files.contains(&f);
        choose_weights(stem, &has, fp16).map(|c| match c {
            WeightChoice::Single(f) => f,
            WeightChoice::Sharded(f) => format!("index:{f}"),
        })
    }

    #[test]
    fn picks_the_variant_then_shards() {
        let repo = [
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            "text_encoder_2/model.safetensors.index.fp16.json",
            "text_encoder_2/model.safetensors.index.json",
            "vae/diffusion_pytorch_model.bin",
        ];
        assert_eq!(
            pick(&repo, "unet/diffusion_pytorch_model", true).as_deref(),
            Some("unet/diffusion_pytorch_model.fp16.safetensors")
        );
        assert_eq!(
            pick(&repo, "unet/diffusion_pytorch_model", false).as_deref(),
            Some("unet/diffusion_pytorch_model.safetensors")
        );
        assert_eq!(
            pick(&repo, "transformer/diffusion_pytorch_model", true).as_deref(),
            Some("index:transformer/diffusion_pytorch_model.safetensors.index.json")
        );
        assert_eq!(
            pick(&repo, "text_encoder_2/model", true).as_deref(),
            Some("index:text_encoder_2/model.safetensors.index.fp16.json")
        );
        // .bin weights are not loaded.
        assert_eq!(pick(&repo, "vae/diffusion_pytorch_model", true), None);
    }
}
