//! Canonical string form of an answer, applied to prediction and reference alike.

use regex::Regex;
use std::sync::LazyLock;

/// Canonical form of an answer. In order:
///
/// 1. math delimiters `$`, `\(..\)`, `\[..\]` and currency `\$` removed; `\dfrac`/`\tfrac` →
///    `\frac`; `\left`/`\right`/`\displaystyle` and spacing (`\!` `\,` `\;` `\:` `\quad` `~`)
///    removed; `\%` → `%` (the comparison reads `p%` as `p` or `p/100`); `{,}` → `,`;
///    Unicode `−` `π` `×` `·` → ASCII/LaTeX; `°` removed;
/// 2. a trailing unit `\text{ cm}` (also `\mbox`, `\mathrm`, optional `^2`) dropped when the
///    rest contains a digit; then `\text{X}`, `\textbf{X}`, `\mathrm{X}`, `\boxed{X}`... → `X`;
/// 3. whitespace removed (one space kept between a command name and a following letter,
///    so `\pi r` stays two tokens);
/// 4. degrees `^\circ` / `^{\circ}` and trailing periods removed;
/// 5. a leading assignment `x =`, `\theta =`, `a_1 =`, `x \in` removed when no `=` follows;
/// 6. single-token arguments braced: `\sqrt2` → `\sqrt{2}`, `\frac12` → `\frac{1}{2}`;
/// 7. thousands separators removed when the whole answer is one such number
///    (`1,234,567.5`, not `1,2` nor `(1,234)`); `(A)` → `A`.
pub fn normalize(answer: &str) -> String {
    let s = strip_delimiters(answer.trim());
    let s = replace_symbols(s);
    let s = drop_trailing_unit(&s);
    let s = unwrap_commands(&s);
    let s = collapse_whitespace(&s);
    let s = s.replace("^{\\circ}", "").replace("^\\circ", "");
    let s = strip_assignment(s.trim_end_matches('.'));
    let s = brace_single_args(s);
    let s = if THOUSANDS.is_match(&s) {
        s.replace(',', "")
    } else {
        s
    };
    match s.as_bytes() {
        [b'(', c, b')'] if c.is_ascii_uppercase() => (*c as char).to_string(),
        _ => s,
    }
}

static THOUSANDS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$").unwrap());
static TRAILING_UNIT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(.*\d.*?)\s*\\(?:text|mbox|mathrm)\{[\s~]*[a-zA-Z][a-zA-Z\s~]*\}(?:\^\{?\d\}?)?$")
        .unwrap()
});
static ASSIGNMENT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:\\[a-zA-Z]+ ?|[a-zA-Z])(?:_\{?[a-zA-Z0-9]+\}?)?(?:=|\\in\b)").unwrap()
});

fn strip_delimiters(s: &str) -> &str {
    for (open, close) in [("\\(", "\\)"), ("\\[", "\\]")] {
        if let Some(inner) = s.strip_prefix(open).and_then(|r| r.strip_suffix(close)) {
            return inner.trim();
        }
    }
    s
}

/// Plain substitutions, applied in order.
#[rustfmt::skip]
const SYMBOLS: [(&str, &str); 15] = [
    ("\\$", ""), ("$", ""), ("\\%", "%"), ("{,}", ","), ("\\!", ""), ("\\,", ""), ("\\;", ""),
    ("\\:", ""), ("\\ ", " "), ("~", " "), ("°", ""), ("−", "-"), ("π", "\\pi "),
    ("×", "\\times "), ("·", "\\cdot "),
];

/// Commands replaced where they are not the prefix of a longer command name.
#[rustfmt::skip]
const COMMANDS: [(&str, &str); 8] = [
    ("dfrac", "\\frac"), ("tfrac", "\\frac"), ("left", ""), ("right", ""), ("displaystyle", ""),
    ("quad", " "), ("qquad", " "), ("degree", ""),
];

fn replace_symbols(s: &str) -> String {
    let mut s = s.to_string();
    for (from, to) in SYMBOLS {
        s = s.replace(from, to);
    }
    for (name, to) in COMMANDS {
        s = replace_command(&s, name, to);
    }
    s
}

/// Replaces the command `\name` (not a longer command such as `\leftarrow`) by `with`.
fn replace_command(s: &str, name: &str, with: &str) -> String {
    let pat = format!("\\{name}");
    let (mut out, mut rest) = (String::with_capacity(s.len()), s);
    while let Some(i) = rest.find(&pat) {
        let after = &rest[i + pat.len()..];
        out.push_str(&rest[..i]);
        let longer = after.starts_with(|c: char| c.is_ascii_alphabetic());
        out.push_str(if longer { &pat } else { with });
        rest = after;
    }
    out.push_str(rest);
    out
}

fn drop_trailing_unit(s: &str) -> String {
    match TRAILING_UNIT.captures(s) {
        Some(c) => c[1].to_string(),
        None => s.to_string(),
    }
}

