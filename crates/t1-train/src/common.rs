//! What the SFT and RL loops share: where the model comes from and its initialisation, the
//! optimiser's settings, the learning-rate schedule, global-norm gradient clipping, metrics
//! JSONL, progress bars, and checkpoints with everything a resumed run needs. It imports no
//! other module of this crate but the error type.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};
use t1_data::ChatTokenizer;
use t1_model::{FusedAutodiff, FusedOps, Qwen2, Qwen2Config, SaveOptions, WeightDtype};

use crate::error::TrainError;

/// Where the initial weights come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSource {
    /// A Hugging Face checkpoint directory; empty = random init from `[model.scratch]`.
    pub checkpoint: PathBuf,
    /// f32, or bf16 on flex/cuda.
    pub dtype: String,
    /// A PEFT LoRA adapter directory to continue training on `checkpoint` (LoRA is then on,
    /// with the adapter's rank, alpha and targets); empty = none.
    pub adapter: PathBuf,
    pub scratch: ScratchModel,
}

/// A Qwen2 architecture for training from scratch (vocab_size comes from the tokenizer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScratchModel {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub tie_word_embeddings: bool,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub initializer_range: f64,
}

/// AdamW with warmup + cosine decay and global-norm clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    /// The cosine decays to lr * min_lr_ratio.
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Global L2 norm clip of the gradients (0 = off).
    pub grad_clip: f32,
    /// Keep f32 master weights and f32 AdamW moments while forward and backward run in the
    /// model's bf16 (PyTorch AMP style). Unset = on for bf16; false = pure bf16, whose updates
    /// round away at small learning rates. An error with f32 weights.
    pub master_weights: Option<bool>,
}

impl Default for ModelSource {
    fn default() -> Self {
        Self { checkpoint: PathBuf::new(), dtype: "f32".into(), adapter: PathBuf::new(), scratch: ScratchModel::default() }
    }
}

impl Default for ScratchModel {
    fn default() -> Self {
        Self {
            hidden_size: 128,
            intermediate_size: 384,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            tie_word_embeddings: true,
            rope_theta: 10000.0,
            max_position_embeddings: 1024,
            initializer_range: 0.02,
        }
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self { lr: 1e-5, min_lr_ratio: 0.0, warmup_steps: 0, weight_decay: 0.0, beta1: 0.9, beta2: 0.95, eps: 1e-8, grad_clip: 1.0, master_weights: None }
    }
}

impl OptimConfig {
    /// burn's AdamW with these moments, epsilon and (decoupled) weight decay.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig::new().with_beta_1(self.beta1).with_beta_2(self.beta2).with_epsilon(self.eps).with_weight_decay(self.weight_decay)
    }
}

/// The model, tokenizer and its config, from a checkpoint or from scratch.
pub fn init_model<B: FusedOps>(
    source: &ModelSource,
    tokenizer_path: &Path,
    device: &B::Device,
) -> Result<(Qwen2Config, Qwen2<B>, ChatTokenizer), TrainError> {
    let dtype = WeightDtype::parse(&source.dtype).unwrap_or(WeightDtype::F32);
    let tok_path = if tokenizer_path.as_os_str().is_empty() {
        source.checkpoint.join(TOKENIZER_FILE)
    } else {
        tokenizer_path.to_path_buf()
    };
    let tokenizer = ChatTokenizer::from_file(&tok_path)?;
    if source.checkpoint.as_os_str().is_empty() {
        let config = scratch_config(&source.scratch, &tokenizer)?;
        let model = Qwen2::init(&config, device);
        let model = cast(model, dtype.burn());
        Ok((config, model, tokenizer))
    } else {
        let (config, model) = t1_model::load(&source.checkpoint, dtype, device)?;
        tokenizer.check_model_vocab(config.vocab_size).map_err(|e| TrainError::Checkpoint {
            path: source.checkpoint.clone(),
            message: format!("{} does not fit it: {e}", tok_path.display()),
        })?;
        Ok((config, model, tokenizer))
    }
}

/// The architecture `[model.scratch]` describes, with the tokenizer's vocabulary and EOS.
pub fn scratch_config(s: &ScratchModel, tokenizer: &ChatTokenizer) -> Result<Qwen2Config, TrainError> {
    let mut config = Qwen2Config::tiny(tokenizer.vocab_size(), s.hidden_size, s.num_hidden_layers, s.num_attention_heads, s.num_key_value_heads);
    config.intermediate_size = s.intermediate_size;
    config.tie_word_embeddings = s.tie_word_embeddings;
    config.rope_theta = Some(s.rope_theta);
    config.max_position_embeddings = s.max_position_embeddings;
    config.initializer_range = s.initializer_range;
    config.eos_token_id = Some(tokenizer.eos_id().into());
    config.bos_token_id = None;
    config.validate().map_err(|m| TrainError::Config { origin: "[model.scratch]".into(), message: m })?;
    Ok(config)
}

