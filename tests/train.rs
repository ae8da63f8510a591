//! The SFT and RL loops on a tiny model: they learn, they resume exactly, RL touches every
//! parameter. Runs on the CPU backend through the same entry points as `t1 sft` / `t1 rl`.

use t1_model::FusedOps;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use t1_model::{hf, WeightDtype};
use t1_train::rl::RlConfig;
use t1_train::sft::SftConfig;

use crate::common::*;

/// Writes a small task dataset and tokenizer into `dir`.
pub fn tiny_task(dir: &Path) {
    let cfg = t1_data::TaskConfig { max_operands: 2, max_operand: 9, ops: "+-*".into(), ..Default::default() };
    let s = t1_data::splits(&cfg, 7, 64, 32, 16);
    let texts: Vec<String> = s.train.iter().flat_map(|x| [x.prompt.clone(), x.solution.clone()]).collect();
    t1_data::train_bpe(&texts, 300).unwrap().save(&dir.join("tokenizer.json")).unwrap();
    let sft: Vec<_> = s.train.iter().map(t1_data::sft_example).collect();
    t1_data::write_jsonl(&dir.join("sft.jsonl"), &sft).unwrap();
    let rl: Vec<_> = s.rl.iter().map(t1_data::problem).collect();
    t1_data::write_jsonl(&dir.join("rl.jsonl"), &rl).unwrap();
    let test: Vec<_> = s.test.iter().map(t1_data::problem).collect();
    t1_data::write_jsonl(&dir.join("test.jsonl"), &test).unwrap();
}

pub fn sft_config(data: &Path, out: &Path, steps: usize) -> SftConfig {
    let p = |f: &str| format!("{:?}", data.join(f).display().to_string());
    let sets: Vec<String> = vec![
        format!("out_dir={:?}", out.display().to_string()),
        format!("data.train={}", p("sft.jsonl")),
        format!("data.eval={}", p("sft.jsonl")),
        format!("data.tokenizer={}", p("tokenizer.json")),
        "model.scratch.hidden_size=32".into(),
        "model.scratch.intermediate_size=64".into(),
        "model.scratch.num_hidden_layers=2".into(),
        "model.scratch.num_attention_heads=4".into(),
        "model.scratch.num_key_value_heads=2".into(),
        format!("train.max_steps={steps}"),
        "train.batch_size=8".into(),
        "train.save_every=2".into(),
        "train.keep_checkpoints=10".into(),
        "optim.lr=3e-3".into(),
        "optim.warmup_steps=2".into(),
    ];
    t1_train::load_config::<SftConfig>(None, &sets).unwrap().0
}

fn params<B: FusedOps, M: Module<B>>(m: &M) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl<B: FusedOps> ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.0.push(to_vec(p.val()));
        }
    }
    let mut c = Collect(vec![]);
    m.visit(&mut c);
    c.0
}

fn load(dir: &Path) -> t1_model::Qwen2<FlexInner> {
    t1_model::load::<FlexInner>(dir, WeightDtype::F32, &Default::default()).unwrap().1
}

#[test]
fn sft_lowers_the_loss_and_resume_continues_exactly() {
    let data = tempfile::tempdir().unwrap();
    tiny_task(data.path());
    let run = tempfile::tempdir().unwrap();
    let out = run.path().join("a");
    let cfg = sft_config(data.path(), &out, 6);
    let summary = t1_train::sft::run_sft::<Flex>(&cfg, "", false, &Default::default()).unwrap();
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
        .collect();
    assert_eq!(losses.len(), 6);
    assert!(losses[5] < losses[0] - 0.5, "loss did not go down: {losses:?}");
    assert!(summary.eval_loss.unwrap().is_finite());
    for step in [2, 4, 6] {
        assert!(out.join(format!("checkpoint-{step:06}/trainer_state.json")).exists());
    }

    // a run "killed" after step 2: only its first checkpoint survives; --resume finishes it
    let resumed = run.path().join("b");
    std::fs::create_dir_all(&resumed).unwrap();
    copy_dir(&out.join("checkpoint-000002"), &resumed.join("checkpoint-000002"));
    let mut cfg_b = cfg.clone();
    cfg_b.out_dir = resumed.clone();
    t1_train::sft::run_sft::<Flex>(&cfg_b, "", true, &Default::default()).unwrap();
    let (a, b) = (params(&load(&out.join("final"))), params(&load(&resumed.join("final"))));
    assert_eq!(a, b, "resumed run differs from the uninterrupted one");
}

