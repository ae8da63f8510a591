//! Stage 3 of T1: inference scaling. For each thinking budget B the model generates at most B
//! tokens; a response that has not finished by then is cut at B, a forced-answer cue is
//! appended, and a short answer is generated. Accuracy (the RL reward's grader), mean tokens
//! used, pass@n and majority-vote accuracy are reported per budget, and plotted.
//!
//! Every budget's run is a prefix of the largest budget's run (same seeded sampler), so the
//! model generates once at the largest budget and each smaller budget is read off by truncation.

use t1_model::FusedOps;
use std::collections::HashMap;
use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use t1_data::{ChatTokenizer, Problem};
use t1_model::Qwen2;
use t1_reward::GraderConfig;
use t1_train::{generate_sharded, Rollout, SamplingConfig};

/// How the evaluation runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Thinking budgets in tokens, ascending.
    pub budgets: Vec<usize>,
    /// Samples per problem (1 = one response; > 1 adds pass@n and maj@n).
    pub samples: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus sampling of the responses (1 = off).
    pub top_p: f32,
    /// Top-k sampling of the responses (0 = off).
    pub top_k: usize,
    /// Appended after a cut reasoning to force the final answer.
    pub forced_answer_cue: String,
    /// Tokens allowed for the forced answer.
    pub answer_tokens: usize,
    pub seed: u64,
    /// Sequences per generation batch.
    pub batch: usize,
    /// Threads each generation batch is split over (CPU: the number of cores; GPU: 1).
    pub threads: usize,
    pub grader: GraderConfig,
    /// Token ids that end a response: the ones RL stops on (the model's `eos_token_id`s and
    /// the tokenizer's EOS, `t1_train::generate::stop_ids`); empty = the tokenizer's EOS.
    pub stop: Vec<u32>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            budgets: vec![16, 32, 64, 128, 256],
            samples: 1,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            forced_answer_cue: "\nTime is up. Final answer: \\boxed{".into(),
            answer_tokens: 12,
            seed: 0,
            batch: 64,
            threads: 1,
            grader: GraderConfig::default(),
            stop: vec![],
        }
    }
}

/// Results at one budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetResult {
    pub budget: usize,
    /// Mean over problems and samples of the grader's verdict.
    pub accuracy: f32,
    /// Fraction of problems with at least one correct sample.
    pub pass_at_n: f32,
    /// Fraction of problems whose most frequent extracted answer is correct.
    pub majority_accuracy: f32,
    /// Mean reasoning tokens used (≤ budget).
    pub mean_tokens: f32,
    /// Fraction of responses that needed the forced answer.
    pub forced_fraction: f32,
}

/// Accuracy versus budget for one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub model: String,
    pub problems: usize,
    pub samples: usize,
    /// Sampling temperature (0 = greedy).
    pub temperature: f32,
    pub results: Vec<BudgetResult>,
    /// Every response as graded at the largest budget, problem by problem (`samples` each);
    /// written to `samples.jsonl` by `t1 eval`, not to eval.json.
    #[serde(skip)]
    pub responses: Vec<Response>,
}

/// One response as graded at the largest budget (a line of `samples.jsonl`, as lm-eval's
/// `--log_samples` keeps them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub prompt: String,
    pub answer: String,
    /// What was graded: the response, or its cut and the forced answer.
    pub response: String,
    pub extracted: Option<String>,
    pub correct: bool,
    /// Reasoning tokens used.
    pub tokens: usize,
    /// Whether the answer had to be forced.
    pub forced: bool,
}

/// Runs the budget sweep for one model: [`sweep`] with the model's seeded generator
/// ([`generate_sharded`], one ChaCha stream from `cfg.seed` for every call, in call order).
pub fn evaluate<B: FusedOps>(model: &Qwen2<B>, tokenizer: &ChatTokenizer, problems: &[Problem], cfg: &EvalConfig, name: &str) -> Result<EvalReport, t1_data::DataError> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let (stop, pad) = (stop_set(cfg, tokenizer), tokenizer.pad_id());
    let generate = |prompts: &[Vec<u32>], sampling: &SamplingConfig| generate_sharded(model, prompts, sampling, &stop, pad, &mut rng, cfg.threads);
    sweep(generate, tokenizer, problems, cfg, name)
}

