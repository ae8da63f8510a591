//! Finding the final answer in a response, and grading it against the reference.

use crate::normalize::close_brace;
use crate::{answers_match, RewardError};
use regex::Regex;
use serde::{Deserialize, Serialize};

/// How answers are extracted and compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GraderConfig {
    /// Regex with one capture group, used when the response has no `\boxed{}`
    /// (e.g. `"answer is (.+)"`); the last match wins. Default `None`: boxed answers only.
    pub answer_pattern: Option<String>,
    /// Numeric tolerance (default 1e-6): `|a - b| <= rel_tol * max(1, |a|, |b|)`, i.e.
    /// relative, and absolute for values near 0. Two integral values must be equal exactly.
    pub rel_tol: f64,
}

impl Default for GraderConfig {
    fn default() -> Self {
        Self {
            answer_pattern: None,
            rel_tol: 1e-6,
        }
    }
}

impl GraderConfig {
    /// Checks that `answer_pattern` compiles with a capture group and `rel_tol` is sane.
    pub fn validate(&self) -> Result<(), RewardError> {
        if !(self.rel_tol.is_finite() && self.rel_tol >= 0.0) {
            return Err(RewardError::InvalidTolerance(self.rel_tol));
        }
        match &self.answer_pattern {
            Some(p) => compile_pattern(p).map(|_| ()),
            None => Ok(()),
        }
    }
}

fn compile_pattern(pattern: &str) -> Result<Regex, RewardError> {
    let re = Regex::new(pattern).map_err(|source| RewardError::InvalidPattern {
        pattern: pattern.into(),
        source,
    })?;
    if re.captures_len() < 2 {
        return Err(RewardError::PatternWithoutGroup {
            pattern: pattern.into(),
        });
    }
    Ok(re)
}

/// The verdict on one response: whether it is correct, and the answer it was judged on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grade {
    pub correct: bool,
    /// The extracted (not yet normalised) answer; `None` when the response has none.
    pub extracted: Option<String>,
}

/// Content of the LAST `\boxed{...}` or `\fbox{...}` (nested and escaped braces handled;
/// `\boxed 5` also accepted), trimmed. `None` if there is no box, the last one is unbalanced
/// (e.g. cut off by truncation), or it is empty.
pub fn extract_boxed(text: &str) -> Option<String> {
    let (start, cmd) = ["\\boxed", "\\fbox"]
        .into_iter()
        .filter_map(|cmd| text.rfind(cmd).map(|i| (i, cmd)))
        .max()?;
    let rest = &text[start + cmd.len()..];
    let body = if let Some(inner) = rest.trim_start().strip_prefix('{') {
        &inner[..close_brace(inner)?]
    } else if rest.starts_with(char::is_whitespace) {
        rest.trim_start()
            .split(|c: char| c.is_whitespace() || c == '$')
            .next()?
    } else {
        return None;
    };
    let body = body.trim();
    (!body.is_empty()).then(|| body.to_string())
}

/// The final answer of a response: [`extract_boxed`], else group 1 of the last match of
/// `cfg.answer_pattern`. An invalid pattern extracts nothing (call
/// [`GraderConfig::validate`] when loading the config to report it).
pub fn extract_answer(text: &str, cfg: &GraderConfig) -> Option<String> {
    if let Some(boxed) = extract_boxed(text) {
        return Some(boxed);
    }
    let re = compile_pattern(cfg.answer_pattern.as_deref()?).ok()?;
    let caps = re.captures_iter(text).last()?;
    let answer = caps.get(1)?.as_str().trim();
    (!answer.is_empty()).then(|| answer.to_string())
}

/// Grades a response against the reference answer `gold`. This is both the RL reward
/// (before penalties) and the evaluation metric. No extractable answer, or a gold answer
/// that normalises to nothing, is never correct.
pub fn grade(response: &str, gold: &str, cfg: &GraderConfig) -> Grade {
    let extracted = extract_answer(response, cfg);
    let correct = extracted
        .as_deref()
        .is_some_and(|pred| answers_match(pred, gold, cfg));
    Grade { correct, extracted }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(s: &str) -> Option<String> {
        extract_boxed(s)
    }

    #[test]
    fn boxed_extraction() {
        assert_eq!(boxed(r"so \boxed{12}."), Some("12".into()));
        assert_eq!(
            boxed(r"\boxed{\frac{1}{\sqrt{2}}}"),
            Some(r"\frac{1}{\sqrt{2}}".into())
        );
        assert_eq!(
            boxed(r"first \boxed{3}, then \boxed{4}"),
            Some("4".into()),
            "last box wins"
        );
        assert_eq!(boxed(r"\fbox{7} and not boxed"), Some("7".into()));
        assert_eq!(boxed(r"\boxed{\{1, 2\}}"), Some(r"\{1, 2\}".into()));
        assert_eq!(boxed(r"\boxed 5$"), Some("5".into()));
        assert_eq!(boxed(r"\boxed {x}"), Some("x".into()));
        assert_eq!(
            boxed(r"\boxed{3} then \boxed{\frac{1}{2}"),
            None,
            "unbalanced last box"
        );
        assert_eq!(boxed(r"\boxed{}"), None);
        assert_eq!(boxed(r"\boxed{  }"), None);
        assert_eq!(boxed("no answer here"), None);
    }

    #[test]
    fn pattern_fallback_and_validation() {
        let cfg = GraderConfig {
            answer_pattern: Some("answer is (.+)".into()),
            ..Default::default()
        };
        cfg.validate().unwrap();
        assert_eq!(
            extract_answer("the answer is 3.\nno, the answer is 5", &cfg),
            Some("5".into())
        );
        assert_eq!(
            extract_answer(r"answer is 3 \boxed{4}", &cfg),
            Some("4".into())
        );
        assert_eq!(
            extract_answer("answer is 3", &GraderConfig::default()),
            None
        );

        let bad = GraderConfig {
            answer_pattern: Some("answer is (".into()),
            ..Default::default()
        };
        let msg = bad.validate().unwrap_err().to_string();
        assert!(
            msg.contains("answer is (") && msg.contains("fix it"),
            "{msg}"
        );
        let no_group = GraderConfig {
            answer_pattern: Some("answer".into()),
            ..Default::default()
        };
        assert!(matches!(
            no_group.validate(),
            Err(RewardError::PatternWithoutGroup { .. })
        ));
        let tol = GraderConfig {
            rel_tol: f64::NAN,
            ..Default::default()
        };
        assert!(tol.validate().is_err());
    }

    #[test]
    fn config_is_strict_and_defaults() {
        let cfg: GraderConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, GraderConfig::default());
        assert!(serde_json::from_str::<GraderConfig>(r#"{"rel_tl": 1e-3}"#).is_err());
    }

    #[test]
    fn grade_reports_extraction() {
        let cfg = GraderConfig::default();
        let g = grade(r"wait, that is wrong... \boxed{12}", "12", &cfg);
        assert_eq!(
            g,
            Grade {
                correct: true,
                extracted: Some("12".into())
            }
        );
        let g = grade("I give up", "12", &cfg);
        assert_eq!(
            g,
            Grade {
                correct: false,
                extracted: None
            }
        );
        assert!(!grade(r"\boxed{}", "", &cfg).correct);
    }
}
