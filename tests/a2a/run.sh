#!/usr/bin/env bash
# A2A interop test: the real a2a-sdk client (pinned in requirements.txt) against a real
# `eventqueue serve` on a free port with a temporary data directory. Fails (non-zero) on any
# mismatch; never skips.
#
# Usage: tests/a2a/run.sh            (builds the release binary first)
# Env:   EVENTQUEUE_BIN   use this binary instead of building one
#        A2A_VENV         where to make the Python venv [default: target/a2a-venv]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
venv="${A2A_VENV:-$target/a2a-venv}"

if [[ -z "${EVENTQUEUE_BIN:-}" ]]; then
    cargo build --release --bin eventqueue
    EVENTQUEUE_BIN="$target/release/eventqueue"
fi

# The venv is rebuilt whenever requirements.txt changes.
stamp="$venv/.requirements.sha256"
want="$(sha256sum tests/a2a/requirements.txt | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/a2a/requirements.txt
    echo "$want" > "$stamp"
fi

data="$(mktemp -d)"
pid=""
stop_server() {
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    pid=""
}
cleanup() {
    stop_server
    rm -rf "$data"
}
trap cleanup EXIT

# Starts `eventqueue serve` on a free port with a fresh data directory and the given extra
# flags; sets $port and $log. The default keepalive (15 s) stays: A2A streams must still send
# one at least every 3 s.
start_server() {
    local name="$1"
    shift
    # A free port: bind port 0 and read back what the kernel chose.
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    log="$data/$name.log"
    "$EVENTQUEUE_BIN" serve --bind "127.0.0.1:$port" --data-dir "$data/$name" "$@" >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
        if healthy; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "eventqueue serve exited at start:" >&2
            cat "$log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "eventqueue serve did not answer /healthz within 10 s:" >&2
    cat "$log" >&2
    exit 1
}
healthy() {
    python3 -c 'import sys, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(sys.argv[1], timeout=2)' \
        "http://127.0.0.1:$port/healthz" >/dev/null 2>&1
}
run_client() {
    local status=0
    "$venv/bin/python" tests/a2a/interop.py "$@" || status=$?
    if [[ $status -ne 0 ]]; then
        echo "A2A interop test FAILED (exit $status); server log:" >&2
        tail -n 50 "$log" >&2
        exit "$status"
    fi
}

# Open mode: both card variants, everything.
start_server open
run_client "http://127.0.0.1:$port"
stop_server

# Token mode: the same client with a bearer token, as any other caller.
head -c 48 /dev/urandom | base64 >"$data/jwt.secret"
start_server token --jwt-secret-file "$data/jwt.secret"
token="$("$EVENTQUEUE_BIN" token --jwt-secret-file "$data/jwt.secret" --tenant acme \
    --scope "subscribe publish" --ttl 10m)"
other="$("$EVENTQUEUE_BIN" token --jwt-secret-file "$data/jwt.secret" --tenant globex \
    --scope "subscribe publish" --ttl 10m)"
run_client "http://127.0.0.1:$port" --token "$token" --other-token "$other"
stop_server
