#!/usr/bin/env bash
# The one command: installs Envoy (bench/install-envoy.sh), builds the
# meshward CLI and the harness in release mode, and runs the benchmark.
# Arguments go to the harness, e.g.:
#   bench/run.sh --out bench-results.md
#   bench/run.sh --quick
# The target directory is $CARGO_TARGET_DIR (default: the workspace's target/).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
ENVOY_BIN="${ENVOY_BIN:-$(bash bench/install-envoy.sh)}"
export ENVOY_BIN
cargo build --release -p meshward-cli -p meshward-bench
target="${CARGO_TARGET_DIR:-$root/target}"
export MESHWARD_BIN="${MESHWARD_BIN:-$target/release/meshward}"
exec "$target/release/meshward-bench" "$@"