#[test]
fn bf16_sft_keeps_f32_master_weights_and_resumes_exactly() {
    let data = tempfile::tempdir().unwrap();
    tiny_task(data.path());
    let run = tempfile::tempdir().unwrap();
    let out = run.path().join("a");
    let mut cfg = sft_config(data.path(), &out, 4);
    cfg.model.dtype = "bf16".into();
    cfg.optim.lr = 1e-4;
    t1_train::sft::run_sft::<Flex>(&cfg, "", false, &Default::default()).unwrap();
    let ckpt = out.join("checkpoint-000002");
    // the Hugging Face model stays bf16; the f32 master sits beside the optimiser state
    let dtype_of = |dir: &Path| serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()["torch_dtype"].clone();
    assert_eq!(dtype_of(&ckpt), "bfloat16");
    assert_eq!(dtype_of(&ckpt.join(t1_train::master::MASTER_DIR)), "float32");
    let (model, master) = (params(&load(&ckpt)), params(&load(&ckpt.join(t1_train::master::MASTER_DIR))));
    // the model is the master rounded to bf16, and the master holds what bf16 cannot
    let (model, master) = (model.concat(), master.concat());
    let rounded: Vec<f32> = master.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
    // burn-flex casts through f64 with half 2.7's f64 -> bf16, which drops the f64's low 32
    // bits before rounding: an f32 whose 16 low bits are 0x8001..=0x8007 (just above a tie)
    // rounds down (0x8000, an exact tie, also passes the filter: it rounds to even either way). Those are the only misses allowed (1 in 28,320 weights here).
    let near_tie = |x: f32| (x.to_bits() & 0xFFF8) == 0x8000;
    let off: Vec<_> = model.iter().zip(&rounded).zip(&master).filter(|((a, b), &m)| a.to_bits() != b.to_bits() && !near_tie(m)).collect();
    assert!(off.is_empty(), "{} of {} bf16 weights are not their master rounded to nearest bf16; first (model, rounded, master): {:?}", off.len(), model.len(), off.first());
    let finer = model.iter().zip(&master).filter(|(a, b)| a != b).count();
    assert!(finer * 2 > model.len(), "only {finer} of {} master weights hold more than bf16 precision", model.len());

    let resumed = run.path().join("b");
    copy_dir(&ckpt, &resumed.join("checkpoint-000002"));
    let mut cfg_b = cfg.clone();
    cfg_b.out_dir = resumed.clone();
    t1_train::sft::run_sft::<Flex>(&cfg_b, "", true, &Default::default()).unwrap();
    // resuming across a switch of optim.master_weights is refused, and changes nothing
    let mut off = cfg_b.clone();
    off.optim.master_weights = Some(false);
    let before = std::fs::read(resumed.join("final/model.safetensors")).unwrap();
    let err = t1_train::sft::run_sft::<Flex>(&off, "", true, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("checkpoint-000004") && err.contains("optim.master_weights"), "{err}");
    assert_eq!(std::fs::read(resumed.join("final/model.safetensors")).unwrap(), before);
    let mut lora = cfg_b.clone();
    lora.lora = Some(t1_model::LoraConfig { r: 2, ..Default::default() });
    lora.model.checkpoint = resumed.join("final");
    let err = t1_train::sft::run_sft::<Flex>(&lora, "", true, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("[lora]") && err.contains("every weight"), "{err}");
    let last = |root: &Path| root.join("checkpoint-000004").join(t1_train::master::MASTER_DIR);
    assert_eq!(params(&load(&last(&out))), params(&load(&last(&resumed))), "the resumed master differs");
    assert_eq!(params(&load(&out.join("final"))), params(&load(&resumed.join("final"))));
    // final/ keeps the f32 master too, and a bf16 run started from it continues from it
    let final_master = params(&load(&out.join("final").join(t1_train::master::MASTER_DIR)));
    let source = t1_train::common::ModelSource { checkpoint: out.join("final"), dtype: "bf16".into(), ..Default::default() };
    let (_, _, _, optim) = t1_train::master::init_trainable::<Flex>(&source, &cfg.optim, None, Path::new(""), &Default::default()).unwrap();
    assert_eq!(params(&optim.master().unwrap()), final_master, "the next run did not start from final/'s f32 master");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

pub fn rl_config(data: &Path, model: &Path, out: &Path, steps: usize) -> RlConfig {
    let p = |f: &Path| format!("{:?}", f.display().to_string());
    let sets: Vec<String> = vec![
        format!("out_dir={}", p(out)),
        format!("model.checkpoint={}", p(model)),
        format!("data.train={}", p(&data.join("rl.jsonl"))),
        format!("train.steps={steps}"),
        "train.save_every=1".into(),
        "train.keep_checkpoints=10".into(),
        "rollout.prompts_per_step=2".into(),
        "rollout.samples_per_prompt=4".into(),
        "sampling.max_new_tokens=24".into(),
        "optim.lr=1e-3".into(),
        "loss.entropy_coef=0.01".into(),
        // T1's path: the KL (k3) in the reward, centred leave-one-out in each group
        "loss.kl_in=\"reward\"".into(),
        "loss.kl_coef=0.1".into(),
        "loss.minibatches=1".into(),
        "anchor.mode=\"ema\"".into(),
        "anchor.beta=0.5".into(),
        "anchor.every=1".into(),
        // random rewards are rare from a 6-step model: give every sample a signal through the
        // overlong penalty (24 tokens are too few to finish), so every group is non-uniform
        "rollout.drop_uniform_groups=false".into(),
    ];
    t1_train::load_config::<RlConfig>(None, &sets).unwrap().0
}

#[test]
fn one_rl_step_changes_every_parameter_and_resume_is_exact() {
    let data = tempfile::tempdir().unwrap();
    tiny_task(data.path());
    let run = tempfile::tempdir().unwrap();
    let sft_out = run.path().join("sft");
    t1_train::sft::run_sft::<Flex>(&sft_config(data.path(), &sft_out, 4), "", false, &Default::default()).unwrap();
    let start = sft_out.join("final");

    let out = run.path().join("rl");
    let cfg = rl_config(data.path(), &start, &out, 3);
    t1_train::rl::run_rl::<Flex>(&cfg, "", false, &Default::default()).unwrap();
    // the entropy term gives every token a gradient, so every parameter moves (the direction
    // of the update is checked by t1_train::rl's an_rl_step_raises_the_rewarded_responses...)
    let before = params(&load(&start));
    let after = params(&load(&out.join("checkpoint-000001")));
    let names: Vec<String> = hf::named_tensors(&load(&start)).into_iter().map(|(n, _)| n).collect();
    assert_eq!(before.len(), after.len());
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(b != a, "parameter {i} ({:?}) did not change in one RL step", names.get(i));
    }
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let step1 = metrics.iter().find(|m| m["step"] == 1 && m.get("reward").is_some()).unwrap();
    for key in ["reward", "accuracy", "overlong_rate", "repetitive_rate", "garbled_rate", "entropy", "kl", "clip_fraction", "response_length", "zero_variance_groups", "logprob_gap_max", "logprob_gap_mean"] {
        assert!(step1.get(key).is_some_and(|v| v.is_number()), "metric {key} missing: {step1}");
    }
    // one engine samples and trains: the recomputed log-probs match the sampling ones
    assert!(step1["logprob_gap_max"].as_f64().unwrap() < 1e-3, "{step1}");

    // kill after step 1 and resume: same parameters and same anchor as the uninterrupted run
    let resumed = run.path().join("rl-resumed");
    std::fs::create_dir_all(&resumed).unwrap();
    copy_dir(&out.join("checkpoint-000001"), &resumed.join("checkpoint-000001"));
    let mut cfg_b = cfg.clone();
    cfg_b.out_dir = resumed.clone();
    t1_train::rl::run_rl::<Flex>(&cfg_b, "", true, &Default::default()).unwrap();
    assert_eq!(params(&load(&out.join("final"))), params(&load(&resumed.join("final"))));
    assert_eq!(
        params(&load(&out.join("checkpoint-000003/reference"))),
        params(&load(&resumed.join("checkpoint-000003/reference")))
    );
}


