#!/usr/bin/env bash
# Issue 26, item 3: the connection layer. Against a release server started with a soft
# open-file limit of 1024 (the common default; hard limit as the machine has it, then 1024:1024):
#   - 1100 idle sockets from 127.0.0.1, then /healthz from 127.0.0.1 and from 127.0.0.2
#     (another client address): status and time of each;
#   - time to the answer of a request declaring a 3 MB body and sending 2 bytes;
#   - server RSS held by 200 connections that send all but the last bytes of 2 MiB bodies.
# EVENTQUEUE_BIN_BEFORE=<older binary> runs the same against it ("without the change").
# Loopback only; bounded: 1100 sockets, 200 bodies, each step a few seconds.
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
hard="$(ulimit -Hn)"

# The client side of each measurement (many sockets, raw HTTP), in Python.
conn_py() {
    python3 - "$@" <<'PY'
import json, os, resource, socket, sys, time

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
mode, port = sys.argv[1], int(sys.argv[2])

def status_of(data):
    try:
        return int(data.split(b" ", 2)[1])
    except Exception:
        return None

def request(raw, source="127.0.0.1", timeout=5.0):
    """Status and seconds to the first answer byte; 'timeout'/'closed'/'reset' otherwise."""
    t0 = time.monotonic()
    try:
        s = socket.socket()
        s.settimeout(timeout)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(raw)
        data = s.recv(4096)
        took = time.monotonic() - t0
        s.close()
        if not data:
            return "closed", took
        return status_of(data), took
    except socket.timeout:
        return "timeout", time.monotonic() - t0
    except ConnectionResetError:
        return "reset", time.monotonic() - t0

def detail(raw):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(raw)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data:
            head, _, body = data.partition(b"\r\n\r\n")
            n = [int(l.split(b":")[1]) for l in head.lower().split(b"\r\n") if l.startswith(b"content-length:")]
            if n and len(body) >= n[0]:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    return (head.split(b"\r\n")[0] + b" " + body[:160]).decode(errors="replace")

healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"

if mode == "idle":
    count = int(sys.argv[3])
    socks, refused, failed = [], 0, 0
    for _ in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            socks.append(s)
        except OSError:
            failed += 1
    time.sleep(0.5)
    # Connections the server refused have an answer (503) waiting, or are closed.
    for s in socks:
        s.setblocking(False)
        try:
            data = s.recv(64)
            if data.startswith(b"HTTP/1.1 503") or data == b"":
                refused += 1
        except BlockingIOError:
            pass
        except OSError:
            refused += 1
    same = request(healthz, "127.0.0.1")
    other = request(healthz, "127.0.0.2")
    fmt = lambda r: f"{r[0]} in {r[1]*1000:.0f} ms"
    print(f"{count} idle sockets: {count - refused - failed} held, {refused} refused, "
          f"{failed} connect failures; /healthz from 127.0.0.1: {fmt(same)}; "
          f"from 127.0.0.2: {fmt(other)}")
elif mode == "declared":
    raw = (b"POST /events/queues/q/events HTTP/1.1\r\nHost: x\r\n"
           b"Content-Type: application/json\r\nContent-Length: 3000000\r\n\r\n{}")
    st, took = request(raw, timeout=40)
    print(f"declared 3 MB body, 2 bytes sent: {st} after {took*1000:.1f} ms")
elif mode == "halfsent":
    count, pid = int(sys.argv[3]), int(sys.argv[4])
    def rss():
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    size = 2 * 1024 * 1024
    body = b'{"event_type":"status","state":"working","message":"' + b"x" * (size - 100)
    body = body[: size - 10]
    head = (b"POST /events/queues/q/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % size)
    before = rss()
    socks, answered = [], {}
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(head)
        s.setblocking(False)
        try:
            s.sendall(body)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass
        s.setblocking(True)
        socks.append(s)
    time.sleep(2)
    for s in socks:
        s.setblocking(False)
        try:
            st = status_of(s.recv(64))
        except BlockingIOError:
            st = "waiting"
        except OSError:
            st = "reset"
        answered[st] = answered.get(st, 0) + 1
    held = rss()
    for s in socks:
        s.close()
    time.sleep(1)
    print(f"{count} half-sent 2 MiB bodies: RSS {before:.0f} -> {held:.0f} MB "
          f"(+{held - before:.0f} MB), after they closed {rss():.0f} MB; "
          f"answers while held: {answered}")
elif mode == "heads":
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(120))
    print("120 headers:", detail(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"))
PY
}

run() {
    local label="$1" bin="$2"
    echo "### $label"
    launch_server "prlimit --nofile=1024:$hard --" "$bin" "conn-idle-$label"
    echo "open-file limit of the server: $(awk '/Max open files/ {print $4 " soft, " $5 " hard"}' /proc/$SERVER_PID/limits)"
    curl -fsS -X POST "$SERVER_URL/events/queues" -H 'content-type: application/json' \
        -d '{"task_id":"q"}' >/dev/null
    conn_py idle "${SERVER_URL##*:}" 1100
    conn_py declared "${SERVER_URL##*:}"
    stop_server "$SERVER_PID"
    launch_server "prlimit --nofile=1024:$hard --" "$bin" "conn-bodies-$label"
    curl -fsS -X POST "$SERVER_URL/events/queues" -H 'content-type: application/json' \
        -d '{"task_id":"q"}' >/dev/null
    conn_py halfsent "${SERVER_URL##*:}" 200 "$SERVER_PID"
    conn_py heads "${SERVER_URL##*:}"
    stop_server "$SERVER_PID"
    # A hard limit of 1024 too: nothing to raise.
    launch_server "prlimit --nofile=1024:1024 --" "$bin" "conn-hard-$label"
    grep -o 'open-file limit[^"]*' "$HOSTILE_TMP/conn-hard-$label.log" | head -1 || true
    conn_py idle "${SERVER_URL##*:}" 1100
    stop_server "$SERVER_PID"
}

if [[ -n "${EVENTQUEUE_BIN_BEFORE:-}" ]]; then
    run before "$EVENTQUEUE_BIN_BEFORE"
fi
run after "$EVENTQUEUE_BIN"
