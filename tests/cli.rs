//! The `t1` binary as a user runs it: outputs, exit codes and error messages.

use std::process::{Command, Output};

use crate::common::*;

pub(crate) fn t1(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_t1")).args(args).output().expect("run t1")
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn logits_command_writes_transformers_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.safetensors");
    for name in CHECKPOINTS {
        let r = reference(name);
        let ids: Vec<String> = r.ids[..r.len].iter().map(|i| i.to_string()).collect();
        let model = fixture(name);
        let o = t1(&["logits", "--model", model.to_str().unwrap(), "--ids", &ids.join(","), "--out", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor("logits").unwrap();
        let vocab = r.logits.len() / (r.batch * r.len);
        assert_eq!(view.shape(), &[r.len, vocab]);
        let got = f32s(&view);
        let want = &r.logits[..r.len * vocab];
        let config = t1_model::Qwen2Config::from_file(&model.join("config.json")).unwrap();
        let (diff, bound) = (max_abs_diff(&got, want), crate::model::f32_logit_bound(&config, max_abs(want)));
        assert!(diff <= bound, "{name}: max |logit diff| {diff:.3e} > {bound:.3e}");
    }
}

#[test]
fn info_describes_a_checkpoint() {
    let o = t1(&["info", "--model", fixture("qwen2-tied").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("Qwen2ForCausalLM") && s.contains("tied embeddings     true"), "{s}");
}

#[test]
fn bad_inputs_are_clear_errors_with_a_nonzero_exit() {
    let model = fixture("qwen2-gqa");
    let m = model.to_str().unwrap();
    let o = t1(&["logits", "--model", m, "--ids", "1,999", "--out", "/tmp/x.safetensors"]);
    assert!(!o.status.success() && stderr(&o).contains("outside the vocabulary"), "{}", stderr(&o));
    #[cfg(not(feature = "cuda"))]
    {
        let o = t1(&["logits", "--model", m, "--ids", "1", "--out", "/tmp/x.safetensors", "--device", "cuda:0"]);
        assert!(!o.status.success() && stderr(&o).contains("--features cuda"), "{}", stderr(&o));
    }
    let o = t1(&["logits", "--model", m, "--ids", "1", "--out", "/tmp/x.safetensors", "--device", "wgpu", "--dtype", "bf16"]);
    assert!(!o.status.success() && stderr(&o).contains("bf16"), "{}", stderr(&o));
    let o = t1(&["info", "--model", "/nonexistent"]);
    assert!(!o.status.success() && stderr(&o).contains("/nonexistent"), "{}", stderr(&o));
    // a config key that does not exist is named
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[optim]\nlrr = 1.0\n").unwrap();
    let o = t1(&["sft", "--config", cfg.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("lrr"), "{}", stderr(&o));
    let o = t1(&["sft", "--config", "configs/none.toml"]);
    assert!(!o.status.success(), "{}", stderr(&o));
    // a bad --set value on a valid config is named by its override; the same config with a
    // good value gets past the config to the next check (no training data given)
    std::fs::write(&cfg, "[optim]\nlr = 1e-4\n").unwrap();
    let o = t1(&["sft", "--config", cfg.to_str().unwrap(), "--set", "optim.lr=abc"]);
    assert!(!o.status.success() && stderr(&o).contains("--set optim.lr=abc") && stderr(&o).contains("invalid type"), "{}", stderr(&o));
    let o = t1(&["sft", "--config", cfg.to_str().unwrap(), "--set", "optim.lr=2e-4"]);
    assert!(!o.status.success() && !stderr(&o).contains("--set") && stderr(&o).contains("data.train"), "{}", stderr(&o));
}

#[test]
fn grade_writes_one_line_per_input_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        concat!(
            r#"{"response": "so \\boxed{\\dfrac{1}{2}}", "answer": "0.5"}"#, "\n",
            r#"{"response": "no box here", "answer": "3"}"#, "\n",
            r#"{"response": "\\boxed{1,234}", "answer": 1234}"#, "\n",
        ),
    )
    .unwrap();
    let o = t1(&["grade", "--input", input.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["correct"], true);
    assert_eq!(lines[0]["extracted"], "\\dfrac{1}{2}");
    assert_eq!(lines[1]["correct"], false);
    assert!(lines[1]["extracted"].is_null());
    assert_eq!(lines[2]["correct"], true);
    let output = dir.path().join("out.jsonl");
    let o = t1(&["grade", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(std::fs::read_to_string(output).unwrap().lines().count(), 3);
    std::fs::write(&input, "{not json\n").unwrap();
    let o = t1(&["grade", "--input", input.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("in.jsonl:1"), "{}", stderr(&o));
}

#[test]
fn presets_parse() {
    let root = fixture("../../configs");
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with("-sft.toml") {
            t1_train::load_config::<t1_train::sft::SftConfig>(Some(&path), &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name.ends_with("-rl.toml") {
            let (c, _) = t1_train::load_config::<t1_train::rl::RlConfig>(Some(&path), &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
            c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    // the paper's RL settings are what the preset says
    let (c, _) = t1_train::load_config::<t1_train::rl::RlConfig>(Some(&root.join("qwen2.5-32b-rl.toml")), &[]).unwrap();
    assert_eq!((c.rollout.samples_per_prompt, c.rollout.prompts_per_step), (64, 32));
    assert_eq!((c.sampling.temperature, c.sampling.max_new_tokens), (1.2, 16384));
    assert_eq!((c.optim.lr, c.loss.kl_coef), (1.5e-6, 2e-4));
    let (c, _) = t1_train::load_config::<t1_train::sft::SftConfig>(Some(&root.join("qwen2.5-14b-sft.toml")), &[]).unwrap();
    assert_eq!((c.train.epochs, c.optim.lr), (3, 1e-5));
}
