#!/usr/bin/env bash
# Slow consumers at full scale (outside `cargo test`): 1000 SSE subscribers of one queue, 100 of
# which stop reading while 4 producers push 100k events over HTTP. Prints producer ack and
# subscriber delivery latencies, gap notices and RSS. Override with EVENTQUEUE_SLOW_SUBSCRIBERS,
# EVENTQUEUE_SLOW_STALLED, EVENTQUEUE_SLOW_EVENTS, EVENTQUEUE_SLOW_RETAINED, EVENTQUEUE_SLOW_PAD.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || true
cargo test --release --test it -- --ignored --exact --nocapture \
    reliability::slow_consumers::full_scale_slow_consumers
