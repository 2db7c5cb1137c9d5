"""A small synchronous facade for scripts: the same operations without ``async``.

.. code-block:: python

    from eventqueue.sync import Client

    with Client("http://127.0.0.1:8000") as client:
        queue = client.get_or_create_queue("nightly_import", "acme")
        queue.enqueue(create_status_event("nightly_import", "acme", TaskState.WORKING))
        for event in queue.subscribe(from_offset=0):
            print(event.offset, event.event_type)

It runs the asynchronous client on an event loop of its own, in a background thread, so
reconnection, retries and gap reporting are the same as in the async API.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue as queue_mod
import threading
from collections.abc import Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, Callable, Optional, TypeVar

from .checkpoints import SavedCheckpoint, StoredCheckpoint, WorkflowCheckpoint
from .manager import QueueManager
from .queue import CancellationToken, EventQueue, Gap
from .types import TaskEvent

__all__ = ["Client", "SyncEventQueue"]

T = TypeVar("T")

_END = object()


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="eventqueue-sync", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


class SyncEventQueue:
    """The synchronous counterpart of ``EventQueue``."""

    def __init__(self, client: Client, queue: EventQueue) -> None:
        self._client = client
        self.queue = queue

    @property
    def task_id(self) -> str:
        return self.queue.task_id

    @property
    def tenant_id(self) -> str:
        return self.queue.tenant_id

    @property
    def cancellation_token(self) -> CancellationToken:
        return self.queue.cancellation_token

    @property
    def is_closed(self) -> bool:
        return self.queue.is_closed

    def enqueue(self, event: TaskEvent) -> int:
        return self._client._run(self.queue.enqueue(event))

    def enqueue_batch(self, events: Sequence[TaskEvent]) -> list[int]:
        return self._client._run(self.queue.enqueue_batch(events))

    def get_latest_offset(self) -> int:
        return self._client._run(self.queue.get_latest_offset())

    def get_info(self) -> dict[str, Any]:
        return self._client._run(self.queue.get_info())

    def close(self) -> None:
        self._client._run(self.queue.close())

    def delete(self) -> bool:
        return self._client._run(self.queue.delete())

    def cancel(self, reason: Optional[str] = None) -> concurrent.futures.Future[bool]:
        return self.queue.cancel(reason)

    def save_checkpoint(self, checkpoint: WorkflowCheckpoint) -> SavedCheckpoint:
        return self._client._run(self.queue.save_checkpoint(checkpoint))

    def latest_checkpoint(self) -> Optional[StoredCheckpoint]:
        return self._client._run(self.queue.latest_checkpoint())

    def subscribe(
        self,
        from_offset: int = 0,
        *,
        on_gap: Optional[Callable[[Gap], None]] = None,
        max_reconnect_attempts: Optional[int] = None,
        buffer: int = 1000,
    ) -> Iterator[TaskEvent]:
        """Events from ``from_offset``, as a plain iterator (see ``EventQueue.subscribe``).
        Up to ``buffer`` events are read ahead; ``on_gap`` runs on the facade's thread."""
        items: queue_mod.Queue[Any] = queue_mod.Queue(maxsize=max(1, buffer))
        stop = threading.Event()
        sub = self.queue.subscribe(
            from_offset, on_gap=on_gap, max_reconnect_attempts=max_reconnect_attempts
        )

        async def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    items.put_nowait(item)
                    return True
                except queue_mod.Full:
                    await asyncio.sleep(0.005)
            return False

        async def pump() -> None:
            try:
                async for event in sub:
                    if not await put(event):
                        return
                await put(_END)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # handed to the reading thread
                await put(e)
            finally:
                await sub.aclose()

        future = asyncio.run_coroutine_threadsafe(pump(), self._client._loop.loop)
        try:
            while True:
                item = items.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            future.cancel()


class Client:
    """Synchronous access to an eventqueue server (arguments as for ``QueueManager``)."""

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        tenant_id: Optional[str] = None,
        **options: Any,
    ) -> None:
        self._loop = _LoopThread()
        self.manager = QueueManager(url, token, tenant_id, **options)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(coro)

    def _wrap(self, queue: Optional[EventQueue]) -> Optional[SyncEventQueue]:
        return None if queue is None else SyncEventQueue(self, queue)

    def create_queue(
        self,
        task_id: str,
        tenant_id: Optional[str] = None,
        ttl_minutes: Optional[float] = 30,
        max_buffer_size: Optional[int] = None,
        *,
        kind: Optional[str] = None,
    ) -> SyncEventQueue:
        tenant = tenant_id or self.manager.tenant_id
        return SyncEventQueue(
            self,
            self._run(
                self.manager.create_queue(task_id, tenant, ttl_minutes, max_buffer_size, kind=kind)
            ),
        )

    def get_or_create_queue(
        self,
        task_id: str,
        tenant_id: Optional[str] = None,
        ttl_minutes: Optional[float] = 30,
        max_buffer_size: Optional[int] = None,
        *,
        kind: Optional[str] = None,
    ) -> SyncEventQueue:
        tenant = tenant_id or self.manager.tenant_id
        return SyncEventQueue(
            self,
            self._run(
                self.manager.get_or_create_queue(
                    task_id, tenant, ttl_minutes, max_buffer_size, kind=kind
                )
            ),
        )

    def get_queue(self, task_id: str, tenant_id: Optional[str] = None) -> Optional[SyncEventQueue]:
        return self._wrap(self._run(self.manager.get_queue(task_id, tenant_id)))

    def list_active_queues(self, tenant_id: Optional[str] = None) -> list[dict[str, Any]]:
        return self._run(self.manager.list_active_queues(tenant_id))

    def cancel_task(
        self, task_id: str, reason: Optional[str] = None, tenant_id: Optional[str] = None
    ) -> bool:
        return self._run(self.manager.cancel_task(task_id, reason, tenant_id))

    def close_queue(self, task_id: str, tenant_id: Optional[str] = None) -> bool:
        return self._run(self.manager.close_queue(task_id, tenant_id))

    def delete_queue(self, task_id: str, tenant_id: Optional[str] = None) -> bool:
        return self._run(self.manager.delete_queue(task_id, tenant_id))

    def close(self) -> None:
        """Stops the background threads and closes the connections."""
        try:
            self._run(self.manager.aclose())
        finally:
            self._loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()