/// `\text{X}` → `X` for text-like wrappers (unbalanced ones are left as they are).
fn unwrap_commands(s: &str) -> String {
    let mut s = s.to_string();
    for name in [
        "text", "textbf", "textrm", "mbox", "mathrm", "mathbf", "boxed", "fbox",
    ] {
        let pat = format!("\\{name}{{");
        while let Some(i) = s.find(&pat) {
            let j = i + pat.len();
            let Some(k) = close_brace(&s[j..]) else { break };
            s = format!("{}{}{}", &s[..i], &s[j..j + k], &s[j + k + 1..]);
        }
    }
    s
}

/// Byte index in `s` of the `}` closing a group opened just before `s`; `\{` `\}` skipped.
pub(crate) fn close_brace(s: &str) -> Option<usize> {
    let (b, mut depth, mut i) = (s.as_bytes(), 0usize, 0);
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'{' => depth += 1,
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

fn collapse_whitespace(s: &str) -> String {
    let (mut out, mut pending) = (String::with_capacity(s.len()), false);
    for c in s.chars() {
        if c.is_whitespace() {
            pending = true;
            continue;
        }
        if pending && c.is_ascii_alphabetic() && ends_with_command(&out) {
            out.push(' ');
        }
        pending = false;
        out.push(c);
    }
    out
}

fn ends_with_command(s: &str) -> bool {
    let t = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    t.len() < s.len() && t.ends_with('\\')
}

fn strip_assignment(s: &str) -> &str {
    match ASSIGNMENT.find(s) {
        Some(m) if m.end() < s.len() && !s[m.end()..].contains('=') => &s[m.end()..],
        _ => s,
    }
}

/// `\frac12` → `\frac{1}{2}`, `\sqrt 3` → `\sqrt{3}`, `\sqrt[3]8` → `\sqrt[3]{8}`.
fn brace_single_args(s: &str) -> String {
    let b = s.as_bytes();
    let mut edits: Vec<(usize, String)> = Vec::new(); // (byte position, replacement of that byte)
    for (cmd, nargs) in [("\\frac", 2), ("\\sqrt", 1)] {
        for (i, _) in s.match_indices(cmd) {
            let mut j = i + cmd.len();
            if b.get(j).is_some_and(u8::is_ascii_alphabetic) {
                continue;
            }
            if cmd == "\\sqrt" && b.get(j) == Some(&b'[') {
                let Some(k) = s[j..].find(']') else { continue };
                j += k + 1;
            }
            for _ in 0..nargs {
                if b.get(j) == Some(&b' ') {
                    edits.push((j, String::new()));
                    j += 1;
                }
                match b.get(j) {
                    Some(b'{') => match close_brace(&s[j + 1..]) {
                        Some(k) => j += k + 2,
                        None => break,
                    },
                    Some(&c) if c.is_ascii_alphanumeric() => {
                        edits.push((j, format!("{{{}}}", c as char)));
                        j += 1;
                    }
                    _ => break,
                }
            }
        }
    }
    edits.sort();
    edits.dedup_by_key(|e| e.0);
    let (mut out, mut last) = (String::with_capacity(s.len() + 2 * edits.len()), 0);
    for (pos, with) in edits {
        out.push_str(&s[last..pos]);
        out.push_str(&with);
        last = pos + 1;
    }
    out.push_str(&s[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn each_rule() {
        let cases = [
            (" 12 ", "12"),
            ("$\\frac{1}{2}$", "\\frac{1}{2}"),
            ("\\(x+1\\)", "x+1"),
            ("\\dfrac{3}{4}", "\\frac{3}{4}"),
            ("\\tfrac12", "\\frac{1}{2}"),
            ("\\left( 1, 2 \\right)", "(1,2)"),
            ("\\leftarrow", "\\leftarrow"),
            ("1\\!000", "1000"),
            ("3\\,\\text{cm}", "3"),
            ("30^\\circ", "30"),
            ("30^{\\circ}", "30"),
            ("45°", "45"),
            ("50\\%", "50%"),
            ("7.", "7"),
            ("1,234", "1234"),
            ("1{,}234{,}567", "1234567"),
            ("1,2", "1,2"),
            ("(1,234)", "(1,234)"),
            ("5 \\text{ cm}", "5"),
            ("5\\text{ cm}^2", "5"),
            ("\\text{Monday}", "Monday"),
            ("x = 5", "5"),
            ("\\theta = \\frac{\\pi}{2}", "\\frac{\\pi}{2}"),
            ("x=1, y=2", "x=1,y=2"),
            ("x \\in [1, 2]", "[1,2]"),
            ("\\infty", "\\infty"),
            ("\\sqrt2", "\\sqrt{2}"),
            ("2 \\sqrt 3", "2\\sqrt{3}"),
            ("\\sqrt[3]8", "\\sqrt[3]{8}"),
            ("\\frac a b", "\\frac{a}{b}"),
            ("2\\pi r", "2\\pi r"),
            ("\\$1,000", "1000"),
            ("\\text{(B)}", "B"),
            ("\\boxed{4}", "4"),
            ("$.$", ""),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input), want, "normalize({input:?})");
        }
    }
}
