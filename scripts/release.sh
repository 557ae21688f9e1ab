#!/usr/bin/env bash
# Builds the meshward release binary as it is shipped and benchmarked:
# the release profile (fat LTO) plus profile-guided optimization (PGO).
#
#   scripts/release.sh           build; prints the binary's path (stdout)
#   scripts/release.sh --quick   shorter benchmark training (CI)
#   scripts/release.sh --check-profdata   only find an llvm-profdata that
#                                reads rustc's profiles; prints its path
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
#    (-Cprofile-use). It is chosen and checked first, in seconds, on the
#    profile of a tiny program: one that cannot read rustc's profiles
#    (Debian 12's default llvm-profdata, LLVM 14) would otherwise fail only
#    after the training.
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
check_only=
case "${1:-}" in
    --quick) quick=(--quick) ;;
    --check-profdata) check_only=1 ;;
    "") ;;
    *) sed -n '2,28p' "$0" >&2; exit 2 ;;
esac
say() { echo "release.sh: $*" >&2; }

host="$(rustc -vV | sed -n 's/^host: //p')"
rustc_llvm="$(rustc -vV | sed -n 's/^LLVM version: //p')"
rustup_profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"

# Which llvm-profdata works is not a version rule: it must read the raw
# profile format rustc's LLVM writes, which changes only in some LLVM
# releases (LLVM 14 cannot read rustc 1.95's LLVM 22 raw profiles, LLVM 19
# can), and rustc must read the indexed profile it writes. So each
# candidate is tried on the real thing: a tiny program built with
# -Cprofile-generate and run once, its profile merged, shown, and used by
# rustc (which only warns on a profile it cannot read: any output fails).
probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
printf 'fn main() {\n    println!("{}", std::env::args().count());\n}\n' >"$probe/probe.rs"
if ! rustc -Cprofile-generate="$probe/raw" "$probe/probe.rs" -o "$probe/probe" 2>"$probe/err" \
    || ! "$probe/probe" >/dev/null; then
    say "rustc cannot build or run an instrumented program (-Cprofile-generate): $(cat "$probe/err")"
    exit 1
fi
tried=()
# Succeeds when $1 reads rustc's profiles; otherwise notes why in $tried.
profdata_works() {
    local p="$1" version why=
    # (LLVM 14's llvm-profdata knows --version only after a command.)
    version="$("$p" merge --version 2>/dev/null | sed -n 's/.*LLVM version \([0-9][0-9.]*\).*/\1/p' | head -n 1)"
    rm -f "$probe/probe.profdata"
    if ! "$p" merge -o "$probe/probe.profdata" "$probe/raw" >"$probe/err" 2>&1; then
        why="merge: $(grep -m 1 -i 'error\|warning' "$probe/err" || head -n 1 "$probe/err")"
        why="${why//"$probe"\//}"
    elif ! "$p" show "$probe/probe.profdata" 2>&1 | grep -q '^Maximum function count: [1-9]'; then
        why="show does not report the probe's function counts"
    elif ! rustc -Cprofile-use="$probe/probe.profdata" "$probe/probe.rs" -o "$probe/probe-use" \
        >"$probe/err" 2>&1 || [ -s "$probe/err" ]; then
        why="rustc -Cprofile-use: $(head -n 1 "$probe/err")"
    fi
    if [ -n "$why" ]; then
        tried+=("$p (LLVM ${version:-unknown}): $why")
        say "skipping llvm-profdata $p (LLVM ${version:-unknown}): $why"
        return 1
    fi
    say "llvm-profdata: $p (LLVM ${version:-unknown}) reads rustc's profiles (LLVM $rustc_llvm)"
}
# In order: $LLVM_PROFDATA, rustup's llvm-tools (rustc's own LLVM), the
# newest llvm-profdata-N on PATH down, plain llvm-profdata.
find_profdata() {
    local p n
    local candidates=()
    [ -n "${LLVM_PROFDATA:-}" ] && candidates+=("$LLVM_PROFDATA")
    candidates+=("$rustup_profdata")
    for n in $(seq 40 -1 11); do
        p="$(command -v "llvm-profdata-$n" || true)"
        [ -n "$p" ] && candidates+=("$p")
    done
    p="$(command -v llvm-profdata || true)"
    [ -n "$p" ] && candidates+=("$p")
    for p in "${candidates[@]}"; do
        if [ ! -x "$p" ]; then
            if [ "$p" = "${LLVM_PROFDATA:-}" ]; then
                tried+=("$p (LLVM_PROFDATA): not an executable file")
                say "skipping LLVM_PROFDATA=$p: not an executable file"
            fi
            continue
        fi
        profdata_works "$p" && { profdata="$p"; return 0; }
    done
    return 1
}
profdata=
if ! find_profdata && [ ! -x "$rustup_profdata" ] && command -v rustup >/dev/null; then
    say "no working llvm-profdata; trying: rustup component add llvm-tools"
    rustup component add llvm-tools >&2 || true
    [ -x "$rustup_profdata" ] && profdata_works "$rustup_profdata" && profdata="$rustup_profdata"
fi
if [ -z "$profdata" ]; then
    {
        echo "release.sh: no llvm-profdata reads the profiles of rustc $(rustc -vV | sed -n 's/^release: //p') (LLVM $rustc_llvm)."
        if [ ${#tried[@]} -gt 0 ]; then
            echo "Tried:"
            printf '  %s\n' "${tried[@]}"
        else
            echo "None found (\$LLVM_PROFDATA, rustup's llvm-tools, llvm-profdata-N, llvm-profdata)."
        fi
        echo "Install one: 'rustup component add llvm-tools' (rustc's own LLVM), or on Debian 12"
        echo "'apt-get install llvm-19' (its llvm-profdata-19 reads them; the default 'llvm' package is LLVM 14,"
        echo "which cannot), or set LLVM_PROFDATA to an llvm-profdata that can."
    } >&2
    exit 1
fi
if [ -n "$check_only" ]; then
    echo "$profdata"
    exit 0
fi

target="${CARGO_TARGET_DIR:-$root/target}"
data="$target/pgo-data"
rm -rf "$data"
mkdir -p "$data/raw"

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
