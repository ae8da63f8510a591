//! The laptop-scale task: integer arithmetic such as `Compute 7 + 3 * 4 - 5.`, with SFT
//! solutions written in the T1 trial-and-error shape, so the whole recipe runs on a CPU.
//!
//! A solution is a few templated lines (digits are single tokens, about 40–130 tokens):
//!
//! ```text
//! Attempt: left to right, 7 + 3 = 10, 10 * 4 = 40, 40 - 5 = 35.
//! Check: * binds tighter than +, so left to right is wrong.
//! Retry: 3 * 4 = 12, 7 + 12 = 19, 19 - 5 = 14.
//! Verify: 14 + 5 = 19, 19 - 12 = 7. Correct.
//! \boxed{14}
//! ```
//!
//! The first attempt is, by the config's probabilities, right (`Check: every step is
//! right.` then straight to `Verify`), or holds one *slip* (a step off by 1, 2 or 10, or a
//! subtraction with its sign dropped: `Check: 3 * 4 is 12, not 13.`), or a *structural*
//! mistake: evaluating left to right when `*` must go first, or leaving out the last term
//! (`Check: the final - 5 was left out.`). Every mistake changes the attempt's result.
//! The retry is correct (products left to right, then the sums left to right), unless
//! `p_retry_wrong` gives retries slips of their own: then each wrong retry gets its `Check`
//! and another `Retry` follows, up to `max_attempts`, the last of which is right:
//!
//! ```text
//! Attempt: 3 + 8 = 11, 11 - 4 = 6.
//! Check: 11 - 4 is 7, not 6.
//! Retry: 3 + 8 = 12, 12 - 4 = 8.
//! Check: 3 + 8 is 11, not 12.
//! Retry: 3 + 8 = 11, 11 - 4 = 7.
//! Verify: 7 + 4 = 11, 11 - 8 = 3. Correct.
//! \boxed{7}
//! ```
//!
//! `Verify` undoes the last chain of operations from the answer back to its first number.

use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{DataError, Message, Problem, SftExample};

/// Operators the task knows.
const KNOWN_OPS: &str = "+-*";
/// Largest allowed `max_operands`; with `max_operand <= 999` every value fits an i64.
const MAX_OPERANDS: usize = 6;
/// Largest allowed `max_operand`.
const MAX_OPERAND: u32 = 999;
/// Largest allowed `max_attempts`.
const MAX_ATTEMPTS: usize = 8;

/// Knobs of the generator. Harder: more operands, larger operands, `*` in `ops`.
///
/// The default (`+` and `-`, 2–4 operands up to 9) is what a ~1M-parameter model learns from
/// scratch in ~1,000 steps on a CPU (~35% greedy accuracy); with `ops = "+-*"` the attempts
/// also make precedence mistakes, but products reach 4 digits and the same model stays
/// below 10% in that time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskConfig {
    /// Fewest operands in an expression (>= 2).
    pub min_operands: usize,
    /// Most operands in an expression (<= 6); the count is uniform in [min, max].
    pub max_operands: usize,
    /// Operands are uniform in 1..=max_operand (<= 999).
    pub max_operand: u32,
    /// Operators to draw from, uniformly: any of `+`, `-`, `*`.
    pub ops: String,
    /// Probability that the first attempt is already right and is only verified.
    pub p_correct_first: f32,
    /// Probability that the first attempt has an arithmetic slip in one step. The rest
    /// get a structural mistake (left to right, or a dropped last term) where the
    /// expression allows one that changes the result, else a slip.
    pub p_slip: f32,
    /// Most attempts in one solution (2..=8), counting the first. The last one allowed is
    /// always right.
    pub max_attempts: usize,
    /// Probability that a retry holds a slip of its own, which its check names before the
    /// next retry (while attempts remain). 0 gives the fixed shape: one mistake at most, then
    /// a retry that is right; above 0 a solution makes 1 to `max_attempts` attempts, so a
    /// model that checks each one can turn more tokens into accuracy.
    pub p_retry_wrong: f32,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            min_operands: 2,
            max_operands: 4,
            max_operand: 9,
            ops: "+-".into(),
            p_correct_first: 0.3,
            p_slip: 0.35,
            max_attempts: 2,
            p_retry_wrong: 0.0,
        }
    }
}

