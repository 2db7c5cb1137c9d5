"""Producers and checkpoints: the original suite's pipeline / checkpoint tests (seed 35-42)
and the producer helper's outcomes."""

from __future__ import annotations

import asyncio

import pytest

import eventqueue
from eventqueue import (
    EventQueue,
    Producer,
    QueueManager,
    TaskCheckpoint,
    TaskEvent,
    TaskState,
    WorkflowCheckpoint,
    create_status_event,
)

from .conftest import Server
from .test_queue import collect, soon, wait_for_subscribers


class Pipeline:
    """A producer written against the original API, as an ingestion pipeline would be."""

    def __init__(self, queue: EventQueue) -> None:
        self.queue = queue

    async def emit_phase(self, phase: str) -> None:
        await self.queue.enqueue(
            create_status_event(self.queue.task_id, self.queue.tenant_id, TaskState.WORKING, phase)
        )

    def is_cancelled(self) -> bool:
        return self.queue.cancellation_token.is_cancelled


async def test_pipeline_emits(manager: QueueManager, task_id: str, tenant: str) -> None:  # 35-37
    q = await manager.create_queue(task_id, tenant)
    p = Pipeline(q)
    await p.emit_phase("start")
    assert await q.get_latest_offset() == 1
    await p.emit_phase("next")
    assert await q.get_latest_offset() == 2
    assert not p.is_cancelled()
    q.cancel("stop")
    assert p.is_cancelled()


