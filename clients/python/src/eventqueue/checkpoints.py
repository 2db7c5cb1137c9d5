"""Workflow checkpoints: save one (the server appends its ``status`` / ``progress`` events to
the workflow's queue in the same transaction), read the latest back, or list them all."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Optional, Union
from urllib.parse import quote

from pydantic import BaseModel, Field

from ._transport import Transport
from .errors import QueueNotFoundError

__all__ = [
    "CheckpointStore",
    "SavedCheckpoint",
    "StoredCheckpoint",
    "TaskCheckpoint",
    "WorkflowCheckpoint",
]

TaskStatus = Literal["pending", "running", "completed", "failed", "skipped"]


class TaskCheckpoint(BaseModel):
    """One task of a checkpointed workflow."""

    task_id: str
    status: TaskStatus
    result: Any = None


class WorkflowCheckpoint(BaseModel):
    """A checkpoint to save. ``status`` is ``pending``, ``running``, ``completed``, ``failed``,
    ``cancelled``, ``partially_completed`` or any other name (reported as ``working``)."""

    status: str
    current_phase: int = Field(default=0, ge=0)
    total_phases: int = Field(default=0, ge=0)
    tasks: list[TaskCheckpoint] = Field(default_factory=list)
    state: dict[str, Any] = Field(default_factory=dict)


class SavedCheckpoint(BaseModel):
    """The server's answer to a save: the new checkpoint's id and the offsets of the events it
    appended (``None`` without a queue, or without tasks for ``progress_offset``)."""

    workflow_id: str
    checkpoint_id: str
    seq: int
    status_offset: Optional[int] = None
    progress_offset: Optional[int] = None
    cancelled: bool = False


class StoredCheckpoint(BaseModel):
    """A checkpoint as read back."""

    checkpoint_id: str
    workflow_id: str
    tenant_id: str
    seq: int
    created_at: datetime
    status: str
    current_phase: int
    total_phases: int
    tasks: list[TaskCheckpoint]
    state: Any
    status_offset: Optional[int] = None
    progress_offset: Optional[int] = None

    def pending_tasks(self) -> list[TaskCheckpoint]:
        """The tasks still to do (neither completed nor skipped)."""
        return [t for t in self.tasks if t.status not in ("completed", "skipped")]


def _path(workflow_id: str) -> str:
    return f"/events/workflows/{quote(workflow_id, safe='')}/checkpoints"


async def save_checkpoint(
    transport: Transport,
    workflow_id: str,
    tenant_id: Optional[str],
    checkpoint: Union[WorkflowCheckpoint, dict[str, Any]],
) -> SavedCheckpoint:
    if isinstance(checkpoint, dict):
        checkpoint = WorkflowCheckpoint.model_validate(checkpoint)
    resp = await transport.request(
        "POST",
        _path(workflow_id),
        tenant=tenant_id,
        content=checkpoint.model_dump_json().encode(),
        # Saving twice would record two checkpoints: retry only what never reached the server.
        idempotent=False,
    )
    return SavedCheckpoint.model_validate_json(resp.content)


async def latest_checkpoint(
    transport: Transport, workflow_id: str, tenant_id: Optional[str]
) -> Optional[StoredCheckpoint]:
    try:
        resp = await transport.request("GET", f"{_path(workflow_id)}/latest", tenant=tenant_id)
    except QueueNotFoundError:
        return None
    return StoredCheckpoint.model_validate_json(resp.content)


class _CheckpointList(BaseModel):
    workflow_id: str
    checkpoints: list[StoredCheckpoint]


async def list_checkpoints(
    transport: Transport, workflow_id: str, tenant_id: Optional[str]
) -> list[StoredCheckpoint]:
    resp = await transport.request("GET", _path(workflow_id), tenant=tenant_id)
    return _CheckpointList.model_validate_json(resp.content).checkpoints


class CheckpointStore:
    """Checkpoints of one tenant's workflows. A workflow's queue need not exist: without one,
    a save stores the checkpoint alone."""

    def __init__(self, transport: Transport, tenant_id: Optional[str]) -> None:
        self._transport = transport
        self.tenant_id = tenant_id

    async def save(
        self, workflow_id: str, checkpoint: Union[WorkflowCheckpoint, dict[str, Any]]
    ) -> SavedCheckpoint:
        """Saves ``checkpoint``; with the workflow's queue, its events are appended
        atomically with it."""
        return await save_checkpoint(self._transport, workflow_id, self.tenant_id, checkpoint)

    async def latest(self, workflow_id: str) -> Optional[StoredCheckpoint]:
        """The workflow's newest checkpoint, or ``None`` when it has none."""
        return await latest_checkpoint(self._transport, workflow_id, self.tenant_id)

    async def list(self, workflow_id: str) -> list[StoredCheckpoint]:
        """The workflow's retained checkpoints (its newest 100), oldest first; empty when it
        has none."""
        return await list_checkpoints(self._transport, workflow_id, self.tenant_id)
