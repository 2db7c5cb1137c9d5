#!/usr/bin/env python3
"""Where one request's latency goes: the same minimal client (one keep-alive TCP connection,
one request at a time, blocking socket) against eventqueue and Redis, so that client cost is
equal and the differences are the servers'.

    compare/latency_probe.py --eventqueue target/release/eventqueue [--redis-server redis-server]
                             [--work-dir DIR] [-n 2000]

Starts `eventqueue serve` twice (durability immediate and buffered, open mode on loopback) and
`redis-server --appendfsync always`, each on a fresh directory under --work-dir, and prints
p50 / p99 of:

- a raw 300-byte append + fdatasync (the disk floor), at the start and the end;
- GET /healthz vs Redis PING: the bare protocol round trip;
- POST of an invalid event (400 after the body is parsed and validated): HTTP + parsing,
  no store;
- POST of one 300-byte event, buffered (commit, no fsync) and immediate (fsync before the
  ack), vs XADD of a 300-byte value under appendfsync always.
"""

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, limit=10.0):
    end = time.time() + limit
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} not listening after {limit} s")


def http_done(buf):
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    for line in buf[:head_end].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(buf) - head_end - 4 >= int(line.split(b":")[1])
    return True


def resp_done(buf):
    return buf.endswith(b"\r\n")


def probe(port, request, done, n):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat = []
    for _ in range(n):
        t = time.perf_counter_ns()
        s.sendall(request)
        buf = b""
        while not done(buf):
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("connection closed")
            buf += chunk
        lat.append((time.perf_counter_ns() - t) / 1000)
    s.close()
    lat = sorted(lat[n // 10:])  # the first 10 % warm up
    return lat[len(lat) // 2], lat[int(len(lat) * 0.99)]


def floor(path, n):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    lat = []
    for _ in range(n):
        t = time.perf_counter_ns()
        os.write(fd, b"x" * 300)
        os.fdatasync(fd)
        lat.append((time.perf_counter_ns() - t) / 1000)
    os.close(fd)
    lat.sort()
    return lat[len(lat) // 2], lat[int(len(lat) * 0.99)]


def post(path, body):
    return (
        b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % (path, len(body))
    ) + body


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eventqueue", required=True)
    ap.add_argument("--redis-server", default="redis-server")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("-n", type=int, default=2000, help="requests per probe")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="latency-probe-", dir=args.work_dir)
    procs = []
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQUEUE_")}
        env["RUST_LOG"] = "warn"
        ports = {}
        for mode in ("immediate", "buffered"):
            port = free_port()
            p = subprocess.Popen(
                [args.eventqueue, "serve", "--data-dir", os.path.join(work, mode),
                 "--bind", f"127.0.0.1:{port}", "--durability", mode],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(p)
            wait_port(port, p)
            ports[mode] = port
        rport = free_port()
        os.makedirs(os.path.join(work, "redis"))
        p = subprocess.Popen(
            [args.redis_server, "--port", str(rport), "--bind", "127.0.0.1",
             "--dir", os.path.join(work, "redis"), "--appendonly", "yes",
             "--appendfsync", "always", "--save", "", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        wait_port(rport, p)

        head = ('{"event_type":"progress","current":1,"total":100,"step":"processing_video",'
                '"details":{"sent_us":0,"pad":"')
        event = (head + "x" * (300 - len(head) - 3) + '"}}').encode()
        invalid = event.replace(b'"current":1,', b'"current":999')  # current > total: 400
        for port in ports.values():
            create = post(b"/events/queues", b'{"task_id":"probe"}')
            probe(port, create, http_done, 1)
        enqueue = b"/events/queues/probe/events"
        payload = b'{"sent_us":0,"pad":"' + b"x" * 278 + b'"}'
        xadd = (b"*5\r\n$4\r\nXADD\r\n$5\r\nprobe\r\n$1\r\n*\r\n$1\r\np\r\n$%d\r\n%s\r\n"
                % (len(payload), payload))

        rows = [("raw 300 B append + fdatasync (start)", floor(os.path.join(work, "floor"), 500))]
        for name, port, req, done in [
            ("eventqueue GET /healthz", ports["buffered"],
             b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n", http_done),
            ("Redis PING", rport, b"*1\r\n$4\r\nPING\r\n", resp_done),
            ("eventqueue POST invalid event (400)", ports["buffered"], post(enqueue, invalid),
             http_done),
            ("eventqueue POST 1 event, buffered", ports["buffered"], post(enqueue, event),
             http_done),
            ("eventqueue POST 1 event, immediate", ports["immediate"], post(enqueue, event),
             http_done),
            ("Redis XADD, appendfsync always", rport, xadd, resp_done),
        ]:
            rows.append((name, probe(port, req, done, args.n)))
        rows.append(("raw 300 B append + fdatasync (end)", floor(os.path.join(work, "floor"), 500)))
        print("| probe | p50 µs | p99 µs |\n|---|---|---|")
        for name, (p50, p99) in rows:
            print(f"| {name} | {p50:.0f} | {p99:.0f} |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
