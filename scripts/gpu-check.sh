#!/usr/bin/env bash
# GPU check: is CUDA usable from simfreeze, how fast is ViT-B/16 at batch 16
# with frozen K = 0, 6, 12 (synthetic 224x224 inputs, float32 and bf16), and
# does a short ATSF run work. Needs a built release binary and plugins
# (target/release; build on a machine with a Rust toolchain against pip
# torch 2.11.0 and copy them over) and a Python with torch 2.11 for its
# libraries. Writes everything it prints to ${OUT:-gpu-check-out}/gpu-check.log.
#
#   scripts/gpu-check.sh [PYTHON]
# GPU_CHECK_CONFIG=FILE replaces configs/gpu-check.ron and GPU_CHECK_FROZEN
# the frozen prefixes (a smaller model makes a quick dry run on a CPU).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${1:-python3}
out=${OUT:-gpu-check-out}
mkdir -p "$out"
log="$out/gpu-check.log"
exec > >(tee "$log") 2>&1

torch_lib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin=./target/release/simfreeze
cfg=${GPU_CHECK_CONFIG:-configs/gpu-check.ron}
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: none"
"$py" -c 'import torch; print("python torch", torch.__version__, "cuda available:", torch.cuda.is_available())'
echo "== simfreeze sees"
"$bin" bench --config "$cfg" --frozen 0 --steps 1 --rounds 1 --warmup 0 --batch 2 --json \
    | "$py" -c 'import json, sys; r = json.load(sys.stdin); print("device:", r.get("device"))'
for precision in F32 Bf16; do
    echo "== bench ($cfg), batch 16, $precision (img/s per frozen K; the model's ratio 3L/(3L-2K))"
    "$bin" bench --config "$cfg" --frozen "${GPU_CHECK_FROZEN:-0,6,12}" --steps 30 --rounds 3 --batch 16 \
        --set "train.precision=$precision" --policy atsf
done
echo "== short ATSF run (128 steps, bf16)"
"$bin" run --config "$cfg" --set train.precision=Bf16 --set "output=\"$out/runs\"" \
    | "$py" -c 'import json, sys; s = json.load(sys.stdin); print({k: s[k] for k in ("status", "final_top1", "train_seconds", "steps", "compute_speedup", "freeze_step")})'
echo "== done"
