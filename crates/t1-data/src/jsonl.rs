//! JSONL datasets: SFT conversations and RL problems, one JSON object per line.
//!
//! Accepted lines:
//! - SFT: `{"messages": [{"role": "user", "content": ".."}, {"role": "assistant", ..}]}`
//!   or `{"prompt": "..", "response": ".."}` (read as one user and one assistant turn);
//! - problems: `{"prompt": "..", "answer": ".."}`, `"problem"` may replace `"prompt"`, the
//!   answer may be a JSON number; other fields are ignored.
//!
//! Blank lines are ignored. A malformed line is an error naming `file:line`, unless
//! [`OnBadLine::Skip`] is given, in which case it is counted in [`Loaded::skipped`].

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::DataError;

/// Roles a chat message may have.
const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

/// One SFT conversation; it has at least one assistant message. Written as
/// `{"messages": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SftExample {
    /// The turns in order.
    pub messages: Vec<Message>,
}

/// One RL / evaluation problem with its reference answer. Written as
/// `{"prompt": .., "answer": ..}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The question shown to the model (the user turn).
    pub prompt: String,
    /// The reference final answer, compared with the model's `\boxed{..}`.
    pub answer: String,
}

/// What to do with a malformed line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBadLine {
    /// Stop with [`DataError::BadLine`].
    Error,
    /// Skip the line and count it.
    Skip,
}

/// The items of a file and the number of bad lines skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<T> {
    /// Items in file order.
    pub items: Vec<T>,
    /// The 1-based line of each item.
    pub lines: Vec<usize>,
    /// Malformed lines skipped (always 0 with [`OnBadLine::Error`]).
    pub skipped: usize,
}

/// Reads SFT conversations (`messages` form or `prompt`/`response` form, mixed freely).
pub fn read_sft(path: &Path, on_bad: OnBadLine) -> Result<Loaded<SftExample>, DataError> {
    read_jsonl(path, on_bad, parse_sft)
}

/// Reads problems with reference answers.
pub fn read_problems(path: &Path, on_bad: OnBadLine) -> Result<Loaded<Problem>, DataError> {
    read_jsonl(path, on_bad, parse_problem)
}

/// Writes one JSON object per line, replacing the file.
pub fn write_jsonl<T: Serialize>(path: &Path, items: &[T]) -> Result<(), DataError> {
    let file = File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut w = BufWriter::new(file);
    for item in items {
        serde_json::to_writer(&mut w, item)
            .map_err(|source| DataError::Json { path: path.to_path_buf(), source })?;
        w.write_all(b"\n").map_err(|e| DataError::io(path, e))?;
    }
    w.flush().map_err(|e| DataError::io(path, e))
}

fn read_jsonl<T>(
    path: &Path,
    on_bad: OnBadLine,
    parse: fn(&Map<String, Value>) -> Result<T, String>,
) -> Result<Loaded<T>, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let (mut items, mut lines) = (Vec::new(), Vec::new());
    let mut skipped = 0;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| DataError::io(path, e))?;
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() {
            continue;
        }
        let parsed = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(obj)) => parse(&obj),
            Ok(other) => Err(format!("expected a JSON object, found {}", type_name(&other))),
            Err(e) => Err(format!("invalid JSON: {e}")),
        };
        match (parsed, on_bad) {
            (Ok(item), _) => {
                items.push(item);
                lines.push(i + 1);
            }
            (Err(_), OnBadLine::Skip) => skipped += 1,
            (Err(message), OnBadLine::Error) => {
                return Err(DataError::BadLine { path: path.to_path_buf(), line: i + 1, message })
            }
        }
    }
    if items.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf() });
    }
    Ok(Loaded { items, lines, skipped })
}

fn parse_sft(obj: &Map<String, Value>) -> Result<SftExample, String> {
    let messages = if let Some(list) = obj.get("messages") {
        let list = list
            .as_array()
            .ok_or_else(|| format!("field \"messages\" must be a list, found {}", type_name(list)))?;
        list.iter()
            .enumerate()
            .map(|(i, m)| parse_message(m).map_err(|e| format!("message {}: {e}", i + 1)))
            .collect::<Result<Vec<_>, _>>()?
    } else if obj.contains_key("prompt") || obj.contains_key("response") {
        vec![
            Message { role: "user".into(), content: string_field(obj, "prompt")? },
            Message { role: "assistant".into(), content: string_field(obj, "response")? },
        ]
    } else {
        return Err("expected a \"messages\" list or \"prompt\" and \"response\" fields".into());
    };
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err("no assistant message, so there is nothing to learn".into());
    }
    Ok(SftExample { messages })
}

fn parse_message(m: &Value) -> Result<Message, String> {
    let obj = m
        .as_object()
        .ok_or_else(|| format!("expected an object with \"role\" and \"content\", found {}", type_name(m)))?;
    let role = string_field(obj, "role")?;
    if !ROLES.contains(&role.as_str()) {
        return Err(format!("unknown role {role:?} (expected system, user or assistant)"));
    }
    Ok(Message { role, content: string_field(obj, "content")? })
}

fn parse_problem(obj: &Map<String, Value>) -> Result<Problem, String> {
    let key = if obj.contains_key("prompt") { "prompt" } else { "problem" };
    if !obj.contains_key(key) {
        return Err("missing field \"prompt\" (or \"problem\")".into());
    }
    let prompt = string_field(obj, key)?;
    let answer = match obj.get("answer") {
        None => return Err("missing field \"answer\"".into()),
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(v) => {
            return Err(format!("field \"answer\" must be a string or a number, found {}", type_name(v)))
        }
    };
    if answer.is_empty() {
        return Err("field \"answer\" is empty".into());
    }
    Ok(Problem { prompt, answer })
}

