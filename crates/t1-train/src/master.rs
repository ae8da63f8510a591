//! Mixed precision the way PyTorch AMP and FSDP users know it: forward and backward run on a
//! bf16 copy of the weights, while f32 master weights and f32 AdamW moments take the update.
//!
//! Pure bf16 training loses its updates: a step smaller than half a bf16 spacing (about 2^-9
//! of the weight) rounds away, and at T1's learning rates (1e-5 SFT, 1.5e-6 RL) that is most
//! steps of most weights. [`MasterWeights`] is an [`Optimizer`] over the bf16 model: each step
//! casts the gradients to f32, steps the f32 master with AdamW, and returns the master cast
//! back to bf16. With f32 weights (or `optim.master_weights = false`) it is plain AdamW.
//!
//! Checkpoints keep the bf16 model in the Hugging Face layout; the f32 master is saved next to
//! the optimiser state in `master/` (an f32 Hugging Face directory), so a resumed run continues
//! from the same f32 weights and is exact.

use t1_model::{FusedAutodiff, FusedOps};
use burn::module::{AutodiffModule, Module, ModuleMapper, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, GradientsAccumulator, GradientsParams, MultiGradientsParams, Optimizer};
use burn::tensor::{DType, Tensor};
use std::path::Path;

use t1_data::ChatTokenizer;
use t1_model::{LoraConfig, Qwen2, Qwen2Config, WeightDtype};

use crate::common::{cast, init_model, ModelSource, OptimConfig};
use crate::error::TrainError;

/// The checkpoint subdirectory that holds the f32 master weights.
pub const MASTER_DIR: &str = "master";

/// Whether a run with weights in `dtype` keeps f32 master weights: `optim.master_weights`, or,
/// when unset, yes for bf16/f16 and no for f32. Master weights with f32 weights are an error.
/// With LoRA there are none (the base is frozen and the adapters are f32); asking for them is
/// an error.
pub fn uses_master_weights(optim: &OptimConfig, dtype: WeightDtype, lora: bool) -> Result<bool, TrainError> {
    if lora {
        return match optim.master_weights {
            Some(true) => Err(TrainError::Config {
                origin: "optim.master_weights".into(),
                message: "LoRA trains f32 adapters on a frozen base, so there is nothing for master weights to keep: remove optim.master_weights".into(),
            }),
            _ => Ok(false),
        };
    }
    match (optim.master_weights, dtype) {
        (Some(true), WeightDtype::F32) => Err(TrainError::Config {
            origin: "optim.master_weights".into(),
            message: "master weights are for bf16 training (model.dtype = \"bf16\"); f32 weights are their own master: remove optim.master_weights or set model.dtype = \"bf16\"".into(),
        }),
        (Some(on), _) => Ok(on),
        (None, dtype) => Ok(dtype != WeightDtype::F32),
    }
}

/// AdamW over a model whose weights may be a low-precision copy of f32 master weights.
#[derive(Clone)]
pub struct MasterWeights<B: FusedAutodiff> {
    adamw: OptimizerAdaptor<AdamW, Qwen2<B>, B>,
    /// The f32 weights the optimiser steps (None: it steps the model itself).
    master: Option<Qwen2<B>>,
    /// The dtype forward and backward run in.
    compute: DType,
}

impl<B: FusedAutodiff> MasterWeights<B> {
    /// Plain AdamW on the model's own weights (f32, or pure bf16).
    pub fn plain(cfg: &OptimConfig) -> Self {
        Self { adamw: cfg.adamw().init::<B, Qwen2<B>>(), master: None, compute: DType::F32 }
    }

    /// AdamW on f32 master weights taken from `weights` (cast to f32 if they are not), and the
    /// model to train: `weights` cast to `compute`, with the same parameter ids.
    pub fn mixed(cfg: &OptimConfig, weights: Qwen2<B>, compute: WeightDtype) -> (Qwen2<B>, Self) {
        let master = leaf(cast(weights.valid(), DType::F32));
        let model = leaf(cast(master.valid(), compute.burn()));
        (model, Self { adamw: cfg.adamw().init::<B, Qwen2<B>>(), master: Some(master), compute: compute.burn() })
    }

    /// The f32 master weights, when this run keeps them.
    pub fn master(&self) -> Option<Qwen2<B::InnerBackend>> {
        self.master.as_ref().map(|m| m.valid())
    }

    /// Replaces the master weights (resume); the returned model is their compute-dtype copy.
    pub fn set_master(&mut self, weights: Qwen2<B::InnerBackend>) -> Option<Qwen2<B>> {
        self.master.as_ref()?;
        let master = cast(weights, DType::F32);
        let model = leaf(cast(master.clone(), self.compute));
        self.master = Some(leaf(master));
        Some(model)
    }

