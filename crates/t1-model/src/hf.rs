//! Hugging Face checkpoints in and out: `config.json` + `model.safetensors`, or shards listed
//! in `model.safetensors.index.json`; bf16 / f16 / f32 files.
//!
//! Loading is strict: every tensor of the file must be used and every parameter filled, with
//! the expected shape, else the error names the keys. Saving writes the layout transformers
//! reads without conversion (Linear weights `[out, in]`, `lm_head.weight` omitted when tied,
//! shards + index above a size limit).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::model::{Attention, DecoderLayer, Mlp};
use crate::{ModelError, Qwen2, Qwen2Config};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Buffers that old transformers versions saved and that are recomputed from the config.
fn is_ignored_buffer(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// Floating point formats of the weights in memory or on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
}

impl WeightDtype {
    pub fn burn(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::Bf16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
        }
    }
    fn from_safetensors(d: Dtype) -> Option<Self> {
        match d {
            Dtype::F32 => Some(Self::F32),
            Dtype::BF16 => Some(Self::Bf16),
            Dtype::F16 => Some(Self::F16),
            _ => None,
        }
    }
    /// The `torch_dtype` / `dtype` string of config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" | "float32" | "fp32" => Some(Self::F32),
            "bf16" | "bfloat16" => Some(Self::Bf16),
            "f16" | "float16" | "fp16" => Some(Self::F16),
            _ => None,
        }
    }
}

/// The tensors a checkpoint of this config holds, in HF names and shapes (Linear `[out, in]`).
pub fn expected_tensors(config: &Qwen2Config) -> Vec<(String, Vec<usize>)> {
    let (h, i, d) = (config.hidden_size, config.intermediate_size, config.head_dim());
    let (q, kv) = (config.num_attention_heads * d, config.num_key_value_heads * d);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![config.vocab_size, h])];
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        for (name, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.q_proj.bias", vec![q]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.k_proj.bias", vec![kv]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.bias", vec![kv]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
        ] {
            out.push((format!("{p}{name}"), shape));
        }
    }
    out.push(("model.norm.weight".into(), vec![h]));
    if !config.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![config.vocab_size, h]));
    }
    out
}

/// The safetensors files of a checkpoint directory.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Corrupt { path: index.clone(), message: e.to_string() })?;
        let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Corrupt {
            path: index.clone(),
            message: "no \"weight_map\" object".into(),
        })?;
        let mut files = BTreeSet::new();
        for v in map.values() {
            let name = v.as_str().ok_or_else(|| ModelError::Corrupt {
                path: index.clone(),
                message: "weight_map values must be file names".into(),
            })?;
            if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                return Err(ModelError::Corrupt {
                    path: index.clone(),
                    message: format!("shard name {name:?} must be a plain file name in the checkpoint directory"),
                });
            }
            files.insert(name.to_string());
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join(WEIGHTS_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::NoWeights { dir: dir.to_path_buf() })
}

