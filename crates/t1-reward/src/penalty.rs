//! T1's penalties: the reward of an overlong, repetitive or garbled response is replaced by
//! a fixed value (paper: −1), which kept RL stable.

use crate::Grade;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Which penalties apply, and the reward that replaces the 0/1 one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PenaltyConfig {
    /// Reward of a penalised response (default −1, as in T1).
    pub value: f32,
    /// Penalise truncated responses: hit the token limit without EOS (default true).
    pub overlong: bool,
    pub repetition: RepetitionRule,
    pub garbled: GarbledRule,
}

impl Default for PenaltyConfig {
    fn default() -> Self {
        Self {
            value: -1.0,
            overlong: true,
            repetition: Default::default(),
            garbled: Default::default(),
        }
    }
}

/// When a response counts as repetitive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepetitionRule {
    /// Default true.
    pub enabled: bool,
    /// Window length in characters (default 80; 0 turns the substring test off).
    pub substring_chars: usize,
    /// Flag when one window occurs at least this often, counted without overlap (default 20).
    pub min_count: usize,
    /// Word n-gram length for the second test (default 0 = off).
    pub ngram: usize,
    /// Flag when the most frequent word n-gram (occurring at least twice) is more than this
    /// fraction of all n-grams (default 0.25).
    pub max_ngram_fraction: f32,
}

impl Default for RepetitionRule {
    fn default() -> Self {
        Self {
            enabled: true,
            substring_chars: 80,
            min_count: 20,
            ngram: 0,
            max_ngram_fraction: 0.25,
        }
    }
}

/// When a response counts as garbled (unreadable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GarbledRule {
    /// Default true.
    pub enabled: bool,
    /// Flag when more than this fraction of characters is U+FFFD, a control character other
    /// than `\n` `\t` `\r`, or private-use (default 0.05).
    pub max_bad_char_fraction: f32,
    /// Flag when letters switch script inside a word more often than this per 100 characters
    /// (default 1.0). Switches among Latin, Greek and CJK are not counted here: math text
    /// mixes them legitimately (`设a和b`, `2πr`); Latin↔CJK mixing has its own test below.
    pub max_script_switches_per_100_chars: f32,
    /// Flag Latin↔CJK language mixing, the common failure of Qwen models: outside maths
    /// (`$…$`, `\(…\)`, `\[…\]`) and LaTeX commands, count English words (2+ Latin letters;
    /// one-letter variables are maths) and CJK characters; when the smaller of the two is more
    /// than this fraction of their sum, the text switches language (default 0.2). Chinese
    /// maths with variables, `\frac` and a word like `Python` stays far below.
    pub max_mixed_language_fraction: f32,
    /// ... and the smaller count is at least this (default 6), so that one quoted phrase in
    /// the other language is not flagged.
    pub min_mixed_language_count: usize,
}

impl Default for GarbledRule {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bad_char_fraction: 0.05,
            max_script_switches_per_100_chars: 1.0,
            max_mixed_language_fraction: 0.2,
            min_mixed_language_count: 6,
        }
    }
}

/// The penalties one response earned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Penalties {
    pub overlong: bool,
    pub repetitive: bool,
    pub garbled: bool,
}

impl Penalties {
    pub fn any(&self) -> bool {
        self.overlong || self.repetitive || self.garbled
    }
}

/// Checks a response against the enabled rules; `truncated`: generation hit the token limit
/// without EOS.
pub fn penalties(response: &str, truncated: bool, cfg: &PenaltyConfig) -> Penalties {
    Penalties {
        overlong: cfg.overlong && truncated,
        repetitive: cfg.repetition.enabled && is_repetitive(response, &cfg.repetition),
        garbled: cfg.garbled.enabled && is_garbled(response, &cfg.garbled),
    }
}

/// 1.0 if correct else 0.0, replaced by `cfg.value` when any penalty applies.
pub fn reward(grade: &Grade, penalties: &Penalties, cfg: &PenaltyConfig) -> f32 {
    match (penalties.any(), grade.correct) {
        (true, _) => cfg.value,
        (false, true) => 1.0,
        (false, false) => 0.0,
    }
}

