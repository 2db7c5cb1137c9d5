"""Measures the Python client against a real ``eventqueue serve`` (not run in CI).

    EVENTQUEUE_BIN=target/release/eventqueue python clients/python/bench/bench.py

1. Sequential enqueue, one event per request (durable ack each time), through
   ``EventQueue.enqueue`` and through a bare ``httpx.AsyncClient`` loop posting the same JSON
   bytes (serialised beforehand, so the baseline does no model work at all). The two
   alternate in rounds, so that a busy minute on a shared machine hits both.
2. Replay of 100k retained events through ``subscribe()`` (typed pydantic events, offsets
   checked), and the same stream read as raw bytes by httpx, for the split.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import eventqueue
from eventqueue import QueueManager, create_progress_event
from eventqueue.types import event_json

REPO = Path(__file__).resolve().parents[3]


def start_server(data_dir: str, durability: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = os.environ.get("EVENTQUEUE_BIN") or str(REPO / "target/release/eventqueue")
    log = Path(data_dir) / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                "serve",
                "--data-dir",
                f"{data_dir}/data",
                "--bind",
                "127.0.0.1:0",
                "--durability",
                durability,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": "warn,eventqueue::server=info"},
        )
    for _ in range(1000):
        match = re.search(r"listening on (http://\S+)", log.read_text())
        if match:
            return proc, match.group(1)
        time.sleep(0.01)
    raise RuntimeError(log.read_text())


# Events per second of this process's CPU time: what the client would reach with a core to
# itself, whatever else the machine is doing.
REPLAY_CPU: list[float] = []
ENQUEUE_CPU: dict[str, list[float]] = {"bare": [], "client": []}


async def enqueue_client(m: QueueManager, task: str, n: int) -> float:
    q = await m.create_queue(task, "bench", max_buffer_size=n + 10)
    events = [create_progress_event(task, "bench", i, n, "step", {"i": i}) for i in range(n)]
    start = time.perf_counter()
    cpu = time.process_time()
    for e in events:
        await q.enqueue(e)
    ENQUEUE_CPU["client"].append(n / (time.process_time() - cpu))
    return n / (time.perf_counter() - start)


async def enqueue_bare(url: str, m: QueueManager, task: str, n: int) -> float:
    await m.create_queue(task, "bench", max_buffer_size=n + 10)
    bodies = [
        event_json(create_progress_event(task, "bench", i, n, "step", {"i": i})) for i in range(n)
    ]
    headers = {"content-type": "application/json", "x-tenant-id": "bench"}
    async with httpx.AsyncClient(base_url=url) as http:
        start = time.perf_counter()
        cpu = time.process_time()
        for body in bodies:
            resp = await http.post(f"/events/queues/{task}/events", content=body, headers=headers)
            resp.raise_for_status()
        ENQUEUE_CPU["bare"].append(n / (time.process_time() - cpu))
        return n / (time.perf_counter() - start)


async def replay(m: QueueManager, url: str, n: int, rounds: int) -> tuple[list[float], list[float]]:
    task = "replay"
    q = await m.create_queue(task, "bench", max_buffer_size=n)
    batch = 1000
    for start in range(0, n, batch):
        await q.enqueue_batch(
            [
                create_progress_event(task, "bench", i, n, "step", {"i": i})
                for i in range(start, start + batch)
            ]
        )
    await q.close()
    typed: list[float] = []
    raw: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter()
        cpu = time.process_time()
        count = 0
        async for event in q.subscribe():
            assert event.offset == count
            count += 1
        assert count == n
        typed.append(n / (time.perf_counter() - start))
        REPLAY_CPU.append(n / (time.process_time() - cpu))

        start = time.perf_counter()
        size = 0
        async with (
            httpx.AsyncClient(base_url=url, timeout=60) as http,
            http.stream("GET", f"/events/workflows/{task}", headers={"x-tenant-id": "bench"}) as r,
        ):
            async for chunk in r.aiter_raw():
                size += len(chunk)
        raw.append(n / (time.perf_counter() - start))
    return typed, raw


async def ending_latencies(m: QueueManager, url: str, rounds: int) -> dict[str, list[float]]:
    """Milliseconds from an action to what a client sees of it: a live subscriber ending after
    close / deletion / a terminal event, and a cancel made by another client showing on the
    token of a queue in use."""
    out: dict[str, list[float]] = {"close": [], "delete": [], "terminal": [], "remote cancel": []}
    other = QueueManager(url, tenant_id="bench")
    for r in range(rounds):
        for what in ("close", "delete", "terminal"):
            q = await m.create_queue(f"end_{what}_{r}", "bench")

            async def consume(q: eventqueue.EventQueue = q) -> float:
                async for _ in q.subscribe():
                    pass
                return time.perf_counter()

            reader = asyncio.create_task(consume())
            while (await q.get_info())["subscriber_count"] == 0:
                await asyncio.sleep(0.01)
            start = time.perf_counter()
            if what == "close":
                await q.close()
            elif what == "delete":
                await q.delete()
            else:
                await q.enqueue(eventqueue.create_complete_event(q.task_id, "bench", {}))
            out[what].append((await reader - start) * 1000)
        q = await m.create_queue(f"cancel_{r}", "bench")
        assert not q.cancellation_token.is_cancelled
        start = time.perf_counter()
        await other.cancel_task(q.task_id, "bench")
        while not q.cancellation_token.is_cancelled:
            await asyncio.sleep(0.001)
        out["remote cancel"].append((time.perf_counter() - start) * 1000)
    await other.aclose()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--enqueue", type=int, default=2000, help="events per enqueue round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replay", type=int, default=100_000)
    parser.add_argument(
        "--durability",
        default="immediate",
        choices=["immediate", "buffered"],
        help="the server's; buffered takes the fsync out of each enqueue (the client's cost shows)",
    )
    args = parser.parse_args()
    print(f"server durability: {args.durability}; load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(tmp, args.durability)
        try:
            m = QueueManager(url, tenant_id="bench", cancel_poll_interval=0)
            polling = QueueManager(url, tenant_id="bench")
            ends = await ending_latencies(polling, url, args.rounds)
            await polling.aclose()
            client_rates: list[float] = []
            bare_rates: list[float] = []
            for r in range(args.rounds):
                bare_rates.append(await enqueue_bare(url, m, f"bare_{r}", args.enqueue))
                client_rates.append(await enqueue_client(m, f"client_{r}", args.enqueue))
            typed, raw = await replay(m, url, args.replay, args.rounds)
            await m.aclose()
        finally:
            proc.terminate()
            proc.wait()
    fmt = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)  # noqa: E731
    print(f"load average after: {os.getloadavg()}")
    print(
        f"python {platform.python_version()}, httpx {httpx.__version__}, "
        f"eventqueue {eventqueue.__version__}, {os.cpu_count()} CPUs"
    )
    print(f"sequential enqueue, bare httpx   : {fmt(bare_rates)} events/s")
    print(f"sequential enqueue, EventQueue   : {fmt(client_rates)} events/s")
    ratios = [b / c for b, c in zip(bare_rates, client_rates, strict=True)]
    print(f"  bare / client per round        : {', '.join(f'{x:.2f}' for x in ratios)}")
    print(f"  per CPU-second of this process : bare {fmt(ENQUEUE_CPU['bare'])}")
    print(f"                                   client {fmt(ENQUEUE_CPU['client'])}")
    print(f"replay {args.replay:,} via subscribe(): {fmt(typed)} events/s")
    print(f"  per CPU-second of this process : {fmt(REPLAY_CPU)}")
    print(f"replay {args.replay:,} raw httpx bytes : {fmt(raw)} events/s")
    for what, ms in ends.items():
        print(f"{what:>13} -> seen by the client: {', '.join(f'{x:.1f}' for x in ms)} ms")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
