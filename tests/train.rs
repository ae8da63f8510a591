//! The SFT and RL loops on a tiny model: they learn, they resume exactly, RL touches every
//! parameter. Runs on the CPU backend through the same entry points as `t1 sft` / `t1 rl`.

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

fn params<B: Backend, M: Module<B>>(m: &M) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl<B: Backend> ModuleVisitor<B> for Collect {
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
        "loss.kl_in=\"loss\"".into(),
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
    // the entropy and KL terms give every token a gradient, so every parameter moves
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

/// Largest |a - b| over all parameters, relative to the largest |a|.
fn max_rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let scale = a.iter().flatten().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().flatten().zip(b.iter().flatten()).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn sft_step_is_the_same_with_threads_and_micro_batches() {
    // one step on 8 examples: as one batch on one thread, as 2 micro-batches of 4 on 2
    // threads each; the loss is the token mean over the whole step either way
    let data = tempfile::tempdir().unwrap();
    tiny_task(data.path());
    let run = tempfile::tempdir().unwrap();
    let mut one = sft_config(data.path(), &run.path().join("one"), 2);
    one.train.save_every = 0;
    let mut split = one.clone();
    split.out_dir = run.path().join("split");
    (split.train.batch_size, split.train.grad_accum, split.train.threads) = (4, 2, 2);
    for cfg in [&one, &split] {
        t1_train::sft::run_sft::<Flex>(cfg, "", false, &Default::default()).unwrap();
    }
    let (a, b) = (params(&load(&one.out_dir.join("final"))), params(&load(&split.out_dir.join("final"))));
    let diff = max_rel_diff(&a, &b);
    assert!(diff < 1e-4, "sharded SFT differs by {diff:e} (relative)");
}
