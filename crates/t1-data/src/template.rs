//! Chat templates: a checkpoint's own Jinja `chat_template`, rendered the way transformers'
//! `apply_chat_template` renders it.
//!
//! transformers compiles templates in a sandboxed Jinja2 environment with `trim_blocks` and
//! `lstrip_blocks`, the `loopcontrols` extension, its own `tojson` filter
//! (`json.dumps(x, ensure_ascii=False, indent=..)`), and the globals `raise_exception` and
//! `strftime_now` (transformers `utils/chat_template_utils.py`, `_compile_jinja_template`). The
//! same environment is built here on minijinja, with minijinja-contrib's pycompat for the
//! Python string, dict and list methods templates call (`.strip()`, `.split()`, `.items()`).
//!
//! `{% generation %}…{% endgeneration %}` marks the assistant tokens a template wants trained
//! (transformers' `AssistantTracker`, `return_assistant_tokens_mask`). minijinja has no such
//! tag, so each one becomes an output marker with the same whitespace control; the markers are
//! cut out of the rendering and their byte offsets kept.

use std::ops::Range;

use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use crate::{DataError, Message};

/// The format t1 uses when a tokenizer has no template of its own: Qwen2.5's turns,
/// `<|im_start|>{role}\n{content}<|im_end|>\n`, without Qwen2.5's default system prompt.
/// t1 writes it into the `tokenizer_config.json` of the tokenizers it trains.
pub const BUILTIN_TEMPLATE: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

const GEN_OPEN: char = '\u{E000}';
const GEN_CLOSE: char = '\u{E001}';

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for errors (a file, or "t1's built-in format").
    origin: String,
    source: String,
    generation_blocks: bool,
}

impl Clone for ChatTemplate {
    fn clone(&self) -> Self {
        Self::new(&self.source, &self.origin).expect("a template that compiled once compiles again")
    }
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).field("generation_blocks", &self.generation_blocks).finish()
    }
}

/// One rendering: the text, and the byte ranges of `{% generation %}` blocks in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The rendered conversation.
    pub text: String,
    /// Byte ranges of `text` that `{% generation %}` blocks produced, in order.
    pub generation: Vec<Range<usize>>,
}

