//! LoRA adapters (Hu et al. 2021, arXiv 2106.09685) in PEFT's conventions, so that adapters
//! move between t1, PEFT and vLLM unchanged.
//!
//! A targeted projection `y = x W` (burn layout, `W` is `[in, out]`) becomes
//! `y = x W + s · dropout(x) A B` with `A` `[in, r]`, `B` `[r, out]` and the scaling
//! `s = alpha / r`, or `alpha / √r` with rsLoRA (PEFT's `use_rslora`). As in PEFT:
//! - a fresh adapter has `A` Kaiming-uniform (`a = √5`, i.e. U(−1/√in, 1/√in)) and `B` zero, so
//!   it changes nothing until trained;
//! - the adapter product runs in the adapter's dtype (f32) and is cast back to the base
//!   output's dtype;
//! - merging adds `s · A B` to the base weight in f32 and rounds once to the base dtype.
//!
//! On disk (`adapter_model.safetensors` + `adapter_config.json`) the matrices are PEFT's
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` `[r, in]` and
//! `...lora_B.weight` `[out, r]`, the transposes of the burn layout held here.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{DropoutConfig, Linear};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::hf::write_atomic;
use crate::model::Qwen2;

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The projections LoRA can target, by PEFT's names (`target_modules`).
pub const TARGET_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// `[lora]` of the SFT and RL configs. Every field has a default; unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// The rank of the update (PEFT's `r`), > 0.
    pub r: usize,
    /// PEFT's `lora_alpha`: the update is scaled by alpha / r (alpha / √r with rsLoRA).
    pub alpha: f64,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`), in [0, 1).
    pub dropout: f64,
    /// Projections to adapt, by PEFT's names; `["all-linear"]` is all seven.
    pub target_modules: Vec<String>,
    /// rsLoRA's scaling alpha / √r (Kalajdzievski 2023).
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        // the common choice in TRL/verl recipes: rank 16, alpha 2r, every linear projection
        Self { r: 16, alpha: 32.0, dropout: 0.0, target_modules: TARGET_MODULES.iter().map(|s| s.to_string()).collect(), use_rslora: false }
    }
}

impl LoraConfig {
    /// The scaling of the adapter product.
    pub fn scale(&self) -> f64 {
        scaling(self.alpha, self.r, self.use_rslora)
    }

    /// The targeted projections in [`TARGET_MODULES`] order, or an error naming a bad field.
    pub fn targets(&self) -> Result<Vec<&'static str>, String> {
        let mut on = [false; 7];
        for name in &self.target_modules {
            if name == "all-linear" {
                on = [true; 7];
                continue;
            }
            match TARGET_MODULES.iter().position(|m| m == name) {
                Some(i) => on[i] = true,
                None => {
                    return Err(format!(
                        "lora.target_modules: {name:?} is not a projection t1 can adapt; use PEFT's names {} or \"all-linear\"",
                        TARGET_MODULES.join(" ")
                    ))
                }
            }
        }
        let targets: Vec<&'static str> = TARGET_MODULES.iter().zip(on).filter(|(_, o)| *o).map(|(m, _)| *m).collect();
        if targets.is_empty() {
            return Err("lora.target_modules is empty: name at least one projection, e.g. [\"q_proj\", \"v_proj\"] or [\"all-linear\"]".into());
        }
        Ok(targets)
    }

    /// Checks every field; the error names the field and says what to do.
    pub fn validate(&self) -> Result<(), String> {
        if self.r == 0 {
            return Err("lora.r = 0: the rank must be at least 1 (8–64 is usual)".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!("lora.alpha = {} must be a positive number (2·r is usual)", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("lora.dropout = {} must be in [0, 1)", self.dropout));
        }
        self.targets().map(|_| ())
    }
}

