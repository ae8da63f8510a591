//! Broken and hostile inputs: malformed data, bad configs and `--set` values, tokenizers and
//! checkpoints that do not match, corrupt or malicious safetensors files. Each is an error
//! that says what, where and what to do, with a non-zero exit, no panic, and nothing written.
//! (Header-level safetensors cases are unit tests in crates/t1-model/src/hf.rs.)

use std::path::Path;
use std::process::Output;

use safetensors::SafeTensors;
use t1_model::WeightDtype;

use crate::cli::{stderr, t1};
use crate::common::*;
use crate::model::broken_copy;
use crate::train::{rl_config, sft_config, tiny_task};

/// Asserts a failed run: non-zero exit, no panic, and each of `needles` in stderr.
fn assert_fails(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "expected a failure, got success: {err}");
    assert!(!err.contains("panicked"), "a panic instead of an error: {err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny task in a temporary directory and an SFT config for it, written as TOML to
/// `sft.toml`; its out_dir is `out` in the same directory.
fn sft_setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny_task(dir.path());
    let cfg = sft_config(dir.path(), &dir.path().join("out"), 1);
    std::fs::write(dir.path().join("sft.toml"), toml::to_string(&cfg).unwrap()).unwrap();
    dir
}

fn sft(dir: &Path, sets: &[&str]) -> Output {
    let config = dir.join("sft.toml");
    let mut args = vec!["sft", "--config", s(&config)];
    for set in sets {
        args.extend(["--set", set]);
    }
    t1(&args)
}

/// A random Qwen2 checkpoint (with the task tokenizer) whose context is `context` tokens.
pub(crate) fn tiny_checkpoint(data: &Path, dir: &Path, context: usize) {
    let tok = t1_data::ChatTokenizer::from_file(&data.join("tokenizer.json")).unwrap();
    let mut config = t1_model::Qwen2Config::tiny(tok.vocab_size(), 32, 1, 4, 2);
    config.max_position_embeddings = context;
    let model = t1_model::Qwen2::<FlexInner>::init(&config, &Default::default());
    t1_model::save(&model, &config, dir, &Default::default()).unwrap();
    tok.save(&dir.join("tokenizer.json")).unwrap();
}

