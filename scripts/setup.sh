#!/usr/bin/env bash
# Sets up everything simfreeze needs on a fresh Debian-like machine, then builds
# the release workspace (host and every plugin). Idempotent: a re-run checks
# each step and skips what is already in place.
#
#   1. Fashion-MNIST from Debian's `dataset-fashion-mnist`, the DejaVu fonts
#      for the PNG plots, and `slurm-wlm` and `munge` for the test that runs a
#      comparison on a real single-node Slurm (scripts/slurm-local.sh), when
#      apt exists;
#   2. a Python environment with torch==2.11.0 from PyPI, kept once per machine
#      in $SIMFREEZE_CACHE (default ~/.cache/simfreeze) and linked as `.venv`;
#   3. `.libtorch`, a stable link to that torch, which `.cargo/config.toml`
#      hands to torch-sys, so plain `cargo build` / `cargo test` work;
#   4. `cargo build --release --workspace`;
#   5. the Python package `simfreeze` (bindings/python: the policy runtime
#      as a Python extension, with the shipped plugins), built by maturin
#      into a wheel and installed into `.venv`.
#
# Every Python package it installs is pinned by scripts/constraints.txt.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

TORCH_VERSION=2.11.0
constraints="$root/scripts/constraints.txt"
cache=${SIMFREEZE_CACHE:-$HOME/.cache/simfreeze}
python=${PYTHON:-python3}
say() { printf '[setup] %s\n' "$*"; }

# 1. Fashion-MNIST and a font for the PNG plots (Debian packages) -----------
fmnist=/usr/share/datasets/fashion-mnist
packages=()
[ -f "$fmnist/train-images-idx3-ubyte.gz" ] || packages+=(dataset-fashion-mnist)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || packages+=(fonts-dejavu-core)
command -v slurmctld >/dev/null 2>&1 || packages+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || packages+=(munge)
if [ ${#packages[@]} -eq 0 ]; then
    say "Fashion-MNIST present in $fmnist; DejaVu fonts, Slurm and munge present"
elif command -v apt-get >/dev/null 2>&1; then
    say "installing Debian packages: ${packages[*]}"
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    if ! $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null 2>&1; then
        $sudo_cmd apt-get update -q >/dev/null
        $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null
    fi
else
    say "no apt: put the Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...)"
    say "into $fmnist, or set the dataset root in your config; PNG plots need a"
    say "system font (DejaVu Sans) for their text"
fi

# 2. torch in a per-machine cache, linked as .venv -----------------------------
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
env_dir="$cache/torch-$TORCH_VERSION-py$pyver"
if [ ! -f "$env_dir/.complete" ]; then
    say "creating $env_dir with torch==$TORCH_VERSION (about 4.7 GB, a few minutes)"
    rm -rf "$env_dir"
    mkdir -p "$cache"
    "$python" -m venv "$env_dir"
    "$env_dir/bin/pip" install -q --disable-pip-version-check -c "$constraints" \
        "torch==$TORCH_VERSION" numpy
    touch "$env_dir/.complete"
else
    say "torch $TORCH_VERSION environment present in $env_dir"
fi
# A symlink keeps the path torch-sys sees stable (changing it forces a 2-minute
# rebuild of its C++ wrapper).
if [ "$(readlink .venv 2>/dev/null || true)" != "$env_dir" ]; then
    if [ -e .venv ] && [ ! -L .venv ]; then
        say "error: $root/.venv exists and is not a link; move it away and re-run" >&2
        exit 1
    fi
    ln -sfn "$env_dir" .venv
fi
torch_dir=".venv/lib/python$pyver/site-packages/torch"
if [ "$(readlink .libtorch 2>/dev/null || true)" != "$torch_dir" ]; then
    ln -sfn "$torch_dir" .libtorch
fi
installed=$(.venv/bin/python -W ignore -c 'import torch; print(torch.__version__.split("+")[0])')
if [ "$installed" != "$TORCH_VERSION" ]; then
    say "error: .venv has torch $installed, simfreeze needs $TORCH_VERSION (tch 0.24)." >&2
    say "Remove $env_dir and re-run this script." >&2
    exit 1
fi

# timm and transformers are the reference implementations for the weight
# parity tests and the benchmarks; tensorboard reads back the event files in
# the tests (and shows runs: `.venv/bin/tensorboard --logdir runs`);
# lightning and pytest run the Python package's tests, maturin builds it.
# Every version is pinned by scripts/constraints.txt (torchvision to the
# release built for torch 2.11.0: an unpinned one silently upgrades torch and
# breaks the tch build); a stamp per constraints file makes a changed pin
# reinstall.
stamp="$env_dir/.constraints-$(sha256sum "$constraints" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    say "installing the pinned Python packages (timm, transformers, accelerate, scipy, tensorboard, torchvision, lightning, pytest, maturin)"
    .venv/bin/pip install -q --disable-pip-version-check -c "$constraints" \
        timm transformers accelerate scipy tensorboard torchvision lightning pytest maturin
    rm -f "$env_dir"/.constraints-*
    touch "$stamp"
fi

# ProcessGroupNCCL's header needs two CUDA header packages the torch wheel
# does not ship (it has NCCL's and the CUDA runtime's); with them the build
# includes NCCL for data-parallel runs on GPUs, without them it leaves NCCL
# out (GPUs then communicate through Gloo).
if [ ! -f "$torch_dir/../nvidia/cu13/include/crt/host_config.h" ] \
    || [ ! -d "$torch_dir/../nvidia/cu13/include/nv" ]; then
    say "installing the CUDA headers ProcessGroupNCCL needs (nvidia-cuda-crt, nvidia-cuda-cccl)"
    .venv/bin/pip install -q --disable-pip-version-check --no-deps \
        "nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.85"
fi

# 3. build ---------------------------------------------------------------------
if [ "${SIMFREEZE_SKIP_BUILD:-0}" != 1 ]; then
    say "building the release workspace"
    cargo build --release --workspace --quiet
fi
# 5. the Python package ---------------------------------------------------------
# Its own target directory: maturin's build settings differ from the
# workspace's, and sharing one would rebuild the common crates each time.
if [ "${SIMFREEZE_SKIP_BUILD:-0}" != 1 ]; then
    say "building the Python package (bindings/python) and installing it into .venv"
    shipped=bindings/python/python/simfreeze/plugins
    mkdir -p "$shipped"
    rm -f "$shipped"/*.so
    for dir in plugins/*/; do
        name=$(sed -n 's/^name = "\(.*\)"/\1/p' "$dir/Cargo.toml" | sed -n 2p)
        [ -n "$name" ] && cp "target/release/lib$name.so" "$shipped/"
    done
    # Without their debug symbols the plugins are a tenth of the size.
    command -v strip >/dev/null 2>&1 && strip --strip-unneeded "$shipped"/*.so
    rm -f target/wheels/simfreeze-*.whl
    .venv/bin/maturin build --release --quiet -m bindings/python/Cargo.toml \
        -i .venv/bin/python --out target/wheels --target-dir target/python --strip >/dev/null
    wheel=$(ls target/wheels/simfreeze-*.whl)
    sum=$(sha256sum "$wheel" | cut -c1-16)
    if [ "$(cat "$env_dir/.simfreeze-wheel" 2>/dev/null)" != "$sum" ]; then
        .venv/bin/pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel"
        echo "$sum" > "$env_dir/.simfreeze-wheel"
    fi
fi
say "ready: the binary is $root/target/release/simfreeze (not on PATH; for a short"
say "name: export PATH=\"$root/target/release:\$PATH\", or ln -s it into ~/.local/bin)"