/// The ids a response ends at: `cfg.stop`, or the tokenizer's EOS when it is empty.
fn stop_set(cfg: &EvalConfig, tokenizer: &ChatTokenizer) -> Vec<u32> {
    if cfg.stop.is_empty() {
        vec![tokenizer.eos_id()]
    } else {
        cfg.stop.clone()
    }
}

/// The budget sweep of [`evaluate`] with the model behind `generate(prompts, sampling)`, which
/// returns one rollout per prompt, ending at a stop id (`cfg.stop`) or after
/// `sampling.max_new_tokens` tokens. It is called first on the prompts (each problem's prompt
/// `cfg.samples` times, in batches of `cfg.batch`) at the largest budget with
/// `cfg.temperature`, then, budget by budget, greedily on the responses to force.
pub fn sweep(
    mut generate: impl FnMut(&[Vec<u32>], &SamplingConfig) -> Vec<Rollout>,
    tokenizer: &ChatTokenizer,
    problems: &[Problem],
    cfg: &EvalConfig,
    name: &str,
) -> Result<EvalReport, t1_data::DataError> {
    let max_budget = cfg.budgets.iter().copied().max().unwrap_or(1).max(1);
    let sampling = SamplingConfig { temperature: cfg.temperature, top_p: cfg.top_p, top_k: cfg.top_k, max_new_tokens: max_budget };
    let mut prompts = Vec::with_capacity(problems.len() * cfg.samples);
    for p in problems {
        prompts.extend(std::iter::repeat_n(tokenizer.encode_prompt(&p.prompt)?, cfg.samples));
    }
    let bar = indicatif::ProgressBar::new((prompts.len() * (1 + cfg.budgets.len())) as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("eval {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}]").expect("template"));
    let mut full = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(cfg.batch.max(1)) {
        full.extend(generate(chunk, &sampling));
        bar.inc(chunk.len() as u64);
    }
    let (mut results, mut responses) = (vec![], vec![]);
    for &budget in &cfg.budgets {
        let read = read_off(&mut generate, tokenizer, &prompts, &full, budget, cfg);
        bar.inc(prompts.len() as u64);
        let grades: Vec<t1_reward::Grade> = read
            .iter()
            .enumerate()
            .map(|(i, r)| t1_reward::grade(&r.text, &problems[i / cfg.samples].answer, &cfg.grader))
            .collect();
        let used: Vec<usize> = read.iter().map(|r| r.used).collect();
        let forced = read.iter().filter(|r| r.forced).count();
        results.push(summarise(budget, &grades, &used, forced, cfg.samples, problems, &cfg.grader));
        if budget == max_budget {
            responses = read
                .into_iter()
                .zip(grades)
                .enumerate()
                .map(|(i, (r, g))| {
                    let p = &problems[i / cfg.samples.max(1)];
                    Response { prompt: p.prompt.clone(), answer: p.answer.clone(), response: r.text, extracted: g.extracted, correct: g.correct, tokens: r.used, forced: r.forced }
                })
                .collect();
        }
    }
    bar.finish_and_clear();
    Ok(EvalReport { model: name.to_string(), problems: problems.len(), samples: cfg.samples, temperature: cfg.temperature, results, responses })
}

/// One response as read off at a budget.
#[derive(Debug, Clone, PartialEq)]
struct AtBudget {
    /// What is graded: the response, or its first `used` tokens + the cue + the forced answer.
    text: String,
    /// Reasoning tokens used (≤ budget).
    used: usize,
    /// Whether the answer was forced.
    forced: bool,
}

