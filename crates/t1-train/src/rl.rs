//! Stage 2 of T1: reinforcement learning with exploration.
//!
//! One step: prompts → K rollouts each (same engine as training, KV cache) → rewards (the
//! grader, i.e. the eval metric, with penalties for overlong / repetitive / garbled text) →
//! advantages (RLOO by default) → one or more epochs of minibatch updates with the clipped
//! policy loss, entropy bonus and KL to the anchor → anchor update (EMA by default).
//!
//! How this departs from the textbook (REINFORCE/PPO) algorithm, as T1 does:
//! 1. Oversampling: K samples per prompt (paper: 64), optionally a subset kept per group and
//!    groups whose rewards all agree dropped and replaced by fresh prompts.
//! 2. Temperature above 1 for exploration (paper: 1.2); log-probs use logits / T throughout.
//! 3. Entropy bonus in the loss.
//! 4. The KL anchor is not frozen: it follows the policy by EMA (or periodic reset), and the
//!    per-sample KL can be centred leave-one-out ("on-policy KL normalisation") and put in the reward.
//! 5. A penalty value replaces the reward of overlong, repetitive or garbled responses.

use t1_model::{FusedAutodiff, FusedOps};
use std::path::PathBuf;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, Optimizer};
use burn::tensor::{DType, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use t1_algo::{advantages, aggregate, kl, policy_loss, token_entropy, token_logprobs, AggMode, Anchor, Baseline, KlEstimator, Normalizer};
use t1_data::{ChatTokenizer, OnBadLine, Problem};
use t1_model::{Inputs, LoraConfig, Qwen2, WeightDtype};
use t1_reward::{GraderConfig, PenaltyConfig};

use crate::common::{self, lr_at, scalar, Metrics, ModelSource, OptimConfig, TrainerState};
use crate::checkpoint::ActivationCheckpointing;
use crate::error::TrainError;
use crate::generate::{eval_accuracy, generate_sharded, Rollout, SamplingConfig};

/// `t1 rl` settings. Every field has a default; unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlConfig {
    pub out_dir: PathBuf,
    /// Usually the SFT model (`out/.../sft/final`).
    pub model: ModelSource,
    pub data: RlData,
    pub sampling: SamplingConfig,
    pub rollout: RolloutConfig,
    pub reward: RewardConfig,
    pub loss: LossConfig,
    pub anchor: Anchor,
    pub optim: OptimConfig,
    pub train: RlTrain,
    /// LoRA (`[lora]`): train f32 adapters on a frozen base; the anchor is then an EMA of the
    /// adapters (a frozen anchor is the base alone) and shares the base's weights.
    pub lora: Option<LoraConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlData {
    /// Problems (JSONL, a JSON array, or Parquet): {"prompt"|"problem": ..., "answer": ...} per row.
    pub train: PathBuf,
    /// Held-out problems for greedy accuracy (optional).
    pub eval_problems: PathBuf,
    /// tokenizer.json; empty = the one in `model.checkpoint`.
    pub tokenizer: PathBuf,
    pub skip_bad_lines: bool,
    /// Extra chat template variables (transformers' `apply_chat_template(**kwargs)`, verl's
    /// `data.apply_chat_template_kwargs`), e.g. `{ enable_thinking = false }`.
    pub chat_template_kwargs: serde_json::Map<String, serde_json::Value>,
    /// Column names of the problem files (JSONL, JSON arrays or Parquet), as verl's
    /// `data.prompt_key`; empty = `prompt` (or `problem`) and `answer` (else the last
    /// `\boxed{}` of `solution`, as MATH has it).
    pub prompt_key: String,
    pub answer_key: String,
}

impl RlData {
    /// The column mapping of [`t1_data::read_problems_with`].
    pub fn columns(&self) -> t1_data::Columns {
        t1_data::Columns { prompt_key: self.prompt_key.clone(), answer_key: self.answer_key.clone(), ..Default::default() }
    }
}

/// Which of the K samples of a prompt are kept for the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Keep {
    All,
    /// `keep_per_prompt` samples drawn at random.
    Random,
    /// `keep_per_prompt` samples, as evenly split between correct and incorrect as possible.
    Balanced,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    /// Prompts per RL step (paper: 32).
    pub prompts_per_step: usize,
    /// K samples per prompt (paper: 64).
    pub samples_per_prompt: usize,
    pub keep: Keep,
    /// With keep = random | balanced: samples kept per prompt.
    pub keep_per_prompt: usize,
    /// Drop groups whose rewards are all equal (no learning signal) and sample more prompts.
    pub drop_uniform_groups: bool,
    /// Cap on the extra generation rounds used to replace dropped groups.
    pub max_extra_rounds: usize,
    /// Sequences per generation batch.
    pub generation_batch: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    pub grader: GraderConfig,
    pub penalty: PenaltyConfig,
    /// Give penalised samples the penalty as their advantage, after the baseline (else the
    /// penalty replaces the reward before the baseline).
    pub penalty_after_baseline: bool,
}

/// Where the KL term enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KlPlacement {
    /// r ← r − coef · Σ_t KL_t (T1's).
    Reward,
    /// loss ← loss + coef · agg(KL_t).
    Loss,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    pub baseline: Baseline,
    pub agg: AggMode,
    /// Constant length of seq-mean-token-sum-norm (0 = sampling.max_new_tokens).
    pub agg_norm_len: usize,
    pub clip_eps_low: f32,
    pub clip_eps_high: f32,
    pub entropy_coef: f32,
    pub kl_coef: f32,
    /// Unset: k1 with `kl_in = "reward"`, k3 with `kl_in = "loss"` ([`LossConfig::estimator`]).
    pub kl_estimator: Option<KlEstimator>,
    pub kl_in: KlPlacement,
    /// Removed: leave-one-out centring of each sample's KL before the reward, followed by the
    /// RLOO (or GRPO) baseline, equals the uncentred KL with `kl_coef` scaled by K/(K−1)
    /// (centring is linear and LOO(LOO(x)) = K/(K−1)·LOO(x)), so the switch never changed the
    /// learning signal; and T1's "mean KL subtracted so the reward is centred" is exactly
    /// undone by the baseline. Setting it is an error that says so.
    pub kl_on_policy_normalize: Option<bool>,
    /// Optimisation epochs over each rollout batch.
    pub epochs: usize,
    /// Minibatches (optimiser steps) per epoch.
    pub minibatches: usize,
    /// Rows per forward/backward within a minibatch, whose gradients add up to the
    /// minibatch's (verl's `ppo_micro_batch_size_per_gpu`): memory for one micro-batch at a
    /// time, the same update up to float rounding. 0 = the whole minibatch at once.
    pub micro_batch_rows: usize,
    /// Micro-batches by a token budget instead (verl's `use_dynamic_bsz` with
    /// `ppo_max_token_len_per_gpu`): the minibatch's rows, longest first, are grouped so that
    /// each micro-batch, padded to its longest row, holds at most this many tokens (a row longer
    /// than the budget goes alone). Same update up to float rounding. 0 = off.
    pub max_tokens_per_microbatch: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlTrain {
    /// RL steps (one rollout batch each).
    pub steps: usize,
    pub seed: u64,
    /// Held-out greedy accuracy every N steps and at the end (0 = only at start and end).
    pub eval_every: usize,
    pub eval_problems: usize,
    pub save_every: usize,
    pub keep_checkpoints: usize,
    pub max_bad_steps: usize,
    /// Threads for generation and data-parallel update shards (CPU: the number of cores;
    /// GPU: 1). With more than one, each generation shard samples from its own seeded stream.
    pub threads: usize,
    /// "none", or "layer": the update's backward pass recomputes each decoder layer from its
    /// input (one layer's activations alive at a time, about a third more compute).
    pub activation_checkpointing: ActivationCheckpointing,
}

