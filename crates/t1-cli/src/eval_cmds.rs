//! `t1 eval` (accuracy vs thinking budget) and `t1 demo` (the whole recipe on the laptop task).

use t1_model::FusedAutodiff;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use t1_backends::{BackendTask, DeviceSpec};
use t1_data::{ChatTokenizer, OnBadLine};
use t1_eval::{EvalConfig, EvalReport};
use t1_model::WeightDtype;

pub struct Eval {
    pub models: Vec<PathBuf>,
    pub adapter: Option<PathBuf>,
    pub data: PathBuf,
    pub config: EvalConfig,
    /// `--temperature`; unset: each checkpoint's generation_config.json (greedy without one)
    pub temperature: Option<f32>,
    pub limit: usize,
    pub out: PathBuf,
    /// `--template-kwargs`: extra chat-template variables (e.g. enable_thinking)
    pub template_kwargs: Option<String>,
}

impl BackendTask for Eval {
    type Output = Result<Vec<EvalReport>>;
    fn run<B: FusedAutodiff>(self, device: B::Device) -> Result<Vec<EvalReport>> {
        let mut problems = t1_data::read_problems(&self.data, OnBadLine::Error)?.items;
        if self.limit > 0 {
            problems.truncate(self.limit);
        }
        let mut reports = vec![];
        for dir in &self.models {
            let (config, model, tokenizer) = crate::model_cmds::load_model::<B::InnerBackend>(dir, self.adapter.as_deref(), WeightDtype::F32, &device)?;
            let tokenizer = ChatTokenizer::from_file(&tokenizer)
                .with_context(|| format!("{} needs a tokenizer.json next to its weights", dir.display()))?;
            let tokenizer = crate::model_cmds::with_template_kwargs(tokenizer, self.template_kwargs.as_deref())?;
            tokenizer.check_model_vocab(config.vocab_size)?;
            let name = model_name(dir);
            // unset flags: the checkpoint's generation_config.json, as t1 generate resolves them
            let args = crate::model_cmds::SamplingArgs { temperature: self.temperature, top_p: None, top_k: None, max_new_tokens: 1 };
            let s = args.resolve(&config)?;
            // the stop set RL uses: the model's EOS ids and the tokenizer's
            let eval_cfg = t1_eval::EvalConfig { stop: t1_train::generate::stop_ids(&config, &tokenizer), temperature: s.temperature, top_p: s.top_p, top_k: s.top_k, ..self.config.clone() };
            let report = t1_eval::evaluate(&model, &tokenizer, &problems, &eval_cfg, &name)?;
            for b in &report.results {
                eprintln!("{name}: budget {:>5} accuracy {:.3} pass@{} {:.3} maj@{} {:.3} tokens {:.1}", b.budget, b.accuracy, report.samples, b.pass_at_n, report.samples, b.majority_accuracy, b.mean_tokens);
            }
            reports.push(report);
        }
        std::fs::create_dir_all(&self.out)?;
        std::fs::write(self.out.join("eval.json"), serde_json::to_string_pretty(&reports)?)?;
        t1_eval::write_csv(&self.out.join("eval.csv"), &reports)?;
        t1_eval::plot_budget_curves(&self.out.join("accuracy_vs_budget.svg"), &reports).map_err(anyhow::Error::msg)?;
        // every graded response at the largest budget, one JSON line each with its model
        let mut lines = String::new();
        for r in &reports {
            for x in &r.responses {
                let mut v = serde_json::to_value(x)?;
                v["model"] = serde_json::Value::String(r.model.clone());
                lines.push_str(&serde_json::to_string(&v)?);
                lines.push('\n');
            }
        }
        std::fs::write(self.out.join("samples.jsonl"), lines)?;
        eprintln!("wrote eval.json, eval.csv, samples.jsonl and accuracy_vs_budget.svg to {}", self.out.display());
        Ok(reports)
    }
}

/// A short name for a checkpoint directory: its last two path components.
fn model_name(dir: &Path) -> String {
    let parts: Vec<String> = dir.components().rev().take(2).map(|c| c.as_os_str().to_string_lossy().to_string()).collect();
    parts.into_iter().rev().collect::<Vec<_>>().join("/")
}

