//! `t1 serve`: the OpenAI API (`/v1/completions`, `/v1/chat/completions`, `/v1/models`,
//! `/health`) over t1's decoding engine, and SGLang's `/update_weights_from_disk` so that an RL
//! loop can swap the weights between steps.
//!
//! One engine thread (the caller's) owns the model and decodes; the HTTP server (axum on a
//! tokio runtime of its own thread) parses requests and hands them over. The requests waiting
//! when the engine is free are decoded together as one batch, each row with its own sampling
//! settings, budget and seed stream (`t1_train::generate_rows`). A request that arrives while
//! a batch decodes waits for that batch to end: batching is per wave, not continuous (a
//! request does not join a running batch at a step boundary yet).
//!
//! Request and response shapes follow OpenAI's API reference for completions and chat
//! completions; `top_k` and `return_token_ids` (`token_ids` / `prompt_token_ids` in each
//! choice) are vLLM's extensions; `/update_weights_from_disk {"model_path"}` with
//! `{"success", "message"}` and `/get_weight_version` are SGLang's. `logprobs` are those of
//! the sampled tokens under the distribution they were drawn from, softmax(logits / T) (vLLM's
//! `processed_logprobs`), which is what t1's RL recomputes.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::{json, Value};
use t1_backends::BackendTask;
use t1_data::{ChatTokenizer, Message};
use t1_model::{FusedAutodiff, FusedOps, Qwen2, Qwen2Config, WeightDtype};
use t1_train::SamplingConfig;

/// `t1 serve`'s settings.
pub struct Serve {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub host: String,
    pub port: u16,
    /// The name clients give as `model` (default: `--model` as written, as vLLM does).
    pub served_model_name: Option<String>,
    /// Threads the CPU engine splits each decoding step between.
    pub threads: usize,
    /// Most rows (prompts × n) decoded in one batch; a single request asking for more is a 400.
    pub max_batch_rows: usize,
    /// Seeds the streams of requests that give no `seed`.
    pub seed: u64,
    /// `--template-kwargs`: extra chat-template variables for every chat request
    pub template_kwargs: Option<String>,
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), param }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_server_error() => "internal_server_error",
            _ => "invalid_request_error",
        };
        let body = json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status.as_u16()}});
        (self.status, Json(body)).into_response()
    }
}

/// `prompt`: text, token ids, or a list of either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Declares a request body: the fields both endpoints share, then its own. Fields of OpenAI's
/// API that t1 does not implement are accepted at their neutral values only (an error
/// otherwise); any other field is an error (`deny_unknown_fields`, which serde cannot combine
/// with `flatten`, hence the macro).
macro_rules! body {
    ($name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $name {
            model: String,
            max_tokens: Option<usize>,
            temperature: Option<f32>,
            top_p: Option<f32>,
            /// vLLM's extension; 0 or -1 = off.
            top_k: Option<i64>,
            seed: Option<u64>,
            stop: Option<Stop>,
            n: Option<usize>,
            stream: Option<bool>,
            user: Option<String>,
            presence_penalty: Option<f32>,
            frequency_penalty: Option<f32>,
            logit_bias: Option<serde_json::Map<String, Value>>,
            /// vLLM's extension: the prompt's and the response's token ids in each choice.
            return_token_ids: Option<bool>,
            $($field: $ty),*
        }
        impl $name {
            fn common(&self) -> Common {
                Common {
                    max_tokens: self.max_tokens, temperature: self.temperature, top_p: self.top_p, top_k: self.top_k, seed: self.seed,
                    stop: self.stop.clone(), n: self.n, stream: self.stream, presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty, logit_bias: self.logit_bias.clone(), return_token_ids: self.return_token_ids,
                }
            }
        }
    };
}

/// The fields both endpoints share, as read.
#[derive(Debug)]
struct Common {
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<usize>,
    stream: Option<bool>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    return_token_ids: Option<bool>,
}

