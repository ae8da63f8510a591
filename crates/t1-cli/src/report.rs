//! The demo's report: summary.json, report.md and the training-curve plots.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::{json, Value};
use t1_eval::EvalReport;

/// Reads a metrics.jsonl into its JSON objects (unreadable lines are skipped).
fn metrics(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn series(rows: &[Value], key: &str) -> Vec<(f64, f64)> {
    rows.iter().filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?))).collect()
}

/// The demo's runs: the SFT model, one RL run per seed, and the step of seed 0's halfway
/// checkpoint (evaluated for the budget curves).
pub struct Runs<'a> {
    pub sft_dir: &'a Path,
    pub rl_dirs: &'a [PathBuf],
    pub halfway_step: Option<usize>,
}

/// Mean and standard error of the mean (sample standard deviation over √n; 0 for one value).
pub fn mean_se(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// `reports`: the budget sweep on the test split (SFT, each seed's RL model, then seed 0's
/// halfway checkpoint when there is one); `greedy`: greedy test accuracy at the largest budget
/// (SFT, each seed's RL model). The RL loops' own evals ran on the validation split.
pub fn write(out: &Path, runs: &Runs, reports: &[EvalReport], greedy: &[EvalReport], timings: &[(String, f32)], total_s: f32) -> Result<()> {
    let seeds = runs.rl_dirs.len();
    let sft = metrics(&runs.sft_dir.join("metrics.jsonl"));
    let rl: Vec<Vec<Value>> = runs.rl_dirs.iter().map(|d| metrics(&d.join("metrics.jsonl"))).collect();
    let plot = |name: &str, title: &str, y: &str, s: Vec<(String, Vec<(f64, f64)>)>| {
        let s: Vec<_> = s.into_iter().filter(|(_, p)| !p.is_empty()).collect();
        if !s.is_empty() {
            if let Err(e) = t1_eval::line_chart_svg(&out.join(name), title, "step", y, &s, false) {
                eprintln!("warning: could not draw {name}: {e}");
            }
        }
    };
    // one curve per seed (named by its seed when there are several)
    let per_seed = |what: &str, key: &str| -> Vec<(String, Vec<(f64, f64)>)> {
        rl.iter().enumerate().map(|(i, m)| (if seeds > 1 { format!("{what}, seed {i}") } else { what.to_string() }, series(m, key))).collect()
    };
    plot("sft_loss.svg", "SFT loss", "loss", vec![("train".into(), series(&sft, "loss")), ("held-out".into(), series(&sft, "eval_loss"))]);
    let mut reward = per_seed("reward", "reward");
    reward.extend(per_seed("validation greedy", "eval_accuracy"));
    reward.extend(per_seed("validation sampled", "eval_sampled_accuracy"));
    plot("rl_reward.svg", "RL reward and validation accuracy", "value", reward);
    let mut dynamics = per_seed("entropy", "entropy");
    dynamics.extend(per_seed("kl (per sequence)", "kl"));
    plot("rl_dynamics.svg", "RL entropy and KL", "value", dynamics);
    plot("rl_length.svg", "RL response length", "tokens", per_seed("response length", "response_length"));

    let at_largest = |r: &EvalReport| r.results.last().map(|b| b.accuracy as f64).unwrap_or(0.0);
    let by_budget: serde_json::Map<String, Value> = reports
        .iter()
        .map(|r| (r.model.clone(), Value::Object(r.results.iter().map(|b| (b.budget.to_string(), json!(b.accuracy))).collect())))
        .collect();
    let rl_sampled: Vec<f64> = reports.iter().skip(1).take(seeds).map(at_largest).collect();
    let rl_greedy: Vec<f64> = greedy.iter().skip(1).take(seeds).map(at_largest).collect();
    let ((rs, rs_se), (rg, rg_se)) = (mean_se(&rl_sampled), mean_se(&rl_greedy));
    // the RL loops' own evals on the validation split: the first row is the SFT model, the last the RL model
    let loop_evals = |key: &str, last: bool| -> Vec<f64> {
        rl.iter()
            .filter_map(|m| {
                let mut rows = m.iter().filter_map(|r| r.get(key).and_then(Value::as_f64));
                if last { rows.last() } else { rows.next() }
            })
            .collect()
    };
    let mean = |xs: Vec<f64>| if xs.is_empty() { None } else { Some(mean_se(&xs).0) };
    let summary = json!({
        "sft_accuracy": reports.first().map(at_largest),
        "rl_accuracy": rl_sampled.first().map(|_| rs),
        "sft_greedy_accuracy": greedy.first().map(at_largest),
        "rl_greedy_accuracy": rl_greedy.first().map(|_| rg),
        "seeds": seeds,
        "rl_accuracy_se": rs_se,
        "rl_greedy_accuracy_se": rg_se,
        "rl_accuracy_per_seed": rl_sampled,
        "rl_greedy_accuracy_per_seed": rl_greedy,
        "sft_val_greedy_accuracy": loop_evals("eval_accuracy", false).first(),
        "rl_val_greedy_accuracy": mean(loop_evals("eval_accuracy", true)),
        "sft_val_sampled_accuracy": loop_evals("eval_sampled_accuracy", false).first(),
        "rl_val_sampled_accuracy": mean(loop_evals("eval_sampled_accuracy", true)),
        "rl_val_greedy_accuracy_per_seed": loop_evals("eval_accuracy", true),
        "rl_val_sampled_accuracy_per_seed": loop_evals("eval_sampled_accuracy", true),
        "halfway_step": runs.halfway_step,
        "accuracy_by_budget": by_budget,
        "eval": reports,
        "timings_s": timings.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "total_s": total_s,
    });
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;

    let pct = |v: f64| if v.is_finite() { format!("{:.1}%", 100.0 * v) } else { "n/a".into() };
    let pm = |(m, se): (f64, f64)| if seeds > 1 { format!("{} ± {:.1}", pct(m), 100.0 * se) } else { pct(m) };
    let list = |xs: &[f64]| xs.iter().map(|x| pct(*x)).collect::<Vec<_>>().join(", ");
    let mut md = String::from("# t1 demo report\n\nThe T1 recipe on the laptop task: SFT on trial-and-error chain-of-thought, then RL, then accuracy vs thinking budget on the test split.\n\n");
    md += &format!("## Test accuracy at the largest budget\n\nRL: the mean of {seeds} seed(s) ± its standard error; each seed's value in brackets.\n\n| | SFT | RL |\n|---|---|---|\n");
    md += &format!("| greedy | {} | {} ({}) |\n", pct(greedy.first().map(at_largest).unwrap_or(f64::NAN)), pm((rg, rg_se)), list(&rl_greedy));
    if let Some(r) = reports.first() {
        md += &format!("| sampled, T={} ({} samples each) | {} | {} ({}) |\n", r.temperature, r.samples, pct(at_largest(r)), pm((rs, rs_se)), list(&rl_sampled));
    }
    md += "\n## Test accuracy by thinking budget (sampled)\n\n| model | ";
    if let Some(r) = reports.first() {
        md += &r.results.iter().map(|b| format!("B={}", b.budget)).collect::<Vec<_>>().join(" | ");
        md += " |\n|---|";
        md += &"---|".repeat(r.results.len());
        md += "\n";
    }
    for r in reports {
        md += &format!("| {} | {} |\n", r.model, r.results.iter().map(|b| format!("{:.3}", b.accuracy)).collect::<Vec<_>>().join(" | "));
    }
    if let Some(r) = reports.first() {
        md += &format!("\n{} problems; pass@n, majority vote and mean tokens per budget are in summary.json.\n", r.problems);
    }
    md += &format!(
        "\nThe RL loops' own evaluation, on the validation split (monitoring only): greedy {} (SFT) → {} (RL, mean of the seeds); sampled at the rollout temperature {} (SFT) → {}.\n",
        pct(loop_evals("eval_accuracy", false).first().copied().unwrap_or(f64::NAN)), pct(mean(loop_evals("eval_accuracy", true)).unwrap_or(f64::NAN)),
        pct(loop_evals("eval_sampled_accuracy", false).first().copied().unwrap_or(f64::NAN)), pct(mean(loop_evals("eval_sampled_accuracy", true)).unwrap_or(f64::NAN)),
    );
    md += "\n![accuracy vs budget](accuracy_vs_budget.svg)\n\n## Training curves\n\n![SFT loss](sft_loss.svg)\n\n![RL reward](rl_reward.svg)\n\n![RL dynamics](rl_dynamics.svg)\n\n![RL length](rl_length.svg)\n\n## Where the time went\n\n| stage | seconds |\n|---|---|\n";
    for (k, v) in timings {
        md += &format!("| {k} | {v:.1} |\n");
    }
    md += &format!("| total | {total_s:.1} |\n");
    std::fs::write(out.join("report.md"), md)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::mean_se;

    #[test]
    fn mean_and_standard_error_by_hand() {
        // 0.6, 0.7, 0.8: mean 0.7, sample sd 0.1, se 0.1 / sqrt(3)
        let (m, se) = mean_se(&[0.6, 0.7, 0.8]);
        assert!((m - 0.7).abs() < 1e-12 && (se - 0.1 / 3f64.sqrt()).abs() < 1e-12, "{m} {se}");
        assert_eq!(mean_se(&[0.5]), (0.5, 0.0));
        assert!(mean_se(&[]).0.is_nan());
    }
}
