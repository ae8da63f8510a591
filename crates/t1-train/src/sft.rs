//! Stage 1 of T1: supervised fine-tuning on trial-and-error chain-of-thought.
//!
//! The loop: shuffled epochs of right-padded batches → next-token NLL on assistant tokens only
//! → gradient accumulation → global-norm clipping → AdamW with warmup + cosine → periodic
//! held-out loss and answer accuracy → checkpoints that `--resume` continues exactly.

use t1_model::{FusedAutodiff, FusedOps};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use t1_algo::{masked_mean, token_logprobs};
use t1_data::{pad_batch, ChatTokenizer, OnBadLine, Problem, SftBatch, TokenizedExample};
use t1_model::{Inputs, LoraConfig, Qwen2, WeightDtype};

use crate::checkpoint::ActivationCheckpointing;
use crate::common::{self, lr_at, scalar, Metrics, ModelSource, OptimConfig, TrainerState};
use crate::error::TrainError;
use crate::generate::{eval_accuracy, SamplingConfig};

/// `t1 sft` settings. Every field has a default; unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Checkpoints, metrics.jsonl and the final model (`final/`) go here.
    pub out_dir: PathBuf,
    pub model: ModelSource,
    pub data: SftData,
    pub optim: OptimConfig,
    pub train: SftTrain,
    /// LoRA (`[lora]`): train f32 adapters on a frozen base instead of every weight.
    pub lora: Option<LoraConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftData {
    /// SFT data (JSONL, a JSON array, or Parquet): {"messages": [...]} or {"prompt": ..., "response": ...} per row.
    pub train: PathBuf,
    /// Held-out SFT JSONL for the eval loss (optional).
    pub eval: PathBuf,
    /// Held-out problems JSONL ({"prompt", "answer"}) for greedy answer accuracy (optional).
    pub eval_problems: PathBuf,
    /// tokenizer.json; empty = the one in `model.checkpoint`.
    pub tokenizer: PathBuf,
    /// Longer examples are truncated to this many tokens.
    pub max_len: usize,
    /// Skip and count malformed JSONL lines instead of failing.
    pub skip_bad_lines: bool,
    /// Extra chat template variables (transformers' `apply_chat_template(**kwargs)`, verl's
    /// `data.apply_chat_template_kwargs`), e.g. `{ enable_thinking = false }`.
    pub chat_template_kwargs: serde_json::Map<String, serde_json::Value>,
    /// Column names of the datasets (JSONL, JSON arrays or Parquet), as verl's
    /// `data.prompt_key`; empty = t1's defaults: `messages`, else `prompt` + `response`;
    /// problems `prompt`/`problem` + `answer` (else the last `\boxed{}` of `solution`).
    pub messages_key: String,
    pub prompt_key: String,
    pub response_key: String,
    pub answer_key: String,
    /// Pack training examples into rows of `max_len` tokens (best-fit decreasing, as TRL's
    /// `packing = true`): each example keeps its own positions and attends only to itself, so
    /// the loss equals the unpacked one; `train.batch_size` then counts packed rows.
    pub packing: bool,
}

