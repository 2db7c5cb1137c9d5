#!/usr/bin/env bash
# Hostile-load measurements (issue 26), outside `cargo test`: each section under
# scripts/hostile.d/ (`NN-name.sh`, run in name order) starts its own release-build server(s) on
# free loopback ports in a temporary directory, attacks them the way a client with a valid token
# could, and prints figures. Bounded in count and time; nothing leaves loopback.
#
#   scripts/hostile.sh            every section
#   scripts/hostile.sh 10 20      only the sections whose names start with 10 or 20
#
# Environment: HOSTILE_SECTION_TIMEOUT (seconds per section, default 600), HOSTILE_KEEP=1 keeps
# the temporary directory, EVENTQUEUE_BIN uses that binary instead of building one. A section
# sources scripts/hostile.d/lib/common.sh for starting a server, RSS and cleanup.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# Thousands of sockets per section: raise the soft file limit as far as the hard one allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true

if [[ -z "${EVENTQUEUE_BIN:-}" ]]; then
    echo "building the release binary..." >&2
    cargo build --release --quiet --bin eventqueue
    target="${CARGO_TARGET_DIR:-$root/target}"
    EVENTQUEUE_BIN="$target/release/eventqueue"
fi
export EVENTQUEUE_BIN
[[ -x "$EVENTQUEUE_BIN" ]] || { echo "no binary at $EVENTQUEUE_BIN" >&2; exit 1; }

HOSTILE_TMP="$(mktemp -d "${TMPDIR:-/tmp}/eventqueue-hostile.XXXXXX")"
export HOSTILE_TMP
cleanup() {
    if [[ "${HOSTILE_KEEP:-0}" == 1 ]]; then
        echo "kept $HOSTILE_TMP" >&2
    else
        rm -rf "$HOSTILE_TMP"
    fi
}
trap cleanup EXIT

timeout_s="${HOSTILE_SECTION_TIMEOUT:-600}"
echo "# eventqueue hostile-load figures"
echo "binary: $EVENTQUEUE_BIN ($(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GB", $2/1048576}' /proc/meminfo), soft fd limit $(ulimit -n)"
failed=0
started=$SECONDS
for section in scripts/hostile.d/*.sh; do
    name="$(basename "$section")"
    if (($# > 0)); then
        wanted=0
        for prefix in "$@"; do [[ "$name" == "$prefix"* ]] && wanted=1; done
        ((wanted)) || continue
    fi
    echo
    echo "## $name"
    t0=$SECONDS
    # Own process group per section, so a timeout takes its servers and helpers with it.
    if timeout --kill-after=10 "$timeout_s" setsid bash "$section"; then
        echo "(section took $((SECONDS - t0)) s)"
    else
        rc=$?
        echo "SECTION FAILED: $name (exit $rc after $((SECONDS - t0)) s)"
        failed=1
    fi
done
echo
echo "total: $((SECONDS - started)) s"
exit "$failed"