fn string_field(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match obj.get(key) {
        None => Err(format!("missing field {key:?}")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!("field {key:?} must be a string, found {}", type_name(v))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".jsonl").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn msg(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    #[test]
    fn sft_prompt_response_form() {
        let f = file_with("{\"prompt\": \"Compute 1 + 2.\", \"response\": \"\\\\boxed{3}\"}\n\n");
        let got = read_sft(f.path(), OnBadLine::Error).unwrap();
        assert_eq!(got.skipped, 0);
        assert_eq!(
            got.items,
            vec![SftExample {
                messages: vec![msg("user", "Compute 1 + 2."), msg("assistant", "\\boxed{3}")]
            }]
        );
    }

    #[test]
    fn sft_messages_form() {
        let f = file_with(
            r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u", "name": "x"}, {"role": "assistant", "content": "a"}], "id": 4}"#,
        );
        let got = read_sft(f.path(), OnBadLine::Error).unwrap();
        assert_eq!(got.items[0].messages, vec![msg("system", "s"), msg("user", "u"), msg("assistant", "a")]);
    }

    #[test]
    fn bad_line_error_names_file_line_problem_and_flag() {
        let f = file_with("{\"prompt\": \"p\", \"response\": \"r\"}\n\n{\"prompt\": \"p\"\n");
        let e = read_sft(f.path(), OnBadLine::Error).unwrap_err();
        assert!(matches!(e, DataError::BadLine { line: 3, .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&format!("{}:3:", f.path().display())), "{text}");
        assert!(text.contains("invalid JSON") && text.contains("data.skip_bad_lines"), "{text}");
    }

    #[test]
    fn sft_line_errors_say_what_is_wrong() {
        let cases = [
            (r#"{"messages": [{"role": "user", "content": "u"}]}"#, "no assistant message"),
            (r#"{"messages": [{"role": "bot", "content": "u"}]}"#, "unknown role \"bot\""),
            (r#"{"messages": [{"role": "assistant", "content": 3}]}"#, "\"content\" must be a string"),
            (r#"{"messages": "hi"}"#, "must be a list"),
            (r#"{"prompt": "p"}"#, "missing field \"response\""),
            (r#"{"text": "p"}"#, "expected a \"messages\" list"),
            ("[1, 2]", "expected a JSON object"),
        ];
        for (line, want) in cases {
            let f = file_with(line);
            let e = read_sft(f.path(), OnBadLine::Error).unwrap_err().to_string();
            assert!(e.contains(":1:") && e.contains(want), "{line} -> {e}");
        }
    }

    #[test]
    fn problems_accept_aliases_numbers_and_extra_fields() {
        let f = file_with(
            "{\"prompt\": \"Compute 2 - 5.\", \"answer\": \"-3\", \"level\": 2}\n\
             {\"problem\": \"Compute 2 * 5.\", \"answer\": 10}\n",
        );
        let got = read_problems(f.path(), OnBadLine::Error).unwrap();
        assert_eq!(
            got.items,
            vec![
                Problem { prompt: "Compute 2 - 5.".into(), answer: "-3".into() },
                Problem { prompt: "Compute 2 * 5.".into(), answer: "10".into() },
            ]
        );
        let f = file_with("{\"prompt\": \"p\", \"answer\": [1]}\n");
        let e = read_problems(f.path(), OnBadLine::Error).unwrap_err().to_string();
        assert!(e.contains("\"answer\" must be a string or a number"), "{e}");
    }

    #[test]
    fn skip_mode_counts_bad_lines() {
        let f = file_with(
            "{\"prompt\": \"a\", \"answer\": \"1\"}\nnot json\n{\"prompt\": \"b\"}\n  \n{\"problem\": \"c\", \"answer\": 2}\n",
        );
        let got = read_problems(f.path(), OnBadLine::Skip).unwrap();
        assert_eq!(got.skipped, 2);
        assert_eq!(got.items.len(), 2);
    }

    #[test]
    fn empty_file_is_an_error() {
        for text in ["", "\n  \n", "garbage\n"] {
            let f = file_with(text);
            let e = read_problems(f.path(), OnBadLine::Skip).unwrap_err();
            assert!(matches!(e, DataError::Empty { .. }), "{e:?}");
            assert!(e.to_string().contains("no examples found"), "{e}");
        }
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = read_sft(Path::new("/no/such/file.jsonl"), OnBadLine::Error).unwrap_err();
        assert!(e.to_string().contains("/no/such/file.jsonl"), "{e}");
    }

    #[test]
    fn write_then_read_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let sft = vec![SftExample { messages: vec![msg("user", "q\n\"x\""), msg("assistant", "a")] }];
        let p = dir.path().join("sft.jsonl");
        write_jsonl(&p, &sft).unwrap();
        assert_eq!(read_sft(&p, OnBadLine::Error).unwrap().items, sft);
        let probs = vec![Problem { prompt: "Compute 1 - 4.".into(), answer: "-3".into() }];
        let p = dir.path().join("rl.jsonl");
        write_jsonl(&p, &probs).unwrap();
        assert_eq!(read_problems(&p, OnBadLine::Error).unwrap().items, probs);
    }
}
