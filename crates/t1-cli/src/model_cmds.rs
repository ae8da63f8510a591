//! `t1 info` and `t1 logits`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
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

pub struct Logits {
    pub model: PathBuf,
    pub ids: Vec<i64>,
    pub out: PathBuf,
    pub dtype: WeightDtype,
}

impl BackendTask for Logits {
    type Output = Result<()>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<()> {
        let (config, model) = t1_model::load::<B::InnerBackend>(&self.model, self.dtype, &device)
            .with_context(|| format!("loading {}", self.model.display()))?;
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
