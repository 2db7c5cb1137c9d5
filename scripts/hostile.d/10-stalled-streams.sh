#!/usr/bin/env bash
# Issue 26, item 1: memory held by SSE streams that never read. Over a closed queue of 50 events
# of ~1 MiB, then one of 50k events of 1 KB: one fast reader (replay throughput, and it warms the
# page cache so it is not counted per stream), then 1000 streams that never read; server RSS
# before, with them open, and after they closed. Override the count with HOSTILE_STALLED.
source "$(dirname "$0")/lib/common.sh"
streams="${HOSTILE_STALLED:-1000}"

run() {
    local count="$1" size="$2"
    start_server "stalled-$size" --max-sse-streams-per-tenant $((streams + 10)) \
        --max-sse-streams $((streams + 10))
    hostile_py fill "$SERVER_URL" big --count "$count" --size "$size"
    hostile_py read "$SERVER_URL" big
    echo -n "$count events of ~$size B, $streams stalled streams: "
    hostile_py stall "$SERVER_URL" big --streams "$streams" --pid "$SERVER_PID"
    stop_server "$SERVER_PID"
}

run 50 1000000
run 50000 1000