/// The responses `full` (to `prompts`, generated at the largest budget) as they are at
/// `budget`: one that ended with EOS within the budget is kept as is; any other is cut at the
/// budget, `cfg.forced_answer_cue` is appended, and `generate` continues it greedily for
/// `cfg.answer_tokens` (one call per `cfg.batch` cut responses, in order).
fn read_off(
    generate: &mut impl FnMut(&[Vec<u32>], &SamplingConfig) -> Vec<Rollout>,
    tokenizer: &ChatTokenizer,
    prompts: &[Vec<u32>],
    full: &[Rollout],
    budget: usize,
    cfg: &EvalConfig,
) -> Vec<AtBudget> {
    let stop = stop_set(cfg, tokenizer);
    let mut out: Vec<AtBudget> = full
        .iter()
        .map(|r| {
            let finished = r.tokens.len() <= budget && r.tokens.last().is_some_and(|t| stop.contains(t));
            let used = if finished { r.tokens.len() } else { budget.min(r.tokens.len()) };
            let text = if finished { tokenizer.decode(&r.tokens) } else { String::new() };
            AtBudget { text, used, forced: !finished }
        })
        .collect();
    let forced: Vec<usize> = (0..out.len()).filter(|&i| out[i].forced).collect();
    let cue = tokenizer.encode(&cfg.forced_answer_cue);
    let answer_cfg = SamplingConfig::greedy(cfg.answer_tokens.max(1));
    for chunk in forced.chunks(cfg.batch.max(1)) {
        // the response so far and the cue: the model continues its own reasoning
        let cut: Vec<Vec<u32>> = chunk.iter().map(|&i| full[i].tokens[..out[i].used].iter().chain(&cue).copied().collect()).collect();
        let inputs: Vec<Vec<u32>> = chunk.iter().zip(&cut).map(|(&i, c)| prompts[i].iter().chain(c).copied().collect()).collect();
        let answers = generate(&inputs, &answer_cfg);
        for ((&i, mut ids), a) in chunk.iter().zip(cut).zip(&answers) {
            ids.extend(&a.tokens);
            out[i].text = tokenizer.decode(&ids);
        }
    }
    out
}

/// Accuracy, pass@n and majority vote from the grades of `samples` responses per problem.
pub fn summarise(budget: usize, grades: &[t1_reward::Grade], used: &[usize], forced: usize, samples: usize, problems: &[Problem], grader: &GraderConfig) -> BudgetResult {
    let n = grades.len().max(1) as f32;
    let mut pass = 0usize;
    let mut majority = 0usize;
    for (p, group) in grades.chunks(samples.max(1)).enumerate() {
        pass += group.iter().any(|g| g.correct) as usize;
        if let Some(answer) = majority_answer(group) {
            majority += t1_reward::answers_match(&answer, &problems[p].answer, grader) as usize;
        }
    }
    let np = problems.len().max(1) as f32;
    BudgetResult {
        budget,
        accuracy: grades.iter().filter(|g| g.correct).count() as f32 / n,
        pass_at_n: pass as f32 / np,
        majority_accuracy: majority as f32 / np,
        mean_tokens: used.iter().sum::<usize>() as f32 / n,
        forced_fraction: forced as f32 / n,
    }
}

/// The most frequent normalised extracted answer (ties: the first seen).
pub fn majority_answer(group: &[t1_reward::Grade]) -> Option<String> {
    let mut counts: HashMap<String, (usize, usize)> = HashMap::new();
    for (i, g) in group.iter().enumerate() {
        if let Some(a) = &g.extracted {
            let e = counts.entry(t1_reward::normalize(a)).or_insert((0, i));
            e.0 += 1;
        }
    }
    counts.into_iter().max_by(|a, b| a.1 .0.cmp(&b.1 .0).then(b.1 .1.cmp(&a.1 .1))).map(|(k, _)| k)
}