impl SftData {
    /// The column mapping of [`t1_data::read_sft_with`].
    pub fn columns(&self) -> t1_data::Columns {
        t1_data::Columns { prompt_key: self.prompt_key.clone(), answer_key: self.answer_key.clone(), messages_key: self.messages_key.clone(), response_key: self.response_key.clone() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftTrain {
    pub epochs: usize,
    /// Stop after this many optimiser steps (0 = run all epochs).
    pub max_steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step. The loss is the mean over all loss tokens of the
    /// step (token-weighted across micro-batches, as transformers' Trainer does).
    pub grad_accum: usize,
    /// Data-parallel shards of each micro-batch, each run on its own thread (CPU: the number
    /// of cores; GPU: 1). Gradients equal the unsharded ones up to float rounding.
    pub threads: usize,
    pub seed: u64,
    /// Evaluate (held-out loss and accuracy) every N steps and at the end (0 = only at the end).
    pub eval_every: usize,
    /// Problems used for held-out accuracy (greedy decoding).
    pub eval_problems: usize,
    /// Tokens generated per held-out problem.
    pub eval_max_new_tokens: usize,
    /// Save a checkpoint every N steps and at the end (0 = only at the end).
    pub save_every: usize,
    /// Checkpoints kept (newest first).
    pub keep_checkpoints: usize,
    /// Stop after this many consecutive steps with a non-finite loss or gradient.
    pub max_bad_steps: usize,
    /// "none", or "layer": each decoder layer is recomputed in the backward pass from its
    /// input, so one layer's activations are alive at a time (about a third more compute).
    pub activation_checkpointing: ActivationCheckpointing,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            out_dir: "out/sft".into(),
            model: ModelSource::default(),
            data: SftData::default(),
            optim: OptimConfig::default(),
            train: SftTrain::default(),
            lora: None,
        }
    }
}

impl Default for SftData {
    fn default() -> Self {
        Self {
            train: PathBuf::new(),
            eval: PathBuf::new(),
            eval_problems: PathBuf::new(),
            tokenizer: PathBuf::new(),
            max_len: 512,
            skip_bad_lines: false,
            chat_template_kwargs: Default::default(),
            messages_key: String::new(),
            prompt_key: String::new(),
            response_key: String::new(),
            answer_key: String::new(),
            packing: false,
        }
    }
}

impl Default for SftTrain {
    fn default() -> Self {
        Self {
            epochs: 3,
            max_steps: 0,
            batch_size: 8,
            grad_accum: 1,
            threads: 1,
            seed: 0,
            eval_every: 0,
            eval_problems: 64,
            eval_max_new_tokens: 256,
            save_every: 0,
            keep_checkpoints: 2,
            max_bad_steps: 5,
            activation_checkpointing: ActivationCheckpointing::None,
        }
    }
}

impl SftConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: &str| Err(TrainError::Config { origin: "sft config".into(), message: m.into() });
        if self.data.train.as_os_str().is_empty() {
            return bad("data.train is empty: give an SFT JSONL file");
        }
        if self.train.batch_size == 0 || self.train.grad_accum == 0 || self.train.threads == 0 {
            return bad("train.batch_size, train.grad_accum and train.threads must be > 0");
        }
        if !(self.optim.lr > 0.0) {
            return bad("optim.lr must be > 0");
        }
        if self.data.max_len < 2 {
            return bad("data.max_len must be >= 2");
        }
        let Some(dtype) = WeightDtype::parse(&self.model.dtype) else {
            return bad("model.dtype must be f32 or bf16");
        };
        let lora = self.lora.is_some() || !self.model.adapter.as_os_str().is_empty();
        crate::master::uses_master_weights(&self.optim, dtype, lora)?;
        crate::lora::validate(self.lora.as_ref(), &self.model, self.train.activation_checkpointing)?;
        Ok(())
    }
}

/// What a finished SFT run reports.
#[derive(Debug, Clone, Serialize)]
pub struct SftSummary {
    pub steps: usize,
    pub final_train_loss: f32,
    pub eval_loss: Option<f32>,
    pub eval_accuracy: Option<f32>,
    pub tokens_per_s: f32,
    pub wall_s: f32,
    pub final_dir: PathBuf,
}

/// Tokenizes SFT examples (loss on assistant tokens), truncated to `max_len`. An example the
/// chat template refuses, or whose prompt leaves no answer token within `max_len`, is an error
/// naming its line (skipped and counted with `skip`).
pub fn tokenize_sft(tokenizer: &ChatTokenizer, path: &Path, max_len: usize, skip: bool, columns: &t1_data::Columns) -> Result<(Vec<TokenizedExample>, usize), TrainError> {
    let on_bad = if skip { OnBadLine::Skip } else { OnBadLine::Error };
    let loaded = t1_data::read_sft_with(path, on_bad, columns)?;
    let mut skipped = loaded.skipped;
    let mut examples = Vec::with_capacity(loaded.items.len());
    for (ex, line) in loaded.items.iter().zip(&loaded.lines) {
        let (mut ids, mut loss_mask) = match tokenizer.encode_chat(&ex.messages, false) {
            Ok(enc) => enc,
            // a row the template refuses (its raise_exception, an unfindable turn)
            Err(_) if skip => {
                skipped += 1;
                continue;
            }
            Err(e) => return Err(TrainError::Config { origin: format!("{}:{line}", path.display()), message: e.to_string() }),
        };
        let prompt = loss_mask.iter().position(|&m| m).unwrap_or(loss_mask.len());
        ids.truncate(max_len);
        loss_mask.truncate(max_len);
        // position 0 is never a target
        if !loss_mask.iter().skip(1).any(|&m| m) {
            if skip {
                skipped += 1;
                continue;
            }
            return Err(TrainError::Config {
                origin: format!("{}:{line}", path.display()),
                message: format!(
                    "the prompt has {prompt} tokens, so no answer token fits in data.max_len = {max_len}: raise data.max_len (up to the model's context), shorten the example, or set data.skip_bad_lines = true to skip such examples"
                ),
            });
        }
        examples.push(TokenizedExample { ids, loss_mask });
    }
    if examples.is_empty() {
        return Err(t1_data::DataError::Empty { path: path.to_path_buf() }.into());
    }
    Ok((examples, skipped))
}

