#!/usr/bin/env bash
# Stops the Socket.IO peer started by start.sh: `stop.sh PORT` stops that one, `stop.sh` every
# one, each by the pid file start.sh left in ${TMPDIR:-/tmp}/ringcast-socketio.PORT.
set -euo pipefail

if [ $# -ge 1 ]; then
    DIRS=("${TMPDIR:-/tmp}/ringcast-socketio.$1")
else
    shopt -s nullglob
    DIRS=("${TMPDIR:-/tmp}"/ringcast-socketio.*)
fi
# Running and not yet a zombie (an exited child of an init that reaps slowly still answers kill -0).
alive() { [ -r "/proc/$1/stat" ] && [ "$(cut -d' ' -f3 "/proc/$1/stat")" != Z ]; }

for dir in "${DIRS[@]}"; do
    pidfile="$dir/node.pid"
    [ -f "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    if alive "$pid"; then
        kill -TERM "$pid"
        for _ in $(seq 1 50); do
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            echo "socket.io pid $pid still running after 5 s" >&2
        else
            echo "stopped socket.io pid $pid"
        fi
    fi
    rm -f "$pidfile"
done
