#!/usr/bin/env bash
# The scaling table of BENCHMARKS.md: t1 SFT step time and peak memory against batch, sequence
# length and model size, and decoding throughput against the number of new tokens.
# Usage: bash benches/scaling.sh [T1_BINARY] [THREADS]   (needs: pip install numpy safetensors)
set -euo pipefail
t1=${1:-target/release/t1}
threads=${2:-2}
dir=${TMPDIR:-/tmp}/t1-scaling
mk() { [ -f "$dir/$1/config.json" ] || python3 "$(dirname "$0")/make_random_qwen2.py" --out "$dir/$1" "${@:2}" >/dev/null; }
mk m3 --layers 4 --hidden 256 --heads 4 --kv-heads 2 --intermediate 704
mk m18
mk m50 --layers 8 --hidden 768 --heads 12 --kv-heads 2 --intermediate 2048
for run in "m18 4 256" "m18 8 256" "m18 16 256" "m18 8 128" "m18 8 512" "m3 8 256" "m50 8 256"; do
  set -- $run
  "$t1" bench sft --model "$dir/$1" --batch "$2" --seq "$3" --steps 2 --threads "$threads"
done
for new in 32 128 512; do
  "$t1" bench generate --model "$dir/m18" --batch 16 --prompt 32 --new "$new" --threads "$threads"
done
