#!/usr/bin/env bash
# The one command: installs Envoy (bench/install-envoy.sh), builds the
# meshward release binary as it is shipped (scripts/release.sh: fat LTO and
# profile-guided optimization) and the harness, and runs the benchmark.
# Arguments go to the harness, e.g.:
#   bench/run.sh --out bench-results.md
#   bench/run.sh --quick
# MESHWARD_BIN=path measures that binary instead and skips the release
# build, e.g. a plain `cargo build --release`: target/release/meshward.
# The target directory is $CARGO_TARGET_DIR (default: the workspace's target/).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
ENVOY_BIN="${ENVOY_BIN:-$(bash bench/install-envoy.sh)}"
export ENVOY_BIN
if [ -z "${MESHWARD_BIN:-}" ]; then
    MESHWARD_BIN="$(scripts/release.sh)"
fi
export MESHWARD_BIN
cargo build --release --locked -p meshward-bench
target="${CARGO_TARGET_DIR:-$root/target}"
exec "$target/release/meshward-bench" "$@"
