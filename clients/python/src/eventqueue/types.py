"""Event types: the original design's pydantic models, names and factory functions.

The models keep the original's fields, defaults and validation, with three additions that the
server's contract calls for:

- every event has an ``offset`` (``None`` until the server assigned one; events read back from
  a subscription always carry it);
- ``timestamp`` is timezone-aware UTC (the server stores microseconds and writes ``Z``);
- ``ProgressEvent.percentage`` may be left out: it is then computed as the factory computes it
  (``current / total * 100``, 0 when ``total`` is 0), as the server would.

``details`` (progress) and ``context`` (error) default to ``{}``, which is what the server
stores for an absent or ``null`` value, so that an event read back equals the one sent; the
factories turn ``None`` into ``{}`` for the same reason (the models still accept ``None``).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, Literal, Optional, Protocol, Union, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_serializer

__all__ = [
    "ArtifactEvent",
    "BaseEvent",
    "CompleteEvent",
    "ErrorEvent",
    "EventType",
    "ProgressEvent",
    "StatusEvent",
    "TaskEvent",
    "TaskEventProtocol",
    "TaskState",
    "create_artifact_event",
    "create_complete_event",
    "create_error_event",
    "create_progress_event",
    "create_status_event",
    "is_terminal",
]


class TaskState(str, Enum):
    """A2A-compatible task states."""

    PENDING = "pending"
    WORKING = "working"
    INPUT_REQUIRED = "input-required"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class EventType(str, Enum):
    """Event type discriminator."""

    STATUS = "status"
    PROGRESS = "progress"
    ARTIFACT = "artifact"
    ERROR = "error"
    COMPLETE = "complete"


def _event_id() -> str:
    return f"evt_{uuid.uuid4().hex[:12]}"


def _artifact_id() -> str:
    return f"art_{uuid.uuid4().hex[:8]}"


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _percentage(data: dict[str, Any]) -> float:
    current, total = data.get("current"), data.get("total")
    if isinstance(current, int) and isinstance(total, int) and total > 0:
        return current / total * 100
    return 0.0


class BaseEvent(BaseModel):
    """Fields every event has."""

    # Strings other than keys are mostly unique (ids, timestamps): caching them costs more
    # than it saves when a replay parses thousands of events.
    model_config = ConfigDict(use_enum_values=True, cache_strings="keys")

    event_id: str = Field(default_factory=_event_id)
    task_id: str = Field(..., description="Workflow ID or Job ID")
    tenant_id: str = Field(..., description="Tenant identifier for multi-tenant isolation")
    timestamp: datetime = Field(default_factory=_utcnow)
    # Each event class narrows this to its own value. A plain string, as the original's
    # ``use_enum_values`` made it; it compares equal to the ``EventType`` member.
    event_type: str
    offset: Optional[int] = Field(
        default=None, description="Position in the queue, assigned by the server at commit"
    )

    @field_serializer("timestamp")
    def _utc(self, value: datetime) -> datetime:
        # A naive timestamp (the original used datetime.utcnow()) is taken as UTC. Done when
        # serialising rather than validating: events read back are aware already, and a
        # validator would run once per event of every replay.
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class StatusEvent(BaseEvent):
    """Task state transition (A2A TaskStatusUpdateEvent)."""

    event_type: Literal["status"] = "status"
    state: TaskState = Field(..., description="Current task state")
    phase: Optional[str] = Field(default=None, description="Current execution phase")
    message: Optional[str] = Field(default=None, description="Human-readable status message")


class ProgressEvent(BaseEvent):
    """Incremental progress update."""

    event_type: Literal["progress"] = "progress"
    current: int = Field(..., ge=0, description="Current progress value")
    total: int = Field(..., ge=0, description="Total progress value")
    # Computed from current and total when left out (only then: a factory with the validated
    # data costs nothing when the field is given, as in every event read back).
    percentage: float = Field(
        default_factory=_percentage, ge=0, le=100, description="Progress percentage"
    )
    step: Optional[str] = Field(default=None, description="Current step name")
    details: Optional[dict[str, Any]] = Field(
        default_factory=dict, description="Additional progress details"
    )


class ArtifactEvent(BaseEvent):
    """Intermediate artifact or result (A2A TaskArtifactUpdateEvent)."""

    event_type: Literal["artifact"] = "artifact"
    artifact_type: str = Field(..., description="Type of artifact (e.g. 'search_result')")
    artifact_id: str = Field(default_factory=_artifact_id)
    data: dict[str, Any] = Field(..., description="Artifact payload")
    is_partial: bool = Field(
        default=False, description="Whether this is a partial/streaming result"
    )


class ErrorEvent(BaseEvent):
    """Error notification with context."""

    event_type: Literal["error"] = "error"
    error_type: str = Field(..., description="Error classification")
    error_message: str = Field(..., description="Human-readable error message")
    error_code: Optional[str] = Field(
        default=None, description="Error code for programmatic handling"
    )
    context: Optional[dict[str, Any]] = Field(
        default_factory=dict, description="Error context/stack trace"
    )
    recoverable: bool = Field(default=True, description="Whether the error is recoverable")


class CompleteEvent(BaseEvent):
    """Task completion with the final result."""

    event_type: Literal["complete"] = "complete"
    result: dict[str, Any] = Field(..., description="Final result payload")
    summary: Optional[str] = Field(default=None, description="Human-readable completion summary")
    execution_time_seconds: Optional[float] = Field(
        default=None, description="Total execution time"
    )


TaskEvent = Union[StatusEvent, ProgressEvent, ArtifactEvent, ErrorEvent, CompleteEvent]
"""Any event (a plain union, as in the original)."""


@runtime_checkable
class TaskEventProtocol(Protocol):
    """What every event has, for type checking (as in the original)."""

    event_id: str
    task_id: str
    tenant_id: str
    timestamp: datetime
    event_type: str


_Tagged = Annotated[TaskEvent, Field(discriminator="event_type")]
EVENT_ADAPTER: TypeAdapter[TaskEvent] = TypeAdapter(_Tagged)

_TERMINAL_STATES = frozenset({TaskState.FAILED.value, TaskState.CANCELLED.value})


def is_terminal(event: TaskEvent) -> bool:
    """Whether ``event`` finishes its task: ``complete``, a non-recoverable ``error``, or a
    ``status`` of ``failed`` or ``cancelled`` (``status: completed`` is not terminal)."""
    if isinstance(event, CompleteEvent):
        return True
    if isinstance(event, ErrorEvent):
        return not event.recoverable
    if isinstance(event, StatusEvent):
        return str(event.state) in _TERMINAL_STATES or event.state in _TERMINAL_STATES
    return False


def event_json(event: TaskEvent) -> bytes:
    """The event as the server reads it (without ``offset``, which the server assigns)."""
    return event.model_dump_json(exclude={"offset"}).encode()


def create_status_event(
    task_id: str,
    tenant_id: str,
    state: TaskState,
    phase: Optional[str] = None,
    message: Optional[str] = None,
) -> StatusEvent:
    """Factory function to create a StatusEvent."""
    return StatusEvent(
        task_id=task_id, tenant_id=tenant_id, state=state, phase=phase, message=message
    )


def create_progress_event(
    task_id: str,
    tenant_id: str,
    current: int,
    total: int,
    step: Optional[str] = None,
    details: Optional[dict[str, Any]] = None,
) -> ProgressEvent:
    """Factory function to create a ProgressEvent; the percentage is computed."""
    percentage = (current / total * 100) if total > 0 else 0
    return ProgressEvent(
        task_id=task_id,
        tenant_id=tenant_id,
        current=current,
        total=total,
        percentage=percentage,
        step=step,
        details={} if details is None else details,
    )


def create_artifact_event(
    task_id: str,
    tenant_id: str,
    artifact_type: str,
    data: dict[str, Any],
    is_partial: bool = False,
) -> ArtifactEvent:
    """Factory function to create an ArtifactEvent."""
    return ArtifactEvent(
        task_id=task_id,
        tenant_id=tenant_id,
        artifact_type=artifact_type,
        data=data,
        is_partial=is_partial,
    )


def create_error_event(
    task_id: str,
    tenant_id: str,
    error_type: str,
    error_message: str,
    error_code: Optional[str] = None,
    context: Optional[dict[str, Any]] = None,
    recoverable: bool = True,
) -> ErrorEvent:
    """Factory function to create an ErrorEvent."""
    return ErrorEvent(
        task_id=task_id,
        tenant_id=tenant_id,
        error_type=error_type,
        error_message=error_message,
        error_code=error_code,
        context={} if context is None else context,
        recoverable=recoverable,
    )


def create_complete_event(
    task_id: str,
    tenant_id: str,
    result: dict[str, Any],
    summary: Optional[str] = None,
    execution_time_seconds: Optional[float] = None,
) -> CompleteEvent:
    """Factory function to create a CompleteEvent."""
    return CompleteEvent(
        task_id=task_id,
        tenant_id=tenant_id,
        result=result,
        summary=summary,
        execution_time_seconds=execution_time_seconds,
    )