impl Default for RlConfig {
    fn default() -> Self {
        Self {
            out_dir: "out/rl".into(),
            model: ModelSource::default(),
            data: RlData::default(),
            sampling: SamplingConfig { temperature: 1.2, top_p: 1.0, top_k: 0, max_new_tokens: 16384 },
            rollout: RolloutConfig::default(),
            reward: RewardConfig::default(),
            loss: LossConfig::default(),
            anchor: Anchor::Ema { beta: 0.99, every: 1 },
            optim: OptimConfig { lr: 1.5e-6, warmup_steps: 0, min_lr_ratio: 1.0, ..OptimConfig::default() },
            train: RlTrain::default(),
            lora: None,
        }
    }
}
impl Default for RlData {
    fn default() -> Self {
        Self { train: PathBuf::new(), eval_problems: PathBuf::new(), tokenizer: PathBuf::new(), skip_bad_lines: false, chat_template_kwargs: Default::default(), prompt_key: String::new(), answer_key: String::new() }
    }
}
impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            prompts_per_step: 32,
            samples_per_prompt: 64,
            keep: Keep::All,
            keep_per_prompt: 0,
            drop_uniform_groups: false,
            max_extra_rounds: 0,
            generation_batch: 64,
        }
    }
}
impl Default for RewardConfig {
    fn default() -> Self {
        Self { grader: GraderConfig::default(), penalty: PenaltyConfig::default(), penalty_after_baseline: false }
    }
}
impl LossConfig {
    /// The KL estimator: `kl_estimator`, else k1 for the KL in the reward and k3 for the KL in
    /// the loss. In the reward the KL is a detached penalty whose score-function gradient
    /// E_π[k(x) ∇log π(x)] is ∇KL(π‖π_ref) for k1 = log π/π_ref (E_π[∇log π] = 0 takes care of
    /// the rest), but not for k3 (tested on a categorical example); in the loss the KL is
    /// differentiated through log π, where k1's gradient vanishes in expectation and k3 is
    /// what GRPO implementations use.
    pub fn estimator(&self) -> KlEstimator {
        self.kl_estimator.unwrap_or(match self.kl_in {
            KlPlacement::Reward => KlEstimator::K1,
            KlPlacement::Loss => KlEstimator::K3,
        })
    }
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            baseline: Baseline::Rloo,
            agg: AggMode::TokenMean,
            agg_norm_len: 0,
            clip_eps_low: 0.2,
            clip_eps_high: 0.28,
            entropy_coef: 0.0,
            kl_coef: 2e-4,
            kl_estimator: None,
            kl_in: KlPlacement::Reward,
            kl_on_policy_normalize: None,
            epochs: 1,
            minibatches: 1,
            micro_batch_rows: 0,
            max_tokens_per_microbatch: 0,
        }
    }
}
impl Default for RlTrain {
    fn default() -> Self {
        Self { steps: 100, seed: 0, eval_every: 0, eval_problems: 100, save_every: 0, keep_checkpoints: 2, max_bad_steps: 5, threads: 1, activation_checkpointing: ActivationCheckpointing::None }
    }
}

impl RlConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config { origin: "rl config".into(), message: m });
        if self.data.train.as_os_str().is_empty() {
            return bad("data.train is empty: give a problems JSONL file".into());
        }
        self.sampling.validate().or_else(|m| bad(format!("sampling: {m}")))?;
        if self.loss.kl_on_policy_normalize.is_some() {
            return bad("loss.kl_on_policy_normalize was removed: with the RLOO or GRPO baseline, centring the KL leave-one-out only scaled kl_coef by K/(K-1) (K = rollout.samples_per_prompt); delete the key, and multiply kl_coef by K/(K-1) to keep an old run's KL weight".into());
        }
        if self.loss.micro_batch_rows > 0 && self.loss.max_tokens_per_microbatch > 0 {
            return bad("loss.micro_batch_rows and loss.max_tokens_per_microbatch both set: micro-batches are formed by rows or by a token budget, set one".into());
        }
        if self.sampling.temperature <= 0.0 {
            return bad("sampling.temperature must be > 0 for RL (greedy rollouts have no exploration)".into());
        }
        self.reward.grader.validate().or_else(|e| bad(format!("reward.grader: {e}")))?;
        let r = &self.rollout;
        if r.prompts_per_step == 0 || r.samples_per_prompt == 0 {
            return bad("rollout.prompts_per_step and rollout.samples_per_prompt must be > 0".into());
        }
        if self.train.threads == 0 {
            return bad("train.threads must be > 0".into());
        }
        if r.keep != Keep::All && (r.keep_per_prompt == 0 || r.keep_per_prompt > r.samples_per_prompt) {
            return bad(format!("rollout.keep_per_prompt must be in 1..={} with keep = {:?}", r.samples_per_prompt, r.keep));
        }
        if self.loss.epochs == 0 || self.loss.minibatches == 0 {
            return bad("loss.epochs and loss.minibatches must be > 0".into());
        }
        if let Anchor::Ema { beta, every } = self.anchor {
            if !(0.0..=1.0).contains(&beta) || every == 0 {
                return bad("anchor: ema needs 0 <= beta <= 1 and every > 0".into());
            }
        }
        if let Anchor::Reset { every: 0 } = self.anchor {
            return bad("anchor: reset needs every > 0".into());
        }
        let Some(dtype) = WeightDtype::parse(&self.model.dtype) else {
            return bad("model.dtype must be f32 or bf16".into());
        };
        let lora = self.lora.is_some() || !self.model.adapter.as_os_str().is_empty();
        crate::master::uses_master_weights(&self.optim, dtype, lora)?;
        crate::lora::validate(self.lora.as_ref(), &self.model, self.train.activation_checkpointing)?;
        Ok(())
    }
}

/// One sampled response with everything the update needs.
#[derive(Debug, Clone)]
struct Sample {
    group: usize,
    prompt: Vec<u32>,
    rollout: Rollout,
    /// The reward used for training: the grader's score, or the penalty value when penalised.
    reward: f32,
    /// The grader's score before penalties (1 correct, 0 not).
    score: f32,
    correct: bool,
    penalties: t1_reward::Penalties,
}

/// What a finished RL run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RlSummary {
    pub steps: usize,
    /// Held-out greedy accuracy before the first step and after the last.
    pub initial_accuracy: Option<f32>,
    pub final_accuracy: Option<f32>,
    /// Held-out accuracy sampled at `sampling.temperature` (fixed seed), before and after.
    pub initial_sampled_accuracy: Option<f32>,
    pub final_sampled_accuracy: Option<f32>,
    pub wall_s: f32,
    pub final_dir: PathBuf,
}