/// The repetition tests of `rule` (ignoring `rule.enabled`).
pub fn is_repetitive(text: &str, rule: &RepetitionRule) -> bool {
    repeated_window(text, rule.substring_chars, rule.min_count)
        || (rule.ngram > 0 && top_ngram_fraction(text, rule.ngram) > rule.max_ngram_fraction)
}

/// Whether some `w`-character substring occurs at least `min_count` times without overlap.
/// Rabin–Karp: each window's hash (mod 2^61 − 1) is rolled in O(1) and mapped to its
/// count and last counted start, so the scan is O(n) expected; a false positive needs a
/// hash collision (probability about n²/2^61).
fn repeated_window(text: &str, w: usize, min_count: usize) -> bool {
    const P: u64 = (1 << 61) - 1;
    const B: u64 = 1_000_003;
    let mulmod = |a: u64, b: u64| (u128::from(a) * u128::from(b) % u128::from(P)) as u64;
    let chars: Vec<u64> = text.chars().map(|c| u64::from(c) + 1).collect();
    if w == 0 || min_count == 0 || chars.len() < w.saturating_mul(min_count) {
        return false;
    }
    let top = (1..w).fold(1, |acc, _| mulmod(acc, B)); // B^(w-1)
    let mut h = chars[..w].iter().fold(0, |h, &c| (mulmod(h, B) + c) % P);
    let mut seen: HashMap<u64, (usize, usize)> = HashMap::new(); // hash -> (count, last start)
    for i in 0..=chars.len() - w {
        if i > 0 {
            h = (h + P - mulmod(chars[i - 1], top)) % P;
            h = (mulmod(h, B) + chars[i + w - 1]) % P;
        }
        let (count, last) = seen.entry(h).or_insert((0, usize::MAX));
        if *last == usize::MAX || i >= *last + w {
            *count += 1;
            *last = i;
            if *count >= min_count {
                return true;
            }
        }
    }
    false
}

/// Share of the most frequent word n-gram among all n-grams; 0 if none occurs twice.
fn top_ngram_fraction(text: &str, n: usize) -> f32 {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() < n {
        return 0.0;
    }
    let mut counts: HashMap<&[&str], usize> = HashMap::new();
    for gram in words.windows(n) {
        *counts.entry(gram).or_default() += 1;
    }
    let top = counts.into_values().max().unwrap_or(0);
    if top < 2 {
        0.0
    } else {
        top as f32 / (words.len() - n + 1) as f32
    }
}

/// The garbled-text tests of `rule` (ignoring `rule.enabled`).
pub fn is_garbled(text: &str, rule: &GarbledRule) -> bool {
    let total = text.chars().count();
    if total == 0 {
        return false;
    }
    let bad = text.chars().filter(|&c| unreadable(c)).count();
    let per_100 = script_switches(text) as f32 * 100.0 / total as f32;
    let (latin, cjk) = language_counts(text);
    let minority = latin.min(cjk);
    bad as f32 / total as f32 > rule.max_bad_char_fraction
        || per_100 > rule.max_script_switches_per_100_chars
        || (minority >= rule.min_mixed_language_count && minority as f32 > rule.max_mixed_language_fraction * (latin + cjk) as f32)
}