fn scaling(alpha: f64, r: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// One adapted projection: `scale · dropout(x) A B`.
#[derive(Module, Debug)]
pub struct LoraPair<B: Backend> {
    /// `[in, r]` (PEFT's `lora_A.weight` is its transpose).
    pub a: Param<Tensor<B, 2>>,
    /// `[r, out]` (PEFT's `lora_B.weight` is its transpose).
    pub b: Param<Tensor<B, 2>>,
    pub scale: f64,
    pub dropout: f64,
}

impl<B: Backend> LoraPair<B> {
    /// `y + s · dropout(x) A B` for the base projection `y` of `x` `[rows, in]`, as PEFT
    /// computes it: `x` is cast to the adapter's dtype (f32), the sum is taken in f32 and
    /// rounded once to `y`'s dtype. Dropout applies only under autodiff (training).
    pub fn add_to(&self, y: Tensor<B, 2>, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let a = self.a.val();
        let dtype = a.dtype();
        let x = if x.dtype() == dtype { x } else { x.cast(dtype) };
        let x = DropoutConfig::new(self.dropout).init().forward(x);
        let delta = x.matmul(a).matmul(self.b.val()).mul_scalar(self.scale);
        let out = y.dtype();
        if out == dtype {
            y + delta
        } else {
            (y.cast(dtype) + delta).cast(out)
        }
    }

    /// `scale · A B`, `[in, out]` in the adapter's dtype: what merging adds to the weight.
    pub fn product(&self) -> Tensor<B, 2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scale)
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }
}

/// The adapters of one decoder layer, `None` where a projection is not targeted.
#[derive(Module, Debug)]
pub struct LayerLora<B: Backend> {
    pub q_proj: Option<LoraPair<B>>,
    pub k_proj: Option<LoraPair<B>>,
    pub v_proj: Option<LoraPair<B>>,
    pub o_proj: Option<LoraPair<B>>,
    pub gate_proj: Option<LoraPair<B>>,
    pub up_proj: Option<LoraPair<B>>,
    pub down_proj: Option<LoraPair<B>>,
}

impl<B: Backend> LayerLora<B> {
    fn empty() -> Self {
        Self { q_proj: None, k_proj: None, v_proj: None, o_proj: None, gate_proj: None, up_proj: None, down_proj: None }
    }

    /// The slot of projection `name` (one of [`TARGET_MODULES`]).
    fn slot(&mut self, name: &str) -> &mut Option<LoraPair<B>> {
        match name {
            "q_proj" => &mut self.q_proj,
            "k_proj" => &mut self.k_proj,
            "v_proj" => &mut self.v_proj,
            "o_proj" => &mut self.o_proj,
            "gate_proj" => &mut self.gate_proj,
            "up_proj" => &mut self.up_proj,
            "down_proj" => &mut self.down_proj,
            _ => unreachable!("{name} is not in TARGET_MODULES"),
        }
    }

    fn pairs(&self) -> [(&'static str, Option<&LoraPair<B>>); 7] {
        [
            ("q_proj", self.q_proj.as_ref()),
            ("k_proj", self.k_proj.as_ref()),
            ("v_proj", self.v_proj.as_ref()),
            ("o_proj", self.o_proj.as_ref()),
            ("gate_proj", self.gate_proj.as_ref()),
            ("up_proj", self.up_proj.as_ref()),
            ("down_proj", self.down_proj.as_ref()),
        ]
    }
}

/// A model's LoRA adapters with their PEFT settings.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    pub layers: Vec<LayerLora<B>>,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    /// PEFT's `base_model_name_or_path`, written into `adapter_config.json`.
    pub base_model: String,
}

impl<B: Backend> Lora<B> {
    /// The settings these adapters were made with.
    pub fn config(&self) -> LoraConfig {
        let mut targets: Vec<String> = vec![];
        for layer in &self.layers {
            for (name, pair) in layer.pairs() {
                if pair.is_some() && !targets.iter().any(|t| t == name) {
                    targets.push(name.into());
                }
            }
        }
        LoraConfig { r: self.r, alpha: self.alpha, dropout: self.dropout, target_modules: targets, use_rslora: self.use_rslora }
    }

