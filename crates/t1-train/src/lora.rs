//! LoRA training, as PEFT users run it: the base is frozen (no gradients and no optimiser state
//! exist for it, and it may be bf16), the adapters are f32 and AdamW trains them alone.
//!
//! A run uses LoRA when its config has a `[lora]` table, or when `model.adapter` names a PEFT
//! adapter to continue training (its `adapter_config.json` then gives the rank, alpha and
//! targets, and a `[lora]` table must agree with it). Checkpoints and `final/` hold the
//! adapter in PEFT's layout, never the base.

use std::path::Path;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::tensor::Tensor;
use t1_model::{FusedAutodiff, LoraConfig, Qwen2};

use crate::checkpoint::ActivationCheckpointing;
use crate::common::ModelSource;
use crate::error::TrainError;

/// The LoRA settings of a run: `[lora]` (`config`), or those of the adapter in
/// `model.adapter`, which a `[lora]` table must match (its dropout applies); `None` for full
/// fine-tuning.
pub fn run_lora(source: &ModelSource, config: Option<&LoraConfig>) -> Result<Option<LoraConfig>, TrainError> {
    let bad = |origin: &str, message: String| TrainError::Config { origin: origin.into(), message };
    if let Some(c) = config {
        c.validate().map_err(|m| bad("[lora]", m))?;
    }
    if source.adapter.as_os_str().is_empty() {
        return Ok(config.cloned());
    }
    let saved = t1_model::read_adapter_config(&source.adapter)?;
    let Some(c) = config else { return Ok(Some(saved)) };
    let same_targets = c.targets().ok() == saved.targets().ok();
    if c.r != saved.r || c.alpha != saved.alpha || c.use_rslora != saved.use_rslora || !same_targets {
        return Err(bad(
            "[lora]",
            format!(
                "gives r = {}, alpha = {}, use_rslora = {}, target_modules = {:?} (keys not written take t1's defaults), but the adapter it continues ({}) has r = {}, alpha = {}, use_rslora = {}, target_modules = {:?}: write the adapter's values in [lora], or leave [lora] out (the adapter's lora_dropout then applies)",
                c.r,
                c.alpha,
                c.use_rslora,
                c.target_modules,
                source.adapter.display(),
                saved.r,
                saved.alpha,
                saved.use_rslora,
                saved.target_modules
            ),
        ));
    }
    Ok(Some(LoraConfig { dropout: c.dropout, ..saved }))
}

/// `model` (the base, as loaded) with the run's adapters attached and trainable: those of
/// `model.adapter`, or fresh ones (PEFT's init, drawn from the backend's seeded RNG).
pub fn attach<B: FusedAutodiff>(model: Qwen2<B>, source: &ModelSource, cfg: &LoraConfig) -> Result<Qwen2<B>, TrainError> {
    let base = model.valid();
    let mut inner = if source.adapter.as_os_str().is_empty() {
        let name = source.checkpoint.display().to_string();
        base.with_new_lora(cfg, &name).map_err(|m| TrainError::Config { origin: "[lora]".into(), message: m })?
    } else {
        t1_model::load_adapter(base, &source.adapter)?
    };
    if let Some(l) = inner.lora.as_mut() {
        l.set_dropout(cfg.dropout);
    }
    Ok(trainable(Qwen2::from_inner(inner)))
}

/// The model with the adapters of checkpoint `dir` in place of `current`'s (same base, same
/// dropout, same parameter ids), for resuming.
pub fn resume<B: FusedAutodiff>(current: &Qwen2<B>, dir: &Path) -> Result<Qwen2<B>, TrainError> {
    let mut base = current.valid();
    let dropout = base.lora.take().map(|l| l.dropout).unwrap_or(0.0);
    let mut inner = t1_model::load_adapter(base, dir)?;
    if let Some(l) = inner.lora.as_mut() {
        l.set_dropout(dropout);
    }
    Ok(trainable(Qwen2::from_inner(inner)))
}

/// Every base parameter frozen, every adapter parameter a leaf that requires gradients.
pub fn trainable<B: FusedAutodiff>(model: Qwen2<B>) -> Qwen2<B> {
    struct RequireGrad;
    impl<B: FusedAutodiff> ModuleMapper<B> for RequireGrad {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, t, m) = p.consume();
            Param::from_mapped_value(id, t.require_grad(), m)
        }
    }
    let mut model = model.no_grad();
    model.lora = model.lora.take().map(|l| l.map(&mut RequireGrad));
    model
}

/// Checks a run's `[lora]`: its own fields, and dropout against layer checkpointing (dropout
/// draws from the backend's RNG, so it cannot replay the same masks when checkpointing
/// recomputes a layer: the two together are refused).
/// `source` is where the base comes from: LoRA needs a checkpoint (a random base would never be
/// saved, since checkpoints hold the adapters alone).
pub fn validate(cfg: Option<&LoraConfig>, source: &ModelSource, mode: ActivationCheckpointing) -> Result<(), TrainError> {
    if let Some(c) = cfg {
        c.validate().map_err(|message| TrainError::Config { origin: "[lora]".into(), message })?;
    }
    let lora = cfg.is_some() || !source.adapter.as_os_str().is_empty();
    if lora && source.checkpoint.as_os_str().is_empty() {
        return Err(TrainError::Config {
            origin: "model.checkpoint".into(),
            message: "is empty, so the base would be a random init that LoRA freezes and never saves (checkpoints hold only the adapters): give a base checkpoint, or remove [lora] / model.adapter to train every weight".into(),
        });
    }
    match cfg {
        Some(c) if c.dropout > 0.0 && mode == ActivationCheckpointing::Layer => Err(TrainError::Config {
            origin: "lora.dropout".into(),
            message: format!(
                "{} with train.activation_checkpointing = \"layer\": the recomputed layer would draw other dropout masks than the forward pass; set lora.dropout = 0 or turn checkpointing off",
                c.dropout
            ),
        }),
        _ => Ok(()),
    }
}

/// Reseeds the backend's RNG from (seed, step) before a step whose adapters use dropout, so a
/// resumed run draws the masks the uninterrupted one would (with one data-parallel shard; the
/// shards of `train.threads > 1` share the RNG in the order they run).
pub fn seed_dropout<B: FusedAutodiff>(model: &Qwen2<B>, device: &B::Device, seed: u64, step: usize) {
    if model.lora.as_ref().is_some_and(|l| l.dropout > 0.0) {
        B::seed(device, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(step as u64));
    }
}
