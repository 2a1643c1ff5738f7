#!/usr/bin/env bash
# Every check, on a fresh Debian machine too: installs what the tests need that is missing,
# checks formatting and lints (cargo fmt, cargo clippy), runs `cargo test --release` (unit
# tests, end-to-end tests over loopback sockets, the browser, Node and Python clients, cluster
# tests with their own Redis servers), then a set of the end-to-end
# tests again in cluster mode on one Redis, then a short run of every fuzz target
# (fuzz/run.sh 10) when they exist.
#
#   tests/run.sh
#
# Needs Rust (cargo) already; installs with apt-get, through sudo when not root:
#   rustfmt, rust-clippy  cargo fmt and cargo clippy, when rustup is not there to add them
#   chromium      tests/browser.rs and tests/socketio_browser.rs drive it over the DevTools protocol
#   curl          tests/sse.rs reads Server-Sent Events with `curl -N`
#   redis-server  tests/cluster.rs starts its own Redis servers on free loopback ports
#   python3-venv  tests/python_client.rs builds a virtualenv and installs `websockets` from PyPI
#   nodejs, npm   tests/socketio.rs runs the real socket.io-client (installed from npm) in Node
#   gcc           a C compiler and linker for the crates with C parts
#   g++           libFuzzer (the fuzz targets' engine) is C++; fuzz/run.sh installs cargo-fuzz
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null 2>&1 || {
    echo "tests/run.sh: cargo is not on PATH: install Rust first (rustup, or Debian's cargo)" >&2
    exit 2
}

# cargo fmt and cargo clippy: rustup's components, or Debian's packages with Debian's cargo.
for tool in fmt clippy; do
    if ! cargo "$tool" --version >/dev/null 2>&1 && command -v rustup >/dev/null 2>&1; then
        [ "$tool" = fmt ] && component=rustfmt || component=clippy
        rustup component add "$component"
    fi
done

need=()
cargo fmt --version >/dev/null 2>&1 || need+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || need+=(rust-clippy)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
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

# Formatting and lints first: a change that fails them fails here, as in CI.
cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings

cargo test --release

# The same end-to-end tests again in cluster mode, on a Redis of their own: those whose promises
# do not depend on where seqs start (a cluster's start far above 1) or on position 0.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
redis_pid=$!
trap 'kill "$redis_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break
    sleep 0.1
done
echo "tests/run.sh: the end-to-end tests that hold in cluster mode, on Redis at port $port" >&2
RINGCAST_TEST_REDIS_URL="redis://127.0.0.1:$port" cargo test --release \
    --test access --test admin --test audit --test compression --test encodings \
    --test ratelimits --test storm --test tokens
kill "$redis_pid" 2>/dev/null || true
trap - EXIT

if [ -f fuzz/run.sh ]; then
    bash fuzz/run.sh 10
fi
