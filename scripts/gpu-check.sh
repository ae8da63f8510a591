#!/usr/bin/env bash
# The GPU check of t1 on a machine with one NVIDIA GPU, with a `--features cuda` t1 built
# elsewhere (nothing is built here), in at most ~8 minutes:
#   1. t1 crosscheck --devices flex,cuda (logits, log-probs, losses, gradients, an AdamW step);
#   2. t1 bench sft|generate on cuda, f32 and bf16, for the 18M and 0.5B shapes: tokens/s, MFU
#      against the GPU's dense bf16 peak, peak GPU memory (nvidia-smi sampled every 100 ms);
#   3. benches/reference.py (PyTorch + transformers) on the same GPU and shapes;
#   4. a bf16 SFT run with f32 master weights on cuda (t1 sft, 3 steps, resume state saved);
#   5. t1 plan for the benched SFT shape against the measured peak.
# It prints one JSON summary (also written to OUT/summary.json).
#
#   scripts/gpu-check.sh T1_BINARY[.gz] [OUT_DIR]
#
# Needs python3 with numpy, safetensors, torch and transformers (the GPU image has them) and
# the NVRTC / NCCL pip wheels (nvidia-cuda-nvrtc, nvidia-nccl-cu13), whose lib folders are put
# on LD_LIBRARY_PATH. The inputs (random checkpoints, the tiny task) are made before anything
# needs CUDA, so on a machine without a GPU the script stops at step 1 with exit code 3.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:?usage: scripts/gpu-check.sh T1_BINARY[.gz] [OUT_DIR]}
out=${2:-$(mktemp -d)}
py=${PYTHON:-python3}
mkdir -p "$out"
log() { echo "== $* ($SECONDS s)" >&2; }

if [[ "$bin" == *.gz ]]; then
  gunzip -c "$bin" > "$out/t1"
  chmod +x "$out/t1"
  bin="$out/t1"
fi
"$bin" --version >/dev/null

log "inputs: random Qwen2 checkpoints (18M, 0.5B shapes) and the tiny task"
mk() { [ -f "$out/$1/config.json" ] || "$py" "$here/benches/make_random_qwen2.py" --out "$out/$1" "${@:2}" >/dev/null; }
# GPU_CHECK_SHAPES narrows the shapes (the repository's test runs the script with m18 only)
shapes=${GPU_CHECK_SHAPES:-m18 q05}
for m in $shapes; do
  case $m in
    m18) mk m18 ;;
    q05) mk q05 --layers 24 --hidden 896 --heads 14 --kv-heads 2 --intermediate 4864 --vocab 151936 ;;
    *) echo "gpu-check: unknown shape $m in GPU_CHECK_SHAPES (m18, q05)" >&2; exit 2 ;;
  esac
done
if [ ! -f "$out/task/tokenizer.json" ]; then
  "$bin" data synth --out "$out/task" --set splits.train=256 --set splits.rl=16 --set splits.test=16 > "$out/synth.log" 2>&1 \
    || { echo "gpu-check: t1 data synth failed: $(tail -3 "$out/synth.log")" >&2; exit 1; }
fi

log "CUDA: driver, NVRTC and NCCL"
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU here (nvidia-smi is missing or finds no device); the inputs are in $out" >&2
  exit 3
fi
for mod in nvidia.cuda_nvrtc nvidia.nccl nvidia.cu13; do
  dir=$("$py" -c "import $mod, os; print(os.path.join(list($mod.__path__)[0], 'lib'))" 2>/dev/null || true)
  [ -d "$dir" ] && export LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
done
gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)
echo "$gpu" > "$out/gpu.txt"

# peak GPU memory of a command: nvidia-smi's memory.used sampled every 100 ms, minus the idle use
deadline=$(( SECONDS + 540 ))
with_peak() {
  local name=$1; shift
  if [ $SECONDS -ge $deadline ]; then
    echo "{\"name\": \"$name\", \"rc\": \"skipped: the check's 9 minutes were used\", \"gpu_used_mib\": null}" > "$out/$name.peak"
    return
  fi
  local base; base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 > "$out/$name.mem" 2>/dev/null &
  local sampler=$!
  local rc=0
  timeout 60 "$@" > "$out/$name.json" 2> "$out/$name.err" || rc=$?
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  local peak; peak=$(grep -E '^[0-9]+$' "$out/$name.mem" | sort -n | tail -1)
  local used=null
  if [[ "$peak" =~ ^[0-9]+$ && "$base" =~ ^[0-9]+$ ]]; then used=$(( peak - base )); fi
  # nvidia-smi's process-wide figure, above the idle use (PyTorch's own allocator peak stays in its JSON as peak_gpu_mib)
  echo "{\"name\": \"$name\", \"rc\": $rc, \"gpu_used_mib\": $used}" > "$out/$name.peak"
  [ $rc -eq 0 ] || echo "gpu-check: $name failed (rc $rc): $(tail -3 "$out/$name.err")" >&2
}