/// Runs RL (or continues it with `resume`).
pub fn run_rl<B: FusedAutodiff>(cfg: &RlConfig, resolved: &str, resume: bool, device: &B::Device) -> Result<RlSummary, TrainError> {
    cfg.validate()?;
    let t = &cfg.train;
    B::seed(device, t.seed);
    let lora = crate::lora::run_lora(&cfg.model, cfg.lora.as_ref())?;
    // the resolved settings: a continued adapter brings its own dropout
    crate::lora::validate(lora.as_ref(), &cfg.model, cfg.train.activation_checkpointing)?;
    let (model_config, mut policy, tokenizer, mut optim) = crate::master::init_trainable::<B>(&cfg.model, &cfg.optim, lora.as_ref(), &cfg.data.tokenizer, device)?;
    let tokenizer = tokenizer.with_template_kwargs(cfg.data.chat_template_kwargs.clone());
    // the anchor follows the f32 master when there is one (a bf16 EMA at beta 0.99 would
    // round most of its moves away); its log-probs are taken in the policy's dtype. With LoRA
    // it shares the policy's frozen base, and a frozen anchor is the base alone, as TRL's
    // reference with the adapters disabled (to anchor on an SFT adapter, merge it first with
    // `t1 merge`, as the presets do).
    let mut reference: Qwen2<B::InnerBackend> = optim.weights(&policy);
    if cfg.anchor == Anchor::Frozen {
        reference.lora = None;
    }
    let compute = policy.dtype();
    let on_bad = if cfg.data.skip_bad_lines { OnBadLine::Skip } else { OnBadLine::Error };
    let loaded = t1_data::read_problems_with(&cfg.data.train, on_bad, &cfg.data.columns())?;
    let eval: Vec<Problem> = if cfg.data.eval_problems.as_os_str().is_empty() {
        vec![]
    } else {
        t1_data::read_problems_with(&cfg.data.eval_problems, on_bad, &cfg.data.columns())?.items.into_iter().take(t.eval_problems).collect()
    };
    let prompt_ids = check_context(&loaded, &tokenizer, cfg.sampling.max_new_tokens, model_config.max_position_embeddings, &cfg.data.train)?;
    let problems: Vec<(Problem, Vec<u32>)> = loaded.items.into_iter().zip(prompt_ids).collect();
    let mut state = TrainerState { rng_seed: t.seed, ..Default::default() };
    if resume {
        if let Some(dir) = common::list_checkpoints(&cfg.out_dir).last() {
            policy = crate::master::resume_weights(dir, &cfg.model, &mut optim, &policy, device)?;
            let saved = dir.join("reference");
            reference = if policy.lora.is_some() {
                let mut base = policy.valid();
                base.lora = None;
                match (t1_model::lora::is_adapter_dir(&saved), cfg.anchor) {
                    (true, _) => t1_model::load_adapter(base, &saved)?,
                    (false, Anchor::Frozen) => base,
                    (false, _) => {
                        return Err(TrainError::Checkpoint {
                            path: saved.clone(),
                            message: "holds no adapter_config.json, so the anchor's adapters are lost: resume from an earlier checkpoint, or start the run again".into(),
                        })
                    }
                }
            } else {
                let anchor_dtype = if optim.master().is_some() { WeightDtype::F32 } else { WeightDtype::parse(&cfg.model.dtype).unwrap_or(WeightDtype::F32) };
                t1_model::load::<B::InnerBackend>(&saved, anchor_dtype, device)?.1
            };
            (optim, state) = common::load_resume_state(dir, optim, device)?;
            eprintln!("resuming from {} at step {}", dir.display(), state.step);
        } else {
            eprintln!("--resume: no checkpoint in {}, starting from the start", cfg.out_dir.display());
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(state.rng_seed);
    rng.set_word_pos(state.rng_word_pos);
    // every input was read and checked: only now is anything written
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| TrainError::io(&cfg.out_dir, e))?;
    let mut metrics = Metrics::open(&cfg.out_dir.join("metrics.jsonl"), resume)?;
    // one stop set for rollouts and the held-out evals
    let eos = crate::generate::stop_ids(&model_config, &tokenizer);

    let started = Instant::now();
    // held-out accuracy, greedy and sampled at the rollout temperature (fixed seed)
    let held_out = |model: &Qwen2<B::InnerBackend>| {
        let greedy = eval_accuracy(model, &tokenizer, &eval, &SamplingConfig::greedy(cfg.sampling.max_new_tokens), &eos, 64, t.threads)?;
        let sampled = eval_accuracy(model, &tokenizer, &eval, &cfg.sampling, &eos, 64, t.threads)?;
        Ok::<_, TrainError>((greedy, sampled))
    };
    let initial = if !eval.is_empty() && state.step == 0 { Some(held_out(&policy.valid())?) } else { None };
    let initial_accuracy = initial.map(|(greedy, _)| greedy);
    let initial_sampled_accuracy = initial.map(|(_, sampled)| sampled);
    if let Some((greedy, sampled)) = initial {
        metrics.log(&json!({"step": 0, "eval_accuracy": greedy, "eval_sampled_accuracy": sampled}));
        eprintln!("step 0 eval_accuracy {greedy:.3} (greedy) {sampled:.3} (sampled at T = {})", cfg.sampling.temperature);
    }
    let mut final_sampled_accuracy = initial_sampled_accuracy;
    let mut final_accuracy = initial_accuracy;
    let bar = common::progress(t.steps, state.step, "rl");
    let mut bad_in_row = 0;
    while state.step < t.steps {
        let step_start = Instant::now();
        let lr = lr_at(state.step, t.steps, cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.min_lr_ratio);
        // 1-2. prompts → K rollouts each → rewards, replacing uniform groups if asked
        let inner = policy.valid();
        let (samples, gen_stats) = collect_samples(cfg, &inner, &tokenizer, &problems, &eos, &mut state, &mut rng);
        let gen_s = step_start.elapsed().as_secs_f32();
        if samples.is_empty() {
            metrics.log(&json!({"step": state.step, "event": "no_samples"}));
            state.step += 1;
            continue;
        }
        // 3. recompute old log-probs (gap metric) and the anchor's, then advantages
        let batch = RlBatch::new(&samples, tokenizer.pad_id());
        let old_logp = batch.logprobs(&inner, cfg.sampling.temperature);
        let ref_logp = batch.logprobs(&common::cast(reference.clone(), compute), cfg.sampling.temperature);
        let (gap_max, gap_mean) = batch.gap(&old_logp);
        let kl_tok = kl(tensor2::<B::InnerBackend>(&old_logp, batch.rows, batch.len, device), tensor2(&ref_logp, batch.rows, batch.len, device), cfg.loss.estimator());
        let kl_tok = host(kl_tok);
        let kl_seq: Vec<f32> = (0..batch.rows).map(|r| batch.masked_row_sum(&kl_tok, r)).collect();
        let adv = compute_advantages(cfg, &samples, &kl_seq);
        // 4. updates
        crate::lora::seed_dropout::<B>(&policy, device, t.seed, state.step);
        let (next, u) = update_policy(cfg, policy, &mut optim, &batch, &old_logp, &ref_logp, &adv, lr, &mut rng);
        policy = next;
        let (clip_sum, ent_sum, loss_sum, n_updates, bad_updates) = (u.clip_sum, u.entropy_sum, u.loss_sum, u.updates, u.skipped);
        // a step with a non-finite minibatch is counted as skipped (its other minibatches may
        // have updated the policy) and is never saved as a checkpoint
        let bad = bad_updates > 0;
        if bad {
            state.skipped_steps += 1;
            bad_in_row += 1;
            metrics.log(&json!({"event": "skipped_step", "step": state.step, "non_finite_updates": bad_updates, "updates": n_updates}));
            if bad_in_row >= t.max_bad_steps {
                return Err(TrainError::Diverged { steps: bad_in_row, out_dir: cfg.out_dir.clone() });
            }
        } else {
            bad_in_row = 0;
        }
        state.step += 1;
        // 5. the dynamic anchor (it stays where it was after a skipped step)
        reference = advance_reference(cfg.anchor, reference, &optim.weights(&policy), state.step, bad);
        state.rng_word_pos = rng.get_word_pos();
        let n = samples.len() as f32;
        let mean = |f: &dyn Fn(&Sample) -> f32| samples.iter().map(f).sum::<f32>() / n;
        let n_up = n_updates.max(1) as f32;
        let mut record = json!({
            "step": state.step, "lr": lr,
            "reward": mean(&|s| s.reward), "accuracy": mean(&|s| s.correct as u8 as f32),
            "overlong_rate": mean(&|s| s.penalties.overlong as u8 as f32),
            "repetitive_rate": mean(&|s| s.penalties.repetitive as u8 as f32),
            "garbled_rate": mean(&|s| s.penalties.garbled as u8 as f32),
            "response_length": mean(&|s| s.rollout.tokens.len() as f32),
            "entropy": ent_sum / n_up, "kl": kl_seq.iter().sum::<f32>() / n,
            "clip_fraction": clip_sum / n_up, "loss": loss_sum / n_up,
            "zero_variance_groups": gen_stats.uniform_fraction, "extra_rounds": gen_stats.extra_rounds,
            "samples": samples.len(), "logprob_gap_max": gap_max, "logprob_gap_mean": gap_mean,
            "generation_s": gen_s, "step_s": step_start.elapsed().as_secs_f32(), "skipped_updates": bad_updates,
        });
        let last = state.step == t.steps;
        if !eval.is_empty() && (last || (t.eval_every > 0 && state.step % t.eval_every == 0)) {
            let (acc, sampled) = held_out(&policy.valid())?;
            record["eval_accuracy"] = json!(acc);
            record["eval_sampled_accuracy"] = json!(sampled);
            final_accuracy = Some(acc);
            final_sampled_accuracy = Some(sampled);
            bar.println(format!("step {} eval_accuracy {acc:.3} (greedy) {sampled:.3} (sampled)", state.step));
        }
        bar.set_position(state.step as u64);
        bar.set_message(format!("reward {:.3} acc {:.3} len {:.0}", record["reward"], record["accuracy"], record["response_length"]));
        metrics.log(&record);
        if !bad && (last || (t.save_every > 0 && state.step % t.save_every == 0)) {
            let master = optim.master();
            let mut extra = vec![("reference", &reference)];
            extra.extend(master.iter().map(|m| (crate::master::MASTER_DIR, m)));
            common::save_checkpoint(&cfg.out_dir, &policy, &model_config, &tokenizer, &optim, &state, resolved, &extra, t.keep_checkpoints)?;
        }
    }
    bar.finish();
    let master = optim.master();
    let extra: Vec<_> = master.iter().map(|m| (crate::master::MASTER_DIR, m)).collect();
    let final_dir = common::save_final(&policy.valid(), &model_config, &tokenizer, &cfg.out_dir, &extra)?;
    let summary = RlSummary { steps: state.step, initial_accuracy, final_accuracy, initial_sampled_accuracy, final_sampled_accuracy, wall_s: started.elapsed().as_secs_f32(), final_dir };
    metrics.log(&json!({"event": "end", "summary": summary}));
    Ok(summary)
}

/// Each problem's prompt through the chat template; every prompt plus `max_new_tokens` must
/// fit the model's context.
fn check_context(problems: &t1_data::Loaded<Problem>, tokenizer: &ChatTokenizer, max_new: usize, context: usize, path: &std::path::Path) -> Result<Vec<Vec<u32>>, TrainError> {
    let mut all = Vec::with_capacity(problems.items.len());
    for (p, line) in problems.items.iter().zip(&problems.lines) {
        let ids = tokenizer.encode_prompt(&p.prompt).map_err(|e| TrainError::Config { origin: format!("{}:{line}", path.display()), message: e.to_string() })?;
        let n = ids.len();
        if n + max_new > context {
            return Err(TrainError::Config {
                origin: format!("{}:{line}", path.display()),
                message: format!(
                    "the prompt has {n} tokens; with sampling.max_new_tokens = {max_new} that exceeds the model's context of {context} (max_position_embeddings): shorten the prompt or lower max_new_tokens"
                ),
            });
        }
        all.push(ids);
    }
    Ok(all)
}

struct GenStats {
    uniform_fraction: f32,
    extra_rounds: usize,
}

/// Samples K responses for each of `prompts_per_step` prompts and grades them, then
/// [`gather_groups`] drops uniform groups (sampling more prompts) and keeps a subset.
fn collect_samples<B: FusedOps>(
    cfg: &RlConfig,
    model: &Qwen2<B>,
    tokenizer: &ChatTokenizer,
    problems: &[(Problem, Vec<u32>)],
    eos: &[u32],
    state: &mut TrainerState,
    rng: &mut ChaCha8Rng,
) -> (Vec<Sample>, GenStats) {
    let r = &cfg.rollout;
    let k = r.samples_per_prompt;
    gather_groups(r, rng, |need, rng| {
        let chosen: Vec<&(Problem, Vec<u32>)> = (0..need).map(|_| next_problem(problems, cfg.train.seed, state)).collect();
        let prompts: Vec<Vec<u32>> = chosen.iter().flat_map(|(_, ids)| std::iter::repeat_n(ids.clone(), k)).collect();
        let mut rollouts = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(r.generation_batch.max(1)) {
            rollouts.extend(generate_sharded(model, chunk, &cfg.sampling, eos, tokenizer.pad_id(), rng, cfg.train.threads));
        }
        let mut rollouts = rollouts.into_iter();
        let mut prompts = prompts.into_iter();
        chosen
            .iter()
            .map(|(problem, _)| {
                (0..k)
                    .map(|_| {
                        let (rollout, prompt) = (rollouts.next().expect("one rollout per prompt"), prompts.next().expect("k prompts"));
                        let text = tokenizer.decode(&rollout.tokens);
                        let grade = t1_reward::grade(&text, &problem.answer, &cfg.reward.grader);
                        let penalties = t1_reward::penalties(&text, rollout.truncated, &cfg.reward.penalty);
                        let reward = t1_reward::reward(&grade, &penalties, &cfg.reward.penalty);
                        let score = t1_reward::reward(&grade, &t1_reward::Penalties::default(), &cfg.reward.penalty);
                        Sample { group: 0, prompt, rollout, reward, score, correct: grade.correct, penalties }
                    })
                    .collect()
            })
            .collect()
    })
}

/// T1's oversampling loop: `sample(n, rng)` gives `n` fresh groups of K graded samples; groups
/// whose rewards are all equal carry no learning signal and, with `drop_uniform_groups`, are
/// dropped and replaced by fresh groups, for at most `max_extra_rounds` extra rounds (the last
/// round keeps whatever it gets, so a step always has `prompts_per_step` groups). Each kept
/// group is reduced by [`select`] and numbered in order.
fn gather_groups(r: &RolloutConfig, rng: &mut ChaCha8Rng, mut sample: impl FnMut(usize, &mut ChaCha8Rng) -> Vec<Vec<Sample>>) -> (Vec<Sample>, GenStats) {
    let mut kept: Vec<Sample> = vec![];
    let (mut groups_seen, mut uniform, mut rounds, mut groups_kept) = (0usize, 0usize, 0usize, 0usize);
    while groups_kept < r.prompts_per_step && rounds <= r.max_extra_rounds {
        for mut group in sample(r.prompts_per_step - groups_kept, rng) {
            groups_seen += 1;
            let all_equal = group.iter().all(|s| s.reward == group[0].reward);
            uniform += all_equal as usize;
            if all_equal && r.drop_uniform_groups && rounds < r.max_extra_rounds {
                continue;
            }
            select(&mut group, r.keep, r.keep_per_prompt, rng);
            for s in &mut group {
                s.group = groups_kept;
            }
            kept.extend(group);
            groups_kept += 1;
        }
        rounds += 1;
        if !r.drop_uniform_groups {
            break;
        }
    }
    (kept, GenStats { uniform_fraction: uniform as f32 / groups_seen.max(1) as f32, extra_rounds: rounds.saturating_sub(1) })
}

/// The next training problem: epochs over a seeded permutation, the cursor in `state`.
fn next_problem<'a, T>(problems: &'a [T], seed: u64, state: &mut TrainerState) -> &'a T {
    let n = problems.len();
    let pos = state.cursor % n;
    let epoch = state.cursor / n;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ (0xA5A5 + epoch as u64)));
    state.cursor += 1;
    state.epoch = epoch;
    &problems[order[pos]]
}