/// Loads `config.json` and the weights of a HF checkpoint directory, cast to `dtype`.
pub fn load<B: Backend>(dir: &Path, dtype: WeightDtype, device: &B::Device) -> Result<(Qwen2Config, Qwen2<B>), ModelError> {
    let config = Qwen2Config::from_file(&dir.join(CONFIG_FILE))?;
    let mut tensors: HashMap<String, (Vec<usize>, TensorData)> = HashMap::new();
    let mut origin: HashMap<String, PathBuf> = HashMap::new();
    for file in weight_files(dir)? {
        let bytes = std::fs::read(&file).map_err(|e| ModelError::io(&file, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| ModelError::Corrupt { path: file.clone(), message: e.to_string() })?;
        for (name, view) in st.tensors() {
            let Some(file_dtype) = WeightDtype::from_safetensors(view.dtype()) else {
                return Err(ModelError::Corrupt {
                    path: file.clone(),
                    message: format!("tensor {name} has dtype {:?}; only F32, BF16 and F16 are supported", view.dtype()),
                });
            };
            if let Some(prev) = origin.insert(name.clone(), file.clone()) {
                return Err(ModelError::Corrupt {
                    path: file.clone(),
                    message: format!("tensor {name} is also in {}", prev.display()),
                });
            }
            let shape = view.shape().to_vec();
            let data = TensorData::from_bytes_vec(view.data().to_vec(), shape.clone(), file_dtype.burn());
            tensors.insert(name, (shape, data));
        }
    }
    tensors.retain(|name, _| !is_ignored_buffer(name));
    let model = from_tensors(&config, tensors, dtype, device).map_err(|message| ModelError::Mismatch { dir: dir.to_path_buf(), message })?;
    Ok((config, model))
}

/// Builds a model from HF-named, HF-layout tensors (as [`named_tensors`] returns them). Every
/// tensor must be used and every parameter filled with the right shape, else the message
/// lists every problem.
pub fn from_named_tensors<B: Backend>(
    config: &Qwen2Config,
    tensors: Vec<(String, TensorData)>,
    dtype: WeightDtype,
    device: &B::Device,
) -> Result<Qwen2<B>, String> {
    let map = tensors.into_iter().map(|(n, d)| (n, (d.shape.to_vec(), d))).collect();
    from_tensors(config, map, dtype, device)
}

fn from_tensors<B: Backend>(
    config: &Qwen2Config,
    mut tensors: HashMap<String, (Vec<usize>, TensorData)>,
    dtype: WeightDtype,
    device: &B::Device,
) -> Result<Qwen2<B>, String> {
    // Check names and shapes before building anything, and report every problem at once.
    let expected = expected_tensors(config);
    let mut problems = Vec::new();
    let missing: Vec<_> = expected.iter().filter(|(n, _)| !tensors.contains_key(n)).map(|(n, _)| n.as_str()).collect();
    if !missing.is_empty() {
        problems.push(format!("missing tensors: {}", short_list(&missing)));
    }
    for (name, shape) in &expected {
        if let Some((found, _)) = tensors.get(name) {
            if found != shape {
                problems.push(format!("{name} has shape {found:?}, config.json implies {shape:?}"));
            }
        }
    }
    let expected_names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut unused: Vec<&str> = tensors.keys().map(String::as_str).filter(|n| !expected_names.contains(n)).collect();
    unused.sort();
    if config.tie_word_embeddings && unused == ["lm_head.weight"] {
        // Some exporters keep the tied head; accept it when it is the embedding.
        if tensors["lm_head.weight"].1 == tensors["model.embed_tokens.weight"].1 {
            unused.clear();
        }
    }
    if !unused.is_empty() {
        problems.push(format!("tensors not used by a Qwen2 model of this config: {}", short_list(&unused)));
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    if config.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    let mut weights = Weights { tensors, dtype: dtype.burn(), device };
    Ok(weights.build(config).with_stable_param_ids())
}

fn short_list(names: &[&str]) -> String {
    if names.len() <= 8 {
        names.join(", ")
    } else {
        format!("{} ... and {} more", names[..8].join(", "), names.len() - 8)
    }
}

/// Checked HF-layout tensors, turned into parameters one by one.
struct Weights<'a, B: Backend> {
    tensors: HashMap<String, (Vec<usize>, TensorData)>,
    dtype: DType,
    device: &'a B::Device,
}

impl<B: Backend> Weights<'_, B> {
    fn take(&mut self, name: &str) -> TensorData {
        self.tensors.remove(name).expect("names and shapes were checked").1
    }

    fn vector(&mut self, name: &str) -> Param<Tensor<B, 1>> {
        let data = self.take(name).convert_dtype(self.dtype);
        Param::from_tensor(Tensor::from_data(data, (self.device, self.dtype)))
    }

    /// HF `[out, in]` → burn `[in, out]`, transposed on the host so the parameter is contiguous.
    fn linear(&mut self, prefix: &str, bias: bool) -> Linear<B> {
        let data = transpose(self.take(&format!("{prefix}.weight")));
        Linear {
            weight: Param::from_tensor(Tensor::from_data(data.convert_dtype(self.dtype), (self.device, self.dtype))),
            bias: bias.then(|| self.vector(&format!("{prefix}.bias"))),
        }
    }

    fn norm(&mut self, name: &str, eps: f64) -> RmsNorm<B> {
        RmsNorm { gamma: self.vector(name), epsilon: eps }
    }

    fn build(&mut self, config: &Qwen2Config) -> Qwen2<B> {
        let eps = config.rms_norm_eps;
        let embed = self.take("model.embed_tokens.weight").convert_dtype(self.dtype);
        let embed_tokens = Embedding { weight: Param::from_tensor(Tensor::from_data(embed, (self.device, self.dtype))) };
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                DecoderLayer {
                    input_layernorm: self.norm(&format!("{p}.input_layernorm.weight"), eps),
                    self_attn: Attention {
                        q_proj: self.linear(&format!("{p}.self_attn.q_proj"), true),
                        k_proj: self.linear(&format!("{p}.self_attn.k_proj"), true),
                        v_proj: self.linear(&format!("{p}.self_attn.v_proj"), true),
                        o_proj: self.linear(&format!("{p}.self_attn.o_proj"), false),
                        num_heads: config.num_attention_heads,
                        num_kv_heads: config.num_key_value_heads,
                        head_dim: config.head_dim(),
                    },
                    post_attention_layernorm: self.norm(&format!("{p}.post_attention_layernorm.weight"), eps),
                    mlp: Mlp {
                        gate_proj: self.linear(&format!("{p}.mlp.gate_proj"), false),
                        up_proj: self.linear(&format!("{p}.mlp.up_proj"), false),
                        down_proj: self.linear(&format!("{p}.mlp.down_proj"), false),
                    },
                }
            })
            .collect();
        Qwen2 {
            embed_tokens,
            layers,
            norm: self.norm("model.norm.weight", eps),
            lm_head: (!config.tie_word_embeddings).then(|| self.linear("lm_head", false)),
            rope_theta: config.rope_theta(),
        }
    }
}