/// The model with every float parameter of the base cast to `dtype` (ids kept); LoRA adapters
/// stay f32.
pub fn cast<B: FusedOps>(mut model: Qwen2<B>, dtype: DType) -> Qwen2<B> {
    struct Cast(DType);
    impl<B: FusedOps> ModuleMapper<B> for Cast {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, t, m) = p.consume();
            let t = match (t.dtype() == self.0, t.is_require_grad()) {
                (true, _) => t,
                // a trained parameter stays a graph leaf
                (false, true) => t.cast(self.0).detach().require_grad(),
                (false, false) => t.cast(self.0),
            };
            Param::from_mapped_value(id, t, m)
        }
    }
    let lora = model.lora.take();
    let mut model = model.map(&mut Cast(dtype));
    model.lora = lora;
    model
}

/// Writes `out_dir/final`: the model (or a LoRA run's adapter) and the tokenizer, under a
/// temporary name renamed into place, so what was there before (an earlier run's final model)
/// is replaced whole and never mixed with the new files.
/// `extra` are subdirectories written beside it (the f32 master weights of a bf16 run, which
/// a run started from this directory then continues from).
pub fn save_final<B: FusedOps>(model: &Qwen2<B>, config: &Qwen2Config, tokenizer: &ChatTokenizer, out_dir: &Path, extra: &[(&str, &Qwen2<B>)]) -> Result<PathBuf, TrainError> {
    let dir = out_dir.join("final");
    let tmp = out_dir.join(".final.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    save_model_dir(model, config, &tmp)?;
    for (name, m) in extra {
        save_model_dir(*m, config, &tmp.join(name))?;
    }
    tokenizer.save(&tmp.join(TOKENIZER_FILE))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| TrainError::io(&dir, e))?;
    Ok(dir)
}

/// Writes a model directory: the HF checkpoint (`config.json` + weights), or for a LoRA model
/// its adapter in PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`).
pub fn save_model_dir<B: FusedOps>(model: &Qwen2<B>, config: &Qwen2Config, dir: &Path) -> Result<(), TrainError> {
    match model.lora {
        Some(_) => t1_model::save_adapter(model, dir)?,
        None => t1_model::save(model, config, dir, &SaveOptions::default())?,
    }
    Ok(())
}

/// The ids and ranks of a model's float parameters.
pub fn param_ids<B: FusedOps, M: Module<B>>(model: &M) -> Vec<(ParamId, usize)> {
    struct Ids(Vec<(ParamId, usize)>);
    impl<B: FusedOps> ModuleVisitor<B> for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push((param.id, D));
        }
    }
    let mut ids = Ids(vec![]);
    model.visit(&mut ids);
    ids.0
}

/// The value of a one-element tensor (NaN when it cannot be read).
pub fn scalar<B: FusedOps>(t: Tensor<B, 1>) -> f32 {
    t.into_data().convert::<f32>().to_vec::<f32>().map(|v| v[0]).unwrap_or(f32::NAN)
}

