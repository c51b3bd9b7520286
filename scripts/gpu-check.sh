#!/usr/bin/env bash
# GPU check: one shot on a GPU machine that has torch 2.11 but no Rust
# toolchain, no timm and no network; at most 5 minutes of device time, every
# command under `timeout`; takes at most 64 MiB along and gives back a few
# small files. It measures simfreeze against PyTorch eager on the same GPU.
#
#   scripts/gpu-check.sh pack [DIR]   here: strip the release binary and the
#                                     plugins into DIR (default gpu-bundle/,
#                                     git-ignored), add 512 small JPEGs for
#                                     the augmented run, print the sizes
#   scripts/gpu-check.sh plan [DIR]   the plan: parts, planned and maximum
#                                     seconds, bytes carried
#   scripts/gpu-check.sh run [DIR]    there: the checks, runs under /tmp,
#                                     small files into $OUT (gpu-check-out/)
#   scripts/gpu-check.sh dry-run      here: pack, plan, then `run` on the CPU
#                                     with a tiny model; what would come back
#
# Parts of `run` (configs/gpu-check.ron: ViT-B/16 at 224x224, bf16, device
# "cuda", so it stops at once when CUDA is not there):
#   preflight  ldd of the bundle against the device's torch, machine.txt, a
#              2-step CUDA bench (also the model's shape for PyTorch)
#   bench      `simfreeze bench` and PyTorch eager (scripts/bench_pytorch.py
#              --impl reference: scripts/vit_reference.py, timm's ViT without
#              timm), bf16 autocast, TF32, batch 16, 64 and 128, frozen
#              K = 0, 6, 12, the two sides in turn (order alternating by
#              batch); GPU memory of each (nvidia-smi sampled every 100 ms,
#              and PyTorch's max_memory_allocated)
#   e2e        `simfreeze run` end to end: 80 steps at batch 128 on synthetic
#              data (2 epochs; the second's img/s against the bench's), kept
#              on the GPU and, again, uploaded per batch from the host (the
#              batch thread and the side stream); and on the bundle's JPEGs
#              with augmentation; host ms per step outside the engine's
#              step, host reads per step
#   smoke      20 steps of AdamW with clipping, label smoothing and layer
#              decay under AutoFreeze (gradient norms), --stop-after then
#              --resume; the activation cache; in-memory JPEGs uploaded per
#              batch as bytes; NCCL on one rank (torchrun)
#   errors     what a user sees for cuda:99 and a batch that does not fit
# PYTHON names the Python whose torch provides the libraries (python3).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
mode=${1:-run}
bundle=${2:-gpu-bundle}
py=${PYTHON:-python3}
say() { printf '[gpu-check] %s\n' "$*"; }

# name planned-seconds timeout-seconds (the timeouts sum to 295 s: with
# the machine's start, the check stays inside 5 minutes of device time).
PARTS="preflight 12 30
bench 80 120
e2e 55 80
smoke 30 50
errors 8 15"