async def test_dashboard_and_cli_see_the_same_phases(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 38
    q = await manager.create_queue(task_id, tenant)
    dashboard = asyncio.create_task(collect(q, n=3))
    cli = asyncio.create_task(collect(q, n=3))
    await soon(wait_for_subscribers(q, 2))
    p = Pipeline(q)
    for phase in ("planning", "executing", "summarising"):
        await p.emit_phase(phase)
    a, b = await soon(asyncio.gather(dashboard, cli))
    phases = [e.phase for e in a]  # type: ignore[union-attr]
    assert phases == ["planning", "executing", "summarising"]
    assert [e.event_id for e in a] == [e.event_id for e in b]


async def test_reconnect_at_an_offset(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 39
    q = await manager.create_queue(task_id, tenant)
    p = Pipeline(q)
    for i in range(5):
        await p.emit_phase(f"phase_{i}")
    first = await soon(collect(q, n=2))
    resumed = await soon(collect(q, from_offset=2, n=3))
    assert [e.phase for e in first + resumed] == [f"phase_{i}" for i in range(5)]  # type: ignore[union-attr]


async def test_checkpoint_save_emits_its_events(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 40, 41
    q = await manager.create_queue(task_id, tenant, kind="workflow")
    saved = await q.save_checkpoint(
        WorkflowCheckpoint(
            status="running",
            current_phase=1,
            total_phases=3,
            tasks=[TaskCheckpoint(task_id="search", status="completed", result={"hits": 12})],
            state={"query": "cats"},
        )
    )
    assert saved.workflow_id == task_id and saved.checkpoint_id.startswith("ckpt_")
    assert (saved.status_offset, saved.progress_offset, saved.seq) == (0, 1, 0)
    status_event, progress = await soon(collect(q, n=2))
    assert isinstance(status_event, eventqueue.StatusEvent)
    assert (status_event.state, status_event.phase) == ("working", "phase_1")
    assert status_event.message == "Checkpoint saved: running"
    assert isinstance(progress, eventqueue.ProgressEvent)
    assert (progress.current, progress.total, progress.step) == (1, 1, "phase_1")
    assert progress.details == {
        "checkpoint_id": saved.checkpoint_id,
        "workflow_status": "running",
        "current_phase": 1,
        "total_phases": 3,
    }
    latest = await q.latest_checkpoint()
    assert latest is not None and latest.checkpoint_id == saved.checkpoint_id
    assert latest.state == {"query": "cats"} and latest.tasks[0].result == {"hits": 12}
    assert latest.pending_tasks() == []


async def test_checkpoint_without_a_queue(manager: QueueManager, tenant: str) -> None:  # 42
    store = manager.checkpoints(tenant)
    assert await store.latest("wf_without_queue") is None
    saved = await store.save(
        "wf_without_queue",
        {"status": "pending", "tasks": [{"task_id": "a", "status": "pending"}]},
    )
    assert saved.checkpoint_id.startswith("ckpt_")
    assert saved.status_offset is None and saved.progress_offset is None
    latest = await store.latest("wf_without_queue")
    assert latest is not None and [t.task_id for t in latest.pending_tasks()] == ["a"]
    again = await store.save("wf_without_queue", {"status": "running"})
    listed = await store.list("wf_without_queue")
    assert [(c.checkpoint_id, c.seq) for c in listed] == [
        (saved.checkpoint_id, 0),
        (again.checkpoint_id, 1),
    ]
    assert listed[1].status == "running"
    assert await store.list("wf_never_saved") == []
    bad_task = {"status": "running", "tasks": [{"task_id": "a", "status": "zzz"}]}
    with pytest.raises(ValueError, match=r"tasks\.0\.status"):  # refused before sending
        await store.save("wf_without_queue", bad_task)
    with pytest.raises(eventqueue.InvalidRequestError, match="status") as err:
        await store.save("wf_without_queue", WorkflowCheckpoint(status=""))  # refused by the server
    assert err.value.status_code == 400


async def test_checkpoint_on_a_closed_queue_is_refused(
    manager: QueueManager, task_id: str, tenant: str
) -> None:
    q = await manager.create_queue(task_id, tenant)
    await q.close()
    with pytest.raises(eventqueue.QueueClosedError):
        await q.save_checkpoint(WorkflowCheckpoint(status="running"))


async def events_of(q: EventQueue) -> list[TaskEvent]:
    return await soon(collect(q))


async def test_producer_reports_complete(manager: QueueManager, task_id: str, tenant: str) -> None:
    q = await manager.create_queue(task_id, tenant)
    async with q.producer() as task:
        await task.phase("planning")
        await task.progress(1, 2, step="search")
        await task.artifact("report", {"title": "draft"})
        await task.error("Flaky", "retrying")  # recoverable: the task goes on
        task.result = {"answer": 42}
        task.summary = "done"
    assert task.outcome == "completed"
    got = await events_of(q)
    assert [e.event_type for e in got] == [
        "status",
        "progress",
        "artifact",
        "error",
        "complete",
    ]
    done = got[-1]
    assert isinstance(done, eventqueue.CompleteEvent)
    assert done.result == {"answer": 42} and done.summary == "done"
    assert done.execution_time_seconds is not None and done.execution_time_seconds >= 0


async def test_producer_reports_a_failure_and_reraises(
    manager: QueueManager, task_id: str, tenant: str
) -> None:
    q = await manager.create_queue(task_id, tenant)
    with pytest.raises(KeyError):
        async with Producer(q) as task:
            await task.phase("loading")
            raise KeyError("missing_video")
    assert task.outcome == "failed"
    got = await events_of(q)
    last = got[-1]
    assert isinstance(last, eventqueue.ErrorEvent)
    assert (last.error_type, last.recoverable) == ("KeyError", False)
    assert "missing_video" in last.error_message


async def test_producer_reports_a_cancel(manager: QueueManager, task_id: str, tenant: str) -> None:
    q = await manager.create_queue(task_id, tenant)
    done = []
    async with q.producer() as task:
        for i in range(10):
            task.check_cancelled()
            await task.progress(i, 10)
            done.append(i)
            if i == 2:
                q.cancel("user pressed stop")
    assert task.outcome == "cancelled"
    assert done == [0, 1, 2]
    got = await events_of(q)
    last = got[-1]
    assert isinstance(last, eventqueue.StatusEvent)
    assert (last.state, last.message) == ("cancelled", "Cancelled: user pressed stop")
    assert len(got) == 4


async def test_producer_stops_on_a_cancel_from_another_process(
    server: Server, manager: QueueManager, task_id: str, tenant: str
) -> None:
    q = await manager.create_queue(task_id, tenant)
    other = QueueManager(server.url, tenant_id=tenant)

    async def run() -> int:
        async with q.producer() as task:
            steps = 0
            while True:  # until cancelled
                task.check_cancelled()
                await task.progress(steps % 10, 10)
                steps += 1
                if steps == 3:
                    assert await other.cancel_task(task_id, "dashboard") is True
                await asyncio.sleep(0.01)
        assert task.outcome == "cancelled"
        return steps

    try:
        steps = await soon(run())
    finally:
        await other.aclose()
    got = await events_of(q)
    assert len(got) == steps + 1
    assert got[-1].message == "Cancelled: dashboard"  # type: ignore[union-attr]


async def test_producer_reports_a_cancelled_asyncio_task(
    manager: QueueManager, task_id: str, tenant: str
) -> None:
    q = await manager.create_queue(task_id, tenant)
    started = asyncio.Event()

    async def run() -> None:
        async with q.producer() as task:
            await task.phase("waiting")
            started.set()
            await asyncio.sleep(3600)

    job = asyncio.create_task(run())
    await soon(started.wait())
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    got = await events_of(q)
    assert [e.event_type for e in got] == ["status", "status"]
    assert got[-1].state == "cancelled"  # type: ignore[union-attr]