/// Every parameter's gradient in `grads` (module order), or an empty vector where it has none.
fn grad_values<B: t1_model::FusedAutodiff>(model: &t1_model::Qwen2<B>, grads: &burn::optim::GradientsParams) -> Vec<Vec<f32>> {
    struct Collect<'a>(&'a burn::optim::GradientsParams, Vec<Vec<f32>>);
    impl<B: t1_model::FusedAutodiff> ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.1.push(self.0.get::<B::InnerBackend, D>(p.id).map(to_vec).unwrap_or_default());
        }
    }
    let mut c = Collect(grads, vec![]);
    model.visit(&mut c);
    c.1
}

/// A tiny random model (seeded) and a function that pads examples `r` of the tiny task.
fn tiny_sft_setup() -> (t1_model::Qwen2<Flex>, impl Fn(std::ops::Range<usize>) -> t1_data::SftBatch) {
    let data = tempfile::tempdir().unwrap();
    tiny_task(data.path());
    let tokenizer = t1_data::ChatTokenizer::from_file(&data.path().join("tokenizer.json")).unwrap();
    let (examples, _) = t1_train::sft::tokenize_sft(&tokenizer, &data.path().join("sft.jsonl"), 256, false, &Default::default()).unwrap();
    let device = Default::default();
    <Flex as Backend>::seed(&device, 5);
    let mut config = t1_model::Qwen2Config::tiny(tokenizer.vocab_size(), 32, 2, 4, 2);
    config.initializer_range = 0.1;
    let pad = tokenizer.pad_id();
    (t1_model::Qwen2::<Flex>::init(&config, &device), move |r: std::ops::Range<usize>| t1_data::pad_batch(&examples[r].iter().collect::<Vec<_>>(), pad))
}

