"""``EventQueue``, ``CancellationToken`` and subscriptions, backed by an eventqueue server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Optional
from urllib.parse import quote

import httpx
import pydantic
from pydantic import TypeAdapter

from ._sse import SSEParser
from ._transport import RETRYABLE_STATUS, Transport, describe, http_error
from .errors import EventQueueError, QueueClosedError, QueueNotFoundError, TransportError
from .types import (
    EVENT_ADAPTER,
    ArtifactEvent,
    BaseEvent,
    CompleteEvent,
    ErrorEvent,
    ProgressEvent,
    StatusEvent,
    TaskEvent,
    event_json,
    is_terminal,
)

if TYPE_CHECKING:
    from ._background import Worker
    from .checkpoints import SavedCheckpoint, StoredCheckpoint, WorkflowCheckpoint
    from .producer import Producer

__all__ = [
    "CancellationToken",
    "EventQueue",
    "Gap",
    "GapWarning",
    "ProtocolError",
    "Subscription",
]

log = logging.getLogger("eventqueue")

#: Most events in one enqueue request (the server's default limit).
MAX_BATCH = 1000
#: Most bytes of events in one enqueue request (half the server's default body limit).
MAX_BATCH_BYTES = 1 << 20


class CancellationToken:
    """Whether the task was asked to stop. Same interface as the original's token; it also
    follows cancels made elsewhere (see ``EventQueue``)."""

    def __init__(self, on_read: Optional[Callable[[], None]] = None) -> None:
        self._cancelled = False
        self._cancel_time: Optional[datetime] = None
        self._reason: Optional[str] = None
        self._on_read = on_read

    @property
    def is_cancelled(self) -> bool:
        if self._on_read is not None:
            self._on_read()
        return self._cancelled

    @property
    def cancel_time(self) -> Optional[datetime]:
        return self._cancel_time

    @property
    def reason(self) -> Optional[str]:
        return self._reason

    def cancel(self, reason: Optional[str] = None) -> None:
        """Sets the token locally (``EventQueue.cancel`` also tells the server). As in the
        original, a second cancel replaces the reason and time."""
        self._reason = reason
        self._cancel_time = datetime.now(timezone.utc)
        self._cancelled = True


@dataclass(frozen=True)
class Gap:
    """Events ``requested_offset .. first_available_offset - 1`` were dropped by retention
    (``max_buffer_size`` or compaction) before this subscriber could read them."""

    requested_offset: int
    first_available_offset: int

    @property
    def missed(self) -> int:
        return self.first_available_offset - self.requested_offset


class GapWarning(UserWarning):
    """Issued for a gap when ``subscribe`` was given no ``on_gap`` callback."""


class ProtocolError(EventQueueError):
    """The server sent something this client cannot read."""


def _warn_gap(task_id: str) -> Callable[[Gap], None]:
    def warn(gap: Gap) -> None:
        message = (
            f"eventqueue: {gap.missed} events of {task_id} (offsets {gap.requested_offset}.."
            f"{gap.first_available_offset - 1}) were dropped by retention before they could be "
            "read; pass on_gap= to subscribe() to handle this"
        )
        log.warning("%s", message)
        warnings.warn(message, GapWarning, stacklevel=3)

    return warn


class Subscription:
    """An async iterator over a queue's events, from ``from_offset`` (inclusive).

    It delivers every event in offset order exactly once and ends after the task's terminal
    event, after the queue was closed and drained, or when the queue is deleted or expires.
    A dropped connection (a server restart, a proxy timeout) is reconnected with backoff and
    resumed with ``Last-Event-ID``: nothing is repeated, nothing is skipped. Events that
    retention dropped are announced to ``on_gap`` (default: a ``GapWarning`` and a log line),
    never skipped silently.

    Attributes: ``next_offset`` (the offset expected next), ``gaps`` (every gap seen),
    ``reconnects`` (reconnection attempts made), ``last_error`` (why the last connection
    ended or failed).
    """

    def __init__(
        self,
        queue: EventQueue,
        from_offset: int,
        on_gap: Optional[Callable[[Gap], None]],
        max_reconnect_attempts: Optional[int],
    ) -> None:
        if from_offset < 0:
            raise ValueError("from_offset must be >= 0")
        self._queue = queue
        self.next_offset = from_offset
        self.gaps: list[Gap] = []
        self.reconnects = 0
        self.last_error: Optional[str] = None
        self._on_gap = on_gap or _warn_gap(queue.task_id)
        self._max_attempts = max_reconnect_attempts
        self._started = False
        self._terminal = False
        self._gen = self._events()

    def __aiter__(self) -> AsyncGenerator[TaskEvent, None]:
        # The generator itself: `async for` then resumes it directly, one call per event.
        return self._gen

    async def __anext__(self) -> TaskEvent:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """Closes the connection (also done when the subscription is garbage-collected)."""
        await self._gen.aclose()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _gap(self, requested: int, first_available: int) -> None:
        gap = Gap(requested, first_available)
        self.gaps.append(gap)
        self._on_gap(gap)

    async def _events(self) -> AsyncGenerator[TaskEvent, None]:
        queue = self._queue
        transport = queue._transport
        settings = transport.settings
        attempt = 0
        connected_once = False
        headers, params = transport.tenant_params(queue.tenant_id)
        headers["accept"] = "text/event-stream"
        timeout = httpx.Timeout(
            settings.timeout,
            connect=settings.connect_timeout,
            read=settings.stream_idle_timeout,
        )
        while True:
            if self._started and self.next_offset > 0:
                # Resume right after the last offset delivered (or announced as dropped).
                headers["last-event-id"] = str(self.next_offset - 1)
                query = dict(params)
            else:
                query = {**params, "from_offset": str(self.next_offset)}
            client = transport.client()
            error: Optional[str] = None
            try:
                async with client.stream(
                    "GET", queue.stream_path, headers=headers, params=query, timeout=timeout
                ) as resp:
                    if resp.status_code == 204:
                        return  # nothing more will come: finished, or closed and drained
                    if resp.status_code == 404 and connected_once:
                        queue.mark_gone()
                        return  # deleted or expired while we were subscribed
                    if resp.status_code >= 400:
                        await resp.aread()
                        err = http_error(resp, "GET", queue.stream_path)
                        if resp.status_code not in RETRYABLE_STATUS:
                            raise err
                        error = str(err)
                    else:
                        connected_once = True
                        self._started = True
                        async for events in self._read(resp):
                            # Only a connection that delivered something resets the backoff: a
                            # server that keeps ending streams at once is not hammered.
                            attempt = 0
                            for event in events:
                                yield event
                        if self._terminal:
                            return
                        # The server ended the stream without a terminal event: the queue was
                        # closed, deleted or expired, or the server is shutting down.
                        error = "the server ended the stream"
                if error == "the server ended the stream" and await self._ended():
                    return
            except (httpx.TransportError, httpx.StreamError) as e:
                error = describe(e)
            self.last_error = error
            attempt += 1
            if attempt > 1 or error != "the server ended the stream":
                if self._max_attempts is not None and attempt > self._max_attempts:
                    raise TransportError(
                        f"subscription to {queue.task_id} gave up after {attempt - 1} "
                        f"reconnection attempts: {error}"
                    )
                delay = settings.backoff(attempt)
                log.info(
                    "subscription to %s dropped (%s); reconnecting in %.2fs from offset %d",
                    queue.task_id,
                    error,
                    delay,
                    self.next_offset,
                )
                await asyncio.sleep(delay)
            self.reconnects += 1

    async def _ended(self) -> bool:
        """After a stream ended without a terminal event: whether the subscription is over
        (the queue is gone, or closed with everything delivered) rather than interrupted."""
        queue = self._queue
        try:
            info = await queue.get_info()
        except QueueNotFoundError:
            return True
        except (EventQueueError, httpx.HTTPError):
            return False  # the server is going away: reconnecting will tell
        return bool(info.get("is_closed")) and self.next_offset >= int(info["latest_offset"])

    async def _read(self, resp: httpx.Response) -> AsyncIterator[list[TaskEvent]]:
        """The events of each received chunk, checked and in order. Sets ``_terminal`` when
        the task's terminal event came (the list then ends with it)."""
        parser = SSEParser()
        async for chunk in resp.aiter_raw():
            frames = parser.feed(chunk)
            if not frames:
                continue
            out: list[TaskEvent] = []
            run: list[bytes] = []
            run_kind = b""
            for _, kind, data in frames:
                if kind != run_kind:
                    if run:
                        self._accept(run_kind, run, out)
                        run = []
                    if kind == b"connected" or kind == b"gap":
                        self._control(kind, data)
                        run_kind = b""
                        continue
                    run_kind = kind
                run.append(data)
            if run:
                self._accept(run_kind, run, out)
            if out:
                yield out
            if self._terminal:
                return

    def _control(self, kind: bytes, data: bytes) -> None:
        try:
            body = EVENT_CONTROL.validate_json(data)
        except pydantic.ValidationError as e:
            raise ProtocolError(f"unreadable {kind.decode()} frame: {data[:200]!r}") from e
        # A `connected` frame needs nothing: when its offset is past the one asked for, a
        # `gap` frame follows (and were it missing, the first event's offset shows the hole).
        if kind == b"gap":
            first = int(body.get("first_available_offset", 0))
            if first > self.next_offset:
                self._gap(self.next_offset, first)
                self.next_offset = first

    def _accept(self, kind: bytes, run: list[bytes], out: list[TaskEvent]) -> None:
        """Parses a run of frames of one event type (``kind``, the SSE event name) into
        ``out``: one validation call for the run, which costs much less per event than one
        call per event, or than a union discriminated on each event's JSON."""
        if self._terminal:
            return
        adapter = _RUN_ADAPTERS.get(kind)
        events: list[TaskEvent]
        try:
            if adapter is None:
                events = [EVENT_ADAPTER.validate_json(data) for data in run]
            elif len(run) == 1:
                events = [adapter[0](run[0])]
            else:
                events = adapter[1](b"[" + b",".join(run) + b"]")
        except pydantic.ValidationError as e:
            raise ProtocolError(f"unreadable {kind.decode(errors='replace')} event: {e}") from e
        expected = self.next_offset
        check = kind if kind in _MAY_END else b""
        for event in events:
            offset = event.offset
            if offset is None:
                raise ProtocolError(f"event {event.event_id} has no offset")
            if offset < expected:
                continue  # delivered already (a reconnection overlapped)
            if offset > expected:
                self._gap(expected, offset)
            out.append(event)
            expected = offset + 1
            if check and is_terminal(event):
                self._terminal = True
                break
        self.next_offset = expected


