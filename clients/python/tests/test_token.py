"""Token mode: HS256 bearer tokens minted with ``eventqueue token``; the tenant comes from the
token; scopes decide what a client may do; errors carry the server's detail."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

import eventqueue
from eventqueue import QueueManager, TaskState, create_complete_event, create_status_event

from .conftest import Server
from .test_queue import collect, soon


@pytest.fixture
def acme() -> str:
    return f"acme_{uuid.uuid4().hex[:6]}"


@pytest.fixture
async def publisher(token_server: Server, acme: str) -> AsyncIterator[QueueManager]:
    m = QueueManager(token_server.url, token=token_server.token(acme))
    yield m
    await m.aclose()


async def test_the_tenant_comes_from_the_token(
    publisher: QueueManager, acme: str, task_id: str
) -> None:
    assert publisher.tenant_id == acme
    q = await publisher.create_queue(task_id, acme)
    assert q.tenant_id == acme
    await q.enqueue(create_status_event(task_id, acme, TaskState.WORKING, "x"))
    await q.enqueue(create_complete_event(task_id, acme, {"ok": True}))
    got = await soon(collect(q))
    assert [e.event_type for e in got] == ["status", "complete"]
    assert [i["task_id"] for i in await publisher.list_active_queues()] == [task_id]


async def test_the_environment_configures_the_global_manager(
    token_server: Server, monkeypatch: pytest.MonkeyPatch, acme: str, task_id: str
) -> None:
    monkeypatch.setenv("EVENTQUEUE_URL", token_server.url)
    monkeypatch.setenv("EVENTQUEUE_TOKEN", token_server.token(acme))
    monkeypatch.delenv("EVENTQUEUE_TENANT", raising=False)
    eventqueue.reset_queue_manager()
    try:
        manager = eventqueue.get_queue_manager()
        assert manager is eventqueue.get_queue_manager()
        q = await manager.create_queue(task_id, acme)
        assert await q.enqueue(create_status_event(task_id, acme, TaskState.PENDING)) == 0
    finally:
        eventqueue.reset_queue_manager()


async def test_no_token_is_401_with_detail(token_server: Server) -> None:
    m = QueueManager(token_server.url)
    try:
        with pytest.raises(eventqueue.AuthenticationError) as err:
            await m.list_active_queues()
        assert err.value.status_code == 401 and err.value.detail
    finally:
        await m.aclose()


async def test_a_forged_token_is_401(token_server: Server, acme: str) -> None:
    token = token_server.token(acme)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    m = QueueManager(token_server.url, token=forged)
    try:
        with pytest.raises(eventqueue.AuthenticationError):
            await m.create_queue("x", acme)
    finally:
        await m.aclose()


async def test_scopes(
    token_server: Server, publisher: QueueManager, acme: str, task_id: str
) -> None:
    q = await publisher.create_queue(task_id, acme)
    await q.enqueue(create_status_event(task_id, acme, TaskState.WORKING))
    watcher = QueueManager(token_server.url, token=token_server.token(acme, "subscribe"))
    try:
        wq = await watcher.get_queue(task_id)
        assert wq is not None
        with pytest.raises(eventqueue.PermissionDeniedError) as err:
            await wq.enqueue(create_status_event(task_id, acme, TaskState.WORKING))
        assert err.value.status_code == 403 and "publish" in err.value.detail
        # The person watching a task may cancel it.
        assert await watcher.cancel_task(task_id, "watcher said stop") is True
        assert (await q.get_info())["cancel_reason"] == "watcher said stop"
        await q.enqueue(create_status_event(task_id, acme, TaskState.CANCELLED))
        assert [e.offset for e in await soon(collect(wq))] == [0, 1]
    finally:
        await watcher.aclose()


async def test_another_tenants_queue_is_not_found(
    token_server: Server, publisher: QueueManager, acme: str, task_id: str
) -> None:
    await publisher.create_queue(task_id, acme)
    other = QueueManager(token_server.url, token=token_server.token(f"{acme}_other"))
    try:
        assert await other.get_queue(task_id) is None
        assert await other.cancel_task(task_id) is False
        # Asking for acme's queue with a token of another tenant is refused before sending.
        with pytest.raises(eventqueue.TenantMismatchError):
            await other.get_queue(task_id, acme)
        with pytest.raises(ValueError):
            await other.create_queue(task_id, acme)
    finally:
        await other.aclose()


async def test_an_admin_token_acts_for_any_tenant(
    token_server: Server, acme: str, task_id: str
) -> None:
    admin = QueueManager(token_server.url, token=token_server.token("ops", "admin"))
    own = QueueManager(token_server.url, token=token_server.token(acme))
    try:
        made = await admin.create_queue(task_id, acme)
        assert made.tenant_id == acme
        await made.enqueue(create_status_event(task_id, acme, TaskState.WORKING))
        mine = await own.get_queue(task_id)
        assert mine is not None and await mine.get_latest_offset() == 1
        listed = await admin.list_active_queues(acme)
        assert [i["task_id"] for i in listed] == [task_id]
    finally:
        await admin.aclose()
        await own.aclose()


async def test_remote_cancel_in_token_mode(
    token_server: Server, publisher: QueueManager, acme: str, task_id: str
) -> None:
    q = await publisher.create_queue(task_id, acme)
    other = QueueManager(token_server.url, token=token_server.token(acme, "subscribe"))
    try:
        assert await other.cancel_task(task_id, "elsewhere") is True

        async def cancelled() -> None:
            while not q.cancellation_token.is_cancelled:  # a producer's boundary check
                await asyncio.sleep(0.05)

        await soon(cancelled())
        assert q.cancellation_token.reason == "elsewhere"
    finally:
        await other.aclose()


async def test_a_publish_only_producer_learns_of_a_cancel_from_its_enqueues(
    token_server: Server, acme: str, task_id: str
) -> None:
    producer = QueueManager(token_server.url, token=token_server.token(acme, "publish"))
    watcher = QueueManager(token_server.url, token=token_server.token(acme, "subscribe"))
    try:
        q = await producer.create_queue(task_id, acme)

        async def refused() -> None:  # the worker's info requests get 403: it stops asking
            while not q.poll_refused:
                _ = q.cancellation_token.is_cancelled
                await asyncio.sleep(0.05)

        await soon(refused())
        assert await watcher.cancel_task(task_id, "stop") is True
        assert not q.cancellation_token.is_cancelled
        await q.enqueue(create_status_event(task_id, acme, TaskState.WORKING))
        assert q.cancellation_token.is_cancelled  # from the enqueue's answer
        assert q.cancellation_token.reason is None  # the info holding it is not readable
    finally:
        await producer.aclose()
        await watcher.aclose()