#[test]
fn clip_global_norm_scales_every_gradient_to_the_max_norm() {
    use t1_train::common::clip_global_norm;
    let (model, batch) = tiny_sft_setup();
    let grads = || burn::optim::GradientsParams::from_grads(t1_train::sft::sft_loss(&model, &batch(0..4)).backward(), &model);
    let raw = grad_values(&model, &grads());
    let want_norm = raw.iter().flatten().map(|g| (*g as f64).powi(2)).sum::<f64>().sqrt() as f32;
    let n: usize = raw.iter().map(|g| g.len()).sum();
    let bound = 4.0 * f32::EPSILON * n as f32;
    // off (0) and above the norm: unchanged, the norm reported
    for max_norm in [0.0, 2.0 * want_norm] {
        let (clipped, norm) = clip_global_norm(&model, grads(), max_norm);
        assert!((norm - want_norm).abs() <= bound * want_norm, "norm {norm} vs {want_norm}");
        for (c, r) in grad_values(&model, &clipped).iter().zip(&raw) {
            assert!(same_bits(c, r), "max_norm {max_norm}: a gradient changed");
        }
    }
    // below: every entry scaled by the same factor, to a global norm of max_norm
    let max_norm = want_norm / 4.0;
    let (clipped, norm) = clip_global_norm(&model, grads(), max_norm);
    assert!((norm - want_norm).abs() <= bound * want_norm);
    let scale = max_norm / (norm + 1e-6);
    let clipped = grad_values(&model, &clipped);
    for (c, r) in clipped.iter().zip(&raw) {
        let scaled: Vec<f32> = r.iter().map(|g| g * scale).collect();
        assert!(max_abs_diff(c, &scaled) <= 4.0 * f32::EPSILON * max_abs(&scaled), "a gradient is not scaled by {scale}");
    }
    let new_norm = clipped.iter().flatten().map(|g| (*g as f64).powi(2)).sum::<f64>().sqrt() as f32;
    assert!((new_norm - max_norm).abs() <= bound * max_norm, "clipped norm {new_norm} vs {max_norm}");
    // a non-finite gradient: the norm says so (the loops then skip the step)
    let nan = burn::optim::GradientsParams::from_grads(t1_train::sft::sft_loss(&model, &batch(0..4)).mul_scalar(f32::NAN).backward(), &model);
    assert!(clip_global_norm(&model, nan, 1.0).1.is_nan());
}

