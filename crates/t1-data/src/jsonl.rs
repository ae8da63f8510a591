//! Datasets: SFT conversations and RL problems, as JSONL (one JSON object per line), a JSON
//! array of objects (`.json`), or Parquet (`.parquet`, as datasets on the Hub come), with the
//! columns named by [`Columns`] (verl's `data.prompt_key`).
//!
//! Accepted rows (default column names):
//! - SFT: `{"messages": [{"role": "user", "content": ".."}, {"role": "assistant", ..}]}`
//!   or `{"prompt": "..", "response": ".."}` (read as one user and one assistant turn);
//! - problems: `{"prompt": "..", "answer": ".."}`, `"problem"` may replace `"prompt"`, the
//!   answer may be a JSON number; other fields are ignored. A MATH-style row without an
//!   answer column takes the last `\boxed{}` of its `"solution"`.
//!
//! Blank lines are ignored. A malformed row is an error naming `file:line` (`file: row N` in
//! a JSON array or Parquet file), unless [`OnBadLine::Skip`] is given, in which case it is
//! counted in [`Loaded::skipped`].

use std::fs::File;
use std::io::{BufWriter, Write};
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

/// Which column of a row holds what; an empty name is the default in brackets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Columns {
    /// The question (`prompt`, else `problem`; for SFT, `prompt`).
    pub prompt_key: String,
    /// The reference answer (`answer`; without it, the last `\boxed{}` of `solution`).
    pub answer_key: String,
    /// An SFT conversation (`messages`).
    pub messages_key: String,
    /// The SFT answer to the prompt when a row has no conversation (`response`).
    pub response_key: String,
}

fn or<'a>(key: &'a str, default: &'a str) -> &'a str {
    if key.is_empty() {
        default
    } else {
        key
    }
}

/// Reads SFT conversations (`messages` form or `prompt`/`response` form, mixed freely).
pub fn read_sft(path: &Path, on_bad: OnBadLine) -> Result<Loaded<SftExample>, DataError> {
    read_sft_with(path, on_bad, &Columns::default())
}

/// [`read_sft`] with the columns named by `cols`.
pub fn read_sft_with(path: &Path, on_bad: OnBadLine, cols: &Columns) -> Result<Loaded<SftExample>, DataError> {
    read_rows(path, on_bad, |row| parse_sft(row, cols))
}

/// Reads problems with reference answers.
pub fn read_problems(path: &Path, on_bad: OnBadLine) -> Result<Loaded<Problem>, DataError> {
    read_problems_with(path, on_bad, &Columns::default())
}

/// [`read_problems`] with the columns named by `cols`.
pub fn read_problems_with(path: &Path, on_bad: OnBadLine, cols: &Columns) -> Result<Loaded<Problem>, DataError> {
    read_rows(path, on_bad, |row| parse_problem(row, cols))
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

/// The rows of a dataset file: `(row number, the row or what is wrong with it)`; row numbers
/// are lines in JSONL and 1-based indices in JSON arrays and Parquet.
fn rows(path: &Path) -> Result<(Vec<(usize, Result<Map<String, Value>, String>)>, bool), DataError> {
    let object = |v: Value| match v {
        Value::Object(obj) => Ok(obj),
        other => Err(format!("expected a JSON object, found {}", type_name(&other))),
    };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ext == "parquet" {
        let rows = crate::parquet::read_rows(path)?;
        return Ok((rows.into_iter().enumerate().map(|(i, r)| (i + 1, object(r))).collect(), false));
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let text = text.trim_start_matches('\u{feff}');
    if ext == "json" && text.trim_start().starts_with('[') {
        let list: Vec<Value> = serde_json::from_str(text).map_err(|e| DataError::BadRow {
            path: path.to_path_buf(),
            row: 0,
            message: format!("not a JSON array of objects: {e}"),
        })?;
        return Ok((list.into_iter().enumerate().map(|(i, r)| (i + 1, object(r))).collect(), false));
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let row = match serde_json::from_str::<Value>(line) {
            Ok(v) => object(v),
            Err(e) => Err(format!("invalid JSON: {e}")),
        };
        out.push((i + 1, row));
    }
    Ok((out, true))
}

fn read_rows<T>(path: &Path, on_bad: OnBadLine, parse: impl Fn(&Map<String, Value>) -> Result<T, String>) -> Result<Loaded<T>, DataError> {
    let (rows, lines_are_lines) = rows(path)?;
    let (mut items, mut lines) = (Vec::new(), Vec::new());
    let mut skipped = 0;
    for (n, row) in rows {
        match (row.and_then(|r| parse(&r)), on_bad) {
            (Ok(item), _) => {
                items.push(item);
                lines.push(n);
            }
            (Err(_), OnBadLine::Skip) => skipped += 1,
            (Err(message), OnBadLine::Error) if lines_are_lines => {
                return Err(DataError::BadLine { path: path.to_path_buf(), line: n, message })
            }
            (Err(message), OnBadLine::Error) => return Err(DataError::BadRow { path: path.to_path_buf(), row: n, message }),
        }
    }
    if items.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf() });
    }
    Ok(Loaded { items, lines, skipped })
}

