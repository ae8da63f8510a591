//! The error type of model loading and saving.

use std::path::{Path, PathBuf};

/// Errors of model loading and saving; each says which file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot access {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("invalid model config {path}: {message}; fix config.json or use the checkpoint's original one")]
    Config { path: PathBuf, message: String },
    #[error("no weights in {dir}: expected model.safetensors or model.safetensors.index.json (a Hugging Face checkpoint directory)")]
    NoWeights { dir: PathBuf },
    #[error("corrupt checkpoint file {path}: {message}; re-save or re-download it")]
    Corrupt { path: PathBuf, message: String },
    #[error("LoRA adapter {dir}: {message}")]
    Adapter { dir: PathBuf, message: String },
    #[error("checkpoint {dir} does not match its config.json: {message}; the weights and config.json must come from the same model")]
    Mismatch { dir: PathBuf, message: String },
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }
}
