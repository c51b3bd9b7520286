# Sourced by the scripts that run simfreeze bench beside scripts/bench_pytorch.py:
# sets `half` (half the model's depth) and `pyargs` (the shape as
# bench_pytorch.py's arguments) from CONFIG, through simfreeze itself.
#
#   bench_shape BIN CONFIG THREADS
bench_shape() {
    local shape depth
    shape=$("$1" bench --config "$2" --set "train.threads=$3" --frozen 0 --steps 1 --warmup 0 --rounds 1 --json)
    depth=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["depth"])' "$shape")
    half=$((depth / 2))
    pyargs=$(python3 -c '
import json, sys
s = json.loads(sys.argv[1])["shape"]
keep = ("image_size", "channels", "patch", "dim", "depth", "heads", "classes")
print(" ".join("--%s %s" % (k.replace("_", "-"), s[k]) for k in keep))
' "$shape")
}
