//! The memory plan of a run: bytes per device for the weights, gradients, optimiser state,
//! anchor, activations, logits and the rollout KV cache, from the model's shape and the run's
//! settings, before anything is allocated.
//!
//! The counts follow what t1 keeps, not a generic formula:
//! - gradients come in the compute dtype, one full set per data-parallel shard
//!   (`train.threads`), plus the accumulator when several sets are summed; with master weights
//!   they are cast to f32 before the step. They peak after the backward pass, when the
//!   activations are gone, so the peak is the larger of the backward pass (activations, logits)
//!   and the step (gradients, the step's transient copies);
//! - AdamW keeps two moments in the master's dtype (f32 with master weights);
//! - the RL anchor is a full copy (f32 with master weights);
//! - the autodiff graph of one decoder layer keeps, per token, its two RMSNorm inputs, the
//!   attention input, the rotated query, keys and values, the attention output, the MLP input,
//!   gate, up and SwiGLU output (6·hidden + 2·kv_heads·head_dim + 3·intermediate values) and
//!   the softmax probabilities (heads · keys values);
//! - the logits stage keeps `[tokens, vocab]` logits in f32, their log-softmax, and their
//!   gradient in the backward pass;
//! - the AdamW step of the largest parameter (the embedding) makes three transient copies.
//!
//! - with layer checkpointing, each layer's input (hidden values per token) plus one layer's
//!   activations while it is recomputed;
//! - with LoRA the base is frozen: only the f32 adapters have gradients, AdamW moments and (RL)
//!   an anchor copy, and each adapter adds r f32 values per token to the graph (and its input
//!   in f32 when the base is bf16 or dropout copies it);
//! - RL micro-batches (`loss.micro_batch_rows`, or `loss.max_tokens_per_microbatch` counted
//!   as full-length rows) bound the rows of one forward/backward, and
//!   add an accumulator of the gradients;
//!
//! `t1 plan` prints it; `t1 sft` and `t1 rl` stop before allocating when it does not fit.
//! BENCHMARKS.md compares it with the measured peak RSS.

use std::path::Path;

use serde::Serialize;
use t1_model::{Qwen2Config, WeightDtype};

use crate::checkpoint::ActivationCheckpointing;
use crate::rl::RlConfig;
use crate::common::{ModelSource, OptimConfig};
use crate::sft::SftConfig;
use crate::error::TrainError;

/// What a run does with the model, sized per optimiser micro-batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// SFT: `micro_batch` sequences of `seq_len` tokens per forward/backward, cut into `threads`
    /// shards that run at once; `grad_accum` micro-batches per step.
    Sft { micro_batch: usize, seq_len: usize, threads: usize, grad_accum: usize },
    /// RL: rollouts of `gen_batch` sequences of `prompt_len + max_new` tokens, then updates on
    /// micro-batches of `update_rows` sequences in `threads` shards (`micro_batches` of them
    /// per optimiser step, whose gradients are summed); the anchor is a full copy.
    Rl { gen_batch: usize, prompt_len: usize, max_new: usize, update_rows: usize, threads: usize, micro_batches: usize },
}

/// The number formats of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Precision {
    /// Bytes per value of the weights forward and backward run with (4 f32, 2 bf16).
    pub compute_bytes: u64,
    /// f32 master weights (and f32 moments) beside the compute copy.
    pub master: bool,
    /// LoRA: the base is frozen and only these f32 adapters have gradients and AdamW state.
    pub lora: Option<LoraSize>,
}

/// The size of a run's LoRA adapters on a model shape ([`lora_size`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraSize {
    /// Adapter parameters (all f32).
    pub params: u64,
    /// The largest adapter matrix, in values.
    pub largest: u64,
    /// Bytes per token per layer the adapters add to the autodiff graph: each adapter's
    /// `x A` (r f32 values), its f32 input when the base is not f32 or dropout copies it, and
    /// the base output's f32 copy the sum is taken in when the base is not f32.
    pub bytes_per_token: u64,
}