/// Keeps a subset of one group's samples.
fn select(group: &mut Vec<Sample>, keep: Keep, n: usize, rng: &mut ChaCha8Rng) {
    match keep {
        Keep::All => {}
        Keep::Random => {
            group.shuffle(rng);
            group.truncate(n);
        }
        Keep::Balanced => {
            group.shuffle(rng);
            let (right, wrong): (Vec<Sample>, Vec<Sample>) = group.drain(..).partition(|s| s.correct);
            let take_right = right.len().min(n.div_ceil(2)).max(n.saturating_sub(wrong.len()));
            group.extend(right.into_iter().take(take_right));
            let rest = n - group.len();
            group.extend(wrong.into_iter().take(rest));
        }
    }
}

/// Per-sequence advantages, group by group (consecutive samples with the same `group`):
/// 1. the rewards r_i: with `penalty_after_baseline` the grader's scores before penalties,
///    else the rewards in which the penalty value has replaced the score of penalised samples;
/// 2. with `kl_in = "reward"`: r_i ← r_i − kl_coef · KL_i, KL_i the sample's summed token KL;
/// 3. the baseline within the group (RLOO: A_i = r_i − mean_{j≠i} r_j);
/// 4. with `penalty_after_baseline`: a penalised sample's advantage is the penalty value.
///
/// # Shapes
/// - samples `[N]`, kl_seq `[N]` → `[N]`
fn compute_advantages(cfg: &RlConfig, samples: &[Sample], kl_seq: &[f32]) -> Vec<f32> {
    let l = &cfg.loss;
    let after = cfg.reward.penalty_after_baseline;
    let mut out = vec![0.0; samples.len()];
    let mut start = 0;
    while start < samples.len() {
        let end = start + samples[start..].iter().take_while(|s| s.group == samples[start].group).count();
        let idx = start..end;
        let mut rewards: Vec<f32> = samples[idx.clone()].iter().map(|s| if after { s.score } else { s.reward }).collect();
        if l.kl_in == KlPlacement::Reward && l.kl_coef != 0.0 {
            for (r, k) in rewards.iter_mut().zip(&kl_seq[idx.clone()]) {
                *r -= l.kl_coef * k;
            }
        }
        let a = advantages(&rewards, rewards.len(), l.baseline);
        for (i, a) in idx.clone().zip(a) {
            out[i] = if after && samples[i].penalties.any() { cfg.reward.penalty.value } else { a };
        }
        start = end;
    }
    out
}

/// The anchor after RL step `step` (counted from 1): T1's EMA θ_ref ← β·θ_ref + (1−β)·θ every
/// `every` steps, a reset to the policy every `every` steps, or frozen. A step whose update was
/// skipped as non-finite leaves the anchor where it was.
fn advance_anchor<B: FusedOps, M: burn::module::Module<B>>(anchor: Anchor, reference: M, policy: &M, step: usize, skipped: bool) -> M {
    match anchor {
        _ if skipped => reference,
        Anchor::Frozen => reference,
        Anchor::Ema { beta, every } if step % every == 0 => t1_algo::ema_update(reference, policy, beta),
        Anchor::Reset { every } if step % every == 0 => policy.clone(),
        _ => reference,
    }
}

/// [`advance_anchor`] on the anchor model: with LoRA on the adapters alone (the base is the
/// policy's, shared), and a LoRA run's frozen anchor (the base alone) stays as it is.
fn advance_reference<B: FusedOps>(anchor: Anchor, mut reference: Qwen2<B>, policy: &Qwen2<B>, step: usize, skipped: bool) -> Qwen2<B> {
    match (reference.lora.take(), &policy.lora) {
        (Some(adapters), Some(theta)) => {
            reference.lora = Some(advance_anchor(anchor, adapters, theta, step, skipped));
            reference
        }
        (None, Some(_)) => reference,
        (adapters, None) => {
            reference.lora = adapters;
            advance_anchor(anchor, reference, policy, step, skipped)
        }
    }
}

