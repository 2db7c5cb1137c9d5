"""The background worker: one daemon thread per manager, independent of any event loop.

It does two things that must not wait for, or depend on, the caller's event loop:

- **sends cancels** made with the synchronous ``EventQueue.cancel()``: the local token flips at
  once and the worker posts the cancel right after (retrying connection failures);
- **polls for remote cancels**: every ``cancel_poll_interval`` it reads the info of each queue
  in use — one whose token was read, or that was enqueued to, within the last ``ACTIVE_WINDOW``
  seconds, and that is neither cancelled, closed nor finished — and flips its token when the
  server says it was cancelled (by another process, the CLI or the dashboard).
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue as queue_mod
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional

import httpx

from ._transport import RETRYABLE_STATUS, Transport, describe, http_error

if TYPE_CHECKING:
    from .queue import EventQueue

log = logging.getLogger("eventqueue")

#: A queue is polled while its token was read or it was enqueued to this recently.
ACTIVE_WINDOW = 30.0


class Worker:
    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._jobs: queue_mod.Queue[Optional[Callable[[httpx.Client], None]]] = queue_mod.Queue()
        self._watched: weakref.WeakSet[EventQueue] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

    def _ensure_started(self) -> None:
        with self._lock:
            if self._stopped:
                raise RuntimeError("the queue manager is shut down")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="eventqueue-worker", daemon=True
                )
                self._thread.start()

    def watch(self, queue: EventQueue) -> None:
        with self._lock:
            self._watched.add(queue)
        if self._transport.settings.cancel_poll_interval > 0:
            self._ensure_started()

    def submit_cancel(
        self, queue: EventQueue, reason: Optional[str]
    ) -> concurrent.futures.Future[bool]:
        """Posts the cancel of ``queue`` from the worker thread; the future's result is whether
        the server knew the queue (``False``: no such queue, or its task already finished)."""
        future: concurrent.futures.Future[bool] = concurrent.futures.Future()
        path = queue.cancel_path
        tenant = queue.tenant_id
        body = httpx.Request("POST", "/", json={"reason": reason}).content

        def job(client: httpx.Client) -> None:
            try:
                future.set_result(self._post_cancel(client, path, tenant, body))
            except BaseException as e:  # handed to whoever waits on the future
                future.set_exception(e)

        self._ensure_started()
        self._jobs.put(job)
        return future

    def _post_cancel(self, client: httpx.Client, path: str, tenant: str, body: bytes) -> bool:
        settings = self._transport.settings
        headers, params = self._transport.tenant_params(tenant)
        headers["content-type"] = "application/json"
        attempt = 0
        while True:
            try:
                resp = client.post(path, content=body, headers=headers, params=params or None)
            except httpx.TransportError as e:
                attempt += 1
                if attempt > settings.max_retries:
                    log.warning("cancel %s not delivered: %s", path, describe(e))
                    raise
            else:
                if resp.status_code < 300:
                    return True
                if resp.status_code in (404, 409):
                    return False
                attempt += 1
                if resp.status_code not in RETRYABLE_STATUS or attempt > settings.max_retries:
                    raise http_error(resp, "POST", path)
            time.sleep(settings.backoff(attempt))

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._jobs.put(None)
            thread.join(timeout=5)

    def _run(self) -> None:
        interval = self._transport.settings.cancel_poll_interval
        next_poll = time.monotonic() + interval
        with self._transport.sync_client() as client:
            while True:
                timeout = max(0.0, next_poll - time.monotonic()) if interval > 0 else None
                try:
                    job = self._jobs.get(timeout=timeout)
                except queue_mod.Empty:
                    job = None
                    if interval > 0:
                        self._poll(client)
                        next_poll = time.monotonic() + interval
                    continue
                if job is None:
                    return
                job(client)

    def _poll(self, client: httpx.Client) -> None:
        now = time.monotonic()
        with self._lock:
            queues = [q for q in self._watched if q.needs_poll(now, ACTIVE_WINDOW)]
        for q in queues:
            try:
                headers, params = self._transport.tenant_params(q.tenant_id)
                resp = client.get(q.info_path, headers=headers, params=params or None)
            except (httpx.TransportError, ValueError) as e:
                log.debug("cancel poll of %s failed: %s", q.task_id, describe(e))
                continue
            if resp.status_code == 404:
                q.mark_gone()
            elif resp.status_code in (401, 403):
                q.poll_refused = True  # a token that may not read queue info: stop asking
            elif resp.status_code == 200:
                info: Any = resp.json()
                if isinstance(info, dict):
                    q.apply_info(info)
