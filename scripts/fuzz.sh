#!/usr/bin/env bash
# Fuzzes checkpoint and config parsing for a bounded time (fuzz/fuzz_targets):
#   safetensors  - a safetensors file through t1-model's loading path (header checks, tensor
#                  reads, name/shape checks against a tiny config, model build)
#   config_json  - config.json text through Qwen2Config::from_json and what loading does with it
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET (default 60)] [TARGET ...]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a C++ compiler. It uses a nightly toolchain
# when rustup has one, else the stable one with RUSTC_BOOTSTRAP=1 (cargo-fuzz passes nightly
# -Z flags to rustc). Inputs are at most 8 KiB and no single allocation may exceed 64 MiB, so
# an allocation sized from a header instead of the file is a finding. Findings are written to
# fuzz/artifacts/TARGET/; the corpus grows in fuzz/corpus/TARGET/ (seeded from fuzz/seeds/).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors config_json)

command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is not installed: run cargo install cargo-fuzz" >&2; exit 1; }
toolchain=()
if rustup run nightly rustc --version >/dev/null 2>&1; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi

for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  for f in "seeds/$t"/*; do [ -e "corpus/$t/${f##*/}" ] || cp "$f" "corpus/$t/"; done
  echo "== fuzzing $t for ${secs}s"
  cargo "${toolchain[@]}" fuzz run "$t" "corpus/$t" -- \
    -max_total_time="$secs" -max_len=8192 -malloc_limit_mb=64 -rss_limit_mb=2048 -timeout=10 \
    -dict="$t.dict" -print_final_stats=1
done