#[test]
fn hostile_cli_malformed_jsonl_names_the_file_and_line() {
    let dir = sft_setup();
    let data = dir.path().join("sft.jsonl");
    let good = std::fs::read_to_string(&data).unwrap();
    let first: Vec<&str> = good.lines().take(2).collect();
    let cases = [
        ("{\"messages\": [", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ("{\"messages\": 3}", "\"messages\" must be a list"),
        ("{\"prompt\": \"hi\"}", "missing field \"response\""),
        ("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", "no assistant message"),
    ];
    for (line, what) in cases {
        std::fs::write(&data, format!("{}\n{}\n{line}\n", first[0], first[1])).unwrap();
        let err = assert_fails(&sft(dir.path(), &[]), &[&format!("{}:3:", data.display()), what, "data.skip_bad_lines"]);
        assert!(!dir.path().join("out").exists(), "a failed run wrote its out_dir: {err}");
    }
    // skipping is opt-in and counted
    let o = sft(dir.path(), &["data.skip_bad_lines=true", "data.eval=\"\""]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("skipped 1 malformed lines"), "{}", stderr(&o));
}

#[test]
fn hostile_cli_empty_datasets() {
    let dir = sft_setup();
    let data = dir.path().join("sft.jsonl");
    for text in ["", "\n  \n\n"] {
        std::fs::write(&data, text).unwrap();
        assert_fails(&sft(dir.path(), &[]), &[&data.display().to_string(), "no examples found"]);
        assert!(!dir.path().join("out").exists());
    }
    // every line bad and skipped: still empty
    std::fs::write(&data, "{}\n{}\n").unwrap();
    assert_fails(&sft(dir.path(), &["data.skip_bad_lines=true"]), &["no examples found"]);
    // RL problems
    let model = dir.path().join("model");
    tiny_checkpoint(dir.path(), &model, 512);
    let problems = dir.path().join("empty.jsonl");
    std::fs::write(&problems, "").unwrap();
    let mut cfg = rl_config(dir.path(), &model, &dir.path().join("rl-out"), 1);
    cfg.data.train = problems.clone();
    std::fs::write(dir.path().join("rl.toml"), toml::to_string(&cfg).unwrap()).unwrap();
    assert_fails(&t1(&["rl", "--config", s(&dir.path().join("rl.toml"))]), &[&problems.display().to_string(), "no examples found"]);
    assert!(!dir.path().join("rl-out").exists());
}

#[test]
fn hostile_cli_prompts_longer_than_the_context() {
    let dir = sft_setup();
    // SFT: max_len beyond the model's context
    assert_fails(&sft(dir.path(), &["data.max_len=4096"]), &["data.max_len", "4096", "max_position_embeddings", "lower data.max_len"]);
    assert!(!dir.path().join("out").exists());
    // RL: a prompt that, with max_new_tokens, does not fit a 48-token context
    let model = dir.path().join("model");
    tiny_checkpoint(dir.path(), &model, 48);
    let problems = dir.path().join("long.jsonl");
    let long = "1 + 2 = ? ".repeat(20);
    std::fs::write(&problems, format!("{{\"prompt\": \"1 + 1\", \"answer\": \"2\"}}\n{{\"prompt\": \"{long}\", \"answer\": \"3\"}}\n")).unwrap();
    let mut cfg = rl_config(dir.path(), &model, &dir.path().join("rl-out"), 1);
    cfg.data.train = problems.clone();
    std::fs::write(dir.path().join("rl.toml"), toml::to_string(&cfg).unwrap()).unwrap();
    assert_fails(
        &t1(&["rl", "--config", s(&dir.path().join("rl.toml"))]),
        &[&format!("{}:2", problems.display()), "exceeds the model's context of 48", "shorten the prompt or lower max_new_tokens"],
    );
    assert!(!dir.path().join("rl-out").exists());
}

#[test]
fn hostile_cli_bad_config_files() {
    let dir = sft_setup();
    let cfg = dir.path().join("bad.toml");
    let run = |text: &str| {
        std::fs::write(&cfg, text).unwrap();
        t1(&["sft", "--config", s(&cfg)])
    };
    // TOML syntax: file, line and column
    assert_fails(&run("[optim\nlr = 1\n"), &["bad.toml", "line 1"]);
    // an unknown key, a wrong type, a value out of range: each named, with its line
    assert_fails(&run("[optim]\nlrr = 1.0\n"), &["bad.toml", "line 2", "lrr"]);
    assert_fails(&run("[optim]\nlr = \"fast\"\n"), &["bad.toml", "line 2", "lr = \"fast\"", "expected f64"]);
    assert_fails(&run("[train]\nbatch_size = -1\n"), &["bad.toml", "batch_size"]);
    let text = std::fs::read_to_string(dir.path().join("sft.toml")).unwrap();
    assert_fails(&run(&text.replace("batch_size = 8", "batch_size = 0")), &["train.batch_size"]);
    assert_fails(&run(&text.replace("dtype = \"f32\"", "dtype = \"f8\"")), &["model.dtype", "f32 or bf16"]);
    // a config file or data file that is not there
    assert_fails(&t1(&["sft", "--config", s(&dir.path().join("none.toml"))]), &["none.toml"]);
    assert_fails(&run(&text.replace("sft.jsonl", "missing.jsonl")), &["missing.jsonl"]);
    assert!(!dir.path().join("out").exists());
}

#[test]
fn hostile_cli_bad_set_values() {
    let dir = sft_setup();
    for (set, what) in [
        ("optim.lr=abc", "--set optim.lr=abc"),
        ("optim.lrr=1", "lrr"),
        ("train.batch_size=-1", "--set train.batch_size=-1"),
        ("train.batch_size=0", "train.batch_size"),
        ("optim.lr", "expected key=value"),
        ("optim..lr=1", "bad key"),
        ("optim.lr.x=1", "--set optim.lr.x=1"),
        ("train=3", "--set train=3"),
    ] {
        assert_fails(&sft(dir.path(), &[set]), &[what]);
    }
    // the first bad one of several is named
    let err = assert_fails(&sft(dir.path(), &["optim.lr=1e-3", "train.seed=x", "optim.eps=1e-8"]), &["--set train.seed=x"]);
    assert!(!err.contains("optim.eps"), "{err}");
    assert!(!dir.path().join("out").exists());
}

#[test]
fn hostile_cli_tokenizer_that_does_not_match_the_model() {
    let dir = sft_setup();
    // the task tokenizer has ~300 ids, the fixture model 96 rows of embedding
    let model = fixture("qwen2-tied");
    let model_set = format!("model.checkpoint={:?}", model.display().to_string());
    assert_fails(&sft(dir.path(), &[&model_set]), &["tokenizer has", "vocab_size is 96", "use the tokenizer the model was trained with"]);
    // a tokenizer.json that is not one
    let tok = dir.path().join("tokenizer.json");
    std::fs::write(&tok, "{\"version\": 1}").unwrap();
    assert_fails(&sft(dir.path(), &[]), &["tokenizer error in", "tokenizer.json"]);
    // a tokenizer without the chat tokens
    std::fs::write(&tok, r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"a":0,"[UNK]":1},"unk_token":"[UNK]"}}"#).unwrap();
    assert_fails(&sft(dir.path(), &[]), &["no <|im_end|> token", "eos_token"]);
    assert!(!dir.path().join("out").exists());
}

