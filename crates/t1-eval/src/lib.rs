//! Stage 3 of T1: inference scaling. For each thinking budget B the model generates at most B
//! tokens; a response that has not finished by then is cut at B, a forced-answer cue is
//! appended, and a short answer is generated. Accuracy (the RL reward's grader), mean tokens
//! used, pass@n and majority-vote accuracy are reported per budget, and plotted.
//!
//! Every budget's run is a prefix of the largest budget's run (same seeded sampler), so the
//! model generates once at the largest budget and each smaller budget is read off by truncation.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use t1_data::{ChatTokenizer, Problem};
use t1_model::Qwen2;
use t1_reward::GraderConfig;
use t1_train::{generate_sharded, SamplingConfig};

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
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            budgets: vec![16, 32, 64, 128, 256],
            samples: 1,
            temperature: 0.0,
            forced_answer_cue: "\nTime is up. Final answer: \\boxed{".into(),
            answer_tokens: 12,
            seed: 0,
            batch: 64,
            threads: 1,
            grader: GraderConfig::default(),
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
}

/// Runs the budget sweep for one model.
pub fn evaluate<B: Backend>(model: &Qwen2<B>, tokenizer: &ChatTokenizer, problems: &[Problem], cfg: &EvalConfig, name: &str) -> EvalReport {
    let max_budget = cfg.budgets.iter().copied().max().unwrap_or(1).max(1);
    let sampling = SamplingConfig { temperature: cfg.temperature, top_p: 1.0, top_k: 0, max_new_tokens: max_budget };
    let eos = tokenizer.eos_id();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let prompts: Vec<Vec<u32>> = problems.iter().flat_map(|p| std::iter::repeat_n(tokenizer.encode_prompt(&p.prompt), cfg.samples)).collect();
    let bar = indicatif::ProgressBar::new((prompts.len() * (1 + cfg.budgets.len())) as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("eval {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}]").expect("template"));
    let mut full = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(cfg.batch.max(1)) {
        full.extend(generate_sharded(model, chunk, &sampling, &[eos], tokenizer.pad_id(), &mut rng, cfg.threads));
        bar.inc(chunk.len() as u64);
    }
    let cue = tokenizer.encode(&cfg.forced_answer_cue);
    let answer_cfg = SamplingConfig::greedy(cfg.answer_tokens.max(1));
    let mut results = vec![];
    for &budget in &cfg.budgets {
        // responses that finished within the budget are kept; the others are cut and forced
        let mut texts: Vec<String> = vec![String::new(); full.len()];
        let mut used = vec![0usize; full.len()];
        let mut forced_idx = vec![];
        for (i, r) in full.iter().enumerate() {
            let finished = r.tokens.len() <= budget && r.tokens.last() == Some(&eos);
            if finished {
                texts[i] = tokenizer.decode(&r.tokens);
                used[i] = r.tokens.len();
            } else {
                forced_idx.push(i);
                used[i] = budget.min(r.tokens.len());
            }
        }
        for chunk in forced_idx.chunks(cfg.batch.max(1)) {
            let inputs: Vec<Vec<u32>> = chunk
                .iter()
                .map(|&i| prompts[i].iter().chain(&full[i].tokens[..used[i]]).chain(&cue).copied().collect())
                .collect();
            let answers = generate_sharded(model, &inputs, &answer_cfg, &[eos], tokenizer.pad_id(), &mut rng, cfg.threads);
            for (&i, a) in chunk.iter().zip(&answers) {
                let mut ids = full[i].tokens[..used[i]].to_vec();
                ids.extend(&cue);
                ids.extend(&a.tokens);
                texts[i] = tokenizer.decode(&ids);
            }
        }
        bar.inc(prompts.len() as u64);
        let grades: Vec<t1_reward::Grade> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| t1_reward::grade(t, &problems[i / cfg.samples].answer, &cfg.grader))
            .collect();
        results.push(summarise(budget, &grades, &used, forced_idx.len(), cfg.samples, problems, &cfg.grader));
    }
    bar.finish_and_clear();
    EvalReport { model: name.to_string(), problems: problems.len(), samples: cfg.samples, temperature: cfg.temperature, results }
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
            s += &format!("{},{},{},{},{},{},{}\n", r.model, b.budget, b.accuracy, b.pass_at_n, b.majority_accuracy, b.mean_tokens, b.forced_fraction);
        }
    }
    std::fs::write(path, s)
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
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// Accuracy vs budget, one curve per report.
pub fn plot_budget_curves(path: &Path, reports: &[EvalReport]) -> Result<(), String> {
    let series: Vec<(String, Vec<(f64, f64)>)> =
        reports.iter().map(|r| (r.model.clone(), r.results.iter().map(|b| (b.budget as f64, b.accuracy as f64)).collect())).collect();
    line_chart_svg(path, "accuracy vs thinking budget", "thinking budget (tokens)", "accuracy", &series, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use t1_reward::Grade;

    fn g(correct: bool, e: Option<&str>) -> Grade {
        Grade { correct, extracted: e.map(String::from) }
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
        let dir = std::env::temp_dir().join(format!("t1-eval-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.svg");
        let rep = EvalReport {
            model: "m".into(),
            problems: 1,
            samples: 1,
            temperature: 0.0,
            results: vec![16, 64].into_iter().map(|b| BudgetResult { budget: b, accuracy: b as f32 / 100.0, pass_at_n: 0.0, majority_accuracy: 0.0, mean_tokens: 0.0, forced_fraction: 0.0 }).collect(),
        };
        plot_budget_curves(&path, &[rep]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<svg") && svg.contains("accuracy vs thinking budget"));
    }
}
