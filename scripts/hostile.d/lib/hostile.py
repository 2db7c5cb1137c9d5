#!/usr/bin/env python3
"""What the hostile-load sections need beyond curl (standard library only, loopback only).

  fill URL TASK --count N --size BYTES   create a queue holding N events of ~BYTES JSON, close it
  read URL TASK                          read its stream to the end as fast as possible
  stall URL TASK --streams N --pid PID   open N streams that never read; RSS of PID before,
                                         with them open, and after they close
"""

import argparse
import http.client
import json
import resource
import socket
import sys
import time
import urllib.parse

TENANT = "hostile"


def conn(url):
    u = urllib.parse.urlsplit(url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("loopback only: " + url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=60)


def request(c, method, path, body=None):
    headers = {"X-Tenant-ID": TENANT}
    if body is not None:
        body = json.dumps(body, separators=(",", ":")).encode()
        headers["Content-Type"] = "application/json"
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    if r.status >= 300:
        sys.exit(f"{method} {path}: {r.status} {data[:200]!r}")
    return json.loads(data) if data else None


def fill(args):
    c = conn(args.url)
    request(c, "POST", "/events/queues",
            {"task_id": args.task, "max_buffer_size": args.count, "ttl_minutes": 600})
    pad = "x" * max(0, args.size - 60)
    event = {"event_type": "status", "state": "working", "message": pad}
    # Batches of at most 1000 events and ~1.5 MB of body (the server takes 2 MiB).
    per_batch = max(1, min(1000, 1_500_000 // max(1, args.size)))
    t0 = time.monotonic()
    done = 0
    while done < args.count:
        n = min(per_batch, args.count - done)
        request(c, "POST", f"/events/queues/{args.task}/events", {"events": [event] * n})
        done += n
    request(c, "POST", f"/events/queues/{args.task}/close")
    secs = time.monotonic() - t0
    print(f"filled {args.task}: {args.count} events of ~{args.size} B in {secs:.1f} s")


def read(args):
    u = urllib.parse.urlsplit(args.url)
    s = socket.create_connection((u.hostname, u.port))
    s.sendall(f"GET /events/workflows/{args.task} HTTP/1.1\r\nHost: x\r\n"
              f"X-Tenant-ID: {TENANT}\r\nConnection: close\r\n\r\n".encode())
    t0 = time.monotonic()
    total = 0
    ids = 0
    tail = b""
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        total += len(chunk)
        ids += (tail + chunk).count(b"\nid: ")
        tail = chunk[-5:]
    secs = time.monotonic() - t0
    print(f"fast reader: {ids} events, {total / 1e6:.1f} MB in {secs:.2f} s: "
          f"{ids / secs:,.0f} events/s, {total / 1e6 / secs:.0f} MB/s")


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit(f"no process {pid}")


def mem_available_kb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def settle(pid, max_wait, quiet=2.0):
    """RSS once it stopped growing for `quiet` seconds (or after `max_wait`)."""
    deadline = time.monotonic() + max_wait
    last = rss_kb(pid)
    steady_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = rss_kb(pid)
        if abs(now - last) > 1024:
            steady_since = time.monotonic()
        last = now
        if time.monotonic() - steady_since >= quiet:
            break
    return last


def stall(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.streams + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    u = urllib.parse.urlsplit(args.url)
    before = settle(args.pid, 10)
    avail_before = mem_available_kb()
    socks = []
    req = (f"GET /events/workflows/{args.task} HTTP/1.1\r\nHost: x\r\n"
           f"X-Tenant-ID: {TENANT}\r\n\r\n").encode()
    for _ in range(args.streams):
        s = socket.create_connection((u.hostname, u.port))
        s.sendall(req)
        socks.append(s)
    # Peek at each status line (nothing is consumed: the streams stay stalled).
    ok = 0
    for s in socks:
        s.settimeout(10)
        try:
            if s.recv(12, socket.MSG_PEEK).startswith(b"HTTP/1.1 200"):
                ok += 1
        except OSError:
            pass
    held = settle(args.pid, args.max_wait)
    avail_held = mem_available_kb()
    for s in socks:
        s.close()
    after = settle(args.pid, 10)
    per = (held - before) / max(1, ok)
    print(f"{ok}/{args.streams} stalled streams at 200; server RSS {before / 1024:.0f} MB -> "
          f"{held / 1024:.0f} MB (+{(held - before) / 1024:.0f} MB, {per:.0f} KB per stream); "
          f"{after / 1024:.0f} MB after they closed; system memory available "
          f"-{max(0, avail_before - avail_held) / 1024:.0f} MB")
    if ok != args.streams:
        sys.exit(f"only {ok} of {args.streams} streams were accepted")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fill")
    f.add_argument("url")
    f.add_argument("task")
    f.add_argument("--count", type=int, required=True)
    f.add_argument("--size", type=int, required=True)
    r = sub.add_parser("read")
    r.add_argument("url")
    r.add_argument("task")
    s = sub.add_parser("stall")
    s.add_argument("url")
    s.add_argument("task")
    s.add_argument("--streams", type=int, required=True)
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--max-wait", type=float, default=60)
    args = p.parse_args()
    {"fill": fill, "read": read, "stall": stall}[args.cmd](args)


if __name__ == "__main__":
    main()
