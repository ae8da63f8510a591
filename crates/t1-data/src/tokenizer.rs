//! The chat tokenizer: a `tokenizers::Tokenizer` plus the ids of the Qwen2.5 chat special
//! tokens, the chat template with its loss mask, and a small byte-level BPE trainer for
//! models trained from scratch.

use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, Tokenizer};

use crate::{DataError, Message};

/// End of a document; the padding token (Qwen2.5 id 151643).
pub const ENDOFTEXT: &str = "<|endoftext|>";
/// Opens a chat turn: `<|im_start|>{role}\n` (Qwen2.5 id 151644).
pub const IM_START: &str = "<|im_start|>";
/// Closes a chat turn; the end-of-sequence token of Qwen2.5 chat models (id 151645).
pub const IM_END: &str = "<|im_end|>";

/// A tokenizer with the Qwen2.5 chat template.
///
/// Text is encoded without special-token handling: a literal `<|im_end|>` inside a message
/// is encoded as ordinary text, so user content can never forge a turn boundary. Special
/// tokens enter only through [`ChatTokenizer::encode_chat`].
#[derive(Clone)]
pub struct ChatTokenizer {
    tok: Tokenizer,
    vocab_size: usize,
    im_start: u32,
    im_end: u32,
    pad: u32,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("im_start", &self.im_start)
            .field("im_end", &self.im_end)
            .field("pad", &self.pad)
            .finish()
    }
}

impl ChatTokenizer {
    /// Loads a Hugging Face `tokenizer.json` (e.g. Qwen2.5's, or one saved by [`Self::save`]).
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        if !path.exists() {
            return Err(DataError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        let tok = Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer { path: Some(path.to_path_buf()), message: e.to_string() })?;
        Self::from_tokenizer(tok)
    }

    /// Wraps a tokenizer; it must have the `<|im_start|>` and `<|im_end|>` tokens.
    pub fn from_tokenizer(mut tok: Tokenizer) -> Result<Self, DataError> {
        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| DataError::MissingSpecialToken { token: t.to_string() })
        };
        let im_start = id(IM_START)?;
        let im_end = id(IM_END)?;
        let pad = tok.token_to_id(ENDOFTEXT).unwrap_or(im_end);
        // Ids may have gaps, so the embedding needs max id + 1 rows, not the token count.
        let max_id = tok.get_vocab(true).into_values().max().unwrap_or(0);
        let vocab_size = (max_id as usize + 1).max(tok.get_vocab_size(true));
        tok.set_encode_special_tokens(true);
        Ok(Self { tok, vocab_size, im_start, im_end, pad })
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        self.tok
            .save(path, true)
            .map_err(|e| DataError::Tokenizer { path: Some(path.to_path_buf()), message: e.to_string() })
    }

    /// Number of ids, added tokens included: the smallest model `vocab_size` that fits.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// `<|im_end|>`, where generation stops (Qwen2.5 chat EOS).
    pub fn eos_id(&self) -> u32 {
        self.im_end
    }

    /// `<|endoftext|>` if the tokenizer has it, else [`Self::eos_id`].
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// `<|im_start|>`.
    pub fn im_start_id(&self) -> u32 {
        self.im_start
    }

    /// The wrapped `tokenizers` tokenizer.
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

    /// Encodes a conversation in the Qwen2.5 chat format,
    /// `<|im_start|>{role}\n{content}<|im_end|>\n` per message, and with
    /// `add_generation_prompt` appends `<|im_start|>assistant\n`.
    ///
    /// Returns `(ids, loss_mask)`, both of length T; `loss_mask[t]` is true exactly on the
    /// content tokens of assistant messages and on their closing `<|im_end|>` (so the model
    /// learns to stop), never on role headers, the `\n` after `<|im_end|>` or other turns.
    /// Unlike Qwen2.5's Jinja template, no default system prompt is inserted.
    pub fn encode_chat(&self, messages: &[Message], add_generation_prompt: bool) -> (Vec<u32>, Vec<bool>) {
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        let mut push = |new: &[u32], on: bool| {
            ids.extend_from_slice(new);
            mask.extend(std::iter::repeat_n(on, new.len()));
        };
        for m in messages {
            let learn = m.role == "assistant";
            push(&[self.im_start], false);
            push(&self.encode(&format!("{}\n", m.role)), false);
            push(&self.encode(&m.content), learn);
            push(&[self.im_end], learn);
            push(&self.encode("\n"), false);
        }
        if add_generation_prompt {
            push(&[self.im_start], false);
            push(&self.encode("assistant\n"), false);
        }
        (ids, mask)
    }

    /// A single user turn followed by the generation prompt, ready for sampling. For a
    /// system prompt, call [`Self::encode_chat`] with a `system` message first.
    pub fn encode_prompt(&self, prompt: &str) -> Vec<u32> {
        let user = Message { role: "user".into(), content: prompt.into() };
        self.encode_chat(&[user], true).0
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
        assert_eq!(tok.im_start_id(), 1);
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
        let (ids, mask) = tok.encode_chat(&msgs, false);
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
        let ids = tok.encode_prompt("Compute 1 + 2.");
        let text = tok.inner().decode(&ids, false).unwrap();
        assert_eq!(text, "<|im_start|>user\nCompute 1 + 2.<|im_end|>\n<|im_start|>assistant\n");
        let (_, mask) = tok.encode_chat(&[msg("user", "x")], true);
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
    }

    #[test]
    fn tokenizer_without_chat_tokens_is_rejected() {
        let tok = Tokenizer::new(BPE::default());
        let e = ChatTokenizer::from_tokenizer(tok).unwrap_err().to_string();
        assert!(e.contains("<|im_start|>"), "{e}");
    }

    #[test]
    fn tiny_vocab_is_an_error() {
        let e = train_bpe(&task_texts(10), 100).unwrap_err().to_string();
        assert!(e.contains("at least 259"), "{e}");
    }
}