/// (English words of 2+ Latin letters, CJK characters) of `text` outside maths and LaTeX
/// commands ([`GarbledRule::max_mixed_language_fraction`]).
fn language_counts(text: &str) -> (usize, usize) {
    let (mut latin_words, mut cjk) = (0usize, 0usize);
    let mut chars = text.chars().peekable();
    let mut math: Option<&str> = None; // the closing delimiter while inside maths
    let mut word = 0usize; // Latin letters of the current word
    let end_word = |word: &mut usize, latin_words: &mut usize| {
        if *word >= 2 {
            *latin_words += 1;
        }
        *word = 0;
    };
    while let Some(c) = chars.next() {
        if let Some(close) = math {
            let hit = match close {
                // inline maths also ends at a line break, so a lone `$` hides one line at most
                "$" => c == '$' || c == '\n',
                "$$" => c == '$' && chars.peek() == Some(&'$'),
                ")" | "]" => c == '\\' && chars.peek() == Some(&close.chars().next().unwrap_or(' ')),
                _ => false,
            };
            if hit {
                if close != "$" {
                    chars.next();
                }
                math = None;
            } else if c == '\\' {
                // an escaped character inside maths (`\$`) does not close it
                chars.next();
            }
            continue;
        }
        match c {
            '$' => {
                end_word(&mut word, &mut latin_words);
                math = Some(if chars.peek() == Some(&'$') {
                    chars.next();
                    "$$"
                } else {
                    "$"
                });
            }
            '\\' => {
                end_word(&mut word, &mut latin_words);
                match chars.peek() {
                    Some('(') => {
                        chars.next();
                        math = Some(")");
                    }
                    Some('[') => {
                        chars.next();
                        math = Some("]");
                    }
                    // a LaTeX command: skip its name
                    Some(c) if c.is_ascii_alphabetic() => {
                        while chars.peek().is_some_and(|c| c.is_ascii_alphabetic()) {
                            chars.next();
                        }
                    }
                    // an escaped character (`\$`, `\\`): skip it
                    _ => {
                        chars.next();
                    }
                }
            }
            c if script(c) == Some(Script::Latin) => word += 1,
            c => {
                end_word(&mut word, &mut latin_words);
                cjk += usize::from(script(c) == Some(Script::Cjk));
            }
        }
    }
    end_word(&mut word, &mut latin_words);
    (latin_words, cjk)
}

fn unreadable(c: char) -> bool {
    c == '\u{FFFD}'
        || (c.is_control() && !matches!(c, '\n' | '\t' | '\r'))
        || matches!(c, '\u{E000}'..='\u{F8FF}' | '\u{F0000}'..='\u{10FFFD}') // private use
}

#[derive(Clone, Copy, PartialEq)]
enum Script {
    Latin,
    Greek,
    Cjk,
    Cyrillic,
    Hebrew,
    Arabic,
    Indic,
    Thai,
}

/// Script of a letter; `None` for digits, punctuation, symbols and letters of other blocks.
fn script(c: char) -> Option<Script> {
    use Script::*;
    if !c.is_alphabetic() {
        return None;
    }
    Some(match u32::from(c) {
        0x41..=0x5A | 0x61..=0x7A | 0xC0..=0x24F | 0x1E00..=0x1EFF => Latin,
        0x370..=0x3FF | 0x1F00..=0x1FFF => Greek,
        0x400..=0x52F => Cyrillic,
        0x590..=0x5FF => Hebrew,
        0x600..=0x6FF | 0x750..=0x77F | 0xFB50..=0xFDFF | 0xFE70..=0xFEFF => Arabic,
        0x900..=0xDFF => Indic,
        0xE00..=0xE7F => Thai,
        0x3040..=0x30FF
        | 0x3400..=0x4DBF
        | 0x4E00..=0x9FFF
        | 0xAC00..=0xD7AF
        | 0xF900..=0xFAFF
        | 0x20000..=0x2FA1F => Cjk,
        _ => return None,
    })
}