    /// The weights the update is measured on: the master when there is one, else `model`.
    pub fn weights(&self, model: &Qwen2<B>) -> Qwen2<B::InnerBackend> {
        self.master().unwrap_or_else(|| model.valid())
    }
}

impl<B: FusedAutodiff> Optimizer<Qwen2<B>, B> for MasterWeights<B> {
    type Record = <OptimizerAdaptor<AdamW, Qwen2<B>, B> as Optimizer<Qwen2<B>, B>>::Record;

    fn step(&mut self, lr: f64, module: Qwen2<B>, grads: GradientsParams) -> Qwen2<B> {
        let Some(master) = self.master.take() else {
            // pure low precision (or f32 LoRA adapters on a bf16 base): each gradient in its
            // parameter's own dtype
            let grads = cast_grads(&module, grads, None);
            return self.adamw.step(lr, module, grads);
        };
        let grads = cast_grads(&module, grads, Some(DType::F32));
        let master = self.adamw.step(lr, master, grads);
        let model = leaf(cast(master.valid(), self.compute));
        self.master = Some(master);
        model
    }

    fn step_multi(&mut self, lr: f64, module: Qwen2<B>, grads: MultiGradientsParams) -> Qwen2<B> {
        let mut accum = GradientsAccumulator::<Qwen2<B>>::new();
        for (g, _) in grads.grads {
            accum.accumulate(&module, g);
        }
        self.step(lr, module, accum.grads())
    }

    fn to_record(&self) -> Self::Record {
        self.adamw.to_record()
    }

    fn load_record(mut self, record: Self::Record) -> Self {
        self.adamw = self.adamw.load_record(record);
        self
    }
}

/// An autodiff model to train from inner weights: every float parameter a leaf that requires
/// gradients (`from_inner` alone keeps the flag of the inner module, which a cast has lost).
pub fn leaf<B: FusedAutodiff>(inner: Qwen2<B::InnerBackend>) -> Qwen2<B> {
    struct RequireGrad;
    impl<B: FusedAutodiff> ModuleMapper<B> for RequireGrad {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, t, m) = p.consume();
            Param::from_mapped_value(id, t.require_grad(), m)
        }
    }
    Qwen2::<B>::from_inner(inner).map(&mut RequireGrad)
}

/// The gradients with every tensor cast to `dtype`, or to its parameter's dtype when `None`
/// (one parameter at a time, so the peak is one parameter's copy).
pub fn cast_grads<B: FusedAutodiff>(model: &Qwen2<B>, mut grads: GradientsParams, dtype: Option<DType>) -> GradientsParams {
    fn one<B: FusedOps, const D: usize>(grads: &mut GradientsParams, id: ParamId, dtype: DType) {
        if let Some(g) = grads.remove::<B, D>(id) {
            let g = if g.dtype() == dtype { g } else { g.cast(dtype) };
            grads.register(id, g);
        }
    }
    for (id, d, own) in param_dtypes::<B>(model) {
        let dtype = dtype.unwrap_or(own);
        match d {
            1 => one::<B::InnerBackend, 1>(&mut grads, id, dtype),
            2 => one::<B::InnerBackend, 2>(&mut grads, id, dtype),
            3 => one::<B::InnerBackend, 3>(&mut grads, id, dtype),
            _ => {}
        }
    }
    grads
}

/// The id, rank and dtype of each float parameter.
fn param_dtypes<B: FusedAutodiff>(model: &Qwen2<B>) -> Vec<(ParamId, usize, DType)> {
    struct Dtypes(Vec<(ParamId, usize, DType)>);
    impl<B: FusedAutodiff> burn::module::ModuleVisitor<B> for Dtypes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push((param.id, D, param.val().dtype()));
        }
    }
    let mut v = Dtypes(vec![]);
    model.visit(&mut v);
    v.0
}

