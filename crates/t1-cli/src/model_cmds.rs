//! `t1 info`, `t1 logits`, `t1 generate`, `t1 merge` and `t1 crosscheck`, and how a model
//! directory (a checkpoint, or a PEFT adapter on its base) is loaded.

use t1_model::FusedAutodiff;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use t1_backends::BackendTask;
use t1_model::{hf, Inputs, Qwen2Config, WeightDtype};


pub fn info(dir: &Path) -> Result<()> {
    let config = Qwen2Config::from_file(&dir.join(hf::CONFIG_FILE))?;
    let files = hf::weight_files(dir)?;
    let file_dtype = config.extra.get("torch_dtype").or(config.extra.get("dtype")).and_then(|v| v.as_str()).unwrap_or("unknown");
    println!("architecture        Qwen2ForCausalLM");
    println!("parameters          {} ({:.2}M)", config.num_parameters(), config.num_parameters() as f64 / 1e6);
    println!("dtype               {file_dtype}");
    println!("tied embeddings     {}", config.tie_word_embeddings);
    println!("vocab_size          {}", config.vocab_size);
    println!("hidden_size         {}", config.hidden_size);
    println!("intermediate_size   {}", config.intermediate_size);
    println!("layers              {}", config.num_hidden_layers);
    println!("attention heads     {} (kv heads {}, head_dim {})", config.num_attention_heads, config.num_key_value_heads, config.head_dim());
    println!("rope_theta          {}", config.rope_theta());
    println!("weight files        {}", files.len());
    Ok(())
}

/// A model to run: the checkpoint `model` (or, when `model` is a PEFT adapter directory, the
/// base its `base_model_name_or_path` names, as PEFT's `AutoPeftModelForCausalLM` does) with
/// `adapter` applied, and the tokenizer.json of the first of adapter, model and base that has one.
pub fn load_model<B: burn::tensor::backend::Backend>(
    model: &Path,
    adapter: Option<&Path>,
    dtype: WeightDtype,
    device: &B::Device,
) -> Result<(Qwen2Config, t1_model::Qwen2<B>, PathBuf)> {
    let (base, adapter) = match adapter {
        Some(a) => (model.to_path_buf(), Some(a.to_path_buf())),
        None if t1_model::lora::is_adapter_dir(model) && model.join(hf::CONFIG_FILE).exists() => {
            bail!(
                "{} holds both a checkpoint (config.json) and a LoRA adapter (adapter_config.json): say which with --model BASE --adapter DIR, or keep them in separate directories",
                model.display()
            );
        }
        None if t1_model::lora::is_adapter_dir(model) => {
            let path = model.join(t1_model::lora::ADAPTER_CONFIG_FILE);
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let meta: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
            let base = meta.get("base_model_name_or_path").and_then(|v| v.as_str()).unwrap_or("");
            if base.is_empty() || !Path::new(base).join(hf::CONFIG_FILE).exists() {
                bail!(
                    "{} is a LoRA adapter whose base_model_name_or_path ({base:?}) is not a checkpoint directory here: give the base with --model BASE --adapter {}",
                    model.display(),
                    model.display()
                );
            }
            (PathBuf::from(base), Some(model.to_path_buf()))
        }
        None => (model.to_path_buf(), None),
    };
    let (config, mut m) = t1_model::load::<B>(&base, dtype, device).with_context(|| format!("loading {}", base.display()))?;
    if let Some(a) = &adapter {
        m = t1_model::load_adapter(m, a)?;
    }
    let tokenizer = [adapter.as_deref(), Some(model), Some(base.as_path())]
        .into_iter()
        .flatten()
        .map(|d| d.join("tokenizer.json"))
        .find(|p| p.exists())
        .unwrap_or_else(|| base.join("tokenizer.json"));
    Ok((config, m, tokenizer))
}

/// `t1 merge`: base + adapter → a Hugging Face checkpoint with `W + s·A B` (and the tokenizer).
pub fn merge(model: &Path, adapter: &Path, out: &Path, dtype: Option<&str>) -> Result<()> {
    type Inner = <t1_backends::FlexBackend as burn::tensor::backend::AutodiffBackend>::InnerBackend;
    if out.join(hf::CONFIG_FILE).exists() || out.join(t1_model::lora::ADAPTER_CONFIG_FILE).exists() {
        bail!("{} already holds a model: give an empty or new --out directory", out.display());
    }
    let config = Qwen2Config::from_file(&model.join(hf::CONFIG_FILE))?;
    let base_dtype = config.extra.get("torch_dtype").or(config.extra.get("dtype")).and_then(|v| v.as_str()).and_then(WeightDtype::parse).unwrap_or(WeightDtype::F32);
    let dtype = match dtype {
        Some(d) => WeightDtype::parse(d).with_context(|| format!("--dtype {d:?}: use f32, bf16 or f16"))?,
        None => base_dtype,
    };
    // merged in f32 and rounded once to the output dtype
    let (config, m, tokenizer) = load_model::<Inner>(model, Some(adapter), WeightDtype::F32, &Default::default())?;
    let merged = m.merge_lora();
    t1_model::save(&merged, &config, out, &t1_model::SaveOptions { dtype: Some(dtype), ..Default::default() })?;
    if tokenizer.exists() {
        // tokenizer.json with its tokenizer_config.json (chat template, EOS) and chat_template.jinja
        t1_data::ChatTokenizer::from_file(&tokenizer)?.save(&out.join("tokenizer.json"))?;
    }
    eprintln!("merged {} into {} ({}): {}", adapter.display(), model.display(), dtype.torch_name(), out.display());
    Ok(())
}

