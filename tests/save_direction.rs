//! The save direction: transformers loads what `t1_model::save` writes, with t1's logits.
//!
//! t1 saves fixture models into a temporary directory (one file and shards, f32 and bf16, an
//! f32 model cast to bf16 on save); tests/fixtures/check_saved.py loads each directory with
//! `AutoModelForCausalLM.from_pretrained` and writes transformers' logits and what it loaded,
//! and this test compares them with t1's. It needs a Python with torch and transformers:
//! `T1_PYTHON`, default `python3` (.ci/run installs one). Without them the test fails and says
//! what to install.

use std::path::{Path, PathBuf};
use std::process::Command;

use t1_model::{Inputs, Qwen2Config, SaveOptions, WeightDtype};

use crate::common::*;
use crate::model::{bf16_logit_bound, f32_logit_bound, BF16_ROUNDOFF};

const INSTALL: &str = "install them with `pip install torch transformers safetensors numpy` \
    (as .ci/run does, into a venv), or set T1_PYTHON to a python that has them";

/// The interpreter named by `T1_PYTHON` (default `python3`), checked to import what
/// check_saved.py needs.
fn python() -> String {
    let python = std::env::var("T1_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import torch, transformers, safetensors; print(torch.__version__, transformers.__version__)"])
        .output();
    match probe {
        Err(e) => panic!("cannot run `{python}` ({e}): the save-direction test needs python3 with torch and transformers; {INSTALL}"),
        Ok(o) if !o.status.success() => {
            panic!("`{python}` cannot import torch, transformers and safetensors:\n{}\n{INSTALL}", String::from_utf8_lossy(&o.stderr))
        }
        Ok(o) => println!("{python}: torch, transformers {}", String::from_utf8_lossy(&o.stdout).trim()),
    }
    python
}

/// One saved checkpoint and what transformers must find in it.
struct Case {
    label: &'static str,
    dir: PathBuf,
    ids: Vec<Vec<i64>>,
    /// the dtype of its files and config.json (`torch.dtype` name)
    dtype: &'static str,
    sharded: bool,
    tied: bool,
    /// for a cast on save: the f32 checkpoint whose tensors torch must round to the same bits
    cast_from: Option<PathBuf>,
    /// (what, t1's logits, transformers' "logits_f32" or "logits_auto", bound)
    checks: Vec<(&'static str, Vec<f32>, &'static str, f32)>,
}

/// Bound on how far rounding the weights to bf16 moves f32 logits of scale `scale`: each weight
/// moves by at most 2^-9 of itself, and one position's path goes through 9 weight tensors per
/// layer (2 norms, q, k, v, o, gate, up, down) and 3 more (the embedding, final norm, head),
/// each moving the logits by at most 2^-9 of their scale.
fn bf16_weight_rounding_bound(config: &Qwen2Config, scale: f32) -> f32 {
    (9 * config.num_hidden_layers + 3) as f32 * BF16_ROUNDOFF * scale
}

fn logits<B: t1_model::FusedOps>(model: &t1_model::Qwen2<B>, r: &Reference) -> Vec<f32> {
    to_vec(model.forward(&Inputs::dense(r.batch, r.len, r.ids.clone()), None))
}

fn rows(r: &Reference) -> Vec<Vec<i64>> {
    r.ids.chunks(r.len).map(|row| row.to_vec()).collect()
}