/// The adapters `cfg` puts on model `c` (t1's LoRA: f32, on the projections it targets).
pub fn lora_size(c: &Qwen2Config, cfg: &t1_model::LoraConfig, compute_bytes: u64) -> Result<LoraSize, String> {
    let (h, i, d) = (c.hidden_size as u64, c.intermediate_size as u64, c.head_dim() as u64);
    let (q, kv) = (c.num_attention_heads as u64 * d, c.num_key_value_heads as u64 * d);
    let r = cfg.r as u64;
    let (mut params, mut largest, mut bytes) = (0u64, 0u64, 0u64);
    for name in cfg.targets()? {
        let (fan_in, fan_out) = match name {
            "q_proj" => (h, q),
            "k_proj" | "v_proj" => (h, kv),
            "o_proj" => (q, h),
            "gate_proj" | "up_proj" => (h, i),
            _ => (i, h),
        };
        params += r * (fan_in + fan_out);
        largest = largest.max(r * fan_in.max(fan_out));
        let input_copy = compute_bytes != 4 || cfg.dropout > 0.0;
        // with a bf16 base the sum is taken in f32 (PEFT's promotion): the output's f32 copy
        let output_copy = compute_bytes != 4;
        bytes += 4 * r + if input_copy { 4 * fan_in } else { 0 } + if output_copy { 4 * fan_out } else { 0 };
    }
    Ok(LoraSize { params: params * c.num_hidden_layers as u64, largest, bytes_per_token: bytes })
}

/// One line of the plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlanItem {
    pub name: String,
    pub bytes: u64,
    pub detail: String,
}

/// The plan: items, the phase that peaks and its total.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryPlan {
    pub items: Vec<PlanItem>,
    /// Bytes at the peak of the training step (the largest of its phases).
    pub peak: u64,
    pub peak_phase: String,
    /// Activations with every activation kept, and with layer checkpointing (each decoder
    /// layer recomputed in the backward pass from its input).
    pub activations_kept: u64,
    pub activations_layer_checkpointed: u64,
    pub checkpointing: bool,
}

/// The bytes a process needs beyond the tensors: the binary, the tokenizer, allocator and
/// thread stacks (measured: `t1 bench sft` on a 3M-parameter model peaks at about 100 MiB).
pub const RUNTIME_BYTES: u64 = 100 << 20;

/// Per-token values kept by one decoder layer's autodiff graph, not counting attention
/// probabilities (see the module docs).
fn layer_values_per_token(c: &Qwen2Config) -> u64 {
    let kv = (c.num_key_value_heads * c.head_dim()) as u64;
    6 * c.hidden_size as u64 + 2 * kv + 3 * c.intermediate_size as u64
}