impl TaskConfig {
    /// Checks the knobs; [`generate`] and [`splits`] panic on a config this rejects.
    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |m: String| Err(DataError::TaskConfig(m));
        if self.min_operands < 2 || self.max_operands < self.min_operands {
            return bad(format!(
                "need 2 <= min_operands <= max_operands, got min_operands = {}, max_operands = {}",
                self.min_operands, self.max_operands
            ));
        }
        if self.max_operands > MAX_OPERANDS {
            return bad(format!("max_operands = {} is above the limit {MAX_OPERANDS}", self.max_operands));
        }
        if !(1..=MAX_OPERAND).contains(&self.max_operand) {
            return bad(format!("max_operand = {} must be in 1..={MAX_OPERAND}", self.max_operand));
        }
        let mut seen = HashSet::new();
        if self.ops.is_empty() || !self.ops.chars().all(|c| KNOWN_OPS.contains(c) && seen.insert(c)) {
            return bad(format!("ops = {:?} must be distinct characters from {KNOWN_OPS:?}", self.ops));
        }
        let (a, b) = (self.p_correct_first, self.p_slip);
        if !(0.0..=1.0).contains(&a) || !(0.0..=1.0).contains(&b) || a + b > 1.0 + 1e-6 {
            return bad(format!(
                "p_correct_first = {a} and p_slip = {b} must be probabilities with a sum <= 1"
            ));
        }
        if !(2..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            return bad(format!("max_attempts = {} must be in 2..={MAX_ATTEMPTS}", self.max_attempts));
        }
        if !(0.0..=1.0).contains(&self.p_retry_wrong) {
            return bad(format!("p_retry_wrong = {} must be a probability", self.p_retry_wrong));
        }
        Ok(())
    }

    /// How many different prompts this config can produce (saturating).
    pub fn num_prompts(&self) -> u128 {
        let (m, k) = (self.max_operand as u128, self.ops.chars().count() as u128);
        (self.min_operands..=self.max_operands)
            .map(|n| m.saturating_pow(n as u32).saturating_mul(k.saturating_pow(n as u32 - 1)))
            .fold(0u128, |a, b| a.saturating_add(b))
    }

    fn validated(&self) -> &Self {
        if let Err(e) = self.validate() {
            panic!("{e}");
        }
        self
    }
}

/// One generated problem with its T1-style solution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// `Compute {expression}.`
    pub prompt: String,
    /// The value of the expression, e.g. `-3`.
    pub answer: String,
    /// The assistant's reasoning, ending with `\boxed{answer}`.
    pub solution: String,
}

/// Disjoint train / RL / test sets: no prompt appears twice, within or across sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splits {
    /// For SFT.
    pub train: Vec<Sample>,
    /// Prompts for RL.
    pub rl: Vec<Sample>,
    /// Held out for evaluation.
    pub test: Vec<Sample>,
}

/// The first `n` samples of the stream for `seed`; the same `(cfg, seed)` always gives the
/// same stream, on every platform. Prompts may repeat.
///
/// # Panics
/// If `cfg` fails [`TaskConfig::validate`].
pub fn generate(cfg: &TaskConfig, seed: u64, n: usize) -> Vec<Sample> {
    let cfg = cfg.validated();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| sample(cfg, &mut rng)).collect()
}

