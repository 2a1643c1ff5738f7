#!/usr/bin/env bash
# Stops the Nchan started by start.sh: `stop.sh PORT` stops that one, `stop.sh` every one,
# each by the pid file start.sh left in ${TMPDIR:-/tmp}/ringcast-nchan.PORT (never by name).
set -euo pipefail

if [ $# -ge 1 ]; then
    DIRS=("${TMPDIR:-/tmp}/ringcast-nchan.$1")
else
    shopt -s nullglob
    DIRS=("${TMPDIR:-/tmp}"/ringcast-nchan.*)
fi
# Running and not yet a zombie (an exited child of an init that reaps slowly still answers kill -0).
alive() { [ -r "/proc/$1/stat" ] && [ "$(cut -d' ' -f3 "/proc/$1/stat")" != Z ]; }

for dir in "${DIRS[@]}"; do
    pidfile="$dir/nginx.pid"
    [ -f "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    if alive "$pid"; then
        kill -TERM "$pid"   # fast shutdown: the master stops its workers and closes subscribers
        for _ in $(seq 1 50); do
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            echo "nchan pid $pid still running after 5 s" >&2
        else
            echo "stopped nchan pid $pid"
        fi
    fi
    rm -f "$pidfile"
done
