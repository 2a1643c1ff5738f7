#!/usr/bin/env bash
# Every test, on a fresh Debian machine too: installs what the tests need that is missing, runs
# `cargo test --release` (unit tests, end-to-end tests over loopback sockets, the browser and
# Python clients), then a short run of every fuzz target (fuzz/run.sh 10) when they exist.
#
#   tests/run.sh
#
# Needs Rust (cargo) already; installs with apt-get, through sudo when not root:
#   chromium      tests/browser.rs drives it over the DevTools protocol
#   curl          tests/sse.rs reads Server-Sent Events with `curl -N`
#   redis-server  tests/cluster.rs starts its own Redis servers on free loopback ports
#   python3-venv  tests/python_client.rs builds a virtualenv and installs `websockets` from PyPI
#   gcc           a C compiler and linker for the crates with C parts
#   g++           libFuzzer (the fuzz targets' engine) is C++; fuzz/run.sh installs cargo-fuzz
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null 2>&1 || {
    echo "tests/run.sh: cargo is not on PATH: install Rust first (rustup, or Debian's cargo)" >&2
    exit 2
}

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v c++ >/dev/null 2>&1 || need+=(g++)

if ((${#need[@]})); then
    if [ "$(id -u)" = 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        sudo=(missing)
    fi
    if ! command -v apt-get >/dev/null 2>&1 || [ "${sudo[*]}" = missing ]; then
        echo "tests/run.sh: the tests need these packages: ${need[*]}" >&2
        echo "  install them (Debian/Ubuntu: apt-get install ${need[*]}) and run this again;" >&2
        echo "  this script installs them itself with apt-get, as root or through sudo" >&2
        exit 2
    fi
    echo "tests/run.sh: installing ${need[*]}" >&2
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo test --release

if [ -f fuzz/run.sh ]; then
    bash fuzz/run.sh 10
fi
