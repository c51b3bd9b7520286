#!/usr/bin/env bash
# GPU check, in two halves, for a GPU machine that has torch 2.11 but no Rust
# toolchain, takes at most 64 MiB along and gives back a few small files.
#
#   scripts/gpu-check.sh pack [DIR]   here: strip the release binary and the
#                                     plugins into DIR (default gpu-bundle/,
#                                     git-ignored) and print their sizes
#   scripts/gpu-check.sh run [DIR]    there: run the checks with the bundle in
#                                     DIR, runs under /tmp, small summaries
#                                     (a few KB) into $OUT (default
#                                     gpu-check-out/)
#   scripts/gpu-check.sh dry-run      here: pack, then `run` on the CPU with a
#                                     tiny model, and print what would travel
#                                     and what would come back
#
# What `run` measures (configs/gpu-check.ron, ViT-B/16 at 224x224 on
# synthetic data, device "cuda": it stops at once when CUDA is not there):
#   machine.txt         GPU, driver, torch's view of CUDA
#   bench-F32.json      img/s at frozen K = 0, 6, 12, batch 16, float32, with
#   bench-Bf16.json     ATSF's share of the step; the same under bf16
#   bench-dp1.json      the bf16 bench through the data-parallel engine, one
#                       rank under torchrun (NCCL): img/s and the share of
#                       the step in collectives at each K
#   run-summary.json    a short ATSF run (128 steps, bf16): its summary.json
#   errors.txt          what a user sees for a CUDA device beyond the count
#                       and for ViT-L/16 at a batch that does not fit
#   gpu-check.log       everything printed (the progress lines cut)
# PYTHON names the Python whose torch provides the libraries (python3).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
mode=${1:-run}
bundle=${2:-gpu-bundle}
py=${PYTHON:-python3}
say() { printf '[gpu-check] %s\n' "$*"; }

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
    say "bundle $dir: $(du -sh "$dir" | cut -f1) in $(ls "$dir" | wc -l) files"
    ls -l "$dir" | awk 'NR > 1 {printf "  %8.1f MiB  %s\n", $5 / 1048576, $9}'
}

# Runs the checks with the bundle in $1, config $2, frozen prefixes $3, the
# over-large model and batch $4 $5; summaries into $out.
check() {
    local dir=$1 cfg=$2 frozen=$3 big_model=$4 big_batch=$5
    local bin="$dir/simfreeze" runs=/tmp/gpu-check-runs
    out=${OUT:-gpu-check-out}
    mkdir -p "$out"
    rm -rf "$runs"
    local log="$out/gpu-check.log"
    export SIMFREEZE_PLUGIN_PATH="$root/$dir"
    local torch_lib
    torch_lib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || {
        say "no torch in $py: set PYTHON to a Python with torch 2.11" | tee "$log"
        exit 1
    }
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    {
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        else
            echo "nvidia-smi: none"
        fi
        "$py" -c 'import torch; print("python torch", torch.__version__, "cuda available:", torch.cuda.is_available(), "devices:", torch.cuda.device_count())'
    } > "$out/machine.txt" 2>&1
    cat "$out/machine.txt"
    # Progress lines are dropped from the log that comes back.
    exec 3>&1
    exec > >(grep --line-buffered -v '^step [0-9]' | tee "$log" >&3) 2>&1
    for precision in F32 Bf16; do
        say "bench, batch 16, $precision, frozen $frozen, with ATSF's loop"
        "$bin" bench --config "$cfg" --frozen "$frozen" --steps 30 --rounds 3 --batch 16 \
            --set "train.precision=$precision" --policy atsf --json > "$out/bench-$precision.json"
        local rc=$?
        if [ $rc -ne 0 ]; then
            say "bench failed (exit $rc): see above"
            [ $rc -eq 2 ] && exit 2 # no CUDA: nothing else would measure a GPU
        fi
        cat "$out/bench-$precision.json"
    done
    say "data-parallel bench, 1 rank under torchrun (NCCL when built, else Gloo), bf16"
    "$py" -m torch.distributed.run --standalone --nproc-per-node 1 --no-python \
        "$bin" bench --config "$cfg" --frozen "$frozen" --steps 10 --rounds 2 --batch 16 \
        --set train.precision=Bf16 --json > "$out/bench-dp1.json"
    cat "$out/bench-dp1.json"
    say "short ATSF run (bf16)"
    "$bin" run --config "$cfg" --set train.precision=Bf16 --set "output=\"$runs\"" > /dev/null
    cp "$runs"/gpu-check-001/summary.json "$out/run-summary.json" 2>/dev/null && cat "$out/run-summary.json"
    say "what a user sees: a CUDA device beyond the count, a batch that does not fit"
    {
        "$bin" run --config "$cfg" --set 'train.device="cuda:99"' --set "output=\"$runs\""
        echo "exit $?"
        "$bin" run --config "$cfg" --set "model.preset=\"$big_model\"" --set "train.batch=$big_batch" \
            --set "data.source=Synthetic(train: $big_batch, eval: 16, classes: 10)" --set "output=\"$runs\"" \
            --set policy=None
        echo "exit $?"
    } > "$out/errors.txt" 2>&1
    grep -v '^step [0-9]' "$out/errors.txt"
    say "done; $out holds: $(du -sh "$out" | cut -f1)"
    ls -l "$out" | awk 'NR > 1 {printf "  %6.1f KiB  %s\n", $5 / 1024, $9}'
}

case "$mode" in
    pack) pack "$bundle" ;;
    run) check "$bundle" configs/gpu-check.ron 0,6,12 vit_large_patch16_224 4096 ;;
    dry-run)
        [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && py=.venv/bin/python
        pack "$bundle"
        say "would carry: $(du -sb "$bundle" | awk '{printf "%.1f MiB", $1 / 1048576}') (limit 64 MiB, the working tree included)"
        # A tiny model on the CPU walks every step of `run`.
        tmp=$(mktemp -d)
        sed -e 's/vit_base_patch16_224"/tiny_fmnist", image_size: 28, channels: 3, depth: 4/' \
            -e 's/device: "cuda"/device: "cpu"/' configs/gpu-check.ron > "$tmp/dry.ron"
        # The "too large" case asks the CPU for a batch it refuses quickly.
        OUT=${OUT:-$tmp/out} check "$bundle" "$tmp/dry.ron" 0,2,4 tiny_fmnist 4
        say "would return: $(du -sb "${OUT:-$tmp/out}" | awk '{printf "%.1f KiB", $1 / 1024}') in $(ls "${OUT:-$tmp/out}" | wc -l) files"
        ;;
    *) echo "usage: scripts/gpu-check.sh pack [DIR] | run [DIR] | dry-run" >&2; exit 2 ;;
esac