/// What one RL step's updates report.
#[derive(Debug, Default)]
struct UpdateStats {
    clip_sum: f32,
    entropy_sum: f32,
    loss_sum: f32,
    /// Optimiser steps taken.
    updates: usize,
    /// Minibatches skipped because their loss or gradient norm was not finite.
    skipped: usize,
}

/// `loss.epochs` passes over the rollout batch in `loss.minibatches` shuffled minibatches, one
/// clipped optimiser step each; a minibatch whose loss or gradient norm is not finite is skipped.
#[allow(clippy::too_many_arguments)]
fn update_policy<B: FusedAutodiff, O: Optimizer<Qwen2<B>, B>>(
    cfg: &RlConfig,
    mut policy: Qwen2<B>,
    optim: &mut O,
    batch: &RlBatch,
    old_logp: &[f32],
    ref_logp: &[f32],
    adv: &[f32],
    lr: f64,
    rng: &mut ChaCha8Rng,
) -> (Qwen2<B>, UpdateStats) {
    let norm_len = if cfg.loss.agg_norm_len > 0 { cfg.loss.agg_norm_len } else { cfg.sampling.max_new_tokens } as f32;
    let mut order: Vec<usize> = (0..batch.rows).collect();
    let mut u = UpdateStats::default();
    for _epoch in 0..cfg.loss.epochs {
        order.shuffle(rng);
        let per = batch.rows.div_ceil(cfg.loss.minibatches);
        for rows in order.chunks(per) {
            // the minibatch's normaliser, so that the shards' losses add up to its loss
            let mask: Vec<f32> = rows.iter().flat_map(|&r| batch.mask[r * batch.len..(r + 1) * batch.len].to_vec()).collect();
            let norm = Normalizer::of_mask(&mask, batch.len, norm_len);
            // micro-batches one after the other, each cut into shards that run at once; every
            // part's loss is normalised by the whole minibatch, so the parts add up to it
            let parts: Vec<Vec<usize>> = if cfg.loss.max_tokens_per_microbatch > 0 {
                token_budget_parts(rows, |r| batch.row_len(r), cfg.loss.max_tokens_per_microbatch)
            } else {
                let micro = if cfg.loss.micro_batch_rows > 0 { cfg.loss.micro_batch_rows } else { rows.len() };
                rows.chunks(micro).map(<[usize]>::to_vec).collect()
            };
            let mut accum = GradientsAccumulator::<Qwen2<B>>::new();
            let (mut loss_v, mut clip_frac, mut entropy) = (0.0f32, 0.0f32, 0.0f32);
            for part in &parts {
                let shards: Vec<&[usize]> = crate::parallel::split_even(part.len(), cfg.train.threads).into_iter().map(|r| &part[r]).collect();
                let (grads, value, stats) = crate::parallel::sharded_grads(&policy, shards, |m, rows| {
                    // each micro-batch is cut to its longest row (right padding: the same positions)
                    let width = rows.iter().map(|&r| batch.row_len(r)).max().unwrap_or(1).max(1);
                    let (inputs, targets, mask) = batch.rows_subset(rows, width);
                    crate::checkpoint::loss_grads(m, &inputs, cfg.train.activation_checkpointing, |logits| {
                        let (loss, clip_frac, entropy) = minibatch_loss(cfg, logits, targets, mask, rows, batch.len, width, old_logp, ref_logp, adv, norm);
                        (loss, (clip_frac, entropy))
                    })
                });
                accum.accumulate(&policy, grads);
                loss_v += value;
                for (c, e) in stats {
                    clip_frac += c;
                    entropy += e;
                }
            }
            let grads = accum.grads();
            let (grads, norm) = common::clip_global_norm(&policy, grads, cfg.optim.grad_clip);
            if !loss_v.is_finite() || !norm.is_finite() {
                u.skipped += 1;
                continue;
            }
            policy = optim.step(lr, policy, grads);
            u.clip_sum += clip_frac;
            u.entropy_sum += entropy;
            u.loss_sum += loss_v;
            u.updates += 1;
        }
    }
    (policy, u)
}

/// Micro-batches of `rows` within a token budget: longest row first, each micro-batch grows
/// while its rows × its longest row stays within `budget` (what a right-padded forward
/// holds); a row longer than the budget goes alone.
fn token_budget_parts(rows: &[usize], len: impl Fn(usize) -> usize, budget: usize) -> Vec<Vec<usize>> {
    let mut sorted = rows.to_vec();
    sorted.sort_by_key(|&r| (std::cmp::Reverse(len(r)), r));
    let mut parts: Vec<Vec<usize>> = Vec::new();
    for r in sorted {
        match parts.last_mut() {
            // sorted longest first, so a part's first row is its longest
            Some(p) if (p.len() + 1) * len(p[0]) <= budget => p.push(r),
            _ => parts.push(vec![r]),
        }
    }
    parts
}

/// Rows per forward pass when log-probs are recomputed without gradients: 32, or fewer so that
/// the `[rows, len, vocab]` logits stay under 2^27 values (512 MiB in f32): at Qwen2.5's vocab
/// and 2560 tokens, 32 rows of f32 logits alone were 50 GB. `t1 plan` counts the same.
pub fn logprob_chunk_rows(len: usize, vocab: usize) -> usize {
    ((1usize << 27) / (len * vocab).max(1)).clamp(1, 32)
}

/// Prompt + response sequences, right-padded, with the response positions marked.
struct RlBatch {
    rows: usize,
    len: usize,
    ids: Vec<i64>,
    attention: Vec<bool>,
    /// `[rows, len]`: targets[t] = ids[t + 1]
    targets: Vec<i64>,
    /// `[rows, len]`: 1 where targets[t] is a response token
    mask: Vec<f32>,
    /// `[rows, len]`: the sampling-time log-prob of targets[t] (0 elsewhere)
    sampled_logp: Vec<f32>,
}

impl RlBatch {
    fn new(samples: &[Sample], pad: u32) -> Self {
        let rows = samples.len();
        let len = samples.iter().map(|s| s.prompt.len() + s.rollout.tokens.len()).max().unwrap_or(1);
        let mut b = Self { rows, len, ids: vec![pad as i64; rows * len], attention: vec![false; rows * len], targets: vec![pad as i64; rows * len], mask: vec![0.0; rows * len], sampled_logp: vec![0.0; rows * len] };
        for (r, s) in samples.iter().enumerate() {
            let seq: Vec<u32> = s.prompt.iter().chain(&s.rollout.tokens).copied().collect();
            for (t, &tok) in seq.iter().enumerate() {
                b.ids[r * len + t] = tok as i64;
                b.attention[r * len + t] = true;
                if t > 0 {
                    b.targets[r * len + t - 1] = tok as i64;
                }
            }
            for (j, lp) in s.rollout.logprobs.iter().enumerate() {
                let t = s.prompt.len() + j - 1; // position that predicts response token j
                b.mask[r * len + t] = 1.0;
                b.sampled_logp[r * len + t] = *lp;
            }
        }
        b
    }

    /// The first `width` positions of `rows`: model inputs, targets and the response mask.
    fn rows_subset(&self, rows: &[usize], width: usize) -> (Inputs, Vec<i64>, Vec<f32>) {
        let span = |r: usize| r * self.len..r * self.len + width;
        let pick = |v: &[i64]| rows.iter().flat_map(|&r| v[span(r)].to_vec()).collect::<Vec<_>>();
        let ids = pick(&self.ids);
        let targets = pick(&self.targets);
        let attention = rows.iter().flat_map(|&r| self.attention[span(r)].to_vec()).collect();
        let mask = rows.iter().flat_map(|&r| self.mask[span(r)].to_vec()).collect();
        (Inputs::new(rows.len(), width, ids, attention), targets, mask)
    }

    /// Prompt + response tokens of row `r` (the rows are right-padded).
    fn row_len(&self, r: usize) -> usize {
        self.attention[r * self.len..(r + 1) * self.len].iter().filter(|&&a| a).count()
    }

