//! The Hugging Face `config.json` of a Qwen2 / Qwen2.5 model, with its field names verbatim.
//!
//! Fields this crate does not use are kept in `extra` and written back on save, so that a
//! config survives a load → save round trip unchanged.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

use crate::error::ModelError;

/// `config.json` of a `Qwen2ForCausalLM` checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    /// Must contain `Qwen2ForCausalLM`.
    #[serde(default = "default_architectures")]
    pub architectures: Vec<String>,
    /// Must be `qwen2`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: `num_attention_heads` must be a multiple of it.
    pub num_key_value_heads: usize,
    /// Per-head width; `hidden_size / num_attention_heads` when absent (as in transformers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base. transformers >= 5 writes it inside `rope_parameters` instead; both are read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// `lm_head` shares the token embedding matrix when true (no `lm_head.weight` in the file).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<Value>,
    /// One id or a list of ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Every other field (`torch_dtype`, `transformers_version`, ...), kept for round trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// The checkpoint's `generation_config.json`, read by [`crate::load`] and written back by
    /// [`crate::save`] (not a field of config.json).
    #[serde(skip)]
    pub generation: Option<GenerationConfig>,
}

/// `generation_config.json`: the stop ids and sampling defaults a checkpoint ships with.
/// Unknown fields (`repetition_penalty`, ...) are kept for round trips.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// One id or a list of ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The file name of [`GenerationConfig`] in a checkpoint directory.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

impl GenerationConfig {
    /// `dir/generation_config.json`, or `None` when the checkpoint has none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, ModelError> {
        let path = dir.join(GENERATION_CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ModelError::io(&path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ModelError::Config { path, message: format!("not a valid generation_config.json: {e}") })
    }

    /// The end-of-sequence ids it names (possibly none).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        ids_of(&self.eos_token_id)
    }

    /// `(temperature, top_p, top_k)` transformers' `generate()` samples with when given no
    /// sampling arguments: greedy (temperature 0) unless `do_sample` is true, and then its
    /// defaults 1.0 / 1.0 / 50 for what the file leaves out.
    pub fn sampling_defaults(&self) -> (f32, f32, usize) {
        if self.do_sample == Some(true) {
            (self.temperature.unwrap_or(1.0), self.top_p.unwrap_or(1.0), self.top_k.unwrap_or(50))
        } else {
            (0.0, 1.0, 0)
        }
    }
}