/// The memory plan of a run of model `c` (see the module docs for what is counted).
pub fn memory_plan(c: &Qwen2Config, precision: Precision, work: &Workload, checkpointing: ActivationCheckpointing) -> MemoryPlan {
    let base = c.num_parameters() as u64;
    let b = precision.compute_bytes;
    let lora = precision.lora;
    // what has gradients and AdamW state: every weight, or the f32 adapters alone
    let (p, grad_bytes, state_bytes) = match lora {
        Some(l) => (l.params, 4, 4),
        None => (base, b, if precision.master { 4 } else { b }),
    };
    let mut items = vec![];
    let mut add = |name: &str, bytes: u64, detail: String| {
        items.push(PlanItem { name: name.into(), bytes, detail });
        bytes
    };
    let mut weights = add("weights", base * b, format!("{base} parameters x {b} bytes{}", if lora.is_some() { ", frozen" } else { "" }));
    if let Some(l) = lora {
        weights += add("lora adapters", l.params * 4, format!("{} parameters x 4 bytes (f32)", l.params));
    }
    let master = if precision.master { add("master weights", p * 4, "f32 copy the optimiser steps".into()) } else { 0 };
    let (rows, len, threads, grad_sets, accumulating) = match *work {
        Workload::Sft { micro_batch, seq_len, threads, grad_accum } => {
            let t = threads.clamp(1, micro_batch.max(1)) as u64;
            (micro_batch as u64, seq_len as u64, t, t + (t > 1) as u64 + (grad_accum > 1) as u64, grad_accum > 1)
        }
        Workload::Rl { update_rows, prompt_len, max_new, threads, micro_batches, .. } => {
            let t = threads.clamp(1, update_rows.max(1)) as u64;
            (update_rows as u64, (prompt_len + max_new) as u64, t, t + (t > 1) as u64 + (micro_batches > 1) as u64, micro_batches > 1)
        }
    };
    // the shards' sets and the accumulator are in the compute dtype (the adapters' f32 with
    // LoRA); with master weights the summed set is cast to f32 (one parameter at a time)
    // before the step
    let grads = add(
        "gradients",
        (grad_sets * p * grad_bytes).max(if precision.master { p * (b + 4) } else { 0 }),
        format!(
            "{grad_sets} set(s) of {grad_bytes} bytes{}: one per shard ({threads} threads){}{}",
            if lora.is_some() { " per adapter parameter" } else { "" },
            if grad_sets > threads { " + the accumulator" } else { "" },
            if precision.master { ", cast to f32 for the step" } else { "" }
        ),
    );
    let optimizer = add("optimizer", 2 * p * state_bytes, format!("AdamW moments, 2 x {state_bytes} bytes per {}parameter", if lora.is_some() { "adapter " } else { "" }));
    let anchor = match (work, lora) {
        (Workload::Rl { .. }, Some(_)) => add("anchor", p * state_bytes, "an EMA of the adapters (the base is shared with the policy)".into()),
        (Workload::Rl { .. }, None) => add("anchor", p * state_bytes, "the KL reference model".into()),
        (Workload::Sft { .. }, _) => 0,
    };
    let tokens = rows * len;
    let layers = c.num_hidden_layers as u64;
    let adapter_bytes = lora.map_or(0, |l| l.bytes_per_token);
    let per_layer = |t: u64| t * (layer_values_per_token(c) * b + adapter_bytes) + rows * c.num_attention_heads as u64 * len * len * b;
    let kept = layers * per_layer(tokens);
    // layer checkpointing: every layer's input, and one layer's activations being recomputed
    let checkpointed = layers * tokens * c.hidden_size as u64 * b + per_layer(tokens);
    let layered = checkpointing == ActivationCheckpointing::Layer;
    let activations = add(
        "activations",
        if layered { checkpointed } else { kept },
        format!("{rows} sequences x {len} tokens (in {threads} shards) x {layers} layers{}", if layered { ", layer checkpointing" } else { "" }),
    );
    // f32 logits, log-softmax and their gradient; RL's loss also keeps the entropy's softmax and product
    let copies = if matches!(work, Workload::Rl { .. }) { 5 } else { 3 };
    let logits = add("logits", copies * tokens * c.vocab_size as u64 * 4, format!("{tokens} tokens x {} vocab: {copies} f32 copies (logits, log-softmax, gradient{})", c.vocab_size, if copies > 3 { ", entropy" } else { "" }));
    let fixed = weights + master + optimizer + anchor + RUNTIME_BYTES;
    let largest = lora.map_or((c.vocab_size * c.hidden_size) as u64, |l| l.largest);
    let step_transient = 3 * largest * state_bytes;
    // the backward pass peaks at its start, when every activation is alive and no gradient
    // yet (with two shards as with one: both are in their backward at once); an earlier
    // micro-batch's summed gradients are alive throughout. The gradient sets peak together
    // when the shards' sets are summed, before the step.
    let accumulated = if accumulating { p * grad_bytes } else { 0 };
    let backward = fixed + accumulated + activations + logits;
    let step = fixed + grads + step_transient;
    let mut phases: Vec<(&str, u64)> = vec![("forward/backward", backward), ("optimiser step", step)];
    if let Workload::Rl { gen_batch, prompt_len, max_new, .. } = *work {
        let kv_len = (prompt_len + max_new) as u64;
        let kv = add(
            "rollout kv cache",
            gen_batch as u64 * kv_len * layers * 2 * (c.num_key_value_heads * c.head_dim()) as u64 * b,
            format!("{gen_batch} sequences x {kv_len} positions x {layers} layers x K and V"),
        );
        // the prefill computes logits at every prompt position (compute dtype) before keeping the last
        let prefill = add(
            "prefill logits",
            gen_batch as u64 * prompt_len as u64 * c.vocab_size as u64 * b,
            format!("{gen_batch} prompts x {prompt_len} positions x {} vocab", c.vocab_size),
        );
        phases.push(("rollouts", fixed + kv + prefill));
        // old and anchor log-probs: chunks of rows whose logits, their f32 cast and log-softmax are alive
        let chunk = crate::rl::logprob_chunk_rows(kv_len as usize, c.vocab_size) as u64;
        let recompute = add(
            "log-prob recompute",
            chunk * kv_len * c.vocab_size as u64 * (b + 8) + (p * b) * precision.master as u64,
            format!("{chunk} rows at a time x {kv_len} tokens x {} vocab{}", c.vocab_size, if precision.master { " + the anchor's bf16 cast" } else { "" }),
        );
        phases.push(("log-prob recompute", fixed + recompute));
    }
    add("runtime", RUNTIME_BYTES, "binary, tokenizer, allocator, threads".into());
    let (peak_phase, peak) = phases.iter().copied().max_by_key(|&(_, v)| v).expect("phases");
    MemoryPlan { items, peak, peak_phase: peak_phase.into(), activations_kept: kept, activations_layer_checkpointed: checkpointed, checkpointing: layered }
}