/// The model to train (in `source.dtype`), its tokenizer and config, and its optimiser: with
/// master weights, the f32 master is read from the checkpoint at full precision before the
/// bf16 copy is made.
///
/// With `lora` the base is loaded in `source.dtype` and frozen, and the adapters (fresh, or
/// `source.adapter`) are what AdamW trains.
pub fn init_trainable<B: FusedAutodiff>(
    source: &ModelSource,
    optim: &OptimConfig,
    lora: Option<&LoraConfig>,
    tokenizer: &Path,
    device: &B::Device,
) -> Result<(Qwen2Config, Qwen2<B>, ChatTokenizer, MasterWeights<B>), TrainError> {
    let dtype = parse_dtype(source)?;
    if let Some(lora) = lora {
        uses_master_weights(optim, dtype, true)?;
        let (config, base, tok) = init_model::<B>(source, tokenizer, device)?;
        let model = crate::lora::attach(base, source, lora)?;
        return Ok((config, model, tok, MasterWeights::plain(optim)));
    }
    if !uses_master_weights(optim, dtype, false)? {
        let (config, model, tok) = init_model::<B>(source, tokenizer, device)?;
        return Ok((config, model, tok, MasterWeights::plain(optim)));
    }
    // a bf16 run's final/ or checkpoint keeps its f32 master in master/: continue from it
    let saved_master = source.checkpoint.join(MASTER_DIR);
    let from = if !source.checkpoint.as_os_str().is_empty() && saved_master.join(t1_model::hf::CONFIG_FILE).exists() {
        eprintln!("starting the f32 master weights from {}", saved_master.display());
        saved_master
    } else {
        source.checkpoint.clone()
    };
    let f32_source = ModelSource { dtype: "f32".into(), checkpoint: from, ..source.clone() };
    let tokenizer = if tokenizer.as_os_str().is_empty() { source.checkpoint.join(crate::common::TOKENIZER_FILE) } else { tokenizer.to_path_buf() };
    let (config, weights, tok) = init_model::<B>(&f32_source, &tokenizer, device)?;
    let (model, optim) = MasterWeights::mixed(optim, weights, dtype);
    Ok((config, model, tok, optim))
}

/// The weights to resume from checkpoint `dir`: its model, or with master weights its f32
/// `master/`; a LoRA run (`current` has adapters) takes the checkpoint's adapters onto its base.
/// A checkpoint written in another mode (with or without master weights, LoRA or full
/// fine-tuning) is refused: resuming across the switch would drop or invent state.
pub fn resume_weights<B: FusedAutodiff>(dir: &Path, source: &ModelSource, optim: &mut MasterWeights<B>, current: &Qwen2<B>, device: &B::Device) -> Result<Qwen2<B>, TrainError> {
    let refuse = |message: String| Err(TrainError::Checkpoint { path: dir.to_path_buf(), message });
    let (lora, saved_adapter) = (current.lora.is_some(), t1_model::lora::is_adapter_dir(dir));
    if lora && !saved_adapter {
        return refuse("was written by a run that trained every weight (it has no adapter_config.json), and this run has [lora]: remove [lora] and model.adapter to resume it, or start the LoRA run in another out_dir".into());
    }
    if !lora && saved_adapter {
        return refuse("holds a LoRA adapter, and this run has no [lora]: give the [lora] settings it was trained with to resume it".into());
    }
    if lora {
        return crate::lora::resume(current, dir);
    }
    let dtype = parse_dtype(source)?;
    let master_dir = dir.join(MASTER_DIR);
    let saved_master = master_dir.join(t1_model::hf::CONFIG_FILE).exists();
    match (optim.master.is_some(), saved_master) {
        (false, false) => Ok(t1_model::load::<B>(dir, dtype, device)?.1),
        (true, true) => {
            let (_, weights) = t1_model::load::<B::InnerBackend>(&master_dir, WeightDtype::F32, device)?;
            Ok(optim.set_master(weights).expect("master weights are on"))
        }
        (true, false) => refuse(format!(
            "has no {MASTER_DIR}/ (it was written without f32 master weights), and this run keeps them: resuming would start the master from the {} weights and load moments of another dtype; set optim.master_weights = false to resume it as it ran, or start a new run from its model",
            source.dtype
        )),
        (false, true) => refuse(format!(
            "holds f32 master weights ({MASTER_DIR}/), and this run keeps none (optim.master_weights = false or f32 weights): resuming would drop them; remove optim.master_weights = false to resume it as it ran"
        )),
    }
}