/// Transposes a 2-D tensor on the host (any float dtype; returned as f32).
fn transpose(data: TensorData) -> TensorData {
    let [r, c] = [data.shape[0], data.shape[1]];
    let v = data.convert_dtype(DType::F32).to_vec::<f32>().expect("f32 data");
    let mut out = vec![0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = v[i * c + j];
        }
    }
    TensorData::new(out, [c, r])
}

/// The model's parameters by HF name, in HF layout, as host data of the model's dtype.
pub fn named_tensors<B: Backend>(model: &Qwen2<B>) -> Vec<(String, TensorData)> {
    let vector = |p: &Param<Tensor<B, 1>>| p.val().into_data();
    let matrix = |p: &Param<Tensor<B, 2>>| p.val().into_data();
    let linear = |l: &Linear<B>| {
        let dtype = l.weight.val().dtype();
        transpose(matrix(&l.weight)).convert_dtype(dtype)
    };
    let mut out = vec![("model.embed_tokens.weight".to_string(), matrix(&model.embed_tokens.weight))];
    for (l, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        let a = &layer.self_attn;
        out.push((format!("{p}.input_layernorm.weight"), vector(&layer.input_layernorm.gamma)));
        for (name, lin) in [("q_proj", &a.q_proj), ("k_proj", &a.k_proj), ("v_proj", &a.v_proj)] {
            out.push((format!("{p}.self_attn.{name}.weight"), linear(lin)));
            out.push((format!("{p}.self_attn.{name}.bias"), vector(lin.bias.as_ref().expect("q/k/v have a bias"))));
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), linear(&a.o_proj)));
        out.push((format!("{p}.post_attention_layernorm.weight"), vector(&layer.post_attention_layernorm.gamma)));
        out.push((format!("{p}.mlp.gate_proj.weight"), linear(&layer.mlp.gate_proj)));
        out.push((format!("{p}.mlp.up_proj.weight"), linear(&layer.mlp.up_proj)));
        out.push((format!("{p}.mlp.down_proj.weight"), linear(&layer.mlp.down_proj)));
    }
    out.push(("model.norm.weight".into(), vector(&model.norm.gamma)));
    if let Some(head) = &model.lm_head {
        out.push(("lm_head.weight".into(), linear(head)));
    }
    out
}

