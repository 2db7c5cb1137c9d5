"""The README's examples (the orchestrator with the producer helper, the FastAPI route, the
synchronous facade), taken from the README itself and run against a real server."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import eventqueue
from eventqueue import create_complete_event
from eventqueue.sync import Client

from .conftest import Server
from .test_queue import collect, soon

README = Path(__file__).resolve().parents[1] / "README.md"


def example(marker: str) -> dict[str, Any]:
    """Executes the README's python block containing ``marker``; returns its names."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    [code] = [b for b in blocks if marker in b]
    names: dict[str, Any] = {}
    exec(compile(code, f"<README: {marker}>", "exec"), names)
    return names


async def test_orchestrator_example(global_manager: None, tenant: str, task_id: str) -> None:
    run_workflow = example("async def run_workflow")["run_workflow"]
    await soon(run_workflow(task_id, tenant, ["a.mp4", "b.mp4"]))
    queue = await eventqueue.get_queue_manager().get_queue(task_id)
    assert queue is not None
    got = await soon(collect(queue))
    kinds = [e.event_type for e in got]
    # status, then per video: progress, artifact, and the checkpoint's status + progress
    assert kinds == ["status"] + ["progress", "artifact", "status", "progress"] * 2 + ["complete"]
    done = got[-1]
    assert isinstance(done, eventqueue.CompleteEvent)
    assert done.result == {"videos": 2} and done.summary == "2 videos ingested"
    checkpoint = await queue.latest_checkpoint()
    assert checkpoint is not None and checkpoint.current_phase == 2
    assert checkpoint.pending_tasks() == []


async def test_orchestrator_example_cancelled(
    server: Server, global_manager: None, tenant: str, task_id: str
) -> None:
    run_workflow = example("async def run_workflow")["run_workflow"]
    manager = eventqueue.get_queue_manager()
    queue = await manager.create_queue(task_id, tenant, kind="workflow")
    queue.cancel("changed my mind")
    await soon(run_workflow(task_id, tenant, ["a.mp4", "b.mp4"]))
    got = await soon(collect(queue))
    assert [e.event_type for e in got] == ["status", "status"]
    assert got[-1].message == "Cancelled: changed my mind"  # type: ignore[union-attr]


async def test_fastapi_example(
    server: Server, global_manager: None, tenant: str, task_id: str
) -> None:
    app = example("app = FastAPI()")["app"]
    queue = await eventqueue.get_queue_manager().create_queue(task_id, tenant)
    await queue.enqueue(create_complete_event(task_id, tenant, {"answer": 42}))

    def browser() -> tuple[list[dict[str, Any]], int]:
        with TestClient(app) as http:
            with http.stream("GET", f"/tasks/{task_id}/events") as resp:
                assert resp.headers["content-type"].startswith("text/event-stream")
                data = [
                    json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")
                ]
            missing = http.get("/tasks/no_such_task/events").status_code
        return data, missing

    data, missing = await soon(asyncio.to_thread(browser))
    assert [(d["offset"], d["event_type"], d["result"]) for d in data] == [
        (0, "complete", {"answer": 42})
    ]
    assert missing == 404


def test_sync_example(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EVENTQUEUE_URL", server.url)
    try:
        example("from eventqueue.sync import Client")
        assert capsys.readouterr().out == "0 status\n1 complete\n"
    finally:
        # The example's queue has a fixed name: remove it, so that the example runs again.
        with Client(server.url, tenant_id="acme") as client:
            client.delete_queue("nightly_import")