    /// log π(target) under logits / T for every position, `[rows * len]`, without gradients.
    fn logprobs<B: FusedOps>(&self, model: &Qwen2<B>, temperature: f32) -> Vec<f32> {
        let device = model.device();
        let mut out = Vec::with_capacity(self.rows * self.len);
        let all: Vec<usize> = (0..self.rows).collect();
        for rows in all.chunks(logprob_chunk_rows(self.len, model.vocab_size())) {
            let (inputs, targets, _) = self.rows_subset(rows, self.len);
            let logits = model.forward(&inputs, None).cast(DType::F32).div_scalar(temperature.max(1e-6));
            let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [rows.len(), self.len]), &device);
            out.extend(host(token_logprobs(logits, targets)));
        }
        out
    }

    fn masked_row_sum(&self, v: &[f32], r: usize) -> f32 {
        (0..self.len).map(|t| v[r * self.len + t] * self.mask[r * self.len + t]).sum()
    }

    /// Max and mean |sampling-time log-prob − recomputed log-prob| over response tokens.
    fn gap(&self, recomputed: &[f32]) -> (f32, f32) {
        let (mut max, mut sum, mut n) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..self.mask.len() {
            if self.mask[i] > 0.0 {
                let d = (self.sampled_logp[i] - recomputed[i]).abs();
                max = max.max(d);
                sum += d;
                n += 1.0;
            }
        }
        (max, sum / n.max(1.0))
    }
}

/// Loss of (a shard of) one minibatch from the policy's logits of its `rows` (`targets` and
/// `mask_v` their `[rows, len]` targets and response mask), its clip fraction and mean
/// entropy, each normalised by `norm` (the whole minibatch's), so that shards add up.
#[allow(clippy::too_many_arguments)]
fn minibatch_loss<B: FusedAutodiff>(
    cfg: &RlConfig,
    logits: Tensor<B, 3>,
    targets: Vec<i64>,
    mask_v: Vec<f32>,
    rows: &[usize],
    t: usize,
    width: usize,
    old_logp: &[f32],
    ref_logp: &[f32],
    adv: &[f32],
    norm: Normalizer,
) -> (Tensor<B, 1>, f32, f32) {
    let device = logits.device();
    let n = rows.len();
    // `old_logp` and `ref_logp` are `[rows, t]`; the micro-batch holds their first `width` positions
    let pick = |v: &[f32]| rows.iter().flat_map(|&r| v[r * t..r * t + width].to_vec()).collect::<Vec<f32>>();
    let logits = logits.cast(DType::F32).div_scalar(cfg.sampling.temperature.max(1e-6));
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [n, width]), &device);
    let logp = token_logprobs(logits.clone(), targets);
    let mask = tensor2::<B>(&mask_v, n, width, &device);
    let old = tensor2::<B>(&pick(old_logp), n, width, &device);
    let adv_t = Tensor::<B, 1>::from_data(TensorData::new(rows.iter().map(|&r| adv[r]).collect::<Vec<f32>>(), [n]), &device);
    let l = &cfg.loss;
    let (pg, clipped) = policy_loss(logp.clone(), old, adv_t, l.clip_eps_low, l.clip_eps_high);
    let mut loss = aggregate(pg, mask.clone(), l.agg, norm);
    let entropy = aggregate(token_entropy(logits), mask.clone(), AggMode::TokenMean, norm);
    if l.entropy_coef != 0.0 {
        loss = loss - entropy.clone().mul_scalar(l.entropy_coef);
    }
    if l.kl_in == KlPlacement::Loss && l.kl_coef != 0.0 {
        let r = tensor2::<B>(&pick(ref_logp), n, width, &device);
        loss = loss + aggregate(kl(logp, r, l.estimator()), mask.clone(), l.agg, norm).mul_scalar(l.kl_coef);
    }
    let clip_frac = scalar(aggregate(clipped, mask, AggMode::TokenMean, norm).detach());
    (loss, clip_frac, scalar(entropy.detach()))
}

fn tensor2<B: FusedOps>(v: &[f32], rows: usize, len: usize, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(v.to_vec(), [rows, len]), device)
}