#[test]
fn transformers_loads_what_t1_saves_with_the_same_logits() {
    let python = python();
    let device = Default::default();
    let tmp = tempfile::tempdir().unwrap();
    let mut cases = vec![];

    // f32, in one file and in shards (with an untied and a tied head)
    for (label, name, max_shard_bytes) in [
        ("qwen2-gqa, f32, one file", "qwen2-gqa", usize::MAX),
        ("qwen2-tied, f32, shards", "qwen2-tied", 20_000),
        ("qwen2-sharded, f32, shards", "qwen2-sharded", 20_000),
    ] {
        let (config, model) = t1_model::load::<FlexInner>(&fixture(name), WeightDtype::F32, &device).unwrap();
        let dir = tmp.path().join(format!("{name}-f32"));
        t1_model::save(&model, &config, &dir, &SaveOptions { dtype: None, max_shard_bytes }).unwrap();
        let r = reference(name);
        let t1 = logits(&model, &r);
        let bound = f32_logit_bound(&config, max_abs(&t1));
        let checks = vec![("t1 f32", t1.clone(), "logits_f32", bound), ("t1 f32", t1, "logits_auto", bound)];
        let (sharded, tied) = (max_shard_bytes != usize::MAX, config.tie_word_embeddings);
        cases.push(Case { label, dir, ids: rows(&r), dtype: "float32", sharded, tied, cast_from: None, checks });
    }

    // bf16 files of a model held in bf16
    {
        let (config, model) = t1_model::load::<FlexInner>(&fixture("qwen2-bf16"), WeightDtype::Bf16, &device).unwrap();
        let dir = tmp.path().join("qwen2-bf16");
        t1_model::save(&model, &config, &dir, &SaveOptions::default()).unwrap();
        let r = reference("qwen2-bf16");
        let t1_bf16 = logits(&model, &r);
        // the same (bf16) weights held in f32
        let (_, f32_model) = t1_model::load::<FlexInner>(&fixture("qwen2-bf16"), WeightDtype::F32, &device).unwrap();
        let t1_f32 = logits(&f32_model, &r);
        let (f32_bound, bf16_bound) = (f32_logit_bound(&config, max_abs(&t1_f32)), bf16_logit_bound(&config, max_abs(&t1_f32)));
        let checks = vec![
            ("t1 f32 (same weights)", t1_f32, "logits_f32", f32_bound),
            ("t1 bf16", t1_bf16.clone(), "logits_f32", bf16_bound),
            // transformers in bf16 too: each side within the bf16 bound of the f32 logits
            ("t1 bf16", t1_bf16, "logits_auto", 2.0 * bf16_bound),
        ];
        cases.push(Case { label: "qwen2-bf16, bf16", dir, ids: rows(&r), dtype: "bfloat16", sharded: false, tied: true, cast_from: None, checks });
    }

    // an f32 model saved as bf16
    {
        let (config, model) = t1_model::load::<FlexInner>(&fixture("qwen2-gqa"), WeightDtype::F32, &device).unwrap();
        let dir = tmp.path().join("qwen2-gqa-as-bf16");
        t1_model::save(&model, &config, &dir, &SaveOptions { dtype: Some(WeightDtype::Bf16), ..SaveOptions::default() }).unwrap();
        let r = reference("qwen2-gqa");
        let t1 = logits(&model, &r);
        // what t1 computes from the saved (rounded) weights, in f32
        let (_, rounded) = t1_model::load::<FlexInner>(&dir, WeightDtype::F32, &device).unwrap();
        let t1_rounded = logits(&rounded, &r);
        let checks = vec![
            ("t1 f32 of the saved bf16 weights", t1_rounded.clone(), "logits_f32", f32_logit_bound(&config, max_abs(&t1_rounded))),
            ("t1 f32 before the cast", t1.clone(), "logits_f32", bf16_weight_rounding_bound(&config, max_abs(&t1))),
        ];
        let cast_from = Some(fixture("qwen2-gqa"));
        cases.push(Case { label: "qwen2-gqa, f32 saved as bf16", dir, ids: rows(&r), dtype: "bfloat16", sharded: false, tied: false, cast_from, checks });
    }

    let manifest: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| serde_json::json!({"dir": c.dir, "input_ids": c.ids, "out": out_file(&c.dir), "cast_from": c.cast_from}))
        .collect();
    let manifest_path = tmp.path().join("cases.json");
    std::fs::write(&manifest_path, serde_json::to_string(&manifest).unwrap()).unwrap();
    let o = Command::new(&python).arg(fixture("check_saved.py")).arg(&manifest_path).output().unwrap();
    assert!(o.status.success(), "check_saved.py failed:\n{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));

    let mut failures = vec![];
    for c in &cases {
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(report_file(&c.dir)).unwrap()).unwrap();
        println!("{}: transformers loaded {report}", c.label);
        let strings = |key: &str| -> Vec<String> {
            report[key].as_array().unwrap_or_else(|| panic!("{key} in {report}")).iter().map(|v| v.as_str().unwrap().to_string()).collect()
        };
        assert_eq!(report["class"], "Qwen2ForCausalLM", "{}", c.label);
        assert_eq!(report["dtype"], c.dtype, "{}: the dtype transformers picked from config.json", c.label);
        assert_eq!(strings("file_dtypes"), [c.dtype], "{}: dtypes of the saved tensors", c.label);
        for key in ["missing", "unexpected", "mismatched"] {
            assert!(strings(key).is_empty(), "{}: transformers found {key} weights: {:?}", c.label, strings(key));
        }
        assert_eq!(report["tied"], c.tied, "{}: tied head", c.label);
        assert_eq!(report["sharded"], c.sharded, "{}: sharded", c.label);
        assert_eq!(c.dir.join(t1_model::hf::INDEX_FILE).exists(), c.sharded);
        if c.cast_from.is_some() {
            assert!(strings("cast_mismatches").is_empty(), "{}: t1's bf16 differs from torch's rounding in {:?}", c.label, strings("cast_mismatches"));
        }
        let theirs = read_f32s(&out_file(&c.dir));
        for (what, ours, key, bound) in &c.checks {
            let diff = max_abs_diff(ours, &theirs[*key]);
            println!("{}: {what} vs transformers' {key}: max |logit diff| {diff:.3e} (bound {bound:.3e})", c.label);
            if !(diff <= *bound) {
                failures.push(format!("{}: {what} vs transformers' {key}: {diff:.3e} > {bound:.3e}", c.label));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Where check_saved.py writes transformers' logits of checkpoint `dir`, and its report.
fn out_file(dir: &Path) -> PathBuf {
    PathBuf::from(format!("{}.logits.safetensors", dir.display()))
}

fn report_file(dir: &Path) -> PathBuf {
    PathBuf::from(format!("{}.json", out_file(dir).display()))
}

fn read_f32s(path: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = f32s(&view);
            (name, values)
        })
        .collect()
}