body!(CompletionBody { prompt: Prompt, logprobs: Option<u32>, echo: Option<bool>, best_of: Option<usize>, suffix: Option<String> });

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessage {
    role: String,
    content: Content,
    #[serde(default)]
    name: Option<String>,
}

body!(ChatBody { messages: Vec<ChatMessage>, max_completion_tokens: Option<usize>, logprobs: Option<bool>, top_logprobs: Option<u32> });

/// A request as the engine runs it: every prompt as ids, sampled `n` times.
#[derive(Debug)]
struct Request {
    chat: bool,
    prompts: PromptsIn,
    n: usize,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    seed: Option<u64>,
    stop: Vec<String>,
    logprobs: bool,
    echo: bool,
    return_token_ids: bool,
}

#[derive(Debug)]
enum PromptsIn {
    Texts(Vec<String>),
    Ids(Vec<Vec<u32>>),
    Chat(Vec<Message>),
}

/// Checks what the body asks for against what t1 implements; the endpoint-specific fields are
/// read by the callers.
fn common_request(c: Common, chat: bool, prompts: PromptsIn, max_tokens: Option<usize>) -> Result<Request, ApiError> {
    if c.stream == Some(true) {
        return Err(ApiError::bad("stream: streaming responses are not implemented; send stream: false (or leave it out)", Some("stream")));
    }
    for (name, v) in [("presence_penalty", c.presence_penalty), ("frequency_penalty", c.frequency_penalty)] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad(format!("{name}: penalties are not implemented; leave it out or send 0"), Some(if name == "presence_penalty" { "presence_penalty" } else { "frequency_penalty" })));
        }
    }
    if c.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::bad("logit_bias is not implemented; leave it out", Some("logit_bias")));
    }
    let n = c.n.unwrap_or(1);
    if n == 0 {
        return Err(ApiError::bad("n must be at least 1", Some("n")));
    }
    if max_tokens == Some(0) {
        return Err(ApiError::bad("max_tokens must be at least 1", Some("max_tokens")));
    }
    if let Some(t) = c.temperature {
        if !(t.is_finite() && (0.0..=2.0).contains(&t)) {
            return Err(ApiError::bad(format!("temperature must be in [0, 2], got {t}"), Some("temperature")));
        }
    }
    if let Some(p) = c.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::bad(format!("top_p must be in (0, 1], got {p}"), Some("top_p")));
        }
    }
    let top_k = match c.top_k {
        None => None,
        Some(k) if k <= 0 && k >= -1 => Some(0),
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => return Err(ApiError::bad(format!("top_k must be -1 or 0 (off) or positive, got {k}"), Some("top_k"))),
    };
    let stop = match c.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad("stop: a stop string must not be empty", Some("stop")));
    }
    Ok(Request {
        chat,
        prompts,
        n,
        max_tokens,
        temperature: c.temperature,
        top_p: c.top_p,
        top_k,
        seed: c.seed,
        stop,
        logprobs: false,
        echo: false,
        return_token_ids: c.return_token_ids.unwrap_or(false),
    })
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("the request body is not a valid request: {e}"), None))
}