fn host<B: FusedOps, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().expect("f32")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use t1_algo::center_leave_one_out;
    use t1_model::compare::{max_abs_diff, same_bits};
    use t1_model::Qwen2Config;

    type Ad = Autodiff<Flex>;

    /// A sample of `group` with the given training reward, grader score and penalty; its
    /// response is `tokens` (prompt [1, 2]).
    fn sample(group: usize, reward: f32, score: f32, penalised: bool, tokens: &[u32]) -> Sample {
        let rollout = Rollout { tokens: tokens.to_vec(), logprobs: vec![0.0; tokens.len()], truncated: penalised };
        let penalties = t1_reward::Penalties { overlong: penalised, ..Default::default() };
        Sample { group, prompt: vec![1, 2], rollout, reward, score, correct: score > 0.5, penalties }
    }

    /// Groups of samples from (reward, score, penalised) triples.
    fn groups(spec: &[&[(f32, f32, bool)]]) -> Vec<Sample> {
        spec.iter().enumerate().flat_map(|(g, group)| group.iter().map(move |&(r, s, p)| sample(g, r, s, p, &[3]))).collect()
    }

    fn close(got: &[f32], want: &[f32]) {
        assert!(max_abs_diff(got, want) <= 1e-6, "got {got:?}, want {want:?}");
    }

    fn cfg_with(f: impl FnOnce(&mut RlConfig)) -> RlConfig {
        let mut cfg = RlConfig::default();
        f(&mut cfg);
        cfg
    }

    #[test]
    fn rloo_and_grpo_advantages_per_group_by_hand() {
        let samples = groups(&[&[(1.0, 1.0, false), (0.0, 0.0, false), (0.0, 0.0, false), (1.0, 1.0, false)], &[(1.0, 1.0, false), (0.0, 0.0, false)]]);
        let kl = vec![0.0; samples.len()];
        let rloo = cfg_with(|c| c.loss.kl_coef = 0.0);
        // group 0: r_i − mean of the other three; group 1 on its own: 1 − 0, 0 − 1
        let t = 2.0 / 3.0;
        close(&compute_advantages(&rloo, &samples, &kl), &[t, -t, -t, t, 1.0, -1.0]);
        let grpo = cfg_with(|c| (c.loss.kl_coef, c.loss.baseline) = (0.0, Baseline::Grpo));
        // (r − 0.5) / (unbiased std + 1e-6): std sqrt(1/3) in group 0, sqrt(1/2) in group 1
        let (s0, s1) = ((1.0f32 / 3.0).sqrt() + 1e-6, 0.5f32.sqrt() + 1e-6);
        close(&compute_advantages(&grpo, &samples, &kl), &[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0, 0.5 / s1, -0.5 / s1]);
    }

    #[test]
    fn kl_in_the_reward_is_subtracted_before_the_baseline() {
        let samples = groups(&[&[(1.0, 1.0, false); 4]]);
        let kl = [1.0, 2.0, 3.0, 6.0];
        // r' = 1 − 0.5·KL = [0.5, 0, −0.5, −2] (sum −2) → RLOO [0.5 + 5/6, 0 + 2/3, −0.5 + 1/2, −2 − 0]
        let cfg = cfg_with(|c| c.loss.kl_coef = 0.5);
        close(&compute_advantages(&cfg, &samples, &kl), &[4.0 / 3.0, 2.0 / 3.0, 0.0, -2.0]);
        // why kl_on_policy_normalize was removed: the KL centred leave-one-out, then RLOO, is the
        // uncentred KL at kl_coef · K/(K−1)
        let centred = center_leave_one_out(&kl);
        let scaled = cfg_with(|c| c.loss.kl_coef = 0.5 * 4.0 / 3.0);
        close(&compute_advantages(&cfg, &samples, &centred), &compute_advantages(&scaled, &samples, &kl));
        let mut old = cfg_with(|c| c.loss.kl_on_policy_normalize = Some(true));
        old.data.train = "x.jsonl".into();
        let e = old.validate().unwrap_err().to_string();
        assert!(e.contains("kl_on_policy_normalize was removed") && e.contains("K/(K-1)"), "{e}");
        // in the loss (or with no coefficient) the KL does not touch the advantages: all rewards equal
        let in_loss = cfg_with(|c| (c.loss.kl_coef, c.loss.kl_in) = (0.5, KlPlacement::Loss));
        close(&compute_advantages(&in_loss, &samples, &kl), &[0.0; 4]);
    }

    /// KL in the reward enters as a detached penalty: REINFORCE's expected gradient is
    /// E_π[k(x) ∇_θ log π(x)]. On a categorical π = softmax(θ) this is ∇KL(π‖π_ref) (by
    /// autodiff) for k1 and not for k3, hence the k1 default there.
    #[test]
    fn k1_in_the_reward_gives_the_kl_gradient_and_k3_does_not() {
        type A = burn::backend::Autodiff<Flex>;
        let device = Default::default();
        let theta = [0.3f32, -1.2, 0.8, 0.1, -0.4];
        let reference = [0.1f32, 0.3, 0.2, 0.25, 0.15];
        let n = theta.len();
        // exact ∇KL(π‖π_ref) by autodiff
        let th = Tensor::<A, 1>::from_floats(theta, &device).require_grad();
        let logp = burn::tensor::activation::log_softmax(th.clone(), 0);
        let log_ref = Tensor::<A, 1>::from_floats(reference.map(f32::ln), &device);
        let kl_exact = (logp.clone().exp() * (logp - log_ref)).sum();
        let grads = kl_exact.backward();
        let want: Vec<f32> = th.grad(&grads).unwrap().into_data().to_vec().unwrap();
        // E_π[k(x) (e_x − π)] with k from t1_algo::kl, every category one "sample" weighted by π
        let z: f32 = theta.iter().map(|t| t.exp()).sum();
        let pi: Vec<f32> = theta.iter().map(|t| t.exp() / z).collect();
        let logpi: Vec<f32> = pi.iter().map(|p| p.ln()).collect();
        let expected_grad = |estimator: KlEstimator| -> Vec<f32> {
            let k = host(kl(tensor2::<Flex>(&logpi, 1, n, &device), tensor2(&reference.map(f32::ln), 1, n, &device), estimator));
            (0..n).map(|j| (0..n).map(|x| pi[x] * k[x] * (f32::from(x == j) - pi[j])).sum()).collect()
        };
        let scale = t1_model::compare::max_abs(&want);
        let k1 = expected_grad(KlEstimator::K1);
        assert!(max_abs_diff(&k1, &want) <= 1e-5 * scale.max(1.0), "k1: {k1:?} vs ∇KL {want:?}");
        let k3 = expected_grad(KlEstimator::K3);
        assert!(max_abs_diff(&k3, &want) > 0.1 * scale, "k3 should not give ∇KL: {k3:?} vs {want:?}");
        // the defaults
        assert_eq!(LossConfig::default().estimator(), KlEstimator::K1);
        assert_eq!(LossConfig { kl_in: KlPlacement::Loss, ..Default::default() }.estimator(), KlEstimator::K3);
        assert_eq!(LossConfig { kl_estimator: Some(KlEstimator::K2), ..Default::default() }.estimator(), KlEstimator::K2);
    }

    #[test]
    fn penalties_before_and_after_the_baseline() {
        // sample 1 is correct but overlong: its reward is the penalty value (−1), its score 1
        let samples = groups(&[&[(1.0, 1.0, false), (-1.0, 1.0, true), (0.0, 0.0, false), (0.0, 0.0, false)]]);
        let kl = [0.0; 4];
        let penalty = |after: bool| {
            cfg_with(|c| {
                c.loss.kl_coef = 0.0;
                c.reward.penalty.value = -1.0;
                c.reward.penalty_after_baseline = after;
            })
        };
        // before: the penalty is the reward in the baseline: RLOO of [1, −1, 0, 0] (sum 0)
        let f = 4.0 / 3.0;
        close(&compute_advantages(&penalty(false), &samples, &kl), &[f, -f, 0.0, 0.0]);
        // after: the baseline comes from the unpenalised scores [1, 1, 0, 0], then the penalised
        // sample takes the penalty as its advantage
        let t = 2.0 / 3.0;
        close(&compute_advantages(&penalty(true), &samples, &kl), &[t, -1.0, -t, -t]);
    }

    /// Eight samples told apart by their one response token; the first `correct` are correct.
    fn numbered(correct: usize) -> Vec<Sample> {
        (0..8).map(|i| sample(0, (i < correct) as u8 as f32, (i < correct) as u8 as f32, false, &[10 + i as u32])).collect()
    }

    fn ids(group: &[Sample]) -> Vec<u32> {
        group.iter().map(|s| s.rollout.tokens[0]).collect()
    }

    #[test]
    fn select_keeps_a_random_subset_or_a_balanced_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut all = numbered(3);
        select(&mut all, Keep::All, 2, &mut rng);
        assert_eq!(ids(&all), (10..18).collect::<Vec<_>>());
        // random: n distinct members of the group, and every member is drawn sometimes
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut g = numbered(3);
            select(&mut g, Keep::Random, 3, &mut rng);
            let mut got = ids(&g);
            got.sort();
            got.dedup();
            assert_eq!(got.len(), 3);
            assert!(got.iter().all(|t| (10..18).contains(t)));
            seen.extend(got);
        }
        assert_eq!(seen.len(), 8, "random selection never drew some samples: {seen:?}");
        // balanced: as even a split between correct and incorrect as the group allows
        for (correct, n, want_right) in [(3, 4, 2), (6, 4, 2), (1, 4, 1), (7, 4, 3), (8, 3, 3), (0, 3, 0), (4, 3, 2), (2, 5, 2)] {
            let mut g = numbered(correct);
            select(&mut g, Keep::Balanced, n, &mut rng);
            assert_eq!(g.len(), n, "{correct} correct, keep {n}");
            let right = g.iter().filter(|s| s.correct).count();
            assert_eq!(right, want_right, "{correct} correct of 8, keep {n}: kept {right} correct");
        }
    }

    /// Runs `gather_groups` with a generator that hands out the scripted groups in order
    /// (`true` = uniform) and records how many groups each round asked for.
    fn gather(rollout: &RolloutConfig, script: &[bool]) -> (Vec<Sample>, GenStats, Vec<usize>) {
        let mut next = 0usize;
        let mut asked = vec![];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (kept, stats) = gather_groups(rollout, &mut rng, |n, _| {
            asked.push(n);
            (0..n)
                .map(|_| {
                    let uniform = script[next];
                    next += 1;
                    // the group's identity is its response token
                    (0..4).map(|i| sample(99, if uniform || i % 2 == 0 { 1.0 } else { 0.0 }, 1.0, false, &[next as u32])).collect()
                })
                .collect()
        });
        (kept, stats, asked)
    }

    #[test]
    fn uniform_groups_are_replaced_for_at_most_max_extra_rounds() {
        let r = RolloutConfig { prompts_per_step: 3, samples_per_prompt: 4, drop_uniform_groups: true, max_extra_rounds: 2, ..Default::default() };
        // round 0: uniform, mixed, uniform → keeps 1; round 1: uniform, mixed → keeps 1; round 2 is
        // the last allowed: its uniform group is kept
        let (kept, stats, asked) = gather(&r, &[true, false, true, true, false, true]);
        assert_eq!(asked, vec![3, 2, 1]);
        let order: Vec<(usize, u32)> = kept.iter().map(|s| (s.group, s.rollout.tokens[0])).collect();
        assert_eq!(order, [0, 1, 2].iter().flat_map(|&g| std::iter::repeat_n((g, [2, 5, 6][g]), 4)).collect::<Vec<_>>());
        assert_eq!(stats.extra_rounds, 2);
        assert!((stats.uniform_fraction - 4.0 / 6.0).abs() < 1e-6);
        // enough mixed groups: no extra round
        let (kept, stats, asked) = gather(&r, &[false, true, false, false]);
        assert_eq!((asked, stats.extra_rounds, kept.len()), (vec![3, 1], 1, 12));
        // without dropping, or with no extra round allowed, uniform groups are kept at once
        for r in [RolloutConfig { drop_uniform_groups: false, ..r.clone() }, RolloutConfig { max_extra_rounds: 0, ..r.clone() }] {
            let (kept, stats, asked) = gather(&r, &[true, true, false]);
            assert_eq!((asked, stats.extra_rounds, kept.len()), (vec![3], 0, 12));
            assert!((stats.uniform_fraction - 2.0 / 3.0).abs() < 1e-6);
        }
    }

    fn tiny_model<B: FusedOps>(seed: u64) -> Qwen2<B> {
        let device = Default::default();
        B::seed(&device, seed);
        let mut config = Qwen2Config::tiny(32, 16, 1, 2, 1);
        config.initializer_range = 0.2;
        Qwen2::init(&config, &device)
    }

    fn weights<B: FusedOps>(m: &Qwen2<B>) -> Vec<f32> {
        t1_model::hf::named_tensors(m).into_iter().flat_map(|(_, d)| d.convert::<f32>().to_vec::<f32>().unwrap()).collect()
    }

    #[test]
    fn anchor_modes_follow_their_schedule_and_hold_on_a_skipped_step() {
        let (reference, policy) = (tiny_model::<Flex>(1), tiny_model::<Flex>(2));
        let (r, p) = (weights(&reference), weights(&policy));
        assert!(max_abs_diff(&r, &p) > 0.1);
        let after = |anchor: Anchor, step: usize, skipped: bool| weights(&advance_anchor(anchor, reference.clone(), &policy, step, skipped));
        let ema = Anchor::Ema { beta: 0.75, every: 2 };
        let blended: Vec<f32> = r.iter().zip(&p).map(|(r, p)| 0.75 * r + 0.25 * p).collect();
        assert!(same_bits(&after(ema, 1, false), &r), "ema every 2 moved at step 1");
        assert!(max_abs_diff(&after(ema, 2, false), &blended) <= 1e-6, "ema at step 2 is not 0.75·ref + 0.25·policy");
        assert!(max_abs_diff(&after(ema, 4, false), &blended) <= 1e-6);
        assert!(same_bits(&after(ema, 2, true), &r), "the anchor moved on a skipped step");
        let reset = Anchor::Reset { every: 3 };
        assert!(same_bits(&after(reset, 2, false), &r));
        assert!(same_bits(&after(reset, 3, false), &p), "reset at step 3 is not the policy");
        assert!(same_bits(&after(reset, 3, true), &r), "the anchor moved on a skipped step");
        for step in 1..5 {
            assert!(same_bits(&after(Anchor::Frozen, step, false), &r), "a frozen anchor moved at step {step}");
        }
    }

    /// Summed log-probs of each sample's response under `policy`.
    fn response_logprobs<B: FusedOps>(cfg: &RlConfig, policy: &Qwen2<B>, batch: &RlBatch) -> Vec<f32> {
        let lp = batch.logprobs(policy, cfg.sampling.temperature);
        (0..batch.rows).map(|r| batch.masked_row_sum(&lp, r)).collect()
    }

    /// One update of T1's default path (KL in the reward, on-policy normalisation, RLOO) or
    /// with the KL in the loss, on a tiny policy; `sign` multiplies the advantages. Returns
    /// the change of each sample's response log-prob.
    fn one_update(kl_in: KlPlacement, sign: f32) -> Vec<f32> {
        one_update_with(kl_in, sign, ActivationCheckpointing::None)
    }

    fn one_update_with(kl_in: KlPlacement, sign: f32, checkpointing: ActivationCheckpointing) -> Vec<f32> {
        one_update_micro(kl_in, sign, checkpointing, 0)
    }

    fn one_update_micro(kl_in: KlPlacement, sign: f32, checkpointing: ActivationCheckpointing, micro_batch_rows: usize) -> Vec<f32> {
        one_update_parts(kl_in, sign, checkpointing, micro_batch_rows, 0)
    }

    fn one_update_parts(kl_in: KlPlacement, sign: f32, checkpointing: ActivationCheckpointing, micro_batch_rows: usize, max_tokens: usize) -> Vec<f32> {
        let cfg = cfg_with(|c| {
            c.loss.micro_batch_rows = micro_batch_rows;
            c.loss.max_tokens_per_microbatch = max_tokens;
            c.train.activation_checkpointing = checkpointing;
            c.loss.kl_in = kl_in;
            c.loss.kl_coef = 0.1;
            c.loss.entropy_coef = 0.001;
            c.optim.lr = 1e-3;
        });
        let policy: Qwen2<Ad> = tiny_model(7);
        // one group: responses 0 and 1 correct (reward 1), 2 and 3 not; of several lengths
        let samples: Vec<Sample> = [&[5u32, 6, 7][..], &[8, 9, 10, 4, 4, 4, 4], &[11, 12], &[14, 15, 16, 17, 18]]
            .iter()
            .enumerate()
            .map(|(i, t)| sample(0, (i < 2) as u8 as f32, (i < 2) as u8 as f32, false, t))
            .collect();
        let batch = RlBatch::new(&samples, 0);
        let old_logp = batch.logprobs(&policy.valid(), cfg.sampling.temperature);
        // an anchor a little off the policy, so the KL term is not zero
        let anchor: Qwen2<Flex> = t1_algo::ema_update(policy.valid(), &tiny_model::<Flex>(8), 0.9);
        let ref_logp = batch.logprobs(&anchor, cfg.sampling.temperature);
        let kl_tok = host(kl(tensor2::<Flex>(&old_logp, batch.rows, batch.len, &Default::default()), tensor2(&ref_logp, batch.rows, batch.len, &Default::default()), cfg.loss.estimator()));
        let kl_seq: Vec<f32> = (0..batch.rows).map(|r| batch.masked_row_sum(&kl_tok, r)).collect();
        let adv: Vec<f32> = compute_advantages(&cfg, &samples, &kl_seq).into_iter().map(|a| a * sign).collect();
        assert_eq!(adv.iter().map(|a| *a > 0.0).collect::<Vec<_>>(), [sign > 0.0, sign > 0.0, sign < 0.0, sign < 0.0], "advantages {adv:?}");
        let before = response_logprobs(&cfg, &policy.valid(), &batch);
        let mut optim = cfg.optim.adamw().init::<Ad, Qwen2<Ad>>();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (policy, stats) = update_policy(&cfg, policy, &mut optim, &batch, &old_logp, &ref_logp, &adv, cfg.optim.lr, &mut rng);
        assert_eq!((stats.updates, stats.skipped), (1, 0));
        let after = response_logprobs(&cfg, &policy.valid(), &batch);
        after.iter().zip(&before).map(|(a, b)| a - b).collect()
    }

    #[test]
    fn layer_checkpointing_gives_the_same_rl_update() {
        // the KL in the loss, so entropy, ratio and KL terms all go through the recomputed layers
        let kept = one_update_with(KlPlacement::Loss, 1.0, ActivationCheckpointing::None);
        let layered = one_update_with(KlPlacement::Loss, 1.0, ActivationCheckpointing::Layer);
        let d = max_abs_diff(&kept, &layered);
        assert!(d <= 1e-6 * t1_model::compare::max_abs(&kept), "log-prob changes differ by {d:e}: {kept:?} vs {layered:?}");
    }

    #[test]
    fn token_budget_micro_batches_give_the_same_rl_update() {
        let whole = one_update_with(KlPlacement::Loss, 1.0, ActivationCheckpointing::None);
        // prompts of 2 tokens (see `sample`): rows of 5, 9, 4 and 7 tokens
        for budget in [1, 12, 16] {
            let parts = one_update_parts(KlPlacement::Loss, 1.0, ActivationCheckpointing::None, 0, budget);
            let d = max_abs_diff(&whole, &parts);
            assert!(d <= 1e-6 * t1_model::compare::max_abs(&whole), "budget {budget}: log-prob changes differ by {d:e}: {whole:?} vs {parts:?}");
        }
    }

    #[test]
    fn token_budget_groups_rows_longest_first_within_the_budget() {
        let lens = [4usize, 8, 3, 6, 2];
        let parts = token_budget_parts(&[0, 1, 2, 3, 4], |r| lens[r], 12);
        // 8 alone (2 × 8 > 12), then 6 + 4 (2 × 6), then 3 + 2 (2 × 3); every row once
        assert_eq!(parts, vec![vec![1], vec![3, 0], vec![2, 4]]);
        assert_eq!(token_budget_parts(&[0, 1], |r| lens[r], 1), vec![vec![1], vec![0]], "rows over the budget go alone");
        let mut cfg = RlConfig::default();
        cfg.data.train = "x.jsonl".into();
        cfg.loss.micro_batch_rows = 2;
        cfg.loss.max_tokens_per_microbatch = 100;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("set one"), "{e}");
    }

    #[test]
    fn micro_batches_give_the_same_rl_update() {
        let whole = one_update_with(KlPlacement::Loss, 1.0, ActivationCheckpointing::None);
        for rows in [1, 3] {
            let parts = one_update_micro(KlPlacement::Loss, 1.0, ActivationCheckpointing::None, rows);
            let d = max_abs_diff(&whole, &parts);
            assert!(d <= 1e-6 * t1_model::compare::max_abs(&whole), "{rows}-row micro-batches: log-prob changes differ by {d:e}: {whole:?} vs {parts:?}");
        }
    }

    #[test]
    fn an_rl_step_raises_the_rewarded_responses_and_lowers_the_others() {
        for kl_in in [KlPlacement::Reward, KlPlacement::Loss] {
            let d = one_update(kl_in, 1.0);
            println!("{kl_in:?}: change of the response log-probs {d:?}");
            assert!(d[0] > 0.0 && d[1] > 0.0, "{kl_in:?}: rewarded responses did not become likelier: {d:?}");
            assert!(d[2] < 0.0 && d[3] < 0.0, "{kl_in:?}: unrewarded responses did not become less likely: {d:?}");
            // the check is not blind: with the advantages' sign flipped every change reverses
            let flipped = one_update(kl_in, -1.0);
            assert!(flipped[0] < 0.0 && flipped[1] < 0.0 && flipped[2] > 0.0 && flipped[3] > 0.0, "{kl_in:?} flipped: {flipped:?}");
        }
    }
}
