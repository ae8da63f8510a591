//! The chat tokenizer: a `tokenizers::Tokenizer`, the checkpoint's own chat template
//! (`tokenizer_config.json`'s `chat_template` or `chat_template.jinja`, rendered as
//! transformers renders it) with the SFT loss mask it implies, and a small byte-level BPE
//! trainer for models trained from scratch.

use std::ops::Range;
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, Tokenizer};

use crate::template::{ChatTemplate, TemplateVars};
use crate::{DataError, Message};

/// End of a document; the padding token (Qwen2.5 id 151643).
pub const ENDOFTEXT: &str = "<|endoftext|>";
/// Opens a chat turn: `<|im_start|>{role}\n` (Qwen2.5 id 151644).
pub const IM_START: &str = "<|im_start|>";
/// Closes a chat turn; the end-of-sequence token of Qwen2.5 chat models (id 151645).
pub const IM_END: &str = "<|im_end|>";

/// The tokenizer's settings file next to `tokenizer.json`.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// A chat template in a file of its own (transformers ≥ 4.43 saves it so); it wins over
/// `tokenizer_config.json`'s `chat_template`.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// A tokenizer with its chat template.
///
/// [`Self::encode`] encodes plain text without special-token handling: a literal
/// `<|im_end|>` is encoded as ordinary text. A rendered chat ([`Self::encode_chat`]) is
/// tokenized as transformers' `apply_chat_template(tokenize=True)` does, with special-token
/// strings parsed as special tokens, so its ids equal transformers'.
#[derive(Clone)]
pub struct ChatTokenizer {
    tok: Tokenizer,
    chat: Tokenizer,
    vocab_size: usize,
    eos: u32,
    /// Where an assistant turn ends in the loss mask: the EOS and generation_config.json's
    /// `eos_token_id`s when one sits beside tokenizer.json (Gemma ends turns with
    /// `<end_of_turn>`, not its EOS).
    stops: Vec<u32>,
    pad: u32,
    template: ChatTemplate,
    vars: TemplateVars,
    /// `tokenizer_config.json` as read (None: t1's own tokenizer, or none on disk).
    config: Option<serde_json::Map<String, serde_json::Value>>,
    /// The template came from `chat_template.jinja`.
    template_file: bool,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("template", &self.template)
            .finish()
    }
}