fn completion_request(body: &[u8], served: &str) -> Result<Request, ApiError> {
    let b: CompletionBody = parse(body)?;
    check_model(&b.model, served)?;
    let _ = &b.user;
    let common = b.common();
    if b.best_of.is_some_and(|n| n != b.n.unwrap_or(1)) {
        return Err(ApiError::bad("best_of is not implemented; leave it out", Some("best_of")));
    }
    if b.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad("suffix is not implemented; leave it out", Some("suffix")));
    }
    let prompts = match b.prompt {
        Prompt::Text(t) => PromptsIn::Texts(vec![t]),
        Prompt::Texts(v) => PromptsIn::Texts(v),
        Prompt::Ids(ids) => PromptsIn::Ids(vec![ids]),
        Prompt::IdLists(v) => PromptsIn::Ids(v),
    };
    let empty = match &prompts {
        PromptsIn::Texts(v) => v.is_empty(),
        PromptsIn::Ids(v) => v.is_empty() || v.iter().any(Vec::is_empty),
        PromptsIn::Chat(_) => false,
    };
    if empty {
        return Err(ApiError::bad("prompt is empty: give text, token ids, or a non-empty list of either", Some("prompt")));
    }
    let logprobs = match b.logprobs {
        None => false,
        Some(0) => true,
        Some(n) => {
            return Err(ApiError::bad(
                format!("logprobs: {n} alternatives per token are not implemented; logprobs: 0 returns the log-probabilities of the sampled tokens"),
                Some("logprobs"),
            ))
        }
    };
    let echo = b.echo.unwrap_or(false);
    if echo && logprobs {
        return Err(ApiError::bad("echo with logprobs (the prompt's log-probabilities) is not implemented; use one of them", Some("echo")));
    }
    let max_tokens = Some(common.max_tokens.unwrap_or(16)); // OpenAI's default for completions
    let mut r = common_request(common, false, prompts, max_tokens)?;
    r.logprobs = logprobs;
    r.echo = echo;
    Ok(r)
}

fn chat_request(body: &[u8], served: &str) -> Result<Request, ApiError> {
    let b: ChatBody = parse(body)?;
    check_model(&b.model, served)?;
    let _ = &b.user;
    if b.messages.is_empty() {
        return Err(ApiError::bad("messages is empty", Some("messages")));
    }
    if b.top_logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::bad("top_logprobs: alternatives per token are not implemented; logprobs: true returns the sampled tokens'", Some("top_logprobs")));
    }
    let mut messages = vec![];
    let common = b.common();
    for m in b.messages {
        let _ = m.name;
        let content = match m.content {
            Content::Text(t) => t,
            Content::Parts(parts) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => return Err(ApiError::bad(format!("messages: content parts of type {kind:?} are not supported (text only)"), Some("messages"))),
                    }
                }
                text
            }
        };
        messages.push(Message { role: m.role, content });
    }
    let max_tokens = b.max_completion_tokens.or(common.max_tokens);
    let mut r = common_request(common, true, PromptsIn::Chat(messages), max_tokens)?;
    r.logprobs = b.logprobs.unwrap_or(false);
    Ok(r)
}

fn check_model(asked: &str, served: &str) -> Result<(), ApiError> {
    if asked != served {
        return Err(ApiError { status: StatusCode::NOT_FOUND, message: format!("The model `{asked}` does not exist: this server serves `{served}`"), param: Some("model") });
    }
    Ok(())
}

type Reply = Result<Value, ApiError>;

enum Job {
    Generate(Request, tokio::sync::oneshot::Sender<Reply>),
    /// SGLang's `/update_weights_from_disk`: the checkpoint, and the version to report.
    Reload(PathBuf, Option<String>, tokio::sync::oneshot::Sender<Reply>),
}