/// `bytes` as GiB/MiB text.
pub fn human(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.2} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

impl MemoryPlan {
    /// The plan as a table, with the verdict against `available` bytes when known.
    pub fn render(&self, available: Option<(u64, &str)>) -> String {
        let mut out = String::new();
        for item in &self.items {
            out += &format!("  {:<18} {:>11}  {}\n", item.name, human(item.bytes), item.detail);
        }
        out += &format!("  {:<18} {:>11}  at the {} phase\n", "peak", human(self.peak), self.peak_phase);
        if self.checkpointing {
            out += &format!("  activations would be {} with every activation kept (train.activation_checkpointing = \"none\")\n", human(self.activations_kept));
        } else {
            out += &format!(
                "  activations would be {} with train.activation_checkpointing = \"layer\" (each layer recomputed in the backward pass)\n",
                human(self.activations_layer_checkpointed)
            );
        }
        if let Some((avail, what)) = available {
            let verdict = if self.peak <= avail { "fits" } else { "does NOT fit" };
            out += &format!("  device memory {} ({what}): {verdict}\n", human(avail));
        }
        out
    }

    /// The largest items, largest first, and what shrinks them: for the error of a run that
    /// cannot fit.
    pub fn advice(&self) -> String {
        let mut items: Vec<&PlanItem> = self.items.iter().collect();
        items.sort_by_key(|i| std::cmp::Reverse(i.bytes));
        let top: Vec<String> = items.iter().take(3).map(|i| format!("{} {}", i.name, human(i.bytes))).collect();
        format!(
            "largest: {}. To shrink: train.activation_checkpointing = \"layer\" (activations), a smaller micro-batch or sequence length (activations, logits), train.threads = 1 (one gradient set), model.dtype = \"bf16\" (half the weights and activations), [lora] (gradients and AdamW for the adapters alone); sharding over GPUs is not available yet",
            top.join(", ")
        )
    }
}

/// The architecture a run trains: the checkpoint's config.json, or `[model.scratch]` with the
/// tokenizer's vocabulary. Reads no weights.
pub fn model_shape(source: &ModelSource, tokenizer: &Path) -> Result<Qwen2Config, TrainError> {
    if source.checkpoint.as_os_str().is_empty() {
        let tok = if tokenizer.as_os_str().is_empty() { source.checkpoint.join(crate::common::TOKENIZER_FILE) } else { tokenizer.to_path_buf() };
        let tokenizer = t1_data::ChatTokenizer::from_file(&tok)?;
        return crate::common::scratch_config(&source.scratch, &tokenizer);
    }
    Ok(Qwen2Config::from_file(&source.checkpoint.join(t1_model::hf::CONFIG_FILE))?)
}

