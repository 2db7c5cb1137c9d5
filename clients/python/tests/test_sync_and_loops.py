"""The synchronous facade, and one manager used from several event loops (FastAPI's
``TestClient`` runs the app on a loop of its own thread; ``asyncio.run`` twice makes two)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

import eventqueue
from eventqueue import TaskState, create_complete_event, create_status_event
from eventqueue.sync import Client

from .conftest import Server
from .test_queue import soon


def test_sync_facade(server: Server, tenant: str, task_id: str) -> None:
    with Client(server.url, tenant_id=tenant) as client:
        q = client.create_queue(task_id, kind="ingestion")
        assert q.tenant_id == tenant
        assert q.enqueue(create_status_event(task_id, tenant, TaskState.WORKING, "a")) == 0
        assert q.enqueue_batch(
            [create_status_event(task_id, tenant, TaskState.WORKING, str(i)) for i in range(3)]
        ) == [1, 2, 3]
        assert q.get_latest_offset() == 4
        assert client.get_queue(task_id) is not None
        assert client.get_or_create_queue(task_id).queue is q.queue
        # Reading part of a live stream and stopping early closes it.
        first_two = []
        for event in q.subscribe():
            first_two.append(event.offset)
            if len(first_two) == 2:
                break
        assert first_two == [0, 1]
        q.enqueue(create_complete_event(task_id, tenant, {"n": 4}))
        assert [e.offset for e in q.subscribe(from_offset=3)] == [3, 4]
        assert client.cancel_task(task_id) is False  # finished: nothing to cancel
        q.close()
        with pytest.raises(RuntimeError):
            q.enqueue(create_status_event(task_id, tenant, TaskState.WORKING))
        with pytest.raises(eventqueue.QueueExistsError):
            client.create_queue(task_id)
        assert client.delete_queue(task_id) is True
        assert client.get_queue(task_id) is None


def test_sync_cancel_is_synchronous(server: Server, tenant: str, task_id: str) -> None:
    with Client(server.url, tenant_id=tenant) as client:
        q = client.create_queue(task_id)
        delivered = q.cancel("stop")
        assert q.cancellation_token.is_cancelled
        assert delivered.result(timeout=20) is True
        assert q.get_info()["is_cancelled"] is True


@pytest.fixture
def app(global_manager: None) -> FastAPI:
    """An application written against the original API, streaming a task's events to a
    browser as SSE (the README's example)."""
    api = FastAPI()

    @api.post("/tasks/{task_id}")
    async def start(task_id: str, tenant: str) -> dict[str, int]:
        manager = eventqueue.get_queue_manager()
        queue = await manager.get_or_create_queue(task_id, tenant)
        offset = await queue.enqueue(create_status_event(task_id, tenant, TaskState.WORKING))
        return {"offset": offset}

    @api.get("/tasks/{task_id}/events")
    async def events(task_id: str, from_offset: int = 0) -> StreamingResponse:
        queue = await eventqueue.get_queue_manager().get_queue(task_id)
        if queue is None:
            return StreamingResponse(iter(()), status_code=404)

        async def frames() -> AsyncIterator[str]:
            async for event in queue.subscribe(from_offset):
                data = event.model_dump_json()
                yield f"id: {event.offset}\nevent: {event.event_type}\ndata: {data}\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")

    return api


async def test_one_manager_from_several_loops(
    app: FastAPI, server: Server, tenant: str, task_id: str
) -> None:
    manager = eventqueue.get_queue_manager()
    # This test's loop creates the queue and keeps using it...
    queue = await manager.create_queue(task_id, tenant)
    await queue.enqueue(create_status_event(task_id, tenant, TaskState.PENDING))

    # ...while the app, on the TestClient's own loop and thread, uses the same manager and
    # the same queue object.
    def in_the_app() -> list[dict[str, object]]:
        with TestClient(app) as http:
            assert http.post(f"/tasks/{task_id}", params={"tenant": tenant}).json() == {"offset": 1}
            with http.stream("GET", f"/tasks/{task_id}/events") as resp:
                assert resp.headers["content-type"].startswith("text/event-stream")
                out = []
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        out.append(json.loads(line[6:]))
                return out

    async def finish_when_subscribed() -> None:
        while (await queue.get_info())["subscriber_count"] == 0:
            await asyncio.sleep(0.02)
        await queue.enqueue(create_complete_event(task_id, tenant, {"ok": True}))

    finisher = asyncio.create_task(finish_when_subscribed())
    got = await soon(asyncio.to_thread(in_the_app))
    await soon(finisher)
    assert [(e["offset"], e["event_type"]) for e in got] == [
        (0, "status"),
        (1, "status"),
        (2, "complete"),
    ]
    assert await manager.get_queue(task_id) is queue
    # And a third loop, in another thread, after the app's loop has closed.
    third = await asyncio.to_thread(lambda: asyncio.run(queue.get_latest_offset()))
    assert third == 3


def test_asyncio_run_twice(global_manager: None, tenant: str, task_id: str) -> None:
    async def create() -> eventqueue.EventQueue:
        return await eventqueue.get_queue_manager().create_queue(task_id, tenant)

    async def use(q: eventqueue.EventQueue) -> int:
        await q.enqueue(create_status_event(task_id, tenant, TaskState.WORKING))
        q.cancel("second loop")
        return await q.get_latest_offset()

    q = asyncio.run(create())
    assert asyncio.run(use(q)) == 1
    deadline = time.monotonic() + 20

    async def info() -> dict[str, object]:
        return await q.get_info()

    while not asyncio.run(info())["is_cancelled"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
