//! `t1 data synth`, `t1 sft`, `t1 rl`, `t1 grade`: thin glue from the CLI to the libraries.

use t1_model::FusedAutodiff;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use t1_backends::BackendTask;
use t1_data::TaskConfig;

/// `t1 data synth` settings (a `[task]` table and split sizes), all with defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    pub task: TaskConfig,
    pub splits: SplitSizes,
    /// BPE vocabulary size of the task tokenizer.
    pub vocab_size: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SplitSizes {
    pub train: usize,
    pub rl: usize,
    pub test: usize,
    /// Validation problems (monitoring and tuning; reports use test only).
    pub val: usize,
}

impl Default for SplitSizes {
    fn default() -> Self {
        Self { train: 20000, rl: 4000, test: 500, val: 200 }
    }
}

/// `t1 data tokenize`: each conversation of `input` through the tokenizer's chat template,
/// written as `{"input_ids", "loss_mask"}` lines; the first `show` are printed with their
/// trained spans marked.
pub fn tokenize(tokenizer: &Path, input: &Path, output: &Path, show: usize, kwargs: Option<&str>) -> Result<()> {
    let file = if tokenizer.is_dir() { tokenizer.join("tokenizer.json") } else { tokenizer.to_path_buf() };
    let tok = crate::model_cmds::with_template_kwargs(t1_data::ChatTokenizer::from_file(&file)?, kwargs)?;
    let loaded = t1_data::read_sft(input, t1_data::OnBadLine::Error)?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(output).with_context(|| format!("creating {}", output.display()))?);
    let (mut tokens, mut trained) = (0usize, 0usize);
    for (i, (ex, line)) in loaded.items.iter().zip(&loaded.lines).enumerate() {
        let enc = tok.encode_chat_detailed(&ex.messages, false).with_context(|| format!("{}:{line}", input.display()))?;
        if i < show {
            println!("--- {}:{line} ({} tokens, {} trained)\n{}", input.display(), enc.ids.len(), enc.loss_mask.iter().filter(|m| **m).count(), enc.marked("«", "»"));
        }
        tokens += enc.ids.len();
        trained += enc.loss_mask.iter().filter(|m| **m).count();
        let mask: Vec<u8> = enc.loss_mask.iter().map(|m| *m as u8).collect();
        serde_json::to_writer(&mut out, &serde_json::json!({"input_ids": enc.ids, "loss_mask": mask}))?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    eprintln!(
        "{} conversations, {tokens} tokens ({trained} trained) with the chat template of {} -> {}",
        loaded.items.len(),
        tok.template().origin(),
        output.display()
    );
    Ok(())
}

/// Writes the laptop task: sft_train.jsonl, rl.jsonl, test.jsonl (reports only), the
/// validation split as val.jsonl and sft_val.jsonl (monitoring and tuning), tokenizer.json.
pub fn synth(out: &Path, config: Option<&Path>, sets: &[String]) -> Result<()> {
    let (cfg, _) = t1_train::load_config::<SynthConfig>(config, sets)?;
    write_synth(out, cfg)
}

/// [`synth`] from a config's text (`what` names it in errors), as the demo embeds its preset.
pub fn synth_text(out: &Path, text: &str, what: &str, sets: &[String]) -> Result<()> {
    let (cfg, _) = t1_train::load_config_text::<SynthConfig>(text, what, sets)?;
    write_synth(out, cfg)
}

fn write_synth(out: &Path, mut cfg: SynthConfig) -> Result<()> {
    if cfg.vocab_size == 0 {
        cfg.vocab_size = 512;
    }
    cfg.task.validate()?;
    let needed = (cfg.splits.train + cfg.splits.rl + cfg.splits.test + cfg.splits.val) as u128 * 2;
    anyhow::ensure!(
        cfg.task.num_prompts() >= needed,
        "the task has only {} distinct problems, too few for splits of {} + {} + {}: raise task.max_operand or task.max_operands, or lower the split sizes",
        cfg.task.num_prompts(), cfg.splits.train, cfg.splits.rl, cfg.splits.test
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let s = t1_data::splits(&cfg.task, cfg.seed, cfg.splits.train, cfg.splits.rl, cfg.splits.test);
    let texts: Vec<String> = s.train.iter().flat_map(|x| [x.prompt.clone(), x.solution.clone()]).collect();
    let tokenizer = t1_data::train_bpe(&texts, cfg.vocab_size)?;
    tokenizer.save(&out.join("tokenizer.json"))?;
    let sft = |v: &[t1_data::Sample]| v.iter().map(t1_data::sft_example).collect::<Vec<_>>();
    let problems = |v: &[t1_data::Sample]| v.iter().map(t1_data::problem).collect::<Vec<_>>();
    t1_data::write_jsonl(&out.join("sft_train.jsonl"), &sft(&s.train))?;
    let val = t1_data::validation(&cfg.task, cfg.seed, &s, cfg.splits.val);
    // SFT's held-out loss and the loops' held-out accuracy watch the validation split
    t1_data::write_jsonl(&out.join("sft_val.jsonl"), &sft(&val))?;
    t1_data::write_jsonl(&out.join("val.jsonl"), &problems(&val))?;
    t1_data::write_jsonl(&out.join("rl.jsonl"), &problems(&s.rl))?;
    t1_data::write_jsonl(&out.join("test.jsonl"), &problems(&s.test))?;
    std::fs::write(out.join("synth.toml"), toml::to_string(&cfg)?)?;
    eprintln!(
        "wrote {} train, {} rl, {} test problems and a {}-token tokenizer to {}",
        s.train.len(), s.rl.len(), s.test.len(), tokenizer.vocab_size(), out.display()
    );
    Ok(())
}

pub struct Sft {
    pub config: t1_train::sft::SftConfig,
    pub resolved: String,
    pub resume: bool,
}

impl BackendTask for Sft {
    type Output = Result<()>;
    fn run<B: FusedAutodiff>(self, device: B::Device) -> Result<()> {
        let summary = t1_train::sft::run_sft::<B>(&self.config, &self.resolved, self.resume, &device)?;
        println!("{}", serde_json::to_string_pretty(&summary)?);
        Ok(())
    }
}

pub struct Rl {
    pub config: t1_train::rl::RlConfig,
    pub resolved: String,
    pub resume: bool,
}

impl BackendTask for Rl {
    type Output = Result<()>;
    fn run<B: FusedAutodiff>(self, device: B::Device) -> Result<()> {
        let summary = t1_train::rl::run_rl::<B>(&self.config, &self.resolved, self.resume, &device)?;
        println!("{}", serde_json::to_string_pretty(&summary)?);
        Ok(())
    }
}

#[derive(Deserialize)]
struct GradeInput {
    response: String,
    answer: serde_json::Value,
}

/// `t1 grade`: one output line per input line, in order.
pub fn grade(input: &Path, output: Option<&PathBuf>, answer_pattern: Option<String>) -> Result<()> {
    let cfg = t1_reward::GraderConfig { answer_pattern, ..Default::default() };
    cfg.validate()?;
    let file = std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let mut lines = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}:{}", input.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let item: GradeInput = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: expected {{\"response\": string, \"answer\": string}}", input.display(), i + 1))?;
        let answer = match item.answer {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        let g = t1_reward::grade(&item.response, &answer, &cfg);
        lines.push(serde_json::json!({"correct": g.correct, "extracted": g.extracted}).to_string());
    }
    let text = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    match output {
        Some(path) => t1_model::hf::write_atomic(path, text.as_bytes())?,
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    Ok(())
}