#[test]
fn sft_gradients_are_the_same_with_threads_and_micro_batches() {
    // one step on 8 examples: the gradient of the batch's mean NLL computed directly, and by
    // `step_grads` as one shard, as 2 micro-batches of 2 shards, and as uneven micro-batches
    // (3 + 3 + 2 on 1, 2 and 2 shards): before the optimiser, parameter by parameter, so a
    // mis-scaled gradient (that AdamW and clipping would cancel) fails
    let (model, batch) = tiny_sft_setup();
    let whole = t1_train::sft::sft_loss(&model, &batch(0..8));
    let tokens = batch(0..8).target_mask.iter().filter(|&&m| m).count();
    let want_loss = to_vec(whole.clone())[0];
    let want = grad_values(&model, &burn::optim::GradientsParams::from_grads(whole.backward(), &model));
    // f32 sums of up to `tokens` terms in another order: a few ulps per term, relative to each
    // parameter's largest gradient entry
    let bound = 4.0 * f32::EPSILON * tokens as f32;
    use t1_train::checkpoint::ActivationCheckpointing::{Layer, None as Kept};
    let splits: Vec<(&str, _, Vec<Vec<std::ops::Range<usize>>>)> = vec![
        ("one shard", Kept, vec![vec![0..8]]),
        ("2 micro-batches x 2 shards", Kept, vec![vec![0..2, 2..4], vec![4..6, 6..8]]),
        ("3 + 3 + 2 on 1, 2, 2 shards", Kept, vec![vec![0..3], vec![3..4, 4..6], vec![6..7, 7..8]]),
        // every layer recomputed in the backward pass from its input
        ("layer checkpointing, one shard", Layer, vec![vec![0..8]]),
        ("layer checkpointing, 2 micro-batches x 2 shards", Layer, vec![vec![0..2, 2..4], vec![4..6, 6..8]]),
    ];
    for (what, mode, split) in splits {
        let micro = split.into_iter().map(|shards| shards.into_iter().map(&batch).collect()).collect();
        let (grads, loss) = t1_train::sft::step_grads(&model, micro, mode);
        assert!((loss - want_loss).abs() <= bound * want_loss.abs(), "{what}: loss {loss} vs {want_loss}");
        let got = grad_values(&model, &grads);
        assert_eq!(got.len(), want.len());
        let mut worst = 0f32;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(!w.is_empty(), "parameter {i} has no gradient");
            let rel = max_rel_diff(w, g, 1e-30);
            assert!(rel <= bound, "{what}: parameter {i}'s gradient differs by {rel:.3e} of its largest entry (bound {bound:.3e})");
            worst = worst.max(rel);
        }
        println!("{what}: worst gradient difference {worst:.3e} of the parameter's largest entry (bound {bound:.3e})");
    }
}

/// Layer checkpointing against keeping every activation, on one backend: the largest relative
/// difference of any parameter's gradient (relative to its largest entry).
struct CheckpointedVsKept;

impl t1_backends::BackendTask for CheckpointedVsKept {
    type Output = f32;
    fn run<B: t1_model::FusedAutodiff>(self, device: B::Device) -> f32 {
        use t1_train::checkpoint::ActivationCheckpointing;
        let (flex_model, batch) = tiny_sft_setup();
        // the same weights on this backend
        let model: t1_model::Qwen2<B> = {
            let named = hf::named_tensors(&flex_model);
            let config = t1_model::Qwen2Config::tiny(flex_model.vocab_size(), 32, 2, 4, 2);
            hf::from_named_tensors(&config, named, WeightDtype::F32, &device).unwrap()
        };
        // two sequences: on lavapipe every kernel shape compiles its shaders (8 took 3.6 minutes)
        let b = batch(0..2);
        let tokens = b.target_mask.iter().filter(|&&m| m).count() as f32;
        let (kept, v1) = t1_train::sft::batch_grads(&model, &b, tokens, ActivationCheckpointing::None);
        let (ckpt, v2) = t1_train::sft::batch_grads(&model, &b, tokens, ActivationCheckpointing::Layer);
        assert!((v1 - v2).abs() <= 1e-6 * v1.abs(), "loss {v1} vs {v2}");
        let (want, got) = (grad_values(&model, &kept), grad_values(&model, &ckpt));
        assert_eq!(want.len(), got.len());
        want.iter().zip(&got).enumerate().map(|(i, (w, g))| {
            assert!(!w.is_empty() && !g.is_empty(), "parameter {i} has no gradient");
            max_rel_diff(w, g, 1e-30)
        }).fold(0.0, f32::max)
    }
}

#[test]
fn layer_checkpointing_gives_the_same_gradients_on_flex() {
    let worst = t1_backends::dispatch(&t1_backends::DeviceSpec::Flex, CheckpointedVsKept).unwrap();
    println!("flex: checkpointed vs kept gradients differ by at most {worst:.3e} of a parameter's largest entry");
    assert!(worst <= 1e-6, "{worst:e}");
}

#[cfg(feature = "wgpu")]
#[test]
fn layer_checkpointing_gives_the_same_gradients_on_wgpu() {
    let worst = t1_backends::dispatch(&t1_backends::DeviceSpec::Wgpu(t1_backends::WgpuKind::Default), CheckpointedVsKept).unwrap();
    println!("wgpu: checkpointed vs kept gradients differ by at most {worst:.3e} of a parameter's largest entry");
    assert!(worst <= 1e-6, "{worst:e}");
}

