"""Issue 26, item 2: the cost of creating queues as a tenant's count grows, and what a tenant
refused at its queue limit costs everyone else. Stdlib only; loopback only.

    queues.py rate URL --total N --window W --clients C
        creates N queues with C clients and prints the creation rate over W creations at 0,
        10k and 100k (those below N).
    queues.py flood URL --limit L --clients C --seconds S
        fills the tenant to its limit L, then measures /healthz p50/p99 for S seconds alone and
        again while C clients keep asking for more queues (all refused with 429).
"""

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse


def conn(url):
    u = urllib.parse.urlparse(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=30)


def create(c, task):
    body = json.dumps({"task_id": task})
    c.request("POST", "/events/queues", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    return r.status


def create_range(url, names):
    c = conn(url)
    for name in names:
        status = create(c, name)
        if status != 201:
            sys.exit(f"creating {name}: HTTP {status}")


def rate(args):
    marks = [m for m in (0, 10_000, 100_000) if m + args.window <= args.total]
    done = 0
    for mark in marks + [args.total]:
        # Fill up to the mark quickly (not timed), then time one window.
        if mark > done:
            run(args.url, range(done, mark), args.clients)
            done = mark
        if mark == args.total:
            break
        t = time.perf_counter()
        run(args.url, range(done, done + args.window), args.clients)
        secs = time.perf_counter() - t
        done += args.window
        print(f"  creation at {mark:>7} queues: {args.window / secs:8.0f} queues/s")


def run(url, numbers, clients):
    numbers = list(numbers)
    parts = [numbers[i::clients] for i in range(clients)]
    threads = [
        threading.Thread(target=create_range, args=(url, [f"q{n}" for n in part]))
        for part in parts
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def healthz_latencies(url, seconds):
    c = conn(url)
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        c.request("GET", "/healthz")
        r = c.getresponse()
        r.read()
        out.append((time.perf_counter() - t) * 1000)
    out.sort()
    return statistics.median(out), out[int(len(out) * 0.99) - 1], len(out)


def flood(args):
    run(args.url, range(args.limit), 8)
    c = conn(args.url)
    if create(c, "one-more") != 429:
        sys.exit("the tenant is not at its limit")
    p50, p99, n = healthz_latencies(args.url, args.seconds)
    print(f"  /healthz alone:                p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  ({n} requests)")
    stop = threading.Event()
    refused = [0]

    def hammer(i):
        c = conn(args.url)
        k = 0
        while not stop.is_set():
            if create(c, f"over-{i}-{k}") == 429:
                refused[0] += 1
            k += 1

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    try:
        p50, p99, n = healthz_latencies(args.url, args.seconds)
    finally:
        stop.set()
        for t in threads:
            t.join()
    print(
        f"  /healthz during the 429 flood: p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  ({n} requests; "
        f"{refused[0] / args.seconds:.0f} refusals/s)"
    )


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rate")
    r.add_argument("url")
    r.add_argument("--total", type=int, default=102_000)
    r.add_argument("--window", type=int, default=2_000)
    r.add_argument("--clients", type=int, default=8)
    f = sub.add_parser("flood")
    f.add_argument("url")
    f.add_argument("--limit", type=int, default=10_000)
    f.add_argument("--clients", type=int, default=16)
    f.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    {"rate": rate, "flood": flood}[args.cmd](args)


if __name__ == "__main__":
    main()
