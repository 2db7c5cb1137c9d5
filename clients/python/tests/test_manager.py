"""The manager: the original suite's manager tests (seed 19-33) and its HTTP tests at the
client level (seed 47-57)."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

import eventqueue
from eventqueue import QueueManager, TaskState, create_status_event

from .conftest import Server
from .test_queue import soon


async def test_created_queue_has_its_ids(manager: QueueManager, task_id: str, tenant: str) -> None:
    q = await manager.create_queue(task_id, tenant)  # 19
    assert (q.task_id, q.tenant_id) == (task_id, tenant)


async def test_duplicate_create_raises_value_error(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 20
    await manager.create_queue(task_id, tenant)
    with pytest.raises(ValueError, match="Queue already exists") as err:
        await manager.create_queue(task_id, tenant)
    assert isinstance(err.value, eventqueue.QueueExistsError)
    assert err.value.status_code == 409


async def test_get_queue(manager: QueueManager, task_id: str, tenant: str) -> None:  # 21, 22
    q = await manager.create_queue(task_id, tenant)
    assert await manager.get_queue(task_id) is q
    assert await manager.get_queue("never_created") is None


async def test_the_same_object_for_the_same_task(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 23
    a = await manager.get_or_create_queue(task_id, tenant)
    b = await manager.get_or_create_queue(task_id, tenant)
    assert a is b
    assert await manager.get_queue(task_id) is a
    assert await manager.get_queue(task_id, tenant) is a


async def test_get_queue_finds_a_queue_made_elsewhere(
    server: Server, manager: QueueManager, task_id: str, tenant: str
) -> None:
    other = QueueManager(server.url, tenant_id=tenant)
    try:
        made = await other.create_queue(task_id, tenant, kind="workflow")
        await made.enqueue(create_status_event(task_id, tenant, TaskState.WORKING))
    finally:
        await other.aclose()
    q = await manager.get_queue(task_id)
    assert q is not None and q.tenant_id == tenant
    assert await q.get_latest_offset() == 1
    assert (await q.get_info())["kind"] == "workflow"


async def test_close_queue(manager: QueueManager, task_id: str, tenant: str) -> None:  # 24, 25
    q = await manager.create_queue(task_id, tenant)
    await q.enqueue(create_status_event(task_id, tenant, TaskState.WORKING))
    assert await manager.close_queue(task_id) is True
    assert q.is_closed
    assert task_id not in [i["task_id"] for i in await manager.list_active_queues()]
    # Differs from the original: still replayable until it expires or is deleted.
    assert [e.offset async for e in q.subscribe()] == [0]
    assert await manager.close_queue("never_created") is False


async def test_listing_by_tenant(manager: QueueManager, tenant: str) -> None:  # 26, 33
    t1, t2 = f"{tenant}_1", f"{tenant}_2"
    for task, t in (("a", t1), ("b", t1), ("c", t2)):
        await manager.create_queue(task, t)
    one = await manager.list_active_queues(t1)
    two = await manager.list_active_queues(t2)
    assert sorted(i["task_id"] for i in one) == ["a", "b"]
    assert [i["task_id"] for i in two] == ["c"]
    assert {i["tenant_id"] for i in one} == {t1} and {i["tenant_id"] for i in two} == {t2}
    assert len(one) + len(two) == 3
    fields = {"task_id", "tenant_id", "event_count", "subscriber_count", "is_closed"}
    assert fields <= set(one[0]) and one[0]["is_expired"] is False
    # Tenants are isolated: the same task id under another tenant is another queue.
    assert await manager.get_queue("c", t1) is None


async def test_cleanup_expired(manager: QueueManager, task_id: str, tenant: str) -> None:  # 27
    expiring = await manager.create_queue(task_id, tenant, ttl_minutes=0)
    live = await manager.create_queue(f"{task_id}_live", tenant)

    async def expired() -> None:
        while True:
            try:
                await expiring.get_info()
            except eventqueue.QueueNotFoundError:
                return
            await asyncio.sleep(0.1)

    await soon(expired())
    assert await manager.cleanup_expired() == 1
    stats = manager.get_manager_stats()
    assert (stats["total_queues"], stats["active_queues"]) == (1, 1)
    assert await manager.get_queue(live.task_id) is live


async def test_cancel_task(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 28, 29, 51, 53
    q = await manager.create_queue(task_id, tenant)
    assert await manager.cancel_task(task_id, reason="User requested") is True
    assert q.cancellation_token.is_cancelled
    assert q.cancellation_token.reason == "User requested"
    info = await q.get_info()
    assert info["is_cancelled"] and info["cancel_reason"] == "User requested"
    assert await manager.cancel_task("never_created") is False


async def test_cancel_of_a_finished_task_returns_false(
    manager: QueueManager, task_id: str, tenant: str
) -> None:
    q = await manager.create_queue(task_id, tenant)
    await q.enqueue(eventqueue.create_complete_event(task_id, tenant, {"ok": True}))
    assert await manager.cancel_task(task_id) is False
    assert not q.cancellation_token.is_cancelled


async def test_manager_stats(server: Server, tenant: str, task_id: str) -> None:  # 30
    m = QueueManager(server.url, tenant_id=tenant)
    try:
        stats = m.get_manager_stats()
        assert (stats["total_queues"], stats["active_queues"]) == (0, 0)
        assert stats["default_ttl_minutes"] == 30
        await m.create_queue(task_id, tenant)
        assert m.get_manager_stats()["active_queues"] == 1
    finally:
        await m.aclose()


async def test_cleanup_loop(manager: QueueManager, task_id: str, tenant: str) -> None:  # 31, 32
    await manager.create_queue(task_id, tenant, ttl_minutes=0)
    await manager.create_queue(f"{task_id}_live", tenant)
    await manager.start_cleanup_loop(interval_seconds=1)
    first = manager._cleanup_task
    await manager.start_cleanup_loop(interval_seconds=1)
    assert manager._cleanup_task is first  # one loop

    async def reaped() -> None:
        while manager.get_manager_stats()["total_queues"] != 1:
            await asyncio.sleep(0.1)

    await soon(reaped())
    assert manager.cleanup_running
    await manager.stop_cleanup_loop()
    assert not manager.cleanup_running and manager._cleanup_task is None


async def test_queue_info_fields_and_fresh_offset(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 55, 56
    q = await manager.create_queue(task_id, tenant, ttl_minutes=5, max_buffer_size=10)
    assert await q.get_latest_offset() == 0
    await q.enqueue(create_status_event(task_id, tenant, TaskState.WORKING))
    info = await q.get_info()
    fields = (
        "task_id tenant_id kind event_count subscriber_count is_closed is_cancelled "
        "cancel_reason is_finished created_at last_activity ttl_minutes max_buffer_size "
        "first_offset latest_offset"
    )
    assert set(fields.split()) <= set(info)
    assert (info["ttl_minutes"], info["max_buffer_size"], info["event_count"]) == (5, 10, 1)


async def test_end_to_end_unknowns(manager: QueueManager) -> None:  # 57
    assert await manager.cancel_task("nope") is False
    assert await manager.get_queue("nope") is None
    assert isinstance(await manager.list_active_queues(), list)


async def test_remote_cancel_from_the_cli_shows_on_the_token(
    server: Server, manager: QueueManager, task_id: str, tenant: str
) -> None:
    q = await manager.create_queue(task_id, tenant)
    assert not q.cancellation_token.is_cancelled
    subprocess.run(
        [str(server.binary), "cancel", task_id, "--reason", "from the CLI"],
        check=True,
        capture_output=True,
        env={"EVENTQUEUE_URL": server.url, "EVENTQUEUE_TENANT": tenant},
    )
    started = time.monotonic()
    # A producer's loop: check the token at each boundary.
    while not q.cancellation_token.is_cancelled:
        assert time.monotonic() - started < 20, "the remote cancel never showed"
        await asyncio.sleep(0.05)
    assert q.cancellation_token.reason == "from the CLI"


async def test_a_remote_cancel_shows_in_the_next_enqueue(
    server: Server, task_id: str, tenant: str
) -> None:
    polling_off = QueueManager(server.url, tenant_id=tenant, cancel_poll_interval=0)
    other = QueueManager(server.url, tenant_id=tenant)
    try:
        q = await polling_off.create_queue(task_id, tenant)
        assert await other.cancel_task(task_id, "elsewhere") is True
        assert not q.cancellation_token.is_cancelled  # nothing polled
        await q.enqueue(create_status_event(task_id, tenant, TaskState.WORKING))
        assert q.cancellation_token.is_cancelled
    finally:
        await polling_off.aclose()
        await other.aclose()


async def test_an_ingestion_job_uses_the_ingestion_routes(
    manager: QueueManager, task_id: str, tenant: str
) -> None:  # 50, 52
    q = await manager.create_queue(task_id, tenant, kind="ingestion")
    assert q.kind == "ingestion" and q.stream_path.startswith("/events/ingestion/")
    await q.enqueue(create_status_event(task_id, tenant, TaskState.WORKING, "video_1"))
    assert await soon(asyncio.wrap_future(q.cancel("enough"))) is True
    await q.enqueue(create_status_event(task_id, tenant, TaskState.CANCELLED))
    got = [e async for e in q.subscribe()]
    assert [e.offset for e in got] == [0, 1]
    assert (await q.get_info())["cancel_reason"] == "enough"
    await manager.delete_queue(task_id)
    with pytest.raises(eventqueue.QueueNotFoundError) as err:
        [e async for e in q.subscribe()]
    assert err.value.detail == f"No active ingestion job found with ID {task_id}"  # 54


async def test_a_queue_created_again_after_deletion_is_new(
    manager: QueueManager, task_id: str, tenant: str
) -> None:
    first = await manager.create_queue(task_id, tenant)
    await first.close()
    other = QueueManager(manager.url, tenant_id=tenant)
    try:
        assert await other.delete_queue(task_id) is True  # elsewhere: this manager cannot know
    finally:
        await other.aclose()
    second = await manager.create_queue(task_id, tenant)
    assert second is not first and not second.is_closed
    assert await second.enqueue(create_status_event(task_id, tenant, TaskState.WORKING)) == 0
    assert await manager.get_queue(task_id) is second