/// The PEFT adapter of a LoRA checkpoint or final/ directory, as t1 reads it onto `base`.
fn adapter_params(base: &Path, dir: &Path) -> Vec<Vec<f32>> {
    let model = t1_model::load_adapter(load(base), dir).unwrap();
    params(model.lora.as_ref().unwrap())
}

#[test]
fn lora_sft_trains_only_the_adapters_and_resumes_exactly() {
    let data = tempfile::tempdir().unwrap();
    tiny_task(data.path());
    let run = tempfile::tempdir().unwrap();
    let base_out = run.path().join("base");
    t1_train::sft::run_sft::<Flex>(&sft_config(data.path(), &base_out, 2), "", false, &Default::default()).unwrap();
    let base = base_out.join("final");
    let base_bytes = std::fs::read(base.join("model.safetensors")).unwrap();

    let out = run.path().join("lora");
    let mut cfg = sft_config(data.path(), &out, 4);
    cfg.model.checkpoint = base.clone();
    // dropout too: its masks are reseeded per step, so resume stays exact with one shard
    cfg.lora = Some(t1_model::LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, ..Default::default() });
    t1_train::sft::run_sft::<Flex>(&cfg, "", false, &Default::default()).unwrap();
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64()).collect();
    assert!(losses[3] < losses[0], "LoRA SFT did not lower the loss: {losses:?}");
    // checkpoints and final/ are PEFT adapters, not models
    for dir in [out.join("checkpoint-000002"), out.join("final")] {
        assert!(dir.join("adapter_config.json").exists() && dir.join("adapter_model.safetensors").exists(), "{}", dir.display());
        assert!(!dir.join("model.safetensors").exists(), "{} holds the base", dir.display());
    }
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("final/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((meta["peft_type"].as_str(), meta["r"].as_u64(), meta["base_model_name_or_path"].as_str()), (Some("LORA"), Some(4), Some(base.to_str().unwrap())));
    assert_eq!(std::fs::read(base.join("model.safetensors")).unwrap(), base_bytes, "the base checkpoint was written to");
    // B started at zero and moved: the adapters were trained
    let trained = adapter_params(&base, &out.join("final"));
    assert!(trained.iter().skip(1).step_by(2).all(|b| b.iter().any(|&x| x != 0.0)), "some lora_B never moved");
    let start = t1_model::hf::named_tensors(&load(&base));
    // the run's metrics count the adapters as what is trained
    let first: serde_json::Value = serde_json::from_str(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first["trainable_params"].as_u64().unwrap() as usize, trained.iter().map(Vec::len).sum::<usize>());
    assert!(first["trainable_params"].as_u64().unwrap() < first["params"].as_u64().unwrap() / 4);
    assert!(!start.is_empty());

    // killed after step 2, resumed: the same adapters at the end
    let resumed = run.path().join("lora-resumed");
    copy_dir(&out.join("checkpoint-000002"), &resumed.join("checkpoint-000002"));
    let mut cfg_b = cfg.clone();
    cfg_b.out_dir = resumed.clone();
    t1_train::sft::run_sft::<Flex>(&cfg_b, "", true, &Default::default()).unwrap();
    assert_eq!(trained, adapter_params(&base, &resumed.join("final")), "the resumed LoRA run differs");

    // continuing the adapter (model.adapter) takes its settings; a [lora] that disagrees is refused
    let mut cont = cfg.clone();
    cont.out_dir = run.path().join("continued");
    cont.model.adapter = out.join("final");
    cont.lora = Some(t1_model::LoraConfig { r: 8, ..Default::default() });
    let err = t1_train::sft::run_sft::<Flex>(&cont, "", false, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("[lora]") && err.contains("r = 4"), "{err}");
    assert!(!cont.out_dir.exists(), "a refused run wrote {}", cont.out_dir.display());
    cont.lora = None;
    cont.train.max_steps = 1;
    t1_train::sft::run_sft::<Flex>(&cont, "", false, &Default::default()).unwrap();
    assert_ne!(adapter_params(&base, &cont.out_dir.join("final")), trained, "continuing did not train the adapter");
}

