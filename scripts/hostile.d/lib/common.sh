# Sourced by every scripts/hostile.d section: servers on free loopback ports in the run's
# temporary directory, RSS readings, and cleanup of whatever the section started.
# Expects EVENTQUEUE_BIN and HOSTILE_TMP (set by scripts/hostile.sh).
set -euo pipefail
: "${EVENTQUEUE_BIN:?run sections through scripts/hostile.sh}"
: "${HOSTILE_TMP:?run sections through scripts/hostile.sh}"
HOSTILE_LIB="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOSTILE_PIDS=()

hostile_cleanup() {
    local pid
    for pid in "${HOSTILE_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${HOSTILE_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap hostile_cleanup EXIT

# A TCP port free on loopback right now.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server NAME [serve flags...]: an open-mode server on a free loopback port with its data
# in $HOSTILE_TMP/NAME; sets SERVER_PID, SERVER_URL. Its log is $HOSTILE_TMP/NAME.log.
start_server() {
    launch_server "" "$EVENTQUEUE_BIN" "$@"
}

# launch_server WRAP BIN NAME [serve flags...]: as start_server, with the binary BIN, run under
# the command words WRAP (none when empty; e.g. "prlimit --nofile=1024:1024 --"). The log is
# appended to, so a server started again over NAME keeps its earlier lines.
launch_server() {
    local wrap="$1" bin="$2" name="$3"
    shift 3
    local port
    port="$(free_port)"
    mkdir -p "$HOSTILE_TMP/$name"
    # $wrap unquoted: its words are the command prefix.
    # shellcheck disable=SC2086
    $wrap "$bin" serve --bind "127.0.0.1:$port" --data-dir "$HOSTILE_TMP/$name" "$@" \
        >>"$HOSTILE_TMP/$name.log" 2>&1 &
    SERVER_PID=$!
    HOSTILE_PIDS+=("$SERVER_PID")
    SERVER_URL="http://127.0.0.1:$port"
    local i
    for i in $(seq 100); do
        if curl -fsS "$SERVER_URL/healthz" >/dev/null 2>&1; then
            return 0
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "server $name did not start; its log:" >&2
    tail -20 "$HOSTILE_TMP/$name.log" >&2
    return 1
}

# stop_server PID: SIGTERM and wait.
stop_server() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# rss_mb PID: resident set size in MB.
rss_mb() {
    awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"
}

# The helper for what curl cannot do (many sockets, bulk enqueues); `hostile_py --help`.
hostile_py() {
    python3 "$HOSTILE_LIB/hostile.py" "$@"
}
