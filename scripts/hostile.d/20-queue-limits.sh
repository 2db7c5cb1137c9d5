#!/usr/bin/env bash
# Issue 26, item 2: queue creation as the tenant's queue count grows (0, 10k, 100k), and
# /healthz latency while one tenant at its queue limit is flooded with creations (all 429).
# HOSTILE_QUEUES sets the largest count (default 102000: the 100k window needs it).
source "$(dirname "$0")/lib/common.sh"
total="${HOSTILE_QUEUES:-102000}"

start_server queue-rate --max-queues-per-tenant $((total + 10))
echo "creating $total queues with 8 clients:"
python3 "$HOSTILE_LIB/queues.py" rate "$SERVER_URL" --total "$total"
stop_server "$SERVER_PID"

start_server queue-flood --max-queues-per-tenant 10000
echo "a tenant at its 10k-queue limit, 16 clients asking for more:"
python3 "$HOSTILE_LIB/queues.py" flood "$SERVER_URL" --limit 10000
stop_server "$SERVER_PID"
