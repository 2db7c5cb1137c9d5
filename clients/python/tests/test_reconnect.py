"""Reconnection across a server restart: a subscriber running while the server is killed with
SIGKILL (or stopped) and started again ends with every event exactly once, in order."""

from __future__ import annotations

import asyncio

import pytest

from eventqueue import (
    QueueManager,
    TaskEvent,
    TaskState,
    create_complete_event,
    create_progress_event,
    create_status_event,
)

from .conftest import Server
from .test_queue import LIVENESS, wait_for_subscribers

EVENTS = 300


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_subscriber_survives_a_restart(fresh_server: Server, how: str, task_id: str) -> None:
    manager = QueueManager(fresh_server.url, tenant_id="acme", max_retries=20)
    try:
        q = await manager.create_queue(task_id, "acme", max_buffer_size=10_000)
        sub = q.subscribe()
        received: list[TaskEvent] = []

        async def consume() -> None:
            async for event in sub:
                received.append(event)

        consumer = asyncio.create_task(consume())
        await asyncio.wait_for(wait_for_subscribers(q, 1), LIVENESS)

        sent: list[TaskEvent] = [create_status_event(task_id, "acme", TaskState.WORKING, "start")]
        sent += [create_progress_event(task_id, "acme", i, EVENTS) for i in range(EVENTS)]
        sent.append(create_complete_event(task_id, "acme", {"events": EVENTS}))

        async def produce() -> None:
            for i, event in enumerate(sent):
                if i == len(sent) // 2:
                    # Mid-stream, with the subscriber connected: take the server down and
                    # bring it back on the same port and data directory. The enqueues in
                    # between retry (same event ids) until it is back.
                    if how == "sigkill":
                        fresh_server.kill()
                    else:
                        fresh_server.stop()
                    await asyncio.sleep(0.3)
                    fresh_server.start()
                await q.enqueue(event)
                if i % 10 == 0:
                    await asyncio.sleep(0.005)  # let the subscriber keep up: a live stream

        await asyncio.wait_for(produce(), LIVENESS * 2)
        await asyncio.wait_for(consumer, LIVENESS)

        assert [e.offset for e in received] == list(range(len(sent)))
        assert [e.event_id for e in received] == [e.event_id for e in sent]
        assert received == sent
        assert sub.reconnects >= 1  # it did reconnect, by itself
        assert sub.gaps == []
        assert await q.get_latest_offset() == len(sent)  # no retried enqueue was duplicated
    finally:
        await manager.aclose()