pub struct Logits {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub ids: Vec<i64>,
    pub out: PathBuf,
    pub dtype: WeightDtype,
}

impl BackendTask for Logits {
    type Output = Result<()>;

    fn run<B: FusedAutodiff>(self, device: B::Device) -> Result<()> {
        let (config, model, _) = load_model::<B::InnerBackend>(&self.model, self.adapter.as_deref(), self.dtype, &device)?;
        if let Some(bad) = self.ids.iter().find(|&&i| i < 0 || i as usize >= config.vocab_size) {
            bail!("token id {bad} is outside the vocabulary (0..{})", config.vocab_size);
        }
        let n = self.ids.len();
        let logits = model.forward(&Inputs::dense(1, n, self.ids), None);
        let values = logits.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, config.vocab_size], &bytes)?;
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let data = safetensors::serialize([("logits", view)], Some(meta))?;
        hf::write_atomic(&self.out, &data)?;
        Ok(())
    }
}

pub struct Generate {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub prompts: Vec<String>,
    pub sampling: SamplingArgs,
    pub seed: u64,
    /// `--template-kwargs`: extra variables of the chat template (e.g. enable_thinking)
    pub template_kwargs: Option<String>,
}

/// `--template-kwargs '{"enable_thinking": false}'`: the JSON object of extra chat-template
/// variables (transformers' `apply_chat_template(**kwargs)`), applied to `tokenizer`.
pub fn with_template_kwargs(tokenizer: t1_data::ChatTokenizer, kwargs: Option<&str>) -> Result<t1_data::ChatTokenizer> {
    match kwargs {
        None => Ok(tokenizer),
        Some(k) => {
            let map: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(k).with_context(|| format!("--template-kwargs {k:?} is not a JSON object, e.g. '{{\"enable_thinking\": false}}'"))?;
            Ok(tokenizer.with_template_kwargs(map))
        }
    }
}

/// Sampling flags; what is unset comes from the checkpoint's generation_config.json.
pub struct SamplingArgs {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub max_new_tokens: usize,
}

impl SamplingArgs {
    /// The flags over the checkpoint's defaults ([`t1_model::GenerationConfig::sampling_defaults`]).
    pub fn resolve(&self, config: &Qwen2Config) -> Result<t1_train::SamplingConfig> {
        let (t, p, k) = config.generation.as_ref().map(|g| g.sampling_defaults()).unwrap_or((0.0, 1.0, 0));
        let sampling = t1_train::SamplingConfig {
            temperature: self.temperature.unwrap_or(t),
            top_p: self.top_p.unwrap_or(p),
            top_k: self.top_k.unwrap_or(k),
            max_new_tokens: self.max_new_tokens,
        };
        sampling.validate().map_err(anyhow::Error::msg)?;
        Ok(sampling)
    }
}

impl BackendTask for Generate {
    type Output = Result<()>;

    fn run<B: FusedAutodiff>(self, device: B::Device) -> Result<()> {
        use rand::SeedableRng;
        let (config, model, tokenizer) = load_model::<B::InnerBackend>(&self.model, self.adapter.as_deref(), WeightDtype::F32, &device)?;
        let tokenizer = with_template_kwargs(t1_data::ChatTokenizer::from_file(&tokenizer)?, self.template_kwargs.as_deref())?;
        tokenizer.check_model_vocab(config.vocab_size)?;
        let prompts = self.prompts.iter().map(|p| tokenizer.encode_prompt(p)).collect::<Result<Vec<_>, _>>()?;
        let sampling = self.sampling.resolve(&config)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        let eos = t1_train::generate::stop_ids(&config, &tokenizer);
        let outs = t1_train::generate(&model, &prompts, &sampling, &eos, tokenizer.pad_id(), &mut rng);
        for ((p, ids), o) in self.prompts.iter().zip(&prompts).zip(outs) {
            let line = serde_json::json!({"prompt": p, "response": tokenizer.decode(&o.tokens), "tokens": o.tokens.len(), "token_ids": o.tokens, "prompt_token_ids": ids, "truncated": o.truncated});
            println!("{line}");
        }
        Ok(())
    }
}

/// Computes the cross-check quantities of a case on one backend.
pub struct CrossCompute {
    pub case: t1_train::crosscheck::Case,
}

