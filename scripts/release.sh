#!/usr/bin/env bash
# Builds the meshward release binary as it is shipped and benchmarked:
# the release profile (fat LTO) plus profile-guided optimization (PGO).
#
#   scripts/release.sh           build; prints the binary's path (stdout)
#   scripts/release.sh --quick   shorter benchmark training (CI)
#
# 1. An instrumented build (-Cprofile-generate) is trained on
#    a. the benchmark's traffic through a meshward pair (bench/, meshward
#       only: HTTP/1.1 keep-alive at a fixed rate and at full speed, and a
#       new mTLS connection per request), the hot path whose cost matters;
#    b. the end-to-end suite of meshward-cli (HTTP/2, gRPC, TCP, JWT,
#       ext-authz, reloads, DestinationRule TLS, Envoy interop), so that no
#       feature is compiled as if it never ran.
# 2. llvm-profdata (rustup's llvm-tools, matching rustc's LLVM, else
#    Debian's llvm-19) merges the profiles; the final build uses them
#    (-Cprofile-use).
#
# The binary is target/pgo/<host>/release/meshward (under $CARGO_TARGET_DIR
# if set); `meshward --version` says "(pgo)". It is then run once in a
# meshward pair by the harness. The profile is made fresh on every run from
# the current source, under target/pgo-data, and never committed. About
# 9 minutes on 2 cores: two fat-LTO builds and 2 minutes of training.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

quick=()
case "${1:-}" in
    --quick) quick=(--quick) ;;
    "") ;;
    *) sed -n '2,22p' "$0" >&2; exit 2 ;;
esac

host="$(rustc -vV | sed -n 's/^host: //p')"
# llvm-profdata: $LLVM_PROFDATA, else rustup's llvm-tools (rustc's own LLVM),
# else the newest llvm-profdata-N on PATH (Debian's llvm-19 reads rustc's
# LLVM 22 raw profiles, and rustc reads what it writes).
find_profdata() {
    local p n
    for p in "${LLVM_PROFDATA:-}" "$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"; do
        [ -n "$p" ] && [ -x "$p" ] && { echo "$p"; return; }
    done
    for n in $(seq 30 -1 15); do
        p="$(command -v "llvm-profdata-$n" || true)"
        [ -n "$p" ] && { echo "$p"; return; }
    done
    command -v llvm-profdata || true
}
profdata="$(find_profdata)"
if [ -z "$profdata" ]; then
    rustup component add llvm-tools >&2 || true
    profdata="$(find_profdata)"
fi
if [ -z "$profdata" ]; then
    echo "release.sh: no llvm-profdata: rustup component add llvm-tools, or apt-get install llvm-19, or set LLVM_PROFDATA" >&2
    exit 1
fi

target="${CARGO_TARGET_DIR:-$root/target}"
data="$target/pgo-data"
rm -rf "$data"
mkdir -p "$data/raw"
say() { echo "release.sh: $*" >&2; }

# The harness itself is an ordinary release build (its own code is not
# profiled). --target keeps RUSTFLAGS off build scripts and proc macros.
say "1/4 instrumented build"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$data/raw" \
    cargo build --release --locked -p meshward-cli --target "$host" --target-dir "$target/pgo-gen" >&2
instrumented="$target/pgo-gen/$host/release/meshward"

say "2/4 training: benchmark traffic"
cargo build --release --locked -p meshward-bench >&2
MESHWARD_BIN="$instrumented" "$target/release/meshward-bench" \
    --targets meshward --require-meshward "${quick[@]}" >&2

say "3/4 training: the end-to-end suite"
MESHWARD_ENVOY="${MESHWARD_ENVOY:-$(bash bench/install-envoy.sh)}"
export MESHWARD_ENVOY
MESHWARD_TEST_BIN="$instrumented" cargo test --locked -p meshward-cli --tests >&2

say "merging the profiles with $profdata"
"$profdata" merge -o "$data/meshward.profdata" "$data/raw"
# A proxy writes its profile when it exits; one that was killed instead
# leaves only the short CLI runs in it. Refuse to build from such a profile.
hottest="$("$profdata" show "$data/meshward.profdata" | sed -n 's/^Maximum function count: //p')"
case "$hottest" in
    '' | *[!0-9]*)
        echo "release.sh: cannot read the profile's maximum function count from $profdata show (got '$hottest')" >&2
        exit 1 ;;
esac
if [ "$hottest" -lt 100000 ]; then
    echo "release.sh: the profile holds no proxy traffic (hottest function ran $hottest times): did the proxies exit on SIGTERM?" >&2
    exit 1
fi

say "4/4 optimized build"
MESHWARD_BUILD=pgo RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$data/meshward.profdata" \
    cargo build --release --locked -p meshward-cli --target "$host" --target-dir "$target/pgo" >&2
binary="$target/pgo/$host/release/meshward"
"$binary" --version >&2

# A smoke run of what is shipped: the harness's preflight checks that the
# pair enforces its policy (GET 200, POST 403) before it measures.
say "check: the optimized binary in a meshward pair"
MESHWARD_BIN="$binary" "$target/release/meshward-bench" \
    --targets meshward --scenarios keepalive --require-meshward --quick >/dev/null
echo "$binary"
