//! The engine's one error type. The HTTP layer maps these to status codes in one place; the CLI
//! prints them. Every variant names what the user must fix (file, tensor, parameter).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model not found: {0}")]
    ModelNotFound(String),
    #[error("model file missing: {path}")]
    MissingFile { path: PathBuf },
    #[error("bad config {path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("bad weights in {path}: tensor `{tensor}`: {reason}")]
    Weights {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("download of {file} from {repo} failed: {reason}")]
    Download {
        repo: String,
        file: String,
        reason: String,
    },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid parameter `{param}`: {message}")]
    InvalidParameter {
        param: &'static str,
        message: String,
    },
    /// Valid values that cannot be combined (e.g. a schedule a sampler does not support).
    #[error("unsupported combination for `{param}`: {message}")]
    Incompatible {
        param: &'static str,
        message: String,
    },
    /// A bug surfaced while generating (a caught panic); the job fails, the engine keeps running.
    #[error("internal error: {0}")]
    Internal(String),
    #[error("generation cancelled")]
    Cancelled,
    #[error("the job exceeded its time limit of {seconds} s")]
    Timeout { seconds: u64 },
    /// The device ran out of memory (after unloading other models and retrying smaller).
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("compute error: {0}")]
    Compute(#[from] candle_core::Error),
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    /// Whether this is the device running out of memory (candle reports CUDA/Metal OOM as a
    /// backend message).
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            Self::OutOfMemory(_) => true,
            Self::Compute(e) => {
                let text = e.to_string().to_lowercase();
                text.contains("out of memory") || text.contains("cuda_error_out_of_memory")
            }
            _ => false,
        }
    }

    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidParameter {
            param,
            message: message.into(),
        }
    }
}
