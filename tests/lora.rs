//! LoRA against PEFT: adapters PEFT made (tests/fixtures/make_lora.py) give PEFT's logits,
//! merged logits and LoRA gradients in t1, an adapter t1 trained gives t1's logits in PEFT
//! (tests/fixtures/check_peft.py, run at test time), and bad adapters are errors that name
//! the module.

use std::path::Path;
use std::process::Command;

use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use t1_model::{Inputs, LoraConfig, Qwen2, Qwen2Config, WeightDtype};

use crate::common::*;
use crate::model::{f32_logit_bound, F32_ROUNDOFF};

/// The PEFT adapters of the fixtures and their bases.
const ADAPTERS: [(&str, &str); 2] = [("lora-gqa", "qwen2-gqa"), ("lora-tied-rslora", "qwen2-tied")];

fn peft_reference(adapter: &str) -> (Vec<u8>, Reference) {
    let bytes = std::fs::read(fixture(adapter).join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let r = Reference { batch: ids.shape()[0], len: ids.shape()[1], ids: i64s(&ids), logits: f32s(&st.tensor("logits").unwrap()) };
    (bytes, r)
}

fn tensor(bytes: &[u8], name: &str) -> Vec<f32> {
    f32s(&safetensors::SafeTensors::deserialize(bytes).unwrap().tensor(name).unwrap_or_else(|e| panic!("{name}: {e}")))
}

fn base<B: t1_model::FusedOps>(name: &str) -> (Qwen2Config, Qwen2<B>) {
    t1_model::load::<B>(&fixture(name), WeightDtype::F32, &Default::default()).unwrap()
}

fn logits<B: t1_model::FusedOps>(model: &Qwen2<B>, r: &Reference) -> Vec<f32> {
    to_vec(model.forward(&Inputs::dense(r.batch, r.len, r.ids.clone()), None))
}

/// Bound for logits through an adapted model: the base's f32 bound, with the adapter's rank
/// added to each projection's chain of sums (x A sums over `in`, (x A) B over r).
fn bound(config: &Qwen2Config, scale: f32) -> f32 {
    2.0 * f32_logit_bound(config, scale)
}

#[test]
fn peft_adapters_give_peft_logits_unmerged_and_merged() {
    check_peft_logits::<FlexInner>();
}

#[cfg(feature = "wgpu")]
#[test]
fn peft_adapters_give_peft_logits_on_wgpu() {
    check_peft_logits::<<t1_backends::WgpuBackend as burn::tensor::backend::AutodiffBackend>::InnerBackend>();
}

fn check_peft_logits<B: t1_model::FusedOps>() {
    for (adapter, base_name) in ADAPTERS {
        let (config, model) = base::<B>(base_name);
        let (bytes, r) = peft_reference(adapter);
        let base_logits = logits(&model, &r);
        let model = t1_model::load_adapter(model, &fixture(adapter)).unwrap();
        let got = logits(&model, &r);
        let b = bound(&config, max_abs(&r.logits));
        let diff = max_abs_diff(&got, &r.logits);
        let moved = max_abs_diff(&base_logits, &r.logits);
        println!("{adapter}: max |logit diff| vs PEFT {diff:.3e} (bound {b:.3e}); the adapter moves the logits by {moved:.3e}");
        assert!(diff <= b, "{adapter}: {diff:.3e} > {b:.3e}");
        assert!(moved > 100.0 * b, "{adapter}: the adapter hardly moves the logits ({moved:.3e}): the test could not see a dropped adapter");
        // merged: W + s·A B, as PEFT's merge_and_unload
        let merged = model.merge_lora();
        assert!(merged.lora.is_none());
        let want = tensor(&bytes, "merged_logits");
        let diff = max_abs_diff(&logits(&merged, &r), &want);
        println!("{adapter}: merged: max |logit diff| vs PEFT's merge_and_unload {diff:.3e}");
        assert!(diff <= b, "{adapter} merged: {diff:.3e} > {b:.3e}");
    }
}

/// The LoRA gradients of the mean next-token NLL against PyTorch through PEFT (base frozen).
#[test]
fn lora_gradients_match_peft() {
    for (adapter, base_name) in ADAPTERS {
        let device = Default::default();
        let (config, model) = base::<Flex>(base_name);
        let model = t1_train::lora::trainable(t1_model::load_adapter(model, &fixture(adapter)).unwrap());
        let (bytes, r) = peft_reference(adapter);
        let (b, t) = (r.batch, r.len - 1);
        let ids: Vec<i64> = (0..b).flat_map(|row| r.ids[row * r.len..row * r.len + t].to_vec()).collect();
        let targets: Vec<i64> = (0..b).flat_map(|row| r.ids[row * r.len + 1..(row + 1) * r.len].to_vec()).collect();
        let out = model.forward(&Inputs::dense(b, t, ids), None);
        let tg = Tensor::<Flex, 2, Int>::from_data(TensorData::new(targets, [b, t]), &device);
        let loss = t1_algo::token_logprobs(out, tg).mean().neg();
        let value = to_vec(loss.clone())[0];
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let want_loss = tensor(&bytes, "loss")[0];
        assert!((value - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0), "{adapter}: loss {value} vs PEFT {want_loss}");
        // only the adapters have gradients: the base is frozen
        assert_eq!(grads.len(), model.lora.as_ref().unwrap().peft_tensors().len(), "{adapter}: gradients exist for the adapters only");
        let lora = model.lora.as_ref().unwrap();
        let bound = (2 * (config.num_hidden_layers * (config.hidden_size + config.intermediate_size) + config.hidden_size) + b * t + config.vocab_size) as f32 * F32_ROUNDOFF;
        let mut worst = 0f32;
        for (l, layer) in lora.layers.iter().enumerate() {
            for (name, pair) in [("q_proj", &layer.q_proj), ("k_proj", &layer.k_proj), ("v_proj", &layer.v_proj), ("o_proj", &layer.o_proj), ("gate_proj", &layer.gate_proj), ("up_proj", &layer.up_proj), ("down_proj", &layer.down_proj)] {
                let Some(pair) = pair else { continue };
                let block = if name.starts_with(['q', 'k', 'v', 'o']) { "self_attn" } else { "mlp" };
                for (which, p) in [("lora_A", &pair.a), ("lora_B", &pair.b)] {
                    let key = format!("grad.base_model.model.model.layers.{l}.{block}.{name}.{which}.weight");
                    let want = tensor(&bytes, &key);
                    // t1 holds A [in, r] and B [r, out]; PEFT's are the transposes
                    let g = grads.get::<FlexInner, 2>(p.id).unwrap_or_else(|| panic!("{key}: no gradient"));
                    let got = to_vec(g.transpose());
                    let rel = max_rel_diff(&want, &got, f32::MIN_POSITIVE);
                    assert!(max_abs(&want) > 0.0, "{key}: all-zero reference");
                    assert!(rel <= bound, "{adapter} {key}: relative diff {rel:.3e} > {bound:.3e}");
                    worst = worst.max(rel);
                }
            }
        }
        println!("{adapter}: loss {value} vs PEFT {want_loss}; LoRA gradients: worst max |diff| / max |grad| {worst:.3e} (bound {bound:.3e})");
    }
}

#[test]
fn a_fresh_adapter_follows_peft_init_and_changes_nothing() {
    let (_, model) = base::<FlexInner>("qwen2-gqa");
    let r = reference("qwen2-gqa");
    let before = logits(&model, &r);
    let cfg = LoraConfig { r: 8, alpha: 16.0, ..LoraConfig::default() };
    let model = model.with_new_lora(&cfg, "qwen2-gqa").unwrap();
    let lora = model.lora.as_ref().unwrap();
    let q = lora.layers[0].q_proj.as_ref().unwrap();
    let a = to_vec(q.a.val());
    let fan_in = q.a.dims()[0] as f32;
    // Kaiming-uniform with a = √5: U(−1/√in, 1/√in), which fills the range
    assert!(a.iter().all(|x| x.abs() <= 1.0 / fan_in.sqrt()));
    assert!(max_abs(&a) > 0.8 / fan_in.sqrt(), "A is not spread over Kaiming's range");
    assert!(to_vec(q.b.val()).iter().all(|&x| x == 0.0), "B starts at zero");
    assert_eq!(q.scale, 2.0);
    assert_eq!(same_bits(&logits(&model, &r), &before), true, "a fresh adapter changed the logits");
    let rs = LoraConfig { r: 16, alpha: 8.0, use_rslora: true, ..LoraConfig::default() };
    assert_eq!(rs.scale(), 2.0, "rsLoRA scales by alpha / sqrt(r)");
}

/// An adapter t1 trains (AdamW on the adapters of a frozen base, t1's SFT step) and saves, loaded
/// by PEFT onto the base with transformers: PEFT's logits equal t1's.
#[test]
fn peft_loads_an_adapter_t1_trained_with_the_same_logits() {
    let python = std::env::var("T1_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python).args(["-c", "import torch, transformers, peft"]).output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "`{python}` cannot import torch, transformers and peft: pip install torch transformers peft safetensors (as .ci/run does), or set T1_PYTHON"
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut cases = vec![];
    let mut expected = vec![];
    for (base_name, cfg) in [
        ("qwen2-gqa", LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() }),
        ("qwen2-tied", LoraConfig { r: 2, alpha: 3.0, use_rslora: true, target_modules: vec!["k_proj".into(), "o_proj".into(), "up_proj".into()], ..LoraConfig::default() }),
    ] {
        let (config, model) = base::<Flex>(base_name);
        let source = t1_train::common::ModelSource { checkpoint: fixture(base_name), ..Default::default() };
        let mut model = t1_train::lora::attach(model, &source, &cfg).unwrap();
        let r = reference(base_name);
        let opt_cfg = t1_train::common::OptimConfig { lr: 5e-2, ..Default::default() };
        let mut optim = t1_train::master::MasterWeights::plain(&opt_cfg);
        let examples: Vec<t1_data::TokenizedExample> = r.ids.chunks(r.len).map(|row| t1_data::TokenizedExample { ids: row.iter().map(|&i| i as u32).collect(), loss_mask: vec![true; r.len] }).collect();
        let batch = t1_data::pad_batch(&examples.iter().collect::<Vec<_>>(), 0);
        let mut losses = vec![];
        for _ in 0..5 {
            let (grads, loss) = t1_train::sft::step_grads(&model, vec![vec![batch.clone()]], t1_train::checkpoint::ActivationCheckpointing::None);
            losses.push(loss);
            model = optim.step(opt_cfg.lr, model, grads);
        }
        assert!(losses[4] < losses[0], "{base_name}: t1's LoRA steps did not lower the loss: {losses:?}");
        let dir = tmp.path().join(format!("{base_name}-adapter"));
        t1_model::save_adapter(&model.valid(), &dir).unwrap();
        let got = logits(&model.valid(), &r);
        let base_logits = logits(&base::<FlexInner>(base_name).1, &r);
        assert!(max_abs_diff(&got, &base_logits) > 1e-2, "{base_name}: training did not move the logits");
        let out = tmp.path().join(format!("{base_name}-peft.safetensors"));
        cases.push(serde_json::json!({"base": fixture(base_name), "adapter": dir, "input_ids": r.ids.chunks(r.len).collect::<Vec<_>>(), "out": out}));
        expected.push((base_name, config, cfg, got, out));
    }
    let manifest = tmp.path().join("cases.json");
    std::fs::write(&manifest, serde_json::to_string(&cases).unwrap()).unwrap();
    let o = Command::new(&python).arg(fixture("check_peft.py")).arg(&manifest).output().unwrap();
    assert!(o.status.success(), "check_peft.py failed:\n{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    for (name, config, cfg, got, out) in expected {
        let bytes = std::fs::read(&out).unwrap();
        let want = tensor(&bytes, "logits");
        let diff = max_abs_diff(&got, &want);
        let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(format!("{}.json", out.display())).unwrap()).unwrap();
        println!("{name}: PEFT read {info}; max |logit diff| t1 vs PEFT {diff:.3e}");
        assert!(diff <= 1e-4, "{name}: PEFT's logits of t1's adapter differ by {diff:.3e} > 1e-4");
        assert_eq!(info["r"], cfg.r);
        let targets = cfg.targets().unwrap();
        assert_eq!(info["lora_tensors"].as_u64().unwrap() as usize, 2 * targets.len() * config.num_hidden_layers, "{name}: PEFT loaded {info}");
        let mut sorted: Vec<&str> = targets.clone();
        sorted.sort();
        assert_eq!(info["target_modules"], serde_json::json!(sorted));
    }
}