struct AppState {
    jobs: Mutex<mpsc::Sender<Job>>,
    served: String,
    max_model_len: usize,
    version: Arc<Mutex<String>>,
    created: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn submit(state: &AppState, job: impl FnOnce(tokio::sync::oneshot::Sender<Reply>) -> Job) -> Response {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sent = state.jobs.lock().map(|s| s.send(job(tx)).is_ok()).unwrap_or(false);
    if !sent {
        return ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: "the engine has stopped".into(), param: None }.into_response();
    }
    match rx.await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(_) => ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: "the engine dropped the request".into(), param: None }.into_response(),
    }
}

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match completion_request(&body, &state.served) {
        Ok(r) => submit(&state, |tx| Job::Generate(r, tx)).await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match chat_request(&body, &state.served) {
        Ok(r) => submit(&state, |tx| Job::Generate(r, tx)).await,
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    model_path: PathBuf,
    load_format: Option<String>,
    weight_version: Option<String>,
    /// SGLang's flags; t1 finishes in-flight requests on the old weights either way.
    abort_all_requests: Option<bool>,
    flush_cache: Option<bool>,
}

async fn update_weights(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let b: UpdateBody = match parse(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let _ = (b.abort_all_requests, b.flush_cache);
    if b.load_format.as_deref().is_some_and(|f| f != "auto" && f != "safetensors") {
        return ApiError::bad("load_format: t1 loads safetensors checkpoints (auto)", Some("load_format")).into_response();
    }
    submit(&state, |tx| Job::Reload(b.model_path, b.weight_version, tx)).await
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let version = state.version.lock().map(|v| v.clone()).unwrap_or_default();
    Json(json!({"object": "list", "data": [{
        "id": state.served, "object": "model", "created": state.created, "owned_by": "t1",
        "root": state.served, "max_model_len": state.max_model_len, "weight_version": version,
    }]}))
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    let version = state.version.lock().map(|v| v.clone()).unwrap_or_default();
    Json(json!({"status": "ok", "weight_version": version}))
}

async fn weight_version(State(state): State<Arc<AppState>>) -> Json<Value> {
    let version = state.version.lock().map(|v| v.clone()).unwrap_or_default();
    Json(json!({"weight_version": version}))
}

async fn not_found() -> Response {
    ApiError { status: StatusCode::NOT_FOUND, message: "no such route: see /v1/completions, /v1/chat/completions, /v1/models, /health, /update_weights_from_disk".into(), param: None }.into_response()
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("t1 serve: stopping (in-flight requests finish first)");
}

/// The model the engine decodes with, and what its responses need.
struct Engine<B: FusedOps> {
    config: Qwen2Config,
    model: Qwen2<B>,
    /// The CPU engine's packed copy of `model` (None off the host), made once per weights
    host: Option<t1_cpu::HostEngine>,
    tokenizer: ChatTokenizer,
    stop_ids: Vec<u32>,
    adapter: Option<PathBuf>,
    device: B::Device,
    defaults: (f32, f32, usize),
    threads: usize,
    max_batch_rows: usize,
    rng: ChaCha8Rng,
    served: String,
    version: Arc<Mutex<String>>,
    next_id: u64,
}

/// One request's rows in the batch, with what its response needs.
struct Planned {
    request: Request,
    prompts: Vec<Vec<u32>>,
    prompt_texts: Vec<String>,
    cfg: SamplingConfig,
    rng: ChaCha8Rng,
    reply: tokio::sync::oneshot::Sender<Reply>,
}

impl<B: FusedOps> Engine<B> {
    /// vLLM's defaults: generation_config.json's when the checkpoint has one, else temperature
    /// 1, top-p 1, no top-k.
    fn defaults(config: &Qwen2Config) -> (f32, f32, usize) {
        match &config.generation {
            Some(g) => g.sampling_defaults(),
            None => (1.0, 1.0, 0),
        }
    }

    fn plan(&mut self, request: Request, reply: tokio::sync::oneshot::Sender<Reply>) -> Option<Planned> {
        let encoded: Result<(Vec<Vec<u32>>, Vec<String>), ApiError> = (|| match &request.prompts {
            PromptsIn::Texts(texts) => Ok((texts.iter().map(|t| self.tokenizer.encode(t)).collect(), texts.clone())),
            PromptsIn::Ids(ids) => {
                if let Some(bad) = ids.iter().flatten().find(|&&i| i as usize >= self.config.vocab_size) {
                    return Err(ApiError::bad(format!("prompt: token id {bad} is outside the vocabulary (0..{})", self.config.vocab_size), Some("prompt")));
                }
                Ok((ids.clone(), ids.iter().map(|p| self.tokenizer.decode(p)).collect()))
            }
            PromptsIn::Chat(messages) => {
                let ids = self.tokenizer.chat_ids(messages, true).map_err(|e| ApiError::bad(format!("messages: the chat template refused them: {e}"), Some("messages")))?;
                let text = self.tokenizer.decode(&ids);
                Ok((vec![ids], vec![text]))
            }
        })();
        let (prompts, prompt_texts) = match encoded {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(e));
                return None;
            }
        };
        let rows = prompts.len().checked_mul(request.n);
        if rows.is_none_or(|r| r > self.max_batch_rows) {
            let _ = reply.send(Err(ApiError::bad(
                format!("{} prompts × n = {} asks for more rows than this server decodes at once (--max-batch-rows {}): send fewer prompts or a smaller n", prompts.len(), request.n, self.max_batch_rows),
                Some("n"),
            )));
            return None;
        }
        let context = self.config.max_position_embeddings;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if prompts.iter().any(Vec::is_empty) {
            let _ = reply.send(Err(ApiError::bad("prompt: a prompt encodes to no tokens", Some("prompt"))));
            return None;
        }
        // chat without max_tokens: what the context leaves, as vLLM does
        let max_tokens = request.max_tokens.unwrap_or(context.saturating_sub(longest));
        if longest.checked_add(max_tokens).is_none_or(|total| total > context) || max_tokens == 0 {
            let _ = reply.send(Err(ApiError::bad(
                format!(
                    "This model's maximum context length is {context} tokens. However, you requested {} tokens ({longest} in the prompt, {max_tokens} for the completion). Please reduce the length of the prompt or max_tokens.",
                    longest.saturating_add(max_tokens)
                ),
                Some(if request.chat { "messages" } else { "prompt" }),
            )));
            return None;
        }
        let (t, p, k) = self.defaults;
        let cfg = SamplingConfig { temperature: request.temperature.unwrap_or(t), top_p: request.top_p.unwrap_or(p), top_k: request.top_k.unwrap_or(k), max_new_tokens: max_tokens };
        let rng = ChaCha8Rng::seed_from_u64(request.seed.unwrap_or_else(|| self.rng.random()));
        Some(Planned { request, prompts, prompt_texts, cfg, rng, reply })
    }

    /// Decodes the planned requests as one batch and replies to each.
    fn run(&mut self, mut batch: Vec<Planned>) {
        if batch.is_empty() {
            return;
        }
        let (mut prompts, mut cfgs, mut ranges) = (vec![], vec![], vec![]);
        for p in &batch {
            let start = prompts.len();
            for ids in &p.prompts {
                for _ in 0..p.request.n {
                    prompts.push(ids.clone());
                    cfgs.push(p.cfg.clone());
                }
            }
            ranges.push(start..prompts.len());
        }
        let mut streams: Vec<_> = ranges.iter().cloned().zip(batch.iter_mut().map(|p| &mut p.rng)).collect();
        let outs = t1_train::generate_rows(&self.model, self.host.clone(), &prompts, &cfgs, &self.stop_ids, self.tokenizer.pad_id(), &mut streams, self.threads);
        drop(streams);
        for (p, range) in batch.into_iter().zip(ranges) {
            let response = self.respond(&p, &outs[range]);
            let _ = p.reply.send(Ok(response));
        }
    }

    fn respond(&mut self, p: &Planned, outs: &[t1_train::Rollout]) -> Value {
        let r = &p.request;
        self.next_id += 1;
        let (mut choices, mut completion_tokens) = (vec![], 0usize);
        for (i, out) in outs.iter().enumerate() {
            let prompt_index = i / r.n;
            let (mut tokens, mut logprobs) = (out.tokens.clone(), out.logprobs.clone());
            let mut finish = if out.truncated { "length" } else { "stop" };
            let mut text = self.tokenizer.decode(&tokens);
            if let Some(cut) = first_stop(&text, &r.stop) {
                // the shortest prefix of tokens whose text reaches the stop string (holding a stop
                // is monotone in the prefix length: bisect)
                let (mut lo, mut hi) = (1, tokens.len());
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    if first_stop(&self.tokenizer.decode(&tokens[..mid]), &r.stop).is_some() {
                        hi = mid;
                    } else {
                        lo = mid + 1;
                    }
                }
                let k = hi;
                tokens.truncate(k);
                logprobs.truncate(k);
                text.truncate(cut);
                finish = "stop";
            }
            completion_tokens += tokens.len();
            let token_texts: Vec<String> = tokens.iter().map(|&t| self.tokenizer.decode(&[t])).collect();
            let mut choice = if r.chat {
                let lp = r.logprobs.then(|| {
                    let content: Vec<Value> = token_texts
                        .iter()
                        .zip(&logprobs)
                        .map(|(t, lp)| json!({"token": t, "logprob": lp, "bytes": t.as_bytes(), "top_logprobs": []}))
                        .collect();
                    json!({"content": content})
                });
                json!({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": finish})
            } else {
                let prefix = if r.echo { p.prompt_texts[prompt_index].clone() } else { String::new() };
                let lp = r.logprobs.then(|| {
                    // in characters, as OpenAI and vLLM count them
                    let mut offset = prefix.chars().count();
                    let offsets: Vec<usize> = token_texts
                        .iter()
                        .map(|t| {
                            let o = offset;
                            offset += t.chars().count();
                            o
                        })
                        .collect();
                    json!({"tokens": token_texts, "token_logprobs": logprobs, "top_logprobs": null, "text_offset": offsets})
                });
                json!({"index": i, "text": format!("{prefix}{text}"), "logprobs": lp, "finish_reason": finish})
            };
            if r.return_token_ids {
                choice["token_ids"] = json!(tokens);
                choice["prompt_token_ids"] = json!(p.prompts[prompt_index]);
            }
            choices.push(choice);
        }
        let prompt_tokens: usize = p.prompts.iter().map(Vec::len).sum();
        let (object, prefix) = if r.chat { ("chat.completion", "chatcmpl") } else { ("text_completion", "cmpl") };
        json!({
            "id": format!("{prefix}-{}", self.next_id), "object": object, "created": unix_now(), "model": self.served,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
        })
    }

    /// Loads `dir` in place of the current weights (the same architecture and tokenizer).
    fn reload(&mut self, dir: &Path, version: Option<String>) -> Reply {
        let fail = |message: String| ApiError::bad(message, Some("model_path"));
        let (config, model, _) = crate::model_cmds::load_model::<B>(dir, self.adapter.as_deref(), WeightDtype::F32, &self.device).map_err(|e| fail(format!("{e:#}")))?;
        let same = config.vocab_size == self.config.vocab_size
            && config.hidden_size == self.config.hidden_size
            && config.num_hidden_layers == self.config.num_hidden_layers
            && config.num_attention_heads == self.config.num_attention_heads
            && config.num_key_value_heads == self.config.num_key_value_heads
            && config.intermediate_size == self.config.intermediate_size
            && config.max_position_embeddings == self.config.max_position_embeddings;
        if !same {
            return Err(fail(format!("{} is another architecture than the served model's: serve it with its own t1 serve", dir.display())));
        }
        self.host = t1_cpu::HostEngine::new(&model);
        self.model = model;
        self.stop_ids = t1_train::generate::stop_ids(&config, &self.tokenizer);
        self.defaults = Self::defaults(&config);
        self.config = config;
        let mut v = self.version.lock().map_err(|_| fail("the weight version lock is poisoned".into()))?;
        let next = version.unwrap_or_else(|| v.parse::<u64>().unwrap_or(0).saturating_add(1).to_string());
        *v = next;
        eprintln!("t1 serve: loaded {} (weight version {})", dir.display(), *v);
        Ok(json!({"success": true, "message": format!("loaded {}", dir.display()), "weight_version": *v, "num_paused_requests": 0}))
    }
}

/// The index of the first occurrence of any of `stops` in `text`.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

impl BackendTask for Serve {
    type Output = Result<()>;

    fn run<B: FusedAutodiff>(self, device: B::Device) -> Result<()> {
        let (config, model, tokenizer_path) = crate::model_cmds::load_model::<B::InnerBackend>(&self.model, self.adapter.as_deref(), WeightDtype::F32, &device)?;
        let tokenizer = crate::model_cmds::with_template_kwargs(ChatTokenizer::from_file(&tokenizer_path)?, self.template_kwargs.as_deref())?;
        tokenizer.check_model_vocab(config.vocab_size)?;
        let served = self.served_model_name.clone().unwrap_or_else(|| self.model.display().to_string());
        let version = Arc::new(Mutex::new("0".to_string()));
        let (tx, rx) = mpsc::channel::<Job>();
        let state = Arc::new(AppState { jobs: Mutex::new(tx), served: served.clone(), max_model_len: config.max_position_embeddings, version: version.clone(), created: unix_now() });
        let addr = format!("{}:{}", self.host, self.port);
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the HTTP runtime")?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(&addr)).with_context(|| format!("binding {addr}: is the port in use? give another with --port"))?;
        let local = listener.local_addr()?;
        let app = Router::new()
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/get_weight_version", get(weight_version))
            .route("/update_weights_from_disk", post(update_weights))
            .fallback(not_found)
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .with_state(state);
        let http = std::thread::spawn(move || {
            let served = runtime.block_on(async move { axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await });
            // the app, and with it the last job sender, is dropped here: the engine loop ends
            served
        });
        println!("t1 serve: listening on http://{local} (model `{served}`)");
        use std::io::Write;
        let _ = std::io::stdout().flush();

        let stop_ids = t1_train::generate::stop_ids(&config, &tokenizer);
        let defaults = Engine::<B::InnerBackend>::defaults(&config);
        let host = t1_cpu::HostEngine::new(&model);
        let mut engine = Engine { config, model, host, tokenizer, stop_ids, adapter: self.adapter.clone(), device, defaults, threads: self.threads.max(1), max_batch_rows: self.max_batch_rows, rng: ChaCha8Rng::seed_from_u64(self.seed), served, version, next_id: 0 };
        let job_rows = |j: &Job| -> usize {
            match j {
                Job::Generate(r, _) => r.n.saturating_mul(match &r.prompts {
                    PromptsIn::Texts(v) => v.len(),
                    PromptsIn::Ids(v) => v.len(),
                    PromptsIn::Chat(_) => 1,
                }),
                Job::Reload(..) => 0,
            }
        };
        // a job that would take the wave past max_batch_rows waits for the next one
        let mut held: Option<Job> = None;
        loop {
            let first = match held.take() {
                Some(job) => job,
                None => match rx.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            let mut rows = job_rows(&first);
            let mut waiting = vec![first];
            while rows < self.max_batch_rows {
                match rx.try_recv() {
                    Ok(job) => {
                        let more = job_rows(&job);
                        if rows.saturating_add(more) > self.max_batch_rows {
                            held = Some(job);
                            break;
                        }
                        rows += more;
                        waiting.push(job);
                    }
                    Err(_) => break,
                }
            }
            // in arrival order: requests before a reload decode on the old weights
            let mut batch = vec![];
            for job in waiting {
                match job {
                    Job::Generate(r, reply) => batch.extend(engine.plan(r, reply)),
                    Job::Reload(dir, v, reply) => {
                        engine.run(std::mem::take(&mut batch));
                        let _ = reply.send(engine.reload(&dir, v));
                    }
                }
            }
            engine.run(batch);
        }
        http.join().map_err(|_| anyhow::anyhow!("the HTTP thread panicked"))?.context("serving HTTP")?;
        eprintln!("t1 serve: stopped");
        Ok(())
    }
}