log "1. crosscheck flex,cuda"
timeout 90 "$bin" crosscheck --devices flex,cuda > "$out/crosscheck.txt" 2>&1 && echo 0 > "$out/crosscheck.rc" || echo $? > "$out/crosscheck.rc"

log "2-3. t1 bench and PyTorch on cuda"
for m in $shapes; do
  for dt in f32 bf16; do
    torch_dt=$([ $dt = f32 ] && echo float32 || echo bfloat16)
    with_peak "t1-sft-$m-$dt" "$bin" bench sft --model "$out/$m" --batch 8 --seq 512 --steps 5 --dtype $dt --device cuda
    with_peak "torch-sft-$m-$dt" "$py" "$here/benches/reference.py" sft --model "$out/$m" --batch 8 --seq 512 --steps 5 --dtype $torch_dt --device cuda
    with_peak "t1-gen-$m-$dt" "$bin" bench generate --model "$out/$m" --batch 64 --prompt 64 --new 128 --dtype $dt --device cuda
    with_peak "torch-gen-$m-$dt" "$py" "$here/benches/reference.py" generate --model "$out/$m" --batch 64 --prompt 64 --new 128 --dtype $torch_dt --device cuda
  done
done

log "4. bf16 SFT with f32 master weights on cuda"
with_peak "t1-sft-master-bf16" "$bin" sft --config "$here/configs/laptop-sft.toml" --device cuda \
  --set out_dir="\"$out/sft-bf16\"" --set data.train="\"$out/task/sft_train.jsonl\"" --set data.eval="\"$out/task/sft_val.jsonl\"" \
  --set data.eval_problems="\"\"" --set data.tokenizer="\"$out/task/tokenizer.json\"" --set model.dtype="\"bf16\"" \
  --set train.max_steps=3 --set train.threads=1 --set train.save_every=3
test -f "$out/sft-bf16/checkpoint-000003/master/config.json" && echo 1 > "$out/master.ok" || echo 0 > "$out/master.ok"

log "5. plan against the measured peak (0.5B shape, bf16 SFT 8 x 512)"
printf 'out_dir = "%s"\n[model]\ncheckpoint = "%s"\ndtype = "bf16"\n[data]\ntrain = "x"\nmax_len = 512\n[train]\nbatch_size = 8\n[optim]\nmaster_weights = false\n' "$out/unused" "$out/q05" > "$out/plan-q05.toml"
"$bin" plan sft --config "$out/plan-q05.toml" --device cuda --json > "$out/plan-q05.json" 2> "$out/plan-q05.err" || true

log "summary"
"$py" - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
def read(path):
    try:
        with open(path) as f:
            text = f.read().strip()
        return json.loads(text.splitlines()[-1]) if text else None
    except Exception as e:
        return {"error": str(e)}
gpu = open(os.path.join(out, "gpu.txt")).read().strip()
# dense bf16 tensor-core peaks (no sparsity), FLOP/s
peaks = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
peak = next((v for k, v in peaks.items() if k in gpu), None)
runs = {}
for p in sorted(glob.glob(os.path.join(out, "*.peak"))):
    name = os.path.basename(p)[:-5]
    r = read(os.path.join(out, name + ".json")) or {}
    r.update(read(p))
    if peak and "params" in r and r.get("bench") == "sft":
        r["mfu_bf16_peak"] = 6 * r["params"] * r["tokens_per_s"] / peak
    runs[name] = r
ratios = {}
for m in ("m18", "q05"):
    for dt in ("f32", "bf16"):
        for kind in ("sft", "gen"):
            a, b = runs.get(f"t1-{kind}-{m}-{dt}", {}), runs.get(f"torch-{kind}-{m}-{dt}", {})
            if a.get("tokens_per_s") and b.get("tokens_per_s"):
                ratios[f"{kind}-{m}-{dt}"] = {"speed_t1_over_torch": a["tokens_per_s"] / b["tokens_per_s"],
                                              "gpu_memory_t1_over_torch": (a.get("gpu_used_mib") or 0) / max(b.get("gpu_used_mib") or 1, 1)}
plan = read(os.path.join(out, "plan-q05.json"))
measured = runs.get("t1-sft-q05-bf16", {}).get("gpu_used_mib")
summary = {
    "gpu": gpu,
    "crosscheck_rc": int(open(os.path.join(out, "crosscheck.rc")).read()),
    "crosscheck_tail": open(os.path.join(out, "crosscheck.txt")).read().splitlines()[-6:],
    "runs": runs, "ratios": ratios,
    "master_weights_checkpoint": open(os.path.join(out, "master.ok")).read().strip() == "1",
    "plan_vs_measured_q05_bf16": {"plan_mib": plan["plan"]["peak"] / 2**20 if plan and "plan" in plan else None, "measured_mib": measured},
}
text = json.dumps(summary, indent=1)
open(os.path.join(out, "summary.json"), "w").write(text)
print(text)
PY