/// How to write a checkpoint.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// dtype of the files (the model's own when `None`).
    pub dtype: Option<WeightDtype>,
    /// Above this many bytes of weights, write shards + `model.safetensors.index.json`.
    pub max_shard_bytes: usize,
}

impl Default for SaveOptions {
    fn default() -> Self {
        // transformers' default `max_shard_size` is 5GB
        Self { dtype: None, max_shard_bytes: 5_000_000_000 }
    }
}

/// Writes `config.json` and the weights in HF layout into `dir` (created if needed).
/// Each file is written under a temporary name and renamed into place.
pub fn save<B: Backend>(model: &Qwen2<B>, config: &Qwen2Config, dir: &Path, options: &SaveOptions) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let dtype = options.dtype.unwrap_or(match model.dtype() {
        DType::BF16 => WeightDtype::Bf16,
        DType::F16 => WeightDtype::F16,
        _ => WeightDtype::F32,
    });
    let tensors: Vec<(String, TensorData)> =
        named_tensors(model).into_iter().map(|(n, d)| (n, d.convert_dtype(dtype.burn()))).collect();

    // Greedy sharding in parameter order, as transformers does.
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0usize;
    for (i, (_, d)) in tensors.iter().enumerate() {
        let n = d.as_bytes().len();
        if size > 0 && size + n > options.max_shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().expect("one shard").push(i);
        size += n;
    }
    let total: usize = tensors.iter().map(|(_, d)| d.as_bytes().len()).sum();
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let names: Vec<String> = if shards.len() == 1 {
        vec![WEIGHTS_FILE.to_string()]
    } else {
        (1..=shards.len()).map(|k| format!("model-{k:05}-of-{:05}.safetensors", shards.len())).collect()
    };
    let mut weight_map = BTreeMap::new();
    for (shard, file) in shards.iter().zip(&names) {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = shard
            .iter()
            .map(|&i| {
                let (name, data) = &tensors[i];
                weight_map.insert(name.clone(), file.clone());
                let view = safetensors::tensor::TensorView::new(dtype.safetensors(), data.shape.to_vec(), data.as_bytes())
                    .expect("shape and byte length agree");
                (name.clone(), view)
            })
            .collect();
        let bytes = safetensors::serialize(views, Some(metadata.clone()))
            .map_err(|e| ModelError::Corrupt { path: dir.join(file), message: e.to_string() })?;
        write_atomic(&dir.join(file), &bytes)?;
    }
    if shards.len() > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_atomic(&dir.join(INDEX_FILE), serde_json::to_string_pretty(&index).expect("json").as_bytes())?;
    } else {
        let _ = std::fs::remove_file(dir.join(INDEX_FILE));
    }
    let mut config = config.clone();
    config.tie_word_embeddings = model.lm_head.is_none();
    config.extra.insert("torch_dtype".into(), dtype.torch_name().into());
    config.extra.insert("dtype".into(), dtype.torch_name().into());
    write_atomic(&dir.join(CONFIG_FILE), serde_json::to_string_pretty(&config).expect("json").as_bytes())?;
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same directory, fsync and rename,
/// so that `path` holds either the old or the new content, never a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    use std::io::Write;
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let mut f = std::fs::File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}
