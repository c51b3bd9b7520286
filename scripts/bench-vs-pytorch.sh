#!/usr/bin/env bash
# simfreeze against PyTorch eager (timm's VisionTransformer) on the same
# machine, same shape, threads, batch and frozen prefix. Not part of CI.
#
#   scripts/bench-vs-pytorch.sh [CONFIG] [THREADS]
#
# For batch 16 and 64 and frozen K = 0 and L/2 it prints both throughputs
# and simfreeze / PyTorch. The two run in turn ATTEMPTS times (default 7);
# each attempt gives one ratio, and the median ratio is quoted with its
# range, so a burst of load on a shared machine moves one pair, not the
# figure. STEPS (default 10) and ROUNDS (default 10) set each attempt:
# the best of ROUNDS rounds of STEPS steps per K.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
config=${1:-configs/fmnist-baseline.ron}
threads=${2:-2}
steps=${STEPS:-10}
rounds=${ROUNDS:-10}
attempts=${ATTEMPTS:-7}
bin=./target/release/simfreeze
[ -x "$bin" ] || { echo "build first: scripts/setup.sh" >&2; exit 1; }

# The model shape comes from the config, through simfreeze itself.
source scripts/bench-shape.sh
bench_shape "$bin" "$config" "$threads"

# One line per attempt, batch and K: "batch K simfreeze_img_s pytorch_img_s".
pairs=$(mktemp)
trap 'rm -f "$pairs"' EXIT
for batch in 16 64; do
    for attempt in $(seq "$attempts"); do
        rs=$("$bin" bench --config "$config" --set "train.threads=$threads" --batch "$batch" \
            --frozen "0,$half" --steps "$steps" --rounds "$rounds" --json)
        py=$(.venv/bin/python scripts/bench_pytorch.py $pyargs --batch "$batch" \
            --frozen 0 "$half" --steps "$steps" --rounds "$rounds" --threads "$threads")
        python3 -c '
import json, sys
rs, py = json.loads(sys.argv[1])["results"], json.loads(sys.argv[2])["results"]
for r, p in zip(rs, py):
    print(sys.argv[3], r["frozen"], r["images_per_sec"], p["images_per_sec"])
' "$rs" "$py" "$batch" >>"$pairs"
        echo "batch $batch attempt $attempt/$attempts done" >&2
    done
done
# The ratio is taken attempt by attempt (the two ran a few seconds apart),
# and its median quoted: a burst of load on a shared machine moves one
# pair, not the figure.
python3 - "$pairs" "$threads" "$attempts" "$rounds" "$steps" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
print(f"{'batch':<6} {'K':<4} {'simfreeze':>12} {'pytorch':>12} {'ratio (median)':>15} {'min-max':>12}")
for key in dict.fromkeys((r[0], r[1]) for r in rows):
    sel = [(float(r[2]), float(r[3])) for r in rows if (r[0], r[1]) == key]
    ratios = [a / b for a, b in sel]
    print(f"{key[0]:<6} {key[1]:<4} {statistics.median(a for a, _ in sel):>6.1f} img/s "
          f"{statistics.median(b for _, b in sel):>6.1f} img/s {statistics.median(ratios):>14.2f}x "
          f"{min(ratios):>5.2f}-{max(ratios):.2f}x")
t, n, r, s = sys.argv[2:]
print(f"({t} threads; {n} alternating attempts per batch, each the best of {r} rounds x {s} steps per K;"
      " throughputs are medians over attempts, the ratio the median of per-attempt ratios)")
PY