def _run_adapter(cls: type[BaseEvent]) -> tuple[Callable[[bytes], Any], Callable[[bytes], Any]]:
    return (cls.__pydantic_validator__.validate_json, TypeAdapter(list[cls]).validate_json)  # type: ignore[valid-type]


_RUN_ADAPTERS: dict[bytes, tuple[Callable[[bytes], Any], Callable[[bytes], Any]]] = {
    b"status": _run_adapter(StatusEvent),
    b"progress": _run_adapter(ProgressEvent),
    b"artifact": _run_adapter(ArtifactEvent),
    b"error": _run_adapter(ErrorEvent),
    b"complete": _run_adapter(CompleteEvent),
}
_MAY_END = frozenset({b"status", b"error", b"complete"})

EVENT_CONTROL: pydantic.TypeAdapter[dict[str, Any]] = pydantic.TypeAdapter(dict[str, Any])


class EventQueue:
    """A task's event queue on the server: the original's interface, plus offsets, batch
    enqueue, checkpoints and a producer helper.

    - ``enqueue`` returns the event's offset once it is durable; a connection failure or
      timeout is retried with the same ``event_id`` (enqueue is idempotent on it).
    - ``cancel()`` is synchronous: the local token flips at once and a background thread
      posts the cancel right after. It returns a ``concurrent.futures.Future`` that resolves
      to whether the server knew the task (callers written for the original ignore it).
    - A cancel made elsewhere shows on ``cancellation_token.is_cancelled`` within
      ``cancel_poll_interval`` (default 0.5 s) plus one request, for a queue in use (its
      token read or an event enqueued in the last 30 s; on the first read after a longer
      quiet spell, within one interval of that read), and at once in any enqueue's answer.
    - ``is_closed``, ``is_expired`` and ``get_stats()`` report what this client last learned
      from the server (``await get_info()`` asks afresh).
    """

    def __init__(
        self,
        transport: Transport,
        worker: Worker,
        task_id: str,
        tenant_id: str,
        info: Optional[dict[str, Any]] = None,
    ) -> None:
        self._transport = transport
        self._worker = worker
        self._task_id = task_id
        self._tenant_id = tenant_id
        self._token = CancellationToken(on_read=self._token_read)
        self._closed = False
        self._gone = False
        self._finished = False
        self._info: dict[str, Any] = {}
        self._last_use = time.monotonic()
        #: Set when the server refused this client the queue's info (a token without the
        #: ``subscribe`` scope): remote cancels then show only in enqueue answers.
        self.poll_refused = False
        quoted = quote(task_id, safe="")
        self._base = f"/events/queues/{quoted}"
        self._quoted = quoted
        self._kind = "task"
        self.info_path = self._base
        if info:
            self.apply_info(info)
        worker.watch(self)

    def __repr__(self) -> str:
        return f"EventQueue(task_id={self._task_id!r}, tenant_id={self._tenant_id!r})"

    # -- the original's properties --------------------------------------------------------

    @property
    def task_id(self) -> str:
        return self._task_id

    @property
    def tenant_id(self) -> str:
        return self._tenant_id

    @property
    def cancellation_token(self) -> CancellationToken:
        return self._token

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def is_expired(self) -> bool:
        """Whether the server no longer has the queue (expired, or deleted)."""
        return self._gone

    @property
    def is_finished(self) -> bool:
        """Whether a terminal event was enqueued (as far as this client knows)."""
        return self._finished

    # -- state learned from the server ----------------------------------------------------

    def _token_read(self) -> None:
        self._last_use = time.monotonic()

    def needs_poll(self, now: float, window: float) -> bool:
        return (
            not self.poll_refused
            and not self._token._cancelled
            and not self._closed
            and not self._gone
            and not self._finished
            and now - self._last_use < window
        )

    @property
    def kind(self) -> str:
        """``workflow``, ``ingestion`` or ``task`` (as created)."""
        return self._kind

    @property
    def stream_path(self) -> str:
        # Both stream routes serve any queue; an ingestion job's takes the ingestion route
        # (whose 404 speaks of an ingestion job), everything else the workflow route.
        route = "ingestion" if self._kind == "ingestion" else "workflows"
        return f"/events/{route}/{self._quoted}"

    @property
    def cancel_path(self) -> str:
        return f"{self.stream_path}/cancel"

    def apply_info(self, info: dict[str, Any]) -> None:
        self._info = info
        kind = info.get("kind")
        if isinstance(kind, str):
            self._kind = kind
        if info.get("is_cancelled"):
            self._remote_cancel(info.get("cancel_reason"))
        if info.get("is_closed"):
            self._closed = True
        if info.get("is_finished"):
            self._finished = True

    def mark_gone(self) -> None:
        self._gone = True

    async def _learn_cancel(self) -> None:
        """The server said the task is cancelled: flip the token, with the reason from the
        queue's info (asked once)."""
        with contextlib.suppress(EventQueueError, ValueError):
            await self.get_info()
        self._remote_cancel(None)  # if the info could not be read

    def _remote_cancel(self, reason: Any) -> None:
        if not self._token._cancelled:
            self._token.cancel(reason if isinstance(reason, str) else None)

    # -- producing ------------------------------------------------------------------------

    async def enqueue(self, event: TaskEvent) -> int:
        """Appends ``event``; returns its offset once it is durable. Raises
        ``QueueClosedError`` (a ``RuntimeError``) when the queue is closed."""
        offsets = await self._post_events(event_json(event), (event,))
        return offsets[0]

    async def enqueue_batch(self, events: Sequence[TaskEvent]) -> list[int]:
        """Appends ``events`` in order; returns their offsets. They go in requests of at most
        1000 events and 1 MiB (the server's limits are 1000 and 2 MiB), each stored
        atomically: one invalid event rejects its whole request, and the requests before it
        stay stored."""
        offsets: list[int] = []
        chunk: list[TaskEvent] = []
        bodies: list[bytes] = []
        size = 0
        for event in events:
            body = event_json(event)
            if chunk and (len(chunk) == MAX_BATCH or size + len(body) > MAX_BATCH_BYTES):
                offsets.extend(await self._post_batch(chunk, bodies))
                chunk, bodies, size = [], [], 0
            chunk.append(event)
            bodies.append(body)
            size += len(body) + 1
        if chunk:
            offsets.extend(await self._post_batch(chunk, bodies))
        return offsets

    async def _post_batch(self, events: list[TaskEvent], bodies: list[bytes]) -> list[int]:
        return await self._post_events(b'{"events":[' + b",".join(bodies) + b"]}", events)

    async def _post_events(self, body: bytes, events: Iterable[TaskEvent]) -> list[int]:
        if self._closed:
            raise QueueClosedError(409, f"queue {self._task_id} is closed")
        self._last_use = time.monotonic()
        try:
            resp = await self._transport.request(
                "POST", f"{self._base}/events", tenant=self._tenant_id, content=body
            )
        except QueueClosedError:
            self._closed = True
            raise
        except QueueNotFoundError:
            self._gone = True
            raise
        answer = resp.json()
        if answer.get("cancelled") and not self._token._cancelled:
            await self._learn_cancel()
        offsets: list[int] = answer["offsets"]
        for event, offset in zip(events, offsets, strict=True):
            event.offset = offset
            if is_terminal(event):
                self._finished = True
        self._info["latest_offset"] = answer.get("latest_offset")
        return offsets

    async def get_latest_offset(self) -> int:
        """One past the newest event ever appended (dropped ones included)."""
        resp = await self._transport.request("GET", f"{self._base}/offset", tenant=self._tenant_id)
        offset: int = resp.json()["offset"]
        return offset

    async def close(self) -> None:
        """Closes the queue to producers; subscribers drain and end. Idempotent. Unlike the
        original, the queue stays replayable until it expires or is deleted."""
        try:
            resp = await self._transport.request(
                "POST", f"{self._base}/close", tenant=self._tenant_id
            )
        except QueueNotFoundError:
            self._gone = True
            self._closed = True
            return
        self._closed = True
        self.apply_info(resp.json())

    def cancel(self, reason: Optional[str] = None) -> concurrent.futures.Future[bool]:
        """Cancels the task: the token flips now; the server hears of it right after."""
        self._token.cancel(reason)
        return self._worker.submit_cancel(self, reason)

    async def delete(self) -> bool:
        """Deletes the queue and its events; ``False`` if it did not exist."""
        resp = await self._transport.request(
            "DELETE", self._base, tenant=self._tenant_id, ok=(404,)
        )
        self._gone = True
        return resp.status_code != 404

    # -- consuming ------------------------------------------------------------------------

    def subscribe(
        self,
        from_offset: int = 0,
        *,
        on_gap: Optional[Callable[[Gap], None]] = None,
        max_reconnect_attempts: Optional[int] = None,
    ) -> Subscription:
        """Events from ``from_offset`` (inclusive), then live ones, as an async iterator.

        ``on_gap`` is called with a ``Gap`` when retention dropped events before they could
        be read (without it: a ``GapWarning`` and a log line). ``max_reconnect_attempts``
        bounds the failed reconnections in a row (default: no bound, like a browser's
        ``EventSource``); then ``TransportError`` is raised.
        """
        return Subscription(self, from_offset, on_gap, max_reconnect_attempts)

    # -- information ----------------------------------------------------------------------

    async def get_info(self) -> dict[str, Any]:
        """The server's queue info, fetched now (see the README for the fields)."""
        try:
            resp = await self._transport.request("GET", self._base, tenant=self._tenant_id)
        except QueueNotFoundError:
            self._gone = True
            raise
        info: dict[str, Any] = resp.json()
        self.apply_info(info)
        return info

    def get_stats(self) -> dict[str, Any]:
        """The original's statistics dict, from what this client last learned (the queue's
        info at creation or the last ``get_info``, and the latest offset of the last
        enqueue)."""
        info = self._info
        return {
            "task_id": self._task_id,
            "tenant_id": self._tenant_id,
            "event_count": info.get("event_count", 0),
            "subscriber_count": info.get("subscriber_count", 0),
            "is_closed": self._closed,
            "is_cancelled": self._token._cancelled,
            "is_expired": self._gone,
            "created_at": info.get("created_at"),
            "last_activity": info.get("last_activity"),
            "ttl_minutes": info.get("ttl_minutes"),
            "max_buffer_size": info.get("max_buffer_size"),
            "latest_offset": info.get("latest_offset", 0),
        }

    # -- checkpoints and producing helpers -------------------------------------------------

    async def save_checkpoint(self, checkpoint: WorkflowCheckpoint) -> SavedCheckpoint:
        """Saves a workflow checkpoint of this queue's task; the server appends its ``status``
        (and, with tasks, ``progress``) event to this queue in the same transaction."""
        from .checkpoints import save_checkpoint

        saved = await save_checkpoint(self._transport, self._task_id, self._tenant_id, checkpoint)
        if saved.cancelled and not self._token._cancelled:
            await self._learn_cancel()
        return saved

    async def latest_checkpoint(self) -> Optional[StoredCheckpoint]:
        """This task's newest checkpoint, or ``None``."""
        from .checkpoints import latest_checkpoint

        return await latest_checkpoint(self._transport, self._task_id, self._tenant_id)

    def producer(self) -> Producer:
        """An async context manager that reports the task's outcome (see ``Producer``)."""
        from .producer import Producer

        return Producer(self)
