//! Deciding whether two answers are the same: strings, numbers, simple LaTeX expressions,
//! and lists (tuples, intervals, sets) element-wise.

use crate::{normalize, GraderConfig};

/// Nesting limit for lists in lists and for brackets in expressions (guards the stack).
const MAX_DEPTH: usize = 32;

/// Whether a predicted answer equals the reference `gold`. Both are [`normalize`]d, then
/// equal if the strings are equal, or
/// - both are lists (`(a,b)`, `[a,b)`, `\{a,b\}` or bare `a,b`) with the same brackets and
///   matching elements: in order for tuples/intervals, in any order for sets and bare lists;
/// - both evaluate to numbers (integers, decimals, `a/b`, `\frac`, `\sqrt`, `\sqrt[n]`, `\pi`,
///   `+ - * / ^ \cdot \times`, brackets, implicit products like `2\sqrt{3}`) that are equal
///   within `cfg.rel_tol` (integral values exactly). A trailing `%` makes `p%` equal to both
///   `p` and `p/100`, so `50\%` matches `50` and `0.5`.
///
/// A gold (or prediction) that normalises to the empty string never matches.
pub fn answers_match(pred: &str, gold: &str, cfg: &GraderConfig) -> bool {
    let (p, g) = (normalize(pred), normalize(gold));
    !p.is_empty() && !g.is_empty() && same(&p, &g, cfg.rel_tol, 0)
}

fn same(p: &str, g: &str, tol: f64, depth: usize) -> bool {
    if p == g {
        return true;
    }
    match (split_list(p), split_list(g)) {
        (None, None) => values_match(p, g, tol),
        (Some(a), Some(b)) if depth < MAX_DEPTH => lists_match(&a, &b, tol, depth + 1),
        _ => false,
    }
}

struct List<'a> {
    open: &'a str,
    close: &'a str,
    items: Vec<&'a str>,
}

/// A list of at least two top-level comma-separated items, with its brackets.
fn split_list(s: &str) -> Option<List<'_>> {
    let brackets = [
        ("\\{", "\\}"),
        ("(", ")"),
        ("[", "]"),
        ("(", "]"),
        ("[", ")"),
    ];
    let bracketed = brackets.into_iter().find_map(|(open, close)| {
        let inner = s.strip_prefix(open)?.strip_suffix(close)?;
        Some(List {
            open,
            close,
            items: split_top_level(inner)?,
        })
    });
    // `(1,2),(3,4)` is a bare list of pairs, not one pair of brackets
    let list = bracketed.or_else(|| {
        Some(List {
            open: "",
            close: "",
            items: split_top_level(s)?,
        })
    })?;
    (list.items.len() >= 2).then_some(list)
}

/// Splits at commas outside brackets; `None` if a bracket closes that was not opened here.
fn split_top_level(s: &str) -> Option<Vec<&str>> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.bytes().enumerate() {
        match c {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' if depth == 0 => return None,
            b')' | b']' | b'}' => depth -= 1,
            b',' if depth == 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&s[start..]);
    Some(items)
}

fn lists_match(a: &List, b: &List, tol: f64, depth: usize) -> bool {
    if a.open != b.open || a.close != b.close || a.items.len() != b.items.len() {
        return false;
    }
    let unordered = a.open.is_empty() || a.open == "\\{";
    if !unordered {
        return a
            .items
            .iter()
            .zip(&b.items)
            .all(|(x, y)| same(x, y, tol, depth));
    }
    let mut used = vec![false; b.items.len()];
    a.items.iter().all(|x| {
        let hit = (0..b.items.len()).find(|&j| !used[j] && same(x, b.items[j], tol, depth));
        hit.map(|j| used[j] = true).is_some()
    })
}

fn values_match(p: &str, g: &str, tol: f64) -> bool {
    let (Some((a, a_pct)), Some((b, b_pct))) = (value(p), value(g)) else {
        return false;
    };
    close(a, b, tol) || (a_pct && close(a / 100.0, b, tol)) || (b_pct && close(a, b / 100.0, tol))
}

