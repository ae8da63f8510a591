//! Data for t1: the chat tokenizer (the checkpoint's own chat template and its loss mask), JSONL readers for SFT
//! examples and RL problems, right-padded SFT batches, and the laptop-scale task, a seeded
//! generator of arithmetic problems whose solutions are written in the T1 trial-and-error
//! style (attempt → check → detected mistake → retry → verify → `\boxed{answer}`).
//!
//! **Architecture invariant:** this crate knows no tensor library; batches are plain
//! row-major vectors.

#![warn(missing_docs)]

mod batch;
mod jsonl;
mod parquet;
mod task;
mod template;
mod tokenizer;

pub use batch::{pack, pad_batch, pad_packed, tokenize_sft, SftBatch, TokenizedExample};
pub use jsonl::{read_problems, read_problems_with, read_sft, read_sft_with, write_jsonl, Columns, Loaded, Message, OnBadLine, Problem, SftExample};
pub use task::{generate, problem, sft_example, splits, validation, Sample, Splits, TaskConfig};
pub use template::{ChatTemplate, Rendered, TemplateVars, BUILTIN_TEMPLATE};
pub use tokenizer::{train_bpe, ChatEncoding, ChatTokenizer, CHAT_TEMPLATE_FILE, ENDOFTEXT, IM_END, IM_START, TOKENIZER_CONFIG_FILE};

use std::path::{Path, PathBuf};

/// Errors of this crate; each names the file involved and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// One line of a JSONL file is malformed.
    #[error("{}:{line}: {message}; fix the line, or set data.skip_bad_lines = true in the run config to skip such lines", path.display())]
    BadLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        message: String,
    },
    /// One row of a JSON array or Parquet file is malformed.
    #[error("{}: row {row}: {message}; fix the row, or set data.skip_bad_lines = true in the run config to skip such rows", path.display())]
    BadRow {
        /// The file.
        path: PathBuf,
        /// 1-based row (0: the file as a whole).
        row: usize,
        /// What is wrong with the row.
        message: String,
    },
    /// A dataset file holds no usable item.
    #[error(
        "{}: no examples found (the file is empty, or every line was skipped as bad); \
         check the path and the file format",
        path.display()
    )]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// Writing an item as JSON failed.
    #[error("cannot write {} as JSON: {source}", path.display())]
    Json {
        /// The file being written.
        path: PathBuf,
        /// The serde error.
        source: serde_json::Error,
    },
    /// The `tokenizers` library reported an error (loading, saving, training).
    #[error("tokenizer error{}: {message}", context_suffix(.path))]
    Tokenizer {
        /// The tokenizer file, when one is involved.
        path: Option<PathBuf>,
        /// What went wrong.
        message: String,
    },
    /// The tokenizer lacks the EOS token its config names (or `<|im_end|>` when it names none).
    #[error(
        "tokenizer{} has no {token} token, which is where a chat response ends; name the tokenizer's \
         end-of-turn token as eos_token in its tokenizer_config.json (t1 assumes Qwen's <|im_end|> \
         when none is named)", context_suffix(.path)
    )]
    MissingSpecialToken {
        /// The missing token's text.
        token: String,
        /// The tokenizer file.
        path: Option<PathBuf>,
    },
    /// A chat template failed to compile or render.
    #[error("chat template of {origin}: {message}")]
    Template {
        /// The file (or built-in format) the template came from.
        origin: String,
        /// What went wrong.
        message: String,
    },
    /// The tokenizer can emit ids the model has no embedding for.
    #[error(
        "tokenizer has {tokenizer} ids but the model's vocab_size is {model}; use the tokenizer \
         the model was trained with, or build the model with vocab_size >= {tokenizer}"
    )]
    VocabMismatch {
        /// [`ChatTokenizer::vocab_size`].
        tokenizer: usize,
        /// The model's `vocab_size`.
        model: usize,
    },
    /// An invalid task configuration.
    #[error("invalid task config: {0}")]
    TaskConfig(String),
}

fn context_suffix(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" in {}", p.display()),
        None => String::new(),
    }
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }
}