    /// Sets the training dropout of every adapter (PEFT's `lora_dropout`).
    pub fn set_dropout(&mut self, p: f64) {
        self.dropout = p;
        for layer in &mut self.layers {
            for name in TARGET_MODULES {
                if let Some(pair) = layer.slot(name) {
                    pair.dropout = p;
                }
            }
        }
    }

    /// Number of adapter parameters.
    pub fn num_params(&self) -> usize {
        struct Count(usize);
        impl<B: Backend> burn::module::ModuleVisitor<B> for Count {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                self.0 += p.val().shape().num_elements();
            }
        }
        let mut c = Count(0);
        self.visit(&mut c);
        c.0
    }

    /// The adapters by PEFT's names, in PEFT's layout (`lora_A` `[r, in]`, `lora_B` `[out, r]`), f32.
    pub fn peft_tensors(&self) -> Vec<(String, TensorData)> {
        let mut out = vec![];
        for (l, layer) in self.layers.iter().enumerate() {
            for (name, pair) in layer.pairs() {
                let Some(pair) = pair else { continue };
                let key = format!("{PEFT_PREFIX}model.layers.{l}.{}.{name}", block(name));
                out.push((format!("{key}.lora_A.weight"), pair.a.val().cast(DType::F32).transpose().into_data()));
                out.push((format!("{key}.lora_B.weight"), pair.b.val().cast(DType::F32).transpose().into_data()));
            }
        }
        out
    }
}

/// PEFT's prefix of the adapter keys of a causal LM.
const PEFT_PREFIX: &str = "base_model.model.";

/// The sub-module of a decoder layer that holds projection `name`.
fn block(name: &str) -> &'static str {
    if matches!(name, "gate_proj" | "up_proj" | "down_proj") {
        "mlp"
    } else {
        "self_attn"
    }
}

impl<B: Backend> Qwen2<B> {
    /// The base projection `name` of layer `l`.
    fn projection(&self, l: usize, name: &str) -> &Linear<B> {
        let layer = &self.layers[l];
        match name {
            "q_proj" => &layer.self_attn.q_proj,
            "k_proj" => &layer.self_attn.k_proj,
            "v_proj" => &layer.self_attn.v_proj,
            "o_proj" => &layer.self_attn.o_proj,
            "gate_proj" => &layer.mlp.gate_proj,
            "up_proj" => &layer.mlp.up_proj,
            "down_proj" => &layer.mlp.down_proj,
            _ => unreachable!("{name} is not in TARGET_MODULES"),
        }
    }

    /// `[in, out]` of the base projection `name` of layer `l`.
    fn projection_dims(&self, l: usize, name: &str) -> [usize; 2] {
        self.projection(l, name).weight.dims()
    }

    /// The model with fresh f32 adapters (PEFT's init: A Kaiming-uniform, B zero) on the
    /// projections `cfg` targets, replacing any it had. Parameter ids are renumbered (the
    /// adapters come after the base's parameters).
    pub fn with_new_lora(mut self, cfg: &LoraConfig, base_model: &str) -> Result<Self, String> {
        cfg.validate()?;
        let targets = cfg.targets()?;
        let device = self.device();
        let layers = (0..self.num_layers())
            .map(|l| {
                let mut layer = LayerLora::empty();
                for &name in &targets {
                    let [i, o] = self.projection_dims(l, name);
                    // kaiming_uniform_(a=√5) on [r, in]: gain √(2 / (1 + 5)), bound gain·√(3 / in) = 1/√in
                    let bound = 1.0 / (i as f64).sqrt();
                    let a = Tensor::<B, 2>::random([i, cfg.r], Distribution::Uniform(-bound, bound), (&device, DType::F32));
                    let b = Tensor::<B, 2>::zeros([cfg.r, o], (&device, DType::F32));
                    *layer.slot(name) = Some(LoraPair { a: Param::from_tensor(a.cast(DType::F32)), b: Param::from_tensor(b), scale: cfg.scale(), dropout: cfg.dropout });
                }
                layer
            })
            .collect();
        self.lora = Some(Lora { layers, r: cfg.r, alpha: cfg.alpha, dropout: cfg.dropout, use_rslora: cfg.use_rslora, base_model: base_model.into() });
        Ok(self.with_stable_param_ids())
    }

