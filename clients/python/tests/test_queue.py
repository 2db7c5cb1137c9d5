"""One queue, against a real server: the original suite's queue tests (seed 7-18, 34, 43-46)
and what the original lacked (offsets, gaps, idempotent and batch enqueue, typed errors)."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Awaitable
from typing import Any, Optional, TypeVar

import pytest

import eventqueue
from eventqueue import (
    EventQueue,
    Gap,
    GapWarning,
    QueueManager,
    TaskEvent,
    TaskState,
    create_artifact_event,
    create_complete_event,
    create_error_event,
    create_progress_event,
    create_status_event,
)

T = TypeVar("T")

# A generous bound for things that must happen "soon": reaching it fails the test instead of
# hanging it. No test asserts how fast anything is.
LIVENESS = 20.0


async def soon(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, LIVENESS)


def status(q: EventQueue, phase: str, state: TaskState = TaskState.WORKING) -> TaskEvent:
    return create_status_event(q.task_id, q.tenant_id, state, phase)


async def collect(
    q: EventQueue, from_offset: int = 0, n: Optional[int] = None, **kw: Any
) -> list[TaskEvent]:
    """Events of ``subscribe(from_offset)`` until it ends, or until ``n`` were read."""
    out: list[TaskEvent] = []
    async for event in q.subscribe(from_offset, **kw):
        out.append(event)
        if n is not None and len(out) == n:
            break
    return out


async def wait_for_subscribers(q: EventQueue, n: int) -> None:
    while (await q.get_info())["subscriber_count"] < n:
        await asyncio.sleep(0.02)


async def test_enqueue_then_subscribe(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 7
    q = await manager.create_queue(task_id, tenant)
    sent = status(q, "planning")
    assert await q.enqueue(sent) == 0
    [got] = await soon(collect(q, n=1))
    assert got.event_id == sent.event_id
    assert got.offset == 0


async def test_five_events_in_order(manager: QueueManager, task_id: str, tenant: str) -> None:  # 8
    q = await manager.create_queue(task_id, tenant)
    for i in range(5):
        await q.enqueue(status(q, f"phase_{i}"))
    got = await soon(collect(q, n=5))
    assert [e.phase for e in got] == [f"phase_{i}" for i in range(5)]  # type: ignore[union-attr]
    assert [e.offset for e in got] == [0, 1, 2, 3, 4]


async def test_subscribe_from_offset(manager: QueueManager, task_id: str, tenant: str) -> None:  # 9
    q = await manager.create_queue(task_id, tenant)
    for i in range(5):
        await q.enqueue(status(q, f"phase_{i}"))
    await q.close()
    got = await soon(collect(q, from_offset=3))
    assert [e.offset for e in got] == [3, 4]


async def test_latest_offset(manager: QueueManager, task_id: str, tenant: str) -> None:  # 10
    q = await manager.create_queue(task_id, tenant)
    assert await q.get_latest_offset() == 0
    for i in range(3):
        await q.enqueue(status(q, str(i)))
    assert await q.get_latest_offset() == 3


async def test_a_waiting_subscriber_gets_everything_beyond_the_buffer(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 11
    q = await manager.create_queue(task_id, tenant, max_buffer_size=3)
    gaps: list[Gap] = []
    reader = asyncio.create_task(collect(q, n=6, on_gap=gaps.append))
    await soon(wait_for_subscribers(q, 1))
    for i in range(6):
        await q.enqueue(status(q, str(i)))
    got = await soon(reader)
    assert [e.offset for e in got] == list(range(6))
    assert gaps == []
    assert (await q.get_info())["event_count"] == 3


async def test_a_late_subscriber_is_told_of_the_gap(
    manager: QueueManager, task_id: str, tenant: str
) -> None:
    q = await manager.create_queue(task_id, tenant, max_buffer_size=3)
    for i in range(6):
        await q.enqueue(status(q, str(i)))
    await q.close()
    gaps: list[Gap] = []
    sub = q.subscribe(0, on_gap=gaps.append)
    got = [e async for e in sub]
    assert [e.offset for e in got] == [3, 4, 5]
    assert gaps == [Gap(0, 3)] == sub.gaps
    assert gaps[0].missed == 3
    # Without a callback the gap is still said: a GapWarning (and a log line).
    with pytest.warns(GapWarning, match=r"2 events .* \(offsets 1\.\.2\)"):
        got = await soon(collect(q, from_offset=1))
    assert [e.offset for e in got] == [3, 4, 5]


async def test_latest_offset_counts_dropped_events(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 12
    q = await manager.create_queue(task_id, tenant, max_buffer_size=2)
    for i in range(5):
        await q.enqueue(status(q, str(i)))
    assert await q.get_latest_offset() == 5


async def test_cancel_sets_the_token_and_reaches_the_server(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 13
    q = await manager.create_queue(task_id, tenant)
    assert not q.cancellation_token.is_cancelled
    delivered = q.cancel("user pressed stop")
    # Synchronous: the local token flipped before anything was sent.
    token = q.cancellation_token
    assert token.is_cancelled and token.reason == "user pressed stop"
    assert token.cancel_time is not None
    assert await soon(asyncio.wrap_future(delivered)) is True
    info = await q.get_info()
    assert info["is_cancelled"] is True
    assert info["cancel_reason"] == "user pressed stop"


async def test_close_ends_an_active_subscriber(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 14
    q = await manager.create_queue(task_id, tenant)
    reader = asyncio.create_task(collect(q))
    await soon(wait_for_subscribers(q, 1))
    await q.close()
    assert await soon(reader) == []
    assert q.is_closed
    assert (await q.get_info())["is_closed"] is True


async def test_two_live_subscribers_get_the_same_events(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 15, 46
    q = await manager.create_queue(task_id, tenant)
    readers = [asyncio.create_task(collect(q, n=3)) for _ in range(2)]
    await soon(wait_for_subscribers(q, 2))
    sent = [await q.enqueue(status(q, str(i))) for i in range(3)]
    a, b = await soon(asyncio.gather(*readers))
    assert [e.event_id for e in a] == [e.event_id for e in b]
    assert [e.offset for e in a] == sent == [0, 1, 2]


async def test_retained_count_and_latest_offset(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 16
    q = await manager.create_queue(task_id, tenant, max_buffer_size=5)
    offsets = await q.enqueue_batch([status(q, str(i)) for i in range(10)])
    assert offsets == list(range(10))
    info = await q.get_info()
    assert (info["event_count"], info["latest_offset"], info["first_offset"]) == (5, 10, 5)


async def test_fresh_queue_stats(manager: QueueManager, task_id: str, tenant: str) -> None:  # 17
    q = await manager.create_queue(task_id, tenant)
    stats = q.get_stats()
    assert stats["task_id"] == task_id and stats["tenant_id"] == tenant
    assert (stats["event_count"], stats["subscriber_count"], stats["latest_offset"]) == (0, 0, 0)
    assert not stats["is_closed"] and not stats["is_cancelled"] and not stats["is_expired"]
    assert stats["ttl_minutes"] == 30
    assert not q.is_closed and not q.is_expired


async def test_ttl_zero_expires_at_the_next_sweep(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 18 (differs: removed at the next sweep)
    q = await manager.create_queue(task_id, tenant, ttl_minutes=0)
    reader = asyncio.create_task(collect(q))

    async def gone() -> None:
        while await manager.get_queue(task_id) is not None:
            await asyncio.sleep(0.1)

    await soon(gone())
    assert await soon(reader) == []  # its subscriber ended
    assert q.is_expired


async def test_subscribed_events_carry_their_tenant(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 34
    q = await manager.create_queue(task_id, tenant)
    await q.enqueue(status(q, "x"))
    [e] = await soon(collect(q, n=1))
    assert e.tenant_id == tenant and e.task_id == task_id


async def test_every_field_survives_the_round_trip(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 43
    q = await manager.create_queue(task_id, tenant)
    sent: list[TaskEvent] = [
        create_status_event(task_id, tenant, TaskState.INPUT_REQUIRED, "review", "waiting"),
        create_progress_event(task_id, tenant, 3, 7, "step_3", {"video": "a.mp4", "n": [1, 2.5]}),
        create_artifact_event(task_id, tenant, "summary", {"text": 'é ✓ "q"'}, is_partial=True),
        create_error_event(task_id, tenant, "Timeout", "slow", "E_T", {"try": 2}),
        create_complete_event(task_id, tenant, {"answer": 42}, "done", 10.5),
    ]
    for e in sent:
        await q.enqueue(e)
    got = await soon(collect(q))  # ends after the complete event
    assert got == sent  # every field, event_id and timestamp included, and offset
    assert [e.offset for e in got] == [0, 1, 2, 3, 4]


async def test_producer_enqueues_then_closes(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 44, 45
    q = await manager.create_queue(task_id, tenant)
    reader = asyncio.create_task(collect(q))
    await soon(wait_for_subscribers(q, 1))
    for i in range(3):
        await q.enqueue(status(q, str(i)))
    await q.close()
    assert [e.offset for e in await soon(reader)] == [0, 1, 2]


async def test_enqueue_after_close_raises(manager: QueueManager, task_id: str, tenant: str) -> None:
    q = await manager.create_queue(task_id, tenant)
    await q.close()
    await q.close()  # idempotent
    with pytest.raises(RuntimeError):
        await q.enqueue(status(q, "late"))
    # Closed by someone else: the server's 409 becomes the same error, with its detail.
    other = QueueManager(manager.url, tenant_id=tenant)
    try:
        q2 = await other.get_queue(task_id)
        assert q2 is not None
        q2._closed = False  # this client does not know yet: the server must refuse
        with pytest.raises(eventqueue.QueueClosedError) as err:
            await q2.enqueue(status(q2, "late"))
        assert err.value.status_code == 409 and "closed" in err.value.detail
        assert isinstance(err.value, RuntimeError)
    finally:
        await other.aclose()


async def test_enqueue_is_idempotent_on_event_id(
    manager: QueueManager, task_id: str, tenant: str
) -> None:
    q = await manager.create_queue(task_id, tenant)
    e = status(q, "once")
    assert await q.enqueue(e) == 0
    assert await q.enqueue(status(q, "next")) == 1
    assert await q.enqueue(e) == 0  # a retry of the first: nothing appended
    assert await q.get_latest_offset() == 2


async def test_batch_enqueue(manager: QueueManager, task_id: str, tenant: str) -> None:
    q = await manager.create_queue(task_id, tenant, max_buffer_size=5000)
    events = [create_progress_event(task_id, tenant, i, 1500) for i in range(1500)]
    offsets = await q.enqueue_batch(events)  # two requests: 1000 + 500
    assert offsets == list(range(1500))
    assert [e.offset for e in events] == offsets
    await q.close()
    got = await soon(collect(q))
    assert [e.event_id for e in got] == [e.event_id for e in events]


async def test_an_invalid_batch_stores_nothing(
    manager: QueueManager, task_id: str, tenant: str
) -> None:
    q = await manager.create_queue(task_id, tenant)
    # current > total: the models accept it (as the original's did), the server refuses it.
    bad = eventqueue.ProgressEvent(
        task_id=task_id, tenant_id=tenant, current=5, total=3, percentage=100
    )
    with pytest.raises(eventqueue.InvalidRequestError) as err:
        await q.enqueue_batch([status(q, "ok"), bad])
    assert err.value.status_code == 400
    assert "events[1]" in err.value.detail and "current" in err.value.detail
    assert isinstance(err.value, ValueError)
    assert await q.get_latest_offset() == 0


async def test_errors_carry_the_servers_detail(manager: QueueManager, tenant: str) -> None:
    ghost = EventQueue(manager._transport, manager._worker, "no_such_task", tenant)
    with pytest.raises(eventqueue.QueueNotFoundError) as err:
        await ghost.get_latest_offset()
    assert err.value.status_code == 404
    assert err.value.detail == "No queue found for task no_such_task"
    with pytest.raises(eventqueue.QueueNotFoundError) as err:
        await soon(collect(ghost))
    assert err.value.detail == "No active workflow found with ID no_such_task"  # seed 47 differs
    with pytest.raises(eventqueue.InvalidRequestError) as bad:
        await manager.create_queue("bad id!", tenant)
    assert "task_id" in bad.value.detail


async def test_deletion_ends_subscribers(manager: QueueManager, task_id: str, tenant: str) -> None:
    q = await manager.create_queue(task_id, tenant)
    await q.enqueue(status(q, "x"))
    reader = asyncio.create_task(collect(q))
    await soon(wait_for_subscribers(q, 1))
    assert await manager.delete_queue(task_id) is True
    assert [e.offset for e in await soon(reader)] == [0]
    assert q.is_expired
    assert await manager.delete_queue(task_id) is False


async def test_a_terminal_event_ends_the_subscription(
    manager: QueueManager, task_id: str, tenant: str
) -> None:
    q = await manager.create_queue(task_id, tenant)
    reader = asyncio.create_task(collect(q))
    await soon(wait_for_subscribers(q, 1))
    q.cancel("stop")
    await q.enqueue(status(q, "a"))
    await q.enqueue(create_status_event(task_id, tenant, TaskState.CANCELLED, message="stopped"))
    got = await soon(reader)
    assert [(e.event_type, e.offset) for e in got] == [("status", 0), ("status", 1)]
    assert got[-1].state == "cancelled"  # type: ignore[union-attr]
    # Events after the terminal one are stored; a new subscription from there ends at once.
    await q.enqueue(status(q, "after"))
    assert await soon(collect(q, from_offset=2)) == []
    assert [e.offset for e in await soon(collect(q))] == [0, 1]


async def test_gap_warning_is_an_error_in_this_suite() -> None:
    # pyproject turns GapWarning into an error, so that no test passes over a gap unawares.
    with pytest.raises(GapWarning), warnings.catch_warnings():
        warnings.simplefilter("error", GapWarning)
        warnings.warn("x", GapWarning, stacklevel=1)


async def test_a_slow_subscriber_misses_nothing_unsaid(
    manager: QueueManager, task_id: str, tenant: str
) -> None:
    """A subscriber that stalls while the producer runs far past the retention bound: what
    it receives and the gaps it is told of cover every offset exactly once.

    3000 events of 8 KB (24 MB) are more than the stalled connection's socket buffers (a few
    MB) and the server's live channel (1024 events) can hold, so the server must fall back
    to the retained log (10 events) and say that the rest is gone."""
    q = await manager.create_queue(task_id, tenant, max_buffer_size=10)
    gaps: list[Gap] = []
    received: list[int] = []
    stalled = asyncio.Event()
    resume = asyncio.Event()

    async def consume() -> None:
        async for event in q.subscribe(on_gap=gaps.append):
            assert event.offset is not None
            received.append(event.offset)
            if event.offset == 0:
                stalled.set()
                await resume.wait()

    reader = asyncio.create_task(consume())
    blob = {"pad": "x" * 8000}
    await q.enqueue(create_artifact_event(task_id, tenant, "chunk", blob))
    await soon(stalled.wait())
    n = 3000
    await q.enqueue_batch([create_artifact_event(task_id, tenant, "chunk", blob) for _ in range(n)])
    await q.enqueue(create_complete_event(task_id, tenant, {}))
    resume.set()
    await soon(reader)
    covered = received + [
        o for g in gaps for o in range(g.requested_offset, g.first_available_offset)
    ]
    assert sorted(covered) == list(range(n + 2))  # every offset once: delivered, or said dropped
    assert received == sorted(received)
    assert received[-1] == n + 1
    assert gaps, "the subscriber fell behind retention: it must have been told"


async def test_an_event_over_the_servers_limit(
    manager: QueueManager, task_id: str, tenant: str
) -> None:
    q = await manager.create_queue(task_id, tenant)
    huge = create_artifact_event(task_id, tenant, "blob", {"pad": "x" * (1 << 20)})
    with pytest.raises(eventqueue.PayloadTooLargeError) as err:
        await q.enqueue(huge)
    assert err.value.status_code == 413 and "exceeds the limit" in err.value.detail
    assert isinstance(err.value, ValueError)
    assert await q.get_latest_offset() == 0
