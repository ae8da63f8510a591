//! `t1`: the command line of the T1 trainer (SFT → RL → inference-scaling evaluation).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use t1_backends::{BackendTask, DeviceSpec};

mod bench;
mod eval_cmds;
mod model_cmds;
mod plan_cmd;
mod report;
mod serve;
mod train_cmds;

#[derive(Parser)]
#[command(name = "t1", version, about = "Teach language models to reason: SFT on trial-and-error CoT, RL with exploration, inference scaling")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// SFT step (forward + backward + AdamW) on random tokens: tokens/s after a warm-up step
    Sft {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Data-parallel shards, one thread each
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// f32 or bf16 (flex, cuda)
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[arg(long, default_value = "flex")]
        device: DeviceSpec,
        /// none, or layer: recompute each decoder layer in the backward pass
        #[arg(long, default_value = "none")]
        activation_checkpointing: String,
        /// Train fresh LoRA adapters of this rank (alpha 2r, every projection) on the frozen
        /// base instead of every weight (0 = full fine-tuning)
        #[arg(long, default_value_t = 0)]
        lora_r: usize,
    },
    /// Decoding with the KV cache at temperature 1: new tokens/s, every sequence N tokens
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Prompt length in tokens
        #[arg(long, default_value_t = 32)]
        prompt: usize,
        /// New tokens per sequence
        #[arg(long, default_value_t = 128)]
        new: usize,
        /// Batch shards decoded on their own threads
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[arg(long, default_value = "flex")]
        device: DeviceSpec,
        /// Decode through LoRA adapters of this rank (random, every projection) on the model
        #[arg(long, default_value_t = 0)]
        lora_r: usize,
        /// With --lora-r: merge the adapters into the weights before decoding (timed)
        #[arg(long)]
        merge: bool,
        /// Decode through burn even where the CPU engine (AVX-512) would run; one thread
        #[arg(long)]
        burn: bool,
    },
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
        /// Checkpoint directory, or a PEFT adapter directory (its base_model_name_or_path is loaded)
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter directory applied on the model
        #[arg(long)]
        adapter: Option<PathBuf>,
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
    /// Sample responses to prompts (chat format); prints one JSON line per prompt
    Generate {
        /// Checkpoint directory, or a PEFT adapter directory (its base_model_name_or_path is loaded)
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter directory applied on the model
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// A user message (repeatable)
        #[arg(long = "prompt", required = true)]
        prompts: Vec<String>,
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// 0 = greedy. Unset: the checkpoint's generation_config.json, as transformers'
        /// generate() (greedy when it has none or do_sample is false)
        #[arg(long)]
        temperature: Option<f32>,
        /// Unset: from generation_config.json (1.0 when greedy)
        #[arg(long)]
        top_p: Option<f32>,
        /// 0 = off. Unset: from generation_config.json
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Extra chat-template variables as a JSON object, e.g. '{"enable_thinking": false}'
        #[arg(long)]
        template_kwargs: Option<String>,
        #[arg(long, default_value = "flex")]
        device: DeviceSpec,
    },
    /// Datasets: `t1 data synth` writes the laptop task
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Stage 1: supervised fine-tuning on trial-and-error chain-of-thought
    Sft(TrainArgs),
    /// Stage 2: reinforcement learning with oversampling, entropy bonus and a dynamic KL anchor
    Rl(TrainArgs),
    /// Memory per device of an SFT or RL config: weights, master, gradients, optimiser, anchor,
    /// activations, logits, rollout KV cache, and whether it fits
    Plan {
        /// Which stage the config is for
        #[arg(value_enum)]
        stage: plan_cmd::Stage,
        #[arg(long)]
        config: PathBuf,
        #[arg(long = "set")]
        sets: Vec<String>,
        /// The device whose memory the plan is checked against: flex (MemAvailable), cuda:N (the driver's free memory)
        #[arg(long, default_value = "flex")]
        device: DeviceSpec,
        /// Plan for this much memory instead (a GPU that is not here), e.g. 80GB
        #[arg(long)]
        memory: Option<String>,
        /// The architecture when the checkpoint is not on this machine: qwen2.5-0.5b, -1.5b, -3b, -7b, -14b, -32b
        #[arg(long)]
        arch: Option<String>,
        /// RL: the longest prompt in tokens (default: read from data.train)
        #[arg(long)]
        prompt_tokens: Option<usize>,
        /// One JSON object instead of the table
        #[arg(long)]
        json: bool,
    },
    /// Stage 3: accuracy vs thinking budget (forced answer when the budget runs out)
    Eval {
        /// One or more checkpoint directories (each with tokenizer.json), or PEFT adapter
        /// directories (their base_model_name_or_path is loaded); one curve each
        #[arg(long, required = true)]
        model: Vec<PathBuf>,
        /// A PEFT LoRA adapter directory applied on every --model
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Problems JSONL ({"prompt", "answer"})
        #[arg(long)]
        data: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256")]
        budgets: Vec<usize>,
        /// Samples per problem (> 1 adds pass@n and majority vote)
        #[arg(long, default_value_t = 1)]
        samples: usize,
        /// 0 = greedy. Unset: the checkpoint's generation_config.json (greedy when it has none
        /// or do_sample is false)
        #[arg(long)]
        temperature: Option<f32>,
        /// Appended when the budget runs out, before the short forced answer
        #[arg(long)]
        cue: Option<String>,
        /// Use only the first N problems (0 = all)
        #[arg(long, default_value_t = 0)]
        limit: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Threads each generation batch is split over (CPU: the number of cores; GPU: 1)
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Output directory for eval.json, eval.csv and accuracy_vs_budget.svg
        #[arg(long, default_value = "out/eval")]
        out: PathBuf,
        /// Extra chat-template variables as a JSON object, e.g. '{"enable_thinking": false}'
        #[arg(long)]
        template_kwargs: Option<String>,
        #[arg(long, default_value = "flex")]
        device: DeviceSpec,
    },
    /// Merge a PEFT LoRA adapter into its base: writes a Hugging Face checkpoint transformers loads
    Merge {
        /// The base checkpoint directory
        #[arg(long)]
        model: PathBuf,
        /// The PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
        #[arg(long)]
        adapter: PathBuf,
        /// Output directory (must not hold a checkpoint already)
        #[arg(long)]
        out: PathBuf,
        /// dtype of the merged weights (default: the base's)
        #[arg(long)]
        dtype: Option<String>,
    },
    /// Throughput of the training step or of decoding on a checkpoint (one JSON line)
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// The whole recipe on the laptop task: data, SFT, RL, eval, report
    Demo {
        #[arg(long, default_value = "out/demo")]
        out: PathBuf,
        /// A few-minute run that exercises every stage (for CI)
        #[arg(long)]
        quick: bool,
        /// RL runs from the same SFT model, one per seed: the report gives their mean and
        /// standard error
        #[arg(long, default_value_t = 3)]
        seeds: usize,
        #[arg(long, default_value = "flex")]
        device: DeviceSpec,
    },
    /// Check that devices agree: logits, log-probs, losses, gradients and an AdamW step
    Crosscheck {
        /// Devices to compare, the first is the reference, e.g. flex,wgpu
        #[arg(long, value_delimiter = ',', default_value = "flex,wgpu")]
        devices: Vec<DeviceSpec>,
        /// Your checkpoint (default: a random tiny Qwen2)
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 3)]
        batch: usize,
        #[arg(long, default_value_t = 12)]
        len: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// One row per parameter instead of the worst one
        #[arg(long)]
        verbose: bool,
    },
    /// Grade responses: each line {"response", "answer"} gives {"correct", "extracted"}
    Grade {
        #[arg(long)]
        input: PathBuf,
        /// Output JSONL (stdout when absent)
        #[arg(long)]
        output: Option<PathBuf>,
        /// Regex with one group, used when a response has no \boxed{}
        #[arg(long)]
        answer_pattern: Option<String>,
    },
    /// Serve the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models, /health) and
    /// SGLang's /update_weights_from_disk; stops cleanly on Ctrl-C or SIGTERM
    Serve {
        /// Checkpoint directory, or a PEFT adapter directory (its base_model_name_or_path is loaded)
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter directory applied on the model
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// 0 picks a free port (printed on the first line of stdout)
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// The model name clients send (default: --model as given)
        #[arg(long)]
        served_model_name: Option<String>,
        /// Threads each decoding step is split between (CPU engine)
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Most rows (prompts x n) decoded together in one batch; a request asking for more is refused
        #[arg(long, default_value_t = 64)]
        max_batch_rows: usize,
        /// Seeds the sampling of requests that give no seed
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Extra chat-template variables as a JSON object, e.g. '{"enable_thinking": false}'
        #[arg(long)]
        template_kwargs: Option<String>,
        #[arg(long, default_value = "flex")]
        device: DeviceSpec,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Generate the laptop task (problems with trial-and-error solutions) and its tokenizer
    Synth {
        /// Output directory
        #[arg(long)]
        out: PathBuf,
        /// TOML with [task], [splits], vocab_size, seed (all optional)
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a setting, e.g. --set task.max_operands=3
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// Conversations through a tokenizer's own chat template: one
    /// {"input_ids": [...], "loss_mask": [...]} line per conversation, as SFT trains on them
    Tokenize {
        /// Tokenizer directory (tokenizer.json, tokenizer_config.json, chat_template.jinja) or
        /// its tokenizer.json
        #[arg(long)]
        tokenizer: PathBuf,
        /// SFT JSONL ({"messages": [...]} or {"prompt", "response"})
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Print the first N rendered conversations with the trained spans between « and »
        #[arg(long, default_value_t = 0)]
        show: usize,
        /// Extra template variables as a JSON object, e.g. '{"enable_thinking": false}'
        #[arg(long)]
        template_kwargs: Option<String>,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
    /// TOML run config (see configs/)
    #[arg(long)]
    config: PathBuf,
    /// Override a setting, e.g. --set optim.lr=1e-4 (repeatable)
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Continue from the newest complete checkpoint in out_dir
    #[arg(long)]
    resume: bool,
    /// flex (CPU), wgpu, wgpu:N, cuda, cuda:N
    #[arg(long, default_value = "flex")]
    device: DeviceSpec,
    /// Start even when the memory plan says the run does not fit the device
    #[arg(long)]
    no_memory_check: bool,
}

fn main() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    keep_freed_memory();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A training step frees and allocates the same few hundred MiB of activations every step.
/// glibc's defaults give much of it back to the kernel (munmap, heap trimming) and fault it in
/// again on the next step: page faults and TLB shootdowns took ~10% of an SFT step on 2 cores.
/// Keep freed memory in the heap instead; peak RSS stays the same (the memory is reused), and
/// `t1 bench sft` ran 8% faster (BENCHMARKS.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator tunables; called first thing, before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's largest: only bigger blocks get their own mapping
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20); // grow heaps (also the threads' arenas) in 64 MiB steps
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { model } => model_cmds::info(&model),
        Command::Logits { model, adapter, ids, out, device, dtype } => {
            let dtype = t1_model::WeightDtype::parse(&dtype)
                .with_context(|| format!("unknown --dtype {dtype:?}: use f32 or bf16"))?;
            t1_backends::check_dtype(&device, dtype.burn())?;
            if ids.is_empty() {
                bail!("--ids is empty: give at least one token id");
            }
            dispatch(&device, model_cmds::Logits { model, adapter, ids, out, dtype })
        }
        Command::Generate { model, adapter, prompts, max_new_tokens, temperature, top_p, top_k, seed, template_kwargs, device } => {
            let sampling = model_cmds::SamplingArgs { temperature, top_p, top_k, max_new_tokens };
            dispatch(&device, model_cmds::Generate { model, adapter, prompts, sampling, seed, template_kwargs })
        }
        Command::Data { command: DataCommand::Synth { out, config, sets } } => train_cmds::synth(&out, config.as_deref(), &sets),
        Command::Data { command: DataCommand::Tokenize { tokenizer, input, output, show, template_kwargs } } => {
            train_cmds::tokenize(&tokenizer, &input, &output, show, template_kwargs.as_deref())
        }
        Command::Sft(a) => {
            let (config, resolved) = t1_train::load_config::<t1_train::sft::SftConfig>(Some(&a.config), &a.sets)?;
            config.validate()?;
            check_dtype(&a.device, &config.model.dtype)?;
            if !a.no_memory_check {
                plan_cmd::check_before_run(plan_cmd::Stage::Sft, &a.config, &a.sets, &a.device)?;
            }
            dispatch(&a.device, train_cmds::Sft { config, resolved, resume: a.resume })
        }
        Command::Rl(a) => {
            let (config, resolved) = t1_train::load_config::<t1_train::rl::RlConfig>(Some(&a.config), &a.sets)?;
            config.validate()?;
            check_dtype(&a.device, &config.model.dtype)?;
            if !a.no_memory_check {
                plan_cmd::check_before_run(plan_cmd::Stage::Rl, &a.config, &a.sets, &a.device)?;
            }
            dispatch(&a.device, train_cmds::Rl { config, resolved, resume: a.resume })
        }
        Command::Plan { stage, config, sets, device, memory, arch, prompt_tokens, json } => {
            plan_cmd::run(plan_cmd::PlanArgs { stage, config, sets, device, memory, arch, prompt_tokens, json })
        }
        Command::Eval { model, adapter, data, budgets, samples, temperature, cue, limit, seed, threads, out, template_kwargs, device } => {
            let mut config = t1_eval::EvalConfig { budgets, samples: samples.max(1), seed, threads: threads.max(1), ..Default::default() };
            config.budgets.sort_unstable();
            if let Some(cue) = cue {
                config.forced_answer_cue = cue;
            }
            t1_backends::dispatch(&device, eval_cmds::Eval { models: model, adapter, data, config, temperature, limit, out, template_kwargs })??;
            Ok(())
        }
        Command::Bench { command: BenchCommand::Sft { model, batch, seq, steps, threads, dtype, device, activation_checkpointing, lora_r } } => {
            check_dtype(&device, &dtype)?;
            let dtype = t1_model::WeightDtype::parse(&dtype).context("dtype")?;
            anyhow::ensure!(batch > 0 && seq > 0 && steps > 0 && threads > 0, "--batch, --seq, --steps and --threads must be > 0");
            let checkpointing = match activation_checkpointing.as_str() {
                "none" => t1_train::checkpoint::ActivationCheckpointing::None,
                "layer" => t1_train::checkpoint::ActivationCheckpointing::Layer,
                other => bail!("--activation-checkpointing {other:?}: use none or layer"),
            };
            dispatch(&device, bench::BenchSft { model, batch, seq, steps, threads, dtype, checkpointing, lora_r })
        }
        Command::Bench { command: BenchCommand::Generate { model, batch, prompt, new, threads, dtype, device, lora_r, merge, burn } } => {
            check_dtype(&device, &dtype)?;
            let dtype = t1_model::WeightDtype::parse(&dtype).context("dtype")?;
            anyhow::ensure!(batch > 0 && prompt > 0 && new > 0 && threads > 0, "--batch, --prompt, --new and --threads must be > 0");
            anyhow::ensure!(!merge || lora_r > 0, "--merge needs --lora-r");
            anyhow::ensure!(!burn || threads == 1, "--burn decodes on one thread: drop --threads");
            dispatch(&device, bench::BenchGenerate { model, batch, prompt, new, threads, dtype, lora_r, merge, burn })
        }
        Command::Merge { model, adapter, out, dtype } => model_cmds::merge(&model, &adapter, &out, dtype.as_deref()),
        Command::Demo { out, quick, seeds, device } => eval_cmds::demo(&out, quick, seeds, &device),
        Command::Crosscheck { devices, model, batch, len, seed, verbose } => model_cmds::crosscheck(&devices, model.as_deref(), batch, len, seed, verbose),
        Command::Grade { input, output, answer_pattern } => train_cmds::grade(&input, output.as_ref(), answer_pattern),
        Command::Serve { model, adapter, host, port, served_model_name, threads, max_batch_rows, seed, template_kwargs, device } => {
            anyhow::ensure!(max_batch_rows > 0, "--max-batch-rows must be > 0");
            dispatch(&device, serve::Serve { model, adapter, host, port, served_model_name, threads, max_batch_rows, seed, template_kwargs })
        }
    }
}

fn check_dtype(device: &DeviceSpec, dtype: &str) -> Result<()> {
    let d = t1_model::WeightDtype::parse(dtype).with_context(|| format!("unknown dtype {dtype:?}: use f32 or bf16"))?;
    Ok(t1_backends::check_dtype(device, d.burn())?)
}

/// Runs a generic task on the backend `device` names.
pub fn dispatch<T: BackendTask<Output = Result<()>>>(device: &DeviceSpec, task: T) -> Result<()> {
    t1_backends::dispatch(device, task)?
}
