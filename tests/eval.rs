//! `t1 eval` as a user runs it, on a checkpoint whose every answer is known by hand: a bigram
//! model (attention and MLP outputs zeroed, so the next token depends on the current one only)
//! that, with a tokenizer of one token per character, answers any prompt with
//! `\boxed{7}<|im_end|>`, 10 tokens, and any forced answer after `{` with `7}<|im_end|>`.

use std::path::{Path, PathBuf};
use std::process::Output;

use burn::module::Param;
use burn::tensor::{Tensor, TensorData};

use crate::cli::{stderr, t1};
use crate::common::*;

/// The greedy chain: after the prompt's last token `\n` the model writes `\boxed{7}`, then EOS.
const CHAIN: &str = "\n\\boxed{7}";

/// Logit of the next token in the chain (all others 0): softmax gives it 0.78 at temperature 1
/// over the 259 ids, so sampling leaves the chain now and then, greedy decoding never.
const NEXT_LOGIT: f32 = 6.8;

/// Writes into `dir` the tokenizer, `problems.jsonl` (3 + 4 = 7 and 2 * 4 = 8) and the bigram
/// checkpoint `model/` (with its tokenizer.json); returns the checkpoint's directory.
fn bigram_task(dir: &Path) -> PathBuf {
    // no merges: trained on single digits, every ASCII character is one token
    let tok = t1_data::train_bpe(&["0123456789".to_string()], 259).unwrap();
    let id = |c: char| {
        let ids = tok.encode(&c.to_string());
        assert_eq!(ids.len(), 1, "{c:?} is one token");
        ids[0] as usize
    };
    let mut config = t1_model::Qwen2Config::tiny(tok.vocab_size(), 32, 1, 4, 2);
    config.tie_word_embeddings = false;
    let (v, h) = (config.vocab_size, config.hidden_size);
    let device = Default::default();
    let mut model = t1_model::Qwen2::<FlexInner>::init(&config, &device);
    // token i of the chain is the unit vector i (its RMSNorm: sqrt(h) e_i); the others are 0
    let (mut embed, mut head) = (vec![0.0f32; v * h], vec![0.0f32; h * v]);
    let chain: Vec<char> = CHAIN.chars().collect();
    for (i, &c) in chain.iter().enumerate() {
        let next = chain.get(i + 1).map_or(tok.eos_id() as usize, |&n| id(n));
        embed[id(c) * h + i] = 1.0;
        head[i * v + next] = NEXT_LOGIT / (h as f32).sqrt();
    }
    let matrix = |data: Vec<f32>, shape: [usize; 2]| Param::from_tensor(Tensor::from_data(TensorData::new(data, shape), &device));
    model.embed_tokens.weight = matrix(embed, [v, h]);
    model.lm_head.as_mut().expect("untied").weight = matrix(head, [h, v]);
    for layer in &mut model.layers {
        for w in [&mut layer.self_attn.o_proj.weight, &mut layer.mlp.down_proj.weight] {
            let [i, o] = w.dims();
            *w = matrix(vec![0.0; i * o], [i, o]);
        }
    }
    let checkpoint = dir.join("model");
    t1_model::save(&model, &config, &checkpoint, &Default::default()).unwrap();
    tok.save(&checkpoint.join("tokenizer.json")).unwrap();
    std::fs::write(
        dir.join("problems.jsonl"),
        "{\"prompt\": \"Compute 3 + 4.\", \"answer\": \"7\"}\n{\"prompt\": \"Compute 2 * 4.\", \"answer\": \"8\"}\n",
    )
    .unwrap();
    checkpoint
}