/// Writes `reports` as CSV (one row per model and budget).
pub fn write_csv(path: &Path, reports: &[EvalReport]) -> std::io::Result<()> {
    let mut s = String::from("model,budget,accuracy,pass_at_n,majority_accuracy,mean_tokens,forced_fraction\n");
    for r in reports {
        for b in &r.results {
            s += &format!("{},{},{},{},{},{},{}\n", csv_field(&r.model), b.budget, b.accuracy, b.pass_at_n, b.majority_accuracy, b.mean_tokens, b.forced_fraction);
        }
    }
    std::fs::write(path, s)
}

/// `field` as one CSV field (RFC 4180): in double quotes, its quotes doubled, when it holds a
/// comma, a quote or a line break (a model directory named `lr=1e-5,bs=8`).
fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

/// One line chart as SVG: x values (log2 scale when `log_x`), one series per name.
pub fn line_chart_svg(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)], log_x: bool) -> Result<(), String> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        let x = if log_x { x.max(1e-9).log2() } else { x };
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err("nothing to plot".into());
    }
    let pad = ((y1 - y0) * 0.08).max(1e-3);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1.max(x0 + 1e-9), (y0 - pad)..(y1 + pad))
        .map_err(|e| e.to_string())?;
    let fmt_x = |x: &f64| if log_x { format!("{:.0}", 2f64.powf(*x)) } else { format!("{x:.0}") };
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).x_label_formatter(&fmt_x).draw().map_err(|e| e.to_string())?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = points.iter().map(|&(x, y)| (if log_x { x.max(1e-9).log2() } else { x }, y)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| e.to_string())?;
    }
    // the legend goes into the corner with the fewest points, so it does not cover the data
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().map(|&(x, y)| (if log_x { x.max(1e-9).log2() } else { x }, y))).collect();
    let position = match emptiest_corner(&all, (x0, x1), (y0 - pad, y1 + pad)) {
        Corner::UpperLeft => SeriesLabelPosition::UpperLeft,
        Corner::UpperRight => SeriesLabelPosition::UpperRight,
        Corner::LowerRight => SeriesLabelPosition::LowerRight,
        Corner::LowerLeft => SeriesLabelPosition::LowerLeft,
    };
    chart.configure_series_labels().position(position).border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// A corner of a chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corner {
    UpperLeft,
    UpperRight,
    LowerRight,
    LowerLeft,
}

/// The corner whose region (the outer 40% of each axis) holds the fewest `points`, first in
/// the order upper left, upper right, lower right, lower left on ties.
pub fn emptiest_corner(points: &[(f64, f64)], x: (f64, f64), y: (f64, f64)) -> Corner {
    let unit = |v: f64, (lo, hi): (f64, f64)| if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
    let count = |left: bool, upper: bool| {
        points
            .iter()
            .filter(|&&(px, py)| {
                let (u, v) = (unit(px, x), unit(py, y));
                (if left { u <= 0.4 } else { u >= 0.6 }) && (if upper { v >= 0.6 } else { v <= 0.4 })
            })
            .count()
    };
    [(Corner::UpperLeft, true, true), (Corner::UpperRight, false, true), (Corner::LowerRight, false, false), (Corner::LowerLeft, true, false)]
        .into_iter()
        .min_by_key(|&(_, left, upper)| count(left, upper))
        .map_or(Corner::UpperLeft, |(c, _, _)| c)
}