fn precision(source: &ModelSource, optim: &OptimConfig, lora: Option<&t1_model::LoraConfig>, shape: &Qwen2Config, mode: ActivationCheckpointing) -> Result<Precision, TrainError> {
    let dtype = WeightDtype::parse(&source.dtype)
        .ok_or_else(|| TrainError::Config { origin: "model.dtype".into(), message: format!("{:?}: use \"f32\" or \"bf16\"", source.dtype) })?;
    let lora = crate::lora::run_lora(source, lora)?;
    crate::lora::validate(lora.as_ref(), source, mode)?;
    let master = crate::master::uses_master_weights(optim, dtype, lora.is_some())?;
    let compute_bytes = if dtype == WeightDtype::F32 { 4 } else { 2 };
    let lora = match lora {
        Some(l) => Some(lora_size(shape, &l, compute_bytes).map_err(|m| TrainError::Config { origin: "[lora]".into(), message: m })?),
        None => None,
    };
    Ok(Precision { compute_bytes, master, lora })
}

/// The plan of an SFT run (micro-batches of `train.batch_size` × `data.max_len`).
pub fn sft_plan(cfg: &SftConfig, shape: &Qwen2Config) -> Result<MemoryPlan, TrainError> {
    let t = &cfg.train;
    let work = Workload::Sft { micro_batch: t.batch_size, seq_len: cfg.data.max_len, threads: t.threads, grad_accum: t.grad_accum };
    Ok(memory_plan(shape, precision(&cfg.model, &cfg.optim, cfg.lora.as_ref(), shape, t.activation_checkpointing)?, &work, t.activation_checkpointing))
}

/// The plan of an RL run whose longest prompt has `prompt_len` tokens.
pub fn rl_plan(cfg: &RlConfig, shape: &Qwen2Config, prompt_len: usize) -> Result<MemoryPlan, TrainError> {
    let r = &cfg.rollout;
    let samples = r.prompts_per_step * if r.keep == crate::rl::Keep::All { r.samples_per_prompt } else { r.keep_per_prompt };
    let minibatch = samples.div_ceil(cfg.loss.minibatches.max(1));
    let micro = if cfg.loss.max_tokens_per_microbatch > 0 {
        // full-length rows: the most a token budget lets through
        (cfg.loss.max_tokens_per_microbatch / (prompt_len + cfg.sampling.max_new_tokens).max(1)).clamp(1, minibatch.max(1))
    } else if cfg.loss.micro_batch_rows > 0 {
        cfg.loss.micro_batch_rows.min(minibatch)
    } else {
        minibatch
    };
    let work = Workload::Rl {
        gen_batch: r.generation_batch.max(1).min(r.prompts_per_step * r.samples_per_prompt),
        prompt_len,
        max_new: cfg.sampling.max_new_tokens,
        update_rows: micro,
        threads: cfg.train.threads,
        micro_batches: minibatch.div_ceil(micro.max(1)),
    };
    Ok(memory_plan(shape, precision(&cfg.model, &cfg.optim, cfg.lora.as_ref(), shape, cfg.train.activation_checkpointing)?, &work, cfg.train.activation_checkpointing))
}

/// The longest prompt of an RL run's problems, in tokens (chat-formatted).
pub fn longest_prompt(cfg: &RlConfig, shape_source_tokenizer: &Path) -> Result<usize, TrainError> {
    let tok = if cfg.data.tokenizer.as_os_str().is_empty() { shape_source_tokenizer.to_path_buf() } else { cfg.data.tokenizer.clone() };
    let tokenizer = t1_data::ChatTokenizer::from_file(&tok)?;
    let on_bad = if cfg.data.skip_bad_lines { t1_data::OnBadLine::Skip } else { t1_data::OnBadLine::Error };
    let problems = t1_data::read_problems_with(&cfg.data.train, on_bad, &cfg.data.columns())?;
    let mut longest = 0;
    for p in &problems.items {
        longest = longest.max(tokenizer.encode_prompt(&p.prompt)?.len());
    }
    Ok(longest)
}