    /// The base model with every adapter added into its weights (`W + s·A B` in f32, rounded
    /// once to the weight's dtype), and no adapters left. Without adapters, the model itself.
    pub fn merge_lora(mut self) -> Self {
        let Some(lora) = self.lora.take() else { return self };
        for (layer, adapters) in self.layers.iter_mut().zip(lora.layers) {
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            for (linear, pair) in [
                (&mut a.q_proj, adapters.q_proj),
                (&mut a.k_proj, adapters.k_proj),
                (&mut a.v_proj, adapters.v_proj),
                (&mut a.o_proj, adapters.o_proj),
                (&mut m.gate_proj, adapters.gate_proj),
                (&mut m.up_proj, adapters.up_proj),
                (&mut m.down_proj, adapters.down_proj),
            ] {
                let Some(pair) = pair else { continue };
                let w = linear.weight.val();
                let dtype = w.dtype();
                let merged = (w.cast(DType::F32) + pair.product().cast(DType::F32)).cast(dtype);
                linear.weight = Param::initialized(linear.weight.id, merged);
            }
        }
        self
    }
}

/// `model` with the PEFT LoRA adapter in `dir` attached (f32), replacing any adapters it had
/// ([`read_adapter`] has the checks).
pub fn load_adapter<B: Backend>(mut model: Qwen2<B>, dir: &Path) -> Result<Qwen2<B>, ModelError> {
    model.lora = Some(read_adapter(&model, dir)?);
    Ok(model.with_stable_param_ids())
}

/// Reads a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) made for
/// `model`'s architecture, as f32 adapters on `model`'s device.
///
/// Everything is checked: the adapter type and its variants (DoRA, bias training, per-layer
/// ranks, modules to save... are refused), the targeted projections, and every matrix's
/// presence and shape against the base. Each error names the module.
pub fn read_adapter<B: Backend>(model: &Qwen2<B>, dir: &Path) -> Result<Lora<B>, ModelError> {
    let bad = |message: String| ModelError::Adapter { dir: dir.to_path_buf(), message };
    let (cfg, meta) = read_config(dir)?;
    let targets = cfg.targets().map_err(|e| bad(format!("{ADAPTER_CONFIG_FILE}: {e}")))?;

    let weights = dir.join(ADAPTER_WEIGHTS_FILE);
    let mut file = File::open(&weights).map_err(|e| ModelError::io(&weights, e))?;
    let mut tensors: HashMap<String, TensorData> = crate::hf::read_safetensors(&mut file, &weights)?.into_iter().collect();
    let device = model.device();
    let n = model.num_layers();
    let mut layers = Vec::with_capacity(n);
    for l in 0..n {
        let mut layer = LayerLora::empty();
        for &name in &targets {
            let module = format!("model.layers.{l}.{}.{name}", block(name));
            let [i, o] = model.projection_dims(l, name);
            let mut take = |which: &str, want: [usize; 2]| -> Result<TensorData, ModelError> {
                let key = format!("{PEFT_PREFIX}{module}.{which}.weight");
                let data = tensors.remove(&key).ok_or_else(|| {
                    bad(format!("{module} is in target_modules but {key} is missing: the adapter is incomplete or was made for a model with other modules"))
                })?;
                if data.shape.as_slice() != want {
                    return Err(bad(format!(
                        "{module}.{which} is {:?} but this base needs {want:?} (r = {}, {name} maps {i} to {o} features): the adapter was made for another base model",
                        data.shape.as_slice(),
                        cfg.r
                    )));
                }
                Ok(data)
            };
            let a = take("lora_A", [cfg.r, i])?;
            let b = take("lora_B", [o, cfg.r])?;
            let param = |d: TensorData| Param::from_tensor(Tensor::<B, 2>::from_data(d.convert_dtype(DType::F32), (&device, DType::F32)).transpose());
            *layer.slot(name) = Some(LoraPair { a: param(a), b: param(b), scale: cfg.scale(), dropout: cfg.dropout });
        }
        layers.push(layer);
    }
    if let Some(extra) = tensors.keys().min() {
        let module = extra.strip_prefix(PEFT_PREFIX).unwrap_or(extra);
        let module = module.split(".lora_").next().unwrap_or(module);
        return Err(bad(format!(
            "{module} is not a targeted projection of this {n}-layer base ({} unused tensors, e.g. {extra}): the adapter was made for another base model, its target_modules do not list it, or it adapts modules t1 does not",
            tensors.len()
        )));
    }
    let base_model = meta.get("base_model_name_or_path").and_then(|v| v.as_str()).unwrap_or("").to_string();
    Ok(Lora { layers, r: cfg.r, alpha: cfg.alpha, dropout: cfg.dropout, use_rslora: cfg.use_rslora, base_model })
}