/// `t1 eval` of `model` on `dir`/problems.jsonl into `dir`/`out` with `args` added.
fn eval(dir: &Path, model: &Path, out: &str, args: &[&str]) -> Output {
    let data = dir.join("problems.jsonl");
    let out = dir.join(out);
    let mut all = vec!["eval", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    all.extend(args);
    t1(&all)
}

fn read(dir: &Path, out: &str, file: &str) -> String {
    std::fs::read_to_string(dir.join(out).join(file)).unwrap()
}

const HEADER: &str = "model,budget,accuracy,pass_at_n,majority_accuracy,mean_tokens,forced_fraction";

#[test]
fn eval_greedy_reads_every_budget_off_one_generation() {
    let dir = tempfile::tempdir().unwrap();
    let model = bigram_task(dir.path());
    let name = format!("{}/model", dir.path().file_name().unwrap().to_string_lossy());
    // budgets in any order; at 4 both problems are cut after `\box` and forced (the default cue
    // ends in `\boxed{`, the answer is 7: right for one problem of two); at 10 and 16 the
    // response ends within the budget, 10 tokens, unforced
    let o = eval(dir.path(), &model, "a", &["--budgets", "16,4,10"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = format!("{HEADER}\n{name},4,0.5,0.5,0.5,4,1\n{name},10,0.5,0.5,0.5,10,0\n{name},16,0.5,0.5,0.5,10,0\n");
    assert_eq!(read(dir.path(), "a", "eval.csv"), want);
    let json: serde_json::Value = serde_json::from_str(&read(dir.path(), "a", "eval.json")).unwrap();
    assert_eq!((json[0]["model"].as_str(), json[0]["problems"].as_u64(), json[0]["samples"].as_u64()), (Some(name.as_str()), Some(2), Some(1)));
    assert_eq!(json[0]["temperature"].as_f64(), Some(0.0));
    assert!(read(dir.path(), "a", "accuracy_vs_budget.svg").contains("<svg"));

    // greedy is deterministic: three samples on two threads give the same rows
    let o = eval(dir.path(), &model, "b", &["--budgets", "4,10,16", "--samples", "3", "--threads", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read(dir.path(), "b", "eval.csv"), want);

    // a cue without `\boxed{` leaves the forced answers unreadable; --limit keeps problem 7
    let o = eval(dir.path(), &model, "c", &["--budgets", "4,10", "--cue", " so ", "--limit", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read(dir.path(), "c", "eval.csv"), format!("{HEADER}\n{name},4,0,0,0,4,1\n{name},10,1,1,1,10,0\n"));
}

#[test]
fn eval_sampled_is_seeded_and_leaves_the_greedy_chain() {
    let dir = tempfile::tempdir().unwrap();
    let model = bigram_task(dir.path());
    let args = ["--budgets", "4,10,16", "--samples", "4", "--temperature", "1", "--seed", "3"];
    for out in ["a", "b"] {
        let o = eval(dir.path(), &model, out, &args);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let (a, b) = (read(dir.path(), "a", "eval.json"), read(dir.path(), "b", "eval.json"));
    assert_eq!(a, b, "the same seed gives the same results");
    let json: serde_json::Value = serde_json::from_str(&a).unwrap();
    assert_eq!((json[0]["samples"].as_u64(), json[0]["temperature"].as_f64()), (Some(4), Some(1.0)));
    let rows = json[0]["results"].as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["budget"].as_u64().unwrap()).collect::<Vec<_>>(), [4, 10, 16]);
    for r in rows {
        let x = |k: &str| r[k].as_f64().unwrap();
        assert!(0.0 <= x("accuracy") && x("accuracy") <= x("pass_at_n") && x("pass_at_n") <= 1.0, "{r}");
        assert!((0.0..=1.0).contains(&x("majority_accuracy")) && (0.0..=1.0).contains(&x("forced_fraction")), "{r}");
        assert!(x("mean_tokens") <= x("budget"), "{r}");
    }
    // one step in five leaves the chain, so some of the 8 responses have not ended after 16
    // tokens (greedy: none)
    assert!(rows[2]["forced_fraction"].as_f64().unwrap() > 0.0, "{a}");
    assert_eq!(read(dir.path(), "a", "eval.csv").lines().count(), 1 + 3);
}

#[test]
fn eval_bad_inputs_are_clear_errors_with_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let model = bigram_task(dir.path());
    let fails = |o: &Output, needle: &str| {
        let err = stderr(o);
        assert!(!o.status.success() && !err.contains("panicked") && err.contains(needle), "{needle:?} not in: {err}");
    };
    let missing = dir.path().join("missing.jsonl");
    fails(&t1(&["eval", "--model", model.to_str().unwrap(), "--data", missing.to_str().unwrap(), "--out", dir.path().join("x").to_str().unwrap()]), &missing.display().to_string());
    let no_model = dir.path().join("no-model");
    fails(&eval(dir.path(), &no_model, "x", &[]), &no_model.display().to_string());
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    fails(&eval(dir.path(), &model, "x", &[]), "needs a tokenizer.json");
    // budgets out of order are sorted (see above); an empty or non-numeric one is an error
    for budgets in ["4,x", ""] {
        fails(&eval(dir.path(), &model, "x", &["--budgets", budgets]), "--budgets");
    }
    assert!(!dir.path().join("x").exists(), "a failed run wrote its output");
}