fn adapter_error(base_name: &str, dir: &Path) -> String {
    let (_, model) = base::<FlexInner>(base_name);
    let err = t1_model::read_adapter(&model, dir).unwrap_err().to_string();
    assert!(err.contains(&dir.display().to_string()), "the error names the adapter directory: {err}");
    err
}

/// A copy of the lora-gqa fixture with its config edited by `edit` and its tensors by `keep`.
fn edited(tmp: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value), keep: impl Fn(&str) -> bool) -> std::path::PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("lora-gqa").join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(fixture("lora-gqa").join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st.tensors().into_iter().filter(|(n, _)| keep(n)).collect();
    std::fs::write(dir.join("adapter_model.safetensors"), safetensors::serialize(kept, None).unwrap()).unwrap();
    dir
}

#[test]
fn bad_adapters_are_errors_that_name_the_module() {
    let tmp = tempfile::tempdir().unwrap();
    // made for another base: lora-gqa (hidden 32) on qwen2-sharded (hidden 48, 3 layers)
    let err = adapter_error("qwen2-sharded", &fixture("lora-gqa"));
    assert!(err.contains("model.layers.0.self_attn.q_proj") && err.contains("another base"), "{err}");
    // a missing matrix
    let dir = edited(tmp.path(), "missing", |_| {}, |n| !n.contains("layers.1.mlp.up_proj.lora_B"));
    let err = adapter_error("qwen2-gqa", &dir);
    assert!(err.contains("model.layers.1.mlp.up_proj") && err.contains("missing"), "{err}");
    // a module outside target_modules (the adapter holds more than its config says)
    let dir = edited(tmp.path(), "extra", |c| c["target_modules"] = serde_json::json!(["q_proj"]), |_| true);
    let err = adapter_error("qwen2-gqa", &dir);
    assert!(err.contains("model.layers.0.mlp.down_proj is not a targeted projection") && err.contains("unused"), "{err}");
    // an unknown target module
    let dir = edited(tmp.path(), "unknown", |c| c["target_modules"] = serde_json::json!(["q_proj", "qkv_proj"]), |_| true);
    let err = adapter_error("qwen2-gqa", &dir);
    assert!(err.contains("qkv_proj") && err.contains("q_proj k_proj"), "{err}");
    // r = 0
    let dir = edited(tmp.path(), "rank0", |c| c["r"] = 0.into(), |_| true);
    assert!(adapter_error("qwen2-gqa", &dir).contains("r = 0"));
    // variants t1 does not implement
    for (key, value) in [("use_dora", serde_json::json!(true)), ("bias", serde_json::json!("all")), ("rank_pattern", serde_json::json!({"q_proj": 8})), ("modules_to_save", serde_json::json!(["lm_head"])), ("init_lora_weights", serde_json::json!("pissa_niter_4"))] {
        let dir = edited(tmp.path(), key, |c| c[key] = value.clone(), |_| true);
        let err = adapter_error("qwen2-gqa", &dir);
        assert!(err.contains(key) && err.contains("does not implement"), "{key}: {err}");
    }
    let dir = edited(tmp.path(), "ia3", |c| c["peft_type"] = "IA3".into(), |_| true);
    assert!(adapter_error("qwen2-gqa", &dir).contains("LoRA adapters only"));
    // configs: r = 0 and unknown modules in [lora]
    assert!(LoraConfig { r: 0, ..LoraConfig::default() }.validate().unwrap_err().contains("lora.r = 0"));
    let bad = LoraConfig { target_modules: vec!["lm_head".into()], ..LoraConfig::default() };
    assert!(bad.validate().unwrap_err().contains("\"lm_head\""));
    let err = t1_train::load_config::<t1_train::sft::SftConfig>(None, &["lora.rank=8".into()]).unwrap_err().to_string();
    assert!(err.contains("rank"), "{err}");
}