/// The LoRA settings of the PEFT adapter in `dir` (its `adapter_config.json`), refusing the
/// variants t1 does not implement.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig, ModelError> {
    read_config(dir).map(|(cfg, _)| cfg)
}

fn read_config(dir: &Path) -> Result<(LoraConfig, serde_json::Value), ModelError> {
    let bad = |message: String| ModelError::Adapter { dir: dir.to_path_buf(), message };
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
    let meta: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("{ADAPTER_CONFIG_FILE} is not JSON: {e}")))?;
    let cfg = peft_config(&meta).map_err(bad)?;
    Ok((cfg, meta))
}

/// The LoRA settings of a PEFT `adapter_config.json`, refusing what t1 does not implement.
fn peft_config(meta: &serde_json::Value) -> Result<LoraConfig, String> {
    let get = |k: &str| meta.get(k).filter(|v| !v.is_null());
    let peft_type = get("peft_type").and_then(|v| v.as_str()).unwrap_or("");
    if peft_type != "LORA" {
        return Err(format!("peft_type is {peft_type:?}: t1 loads LoRA adapters only (\"LORA\")"));
    }
    let refuse = |what: &str| Err(format!("{ADAPTER_CONFIG_FILE} sets {what}, a LoRA variant t1 does not implement: merge the adapter with PEFT, or train one without it"));
    for flag in ["use_dora", "use_qalora", "use_bdlora", "lora_bias", "fan_in_fan_out"] {
        if get(flag).and_then(|v| v.as_bool()).unwrap_or(false) {
            return refuse(flag);
        }
    }
    if let Some(bias) = get("bias").and_then(|v| v.as_str()) {
        if bias != "none" {
            return refuse(&format!("bias = {bias:?}"));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if get(key).and_then(|v| v.as_object()).is_some_and(|o| !o.is_empty()) {
            return refuse(key);
        }
    }
    // settings that change the forward pass or what is adapted; the `*_config` keys of
    // initialisation schemes (LoftQ, EVA, CorDA, LoRA-GA) and Megatron only shape training
    let variants = ["modules_to_save", "layers_to_transform", "layers_pattern", "layer_replication", "trainable_token_indices", "target_parameters", "exclude_modules", "alora_invocation_tokens"];
    let init_only = ["loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_config"];
    let configs = meta.as_object().into_iter().flatten().map(|(k, _)| k.as_str()).filter(|k| k.ends_with("_config") && !init_only.contains(k));
    for key in variants.into_iter().chain(configs) {
        let set = match get(key) {
            None => false,
            Some(serde_json::Value::Array(a)) => !a.is_empty(),
            Some(serde_json::Value::String(s)) => !s.is_empty(),
            Some(serde_json::Value::Object(o)) => !o.is_empty(),
            Some(_) => true,
        };
        if set {
            return refuse(key);
        }
    }
    // PiSSA, OLoRA, CorDA and LoftQ inits change the base weights too: their adapters only fit
    // the base PEFT rewrote (unless PEFT converted them back to plain LoRA when saving)
    if let Some(init) = get("init_lora_weights").and_then(|v| v.as_str()) {
        if ["pissa", "olora", "corda", "loftq"].iter().any(|p| init.to_ascii_lowercase().starts_with(p)) {
            return refuse(&format!("init_lora_weights = {init:?} (its adapter expects a base PEFT rewrote)"));
        }
    }
    let r = get("r").and_then(|v| v.as_u64()).ok_or("r is missing or not an integer")? as usize;
    let alpha = get("lora_alpha").and_then(|v| v.as_f64()).ok_or("lora_alpha is missing or not a number")?;
    let dropout = get("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0);
    let use_rslora = get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
    let target_modules = match get("target_modules") {
        Some(serde_json::Value::Array(a)) => a.iter().map(|v| v.as_str().map(String::from).ok_or("target_modules holds a non-string")).collect::<Result<_, _>>()?,
        Some(serde_json::Value::String(s)) if s == "all-linear" || TARGET_MODULES.contains(&s.as_str()) => vec![s.clone()],
        Some(serde_json::Value::String(s)) => {
            return Err(format!("target_modules is the pattern {s:?}: t1 reads a list of module names ({})", TARGET_MODULES.join(" ")))
        }
        _ => return Err("target_modules is missing".into()),
    };
    let cfg = LoraConfig { r, alpha, dropout: dropout.clamp(0.0, 0.99), target_modules, use_rslora };
    cfg.validate().map_err(|e| e.replace("lora.", ""))?;
    Ok(cfg)
}

/// Writes `model`'s adapters into `dir` as PEFT does (`adapter_model.safetensors`, f32, and
/// `adapter_config.json`), each file through a temporary name.
pub fn save_adapter<B: Backend>(model: &Qwen2<B>, dir: &Path) -> Result<(), ModelError> {
    let Some(lora) = &model.lora else {
        return Err(ModelError::Adapter { dir: dir.to_path_buf(), message: "the model has no LoRA adapters to save".into() });
    };
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let tensors = lora.peft_tensors();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, data)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, data.shape.to_vec(), data.as_bytes()).expect("shape and byte length agree");
            (name.clone(), view)
        })
        .collect();
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| ModelError::Corrupt { path: path.clone(), message: e.to_string() })?;
    write_atomic(&path, &bytes)?;
    let cfg = lora.config();
    // the keys PEFT 0.21's LoraConfig writes that matter for loading; the rest take its defaults
    let config: BTreeMap<&str, serde_json::Value> = [
        ("peft_type", "LORA".into()),
        ("task_type", "CAUSAL_LM".into()),
        ("base_model_name_or_path", lora.base_model.clone().into()),
        ("r", cfg.r.into()),
        ("lora_alpha", cfg.alpha.into()),
        ("lora_dropout", cfg.dropout.into()),
        ("target_modules", cfg.target_modules.into()),
        ("use_rslora", cfg.use_rslora.into()),
        ("use_dora", false.into()),
        ("bias", "none".into()),
        ("fan_in_fan_out", false.into()),
        ("inference_mode", true.into()),
        ("init_lora_weights", true.into()),
        ("modules_to_save", serde_json::Value::Null),
        ("revision", serde_json::Value::Null),
    ]
    .into();
    write_atomic(&dir.join(ADAPTER_CONFIG_FILE), serde_json::to_string_pretty(&config).expect("json").as_bytes())
}

/// Whether `dir` holds a PEFT adapter (its `adapter_config.json`).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG_FILE).is_file()
}