/// A special token in `tokenizer_config.json`: a string, or an AddedToken dict with `content`.
fn special_token(config: &serde_json::Map<String, serde_json::Value>, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl ChatTokenizer {
    /// Loads a Hugging Face `tokenizer.json` with the `tokenizer_config.json` and
    /// `chat_template.jinja` beside it. A tokenizer without a template gets t1's built-in
    /// format ([`crate::BUILTIN_TEMPLATE`]) and a warning on stderr.
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        if !path.exists() {
            return Err(DataError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        let tok = Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer { path: Some(path.to_path_buf()), message: e.to_string() })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config = match std::fs::read_to_string(&config_path) {
            Ok(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(serde_json::Value::Object(m)) => Some(m),
                Ok(_) => return Err(DataError::Tokenizer { path: Some(config_path), message: "not a JSON object".into() }),
                Err(e) => return Err(DataError::Tokenizer { path: Some(config_path), message: format!("not valid JSON: {e}") }),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(DataError::io(&config_path, e)),
        };
        let jinja_path = dir.join(CHAT_TEMPLATE_FILE);
        let (template, template_file) = match std::fs::read_to_string(&jinja_path) {
            Ok(src) => (Some(ChatTemplate::new(&src, &jinja_path.display().to_string())?), true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, false),
            Err(e) => return Err(DataError::io(&jinja_path, e)),
        };
        let template = match (template, &config) {
            (Some(t), _) => Some(t),
            (None, Some(c)) => config_template(c, &config_path)?,
            (None, None) => None,
        };
        let template = template.unwrap_or_else(|| {
            eprintln!(
                "warning: {} has no chat_template (nor is there a {CHAT_TEMPLATE_FILE}); using t1's built-in \
                 Qwen2.5-style format without a default system prompt. If the model was trained on another \
                 format, add its template to tokenizer_config.json.",
                dir.display()
            );
            ChatTemplate::builtin()
        });
        Self::build(tok, template, config, template_file, Some(path))
    }

    /// Wraps a tokenizer with t1's built-in chat format; it must have `<|im_end|>`.
    pub fn from_tokenizer(tok: Tokenizer) -> Result<Self, DataError> {
        Self::build(tok, ChatTemplate::builtin(), None, false, None)
    }

    fn build(
        mut tok: Tokenizer,
        template: ChatTemplate,
        config: Option<serde_json::Map<String, serde_json::Value>>,
        template_file: bool,
        path: Option<&Path>,
    ) -> Result<Self, DataError> {
        let cfg = config.clone().unwrap_or_default();
        let eos_token = special_token(&cfg, "eos_token").unwrap_or_else(|| IM_END.to_string());
        let eos = tok.token_to_id(&eos_token).ok_or_else(|| DataError::MissingSpecialToken {
            token: eos_token.clone(),
            path: path.map(Path::to_path_buf),
        })?;
        let pad = special_token(&cfg, "pad_token")
            .and_then(|t| tok.token_to_id(&t))
            .or_else(|| tok.token_to_id(ENDOFTEXT))
            .unwrap_or(eos);
        let bos_token = special_token(&cfg, "bos_token").unwrap_or_default();
        // Ids may have gaps, so the embedding needs max id + 1 rows, not the token count.
        let max_id = tok.get_vocab(true).into_values().max().unwrap_or(0);
        let vocab_size = (max_id as usize + 1).max(tok.get_vocab_size(true));
        let mut chat = tok.clone();
        chat.set_encode_special_tokens(false);
        tok.set_encode_special_tokens(true);
        let vars = TemplateVars { bos_token, eos_token, extra: Default::default() };
        let mut stops = vec![eos];
        if let Some(dir) = path.and_then(Path::parent) {
            let generation = dir.join("generation_config.json");
            if let Ok(text) = std::fs::read_to_string(&generation) {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| DataError::Tokenizer { path: Some(generation.clone()), message: format!("not valid JSON: {e}") })?;
                let ids = match &v["eos_token_id"] {
                    serde_json::Value::Number(n) => n.as_u64().into_iter().collect(),
                    serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64()).collect(),
                    _ => Vec::new(),
                };
                stops.extend(ids.into_iter().map(|id| id as u32).filter(|id| *id != eos));
            }
        }
        Ok(Self { tok, chat, vocab_size, eos, stops, pad, template, vars, config, template_file })
    }

    /// Extra template variables (transformers' `apply_chat_template(**kwargs)`, verl's
    /// `data.apply_chat_template_kwargs`), e.g. `enable_thinking = false`.
    pub fn with_template_kwargs(mut self, extra: serde_json::Map<String, serde_json::Value>) -> Self {
        self.vars.extra = extra;
        self
    }

    /// The chat template in use.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`, with its
    /// `tokenizer_config.json` (holding the chat template) beside it, and
    /// `chat_template.jinja` when the template came from one.
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        self.tok
            .save(path, true)
            .map_err(|e| DataError::Tokenizer { path: Some(path.to_path_buf()), message: e.to_string() })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut config = self.config.clone().unwrap_or_else(|| {
            let mut m = serde_json::Map::new();
            m.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
            m.insert("eos_token".into(), self.vars.eos_token.clone().into());
            m.insert("pad_token".into(), self.tok.id_to_token(self.pad).unwrap_or_default().into());
            m.insert("bos_token".into(), serde_json::Value::Null);
            m.insert("add_bos_token".into(), false.into());
            m
        });
        if self.template_file {
            let jinja = dir.join(CHAT_TEMPLATE_FILE);
            std::fs::write(&jinja, self.template.source()).map_err(|e| DataError::io(&jinja, e))?;
        } else if !config.contains_key("chat_template") {
            config.insert("chat_template".into(), self.template.source().into());
        }
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let text = serde_json::to_string_pretty(&config).expect("a JSON map serialises");
        std::fs::write(&config_path, text).map_err(|e| DataError::io(&config_path, e))
    }

    /// Number of ids, added tokens included: the smallest model `vocab_size` that fits.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The tokenizer's `eos_token` (`<|im_end|>` when its config names none): where a chat
    /// response ends.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// The `pad_token`, else `<|endoftext|>` if the tokenizer has it, else [`Self::eos_id`].
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The wrapped `tokenizers` tokenizer (special-token strings in text stay text).
    pub fn inner(&self) -> &Tokenizer {
        &self.tok
    }

    /// Encodes plain text: no BOS/EOS is added and special-token strings in `text` are
    /// encoded as ordinary text.
    ///
    /// # Panics
    /// If the underlying tokenizer fails, which byte-level BPE tokenizers never do.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self.tok.encode_fast(text, false) {
            Ok(enc) => enc.get_ids().to_vec(),
            Err(e) => panic!("tokenizer failed to encode {text:?}: {e}"),
        }
    }

    /// Decodes ids to text, skipping special tokens; ids the tokenizer does not know are
    /// dropped and invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tok.decode(ids, true).unwrap_or_default()
    }

    /// Renders a conversation with the chat template, as
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=..)`.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, DataError> {
        Ok(self.template.render(messages, add_generation_prompt, &self.vars)?.text)
    }

    /// Encodes a conversation with the chat template: the ids are transformers'
    /// `apply_chat_template(messages, tokenize=True, add_generation_prompt=..)`.
    ///
    /// Returns `(ids, loss_mask)`, both of length T. The mask is true on the tokens an
    /// assistant turn generates: with `{% generation %}` blocks, the tokens they produce (as
    /// transformers' `return_assistant_tokens_mask`); otherwise, for each assistant message,
    /// the tokens after the rendering of the conversation before it with
    /// `add_generation_prompt` (the prompt the model sees when it answers; where the turn
    /// departs from that prompt, from there) up to and including the first EOS: what the model
    /// must generate, never a role header.
    pub fn encode_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<(Vec<u32>, Vec<bool>), DataError> {
        let enc = self.encode_chat_detailed(messages, add_generation_prompt)?;
        Ok((enc.ids, enc.loss_mask))
    }

    /// The ids of [`Self::encode_chat`] without the loss mask.
    pub fn chat_ids(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>, DataError> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        let enc = self.chat.encode_fast(text.as_str(), false).map_err(|e| DataError::Tokenizer { path: None, message: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`Self::encode_chat`] with the rendered text and each token's byte range in it.
    pub fn encode_chat_detailed(&self, messages: &[Message], add_generation_prompt: bool) -> Result<ChatEncoding, DataError> {
        let full = self.template.render(messages, add_generation_prompt, &self.vars)?;
        let enc = self
            .chat
            .encode(full.text.as_str(), false)
            .map_err(|e| DataError::Tokenizer { path: None, message: e.to_string() })?;
        let ids = enc.get_ids().to_vec();
        let offsets = enc.get_offsets().to_vec();
        let spans = if self.template.has_generation_blocks() {
            full.generation
        } else {
            self.assistant_spans(messages, &full.text, &ids, &offsets)?
        };
        let loss_mask = offsets.iter().map(|&(s, e)| spans.iter().any(|r| s < r.end && e > r.start)).collect();
        Ok(ChatEncoding { text: full.text, ids, loss_mask, offsets })
    }

    /// Byte ranges of the assistant turns of `text` (the whole rendering) found by rendering
    /// prefixes (TRL's approach for templates without generation blocks).
    fn assistant_spans(&self, messages: &[Message], text: &str, ids: &[u32], offsets: &[(usize, usize)]) -> Result<Vec<Range<usize>>, DataError> {
        let err = |message: String| DataError::Template { origin: self.template.origin().to_string(), message };
        let mut starts = Vec::new();
        for (i, m) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
            let prompt = self.template.render(&messages[..i], true, &self.vars)?.text;
            let before = self.template.render(&messages[..i], false, &self.vars)?.text;
            if prompt == before {
                return Err(err(format!(
                    "add_generation_prompt adds nothing before assistant message {i}, so its role header cannot be \
                     told from its content; use a template that writes the assistant header for add_generation_prompt, \
                     or mark the trained tokens with {{% generation %}}…{{% endgeneration %}}"
                )));
            }
            let mut start = prompt.bytes().zip(text.bytes()).take_while(|(a, b)| a == b).count();
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            if start < prompt.len() {
                // The turn departs from the generation prompt (Qwen3 with enable_thinking =
                // false prompts with an empty think block that earlier turns do not have): it is
                // trained from where it departs if the conversation before it is unchanged and
                // the message's content starts right there (so no role header is trained).
                let content = m.content.trim();
                if !text.starts_with(&before) || start < before.len() || content.is_empty() || !text[start..].starts_with(content) {
                    return Err(err(format!(
                        "the template renders the conversation before message {i} differently once message {i} \
                         follows, so the tokens of assistant message {i} cannot be found; mark them with \
                         {{% generation %}}…{{% endgeneration %}} in the template"
                    )));
                }
            }
            starts.push((i, start));
        }
        let mut spans = Vec::with_capacity(starts.len());
        for (k, &(i, start)) in starts.iter().enumerate() {
            // the turn ends at its first stop token, before the next assistant turn starts
            let bound = starts.get(k + 1).map_or(text.len(), |&(_, s)| s);
            let end = ids
                .iter()
                .zip(offsets)
                .find(|(id, (s, e))| *s >= start && *e <= bound && self.stops.contains(id))
                .map(|(_, (_, e))| *e);
            match end {
                Some(end) => spans.push(start..end),
                // the last turn of a rendering with no closing token (a template that leaves the
                // final turn open) is trained to the end
                None if k + 1 == starts.len() && !text[start..].contains(&self.vars.eos_token) => spans.push(start..text.len()),
                None => {
                    return Err(err(format!(
                        "assistant message {i} does not end with a stop token ({} or generation_config.json's \
                         eos_token_id) before the next assistant turn, so its end cannot be found; mark the trained \
                         tokens with {{% generation %}}…{{% endgeneration %}}, or name the end-of-turn token in \
                         generation_config.json's eos_token_id",
                        self.vars.eos_token
                    )))
                }
            }
        }
        Ok(spans)
    }

    /// A single user turn followed by the generation prompt, ready for sampling: the RL and
    /// evaluation prompt, from the same template as SFT.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>, DataError> {
        let user = Message { role: "user".into(), content: prompt.into() };
        self.chat_ids(&[user], true)
    }

    /// Errors when this tokenizer can emit ids at or above the model's `vocab_size`.
    /// (A larger model vocab is fine: Qwen2.5 pads its embedding beyond the tokenizer.)
    pub fn check_model_vocab(&self, model_vocab_size: usize) -> Result<(), DataError> {
        if self.vocab_size > model_vocab_size {
            return Err(DataError::VocabMismatch { tokenizer: self.vocab_size, model: model_vocab_size });
        }
        Ok(())
    }
}

/// A conversation through the chat template ([`ChatTokenizer::encode_chat_detailed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatEncoding {
    /// The rendered text.
    pub text: String,
    /// Token ids of `text`.
    pub ids: Vec<u32>,
    /// True on the tokens an assistant turn generates.
    pub loss_mask: Vec<bool>,
    /// Byte range of each token in `text`.
    pub offsets: Vec<(usize, usize)>,
}