fn parse_sft(obj: &Map<String, Value>, cols: &Columns) -> Result<SftExample, String> {
    let (messages_key, prompt_key, response_key) = (or(&cols.messages_key, "messages"), or(&cols.prompt_key, "prompt"), or(&cols.response_key, "response"));
    let messages = if let Some(list) = obj.get(messages_key) {
        let list = list
            .as_array()
            .ok_or_else(|| format!("field {messages_key:?} must be a list, found {}", type_name(list)))?;
        list.iter()
            .enumerate()
            .map(|(i, m)| parse_message(m).map_err(|e| format!("message {}: {e}", i + 1)))
            .collect::<Result<Vec<_>, _>>()?
    } else if obj.contains_key(prompt_key) || obj.contains_key(response_key) {
        vec![
            Message { role: "user".into(), content: string_field(obj, prompt_key)? },
            Message { role: "assistant".into(), content: string_field(obj, response_key)? },
        ]
    } else {
        return Err(format!("expected a {messages_key:?} list or {prompt_key:?} and {response_key:?} fields (set data.messages_key / prompt_key / response_key to this file's column names)"));
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

fn parse_problem(obj: &Map<String, Value>, cols: &Columns) -> Result<Problem, String> {
    let key = match cols.prompt_key.as_str() {
        "" if obj.contains_key("prompt") => "prompt",
        "" => "problem",
        k => k,
    };
    if !obj.contains_key(key) {
        return Err(if cols.prompt_key.is_empty() {
            "missing field \"prompt\" (or \"problem\"; set data.prompt_key to this file's question column)".into()
        } else {
            format!("missing field {key:?} (data.prompt_key)")
        });
    }
    let prompt = string_field(obj, key)?;
    let answer_key = or(&cols.answer_key, "answer");
    let answer = match obj.get(answer_key) {
        None if cols.answer_key.is_empty() && obj.contains_key("solution") => {
            let solution = string_field(obj, "solution")?;
            t1_reward::extract_boxed(&solution).ok_or("no \"answer\" field, and its \"solution\" has no \\boxed{} answer")?
        }
        None => return Err(format!("missing field {answer_key:?} (set data.answer_key to this file's answer column)")),
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(v) => {
            return Err(format!("field {answer_key:?} must be a string or a number, found {}", type_name(v)))
        }
    };
    if answer.is_empty() {
        return Err(format!("field {answer_key:?} is empty"));
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

#[cfg(test)]
mod dataset_tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/datasets").join(name)
    }

    #[test]
    fn math_style_parquet_takes_the_last_boxed_answer_and_names_a_bad_row() {
        let e = read_problems(&fixture("math.parquet"), OnBadLine::Error).unwrap_err().to_string();
        assert!(e.contains("math.parquet: row 4") && e.contains("no \\boxed{} answer"), "{e}");
        let got = read_problems(&fixture("math.parquet"), OnBadLine::Skip).unwrap();
        assert_eq!(got.skipped, 1);
        assert_eq!(got.lines, vec![1, 2, 3]);
        let answers: Vec<&str> = got.items.iter().map(|p| p.answer.as_str()).collect();
        assert_eq!(answers, ["3", "\\frac{3}{4}", "3"]);
        assert_eq!(got.items[1].prompt, "Simplify $\\frac{6}{8}$.");
    }

    #[test]
    fn parquet_columns_are_mapped_and_nested_messages_read() {
        let cols = Columns { messages_key: "conversation".into(), prompt_key: "question".into(), answer_key: "final".into(), ..Default::default() };
        let sft = read_sft_with(&fixture("chat.parquet"), OnBadLine::Error, &cols).unwrap();
        assert_eq!(sft.items[1].messages[1], Message { role: "user".into(), content: "计算 3 * 3".into() });
        assert_eq!(sft.items[1].messages[2].content, "\\boxed{9} 😀");
        let problems = read_problems_with(&fixture("chat.parquet"), OnBadLine::Error, &cols).unwrap();
        assert_eq!(problems.items[0], Problem { prompt: "Compute 2 + 2.".into(), answer: "4".into() });
        // without the mapping, the error says which setting names the columns
        let e = read_sft(&fixture("chat.parquet"), OnBadLine::Error).unwrap_err().to_string();
        assert!(e.contains("row 1") && e.contains("data.messages_key"), "{e}");
        let e = read_problems(&fixture("chat.parquet"), OnBadLine::Error).unwrap_err().to_string();
        assert!(e.contains("data.prompt_key"), "{e}");
    }

    #[test]
    fn json_arrays_and_mapped_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let array = dir.path().join("p.json");
        std::fs::write(&array, r#"[{"q": "1 + 1?", "a": 2}, {"q": "2 + 2?", "a": "4"}, 3]"#).unwrap();
        let cols = Columns { prompt_key: "q".into(), answer_key: "a".into(), ..Default::default() };
        let e = read_problems_with(&array, OnBadLine::Error, &cols).unwrap_err().to_string();
        assert!(e.contains("p.json: row 3") && e.contains("expected a JSON object"), "{e}");
        std::fs::write(&array, r#"[{"q": "1 + 1?", "a": 2}, {"q": "2 + 2?", "a": "4"}]"#).unwrap();
        let got = read_problems_with(&array, OnBadLine::Error, &cols).unwrap();
        assert_eq!(got.items[0], Problem { prompt: "1 + 1?".into(), answer: "2".into() });
        let lines = dir.path().join("s.jsonl");
        std::fs::write(&lines, "{\"instruction\": \"Say hi\", \"output\": \"hi\"}\n\n{\"instruction\": \"x\"}\n").unwrap();
        let cols = Columns { prompt_key: "instruction".into(), response_key: "output".into(), ..Default::default() };
        let e = read_sft_with(&lines, OnBadLine::Error, &cols).unwrap_err().to_string();
        assert!(e.contains("s.jsonl:3") && e.contains("\"output\""), "{e}");
        let got = read_sft_with(&lines, OnBadLine::Skip, &cols).unwrap();
        assert_eq!(got.items[0].messages[1], Message { role: "assistant".into(), content: "hi".into() });
        assert_eq!(got.skipped, 1);
    }
}
