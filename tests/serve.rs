//! `t1 serve` (#20) against the official `openai` Python client on loopback, on a random Qwen2
//! that carries the real Qwen3 tokenizer files: greedy chat equals `t1 generate`; n = 4 with
//! logprobs gives the log-probabilities t1 recomputes from the full forward (`t1 logits`)
//! within 1e-4, and the same seed gives the same samples; 16 concurrent requests are all
//! answered; bad requests get a 4xx with OpenAI's error shape and the server keeps serving;
//! a weight reload bumps the weight version; SIGTERM stops it cleanly.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::common::{f32s, fixture};
use crate::templates::{python, qwen3_tokenizer_dir};

/// Kills the server if the test fails before it is stopped.
struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(model: &Path) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_t1"))
        .args(["serve", "--port", "0", "--served-model-name", "t1-test", "--model"])
        .arg(model)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start t1 serve");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_else(|| panic!("no URL in t1 serve's first line: {line:?}")).to_string();
    (Server(child), url)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap_or_else(|| panic!("not a list of ids: {v}")).iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// One HTTP request with the Python standard library (no client crate in the tests).
fn http(py: &str, method: &str, url: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let script = r#"
import json, sys, urllib.request, urllib.error
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request(url, data=body.encode() if body else None, method=method, headers={"content-type": "application/json"})
try:
    with urllib.request.urlopen(req) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"#;
    let o = Command::new(py).args(["-c", script, method, url, body.unwrap_or("")]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let mut lines = text.lines();
    let status = lines.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {text} {}", String::from_utf8_lossy(&o.stderr)));
    (status, serde_json::from_str(lines.next().unwrap_or("null")).unwrap())
}

#[test]
fn serve_answers_the_openai_client_as_t1_generate_and_t1_logits_do() {
    let py = python();
    let probe = Command::new(&py).args(["-c", "import openai"]).output().unwrap();
    assert!(probe.status.success(), "`{py}` cannot import openai: pip install openai (as .ci/run does), or set T1_PYTHON");
    let dir = tempfile::tempdir().unwrap();
    let prompts = ["Compute 17 * 3.", "你好，世界 😀"];
    let o = Command::new(&py).arg(fixture("check_generate_template.py")).arg(qwen3_tokenizer_dir()).arg(dir.path()).args(prompts).output().unwrap();
    assert!(o.status.success(), "check_generate_template.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let model = dir.path().join("model");

    // the reference: t1 generate, greedy (the checkpoint's generation_config has do_sample false)
    let mut args = vec!["generate".to_string(), "--model".into(), model.display().to_string(), "--max-new-tokens".into(), "12".into()];
    for p in prompts {
        args.extend(["--prompt".to_string(), p.to_string()]);
    }
    let o = Command::new(env!("CARGO_BIN_EXE_t1")).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let generated: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();

    let (mut server, url) = start(&model);
    let out = dir.path().join("serve.json");
    let o = Command::new(&py).arg(fixture("check_serve.py")).arg(&url).arg("t1-test").arg(&out).args(prompts).output().unwrap();
    assert!(o.status.success(), "check_serve.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    println!("openai {}", r["openai_version"]);
    assert_eq!(r["models"], serde_json::json!(["t1-test"]));

    for ((p, want), got) in prompts.iter().zip(&generated).zip(r["chat"].as_array().unwrap()) {
        assert_eq!(ids(&got["token_ids"]), ids(&want["token_ids"]), "{p:?}: greedy chat must equal t1 generate");
        assert_eq!(got["content"], want["response"], "{p:?}: the text");
        assert_eq!(got["finish_reason"], if want["truncated"] == true { "length" } else { "stop" });
    }

    // prompt-major choices: [a, a, b, b], each the greedy chat response of its prompt
    let multi = r["multi"].as_array().unwrap();
    assert_eq!(multi.len(), 2 * prompts.len());
    for (i, c) in multi.iter().enumerate() {
        let chat = &r["chat"][i / 2];
        assert_eq!(c["index"], i, "{c}");
        assert_eq!(ids(&c["prompt_token_ids"]), ids(&chat["prompt_token_ids"]), "choice {i}: its prompt");
        assert_eq!(ids(&c["token_ids"]), ids(&chat["token_ids"]), "choice {i}: the greedy response of its prompt");
    }

    // n = 4 at temperature 1: t1's own recomputation of each sampled token's log-probability
    let prompt_ids = ids(&r["sampled"]["prompt_ids"]);
    let choices = r["sampled"]["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    let responses: Vec<Vec<u32>> = choices.iter().map(|c| ids(&c["token_ids"])).collect();
    assert!(responses.iter().any(|x| x != &responses[0]), "4 samples at temperature 1 must not all be equal: {responses:?}");
    assert_eq!(r["sampled_again_same"], true, "the same seed must give the same samples");
    let mut worst = 0f32;
    for (c, response) in choices.iter().zip(&responses) {
        let all: Vec<String> = prompt_ids.iter().chain(response).map(|i| i.to_string()).collect();
        let logits_path = dir.path().join("logits.safetensors");
        let o = Command::new(env!("CARGO_BIN_EXE_t1")).args(["logits", "--model"]).arg(&model).arg("--ids").arg(all.join(",")).arg("--out").arg(&logits_path).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let bytes = std::fs::read(&logits_path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor("logits").unwrap();
        let vocab = view.shape()[1];
        let logits = f32s(&view);
        let served: Vec<f32> = c["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(served.len(), response.len());
        for (j, (&tok, lp)) in response.iter().zip(&served).enumerate() {
            let row = &logits[(prompt_ids.len() - 1 + j) * vocab..(prompt_ids.len() + j) * vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let log_z = max + row.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
            let d = (row[tok as usize] - log_z - lp).abs();
            assert!(d.is_finite(), "token {j}: a NaN log-probability");
            worst = worst.max(d);
        }
    }
    println!("served vs recomputed log-probabilities: max |diff| {worst:.2e}");
    assert!(worst <= 1e-4, "served log-probs differ from t1's recomputation by {worst:.2e} > 1e-4");

    let stop = &r["stop"];
    assert!(stop["stop"].as_str().is_some_and(|s| !s.is_empty()), "{stop}");
    assert_eq!(stop["text"], stop["want"], "a stop string cuts the text before it: {stop}");
    assert_eq!(stop["finish_reason"], "stop", "{stop}");
    assert_eq!(r["concurrent"]["answered"], 16, "{}", r["concurrent"]);
    assert_eq!(r["concurrent"]["budgets_kept"], true, "every row keeps its own max_tokens: {}", r["concurrent"]);
    for (what, res) in r["bad"].as_object().unwrap() {
        let status = res["status"].as_u64().unwrap();
        assert!((400..500).contains(&status), "{what}: status {status}, want a 4xx: {res}");
        assert_eq!(res["shape"], true, "{what}: the body must be OpenAI's {{\"error\": {{\"message\": ..}}}}: {res}");
    }
    assert_eq!(r["bad"]["unknown_model"]["status"], 404);
    assert_eq!(r["health_after"]["status"], "ok");

    // SGLang's weight update: other weights (every tensor × 1.5) answer as t1 generate does on
    // them; the version moves; a path without a checkpoint is a 400 and the weights stay
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model.join(f), other.join(f)).unwrap();
    }
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let scaled: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec(), f32s(&view).iter().flat_map(|v| (v * 1.5).to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        scaled.iter().map(|(n, shape, data)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap())).collect();
    std::fs::write(other.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_t1")).args(["generate", "--max-new-tokens", "12", "--prompt", prompts[0], "--model"]).arg(&other).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
    assert_ne!(ids(&want["token_ids"]), ids(&generated[0]["token_ids"]), "the scaled weights must answer otherwise");
    let (status, body) = http(&py, "POST", &format!("{url}/update_weights_from_disk"), Some(&serde_json::json!({"model_path": other}).to_string()));
    assert_eq!((status, body["success"].clone()), (200, serde_json::json!(true)), "{body}");
    let chat = serde_json::json!({"model": "t1-test", "messages": [{"role": "user", "content": prompts[0]}], "temperature": 0, "max_tokens": 12, "return_token_ids": true});
    let (status, body) = http(&py, "POST", &format!("{url}/v1/chat/completions"), Some(&chat.to_string()));
    assert_eq!(status, 200, "{body}");
    assert_eq!(ids(&body["choices"][0]["token_ids"]), ids(&want["token_ids"]), "after the reload, greedy chat is t1 generate on the new weights");
    let (status, body) = http(&py, "POST", &format!("{url}/update_weights_from_disk"), Some(r#"{"model_path": "/no/such/checkpoint"}"#));
    assert_eq!(status, 400, "{body}");
    let (_, health) = http(&py, "GET", &format!("{url}/health"), None);
    assert_eq!(health["weight_version"], "1", "{health}");
    let (_, models) = http(&py, "GET", &format!("{url}/v1/models"), None);
    assert_eq!(models["data"][0]["weight_version"], "1", "{models}");

    // SIGTERM: a clean stop
    #[cfg(unix)]
    {
        let pid = server.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let status = server.0.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(server.0.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(status.success(), "t1 serve must exit 0 on SIGTERM: {status:?}\n{err}");
        assert!(err.contains("t1 serve: stopped"), "{err}");
    }
}
