"""Fixtures: a real ``eventqueue serve`` on a free loopback port with a temporary data
directory, in open mode and in token mode.

The binary is ``$EVENTQUEUE_BIN``, else ``target/release/eventqueue`` under the repository root.
A missing binary is an error, never a skip.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Optional

import pytest

import eventqueue

REPO = Path(__file__).resolve().parents[3]
LISTENING = re.compile(r"listening on http://(\S+)")


def server_binary() -> Path:
    configured = os.environ.get("EVENTQUEUE_BIN")
    path = Path(configured) if configured else REPO / "target" / "release" / "eventqueue"
    if not path.is_file():
        pytest.fail(
            f"eventqueue binary not found at {path}: build it with "
            "`cargo build --release --bin eventqueue` or set EVENTQUEUE_BIN",
            pytrace=False,
        )
    return path


class Server:
    """One ``eventqueue serve`` process; ``kill()`` + ``start()`` restarts it on the same port
    and data directory."""

    def __init__(self, data_dir: Path, secret_file: Optional[Path] = None) -> None:
        self.binary = server_binary()
        self.data_dir = data_dir
        self.secret_file = secret_file
        self.bind = "127.0.0.1:0"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.url = ""
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.data_dir.parent / f"{self.data_dir.name}-server-{self.starts}.log"
        args = [
            str(self.binary),
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--bind",
            self.bind,
            "--cleanup-interval-secs",
            "1",
            "--disk-reserve-mb",
            "0",
        ]
        if self.secret_file is not None:
            args += ["--jwt-secret-file", str(self.secret_file)]
        env = {**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            match = LISTENING.search(text)
            if match:
                self.bind = match.group(1)  # restarts reuse the port
                self.url = f"http://{self.bind}"
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"eventqueue serve exited early:\n{text}")
            time.sleep(0.02)
        raise RuntimeError(f"eventqueue serve did not start:\n{log.read_text(errors='replace')}")

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, no final sync."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def token(self, tenant: str, scope: str = "subscribe publish", ttl: str = "1h") -> str:
        assert self.secret_file is not None
        out = subprocess.run(
            [
                str(self.binary),
                "token",
                "--jwt-secret-file",
                str(self.secret_file),
                "--tenant",
                tenant,
                "--scope",
                scope,
                "--ttl",
                ttl,
            ],
            check=True,
            capture_output=True,
        )
        return out.stdout.decode().strip()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An open-mode server shared by the session (tests use unique task ids)."""
    s = Server(tmp_path_factory.mktemp("open") / "data")
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A token-mode server (HS256 secret file)."""
    base = tmp_path_factory.mktemp("token")
    secret = base / "jwt.secret"
    secret.write_bytes(os.urandom(48).hex().encode())
    s = Server(base / "data", secret)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[Server]:
    """A server of the test's own, for tests that kill or restart it."""
    s = Server(tmp_path / "data")
    s.start()
    yield s
    s.kill()


@pytest.fixture
def task_id() -> str:
    return f"task_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def tenant() -> str:
    """A tenant of the test's own: listings and stats see only this test's queues."""
    return f"tenant_{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def manager(server: Server, tenant: str) -> AsyncIterator[eventqueue.QueueManager]:
    m = eventqueue.QueueManager(server.url, tenant_id=tenant)
    yield m
    await m.aclose()


@pytest.fixture
def global_manager(server: Server, monkeypatch: pytest.MonkeyPatch, tenant: str) -> Iterator[None]:
    """``get_queue_manager()`` configured through the environment, as an application would."""
    monkeypatch.setenv("EVENTQUEUE_URL", server.url)
    monkeypatch.setenv("EVENTQUEUE_TENANT", tenant)
    eventqueue.reset_queue_manager()
    yield
    eventqueue.reset_queue_manager()
