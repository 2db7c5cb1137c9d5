"""Helpers shared by the Redis measurement scripts (`redis-amplification.py`,
`redis-write-cost.py`): free loopback ports, `redis-cli`, and an `eventqueue serve` node over a
Redis store. Stdlib only."""

import http.client
import os
import socket
import subprocess
import sys
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def redis_cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          check=True).stdout


def start_node(binary, url, tmp, name):
    """`eventqueue serve --storage URL` on a free loopback port, its data and log under `tmp`
    named `name`, with no EVENTQUEUE_* settings from the environment; once `/healthz` answers,
    its process and port."""
    port = free_port()
    log = open(os.path.join(tmp, f"{name}.log"), "w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQUEUE_")}
    p = subprocess.Popen([binary, "serve", "--storage", url, "--bind", f"127.0.0.1:{port}",
                          "--data-dir", os.path.join(tmp, name)], stdout=log, stderr=log,
                         env=env)
    for _ in range(200):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return p, port
        except OSError:
            pass
        time.sleep(0.05)
    p.terminate()
    sys.exit(f"{name} did not start")
