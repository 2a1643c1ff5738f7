#!/usr/bin/env bash
# Starts the Socket.IO v4 peer (server.js, one Node process) on 127.0.0.1:PORT.
# Installs the pinned packages (package-lock.json) if node_modules is missing. State (log,
# pid) lives in ${TMPDIR:-/tmp}/ringcast-socketio.PORT; stop.sh [PORT] stops it by that pid.
# Prints "listening on 127.0.0.1:PORT" and "pid PID" once the server is up.
set -euo pipefail

PORT="${1:-8092}"
HERE="$(cd "$(dirname "$0")" && pwd)"
DIR="${TMPDIR:-/tmp}/ringcast-socketio.${PORT}"

if [ ! -d "$HERE/node_modules/socket.io" ]; then
    (cd "$HERE" && npm install --no-audit --no-fund >&2)
fi
if [ -f "$DIR/node.pid" ] && [ -d "/proc/$(cat "$DIR/node.pid")" ] &&
    [ "$(cut -d" " -f3 "/proc/$(cat "$DIR/node.pid")/stat")" != Z ]; then
    echo "socket.io already running on port $PORT (pid $(cat "$DIR/node.pid")); run stop.sh $PORT" >&2
    exit 1
fi
mkdir -p "$DIR"
: >"$DIR/server.log"
PORT="$PORT" nohup node "$HERE/server.js" >"$DIR/server.log" 2>&1 </dev/null &
PID=$!
echo "$PID" >"$DIR/node.pid"

for _ in $(seq 1 100); do
    if LINE="$(grep -m1 '^listening on ' "$DIR/server.log")"; then
        echo "$LINE"
        echo "pid $PID"
        exit 0
    fi
    if ! kill -0 "$PID" 2>/dev/null; then
        cat "$DIR/server.log" >&2
        rm -f "$DIR/node.pid"
        exit 1
    fi
    sleep 0.1
done
echo "socket.io did not start on 127.0.0.1:$PORT; see $DIR/server.log" >&2
exit 1
