#!/usr/bin/env bash
# One point of the laptop task's difficulty sweep (#16): synthesise the data with some task knobs,
# train the laptop SFT preset on it, evaluate greedy on 200 test problems at a 384-token budget,
# and say where the wrong answers go (scripts/analyse_samples.py).
#
#   scripts/task_difficulty.sh OUT "task.max_operand=10 task.max_attempts=4 task.p_retry_wrong=0.4" [SFT --set values...]
#
# T1 is the t1 binary (default target/release/t1: `cargo build --release -p t1-cli`). Writes
# OUT/{data,sft,eval} and the logs; prints the SFT time and peak memory, the eval, and the analysis.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OUT \"task.k=v ...\" [sft sets...]" >&2; exit 2; }
repo="$(cd "$(dirname "$0")/.." && pwd)"
T1="${T1:-$repo/target/release/t1}"
[ -x "$T1" ] || { echo "$T1 is not an executable: build it with cargo build --release -p t1-cli, or set T1" >&2; exit 2; }
out=$1; task=$2; shift 2
mkdir -p "$out"
synth=(); for s in $task; do synth+=(--set "$s"); done
"$T1" data synth --config "$repo/configs/laptop-data.toml" --out "$out/data" "${synth[@]}" > "$out/synth.log" 2>&1
python3 - "$out/data/sft_train.jsonl" <<'PY'
import json, sys
n = sorted(len(json.loads(l)["messages"][-1]["content"]) for l in open(sys.argv[1]))
print(f"solution characters: median {n[len(n) // 2]}, p99 {n[int(len(n) * .99)]}, max {n[-1]}")
PY
sft=(--set "out_dir=$out/sft" --set "data.train=$out/data/sft_train.jsonl" --set "data.eval=$out/data/sft_val.jsonl"
     --set "data.eval_problems=$out/data/val.jsonl" --set "data.tokenizer=$out/data/tokenizer.json" --set train.eval_every=0)
for s in "$@"; do sft+=(--set "$s"); done
/usr/bin/time -f "sft: %e s, peak %M KB" "$T1" sft --config "$repo/configs/laptop-sft.toml" "${sft[@]}" > "$out/sft.log" 2>&1
tail -1 "$out/sft.log"
"$T1" eval --model "$out/sft/final" --data "$out/data/test.jsonl" --budgets 384 --temperature 0 --limit 200 --threads 2 --out "$out/eval" > "$out/eval.log" 2>&1
python3 -c "import json, sys; r = json.load(open(sys.argv[1]))[0]['results'][0]; print('greedy test accuracy', r['accuracy'], 'mean tokens', r['mean_tokens'])" "$out/eval/eval.json"
python3 "$repo/scripts/analyse_samples.py" "$out/eval/samples.jsonl"