/// Accuracy vs budget, one curve per report, on a linear budget axis (its ticks are round
/// numbers; on a log axis plotters put them at powers like 2^4.3 = 20.2).
pub fn plot_budget_curves(path: &Path, reports: &[EvalReport]) -> Result<(), String> {
    let series: Vec<(String, Vec<(f64, f64)>)> =
        reports.iter().map(|r| (r.model.clone(), r.results.iter().map(|b| (b.budget as f64, b.accuracy as f64)).collect())).collect();
    line_chart_svg(path, "accuracy vs thinking budget", "thinking budget (tokens)", "accuracy", &series, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use t1_reward::Grade;

    fn g(correct: bool, e: Option<&str>) -> Grade {
        Grade { correct, extracted: e.map(String::from) }
    }

    /// A directory of this test process named after `test` (no dev-dependency for a temporary one).
    fn temp_dir(test: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("t1-eval-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A byte-level tokenizer without merges: every ASCII character is one token.
    fn char_tokenizer() -> ChatTokenizer {
        let tok = t1_data::train_bpe(&["0123456789".to_string()], 259).unwrap();
        assert_eq!(tok.encode("\\boxed{7} so").len(), 12, "one token per character");
        tok
    }

    /// A stand-in for the model. The first calls (the sweep's generation at the largest budget)
    /// answer the prompts in turn with `responses`, later ones (the forced answers) every input
    /// with `answer`; each is cut as the real generator cuts, after its first EOS or after
    /// `max_new_tokens`. Every call's inputs and sampling are recorded.
    struct Script {
        eos: u32,
        responses: Vec<Vec<u32>>,
        answer: Vec<u32>,
        served: usize,
        calls: Vec<(Vec<Vec<u32>>, SamplingConfig)>,
    }

    impl Script {
        fn new(tok: &ChatTokenizer, responses: &[&str], answer: &str) -> Self {
            Self { eos: tok.eos_id(), responses: responses.iter().map(|r| ids(tok, r)).collect(), answer: ids(tok, answer), served: 0, calls: vec![] }
        }

        fn generate(&mut self, prompts: &[Vec<u32>], sampling: &SamplingConfig) -> Vec<Rollout> {
            self.calls.push((prompts.to_vec(), sampling.clone()));
            let mut out = vec![];
            for _ in prompts {
                let script = if self.served < self.responses.len() { &self.responses[self.served] } else { &self.answer };
                self.served += 1;
                let end = script.iter().position(|&t| t == self.eos).map_or(script.len(), |i| i + 1).min(sampling.max_new_tokens);
                let tokens = script[..end].to_vec();
                out.push(Rollout { truncated: tokens.last() != Some(&self.eos), logprobs: vec![0.0; tokens.len()], tokens });
            }
            out
        }
    }

    /// `text` as tokens, `<eos>` standing for the EOS token.
    fn ids(tok: &ChatTokenizer, text: &str) -> Vec<u32> {
        let mut out = vec![];
        for (i, part) in text.split("<eos>").enumerate() {
            if i > 0 {
                out.push(tok.eos_id());
            }
            out.extend(tok.encode(part));
        }
        out
    }

    const CUE: &str = " \\boxed{";

    /// Two problems (answers 7 and 8), two samples each, budgets 4 and 10; the responses are
    /// - r0 (7): `12<eos>`, 3 tokens: finished within both budgets, no answer;
    /// - r1 (7): 13 digits, cut at 10 by `max_new_tokens`: forced at both budgets;
    /// - r2 (8): `\boxed{8}<eos>`, exactly 10 tokens: forced at 4, finished at 10;
    /// - r3 (8): `123<eos>`, exactly 4 tokens: finished at both budgets.
    ///
    /// Every forced answer is `7}<eos>`.
    fn two_problems() -> (ChatTokenizer, Vec<Problem>, EvalConfig, Script) {
        let tok = char_tokenizer();
        let problems = vec![Problem { prompt: "Compute 3 + 4.".into(), answer: "7".into() }, Problem { prompt: "Compute 2 * 4.".into(), answer: "8".into() }];
        let cfg = EvalConfig { budgets: vec![4, 10], samples: 2, temperature: 0.7, forced_answer_cue: CUE.into(), ..Default::default() };
        let script = Script::new(&tok, &["12<eos>", "1234567890123", "\\boxed{8}<eos>", "123<eos>"], "7}<eos>");
        (tok, problems, cfg, script)
    }

    fn result(budget: usize, accuracy: f32, pass_at_n: f32, majority_accuracy: f32, mean_tokens: f32, forced_fraction: f32) -> BudgetResult {
        BudgetResult { budget, accuracy, pass_at_n, majority_accuracy, mean_tokens, forced_fraction }
    }

    #[test]
    fn sweep_cuts_at_the_budget_and_forces_only_unfinished_responses() {
        let (tok, problems, cfg, mut script) = two_problems();
        let report = sweep(|p, s| script.generate(p, s), &tok, &problems, &cfg, "m").unwrap();
        // budget 4: r1 and r2 forced (cut at 4); r1's forced 7 is right, r2's is wrong; r0, r3 kept
        // (3 and 4 tokens) without an answer. maj: problem 7 votes 7 (right), problem 8 votes 7.
        // budget 10: r1 forced at 10 tokens (right); r2 kept, 10 tokens, right.
        let want = vec![result(4, 0.25, 0.5, 0.5, (3 + 4 + 4 + 4) as f32 / 4.0, 0.5), result(10, 0.5, 1.0, 1.0, (3 + 10 + 10 + 4) as f32 / 4.0, 0.25)];
        // the responses as graded at the largest budget, in problem order
        let graded: Vec<(&str, bool, usize, bool)> = report.responses.iter().map(|r| (r.answer.as_str(), r.correct, r.tokens, r.forced)).collect();
        assert_eq!(graded, [("7", false, 3, false), ("7", true, 10, true), ("8", true, 10, false), ("8", false, 4, false)]);
        assert_eq!(report.responses[2].extracted.as_deref(), Some("8"));
        assert_eq!(report, EvalReport { model: "m".into(), problems: 2, samples: 2, temperature: 0.7, results: want, responses: report.responses.clone() });
    }

    #[test]
    fn sweep_generates_once_then_forces_from_the_cut_response_and_the_cue() {
        let (tok, problems, cfg, mut script) = two_problems();
        sweep(|p, s| script.generate(p, s), &tok, &problems, &cfg, "m").unwrap();
        let (p0, p1) = (tok.encode_prompt("Compute 3 + 4.").unwrap(), tok.encode_prompt("Compute 2 * 4.").unwrap());
        let input = |prompt: &[u32], response: &str| [prompt, &tok.encode(response), &tok.encode(CUE)].concat();
        let sampling = SamplingConfig { temperature: 0.7, top_p: 1.0, top_k: 0, max_new_tokens: 10 };
        let forced = SamplingConfig::greedy(cfg.answer_tokens);
        let want = vec![
            (vec![p0.clone(), p0.clone(), p1.clone(), p1.clone()], sampling),
            (vec![input(&p0, "1234"), input(&p1, "\\box")], forced.clone()),
            (vec![input(&p0, "1234567890")], forced),
        ];
        assert_eq!(script.calls, want);
    }

    #[test]
    fn forced_text_is_the_cut_response_the_cue_and_the_answer() {
        let (tok, problems, cfg, mut script) = two_problems();
        let prompts: Vec<Vec<u32>> = problems.iter().flat_map(|p| [tok.encode_prompt(&p.prompt).unwrap(), tok.encode_prompt(&p.prompt).unwrap()]).collect();
        let mut generate = |p: &[Vec<u32>], s: &SamplingConfig| script.generate(p, s);
        let full = generate(&prompts, &SamplingConfig::greedy(10));
        let at = |text: &str, used, forced| AtBudget { text: text.into(), used, forced };
        let read = read_off(&mut generate, &tok, &prompts, &full, 4, &cfg);
        assert_eq!(read, vec![at("12", 3, false), at("1234 \\boxed{7}", 4, true), at("\\box \\boxed{7}", 4, true), at("123", 4, false)]);
        let read = read_off(&mut generate, &tok, &prompts, &full, 10, &cfg);
        assert_eq!(read, vec![at("12", 3, false), at("1234567890 \\boxed{7}", 10, true), at("\\boxed{8}", 10, false), at("123", 4, false)]);
        // the forced answer is cut at answer_tokens
        let read = read_off(&mut generate, &tok, &prompts, &full, 10, &EvalConfig { answer_tokens: 1, ..cfg });
        assert_eq!(read[1].text, "1234567890 \\boxed{7");
    }

    /// A response that ends with a stop id of the model's config which is not the tokenizer's
    /// EOS (Qwen2.5's `<|endoftext|>` beside `<|im_end|>`) is finished, as RL treats it, and is
    /// not forced.
    #[test]
    fn a_response_ending_at_any_stop_id_is_finished() {
        let tok = char_tokenizer();
        let problems = vec![Problem { prompt: "Compute 3 + 4.".into(), answer: "7".into() }];
        let other = tok.encode("Z")[0];
        assert_ne!(other, tok.eos_id());
        let mut response = tok.encode("\\boxed{7}");
        response.push(other);
        let mut script = Script { eos: tok.eos_id(), responses: vec![response], answer: ids(&tok, "8}<eos>"), served: 0, calls: vec![] };
        let cfg = EvalConfig { budgets: vec![20], samples: 1, forced_answer_cue: CUE.into(), stop: vec![tok.eos_id(), other], ..Default::default() };
        let report = sweep(|p, s| script.generate(p, s), &tok, &problems, &cfg, "m").unwrap();
        assert_eq!((report.results[0].forced_fraction, report.results[0].accuracy), (0.0, 1.0), "{report:?}");
    }

    #[test]
    fn batches_do_not_change_the_sweep() {
        let (tok, problems, cfg, mut script) = two_problems();
        let whole = sweep(|p, s| script.generate(p, s), &tok, &problems, &cfg, "m").unwrap();
        let (_, _, _, mut one_by_one) = two_problems();
        let cfg = EvalConfig { batch: 1, ..cfg };
        assert_eq!(sweep(|p, s| one_by_one.generate(p, s), &tok, &problems, &cfg, "m").unwrap(), whole);
        // 4 prompts, then 2 and 1 forced answers, one per call
        assert_eq!(one_by_one.calls.len(), 4 + 2 + 1);
        assert!(one_by_one.calls.iter().all(|(p, _)| p.len() == 1));
        let inputs = |s: &Script| s.calls.iter().flat_map(|(p, _)| p.clone()).collect::<Vec<_>>();
        assert_eq!(inputs(&one_by_one), inputs(&script));
    }

    #[test]
    fn majority_vote_ties_go_to_the_first_seen_answer() {
        let grades = |answers: &[Option<&str>]| answers.iter().map(|&a| g(false, a)).collect::<Vec<_>>();
        let vote = |answers: &[Option<&str>]| majority_answer(&grades(answers));
        // every order of four different answers (a HashMap's order changes with each map)
        let mut order = ["1", "2", "3", "4"];
        for _ in 0..24 {
            let answers: Vec<Option<&str>> = order.iter().map(|&a| Some(a)).collect();
            assert_eq!(vote(&answers).as_deref(), Some(order[0]), "{order:?}");
            next_permutation(&mut order);
        }
        // two answers twice each and one once, in every order: the pair seen first wins
        let mut order = ["1", "1", "2", "2", "3"];
        for _ in 0..30 {
            let answers: Vec<Option<&str>> = order.iter().map(|&a| Some(a)).collect();
            let first = *order.iter().find(|&&a| a != "3").unwrap();
            assert_eq!(vote(&answers).as_deref(), Some(first), "{order:?}");
            next_permutation(&mut order);
        }
        // counts beat order, after normalisation; responses without an answer do not vote
        assert_eq!(vote(&[Some("5"), Some(" 4"), Some("4")]).as_deref(), Some("4"));
        assert_eq!(vote(&[None, Some("9"), None, Some("8")]).as_deref(), Some("9"));
        assert_eq!(vote(&[None, None]), None);
        assert_eq!(vote(&[]), None);
    }

    /// Steps `xs` to its next lexicographic permutation (the first after the last).
    fn next_permutation<T: Ord>(xs: &mut [T]) {
        let Some(i) = (1..xs.len()).rev().find(|&i| xs[i - 1] < xs[i]) else {
            xs.reverse();
            return;
        };
        let j = (i..xs.len()).rev().find(|&j| xs[j] > xs[i - 1]).expect("xs[i] is larger");
        xs.swap(i - 1, j);
        xs[i..].reverse();
    }

    #[test]
    fn csv_has_a_header_and_a_row_per_model_and_budget() {
        let path = temp_dir("csv").join("eval.csv");
        let report = |model: &str, results| EvalReport { model: model.into(), problems: 2, samples: 2, temperature: 0.0, results, responses: vec![] };
        let reports = [
            report("sft/final", vec![result(4, 0.25, 0.5, 0.5, 3.75, 0.5), result(10, 0.5, 1.0, 1.0, 6.75, 0.25)]),
            report("lr=1e-5,bs=8/final", vec![result(4, 0.0, 0.0, 0.0, 4.0, 1.0)]),
        ];
        write_csv(&path, &reports).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "model,budget,accuracy,pass_at_n,majority_accuracy,mean_tokens,forced_fraction\n\
             sft/final,4,0.25,0.5,0.5,3.75,0.5\n\
             sft/final,10,0.5,1,1,6.75,0.25\n\
             \"lr=1e-5,bs=8/final\",4,0,0,0,4,1\n"
        );
        assert_eq!(csv_field("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn pass_and_majority_by_hand() {
        let problems = vec![Problem { prompt: "a".into(), answer: "3".into() }, Problem { prompt: "b".into(), answer: "5".into() }];
        // problem a: answers 3, 4, 4 → pass, majority wrong; problem b: 5, 5, none → pass, majority right
        let grades = vec![g(true, Some("3")), g(false, Some("4")), g(false, Some(" 4")), g(true, Some("5")), g(true, Some("5")), g(false, None)];
        let r = summarise(64, &grades, &[10, 20, 30, 10, 10, 10], 1, 3, &problems, &GraderConfig::default());
        assert!((r.accuracy - 0.5).abs() < 1e-6);
        assert_eq!(r.pass_at_n, 1.0);
        assert_eq!(r.majority_accuracy, 0.5);
        assert!((r.mean_tokens - 15.0).abs() < 1e-6);
        assert!((r.forced_fraction - 1.0 / 6.0).abs() < 1e-6);
    }

    #[test]
    fn plots_an_svg() {
        let path = temp_dir("plot").join("p.svg");
        let rep = EvalReport {
            model: "m".into(),
            problems: 1,
            samples: 1,
            temperature: 0.0,
            results: vec![16, 64].into_iter().map(|b| BudgetResult { budget: b, accuracy: b as f32 / 100.0, pass_at_n: 0.0, majority_accuracy: 0.0, mean_tokens: 0.0, forced_fraction: 0.0 }).collect(),
            responses: vec![],
        };
        plot_budget_curves(&path, &[rep]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<svg") && svg.contains("accuracy vs thinking budget"));
    }

    #[test]
    fn the_legend_goes_where_the_data_is_not() {
        // accuracy rising with the budget: the upper left and lower right are empty
        let rising: Vec<(f64, f64)> = (0..8).map(|i| (16.0 * (i + 1) as f64, 0.1 * i as f64)).collect();
        assert_eq!(emptiest_corner(&rising, (16.0, 128.0), (0.0, 0.7)), Corner::UpperLeft);
        // a falling loss curve: the upper right is empty
        let falling: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 10.0 / (1.0 + i as f64))).collect();
        assert_eq!(emptiest_corner(&falling, (0.0, 9.0), (0.0, 10.0)), Corner::UpperRight);
        // data in three corners: the fourth
        let three = [(0.0, 1.0), (1.0, 1.0), (1.0, 0.0), (0.5, 0.5)];
        assert_eq!(emptiest_corner(&three, (0.0, 1.0), (0.0, 1.0)), Corner::LowerLeft);
    }
}
