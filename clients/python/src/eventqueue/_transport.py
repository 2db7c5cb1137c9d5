"""HTTP plumbing shared by the queue, the manager and the background worker.

- One ``httpx.AsyncClient`` per event loop: an async client's connections belong to the loop
  that opened them, and the same manager is used from several loops (FastAPI's ``TestClient``
  runs the app on a loop of its own thread; ``asyncio.run`` twice makes two loops).
- Credentials: ``Authorization: Bearer`` in token mode, ``X-Tenant-ID`` in open mode. With an
  ``admin`` token, a request for another tenant names it with ``?tenant_id=``.
- Error answers become typed exceptions (``errors.error_for_status``) carrying ``detail``.
- Retries with backoff: a request that never reached the server (connect error) is always
  retried; one that may have reached it only when repeating it is harmless (``idempotent``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import httpx

from .errors import EventQueueError, HTTPError, TransportError, error_for_status

__all__ = ["RETRYABLE_STATUS", "Settings", "Transport"]

# Answers worth repeating a request for.
RETRYABLE_STATUS = frozenset({408, 429, 502, 503, 504})
# Of those, the ones the server itself gives for a request it did not carry out (a proxy's
# 502 / 504 may follow one that was): only these are repeated for a request that is not
# idempotent.
NOT_DONE_STATUS = frozenset({408, 429, 503})


@dataclass(frozen=True)
class Settings:
    """Where the server is and how to talk to it."""

    url: str = "http://127.0.0.1:8000"
    token: Optional[str] = None
    tenant_id: str = "default"
    #: Time limit of one request (not of a stream, which has ``stream_idle_timeout``).
    timeout: float = 30.0
    connect_timeout: float = 5.0
    #: Retries of a failed request (connection errors, 408/429/502/503/504) before giving up.
    max_retries: int = 8
    retry_initial_delay: float = 0.1
    retry_max_delay: float = 2.0
    #: A stream on which nothing arrives for this long (the server sends a keepalive comment
    #: every 15 s by default) is taken as dead and reconnected.
    stream_idle_timeout: float = 45.0
    #: How often the background worker asks the server whether a queue in use was cancelled
    #: elsewhere; 0 turns polling off (enqueue answers still report it).
    cancel_poll_interval: float = 0.5

    def backoff(self, attempt: int) -> float:
        """Wait before retry ``attempt`` (1-based): doubling, capped, with a little jitter."""
        base = min(self.retry_max_delay, self.retry_initial_delay * (2 ** max(0, attempt - 1)))
        return float(base * (0.75 + random.random() / 2))


def token_claims(token: Optional[str]) -> dict[str, Any]:
    """The claims of a JWT, read without verifying it (the server verifies): used only to know
    the token's tenant and scopes before asking."""
    if not token:
        return {}
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


class TenantMismatchError(EventQueueError, ValueError):
    """A request for a tenant the token does not grant (only an ``admin`` token may act for
    another tenant)."""


class Transport:
    """Per-loop async clients, credentials, error mapping and retries."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._claims = token_claims(settings.token)
        self._lock = threading.Lock()
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient]
        self._clients = weakref.WeakKeyDictionary()
        headers = {"user-agent": "eventqueue-python"}
        if settings.token:
            headers["authorization"] = f"Bearer {settings.token}"
        self._headers = headers

    # -- identity -------------------------------------------------------------------------

    @property
    def token_tenant(self) -> Optional[str]:
        tenant = self._claims.get("tenant_id")
        return tenant if isinstance(tenant, str) else None

    @property
    def is_admin(self) -> bool:
        scope = self._claims.get("scope")
        return isinstance(scope, str) and "admin" in scope.split()

    def default_tenant(self) -> str:
        """The tenant used when a call names none: the token's, else the configured one."""
        if self.settings.token and self.token_tenant and not self.is_admin:
            return self.token_tenant
        return self.settings.tenant_id

    def tenant_params(self, tenant: Optional[str]) -> tuple[dict[str, str], dict[str, str]]:
        """Headers and query parameters that make a request act for ``tenant``."""
        if tenant is None:
            return {}, {}
        if not self.settings.token:
            return {"x-tenant-id": tenant}, {}
        own = self.token_tenant
        if own is None or tenant == own:
            return {}, {}
        if self.is_admin:
            return {}, {"tenant_id": tenant}
        raise TenantMismatchError(
            f"the token is for tenant {own!r}, not {tenant!r} (only an admin token may act for "
            "another tenant)"
        )

    # -- clients --------------------------------------------------------------------------

    def _new_client(self) -> httpx.AsyncClient:
        s = self.settings
        return httpx.AsyncClient(
            base_url=s.url,
            headers=self._headers,
            timeout=httpx.Timeout(s.timeout, connect=s.connect_timeout),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        )

    def client(self) -> httpx.AsyncClient:
        """The async client of the running event loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._clients.get(loop)
            if client is None or client.is_closed:
                client = self._new_client()
                self._clients[loop] = client
            return client

    def sync_client(self) -> httpx.Client:
        """The background worker's client. Its requests are small (a cancel, a queue's info):
        a short time limit keeps one stuck request from holding up the others."""
        s = self.settings
        return httpx.Client(
            base_url=s.url,
            headers=self._headers,
            timeout=httpx.Timeout(min(s.timeout, 5.0), connect=min(s.connect_timeout, 5.0)),
        )

    async def aclose(self) -> None:
        """Closes the current loop's client (the others close with their loops)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()

    # -- requests -------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        tenant: Optional[str],
        content: Optional[bytes] = None,
        params: Optional[dict[str, str]] = None,
        idempotent: bool = True,
        ok: tuple[int, ...] = (),
    ) -> httpx.Response:
        """Sends a request, retrying what may be retried; returns a 2xx answer (or one whose
        status is in ``ok``), raises the typed error otherwise."""
        headers, query = self.tenant_params(tenant)
        if content is not None:
            headers["content-type"] = "application/json"
        if params:
            query = {**query, **params}
        s = self.settings
        attempt = 0
        while True:
            client = self.client()
            retry_after: Optional[float] = None
            try:
                resp = await client.request(
                    method, path, content=content, headers=headers, params=query or None
                )
            except httpx.TransportError as e:
                attempt += 1
                sent = not isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout))
                if (sent and not idempotent) or attempt > s.max_retries:
                    raise TransportError(f"{method} {path}: {describe(e)}") from e
            else:
                if resp.status_code < 400 or resp.status_code in ok:
                    return resp
                error = http_error(resp, method, path)
                attempt += 1
                retryable = RETRYABLE_STATUS if idempotent else NOT_DONE_STATUS
                if resp.status_code not in retryable or attempt > s.max_retries:
                    raise error
                if resp.status_code == 429 and isinstance(error, HTTPError):
                    retry_after = getattr(error, "retry_after", None)
            delay = s.backoff(attempt)
            if retry_after is not None:
                delay = max(delay, min(retry_after, 30.0))
            await asyncio.sleep(delay)


def describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def detail_of(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:500] or resp.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return str(body["detail"])
    return resp.text.strip()[:500]


def http_error(resp: httpx.Response, method: str, path: str) -> HTTPError:
    retry_after: Optional[float] = None
    header = resp.headers.get("retry-after")
    if header is not None:
        try:
            retry_after = float(header)
        except ValueError:
            retry_after = None
    return error_for_status(
        resp.status_code, detail_of(resp), method=method, url=path, retry_after=retry_after
    )
