//! The training loops of T1: [`sft`] (stage 1) and [`rl`] (stage 2), the rollout sampler
//! [`generate`], and what they share ([`common`]: schedule, clipping, metrics, checkpoints).

pub mod checkpoint;
pub mod common;
pub mod config;
pub mod crosscheck;
mod error;
pub mod generate;
pub mod lora;
pub mod master;
pub mod parallel;
pub mod plan;
pub mod rl;
pub mod sft;

pub use config::{load_config, load_config_text};
pub use error::TrainError;
pub use generate::{eval_accuracy, generate, generate_rows, generate_sharded, Rollout, SamplingConfig};