pack() {
    local dir=$1
    local bin=target/release/simfreeze
    if [ ! -x "$bin" ]; then
        say "no $bin: run scripts/setup.sh (or cargo build --release --workspace) first" >&2
        exit 1
    fi
    rm -rf "$dir" && mkdir -p "$dir"
    # The release profile keeps line tables (about 98 MB); stripped, the
    # binary and the plugins fit the 64 MiB that can travel.
    strip -o "$dir/simfreeze" "$bin"
    for so in target/release/lib*.so; do
        strip -o "$dir/$(basename "$so")" "$so"
    done
    # 512 training and 64 validation JPEGs (10 classes, 256x256, smooth
    # random shapes: small files) for the augmented end-to-end run.
    local pyhere=${PYTHON:-python3}
    [ -x .venv/bin/python ] && pyhere=.venv/bin/python
    "$pyhere" - "$dir/jpegs" <<'PY'
import os, random, sys
from PIL import Image, ImageDraw, ImageFilter
root = sys.argv[1]
rng = random.Random(0)
for split, n in (("train", 512), ("val", 64)):
    for i in range(n):
        c = i % 10
        img = Image.new("RGB", (256, 256), (25 * c, 128, 255 - 25 * c))
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.randrange(200), rng.randrange(200)
            d.ellipse([x, y, x + rng.randrange(20, 90), y + rng.randrange(20, 90)],
                      fill=tuple(rng.randrange(256) for _ in range(3)))
        path = os.path.join(root, split, f"c{c}", f"{i}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img.filter(ImageFilter.GaussianBlur(2)).save(path, quality=80)
PY
    say "bundle $dir: $(du -sh "$dir" | cut -f1) in $(find "$dir" -type f | wc -l) files"
    ls -l "$dir" | awk 'NR > 1 && $1 !~ /^d/ {printf "  %8.1f MiB  %s\n", $5 / 1048576, $9}'
    printf '  %8.1f MiB  jpegs/ (%s files)\n' "$(du -sb "$dir/jpegs" | awk '{print $1 / 1048576}')" \
        "$(find "$dir/jpegs" -type f | wc -l)"
}

# The plan: parts with planned and maximum seconds, and what travels.
plan() {
    local dir=$1
    say "plan (device seconds; each part's commands run under timeout, the part's maximum in all):"
    printf '  %-10s %8s %8s\n' part planned maximum
    echo "$PARTS" | awk '{printf "  %-10s %7ss %7ss\n", $1, $2, $3; p += $2; m += $3}
        END {printf "  %-10s %7ss %7ss  (limit 300 s)\n", "total", p, m}'
    local tree bund
    tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    bund=$(du -sb "$dir" 2>/dev/null | cut -f1)
    awk -v t="$tree" -v b="${bund:-0}" 'BEGIN {
        printf "  carried: %.1f MiB (working tree %.1f MiB + %s %.1f MiB; limit 64 MiB)\n",
            (t + b) / 1048576, t / 1048576, "'"$dir"'", b / 1048576 }'
    say "returned: about 20 small files (JSON, text, one log), under 100 KiB in the dry run"
}

# Runs a part's command under what is left of the part's maximum (`T`,
# from its start, set by `part`); refused when nothing is left.
# Usage: t CMD...
t() {
    local left
    left=$(awk -v a="$PART_START" -v b="$(date +%s.%N)" -v m="$T" 'BEGIN {printf "%d", m - (b - a)}')
    if [ "$left" -lt 2 ]; then
        say "no time left in this part for: $*"
        return 124
    fi
    timeout -k 5 "$left" "$@"
}

# Starts part $1: prints it and sets T (its maximum) for `t`.
part() {
    T=$(echo "$PARTS" | awk -v p="$1" '$1 == p {print $3}')
    PART_START=$(date +%s.%N)
    say "part $1 (planned $(echo "$PARTS" | awk -v p="$1" '$1 == p {print $2}') s, at most $T s)"
}