/// Walks the stream of `seed`, drops repeated prompts, and sends each new prompt to the
/// split chosen by a hash of `(seed, prompt)` with odds `n_train : n_rl : n_test`, until
/// all three are full. Every split thus has the same mix of difficulties.
///
/// # Panics
/// If `cfg` fails [`TaskConfig::validate`], or cannot produce enough distinct prompts
/// (raise `max_operand` or `max_operands`).
pub fn splits(cfg: &TaskConfig, seed: u64, n_train: usize, n_rl: usize, n_test: usize) -> Splits {
    let cfg = cfg.validated();
    let total = n_train + n_rl + n_test;
    // Hashed buckets fill unevenly, so ask for headroom over the bare count.
    let available = cfg.num_prompts();
    assert!(
        total as u128 * 2 <= available,
        "task config yields only {available} distinct prompts, too few for {total} disjoint \
         samples; raise max_operand or max_operands"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut seen = HashSet::new();
    let mut out = Splits { train: Vec::new(), rl: Vec::new(), test: Vec::new() };
    let mut stalled = 0usize;
    while out.train.len() + out.rl.len() + out.test.len() < total {
        let s = sample(cfg, &mut rng);
        stalled += 1;
        assert!(
            stalled < 1_000_000,
            "found no new prompt for a split in 1,000,000 draws; raise max_operand or max_operands"
        );
        if !seen.insert(s.prompt.clone()) {
            continue;
        }
        let bucket = fnv1a(seed, &s.prompt) % total as u64;
        let (split, cap) = if bucket < n_train as u64 {
            (&mut out.train, n_train)
        } else if bucket < (n_train + n_rl) as u64 {
            (&mut out.rl, n_rl)
        } else {
            (&mut out.test, n_test)
        };
        if split.len() < cap {
            split.push(s);
            stalled = 0;
        }
    }
    out
}

/// `n` samples for validation (monitoring and tuning, so that the test split is only ever
/// reported), drawn from the same distribution as [`splits`] with a stream of their own and
/// disjoint from every split in `taken`. Adding a validation split thus changes none of the
/// others.
///
/// # Panics
/// As [`splits`], when the task cannot produce `n` more distinct prompts.
pub fn validation(cfg: &TaskConfig, seed: u64, taken: &Splits, n: usize) -> Vec<Sample> {
    let cfg = cfg.validated();
    let mut seen: HashSet<String> = taken.train.iter().chain(&taken.rl).chain(&taken.test).map(|s| s.prompt.clone()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7661_6c69_6461_7465); // "validate"
    let mut out = Vec::with_capacity(n);
    let mut stalled = 0usize;
    while out.len() < n {
        let s = sample(cfg, &mut rng);
        stalled += 1;
        assert!(stalled < 1_000_000, "found no new prompt for the validation split in 1,000,000 draws; raise max_operand or max_operands");
        if seen.insert(s.prompt.clone()) {
            out.push(s);
            stalled = 0;
        }
    }
    out
}

/// The sample as an SFT conversation: user = prompt, assistant = solution.
pub fn sft_example(s: &Sample) -> SftExample {
    SftExample {
        messages: vec![
            Message { role: "user".into(), content: s.prompt.clone() },
            Message { role: "assistant".into(), content: s.solution.clone() },
        ],
    }
}

/// The sample as an RL / evaluation problem.
pub fn problem(s: &Sample) -> Problem {
    Problem { prompt: s.prompt.clone(), answer: s.answer.clone() }
}

/// FNV-1a over the seed and the text: a split assignment that is stable everywhere.
fn fnv1a(seed: u64, text: &str) -> u64 {
    seed.to_le_bytes()
        .iter()
        .chain(text.as_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// `a op b = r`; `r` is what the solver wrote, which is wrong on a slipped step.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Step {
    a: i64,
    op: char,
    b: i64,
    r: i64,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {} = {}", self.a, self.op, self.b, self.r)
    }
}

/// `nums[0] ops[0] nums[1] ops[1] ...`, with `ops.len() + 1 == nums.len()`.
struct Expr {
    nums: Vec<i64>,
    ops: Vec<char>,
}

/// How step `k` of an attempt goes wrong: its true result `r` is written as `r + delta`.
#[derive(Debug, Clone, Copy)]
struct Slip {
    k: usize,
    delta: i64,
}

fn apply(a: i64, op: char, b: i64) -> i64 {
    match op {
        '+' => a + b,
        '-' => a - b,
        '*' => a * b,
        _ => unreachable!("ops are validated"),
    }
}

/// Correct order: each product run left to right, then the sums and differences left to
/// right. Returns (steps, index of the first additive step).
fn precedence_steps(e: &Expr, slip: Option<Slip>) -> (Vec<Step>, usize) {
    let mut steps = Vec::new();
    let push = |steps: &mut Vec<Step>, a: i64, op: char, b: i64| {
        let mut r = apply(a, op, b);
        if let Some(s) = slip.filter(|s| s.k == steps.len()) {
            r += s.delta;
        }
        steps.push(Step { a, op, b, r });
        r
    };
    let (mut terms, mut add_ops) = (Vec::new(), Vec::new());
    let mut cur = e.nums[0];
    for (&op, &b) in e.ops.iter().zip(&e.nums[1..]) {
        if op == '*' {
            cur = push(&mut steps, cur, op, b);
        } else {
            terms.push(cur);
            add_ops.push(op);
            cur = b;
        }
    }
    terms.push(cur);
    let first_additive = steps.len();
    let mut acc = terms[0];
    for (&op, &t) in add_ops.iter().zip(&terms[1..]) {
        acc = push(&mut steps, acc, op, t);
    }
    (steps, first_additive)
}

fn left_to_right_steps(e: &Expr) -> Vec<Step> {
    let mut acc = e.nums[0];
    e.ops
        .iter()
        .zip(&e.nums[1..])
        .map(|(&op, &b)| {
            let r = apply(acc, op, b);
            let step = Step { a: acc, op, b, r };
            acc = r;
            step
        })
        .collect()
}

fn result(steps: &[Step]) -> i64 {
    steps.last().expect("an expression has at least 2 operands").r
}

fn join(steps: &[Step]) -> String {
    steps.iter().map(Step::to_string).collect::<Vec<_>>().join(", ")
}

fn sample(cfg: &TaskConfig, rng: &mut ChaCha8Rng) -> Sample {
    let ops: Vec<char> = cfg.ops.chars().collect();
    let n = rng.random_range(cfg.min_operands as u32..=cfg.max_operands as u32) as usize;
    let nums: Vec<i64> = (0..n).map(|_| rng.random_range(1..=cfg.max_operand) as i64).collect();
    let ops: Vec<char> = (1..n).map(|_| ops[rng.random_range(0..ops.len() as u32) as usize]).collect();
    let e = Expr { nums, ops };
    let expr = e
        .nums
        .iter()
        .zip(e.ops.iter().map(|o| format!(" {o} ")).chain([String::new()]))
        .map(|(x, o)| format!("{x}{o}"))
        .collect::<String>();

    let (steps, first_additive) = precedence_steps(&e, None);
    let answer = result(&steps);

    let u: f32 = rng.random();
    // (first attempt, what the check says, whether the attempt was wrong)
    let (attempt, check, wrong) = if u < cfg.p_correct_first {
        (join(&steps), "every step is right.".to_string(), false)
    } else {
        let (attempt, check) = if u < cfg.p_correct_first + cfg.p_slip {
            slip_attempt(&steps, &e, rng)
        } else {
            structural_attempt(&e, answer).unwrap_or_else(|| slip_attempt(&steps, &e, rng))
        };
        (attempt, check, true)
    };

    let mut lines = vec![format!("Attempt: {attempt}."), format!("Check: {check}")];
    if wrong {
        // retries that slip too, each named by its check, while attempts remain (no draw at
        // p_retry_wrong = 0, so the fixed-shape stream is unchanged)
        let mut made = 1;
        while made + 1 < cfg.max_attempts && cfg.p_retry_wrong > 0.0 && rng.random::<f32>() < cfg.p_retry_wrong {
            let (retry, check) = slip_attempt(&steps, &e, rng);
            lines.push(format!("Retry: {retry}."));
            lines.push(format!("Check: {check}"));
            made += 1;
        }
        lines.push(format!("Retry: {}.", join(&steps)));
    }
    lines.push(format!("Verify: {}. Correct.", verify(&steps, first_additive)));
    lines.push(format!("\\boxed{{{answer}}}"));
    Sample { prompt: format!("Compute {expr}."), answer: answer.to_string(), solution: lines.join("\n") }
}

/// An attempt in the right order with one step off by 1, 2 or 10 (10 only where the
/// value has two digits), or a subtraction with a negative result written positive.
fn slip_attempt(steps: &[Step], e: &Expr, rng: &mut ChaCha8Rng) -> (String, String) {
    let k = rng.random_range(0..steps.len() as u32) as usize;
    let r = steps[k].r;
    let delta = if steps[k].op == '-' && r < 0 && rng.random_bool(0.5) {
        -2 * r
    } else {
        let mut deltas = vec![-2, -1, 1, 2];
        if r.abs() >= 10 {
            deltas.extend([-10, 10]);
        }
        deltas[rng.random_range(0..deltas.len() as u32) as usize]
    };
    let (wrong, _) = precedence_steps(e, Some(Slip { k, delta }));
    let s = steps[k];
    (join(&wrong), format!("{} {} {} is {}, not {}.", s.a, s.op, s.b, s.r, s.r + delta))
}

/// Left to right where that changes the result, else a dropped last term where that does
/// (left to right is preferred: it is the rarer chance and the more instructive mistake).
/// `None` when neither applies.
fn structural_attempt(e: &Expr, answer: i64) -> Option<(String, String)> {
    // The first `*` that follows a `+` or `-` is where left to right goes wrong.
    let precedence = e.ops.iter().enumerate().find_map(|(i, &op)| {
        let before = e.ops[..i].iter().rev().find(|&&o| o != '*');
        (op == '*').then_some(before).flatten().copied()
    });
    let ltr = left_to_right_steps(e);
    if let Some(op) = precedence.filter(|_| result(&ltr) != answer) {
        let check = format!("* binds tighter than {op}, so left to right is wrong.");
        return Some((format!("left to right, {}", join(&ltr)), check));
    }
    let n = e.nums.len();
    if n < 3 {
        return None;
    }
    let short = Expr { nums: e.nums[..n - 1].to_vec(), ops: e.ops[..n - 2].to_vec() };
    let (steps, _) = precedence_steps(&short, None);
    let check = format!("the final {} {} was left out.", e.ops[n - 2], e.nums[n - 1]);
    (result(&steps) != answer).then(|| (join(&steps), check))
}

/// Undoes the sums and differences from the answer back to the first term; an expression
/// that is one product is undone by division instead.
fn verify(steps: &[Step], first_additive: usize) -> String {
    let chain = if first_additive < steps.len() { &steps[first_additive..] } else { steps };
    let undo = chain.iter().rev().map(|s| {
        let inv = match s.op {
            '+' => '-',
            '-' => '+',
            _ => '/',
        };
        Step { a: s.r, op: inv, b: s.b, r: s.a }
    });
    undo.map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Independent evaluator: split into +/- terms, each term a product.
    fn eval(expr: &str) -> i64 {
        let toks: Vec<&str> = expr.split(' ').collect();
        let (mut total, mut sign, mut term) = (0i64, 1i64, toks[0].parse::<i64>().unwrap());
        for pair in toks[1..].chunks(2) {
            let x: i64 = pair[1].parse().unwrap();
            match pair[0] {
                "*" => term *= x,
                op => {
                    total += sign * term;
                    sign = if op == "+" { 1 } else { -1 };
                    term = x;
                }
            }
        }
        total + sign * term
    }

    /// The task with products, where every kind of mistake occurs.
    fn with_mul() -> TaskConfig {
        TaskConfig { ops: "+-*".into(), ..Default::default() }
    }

    fn expr_of(prompt: &str) -> &str {
        prompt.strip_prefix("Compute ").unwrap().strip_suffix('.').unwrap()
    }

    /// The value the first attempt arrived at: the last `= x` before `Check`.
    fn attempt_value(solution: &str) -> i64 {
        let first = solution.lines().next().unwrap().trim_end_matches('.');
        first.rsplit("= ").next().unwrap().parse().unwrap()
    }

    #[test]
    fn example_from_the_docs() {
        let e = Expr { nums: vec![7, 3, 4, 5], ops: vec!['+', '*', '-'] };
        let (steps, first) = precedence_steps(&e, None);
        assert_eq!(join(&steps), "3 * 4 = 12, 7 + 12 = 19, 19 - 5 = 14");
        assert_eq!(verify(&steps, first), "14 + 5 = 19, 19 - 12 = 7");
        assert_eq!(join(&left_to_right_steps(&e)), "7 + 3 = 10, 10 * 4 = 40, 40 - 5 = 35");
        let e = Expr { nums: vec![2, 3, 4], ops: vec!['*', '*'] };
        let (steps, first) = precedence_steps(&e, None);
        assert_eq!(verify(&steps, first), "24 / 4 = 6, 6 / 3 = 2");
        let (slipped, _) = precedence_steps(&e, Some(Slip { k: 0, delta: 1 }));
        assert_eq!(join(&slipped), "2 * 3 = 7, 7 * 4 = 28");
    }

    #[test]
    fn same_seed_same_samples_other_seed_other_samples() {
        let cfg = TaskConfig::default();
        assert_eq!(generate(&cfg, 3, 50), generate(&cfg, 3, 50));
        assert_ne!(generate(&cfg, 3, 50), generate(&cfg, 4, 50));
        assert_eq!(splits(&cfg, 3, 40, 20, 20), splits(&cfg, 3, 40, 20, 20));
    }

    #[test]
    fn pinned_first_sample() {
        // Guards the stream against silent changes (rand / rand_chacha upgrades, edits).
        let s = &generate(&with_mul(), 0, 1)[0];
        assert_eq!(eval(expr_of(&s.prompt)).to_string(), s.answer);
        insta_like(&s.prompt, &s.solution);
    }

    fn insta_like(prompt: &str, solution: &str) {
        // Printed on failure so the pinned values are easy to update deliberately.
        println!("{prompt}\n{solution}");
        assert_eq!(prompt, PINNED_PROMPT, "{solution}");
        assert_eq!(solution, PINNED_SOLUTION);
    }

    const PINNED_PROMPT: &str = "Compute 7 - 7 * 5.";
    const PINNED_SOLUTION: &str = "Attempt: 7 * 5 = 34, 7 - 34 = -27.\n\
                                   Check: 7 * 5 is 35, not 34.\n\
                                   Retry: 7 * 5 = 35, 7 - 35 = -28.\n\
                                   Verify: -28 + 35 = 7. Correct.\n\
                                   \\boxed{-28}";

    #[test]
    fn answers_are_the_true_value_and_end_the_solution() {
        for cfg in [TaskConfig::default(), with_mul()] {
            for s in generate(&cfg, 11, 3000) {
                let want = eval(expr_of(&s.prompt));
                assert_eq!(s.answer, want.to_string(), "{}", s.prompt);
                assert!(s.solution.ends_with(&format!("\n\\boxed{{{want}}}")), "{}", s.solution);
                // The retry (or the right first attempt) ends at the answer.
                let before_verify = s.solution.lines().filter(|l| !l.starts_with("Verify")).collect::<Vec<_>>();
                let worked =
                    before_verify.iter().rev().find(|l| l.starts_with("Retry") || l.starts_with("Attempt"));
                assert!(worked.unwrap().ends_with(&format!("= {want}.")), "{}", s.solution);
            }
        }
    }

    #[test]
    fn solutions_have_the_t1_shape() {
        let mut kinds = [0usize; 4]; // right first, slip, left to right, dropped term
        for s in generate(&with_mul(), 5, 3000) {
            let lines: Vec<&str> = s.solution.lines().collect();
            assert!(lines[0].starts_with("Attempt: ") && lines[1].starts_with("Check: "));
            assert!(
                lines[lines.len() - 2].starts_with("Verify: ")
                    && lines[lines.len() - 2].ends_with(" Correct.")
            );
            let retried = lines[2].starts_with("Retry: ");
            assert_eq!(lines.len(), if retried { 5 } else { 4 }, "{}", s.solution);
            // A mistake is flagged exactly when the attempt's result is wrong.
            assert_eq!(retried, attempt_value(&s.solution).to_string() != s.answer, "{}", s.solution);
            let k = if !retried {
                0
            } else if lines[1].contains(", not ") {
                1
            } else if lines[1].contains("left to right") {
                2
            } else {
                assert!(lines[1].contains("was left out"), "{}", lines[1]);
                3
            };
            kinds[k] += 1;
            // Verify walks back to the first number of the worked chain.
            let verify_end: i64 = lines[lines.len() - 2]
                .trim_end_matches(". Correct.")
                .rsplit("= ")
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let worked = if retried { lines[2] } else { lines[0] };
            let first_numbers: Vec<i64> = worked
                .split(", ")
                .filter_map(|st| {
                    st.trim_start_matches("Attempt: ")
                        .trim_start_matches("Retry: ")
                        .split(' ')
                        .next()?
                        .parse()
                        .ok()
                })
                .collect();
            assert!(first_numbers.contains(&verify_end), "{}", s.solution);
        }
        // The default mix: ~30% right first, ~35% slips, the rest structural.
        assert!(kinds.iter().all(|&k| k > 100), "{kinds:?}");
        assert!((750..1050).contains(&kinds[0]), "{kinds:?}");
    }

    #[test]
    fn splits_are_disjoint_and_full() {
        let cfg = TaskConfig::default();
        let sp = splits(&cfg, 9, 3000, 1000, 500);
        assert_eq!((sp.train.len(), sp.rl.len(), sp.test.len()), (3000, 1000, 500));
        let mut all = HashSet::new();
        for s in sp.train.iter().chain(&sp.rl).chain(&sp.test) {
            assert!(all.insert(s.prompt.clone()), "repeated prompt {}", s.prompt);
        }
        // the validation split is disjoint from all three, deterministic, and leaves them as
        // they were
        let val = validation(&cfg, 9, &sp, 300);
        assert_eq!(val.len(), 300);
        for s in &val {
            assert!(all.insert(s.prompt.clone()), "validation repeats {}", s.prompt);
        }
        assert_eq!(validation(&cfg, 9, &sp, 300), val);
        assert_eq!(splits(&cfg, 9, 3000, 1000, 500).test, sp.test);
    }

    #[test]
    #[should_panic(expected = "distinct prompts")]
    fn too_small_a_problem_space_panics_with_advice() {
        let cfg = TaskConfig { min_operands: 2, max_operands: 2, max_operand: 3, ..Default::default() };
        splits(&cfg, 0, 20, 5, 5);
    }

    #[test]
    fn knobs_are_respected() {
        let cfg = TaskConfig {
            min_operands: 3,
            max_operands: 3,
            max_operand: 5,
            ops: "+*".into(),
            ..Default::default()
        };
        for s in generate(&cfg, 1, 500) {
            let toks: Vec<&str> = expr_of(&s.prompt).split(' ').collect();
            assert_eq!(toks.len(), 5, "{}", s.prompt);
            for t in toks.iter().step_by(2) {
                assert!((1..=5).contains(&t.parse::<i64>().unwrap()));
            }
            assert!(toks.iter().skip(1).step_by(2).all(|o| *o == "+" || *o == "*"));
        }
        let all_right = TaskConfig { p_correct_first: 1.0, p_slip: 0.0, ..Default::default() };
        assert!(generate(&all_right, 1, 200).iter().all(|s| !s.solution.contains("Retry")));
        let all_slips = TaskConfig { p_correct_first: 0.0, p_slip: 1.0, ..Default::default() };
        assert!(generate(&all_slips, 1, 200).iter().all(|s| s.solution.contains(", not ")));
        let plus_only = TaskConfig {
            ops: "+".into(),
            min_operands: 2,
            max_operands: 2,
            p_correct_first: 0.0,
            p_slip: 0.0,
            ..Default::default()
        };
        // No structural mistake fits `a + b`, so each falls back to a slip.
        assert!(generate(&plus_only, 1, 100).iter().all(|s| s.solution.contains(", not ")));
    }

    /// With `p_retry_wrong`, a solution makes 1 to `max_attempts` attempts: every wrong one
    /// is followed by a check that names its slip, only the last is right, and the count
    /// follows the probabilities (p_retry_wrong = 0.5: half the retried solutions retry once).
    #[test]
    fn retries_slip_and_are_checked_up_to_max_attempts() {
        let cfg = TaskConfig { ops: "+-*".into(), max_attempts: 4, p_retry_wrong: 0.5, ..Default::default() };
        let mut counts = [0usize; 5];
        for s in generate(&cfg, 7, 4000) {
            let lines: Vec<&str> = s.solution.lines().collect();
            let attempts: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].starts_with("Attempt: ") || lines[i].starts_with("Retry: ")).collect();
            assert!((1..=4).contains(&attempts.len()), "{}", s.solution);
            counts[attempts.len()] += 1;
            let value = |l: &str| l.trim_end_matches('.').rsplit("= ").next().unwrap().to_string();
            for (j, &i) in attempts.iter().enumerate() {
                let last = j + 1 == attempts.len();
                // every attempt but the last is wrong and checked; the last is right
                assert_eq!(value(lines[i]) == s.answer, last, "{}", s.solution);
                if !last {
                    assert!(lines[i + 1].starts_with("Check: ") && lines[i + 1] != "Check: every step is right.", "{}", s.solution);
                    if j > 0 {
                        assert!(lines[i + 1].contains(", not "), "a retry's mistake is a slip: {}", s.solution);
                    }
                }
            }
            assert!(lines[lines.len() - 2].starts_with("Verify: "), "{}", s.solution);
        }
        // 30% right first; of the retried, 1/2 retry once, 1/4 twice, 1/4 three times (the cap)
        let retried = (counts[2] + counts[3] + counts[4]) as f32;
        assert!((1000..1400).contains(&counts[1]), "{counts:?}");
        for (k, want) in [(2, 0.5), (3, 0.25), (4, 0.25)] {
            assert!((counts[k] as f32 / retried - want).abs() < 0.04, "{counts:?}");
        }
        // the fixed shape is the default, and max_attempts = 2 keeps it whatever p_retry_wrong
        let fixed = TaskConfig { ops: "+-*".into(), ..Default::default() };
        let capped = TaskConfig { p_retry_wrong: 1.0, ..fixed.clone() };
        assert_eq!(generate(&fixed, 7, 300).iter().map(|s| s.solution.matches("Retry").count()).max(), Some(1));
        assert_eq!(generate(&capped, 7, 300).iter().map(|s| s.solution.matches("Retry").count()).max(), Some(1));
    }

    #[test]
    fn invalid_configs_are_rejected_with_the_reason() {
        let cases = [
            (TaskConfig { min_operands: 1, ..Default::default() }, "min_operands"),
            (TaskConfig { max_operands: 9, ..Default::default() }, "max_operands"),
            (TaskConfig { max_operand: 0, ..Default::default() }, "max_operand"),
            (TaskConfig { ops: "+/".into(), ..Default::default() }, "ops"),
            (TaskConfig { p_correct_first: 0.7, p_slip: 0.7, ..Default::default() }, "sum <= 1"),
            (TaskConfig { max_attempts: 1, ..Default::default() }, "max_attempts"),
            (TaskConfig { max_attempts: 9, ..Default::default() }, "max_attempts"),
            (TaskConfig { p_retry_wrong: 1.5, ..Default::default() }, "p_retry_wrong"),
        ];
        for (cfg, want) in cases {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        assert!(TaskConfig::default().validate().is_ok());
    }

    #[test]
    fn config_parses_strictly() {
        let cfg: TaskConfig = serde_json::from_str(r#"{"max_operand": 20}"#).unwrap();
        assert_eq!(cfg, TaskConfig { max_operand: 20, ..Default::default() });
        assert!(serde_json::from_str::<TaskConfig>(r#"{"max_operandz": 20}"#).is_err());
    }

    #[test]
    fn conversions() {
        let s = &generate(&TaskConfig::default(), 2, 1)[0];
        let ex = sft_example(s);
        assert_eq!(ex.messages[0].content, s.prompt);
        assert_eq!(
            (ex.messages[1].role.as_str(), ex.messages[1].content.as_str()),
            ("assistant", s.solution.as_str())
        );
        assert_eq!(problem(s), Problem { prompt: s.prompt.clone(), answer: s.answer.clone() });
    }

    proptest! {
        #[test]
        fn any_valid_config_gives_true_answers(
            seed in 0u64..1000, lo in 2usize..=4, extra in 0usize..=2, m in 1u32..=30,
            ops in prop::sample::select(vec!["+", "-", "*", "+-", "-*", "+-*"]),
        ) {
            let cfg = TaskConfig { min_operands: lo, max_operands: lo + extra, max_operand: m, ops: ops.into(), ..Default::default() };
            for s in generate(&cfg, seed, 20) {
                let want = eval(expr_of(&s.prompt)).to_string();
                let boxed = format!("\\boxed{{{want}}}");
                prop_assert!(s.solution.ends_with(&boxed), "{}", s.solution);
                prop_assert_eq!(s.answer, want);
            }
        }
    }
}
