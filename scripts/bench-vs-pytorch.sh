#!/usr/bin/env bash
# simfreeze against PyTorch eager (timm's VisionTransformer) on the same
# machine, same shape, threads, batch and frozen prefix. Not part of CI.
#
#   scripts/bench-vs-pytorch.sh [CONFIG] [THREADS]
#
# For batch 16 and 64 and frozen K = 0 and L/2 it prints both throughputs
# and simfreeze / PyTorch. Each side runs ATTEMPTS times (default 3), alternating, and keeps
# its better run, so a burst of load on a shared machine hurts neither.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
config=${1:-configs/fmnist-baseline.ron}
threads=${2:-2}
steps=${STEPS:-30}
rounds=${ROUNDS:-3}
attempts=${ATTEMPTS:-3}
bin=./target/release/simfreeze
[ -x "$bin" ] || { echo "build first: scripts/setup.sh" >&2; exit 1; }

# The model shape comes from the config, through simfreeze itself.
shape=$("$bin" bench --config "$config" --set "train.threads=$threads" --frozen 0 --steps 1 --warmup 0 --rounds 1 --json)
depth=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["depth"])' "$shape")
half=$((depth / 2))
pyargs=$(python3 -c '
import json, sys
s = json.loads(sys.argv[1])["shape"]
print(" ".join("--%s %s" % (k.replace("_", "-"), v) for k, v in s.items() if k not in ("mlp_ratio", "norm_eps")))
' "$shape")

printf '%-6s %-4s %14s %14s %8s\n' batch K simfreeze pytorch ratio
for batch in 16 64; do
    best_rs=(0 0); best_py=(0 0)
    for attempt in $(seq "$attempts"); do
        rs=$("$bin" bench --config "$config" --set "train.threads=$threads" --batch "$batch" \
            --frozen "0,$half" --steps "$steps" --rounds "$rounds" --json)
        py=$(.venv/bin/python scripts/bench_pytorch.py $pyargs --batch "$batch" \
            --frozen 0 "$half" --steps "$steps" --rounds "$rounds" --threads "$threads")
        for i in 0 1; do
            r=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["results"][int(sys.argv[2])]["images_per_sec"])' "$rs" "$i")
            p=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["results"][int(sys.argv[2])]["images_per_sec"])' "$py" "$i")
            best_rs[$i]=$(python3 -c "print(max(${best_rs[$i]}, $r))")
            best_py[$i]=$(python3 -c "print(max(${best_py[$i]}, $p))")
        done
    done
    for i in 0 1; do
        k=$([ "$i" = 0 ] && echo 0 || echo "$half")
        python3 -c "r,p=${best_rs[$i]},${best_py[$i]}; print(f'{$batch:<6} {$k:<4} {r:>10.1f} img/s {p:>8.1f} img/s {r/p:>7.2f}x')"
    done
done
echo "($threads threads, best of $attempts alternating runs x $rounds rounds x $steps steps per point)"
