//! `t1 plan`: the memory plan of an SFT or RL config on a device, and the check `t1 sft` and
//! `t1 rl` run before they allocate anything.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use t1_backends::DeviceSpec;
use t1_train::plan::{self, MemoryPlan};

/// Which stage a config is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    Sft,
    Rl,
}

/// What `t1 plan` was asked.
pub struct PlanArgs {
    pub stage: Stage,
    pub config: PathBuf,
    pub sets: Vec<String>,
    pub device: DeviceSpec,
    pub memory: Option<String>,
    pub arch: Option<String>,
    pub prompt_tokens: Option<usize>,
    pub json: bool,
}

/// The plan of a config: its architecture from the checkpoint's config.json (or `arch`, a
/// Qwen2.5 size, when the checkpoint is not on this machine), for RL the longest prompt of the
/// data (or `prompt_tokens`).
pub fn plan_of(stage: Stage, config: &Path, sets: &[String], arch: Option<&str>, prompt_tokens: Option<usize>) -> Result<MemoryPlan> {
    let shape_of = |source: &t1_train::common::ModelSource, tokenizer: &Path| -> Result<t1_model::Qwen2Config> {
        match arch {
            Some(name) => plan::qwen25(name).with_context(|| format!("unknown --arch {name:?}: use qwen2.5-0.5b, -1.5b, -3b, -7b, -14b or -32b")),
            None => plan::model_shape(source, tokenizer).with_context(|| {
                format!("reading the model's architecture for the plan (a checkpoint not on this machine yet: give its size with --arch, e.g. --arch qwen2.5-14b)")
            }),
        }
    };
    match stage {
        Stage::Sft => {
            let (cfg, _) = t1_train::load_config::<t1_train::sft::SftConfig>(Some(config), sets)?;
            cfg.validate()?;
            let shape = shape_of(&cfg.model, &cfg.data.tokenizer)?;
            anyhow::ensure!(
                cfg.data.max_len <= shape.max_position_embeddings,
                "data.max_len = {} exceeds the model's context of {} tokens (max_position_embeddings): lower data.max_len",
                cfg.data.max_len,
                shape.max_position_embeddings
            );
            Ok(plan::sft_plan(&cfg, &shape)?)
        }
        Stage::Rl => {
            let (cfg, _) = t1_train::load_config::<t1_train::rl::RlConfig>(Some(config), sets)?;
            cfg.validate()?;
            let shape = shape_of(&cfg.model, &cfg.data.tokenizer)?;
            let prompt = match prompt_tokens {
                Some(n) => n,
                None => plan::longest_prompt(&cfg, &cfg.model.checkpoint.join("tokenizer.json"))
                    .context("finding the longest prompt of data.train for the plan (or give it with --prompt-tokens N)")?,
            };
            // a prompt longer than the context is refused by `t1 rl` itself, naming the problem's line
            if prompt + cfg.sampling.max_new_tokens > shape.max_position_embeddings {
                eprintln!("warning: the longest prompt ({prompt} tokens) plus sampling.max_new_tokens exceeds the model's context of {} tokens", shape.max_position_embeddings);
            }
            Ok(plan::rl_plan(&cfg, &shape, prompt)?)
        }
    }
}

/// The memory to plan against: `--memory`, else what the device reports.
fn available(device: &DeviceSpec, memory: Option<&str>) -> Result<Option<(u64, String)>> {
    if let Some(m) = memory {
        let bytes = plan::parse_size(m).with_context(|| format!("--memory {m:?} is not a size: write e.g. 80GB, 141G or 24GiB"))?;
        return Ok(Some((bytes, "--memory".into())));
    }
    Ok(t1_backends::device_memory(device)?)
}

pub fn run(a: PlanArgs) -> Result<()> {
    let plan = plan_of(a.stage, &a.config, &a.sets, a.arch.as_deref(), a.prompt_tokens)?;
    let avail = available(&a.device, a.memory.as_deref())?;
    if a.json {
        let v = serde_json::json!({"plan": plan, "device": a.device.to_string(), "available": avail.as_ref().map(|x| x.0), "fits": avail.as_ref().map(|x| plan.peak <= x.0)});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("memory plan of {} on {}:", a.config.display(), a.device);
        print!("{}", plan.render(avail.as_ref().map(|(b, s)| (*b, s.as_str()))));
        if avail.is_none() {
            println!("  ({} does not report its memory: add --memory SIZE for a verdict)", a.device);
        }
    }
    Ok(())
}

/// Run before `t1 sft` / `t1 rl` allocate: an error with the largest items and what shrinks
/// them when the plan does not fit the device.
pub fn check_before_run(stage: Stage, config: &Path, sets: &[String], device: &DeviceSpec) -> Result<()> {
    let plan = plan_of(stage, config, sets, None, None)?;
    let avail = match available(device, None) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("warning: memory plan unchecked: {e:#}");
            None
        }
    };
    let Some((avail, source)) = avail else {
        eprintln!("memory plan: peak {} ({} did not report its memory; `t1 plan --memory SIZE` gives a verdict)", plan::human(plan.peak), device);
        return Ok(());
    };
    if plan.peak > avail {
        bail!(
            "this run needs about {} on {device} at its {} phase, and {} is available ({source}); nothing was allocated or written. {}. `t1 plan {} --config {}` shows every item; --no-memory-check runs anyway",
            plan::human(plan.peak),
            plan.peak_phase,
            plan::human(avail),
            plan.advice(),
            if stage == Stage::Sft { "sft" } else { "rl" },
            config.display()
        );
    }
    eprintln!("memory plan: peak {} of {} available on {device}", plan::human(plan.peak), plan::human(avail));
    Ok(())
}
