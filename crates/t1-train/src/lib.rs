//! The training loops of T1: [`sft`] (stage 1) and [`rl`] (stage 2), the rollout sampler
//! [`generate`], and what they share ([`common`]: schedule, clipping, metrics, checkpoints).

pub mod checkpoint;
pub mod common;
pub mod config;
pub mod crosscheck;
pub mod generate;
pub mod master;
pub mod parallel;
pub mod plan;
pub mod rl;
pub mod sft;

use t1_model::FusedOps;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use t1_data::{ChatTokenizer, Problem};
use t1_model::Qwen2;

pub use config::{load_config, load_config_text};
pub use generate::{generate, generate_sharded, Rollout, SamplingConfig};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("cannot access {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("bad config ({origin}): {message}")]
    Config { origin: String, message: String },
    #[error(transparent)]
    Model(#[from] t1_model::ModelError),
    #[error(transparent)]
    Data(#[from] t1_data::DataError),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("{steps} steps in a row had a non-finite loss or gradient; stopped. The last good checkpoint in {out_dir} is intact: lower optim.lr or check the data, then --resume")]
    Diverged { steps: usize, out_dir: PathBuf },
}

impl TrainError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }
}

/// Held-out answer accuracy: the fraction of `problems` whose response, decoded with
/// `sampling` (greedy, or sampled from a fixed seed so that checkpoints are compared on the
/// same stream), the grader (the RL reward's own function) marks correct. `batch` rows per
/// generation call, each call cut into `threads` shards.
pub fn eval_accuracy<B: FusedOps>(model: &Qwen2<B>, tokenizer: &ChatTokenizer, problems: &[Problem], sampling: &SamplingConfig, batch: usize, threads: usize) -> f32 {
    if problems.is_empty() {
        return 0.0;
    }
    let grader = t1_reward::GraderConfig::default();
    let cfg = sampling;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut correct = 0usize;
    for chunk in problems.chunks(batch.max(1)) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|p| tokenizer.encode_prompt(&p.prompt)).collect();
        let outs = generate_sharded(model, &prompts, cfg, &[tokenizer.eos_id()], tokenizer.pad_id(), &mut rng, threads);
        for (p, o) in chunk.iter().zip(&outs) {
            let text = tokenizer.decode(&o.tokens);
            if t1_reward::grade(&text, &p.answer, &grader).correct {
                correct += 1;
            }
        }
    }
    correct as f32 / problems.len() as f32
}
