"""A producer helper that always reports the task's outcome.

.. code-block:: python

    async with queue.producer() as task:
        await task.status(TaskState.WORKING, phase="planning")
        for i, video in enumerate(videos):
            task.check_cancelled()            # a boundary: stops here once cancelled
            await task.progress(i, len(videos), step=f"processing {video}")
        task.result = {"videos": len(videos)}

On leaving the block the helper enqueues exactly one terminal event:

- ``complete`` (with ``result``, ``summary`` and ``execution_time_seconds``) when the block
  ends normally;
- ``status: cancelled`` (message ``Cancelled: {reason}``) when it ends with ``TaskCancelled``
  (raised by ``check_cancelled()``), which the helper then swallows, or when the surrounding
  asyncio task is cancelled (re-raised);
- a non-recoverable ``error`` (``error_type`` = the exception's class name) for any other
  exception, which is re-raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Optional, Union

from .errors import EventQueueError
from .types import (
    ArtifactEvent,
    CompleteEvent,
    ErrorEvent,
    ProgressEvent,
    StatusEvent,
    TaskState,
)

if TYPE_CHECKING:
    from .checkpoints import SavedCheckpoint, WorkflowCheckpoint
    from .queue import EventQueue

__all__ = ["Producer", "TaskCancelled"]

log = logging.getLogger("eventqueue")


class TaskCancelled(EventQueueError):
    """Raised by ``Producer.check_cancelled()`` once the task was cancelled."""

    def __init__(self, reason: Optional[str]) -> None:
        self.reason = reason
        super().__init__(f"task cancelled: {reason}" if reason else "task cancelled")


class Producer:
    """Reports a task's progress to its queue; see the module documentation."""

    def __init__(self, queue: EventQueue) -> None:
        self.queue = queue
        #: The ``complete`` event's result; set it in the block.
        self.result: dict[str, Any] = {}
        #: The ``complete`` event's summary.
        self.summary: Optional[str] = None
        #: ``completed``, ``cancelled`` or ``failed`` once the block has ended.
        self.outcome: Optional[str] = None
        self._started = time.monotonic()

    async def __aenter__(self) -> Producer:
        self._started = time.monotonic()
        return self

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool:
        q = self.queue
        if exc is None:
            self.outcome = "completed"
            await q.enqueue(
                CompleteEvent(
                    task_id=q.task_id,
                    tenant_id=q.tenant_id,
                    result=self.result,
                    summary=self.summary,
                    execution_time_seconds=round(time.monotonic() - self._started, 6),
                )
            )
            return False
        if isinstance(exc, (TaskCancelled, asyncio.CancelledError)):
            self.outcome = "cancelled"
            reason = q.cancellation_token.reason
            if isinstance(exc, TaskCancelled) and exc.reason:
                reason = exc.reason
            event = StatusEvent(
                task_id=q.task_id,
                tenant_id=q.tenant_id,
                state=TaskState.CANCELLED,
                message=f"Cancelled: {reason}" if reason else "Cancelled",
            )
            # Reported even while the surrounding asyncio task is being cancelled.
            await self._report(event)
            return isinstance(exc, TaskCancelled)
        self.outcome = "failed"
        await self._report(
            ErrorEvent(
                task_id=q.task_id,
                tenant_id=q.tenant_id,
                error_type=type(exc).__name__,
                error_message=str(exc) or type(exc).__name__,
                recoverable=False,
            )
        )
        return False

    async def _report(self, event: Union[StatusEvent, ErrorEvent]) -> None:
        try:
            await asyncio.shield(self.queue.enqueue(event))
        except EventQueueError as e:
            # The block's own exception is the one to propagate.
            log.warning("could not report the outcome of %s: %s", self.queue.task_id, e)

    # -- emitters -------------------------------------------------------------------------

    def check_cancelled(self) -> None:
        """Raises ``TaskCancelled`` if the task was cancelled (locally or elsewhere)."""
        token = self.queue.cancellation_token
        if token.is_cancelled:
            raise TaskCancelled(token.reason)

    @property
    def is_cancelled(self) -> bool:
        return self.queue.cancellation_token.is_cancelled

    async def status(
        self, state: TaskState, phase: Optional[str] = None, message: Optional[str] = None
    ) -> int:
        q = self.queue
        return await q.enqueue(
            StatusEvent(
                task_id=q.task_id, tenant_id=q.tenant_id, state=state, phase=phase, message=message
            )
        )

    async def phase(self, phase: str, message: Optional[str] = None) -> int:
        """``status: working`` with ``phase``."""
        return await self.status(TaskState.WORKING, phase=phase, message=message)

    async def progress(
        self,
        current: int,
        total: int,
        step: Optional[str] = None,
        details: Optional[dict[str, Any]] = None,
    ) -> int:
        q = self.queue
        return await q.enqueue(
            ProgressEvent(
                task_id=q.task_id,
                tenant_id=q.tenant_id,
                current=current,
                total=total,
                step=step,
                details=details or {},
            )
        )

    async def artifact(
        self, artifact_type: str, data: dict[str, Any], is_partial: bool = False
    ) -> int:
        q = self.queue
        return await q.enqueue(
            ArtifactEvent(
                task_id=q.task_id,
                tenant_id=q.tenant_id,
                artifact_type=artifact_type,
                data=data,
                is_partial=is_partial,
            )
        )

    async def error(
        self,
        error_type: str,
        error_message: str,
        error_code: Optional[str] = None,
        context: Optional[dict[str, Any]] = None,
    ) -> int:
        """A recoverable error: the task goes on."""
        q = self.queue
        return await q.enqueue(
            ErrorEvent(
                task_id=q.task_id,
                tenant_id=q.tenant_id,
                error_type=error_type,
                error_message=error_message,
                error_code=error_code,
                context=context or {},
                recoverable=True,
            )
        )

    async def checkpoint(self, checkpoint: WorkflowCheckpoint) -> SavedCheckpoint:
        """Saves a workflow checkpoint (which appends its own status / progress events)."""
        return await self.queue.save_checkpoint(checkpoint)
