//! Hugging Face checkpoints in and out: `config.json` + `model.safetensors`, or shards listed
//! in `model.safetensors.index.json`; bf16 / f16 / f32 files.
//!
//! Loading is strict: every tensor of the file must be used and every parameter filled, with
//! the expected shape, else the error names the keys. Saving writes the layout transformers
//! reads without conversion (Linear weights `[out, in]`, `lm_head.weight` omitted when tied,
//! shards + index above a size limit).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use safetensors::Dtype;

use crate::config::Qwen2Config;
use crate::error::ModelError;
use crate::model::{Attention, DecoderLayer, Mlp, Qwen2};

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

/// Loads `config.json` (with `generation_config.json` when present) and the weights of a HF
/// checkpoint directory, cast to `dtype`.
///
/// Every file's header is read and checked first, and the tensor names and shapes are
/// compared with `config.json`, before any weight is read; then each tensor is read from its
/// checked byte range. Nothing declared in a header is allocated before it is checked against
/// the file's size.
pub fn load<B: Backend>(dir: &Path, dtype: WeightDtype, device: &B::Device) -> Result<(Qwen2Config, Qwen2<B>), ModelError> {
    let mut config = Qwen2Config::from_file(&dir.join(CONFIG_FILE))?;
    config.generation = crate::GenerationConfig::from_dir(dir)?;
    let mut files = Vec::new();
    let mut origin: HashMap<String, PathBuf> = HashMap::new();
    for path in weight_files(dir)? {
        let mut file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        let entries = read_header(&mut file, &path)?;
        for e in &entries {
            if let Some(prev) = origin.insert(e.name.clone(), path.clone()) {
                return Err(ModelError::Corrupt {
                    path: path.clone(),
                    message: format!("tensor {} is also in {}", e.name, prev.display()),
                });
            }
        }
        files.push((path, file, entries));
    }
    let mismatch = |message| ModelError::Mismatch { dir: dir.to_path_buf(), message };
    let shapes = files
        .iter()
        .flat_map(|(_, _, entries)| entries.iter())
        .filter(|e| !is_ignored_buffer(&e.name))
        .map(|e| (e.name.clone(), e.shape.clone()))
        .collect();
    check_tensors(&config, &shapes).map_err(mismatch)?;
    let mut tensors: HashMap<String, (Vec<usize>, TensorData)> = HashMap::new();
    for (path, mut file, entries) in files {
        for e in entries.into_iter().filter(|e| !is_ignored_buffer(&e.name)) {
            let data = read_tensor(&mut file, &path, &e)?;
            tensors.insert(e.name, (e.shape, data));
        }
    }
    let model = from_tensors(&config, tensors, dtype, device).map_err(mismatch)?;
    Ok((config, model))
}

/// The safetensors crate's limit on the JSON header (100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor of a safetensors file, as its header describes it, checked against the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: WeightDtype,
    pub shape: Vec<usize>,
    /// Byte range of the data in the file (from the start of the file).
    pub start: u64,
    pub end: u64,
}

