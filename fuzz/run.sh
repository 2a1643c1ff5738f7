#!/usr/bin/env bash
# Runs every fuzz target for DURATION seconds each (default 10), one after the other.
#
#   fuzz/run.sh 10            # the short run the test script does
#   fuzz/run.sh 600           # ten minutes per target
#   FUZZ_TARGETS="http_head jwt" fuzz/run.sh 60
#   FUZZ_SANITIZER=address fuzz/run.sh 600   # with AddressSanitizer (slower to build and run)
#
# The targets are safe Rust over the parsers, so the default build has no sanitizer: a panic,
# an overflow check or a broken invariant is what they find, and the build is much quicker.
# Installs cargo-fuzz (from crates.io) if it is missing; works on a stable toolchain
# (RUSTC_BOOTSTRAP=1 lets it use the sanitizer flags). The seeds in fuzz/corpus/<target> are
# read, never written: what the fuzzer finds goes to fuzz/target/corpus/<target>. Exits 1 on
# the first crash and names the file that reproduces it:
#   cargo fuzz run <target> <file>
set -euo pipefail

duration="${1:-10}"
case "$duration" in
'' | *[!0-9]*) echo "usage: $0 [SECONDS per target]" >&2 && exit 2 ;;
esac
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
export RUSTC_BOOTSTRAP=1
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --quiet
fi
# libFuzzer itself is C++.
if ! command -v c++ >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "fuzz: installing g++ (libFuzzer is C++)" >&2
        apt-get install -y -qq g++ >/dev/null || { apt-get update -qq && apt-get install -y -qq g++ >/dev/null; }
    else
        echo "fuzz: needs a C++ compiler (e.g. apt-get install g++)" >&2
        exit 2
    fi
fi

sanitizer="${FUZZ_SANITIZER:-none}"
echo "fuzz: building the targets (sanitizer: $sanitizer)" >&2
cargo fuzz build --sanitizer "$sanitizer" >&2

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
logs="$here/target/logs"
mkdir -p "$logs"
for target in $targets; do
    work="$here/target/corpus/$target"
    mkdir -p "$work" "$here/artifacts/$target"
    log="$logs/$target.log"
    if ! cargo fuzz run --sanitizer "$sanitizer" "$target" "$work" "corpus/$target" -- \
        -max_total_time="$duration" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        crash="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
        echo "fuzz: $target FAILED (log: $log)" >&2
        if [ -n "$crash" ]; then
            case "$crash" in /*) ;; *) crash="$here/${crash#./}" ;; esac
            echo "fuzz: crash input: $crash" >&2
            echo "fuzz: reproduce: (cd $here && RUSTC_BOOTSTRAP=1 cargo fuzz run $target $crash)" >&2
        fi
        exit 1
    fi
    done_line="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)"
    execs="$(sed -n 's/^stat::number_of_executed_units: //p' "$log" | tail -n 1)"
    echo "fuzz: $target ok: ${execs:-?} runs in ${duration}s; ${done_line:-no DONE line}" >&2
done