/// Linear warmup to `peak` over `warmup` steps, then cosine decay to `peak * min_ratio` at `total`.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let min = peak * min_ratio;
    min + (peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Scales all gradients so that their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`; burn's own clipping is per parameter). Returns the norm before clipping,
/// which is NaN or infinite when a gradient is: the caller then skips the step.
pub fn clip_global_norm<B: FusedAutodiff, M: AutodiffModule<B>>(
    model: &M,
    mut grads: GradientsParams,
    max_norm: f32,
) -> (GradientsParams, f32) {
    let ids = param_ids::<B, M>(model);
    // the norm in f32 whatever the gradients' dtype (a bf16 sum of squares is off by percents)
    let mut squares: Vec<Tensor<B::InnerBackend, 1>> = vec![];
    for &(id, d) in &ids {
        let sq = match d {
            1 => grads.get::<B::InnerBackend, 1>(id).map(|g| f32_of(g).powf_scalar(2.0).sum()),
            2 => grads.get::<B::InnerBackend, 2>(id).map(|g| f32_of(g).powf_scalar(2.0).sum()),
            _ => None,
        };
        squares.extend(sq);
    }
    if squares.is_empty() {
        return (grads, 0.0);
    }
    let norm = Tensor::cat(squares, 0).sum().sqrt().into_scalar().to_string().parse::<f32>().unwrap_or(f32::NAN);
    if norm.is_finite() && max_norm > 0.0 && norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f64;
        for &(id, d) in &ids {
            match d {
                1 => {
                    if let Some(g) = grads.remove::<B::InnerBackend, 1>(id) {
                        grads.register(id, g.mul_scalar(scale));
                    }
                }
                2 => {
                    if let Some(g) = grads.remove::<B::InnerBackend, 2>(id) {
                        grads.register(id, g.mul_scalar(scale));
                    }
                }
                _ => {}
            }
        }
    }
    (grads, norm)
}

fn f32_of<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    if t.dtype() == DType::F32 { t } else { t.cast(DType::F32) }
}

/// Appends one JSON object per line and flushes it, so a killed run keeps its metrics.
pub struct Metrics {
    file: File,
}

impl Metrics {
    pub fn open(path: &Path, append: bool) -> Result<Self, TrainError> {
        let file = OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok(Self { file })
    }

    pub fn log(&mut self, value: &serde_json::Value) {
        // metrics are best effort: a full disk must not kill the run before its checkpoint
        let _ = writeln!(self.file, "{value}").and_then(|_| self.file.flush());
    }
}

/// A progress bar with a message slot (hidden when stderr is not a terminal).
pub fn progress(total: usize, start: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}] {{msg}}"
        ))
        .expect("valid template"),
    );
    bar.set_position(start as u64);
    bar
}

/// Where a run is, saved in every checkpoint as `trainer_state.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps done.
    pub step: usize,
    /// Data cursor: epoch and the next batch index within it (SFT), or prompts consumed (RL).
    pub epoch: usize,
    pub cursor: usize,
    /// Steps skipped because of a non-finite loss or gradient.
    pub skipped_steps: usize,
    /// RNG state for sampling (RL): the seed of the stream and how many words were drawn.
    pub rng_seed: u64,
    pub rng_word_pos: u128,
}

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer";
pub const RUN_CONFIG_FILE: &str = "run_config.toml";
/// Every file of a checkpoint with its size in bytes, written just before the state file.
pub const MANIFEST_FILE: &str = "manifest.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Writes `out_dir/checkpoint-{step}`: the model (HF layout, or a LoRA run's adapter in
/// PEFT's), tokenizer, optimiser state,
/// trainer state and resolved run config. The directory is written under a temporary name
/// and renamed when complete, so a crash leaves the previous checkpoint intact; only the
/// newest `keep` checkpoints are kept.
#[allow(clippy::too_many_arguments)]
pub fn save_checkpoint<B: FusedAutodiff, O: burn::optim::Optimizer<Qwen2<B>, B>>(
    out_dir: &Path,
    model: &Qwen2<B>,
    config: &Qwen2Config,
    tokenizer: &ChatTokenizer,
    optim: &O,
    state: &TrainerState,
    run_config: &str,
    extra: &[(&str, &Qwen2<B::InnerBackend>)],
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let final_dir = out_dir.join(format!("checkpoint-{:06}", state.step));
    let tmp = out_dir.join(format!(".checkpoint-{:06}.tmp", state.step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    save_model_dir(&model.valid(), config, &tmp)?;
    for (name, m) in extra {
        // a LoRA run's frozen anchor is the base alone: nothing to save
        if model.lora.is_none() || m.lora.is_some() {
            save_model_dir(*m, config, &tmp.join(name))?;
        }
    }
    tokenizer.save(&tmp.join(TOKENIZER_FILE))?;
    BinFileRecorder::<FullPrecisionSettings>::new()
        .record(optim.to_record(), tmp.join(OPTIMIZER_FILE))
        .map_err(|e| TrainError::Checkpoint { path: tmp.clone(), message: e.to_string() })?;
    std::fs::write(tmp.join(RUN_CONFIG_FILE), run_config).map_err(|e| TrainError::io(&tmp, e))?;
    let manifest = serde_json::to_string_pretty(&file_sizes(&tmp, &tmp).map_err(|e| TrainError::io(&tmp, e))?).expect("json");
    t1_model::hf::write_atomic(&tmp.join(MANIFEST_FILE), manifest.as_bytes())?;
    sync_tree(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    // the state file is written last: its presence (and a manifest that matches the files)
    // marks a complete checkpoint
    t1_model::hf::write_atomic(&tmp.join(STATE_FILE), serde_json::to_string_pretty(state).expect("json").as_bytes())?;
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
    if let Ok(f) = File::open(out_dir) {
        let _ = f.sync_all();
    }
    let all = list_checkpoints(out_dir);
    for old in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        // unmark it first, so that a kill during the removal leaves no half-deleted
        // checkpoint that looks complete
        let _ = std::fs::remove_file(old.join(STATE_FILE));
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(final_dir)
}

/// Flushes every file under `dir` (and the directories themselves) to disk.
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            File::open(&path)?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()
}

/// Size of every file under `dir`, keyed by its path relative to `root` ('/'-separated).
fn file_sizes(root: &Path, dir: &Path) -> std::io::Result<std::collections::BTreeMap<String, u64>> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(file_sizes(root, &path)?);
        } else {
            let rel = path.strip_prefix(root).unwrap_or(&path).components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            out.insert(rel, std::fs::metadata(&path)?.len());
        }
    }
    Ok(out)
}

