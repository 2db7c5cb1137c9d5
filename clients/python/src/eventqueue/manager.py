"""``QueueManager`` and the process-wide ``get_queue_manager()``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from typing import Any, Optional
from urllib.parse import quote

from ._background import Worker
from ._transport import Settings, Transport
from .checkpoints import CheckpointStore
from .errors import QueueExistsError, QueueNotFoundError
from .queue import EventQueue

__all__ = ["QueueManager", "get_queue_manager", "reset_queue_manager"]

log = logging.getLogger("eventqueue")

_QUEUE_KINDS = ("workflow", "ingestion", "task")


class QueueManager:
    """Creates, finds, cancels and closes a server's queues, with the original's methods.

    A queue is ``(tenant_id, task_id)`` on the server. Methods that take only a ``task_id``
    (as in the original, whose manager was keyed by task id) use the queue this manager
    already returned for that task id, else the manager's tenant; each also takes an optional
    ``tenant_id=``. The same ``EventQueue`` object is returned for the same queue.

    ``url``, ``token`` and ``tenant_id`` default to ``EVENTQUEUE_URL`` (else
    ``http://127.0.0.1:8000``), ``EVENTQUEUE_TOKEN`` and ``EVENTQUEUE_TENANT`` (else the
    token's tenant, else ``default``). In token mode the tenant comes from the token; a
    queue of another tenant needs an ``admin`` token.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        tenant_id: Optional[str] = None,
        *,
        default_ttl_minutes: float = 30,
        max_buffer_size: Optional[int] = None,
        timeout: float = 30.0,
        max_retries: int = 8,
        cancel_poll_interval: float = 0.5,
        stream_idle_timeout: float = 45.0,
    ) -> None:
        url = url or os.environ.get("EVENTQUEUE_URL") or "http://127.0.0.1:8000"
        token = token or os.environ.get("EVENTQUEUE_TOKEN") or None
        tenant = tenant_id or os.environ.get("EVENTQUEUE_TENANT") or None
        settings = Settings(
            url=url.rstrip("/"),
            token=token,
            tenant_id=tenant or "default",
            timeout=timeout,
            max_retries=max_retries,
            cancel_poll_interval=cancel_poll_interval,
            stream_idle_timeout=stream_idle_timeout,
        )
        self._transport = Transport(settings)
        if tenant is None and token:
            self._tenant = self._transport.token_tenant or "default"
        else:
            self._tenant = settings.tenant_id
        self._worker = Worker(self._transport)
        self._default_ttl = default_ttl_minutes
        self._max_buffer_size = max_buffer_size
        self._queues: dict[tuple[str, str], EventQueue] = {}
        self._lock = threading.Lock()
        self._cleanup_task: Optional[asyncio.Task[None]] = None

    @property
    def url(self) -> str:
        return self._transport.settings.url

    @property
    def tenant_id(self) -> str:
        """The tenant used when a call names none."""
        return self._tenant

    def __repr__(self) -> str:
        return f"QueueManager(url={self.url!r}, tenant_id={self._tenant!r})"

    # -- queue objects --------------------------------------------------------------------

    def _known(self, task_id: str, tenant_id: Optional[str]) -> Optional[EventQueue]:
        with self._lock:
            if tenant_id is not None:
                return self._queues.get((tenant_id, task_id))
            queue = self._queues.get((self._tenant, task_id))
            if queue is not None:
                return queue
            for (_, task), q in self._queues.items():
                if task == task_id:
                    return q
        return None

    def _adopt(self, info: dict[str, Any], tenant_id: str, new: bool = False) -> EventQueue:
        """The queue object for a queue the server described; ``new``: it was just created
        (an object left from an earlier queue of that id, since deleted, is replaced)."""
        task_id = str(info.get("task_id"))
        tenant = str(info.get("tenant_id") or tenant_id)
        with self._lock:
            queue = self._queues.get((tenant, task_id))
            if queue is None or queue.is_expired or new:
                queue = EventQueue(self._transport, self._worker, task_id, tenant, info)
                self._queues[(tenant, task_id)] = queue
            else:
                queue.apply_info(info)
        return queue

    # -- the original's methods -----------------------------------------------------------

    async def create_queue(
        self,
        task_id: str,
        tenant_id: str,
        ttl_minutes: Optional[float] = 30,
        max_buffer_size: Optional[int] = None,
        *,
        kind: Optional[str] = None,
    ) -> EventQueue:
        """Creates the queue of ``(tenant_id, task_id)``. Raises ``QueueExistsError`` (a
        ``ValueError``) if it exists. ``ttl_minutes`` counts from the queue's last activity
        (``None``: the manager's ``default_ttl_minutes``); 0 expires it at the server's next
        sweep (the original turned 0 into the default).
        ``kind``: ``workflow``, ``ingestion`` or ``task`` (display only)."""
        body: dict[str, Any] = {"task_id": task_id}
        ttl = self._default_ttl if ttl_minutes is None else ttl_minutes
        body["ttl_minutes"] = ttl
        buffer = max_buffer_size if max_buffer_size is not None else self._max_buffer_size
        if buffer is not None:
            body["max_buffer_size"] = buffer
        if kind is not None:
            if kind not in _QUEUE_KINDS:
                raise ValueError(f"kind must be one of {', '.join(_QUEUE_KINDS)}, got {kind!r}")
            body["kind"] = kind
        resp = await self._transport.request(
            "POST",
            "/events/queues",
            tenant=tenant_id,
            content=json.dumps(body).encode(),
            # A retry after the request reached the server would answer "exists".
            idempotent=False,
        )
        return self._adopt(resp.json(), tenant_id, new=True)

    async def get_queue(
        self, task_id: str, tenant_id: Optional[str] = None
    ) -> Optional[EventQueue]:
        """The queue of ``task_id``, or ``None`` if the server has no such queue (never
        created, deleted, or expired)."""
        known = self._known(task_id, tenant_id)
        tenant = tenant_id or (known.tenant_id if known is not None else self._tenant)
        if known is not None and not known.is_expired:
            # Confirm it still exists (it may have expired or been deleted elsewhere).
            try:
                await known.get_info()
            except QueueNotFoundError:
                return None
            return known
        try:
            resp = await self._transport.request(
                "GET", f"/events/queues/{quote(task_id, safe='')}", tenant=tenant
            )
        except QueueNotFoundError:
            return None
        return self._adopt(resp.json(), tenant)

    async def get_or_create_queue(
        self,
        task_id: str,
        tenant_id: str,
        ttl_minutes: Optional[float] = 30,
        max_buffer_size: Optional[int] = None,
        *,
        kind: Optional[str] = None,
    ) -> EventQueue:
        """The existing queue, or a new one (the options apply only to a new one)."""
        queue = await self.get_queue(task_id, tenant_id)
        if queue is not None:
            return queue
        try:
            return await self.create_queue(
                task_id, tenant_id, ttl_minutes, max_buffer_size, kind=kind
            )
        except QueueExistsError:
            # Created by someone else in between.
            queue = await self.get_queue(task_id, tenant_id)
            if queue is None:
                raise
            return queue

    async def close_queue(self, task_id: str, tenant_id: Optional[str] = None) -> bool:
        """Closes the queue; ``False`` if there is none. Unlike the original the queue is not
        deleted: it stays replayable until it expires (``delete_queue`` removes it)."""
        queue = await self.get_queue(task_id, tenant_id)
        if queue is None:
            return False
        await queue.close()
        return True

    async def delete_queue(self, task_id: str, tenant_id: Optional[str] = None) -> bool:
        """Deletes the queue and its events; ``False`` if there is none."""
        known = self._known(task_id, tenant_id)
        if known is not None:
            return await known.delete()
        queue = EventQueue(self._transport, self._worker, task_id, tenant_id or self._tenant, None)
        return await queue.delete()

    async def list_active_queues(self, tenant_id: Optional[str] = None) -> list[dict[str, Any]]:
        """Info dicts of the tenant's queues that are not closed (``tenant_id`` default: the
        manager's tenant; with an ``admin`` token and no ``tenant_id``: every tenant's)."""
        tenant: Optional[str] = tenant_id
        if tenant is None and not self._transport.is_admin:
            tenant = self._tenant
        resp = await self._transport.request("GET", "/events/queues", tenant=tenant)
        out: list[dict[str, Any]] = []
        for info in resp.json():
            if info.get("is_closed"):
                continue
            out.append({**info, "is_expired": False})
        return out

    async def cleanup_expired(self) -> int:
        """Forgets the queue objects whose queues are closed, expired or deleted on the
        server; returns how many. (The server itself removes expired queues.)"""
        with self._lock:
            queues = list(self._queues.items())
        removed = 0
        for key, queue in queues:
            if not queue.is_expired and not queue.is_closed:
                with contextlib.suppress(QueueNotFoundError):
                    await queue.get_info()
            if queue.is_expired or queue.is_closed:
                with self._lock:
                    if self._queues.get(key) is queue:
                        del self._queues[key]
                        removed += 1
        return removed

    async def cancel_task(
        self, task_id: str, reason: Optional[str] = None, tenant_id: Optional[str] = None
    ) -> bool:
        """Cancels the task; ``False`` if it has no queue, or it already finished."""
        known = self._known(task_id, tenant_id)
        tenant = tenant_id or (known.tenant_id if known is not None else self._tenant)
        resp = await self._transport.request(
            "POST",
            f"/events/workflows/{quote(task_id, safe='')}/cancel",
            tenant=tenant,
            content=json.dumps({"reason": reason}).encode(),
            ok=(404, 409),
        )
        if resp.status_code != 200:
            return False
        if known is not None:
            known.cancellation_token.cancel(reason)
        return True

    def get_manager_stats(self) -> dict[str, Any]:
        """The original's statistics, over the queues this manager has returned."""
        with self._lock:
            queues = list(self._queues.values())
        return {
            "total_queues": len(queues),
            "active_queues": sum(1 for q in queues if not q.is_closed and not q.is_expired),
            "closed_queues": sum(1 for q in queues if q.is_closed),
            "expired_queues": sum(1 for q in queues if q.is_expired),
            "default_ttl_minutes": self._default_ttl,
            "max_buffer_size": self._max_buffer_size,
            "url": self.url,
            "tenant_id": self._tenant,
        }

    async def start_cleanup_loop(self, interval_seconds: float = 60) -> None:
        """Runs ``cleanup_expired`` every ``interval_seconds`` on the current loop; a second
        call while it runs does nothing."""
        if self._cleanup_task is not None and not self._cleanup_task.done():
            return

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval_seconds)
                try:
                    await self.cleanup_expired()
                except Exception as e:  # keep the loop alive; the next round retries
                    log.warning("queue cleanup failed: %s", e)

        self._cleanup_task = asyncio.get_running_loop().create_task(loop())

    async def stop_cleanup_loop(self) -> None:
        task, self._cleanup_task = self._cleanup_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def cleanup_running(self) -> bool:
        return self._cleanup_task is not None and not self._cleanup_task.done()

    # -- checkpoints and lifecycle --------------------------------------------------------

    def checkpoints(self, tenant_id: Optional[str] = None) -> CheckpointStore:
        """The checkpoint store of ``tenant_id`` (default: the manager's tenant)."""
        return CheckpointStore(self._transport, tenant_id or self._tenant)

    async def aclose(self) -> None:
        """Stops the background worker and closes this loop's connections."""
        await self.stop_cleanup_loop()
        self._worker.stop()
        await self._transport.aclose()

    def shutdown(self) -> None:
        """Stops the background worker (connections close with their event loops)."""
        self._worker.stop()

    async def __aenter__(self) -> QueueManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


_global_manager: Optional[QueueManager] = None
_global_lock = threading.Lock()


def get_queue_manager(
    url: Optional[str] = None,
    token: Optional[str] = None,
    tenant_id: Optional[str] = None,
    **options: Any,
) -> QueueManager:
    """The process-wide manager, created at the first call (from these arguments, else the
    ``EVENTQUEUE_URL`` / ``EVENTQUEUE_TOKEN`` / ``EVENTQUEUE_TENANT`` environment). The
    original's ``default_ttl_minutes`` and ``max_buffer_size`` are accepted too."""
    global _global_manager
    with _global_lock:
        if _global_manager is None:
            _global_manager = QueueManager(url, token, tenant_id, **options)
        return _global_manager


def reset_queue_manager() -> None:
    """Forgets the process-wide manager (for tests), stopping its background worker."""
    global _global_manager
    with _global_lock:
        manager, _global_manager = _global_manager, None
    if manager is not None:
        manager.shutdown()
