"""Typed exceptions. Every HTTP error answer becomes one of these, carrying the server's
``detail`` text and status code.

Where the original raised a built-in exception, the typed one derives from it too, so code
written for the original keeps catching what it caught: an existing queue is a ``ValueError``,
an enqueue on a closed queue a ``RuntimeError``.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "AuthenticationError",
    "ConflictError",
    "EventQueueError",
    "HTTPError",
    "InsufficientStorageError",
    "InvalidRequestError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "QueueClosedError",
    "QueueExistsError",
    "QueueNotFoundError",
    "RateLimitedError",
    "ServerError",
    "TaskFinishedError",
    "TransportError",
    "error_for_status",
]


class EventQueueError(Exception):
    """Base of every error this package raises."""


class TransportError(EventQueueError):
    """The server could not be reached, or the connection failed before an answer (after the
    retries the operation allows)."""


class HTTPError(EventQueueError):
    """The server answered with an error status. ``detail`` is its ``{"detail": ...}`` text."""

    def __init__(self, status_code: int, detail: str, *, method: str = "", url: str = "") -> None:
        self.status_code = status_code
        self.detail = detail
        self.method = method
        self.url = url
        where = f" ({method} {url})" if method else ""
        super().__init__(f"{status_code}: {detail}{where}")


class InvalidRequestError(HTTPError, ValueError):
    """400: a bad id, bad JSON, or an invalid event or checkpoint; ``detail`` names the field."""


class AuthenticationError(HTTPError):
    """401: a missing, malformed, forged or expired token."""


class PermissionDeniedError(HTTPError):
    """403: a token without the scope the operation needs."""


class QueueNotFoundError(HTTPError, LookupError):
    """404: no such queue (or another tenant's, which is the same to the caller)."""


class ConflictError(HTTPError):
    """409: the operation conflicts with the queue's state."""


class QueueExistsError(ConflictError, ValueError):
    """409 on create: the queue already exists (the original raised ``ValueError``)."""


class QueueClosedError(ConflictError, RuntimeError):
    """409 on enqueue or checkpoint save: the queue is closed (the original raised
    ``RuntimeError``)."""


class TaskFinishedError(ConflictError):
    """409 on cancel: the task has already finished."""


class PayloadTooLargeError(HTTPError, ValueError):
    """413: the body, an event or a batch exceeds the server's limits."""


class RateLimitedError(HTTPError):
    """429: too many streams or queues. ``retry_after`` is the server's hint in seconds."""

    def __init__(
        self,
        status_code: int,
        detail: str,
        *,
        method: str = "",
        url: str = "",
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(status_code, detail, method=method, url=url)
        self.retry_after = retry_after


class InsufficientStorageError(HTTPError):
    """507: the server's disk is below its free-space reserve."""


class ServerError(HTTPError):
    """5xx other than 507 (503: shutting down)."""


def error_for_status(
    status_code: int,
    detail: str,
    *,
    method: str = "",
    url: str = "",
    retry_after: Optional[float] = None,
) -> HTTPError:
    """The typed exception for an error answer."""
    kwargs = {"method": method, "url": url}
    if status_code == 400:
        return InvalidRequestError(status_code, detail, **kwargs)
    if status_code == 401:
        return AuthenticationError(status_code, detail, **kwargs)
    if status_code == 403:
        return PermissionDeniedError(status_code, detail, **kwargs)
    if status_code == 404:
        return QueueNotFoundError(status_code, detail, **kwargs)
    if status_code == 409:
        # The server's texts: "Queue already exists: {task} (tenant {tenant})",
        # "queue {task} is closed", "... {task} has already finished".
        lowered = detail.lower()
        if lowered.startswith("queue already exists"):
            return QueueExistsError(status_code, detail, **kwargs)
        if lowered.endswith(" is closed"):
            return QueueClosedError(status_code, detail, **kwargs)
        if lowered.endswith(" has already finished"):
            return TaskFinishedError(status_code, detail, **kwargs)
        return ConflictError(status_code, detail, **kwargs)
    if status_code == 413:
        return PayloadTooLargeError(status_code, detail, **kwargs)
    if status_code == 429:
        return RateLimitedError(status_code, detail, retry_after=retry_after, **kwargs)
    if status_code == 507:
        return InsufficientStorageError(status_code, detail, **kwargs)
    if status_code >= 500:
        return ServerError(status_code, detail, **kwargs)
    return HTTPError(status_code, detail, **kwargs)