/// A header entry as written: `{"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}`.
#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Reads and checks the header of a safetensors file: the 8-byte little-endian header length,
/// then a JSON object of tensor entries (and an optional `__metadata__`), then the data.
///
/// No number in the file is trusted: the header length is checked against the file's size
/// before it is read, and every tensor's byte size (from its shape and dtype, with overflow
/// checks) must equal its data range, which must lie inside the file. The ranges must tile
/// the data section exactly, with no overlap, gap or trailing bytes, as the format requires.
/// Returns the tensors in file order; no weight is read.
pub fn read_header<R: Read + Seek>(reader: &mut R, path: &Path) -> Result<Vec<TensorEntry>, ModelError> {
    let corrupt = |message: String| ModelError::Corrupt { path: path.to_path_buf(), message };
    let file_len = reader.seek(SeekFrom::End(0)).map_err(|e| ModelError::io(path, e))?;
    reader.seek(SeekFrom::Start(0)).map_err(|e| ModelError::io(path, e))?;
    if file_len < 8 {
        return Err(corrupt(format!("the file has {file_len} bytes, fewer than the 8-byte header length of a safetensors file (truncated?)")));
    }
    let mut len = [0u8; 8];
    reader.read_exact(&mut len).map_err(|e| ModelError::io(path, e))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > file_len - 8 {
        return Err(corrupt(format!(
            "the header length field says {header_len} bytes but the file has only {} bytes after it (truncated, or not a safetensors file)",
            file_len - 8
        )));
    }
    if header_len > MAX_HEADER_BYTES {
        return Err(corrupt(format!("the header is {header_len} bytes, more than the {MAX_HEADER_BYTES} bytes safetensors allows")));
    }
    let mut header = vec![0u8; header_len as usize];
    reader.read_exact(&mut header).map_err(|e| ModelError::io(path, e))?;
    let header = std::str::from_utf8(&header).map_err(|e| corrupt(format!("the header is not UTF-8 text ({e})")))?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(header).map_err(|e| corrupt(format!("the header is not a JSON object of tensors: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut entries = Vec::with_capacity(json.len());
    for (name, value) in json {
        if name == "__metadata__" {
            continue;
        }
        let raw: RawEntry = serde_json::from_value(value)
            .map_err(|e| corrupt(format!("tensor {name}: {e} (expected {{\"dtype\", \"shape\", \"data_offsets\"}})")))?;
        let dtype = match raw.dtype.as_str() {
            "F32" => WeightDtype::F32,
            "BF16" => WeightDtype::Bf16,
            "F16" => WeightDtype::F16,
            other => return Err(corrupt(format!("tensor {name} has dtype {other}; only F32, BF16 and F16 are supported"))),
        };
        let elem = match dtype {
            WeightDtype::F32 => 4,
            WeightDtype::Bf16 | WeightDtype::F16 => 2,
        };
        let [start, end] = raw.data_offsets;
        // the product of the non-zero dimensions bounds every partial product, even when a
        // zero dimension makes the tensor empty
        let bytes = raw.shape.iter().filter(|&&d| d > 0).try_fold(elem, |acc: u64, &d| acc.checked_mul(d));
        let Some(bytes) = bytes.filter(|&b| usize::try_from(b).is_ok()) else {
            return Err(corrupt(format!("tensor {name}: shape {:?} of {} has more bytes than memory can address", raw.shape, raw.dtype)));
        };
        let bytes = if raw.shape.contains(&0) { 0 } else { bytes };
        if end < start || end > data_len {
            return Err(corrupt(format!(
                "tensor {name}: data_offsets [{start}, {end}] are not a range inside the {data_len} bytes of data (truncated file?)"
            )));
        }
        if end - start != bytes {
            return Err(corrupt(format!(
                "tensor {name}: data_offsets [{start}, {end}] hold {} bytes but shape {:?} of {} needs {bytes}",
                end - start,
                raw.shape,
                raw.dtype
            )));
        }
        // every dimension is at most the checked product above, so this fits a usize
        let shape = raw.shape.iter().map(|&d| d as usize).collect();
        entries.push(TensorEntry { name, dtype, shape, start: data_start + start, end: data_start + end });
    }
    entries.sort_by_key(|e| (e.start, e.end));
    let mut pos = data_start;
    for (i, e) in entries.iter().enumerate() {
        if e.start < pos {
            return Err(corrupt(format!("tensors {} and {} overlap", entries[i - 1].name, e.name)));
        }
        if e.start > pos {
            return Err(corrupt(format!("{} bytes before tensor {} belong to no tensor", e.start - pos, e.name)));
        }
        pos = e.end;
    }
    if pos != file_len {
        return Err(corrupt(format!("the last {} bytes of the file belong to no tensor", file_len - pos)));
    }
    Ok(entries)
}

/// Reads one tensor's data (its range was checked by [`read_header`]).
fn read_tensor<R: Read + Seek>(reader: &mut R, path: &Path, e: &TensorEntry) -> Result<TensorData, ModelError> {
    let mut bytes = vec![0u8; (e.end - e.start) as usize];
    reader.seek(SeekFrom::Start(e.start)).map_err(|err| ModelError::io(path, err))?;
    reader.read_exact(&mut bytes).map_err(|err| ModelError::io(path, err))?;
    Ok(TensorData::from_bytes_vec(bytes, e.shape.clone(), e.dtype.burn()))
}

/// Every tensor of a safetensors file, read through [`read_header`]'s checks.
pub fn read_safetensors<R: Read + Seek>(reader: &mut R, path: &Path) -> Result<Vec<(String, TensorData)>, ModelError> {
    let entries = read_header(reader, path)?;
    entries.into_iter().map(|e| Ok((e.name.clone(), read_tensor(reader, path, &e)?))).collect()
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
    let shapes = tensors.iter().map(|(n, (s, _))| (n.clone(), s.clone())).collect();
    check_tensors(config, &shapes)?;
    if config.tie_word_embeddings {
        // Some exporters keep the tied head; accept it when it is the embedding.
        if let Some((_, head)) = tensors.remove("lm_head.weight") {
            if head != tensors["model.embed_tokens.weight"].1 {
                return Err("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight: \
                            set tie_word_embeddings to false in config.json if the head is its own matrix"
                    .into());
            }
        }
    }
    let mut weights = Weights { tensors, dtype: dtype.burn(), device };
    Ok(weights.build(config).with_stable_param_ids())
}

/// Compares tensor names and shapes with what `config` implies and reports every problem at
/// once: missing tensors, wrong shapes, tensors a Qwen2 model does not use. With tied
/// embeddings an `lm_head.weight` shaped like the embedding is allowed (its values are
/// compared when the weights are read).
pub fn check_tensors(config: &Qwen2Config, shapes: &HashMap<String, Vec<usize>>) -> Result<(), String> {
    // each layer has 12 tensors: a config with more layers than the file has tensors is from
    // another model (and listing its expected names could take any amount of memory)
    if config.num_hidden_layers > shapes.len() {
        return Err(format!(
            "config.json has num_hidden_layers = {} but the weights hold only {} tensors",
            config.num_hidden_layers,
            shapes.len()
        ));
    }
    let expected = expected_tensors(config);
    let mut problems = Vec::new();
    let missing: Vec<_> = expected.iter().filter(|(n, _)| !shapes.contains_key(n)).map(|(n, _)| n.as_str()).collect();
    if !missing.is_empty() {
        problems.push(format!("missing tensors: {}", short_list(&missing)));
    }
    for (name, shape) in &expected {
        if let Some(found) = shapes.get(name) {
            if found != shape {
                problems.push(format!("{name} has shape {found:?}, config.json implies {shape:?}"));
            }
        }
    }
    let expected_names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut unused: Vec<&str> = shapes.keys().map(String::as_str).filter(|n| !expected_names.contains(n)).collect();
    unused.sort();
    if config.tie_word_embeddings {
        let embed = shapes.get("model.embed_tokens.weight");
        match shapes.get("lm_head.weight") {
            Some(head) if Some(head) == embed => unused.retain(|&n| n != "lm_head.weight"),
            Some(head) => {
                unused.retain(|&n| n != "lm_head.weight");
                problems.push(format!(
                    "lm_head.weight has shape {head:?} but tie_word_embeddings is true, so it must equal model.embed_tokens.weight"
                ))
            }
            None => {}
        }
    }
    if !unused.is_empty() {
        problems.push(format!("tensors not used by a Qwen2 model of this config: {}", short_list(&unused)));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
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
            lora: None,
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
    if let Some(generation) = &config.generation {
        let path = dir.join(crate::GENERATION_CONFIG_FILE);
        write_atomic(&path, serde_json::to_string_pretty(generation).expect("json").as_bytes())?;
    }
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

/// Hostile and broken safetensors files: each is an error that names the file and the tensor,
/// never a panic, and nothing declared in a header is allocated before it is checked.
#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A safetensors file built by hand: the length field, `header`, then `data_len` zero bytes.
    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.resize(out.len() + data_len, 0);
        out
    }

    fn header_error(bytes: &[u8]) -> String {
        let err = read_safetensors(&mut Cursor::new(bytes), Path::new("evil.safetensors")).unwrap_err().to_string();
        assert!(err.contains("evil.safetensors") && err.contains("re-save or re-download"), "{err}");
        err
    }

    #[test]
    fn hostile_well_formed_file_reads() {
        let bytes = file(r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 12);
        let tensors = read_safetensors(&mut Cursor::new(&bytes), Path::new("ok.safetensors")).unwrap();
        let names: Vec<_> = tensors.iter().map(|(n, d)| (n.as_str(), d.shape.to_vec())).collect();
        assert_eq!(names, [("a", vec![2]), ("b", vec![2])]);
    }

    #[test]
    fn hostile_file_shorter_than_the_length_field() {
        assert!(header_error(&[1, 2, 3]).contains("fewer than the 8-byte header length"));
    }

    #[test]
    fn hostile_header_length_larger_than_the_file() {
        for n in [u64::MAX, 1 << 40, 100] {
            let mut bytes = n.to_le_bytes().to_vec();
            bytes.extend_from_slice(b"{}");
            let err = header_error(&bytes);
            assert!(err.contains(&format!("header length field says {n} bytes")) && err.contains("only 2 bytes"), "{err}");
        }
    }

    #[test]
    fn hostile_header_not_utf8_or_not_json() {
        let mut bytes = 4u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0xff, 0xfe, b'{', b'}']);
        assert!(header_error(&bytes).contains("not UTF-8"));
        assert!(header_error(&file("{\"a\": ", 0)).contains("not a JSON object"));
        assert!(header_error(&file("[1, 2]", 0)).contains("not a JSON object"));
        let err = header_error(&file(r#"{"w": {"dtype": "F32", "shape": [1]}}"#, 4));
        assert!(err.contains("tensor w") && err.contains("data_offsets"), "{err}");
        let err = header_error(&file(r#"{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#, 4));
        assert!(err.contains("tensor w"), "{err}");
    }

    #[test]
    fn hostile_offsets_outside_the_file_or_reversed() {
        // a consistent shape and range, far past the end of a 16-byte file: nothing is allocated
        let err = header_error(&file(r#"{"w": {"dtype": "F32", "shape": [1073741824, 1073741824], "data_offsets": [0, 4611686018427387904]}}"#, 16));
        assert!(err.contains("tensor w") && err.contains("inside the 16 bytes of data"), "{err}");
        let err = header_error(&file(r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}"#, 16));
        assert!(err.contains("tensor w: data_offsets [8, 4]"), "{err}");
        let err = header_error(&file(r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [18446744073709551612, 18446744073709551615]}}"#, 16));
        assert!(err.contains("tensor w"), "{err}");
    }

    #[test]
    fn hostile_overlapping_ranges() {
        let h = r#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}"#;
        let err = header_error(&file(h, 24));
        assert!(err.contains("tensors a and b overlap"), "{err}");
        // the same range twice
        let h = r#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#;
        assert!(header_error(&file(h, 16)).contains("overlap"));
    }

    #[test]
    fn hostile_gaps_and_trailing_bytes() {
        let h = r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#;
        assert!(header_error(&file(h, 8)).contains("4 bytes before tensor a belong to no tensor"));
        let h = r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#;
        assert!(header_error(&file(h, 12)).contains("last 8 bytes of the file belong to no tensor"));
    }

    #[test]
    fn hostile_shape_whose_byte_size_overflows() {
        for shape in ["[4294967296, 4294967296, 16]", "[18446744073709551615, 2]", "[0, 18446744073709551615, 18446744073709551615]"] {
            let h = format!(r#"{{"w": {{"dtype": "BF16", "shape": {shape}, "data_offsets": [0, 0]}}}}"#);
            let err = header_error(&file(&h, 0));
            assert!(err.contains("tensor w") && err.contains("more bytes than memory can address"), "{shape}: {err}");
        }
    }

    #[test]
    fn hostile_shape_and_dtype_disagree_with_the_range() {
        let h = r#"{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}"#;
        let err = header_error(&file(h, 8));
        assert!(err.contains("tensor w: data_offsets [0, 8] hold 8 bytes but shape [2, 2] of F32 needs 16"), "{err}");
        let h = r#"{"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}"#;
        assert!(header_error(&file(h, 8)).contains("tensor w has dtype I64; only F32, BF16 and F16"));
    }

    #[test]
    fn hostile_truncated_file() {
        let h = r#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#;
        let bytes = file(h, 16);
        let err = header_error(&bytes[..bytes.len() - 5]);
        assert!(err.contains("tensor a") && err.contains("truncated"), "{err}");
    }
}
