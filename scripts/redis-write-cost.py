#!/usr/bin/env python3
"""What an appended event costs Redis, by how many events share a batch script (issue 21's
sizing). For one Redis server and for a 3-master Redis Cluster (loopback, AOF `appendfsync
always`, fresh each time), one `eventqueue serve` node over it, and three workloads of
one-event or 16-event POSTs:

    1 x 1      one client, one event per request, one queue
    8 x 1      eight clients at once, one event per request, each on its own queue (so a
               node's group commit holds several queues: in a cluster, several slots)
    8 x 16     eight clients at once, batches of 16 events, each on its own queue

it reads Redis's CPU time (user + system, every server process, from /proc) and the batch
script's calls and time (`INFO commandstats`, `evalsha`) before and after, and prints them
per event appended. Redis's CPU includes its AOF writes and fsyncs; the script's time does not.

    scripts/redis-write-cost.py [--requests 1500] [--only single|cluster]

Uses $EVENTQUEUE_BIN, else target/release/eventqueue; redis-server and redis-cli from PATH.
Stdlib only. Figures of a shared machine vary by tens of percent from run to run.
"""

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from redislab import free_port, redis_cli, start_node

EVENT = {"event_type": "progress", "current": 1, "total": 100, "step": "processing",
         "details": {"pad": "x" * 200}}


def start_redis(tmp, cluster):
    ports = [free_port() for _ in range(3 if cluster else 1)]
    for port in ports:
        d = os.path.join(tmp, f"redis{port}")
        os.makedirs(d)
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", d,
                "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                "--daemonize", "yes", "--pidfile", os.path.join(d, "pid"),
                "--logfile", os.path.join(d, "log")]
        if cluster:
            args += ["--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                     "--cluster-config-file", "nodes.conf"]
        subprocess.run(args, check=True)
    for port in ports:
        for _ in range(100):
            try:
                if "PONG" in redis_cli(port, "PING"):
                    break
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.05)
    if cluster:
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "0",
                        "--cluster-yes"], capture_output=True, check=True)
        for port in ports:
            for _ in range(200):
                if "cluster_state:ok" in redis_cli(port, "CLUSTER", "INFO"):
                    break
                time.sleep(0.05)
        url = "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    else:
        url = f"redis://127.0.0.1:{ports[0]}"
    return ports, url


def stop_redis(ports):
    for port in ports:
        try:
            redis_cli(port, "SHUTDOWN", "NOSAVE")
        except subprocess.CalledProcessError:
            pass


def post(c, path, body):
    c.request("POST", path, body, {"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    return r.status


def redis_cpu(ports):
    """Seconds of CPU (user + system) of every Redis server process."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for port in ports:
        pid = int(redis_cli(port, "INFO", "server").split("process_id:")[1].split()[0])
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def scripts(ports):
    """(calls, microseconds) of the batch script over every server."""
    calls = usec = 0
    for port in ports:
        for line in redis_cli(port, "INFO", "commandstats").splitlines():
            if line.startswith("cmdstat_evalsha:"):
                calls += int(line.split("calls=")[1].split(",")[0])
                usec += int(line.split("usec=")[1].split(",")[0])
    return calls, usec


def client(port, task, requests, batch, errors):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps(EVENT if batch == 1 else {"events": [EVENT] * batch})
    for _ in range(requests):
        status = post(c, f"/events/queues/{task}/events", body)
        if status != 200:
            errors.append(status)
            return


def measure(ports, node_port, clients, batch, requests, run):
    tasks = [f"cost{run}_{i}" for i in range(clients)]
    c = http.client.HTTPConnection("127.0.0.1", node_port, timeout=30)
    for task in tasks:
        post(c, "/events/queues", json.dumps({"task_id": task, "max_buffer_size": 1000}))
        post(c, f"/events/queues/{task}/events", json.dumps(EVENT))
    cpu0, (calls0, usec0), t0 = redis_cpu(ports), scripts(ports), time.monotonic()
    errors = []
    threads = [threading.Thread(target=client, args=(node_port, t, requests, batch, errors))
               for t in tasks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    cpu1, (calls1, usec1) = redis_cpu(ports), scripts(ports)
    if errors:
        sys.exit(f"requests failed: {errors[:5]}")
    events = clients * requests * batch
    return {
        "events/s": events / elapsed,
        "cpu": (cpu1 - cpu0) * 1e6 / events,
        "scripts": (calls1 - calls0) / events,
        "script_us": (usec1 - usec0) / events,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1500,
                        help="requests per client (a tenth of it for batches of 16)")
    parser.add_argument("--only", choices=["single", "cluster"])
    args = parser.parse_args()
    binary = os.environ.get("EVENTQUEUE_BIN") or os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "release", "eventqueue")
    if not os.path.exists(binary):
        sys.exit(f"no binary at {binary}: cargo build --release, or set EVENTQUEUE_BIN")
    print("| Redis | workload | events/s | scripts per event | script µs per event "
          "| Redis CPU µs per event |")
    print("|---|---|---|---|---|---|")
    for mode in ["single", "cluster"]:
        if args.only and args.only != mode:
            continue
        tmp = tempfile.mkdtemp()
        ports, url = start_redis(tmp, mode == "cluster")
        node = None
        try:
            node, node_port = start_node(binary, url, tmp, "node")
            for run, (clients, batch, requests) in enumerate(
                    [(1, 1, args.requests), (8, 1, args.requests),
                     (8, 16, max(1, args.requests // 10))]):
                m = measure(ports, node_port, clients, batch, requests, run)
                label = "one server" if mode == "single" else "3-master cluster"
                print(f"| {label} | {clients} x {batch} | {m['events/s']:.0f} "
                      f"| {m['scripts']:.2f} | {m['script_us']:.1f} | {m['cpu']:.0f} |",
                      flush=True)
        finally:
            if node:
                node.terminate()
                node.wait()
            stop_redis(ports)
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
