#!/usr/bin/env bash
# SFT tokens/s with and without data.packing (#19), on the laptop task and on a long-tailed
# length mix made from it, alternating the two settings (absolute numbers drift; compare the
# ratio within a round).
# usage: bash benches/packing.sh [T1_BINARY] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
t1=${1:-target/release/t1}
steps=${2:-40}
work=$(mktemp -d)
"$t1" data synth --out "$work/data" >/dev/null 2>&1
# long-tailed: each response repeated k times, k = 1 (60%), 2 (25%), 4 (10%), 8 (5%), so most
# rows are short and a few fill data.max_len
python3 - "$work/data/sft_train.jsonl" "$work/data/longtail.jsonl" <<'PY'
import json, random, sys
random.seed(0)
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as out:
    for line in f:
        ex = json.loads(line)
        k = random.choices([1, 2, 4, 8], weights=[60, 25, 10, 5])[0]
        for m in ex["messages"]:
            if m["role"] == "assistant":
                m["content"] = "\n".join([m["content"]] * k)
        out.write(json.dumps(ex) + "\n")
PY
for round in 1 2 3; do
  for data in sft_train longtail; do
    for packing in false true; do
      out="$work/run-$data-$packing-$round"
      "$t1" sft --config configs/laptop-sft.toml --set "out_dir=\"$out\"" --set "data.train=\"$work/data/$data.jsonl\"" \
        --set "data.tokenizer=\"$work/data/tokenizer.json\"" --set 'data.eval=""' --set 'data.eval_problems=""' \
        --set "train.max_steps=$steps" --set train.eval_every=0 --set "train.save_every=$((steps * 10))" \
        --set "data.packing=$packing" >/dev/null 2>&1
      python3 - "$out/metrics.jsonl" "$data" "$packing" "$round" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
start = next(r for r in rows if r.get("event") == "start")
end = next(r for r in rows if r.get("event") == "end")["summary"]
print(f"round {sys.argv[4]} {sys.argv[2]:9s} packing={sys.argv[3]:5s} rows {start['train_rows']:6d} of {start['train_examples']} examples, {end['tokens_per_s']:8.0f} tokens/s")
PY
    done
  done
done
rm -rf "$work"