/// `t1 logits --adapter`, `t1 logits` on an adapter directory (its base from
/// base_model_name_or_path, as PEFT's AutoPeftModelForCausalLM), and `t1 merge`, whose output
/// transformers loads with PEFT's merged logits.
#[test]
fn cli_applies_and_merges_adapters() {
    use crate::cli::{stderr, t1};
    let tmp = tempfile::tempdir().unwrap();
    let (base_dir, adapter) = (fixture("qwen2-gqa"), fixture("lora-gqa"));
    let (config, _) = base::<FlexInner>("qwen2-gqa");
    let (bytes, r) = peft_reference("lora-gqa");
    let vocab = config.vocab_size;
    let ids: Vec<String> = r.ids[..r.len].iter().map(|i| i.to_string()).collect();
    let out = tmp.path().join("logits.safetensors");
    let row0 = |logits: &[f32]| logits[..r.len * vocab].to_vec();
    let b = bound(&config, max_abs(&r.logits));
    let read = |path: &Path| f32s(&safetensors::SafeTensors::deserialize(&std::fs::read(path).unwrap()).unwrap().tensor("logits").unwrap());
    // an adapter directory whose config names its base by an absolute path
    let by_path = tmp.path().join("adapter");
    std::fs::create_dir_all(&by_path).unwrap();
    std::fs::copy(adapter.join("adapter_model.safetensors"), by_path.join("adapter_model.safetensors")).unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    meta["base_model_name_or_path"] = base_dir.to_str().unwrap().into();
    std::fs::write(by_path.join("adapter_config.json"), meta.to_string()).unwrap();
    for args in [vec!["--model", base_dir.to_str().unwrap(), "--adapter", adapter.to_str().unwrap()], vec!["--model", by_path.to_str().unwrap()]] {
        let mut all = vec!["logits", "--ids"];
        let joined = ids.join(",");
        all.push(&joined);
        all.extend(["--out", out.to_str().unwrap()]);
        all.extend(args.iter().copied());
        let o = t1(&all);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let diff = max_abs_diff(&read(&out), &row0(&r.logits));
        assert!(diff <= b, "{args:?}: max |logit diff| vs PEFT {diff:.3e} > {b:.3e}");
    }
    // merge, in the base's dtype and in bf16; transformers loads both
    let merged = tmp.path().join("merged");
    let o = t1(&["merge", "--model", base_dir.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = t1(&["merge", "--model", base_dir.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("already holds a model"), "{}", stderr(&o));
    let merged_bf16 = tmp.path().join("merged-bf16");
    let o = t1(&["merge", "--model", base_dir.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", merged_bf16.to_str().unwrap(), "--dtype", "bf16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dtype = |d: &Path| serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()["torch_dtype"].clone();
    assert_eq!((dtype(&merged), dtype(&merged_bf16)), ("float32".into(), "bfloat16".into()));
    let python = std::env::var("T1_PYTHON").unwrap_or_else(|_| "python3".into());
    let rows: Vec<&[i64]> = r.ids.chunks(r.len).collect();
    let cases = serde_json::json!([{"dir": merged, "input_ids": rows, "out": tmp.path().join("merged.out")}]);
    let manifest = tmp.path().join("cases.json");
    std::fs::write(&manifest, cases.to_string()).unwrap();
    let o = Command::new(&python).arg(fixture("check_saved.py")).arg(&manifest).output().unwrap();
    assert!(o.status.success(), "check_saved.py: {}", String::from_utf8_lossy(&o.stderr));
    let st_bytes = std::fs::read(tmp.path().join("merged.out")).unwrap();
    let got = f32s(&safetensors::SafeTensors::deserialize(&st_bytes).unwrap().tensor("logits_f32").unwrap());
    let diff = max_abs_diff(&got, &tensor(&bytes, "merged_logits"));
    println!("t1 merge loaded by transformers: max |logit diff| vs PEFT's merge_and_unload {diff:.3e} (bound {b:.3e})");
    assert!(diff <= b, "{diff:.3e} > {b:.3e}");
    // an adapter for another base is refused and names the module
    let o = t1(&["logits", "--model", fixture("qwen2-sharded").to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--ids", "1,2", "--out", out.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("model.layers.0.self_attn.q_proj"), "{}", stderr(&o));
}

/// LoRA settings that cannot work are refused before anything runs, naming the key.
#[test]
fn lora_configs_that_cannot_work_are_refused() {
    let set = |extra: &[&str]| {
        let mut sets: Vec<String> = vec!["data.train=\"x.jsonl\"".into(), "lora.r=8".into(), "model.checkpoint=\"base\"".into()];
        sets.extend(extra.iter().map(|s| s.to_string()));
        let (cfg, _) = t1_train::load_config::<t1_train::sft::SftConfig>(None, &sets).unwrap();
        cfg.validate().err().map(|e| e.to_string())
    };
    assert_eq!(set(&[]), None);
    assert_eq!(set(&["model.dtype=\"bf16\""]), None, "a bf16 base with f32 adapters needs no master weights");
    let err = set(&["model.dtype=\"bf16\"", "optim.master_weights=true"]).unwrap();
    assert!(err.contains("optim.master_weights") && err.contains("LoRA"), "{err}");
    let err = set(&["lora.dropout=0.1", "train.activation_checkpointing=\"layer\""]).unwrap();
    assert!(err.contains("lora.dropout") && err.contains("checkpointing"), "{err}");
    assert!(set(&["lora.r=0"]).unwrap().contains("lora.r = 0"));
    assert!(set(&["lora.target_modules=[\"embed_tokens\"]"]).unwrap().contains("embed_tokens"));
    // a random base would never be saved
    let err = set(&["model.checkpoint=\"\""]).unwrap();
    assert!(err.contains("model.checkpoint") && err.contains("never saves"), "{err}");
    // a continued adapter's own dropout meets layer checkpointing: refused before anything is written
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited(tmp.path(), "dropout", |c| c["lora_dropout"] = 0.05.into(), |_| true);
    let out = tmp.path().join("run");
    let sets: Vec<String> = vec![
        "data.train=\"x.jsonl\"".into(),
        format!("model.checkpoint={:?}", fixture("qwen2-gqa").display().to_string()),
        format!("model.adapter={:?}", dir.display().to_string()),
        "train.activation_checkpointing=\"layer\"".into(),
        format!("out_dir={:?}", out.display().to_string()),
    ];
    let (cfg, _) = t1_train::load_config::<t1_train::sft::SftConfig>(None, &sets).unwrap();
    let err = t1_train::sft::run_sft::<Flex>(&cfg, "", false, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("lora.dropout") && err.contains("0.05"), "{err}");
    assert!(!out.exists());
    // the plan of a LoRA run has no master weights and trains the adapters alone
    let (cfg, _) = t1_train::load_config::<t1_train::sft::SftConfig>(None, &["data.train=\"x.jsonl\"".into(), "lora.r=8".into(), "model.dtype=\"bf16\"".into(), "model.checkpoint=\"base\"".into()]).unwrap();
    let plan = t1_train::plan::sft_plan(&cfg, &t1_train::plan::qwen25("0.5b").unwrap()).unwrap();
    let names: Vec<&str> = plan.items.iter().map(|i| i.name.as_str()).collect();
    assert!(names.contains(&"lora adapters") && !names.contains(&"master weights"), "{names:?}");
}

/// A bf16 base with f32 adapters: the adapters stay f32, their gradients are f32, AdamW steps
/// them, and the logits stay within bf16's bound of the f32 model's.
#[test]
fn a_bf16_base_trains_f32_adapters() {
    use burn::tensor::DType;
    let device = Default::default();
    let (config, model) = t1_model::load::<Flex>(&fixture("qwen2-gqa"), WeightDtype::Bf16, &device).unwrap();
    let model = t1_train::lora::trainable(t1_model::load_adapter(model, &fixture("lora-gqa")).unwrap());
    let lora = model.lora.as_ref().unwrap();
    assert_eq!((model.dtype(), lora.layers[0].q_proj.as_ref().unwrap().a.val().dtype()), (DType::BF16, DType::F32));
    let (_, r) = peft_reference("lora-gqa");
    let got = logits(&model.valid(), &r);
    let b = crate::model::bf16_logit_bound(&config, max_abs(&r.logits));
    let diff = max_abs_diff(&got, &r.logits);
    println!("bf16 base + f32 adapters vs PEFT in f32: {diff:.3e} (bf16 bound {b:.3e})");
    assert!(diff <= b, "{diff:.3e} > {b:.3e}");
    let examples: Vec<t1_data::TokenizedExample> = r.ids.chunks(r.len).map(|row| t1_data::TokenizedExample { ids: row.iter().map(|&i| i as u32).collect(), loss_mask: vec![true; r.len] }).collect();
    let batch = t1_data::pad_batch(&examples.iter().collect::<Vec<_>>(), 0);
    let (grads, loss) = t1_train::sft::step_grads(&model, vec![vec![batch]], t1_train::checkpoint::ActivationCheckpointing::None);
    assert!(loss.is_finite());
    let g = grads.get::<FlexInner, 2>(lora.layers[0].q_proj.as_ref().unwrap().b.id).unwrap();
    assert_eq!(g.dtype(), DType::F32);
    let opt = t1_train::common::OptimConfig { lr: 1e-2, ..Default::default() };
    let mut optim = t1_train::master::MasterWeights::plain(&opt);
    let before = to_vec(lora.layers[0].q_proj.as_ref().unwrap().b.val());
    let stepped = optim.step(opt.lr, model, grads);
    let after = stepped.lora.as_ref().unwrap().layers[0].q_proj.as_ref().unwrap().b.val();
    assert_eq!(after.dtype(), DType::F32);
    assert!(max_abs_diff(&to_vec(after), &before) > 0.0, "AdamW did not move the f32 adapter");
    assert_eq!(stepped.dtype(), DType::BF16);
}

/// The CPU engine decodes an adapted model with the adapters merged into its packed copy: a
/// prefill through burn (the adapters as a side product), then host steps, give the full
/// forward pass's logits (within 1e-5), for both PEFT fixtures.
#[test]
#[ignore = "needs AVX-512: .ci/run runs the avx512_ tests where the CPU has it"]
fn avx512_host_engine_decodes_through_merged_adapters() {
    for (adapter, base_name) in ADAPTERS {
        let (_, model) = base::<FlexInner>(base_name);
        let model = t1_model::load_adapter(model, &fixture(adapter)).unwrap();
        let engine = t1_cpu::HostEngine::new(&model).expect("asked to test host decoding on a CPU without AVX-512F");
        let (_, r) = peft_reference(adapter);
        crate::model::check_cached_decoding(&model, &r, Some(engine));
    }
}
