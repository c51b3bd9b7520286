#!/usr/bin/env bash
# `simfreeze run`'s training throughput against `simfreeze bench`'s at the
# same shape and batch: what the host work around the step (batch assembly,
# uploads, policy, records) costs a real run. Not part of CI.
#
#   scripts/run-vs-bench.sh [BINARY...]
#
# Each attempt runs, for every binary in turn (default: the release build;
# give two to compare builds, paired), one epoch of 6,400 Fashion-MNIST
# images at batch 64 without a policy (training img/s from summary.json,
# evaluation excluded) and `bench` at batch 64, K = 0 (best of ROUNDS rounds
# of 20 steps). It prints per binary the run/bench ratio of every attempt,
# with min and median, and the run's host milliseconds per step outside the
# engine's step when the binary reports them. ATTEMPTS (default 3), ROUNDS
# (default 5), CONFIG (configs/fmnist-baseline.ron).
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
        if ! "$bin" run --config "$config" --set train.epochs=1 --set data.train_limit=6400 \
            --set data.eval_limit=256 --set "output=\"$out\"" > "$tmp/run.log" 2>&1; then
            echo "run failed ($bin, attempt $attempt):" >&2
            tail -5 "$tmp/run.log" >&2
            exit 1
        fi
        summary=$(ls "$out"/*/summary.json)
        ips=$("$bin" bench --config "$config" --batch 64 --frozen 0 --steps 20 --rounds "$rounds" \
            --warmup 3 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["results"][0]["images_per_sec"])')
        python3 - "$summary" "$ips" "$i" >> "$rows" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
run = s["steps"] * s["global_batch"] / s["train_seconds"]
host = s.get("host_seconds_per_step")
print(sys.argv[3], run, float(sys.argv[2]), "-" if host is None else 1e3 * host)
PY
        echo "attempt $attempt/$attempts, binary $i done" >&2
    done
done
python3 - "$rows" "${bins[@]}" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for i, b in enumerate(sys.argv[2:]):
    sel = [r for r in rows if r[0] == str(i)]
    ratios = [float(r[1]) / float(r[2]) for r in sel]
    print(f"{b}:")
    for r, q in zip(sel, ratios):
        print(f"  run {float(r[1]):7.1f} img/s  bench {float(r[2]):7.1f} img/s  run/bench {q:.3f}  host {r[3]} ms/step")
    print(f"  run/bench min {min(ratios):.3f}, median {statistics.median(ratios):.3f}")
PY