/// Qwen2.5 architectures by name (their config.json values), for planning a run whose
/// checkpoint is not on this machine: qwen2.5-0.5b, -1.5b, -3b, -7b, -14b, -32b.
pub fn qwen25(name: &str) -> Option<Qwen2Config> {
    let (hidden, inter, layers, heads, kv, vocab, tied) = match name.to_ascii_lowercase().trim_start_matches("qwen2.5-") {
        "0.5b" => (896, 4864, 24, 14, 2, 151936, true),
        "1.5b" => (1536, 8960, 28, 12, 2, 151936, true),
        "3b" => (2048, 11008, 36, 16, 2, 151936, true),
        "7b" => (3584, 18944, 28, 28, 4, 152064, false),
        "14b" => (5120, 13824, 48, 40, 8, 152064, false),
        "32b" => (5120, 27648, 64, 40, 8, 152064, false),
        _ => return None,
    };
    let mut c = Qwen2Config::tiny(vocab, hidden, layers, heads, kv);
    c.intermediate_size = inter;
    c.tie_word_embeddings = tied;
    c.max_position_embeddings = 32768;
    c.rope_theta = Some(1e6);
    Some(c)
}

/// Parses a memory size such as `80GB`, `141G`, `24GiB` or `512MiB` (GB and GiB both mean 2^30,
/// as GPU memory is quoted).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|ch: char| !(ch.is_ascii_digit() || ch == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let value: f64 = num.parse().ok()?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    (value.is_finite() && value > 0.0).then(|| (value * scale as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen05() -> Qwen2Config {
        let mut c = Qwen2Config::tiny(151936, 896, 24, 14, 2);
        c.intermediate_size = 4864;
        c.tie_word_embeddings = true;
        c
    }

    #[test]
    fn counts_follow_the_settings() {
        let c = qwen05();
        assert_eq!(c.num_parameters(), 494_032_768, "Qwen2.5-0.5B's parameter count");
        let f32 = Precision { compute_bytes: 4, master: false, lora: None };
        let sft = |threads, grad_accum| Workload::Sft { micro_batch: 2, seq_len: 256, threads, grad_accum };
        let get = |plan: &MemoryPlan, name: &str| plan.items.iter().find(|i| i.name == name).map(|i| i.bytes).unwrap_or(0);
        let one = memory_plan(&c, f32, &sft(1, 1), ActivationCheckpointing::None);
        let p = 494_032_768u64;
        assert_eq!(get(&one, "weights"), 4 * p);
        assert_eq!(get(&one, "gradients"), 4 * p);
        assert_eq!(get(&one, "optimizer"), 8 * p);
        assert_eq!(get(&one, "anchor"), 0);
        // two shards: a gradient set each plus the accumulator
        let two = memory_plan(&c, f32, &sft(2, 1), ActivationCheckpointing::None);
        assert_eq!(get(&two, "gradients"), 12 * p);
        assert_eq!(get(&two, "activations"), get(&one, "activations"), "activations do not depend on the shard count");
        // activations grow linearly in the batch and faster than linearly in the length
        let act = |b, t| get(&memory_plan(&c, f32, &Workload::Sft { micro_batch: b, seq_len: t, threads: 1, grad_accum: 1 }, ActivationCheckpointing::None), "activations");
        assert_eq!(act(4, 256), 2 * act(2, 256));
        assert!(act(2, 512) > 2 * act(2, 256));
        // bf16 with master weights: half the weights and activations, f32 master, moments and gradients
        let mixed = memory_plan(&c, Precision { compute_bytes: 2, master: true, lora: None }, &sft(1, 1), ActivationCheckpointing::None);
        assert_eq!(get(&mixed, "weights"), 2 * p);
        assert_eq!(get(&mixed, "master weights"), 4 * p);
        assert_eq!(get(&mixed, "optimizer"), 8 * p);
        assert_eq!(2 * get(&mixed, "activations"), get(&one, "activations"));
        assert!(one.activations_layer_checkpointed < get(&one, "activations") / 4);
        let layered = memory_plan(&c, f32, &sft(1, 1), ActivationCheckpointing::Layer);
        assert_eq!(get(&layered, "activations"), one.activations_layer_checkpointed);
        // at 2 x 256 the optimiser step peaks; at 2 x 2048 the activations do, and checkpointing lowers the peak
        let long = Workload::Sft { micro_batch: 2, seq_len: 2048, threads: 1, grad_accum: 1 };
        let (kept, layered) = (memory_plan(&c, f32, &long, ActivationCheckpointing::None), memory_plan(&c, f32, &long, ActivationCheckpointing::Layer));
        assert!(kept.peak_phase == "forward/backward" && layered.peak < kept.peak, "{} vs {}", layered.peak, kept.peak);
        let rl = memory_plan(&c, f32, &Workload::Rl { gen_batch: 64, prompt_len: 100, max_new: 412, update_rows: 2, threads: 1, micro_batches: 1 }, ActivationCheckpointing::None);
        assert_eq!(get(&rl, "anchor"), 4 * p);
        assert_eq!(get(&rl, "rollout kv cache"), 64 * 512 * 24 * 2 * 128 * 4);
        assert!(get(&rl, "activations") > 2 * get(&one, "activations"), "rows twice as long: twice the tokens, four times the attention");
    }

    #[test]
    fn lora_counts_the_adapters_alone_as_trained() {
        let c = qwen05();
        let p = c.num_parameters() as u64;
        let get = |plan: &MemoryPlan, name: &str| plan.items.iter().find(|i| i.name == name).map(|i| i.bytes).unwrap_or(0);
        let cfg = t1_model::LoraConfig { r: 8, ..Default::default() };
        let size = lora_size(&c, &cfg, 2).unwrap();
        // per layer: r · (in + out) for q (896→896), k and v (896→128), o (896→896), gate and
        // up (896→4864), down (4864→896)
        let per_layer = 8 * ((896 + 896) + 2 * (896 + 128) + (896 + 896) + 2 * (896 + 4864) + (4864 + 896));
        assert_eq!(size.params, 24 * per_layer as u64);
        let bf16 = Precision { compute_bytes: 2, master: false, lora: Some(size) };
        let sft = memory_plan(&c, bf16, &Workload::Sft { micro_batch: 1, seq_len: 256, threads: 1, grad_accum: 1 }, ActivationCheckpointing::None);
        assert_eq!(get(&sft, "weights"), 2 * p, "the frozen base in bf16");
        assert_eq!(get(&sft, "lora adapters"), 4 * size.params);
        assert_eq!(get(&sft, "gradients"), 4 * size.params, "f32 gradients of the adapters only");
        assert_eq!(get(&sft, "optimizer"), 8 * size.params);
        assert_eq!(get(&sft, "master weights"), 0);
        let rl = memory_plan(&c, bf16, &Workload::Rl { gen_batch: 8, prompt_len: 64, max_new: 192, update_rows: 1, threads: 1, micro_batches: 4 }, ActivationCheckpointing::None);
        assert_eq!(get(&rl, "anchor"), 4 * size.params, "the anchor is an EMA of the adapters");
        assert_eq!(get(&rl, "gradients"), 2 * 4 * size.params, "micro-batches add an accumulator");
        // only the targets count: q and v alone
        let qv = lora_size(&c, &t1_model::LoraConfig { r: 8, target_modules: vec!["q_proj".into(), "v_proj".into()], ..Default::default() }, 4).unwrap();
        assert_eq!(qv.params, 24 * 8 * ((896 + 896) + (896 + 128)));
    }

    #[test]
    fn qwen25_shapes_have_their_published_sizes() {
        // parameter counts of the Hugging Face checkpoints (model cards: 0.49B, 1.54B, 3.09B,
        // 7.61B, 14.7B, 32.5B)
        for (name, billions) in [("qwen2.5-0.5b", 0.49), ("1.5b", 1.54), ("3b", 3.09), ("7b", 7.61), ("14b", 14.7), ("32b", 32.5)] {
            let p = qwen25(name).unwrap().num_parameters() as f64 / 1e9;
            assert!((p - billions).abs() / billions < 0.01, "{name}: {p:.3}B, model card {billions}B");
        }
        assert!(qwen25("qwen2.5-13b").is_none());
    }

    #[test]
    fn sizes_parse_or_are_refused() {
        assert_eq!(parse_size("80GB"), Some(80 << 30));
        assert_eq!(parse_size("141G"), Some(141 << 30));
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("1.5g"), Some(3 << 29));
        for bad in ["", "GB", "-1G", "12XB", "0"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }
}