impl ChatEncoding {
    /// `text` with each run of trained tokens between `open` and `close` (the check people
    /// run before a long SFT).
    pub fn marked(&self, open: &str, close: &str) -> String {
        let mut out = String::with_capacity(self.text.len() + 16);
        let mut at = 0;
        let mut t = 0;
        while t < self.ids.len() {
            if !self.loss_mask[t] {
                t += 1;
                continue;
            }
            let first = t;
            while t < self.ids.len() && self.loss_mask[t] {
                t += 1;
            }
            let start = floor_char(&self.text, self.offsets[first].0.max(at));
            let end = floor_char(&self.text, self.offsets[t - 1].1.max(start));
            out.push_str(&self.text[at..start]);
            out.push_str(open);
            out.push_str(&self.text[start..end]);
            out.push_str(close);
            at = end;
        }
        out.push_str(&self.text[at..]);
        out
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// `tokenizer_config.json`'s `chat_template`: a string, or transformers' list of named
/// templates (`[{"name": "default", "template": ..}, ..]`), of which "default" is used.
fn config_template(config: &serde_json::Map<String, serde_json::Value>, path: &PathBuf) -> Result<Option<ChatTemplate>, DataError> {
    let origin = path.display().to_string();
    let bad = |message: String| DataError::Template { origin: origin.clone(), message };
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(ChatTemplate::new(s, &origin)?)),
        Some(serde_json::Value::Array(list)) => {
            let named = list.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
            let src = named.and_then(|t| t.get("template")).and_then(|t| t.as_str()).ok_or_else(|| {
                bad("chat_template is a list of named templates without one named \"default\"; add one".into())
            })?;
            Ok(Some(ChatTemplate::new(src, &format!("{origin} (template \"default\")"))?))
        }
        Some(_) => Err(bad("chat_template must be a string or a list of {name, template}".into())),
    }
}

