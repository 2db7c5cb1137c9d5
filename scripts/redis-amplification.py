#!/usr/bin/env python3
"""Redis commands and bytes per delivered event with 1, 2 and 3 nodes (issue 21's read
amplification). For each node count: a fresh redis-server (no persistence; loopback), that many
`eventqueue serve --storage redis://…` nodes, one queue, SUBS SSE subscribers on every node,
EVENTS events published in batches of BATCH to node 0; once every subscriber has them all,
Redis's command counts and bytes sent are read from INFO and divided by the events.

    scripts/redis-amplification.py [--events 2000] [--batch 10] [--subs 10]

Uses $EVENTQUEUE_BIN, else target/release/eventqueue. Stdlib only.
"""

import argparse
import http.client
import json
import os
import subprocess
import tempfile
import threading
import time

from redislab import free_port, redis_cli, start_node


def info(port):
    out = {}
    for line in redis_cli(port, "INFO", "all").splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k] = v.strip()
    return out


def calls(stats):
    total, by = 0, {}
    for k, v in stats.items():
        if k.startswith("cmdstat_"):
            n = int(v.split("calls=")[1].split(",")[0])
            by[k[8:]] = n
            total += n
    return total, by


def subscriber(port, want, done):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", "/events/workflows/amp")
    r = c.getresponse()
    seen = 0
    buf = b""
    while seen < want:
        chunk = r.read1(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            frame, buf = buf.split(b"\n\n", 1)
            if frame.startswith(b"id: ") or b"\nid: " in frame:
                seen += 1
    done.append(seen)


def run(binary, nodes, args):
    tmp = tempfile.mkdtemp()
    rport = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", tmp],
                             stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    procs = []
    try:
        for n in range(nodes):
            procs.append(start_node(binary, f"redis://127.0.0.1:{rport}", tmp, f"node{n}"))
        c = http.client.HTTPConnection("127.0.0.1", procs[0][1])
        c.request("POST", "/events/queues", json.dumps(
            {"task_id": "amp", "kind": "workflow", "max_buffer_size": 1000000}),
            {"Content-Type": "application/json"})
        assert c.getresponse().read() is not None
        time.sleep(0.5)
        done, threads = [], []
        for _, port in procs:
            for _ in range(args.subs):
                t = threading.Thread(target=subscriber, args=(port, args.events, done))
                t.start()
                threads.append(t)
        time.sleep(1.0)
        redis_cli(rport, "CONFIG", "RESETSTAT")
        before = info(rport)
        for i in range(0, args.events, args.batch):
            events = [{"event_type": "progress", "current": i + k, "total": args.events}
                      for k in range(args.batch)]
            c.request("POST", "/events/queues/amp/events", json.dumps({"events": events}),
                      {"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            assert r.status == 200, r.status
        for t in threads:
            t.join(timeout=120)
        after = info(rport)
        total, by = calls(after)
        out_bytes = int(after["total_net_output_bytes"]) - int(before["total_net_output_bytes"])
        delivered = sum(done)
        assert delivered == args.events * nodes * args.subs, (delivered, nodes)
        top = ", ".join(f"{k} {v}" for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:5])
        print(f"{nodes} node(s): {total / args.events:5.2f} commands and "
              f"{out_bytes / args.events:7.0f} bytes out per event appended; "
              f"{total / delivered:6.3f} commands per event delivered ({top})")
    finally:
        for p, _ in procs:
            p.terminate()
            p.wait()
        redis.terminate()
        redis.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--subs", type=int, default=10)
    args = ap.parse_args()
    binary = os.environ.get("EVENTQUEUE_BIN", "target/release/eventqueue")
    for nodes in (1, 2, 3):
        run(binary, nodes, args)


if __name__ == "__main__":
    main()