fn ids_of(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

fn default_architectures() -> Vec<String> {
    vec!["Qwen2ForCausalLM".into()]
}
fn default_model_type() -> String {
    "qwen2".into()
}
fn default_max_position_embeddings() -> usize {
    32768
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_hidden_act() -> String {
    "silu".into()
}
fn default_initializer_range() -> f64 {
    0.02
}

impl Qwen2Config {
    /// A small config for from-scratch training and tests; every other field as in Qwen2.5.
    pub fn tiny(vocab_size: usize, hidden_size: usize, layers: usize, heads: usize, kv_heads: usize) -> Self {
        Self {
            architectures: default_architectures(),
            model_type: default_model_type(),
            vocab_size,
            hidden_size,
            intermediate_size: hidden_size * 8 / 3 / 8 * 8,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: None,
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-6,
            rope_theta: Some(10000.0),
            rope_parameters: None,
            rope_scaling: None,
            tie_word_embeddings: true,
            hidden_act: default_hidden_act(),
            initializer_range: 0.02,
            bos_token_id: None,
            eos_token_id: None,
            use_sliding_window: Some(false),
            extra: Map::new(),
            generation: None,
        }
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text).map_err(|message| ModelError::Config { path: path.to_path_buf(), message })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let config: Self = serde_json::from_str(text).map_err(|e| format!("not a valid Qwen2 config.json: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the fields this implementation relies on; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !self.architectures.iter().any(|a| a == "Qwen2ForCausalLM") || self.model_type != "qwen2" {
            return Err(format!(
                "unsupported architecture {:?} (model_type {:?}): t1 implements Qwen2ForCausalLM (Qwen2 / Qwen2.5) only",
                self.architectures, self.model_type
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!("hidden_act {:?} is not supported, expected \"silu\"", self.hidden_act));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("rope_scaling is not supported yet: remove it or use a checkpoint without it".into());
        }
        if let Some(kind) = self.rope_parameters.as_ref().and_then(|p| p.get("rope_type")).and_then(Value::as_str) {
            if kind != "default" {
                return Err(format!("rope_parameters.rope_type {kind:?} is not supported, expected \"default\""));
            }
        }
        if self.use_sliding_window == Some(true) {
            return Err("use_sliding_window = true is not supported".into());
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
        ] {
            if v == 0 {
                return Err(format!("{name} must be > 0"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size ({}) must be a multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.head_dim() == 0 || self.head_dim() % 2 != 0 {
            return Err(format!("head_dim ({}) must be even and > 0 for rotary embeddings", self.head_dim()));
        }
        if !(self.rope_theta() > 0.0) {
            return Err("rope_theta must be > 0".into());
        }
        if !(self.rms_norm_eps > 0.0) {
            return Err("rms_norm_eps must be > 0".into());
        }
        if self.checked_num_parameters().is_none() {
            return Err("the sizes give more than 2^64 parameters: check vocab_size, hidden_size, intermediate_size, head_dim and the layer and head counts".into());
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// `rope_theta`, from the top level or from `rope_parameters` (transformers >= 5).
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
            .unwrap_or(10000.0)
    }

    /// The end-of-sequence ids named by config.json and then by generation_config.json
    /// (possibly none), each once.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids = ids_of(&self.eos_token_id);
        for id in self.generation.iter().flat_map(GenerationConfig::eos_token_ids) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// Number of parameters of the model this config describes (saturated at `usize::MAX`;
    /// a validated config does not overflow).
    pub fn num_parameters(&self) -> usize {
        self.checked_num_parameters().unwrap_or(usize::MAX)
    }

    /// [`Self::num_parameters`], `None` on overflow.
    fn checked_num_parameters(&self) -> Option<usize> {
        let mul = usize::checked_mul;
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let (q, kv) = (mul(self.num_attention_heads, d)?, mul(self.num_key_value_heads, d)?);
        // q_proj + bias, k_proj and v_proj + biases, o_proj
        let attn = [mul(h, q)?, q, mul(2, mul(h, kv)?.checked_add(kv)?)?, mul(q, h)?];
        let layer = [attn.iter().try_fold(0usize, |a, &b| a.checked_add(b))?, mul(3, mul(h, i)?)?, mul(2, h)?];
        let embed = mul(self.vocab_size, h)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let layers = mul(self.num_hidden_layers, layer.iter().try_fold(0usize, |a, &b| a.checked_add(b))?)?;
        [embed, layers, h, head].iter().try_fold(0usize, |a, &b| a.checked_add(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_config_adds_stop_ids_and_gives_transformers_sampling_defaults() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(GenerationConfig::from_dir(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join(GENERATION_CONFIG_FILE), r#"{"eos_token_id": [5, 3], "do_sample": true, "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05}"#).unwrap();
        let g = GenerationConfig::from_dir(dir.path()).unwrap().unwrap();
        // top_k left out: transformers' default 50
        assert_eq!(g.sampling_defaults(), (0.7, 0.8, 50));
        assert_eq!(g.extra["repetition_penalty"], 1.05);
        let mut c = Qwen2Config::tiny(10, 8, 1, 2, 1);
        c.eos_token_id = Some(3.into());
        c.generation = Some(g);
        assert_eq!(c.eos_token_ids(), vec![3, 5], "config.json's first, each id once");
        // do_sample absent or false: greedy whatever the temperature says
        let greedy: GenerationConfig = serde_json::from_str(r#"{"temperature": 0.7}"#).unwrap();
        assert_eq!(greedy.sampling_defaults(), (0.0, 1.0, 0));
        std::fs::write(dir.path().join(GENERATION_CONFIG_FILE), "{oops").unwrap();
        let e = GenerationConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains(GENERATION_CONFIG_FILE), "{e}");
    }

    #[test]
    fn reads_hf_field_names_and_keeps_unknown_fields() {
        let json = r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","vocab_size":10,
            "hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,
            "num_key_value_heads":1,"rope_theta":500.0,"tie_word_embeddings":true,
            "torch_dtype":"float32","eos_token_id":[3,4]}"#;
        let c: Qwen2Config = serde_json::from_str(json).unwrap();
        c.validate().unwrap();
        assert_eq!(c.rope_theta(), 500.0);
        assert_eq!(c.head_dim(), 4);
        assert_eq!(c.eos_token_ids(), vec![3, 4]);
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["torch_dtype"], "float32");
    }

    #[test]
    fn rope_theta_from_rope_parameters() {
        let json = r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
            "num_attention_heads":2,"num_key_value_heads":1,
            "rope_parameters":{"rope_theta":1234.0,"rope_type":"default"}}"#;
        let c: Qwen2Config = serde_json::from_str(json).unwrap();
        assert_eq!(c.rope_theta(), 1234.0);
    }

    #[test]
    fn rejects_other_architectures_with_a_message() {
        let mut c = Qwen2Config::tiny(10, 8, 1, 2, 1);
        c.architectures = vec!["LlamaForCausalLM".into()];
        c.model_type = "llama".into();
        assert!(c.validate().unwrap_err().contains("Qwen2ForCausalLM"));
        let mut c = Qwen2Config::tiny(10, 8, 1, 4, 3);
        c.num_key_value_heads = 3;
        assert!(c.validate().unwrap_err().contains("num_key_value_heads"));
    }
}
