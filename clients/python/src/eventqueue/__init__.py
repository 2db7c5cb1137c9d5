"""Python client for eventqueue, with the API of the original in-memory EventQueue design.

Code written for the original switches by changing its import::

    from eventqueue import get_queue_manager, create_status_event, TaskState

The manager talks to a running ``eventqueue serve`` (``EVENTQUEUE_URL``, default
``http://127.0.0.1:8000``; ``EVENTQUEUE_TOKEN`` in token mode; ``EVENTQUEUE_TENANT``).
"""

from ._transport import TenantMismatchError
from .checkpoints import (
    CheckpointStore,
    SavedCheckpoint,
    StoredCheckpoint,
    TaskCheckpoint,
    WorkflowCheckpoint,
)
from .errors import (
    AuthenticationError,
    ConflictError,
    EventQueueError,
    HTTPError,
    InsufficientStorageError,
    InvalidRequestError,
    PayloadTooLargeError,
    PermissionDeniedError,
    QueueClosedError,
    QueueExistsError,
    QueueNotFoundError,
    RateLimitedError,
    ServerError,
    TaskFinishedError,
    TransportError,
)
from .manager import QueueManager, get_queue_manager, reset_queue_manager
from .producer import Producer, TaskCancelled
from .queue import CancellationToken, EventQueue, Gap, GapWarning, ProtocolError, Subscription
from .types import (
    ArtifactEvent,
    BaseEvent,
    CompleteEvent,
    ErrorEvent,
    EventType,
    ProgressEvent,
    StatusEvent,
    TaskEvent,
    TaskEventProtocol,
    TaskState,
    create_artifact_event,
    create_complete_event,
    create_error_event,
    create_progress_event,
    create_status_event,
    is_terminal,
)

__version__ = "0.1.0"

__all__ = [
    "ArtifactEvent",
    "AuthenticationError",
    "BaseEvent",
    "CancellationToken",
    "CheckpointStore",
    "CompleteEvent",
    "ConflictError",
    "ErrorEvent",
    "EventQueue",
    "EventQueueError",
    "EventType",
    "Gap",
    "GapWarning",
    "HTTPError",
    "InsufficientStorageError",
    "InvalidRequestError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Producer",
    "ProgressEvent",
    "ProtocolError",
    "QueueClosedError",
    "QueueExistsError",
    "QueueManager",
    "QueueNotFoundError",
    "RateLimitedError",
    "SavedCheckpoint",
    "ServerError",
    "StatusEvent",
    "StoredCheckpoint",
    "Subscription",
    "TaskCancelled",
    "TaskCheckpoint",
    "TaskEvent",
    "TaskEventProtocol",
    "TaskFinishedError",
    "TaskState",
    "TenantMismatchError",
    "TransportError",
    "WorkflowCheckpoint",
    "create_artifact_event",
    "create_complete_event",
    "create_error_event",
    "create_progress_event",
    "create_status_event",
    "get_queue_manager",
    "is_terminal",
    "reset_queue_manager",
]