/// Tensors of a padded batch: model inputs, targets `[B, T]` and the loss mask `[B, T]`.
pub fn batch_tensors<B: FusedOps>(batch: &SftBatch, device: &B::Device) -> (Inputs, Tensor<B, 2, Int>, Tensor<B, 2>) {
    let (b, t) = (batch.batch, batch.len);
    let inputs = match &batch.segments {
        Some(segments) => Inputs::packed(b, t, batch.ids.clone(), segments.clone()),
        None => Inputs::new(b, t, batch.ids.clone(), batch.attention.clone()),
    };
    let targets = Tensor::from_data(TensorData::new(batch.targets.clone(), [b, t]), device);
    let mask: Vec<f32> = batch.target_mask.iter().map(|&m| m as u8 as f32).collect();
    let mask = Tensor::from_data(TensorData::new(mask, [b, t]), device);
    (inputs, targets, mask)
}

/// Mean next-token NLL over the loss tokens of a batch. Returns `[1]`.
pub fn sft_loss<B: FusedOps>(model: &Qwen2<B>, batch: &SftBatch) -> Tensor<B, 1> {
    let device = model.device();
    let (inputs, targets, mask) = batch_tensors::<B>(batch, &device);
    let logits = model.forward(&inputs, None);
    masked_mean(token_logprobs(logits.cast(burn::tensor::DType::F32), targets).neg(), mask)
}

/// Summed next-token NLL over the loss tokens of a batch (divide by the step's loss-token
/// count for the mean). Returns `[1]`.
pub fn sft_nll_sum<B: FusedOps>(model: &Qwen2<B>, batch: &SftBatch) -> Tensor<B, 1> {
    let device = model.device();
    let (inputs, targets, mask) = batch_tensors::<B>(batch, &device);
    nll_sum_of_logits(model.forward(&inputs, None), targets, mask)
}

/// Summed NLL of `targets` under `logits`, over the positions `mask` marks.
fn nll_sum_of_logits<B: FusedOps>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    (token_logprobs(logits.cast(burn::tensor::DType::F32), targets).neg() * mask).sum()
}

/// Gradients of a batch's summed NLL divided by `loss_tokens`, and that value.
pub fn batch_grads<B: FusedAutodiff>(model: &Qwen2<B>, batch: &SftBatch, loss_tokens: f32, mode: ActivationCheckpointing) -> (GradientsParams, f32) {
    let (inputs, targets, mask) = batch_tensors::<B>(batch, &model.device());
    let (grads, value, ()) = crate::checkpoint::loss_grads(model, &inputs, mode, |logits| (nll_sum_of_logits(logits, targets, mask).div_scalar(loss_tokens), ()));
    (grads, value)
}

/// Gradients and value of one SFT step's loss, the mean NLL over every loss token of the step:
/// `micro[i][j]` is shard `j` (its own thread) of micro-batch `i`. Each shard's summed NLL is
/// divided by the whole step's loss-token count, so the shards and micro-batches add up to
/// the gradient of the unsplit batch's mean, up to float summation order.
pub fn step_grads<B: FusedAutodiff>(model: &Qwen2<B>, micro: Vec<Vec<SftBatch>>, mode: ActivationCheckpointing) -> (GradientsParams, f32) {
    let loss_tokens = micro.iter().flatten().map(|b| b.target_mask.iter().filter(|&&m| m).count()).sum::<usize>().max(1) as f32;
    let mut accum = GradientsAccumulator::<Qwen2<B>>::new();
    let mut step_loss = 0.0f32;
    for shards in micro {
        let (grads, loss, _) = crate::parallel::sharded_grads(model, shards, |m, b| {
            let (g, v) = batch_grads(m, &b, loss_tokens, mode);
            (g, v, ())
        });
        step_loss += loss;
        accum.accumulate(model, grads);
    }
    (accum.grads(), step_loss)
}