/// Whether every file the checkpoint's manifest lists is there with its recorded size. A
/// checkpoint written before manifests existed (no manifest file) passes.
pub fn manifest_matches(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(MANIFEST_FILE)) else {
        return !dir.join(MANIFEST_FILE).exists();
    };
    let Ok(listed) = serde_json::from_str::<std::collections::BTreeMap<String, u64>>(&text) else {
        return false;
    };
    listed.iter().all(|(rel, &size)| std::fs::metadata(dir.join(rel)).map(|m| m.len() == size).unwrap_or(false))
}

/// Complete checkpoints of a run, oldest first: a state file and a manifest that matches the
/// files on disk (a checkpoint damaged after it was written is skipped with a warning).
pub fn list_checkpoints(out_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(out_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            if !e.path().join(STATE_FILE).exists() {
                return None;
            }
            if !manifest_matches(&e.path()) {
                eprintln!("warning: {} does not match its {MANIFEST_FILE} (a file is missing or has another size); skipping it", e.path().display());
                return None;
            }
            Some((step, e.path()))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

/// Reads the trainer state and optimiser record of a checkpoint into `optim`.
pub fn load_resume_state<B: FusedAutodiff, O: burn::optim::Optimizer<Qwen2<B>, B>>(
    dir: &Path,
    optim: O,
    device: &B::Device,
) -> Result<(O, TrainerState), TrainError> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| TrainError::Checkpoint { path: path.clone(), message: e.to_string() })?;
    let record = BinFileRecorder::<FullPrecisionSettings>::new()
        .load(dir.join(OPTIMIZER_FILE), device)
        .map_err(|e| TrainError::Checkpoint { path: dir.join(OPTIMIZER_FILE), message: e.to_string() })?;
    Ok((optim.load_record(record), state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        assert!((lr_at(0, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 100, 10, 1.0, 0.1) - 0.55).abs() < 1e-9); // half way: (1 + 0.1) / 2
        assert!((lr_at(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn resume_skips_a_checkpoint_that_no_longer_matches_its_manifest() {
        let out = tempfile::tempdir().unwrap();
        for step in [1, 2] {
            let dir = out.path().join(format!("checkpoint-{step:06}"));
            std::fs::create_dir_all(dir.join("reference")).unwrap();
            std::fs::write(dir.join("model.safetensors"), vec![7u8; 100]).unwrap();
            std::fs::write(dir.join("reference/model.safetensors"), vec![7u8; 50]).unwrap();
            let sizes = file_sizes(&dir, &dir).unwrap();
            assert_eq!(sizes.get("reference/model.safetensors"), Some(&50));
            std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_string(&sizes).unwrap()).unwrap();
            std::fs::write(dir.join(STATE_FILE), "{}").unwrap();
        }
        let names = |v: Vec<PathBuf>| v.iter().map(|p| p.file_name().unwrap().to_string_lossy().to_string()).collect::<Vec<_>>();
        assert_eq!(names(list_checkpoints(out.path())), ["checkpoint-000001", "checkpoint-000002"]);
        // a truncated weight file (disk full, a bad copy) disqualifies the newest checkpoint
        std::fs::write(out.path().join("checkpoint-000002/reference/model.safetensors"), vec![7u8; 10]).unwrap();
        assert_eq!(names(list_checkpoints(out.path())), ["checkpoint-000001"]);
        std::fs::remove_file(out.path().join("checkpoint-000001/model.safetensors")).unwrap();
        assert!(list_checkpoints(out.path()).is_empty());
    }
}
