//! The Qwen2 / Qwen2.5 model of t1: its Hugging Face config, the decoder (generic over the
//! burn backend, with a KV cache), the decoding interface the sampler uses, and checkpoint I/O
//! in the Hugging Face layout.
//!
//! **Architecture invariant:** this crate names no concrete backend: the model is generic over
//! [`FusedOps`], burn's backend extended with the model's fused operations (`t1-ops`).

pub mod compare;
mod config;
mod decoding;
mod error;
pub mod hf;
pub mod lora;
mod model;

pub use config::{GenerationConfig, Qwen2Config, GENERATION_CONFIG_FILE};
pub use decoding::{BurnDecoder, Decoder};
pub use error::ModelError;
pub use hf::{from_named_tensors, load, save, SaveOptions, WeightDtype};
pub use lora::{load_adapter, read_adapter, read_adapter_config, save_adapter, Lora, LoraConfig};
pub use model::{rope_angles, Inputs, KvCache, LayerInputs, Qwen2, MASKED};
pub use t1_ops::{FusedAutodiff, FusedOps};