/// Trains a byte-level BPE tokenizer on `texts` with at most `vocab_size` ids.
///
/// Ids 0, 1, 2 are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`; then the 256 byte
/// symbols; then merges. Digits are split one per pre-token, so numbers are always
/// tokenised digit by digit. The result depends only on `texts` and `vocab_size`.
/// Needs `vocab_size >= 259`; merges seen fewer than twice are not learned, so the
/// vocabulary can come out smaller than asked on tiny corpora.
pub fn train_bpe(texts: &[String], vocab_size: usize) -> Result<ChatTokenizer, DataError> {
    let specials = [ENDOFTEXT, IM_START, IM_END];
    let min = specials.len() + 256;
    let err = |message: String| DataError::Tokenizer { path: None, message };
    if vocab_size < min {
        return Err(err(format!(
            "vocab_size {vocab_size} is too small for a byte-level BPE: use at least {min} \
             (3 special tokens + 256 bytes)"
        )));
    }
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]))));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(false, false, false))));
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials.iter().map(|s| AddedToken::from(*s, true)).collect())
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    tok.train(&mut trainer, texts.iter()).map_err(|e| err(e.to_string()))?;
    ChatTokenizer::from_tokenizer(tok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{generate, TaskConfig};

    fn msg(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    fn task_texts(n: usize) -> Vec<String> {
        generate(&TaskConfig::default(), 7, n).into_iter().flat_map(|s| [s.prompt, s.solution]).collect()
    }

    fn small_tokenizer() -> ChatTokenizer {
        train_bpe(&task_texts(300), 400).unwrap()
    }

    #[test]
    fn special_ids_and_vocab_size() {
        let tok = small_tokenizer();
        assert_eq!(tok.pad_id(), 0);
        assert_eq!(tok.eos_id(), 2);
        assert!(tok.vocab_size() > 259 && tok.vocab_size() <= 400, "{}", tok.vocab_size());
        assert!(tok.check_model_vocab(tok.vocab_size()).is_ok());
        let e = tok.check_model_vocab(100).unwrap_err().to_string();
        assert!(e.contains(&tok.vocab_size().to_string()) && e.contains("100"), "{e}");
    }

    #[test]
    fn chat_mask_covers_assistant_content_and_its_im_end_only() {
        let tok = small_tokenizer();
        let msgs = [
            msg("system", "Be brief."),
            msg("user", "Compute 1 + 2."),
            msg("assistant", "\\boxed{3}"),
            msg("user", "And 2 + 2?"),
            msg("assistant", "\\boxed{4}"),
        ];
        let (ids, mask) = tok.encode_chat(&msgs, false).unwrap();
        assert_eq!(ids.len(), mask.len());
        // The masked tokens are exactly the two assistant contents, each with <|im_end|>.
        let masked: Vec<u32> = ids.iter().zip(&mask).filter(|(_, m)| **m).map(|(i, _)| *i).collect();
        let mut want = tok.encode("\\boxed{3}");
        want.push(tok.eos_id());
        want.extend(tok.encode("\\boxed{4}"));
        want.push(tok.eos_id());
        assert_eq!(masked, want);
        // Every <|im_end|> closing a non-assistant turn is unmasked: 3 of the 5.
        let unmasked_ends = ids.iter().zip(&mask).filter(|(i, m)| **i == tok.eos_id() && !**m);
        assert_eq!(unmasked_ends.count(), 3);
        // The full text is the Qwen2.5 template.
        let text = tok.inner().decode(&ids, false).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompute 1 + 2.<|im_end|>\n\
             <|im_start|>assistant\n\\boxed{3}<|im_end|>\n<|im_start|>user\nAnd 2 + 2?<|im_end|>\n\
             <|im_start|>assistant\n\\boxed{4}<|im_end|>\n"
        );
    }

    #[test]
    fn prompt_ends_with_generation_header() {
        let tok = small_tokenizer();
        let ids = tok.encode_prompt("Compute 1 + 2.").unwrap();
        let text = tok.inner().decode(&ids, false).unwrap();
        assert_eq!(text, "<|im_start|>user\nCompute 1 + 2.<|im_end|>\n<|im_start|>assistant\n");
        let (_, mask) = tok.encode_chat(&[msg("user", "x")], true).unwrap();
        assert!(mask.iter().all(|m| !m));
    }

    #[test]
    fn special_token_text_in_content_is_plain_text() {
        let tok = small_tokenizer();
        let ids = tok.encode("a <|im_end|> b");
        assert!(!ids.contains(&tok.eos_id()));
        assert_eq!(tok.decode(&ids), "a <|im_end|> b");
    }

    #[test]
    fn bpe_roundtrip_on_task_texts_and_unicode() {
        let tok = small_tokenizer();
        for t in task_texts(200).iter().chain(&["héllo wörld ∑ 😀\n\ttab".to_string()]) {
            assert_eq!(&tok.decode(&tok.encode(t)), t);
        }
    }

    #[test]
    fn digits_are_tokenised_individually() {
        let tok = small_tokenizer();
        let ids = tok.encode("12345 + 678 = 7023");
        let pieces: Vec<String> = ids.iter().map(|i| tok.decode(&[*i])).collect();
        for p in &pieces {
            let digits = p.chars().filter(|c| c.is_ascii_digit()).count();
            assert!(digits <= 1, "token {p:?} holds several digits: {pieces:?}");
            if digits == 1 {
                assert_eq!(p.len(), 1, "digit token {p:?} merged with other text");
            }
        }
    }

    #[test]
    fn bpe_training_is_deterministic() {
        let texts = task_texts(300);
        let a = train_bpe(&texts, 400).unwrap();
        let b = train_bpe(&texts, 400).unwrap();
        assert_eq!(a.inner().to_string(false).unwrap(), b.inner().to_string(false).unwrap());
    }

    #[test]
    fn save_and_load_roundtrip() {
        let tok = small_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let back = ChatTokenizer::from_file(&path).unwrap();
        assert_eq!(back.vocab_size(), tok.vocab_size());
        assert_eq!(back.eos_id(), tok.eos_id());
        let text = "Compute 7 + 3 * 4 - 5. <|im_end|>";
        assert_eq!(back.encode(text), tok.encode(text));
        // the built-in format is written into tokenizer_config.json, so the saved tokenizer
        // carries the template it was trained with
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(TOKENIZER_CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(config["chat_template"].as_str(), Some(crate::BUILTIN_TEMPLATE));
        assert_eq!(config["eos_token"].as_str(), Some(IM_END));
        assert!(back.template().origin().ends_with(TOKENIZER_CONFIG_FILE), "{}", back.template().origin());
        let msgs = [msg("user", "Compute 1 + 2."), msg("assistant", "\\boxed{3}")];
        assert_eq!(back.encode_chat(&msgs, false).unwrap(), tok.encode_chat(&msgs, false).unwrap());
    }

    /// The laptop task's ids and masks are what t1 produced before templates were rendered
    /// (each piece encoded on its own), so rendering the built-in template changes no data.
    #[test]
    fn builtin_template_encodes_task_data_as_the_piecewise_format() {
        let tok = small_tokenizer();
        for s in generate(&TaskConfig::default(), 11, 100) {
            let ex = crate::sft_example(&s);
            let (mut ids, mut mask) = (Vec::new(), Vec::new());
            for m in &ex.messages {
                let learn = m.role == "assistant";
                let mut push = |new: &[u32], on: bool| {
                    ids.extend_from_slice(new);
                    mask.extend(std::iter::repeat_n(on, new.len()));
                };
                push(&[1], false);
                push(&tok.encode(&format!("{}\n", m.role)), false);
                push(&tok.encode(&m.content), learn);
                push(&[tok.eos_id()], learn);
                push(&tok.encode("\n"), false);
            }
            assert_eq!(tok.encode_chat(&ex.messages, false).unwrap(), (ids, mask));
        }
    }

    fn with_template(src: &str) -> ChatTokenizer {
        let tok = small_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        std::fs::write(dir.path().join(CHAT_TEMPLATE_FILE), src).unwrap();
        ChatTokenizer::from_file(&path).unwrap()
    }

    #[test]
    fn generation_blocks_give_the_mask() {
        // trains the assistant content but not its <|im_end|>, unlike the prefix rule
        let tok = with_template(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}",
        );
        assert!(tok.template().origin().ends_with(CHAT_TEMPLATE_FILE));
        let msgs = [msg("user", "Compute 1 + 2."), msg("assistant", "\\boxed{3}")];
        let (ids, mask) = tok.encode_chat(&msgs, false).unwrap();
        let masked: Vec<u32> = ids.iter().zip(&mask).filter(|(_, m)| **m).map(|(i, _)| *i).collect();
        assert_eq!(masked, tok.encode("\\boxed{3}"));
    }

    #[test]
    fn a_template_whose_prefix_changes_is_an_error_naming_the_message() {
        // the generation prompt differs from how the assistant turn is rendered
        let tok = with_template("{% for m in messages %}[{{ m.role }}]{{ m.content }}<|im_end|>{% endfor %}{% if add_generation_prompt %}[bot]{% endif %}");
        let e = tok.encode_chat(&[msg("user", "a"), msg("assistant", "b")], false).unwrap_err().to_string();
        assert!(e.contains("assistant message 1") && e.contains("{% generation %}"), "{e}");
    }

    #[test]
    fn a_turn_ends_at_a_stop_token_of_generation_config_or_is_an_error() {
        // assistant turns closed by <|endoftext|> (id 0), not by the EOS <|im_end|>
        let src = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let tok = small_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        std::fs::write(dir.path().join(CHAT_TEMPLATE_FILE), src).unwrap();
        let msgs = [msg("user", "1 + 2?"), msg("assistant", "3"), msg("user", "2 + 2?"), msg("assistant", "4")];
        let e = ChatTokenizer::from_file(&path).unwrap().encode_chat(&msgs, false).unwrap_err().to_string();
        assert!(e.contains("assistant message 1 does not end with a stop token"), "{e}");
        std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [2, 0]}"#).unwrap();
        let tok = ChatTokenizer::from_file(&path).unwrap();
        let (ids, mask) = tok.encode_chat(&msgs, false).unwrap();
        let masked: Vec<u32> = ids.iter().zip(&mask).filter(|(_, m)| **m).map(|(i, _)| *i).collect();
        let mut want = tok.encode("3");
        want.push(0);
        want.extend(tok.encode("4"));
        want.push(0);
        assert_eq!(masked, want);
        // a template that writes no assistant header for add_generation_prompt
        std::fs::write(dir.path().join(CHAT_TEMPLATE_FILE), "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}").unwrap();
        let e = ChatTokenizer::from_file(&path).unwrap().encode_chat(&msgs, false).unwrap_err().to_string();
        assert!(e.contains("add_generation_prompt adds nothing"), "{e}");
    }

    #[test]
    fn special_token_text_in_a_rendered_chat_is_parsed_as_transformers_does() {
        let tok = small_tokenizer();
        let (ids, _) = tok.encode_chat(&[msg("user", "a <|im_end|> b")], false).unwrap();
        assert_eq!(ids.iter().filter(|i| **i == tok.eos_id()).count(), 2);
    }

    #[test]
    fn tokenizer_without_chat_tokens_is_rejected() {
        let tok = Tokenizer::new(BPE::default());
        let e = ChatTokenizer::from_tokenizer(tok).unwrap_err().to_string();
        assert!(e.contains("<|im_end|>"), "{e}");
    }

    #[test]
    fn tiny_vocab_is_an_error() {
        let e = train_bpe(&task_texts(10), 100).unwrap_err().to_string();
        assert!(e.contains("at least 259"), "{e}");
    }
}