# Ends the current part: records its seconds.
part_end() {
    local secs
    secs=$(awk -v a="$PART_START" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
    echo "$1 $secs" >> "$out/times.txt"
    say "part $1 took $secs s"
}

# GPU memory sampled while a command runs: `sampled FILE CMD...` writes the
# peak MiB used on the GPU into FILE (nothing without nvidia-smi).
sampled() {
    local file=$1; shift
    if ! command -v nvidia-smi >/dev/null; then
        "$@"
        return $?
    fi
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$file.samples" 2>/dev/null &
    local sampler=$!
    "$@"
    local rc=$?
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    sort -n "$file.samples" | tail -1 > "$file"
    rm -f "$file.samples"
    return $rc
}

# Runs the checks with the bundle in $1, config $2, frozen prefixes $3, the
# over-large model and batch $4 $5, end-to-end training images $6; summaries
# into $out.
check() {
    local dir=$1 cfg=$2 frozen=$3 big_model=$4 big_batch=$5 e2e_train=$6
    local bin="$dir/simfreeze" runs=/tmp/gpu-check-runs
    out=${OUT:-gpu-check-out}
    mkdir -p "$out"
    rm -rf "$runs" "$out/times.txt"
    local log="$out/gpu-check.log"
    export SIMFREEZE_PLUGIN_PATH="$root/$dir"
    local torch_lib
    torch_lib=$(timeout 60 "$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || {
        say "no torch in $py: set PYTHON to a Python with torch 2.11" | tee "$log"
        exit 1
    }
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # Progress lines are dropped from the log that comes back.
    exec 3>&1
    exec > >(grep --line-buffered -v '^step [0-9]' | tee "$log" >&3) 2>&1

    part preflight
    {
        if command -v nvidia-smi >/dev/null; then
            timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        else
            echo "nvidia-smi: none"
        fi
        t "$py" -c 'import torch; print("python torch", torch.__version__, "cuda", torch.version.cuda, "available:", torch.cuda.is_available(), "devices:", torch.cuda.device_count())'
    } > "$out/machine.txt" 2>&1
    cat "$out/machine.txt"
    timeout 20 ldd "$bin" > "$out/ldd.txt" 2>&1
    if grep -q "not found" "$out/ldd.txt"; then
        say "the bundle does not link against $torch_lib:"
        grep "not found" "$out/ldd.txt"
        exit 1
    fi
    t "$bin" bench --config "$cfg" --frozen 0 --steps 2 --warmup 0 --rounds 1 --batch 2 \
        --set train.precision=Bf16 --json > "$out/preflight.json"
    local rc=$?
    cat "$out/preflight.json"
    if [ $rc -ne 0 ]; then
        say "the 2-step bench failed (exit $rc): see above; nothing else would measure a GPU"
        exit 2
    fi
    # PyTorch's model gets the shape simfreeze resolved.
    local pyargs
    pyargs=$(timeout 60 "$py" -c '
import json, sys
s = json.load(open(sys.argv[1]))["shape"]
print(" ".join("--%s %s" % (k.replace("_", "-"), v) for k, v in s.items() if k in ("image_size", "channels", "patch", "dim", "depth", "heads", "classes")))
' "$out/preflight.json")
    # And simfreeze's intra-op threads.
    pyargs="$pyargs --threads $(timeout 60 "$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["threads"])' "$out/preflight.json")"
    local pydev=cpu
    grep -q '"device":"cuda' "$out/preflight.json" && pydev=cuda
    part_end preflight

    part bench
    # Steps per round, rounds and untimed steps per K (the dry run on the
    # CPU takes fewer).
    local steps=${BENCH_STEPS:-10} rounds=${BENCH_ROUNDS:-3} warmup=${BENCH_WARMUP:-3}
    local b first second
    local fro_py=${frozen//,/ }
    for b in 16 64 128; do
        # The side that goes first alternates with the batch.
        if [ "$b" = 64 ]; then first=pt; second=sf; else first=sf; second=pt; fi
        for side in $first $second; do
            if [ $side = sf ]; then
                say "simfreeze bench, batch $b, bf16, frozen $frozen"
                sampled "$out/mem-sf-$b.txt" t "$bin" bench --config "$cfg" --frozen "$frozen" \
                    --steps "$steps" --rounds "$rounds" --warmup "$warmup" --batch "$b" --set train.precision=Bf16 \
                    --json > "$out/bench-sf-$b.json" || say "simfreeze bench failed (exit $?)"
                cat "$out/bench-sf-$b.json"
            else
                say "PyTorch eager (reference ViT), batch $b, bf16, frozen $frozen"
                # shellcheck disable=SC2086
                sampled "$out/mem-pt-$b.txt" t "$py" scripts/bench_pytorch.py --impl reference \
                    --device "$pydev" --precision bf16 $pyargs --batch "$b" --frozen $fro_py \
                    --steps "$steps" --rounds "$rounds" --warmup "$warmup" \
                    > "$out/bench-pt-$b.json" || say "PyTorch bench failed (exit $?)"
                cat "$out/bench-pt-$b.json"
            fi
        done
    done
    timeout 60 "$py" - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(p):
    try:
        return json.load(open(os.path.join(out, p)))
    except Exception:
        return None
def mem(p):
    try:
        return float(open(os.path.join(out, p)).read().strip())
    except Exception:
        return None
print("batch  K   simfreeze img/s  PyTorch img/s  ratio  host ms/step  reads/step  GPU MiB (nvidia-smi) sf / pt  pt max_allocated MiB")
for b in (16, 64, 128):
    sf, pt = load(f"bench-sf-{b}.json"), load(f"bench-pt-{b}.json")
    if not sf or not pt:
        print(f"{b:<6} missing"); continue
    for r, p in zip(sf["results"], pt["results"]):
        ratio = r["images_per_sec"] / p["images_per_sec"]
        print(f"{b:<6} {r['frozen']:<3} {r['images_per_sec']:>15.1f} {p['images_per_sec']:>14.1f} {ratio:>6.2f}x"
              f" {1e3 * r.get('host_seconds_per_step', 0):>12.3f} {r.get('host_reads_per_step', 0):>11.1f}"
              f"  {mem(f'mem-sf-{b}.txt')} / {mem(f'mem-pt-{b}.txt')}  {p.get('max_memory_mib')}")
PY
    part_end bench

    part e2e
    say "simfreeze run, synthetic data, batch 128, 2 epochs, bf16"
    t "$bin" run --config "$cfg" --set train.precision=Bf16 --set train.batch=128 --set train.epochs=2 \
        --set "data.source=Synthetic(train: $e2e_train, eval: 256, classes: 10)" --set policy=None \
        --set "name=\"e2e\"" --set "output=\"$runs\"" > /dev/null
    cp "$runs"/e2e-001/summary.json "$out/e2e-summary.json" 2>/dev/null
    cp "$runs"/e2e-001/metrics.csv "$out/e2e-metrics.csv" 2>/dev/null
    say "the same, the data uploaded per batch from the host (train.data_on_device=false)"
    t "$bin" run --config "$cfg" --set train.precision=Bf16 --set train.batch=128 --set train.epochs=2 \
        --set "data.source=Synthetic(train: $e2e_train, eval: 256, classes: 10)" --set policy=None \
        --set train.data_on_device=false --set "name=\"e2e-host\"" --set "output=\"$runs\"" > /dev/null
    cp "$runs"/e2e-host-001/summary.json "$out/e2e-host-summary.json" 2>/dev/null
    cp "$runs"/e2e-host-001/metrics.csv "$out/e2e-host-metrics.csv" 2>/dev/null
    say "simfreeze run, the bundle's JPEGs with augmentation, batch 64, 3 epochs, bf16"
    t "$bin" run --config "$cfg" --set train.precision=Bf16 --set train.batch=64 --set train.epochs=3 \
        --set "data.source=ImageFolder(root: \"$root/$dir/jpegs\")" --set data.augment=true \
        --set data.mean=0.5 --set data.std=0.5 --set policy=None \
        --set "name=\"jpeg\"" --set "output=\"$runs\"" > /dev/null
    cp "$runs"/jpeg-001/summary.json "$out/jpeg-summary.json" 2>/dev/null
    cp "$runs"/jpeg-001/metrics.csv "$out/jpeg-metrics.csv" 2>/dev/null
    timeout 60 "$py" - "$out" <<'PY'
import csv, json, os, sys
out = sys.argv[1]
for name, batch in (("e2e", 128), ("e2e-host", 128), ("jpeg", 64)):
    try:
        s = json.load(open(os.path.join(out, f"{name}-summary.json")))
        rows = list(csv.DictReader(open(os.path.join(out, f"{name}-metrics.csv"))))
    except Exception as e:
        print(name, "missing:", e); continue
    last = float(rows[-1]["epoch_seconds"])
    per_epoch = s["steps"] // max(len(rows), 1)
    print(f"{name}: {s['status']}, {s['steps']} steps, last epoch {per_epoch * batch / last:.1f} img/s,"
          f" whole run {s['steps'] * batch / s['train_seconds']:.1f} img/s,"
          f" host {1e3 * (s.get('host_seconds_per_step') or 0):.3f} ms/step outside the step,"
          f" {s.get('host_reads_per_step')} host reads/step")
try:
    b = json.load(open(os.path.join(out, "bench-sf-128.json")))["results"][0]
    print(f"bench at batch 128, K = 0: {b['images_per_sec']:.1f} img/s")
except Exception:
    pass
PY
    part_end e2e

    part smoke
    {
        say "AdamW, clipping, label smoothing, layer decay, AutoFreeze; --stop-after 10, then --resume"
        local smoke=(--set train.batch=32 --set "data.source=Synthetic(train: 640, eval: 64, classes: 10)"
            --set train.precision=Bf16 --set "output=\"$runs\"")
        t "$bin" run --config "$cfg" "${smoke[@]}" --set "name=\"adamw\"" --set train.optimizer=AdamW \
            --set train.clip_grad_norm=1.0 --set train.label_smoothing=0.1 --set train.layer_decay=0.75 \
            --policy autofreeze --stop-after 10 > /dev/null
        echo "stop-after exit $?"
        t "$bin" run --resume "$runs/adamw-001" > /dev/null
        echo "resume exit $?"
        cat "$runs/adamw-001/summary.json"
        echo
        say "the activation cache (6 blocks frozen from the start, 2 epochs)"
        t "$bin" run --config "$cfg" "${smoke[@]}" --set "name=\"cache\"" --set train.cache_frozen=true \
            --set train.frozen_from_start=6 --set train.epochs=2 --set policy=None > /dev/null
        echo "cache exit $?"
        cat "$runs/cache-001/summary.json"
        echo
        say "the JPEGs held in memory as bytes, uploaded per batch (train.data_on_device=false), 1 epoch"
        t "$bin" run --config "$cfg" --set train.precision=Bf16 --set train.batch=64 \
            --set "data.source=ImageFolder(root: \"$root/$dir/jpegs\")" --set data.mean=0.5 --set data.std=0.5 \
            --set train.data_on_device=false --set policy=None --set "name=\"bytes\"" --set "output=\"$runs\"" > /dev/null
        echo "bytes exit $?"
        cat "$runs/bytes-001/summary.json"
        echo
        say "data-parallel, 1 rank under torchrun (NCCL when built, else Gloo), bf16"
        t "$py" -m torch.distributed.run --standalone --nproc-per-node 1 --no-python \
            "$bin" bench --config "$cfg" --frozen "$frozen" --steps 5 --rounds 1 --warmup 1 --batch 16 \
            --set train.precision=Bf16 --json
        echo "torchrun exit $?"
    } > "$out/smoke.txt" 2>&1
    grep -v '^step [0-9]' "$out/smoke.txt"
    part_end smoke

    part errors
    {
        t "$bin" run --config "$cfg" --set 'train.device="cuda:99"' --set "output=\"$runs\""
        echo "exit $?"
        t "$bin" run --config "$cfg" --set "model.preset=\"$big_model\"" --set "train.batch=$big_batch" \
            --set "data.source=Synthetic(train: $big_batch, eval: 16, classes: 10)" --set "output=\"$runs\"" \
            --set policy=None
        echo "exit $?"
    } > "$out/errors.txt" 2>&1
    grep -v '^step [0-9]' "$out/errors.txt"
    part_end errors

    say "done; $out holds $(du -sh "$out" | cut -f1); seconds per part:"
    cat "$out/times.txt"
    ls -l "$out" | awk 'NR > 1 {printf "  %6.1f KiB  %s\n", $5 / 1024, $9}'
}

case "$mode" in
    pack) pack "$bundle" ;;
    plan) plan "$bundle" ;;
    run) check "$bundle" configs/gpu-check.ron 0,6,12 vit_large_patch16_224 4096 10240 ;;
    dry-run)
        [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && py=.venv/bin/python
        pack "$bundle"
        plan "$bundle"
        # A tiny model on the CPU walks every step of `run`.
        tmp=$(mktemp -d)
        sed -e 's/vit_base_patch16_224"/tiny_fmnist", image_size: 28, channels: 3, depth: 4/' \
            -e 's/device: "cuda"/device: "cpu"/' configs/gpu-check.ron > "$tmp/dry.ron"
        # The "too large" case asks the CPU for a batch it refuses quickly.
        BENCH_STEPS=${BENCH_STEPS:-2} BENCH_ROUNDS=${BENCH_ROUNDS:-1} BENCH_WARMUP=${BENCH_WARMUP:-1} \
            OUT=${OUT:-$tmp/out} check "$bundle" "$tmp/dry.ron" 0,2,4 tiny_fmnist 4 1280
        say "would return: $(du -sb "${OUT:-$tmp/out}" | awk '{printf "%.1f KiB", $1 / 1024}') in $(ls "${OUT:-$tmp/out}" | wc -l) files"
        ;;
    *) echo "usage: scripts/gpu-check.sh pack [DIR] | plan [DIR] | run [DIR] | dry-run" >&2; exit 2 ;;
esac
