#!/usr/bin/env bash
# Data-parallel simfreeze against PyTorch DDP on this machine: RANKS ranks
# under torchrun (Gloo), THREADS threads each, BATCH images per rank, the
# same shape and frozen prefix. Not part of CI.
#
#   scripts/bench-ddp.sh [CONFIG]
#
# For K = 0 and L/2 it runs, in turn, ATTEMPTS times (default 5):
#   simfreeze bench with the all-reduce overlapped with the backward
#     (train.overlap_allreduce: true, the default),
#   simfreeze bench with the all-reduce after the backward (false),
#   scripts/bench_pytorch.py --ddp (DistributedDataParallel, the frozen
#     parameters left out of it).
# It prints the medians of each one's img/s (every rank's images) and of
# simfreeze's communication share (the host's wait in collectives over the
# step time), and the median of the per-attempt ratios to DDP, with their
# range. STEPS (10) and ROUNDS (5) set each attempt, as in
# scripts/bench-vs-pytorch.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
config=${1:-configs/fmnist-baseline.ron}
ranks=${RANKS:-2}
threads=${THREADS:-1}
batch=${BATCH:-32}
steps=${STEPS:-10}
rounds=${ROUNDS:-5}
attempts=${ATTEMPTS:-5}
bin=${BIN:-./target/release/simfreeze}
torchrun=.venv/bin/torchrun
[ -x "$bin" ] || { echo "build first: scripts/setup.sh" >&2; exit 1; }
[ -x "$torchrun" ] || { echo "no $torchrun: run scripts/setup.sh" >&2; exit 1; }
export OMP_NUM_THREADS=$threads

# The model shape comes from the config, through simfreeze itself.
source scripts/bench-shape.sh
bench_shape "$bin" "$config" "$threads"

errors=$(mktemp)
launch() {
    "$torchrun" --standalone --nproc-per-node "$ranks" "$@" 2>"$errors" || {
        echo "failed: torchrun $*" >&2
        tail -n 20 "$errors" >&2
        exit 1
    }
}
ours() { # K OVERLAP
    launch --no-python "$bin" bench --config "$config" --set "train.threads=$threads" \
        --set "train.overlap_allreduce=$2" --batch "$batch" --frozen "$1" \
        --steps "$steps" --rounds "$rounds" --json
}
theirs() { # K
    launch scripts/bench_pytorch.py $pyargs --batch "$batch" --frozen "$1" \
        --steps "$steps" --rounds "$rounds" --threads "$threads" --ddp
}

# One line per attempt and K: "K overlap_img_s overlap_share after_img_s after_share ddp_img_s".
rows=$(mktemp)
trap 'rm -f "$rows" "$errors"' EXIT
for attempt in $(seq "$attempts"); do
    for k in 0 "$half"; do
        a=$(ours "$k" true)
        b=$(ours "$k" false)
        c=$(theirs "$k")
        python3 -c '
import json, sys
a, b, c = (json.loads(x)["results"][0] for x in sys.argv[2:5])
print(sys.argv[1], a["images_per_sec"], a["comm_share"], b["images_per_sec"], b["comm_share"], c["images_per_sec"])
' "$k" "$a" "$b" "$c" >>"$rows"
    done
    echo "attempt $attempt/$attempts done" >&2
done
python3 - "$rows" "$ranks" "$threads" "$batch" "$attempts" "$rounds" "$steps" <<'PY'
import statistics as st, sys
rows = [[float(x) for x in l.split()] for l in open(sys.argv[1])]
ranks, threads, batch, attempts, rounds, steps = sys.argv[2:]
print(f"{'K':<4} {'overlapped':>22} {'after backward':>22} {'PyTorch DDP':>12} {'overlapped/DDP':>18} {'after/DDP':>18}")
for k in dict.fromkeys(r[0] for r in rows):
    sel = [r for r in rows if r[0] == k]
    med = lambda i: st.median(r[i] for r in sel)
    def ratio(i):
        q = [r[i] / r[5] for r in sel]
        return f"{st.median(q):.2f}x ({min(q):.2f}-{max(q):.2f})"
    print(f"{int(k):<4} {med(1):>7.1f} img/s, {100 * med(2):>4.1f}% comm "
          f"{med(3):>7.1f} img/s, {100 * med(4):>4.1f}% comm {med(5):>6.1f} img/s "
          f"{ratio(1):>18} {ratio(3):>18}")
print(f"({ranks} ranks x {threads} thread(s), batch {batch} per rank, Gloo; {attempts} alternating "
      f"attempts, each the best of {rounds} rounds x {steps} steps; medians over attempts, "
      "ratios per attempt)")
PY