#[test]
fn lora_rl_anchors_on_an_ema_of_the_adapters_and_resumes_exactly() {
    let data = tempfile::tempdir().unwrap();
    tiny_task(data.path());
    let run = tempfile::tempdir().unwrap();
    let sft_out = run.path().join("sft");
    t1_train::sft::run_sft::<Flex>(&sft_config(data.path(), &sft_out, 4), "", false, &Default::default()).unwrap();
    let base = sft_out.join("final");
    let out = run.path().join("rl");
    let mut cfg = rl_config(data.path(), &base, &out, 2);
    cfg.lora = Some(t1_model::LoraConfig { r: 4, alpha: 8.0, ..Default::default() });
    t1_train::rl::run_rl::<Flex>(&cfg, "", false, &Default::default()).unwrap();
    let ckpt = out.join("checkpoint-000001");
    assert!(!ckpt.join("model.safetensors").exists() && !ckpt.join("reference/model.safetensors").exists(), "a LoRA checkpoint holds no copy of the base");
    // the anchor started as the fresh adapter (B = 0) and took one EMA step (beta 0.5) toward
    // the policy: its B is half the policy's, its A halfway between
    let policy = adapter_params(&base, &ckpt);
    let anchor = adapter_params(&base, &ckpt.join("reference"));
    for (i, (p, a)) in policy.iter().zip(&anchor).enumerate().skip(1).step_by(2) {
        assert!(p.iter().any(|&x| x != 0.0), "lora_B {i} did not move in one RL step");
        let want: Vec<f32> = p.iter().map(|x| 0.5 * x).collect();
        assert!(max_abs_diff(a, &want) <= 1e-6 * max_abs(p), "anchor's lora_B {i} is not the EMA of the adapters");
    }
    let resumed = run.path().join("rl-resumed");
    copy_dir(&ckpt, &resumed.join("checkpoint-000001"));
    let mut cfg_b = cfg.clone();
    cfg_b.out_dir = resumed.clone();
    t1_train::rl::run_rl::<Flex>(&cfg_b, "", true, &Default::default()).unwrap();
    assert_eq!(adapter_params(&base, &out.join("final")), adapter_params(&base, &resumed.join("final")));
    assert_eq!(adapter_params(&base, &out.join("checkpoint-000002/reference")), adapter_params(&base, &resumed.join("checkpoint-000002/reference")));

    // a frozen anchor is the base alone: nothing of it is saved
    let frozen = run.path().join("rl-frozen");
    let mut cfg_f = cfg.clone();
    cfg_f.out_dir = frozen.clone();
    cfg_f.anchor = t1_algo::Anchor::Frozen;
    cfg_f.train.steps = 1;
    t1_train::rl::run_rl::<Flex>(&cfg_f, "", false, &Default::default()).unwrap();
    assert!(!frozen.join("checkpoint-000001/reference").exists());
}

/// Layer checkpointing with a frozen base: the adapters' gradients are the kept ones, and the
/// frozen embedding stage (nothing in it needs a gradient) is no error.
#[test]
fn layer_checkpointing_gives_the_same_lora_gradients() {
    use burn::module::{AutodiffModule, ModuleMapper};
    use t1_train::checkpoint::ActivationCheckpointing;
    struct Randomize;
    impl ModuleMapper<FlexInner> for Randomize {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<FlexInner, D>>) -> Param<Tensor<FlexInner, D>> {
            let (id, t, m) = p.consume();
            Param::from_mapped_value(id, t.random_like(burn::tensor::Distribution::Normal(0.0, 0.1)), m)
        }
    }
    let (model, batch) = tiny_sft_setup();
    let cfg = t1_model::LoraConfig { r: 4, alpha: 8.0, ..Default::default() };
    let mut inner = model.valid().with_new_lora(&cfg, "").unwrap();
    // B = 0 would give A no gradient: random adapters
    inner.lora = inner.lora.take().map(|l| l.map(&mut Randomize));
    let model = t1_train::lora::trainable(t1_model::Qwen2::<Flex>::from_inner(inner));
    let b = batch(0..3);
    let tokens = b.target_mask.iter().filter(|&&m| m).count() as f32;
    let (kept, v1) = t1_train::sft::batch_grads(&model, &b, tokens, ActivationCheckpointing::None);
    let (ckpt, v2) = t1_train::sft::batch_grads(&model, &b, tokens, ActivationCheckpointing::Layer);
    assert!((v1 - v2).abs() <= 1e-6 * v1.abs(), "loss {v1} vs {v2}");
    let (want, got) = (grad_values(&model, &kept), grad_values(&model, &ckpt));
    let adapters = params(model.lora.as_ref().unwrap()).len();
    assert_eq!(want.iter().filter(|g| !g.is_empty()).count(), adapters, "gradients for the adapters and nothing else");
    let mut worst = 0f32;
    for (w, g) in want.iter().zip(&got).filter(|(w, _)| !w.is_empty()) {
        assert_eq!(w.len(), g.len(), "an adapter lost its gradient under checkpointing");
        worst = worst.max(max_rel_diff(w, g, 1e-30));
    }
    assert!(worst <= 1e-6, "{worst:e}");
}

