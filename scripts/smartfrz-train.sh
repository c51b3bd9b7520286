#!/usr/bin/env bash
# Makes SmartFRZ's predictor, the weights the smartfrz plugin ships
# (strategies/field/smartfrz-predictor.json), from simfreeze runs on the
# regime proxy's *source* task only (Fashion-MNIST classes 0, 1, 5, 8, 9;
# the target classes 2, 3, 4, 6, 7 are never read):
#
#   1. two source splits: pretrain the tiny ViT from scratch on three
#      source classes (configs/smartfrz-source-pretrain.ron), then fine-tune
#      it on the other two with the regime proxy's fine-tuning recipe
#      (configs/smartfrz-source.ron) and the smartfrz plugin in record mode:
#      every 2 steps, each block's 64 sampled weights and the Gram matrix of
#      its output tokens on the probe batch;
#   2. tools/smartfrz-train labels each block at each snapshot by the CKA of
#      its output against the end of the run (converged: >= 0.99 from then
#      on), trains the predictor on the windows of 8 snapshots 4 steps apart
#      of three fine-tunes and holds the fourth out, checks the plugin's
#      forward against libtorch's and writes the file.
#
#   scripts/smartfrz-train.sh [WORK_DIR] [OUT]
# Needs scripts/setup.sh first. One thread per run (the figures in
# docs/policies.md); a pretraining or a finished recording already in
# WORK_DIR is reused.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
work=$(realpath -m "${1:-experiments/smartfrz-source}")
out=${2:-strategies/field/smartfrz-predictor.json}
bin=target/release
[ -x $bin/simfreeze ] && [ -x $bin/smartfrz-train ] && [ -f $bin/libsmartfrz.so ] || {
    echo "build first: ./scripts/setup.sh" >&2
    exit 1
}
mkdir -p "$work"
say() { printf '[smartfrz-train] %s\n' "$*"; }

# split name, pretraining classes, fine-tuning classes, fine-tuning seeds
splits=(
    "a [0,5,9] [1,8] 0,1"
    "b [1,8,9] [0,5] 0,1"
)
recordings=()
for split in "${splits[@]}"; do
    read -r name pre fine seeds <<<"$split"
    weights="$work/pretrain-$name-001/model.safetensors"
    if [ ! -f "$weights" ]; then
        say "split $name: pretraining on classes $pre"
        rm -rf "$work/pretrain-$name-001"
        $bin/simfreeze run --config configs/smartfrz-source-pretrain.ron \
            --set "output=\"$work\"" --set "name=\"pretrain-$name\"" \
            --set "data.classes=Some($pre)" --set train.threads=1 >"$work/pretrain-$name.log"
    fi
    [ -f "$weights" ] || { echo "no $weights (see $work/pretrain-$name.log)" >&2; exit 1; }
    for seed in ${seeds//,/ }; do
        rec="$work/recording-$name-seed$seed.jsonl"
        recordings+=("$rec")
        run="$work/finetune-$name-seed$seed-001"
        if [ -f "$rec" ] && grep -q '"status": "completed"' "$run/summary.json" 2>/dev/null; then
            say "split $name, seed $seed: recorded already ($rec)"
            continue
        fi
        say "split $name: fine-tuning on classes $fine, seed $seed, recording $rec"
        rm -rf "$run"
        $bin/simfreeze run --config configs/smartfrz-source.ron \
            --set "output=\"$work\"" --set "name=\"finetune-$name-seed$seed\"" \
            --set "data.classes=Some($fine)" --set "train.seed=$seed" --set train.threads=1 \
            --set "model.weights=Some(\"$weights\")" \
            --policy "$bin/libsmartfrz.so" \
            --policy-config "(record: Some(\"$rec\"), every: Some(2))" \
            >"$work/finetune-$name-seed$seed.log"
    done
done
say "training the predictor (the last recording held out)"
$bin/smartfrz-train "${recordings[@]}" --out "$out" \
    --recorded-every 2 --every 4 --window 8 --tau 0.99 \
    --command "scripts/smartfrz-train.sh" \
    --data "4 fine-tunes of the tiny ViT on Fashion-MNIST source classes only (pretrained on [0,5,9] then fine-tuned on [1,8]; pretrained on [1,8,9] then fine-tuned on [0,5]; seeds 0 and 1; 500 images, batch 32, 20 epochs, SGD lr 0.01); snapshots every 2 steps; labels: CKA of the block's pooled tokens on the probe batch against the last snapshot >= 0.99 from then on; windows of 8 snapshots 4 steps apart; the last fine-tune held out" \
    | tee "$work/train.log"
