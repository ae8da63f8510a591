//! `t1 bench sft` and `t1 bench generate`: throughput of the training step and of decoding on
//! one checkpoint, as one JSON line (compare with `benches/reference.py`, PyTorch on the same
//! checkpoint).

use t1_model::FusedAutodiff;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::optim::{GradientsAccumulator, Optimizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use t1_backends::BackendTask;
use t1_data::SftBatch;
use t1_model::WeightDtype;
use t1_train::parallel::{sharded_grads, split_even};

pub struct BenchSft {
    pub model: PathBuf,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub threads: usize,
    pub dtype: WeightDtype,
    pub checkpointing: t1_train::checkpoint::ActivationCheckpointing,
    /// LoRA rank (0 = full fine-tuning).
    pub lora_r: usize,
}

/// LoRA of rank `r` on every projection, alpha 2r.
fn lora_config(r: usize) -> t1_model::LoraConfig {
    t1_model::LoraConfig { r, alpha: 2.0 * r as f64, ..Default::default() }
}

impl BackendTask for BenchSft {
    type Output = Result<()>;

    /// forward + backward + AdamW on random tokens `[batch, seq]` (every position a loss
    /// token), after one warm-up step.
    fn run<B: FusedAutodiff>(self, device: B::Device) -> Result<()> {
        let (config, mut model) = t1_model::load::<B>(&self.model, self.dtype, &device).with_context(|| format!("loading {}", self.model.display()))?;
        if self.lora_r > 0 {
            let source = t1_train::common::ModelSource { checkpoint: self.model.clone(), ..Default::default() };
            model = t1_train::lora::attach(model, &source, &lora_config(self.lora_r))?;
        }
        let trainable = model.lora.as_ref().map_or(config.num_parameters(), |l| l.num_params());
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (b, t) = (self.batch, self.seq);
        let ids: Vec<i64> = (0..b * (t + 1)).map(|_| rng.random_range(0..config.vocab_size as i64)).collect();
        let rows: Vec<(Vec<i64>, Vec<i64>)> = (0..b).map(|r| (ids[r * (t + 1)..r * (t + 1) + t].to_vec(), ids[r * (t + 1) + 1..(r + 1) * (t + 1)].to_vec())).collect();
        let shard = |range: std::ops::Range<usize>| SftBatch {
            batch: range.len(),
            len: t,
            ids: rows[range.clone()].iter().flat_map(|r| r.0.clone()).collect(),
            attention: vec![true; range.len() * t],
            targets: rows[range.clone()].iter().flat_map(|r| r.1.clone()).collect(),
            target_mask: vec![true; range.len() * t],
            segments: None,
        };
        let mut optim = burn::optim::AdamWConfig::new().init::<B, t1_model::Qwen2<B>>();
        let tokens = (b * t) as f32;
        let mut times = vec![];
        for _ in 0..self.steps + 1 {
            let start = Instant::now();
            let shards: Vec<SftBatch> = split_even(b, self.threads).into_iter().map(&shard).collect();
            let (grads, _loss, _) = sharded_grads(&model, shards, |m, s| {
                let (g, v) = t1_train::sft::batch_grads(m, &s, tokens, self.checkpointing);
                (g, v, ())
            });
            let mut accum = GradientsAccumulator::new();
            accum.accumulate(&model, grads);
            model = optim.step(1e-4, model, accum.grads());
            // wait for the device: read back one parameter the step wrote
            match model.lora.as_ref().and_then(|l| l.layers.first()).and_then(|l| l.q_proj.as_ref()) {
                Some(adapter) => drop(adapter.b.val().into_data()),
                None => drop(model.norm.gamma.val().into_data()),
            }
            times.push(start.elapsed().as_secs_f64());
        }
        let timed = &times[1..];
        let secs = timed.iter().sum::<f64>() / timed.len().max(1) as f64;
        let flops = 6.0 * config.num_parameters() as f64 * tokens as f64;
        let line = serde_json::json!({
            "bench": "sft", "params": config.num_parameters(), "trainable_params": trainable, "lora_r": self.lora_r, "batch": b, "seq": t, "steps": self.steps, "threads": self.threads, "activation_checkpointing": format!("{:?}", self.checkpointing).to_lowercase(),
            "dtype": format!("{:?}", self.dtype).to_lowercase(),
            "step_s": secs, "tokens_per_s": tokens as f64 / secs, "gflop_per_s_6nd": flops / secs / 1e9,
            "warmup_s": times[0], "peak_rss_mib": peak_rss_mib(),
        });
        println!("{line}");
        Ok(())
    }
}

pub struct BenchGenerate {
    pub model: PathBuf,
    pub batch: usize,
    pub prompt: usize,
    pub new: usize,
    pub threads: usize,
    pub dtype: WeightDtype,
    /// Decode through random LoRA adapters of this rank (0 = none).
    pub lora_r: usize,
    /// Merge them into the weights first (timed with the decoding).
    pub merge: bool,
    /// Decode through burn, not the CPU engine.
    pub burn: bool,
}

impl BackendTask for BenchGenerate {
    type Output = Result<()>;

    /// Every sequence samples exactly `new` tokens at temperature 1 with the KV cache (no
    /// EOS stop), from `prompt` random tokens; one warm-up run of 4 tokens first.
    fn run<B: FusedAutodiff>(self, device: B::Device) -> Result<()> {
        let (config, mut model) = t1_model::load::<B::InnerBackend>(&self.model, self.dtype, &device).with_context(|| format!("loading {}", self.model.display()))?;
        if self.lora_r > 0 {
            model = model.with_new_lora(&lora_config(self.lora_r), "").map_err(anyhow::Error::msg)?;
            // B = 0 would make the adapters a no-op in value, not in work: give them values anyway
            struct Randomize;
            impl<B: burn::tensor::backend::Backend> burn::module::ModuleMapper<B> for Randomize {
                fn map_float<const D: usize>(&mut self, p: burn::module::Param<burn::tensor::Tensor<B, D>>) -> burn::module::Param<burn::tensor::Tensor<B, D>> {
                    let (id, t, m) = p.consume();
                    let r = t.random_like(burn::tensor::Distribution::Normal(0.0, 0.01));
                    burn::module::Param::from_mapped_value(id, r, m)
                }
            }
            use burn::module::Module;
            model.lora = model.lora.take().map(|l| l.map(&mut Randomize));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let prompts: Vec<Vec<u32>> = (0..self.batch).map(|_| (0..self.prompt).map(|_| rng.random_range(0..config.vocab_size as u32)).collect()).collect();
        let sampling = t1_train::SamplingConfig { temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: 4 };
        t1_train::generate_sharded(&model, &prompts, &sampling, &[], 0, &mut rng, self.threads);
        let sampling = t1_train::SamplingConfig { max_new_tokens: self.new, ..sampling };
        let start = Instant::now();
        let merged = self.merge.then(|| model.clone().merge_lora());
        let merge_s = start.elapsed().as_secs_f64();
        let m = merged.as_ref().unwrap_or(&model);
        let outs = if self.burn {
            t1_train::generate::generate_through_burn(m, &prompts, &sampling, &[], 0, &mut rng)
        } else {
            t1_train::generate_sharded(m, &prompts, &sampling, &[], 0, &mut rng, self.threads)
        };
        let secs = start.elapsed().as_secs_f64();
        let generated: usize = outs.iter().map(|o| o.tokens.len()).sum();
        anyhow::ensure!(generated == self.batch * self.new, "expected {} new tokens, got {generated}", self.batch * self.new);
        let line = serde_json::json!({
            "bench": "generate", "params": config.num_parameters(), "batch": self.batch, "prompt": self.prompt, "new": self.new,
            "threads": self.threads, "dtype": format!("{:?}", self.dtype).to_lowercase(), "lora_r": self.lora_r, "merged": self.merge, "merge_s": merge_s, "decoder": if self.burn { "burn" } else { "auto" },
            "seconds": secs, "tokens_per_s": generated as f64 / secs, "peak_rss_mib": peak_rss_mib(),
        });
        println!("{line}");
        Ok(())
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB; None elsewhere.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
