//! The demo's report: summary.json, report.md and the training-curve plots.

use std::path::Path;

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

/// `reports`: the budget sweep on the test split (SFT, RL); `greedy`: greedy test accuracy at
/// the largest budget (SFT, RL). The RL loop's own evals ran on the validation split.
pub fn write(out: &Path, sft_dir: &Path, rl_dir: &Path, reports: &[EvalReport], greedy: &[EvalReport], timings: &[(&str, f32)], total_s: f32) -> Result<()> {
    let sft = metrics(&sft_dir.join("metrics.jsonl"));
    let rl = metrics(&rl_dir.join("metrics.jsonl"));
    let plot = |name: &str, title: &str, y: &str, s: Vec<(String, Vec<(f64, f64)>)>| {
        let s: Vec<_> = s.into_iter().filter(|(_, p)| !p.is_empty()).collect();
        if !s.is_empty() {
            if let Err(e) = t1_eval::line_chart_svg(&out.join(name), title, "step", y, &s, false) {
                eprintln!("warning: could not draw {name}: {e}");
            }
        }
    };
    plot("sft_loss.svg", "SFT loss", "loss", vec![("train".into(), series(&sft, "loss")), ("held-out".into(), series(&sft, "eval_loss"))]);
    plot("rl_reward.svg", "RL reward and accuracy", "value", vec![
        ("reward".into(), series(&rl, "reward")),
        ("train accuracy".into(), series(&rl, "accuracy")),
        ("validation accuracy (greedy)".into(), series(&rl, "eval_accuracy")),
        ("validation accuracy (sampled)".into(), series(&rl, "eval_sampled_accuracy")),
    ]);
    plot("rl_dynamics.svg", "RL entropy, KL and log-prob gap", "value", vec![
        ("entropy".into(), series(&rl, "entropy")),
        ("kl (per sequence)".into(), series(&rl, "kl")),
        ("logprob gap max".into(), series(&rl, "logprob_gap_max")),
        ("clip fraction".into(), series(&rl, "clip_fraction")),
    ]);
    plot("rl_length.svg", "RL response length", "tokens", vec![("response length".into(), series(&rl, "response_length"))]);

    let at_largest = |r: &EvalReport| r.results.last().map(|b| b.accuracy).unwrap_or(0.0);
    let by_budget: serde_json::Map<String, Value> = reports
        .iter()
        .map(|r| (r.model.clone(), Value::Object(r.results.iter().map(|b| (b.budget.to_string(), json!(b.accuracy))).collect())))
        .collect();
    // the RL loop's own evals on the validation split: step 0 is the SFT model, the last one the RL model
    let rl_evals: Vec<&Value> = rl.iter().filter(|r| r.get("eval_accuracy").is_some()).collect();
    let loop_eval = |row: Option<&&Value>, key: &str| row.and_then(|r| r.get(key)).and_then(Value::as_f64);
    let (first, last) = (rl_evals.first(), rl_evals.last());
    let summary = json!({
        "sft_accuracy": reports.first().map(at_largest),
        "rl_accuracy": reports.get(1).map(at_largest),
        "sft_greedy_accuracy": greedy.first().map(at_largest),
        "rl_greedy_accuracy": greedy.get(1).map(at_largest),
        "sft_val_greedy_accuracy": loop_eval(first, "eval_accuracy"),
        "rl_val_greedy_accuracy": loop_eval(last, "eval_accuracy"),
        "sft_val_sampled_accuracy": loop_eval(first, "eval_sampled_accuracy"),
        "rl_val_sampled_accuracy": loop_eval(last, "eval_sampled_accuracy"),
        "accuracy_by_budget": by_budget,
        "eval": reports,
        "timings_s": timings.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "total_s": total_s,
    });
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;

    let mut md = String::from("# t1 demo report\n\nThe T1 recipe on the laptop task: SFT on trial-and-error chain-of-thought, then RL, then accuracy vs thinking budget on the held-out split.\n\n");
    md += "## Held-out accuracy by thinking budget\n\n| model | ";
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
        md += &format!("\n{} problems, {} sample(s) each at temperature {}; pass@n and majority vote are in summary.json.\n", r.problems, r.samples, r.temperature);
    }
    let pct = |v: Option<f64>| v.map(|x| format!("{:.1}%", 100.0 * x)).unwrap_or_else(|| "n/a".into());
    let pct32 = |v: Option<f32>| pct(v.map(f64::from));
    md += &format!(
        "\nGreedy on the test split at the largest budget: {} (SFT) → {} (RL).\n",
        pct32(greedy.first().map(at_largest)), pct32(greedy.get(1).map(at_largest)),
    );
    md += &format!(
        "\nThe RL loop's own evaluation, on the validation split (monitoring only, full budget): greedy {} (SFT) → {} (RL); sampled at the rollout temperature {} (SFT) → {} (RL).\n",
        pct(loop_eval(first, "eval_accuracy")), pct(loop_eval(last, "eval_accuracy")),
        pct(loop_eval(first, "eval_sampled_accuracy")), pct(loop_eval(last, "eval_sampled_accuracy")),
    );
    md += "\n![accuracy vs budget](accuracy_vs_budget.svg)\n\n## Training curves\n\n![SFT loss](sft_loss.svg)\n\n![RL reward](rl_reward.svg)\n\n![RL dynamics](rl_dynamics.svg)\n\n![RL length](rl_length.svg)\n\n## Where the time went\n\n| stage | seconds |\n|---|---|\n";
    for (k, v) in timings {
        md += &format!("| {k} | {v:.1} |\n");
    }
    md += &format!("| total | {total_s:.1} |\n");
    std::fs::write(out.join("report.md"), md)?;
    Ok(())
}
