//! The Qwen2 / Qwen2.5 model of t1: its Hugging Face config, the decoder (generic over the
//! burn backend, with a KV cache), the decoding interface the sampler uses, and checkpoint I/O
//! in the Hugging Face layout.
//!
//! **Architecture invariant:** this crate names no concrete backend: the model is generic over
//! [`FusedOps`], burn's backend extended with the model's fused operations (`t1-ops`).

pub mod compare;
mod config;
mod decoding;
pub mod hf;
mod model;

pub use config::Qwen2Config;
pub use decoding::{BurnDecoder, Decoder};
pub use hf::{from_named_tensors, load, save, SaveOptions, WeightDtype};
pub use model::{rope_angles, Inputs, KvCache, LayerInputs, Qwen2, MASKED};
pub use t1_ops::{FusedAutodiff, FusedOps};

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
    #[error("checkpoint {dir} does not match its config.json: {message}; the weights and config.json must come from the same model")]
    Mismatch { dir: PathBuf, message: String },
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }
}
