//! Finding a model's files: a local diffusers folder, or a Hugging Face repo id resolved through
//! hf-hub's cache (same layout and `HF_HOME` as the Python tools, so downloads are shared).

pub mod gguf;
mod hub;
pub mod single_file;
pub mod weights;

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::de::DeserializeOwned;

pub use hub::HubOptions;

use crate::engine::error::{EngineError, Result};

/// Where a model comes from, as the user named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub { repo: String, revision: String },
}

impl ModelSource {
    /// A path that exists is local; `owner/name[@revision]` is a hub repo; anything else is an error.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) => (r, rev.to_string()),
            None => (spec, "main".to_string()),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let valid = parts.len() == 2
            && parts.iter().all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            });
        if valid && !spec.starts_with('.') && !spec.starts_with('/') {
            Ok(Self::Hub {
                repo: repo.to_string(),
                revision,
            })
        } else {
            Err(EngineError::ModelNotFound(format!(
                "`{spec}` is neither an existing folder nor a Hugging Face repo id (owner/name)"
            )))
        }
    }
}

/// Where a single file (a `--transformer`) comes from, as the user named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSource {
    Local(PathBuf),
    /// `owner/name/path/in/repo[@revision]`.
    Hub {
        repo: String,
        revision: String,
        file: String,
    },
}

impl FileSource {
    /// A path that exists is local; `owner/name/file[@revision]` (the file may be in a folder
    /// of the repo) is a file of a hub repo; anything else is an error.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        let not_found = || {
            EngineError::ModelNotFound(format!(
                "`{spec}` is neither an existing file nor a file of a Hugging Face repo (owner/name/file)"
            ))
        };
        let (rest, revision) = match spec.split_once('@') {
            Some((r, rev)) => (r, rev.to_string()),
            None => (spec, "main".to_string()),
        };
        let mut parts = rest.splitn(3, '/');
        let (Some(owner), Some(name), Some(file)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(not_found());
        };
        let Ok(ModelSource::Hub { repo, .. }) = ModelSource::parse(&format!("{owner}/{name}"))
        else {
            return Err(not_found());
        };
        if file.is_empty() || file.split('/').any(|p| p.is_empty() || p == "..") {
            return Err(not_found());
        }
        Ok(Self::Hub {
            repo,
            revision,
            file: file.to_string(),
        })
    }
}

/// The local path of a single file, downloaded from the hub (into its cache, with a progress
/// bar) when it names a repo's file.
pub fn resolve_file(source: &FileSource, hub: &HubOptions) -> Result<PathBuf> {
    match source {
        FileSource::Local(path) if path.is_file() => Ok(path.clone()),
        FileSource::Local(path) => Err(EngineError::MissingFile { path: path.clone() }),
        FileSource::Hub {
            repo,
            revision,
            file,
        } => hub::fetch_file(hub, repo, revision, file),
    }
}

/// A model folder on local disk with every file in place.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub root: PathBuf,
    /// Prefer `*.fp16.safetensors` when present (half the download and memory).
    pub prefer_fp16_variant: bool,
}

impl ModelDir {
    pub fn file(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    pub fn required(&self, relative: &str) -> Result<PathBuf> {
        let path = self.file(relative);
        if path.is_file() {
            Ok(path)
        } else {
            Err(EngineError::MissingFile { path })
        }
    }

    /// The safetensors file of a component: `stem.fp16.safetensors` or `stem.safetensors`.
    pub fn weights(&self, stem: &str) -> Result<PathBuf> {
        let plain = self.file(&format!("{stem}.safetensors"));
        let fp16 = self.file(&format!("{stem}.fp16.safetensors"));
        let (first, second) = if self.prefer_fp16_variant {
            (fp16, plain.clone())
        } else {
            (plain.clone(), fp16)
        };
        if first.is_file() {
            Ok(first)
        } else if second.is_file() {
            Ok(second)
        } else {
            Err(EngineError::MissingFile { path: plain })
        }
    }

    /// Every safetensors file of a component: one file, or the shards its
    /// `stem.safetensors.index.json` lists (large transformers and T5-XXL ship sharded).
    pub fn weight_files(&self, stem: &str) -> Result<Vec<PathBuf>> {
        match self.weights(stem) {
            Ok(one) => Ok(vec![one]),
            Err(missing) => {
                let indexes = [
                    format!("{stem}.safetensors.index.fp16.json"),
                    format!("{stem}.safetensors.index.json"),
                ];
                let order: Vec<&String> = if self.prefer_fp16_variant {
                    indexes.iter().collect()
                } else {
                    indexes.iter().rev().collect()
                };
                let Some(index) = order
                    .into_iter()
                    .map(|i| self.file(i))
                    .find(|p| p.is_file())
                else {
                    return Err(missing);
                };
                let parsed: ShardIndex = read_json(&index)?;
                let folder = index.parent().map(Path::to_path_buf).unwrap_or_default();
                let mut shards: Vec<String> = parsed.weight_map.into_values().collect();
                shards.sort();
                shards.dedup();
                let files: Vec<PathBuf> = shards.iter().map(|s| folder.join(s)).collect();
                if let Some(absent) = files.iter().find(|f| !f.is_file()) {
                    return Err(EngineError::MissingFile {
                        path: absent.clone(),
                    });
                }
                Ok(files)
            }
        }
    }

    pub fn read_json<T: DeserializeOwned>(&self, relative: &str) -> Result<T> {
        read_json(&self.required(relative)?)
    }
}

/// `*.safetensors.index.json`: which shard holds each tensor.
#[derive(serde::Deserialize)]
pub(crate) struct ShardIndex {
    pub(crate) weight_map: std::collections::BTreeMap<String, String>,
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| EngineError::BadConfig {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Resolve a source to a local folder, downloading what is missing from the hub.
pub fn resolve(source: &ModelSource, dtype: DType, hub: &HubOptions) -> Result<ModelDir> {
    let prefer_fp16_variant = matches!(dtype, DType::F16 | DType::BF16);
    match source {
        ModelSource::Local(root) => {
            if !root.is_dir() {
                return Err(EngineError::ModelNotFound(format!(
                    "{} is not a folder",
                    root.display()
                )));
            }
            Ok(ModelDir {
                root: root.clone(),
                prefer_fp16_variant,
            })
        }
        ModelSource::Hub { repo, revision } => {
            let root = hub::fetch_pipeline(hub, repo, revision, prefer_fp16_variant)?;
            Ok(ModelDir {
                root,
                prefer_fp16_variant,
            })
        }
    }
}

/// A model name for display and job records: the folder name or the repo id.
pub fn display_name(source: &ModelSource) -> String {
    match source {
        ModelSource::Local(p) => p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string()),
        ModelSource::Hub { repo, .. } => repo.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            ModelSource::parse("runwayml/stable-diffusion-v1-5").unwrap(),
            ModelSource::Hub {
                repo: "runwayml/stable-diffusion-v1-5".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            ModelSource::parse("stabilityai/sd-turbo@abc123").unwrap(),
            ModelSource::Hub {
                repo: "stabilityai/sd-turbo".into(),
                revision: "abc123".into()
            }
        );
        assert!(matches!(ModelSource::parse("."), Ok(ModelSource::Local(_))));
        assert!(ModelSource::parse("./missing/folder").is_err());
        assert!(ModelSource::parse("not a repo").is_err());
        assert!(ModelSource::parse("a/b/c").is_err());
    }
}
