#!/usr/bin/env bash
# Interop with the protocol's own clients, across a restart of a real `eventqueue serve` (a
# free port, a temporary data directory kept between the two runs):
#   - the npm client (@durable-streams/client, pinned in package-lock.json) writes and reads a
#     JSON stream, then resumes at its saved offset after the restart;
#   - the PyPI client (durable-streams, pinned in requirements.txt) follows a typed task queue
#     as a stream, then follows it live from its saved offset after the restart.
# Fails (non-zero) on any mismatch.
#
# Usage: tests/durable-streams/interop.sh   (builds the release binary first)
# Env:   EVENTQUEUE_BIN   use this binary instead of building one
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
target="$(realpath -m "${CARGO_TARGET_DIR:-$root/target}")"
venv="$target/ds-venv"

if [[ -z "${EVENTQUEUE_BIN:-}" ]]; then
    cargo build --release --bin eventqueue
    EVENTQUEUE_BIN="$target/release/eventqueue"
fi
if [[ ! -d "$here/node_modules/@durable-streams/client" ]]; then
    (cd "$here" && npm ci --no-audit --no-fund)
fi
# The venv is rebuilt whenever requirements.txt changes.
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
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

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
base="http://127.0.0.1:$port"
start_server() {
    "$EVENTQUEUE_BIN" serve --bind "127.0.0.1:$port" --data-dir "$data/db" >>"$data/serve.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
        if curl -sf "$base/healthz" >/dev/null 2>&1; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "eventqueue serve exited at start:" >&2
            cat "$data/serve.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "eventqueue serve did not answer /healthz within 10 s" >&2
    exit 1
}
on_failure() {
    echo "Durable Streams interop FAILED; server log:" >&2
    tail -n 50 "$data/serve.log" >&2
    exit 1
}

start_server
(cd "$here" && node interop.mjs write "$base" "$data/npm.json") || on_failure
"$venv/bin/python" "$here/interop.py" follow "$base" "$data/py.json" || on_failure
stop_server
start_server
(cd "$here" && node interop.mjs resume "$base" "$data/npm.json") || on_failure
"$venv/bin/python" "$here/interop.py" resume "$base" "$data/py.json" || on_failure
stop_server