fn parse_dtype(source: &ModelSource) -> Result<WeightDtype, TrainError> {
    WeightDtype::parse(&source.dtype)
        .ok_or_else(|| TrainError::Config { origin: "model.dtype".into(), message: format!("{:?} is not a dtype: use \"f32\" or \"bf16\"", source.dtype) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use t1_data::{pad_batch, TokenizedExample};

    type Ad = Autodiff<Flex>;

    fn weights<B: FusedOps>(m: &Qwen2<B>) -> Vec<f32> {
        t1_model::hf::named_tensors(m).into_iter().flat_map(|(_, d)| d.convert::<f32>().to_vec::<f32>().unwrap()).collect()
    }

    fn cosine(a: &[f32], b: &[f32]) -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
        let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        dot / (na * nb)
    }

    /// The weight update of `steps` SFT steps at T1's SFT learning rate (1e-5) on a fixed batch,
    /// from the same f32 initial weights: in f32, or in bf16 with or without master weights.
    /// The update is measured on the weights the run ends with (the master when it has one).
    fn update(dtype: WeightDtype, master: Option<bool>, steps: usize) -> Vec<f32> {
        let device = Default::default();
        <Ad as burn::tensor::backend::Backend>::seed(&device, 7);
        let mut config = Qwen2Config::tiny(64, 64, 2, 4, 2);
        config.initializer_range = 0.08;
        let init: Qwen2<Ad> = Qwen2::init(&config, &device);
        let cfg = OptimConfig { lr: 1e-5, master_weights: master, ..OptimConfig::default() };
        let (mut model, mut optim) = if uses_master_weights(&cfg, dtype, false).unwrap() {
            MasterWeights::mixed(&cfg, init, dtype)
        } else {
            (leaf(cast(init.valid(), dtype.burn())), MasterWeights::plain(&cfg))
        };
        // the update from the weights the run starts with (pure bf16: the bf16-rounded ones)
        let before = weights(&optim.weights(&model));
        assert_eq!(model.dtype(), dtype.burn());
        let examples: Vec<TokenizedExample> = (0..4u32)
            .map(|r| TokenizedExample { ids: (0..24u32).map(|t| (r * 17 + t * 5 + t * t) % 64).collect(), loss_mask: vec![true; 24] })
            .collect();
        let batch = pad_batch(&examples.iter().collect::<Vec<_>>(), 0);
        // SFT's loss: the mean NLL of the batch's targets
        let (b, t) = (batch.batch, batch.len);
        let inputs = t1_model::Inputs::new(b, t, batch.ids.clone(), batch.attention.clone());
        let targets = Tensor::<Ad, 2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(batch.targets.clone(), [b, t]), &device);
        let mask: Vec<f32> = batch.target_mask.iter().map(|&m| m as u8 as f32).collect();
        let mask = Tensor::<Ad, 2>::from_data(burn::tensor::TensorData::new(mask, [b, t]), &device);
        for _ in 0..steps {
            let logits = model.forward(&inputs, None).cast(DType::F32);
            let loss = t1_algo::masked_mean(t1_algo::token_logprobs(logits, targets.clone()).neg(), mask.clone());
            assert!(loss.clone().into_scalar().is_finite());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let (grads, _) = crate::common::clip_global_norm(&model, grads, cfg.grad_clip);
            model = optim.step(cfg.lr, model, grads);
        }
        assert_eq!(model.dtype(), dtype.burn(), "the trained model keeps its dtype");
        weights(&optim.weights(&model)).iter().zip(&before).map(|(a, b)| a - b).collect()
    }

    #[test]
    fn bf16_with_master_weights_tracks_f32_and_pure_bf16_does_not() {
        let steps = 20;
        let f32_update = update(WeightDtype::F32, None, steps);
        let mixed = update(WeightDtype::Bf16, None, steps);
        let pure = update(WeightDtype::Bf16, Some(false), steps);
        let moved = |u: &[f32]| u.iter().filter(|&&d| d != 0.0).count() as f64 / u.len() as f64;
        let (c_mixed, c_pure) = (cosine(&mixed, &f32_update), cosine(&pure, &f32_update));
        eprintln!("cosine with the f32 update: master weights {c_mixed:.4}, pure bf16 {c_pure:.4}; weights moved: f32 {:.3}, master {:.3}, pure {:.3}", moved(&f32_update), moved(&mixed), moved(&pure));
        assert!(moved(&f32_update) > 0.99, "the f32 run should move every weight");
        assert!(c_mixed >= 0.95, "bf16 with f32 master weights must track the f32 update: cosine {c_mixed}");
        // the defect master weights fix: without them most bf16 updates round away
        assert!(!(c_pure >= 0.95), "pure bf16 unexpectedly tracked f32 (cosine {c_pure}): the test no longer shows what master weights fix");
    }

    #[test]
    fn master_weights_are_refused_with_f32_weights() {
        let cfg = OptimConfig { master_weights: Some(true), ..OptimConfig::default() };
        let err = uses_master_weights(&cfg, WeightDtype::F32, false).unwrap_err().to_string();
        assert!(err.contains("optim.master_weights") && err.contains("bf16"), "{err}");
        assert!(uses_master_weights(&OptimConfig::default(), WeightDtype::Bf16, false).unwrap());
        assert!(!uses_master_weights(&OptimConfig::default(), WeightDtype::F32, false).unwrap());
        let off = OptimConfig { master_weights: Some(false), ..OptimConfig::default() };
        assert!(!uses_master_weights(&off, WeightDtype::Bf16, false).unwrap());
    }
}
