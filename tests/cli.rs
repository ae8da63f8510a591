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

/// Every Qwen2.5 preset states its `t1 plan` verdict for one 80 GB and one 141 GB GPU; the
/// verdict must be what the plan says today.
#[test]
fn preset_comments_state_the_plans_verdict() {
    let root = fixture("../../configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let Some(size) = name.strip_prefix("qwen2.5-").and_then(|n| n.split('-').next()) else { continue };
        let text = std::fs::read_to_string(&path).unwrap();
        let line = text.lines().find(|l| l.starts_with("# memory plan (t1 plan ")).unwrap_or_else(|| panic!("{name} has no '# memory plan' comment"));
        let shape = t1_train::plan::qwen25(size).unwrap();
        let plan = if name.ends_with("-rl.toml") {
            assert!(line.contains("--prompt-tokens 512"), "{name}: {line}");
            let (c, _) = t1_train::load_config::<t1_train::rl::RlConfig>(Some(&path), &[]).unwrap();
            t1_train::plan::rl_plan(&c, &shape, 512).unwrap()
        } else {
            let (c, _) = t1_train::load_config::<t1_train::sft::SftConfig>(Some(&path), &[]).unwrap();
            t1_train::plan::sft_plan(&c, &shape).unwrap()
        };
        let gib = plan.peak as f64 / (1u64 << 30) as f64;
        let verdict = |gb: u64| if plan.peak <= gb << 30 { "fits" } else { "does not fit" };
        let want = format!("peak {gib:.1} GiB -> {} one 80 GB GPU, {} one 141 GB GPU", verdict(80), verdict(141));
        assert!(line.ends_with(&want), "{name}: the comment says\n  {line}\nbut t1 plan now gives\n  {want}");
        checked += 1;
    }
    assert_eq!(checked, 6, "presets with a plan verdict");
}

#[test]
fn plan_prints_every_item_and_refuses_bad_input() {
    let model = fixture("qwen2-gqa");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sft.toml");
    std::fs::write(&cfg, format!("out_dir = {:?}\n[model]\ncheckpoint = {:?}\n[data]\ntrain = \"x.jsonl\"\nmax_len = 64\n", dir.path().join("out").display().to_string(), model.display().to_string())).unwrap();
    let c = cfg.to_str().unwrap();
    let o = t1(&["plan", "sft", "--config", c, "--memory", "1GB"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    for item in ["weights", "gradients", "optimizer", "activations", "logits", "peak", "fits"] {
        assert!(out.contains(item), "no {item} in:\n{out}");
    }
    // a verdict against this machine's memory without --memory
    let o = t1(&["plan", "sft", "--config", c]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("MemAvailable"), "{}", stderr(&o));
    for (args, want) in [
        (vec!["--memory", "lots"], "--memory"),
        (vec!["--arch", "qwen2.5-13b"], "--arch"),
        (vec!["--set", "train.activation_checkpointing=\"full\""], "expected `none` or `layer`"),
        (vec!["--set", "model.dtype=\"f32\"", "--set", "optim.master_weights=true"], "optim.master_weights"),
    ] {
        let o = t1(&[&["plan", "sft", "--config", c][..], &args].concat());
        assert!(!o.status.success() && stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    // a CUDA device that is not here (no driver): a clear error, not a guess
    if std::process::Command::new("nvidia-smi").output().is_err() {
        let o = t1(&["plan", "sft", "--config", c, "--device", "cuda:0"]);
        assert!(!o.status.success() && stderr(&o).contains("--memory"), "{}", stderr(&o));
    }
}

#[test]
fn a_run_that_cannot_fit_stops_before_writing_anything() {
    let data = tempfile::tempdir().unwrap();
    crate::train::tiny_task(data.path());
    let out = data.path().join("out");
    let mut cfg = crate::train::sft_config(data.path(), &out, 2);
    // a 3.3T-parameter model from scratch: tens of TB, more than any machine has
    cfg.model.scratch.hidden_size = 65536;
    cfg.model.scratch.intermediate_size = 65536;
    cfg.model.scratch.num_hidden_layers = 64;
    cfg.model.scratch.num_attention_heads = 64;
    cfg.model.scratch.num_key_value_heads = 64;
    let path = data.path().join("huge.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let o = t1(&["sft", "--config", path.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("nothing was allocated") && err.contains("largest: ") && err.contains("--no-memory-check"), "{err}");
    assert!(!out.exists(), "the refused run wrote {}", out.display());
}

/// scripts/gpu-check.sh runs up to the point where it needs CUDA: it makes its inputs with the
/// t1 binary and numpy, then stops with exit code 3 and a clear message where there is no GPU.
#[test]
fn gpu_check_script_runs_until_it_needs_a_gpu() {
    if std::process::Command::new("nvidia-smi").arg("-L").output().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: a GPU is here; run scripts/gpu-check.sh itself");
        return;
    }
    let python = std::env::var("T1_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_numpy = std::process::Command::new(&python).args(["-c", "import numpy, safetensors"]).output().is_ok_and(|o| o.status.success());
    if !has_numpy {
        assert!(std::env::var("CI").is_err(), "CI must provide T1_PYTHON with numpy and safetensors (.ci/run does)");
        eprintln!("SKIPPED: {python} lacks numpy/safetensors (set T1_PYTHON, as .ci/run does)");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let o = std::process::Command::new("bash")
        .arg(fixture("../../scripts/gpu-check.sh"))
        .arg(env!("CARGO_BIN_EXE_t1"))
        .arg(out.path())
        .env("GPU_CHECK_SHAPES", "m18")
        .env("PYTHON", &python)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("no NVIDIA GPU"), "{err}");
    assert!(out.path().join("m18/config.json").exists() && out.path().join("task/sft_train.jsonl").exists(), "{err}");
}
