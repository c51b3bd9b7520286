#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs the whole test suite:
# formatting, clippy with warnings as errors, and every test of the
# workspace in release mode (the integration tests drive the release
# binary and plugins that setup built), and the Python package's tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/setup.sh
echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] module layering (scripts/check-layers.py)"
python3 scripts/check-layers.py core/host/src core/runtime/src
echo "[test] Markdown links (scripts/check-links.py)"
python3 scripts/check-links.py
echo "[test] cargo clippy"
cargo clippy --release --workspace --all-targets --quiet -- -D warnings
echo "[test] cargo test"
cargo test --release --workspace
echo "[test] the Python package (pytest bindings/python/tests)"
.venv/bin/python -m pytest -q -p no:cacheprovider bindings/python/tests
echo "[test] all passed"