/// A copy of a fixture checkpoint with its `model.safetensors` tensors edited.
fn rewritten(name: &str, edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>)) -> tempfile::TempDir {
    let dir = broken_copy(name);
    let bytes = std::fs::read(fixture(name).join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let views: Vec<_> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(dir.path().join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    let err = t1_model::load::<FlexInner>(dir, WeightDtype::F32, &Default::default()).unwrap_err().to_string();
    assert!(err.contains(&dir.display().to_string()), "the error does not name the checkpoint: {err}");
    err
}

#[test]
fn hostile_checkpoint_with_a_missing_tensor() {
    let dir = rewritten("qwen2-gqa", |t| t.retain(|(n, ..)| n != "model.layers.1.mlp.up_proj.weight"));
    let err = load_error(dir.path());
    assert!(err.contains("missing tensors: model.layers.1.mlp.up_proj.weight") && err.contains("must come from the same model"), "{err}");
}

#[test]
fn hostile_checkpoint_with_an_extra_tensor() {
    let dir = rewritten("qwen2-gqa", |t| t.push(("model.layers.9.extra.weight".into(), safetensors::Dtype::F32, vec![2], vec![0; 8])));
    let err = load_error(dir.path());
    assert!(err.contains("not used by a Qwen2 model of this config: model.layers.9.extra.weight"), "{err}");
}

#[test]
fn hostile_checkpoint_whose_shapes_do_not_match_its_config() {
    // the file's own shapes changed (the config is right)
    let dir = rewritten("qwen2-gqa", |t| {
        let e = t.iter_mut().find(|(n, ..)| n == "model.norm.weight").unwrap();
        e.2 = vec![e.2[0] / 2, 2];
    });
    let err = load_error(dir.path());
    assert!(err.contains("model.norm.weight has shape [16, 2], config.json implies [32]"), "{err}");
}

/// Regression: a tied checkpoint holding `lm_head.weight` but no embedding panicked (the tied
/// head was compared with a missing tensor).
#[test]
fn hostile_tied_head_without_embedding_is_an_error_not_a_panic() {
    let dir = rewritten("qwen2-tied", |t| {
        let e = t.iter_mut().find(|(n, ..)| n == "model.embed_tokens.weight").unwrap();
        e.0 = "lm_head.weight".into();
    });
    let err = load_error(dir.path());
    assert!(err.contains("missing tensors: model.embed_tokens.weight"), "{err}");
    // and a tied head that differs from the embedding is not silently dropped
    let dir = rewritten("qwen2-tied", |t| {
        let e = t.iter().find(|(n, ..)| n == "model.embed_tokens.weight").unwrap().clone();
        let mut head = e.clone();
        head.0 = "lm_head.weight".into();
        head.3[0] ^= 1;
        t.push(head);
    });
    assert!(load_error(dir.path()).contains("lm_head.weight differs from model.embed_tokens.weight"));
}

#[test]
fn hostile_duplicate_tensor_across_shards() {
    let dir = broken_copy("qwen2-sharded");
    std::fs::copy(dir.path().join("model-00001-of-00009.safetensors"), dir.path().join("model-00002-of-00009.safetensors")).unwrap();
    let err = t1_model::load::<FlexInner>(dir.path(), WeightDtype::F32, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00009.safetensors") && err.contains("is also in") && err.contains("model-00001-of-00009"), "{err}");
}

fn with_config(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = broken_copy(name);
    let path = dir.path().join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, json.to_string()).unwrap();
    dir
}

#[test]
fn hostile_config_with_absurd_sizes() {
    // 10^12 layers: an error before listing the expected tensors (which would not fit in memory)
    let dir = with_config("qwen2-gqa", |j| j["num_hidden_layers"] = 1_000_000_000_000u64.into());
    let err = load_error(dir.path());
    assert!(err.contains("num_hidden_layers = 1000000000000 but the weights hold only 27 tensors"), "{err}");
    // sizes whose parameter count overflows
    let dir = with_config("qwen2-gqa", |j| {
        j["vocab_size"] = (1u64 << 62).into();
        j["hidden_size"] = 1024.into();
    });
    let err = load_error(dir.path());
    assert!(err.contains("config.json") && err.contains("more than 2^64 parameters"), "{err}");
    let dir = with_config("qwen2-gqa", |j| j["head_dim"] = 0.into());
    assert!(load_error(dir.path()).contains("head_dim (0) must be even and > 0"));
}

#[test]
fn hostile_cli_bad_config_json() {
    let dir = broken_copy("qwen2-gqa");
    let config = dir.path().join("config.json");
    let out = dir.path().join("logits.safetensors");
    let logits = |dir: &Path| t1(&["logits", "--model", s(dir), "--ids", "1,2", "--out", s(&out)]);
    for (text, what) in [
        ("{\"vocab_size\": ", "EOF while parsing"),
        ("\u{0}\u{1}", "expected value"),
        ("{\"hidden_size\": 32}", "missing field `vocab_size`"),
        ("{\"vocab_size\": \"many\"}", "invalid type"),
    ] {
        std::fs::write(&config, text).unwrap();
        assert_fails(&logits(dir.path()), &[&config.display().to_string(), what, "fix config.json"]);
        assert_fails(&t1(&["info", "--model", s(dir.path())]), &["config.json", what]);
    }
    assert!(!out.exists());
}

#[test]
fn hostile_cli_malicious_safetensors() {
    let dir = broken_copy("qwen2-tied");
    let weights = dir.path().join("model.safetensors");
    let out = dir.path().join("logits.safetensors");
    let header = r#"{"model.embed_tokens.weight": {"dtype": "F32", "shape": [96, 32], "data_offsets": [0, 12288]}, "model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [64, 192]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + 12288, 0);
    std::fs::write(&weights, &bytes).unwrap();
    let o = t1(&["logits", "--model", s(dir.path()), "--ids", "1,2", "--out", s(&out)]);
    assert_fails(&o, &["corrupt checkpoint file", "model.safetensors", "overlap", "re-save or re-download"]);
    // a shape whose byte size overflows
    let header = r#"{"model.embed_tokens.weight": {"dtype": "F32", "shape": [4611686018427387904, 8], "data_offsets": [0, 0]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    std::fs::write(&weights, &bytes).unwrap();
    let o = t1(&["logits", "--model", s(dir.path()), "--ids", "1,2", "--out", s(&out)]);
    assert_fails(&o, &["model.embed_tokens.weight", "more bytes than memory can address"]);
    assert!(!out.exists());
}

#[test]
fn hostile_cli_diverging_run_skips_non_finite_steps_then_stops_keeping_the_last_good_checkpoint() {
    // lr 1e30: the first AdamW step moves every weight by ~1e30, so every later loss overflows
    let dir = sft_setup();
    let out = dir.path().join("out");
    let o = sft(dir.path(), &["optim.lr=1e30", "optim.warmup_steps=0", "train.max_steps=20", "train.save_every=1", "train.max_bad_steps=3", "train.eval_every=0"]);
    let err = assert_fails(&o, &["3 steps in a row had a non-finite loss or gradient", "checkpoint", "--resume"]);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let skipped = metrics.lines().filter(|l| l.contains("\"skipped_step\"")).count();
    let stepped = metrics.lines().filter(|l| l.starts_with("{") && l.contains("\"loss\"") && !l.contains("\"event\"")).count();
    assert_eq!(skipped, 3, "{metrics}");
    assert_eq!(stepped, 1, "only the first step is finite: {metrics}\n{err}");
    // the checkpoint of the last good step is complete and loads
    let kept = t1_train::common::list_checkpoints(&out);
    assert_eq!(kept.iter().map(|p| p.file_name().unwrap().to_string_lossy().to_string()).collect::<Vec<_>>(), ["checkpoint-000001"]);
    t1_model::load::<FlexInner>(&kept[0], WeightDtype::F32, &Default::default()).unwrap();
    assert!(!out.join("final").exists(), "a diverged run must not write final/");
}

#[test]
fn hostile_cli_diverging_rl_run_stops_keeping_the_last_good_checkpoint() {
    // the first update at lr 1e30 leaves weights of ~1e30: later rollouts see non-finite
    // logits, which must give skipped steps and a clear stop, not a panic in sampling
    let dir = sft_setup();
    let model = dir.path().join("model");
    tiny_checkpoint(dir.path(), &model, 512);
    let out = dir.path().join("rl-out");
    let mut cfg = rl_config(dir.path(), &model, &out, 10);
    cfg.optim.lr = 1e30;
    cfg.optim.warmup_steps = 0;
    cfg.train.max_bad_steps = 2;
    std::fs::write(dir.path().join("rl.toml"), toml::to_string(&cfg).unwrap()).unwrap();
    let o = t1(&["rl", "--config", s(&dir.path().join("rl.toml"))]);
    let err = assert_fails(&o, &["2 steps in a row had a non-finite loss or gradient", "--resume"]);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"skipped_step\"")).count(), 2, "{metrics}\n{err}");
    let kept = t1_train::common::list_checkpoints(&out);
    assert_eq!(kept.iter().map(|p| p.file_name().unwrap().to_string_lossy().to_string()).collect::<Vec<_>>(), ["checkpoint-000001"], "{err}");
    t1_model::load::<FlexInner>(&kept[0], WeightDtype::F32, &Default::default()).unwrap();
    assert!(!out.join("final").exists());
}
