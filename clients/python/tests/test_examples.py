"""The original design's usage examples (basic usage, reconnection with replay, cancellation),
run against a real server with only the import line changed.

Each example's text is kept below exactly as the design document has it, except:
- ``from cogniverse_core.events import (`` became ``from eventqueue import (``;
- in the reconnection example, whose loop bodies are placeholder comments, each placeholder
  comment got a statement in front of it that records the event (a loop body made of a
  comment alone is not valid Python).

The examples use fixed ids (``workflow_123``, ``tenant1``), so each runs on a server of its
own, found through ``EVENTQUEUE_URL`` as an application would.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

import eventqueue
from eventqueue import TaskState, create_complete_event, create_status_event

from .conftest import Server
from .test_queue import soon

BASIC_USAGE = """
from eventqueue import (
    get_queue_manager,
    create_status_event,
    create_progress_event,
    TaskState,
)

# Get the global queue manager
manager = get_queue_manager()

# Create a queue for a workflow
queue = await manager.create_queue(
    task_id="workflow_123",
    tenant_id="tenant1",
    ttl_minutes=30,
)

# Emit events
await queue.enqueue(create_status_event(
    task_id="workflow_123",
    tenant_id="tenant1",
    state=TaskState.WORKING,
    phase="planning",
))

# Subscribe to events (in another coroutine)
async for event in queue.subscribe():
    print(f"Received: {event.event_type}")
    if event.event_type == "complete":
        break
"""

RECONNECTION = """
# First connection - get offset
last_offset = 0
async for event in queue.subscribe():
    last_offset = await queue.get_latest_offset()
    first.append(event)  # ... process event ...
    if connection_lost:
        break

# Reconnect from last offset
async for event in queue.subscribe(from_offset=last_offset):
    resumed.append(event)  # ... resume processing ...
"""

CANCELLATION = """
# Via queue manager
await manager.cancel_task("workflow_123", reason="User requested")

# Via queue directly
queue.cancel("Timeout exceeded")

# Check in producer
if queue.cancellation_token.is_cancelled:
    # Clean up and stop
    pass
"""


async def run_example(source: str, **names: Any) -> dict[str, Any]:
    """Runs ``source`` as the body of a coroutine (top-level ``await`` as in the document),
    with ``names`` defined; returns its local variables."""
    code = "async def example():\n" + textwrap.indent(source, "    ") + "\n    return locals()\n"
    namespace: dict[str, Any] = dict(names)
    exec(compile(code, "<design example>", "exec"), namespace)
    result: dict[str, Any] = await namespace["example"]()
    return result


@pytest.fixture
def own_server(fresh_server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("EVENTQUEUE_URL", fresh_server.url)
    monkeypatch.delenv("EVENTQUEUE_TENANT", raising=False)
    monkeypatch.delenv("EVENTQUEUE_TOKEN", raising=False)
    eventqueue.reset_queue_manager()
    yield fresh_server
    eventqueue.reset_queue_manager()


async def finish_workflow_123() -> None:
    """Another coroutine of the application: completes the workflow once its queue exists."""
    manager = eventqueue.get_queue_manager()
    while (queue := await manager.get_queue("workflow_123")) is None:
        await asyncio.sleep(0.02)
    while await queue.get_latest_offset() < 1:
        await asyncio.sleep(0.02)
    await queue.enqueue(create_complete_event("workflow_123", "tenant1", {"answer": "..."}))


async def test_basic_usage(own_server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    finisher = asyncio.create_task(finish_workflow_123())
    names = await soon(run_example(BASIC_USAGE))
    await soon(finisher)
    assert capsys.readouterr().out == "Received: status\nReceived: complete\n"
    queue = names["queue"]
    assert isinstance(queue, eventqueue.EventQueue)
    assert (queue.task_id, queue.tenant_id) == ("workflow_123", "tenant1")
    assert await queue.get_latest_offset() == 2


async def test_reconnection_with_replay(own_server: Server) -> None:
    manager = eventqueue.get_queue_manager()
    queue = await manager.create_queue(task_id="workflow_123", tenant_id="tenant1")
    for phase in ("planning", "phase_1", "phase_2"):
        await queue.enqueue(
            create_status_event("workflow_123", "tenant1", TaskState.WORKING, phase)
        )

    async def later() -> None:
        # What happens while the client is away, and after it came back.
        while (await queue.get_info())["subscriber_count"] == 0:
            await asyncio.sleep(0.02)
        await queue.enqueue(
            create_status_event("workflow_123", "tenant1", TaskState.WORKING, "phase_3")
        )
        await queue.enqueue(create_complete_event("workflow_123", "tenant1", {"answer": 42}))

    first: list[Any] = []
    resumed: list[Any] = []
    producer = asyncio.create_task(later())
    names = await soon(
        run_example(RECONNECTION, queue=queue, connection_lost=True, first=first, resumed=resumed)
    )
    await soon(producer)
    assert names["last_offset"] == 3
    assert [e.phase for e in first] == ["planning"]
    # The reconnection resumed at the latest offset seen, and ended with the terminal event.
    assert [(e.offset, e.event_type) for e in resumed] == [(3, "status"), (4, "complete")]


async def test_cancellation(own_server: Server) -> None:
    manager = eventqueue.get_queue_manager()
    queue = await manager.create_queue("workflow_123", "tenant1")
    await soon(run_example(CANCELLATION, manager=manager, queue=queue))
    assert queue.cancellation_token.is_cancelled
    assert queue.cancellation_token.reason == "Timeout exceeded"  # the last local cancel
    info = await queue.get_info()
    assert info["is_cancelled"] is True
    assert info["cancel_reason"] == "User requested"  # the server keeps the first reason
