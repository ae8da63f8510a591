//! `t1`: the command line of the T1 trainer (SFT → RL → inference-scaling evaluation).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use t1_backends::{BackendTask, DeviceSpec};

mod model_cmds;

#[derive(Parser)]
#[command(name = "t1", version, about = "Teach language models to reason: SFT on trial-and-error CoT, RL with exploration, inference scaling")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Architecture, parameter count, dtype and tied head of a Hugging Face checkpoint
    Info {
        /// Checkpoint directory (config.json + model.safetensors or shards)
        #[arg(long)]
        model: PathBuf,
    },
    /// One forward pass over a token id sequence; writes its logits as safetensors
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids, e.g. 1,2,3
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<i64>,
        /// Output file: one f32 tensor `logits` of shape [seq_len, vocab_size]
        #[arg(long)]
        out: PathBuf,
        /// flex (CPU), wgpu, wgpu:N, cuda, cuda:N
        #[arg(long, default_value = "flex")]
        device: DeviceSpec,
        /// Compute dtype: f32 or bf16 (flex, cuda)
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { model } => model_cmds::info(&model),
        Command::Logits { model, ids, out, device, dtype } => {
            let dtype = t1_model::WeightDtype::parse(&dtype)
                .with_context(|| format!("unknown --dtype {dtype:?}: use f32 or bf16"))?;
            t1_backends::check_dtype(&device, dtype.burn())?;
            if ids.is_empty() {
                bail!("--ids is empty: give at least one token id");
            }
            dispatch(&device, model_cmds::Logits { model, ids, out, dtype })
        }
    }
}

/// Runs a generic task on the backend `device` names.
pub fn dispatch<T: BackendTask<Output = Result<()>>>(device: &DeviceSpec, task: T) -> Result<()> {
    t1_backends::dispatch(device, task)?
}