/// The number an answer denotes, and whether it was written as a percentage.
fn value(s: &str) -> Option<(f64, bool)> {
    match s.strip_suffix('%') {
        Some(body) => eval(body).map(|v| (v, true)),
        None => eval(s).map(|v| (v, false)),
    }
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    let integral = |x: f64| x.fract() == 0.0 && x.abs() < 2f64.powi(53);
    if integral(a) && integral(b) {
        return a == b;
    }
    (a - b).abs() <= tol * a.abs().max(b.abs()).max(1.0)
}

/// Value of a simple arithmetic LaTeX expression, `None` if it is anything else
/// (variables, `\infty`, ...) or not finite. Note: `2\frac{1}{2}` is a product (1), not a
/// mixed number.
fn eval(s: &str) -> Option<f64> {
    let mut p = Parser {
        s: s.as_bytes(),
        pos: 0,
        depth: 0,
    };
    let v = p.expr()?;
    (p.pos == p.s.len() && v.is_finite()).then_some(v)
}

/// Recursive descent: expr = term (± term)*, term = unary ((*|/|implicit) unary)*,
/// unary = (±)* power, power = atom (^ group)?, group = {expr} | digit.
struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn starts_with(&self, lit: &str) -> bool {
        let rest = &self.s[self.pos..];
        let longer_command =
            lit.starts_with('\\') && rest.get(lit.len()).is_some_and(u8::is_ascii_alphabetic);
        rest.starts_with(lit.as_bytes()) && !longer_command
    }

    fn eat(&mut self, lit: &str) -> bool {
        let ok = self.starts_with(lit);
        if ok {
            self.pos += lit.len();
        }
        ok
    }

    fn expr(&mut self) -> Option<f64> {
        let mut v = self.term()?;
        loop {
            if self.eat("+") {
                v += self.term()?;
            } else if self.eat("-") {
                v -= self.term()?;
            } else {
                return Some(v);
            }
        }
    }

    fn term(&mut self) -> Option<f64> {
        let mut v = self.unary()?;
        loop {
            if self.eat("*") || self.eat("\\cdot") || self.eat("\\times") {
                v *= self.unary()?;
            } else if self.eat("/") || self.eat("\\div") {
                v /= self.unary()?;
            } else if self.starts_atom() {
                v *= self.power()?;
            } else {
                return Some(v);
            }
        }
    }

    fn unary(&mut self) -> Option<f64> {
        let mut sign = 1.0;
        loop {
            if self.eat("-") {
                sign = -sign;
            } else if !self.eat("+") {
                return Some(sign * self.power()?);
            }
        }
    }

    fn power(&mut self) -> Option<f64> {
        let base = self.atom()?;
        if !self.eat("^") {
            return Some(base);
        }
        Some(base.powf(self.group()?))
    }

    fn starts_atom(&self) -> bool {
        matches!(self.peek(), Some(b'0'..=b'9' | b'.' | b'(' | b'{'))
            || ["\\frac", "\\sqrt", "\\pi"]
                .iter()
                .any(|c| self.starts_with(c))
    }

    fn atom(&mut self) -> Option<f64> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return None;
        }
        let v = match self.peek()? {
            b'0'..=b'9' | b'.' => self.number(),
            b'(' => {
                self.pos += 1;
                let v = self.expr()?;
                self.eat(")").then_some(v)
            }
            b'{' => self.group(),
            _ if self.eat("\\frac") => Some(self.group()? / self.group()?),
            _ if self.eat("\\sqrt") => {
                let n = if self.eat("[") {
                    let n = self.expr()?;
                    self.eat("]").then_some(n)?
                } else {
                    2.0
                };
                Some(self.group()?.powf(1.0 / n))
            }
            _ if self.eat("\\pi") => Some(std::f64::consts::PI),
            _ => None,
        };
        self.depth -= 1;
        v
    }

    fn group(&mut self) -> Option<f64> {
        if self.eat("{") {
            let v = self.expr()?;
            return self.eat("}").then_some(v);
        }
        let d = self.peek().filter(u8::is_ascii_digit)?;
        self.pos += 1;
        Some(f64::from(d - b'0'))
    }

    fn number(&mut self) -> Option<f64> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit() || c == b'.') {
            self.pos += 1;
        }
        std::str::from_utf8(&self.s[start..self.pos])
            .ok()?
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grade;
    use proptest::prelude::*;

    fn m(pred: &str, gold: &str) -> bool {
        answers_match(pred, gold, &GraderConfig::default())
    }

    #[test]
    fn hand_checked_pairs() {
        let cases = [
            // exact after normalisation
            ("12", "12", true),
            ("3", "4", false),
            ("\\dfrac{1}{2}", "\\frac{1}{2}", true),
            ("\\left(1,2\\right)", "(1, 2)", true),
            ("x = 7", "7", true),
            ("\\text{Monday}", "Monday", true),
            ("(C)", "C", true),
            ("x^2+1", "x^2 + 1", true),
            ("x^2+1", "x^2+2", false),
            ("2\\pi r", "2\\pi r", true),
            ("2\\pir", "2\\pi r", false),
            // numbers
            ("5.0", "5", true),
            ("-3", "-3.00", true),
            ("-3", "3", false),
            ("0.5", ".5", true),
            ("1,234", "1234", true),
            ("1{,}234", "1234", true),
            ("1,2", "12", false),
            ("5 \\text{ cm}", "5", true),
            ("30^\\circ", "30", true),
            ("12345678", "12345679", false),
            // fractions and expressions
            ("\\frac{1}{2}", "0.5", true),
            ("1/2", "\\frac12", true),
            ("-\\frac{3}{4}", "\\frac{-3}{4}", true),
            ("0.3333333", "\\frac{1}{3}", true),
            ("0.33", "\\frac{1}{3}", false),
            ("\\sqrt{2}", "\\sqrt2", true),
            ("2\\sqrt{3}", "\\sqrt{12}", true),
            ("2\\sqrt{3}", "2\\sqrt{2}", false),
            ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", true),
            ("\\sqrt[3]{8}", "2", true),
            ("2^{10}", "1024", true),
            ("3\\cdot 4", "12", true),
            ("\\frac{\\pi}{2}", "\\frac{1}{2}\\pi", true),
            // percentages
            ("50\\%", "50", true),
            ("50%", "0.5", true),
            ("0.5", "50\\%", true),
            ("50\\%", "5", false),
            // lists, intervals, sets
            ("(1, 2)", "(1,2)", true),
            ("(2, 1)", "(1, 2)", false),
            ("(0.5, 2)", "(\\frac12, 2)", true),
            ("[1, 3)", "[1,3]", false),
            ("(-\\infty, 3]", "(-\\infty,3]", true),
            ("\\{2, 1\\}", "\\{1, 2\\}", true),
            ("3, 1", "1, 3", true),
            ("1, 3", "1, 3, 5", false),
            ("(1,2)", "1,2", false),
            ("(3,4), (1,2)", "(1,2),(3,4)", true),
            ("(1,2)\\cup(3,4)", "(1,2) \\cup (3,4)", true),
            ("(1,2)\\cup(3,5)", "(1,2)\\cup(3,4)", false),
            // never correct
            ("4", "", false),
            ("", "", false),
            ("$ $", "$ $", false),
            ("x", "y", false),
        ];
        for (pred, gold, want) in cases {
            assert_eq!(m(pred, gold), want, "answers_match({pred:?}, {gold:?})");
        }
    }

    #[test]
    fn grading_negatives() {
        let cfg = GraderConfig::default();
        assert!(!grade(r"\boxed{3}", "4", &cfg).correct);
        assert!(!grade(r"\boxed{4", "4", &cfg).correct, "unbalanced braces");
        assert!(!grade(r"\boxed{}", "4", &cfg).correct);
        assert!(!grade(r"\boxed{4}", "", &cfg).correct, "empty gold");
        assert!(
            !grade(r"\boxed{4}", "\\text{}", &cfg).correct,
            "gold normalises to empty"
        );
        assert!(grade(r"\boxed{\frac{1}{\sqrt{2}}}", "\\frac{\\sqrt2}{2}", &cfg).correct);
        assert!(grade(r"\boxed{3} no wait \boxed{4}", "4", &cfg).correct);
    }

    #[test]
    fn deep_nesting_is_rejected_not_overflowed() {
        let deep = format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000));
        assert!(!m(&deep, "1"));
        let signs = format!("{}1", "-".repeat(100_000));
        assert!(m(&signs, "1"));
        let lists = format!("{}1,2{}", "(1,".repeat(10_000), ")".repeat(10_000));
        assert!(m(&lists, &lists) && !m(&lists, "(1,2)"));
    }

    /// Answers of the kinds a math reasoner writes.
    fn answer() -> impl Strategy<Value = String> {
        prop_oneof![
            (-10_000i64..10_000).prop_map(|n| n.to_string()),
            (-999i64..999, 1u32..999).prop_map(|(a, b)| format!("\\frac{{{a}}}{{{b}}}")),
            (0u32..1000, 0u32..1000).prop_map(|(a, b)| format!("{a}.{b:03}")),
            (1u32..50, 2u32..50).prop_map(|(a, b)| format!("{a}\\sqrt{{{b}}}")),
            (-99i64..99, 1u32..99).prop_map(|(a, b)| format!("(\\frac{{{a}}}{{{b}}}, {b})")),
            "[a-z]".prop_map(|v| format!("{v}^2 + 1")),
        ]
    }

    /// Inserts a space at each position `mask` selects, except inside a command name.
    fn spaced(s: &str, mask: &[bool]) -> String {
        let mut out = String::new();
        let mut prev = ' ';
        for (i, c) in s.chars().enumerate() {
            let in_command =
                c.is_ascii_alphabetic() && (prev == '\\' || prev.is_ascii_alphabetic());
            if mask.get(i).copied().unwrap_or(false) && !in_command {
                out.push_str(if i % 2 == 0 { " " } else { "\n\t" });
            }
            out.push(c);
            prev = c;
        }
        out
    }

    fn mask() -> impl Strategy<Value = Vec<bool>> {
        prop::collection::vec(any::<bool>(), 40)
    }

    fn boxed(a: &str) -> String {
        format!("Let me check... wait, that is wrong. So the answer is \\boxed{{{a}}}.")
    }

    proptest! {
        #[test]
        fn whitespace_in_the_box_does_not_matter(a in answer(), b in answer(), mask in mask()) {
            let cfg = GraderConfig::default();
            let plain: String = a.chars().filter(|c| !c.is_whitespace()).collect();
            for variant in [spaced(&a, &mask), plain] {
                prop_assert!(grade(&boxed(&variant), &a, &cfg).correct, "{variant:?} vs {a:?}");
                let (got, want) = (grade(&boxed(&variant), &b, &cfg), grade(&boxed(&a), &b, &cfg));
                prop_assert_eq!(got.correct, want.correct);
            }
        }

        #[test]
        fn dfrac_and_frac_grade_the_same(a in answer(), b in answer()) {
            let cfg = GraderConfig::default();
            let d = a.replace("\\frac", "\\dfrac");
            prop_assert!(grade(&boxed(&d), &a, &cfg).correct);
            prop_assert!(grade(&boxed(&a), &d, &cfg).correct);
            let (got, want) = (grade(&boxed(&d), &b, &cfg), grade(&boxed(&a), &b, &cfg));
            prop_assert_eq!(got.correct, want.correct);
        }

        #[test]
        fn integers_match_their_decimal_and_grouped_forms(n in -(1i64 << 40)..(1 << 40)) {
            let (s, dec) = (n.to_string(), format!("{n}.0"));
            prop_assert!(m(&dec, &s));
            prop_assert!(m(&s, &dec));
            prop_assert!(!m(&(n + 1).to_string(), &s));
            let digits = n.unsigned_abs().to_string();
            let mut grouped = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i) % 3 == 0 { grouped.push(','); }
                grouped.push(c);
            }
            let sign = if n < 0 { "-" } else { "" };
            let grouped = format!("{sign}{grouped}");
            prop_assert!(m(&grouped, &s), "{} vs {}", grouped, s);
        }

        #[test]
        fn normalize_is_idempotent_on_answers(a in answer(), mask in mask()) {
            let once = normalize(&spaced(&a, &mask));
            prop_assert_eq!(normalize(&once), once);
        }
    }
}
