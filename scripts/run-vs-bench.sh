#!/usr/bin/env bash
# `simfreeze run`'s training throughput against `simfreeze bench`'s at the
# same shape and batch: what the host work around the step (batch assembly,
# uploads, policy, records) costs a real run. Not part of CI.
#
#   scripts/run-vs-bench.sh [BINARY...]
#
# Each attempt runs, for every binary in turn (default: the release build;
# give two to compare builds, paired), two epochs of 3,200 Fashion-MNIST
# images at batch 64 without a policy, and `bench` at batch 64, K = 0
# (ROUNDS rounds of 20 steps). It prints per binary and attempt two ratios:
#   steady: the run's second epoch (training seconds from metrics.csv,
#           evaluation excluded) against bench's median round: both past
#           their first steps, neither picked as the best;
#   whole:  the whole run (summary.json: first steps included) against
#           bench's best round (a bound the run's average cannot reach on a
#           noisy machine);
# with min and median, and the run's host milliseconds per step outside
# the engine's step when the binary reports them. ATTEMPTS (default 3),
# ROUNDS (default 5), CONFIG (configs/fmnist-baseline.ron). A binary whose
# bench has no median reports the best round in both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
attempts=${ATTEMPTS:-3}
rounds=${ROUNDS:-5}
config=${CONFIG:-configs/fmnist-baseline.ron}
bins=("$@")
[ ${#bins[@]} -eq 0 ] && bins=(./target/release/simfreeze)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rows="$tmp/rows"
for attempt in $(seq "$attempts"); do
    for i in "${!bins[@]}"; do
        bin=${bins[$i]}
        out="$tmp/runs-$i-$attempt"
        if ! "$bin" run --config "$config" --set train.epochs=2 --set data.train_limit=3200 \
            --set data.eval_limit=256 --set "output=\"$out\"" > "$tmp/run.log" 2>&1; then
            echo "run failed ($bin, attempt $attempt):" >&2
            tail -5 "$tmp/run.log" >&2
            exit 1
        fi
        summary=$(ls "$out"/*/summary.json)
        "$bin" bench --config "$config" --batch 64 --frozen 0 --steps 20 --rounds "$rounds" \
            --warmup 3 --json > "$tmp/bench.json"
        python3 - "$summary" "$tmp/bench.json" "$i" >> "$rows" <<'PY'
import csv, json, os, sys
s = json.load(open(sys.argv[1]))
b = json.load(open(sys.argv[2]))["results"][0]
metrics = list(csv.DictReader(open(os.path.join(os.path.dirname(sys.argv[1]), "metrics.csv"))))
steps = s["steps"] // len(metrics)
second = steps * s["global_batch"] / float(metrics[-1]["epoch_seconds"])
run = s["steps"] * s["global_batch"] / s["train_seconds"]
host = s.get("host_seconds_per_step")
best = b["images_per_sec"]
print(sys.argv[3], second, b.get("median_images_per_sec", best), run, best,
      "-" if host is None else 1e3 * host)
PY
        echo "attempt $attempt/$attempts, binary $i done" >&2
    done
done
python3 - "$rows" "${bins[@]}" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for i, b in enumerate(sys.argv[2:]):
    sel = [r for r in rows if r[0] == str(i)]
    steady = [float(r[1]) / float(r[2]) for r in sel]
    whole = [float(r[3]) / float(r[4]) for r in sel]
    print(f"{b}:")
    for r, q, w in zip(sel, steady, whole):
        print(f"  epoch 2 {float(r[1]):7.1f} img/s  bench median {float(r[2]):7.1f}  steady {q:.3f}"
              f"  |  run {float(r[3]):7.1f}  bench best {float(r[4]):7.1f}  whole {w:.3f}  host {r[5]} ms/step")
    print(f"  steady min {min(steady):.3f}, median {statistics.median(steady):.3f};"
          f" whole min {min(whole):.3f}, median {statistics.median(whole):.3f}")
PY