/// Packed SFT rows (#19): examples of varied lengths packed into rows, each with its own
/// positions and block-diagonal attention, give the unpacked batch's loss and gradients
/// (≤ 1e-5 relative); attention across examples or positions that run on would not.
#[test]
fn packed_rows_give_the_unpacked_loss_and_gradients() {
    use t1_train::checkpoint::ActivationCheckpointing;
    let data = tempfile::tempdir().unwrap();
    tiny_task(data.path());
    let tokenizer = t1_data::ChatTokenizer::from_file(&data.path().join("tokenizer.json")).unwrap();
    let (mut examples, _) = t1_train::sft::tokenize_sft(&tokenizer, &data.path().join("sft.jsonl"), 256, false, &Default::default()).unwrap();
    examples.truncate(8);
    // a long-tailed mix of lengths, each keeping a trained span
    for (i, e) in examples.iter_mut().enumerate() {
        let first = e.loss_mask.iter().position(|m| *m).unwrap();
        let n = (first + 3 + 9 * i).min(e.ids.len());
        e.ids.truncate(n);
        e.loss_mask.truncate(n);
    }
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let max_len = *lengths.iter().max().unwrap() + 20;
    let rows = t1_data::pack(&lengths, max_len);
    assert!(rows.len() < examples.len() && rows.iter().any(|r| r.len() > 1), "rows {rows:?} of lengths {lengths:?}");
    let pad = tokenizer.pad_id();
    let packed = t1_data::pad_packed(&rows.iter().map(|r| r.iter().map(|&i| &examples[i]).collect()).collect::<Vec<_>>(), pad);
    let unpacked = t1_data::pad_batch(&examples.iter().collect::<Vec<_>>(), pad);
    let device = Default::default();
    <Flex as Backend>::seed(&device, 5);
    let mut config = t1_model::Qwen2Config::tiny(tokenizer.vocab_size(), 32, 2, 4, 2);
    config.initializer_range = 0.1;
    let model = t1_model::Qwen2::<Flex>::init(&config, &device);
    let (g_packed, loss_packed) = t1_train::sft::step_grads(&model, vec![vec![packed.clone()]], ActivationCheckpointing::None);
    let (g_unpacked, loss_unpacked) = t1_train::sft::step_grads(&model, vec![vec![unpacked]], ActivationCheckpointing::None);
    assert!(loss_packed.is_finite() && ((loss_packed - loss_unpacked) / loss_unpacked).abs() <= 1e-5, "loss {loss_packed} packed vs {loss_unpacked}");
    let mut worst = 0.0f32;
    for (p, u) in grad_values(&model, &g_packed).iter().zip(&grad_values(&model, &g_unpacked)) {
        assert!(!u.is_empty());
        worst = worst.max(max_rel_diff(u, p, 1e-30));
    }
    assert!(worst <= 1e-5, "gradients differ by {worst:e} relative");
    // the attention is what makes them equal: without the segments the rows attend across
    let mut leaky = packed;
    leaky.segments = None;
    let (_, loss_leaky) = t1_train::sft::step_grads(&model, vec![vec![leaky]], ActivationCheckpointing::None);
    assert!(((loss_leaky - loss_unpacked) / loss_unpacked).abs() > 1e-4, "packing without block-diagonal attention should differ");

    // and a run with data.packing = true trains on the packed rows
    let run = tempfile::tempdir().unwrap();
    let mut cfg = sft_config(data.path(), &run.path().join("p"), 2);
    cfg.data.packing = true;
    cfg.data.max_len = 256;
    t1_train::sft::run_sft::<Flex>(&cfg, "", false, &Default::default()).unwrap();
    let start: serde_json::Value = serde_json::from_str(std::fs::read_to_string(run.path().join("p/metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert!(start["train_rows"].as_u64().unwrap() * 2 < start["train_examples"].as_u64().unwrap(), "{start}");
}