/// Script changes between adjacent letters, not counting changes among Latin/Greek/CJK.
fn script_switches(text: &str) -> usize {
    let common = |s: Script| matches!(s, Script::Latin | Script::Greek | Script::Cjk);
    let (mut switches, mut prev) = (0, None);
    for c in text.chars() {
        let cur = script(c);
        if let (Some(p), Some(s)) = (prev, cur) {
            if p != s && !(common(p) && common(s)) {
                switches += 1;
            }
        }
        prev = cur;
    }
    switches
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const COT: &str = r"Let me try to solve this. We need the number of integers $n$ with $1 \le n \le 100$
such that $n^2 + 1$ is divisible by 5. First attempt: $n^2 \equiv -1 \equiv 4 \pmod 5$, so
$n \equiv 2$ or $n \equiv 3 \pmod 5$. Counting $n \equiv 2$: 2, 7, ..., 97 gives 20 values.
Wait, that is wrong because I should double-check the endpoints: $97 + 5 = 102 > 100$, so 20
is right. Counting $n \equiv 3$: 3, 8, ..., 98, also 20 values. Hmm, let me verify with
$\frac{100}{5} = 20$ per residue class, consistent. Total: $20 + 20 = 40$.
Let me verify once more with a small case: for $1 \le n \le 5$, only $n = 2, 3$ work since
$4+1 = 5$ and $9+1 = 10$. Yes. Wait, the question asks for 12 of them in the first 30?
No, that is wrong: I misread. Rechecking: in $1..30$ there are $6 + 6 = 12$ such $n$.
So the answer is \boxed{12}.";

    #[test]
    fn normal_cot_is_not_penalised() {
        let cfg = PenaltyConfig::default();
        assert_eq!(penalties(COT, false, &cfg), Penalties::default());
        let long_cot = COT.repeat(5); // a few repeats of long text stay below 20
        assert!(!penalties(&long_cot, false, &cfg).any());
        let zh =
            "我们设 x 为正整数。其中a和b是正整数，且a+b=10，所以 $\\frac{a}{b}$ 的最大值是 9。\
                  等等，这是错的，因为 b≥1 且 α+β=π。用 Python 验证一下：答案是 \\boxed{9}。";
        assert!(!penalties(&zh.repeat(3), false, &cfg).any());
        let ru = "Рассмотрим функцию f(x) = x^2. Производная равна 2x, значит ответ \\boxed{2}.";
        assert!(!penalties(ru, false, &cfg).any());
    }

    #[test]
    fn chinese_maths_and_english_with_a_quoted_phrase_are_not_mixed_language() {
        let cfg = PenaltyConfig::default();
        let zh = "设 $f(x) = x^2 + ax + b$，其中 a 和 b 是实数。由 \\(f(1) = 0\\) 得 a + b = -1；再由判别式 \\[a^2 - 4b \\ge 0\\] \
                  可知 b 的取值范围。用 Python 验证：当 a = -3, b = 2 时成立。因此答案是 \\boxed{2}。";
        let (latin, cjk) = language_counts(zh);
        assert!(latin <= 1 && cjk > 30, "({latin}, {cjk})");
        assert!(!penalties(&zh.repeat(4), false, &cfg).garbled);
        let en = format!("{COT} In Chinese this is called 答案 (the answer).");
        assert!(!penalties(&en, false, &cfg).garbled, "{:?}", language_counts(&en));
    }

    #[test]
    fn each_penalty_fires() {
        let cfg = PenaltyConfig::default();
        let chunk: String = (0..80)
            .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
            .collect();
        let looped = format!("{COT}{}", chunk.repeat(25));
        assert!(penalties(&looped, false, &cfg).repetitive);
        assert!(!penalties(&format!("{COT}{}", chunk.repeat(19)), false, &cfg).repetitive);

        let noisy: String = COT
            .chars()
            .flat_map(|c| [c, '\u{FFFD}', '\u{1}'])
            .take(600)
            .collect();
        assert!(penalties(&noisy, false, &cfg).garbled);
        let private: String = COT
            .chars()
            .enumerate()
            .map(|(i, c)| if i % 5 == 0 { '\u{E000}' } else { c })
            .collect();
        assert!(penalties(&private, false, &cfg).garbled);
        let mixed = "thе rеsult оf thе sеcоnd stер is ваlue ".repeat(10); // Cyrillic е/о/р/в/а
        assert!(penalties(&mixed, false, &cfg).garbled);
        // Latin↔CJK switching inside sentences, either way round
        let en_zh = "Let me compute 这个 sum first. 首先 we have 3 + 4 = 7，然后 the answer should be 7. 所以 \\boxed{7}";
        assert!(penalties(en_zh, false, &cfg).garbled, "{:?}", language_counts(en_zh));
        let zh_en = "我们先计算 3 + 4 的值。 Then we need to check the result carefully before moving on. 所以答案是 \\boxed{7}。";
        assert!(penalties(zh_en, false, &cfg).garbled, "{:?}", language_counts(zh_en));
        // display maths, an escaped dollar or a lone one hide nothing past them
        for lead in ["$$x^2$$ ", "It costs \\$5. ", "It costs $5\n"] {
            let text = format!("{lead}{en_zh}");
            assert_eq!(language_counts(&text).1, language_counts(en_zh).1, "{text:?}");
            assert!(penalties(&text, false, &cfg).garbled, "{text:?}");
        }

        assert_eq!(
            penalties(COT, true, &cfg),
            Penalties {
                overlong: true,
                ..Default::default()
            }
        );
        let off = PenaltyConfig {
            overlong: false,
            ..Default::default()
        };
        assert!(!penalties(COT, true, &off).any());
    }

    #[test]
    fn ngram_rule() {
        let rule = RepetitionRule {
            ngram: 3,
            ..Default::default()
        };
        assert!(is_repetitive(
            &"so the answer is so the answer is ".repeat(4),
            &rule
        ));
        assert!(!is_repetitive(COT, &rule));
        assert!(!is_repetitive(
            &"so the answer".repeat(40),
            &RepetitionRule::default()
        ));
    }

    #[test]
    fn reward_table() {
        let cfg = PenaltyConfig::default();
        let right = Grade {
            correct: true,
            extracted: Some("1".into()),
        };
        let wrong = Grade {
            correct: false,
            extracted: None,
        };
        let none = Penalties::default();
        let long = Penalties {
            overlong: true,
            ..none
        };
        assert_eq!(reward(&right, &none, &cfg), 1.0);
        assert_eq!(reward(&wrong, &none, &cfg), 0.0);
        assert_eq!(reward(&right, &long, &cfg), -1.0);
        assert_eq!(
            reward(&wrong, &long, &PenaltyConfig { value: -0.5, ..cfg }),
            -0.5
        );
    }

    #[test]
    fn config_is_strict_and_defaults() {
        let cfg: PenaltyConfig = serde_json::from_str(r#"{"repetition": {"ngram": 4}}"#).unwrap();
        assert_eq!(cfg.repetition.substring_chars, 80);
        assert_eq!(cfg.value, -1.0);
        assert!(
            serde_json::from_str::<PenaltyConfig>(r#"{"garbled": {"enable": false}}"#).is_err()
        );
    }

    /// The definition, computed the slow way: non-overlapping greedy count of every window.
    fn naive_repeated(text: &str, w: usize, min_count: usize) -> bool {
        let c: Vec<char> = text.chars().collect();
        if w == 0 || min_count == 0 || c.len() < w {
            return false;
        }
        (0..=c.len() - w).any(|i| {
            let (mut count, mut next) = (0, 0);
            for j in 0..=c.len() - w {
                if j >= next && c[j..j + w] == c[i..i + w] {
                    count += 1;
                    next = j + w;
                }
            }
            count >= min_count
        })
    }

    proptest! {
        #[test]
        fn rolling_hash_agrees_with_naive(text in "[ab]{0,60}", w in 1usize..6, k in 1usize..7) {
            prop_assert_eq!(repeated_window(&text, w, k), naive_repeated(&text, w, k));
        }

        #[test]
        fn a_long_chunk_repeated_20_times_is_flagged(
            chunk in "[a-z ]{80,120}", n in 20usize..30, pre in "[a-z ]{0,50}"
        ) {
            let rule = RepetitionRule::default();
            let text = format!("{pre}{}", chunk.repeat(n));
            prop_assert!(is_repetitive(&text, &rule));
        }

        #[test]
        fn plain_ascii_text_is_never_garbled(text in "[ -~\n\t]{0,300}") {
            prop_assert!(!is_garbled(&text, &GarbledRule::default()));
        }
    }
}