/// The variables a template sees besides `messages` and `add_generation_prompt`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TemplateVars {
    /// `bos_token` (the empty string when the tokenizer has none, as transformers passes it).
    pub bos_token: String,
    /// `eos_token`.
    pub eos_token: String,
    /// Extra variables (`apply_chat_template(**kwargs)`, e.g. `enable_thinking = false`).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names it in errors.
    pub fn new(source: &str, origin: &str) -> Result<Self, DataError> {
        let (rewritten, generation_blocks) = rewrite_generation_tags(source);
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error(origin, &e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", rewritten).map_err(|e| template_error(origin, &e))?;
        Ok(Self { env, origin: origin.to_string(), source: source.to_string(), generation_blocks })
    }

    /// The built-in format ([`BUILTIN_TEMPLATE`]).
    pub fn builtin() -> Self {
        Self::new(BUILTIN_TEMPLATE, "t1's built-in chat format").expect("the built-in template compiles")
    }

    /// The Jinja source, as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template marks its assistant tokens with `{% generation %}`.
    pub fn has_generation_blocks(&self) -> bool {
        self.generation_blocks
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders `messages` as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=..)` does, with `tools = None`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool, vars: &TemplateVars) -> Result<Rendered, DataError> {
        // messages go in as serialised structs, so their keys keep the order Python's dicts have
        let mut ctx: Vec<(String, Value)> = vars.extra.iter().map(|(k, v)| (k.clone(), Value::from(Serde(v)))).collect();
        ctx.push(("messages".into(), Value::from(Serde(messages))));
        ctx.push(("add_generation_prompt".into(), Value::from(add_generation_prompt)));
        ctx.push(("bos_token".into(), Value::from(vars.bos_token.clone())));
        ctx.push(("eos_token".into(), Value::from(vars.eos_token.clone())));
        ctx.push(("tools".into(), Value::from(())));
        ctx.push(("documents".into(), Value::from(())));
        let tmpl = self.env.get_template("chat").map_err(|e| template_error(&self.origin, &e))?;
        let ctx: std::collections::BTreeMap<String, Value> = ctx.into_iter().collect();
        let raw = tmpl.render(Value::from(ctx)).map_err(|e| template_error(&self.origin, &e))?;
        if !self.generation_blocks {
            if raw.contains([GEN_OPEN, GEN_CLOSE]) {
                return Err(bad_marker(&self.origin));
            }
            return Ok(Rendered { text: raw, generation: Vec::new() });
        }
        let mut text = String::with_capacity(raw.len());
        let mut generation = Vec::new();
        let mut open: Option<usize> = None;
        for c in raw.chars() {
            match (c, open) {
                (GEN_OPEN, None) => open = Some(text.len()),
                (GEN_CLOSE, Some(start)) => {
                    generation.push(start..text.len());
                    open = None;
                }
                (GEN_OPEN | GEN_CLOSE, _) => return Err(bad_marker(&self.origin)),
                _ => text.push(c),
            }
        }
        if open.is_some() {
            return Err(bad_marker(&self.origin));
        }
        Ok(Rendered { text, generation })
    }
}

fn bad_marker(origin: &str) -> DataError {
    DataError::Template {
        origin: origin.to_string(),
        message: "unbalanced {% generation %} blocks, or a message holding the private-use characters \
                  U+E000/U+E001 that mark them; remove those characters from the data"
            .into(),
    }
}

fn template_error(origin: &str, e: &Error) -> DataError {
    let mut message = e.to_string();
    if let Some(detail) = e.detail() {
        if !message.contains(detail) {
            message = format!("{message}: {detail}");
        }
    }
    if let Some(line) = e.line() {
        message = format!("{message} (template line {line})");
    }
    DataError::Template { origin: origin.to_string(), message }
}

/// Replaces `{% generation %}` / `{% endgeneration %}` by block tags that output the marker
/// characters, `{% if true %}{{ "\uE000" }}{% endif %}`, with the original tag's whitespace
/// control on the outer ends, so that `trim_blocks`, `lstrip_blocks`, `-` and `+` act as on
/// the original block tag. Comments, expressions and `{% raw %}` blocks are copied as they
/// are. Says whether any generation tag was found.
fn rewrite_generation_tags(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    // the next `{%`, `{{` or `{#`
    while let Some(at) = rest.find('{').filter(|_| !rest.is_empty()) {
        let (open, close) = match rest[at..].get(..2) {
            Some("{%") => ("{%", "%}"),
            Some("{{") => ("{{", "}}"),
            Some("{#") => ("{#", "#}"),
            _ => {
                out.push_str(&rest[..at + 1]);
                rest = &rest[at + 1..];
                continue;
            }
        };
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag[2..].find(close).map(|e| e + 2) else {
            out.push_str(tag);
            return (out, found);
        };
        rest = &tag[end + 2..];
        if open != "{%" {
            out.push_str(&tag[..end + 2]);
            continue;
        }
        let inner = &tag[2..end];
        let (left, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, right) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[body.len() - 1..]),
            None => (body, ""),
        };
        let marker = match body.trim() {
            "generation" => Some(GEN_OPEN),
            "endgeneration" => Some(GEN_CLOSE),
            "raw" => {
                // copied through its {% endraw %} untouched
                out.push_str(&tag[..end + 2]);
                let close_at = rest.find("endraw").and_then(|i| rest[i..].find("%}").map(|j| i + j + 2)).unwrap_or(rest.len());
                out.push_str(&rest[..close_at]);
                rest = &rest[close_at..];
                continue;
            }
            _ => None,
        };
        match marker {
            Some(m) => {
                found = true;
                out.push_str(&format!("{{%{left} if true %}}{{{{ \"\\u{:04X}\" }}}}{{% endif {right}%}}", m as u32));
            }
            None => out.push_str(&tag[..end + 2]),
        }
    }
    out.push_str(rest);
    (out, found)
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`: keys in insertion order, `", "` and `": "`
/// between items without indent, non-ASCII characters kept, nothing HTML-escaped.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (_, Some(s)) => Some(s.to_string()),
            _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an int or a string")),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let a = v.get_item_by_index(0)?;
            let b = v.get_item_by_index(1)?;
            (a.as_str().unwrap_or(",").to_string(), b.as_str().unwrap_or(": ").to_string())
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    let fmt = JsonFmt { indent, item_sep, key_sep, sort_keys: sort_keys.unwrap_or(false) };
    fmt.write(&value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonFmt {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonFmt {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, v: &Value, depth: usize, out: &mut String) -> Result<(), Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.as_i64().is_some() && !v.to_string().contains(['.', 'e', 'E']) {
                    out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone())?;
                    out.push_str(&python_float(f));
                }
            }
            ValueKind::String => json_string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container('[', ']', items.len(), depth, out, |i, out| self.write(&items[i], depth + 1, out))?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by(|a, b| a.to_string().cmp(&b.to_string()));
                }
                self.container('{', '}', keys.len(), depth, out, |i, out| {
                    json_string(&keys[i].to_string(), out);
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(&keys[i])?, depth + 1, out)
                })?;
            }
            _ => json_string(&v.to_string(), out),
        }
        Ok(())
    }

    fn container(
        &self,
        open: char,
        close: char,
        n: usize,
        depth: usize,
        out: &mut String,
        mut item: impl FnMut(usize, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if n == 0 {
            out.push(close);
            return Ok(());
        }
        for i in 0..n {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            self.newline(depth + 1, out);
            item(i, out)?;
        }
        self.newline(depth, out);
        out.push(close);
        Ok(())
    }
}

/// Python's `repr(float)` for the values JSON can hold.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let s = format!("{f:?}");
    if s.contains(['.', 'e', 'E']) {
        s
    } else {
        format!("{s}.0")
    }
}

fn json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, format!("the template raised: {message}")))
}

/// transformers' `strftime_now(format)`: the current UTC time formatted with the common
/// `strftime` directives (`%d %m %Y %y %b %B %a %A %H %M %S %j %%`).
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime(secs, &format).map(Value::from)
}

fn strftime(secs: i64, format: &str) -> Result<String, Error> {
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // civil_from_days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: the directive %{} is not supported", other.map(String::from).unwrap_or_default()),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    #[test]
    fn builtin_renders_qwen_turns() {
        let t = ChatTemplate::builtin();
        let r = t.render(&[msg("user", "hi"), msg("assistant", "yo")], true, &TemplateVars::default()).unwrap();
        assert_eq!(r.text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n");
        assert!(r.generation.is_empty());
    }

    #[test]
    fn generation_blocks_keep_whitespace_control_and_give_offsets() {
        let src = "{% for m in messages %}{{ m.role }}: {%- generation -%}  {{ m.content }}{% endgeneration %}|\n{% endfor %}";
        let t = ChatTemplate::new(src, "test").unwrap();
        assert!(t.has_generation_blocks());
        let r = t.render(&[msg("user", "a"), msg("assistant", "bc")], false, &TemplateVars::default()).unwrap();
        // trim_blocks drops the newline after a tag, not the one before `{% endfor %}`
        assert_eq!(r.text, "user:a|\nassistant:bc|\n");
        assert_eq!(r.generation, vec![5..6, 18..20]);
        let e = t.render(&[msg("user", "x\u{E000}")], false, &TemplateVars::default()).unwrap_err().to_string();
        assert!(e.contains("U+E000"), "{e}");
    }

    #[test]
    fn generation_tags_act_as_block_tags_and_comments_are_left_alone() {
        // lstrip_blocks removes the indentation before the tag, trim_blocks the newline after it
        let src = "{% for m in messages %}\n    {% generation %}\n{{ m.content }}{% endgeneration %}\n{% endfor %}{# {% generation %} #}{{ '{%' }}";
        let t = ChatTemplate::new(src, "test").unwrap();
        let r = t.render(&[msg("assistant", "ab")], false, &TemplateVars::default()).unwrap();
        assert_eq!(r.text, "ab{%");
        assert_eq!(r.generation, vec![0..2]);
        // a comment mentioning the tag is not a generation block
        assert!(!ChatTemplate::new("{# {% generation %} #}{{ messages[0].content }}", "t").unwrap().has_generation_blocks());
        // a malformed tag is a compile error, not a panic
        assert!(ChatTemplate::new("{%}", "t").is_err());
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let t = ChatTemplate::new("{{ messages[0] | tojson }}|{{ x | tojson }}|{{ x | tojson(indent=2) }}", "t").unwrap();
        let mut vars = TemplateVars::default();
        vars.extra.insert("x".into(), serde_json::json!({"b": [1, 2.5, "é<'\n"]}));
        let r = t.render(&[msg("user", "<é>")], false, &vars).unwrap();
        // a message's keys in Python's order (role, content), ", " and ": ", no HTML escaping,
        // non-ASCII kept
        assert_eq!(
            r.text,
            "{\"role\": \"user\", \"content\": \"<é>\"}|{\"b\": [1, 2.5, \"é<'\\n\"]}|{\n  \"b\": [\n    1,\n    2.5,\n    \"é<'\\n\"\n  ]\n}"
        );
    }

    #[test]
    fn raise_exception_is_an_error_naming_the_template() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "my/tokenizer_config.json").unwrap();
        let e = t.render(&[], false, &TemplateVars::default()).unwrap_err().to_string();
        assert!(e.contains("roles must alternate") && e.contains("my/tokenizer_config.json"), "{e}");
    }

    #[test]
    fn strftime_matches_known_dates() {
        // 2024-02-29 13:05:09 UTC was a Thursday, day 60 of the year
        assert_eq!(strftime(1_709_211_909, "%d %b %Y, %A %H:%M:%S %j %y %B %%").unwrap(), "29 Feb 2024, Thursday 13:05:09 060 24 February %");
        assert_eq!(strftime(0, "%Y-%m-%d %a").unwrap(), "1970-01-01 Thu");
        assert!(strftime(0, "%Q").is_err());
    }
}