/// `t1 demo`: synth data → SFT → RL (one run per seed, each from the same SFT model) → eval
/// of SFT, of each RL model and of seed 0's halfway checkpoint → report, timing each stage.
pub fn demo(out: &Path, quick: bool, seeds: usize, device: &DeviceSpec) -> Result<()> {
    anyhow::ensure!(seeds >= 1, "--seeds {seeds}: the demo needs at least one RL seed");
    let started = Instant::now();
    let mut timings: Vec<(String, f32)> = vec![];
    let data = out.join("data");
    let p = |x: &Path| x.display().to_string();
    let synth_sets: Vec<String> = if quick {
        vec!["splits.train=2000".into(), "splits.rl=500".into(), "splits.test=64".into(), "splits.val=32".into()]
    } else {
        vec![]
    };
    let t = Instant::now();
    crate::train_cmds::synth_text(&data, include_str!("../../../configs/laptop-data.toml"), "the embedded laptop data preset", &synth_sets)?;
    timings.push(("data + tokenizer".into(), t.elapsed().as_secs_f32()));

    let sft_dir = out.join("sft");
    let mut sets = vec![
        format!("out_dir={:?}", p(&sft_dir)),
        format!("data.train={:?}", p(&data.join("sft_train.jsonl"))),
        // the loops watch the validation split; the report below uses test only
        format!("data.eval={:?}", p(&data.join("sft_val.jsonl"))),
        format!("data.eval_problems={:?}", p(&data.join("val.jsonl"))),
        format!("data.tokenizer={:?}", p(&data.join("tokenizer.json"))),
    ];
    if quick {
        sets.extend(["train.max_steps=8", "train.eval_every=0", "train.eval_problems=16", "train.save_every=4", "model.scratch.num_hidden_layers=2", "model.scratch.hidden_size=64", "model.scratch.intermediate_size=160"].map(String::from));
    }
    let (sft_cfg, resolved) = t1_train::load_config_text::<t1_train::sft::SftConfig>(include_str!("../../../configs/laptop-sft.toml"), "the embedded laptop SFT preset", &sets)?;
    let t = Instant::now();
    crate::dispatch(device, crate::train_cmds::Sft { config: sft_cfg, resolved, resume: false })?;
    timings.push(("sft".into(), t.elapsed().as_secs_f32()));

    // one RL run per seed from the same SFT model; seed 0 also keeps its halfway checkpoint
    let (mut rl_dirs, mut halfway) = (vec![], None);
    for seed in 0..seeds {
        let rl_dir = out.join("rl").join(format!("seed-{seed}"));
        let mut sets = vec![
            format!("out_dir={:?}", p(&rl_dir)),
            format!("model.checkpoint={:?}", p(&sft_dir.join("final"))),
            format!("data.train={:?}", p(&data.join("rl.jsonl"))),
            format!("data.eval_problems={:?}", p(&data.join("val.jsonl"))),
            format!("train.seed={seed}"),
        ];
        if quick {
            sets.extend(["train.steps=2", "train.eval_every=0", "train.eval_problems=8", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4", "sampling.max_new_tokens=48"].map(String::from));
        }
        let (mut rl_cfg, resolved) = t1_train::load_config_text::<t1_train::rl::RlConfig>(include_str!("../../../configs/laptop-rl.toml"), "the embedded laptop RL preset", &sets)?;
        let half = (rl_cfg.train.steps / 2).max(1);
        rl_cfg.train.save_every = half;
        rl_cfg.train.keep_checkpoints = rl_cfg.train.keep_checkpoints.max(2);
        let t = Instant::now();
        crate::dispatch(device, crate::train_cmds::Rl { config: rl_cfg, resolved, resume: false })?;
        timings.push((format!("rl seed {seed}"), t.elapsed().as_secs_f32()));
        if seed == 0 {
            halfway = Some((half, rl_dir.join(format!("checkpoint-{half:06}"))));
        }
        rl_dirs.push(rl_dir);
    }

    let mut eval_cfg = EvalConfig::default();
    let limit = if quick {
        eval_cfg.budgets = vec![8, 16, 32];
        eval_cfg.samples = 1;
        8
    } else {
        // up to 3x the SFT model's mean response length (the paper's Figure 1 goes past it)
        eval_cfg.budgets = vec![32, 64, 96, 128, 160, 192, 256, 320, 384];
        eval_cfg.samples = 4;
        eval_cfg.temperature = 1.0; // the RL rollout temperature: what RL optimises
        eval_cfg.threads = 2;
        200
    };
    let t = Instant::now();
    let max_budget = eval_cfg.budgets.last().copied().unwrap_or(160);
    // SFT, then each seed's final RL model, then seed 0's halfway checkpoint (budget curves only)
    let finals: Vec<PathBuf> = std::iter::once(sft_dir.join("final")).chain(rl_dirs.iter().map(|d| d.join("final"))).collect();
    let mut models = finals.clone();
    if let Some((_, dir)) = halfway.as_ref().filter(|(_, d)| d.join("config.json").exists()) {
        models.push(dir.clone());
    }
    let task = Eval { models, adapter: None, data: data.join("test.jsonl"), temperature: Some(eval_cfg.temperature), config: eval_cfg.clone(), limit, out: out.to_path_buf(), template_kwargs: None };
    let reports = t1_backends::dispatch(device, task)??;
    // greedy on the test split at the largest budget, for the report's greedy row
    let greedy_cfg = EvalConfig { budgets: vec![max_budget], samples: 1, temperature: 0.0, ..eval_cfg };
    let greedy_out = out.join("greedy");
    let task = Eval { models: finals, adapter: None, data: data.join("test.jsonl"), temperature: Some(0.0), config: greedy_cfg, limit, out: greedy_out, template_kwargs: None };
    let greedy = t1_backends::dispatch(device, task)??;
    timings.push(("eval".into(), t.elapsed().as_secs_f32()));
    let runs = crate::report::Runs { sft_dir: &sft_dir, rl_dirs: &rl_dirs, halfway_step: halfway.map(|(s, _)| s) };
    crate::report::write(out, &runs, &reports, &greedy, &timings, started.elapsed().as_secs_f32())?;
    eprintln!("where the time went:");
    for (stage, s) in &timings {
        eprintln!("  {stage:<18} {s:>8.1} s");
    }
    eprintln!("  {:<18} {:>8.1} s", "total", started.elapsed().as_secs_f32());
    eprintln!("report: {}", out.join("report.md").display());
    Ok(())
}
