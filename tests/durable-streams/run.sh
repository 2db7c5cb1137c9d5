#!/usr/bin/env bash
# The official Durable Streams conformance suite (npm @durable-streams/server-conformance-tests,
# pinned in package-lock.json) against a real `eventqueue serve` on a free port with a temporary
# data directory. The tests that pass are compared with passing.txt: a test listed there that
# fails now fails this script; a test that newly passes is reported (add it with --update).
#
# Usage: tests/durable-streams/run.sh [--update]   (builds the release binary first)
# Env:   EVENTQUEUE_BIN   use this binary instead of building one
#        DS_FILTER        run only tests whose name matches (vitest -t), for development
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
target="$(realpath -m "${CARGO_TARGET_DIR:-$root/target}")"
update=0
if [[ "${1:-}" == "--update" ]]; then update=1; fi

if [[ -z "${EVENTQUEUE_BIN:-}" ]]; then
    cargo build --release --bin eventqueue
    EVENTQUEUE_BIN="$target/release/eventqueue"
fi
if [[ ! -d "$here/node_modules/@durable-streams/server-conformance-tests" ]]; then
    (cd "$here" && npm ci --no-audit --no-fund)
fi

data="$(mktemp -d)"
pid=""
cleanup() {
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$data"
}
trap cleanup EXIT

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
log="$data/serve.log"
# Short keepalives and a generous rate: the suite opens many streams quickly.
"$EVENTQUEUE_BIN" serve --bind "127.0.0.1:$port" --data-dir "$data/db" >"$log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
    if curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "eventqueue serve exited at start:" >&2
        cat "$log" >&2
        exit 1
    fi
    sleep 0.1
done

report="$data/report.json"
status=0
(
    cd "$here"
    # Generous per-test timeouts: a loaded CI machine must not turn a slow run into a failure.
    args=(run --reporter=json --outputFile="$report" --testTimeout=30000)
    if [[ -n "${DS_FILTER:-}" ]]; then args+=(-t "$DS_FILTER"); fi
    DURABLE_STREAMS_URL="http://127.0.0.1:$port" node_modules/.bin/vitest "${args[@]}" \
        >"$data/vitest.log" 2>&1
) || status=$?
if [[ ! -s "$report" ]]; then
    echo "the conformance suite did not run (exit $status):" >&2
    tail -n 50 "$data/vitest.log" >&2
    exit 1
fi
mkdir -p "$target/ci-artifacts/durable-streams"
cp "$report" "$log" "$target/ci-artifacts/durable-streams/"

python3 - "$report" "$here/passing.txt" "$update" <<'PY'
import json, sys
report, listed_path, update = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
results = json.load(open(report))
passed, failed = set(), {}
for f in results["testResults"]:
    for t in f["assertionResults"]:
        name = " > ".join(t["ancestorTitles"] + [t["title"]])
        if t["status"] == "passed":
            passed.add(name)
        elif t["status"] == "failed":
            failed[name] = (t.get("failureMessages") or [""])[0].splitlines()[0][:200]
try:
    listed = {l.strip() for l in open(listed_path) if l.strip() and not l.startswith("#")}
except FileNotFoundError:
    listed = set()
print(f"durable-streams conformance: {len(passed)} passed, {len(failed)} failed "
      f"({len(listed)} listed as passing)")
if update:
    with open(listed_path, "w") as out:
        out.write("# Conformance tests eventqueue passes (tests/durable-streams/run.sh --update).\n")
        for name in sorted(passed):
            out.write(name + "\n")
    print(f"wrote {len(passed)} names to {listed_path}")
    sys.exit(0)
regressed = sorted(listed - passed)
for name in regressed:
    print(f"REGRESSED: {name}: {failed.get(name, 'not run')}")
new = sorted(passed - listed)
if new:
    print(f"{len(new)} tests pass that passing.txt does not list (run with --update):")
    for name in new:
        print(f"  {name}")
sys.exit(1 if regressed else 0)
PY