impl BackendTask for CrossCompute {
    type Output = Vec<t1_train::crosscheck::Quantity>;
    fn run<B: FusedAutodiff>(self, device: B::Device) -> Self::Output {
        t1_train::crosscheck::compute::<B>(&self.case, &device)
    }
}

/// `t1 crosscheck`: the same model and batch on every device, compared with the first.
pub fn crosscheck(devices: &[t1_backends::DeviceSpec], model: Option<&Path>, batch: usize, len: usize, seed: u64, verbose: bool) -> Result<()> {
    use t1_train::crosscheck::{compare, Case};
    anyhow::ensure!(devices.len() >= 2, "give at least two devices, e.g. --devices flex,wgpu");
    let case = match model {
        Some(dir) => {
            let (config, m) = t1_model::load::<<t1_backends::FlexBackend as burn::tensor::backend::AutodiffBackend>::InnerBackend>(dir, WeightDtype::F32, &Default::default())?;
            let mut case = Case::random(&config, batch, len, seed);
            case.weights = hf::named_tensors(&m);
            case
        }
        None => {
            let mut config = Qwen2Config::tiny(97, 48, 2, 6, 2);
            config.tie_word_embeddings = false;
            Case::random(&config, batch, len, seed)
        }
    };
    let reference = t1_backends::dispatch(&devices[0], CrossCompute { case: case.clone() })?;
    let mut failed = false;
    for other in &devices[1..] {
        let values = t1_backends::dispatch(other, CrossCompute { case: case.clone() })?;
        let rows = compare(&case, &reference, &values);
        println!("{} vs {}", devices[0], other);
        println!("{:<44} {:>12} {:>12} {:>12}  result", "quantity", "max |diff|", "max rel", "allowed");
        // per-parameter rows are summarised by their worst entry unless --verbose
        let mut shown: Vec<t1_train::crosscheck::Row> = vec![];
        for row in rows {
            let group = if verbose { None } else { ["param/", "grad/", "adamw_update/"].into_iter().find(|g| row.quantity.starts_with(g)) };
            match group {
                Some(g) => {
                    let name = format!("{g}* (every parameter)");
                    match shown.iter_mut().find(|r| r.quantity == name) {
                        Some(r) => {
                            r.pass &= row.pass;
                            if row.max_abs / row.allowed.max(1e-30) > r.max_abs / r.allowed.max(1e-30) {
                                (r.max_abs, r.max_rel, r.allowed) = (row.max_abs, row.max_rel, row.allowed);
                            }
                        }
                        None => shown.push(t1_train::crosscheck::Row { quantity: name, ..row }),
                    }
                }
                None => shown.push(row),
            }
        }
        for r in &shown {
            println!("{:<44} {:>12.3e} {:>12.3e} {:>12.3e}  {}", r.quantity, r.max_abs, r.max_rel, r.allowed, if r.pass { "pass" } else { "FAIL" });
            failed |= !r.pass;
        }
    }
    anyhow::ensure!(!failed, "the backends disagree beyond the documented tolerances (see the table)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled(temperature: f32, top_p: f32, top_k: usize) -> t1_train::SamplingConfig {
        t1_train::SamplingConfig { temperature, top_p, top_k, max_new_tokens: 8 }
    }

    /// The flags `t1 generate` and `t1 eval` leave unset come from generation_config.json
    /// (transformers' generate: its values with do_sample, greedy without); set flags win.
    #[test]
    fn unset_sampling_flags_come_from_generation_config_and_set_ones_win() {
        let mut config = Qwen2Config::tiny(64, 16, 1, 2, 1);
        let unset = SamplingArgs { temperature: None, top_p: None, top_k: None, max_new_tokens: 8 };
        assert_eq!(unset.resolve(&config).unwrap(), sampled(0.0, 1.0, 0), "no generation_config: greedy");
        let g: t1_model::GenerationConfig = serde_json::from_str(r#"{"do_sample": true, "temperature": 0.6, "top_p": 0.95, "top_k": 20}"#).unwrap();
        config.generation = Some(g);
        assert_eq!(unset.resolve(&config).unwrap(), sampled(0.6, 0.95, 20), "Qwen3's sampling defaults");
        let set = SamplingArgs { temperature: Some(0.0), top_p: Some(0.5), top_k: Some(3), max_new_tokens: 8 };
        assert_eq!(set.resolve(&config).unwrap(), sampled(0.0, 0.5, 3));
        let partly = SamplingArgs { temperature: Some(1.2), ..unset };
        assert_eq!(partly.resolve(&config).unwrap(), sampled(1.2, 0.95, 20));
        let bad = SamplingArgs { top_p: Some(0.0), ..partly };
        assert!(bad.resolve(&config).unwrap_err().to_string().contains("top_p"));
        let no_sample: t1_model::GenerationConfig = serde_json::from_str(r#"{"do_sample": false, "temperature": 0.6}"#).unwrap();
        config.generation = Some(no_sample);
        assert_eq!(unset.resolve(&config).unwrap(), sampled(0.0, 1.0, 0), "do_sample false: greedy");
    }
}