/// Runs SFT (or continues it with `resume`) and returns its summary.
pub fn run_sft<B: FusedAutodiff>(cfg: &SftConfig, resolved: &str, resume: bool, device: &B::Device) -> Result<SftSummary, TrainError> {
    cfg.validate()?;
    let t = &cfg.train;
    B::seed(device, t.seed);
    let lora = crate::lora::run_lora(&cfg.model, cfg.lora.as_ref())?;
    // the resolved settings: a continued adapter brings its own dropout
    crate::lora::validate(lora.as_ref(), &cfg.model, cfg.train.activation_checkpointing)?;
    let (model_config, mut model, tokenizer, mut optim) = crate::master::init_trainable::<B>(&cfg.model, &cfg.optim, lora.as_ref(), &cfg.data.tokenizer, device)?;
    let tokenizer = tokenizer.with_template_kwargs(cfg.data.chat_template_kwargs.clone());
    if cfg.data.max_len > model_config.max_position_embeddings {
        return Err(TrainError::Config {
            origin: "data.max_len".into(),
            message: format!(
                "{} exceeds the model's context of {} tokens (max_position_embeddings): lower data.max_len",
                cfg.data.max_len, model_config.max_position_embeddings
            ),
        });
    }
    let (train, skipped) = tokenize_sft(&tokenizer, &cfg.data.train, cfg.data.max_len, cfg.data.skip_bad_lines, &cfg.data.columns())?;
    if skipped > 0 {
        eprintln!("skipped {skipped} malformed lines of {}", cfg.data.train.display());
    }
    let eval = if cfg.data.eval.as_os_str().is_empty() {
        vec![]
    } else {
        tokenize_sft(&tokenizer, &cfg.data.eval, cfg.data.max_len, cfg.data.skip_bad_lines, &cfg.data.columns())?.0
    };
    let problems: Vec<Problem> = if cfg.data.eval_problems.as_os_str().is_empty() {
        vec![]
    } else {
        let on_bad = if cfg.data.skip_bad_lines { OnBadLine::Skip } else { OnBadLine::Error };
        t1_data::read_problems_with(&cfg.data.eval_problems, on_bad, &cfg.data.columns())?.items.into_iter().take(t.eval_problems).collect()
    };

    // the rows of a batch: one example each, or examples packed into data.max_len tokens
    let rows: Vec<Vec<usize>> = if cfg.data.packing {
        t1_data::pack(&train.iter().map(|e| e.ids.len()).collect::<Vec<_>>(), cfg.data.max_len)
    } else {
        (0..train.len()).map(|i| vec![i]).collect()
    };
    let per_step = t.batch_size * t.grad_accum;
    let steps_per_epoch = rows.len().div_ceil(per_step);
    let total = if t.max_steps > 0 { t.max_steps } else { steps_per_epoch * t.epochs };
    let mut state = TrainerState { rng_seed: t.seed, ..Default::default() };
    if resume {
        match common::list_checkpoints(&cfg.out_dir).last() {
            Some(dir) => {
                model = crate::master::resume_weights(dir, &cfg.model, &mut optim, &model, device)?;
                (optim, state) = common::load_resume_state(dir, optim, device)?;
                eprintln!("resuming from {} at step {}", dir.display(), state.step);
            }
            None => eprintln!("--resume: no checkpoint in {}, starting from scratch", cfg.out_dir.display()),
        }
    }
    // every input was read and checked: only now is anything written
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| TrainError::io(&cfg.out_dir, e))?;
    let mut metrics = Metrics::open(&cfg.out_dir.join("metrics.jsonl"), resume)?;
    let trainable = model.lora.as_ref().map_or(model_config.num_parameters(), |l| l.num_params());
    metrics.log(&json!({"event": "start", "params": model_config.num_parameters(), "trainable_params": trainable, "train_examples": train.len(), "train_rows": rows.len(), "steps": total, "resumed_at": state.step}));

    let bar = common::progress(total, state.step, "sft");
    let started = Instant::now();
    let (mut tokens_seen, mut last_loss, mut bad_in_row) = (0usize, f32::NAN, 0usize);
    let mut order = epoch_order(rows.len(), t.seed, state.epoch);
    let (mut eval_loss, mut eval_acc) = (None, None);
    while state.step < total {
        let lr = lr_at(state.step, total, cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.min_lr_ratio);
        // grad_accum micro-batches, each cut into `threads` shards; the loss is the mean NLL
        // over all loss tokens of the step, so shards and micro-batches add up exactly
        let mut micro = Vec::with_capacity(t.grad_accum);
        for _ in 0..t.grad_accum {
            if state.cursor >= order.len() {
                state.epoch += 1;
                state.cursor = 0;
                order = epoch_order(rows.len(), t.seed, state.epoch);
            }
            let idx = &order[state.cursor..(state.cursor + t.batch_size).min(order.len())];
            state.cursor += idx.len();
            let shards: Vec<SftBatch> = crate::parallel::split_even(idx.len(), t.threads)
                .into_iter()
                .map(|r| {
                    let chosen: Vec<Vec<&TokenizedExample>> = idx[r].iter().map(|&i| rows[i].iter().map(|&e| &train[e]).collect()).collect();
                    if cfg.data.packing {
                        t1_data::pad_packed(&chosen, tokenizer.pad_id())
                    } else {
                        pad_batch(&chosen.iter().map(|row| row[0]).collect::<Vec<_>>(), tokenizer.pad_id())
                    }
                })
                .collect();
            micro.push(shards);
        }
        tokens_seen += micro.iter().flatten().map(|b| b.attention.iter().filter(|&&a| a).count()).sum::<usize>();
        crate::lora::seed_dropout::<B>(&model, device, t.seed, state.step);
        let (grads, step_loss) = step_grads(&model, micro, t.activation_checkpointing);
        let (grads, norm) = common::clip_global_norm(&model, grads, cfg.optim.grad_clip);
        if !step_loss.is_finite() || !norm.is_finite() {
            state.skipped_steps += 1;
            bad_in_row += 1;
            metrics.log(&json!({"event": "skipped_step", "step": state.step, "loss": step_loss.to_string(), "grad_norm": norm.to_string()}));
            if bad_in_row >= t.max_bad_steps {
                return Err(TrainError::Diverged { steps: bad_in_row, out_dir: cfg.out_dir.clone() });
            }
            continue;
        }
        bad_in_row = 0;
        model = optim.step(lr, model, grads);
        state.step += 1;
        last_loss = step_loss;
        let tok_s = tokens_seen as f32 / started.elapsed().as_secs_f32();
        bar.set_position(state.step as u64);
        bar.set_message(format!("loss {step_loss:.4} lr {lr:.2e} {tok_s:.0} tok/s"));
        let mut record = json!({"step": state.step, "epoch": state.epoch, "loss": step_loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tok_s, "elapsed_s": started.elapsed().as_secs_f32()});
        let last = state.step == total;
        if last || (t.eval_every > 0 && state.step % t.eval_every == 0) {
            let inner = model.valid();
            if !eval.is_empty() {
                let l = eval_loss_of(&inner, &eval, t.batch_size, tokenizer.pad_id());
                eval_loss = Some(l);
                record["eval_loss"] = json!(l);
            }
            if !problems.is_empty() {
                let stop = crate::generate::stop_ids(&model_config, &tokenizer);
                let acc = eval_accuracy(&inner, &tokenizer, &problems, &SamplingConfig::greedy(t.eval_max_new_tokens), &stop, 64, t.threads)?;
                eval_acc = Some(acc);
                record["eval_accuracy"] = json!(acc);
            }
            bar.println(format!("step {} loss {step_loss:.4} eval_loss {:?} eval_accuracy {:?}", state.step, eval_loss, eval_acc));
        }
        metrics.log(&record);
        if last || (t.save_every > 0 && state.step % t.save_every == 0) {
            let master = optim.master();
            let extra: Vec<_> = master.iter().map(|m| (crate::master::MASTER_DIR, m)).collect();
            common::save_checkpoint(&cfg.out_dir, &model, &model_config, &tokenizer, &optim, &state, resolved, &extra, t.keep_checkpoints)?;
        }
    }
    bar.finish();
    let master = optim.master();
    let extra: Vec<_> = master.iter().map(|m| (crate::master::MASTER_DIR, m)).collect();
    let final_dir = common::save_final(&model.valid(), &model_config, &tokenizer, &cfg.out_dir, &extra)?;
    let wall = started.elapsed().as_secs_f32();
    let summary = SftSummary {
        steps: state.step,
        final_train_loss: last_loss,
        eval_loss,
        eval_accuracy: eval_acc,
        tokens_per_s: tokens_seen as f32 / wall.max(1e-6),
        wall_s: wall,
        final_dir,
    };
    metrics.log(&json!({"event": "end", "summary": summary}));
    Ok(summary)
}

/// The example order of an epoch: a permutation seeded by (seed, epoch).
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9).wrapping_add(epoch as u64)));
    order
}

/// Token-weighted mean NLL over a held-out set.
pub fn eval_loss_of<B: FusedOps>(model: &Qwen2<B>, examples: &[TokenizedExample], batch_size: usize, pad: u32) -> f32 {
    let (mut total, mut tokens) = (0.0f64, 0.0f64);
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedExample> = chunk.iter().collect();
        let batch = pad_batch(&refs, pad);
        let n = batch.target_mask.iter().filter(|&&m| m).count() as f64;
        total += scalar(sft_loss(model, &batch)) as f64 * n;
        tokens += n;
    }
    (total / tokens.max(1.0)) as f32
}

