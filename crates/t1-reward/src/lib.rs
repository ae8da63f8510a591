//! Rule-based rewards for T1-style RL on problems with verifiable answers, as pure functions.
//!
//! **Architecture invariant: the RL reward and the eval metric are the same function.**
//! [`grade`] decides correctness for the trainer (through [`reward`]) and for the evaluator
//! (accuracy = mean of `grade(..).correct`), so a rise in training reward is a rise in
//! measured accuracy, never a quirk of a second grader.
//!
//! - [`grade`]: extract the final answer (the last `\boxed{}`, else a configured regex),
//!   [`normalize`] it and the reference, and compare them ([`answers_match`]) as strings,
//!   as numbers or simple LaTeX expressions, or element-wise as tuples, intervals and sets.
//! - [`penalties`] + [`reward`]: the T1 recipe's penalty. The 0/1 reward is replaced by
//!   [`PenaltyConfig::value`] (paper: −1) when a response is overlong (truncated without
//!   EOS), repetitive, or garbled.
//!
//! No I/O, no randomness, no tensors.

mod compare;
mod extract;
mod normalize;
mod penalty;

pub use compare::answers_match;
pub use extract::{extract_answer, extract_boxed, grade, Grade, GraderConfig};
pub use normalize::normalize;
pub use penalty::{
    is_garbled, is_repetitive, penalties, reward, GarbledRule, Penalties, PenaltyConfig,
    RepetitionRule,
};

/// Invalid grader settings; each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("answer_pattern `{pattern}` is not a valid regex; fix it (e.g. \"answer is (.+)\") or remove answer_pattern to grade \\boxed{{}} answers only")]
    InvalidPattern {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("answer_pattern `{pattern}` has no capture group; wrap the answer part in parentheses, e.g. \"answer is (.+)\"")]
    PatternWithoutGroup { pattern: String },
    #[error("rel_tol must be finite and >= 0, got {0}; use e.g. 1e-6")]
    InvalidTolerance(f64),
}
